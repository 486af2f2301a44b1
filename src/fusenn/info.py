"""python -m fusenn.info: versions, GPU and which backends are usable here, and why not."""

import platform
import sys

import torch

from fusenn import dispatch


def report() -> str:
    import fusenn

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    lines = [
        f"fusenn    {fusenn.__version__}",
        f"python    {platform.python_version()} ({sys.executable})",
        f"torch     {torch.__version__} (CUDA {torch.version.cuda or 'none: CPU build'})",
        f"triton    {triton_version}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            lines.append(f"gpu {i}     {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
    else:
        lines.append("gpu       none visible to torch")
    lines.append(f"backend   {fusenn.get_backend()} (fusenn.set_backend / FUSENN_BACKEND)")
    lines.append("")
    lines.append(f"{'backend':<10} {'ok':<4} detail")
    lines.extend(str(b) for b in fusenn.backends().values())
    build = dispatch.build_record()
    if build.get("extension"):
        lines.append(f"\nfusenn._C: {build['extension']}")
    elif "failed" in (build.get("skipped_because") or ""):
        lines.append(f"\nWARNING: {build['skipped_because']}")
    return "\n".join(lines)


def summary(device, what="fusenn") -> str:
    """One line for a script's log: the device, the backend setting and which backends can serve it."""
    import fusenn

    device = torch.device(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    usable = [name for name, b in fusenn.backends().items()
              if b.usable and dispatch._device_reason(name, device) is None]
    return (f"{what} on {device} ({where}); fusenn backend {fusenn.get_backend()}, able to serve {device.type} "
            f"tensors: {', '.join(usable)}; FUSENN_LOG=1 logs each op's choice")


def main():
    print(report())


if __name__ == "__main__":
    main()

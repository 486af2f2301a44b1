"""python -m fusenn.info: versions, GPU and which backends are usable here, and why not."""

import platform
import sys

import torch


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
    return "\n".join(lines)


def main():
    print(report())


if __name__ == "__main__":
    main()

"""Build fusenn: the Python package always; the CUDA extension fusenn._C when it can be built.

FUSENN_CUDA=auto (default) builds fusenn._C when torch is a CUDA build and a CUDA toolkit (nvcc) is
found; 0 never builds it; 1 requires it, and against a CPU build of torch compiles and links it anyway
(a compile check: such a build cannot run). TORCH_CUDA_ARCH_LIST is honoured (default 8.0;9.0a), and
MAX_JOBS is chosen from cores and memory when unset.
"""

import glob
import json
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0a"


def log(msg):
    print(f"fusenn: {msg}", file=sys.stderr, flush=True)


def find_nvcc():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


def default_max_jobs():
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = 8.0
    return max(1, min(cores, int(mem_gib // 3)))  # nvcc with templates takes 2-3 GiB a job


def cuda_extension():
    """The fusenn._C extension and the build command for it, or (None, reason) when skipped."""
    mode = os.environ.get("FUSENN_CUDA", "auto").strip().lower()
    if mode not in ("0", "1", "auto"):
        raise SystemExit(f"fusenn: FUSENN_CUDA must be 0, 1 or auto, got {mode!r}")
    if mode == "0":
        return None, "FUSENN_CUDA=0"
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        if mode == "1":
            raise SystemExit("fusenn: FUSENN_CUDA=1 but torch is not importable (install torch first and "
                             "build with --no-build-isolation)")
        return None, "torch is not importable in the build environment (use --no-build-isolation)"
    cuda_home = find_nvcc()
    cpu_torch = torch.version.cuda is None
    reason = None
    if cuda_home is None:
        reason = "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    elif cpu_torch and mode == "auto":
        reason = f"torch {torch.__version__} is a CPU build"
    if reason:
        if mode == "1":
            raise SystemExit(f"fusenn: FUSENN_CUDA=1 but {reason}")
        return None, reason

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    # torch finds its toolkit from `which nvcc` when CUDA_HOME is unset, and a wrapper script on the PATH
    # (/usr/local/bin/nvcc) then points it at a directory without lib64/libcudart: use the one found here.
    cpp_extension.CUDA_HOME = cuda_home
    extra_link = []
    if cpu_torch:
        # Compile check against the CPU wheel: it ships no c10_cuda/torch_cuda.
        extra_link = [f"-L{os.path.join(cuda_home, 'lib64')}", "-lcudart"]
        original = cpp_extension.library_paths

        def library_paths(*args, **kwargs):
            return [p for p in original(*args, **kwargs) if "cuda" not in os.path.basename(p)]

        cpp_extension.library_paths = library_paths
        original_ext = cpp_extension.CUDAExtension

        def cuda_ext(*args, **kwargs):
            ext = original_ext(*args, **kwargs)
            ext.libraries = [lib for lib in ext.libraries if lib not in ("c10_cuda", "torch_cuda")]
            return ext

        cpp_extension.CUDAExtension = cuda_ext
        log("building fusenn._C against a CPU build of torch: a compile check, it cannot run here")
    sources = sorted(glob.glob("csrc/*.cu")) + sorted(glob.glob("csrc/*.cpp"))
    ext = cpp_extension.CUDAExtension(
        name="fusenn._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=[("FUSENN_WITH_CUDA", None)],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                            "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
        extra_link_args=extra_link,
    )
    log(f"building fusenn._C for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} "
        f"with MAX_JOBS={os.environ['MAX_JOBS']} (CUDA at {cuda_home})")
    base = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)

    class BuildExtension(base):
        """Under FUSENN_CUDA=auto a failed build leaves the package installed without fusenn._C, saying why."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as exc:  # noqa: BLE001 - compiler and linker failures come in many types
                if mode == "1":
                    raise
                reason = f"the build failed ({type(exc).__name__}: {str(exc)[:300]}); rebuild with FUSENN_CUDA=1 " \
                         "and pip install -v to see the compiler's output"
                log(f"CUDA extension skipped: {reason}")
                write_build_info(None, reason)
                self.extensions = []

    return (ext, BuildExtension), None


def write_build_info(built, skipped):
    """What this build did, for `python -m fusenn.info` (pip hides setup's log unless run with -v)."""
    with open(os.path.join(ROOT, "src", "fusenn", "_build.json"), "w") as f:
        json.dump({"cuda_extension": built is not None, "skipped_because": skipped,
                   "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if built else None}, f)


built, skipped = cuda_extension()
if skipped:
    log(f"CUDA extension skipped: {skipped}; the Triton and reference backends remain")
write_build_info(built, skipped)

setup(
    package_dir={"fusenn": "src/fusenn", "fusenn.kernels": "kernels"},
    packages=["fusenn", "fusenn.nn", "fusenn.ops", "fusenn.reference", "fusenn.kernels"],
    package_data={"fusenn": ["_build.json"]},
    ext_modules=[built[0]] if built else [],
    cmdclass={"build_ext": built[1]} if built else {},
)

"""Build fusenn: the Python package always; the C++ extension fusenn._C when it can be built.

FUSENN_CUDA=auto (default) builds fusenn._C with its CUDA kernels when torch is a CUDA build and a CUDA
toolkit (nvcc) is found, and else host-only (the C++ RNN layers' CPU implementations, no CUDA); 0 builds it
host-only; 1 requires the CUDA build, and against a CPU build of torch compiles and links it anyway (a compile
check: such a build cannot run). FUSENN_CPP=0 skips the extension altogether. TORCH_CUDA_ARCH_LIST is
honoured (default 8.0;9.0a), MAX_JOBS is chosen from cores and memory when unset, and the C++ standard is the
one the installed torch's headers need. A failed build under auto installs the package without fusenn._C and
says so loudly, with the compiler's first error line; src/fusenn/_build.json records what happened, written
only once the build has succeeded or failed.
"""

import glob
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile

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


def cxx_std():
    spec = importlib.util.spec_from_file_location("fusenn_cxx", os.path.join(ROOT, "src", "fusenn", "_cxx.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cxx_std()


def first_error_line(log_text):
    """The compiler's first error line in a build log (or its last non-empty line)."""
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    for line in lines:
        if re.search(r"(^|[\s:])(fatal )?error\b", line, re.IGNORECASE) and not line.startswith("FAILED:"):
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def shout(msg):
    """A warning that survives pip's quiet mode: pip hides a build's output unless -v, so it also goes to the
    terminal where there is one (python -m fusenn.info and dev.py repeat it)."""
    banner = "\n" + "!" * 100 + f"\nfusenn: WARNING: {msg}\n" + "!" * 100 + "\n"
    print(banner, file=sys.stderr, flush=True)
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(banner)
    except OSError:
        pass


def default_max_jobs():
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = 8.0
    return max(1, min(cores, int(mem_gib // 3)))  # nvcc with templates takes 2-3 GiB a job


def cuda_reason(mode, torch):
    """None when the CUDA build is to be made, else why not (FUSENN_CUDA=1 turns that into an error)."""
    if mode == "0":
        return "FUSENN_CUDA=0"
    reason = None
    if find_nvcc() is None:
        reason = "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    elif torch.version.cuda is None and mode == "auto":
        reason = f"torch {torch.__version__} is a CPU build"
    if reason and mode == "1":
        raise SystemExit(f"fusenn: FUSENN_CUDA=1 but {reason}")
    return reason


def drop_cuda_libraries(cpp_extension, cuda_home):
    """Compile check against the CPU wheel: it ships no c10_cuda/torch_cuda."""
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
    return [f"-L{os.path.join(cuda_home, 'lib64')}", "-lcudart"]


def extension():
    """(the fusenn._C extension, its build command, what it is), or (None, None, why none is built)."""
    mode = os.environ.get("FUSENN_CUDA", "auto").strip().lower()
    if mode not in ("0", "1", "auto"):
        raise SystemExit(f"fusenn: FUSENN_CUDA must be 0, 1 or auto, got {mode!r}")
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        if mode == "1":
            raise SystemExit("fusenn: FUSENN_CUDA=1 but torch is not importable (install torch first and "
                             "build with --no-build-isolation)")
        return None, None, "torch is not importable in the build environment (use --no-build-isolation)"
    no_cuda = cuda_reason(mode, torch)
    if os.environ.get("FUSENN_CPP", "1").strip() == "0":
        return None, None, "FUSENN_CPP=0"
    std = f"-std={cxx_std()}"
    # -fno-trapping-math: the CPU loops' clamps become vector blends (csrc/rnn_host.cpp, activate_row)
    # -ffp-contract=off: the AVX-512 clones of those loops (x86-64-v4 has FMA) compute the same bits as the others
    cxx = ["-O3", std, "-fno-trapping-math", "-ffp-contract=off"]
    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    if no_cuda:
        kind = f"host-only (the C++ RNN layers on CPU tensors; no CUDA kernels: {no_cuda})"
        ext = cpp_extension.CppExtension(name="fusenn._C", sources=sorted(glob.glob("csrc/*.cpp")),
                                         include_dirs=[os.path.join(ROOT, "csrc")],
                                         extra_compile_args=cxx)
    else:
        cuda_home = find_nvcc()
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
        # torch finds its toolkit from `which nvcc` when CUDA_HOME is unset, and a wrapper script on the PATH
        # (/usr/local/bin/nvcc) then points it at a directory without lib64/libcudart: use the one found here.
        cpp_extension.CUDA_HOME = cuda_home
        extra_link = drop_cuda_libraries(cpp_extension, cuda_home) if torch.version.cuda is None else []
        kind = f"CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} (CUDA at {cuda_home})"
        ext = cpp_extension.CUDAExtension(
            name="fusenn._C",
            sources=sorted(glob.glob("csrc/*.cu")) + sorted(glob.glob("csrc/*.cpp")),
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("FUSENN_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", std, "-lineinfo"]},
            extra_link_args=extra_link,
        )
    log(f"building fusenn._C: {kind}, {std}, MAX_JOBS={os.environ['MAX_JOBS']}")
    base = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)

    class BuildExtension(base):
        """Records the outcome in _build.json; under FUSENN_CUDA=auto a failed build leaves the package installed
        without fusenn._C, with a loud warning carrying the compiler's first error line."""

        def build_extensions(self):
            with tempfile.TemporaryFile(mode="w+") as captured:
                saved = os.dup(1), os.dup(2)
                sys.stdout.flush(), sys.stderr.flush()
                os.dup2(captured.fileno(), 1), os.dup2(captured.fileno(), 2)
                try:
                    super().build_extensions()
                    failure = None
                except Exception as exc:  # noqa: BLE001 - compiler and linker failures come in many types
                    failure = exc
                finally:
                    sys.stdout.flush(), sys.stderr.flush()
                    os.dup2(saved[0], 1), os.dup2(saved[1], 2)
                    os.close(saved[0]), os.close(saved[1])
                captured.seek(0)
                output = captured.read()
            sys.stderr.write(output)  # pip install -v still shows the compiler's whole output
            if failure is None:
                write_build_info(kind, None)
                return
            reason = (f"the build of fusenn._C ({kind.split(' (')[0]}) failed: {first_error_line(output)} "
                      "(pip install -v shows the whole compiler output)")
            write_build_info(None, reason)
            if mode == "1":
                raise failure
            shout(f"{reason}. fusenn is installed WITHOUT its C++ extension; the Triton and reference "
                  "backends remain.")
            self.extensions = []

    return ext, BuildExtension, kind


def write_build_info(built, skipped):
    """What this build did, for `python -m fusenn.info` (pip hides setup's log unless run with -v)."""
    try:
        import torch
        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    with open(BUILD_INFO, "w") as f:
        json.dump({"extension": built, "cuda_extension": bool(built) and built.startswith("CUDA"),
                   "skipped_because": skipped, "torch": torch_version}, f)


BUILD_INFO = os.path.join(ROOT, "src", "fusenn", "_build.json")
built, build_cmd, skipped = extension()
if os.path.exists(BUILD_INFO):
    os.remove(BUILD_INFO)  # written again once the build has succeeded or failed
if built is None:
    log(f"C++ extension skipped: {skipped}; the Triton and reference backends remain")
    write_build_info(None, skipped)

setup(
    package_dir={"fusenn": "src/fusenn", "fusenn.kernels": "kernels"},
    packages=["fusenn", "fusenn.nn", "fusenn.ops", "fusenn.reference", "fusenn.kernels"],
    package_data={"fusenn": ["_build.json"]},
    ext_modules=[built] if built else [],
    cmdclass={"build_ext": build_cmd} if built else {},
)

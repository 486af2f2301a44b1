"""Shared test setup.

On a machine without a GPU, fusenn.kernels turns on the Triton interpreter, so `kernel_backend` runs the
Triton kernels on CPU tensors; on a GPU it runs them compiled, and the CUDA extension beside them. It
also runs the C++ RNN layers (csrc/rnn_host.cpp) on CPU tensors ("cpp-host"): their time loop and
element-wise steps as plain host loops, from fusenn._C where built, else from a host-only build of csrc/
made here.
Tests marked `gpu` skip with a reason where torch sees no CUDA device.
"""

import functools
import os
import shutil

import pytest
import torch

import fusenn
from fusenn import dispatch

CSRC = os.path.join(os.path.dirname(__file__), os.pardir, "csrc")

HAS_GPU = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; torch sees none here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _kernel_params():
    params = [pytest.param(("triton", "cuda" if HAS_GPU else "cpu"), id="triton")]
    params.append(pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.gpu))
    params.append(pytest.param(("cpp-host", "cpu"), id="cpp-host"))
    return params


@functools.lru_cache(maxsize=None)
def cpp_host_unavailable():
    """None once the C++ RNN ops' CPU implementations are loaded (fusenn._C's, else a host-only build of
    csrc/rnn_host.cpp and csrc/bindings.cpp, cached by torch's extension builder); else the one-line reason
    they cannot be: a skip only where no C++ compiler exists; our own code failing to build (BUILD_FAILED) fails."""
    try:
        from fusenn import _C  # noqa: F401
        return None
    except ImportError:
        pass
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler to build csrc/ for the host"
    from torch.utils.cpp_extension import load

    from fusenn._cxx import cxx_std

    try:
        load(name="fusenn_host_twin", extra_include_paths=[CSRC],
             extra_cflags=["-O1", f"-std={cxx_std()}", "-ffp-contract=off"],
             sources=[os.path.join(CSRC, f) for f in ("rnn_host.cpp", "bindings.cpp")])
    except Exception as exc:  # noqa: BLE001 - compiler failures come in many types
        lines = str(exc).splitlines()
        first = next((line for line in lines if "error:" in line), lines[0] if lines else type(exc).__name__)
        return BUILD_FAILED + first.strip()[:300]
    return None


BUILD_FAILED = "the host-only build of csrc/ failed: "


def require_backend(name):
    """Skip where backend `name` cannot exist on this machine (the CUDA backend without a GPU); fail where it
    should run and does not (Triton, a dependency, must at least interpret; fusenn._C must build on a GPU box)."""
    status = fusenn.backends()[name]
    if status.usable:
        return
    if name == "cuda" and not HAS_GPU:
        pytest.skip("the cuda backend needs a CUDA GPU; torch sees none here")
    pytest.fail(f"{name} backend unusable here: {status.detail}", pytrace=False)


def _run_cpp_layers_on_cpu(monkeypatch):
    """Under backend "cuda", the LSTM and GRU layers take the C++ path with CPU tensors (which dispatch
    refuses: the real backend is for GPUs); every other op takes the reference."""
    original = dispatch.choose

    def choose(op, device, unsupported, *args):
        if dispatch.get_backend() == "cuda":
            return "cuda" if op in ("lstm", "gru") else "reference"
        return original(op, device, unsupported, *args)

    monkeypatch.setattr(dispatch, "choose", choose)


@pytest.fixture(params=_kernel_params())
def kernel_backend(request, monkeypatch):
    """(backend name, device) for each kernel backend that can run here; the backend is set for the test.
    A test module lists the backends its op has in KERNEL_BACKENDS (default: triton only)."""
    name, device = request.param
    if name not in getattr(request.module, "KERNEL_BACKENDS", ("triton",)):
        pytest.skip(f"{request.module.__name__} has no {name} implementation to test")
    if name == "cpp-host":
        why = cpp_host_unavailable()
        if why and why.startswith(BUILD_FAILED):
            pytest.fail(why, pytrace=False)
        if why:
            pytest.skip(why)
        _run_cpp_layers_on_cpu(monkeypatch)
        name = "cuda"
    else:
        require_backend(name)
    with fusenn.set_backend(name):
        yield name, torch.device(device)


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_GPU else "cpu")

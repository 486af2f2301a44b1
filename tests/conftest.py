"""Shared test setup.

On a machine without a GPU, fusenn.kernels turns on the Triton interpreter, so `kernel_backend` runs the
Triton kernels on CPU tensors; on a GPU it runs them compiled, and the CUDA extension beside them.
Tests marked `gpu` skip with a reason where torch sees no CUDA device.
"""

import pytest
import torch

import fusenn

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
    return params


@pytest.fixture(params=_kernel_params())
def kernel_backend(request):
    """(backend name, device) for each kernel backend that can run here; the backend is set for the test.
    A test module lists the backends its op has in KERNEL_BACKENDS (default: triton only)."""
    name, device = request.param
    if name not in getattr(request.module, "KERNEL_BACKENDS", ("triton",)):
        pytest.skip(f"{request.module.__name__} has no {name} implementation to test")
    status = fusenn.backends()[name]
    if not status.usable:
        pytest.skip(f"{name} backend unusable here: {status.detail}")
    with fusenn.set_backend(name):
        yield name, torch.device(device)


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_GPU else "cpu")

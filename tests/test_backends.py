"""Backend table, selection and the errors an impossible choice gives."""

import os
import subprocess
import sys

import pytest
import torch

import fusenn
from fusenn import dispatch


def test_table_lists_every_backend_with_a_reason():
    table = fusenn.backends()
    assert set(table) == {"reference", "triton", "cuda", "persistent", "torch", "cpp"}
    assert table["reference"].usable
    for b in table.values():
        assert b.detail, f"{b.name} gives no detail"
    if not torch.cuda.is_available():
        assert not table["cuda"].usable and any(w in table["cuda"].detail for w in ("GPU", "built", "host-only"))


def test_set_backend_directly_and_as_context_manager(monkeypatch):
    monkeypatch.delenv("FUSENN_BACKEND", raising=False)
    assert fusenn.get_backend() == "auto"
    with fusenn.set_backend("reference"):
        assert fusenn.get_backend() == "reference"
        with fusenn.set_backend("triton"):
            assert fusenn.get_backend() == "triton"
        assert fusenn.get_backend() == "reference"
    assert fusenn.get_backend() == "auto"
    fusenn.set_backend("Reference")
    try:
        assert fusenn.get_backend() == "reference"
    finally:
        dispatch._chosen = None


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("FUSENN_BACKEND", "reference")
    assert fusenn.get_backend() == "reference"
    monkeypatch.setenv("FUSENN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        fusenn.get_backend()


def test_unknown_name():
    with pytest.raises(ValueError, match="expected one of auto, reference, triton, cuda"):
        fusenn.set_backend("cudnn")


def test_auto_on_cpu_is_reference():
    with fusenn.set_backend("auto"):
        assert dispatch.choose("dropout_mask", torch.device("cpu"), {"reference": None, "triton": None}) == "reference"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_explicit_cuda_without_gpu_says_why():
    with fusenn.set_backend("cuda"):
        with pytest.raises(fusenn.BackendError, match="dropout_mask cannot run on the requested backend.*cuda"):
            fusenn.functional.dropout_mask((4,), 0.5, seed=1)


def test_explicit_backend_rejecting_inputs_says_why():
    with fusenn.set_backend("reference"):
        with pytest.raises(fusenn.BackendError, match="head dim 7 is unsupported"):
            dispatch.choose("attention", torch.device("cpu"), {"reference": "head dim 7 is unsupported"})
    with fusenn.set_backend("triton"):
        with pytest.raises(fusenn.BackendError, match="op has no triton implementation"):
            dispatch.choose("op", torch.device("cpu"), {"reference": None})


def test_auto_falls_back_to_reference_when_kernels_cannot_take_inputs():
    with fusenn.set_backend("auto"):
        assert dispatch.choose("op", torch.device("cpu"), {"reference": None, "triton": "odd", "cuda": "odd"}) \
            == "reference"


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter mode is chosen only without a GPU")
def test_triton_interpreter_whatever_the_import_order():
    code = ("import triton, triton.language as tl\nimport torch, fusenn\n"
            "with fusenn.set_backend('triton'):\n"
            "    m = fusenn.functional.dropout_mask((10,), 0.5, seed=3)\n"
            "from fusenn.reference import philox\n"
            "assert torch.equal(m, philox.dropout_mask(10, 0.5, 3)), 'mismatch'\nprint('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_info_command_prints_versions_and_table():
    out = subprocess.run([sys.executable, "-m", "fusenn.info"], capture_output=True, text=True, check=True).stdout
    assert "torch" in out and "triton" in out
    for name in ("reference", "triton", "cuda"):
        assert any(line.startswith(name) for line in out.splitlines()), out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the interpreter's casts")
def test_interpreter_rounds_to_bf16_like_the_gpu():
    import triton
    import triton.language as tl

    from fusenn import kernels

    assert kernels.INTERPRET

    @triton.jit
    def cast(x_ptr, y_ptr, z_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        x = tl.load(x_ptr + i)
        tl.store(y_ptr + i, x.to(tl.bfloat16))  # explicit cast
        tl.store(z_ptr + i, x)  # implicit cast on store

    x = torch.randn(256) * 10
    y, z = torch.empty(256, dtype=torch.bfloat16), torch.empty(256, dtype=torch.bfloat16)
    cast[(1,)](x, y, z, N=256)
    assert torch.equal(y, x.to(torch.bfloat16)) and torch.equal(z, x.to(torch.bfloat16))

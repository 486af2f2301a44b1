"""The one helper that judges an op against its reference, shared by the tests and the validation runner.

The rule follows FlashAttention: the reference runs in float64 on the same inputs; the kernel's error
may be at most `factor` times the error that plain PyTorch makes computing the reference in the
kernel's own dtype, plus a small absolute floor per dtype. NaN or an unwritten (poisoned) element
never passes.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Sequence

import torch

# Floors on the absolute error: what fp32 accumulation leaves even where PyTorch's own error is zero.
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@contextmanager
def poisoned_outputs():
    """Kernels fill their outputs from NaN (floats) or 0xA5 bytes instead of uninitialised memory."""
    previous = os.environ.get("FUSENN_POISON")
    os.environ["FUSENN_POISON"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["FUSENN_POISON"]
        else:
            os.environ["FUSENN_POISON"] = previous


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 x rounded to TF32 (10 mantissa bits), to nearest with ties away from zero, as the GPU's
    cvt.rna.tf32.f32 does; NaN and infinity pass through."""
    bits = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    finite = (bits & 0x7F800000) != 0x7F800000
    rounded = torch.where(finite, (bits + 0x1000) & 0xFFFFE000, bits)
    return torch.where(rounded >= 2 ** 31, rounded - 2 ** 32, rounded).to(torch.int32).view(torch.float32)


_MATMULS = ("mm", "addmm", "bmm", "baddbmm", "addmv", "mv", "dot")


@contextmanager
def tf32_products():
    """PyTorch computing in TF32: every fp32 matrix product (forward and backward) takes its operands rounded
    to TF32 (round_tf32), accumulating in fp32, as cuBLAS and cuDNN do under allow_tf32. The baseline for
    a kernel's TF32 path, as plain PyTorch in fp16/bf16 is for theirs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Tf32(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.overloadpacket.__name__ in _MATMULS:
                start = 1 if func.overloadpacket.__name__.startswith(("add", "badd")) else 0
                args = tuple(round_tf32(a) if i >= start and isinstance(a, torch.Tensor) and a.dtype == torch.float32
                             else a for i, a in enumerate(args))
            return func(*args, **kwargs)

    with _Tf32():
        yield


def _flatten(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    if out is None:
        return []
    raise TypeError(f"cannot compare outputs of type {type(out)}")


def max_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0


def assert_close(out, ref, baseline=None, *, factor: float = 2.0, atol: float | None = None, name: str = "output"):
    """Every tensor of `out` against `ref` (float64); the allowed error is factor x `baseline`'s error
    (PyTorch's own result in out's dtype) plus atol. Bools and integers must match exactly."""
    outs, refs = _flatten(out), _flatten(ref)
    bases = _flatten(baseline) if baseline is not None else [None] * len(outs)
    assert len(outs) == len(refs) == len(bases), f"{name}: {len(outs)} outputs vs {len(refs)} references"
    for i, (o, r, b) in enumerate(zip(outs, refs, bases)):
        label = f"{name}[{i}]" if len(outs) > 1 else name
        assert o.shape == r.shape, f"{label}: shape {tuple(o.shape)} != reference {tuple(r.shape)}"
        if not o.is_floating_point():
            assert o.dtype == r.dtype, f"{label}: dtype {o.dtype} != reference {r.dtype}"
            if o.dtype == torch.bool and o.numel():
                assert int(o.view(torch.uint8).max()) <= 1, f"{label}: bytes other than 0/1 (unwritten elements?)"
            mismatches = (o != r).sum().item()
            assert mismatches == 0, f"{label}: {mismatches} of {o.numel()} elements differ from the reference"
            continue
        assert not torch.isnan(o).any(), f"{label}: NaN in output (unwritten elements or overflow)"
        err = max_error(o, r)
        floor = ATOL.get(o.dtype, 1e-5) if atol is None else atol
        allowed = floor + (factor * max_error(b, r) if b is not None else 0.0)
        assert err <= allowed, (f"{label}: max abs error {err:.3g} > allowed {allowed:.3g} "
                                f"({factor} x PyTorch's {max_error(b, r) if b is not None else 0:.3g} + {floor:.3g}) "
                                f"in {o.dtype}")


def check_against_reference(op: Callable, reference: Callable, inputs: Sequence, *, baseline: Callable | None = None,
                            factor: float = 2.0, atol: float | None = None, name: str = "op"):
    """Run `op` on `inputs` with poisoned outputs and compare with `reference` run on float64 copies.

    `baseline` (default: `reference`) runs on the inputs in their own dtype and gives PyTorch's error.
    Returns (out, ref) for further checks.
    """
    def upcast(x):
        return x.detach().double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    with poisoned_outputs():
        out = op(*inputs)
    ref = reference(*[upcast(x) for x in inputs])
    base = (baseline or reference)(*inputs)
    assert_close(out, ref, base, factor=factor, atol=atol, name=name)
    return out, ref

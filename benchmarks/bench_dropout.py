"""Philox dropout: the mask generator and dropout against torch's own dropout."""

import torch

import fusenn
from benchmarks.registry import REGISTRY, Case, Check, Entry, register
from fusenn.reference import philox as ref

SMALL = [(1, 0.5, 0, 0), (1000, 0.1, 7, 3), (4097, 0.9, 2**40 + 1, 2**32 - 5)]


def validate():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    checks = []
    for numel, p, seed, offset in SMALL:
        got = fusenn.functional.dropout_mask((numel,), p, seed, offset, device=device).cpu()
        wrong = (got != ref.dropout_mask(numel, p, seed, offset)).sum().item()
        checks.append(Check(f"N{numel}-p{p}-seed{seed}-off{offset}", float(wrong), 0.0))
    return checks


def cases(quick):
    sizes = [1 << 24] if quick else [1 << 20, 1 << 24, 1 << 26]
    out = []
    for n in sizes:
        for dtype in (torch.float32, torch.bfloat16):
            def setup(device, n=n, dtype=dtype):
                x = torch.randn(n, device=device, dtype=dtype)
                return {"fusenn": lambda: fusenn.functional.dropout(x, 0.1),
                        "torch": lambda: torch.nn.functional.dropout(x, 0.1)}

            out.append(Case(f"N{n}-{str(dtype)[6:]}-p0.1", setup, bytes=2 * n * torch.finfo(dtype).bits / 8))
    return out


register(Entry(op="dropout", baselines=("torch",), validate=validate, cases=cases))


def cpu_cases(quick):
    """CPU timing: fusenn's Philox dropout (the mask from fusenn._C's host loop where built) against torch's."""
    out = []
    for n in [1 << 22] if quick else [1 << 20, 1 << 22, 1 << 24]:
        def setup(device, n=n):
            x = torch.randn(n)
            return {"fusenn": lambda: fusenn.functional.dropout(x, 0.1),
                    "torch": lambda: torch.nn.functional.dropout(x, 0.1)}
        out.append(Case(f"N{n}-float32-p0.1", setup, bytes=8 * n))
    return out


REGISTRY["dropout"].cpu_cases = cpu_cases

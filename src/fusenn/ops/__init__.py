"""One module per op family: the torch.library op, its autograd Function and the choice of backend."""

import os

import torch


def new_output(shape, dtype, device) -> torch.Tensor:
    """An output buffer for a kernel to fill. Under FUSENN_POISON=1 (the tests) it starts as NaN (floats)
    or 0xA5 bytes (integers, bools), so an element the kernel failed to write cannot pass for a result."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get("FUSENN_POISON") == "1":
        if out.is_floating_point():
            out.fill_(float("nan"))
        else:
            out.view(torch.uint8).fill_(0xA5)
    return out


def draw_seed(generator=None) -> int:
    """A Philox seed from torch's CPU generator, so torch.manual_seed repeats a run."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64, generator=generator))

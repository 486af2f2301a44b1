"""One module per op family: the torch.library op, its autograd Function and the choice of backend."""

import functools
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


def lower_precision_under_autocast(fn):
    """Run `fn` as torch runs the ops on its autocast lower-precision list (conv2d,
    scaled_dot_product_attention): floating tensor arguments cast to the autocast dtype, autocast off
    inside, so the result has the dtype torch's op would give."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device_type = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        if not torch.is_autocast_enabled(device_type):
            return fn(*args, **kwargs)
        dtype = torch.get_autocast_dtype(device_type)

        def cast(a):
            return a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a

        with torch.autocast(device_type, enabled=False):
            return fn(*[cast(a) for a in args], **{k: cast(v) for k, v in kwargs.items()})

    return wrapper

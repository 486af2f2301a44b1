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


def draw_seed_tensor(generator=None) -> torch.Tensor:
    """A Philox seed from torch's CPU generator as a 0-d int64 CPU tensor, so torch.manual_seed repeats a run.

    The traceable form: under torch.compile the draw is an op in the graph (no data-dependent Python int,
    no graph break) and the custom ops read its value inside their implementation. Eagerly it consumes the
    generator exactly as draw_seed does and holds the same value."""
    return torch.randint(0, 2**62, (), dtype=torch.int64, device="cpu", generator=generator)


def draw_seed(generator=None) -> int:
    """A Philox seed from torch's CPU generator, so torch.manual_seed repeats a run (eager callers; a
    graph break under torch.compile: use draw_seed_tensor there)."""
    return int(draw_seed_tensor(generator))


def seed_tensor(seed) -> torch.Tensor:
    """A user's seed (a Python int in [0, 2**63), or an integer tensor holding one) as the 0-d int64 CPU
    tensor the ops take. Ints are checked here; a tensor's value is checked eagerly (under torch.compile it
    is left to the op, which checks it when it reads it)."""
    if isinstance(seed, torch.Tensor):
        if seed.dim() != 0 or seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
            raise ValueError(f"fusenn: a seed tensor must be a 0-d integer tensor, got {seed.dtype} of shape "
                             f"{tuple(seed.shape)}")
        seed = seed.to(device="cpu", dtype=torch.int64)
        if not torch.compiler.is_compiling():
            _check_seed(int(seed))
        return seed
    seed = int(seed)
    _check_seed(seed)
    return torch.tensor(seed, dtype=torch.int64)


def _check_seed(seed: int) -> None:
    if not 0 <= seed < (1 << 63):
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")


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

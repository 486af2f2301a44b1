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


def draw_seed_tensor(generator=None, device=None) -> torch.Tensor:
    """A Philox seed from torch's generator for `device` (CPU by default) as a 0-d int64 tensor there, so
    torch.manual_seed repeats a run.

    The traceable form: under torch.compile the draw is an op in the graph (no data-dependent Python int,
    no graph break) and the kernels read the value from memory. On a GPU the draw is torch's CUDA RNG, which
    CUDA graphs advance on each replay, so a replayed graph draws fresh masks (a seed read on the host would
    be frozen into the graph at capture)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    return torch.randint(0, 2**62, (), dtype=torch.int64, device=device, generator=generator)


def seed_tensor(seed, device=None) -> torch.Tensor:
    """A user's seed (a Python int in [0, 2**63), or an integer tensor holding one) as the 0-d int64 tensor
    on `device` (CPU by default) that the ops take. Ints are checked here, and so is a CPU tensor's value
    when eager; a device tensor's value is not read on the host (that would synchronise, and break CUDA-graph
    capture): its two 32-bit words are the key whatever its sign."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(seed, torch.Tensor):
        if seed.dim() != 0 or seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
            raise ValueError(f"fusenn: a seed tensor must be a 0-d integer tensor, got {seed.dtype} of shape "
                             f"{tuple(seed.shape)}")
        if seed.device.type == "cpu" and not torch.compiler.is_compiling():
            _check_seed(int(seed))
        return seed.to(device=device, dtype=torch.int64)
    seed = int(seed)
    _check_seed(seed)
    # A fill, not a copy from host memory: it can be captured in a CUDA graph (the seed is then a constant).
    return torch.full((), seed, dtype=torch.int64, device=device)


def _check_seed(seed: int) -> None:
    if not 0 <= seed < (1 << 63):
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")


def no_double_backward(what: str):
    """A backward that raises: the derivative of an op family's backward kernels, which have none."""
    def backward(ctx, *grads):
        raise RuntimeError(f"fusenn: the {what} kernels' backward is not differentiable (no double backward, e.g. "
                           "torch.autograd.grad(..., create_graph=True) followed by another backward, or nested "
                           "torch.func.grad); run with fusenn.set_backend('reference') for higher-order gradients")
    return backward


def setup_nothing(ctx, inputs, output):
    pass


def once_differentiable(op, what: str) -> type:
    """`op` (a backward op) as an autograd.Function whose own backward raises: what an op family's backward calls,
    so that under create_graph=True or torch.func.grad the first derivative works (torch.func cannot run a custom
    op's registered autograd) and a second one fails loudly rather than silently."""
    return type(f"_{what.replace(' ', '_')}Backward", (torch.autograd.Function,), dict(
        forward=staticmethod(lambda *args: op(*args)), setup_context=staticmethod(setup_nothing),
        backward=staticmethod(no_double_backward(what)), generate_vmap_rule=True))


_C_TYPE_NAMES = {torch.float32: "float", torch.float64: "double", torch.float16: "c10::Half",
                 torch.bfloat16: "c10::BFloat16", torch.int64: "long int", torch.int32: "int", torch.bool: "bool"}


def type_name(dtype: torch.dtype) -> str:
    """dtype as torch's C++ error messages name it ("float", "double", "long int", ...)."""
    return _C_TYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


@torch.compiler.assume_constant_result  # torch 2.11's Dynamo cannot trace torch._C._is_autocast_available
def _autocast_available(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type)


def lower_precision_under_autocast(fn):
    """Run `fn` as torch runs the ops on its autocast lower-precision list (conv2d,
    scaled_dot_product_attention): floating tensor arguments cast to the autocast dtype, autocast off
    inside, so the result has the dtype torch's op would give."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device_type = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        if not _autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
            return fn(*args, **kwargs)
        dtype = torch.get_autocast_dtype(device_type)

        def cast(a):
            return a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a

        with torch.autocast(device_type, enabled=False):
            return fn(*[cast(a) for a in args], **{k: cast(v) for k, v in kwargs.items()})

    return wrapper

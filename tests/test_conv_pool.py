"""fusenn.ConvPool2d / functional.conv_pool2d against nn.Sequential(nn.Conv2d, activation, pooling).

Every case checks the forward and the input, weight and bias gradients against a float64 run of the
reference, allowing twice PyTorch's own error in the case's dtype (fusenn.testing.assert_close).
"""

import copy
import inspect
import random
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import fusenn
from fusenn.reference import conv_pool as ref
from fusenn.testing import assert_close, poisoned_outputs

F = fusenn.functional
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    batch: int
    c_in: int
    c_out: int
    hw: tuple
    kernel: int
    stride: int
    padding: int
    dilation: int
    groups: int
    bias: bool
    activation: str
    pool: str
    pool_kernel: int
    pool_stride: int
    pool_padding: int
    ceil_mode: bool
    count_include_pad: bool
    dtype: str
    channels_last: bool

    @property
    def id(self):
        pool = f"{self.pool}{self.pool_kernel}s{self.pool_stride}" + (
            f"p{self.pool_padding}" if self.pool_padding else "")
        return "-".join([
            f"k{self.kernel}", f"s{self.stride}", f"p{self.padding}", f"d{self.dilation}", f"g{self.groups}",
            f"c{self.c_in}to{self.c_out}", f"n{self.batch}", f"{self.hw[0]}x{self.hw[1]}", pool,
            *(["ceil"] if self.ceil_mode else []),
            *(["nopadcount"] if self.pool == "avg" and not self.count_include_pad else []),
            *(["nobias"] if not self.bias else []), self.activation, self.dtype,
            *(["cl"] if self.channels_last else [])])

    def options(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups,
                    activation=self.activation, negative_slope=0.1, pool=self.pool, pool_kernel_size=self.pool_kernel,
                    pool_stride=self.pool_stride, pool_padding=self.pool_padding, ceil_mode=self.ceil_mode,
                    count_include_pad=self.count_include_pad)

    def out_shape(self):
        conv = [ref.conv_output_size(s, self.kernel, self.stride, self.padding, self.dilation) for s in self.hw]
        return (self.batch, self.c_out, *(ref.pool_output_size(c, self.pool_kernel, self.pool_stride,
                                                                self.pool_padding, self.ceil_mode) for c in conv))

    def valid(self):
        conv = [ref.conv_output_size(s, self.kernel, self.stride, self.padding, self.dilation) for s in self.hw]
        return min(conv) >= 1 and min(self.out_shape()[2:]) >= 1


def _grid(count=36, seed=2024):
    """A seeded random grid; activations, dtypes and pools cycle so that every one appears."""
    rng = random.Random(seed)
    cases = []
    while len(cases) < count:
        i = len(cases)
        groups = rng.choice([1, 1, 2])
        c_in, c_out = rng.choice([(1, 3), (3, 17), (17, 3), (4, 6), (3, 64), (64, 16)] if groups == 1
                                 else [(4, 6), (2, 18)])
        pool_kernel, pool_stride = rng.choice([(2, 2), (3, 2)])
        kernel = rng.choice([1, 3, 3, 5, 7])
        case = Case(
            batch=rng.choice([1, 2]), c_in=c_in, c_out=c_out, hw=rng.choice([(13, 17), (9, 11), (10, 7)]),
            kernel=kernel, stride=rng.choice([1, 1, 2]), padding=rng.randint(0, kernel // 2),
            dilation=rng.choice([1, 1, 2]), groups=groups, bias=rng.random() < 0.8,
            activation=ref.ACTIVATIONS[i % len(ref.ACTIVATIONS)], pool=("max", "avg")[(i // 8) % 2],
            pool_kernel=pool_kernel, pool_stride=pool_stride, pool_padding=rng.randint(0, pool_kernel // 2),
            ceil_mode=rng.random() < 0.4, count_include_pad=rng.random() < 0.7,
            dtype=list(DTYPES)[i % 3], channels_last=rng.random() < 0.3)
        if case.valid():
            cases.append(case)
    return cases


def _inputs(case, device):
    g = torch.Generator().manual_seed(hash(case.id) % 2**31)
    x = torch.randn(case.batch, case.c_in, *case.hw, generator=g)
    w = torch.randn(case.c_out, case.c_in // case.groups, case.kernel, case.kernel, generator=g)
    w /= (w[0].numel()) ** 0.5
    b = torch.randn(case.c_out, generator=g) if case.bias else None
    dtype = DTYPES[case.dtype]
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    x = x.to(device, dtype).contiguous(memory_format=fmt)
    return x, w.to(device, dtype), None if b is None else b.to(device, dtype)


def _run(fn, tensors, grad):
    """fn's output and the gradients of <output, grad> with respect to `tensors` (None for absent ones)."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in tensors]
    out = fn(*leaves)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, present, grad.to(out.dtype)))
    return out, [next(grads) if t is not None else None for t in leaves]


def _reference(case):
    def fn(x, w, b):
        o = case.options()
        return ref.conv_pool2d(x, w, b, [o["stride"]] * 2, [o["padding"]] * 2, [o["dilation"]] * 2, o["groups"],
                               o["activation"], o["negative_slope"], o["pool"], [o["pool_kernel_size"]] * 2,
                               [o["pool_stride"]] * 2, [o["pool_padding"]] * 2, o["ceil_mode"],
                               o["count_include_pad"])
    return fn


@pytest.mark.parametrize("case", _grid(), ids=lambda c: c.id)
def test_forward_and_gradients(kernel_backend, case):
    _, device = kernel_backend
    x, w, b = _inputs(case, device)
    reference = _reference(case)
    grad = torch.randn(case.out_shape(), generator=torch.Generator().manual_seed(7)).to(device)
    expected, expected_grads = _run(reference, [t.double() if t is not None else None for t in (x, w, b)], grad)
    baseline, baseline_grads = _run(reference, (x, w, b), grad)
    with poisoned_outputs():
        out, grads = _run(lambda *t: F.conv_pool2d(*t, **case.options()), (x, w, b), grad)
    assert out.dtype == x.dtype
    assert (out.is_contiguous(memory_format=torch.channels_last) ==
            baseline.is_contiguous(memory_format=torch.channels_last)), "memory format differs from torch's"
    assert_close(out, expected, baseline, name="output")
    for name, g, e, bg in zip(("grad input", "grad weight", "grad bias"), grads, expected_grads, baseline_grads):
        if e is not None:
            assert_close(g, e, bg, name=name)


@pytest.mark.parametrize("activation", ["none", "relu", "leaky_relu", "silu"])
@pytest.mark.parametrize("pool_kernel,pool_stride,pool_padding", [(2, 2, 0), (3, 2, 1)], ids=["max2s2", "max3s2p1"])
def test_max_ties_go_to_the_first_max_as_in_torch(kernel_backend, activation, pool_kernel, pool_stride, pool_padding):
    """Small integers make exact ties everywhere; the gradients show which element of each window won."""
    _, device = kernel_backend
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-1, 2, (2, 3, 9, 10), generator=g).float().to(device)
    w = torch.randint(-1, 2, (4, 3, 2, 2), generator=g).float().to(device)
    b = torch.tensor([0.0, 1.0, -1.0, 0.0], device=device)
    options = dict(activation=activation, negative_slope=0.25, pool_kernel_size=pool_kernel, pool_stride=pool_stride,
                   pool_padding=pool_padding)
    with fusenn.set_backend("reference"):
        shape = F.conv_pool2d(x, w, b, **options).shape
    grad = torch.randint(1, 4, shape, generator=g).float().to(device)

    def torch_ops(x, w, b):
        with fusenn.set_backend("reference"):
            return F.conv_pool2d(x, w, b, **options)

    expected, expected_grads = _run(torch_ops, (x, w, b), grad)
    out, grads = _run(lambda x, w, b: F.conv_pool2d(x, w, b, **options), (x, w, b), grad)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
def test_nan_in_a_window_propagates_as_in_torch(kernel_backend, activation):
    """A NaN input poisons exactly the pooled outputs whose windows see it, as torch's do, and the gradients
    likewise, but for one documented difference: with a smooth activation torch's input gradient is also
    NaN wherever a pre-activation that no window picked is NaN (0 * act'(NaN)); fusenn's backward never
    forms those products, so there only the weight and bias gradients are compared."""
    _, device = kernel_backend
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 9, 10, generator=g)
    x[0, 1, 4, 4] = float("nan")
    x[1, 0, 0, 9] = float("nan")
    x, w, b = x.to(device), torch.randn(4, 3, 3, 3, generator=g).to(device), torch.randn(4, generator=g).to(device)
    options = dict(padding=1, activation=activation, pool_kernel_size=3, pool_stride=2, pool_padding=1)
    with fusenn.set_backend("reference"):
        shape = F.conv_pool2d(x, w, b, **options).shape
    grad = torch.randn(shape, generator=g).to(device)

    def torch_ops(x, w, b):
        with fusenn.set_backend("reference"):
            return F.conv_pool2d(x, w, b, **options)

    expected, expected_grads = _run(torch_ops, (x, w, b), grad)
    out, grads = _run(lambda x, w, b: F.conv_pool2d(x, w, b, **options), (x, w, b), grad)
    assert expected.isnan().any() and not expected.isnan().all()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, equal_nan=True)
    start = 1 if activation == "gelu" else 0
    for got, want in zip(grads[start:], expected_grads[start:]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_empty_batch(kernel_backend):
    _, device = kernel_backend
    x = torch.randn(0, 3, 9, 11, device=device, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=device, requires_grad=True)
    b = torch.randn(4, device=device, requires_grad=True)
    out = F.conv_pool2d(x, w, b, pool_kernel_size=3, pool_stride=2)
    assert out.shape == (0, 4, 3, 4)
    out.sum().backward()
    assert x.grad.shape == x.shape and not w.grad.any() and not b.grad.any()


ACTIVATION_MODULES = [("relu", nn.ReLU()), ("leaky_relu", nn.LeakyReLU(0.2)), ("gelu_tanh", nn.GELU("tanh")),
                      ("none", None)]


@pytest.mark.parametrize("name,act", ACTIVATION_MODULES, ids=[a for a, _ in ACTIVATION_MODULES])
def test_from_modules_matches_the_sequential(kernel_backend, name, act):
    _, device = kernel_backend
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect", device=device)
    pool = nn.MaxPool2d(3, 2, 1) if name != "none" else nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False)
    seq = nn.Sequential(conv, act or nn.Identity(), pool)
    fused = fusenn.ConvPool2d.from_modules(conv, act, pool)
    assert fused.activation == name and fused.weight is not conv.weight
    x = torch.randn(2, 3, 9, 11, device=device)
    assert_close(fused(x), copy.deepcopy(seq).double()(x.double()), seq(x), name=name)


def test_seed_gives_the_weights_of_nn_conv2d_and_state_dicts_move_both_ways():
    torch.manual_seed(5)
    conv = nn.Conv2d(6, 8, (3, 5), stride=2, groups=2)
    torch.manual_seed(5)
    fused = fusenn.ConvPool2d(6, 8, (3, 5), stride=2, groups=2, activation="silu", pool="avg")
    assert torch.equal(conv.weight, fused.weight) and torch.equal(conv.bias, fused.bias)
    assert fused.state_dict().keys() == conv.state_dict().keys()
    conv.load_state_dict(fused.state_dict())
    fused.load_state_dict(conv.state_dict())
    assert "activation=silu, pool=avg" in repr(fused)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("padding,padding_mode", [("same", "zeros"), (2, "circular"), ((1, 2), "replicate")],
                         ids=["same", "circular", "replicate"])
def test_padding_modes_and_unbatched_input(kernel_backend, padding, padding_mode):
    _, device = kernel_backend
    torch.manual_seed(1)
    fused = fusenn.ConvPool2d(3, 4, (3, 4) if padding == "same" else 3, padding=padding, padding_mode=padding_mode,
                              activation="tanh", device=device)
    conv = nn.Conv2d(3, 4, fused.kernel_size, padding=padding, padding_mode=padding_mode, device=device)
    conv.load_state_dict(fused.state_dict())
    seq = nn.Sequential(conv, nn.Tanh(), nn.MaxPool2d(2))
    x = torch.randn(3, 9, 11, device=device)
    torch.testing.assert_close(fused(x), seq(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64])
def test_input_type_error_names_the_bias_first_as_torch(dtype):
    torch.manual_seed(0)
    fused = fusenn.ConvPool2d(2, 3, 3)
    conv = nn.Conv2d(2, 3, 3)
    x = torch.zeros(1, 2, 6, 6, dtype=dtype)
    with pytest.raises(RuntimeError) as want:
        conv(x)
    with pytest.raises(RuntimeError) as got:
        fused(x)
    assert str(got.value) == str(want.value)


def test_forward_takes_conv2ds_argument_name():
    fused = fusenn.ConvPool2d(2, 3, 3)
    x = torch.randn(1, 2, 6, 6)
    ours, theirs = inspect.signature(fused.forward), inspect.signature(nn.Conv2d(2, 3, 3).forward)
    assert list(ours.parameters) == list(theirs.parameters)
    assert torch.equal(fused(input=x), fused(x))


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_torch_func_grad_and_vmap(kernel_backend, pool):
    """torch.func transforms the kernel path: grad gives autograd's gradients, vmap the per-sample loop."""
    _, device = kernel_backend
    torch.manual_seed(0)
    fused = fusenn.ConvPool2d(2, 3, 3, padding=1, activation="gelu", pool=pool, device=device)
    x = torch.randn(2, 2, 6, 7, device=device)
    params = dict(fused.named_parameters())
    got = torch.func.grad(lambda p: torch.func.functional_call(fused, p, (x,)).pow(2).sum())(params)
    want = torch.autograd.grad(fused(x).pow(2).sum(), list(params.values()))
    for a, b in zip(got.values(), want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    batched = torch.func.vmap(fused)(x[:, None])
    torch.testing.assert_close(batched, torch.stack([fused(s[None]) for s in x]), rtol=0, atol=0)


def test_auto_runs_the_reference_on_cpu_and_explicit_triton_says_why_not():
    x, w = torch.randn(1, 2, 6, 6, dtype=torch.float64), torch.randn(3, 2, 3, 3, dtype=torch.float64)
    with fusenn.set_backend("auto"):
        out = F.conv_pool2d(x, w)
    assert out.dtype == torch.float64 and out.shape == (1, 3, 2, 2)
    with fusenn.set_backend("triton"), pytest.raises(fusenn.BackendError, match="got torch.float64"):
        F.conv_pool2d(x, w)
    with pytest.raises(ValueError, match="unknown activation 'mish'"):
        F.conv_pool2d(x, w, activation="mish")
    with pytest.raises(RuntimeError, match="at most half"):  # torch's type
        F.conv_pool2d(x, w, pool_kernel_size=2, pool_padding=2)


@pytest.mark.parametrize("pool,channels_last", [("max", True), ("avg", False)], ids=["max-cl", "avg"])
def test_op_registration_passes_opcheck(kernel_backend, pool, channels_last):
    """Schema, fake tensor (shapes and strides), autograd registration and tracing by AOT dispatch."""
    _, device = kernel_backend
    x = torch.randn(2, 3, 7, 9, device=device, requires_grad=True)
    if channels_last:
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    w, b = torch.randn(4, 3, 3, 3, device=device), torch.randn(4, device=device)
    args = ([1, 1], [1, 1], [1, 1], 1, "gelu", 0.01, pool, [3, 3], [2, 2], [1, 1], False, True, pool == "max")
    torch.library.opcheck(torch.ops.fusenn.conv_pool2d.default, (x, w, b, *args))

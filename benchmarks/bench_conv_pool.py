"""Fused conv + activation + pooling against the unfused nn.Sequential a user would otherwise write: eager
(cuDNN convolution, then a separate pooling kernel) and torch.compile (default and max-autotune).

Layers: the ResNet stem (7x7 stride 2 conv, ReLU, 3x3 stride 2 max pool) and the last conv + pool of each
VGG-16 block, forward alone and a training step (forward + backward). Case.bytes is the least a fused op
must move: input + weight + pooled output, read or written once (twice that for a training step, whose
backward reads the pooled gradient, input and weight and writes their gradients).
"""

import copy

import torch
from torch import nn

import fusenn
from benchmarks.registry import REGISTRY, Case, Check, Entry, register, timed_step
from fusenn.testing import ATOL, max_error

# (name, batch, c_in, c_out, size, kernel, stride, padding, pool_kernel, pool_stride, pool_padding)
LAYERS = [
    ("resnet-stem", 64, 3, 64, 224, 7, 2, 3, 3, 2, 1),
    ("vgg-block1", 64, 64, 64, 224, 3, 1, 1, 2, 2, 0),
    ("vgg-block2", 64, 128, 128, 112, 3, 1, 1, 2, 2, 0),
    ("vgg-block3", 64, 256, 256, 56, 3, 1, 1, 2, 2, 0),
    ("vgg-block4", 64, 512, 512, 28, 3, 1, 1, 2, 2, 0),
    ("vgg-block5", 128, 512, 512, 14, 3, 1, 1, 2, 2, 0),
]
QUICK = ("resnet-stem", "vgg-block1", "vgg-block3", "vgg-block5")

# (c_in, c_out, size, kernel, stride, padding, groups, activation, pool, pool_kernel, pool_stride, pool_padding,
#  dtype, channels_last)
SMALL = [
    (3, 17, (13, 17), 3, 1, 1, 1, "relu", "max", 2, 2, 0, torch.float32, False),
    (3, 16, (13, 17), 7, 2, 3, 1, "relu", "max", 3, 2, 1, torch.bfloat16, True),
    (4, 6, (9, 11), 3, 1, 1, 2, "gelu", "max", 3, 2, 1, torch.float16, False),
    (17, 8, (9, 11), 5, 1, 2, 1, "silu", "avg", 2, 2, 0, torch.float32, True),
]


def _sequential(c_in, c_out, kernel, stride, padding, activation, pool, pool_kernel, pool_stride, pool_padding,
                device, dtype, groups=1):
    act = {"relu": nn.ReLU(), "gelu": nn.GELU(), "silu": nn.SiLU()}[activation]
    pooling = (nn.MaxPool2d(pool_kernel, pool_stride, pool_padding) if pool == "max"
               else nn.AvgPool2d(pool_kernel, pool_stride, pool_padding))
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, groups=groups, device=device, dtype=dtype)
    return nn.Sequential(conv, act, pooling)


def validate():
    """Forward and input/weight gradients of the kernel against float64, allowed 2x PyTorch's own error."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    checks = []
    for (c_in, c_out, size, kernel, stride, padding, groups, activation, pool, pk, ps, pp, dtype, cl) in SMALL:
        torch.manual_seed(0)
        seq = _sequential(c_in, c_out, kernel, stride, padding, activation, pool, pk, ps, pp, device, dtype, groups)
        fused = fusenn.ConvPool2d.from_modules(seq[0], seq[1], seq[2])
        x = torch.randn(2, c_in, *size, device=device, dtype=dtype)
        x = x.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        results = []
        for model, xin in ((fused, x), (copy.deepcopy(seq).double(), x.double()), (seq, x)):
            xin = xin.detach().requires_grad_()
            out = model(xin)
            out.backward(torch.ones_like(out))
            weight = model.weight if model is fused else model[0].weight
            results.append((out, xin.grad, weight.grad))
        name = f"k{kernel}-s{stride}-g{groups}-c{c_in}to{c_out}-{pool}{pk}s{ps}-{activation}-{str(dtype)[6:]}" + (
            "-cl" if cl else "")
        for what, got, ref, base in zip(("fwd", "dx", "dw"), *results):
            checks.append(Check(f"{name}-{what}", max_error(got, ref), 2 * max_error(base, ref) + ATOL[dtype]))
    return checks


def _layer_case(layer, dtype, train):
    name, batch, c_in, c_out, size, kernel, stride, padding, pk, ps, pp = layer
    conv_size = (size + 2 * padding - kernel) // stride + 1
    pooled = (conv_size + 2 * pp - pk) // ps + 1
    elem = torch.finfo(dtype).bits // 8
    moved = (batch * c_in * size * size + c_out * c_in * kernel * kernel + batch * c_out * pooled * pooled) * elem
    flops = 2.0 * batch * c_out * conv_size * conv_size * c_in * kernel * kernel

    def setup(device):
        torch.manual_seed(0)
        seq = _sequential(c_in, c_out, kernel, stride, padding, "relu", "max", pk, ps, pp, device, dtype)
        fused = fusenn.ConvPool2d.from_modules(seq[0], seq[1], seq[2])
        # The stem sees images, which need no gradient; later layers see activations that do.
        x = torch.randn(batch, c_in, size, size, device=device, dtype=dtype, requires_grad=train and c_in != 3)
        compiled = torch.compile(seq)
        autotuned = torch.compile(copy.deepcopy(seq), mode="max-autotune")
        grad = torch.randn(batch, c_out, pooled, pooled, device=device, dtype=dtype)

        def step(model):
            if train:
                return lambda: model(x).backward(grad)
            return lambda: model(x)

        models = {"fusenn": fused, "eager-cudnn": seq, "compile": compiled, "compile-max-autotune": autotuned}
        return {impl: step(model) if train else torch.no_grad()(step(model)) for impl, model in models.items()}

    label = (f"{name}-B{batch}-C{c_in}to{c_out}-{size}x{size}-k{kernel}s{stride}-max{pk}s{ps}-relu-"
             f"{str(dtype)[6:]}-{'train' if train else 'fwd'}")
    return Case(label, setup, flops=flops * (3 if train else 1), bytes=moved * (2 if train else 1))


def cases(quick):
    layers = [layer for layer in LAYERS if not quick or layer[0] in QUICK]
    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float32)
    return [_layer_case(layer, dtype, train) for dtype in dtypes for layer in layers for train in (False, True)]


register(Entry(op="conv_pool2d", baselines=("eager-cudnn", "compile", "compile-max-autotune"), validate=validate,
               cases=cases))


# CPU timing (python -m benchmarks without a GPU): ConvPool2d under auto against the nn.Sequential it
# replaces, fp32. (batch, c_in, c_out, size, activation, pool)
CPU_LAYERS = [(16, 3, 32, 64, "relu", "max"), (16, 32, 64, 32, "gelu", "avg"), (8, 64, 128, 16, "relu", "max")]


def _cpu_setup(batch, c_in, c_out, size, activation, pool, train):
    def setup(device):
        ours = fusenn.ConvPool2d(c_in, c_out, 3, padding=1, activation=activation, pool=pool, pool_kernel_size=2)
        act = {"relu": nn.ReLU(), "gelu": nn.GELU()}[activation]
        theirs = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), act,
                               nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2))
        theirs[0].load_state_dict(ours.state_dict())
        x = torch.randn(batch, c_in, size, size, requires_grad=train)

        def step(model):
            return timed_step(lambda: model(x), train)
        return {"fusenn": step(ours), "torch": step(theirs)}
    return setup


def cpu_cases(quick):
    out = []
    for batch, c_in, c_out, size, activation, pool in CPU_LAYERS[:2] if quick else CPU_LAYERS:
        for train in (False, True):
            flops = 2 * batch * c_out * c_in * 9 * size * size * (3 if train else 1)
            name = f"B{batch}-C{c_in}-{c_out}-{size}x{size}-{activation}-{pool}-{'train' if train else 'infer'}"
            out.append(Case(name, _cpu_setup(batch, c_in, c_out, size, activation, pool, train), flops=flops))
    return out


REGISTRY["conv_pool2d"].cpu_cases = cpu_cases

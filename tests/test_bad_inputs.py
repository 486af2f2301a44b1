"""Bad and edge inputs through torch and through fusenn, on every backend: where torch raises, fusenn raises the
same exception type (before any kernel launches); where torch answers, fusenn gives the same answer, NaN where
the math gives NaN.

Every module and functional op, on the reference, on Triton (under the interpreter on CPU) and, for the RNN
layers and cells, on the C++ layers' host loops (cpp-host). The judge is torch's own module or function with the
same weights; for scaled_dot_product_attention it is torch's math path (its CPU fast path answers where key and
value lengths differ). An input a kernel backend does not implement (float64) must make that explicitly chosen
backend refuse with fusenn.BackendError, never answer wrongly. Shapes are tiny: the interpreter runs every case.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import fusenn
import fusenn.ops.rnn

KERNEL_BACKENDS = ("triton", "cuda", "cpp-host")
META = torch.device("meta")  # stands for "a tensor on another device"

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    family: str  # rnn | attention | conv | dropout
    build: Callable  # device -> (torch's call, fusenn's call), each taking no arguments
    kernels: bool = True  # False: kernel backends do not implement these inputs (they must refuse them)
    # Where torch has no twin of the call, or its answer on a meta tensor is no judge of a wrong device (its conv2d
    # lets a meta tensor mix with CPU ones, as shape inference needs, and answers): the type torch raises for such
    # inputs to its own kernels (two real devices, mismatched RNN states).
    expect: type | None = None


CASES: list[Case] = []


def case(id: str, family: str, kernels: bool = True):
    def register(build):
        CASES.append(Case(id, family, build, kernels))
        return build
    return register


def _randn(*shape, device="cpu", dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=_GEN, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


_GEN = torch.Generator().manual_seed(0)


def _with(t: torch.Tensor, index, value) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


# ---------------------------------------------------------------------------------------------------------------
# LSTM and GRU: the same corpus for both. Each entry: (id, module kwargs, input maker, hx maker or None, kernels).

def _h(kind, layers, batch, hidden, device, dtype=torch.float32, cell_hidden=None):
    h = _randn(layers, batch, hidden, device=device, dtype=dtype)
    if kind == "LSTM":
        return h, _randn(layers, batch, cell_hidden or hidden, device=device, dtype=dtype)
    return h


RNN_ENTRIES = [
    ("rank4", {}, lambda d: _randn(3, 2, 4, 1, device=d), None),
    ("rank1", {}, lambda d: _randn(4, device=d), None),
    ("feature-size", {}, lambda d: _randn(3, 2, 6, device=d), None),
    ("dtype-float64", {}, lambda d: _randn(3, 2, 4, device=d, dtype=torch.float64), None),
    ("dtype-int64", {}, lambda d: torch.ones(3, 2, 4, dtype=torch.int64, device=d), None),
    ("device-meta", {}, lambda d: _randn(3, 2, 4, device=META), None),
    ("hidden-shape", {}, lambda d: _randn(3, 2, 4, device=d), lambda k, d: _h(k, 1, 2, 6, d)),
    ("hidden-batch", {}, lambda d: _randn(3, 2, 4, device=d), lambda k, d: _h(k, 1, 3, 5, d)),
    ("hidden-layers", {}, lambda d: _randn(3, 2, 4, device=d), lambda k, d: _h(k, 2, 2, 5, d)),
    ("hidden-rank", {}, lambda d: _randn(3, 2, 4, device=d),
     lambda k, d: tuple(t[0] for t in _h(k, 1, 2, 5, d)) if k == "LSTM" else _h(k, 1, 2, 5, d)[0]),
    ("hidden-dtype", {}, lambda d: _randn(3, 2, 4, device=d), lambda k, d: _h(k, 1, 2, 5, d, torch.float64)),
    ("hidden-device", {}, lambda d: _randn(3, 2, 4, device=d), lambda k, d: _h(k, 1, 2, 5, META)),
    ("hidden-noncontiguous", {}, lambda d: _randn(3, 2, 4, device=d),
     lambda k, d: tuple(t.transpose(0, 1).contiguous().transpose(0, 1) for t in _h(k, 1, 2, 5, d))
     if k == "LSTM" else _h(k, 1, 2, 5, d).transpose(0, 1).contiguous().transpose(0, 1)),
    ("empty-batch", {}, lambda d: _randn(3, 0, 4, device=d), None),
    ("length-0", {}, lambda d: _randn(0, 2, 4, device=d), None),
    ("length-1", {}, lambda d: _randn(1, 2, 4, device=d), None),
    ("unbatched", {}, lambda d: _randn(3, 4, device=d), None),
    ("unbatched-hidden-rank", {}, lambda d: _randn(3, 4, device=d), lambda k, d: _h(k, 1, 2, 5, d)),
    ("nan", {}, lambda d: _with(_randn(3, 2, 4, device=d), (1, 0, 2), float("nan")), None),
    ("inf", {}, lambda d: _with(_randn(3, 2, 4, device=d), (0, 1, 1), float("inf")), None),
    ("1e30", {}, lambda d: _randn(3, 2, 4, device=d, scale=1e30), None),
    ("noncontiguous", {}, lambda d: _randn(2, 3, 4, device=d).transpose(0, 1), None),
    ("batch_first", dict(batch_first=True), lambda d: _randn(2, 3, 4, device=d)[:, ::2], None),
    ("odd-sizes", dict(num_layers=2, bidirectional=True), lambda d: _randn(7, 3, 4, device=d), None),
    ("packed-feature-size", {}, lambda d: nn.utils.rnn.pack_padded_sequence(
        _randn(3, 2, 6, device=d), torch.tensor([3, 2])), None),
]


def _rnn_case(kind, entry):
    name, kwargs, make_input, make_hx = entry

    def build(device):
        torch.manual_seed(0)
        theirs = getattr(nn, kind)(4, 5, **kwargs).to(device)
        mine = getattr(fusenn, kind).from_torch(theirs)
        x = make_input(device)
        hx = make_hx(kind, device) if make_hx is not None else None
        return (lambda: theirs(x, hx)), (lambda: mine(x, hx))

    kernels = "float64" not in name
    CASES.append(Case(f"{kind}-{name}", "rnn", build, kernels))


for _kind in ("LSTM", "GRU"):
    for _entry in RNN_ENTRIES:
        _rnn_case(_kind, _entry)


@case("LSTM-proj-hidden-shape", "rnn")
def _(device):
    theirs = nn.LSTM(4, 5, proj_size=3).to(device)
    mine = fusenn.LSTM.from_torch(theirs)
    x, hx = _randn(3, 2, 4, device=device), (_randn(1, 2, 5, device=device), _randn(1, 2, 5, device=device))
    return (lambda: theirs(x, hx)), (lambda: mine(x, hx))


# LSTMCell and GRUCell

CELL_ENTRIES = [
    ("rank3", lambda d: _randn(2, 3, 4, device=d), None),
    ("feature-size", lambda d: _randn(2, 6, device=d), None),
    ("dtype-float64", lambda d: _randn(2, 4, device=d, dtype=torch.float64), None),
    ("device-meta", lambda d: _randn(2, 4, device=META), None),
    ("hidden-size", lambda d: _randn(2, 4, device=d), lambda d: _randn(2, 6, device=d)),
    ("hidden-batch", lambda d: _randn(2, 4, device=d), lambda d: _randn(3, 5, device=d)),
    ("hidden-rank", lambda d: _randn(2, 4, device=d), lambda d: _randn(1, 2, 5, device=d)),
    ("hidden-dtype", lambda d: _randn(2, 4, device=d), lambda d: _randn(2, 5, device=d, dtype=torch.float64)),
    ("hidden-device", lambda d: _randn(2, 4, device=d), lambda d: _randn(2, 5, device=META)),
    ("empty-batch", lambda d: _randn(0, 4, device=d), None),
    ("unbatched", lambda d: _randn(4, device=d), lambda d: _randn(5, device=d)),
    ("nan", lambda d: _with(_randn(2, 4, device=d), (1, 2), float("nan")), None),
    ("inf", lambda d: _with(_randn(2, 4, device=d), (0, 1), float("-inf")), None),
    ("1e30", lambda d: _randn(2, 4, device=d, scale=1e30), None),
    ("noncontiguous", lambda d: _randn(4, 3, device=d).t(), lambda d: _randn(5, 3, device=d).t()),
]


def _cell_case(kind, entry):
    name, make_input, make_h = entry

    def build(device):
        torch.manual_seed(0)
        theirs = getattr(nn, kind)(4, 5).to(device)
        mine = getattr(fusenn, kind).from_torch(theirs)
        x = make_input(device)
        hx = None
        if make_h is not None:
            h = make_h(device)
            hx = (h, h.clone()) if kind == "LSTMCell" else h
        return (lambda: theirs(x, hx)), (lambda: mine(x, hx))

    CASES.append(Case(f"{kind}-{name}", "rnn", build, "float64" not in name))


for _kind in ("LSTMCell", "GRUCell"):
    for _entry in CELL_ENTRIES:
        _cell_case(_kind, _entry)


# The layer ops under the modules (fusenn.ops.rnn), called directly with parts that do not fit: no torch twin, so
# the judge is what torch's own RNN kernels raise for such inputs, RuntimeError.

def _layer_case(name, op, make):
    def build(device):
        args = make(device)
        return (lambda: None), (lambda: getattr(fusenn.ops.rnn, op)(*args))

    CASES.append(Case(f"{op}-{name}", "rnn", build, expect=RuntimeError))


def _lstm_args(d, T=2, B=3, H=4, P=None, **wrong):
    P = P or H
    args = dict(gx=_randn(T, B, 4 * H, device=d), h0=_randn(B, P, device=d), c0=_randn(B, H, device=d),
                w_hh=_randn(4 * H, P, device=d), w_hr=_randn(P, H, device=d) if P != H else None, lengths=None)
    return list({**args, **wrong}.values())


def _gru_args(d, T=2, B=3, H=4, **wrong):
    args = dict(gx=_randn(T, B, 3 * H, device=d), h0=_randn(B, H, device=d), w_hh=_randn(3 * H, H, device=d),
                b_hh=_randn(3 * H, device=d), lengths=None)
    return list({**args, **wrong}.values())


for _name, _make in [
    ("gx-rank", lambda d: _lstm_args(d, gx=_randn(3, 16, device=d))),
    ("gx-gates", lambda d: _lstm_args(d, gx=_randn(2, 3, 15, device=d))),
    ("gx-int", lambda d: _lstm_args(d, gx=torch.ones(2, 3, 16, dtype=torch.int64, device=d))),
    ("h0-shape", lambda d: _lstm_args(d, h0=_randn(2, 4, device=d))),
    ("c0-shape", lambda d: _lstm_args(d, c0=_randn(3, 5, device=d))),
    ("w_hh-shape", lambda d: _lstm_args(d, w_hh=_randn(16, 5, device=d))),
    ("w_hr-shape", lambda d: _lstm_args(d, P=2, w_hr=_randn(2, 5, device=d))),
    ("w_hh-device", lambda d: _lstm_args(d, w_hh=_randn(16, 4, device=META))),
    ("lengths-shape", lambda d: _lstm_args(d, lengths=torch.tensor([2, 1]))),
]:
    _layer_case(_name, "lstm_layer", _make)
for _name, _make in [
    ("h0-shape", lambda d: _gru_args(d, h0=_randn(3, 5, device=d))),
    ("b_hh-shape", lambda d: _gru_args(d, b_hh=_randn(8, device=d))),
    ("h0-device", lambda d: _gru_args(d, h0=_randn(3, 4, device=META))),
]:
    _layer_case(_name, "gru_layer", _make)


# ---------------------------------------------------------------------------------------------------------------
# scaled_dot_product_attention: torch's math path is the judge.

def _sdpa_case(name, make, kernels=True, **kwargs):
    def build(device):
        q, k, v, extra = make(device)
        extra = {**kwargs, **extra}

        def theirs():
            with sdpa_kernel(SDPBackend.MATH):
                return F.scaled_dot_product_attention(q, k, v, **extra)

        return theirs, (lambda: fusenn.functional.scaled_dot_product_attention(q, k, v, **extra))

    CASES.append(Case(f"sdpa-{name}", "attention", build, kernels))


def _qkv(d, n=1, hq=2, hkv=2, L=3, S=4, E=4, Ev=4, dtype=torch.float32):
    return (_randn(n, hq, L, E, device=d, dtype=dtype), _randn(n, hkv, S, E, device=d, dtype=dtype),
            _randn(n, hkv, S, Ev, device=d, dtype=dtype))


SDPA_ENTRIES = [
    ("plain", lambda d: (*_qkv(d), {})),
    ("rank1", lambda d: (_randn(4, device=d), _randn(4, device=d), _randn(4, device=d), {})),
    ("rank2", lambda d: (_randn(3, 4, device=d), _randn(5, 4, device=d), _randn(5, 3, device=d), {})),
    ("head-dim", lambda d: (_randn(1, 2, 3, 4, device=d), _randn(1, 2, 4, 5, device=d), _randn(1, 2, 4, 4, device=d),
                            {})),
    ("kv-lengths-differ", lambda d: (_randn(1, 2, 3, 4, device=d), _randn(1, 2, 4, 4, device=d),
                                     _randn(1, 2, 5, 4, device=d), {})),
    ("batch-mismatch", lambda d: (_randn(2, 2, 3, 4, device=d), _randn(3, 2, 4, 4, device=d),
                                  _randn(3, 2, 4, 4, device=d), {})),
    ("batch-broadcast", lambda d: (_randn(2, 2, 3, 4, device=d), _randn(1, 2, 4, 4, device=d),
                                   _randn(1, 2, 4, 4, device=d), {})),
    ("dtype-mixed", lambda d: (_randn(1, 2, 3, 4, device=d), _randn(1, 2, 4, 4, device=d, dtype=torch.float64),
                               _randn(1, 2, 4, 4, device=d), {})),
    ("device-meta-key", lambda d: (_randn(1, 2, 3, 4, device=d), _randn(1, 2, 4, 4, device=META),
                                   _randn(1, 2, 4, 4, device=d), {})),
    ("mask-shape", lambda d: (*_qkv(d), dict(attn_mask=torch.ones(3, 5, dtype=torch.bool, device=d)))),
    ("mask-dtype-int", lambda d: (*_qkv(d), dict(attn_mask=torch.ones(3, 4, dtype=torch.int64, device=d)))),
    ("mask-dtype-float64", lambda d: (*_qkv(d), dict(attn_mask=torch.zeros(3, 4, dtype=torch.float64, device=d)))),
    ("mask-device", lambda d: (*_qkv(d), dict(attn_mask=torch.ones(3, 4, dtype=torch.bool, device=META)))),
    ("mask-bool-broadcast", lambda d: (*_qkv(d), dict(attn_mask=torch.rand(1, 1, 3, 4, generator=_GEN).gt(0.3)
                                                      .to(d)))),
    ("mask-all-masked-row", lambda d: (*_qkv(d), dict(attn_mask=_with(torch.ones(3, 4, dtype=torch.bool), 1, False)
                                                      .to(d)))),
    ("mask-float", lambda d: (*_qkv(d), dict(attn_mask=_randn(2, 3, 4, device=d)))),
    ("mask-strided", lambda d: (*_qkv(d), dict(attn_mask=_randn(2, 8, 3, device=d).transpose(1, 2)[:, :, ::2]))),
    ("mask-expanded", lambda d: (*_qkv(d, n=2), dict(attn_mask=_randn(1, 1, 1, 4, device=d).expand(2, 2, 3, 4)))),
    ("causal-and-mask", lambda d: (*_qkv(d), dict(is_causal=True, attn_mask=torch.ones(3, 4, dtype=torch.bool,
                                                                                         device=d)))),
    ("causal", lambda d: (*_qkv(d, L=5, S=3), dict(is_causal=True))),
    ("dropout-negative", lambda d: (*_qkv(d), dict(dropout_p=-0.5))),
    ("dropout-above-1", lambda d: (*_qkv(d), dict(dropout_p=1.5))),
    ("dropout-1", lambda d: (*_qkv(d), dict(dropout_p=1.0))),
    ("dtype-int64", lambda d: (*(t.long() for t in _qkv(d)), {})),
    ("gqa", lambda d: (*_qkv(d, hq=4, hkv=2), dict(enable_gqa=True))),
    ("gqa-not-dividing", lambda d: (*_qkv(d, hq=3, hkv=2), dict(enable_gqa=True))),
    ("gqa-kv-heads-differ", lambda d: (_randn(1, 4, 3, 4, device=d), _randn(1, 2, 4, 4, device=d),
                                       _randn(1, 1, 4, 4, device=d), dict(enable_gqa=True))),
    ("heads-differ-without-gqa", lambda d: (*_qkv(d, hq=4, hkv=2), {})),
    ("empty-batch", lambda d: (*_qkv(d, n=0), {})),
    ("length-0-query", lambda d: (*_qkv(d, L=0), {})),
    ("length-0-keys", lambda d: (*_qkv(d, S=0), {})),
    ("length-1", lambda d: (*_qkv(d, L=1, S=1), {})),
    ("nan", lambda d: (_with(_qkv(d)[0], (0, 1, 2, 3), float("nan")), *_qkv(d)[1:], {})),
    ("inf", lambda d: (_with(_qkv(d)[0], (0, 0, 1, 0), float("inf")), *_qkv(d)[1:], {})),
    ("1e30", lambda d: (_qkv(d)[0] * 1e30, *_qkv(d)[1:], {})),
    ("noncontiguous", lambda d: (_randn(1, 3, 2, 4, device=d).transpose(1, 2), _randn(1, 2, 4, 8, device=d)[..., ::2],
                                 _randn(1, 4, 2, 4, device=d).transpose(1, 2), {})),
    ("odd-sizes", lambda d: (*_qkv(d, n=3, hq=3, hkv=3, L=7, S=9, E=5, Ev=3), dict(scale=0.3))),
]

for _entry in SDPA_ENTRIES:
    _sdpa_case(*_entry)
_sdpa_case("dtype-float64", lambda d: (*_qkv(d, dtype=torch.float64), {}), kernels=False)


# ---------------------------------------------------------------------------------------------------------------
# conv_pool2d and ConvPool2d: torch's Conv2d -> activation -> pool is the judge.

def _torch_conv_pool(x, weight, bias, stride=1, padding=0, dilation=1, groups=1, activation="relu", pool="max",
                     pool_kernel_size=2, pool_stride=None, pool_padding=0, ceil_mode=False):
    z = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    a = dict(relu=F.relu, gelu=F.gelu, none=lambda t: t)[activation](z)
    if pool == "max":
        return F.max_pool2d(a, pool_kernel_size, pool_stride, pool_padding, ceil_mode=ceil_mode)
    return F.avg_pool2d(a, pool_kernel_size, pool_stride, pool_padding, ceil_mode=ceil_mode)


def _conv_case(name, make, kernels=True):
    """make(device) -> (x, weight, bias, options)."""
    def build(device):
        x, weight, bias, options = make(device)
        return (lambda: _torch_conv_pool(x, weight, bias, **options)), \
            (lambda: fusenn.functional.conv_pool2d(x, weight, bias, **options))

    CASES.append(Case(f"conv_pool2d-{name}", "conv", build, kernels, RuntimeError if "meta" in name else None))


def _w(d, out=4, cin=3, k=3, dtype=torch.float32):
    return _randn(out, cin, k, k, device=d, dtype=dtype), _randn(out, device=d, dtype=dtype)


CONV_ENTRIES = [
    ("plain", lambda d: (_randn(2, 3, 6, 6, device=d), *_w(d), {})),
    ("channels", lambda d: (_randn(2, 5, 6, 6, device=d), *_w(d), {})),
    ("smaller-than-kernel", lambda d: (_randn(2, 3, 2, 2, device=d), *_w(d), {})),
    ("smaller-than-pool", lambda d: (_randn(2, 3, 4, 4, device=d), *_w(d), dict(pool_kernel_size=3))),
    ("rank2", lambda d: (_randn(6, 6, device=d), *_w(d), {})),
    ("rank5", lambda d: (_randn(1, 2, 3, 6, 6, device=d), *_w(d), {})),
    ("unbatched", lambda d: (_randn(3, 6, 7, device=d), *_w(d), {})),
    ("dtype-input-float64", lambda d: (_randn(2, 3, 6, 6, device=d, dtype=torch.float64), *_w(d), {})),
    ("dtype-int64", lambda d: (torch.ones(2, 3, 6, 6, dtype=torch.int64, device=d), *_w(d), {})),
    ("dtype-bias", lambda d: (_randn(2, 3, 6, 6, device=d), _w(d)[0], _randn(4, device=d, dtype=torch.float64), {})),
    ("device-meta", lambda d: (_randn(2, 3, 6, 6, device=META), *_w(d), {})),
    ("device-meta-weight", lambda d: (_randn(2, 3, 6, 6, device=d), *_w(META), {})),
    ("bias-size", lambda d: (_randn(2, 3, 6, 6, device=d), _w(d)[0], _randn(5, device=d), {})),
    ("weight-rank", lambda d: (_randn(2, 3, 6, 6, device=d), _randn(4, 3, 3, device=d), None, {})),
    ("groups-mismatch", lambda d: (_randn(2, 6, 6, 6, device=d), *_w(d), dict(groups=3))),
    ("groups", lambda d: (_randn(1, 6, 7, 7, device=d), *_w(d, out=4, cin=3), dict(groups=2))),
    ("stride-0", lambda d: (_randn(2, 3, 6, 6, device=d), *_w(d), dict(stride=0))),
    ("padding-negative", lambda d: (_randn(2, 3, 6, 6, device=d), *_w(d), dict(padding=-1))),
    ("dilation-0", lambda d: (_randn(2, 3, 6, 6, device=d), *_w(d), dict(dilation=0))),
    ("pool-stride-0", lambda d: (_randn(2, 3, 6, 6, device=d), *_w(d), dict(pool_stride=0))),
    ("pool-padding-too-big", lambda d: (_randn(2, 3, 6, 6, device=d), *_w(d), dict(pool_padding=2))),
    ("empty-batch", lambda d: (_randn(0, 3, 6, 6, device=d), *_w(d), {})),
    ("nan", lambda d: (_with(_randn(1, 3, 6, 6, device=d), (0, 1, 2, 3), float("nan")), *_w(d), {})),
    ("inf", lambda d: (_with(_randn(1, 3, 6, 6, device=d), (0, 0, 0, 0), float("inf")), *_w(d), {})),
    ("1e30", lambda d: (_randn(1, 3, 6, 6, device=d, scale=1e30), *_w(d), dict(pool="avg", activation="none"))),
    ("noncontiguous", lambda d: (_randn(1, 3, 7, 6, device=d).transpose(2, 3), *_w(d), {})),
    ("channels_last", lambda d: (_randn(2, 3, 6, 7, device=d).to(memory_format=torch.channels_last), *_w(d), {})),
    ("strided-slices", lambda d: (_randn(2, 6, 6, 13, device=d)[:, ::2, :, ::2], _randn(3, 4, 3, 3, device=d)
                                  .transpose(0, 1), _randn(8, device=d)[::2], {})),
    ("channels_last-weight", lambda d: (_randn(1, 3, 6, 6, device=d),
                                        _w(d)[0].to(memory_format=torch.channels_last), _w(d)[1], {})),
    ("odd-sizes", lambda d: (_randn(3, 3, 9, 7, device=d), *_w(d, out=5), dict(
        stride=2, padding=1, dilation=1, pool_kernel_size=3, pool_stride=2, pool_padding=1, ceil_mode=True,
        activation="gelu"))),
    ("avg-pool", lambda d: (_randn(1, 3, 7, 7, device=d), *_w(d), dict(pool="avg", pool_kernel_size=3))),
]

for _entry in CONV_ENTRIES:
    _conv_case(*_entry)
_conv_case("dtype-float64", lambda d: (_randn(1, 3, 6, 6, device=d, dtype=torch.float64), *_w(d, dtype=torch.float64),
                                       {}), kernels=False)


def _conv_module_case(name, make_input, kwargs=None):
    def build(device):
        torch.manual_seed(0)
        theirs = nn.Sequential(nn.Conv2d(3, 4, 3, **(kwargs or {})), nn.ReLU(), nn.MaxPool2d(2)).to(device)
        mine = fusenn.ConvPool2d.from_modules(*theirs)
        x = make_input(device)
        return (lambda: theirs(x)), (lambda: mine(x))

    CASES.append(Case(f"ConvPool2d-{name}", "conv", build, "float64" not in name,
                      RuntimeError if "meta" in name else None))


for _name, _make, _kwargs in [
    ("channels", lambda d: _randn(1, 5, 6, 6, device=d), None),
    ("smaller-than-kernel", lambda d: _randn(1, 3, 2, 2, device=d), None),
    ("rank2", lambda d: _randn(6, 6, device=d), None),
    ("unbatched", lambda d: _randn(3, 6, 6, device=d), None),
    ("dtype-float64", lambda d: _randn(1, 3, 6, 6, device=d, dtype=torch.float64), None),
    ("device-meta", lambda d: _randn(1, 3, 6, 6, device=META), None),
    ("empty-batch", lambda d: _randn(0, 3, 6, 6, device=d), None),
    ("padding-reflect", lambda d: _randn(1, 3, 5, 5, device=d), dict(padding=1, padding_mode="reflect")),
    ("padding-same", lambda d: _randn(1, 3, 5, 5, device=d), dict(padding="same")),
    ("reflect-too-small", lambda d: _randn(1, 3, 1, 1, device=d), dict(padding=2, padding_mode="reflect")),
    ("channels_last", lambda d: _randn(2, 3, 6, 6, device=d).to(memory_format=torch.channels_last), None),
]:
    _conv_module_case(_name, _make, _kwargs)


# ---------------------------------------------------------------------------------------------------------------
# MultiheadAttention: torch's with the same weights is the judge.

def _mha_case(name, make, kernels=True, **kwargs):
    """make(device) -> (query, key, value, forward kwargs)."""
    def build(device):
        torch.manual_seed(0)
        theirs = nn.MultiheadAttention(6, 2, **kwargs).to(device)
        mine = fusenn.MultiheadAttention(6, 2, **kwargs).to(device)
        mine.load_state_dict(theirs.state_dict())
        q, k, v, extra = make(device)
        extra = dict(need_weights=False, **extra)

        def theirs_math():  # torch's CPU fast path answers 0 for a query row holding a NaN
            with sdpa_kernel(SDPBackend.MATH):
                return theirs(q, k, v, **extra)[0]

        return theirs_math, (lambda: mine(q, k, v, **extra)[0])

    CASES.append(Case(f"mha-{name}", "attention", build, kernels))


def _seq(d, L=3, N=2, E=6, dtype=torch.float32):
    return _randn(L, N, E, device=d, dtype=dtype)


MHA_ENTRIES = [
    ("plain", lambda d: (_seq(d), _seq(d, 4), _seq(d, 4), {})),
    ("embed-dim", lambda d: (_seq(d, E=7), _seq(d, 4), _seq(d, 4), {})),
    ("key-embed-dim", lambda d: (_seq(d), _seq(d, 4, E=5), _seq(d, 4), {})),
    ("kv-lengths-differ", lambda d: (_seq(d), _seq(d, 4), _seq(d, 5), {})),
    ("batch-mismatch", lambda d: (_seq(d), _seq(d, 4, N=3), _seq(d, 4, N=3), {})),
    ("rank4", lambda d: (_randn(1, 3, 2, 6, device=d),) * 3 + ({},)),
    ("rank1", lambda d: (_randn(6, device=d),) * 3 + ({},)),
    ("unbatched", lambda d: (_randn(3, 6, device=d), _randn(4, 6, device=d), _randn(4, 6, device=d), {})),
    ("dtype-float64", lambda d: (_seq(d, dtype=torch.float64), _seq(d, 4), _seq(d, 4), {})),
    ("device-meta", lambda d: (_seq(META), _seq(d, 4), _seq(d, 4), {})),
    ("padding-mask-shape", lambda d: (_seq(d), _seq(d, 4), _seq(d, 4), dict(
        key_padding_mask=torch.zeros(2, 5, dtype=torch.bool, device=d)))),
    ("padding-mask-dtype", lambda d: (_seq(d), _seq(d, 4), _seq(d, 4), dict(
        key_padding_mask=torch.zeros(2, 4, dtype=torch.int64, device=d)))),
    ("padding-mask", lambda d: (_seq(d), _seq(d, 4), _seq(d, 4), dict(
        key_padding_mask=torch.tensor([[False, True, False, True], [False] * 4], device=d)))),
    ("padding-mask-all-keys", lambda d: (_seq(d), _seq(d, 4), _seq(d, 4), dict(
        key_padding_mask=torch.tensor([[True] * 4, [False] * 4], device=d)))),
    ("attn-mask-shape", lambda d: (_seq(d), _seq(d, 4), _seq(d, 4), dict(
        attn_mask=torch.zeros(3, 5, dtype=torch.bool, device=d)))),
    ("attn-mask-3d-shape", lambda d: (_seq(d), _seq(d, 4), _seq(d, 4), dict(
        attn_mask=torch.zeros(3, 3, 4, dtype=torch.bool, device=d)))),
    ("attn-mask-dtype", lambda d: (_seq(d), _seq(d, 4), _seq(d, 4), dict(
        attn_mask=torch.zeros(3, 4, dtype=torch.int64, device=d)))),
    ("attn-mask-3d", lambda d: (_seq(d), _seq(d, 4), _seq(d, 4), dict(attn_mask=_randn(4, 3, 4, device=d)))),
    ("causal-without-mask", lambda d: (_seq(d), _seq(d), _seq(d), dict(is_causal=True))),
    ("empty-batch", lambda d: (_seq(d, N=0), _seq(d, 4, N=0), _seq(d, 4, N=0), {})),
    ("length-1", lambda d: (_seq(d, 1), _seq(d, 1), _seq(d, 1), {})),
    ("nan", lambda d: (_with(_seq(d), (1, 0, 2), float("nan")), _seq(d, 4), _seq(d, 4), {})),
    ("inf", lambda d: (_seq(d), _with(_seq(d, 4), (0, 1, 3), float("inf")), _seq(d, 4), {})),
    ("1e30", lambda d: (_seq(d) * 1e30, _seq(d, 4), _seq(d, 4), {})),
    ("query-length-0", lambda d: (_seq(d, 0), _seq(d, 4), _seq(d, 4), {})),
    ("keys-length-0", lambda d: (_seq(d), _seq(d, 0), _seq(d, 0), {})),
    ("noncontiguous", lambda d: (_randn(2, 3, 6, device=d).transpose(0, 1), _seq(d, 4), _seq(d, 4), {})),
]

for _entry in MHA_ENTRIES:
    _mha_case(*_entry)
_mha_case("batch_first-odd", lambda d: (_randn(3, 5, 6, device=d), _randn(3, 7, 6, device=d),
                                        _randn(3, 7, 6, device=d), {}), batch_first=True)
_mha_case("kdim-vdim", lambda d: (_seq(d), _seq(d, 4, E=5), _seq(d, 4, E=3), {}), kdim=5, vdim=3)
_mha_case("bias_kv-zero_attn", lambda d: (_seq(d), _seq(d, 4), _seq(d, 4), dict(
    key_padding_mask=torch.tensor([[False, True, False, True], [False] * 4], device=d))), add_bias_kv=True,
    add_zero_attn=True)


# ---------------------------------------------------------------------------------------------------------------
# dropout: masks differ from torch's, so the answers compared are those that do not depend on the mask.

def _dropout_case(name, make_input, p, training=True):
    def build(device):
        x = make_input(device)
        return (lambda: F.dropout(x, p, training)), (lambda: fusenn.functional.dropout(x, p, training))

    CASES.append(Case(f"dropout-{name}", "dropout", build))


for _entry in [
    ("p-negative", lambda d: _randn(3, 4, device=d), -0.1),
    ("p-above-1", lambda d: _randn(3, 4, device=d), 1.5),
    ("p-0", lambda d: _with(_randn(3, 4, device=d), (0, 1), float("nan")), 0.0),
    ("p-1", lambda d: _with(_randn(3, 4, device=d), (0, 1), float("inf")), 1.0),
    ("eval", lambda d: _randn(3, 4, device=d), 0.5, False),
    ("empty", lambda d: _randn(0, 4, device=d), 0.5),
    ("int64", lambda d: torch.ones(3, 4, dtype=torch.int64, device=d), 0.5),
    ("int64-p-1", lambda d: torch.ones(3, 4, dtype=torch.int64, device=d), 1.0),
    ("meta", lambda d: torch.ones(3, 4, device=META), 0.5),
]:
    _dropout_case(*_entry)


def _mask_case(name, shape, p, judge, expect=None):
    """dropout_mask has no torch twin: the judge is the mask the math fixes (p = 0: all kept, p = 1: none) or
    torch's refusal of the shape."""
    def build(device):
        return (lambda: judge(shape, device)), (lambda: fusenn.functional.dropout_mask(shape, p, 5, device=device))

    CASES.append(Case(f"dropout_mask-{name}", "dropout", build, expect=expect))


_mask_case("p-0", (3, 5), 0.0, lambda s, d: torch.ones(s, dtype=torch.bool, device=d))
_mask_case("p-1", (2, 7), 1.0, lambda s, d: torch.zeros(s, dtype=torch.bool, device=d))
_mask_case("empty", (0, 4), 0.5, lambda s, d: torch.zeros(s, dtype=torch.bool, device=d))
_mask_case("negative-dim", (-1, 4), 0.5, lambda s, d: torch.empty(s, device=d))
_mask_case("p-above-1", (3, 4), 1.5, None, expect=ValueError)  # F.dropout's type for a probability outside [0, 1]


# ---------------------------------------------------------------------------------------------------------------

def _outcome(fn):
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001 - the type is what is compared
        return None, exc


def _assert_same(got, want, path):
    leaves_got = [t for t in torch.utils._pytree.tree_leaves(got) if isinstance(t, torch.Tensor)]
    leaves_want = [t for t in torch.utils._pytree.tree_leaves(want) if isinstance(t, torch.Tensor)]
    assert len(leaves_got) == len(leaves_want), path
    for a, b in zip(leaves_got, leaves_want):
        assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device, (path, a.shape, b.shape)
        if b.device.type != "meta":
            torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-4, atol=1e-5, msg=lambda m: f"{path}: {m}")


def _check(case: Case, device, path: str, kernel: bool):
    torch_call, fusenn_call = case.build(device)
    want, torch_error = _outcome(torch_call)
    if case.expect is not None:
        want, torch_error = None, case.expect("the judge's error")
    got, error = _outcome(fusenn_call)
    if kernel and not case.kernels and torch_error is None:
        assert isinstance(error, fusenn.BackendError), f"{path}: expected the kernel backend to refuse, got {error!r}"
        return
    if torch_error is not None:
        assert error is not None, f"{path}: torch raises {torch_error!r}, fusenn answers"
        assert type(error) is type(torch_error), f"{path}: torch raises {torch_error!r}, fusenn {error!r}"
        return
    assert error is None, f"{path}: torch answers, fusenn raises {error!r}"
    _assert_same(got, want, path)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_reference(case):
    with fusenn.set_backend("reference"):
        _check(case, torch.device("cpu"), "reference", kernel=False)


# The kernel backends each family has: Triton everywhere; the C++ layers for the RNNs (on a GPU, and on CPU
# tensors through their host loops) and for dropout's mask (on a GPU). conftest's kernel_backend sets them up.
_HAS_GPU = torch.cuda.is_available()
_BACKENDS = dict(triton=("triton", "cuda" if _HAS_GPU else "cpu"), cuda=("cuda", "cuda"), cpp_host=("cpp-host", "cpu"))
_FAMILY_BACKENDS = dict(rnn=("triton", "cuda", "cpp_host"), dropout=("triton", "cuda"), attention=("triton",),
                        conv=("triton",))


def _kernel_params():
    for c in CASES:
        for b in _FAMILY_BACKENDS[c.family]:
            marks = [pytest.mark.gpu] if b == "cuda" else []
            yield pytest.param(c, _BACKENDS[b], id=f"{b.replace('_', '-')}-{c.id}", marks=marks)


@pytest.mark.parametrize(("case", "kernel_backend"), list(_kernel_params()), indirect=["kernel_backend"])
def test_kernels(case, kernel_backend):
    name, device = kernel_backend
    cpp_host = name == "cuda" and device.type == "cpu"
    _check(case, device, "cpp-host" if cpp_host else name, kernel=True)

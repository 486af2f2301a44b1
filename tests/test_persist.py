"""The persistent LSTM and GRU (csrc/rnn_persist.cuh, .cu) against the float64 reference; its plan and build.

Without a GPU the C++ ops run on CPU tensors as the grid's emulation: every CTA's slice of a step in turn
through the very functions the kernels run, with fp16/bf16 MMA operands (h_{t-1}, W_hh, dgates) rounded as
on the GPU, and fp32's rounded to TF32 as cvt.rna does where TF32 is allowed (judged against PyTorch
computing its products in TF32, fusenn.testing.tf32_products). So partitioning, masks, lengths, reverse and
backward are checked here; the GPU tests (marked `gpu`) check the kernels themselves. The static test
compiles the kernels for sm_90a and checks ptxas's registers and shared memory against the launcher's plan.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import fusenn
from fusenn import dispatch
from fusenn.ops import rnn as ops
from fusenn.reference import rnn as reference
from fusenn.testing import assert_close, poisoned_outputs, round_tf32, tf32_products

from conftest import CSRC, cpp_host_unavailable
from test_rnn_kernels import _check_layer, _gru_inputs, _lstm_inputs, _outputs_and_grads

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
H200 = [132, 232448, 233472, 65536, 2048, 32]  # what persist::kH200 holds (csrc/rnn_persist.cuh)


@pytest.fixture(scope="module")
def twin():
    """The C++ ops' CPU implementations (fusenn._C's, else the host-only build of csrc/ conftest makes)."""
    why = cpp_host_unavailable()
    if why and "failed" in why:
        pytest.fail(why)  # our own code failing to build is a failure, not a skip
    if why:
        pytest.skip(why)
    return torch.ops.fusenn_cuda


@pytest.fixture
def persistent(twin, monkeypatch):
    """fusenn.ops.rnn's LSTM / GRU layers on the persistent path with CPU tensors (dispatch sends CPU
    tensors to the reference under every real backend), checking its support function takes them; fp32
    exact (TF32 off) unless a test turns torch.backends.cudnn.allow_tf32 on."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    def choose(op, device, unsupported, *args):
        if op in ("lstm", "gru"):
            assert unsupported["persistent"] is None, unsupported["persistent"]
            return "persistent"
        return "reference"

    monkeypatch.setattr(dispatch, "choose", choose)
    return twin


def _regs(recurrent_dropout, zoneout, B, H, device=torch.device("cpu")):
    """The C++ ops' regularising arguments (rscale, zo_seed, zo_mode, zo_threshold, zo_u, stream)."""
    rd_p, rd_seed, zo_p, zo_seed = ops._op_regularisers(recurrent_dropout, zoneout, device)
    return ops._cpp_regularisers(rd_p, rd_seed, zo_p, zo_seed, B, H, device)


def _case(T, B, H, dtype="fp32", reverse=False, lengths=None, grid=0, regs=False):
    parts = [f"T{T}", f"B{B}", f"H{H}", dtype] + (["reverse"] if reverse else []) + (["packed"] if lengths else [])
    parts += ([f"grid{grid}"] if grid else []) + (["regs"] if regs else [])
    return pytest.param(T, B, H, DTYPES[dtype], reverse, lengths, grid, regs, id="-".join(parts))


FORWARD_CASES = [
    _case(1, 1, 7),
    _case(4, 3, 7, reverse=True, lengths=[4, 1, 2]),
    _case(3, 17, 33, lengths=[3, 1, 2] * 5 + [1, 3]),
    _case(3, 3, 33, grid=5),  # 7 units per CTA: gate rows not a multiple of 16
    _case(2, 3, 129, reverse=True),
    _case(2, 1, 1000),
    _case(0, 3, 7),
    _case(4, 0, 7),
    _case(3, 3, 33, "fp16", lengths=[3, 1, 2]),
    _case(2, 17, 129, "fp16", reverse=True),
    _case(3, 3, 33, "bf16", reverse=True, lengths=[2, 3, 1]),
    _case(2, 3, 129, "bf16", grid=5),  # 26 units per CTA
    _case(1, 17, 7, "bf16"),
    _case(3, 3, 33, "bf16", grid=33),  # one unit per CTA: one MMA tile of rows, K split over all 8 warps
    _case(3, 3, 33, "fp16", grid=2),  # 17 units: 5 MMA tiles of rows, no K split
    _case(3, 5, 64, "fp16", lengths=[3, 2, 1, 3, 3]),  # K % 8 == 0: h staged 16 bytes at a time
    _case(2, 3, 520, "bf16", grid=65),  # 8 units per CTA, h staged in one wide chunk
    _case(2, 3, 1000, "bf16"),
    _case(4, 3, 33, regs=True, lengths=[4, 2, 3]),
    _case(4, 3, 33, "bf16", reverse=True, regs=True),
    _case(3, 40, 33, "bf16", reverse=True, regs=True, grid=5),  # 3 batch tiles a round, the last 8 rows: masks by row
    _case(2, 80, 33, lengths=[2, 1] * 40, regs=True),  # rounds of 4 tiles and of 1
]


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("T,B,H,dtype,reverse,lengths,grid,regs", FORWARD_CASES)
def test_persist_forward_op_matches_reference(twin, kind, T, B, H, dtype, reverse, lengths, grid, regs):
    """The op's outputs (poisoned first) against the float64 reference; recurrent dropout and sampled
    zoneout must draw the reference's masks for the same seeds, or the error would be of order 1."""
    torch.manual_seed(T * 1000 + B * 100 + H)
    lens = torch.tensor(lengths) if lengths else None
    rd, zo = ((0.3, 17), (0.25, 29)) if regs else (None, None)
    kw = dict(lengths=lens, reverse=reverse, recurrent_dropout=rd, zoneout=zo)
    if kind == "lstm":
        gx, h0, c0, w_hh, _ = _lstm_inputs(T, B, H, None, dtype, "cpu")
        with poisoned_outputs():
            out = twin.lstm_persist_forward(gx, h0, c0, w_hh, None, lens, reverse, True, *_regs(rd, zo, B, H), grid)
        ref = reference.lstm_layer(gx.double(), h0.double(), c0.double(), w_hh.double(), **kw)
        base = reference.lstm_layer(gx, h0, c0, w_hh, **kw)
    else:
        gx, h0, w_hh, b_hh = _gru_inputs(T, B, H, True, dtype, "cpu")
        with poisoned_outputs():
            out = twin.gru_persist_forward(gx, h0, w_hh, b_hh, lens, reverse, True, *_regs(rd, zo, B, H), grid)
        ref = reference.gru_layer(gx.double(), h0.double(), w_hh.double(), b_hh.double(), **kw)
        base = reference.gru_layer(gx, h0, w_hh, b_hh, **kw)
    for o, r, b, name in zip(out, ref, base, ("y", "h_n", "c_n")):
        assert o.dtype == dtype
        assert_close(o, r, b, name=name)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", ["fp32"])
def test_persist_partition_does_not_change_a_bit(twin, kind, dtype):
    """In fp32 each gate product is one CTA's dot product in k order whatever the partition: 2, 3, 5, the
    plan's and one CTA per unit give bit-identical outputs, states and gradients (fp16/bf16 split K by the
    number of MMA tiles, so their sums' order depends on the partition)."""
    torch.manual_seed(1)
    T, B, H = 3, 5, 33
    lens = torch.tensor([3, 1, 2, 3, 2])
    regs = _regs((0.2, 5), (0.3, 7), B, H)
    dt = DTYPES[dtype]
    results = []
    for grid in (2, 3, 5, 0, H):
        if kind == "lstm":
            gx, h0, c0, w_hh, _ = _lstm_inputs(T, B, H, None, dt, "cpu")
            fwd = twin.lstm_persist_forward(gx, h0, c0, w_hh, None, lens, True, True, *regs, grid)
            bwd = twin.lstm_persist_backward(torch.randn(T, B, H).to(dt), torch.randn(B, H), torch.randn(B, H), gx,
                                             w_hh, None, lens, True, fwd[3], fwd[4], *regs, grid)
        else:
            gx, h0, w_hh, b_hh = _gru_inputs(T, B, H, True, dt, "cpu")
            fwd = twin.gru_persist_forward(gx, h0, w_hh, b_hh, lens, True, True, *regs, grid)
            bwd = twin.gru_persist_backward(torch.randn(T, B, H).to(dt), torch.randn(B, H), gx, w_hh, b_hh, lens,
                                            True, fwd[2], *regs, grid)
        results.append(list(fwd) + list(bwd))
        torch.manual_seed(1)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def _layer_case(T, B, H, dtype="fp32", reverse=False, lengths=None, bias=True):
    parts = [f"T{T}", f"B{B}", f"H{H}", dtype] + (["reverse"] if reverse else []) + (["packed"] if lengths else [])
    return pytest.param(T, B, H, DTYPES[dtype], reverse, lengths, bias, id="-".join(parts + ([] if bias else
                                                                                            ["nobias"])))


LAYER_CASES = [
    _layer_case(1, 1, 7),
    _layer_case(4, 3, 7, reverse=True, lengths=[4, 1, 2]),
    _layer_case(3, 17, 33, lengths=[3, 1, 2] * 5 + [1, 3], bias=False),
    _layer_case(2, 3, 129, reverse=True),
    _layer_case(3, 3, 33, "fp16", lengths=[3, 1, 2]),
    _layer_case(3, 3, 33, "bf16", reverse=True, lengths=[2, 3, 1]),
    _layer_case(1, 17, 7, "bf16"),
    _layer_case(0, 3, 7),
    _layer_case(4, 0, 7),
    _layer_case(1, 1, 1000),
    _layer_case(2, 3, 300, "fp16"),  # backward stages K = 4H = 1200 in two chunks, the second partial
    _layer_case(2, 3, 1000, "bf16", reverse=True),
    _layer_case(3, 40, 33, "bf16", lengths=[3, 1, 2, 3] * 10),  # batch tiles staged and multiplied 3 at a time
    _layer_case(2, 80, 33, reverse=True),  # rounds of 4 tiles and of 1
]


@pytest.mark.parametrize("T,B,H,dtype,reverse,lengths,bias", LAYER_CASES)
def test_persist_lstm_layer_and_gradients_match_reference(persistent, T, B, H, dtype, reverse, lengths, bias):
    """Forward and backward through fusenn.ops.rnn (the weight gradients one GEMM over T*B rows) against
    float64: outputs within 2x and every gradient within 3x PyTorch's own error in the dtype."""
    torch.manual_seed(T * 1000 + B * 100 + H)
    inputs = _lstm_inputs(T, B, H, None, dtype, "cpu")
    upstream = [torch.randn(T, B, H), torch.randn(B, H), torch.randn(B, H)]
    lens = torch.tensor(lengths) if lengths else None

    def layer(fn):
        return lambda gx, h0, c0, w_hh, w_hr: fn(gx, h0, c0, w_hh, w_hr, lengths=lens, reverse=reverse)

    _check_layer(layer(ops.lstm_layer), layer(reference.lstm_layer), inputs, upstream, ("gx", "h0", "c0", "w_hh",
                                                                                         "w_hr"))


@pytest.mark.parametrize("T,B,H,dtype,reverse,lengths,bias", LAYER_CASES)
def test_persist_gru_layer_and_gradients_match_reference(persistent, T, B, H, dtype, reverse, lengths, bias):
    torch.manual_seed(T * 1000 + B * 100 + H)
    inputs = _gru_inputs(T, B, H, bias, dtype, "cpu")
    upstream = [torch.randn(T, B, H), torch.randn(B, H)]
    lens = torch.tensor(lengths) if lengths else None

    def layer(fn):
        return lambda gx, h0, w_hh, b_hh: fn(gx, h0, w_hh, b_hh, lengths=lens, reverse=reverse)

    _check_layer(layer(ops.gru_layer), layer(reference.gru_layer), inputs, upstream, ("gx", "h0", "w_hh", "b_hh"))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_persist_regularisers_and_gradients_match_reference(persistent, kind, reverse):
    """Recurrent dropout and sampled zoneout: the persistent kernels regenerate the reference's masks in
    forward and backward (the same Philox counters as the stepwise C++ kernels)."""
    torch.manual_seed(3)
    T, B, H = 4, 3, 33
    lens = torch.tensor([4, 2, 3])
    regs = dict(recurrent_dropout=(0.3, 17), zoneout=(0.25, 29), lengths=lens, reverse=reverse)
    if kind == "lstm":
        inputs = _lstm_inputs(T, B, H, None, torch.float32, "cpu")
        upstream = [torch.randn(T, B, H), torch.randn(B, H), torch.randn(B, H)]
        _check_layer(lambda *a: ops.lstm_layer(*a, **regs), lambda *a: reference.lstm_layer(*a, **regs), inputs,
                     upstream, ("gx", "h0", "c0", "w_hh", "w_hr"))
    else:
        inputs = _gru_inputs(T, B, H, True, torch.float32, "cpu")
        upstream = [torch.randn(T, B, H), torch.randn(B, H)]
        _check_layer(lambda *a: ops.gru_layer(*a, **regs), lambda *a: reference.gru_layer(*a, **regs), inputs,
                     upstream, ("gx", "h0", "w_hh", "b_hh"))


def test_persist_inference_keeps_two_state_slots(persistent):
    """Without grad the kernels alternate two state slots instead of keeping every step's state."""
    torch.manual_seed(4)
    lens = torch.tensor([5, 1, 3])
    lstm_in = _lstm_inputs(5, 3, 7, None, torch.float32, "cpu")
    gru_in = _gru_inputs(4, 3, 7, True, torch.float32, "cpu")
    with torch.no_grad(), poisoned_outputs():
        lstm_out = ops.lstm_layer(*lstm_in, lengths=lens, reverse=True)
        gru_out = ops.gru_layer(*gru_in, lengths=lens.clamp(max=4))
    assert_close(lstm_out, reference.lstm_layer(*[x.double() if x is not None else None for x in lstm_in],
                                                lengths=lens, reverse=True), name="lstm")
    assert_close(gru_out, reference.gru_layer(*[x.double() for x in gru_in], lengths=lens.clamp(max=4)), name="gru")
    proj_in = _lstm_inputs(5, 3, 33, 17, torch.float32, "cpu")  # with a projection: m_t in one slot too
    with torch.no_grad(), poisoned_outputs():
        proj_out = ops.lstm_layer(*proj_in, lengths=lens, reverse=True)
    assert_close(proj_out, reference.lstm_layer(*[x.double() for x in proj_in], lengths=lens, reverse=True),
                 name="lstm proj")


def test_persist_grid_from_the_environment_reaches_the_launcher(persistent, monkeypatch):
    """FUSENN_PERSIST_GRID (the benchmarks' sweep of grids) gives the layers' launches that many CTAs, forward and
    backward (the emulation's twice=C check names the grid it runs); malformed values raise."""
    torch.manual_seed(5)
    inputs = [x.requires_grad_() for x in _lstm_inputs(3, 2, 33, None, torch.float32, "cpu")[:4]]
    monkeypatch.setenv("FUSENN_PERSIST_GRID", "5")
    monkeypatch.setenv("FUSENN_PERSIST_EMULATION", "twice=99")
    with pytest.raises(RuntimeError, match="twice=99 names no CTA of the grid's 5"):
        ops.lstm_layer(*inputs)
    monkeypatch.setenv("FUSENN_PERSIST_EMULATION", "twice=4")  # CTA 4 of 5 exists: its share run twice, no harm
    y, h, c = ops.lstm_layer(*inputs)
    monkeypatch.setenv("FUSENN_PERSIST_EMULATION", "twice=99")
    with pytest.raises(RuntimeError, match="twice=99 names no CTA of the grid's 5"):
        torch.autograd.grad(y.sum(), inputs)
    monkeypatch.setenv("FUSENN_PERSIST_GRID", "five")
    with pytest.raises(ValueError, match="FUSENN_PERSIST_GRID must be a non-negative integer, got 'five'"):
        ops.lstm_layer(*inputs)


def test_persist_tiles_from_the_environment_reach_the_ops(persistent, monkeypatch):
    """FUSENN_PERSIST_TILES (the benchmarks' one-tile-a-round timing) reaches the persistent ops as their tiles
    argument, forward and backward, and changes no bit; unset it is 0 (the plan's); malformed values raise."""
    torch.manual_seed(6)
    inputs = [x.requires_grad_() for x in _gru_inputs(2, 40, 33, True, torch.float32, "cpu")]
    seen = []
    for name in ("gru_persist_forward", "gru_persist_backward"):
        real = getattr(torch.ops.fusenn_cuda, name)
        monkeypatch.setattr(torch.ops.fusenn_cuda, name,
                            lambda *a, _real=real, _name=name: seen.append((_name, a[-1])) or _real(*a))
    results = {}
    for tiles in ("", "1"):
        monkeypatch.setenv("FUSENN_PERSIST_TILES", tiles) if tiles else monkeypatch.delenv("FUSENN_PERSIST_TILES",
                                                                                               raising=False)
        y, h = ops.gru_layer(*inputs)
        results[tiles] = [y, h, *torch.autograd.grad((y.sum() + h.sum()), inputs)]
    assert seen == [("gru_persist_forward", 0), ("gru_persist_backward", 0), ("gru_persist_forward", 1),
                    ("gru_persist_backward", 1)]
    assert _same_bits(results[""], results["1"])
    monkeypatch.setenv("FUSENN_PERSIST_TILES", "-2")
    with pytest.raises(ValueError, match="FUSENN_PERSIST_TILES must be a non-negative integer, got '-2'"):
        ops.gru_layer(*inputs)


def test_persist_ops_check_their_inputs(twin):
    gx, h0, c0, w_hh, w_hr = _lstm_inputs(3, 2, 5, 3, torch.float32, "cpu")
    regs = (None, None, 0, 0, 1.0, 0)
    with pytest.raises(RuntimeError, match=r"expected w_hr of shape \[3, 5\], got \[3, 4\]"):
        twin.lstm_persist_forward(gx, h0, c0, w_hh, w_hr[:, :4], None, False, True, *regs, 0)
    with pytest.raises(RuntimeError, match="without w_hr, h0 must have hidden_size columns"):
        twin.lstm_persist_forward(gx, h0, c0, w_hh, None, None, False, True, *regs, 0)
    fwd = twin.lstm_persist_forward(gx, h0, c0, w_hh, w_hr, None, False, True, *regs, 0)
    with pytest.raises(RuntimeError, match=r"expected dy of shape \[3, 2, 3\], got \[3, 2, 5\]"):  # (T, B, P)
        twin.lstm_persist_backward(torch.zeros(3, 2, 5), fwd[1], fwd[2], gx, w_hh, w_hr, None, False, fwd[3], fwd[4],
                                   *regs, 0)
    gx, h0, c0, w_hh, _ = _lstm_inputs(3, 2, 5, None, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="expected w_hh of dtype Half"):
        twin.lstm_persist_forward(gx.half(), h0.half(), c0.half(), w_hh, None, None, False, True, *regs, 0)
    with pytest.raises(RuntimeError, match=r"expected lengths of shape \[2\]"):
        twin.lstm_persist_forward(gx, h0, c0, w_hh, None, torch.tensor([1, 2, 3]), False, True, *regs, 0)
    with pytest.raises(RuntimeError, match="grid must be non-negative"):
        twin.lstm_persist_forward(gx, h0, c0, w_hh, None, None, False, True, *regs, -1)
    with pytest.raises(RuntimeError, match=r"expected gx of shape \(T, B, 3 \* hidden_size\)"):
        twin.gru_persist_forward(gx[..., :-1].contiguous(), h0, w_hh[:15], None, None, False, True, *regs, 0)
    with pytest.raises(RuntimeError, match="sampled zoneout .* needs zo_seed"):
        twin.gru_persist_forward(gx[..., :15].contiguous(), h0, w_hh[:15], None, None, False, True, None, None, 1, 5,
                                 1.0, 0, 0)


def test_persist_refuses_what_cannot_be_co_resident(twin):
    """A grid an H200 cannot hold at once, or a W_hh slice beyond a CTA's shared memory, is refused with
    the reason before anything runs, and the support function gives the same reason to dispatch."""
    gx = torch.zeros(1, 1, 4 * 2000)
    h = torch.zeros(1, 2000)
    with pytest.raises(RuntimeError, match="needs 2000 co-resident CTAs"):
        twin.lstm_persist_forward(gx, h, h, torch.zeros(8000, 2000), None, None, False, False, None, None, 0, 0, 1.0,
                                  0, 2000)
    H = 4096
    gx, h = torch.zeros(1, 1, 4 * H), torch.zeros(1, H)
    with pytest.raises(RuntimeError, match="bytes of shared memory per CTA"):
        twin.lstm_persist_forward(gx, h, h, torch.zeros(4 * H, H), None, None, False, False, None, None, 0, 0, 1.0, 0,
                                  0)
    assert "shared memory per CTA" in ops.LSTM_SUPPORT["persistent"](gx, h, torch.zeros(4 * H, H), None)
    assert ops.LSTM_SUPPORT["persistent"](gx[..., :4096].contiguous(), h[:, :1024], torch.zeros(4096, 1024),
                                          None) is None


def test_persist_support_reasons(twin):
    gx, h0, c0, w_hh, w_hr = _lstm_inputs(2, 3, 7, 5, torch.float32, "cpu")
    lstm, gru = ops.LSTM_SUPPORT["persistent"], ops.GRU_SUPPORT["persistent"]
    assert lstm(gx, h0, w_hh, w_hr) is None  # proj_size: the projection runs in the persistent kernels too
    assert "float64" in lstm(gx.double(), h0.double(), w_hh.double(), w_hr.double())  # the dtype's reason first
    assert "float64" in lstm(gx.double(), h0.double(), w_hh[:, :7].double(), None)
    assert "batch 129 > 128" in gru(torch.zeros(1, 129, 21), torch.zeros(129, 7), torch.zeros(21, 7), None)
    assert gru(torch.zeros(1, 128, 21), torch.zeros(128, 7), torch.zeros(21, 7), None) is None
    assert "persistent" in fusenn.backends()
    assert "persistent" in dispatch.NAMES and ops.GPU_ORDER[0] == "persistent"
    with fusenn.set_backend("persistent"), pytest.raises(fusenn.BackendError, match="persistent: "):
        ops.lstm_layer(gx, h0, c0, w_hh, w_hr)  # CPU tensors: the backend says why it cannot run them
    with fusenn.set_backend("persistent"), pytest.raises(fusenn.BackendError, match="cuda: "):
        # the recurrent-dropout masks of a persistent layer come from fusenn._C's other kernels
        dispatch.choose("dropout_mask", torch.device("cpu"), {"reference": None, "cuda": None})


# ---- TF32: fp32 products on tensor cores where torch.backends.cudnn.allow_tf32 allows them ----

def test_round_tf32_rounds_to_nearest_with_ties_away_from_zero():
    """fusenn.testing.round_tf32, which the TF32 checks below rely on, against cvt.rna.tf32.f32's definition."""
    ulp = 2.0 ** -10  # TF32's spacing in [1, 2)
    x = torch.tensor([1 + ulp / 2, -(1 + ulp / 2), 1 + 1.5 * ulp, 1 + ulp / 2 - 2 ** -23, 2 - 2 ** -23, 1e-40,
                      float("inf"), -float("inf"), 3.4028234663852886e38])
    expected = [1 + ulp, -(1 + ulp), 1 + 2 * ulp, 1.0, 2.0, 9 * 2.0 ** -136, float("inf"), -float("inf"),
                float("inf")]
    assert round_tf32(x).tolist() == expected
    assert torch.isnan(round_tf32(torch.tensor([float("nan")]))).all()


def _ties(x):
    """x with its 13 bits below TF32's mantissa set to exactly half a TF32 ulp (a tie for every element)."""
    return ((x.view(torch.int32) & ~0x1FFF) | 0x1000).view(torch.float32)


def _round_even(x):
    """Ties rounded to even instead (cvt.rn), to show the emulation does not do that."""
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    up = (bits & 0x1FFF) + ((bits >> 13) & 1) > 0x1000
    out = (bits & 0xFFFFE000) + torch.where(up, 0x2000, 0)
    return torch.where(out >= 2 ** 31, out - 2 ** 32, out).to(torch.int32).view(torch.float32)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_persist_tf32_rounds_operands_like_cvt_rna(twin, kind):
    """h0 and W_hh all on exact ties: the emulated TF32 step must equal float64 on operands rounded away from
    zero (cvt.rna) to fp32 accumulation error, and be far from the results of rounding ties to even or of
    truncating (what the tensor cores do with unrounded fp32)."""
    torch.manual_seed(7)
    T, B, H = 1, 3, 33
    if kind == "lstm":
        gx, h0, c0, w_hh, _ = _lstm_inputs(T, B, H, None, torch.float32, "cpu")
        h0, w_hh = _ties(2 * h0), _ties(2 * w_hh)
        out = twin.lstm_persist_forward(gx, h0, c0, w_hh, None, None, False, False, None, None, 0, 0, 1.0, 0, 0,
                                        True)[:3]

        def ref(rounding):
            return reference.lstm_layer(gx.double(), rounding(h0).double(), c0.double(), rounding(w_hh).double())
    else:
        gx, h0, w_hh, b_hh = _gru_inputs(T, B, H, True, torch.float32, "cpu")
        h0, w_hh = _ties(2 * h0), _ties(2 * w_hh)
        out = twin.gru_persist_forward(gx, h0, w_hh, b_hh, None, False, False, None, None, 0, 0, 1.0, 0, 0, True)[:2]

        def ref(rounding):  # h0 enters the cell unrounded; only the product's operands are TF32
            gh = rounding(h0).double() @ rounding(w_hh).double().t() + b_hh.double()
            r, z = torch.sigmoid(gx[0, :, :2 * H].double() + gh[:, :2 * H]).chunk(2, dim=-1)
            n = torch.tanh(gx[0, :, 2 * H:].double() + r * gh[:, 2 * H:])
            h = (1 - z) * n + z * h0.double()
            return h[None], h

    def err(rounding):
        return max((o.double() - r).abs().max().item() for o, r in zip(out, ref(rounding)))

    exact, even = err(round_tf32), err(_round_even)
    truncated = err(lambda x: (x.view(torch.int32) & ~0x1FFF).view(torch.float32))
    assert exact <= 2e-6, exact
    assert even > 20 * exact and truncated > 20 * exact, (exact, even, truncated)


def _tf32_case(T, B, H, reverse=False, lengths=None, grid=0, regs=False):
    return _case(T, B, H, "fp32", reverse, lengths, grid, regs)


TF32_FORWARD_CASES = [
    _tf32_case(1, 1, 7),
    _tf32_case(4, 3, 7, reverse=True, lengths=[4, 1, 2]),
    _tf32_case(3, 17, 33, lengths=[3, 1, 2] * 5 + [1, 3]),
    _tf32_case(3, 3, 33, grid=5),  # 7 units per CTA: 28 LSTM / 21 GRU gate rows in 4 / 3 8-row tiles, K split 4
    _tf32_case(3, 3, 33, grid=33),  # one unit per CTA: one 8-row tile, K split over all 8 warps
    _tf32_case(2, 3, 129, reverse=True),
    _tf32_case(3, 5, 64, lengths=[3, 2, 1, 3, 3]),  # h staged 16 bytes at a time
    _tf32_case(2, 1, 1000),
    _tf32_case(4, 3, 33, regs=True, lengths=[4, 2, 3]),
]


def _tf32_forward(twin, kind, T, B, H, reverse, lens, grid, rd, zo, tf32):
    if kind == "lstm":
        gx, h0, c0, w_hh, _ = _lstm_inputs(T, B, H, None, torch.float32, "cpu")
        out = twin.lstm_persist_forward(gx, h0, c0, w_hh, None, lens, reverse, True, *_regs(rd, zo, B, H), grid, tf32)
        return out[:3], (gx, h0, c0, w_hh), reference.lstm_layer
    gx, h0, w_hh, b_hh = _gru_inputs(T, B, H, True, torch.float32, "cpu")
    out = twin.gru_persist_forward(gx, h0, w_hh, b_hh, lens, reverse, True, *_regs(rd, zo, B, H), grid, tf32)
    return out[:2], (gx, h0, w_hh, b_hh), reference.gru_layer


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("T,B,H,dtype,reverse,lengths,grid,regs", TF32_FORWARD_CASES)
def test_persist_tf32_forward_op_matches_reference(twin, kind, T, B, H, dtype, reverse, lengths, grid, regs):
    """fp32 with TF32 allowed: the outputs (poisoned first) against float64, within 2x PyTorch's own error
    when its products run in TF32 (fusenn.testing.tf32_products)."""
    torch.manual_seed(T * 1000 + B * 100 + H)
    lens = torch.tensor(lengths) if lengths else None
    rd, zo = ((0.3, 17), (0.25, 29)) if regs else (None, None)
    kw = dict(lengths=lens, reverse=reverse, recurrent_dropout=rd, zoneout=zo)
    with poisoned_outputs():
        out, inputs, layer = _tf32_forward(twin, kind, T, B, H, reverse, lens, grid, rd, zo, True)
    ref = layer(*[x.double() for x in inputs], **kw)
    with tf32_products():
        base = layer(*inputs, **kw)
    for o, r, b, name in zip(out, ref, base, ("y", "h_n", "c_n")):
        assert o.dtype == torch.float32
        assert_close(o, r, b, name=name)


def _check_layer_tf32(op, ref, inputs, upstream, names):
    """test_rnn_kernels._check_layer for the TF32 path: PyTorch's error is ref's in fp32 with its products
    (forward and backward) in TF32. Returns the op's outputs and gradients."""
    with poisoned_outputs():
        out, grads = _outputs_and_grads(op, inputs, upstream)
    ref_out, ref_grads = _outputs_and_grads(ref, [x.double() if x is not None else None for x in inputs], upstream)
    with tf32_products():
        base_out, base_grads = _outputs_and_grads(ref, inputs, upstream)
    for o, r, b, name in zip(out, ref_out, base_out, ("y", "h_n", "c_n")):
        assert_close(o, r, b, name=name)
    wrt = [name for name, x in zip(names, inputs) if x is not None]
    for g, r, b, name in zip(grads, ref_grads, base_grads, wrt):
        assert_close(g, r, b, factor=3.0, name=f"grad {name}")
    return out, grads


TF32_LAYER_CASES = [
    _layer_case(1, 1, 7),
    _layer_case(4, 3, 7, reverse=True, lengths=[4, 1, 2]),
    _layer_case(3, 17, 33, lengths=[3, 1, 2] * 5 + [1, 3], bias=False),
    _layer_case(2, 3, 129, reverse=True),
    _layer_case(1, 17, 129),
    _layer_case(2, 3, 300),  # backward stages K = 4H = 1200 (GRU 900) in chunks, TF32 both ways
    _layer_case(1, 1, 1000),  # 8 units per CTA: backward's 8 columns in one m16n8k8 tile, K split over 8 warps
    _layer_case(2, 3, 1024, reverse=True),  # LSTM backward: 8 x 4100 floats a CTA, where 16 x 4100 do not fit
    _layer_case(1, 3, 1136),  # LSTM: 12 units per CTA, 48 rows / 12 columns stored unpadded, h staged 64 at a time
]


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("T,B,H,dtype,reverse,lengths,bias", TF32_LAYER_CASES)
def test_persist_tf32_layer_and_gradients_match_reference(persistent, monkeypatch, kind, T, B, H, dtype, reverse,
                                                          lengths, bias):
    """Through fusenn.ops.rnn with torch.backends.cudnn.allow_tf32 on (torch's default): outputs within 2x and
    gradients within 3x PyTorch's own error with TF32 products."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    torch.manual_seed(T * 1000 + B * 100 + H)
    lens = torch.tensor(lengths) if lengths else None
    kw = dict(lengths=lens, reverse=reverse)
    if kind == "lstm":
        inputs = _lstm_inputs(T, B, H, None, dtype, "cpu")
        upstream = [torch.randn(T, B, H), torch.randn(B, H), torch.randn(B, H)]
        _check_layer_tf32(lambda *a: ops.lstm_layer(*a, **kw), lambda *a: reference.lstm_layer(*a, **kw), inputs,
                          upstream, ("gx", "h0", "c0", "w_hh", "w_hr"))
    else:
        inputs = _gru_inputs(T, B, H, bias, dtype, "cpu")
        upstream = [torch.randn(T, B, H), torch.randn(B, H)]
        _check_layer_tf32(lambda *a: ops.gru_layer(*a, **kw), lambda *a: reference.gru_layer(*a, **kw), inputs,
                          upstream, ("gx", "h0", "w_hh", "b_hh"))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_persist_tf32_backward_at_h1024_runs_on_tf32(twin, kind):
    """The backward op alone at H = 1024 with TF32 allowed computes other gradients than with it off (its
    products on TF32 operands, not exact FMA): the 8-row TF32 tiles are what the emulation ran. Both within
    their tolerance of the layer tests above; here the same forward states feed both."""
    torch.manual_seed(4)
    T, B, H = 2, 3, 1024
    dy, dh_n, dc_n = torch.randn(T, B, H), torch.randn(B, H), torch.randn(B, H)
    if kind == "lstm":
        gx, h0, c0, w_hh, _ = _lstm_inputs(T, B, H, None, torch.float32, "cpu")
        fwd = twin.lstm_persist_forward(gx, h0, c0, w_hh, None, None, False, True, None, None, 0, 0, 1.0, 0, 0, False)
        bwd = [twin.lstm_persist_backward(dy, dh_n, dc_n, gx, w_hh, None, None, False, fwd[3], fwd[4], None, None, 0, 0,
                                          1.0, 0, 0, tf32) for tf32 in (False, True)]
    else:
        gx, h0, w_hh, b_hh = _gru_inputs(T, B, H, True, torch.float32, "cpu")
        fwd = twin.gru_persist_forward(gx, h0, w_hh, b_hh, None, False, True, None, None, 0, 0, 1.0, 0, 0, False)
        bwd = [twin.gru_persist_backward(dy, dh_n, gx, w_hh, b_hh, None, False, fwd[2], None, None, 0, 0, 1.0, 0, 0,
                                         tf32) for tf32 in (False, True)]
    assert twin.persist_plan(4 if kind == "lstm" else 3, True, 4, H, 0, H200, 0, 0, True)[5]
    exact, tf32 = bwd[0][0], bwd[1][0]  # dgates of every step
    assert torch.equal(exact[-1], tf32[-1])  # the last step's dgates need no recurrent product
    scale = exact[0].abs().max().item()
    assert 1e-6 * scale < (exact[0] - tf32[0]).abs().max().item() < 1e-2 * scale


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_persist_allow_tf32_changes_the_products_and_both_paths_hold_their_tolerance(persistent, monkeypatch, kind):
    """The flag really switches the path: with it the outputs and gradients differ from the exact path's
    (by far more than fp32 rounding), each within its own tolerance, and the exact path within fp32's."""
    T, B, H = 3, 5, 129
    kw = dict(lengths=torch.tensor([3, 1, 2, 3, 3]), reverse=True, recurrent_dropout=(0.2, 5), zoneout=(0.1, 6))
    torch.manual_seed(11)
    if kind == "lstm":
        inputs = _lstm_inputs(T, B, H, None, torch.float32, "cpu")
        upstream = [torch.randn(T, B, H), torch.randn(B, H), torch.randn(B, H)]
        op, ref, names = ops.lstm_layer, reference.lstm_layer, ("gx", "h0", "c0", "w_hh", "w_hr")
    else:
        inputs = _gru_inputs(T, B, H, True, torch.float32, "cpu")
        upstream = [torch.randn(T, B, H), torch.randn(B, H)]
        op, ref, names = ops.gru_layer, reference.gru_layer, ("gx", "h0", "w_hh", "b_hh")
    layer, ref_layer = (lambda *a: op(*a, **kw)), (lambda *a: ref(*a, **kw))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    _check_layer(layer, ref_layer, inputs, upstream, names)
    with poisoned_outputs():
        exact = _outputs_and_grads(layer, inputs, upstream)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    tf32 = _check_layer_tf32(layer, ref_layer, inputs, upstream, names)
    ref64 = _outputs_and_grads(ref_layer, [x.double() if x is not None else None for x in inputs], upstream)
    for e, t, r in zip(exact[0] + exact[1], tf32[0] + tf32[1], ref64[0] + ref64[1]):
        if r.numel() == 0 or r.abs().max() == 0:
            continue
        assert (e - t).abs().max() > 1e-5, "TF32 on gives the exact path's results"
        assert (t.double() - r).abs().max() > 4 * (e.double() - r).abs().max()


def test_persist_tf32_follows_torchs_rnn_precision_flag(persistent, monkeypatch):
    """torch's per-operator flag for cuDNN RNNs decides too, and a mix of it with the legacy flag (where reading
    allow_tf32 raises) is read as torch's RNNs read it."""
    torch.manual_seed(12)
    inputs = _lstm_inputs(3, 3, 33, None, torch.float32, "cpu")
    exact = ops.lstm_layer(*inputs)[0]
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    tf32 = ops.lstm_layer(*inputs)[0]
    assert not torch.equal(exact, tf32)
    if not hasattr(torch.backends.cudnn, "rnn") or not hasattr(torch.backends.cudnn.rnn, "fp32_precision"):
        return  # older torch: allow_tf32 is the only flag
    # saved and restored by hand: monkeypatch cannot undo these properties on every torch (2.14's conv one)
    rnn, conv = torch.backends.cudnn.rnn, torch.backends.cudnn.conv
    saved = rnn.fp32_precision, conv.fp32_precision
    try:
        rnn.fp32_precision = "ieee"
        assert torch.equal(ops.lstm_layer(*inputs)[0], exact)
        rnn.fp32_precision = "tf32"
        conv.fp32_precision = "ieee"  # now allow_tf32 itself raises
        assert torch.equal(ops.lstm_layer(*inputs)[0], tf32)
    finally:
        rnn.fp32_precision, conv.fp32_precision = saved


def _tf32_smem(N, K, grid):
    """Dynamic shared memory of a CTA's TF32 layout (csrc/rnn_persist.cuh's Layout) for N weight rows over K:
    the products' rows padded to Np (8-row mma.sync m16n8k8 tiles), K to 16; the slice N x (Kp + 4) floats (the
    padding rows' fragments are zeros, not shared memory), the staged chunk 16 x (chunk + 4), the warps' partial
    sums splits x 16 x Np, each 128-byte aligned; the widest chunk (1024, 512, else 256, or narrower down to 64
    where the slice needs the room) with which `grid` CTAs stay co-resident on an H200 (registers and static
    shared memory unknown)."""
    up = lambda x, m: -(-x // m) * m  # noqa: E731
    Np, Kp = up(N, 8), up(K, 16)
    tiles = up(Np, 16) // 16  # the warps' 16-column items
    splits = 8 // tiles if tiles < 8 else 1
    for chunk in (1024, 512, 256, 128, 64):
        smem = up(N * (Kp + 4) * 4, 128) + up(16 * (min(Kp, chunk) + 4) * 4, 128) + splits * 16 * Np * 4
        per_sm = min(8, H200[2] // (smem + 1024))
        if (chunk == 256 and smem <= H200[1]) or chunk == 64 or (smem <= H200[1] and per_sm * H200[0] >= grid):
            return smem


def test_persist_tf32_plan_pads_the_slice_to_8_rows_and_keeps_exact_fma_where_that_does_not_fit(twin):
    """The plan accounts for TF32's layout exactly (gate rows / columns padded to mma.sync m16n8k8's 8-row
    tiles in the products, not in shared memory; rows 16 bytes apart) and takes TF32 wherever that launches,
    else the exact layout; 16-bit layers ignore the flag."""
    def plan(gates, backward, elem, H, grid=0, tf32=True):
        return twin.persist_plan(gates, backward, elem, H, grid, H200, 0, 0, tf32)[:6]

    # LSTM backward at H = 1024 on 128 CTAs: 8 columns over K = 4096 fit in an 8-row tile (8 x 4100 floats, with a
    # 1024-wide staged chunk: 201088 bytes), where a 16-row one (16 x 4100 floats) would exceed a CTA's 227 KiB
    grid, units, smem, per_sm, why, took = plan(4, True, 4, 1024)
    assert (grid, units, why, took) == (128, 8, "", True) and smem == _tf32_smem(8, 4096, 128) == 201088
    assert 16 * 4100 * 4 > H200[1] and per_sm * H200[0] >= grid
    exact = plan(4, True, 4, 1024, tf32=False)
    assert exact[:2] == (128, 8) and exact[4] == "" and not exact[5] and exact[2] != smem
    # every fp32 layer of these sizes takes TF32 both ways, with exactly that layout's bytes
    for gates, backward, H, grid_req in [(4, True, 512, 0), (3, True, 1024, 0), (4, False, 1024, 0),
                                         (3, False, 1024, 0), (4, False, 512, 0), (4, True, 1000, 0),
                                         (3, True, 1000, 0), (4, True, 33, 33), (3, True, 33, 5), (3, False, 33, 5),
                                         (4, False, 129, 0), (3, True, 129, 0)]:
        g, units, smem, _, why, took = plan(gates, backward, 4, H, grid_req)
        N, K = (units, gates * H) if backward else (gates * units, H)
        assert why == "" and took, (gates, backward, H, why)
        assert smem == _tf32_smem(N, K, g), (gates, backward, H, smem, _tf32_smem(N, K, g))
    # one unit per CTA (backward: 1 column over K = 132, padded to 144): one row in shared memory, one 8-row
    # tile in the products, K split 8 ways
    assert plan(4, True, 4, 33, grid=33)[2] == 640 + 16 * 148 * 4 + 8 * 16 * 8 * 4
    # GRU backward at H = 1200 (12 columns on 100 CTAs): 12 rows of 3604 floats fit; 16 would not, even staging
    # 64 columns at a time
    g, units, smem, _, why, took = plan(3, True, 4, 1200)
    assert (g, units, why, took) == (100, 12, "", True) and smem == _tf32_smem(12, 3600, 100)
    assert 16 * 3604 * 4 + 16 * 68 * 4 + 8 * 16 * 16 * 4 > H200[1] - 128 >= smem
    # LSTM at H = 1136 (12 units on 95 CTAs) stages 64 columns at a time both ways
    for backward, N, K in [(False, 48, 1136), (True, 12, 4544)]:
        g, units, smem, _, why, took = plan(4, backward, 4, 1136)
        assert (g, units, why, took) == (95, 12, "", True) and smem == _tf32_smem(N, K, 95)
        assert smem - 16 * 68 * 4 + 16 * 132 * 4 > H200[1]  # a 128-wide chunk would not fit
    # 65 units per CTA: 260 gate rows, past the 128 the MMA warps cover: exact FMA
    assert not plan(4, False, 4, 129, grid=2)[5] and plan(4, False, 4, 129, grid=2)[4] == ""
    # just below the exact layout's limit (the kernels' 128 bytes of static shared memory) TF32's does not fit
    # (csrc/rnn_persist.cuh's plan names the ranges): exact FMA
    for gates, H in [(4, 1160), (3, 1560)]:
        grid, units, smem, _, why, took = twin.persist_plan(gates, True, 4, H, 0, H200, 0, 128, True)[:6]
        assert why == "" and not took and smem + 128 <= H200[1]
    assert not plan(4, False, 2, 512)[5]


def test_persist_tf32_falls_back_to_exact_bit_for_bit(twin):
    """Where TF32's layout cannot launch (here 65 units per CTA) the op computes exactly what it does with
    TF32 off."""
    torch.manual_seed(2)
    gx, h0, c0, w_hh, _ = _lstm_inputs(2, 3, 129, None, torch.float32, "cpu")
    args = (gx, h0, c0, w_hh, None, None, False, True, None, None, 0, 0, 1.0, 0, 2)
    for a, b in zip(twin.lstm_persist_forward(*args, True), twin.lstm_persist_forward(*args, False)):
        assert torch.equal(a, b)
    assert not torch.equal(twin.lstm_persist_forward(*args[:-1], 0, True)[0], twin.lstm_persist_forward(*args)[0])


# ---- proj_size: the LSTM's projection, a second grid-wide phase per step ----

def _proj_case(T, B, H, P, dtype="fp32", reverse=False, lengths=None, grid=0, regs=False, tf32=False):
    parts = [f"T{T}", f"B{B}", f"H{H}", f"P{P}", dtype] + (["reverse"] if reverse else [])
    parts += (["packed"] if lengths else []) + ([f"grid{grid}"] if grid else []) + (["regs"] if regs else [])
    return pytest.param(T, B, H, P, DTYPES[dtype], reverse, lengths, grid, regs, tf32,
                        id="-".join(parts + (["tf32"] if tf32 else [])))


PROJ_FORWARD_CASES = [
    _proj_case(1, 1, 7, 3),
    _proj_case(4, 3, 7, 5, reverse=True, lengths=[4, 1, 2]),
    _proj_case(3, 17, 33, 17, lengths=[3, 1, 2] * 5 + [1, 3]),
    _proj_case(3, 3, 33, 32, grid=5),  # 7 units and 7 of h's columns per CTA
    _proj_case(3, 3, 33, 5, grid=33),  # 28 CTAs own none of h's 5 columns
    _proj_case(2, 3, 129, 64, reverse=True),
    _proj_case(2, 1, 1000, 500),
    _proj_case(4, 3, 33, 17, regs=True, lengths=[4, 2, 3]),
    _proj_case(3, 3, 33, 17, "fp16", lengths=[3, 1, 2]),
    _proj_case(2, 17, 129, 64, "bf16", reverse=True, regs=True),
    _proj_case(2, 3, 33, 16, "bf16", grid=33),  # K = P = 16: operands staged 16 bytes at a time
    _proj_case(3, 5, 129, 40, tf32=True, lengths=[3, 2, 1, 3, 3]),
    _proj_case(2, 3, 33, 17, grid=5, tf32=True),
    _proj_case(0, 3, 7, 3),
    _proj_case(4, 0, 7, 3),
]


@pytest.mark.parametrize("T,B,H,P,dtype,reverse,lengths,grid,regs,tf32", PROJ_FORWARD_CASES)
def test_persist_proj_forward_op_matches_reference(twin, T, B, H, P, dtype, reverse, lengths, grid, regs, tf32):
    """With w_hr (P < H): y, h_n, c_n (poisoned first) and the saved m_t against float64, within 2x PyTorch's
    own error in the dtype (with its products in TF32 on the TF32 path)."""
    torch.manual_seed(T * 1000 + B * 100 + H + P)
    lens = torch.tensor(lengths) if lengths else None
    rd, zo = ((0.3, 17), (0.25, 29)) if regs else (None, None)
    kw = dict(lengths=lens, reverse=reverse, recurrent_dropout=rd, zoneout=zo)
    gx, h0, c0, w_hh, w_hr = _lstm_inputs(T, B, H, P, dtype, "cpu")
    with poisoned_outputs():
        out = twin.lstm_persist_forward(gx, h0, c0, w_hh, w_hr, lens, reverse, True, *_regs(rd, zo, B, P), grid, tf32)
    ref = reference.lstm_layer(gx.double(), h0.double(), c0.double(), w_hh.double(), w_hr.double(), **kw)
    if tf32:
        with tf32_products():
            base = reference.lstm_layer(gx, h0, c0, w_hh, w_hr, **kw)
    else:
        base = reference.lstm_layer(gx, h0, c0, w_hh, w_hr, **kw)
    for o, r, b, name in zip(out, ref, base, ("y", "h_n", "c_n")):
        assert o.dtype == dtype and o.shape == r.shape
        assert_close(o, r, b, name=name)
    # m_t = o tanh(c_t) of every step, what grad W_hr needs: the same as the stepwise C++ layer's up to rounding
    step = twin.lstm_forward(gx, h0, c0, w_hh, w_hr, lens, reverse, True, *_regs(rd, zo, B, P))
    assert out[5].shape == (T, B, H)
    assert_close(out[5], step[5].double(), atol={torch.float32: 1e-3 if tf32 else 1e-5}.get(dtype, 0.05), name="ms")


PROJ_LAYER_CASES = [
    _proj_case(1, 1, 7, 3),
    _proj_case(4, 3, 7, 5, reverse=True, lengths=[4, 1, 2]),
    _proj_case(3, 17, 33, 17, lengths=[3, 1, 2] * 5 + [1, 3]),
    _proj_case(3, 3, 33, 32),
    _proj_case(2, 3, 129, 64, reverse=True),
    _proj_case(1, 17, 129, 100),
    _proj_case(3, 3, 33, 17, "fp16", lengths=[3, 1, 2]),
    _proj_case(2, 3, 33, 17, "bf16", reverse=True),
    _proj_case(2, 3, 129, 64, tf32=True, lengths=[2, 1, 2]),
]


@pytest.mark.parametrize("T,B,H,P,dtype,reverse,lengths,grid,regs,tf32", PROJ_LAYER_CASES)
def test_persist_proj_layer_and_gradients_match_reference(persistent, monkeypatch, T, B, H, P, dtype, reverse,
                                                          lengths, grid, regs, tf32):
    """Forward and backward with a projection through fusenn.ops.rnn (grad W_hr one GEMM of the kernel's dhs
    and ms) against float64: outputs within 2x, gradients within 3x PyTorch's own error."""
    assert grid == 0 and not regs  # the layers take the plan's grid; regularisers: the test below
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    torch.manual_seed(T * 1000 + B * 100 + H + P)
    inputs = _lstm_inputs(T, B, H, P, dtype, "cpu")
    upstream = [torch.randn(T, B, P), torch.randn(B, P), torch.randn(B, H)]
    kw = dict(lengths=torch.tensor(lengths) if lengths else None, reverse=reverse)
    check = _check_layer_tf32 if tf32 else _check_layer
    check(lambda *a: ops.lstm_layer(*a, **kw), lambda *a: reference.lstm_layer(*a, **kw), inputs, upstream,
          ("gx", "h0", "c0", "w_hh", "w_hr"))


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_persist_proj_regularisers_and_gradients_match_reference(persistent, reverse):
    """Recurrent dropout on h (P wide) and sampled zoneout on h and c with a projection: the reference's masks."""
    torch.manual_seed(3)
    T, B, H, P = 4, 3, 33, 17
    regs = dict(recurrent_dropout=(0.3, 17), zoneout=(0.25, 29), lengths=torch.tensor([4, 2, 3]), reverse=reverse)
    inputs = _lstm_inputs(T, B, H, P, torch.float32, "cpu")
    upstream = [torch.randn(T, B, P), torch.randn(B, P), torch.randn(B, H)]
    _check_layer(lambda *a: ops.lstm_layer(*a, **regs), lambda *a: reference.lstm_layer(*a, **regs), inputs,
                 upstream, ("gx", "h0", "c0", "w_hh", "w_hr"))


def test_persist_proj_partition_does_not_change_a_bit(twin):
    """fp32 exact with a projection: every product is one CTA's dot in k order whatever the partition, so 2, 3,
    5, the plan's and one CTA per unit (most owning none of h's columns) agree bit for bit, forward and backward;
    and the backward's results are the stepwise C++ layer's up to fp32 rounding."""
    torch.manual_seed(1)
    T, B, H, P = 3, 5, 33, 12
    lens = torch.tensor([3, 1, 2, 3, 2])
    regs = _regs((0.2, 5), (0.3, 7), B, P)
    gx, h0, c0, w_hh, w_hr = _lstm_inputs(T, B, H, P, torch.float32, "cpu")
    dy, dh, dc = torch.randn(T, B, P), torch.randn(B, P), torch.randn(B, H)
    results = []
    for grid in (2, 3, 5, 0, H):
        fwd = twin.lstm_persist_forward(gx, h0, c0, w_hh, w_hr, lens, True, True, *regs, grid)
        bwd = twin.lstm_persist_backward(dy, dh, dc, gx, w_hh, w_hr, lens, True, fwd[3], fwd[4], *regs, grid)
        results.append(list(fwd) + list(bwd))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    fwd = twin.lstm_forward(gx, h0, c0, w_hh, w_hr, lens, True, True, *regs)
    bwd = twin.lstm_backward(dy, dh, dc, gx, w_hh, w_hr, lens, True, fwd[3], fwd[4], *regs)
    for a, b in zip(results[0][6:], bwd):
        assert_close(a, b.double(), atol=1e-5, name="backward")


def test_persist_proj_plan_keeps_both_slices(twin):
    """With a projection each CTA keeps its W_hh slice over K = P and its W_hr slice (forward: V rows over H;
    backward: V columns of W_hh over 4H and U columns of W_hr over P), sharing staging and partial sums."""
    def plan(backward, elem, H, P, grid=0, tf32=False):
        return twin.persist_plan(4, backward, elem, H, grid, H200, 0, 0, tf32, P)[:6]

    for elem in (2, 4):
        for backward in (False, True):
            g, units, smem, per_sm, why, _ = plan(backward, elem, 1024, 512)
            assert why == "" and g == 128 and units == 8 and per_sm >= 1
            # the two slices at least (forward: 32 x 512 and 4 x 1024; backward: 4 x 4096 and 8 x 512, unpadded)
            assert smem >= elem * (32 * 512 + 4 * 1024 if not backward else 4 * 4096 + 8 * 512)
    # a projection of the W_hh slice shrinks it: P = 256 of H = 1024 needs less than P = 1000
    assert plan(False, 2, 1024, 256)[2] < plan(False, 2, 1024, 1000)[2]
    with pytest.raises(RuntimeError, match=r"P \(proj_size, 0: none\) must be in \[0, H\)"):
        plan(False, 2, 64, 64)
    with pytest.raises(RuntimeError, match="only the LSTM has a projection"):
        twin.persist_plan(3, False, 2, 64, 0, H200, 0, 0, False, 32)


# ---- races: what running each phase's CTAs in turn would hide (csrc/rnn_host.cpp, EmulatedGrid) ----
# On the GPU the CTAs between two grid barriers run at once: none may read what another writes there, nor two write
# one element. FUSENN_PERSIST_EMULATION runs them in other orders, or each against the buffers as the last barrier
# left them (raising where two write one byte), or each CTA as 8 host threads taking turns between its
# __syncthreads, or with its staging memory poisoned; a race changes the results, which must stay bit for bit the
# same.

def _race_case(kind, T, B, H, P=0, dtype="fp32", reverse=False, lengths=None, regs=False, grid=0):
    tf32 = dtype == "tf32"
    case = dict(kind=kind, T=T, B=B, H=H, P=P, dtype=torch.float32 if tf32 else DTYPES[dtype], tf32=tf32,
                reverse=reverse, lengths=lengths, regs=regs, grid=grid)
    parts = [kind, f"T{T}", f"B{B}", f"H{H}"] + ([f"P{P}"] if P else []) + [dtype] + (["reverse"] if reverse else [])
    parts += (["packed"] if lengths else []) + (["regs"] if regs else []) + ([f"grid{grid}"] if grid else [])
    return pytest.param(case, id="-".join(parts))


RACE_CASES = [
    _race_case("lstm", 4, 3, 33, reverse=True, lengths=[4, 1, 3], regs=True, grid=5),
    _race_case("gru", 4, 3, 33, reverse=True, lengths=[4, 1, 3], regs=True, grid=5),
    _race_case("lstm", 3, 17, 129, dtype="tf32", lengths=[3, 1, 2] * 5 + [1, 3], regs=True),
    _race_case("gru", 3, 17, 129, dtype="tf32", lengths=[3, 1, 2] * 5 + [1, 3], regs=True),
    _race_case("lstm", 2, 3, 129, dtype="bf16", reverse=True),
    _race_case("gru", 2, 3, 129, dtype="bf16", reverse=True, regs=True),
    _race_case("lstm", 1, 1, 7, dtype="fp16"),
    _race_case("gru", 1, 1, 7, dtype="fp16"),
    _race_case("lstm", 3, 3, 33, grid=33),  # one unit per CTA
    _race_case("gru", 3, 3, 33, dtype="bf16", grid=33),
    _race_case("lstm", 4, 3, 33, P=17, reverse=True, lengths=[4, 1, 3], regs=True, grid=5),
    _race_case("lstm", 3, 17, 129, P=64, dtype="tf32", lengths=[3, 1, 2] * 5 + [1, 3], regs=True),
    _race_case("lstm", 2, 3, 33, P=16, dtype="fp16", grid=33),  # most CTAs own none of h's columns
    _race_case("lstm", 3, 3, 129, P=40, dtype="bf16", reverse=True, regs=True),
    _race_case("gru", 2, 40, 33, dtype="tf32", lengths=[2, 1] * 20, regs=True, grid=5),  # 3 batch tiles a round
    _race_case("lstm", 2, 40, 33, P=17, dtype="bf16", reverse=True, grid=5),
]


def _race_inputs(case, device=torch.device("cpu")):
    torch.manual_seed(case["T"] * 1000 + case["B"] * 100 + case["H"] + case["P"])
    T, B, H, P, dt = case["T"], case["B"], case["H"], case["P"], case["dtype"]
    width = P or H
    rd, zo = ((0.3, 17), (0.25, 29)) if case["regs"] else (None, None)
    inputs = _lstm_inputs(T, B, H, P or None, dt, "cpu") if case["kind"] == "lstm" else _gru_inputs(T, B, H, True, dt,
                                                                                                     "cpu")
    upstream = [torch.randn(T, B, width).to(dt), torch.randn(B, width), torch.randn(B, H)]
    inputs, upstream = [[x.to(device) if x is not None else None for x in xs] for xs in (inputs, upstream)]
    return inputs, upstream, _regs(rd, zo, B, width, device)


def _race_forward(twin, case, inputs, regs, save, grid=None, tiles=0):
    lens = torch.tensor(case["lengths"], device=inputs[0].device) if case["lengths"] else None
    tail = (lens, case["reverse"], save, *regs, case["grid"] if grid is None else grid, case["tf32"], tiles)
    if case["kind"] == "lstm":
        return list(twin.lstm_persist_forward(*inputs, *tail))
    return list(twin.gru_persist_forward(*inputs, *tail))


def _race_backward(twin, case, inputs, upstream, regs, fwd, grid=None, tiles=0):
    lens = torch.tensor(case["lengths"], device=inputs[0].device) if case["lengths"] else None
    dy, dh, dc = upstream
    tail = (lens, case["reverse"])
    end = (*regs, case["grid"] if grid is None else grid, case["tf32"], tiles)
    if case["kind"] == "lstm":
        gx, _, _, w_hh, w_hr = inputs
        return list(twin.lstm_persist_backward(dy, dh, dc, gx, w_hh, w_hr, *tail, fwd[3], fwd[4], *end))
    gx, _, w_hh, b_hh = inputs
    return list(twin.gru_persist_backward(dy, dh, gx, w_hh, b_hh, *tail, fwd[2], *end))


def _race_results(twin, monkeypatch, case, forward_mode, backward_mode=None):
    """Forward (every state saved, and inference's two slots) and backward under FUSENN_PERSIST_EMULATION."""
    inputs, upstream, regs = _race_inputs(case)
    monkeypatch.setenv("FUSENN_PERSIST_EMULATION", forward_mode)
    fwd = _race_forward(twin, case, inputs, regs, True)
    fwd_two_slots = _race_forward(twin, case, inputs, regs, False)[:3]
    monkeypatch.setenv("FUSENN_PERSIST_EMULATION", forward_mode if backward_mode is None else backward_mode)
    bwd = _race_backward(twin, case, inputs, upstream, regs, fwd)
    return dict(forward=fwd + fwd_two_slots, backward=bwd)


def _same_bits(xs, ys):
    return len(xs) == len(ys) and all(x.shape == y.shape and torch.equal(x.flatten().view(torch.uint8),
                                                                         y.flatten().view(torch.uint8))
                                      for x, y in zip(xs, ys))


@pytest.mark.parametrize("case", RACE_CASES)
def test_persist_emulated_grid_has_no_race(twin, monkeypatch, case):
    """Every phase's CTAs in reverse and two shuffled orders, and each against the last barrier's buffers (with and
    without a shuffle), and each CTA's threads in turns between its __syncthreads (reversed, shuffled), some with
    the staging memory NaN before each CTA's share: forward and backward results bit for bit the plain emulation's,
    no two CTAs writing one byte in a phase, every thread of a CTA reaching the same __syncthreads."""
    plain = _race_results(twin, monkeypatch, case, "")
    for mode in ("reverse poison", "shuffle=1", "shuffle=2", "snapshot", "snapshot shuffle=3", "threads reverse",
                 "threads snapshot shuffle=4 poison"):
        got = _race_results(twin, monkeypatch, case, mode)
        for direction in ("forward", "backward"):
            assert _same_bits(plain[direction], got[direction]), f"{direction} under {mode!r}"


# Batch tiles a staging round (rnn_persist.cuh Plan::tiles): each weight operand read from shared memory serves up
# to 4 tiles of 16 batch rows. Every product's sums keep their order whatever the round holds, so any number of
# tiles gives the same bits as one; B = 80 takes rounds of 4 tiles and of 1, B = 40 one round of 3 whose last tile
# holds 8 rows.
TILE_CASES = [
    _race_case("lstm", 3, 80, 33, reverse=True, lengths=[3, 1, 2, 3] * 20, grid=5),
    _race_case("gru", 3, 40, 33, lengths=[3, 1, 2, 3] * 10, grid=5),
    _race_case("lstm", 2, 40, 33, dtype="tf32", grid=5),
    _race_case("gru", 2, 80, 33, dtype="tf32", reverse=True, lengths=[2, 1] * 40, grid=5),
    _race_case("lstm", 2, 40, 129, dtype="bf16", reverse=True, lengths=[2, 1] * 20, grid=5),
    _race_case("gru", 2, 80, 33, dtype="fp16", grid=5),
    _race_case("lstm", 2, 40, 33, P=17, dtype="fp32", lengths=[2, 1] * 20, grid=5),
    _race_case("lstm", 2, 80, 33, P=17, dtype="tf32", grid=5),
    _race_case("lstm", 2, 40, 33, P=16, dtype="bf16", reverse=True, grid=5),
]


@pytest.mark.parametrize("case", TILE_CASES)
def test_persist_batch_tiles_change_no_bit(twin, case):
    """The op with the plan's batch tiles a round (more than one here, forward and backward), and with at most 2
    or 3, gives bit for bit what one tile a round gives, on the same grid and staged chunk: outputs, states and
    gradients (lengths and reverse included; the regularisers' masks, drawn by batch row, in the reference tests)."""
    gates, elem = (4 if case["kind"] == "lstm" else 3), case["dtype"].itemsize
    for backward in (False, True):
        args = (gates, backward, elem, case["H"], case["grid"], H200, 0, 0, case["tf32"], case["P"], case["B"])
        planned, capped = twin.persist_plan(*args), twin.persist_plan(*args, 1)
        assert planned[7] == min(4, -(-case["B"] // 16)) and capped[7] == 1, (backward, planned, capped)
        assert planned[:2] == capped[:2] and planned[5] == capped[5] == case["tf32"]
        assert capped[2] < planned[2]  # one tile's staging and partial sums: less shared memory
    inputs, upstream, regs = _race_inputs(case)
    results = {}
    for tiles in (1, 0, 2, 3):
        fwd = _race_forward(twin, case, inputs, regs, True, tiles=tiles)
        results[tiles] = fwd + _race_backward(twin, case, inputs, upstream, regs, fwd, tiles=tiles)
        assert all(bool(torch.isfinite(x).all()) for x in results[tiles] if x.numel())
    for tiles in (0, 2, 3):
        assert _same_bits(results[1], results[tiles]), f"tiles={tiles}"
    with pytest.raises(RuntimeError, match="tiles must be non-negative, got -1"):
        _race_forward(twin, case, inputs, regs, True, tiles=-1)


def test_persist_plan_takes_batch_tiles_where_the_batch_has_them(twin):
    """Without the batch, or with one tile's worth, the plan stages one tile a round; with more, up to 4 where they
    fit beside the slice (shared memory and co-residency as for one), the cost model's fewest nanoseconds; the cap
    keeps the grid and chunk and lowers only the tiles (and the staging and partial sums' bytes)."""
    for gates, backward, elem, H, tf32 in [(4, False, 2, 1024, False), (4, True, 2, 1024, False),
                                           (3, True, 4, 1024, True), (4, False, 4, 512, False)]:
        def plan(B, tiles=0, gates=gates, backward=backward, elem=elem, H=H, tf32=tf32):
            return twin.persist_plan(gates, backward, elem, H, 0, H200, 0, 128, tf32, 0, B, tiles)

        assert plan(0)[7] == plan(1)[7] == plan(16)[7] == 1
        for B, most in [(17, 2), (48, 3), (64, 4), (256, 4)]:
            p = plan(B)
            assert p[4] == "" and 1 < p[7] <= most, (gates, backward, H, B, p)
            assert p[2] + 128 <= H200[1] and p[3] * H200[0] >= p[0]
            one = plan(B, 1)
            assert one[7] == 1 and one[:2] == p[:2] and one[2] < p[2] and one[6] > p[6], (B, p, one)
    with pytest.raises(RuntimeError, match="tiles .* must be non-negative"):
        twin.persist_plan(4, True, 2, 512, 0, H200, 0, 0, False, 0, 64, -1)


def _barriers(P, T, direction):
    """The grid barriers of one launch (csrc/rnn_persist.cu): forward one between steps (with a projection two a
    step but the last); backward one a step (two with a projection)."""
    per_step = 2 if P else 1
    return per_step * T - (1 if direction == "forward" else 0)


@pytest.mark.parametrize("case", [_race_case("lstm", 3, 3, 33, lengths=[3, 1, 2], regs=True, grid=5),
                                  _race_case("gru", 3, 3, 33, lengths=[3, 1, 2], regs=True, grid=5),
                                  _race_case("lstm", 3, 3, 33, P=17, lengths=[3, 1, 2], regs=True, grid=5),
                                  _race_case("lstm", 2, 3, 33, P=16, dtype="bf16", grid=5)])
def test_persist_emulation_sees_any_missing_barrier(twin, monkeypatch, case):
    """The checks above can fail: with any one of the kernels' grid barriers left out (drop=N) the reversed order and
    the snapshot give other results than the plain order, forward and backward. So every barrier is needed, and
    a race across CTAs within a phase would show."""
    for direction in ("forward", "backward"):
        def run(mode):
            if direction == "forward":
                return _race_results(twin, monkeypatch, case, mode, "")[direction]
            return _race_results(twin, monkeypatch, case, "", mode)[direction]

        count = _barriers(case["P"], case["T"], direction)
        assert count >= 1
        for n in range(1, count + 1):
            racy = run(f"drop={n}")
            assert not _same_bits(racy, run(f"drop={n} reverse")), f"{direction}: barrier {n} of {count}, reverse"
            assert not _same_bits(racy, run(f"drop={n} snapshot")), f"{direction}: barrier {n} of {count}, snapshot"
        # and a barrier past the last is no barrier: nothing changes
        assert _same_bits(run(f"drop={count + 1}"), run(""))


@pytest.mark.parametrize("case", [_race_case("lstm", 2, 3, 33, grid=5), _race_case("gru", 2, 3, 33, dtype="tf32"),
                                  _race_case("lstm", 2, 17, 33, P=17, dtype="bf16", grid=5)])
def test_persist_emulation_sees_a_missing_syncthreads(twin, monkeypatch, case):
    """The thread check can fail: without the __syncthreads between staging an operand and the products (the 2nd
    of each share: nosync=2), or the one after the products (3rd), the threads in turns give other results, forward
    and backward; a thread that skips one (diverge=2: thread 0's 2nd) raises."""
    plain = _race_results(twin, monkeypatch, case, "")
    for n in (2, 3):
        for direction in ("forward", "backward"):
            racy = [_race_results(twin, monkeypatch, case, f"threads{order} nosync={n}")[direction]
                    for order in ("", " reverse")]
            assert not all(_same_bits(plain[direction], r) for r in racy), f"{direction}: __syncthreads {n}"
    with pytest.raises(RuntimeError, match="the threads of CTA 0 reach different numbers of __syncthreads after grid "
                                           "barrier 0"):
        _race_results(twin, monkeypatch, case, "threads diverge=2")


@pytest.mark.parametrize("case", [_race_case("lstm", 2, 3, 33, grid=5), _race_case("gru", 2, 3, 33, grid=5),
                                  _race_case("lstm", 2, 3, 33, P=17, grid=5)])
def test_persist_emulation_snapshot_refuses_two_writers(twin, monkeypatch, case):
    """The snapshot mode raises where two CTAs write one element between two barriers (twice=C: CTA C's share run
    a second time, as if another CTA owned its slice), forward and backward."""
    with pytest.raises(RuntimeError, match=r"CTAs 2 and 2 both write \w+\[\d+\] after grid barrier 0 "):
        _race_results(twin, monkeypatch, case, "snapshot twice=2")
    with pytest.raises(RuntimeError, match=r"CTAs 1 and 1 both write \w+\[\d+\] after grid barrier 0 "):
        _race_results(twin, monkeypatch, case, "", "snapshot twice=1")
    with pytest.raises(RuntimeError, match="FUSENN_PERSIST_EMULATION: unknown word 'shuffle'"):
        _race_results(twin, monkeypatch, case, "snapshot shuffle")
    with pytest.raises(RuntimeError, match="twice=99 names no CTA of the grid's 5"):
        _race_results(twin, monkeypatch, case, "snapshot twice=99")


@pytest.mark.parametrize("case", [_race_case("lstm", 2, 3, 33, grid=5), _race_case("gru", 2, 3, 33, grid=5),
                                  _race_case("lstm", 2, 3, 33, P=17, grid=5)])
def test_persist_emulation_poison_shows_a_read_of_unstaged_memory(twin, monkeypatch, case):
    """unstaged=1 leaves batch row 1 of every staged tile unwritten (an off-by-one bound): the products then read
    what the staging buffer held before, finite and wrong, which nothing else flags; with poison that memory is
    NaN first, so the bug shows in the results, forward and backward."""
    plain = _race_results(twin, monkeypatch, case, "")
    for phase in ("forward", "backward"):  # the backward's from the plain forward: its own staging alone planted
        modes = [(m,) if phase == "forward" else ("", m) for m in ("unstaged=1", "poison unstaged=1")]
        silent, loud = (_race_results(twin, monkeypatch, case, *m) for m in modes)
        assert all(bool(torch.isfinite(x).all()) for x in plain[phase] + silent[phase])
        assert not _same_bits(plain[phase], silent[phase]), phase
        assert any(bool(torch.isnan(x).any()) for x in loud[phase]), phase
    with pytest.raises(RuntimeError, match="unstaged=16 names no row of a 16-row tile"):
        _race_results(twin, monkeypatch, case, "unstaged=16")


# ---- static: the kernels compiled for sm_90a, ptxas's numbers against the launcher's plan ----

def _ptxas_report():
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    run = subprocess.run([nvcc, "-std=c++17", "-O3", "-arch=sm_90a", f"-I{CSRC}", "-Xptxas", "-v", "-c",
                          os.path.join(CSRC, "rnn_persist.cu"), "-o", os.devnull], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    kernels, current = {}, None
    for line in run.stderr.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = m.group(1)
            kernels[current] = {}
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current:
            kernels[current]["spills"] = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers.*?(\d+) bytes smem", line)
        if m and current:
            kernels[current].update(regs=int(m.group(1)), smem=int(m.group(2)))
    return kernels


def _cuobjdump():
    """cuobjdump: the CUDA toolkit's, else the copy Triton ships (every Triton wheel for NVIDIA has one)."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


@pytest.fixture(scope="module")
def persist_sass(tmp_path_factory):
    """The SASS (sm_90a) of the persistent forward and backward kernels, by kernel name."""
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    dump = _cuobjdump()
    if nvcc is None or dump is None:
        pytest.skip("nvcc or cuobjdump is not installed")
    obj = tmp_path_factory.mktemp("sass") / "rnn_persist.o"
    run = subprocess.run([nvcc, "-std=c++17", "-O3", "-arch=sm_90a", f"-I{CSRC}", "-c",
                          os.path.join(CSRC, "rnn_persist.cu"), "-o", str(obj)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    sass = subprocess.run([dump, "-sass", str(obj)], capture_output=True, text=True)
    assert sass.returncode == 0, sass.stderr[-2000:]
    kernels = re.split(r"Function : (\S+)", sass.stdout)[1:]
    found = {name: body for name, body in zip(kernels[::2], kernels[1::2])
             if "persist_forward_kernel" in name or "persist_backward_kernel" in name}
    assert len(found) == 6, list(found)
    return found


def test_persist_staging_keeps_its_loads_in_flight_together(persist_sass):
    """In SASS (sm_90a) every staging loop of the persistent kernels issues its 16-byte loads of h_{t-1} / dgates
    eight at a time before their shared-memory stores (csrc/rnn_persist.cuh stage, kStageLoads), so a staging
    round waits out one L2 round trip, not one a load: runs of LDG.E.128 between STS.128s, each at least 8 long
    (a load stored before the next is issued makes runs of 1)."""
    for name, body in persist_sass.items():
        ops_ = re.findall(r"LDG\.E\.128|STS\.128", body)
        lengths = [len(m.group(0).split()) for m in re.finditer(r"(LDG\.E\.128 ?)+", " ".join(ops_))]
        assert lengths and min(lengths) >= 8, f"{name}: runs of 16-byte loads {lengths}"


def test_persist_grid_barrier_takes_no_sequentially_consistent_fence(persist_sass):
    """Each grid barrier (csrc/rnn_persist.cu grid_barrier) arrives with one release reduction (MEMBAR.ALL.GPU, then
    REDG: no return value to wait for) and leaves on the acquiring load: no MEMBAR.SC.GPU, which a __threadfence
    would add on each side of every step's barrier, on the critical path of the step."""
    for name, body in persist_sass.items():
        assert not re.search(r"MEMBAR\.SC", body), name
        reds, fences = len(re.findall(r"REDG\.E\.ADD\.STRONG\.GPU", body)), len(re.findall(r"MEMBAR\.ALL\.GPU", body))
        assert reds >= 1 and reds == fences, (name, reds, fences)
        assert not re.search(r"ATOMG\.E\.ADD", body), name  # the arrival waits for no old value
        assert re.search(r"LDG\.E\.STRONG\.GPU", body), name  # ld.acquire.gpu


def test_persist_kernels_fetch_the_next_steps_inputs_into_l2(persist_sass):
    """Each kernel asks L2 for the next step's inputs while the CTA waits out this step (csrc/rnn_persist.cu
    prefetch_forward / prefetch_backward): forward gx_t, before the first step and in the loop; backward gx_t,
    gh_t, the cell states around step t and dy_t, likewise. prefetch.global.L2 is CCTL.E.PF2 in SASS; none to L1,
    which each barrier's acquire invalidates."""
    for name, body in persist_sass.items():
        l2, l1 = len(re.findall(r"CCTL\.E\.PF2", body)), len(re.findall(r"CCTL\.E\.PF1", body))
        assert l2 >= (2 if "forward" in name else 10) and l1 == 0, (name, l2, l1)


# (kind, dtype bytes, H) that must launch on an H200, forward and backward; every fp32 one must take TF32 where
# allowed (backward's columns padded to an 8-row m16n8k8 tile over K = gates x H fit, the LSTM's at H = 1024 too)
MUST_FIT = [(4, 2, 512), (4, 2, 1024), (3, 2, 1024), (4, 2, 1500), (4, 4, 512), (4, 4, 1024), (3, 4, 1024),
            (4, 4, 1136), (3, 4, 1200)]
TF32_FITS = {"forward": [(4, 4, 512), (4, 4, 1024), (3, 4, 1024), (4, 4, 1136), (3, 4, 1200)],
             "backward": [(4, 4, 512), (4, 4, 1024), (3, 4, 1024), (4, 4, 1136), (3, 4, 1200)]}
@pytest.mark.parametrize("gates,elem,tf32,H", [(4, 2, False, 512), (3, 2, False, 1024), (4, 4, True, 256),
                                               (4, 4, False, 129), (4, 2, False, 33)])
@pytest.mark.parametrize("B", [1, 17, 64])
def test_persist_plan_takes_the_grid_of_the_fewest_modelled_nanoseconds(twin, gates, elem, tf32, H, B):
    """Given the batch, the plan takes, of every grid that launches, the one its cost model (rnn_persist.cuh
    step_ns) times fastest, never slower than the grid spread over the SMs that it makes without the batch; each
    grid's model time counts what the grid changes: the operand each CTA stages grows with the grid, the products
    per CTA shrink."""
    for backward in (False, True):
        spread = twin.persist_plan(gates, backward, elem, H, 0, H200, 0, 0, tf32, 0, 0)
        chosen = twin.persist_plan(gates, backward, elem, H, 0, H200, 0, 0, tf32, 0, B)
        assert spread[4] == chosen[4] == "" and spread[6] == 0.0 and chosen[6] > 0
        times = {}
        for grid in range(1, spread[0] + 1):  # every grid asked for (ceil(H / grid) units, any number)
            p = twin.persist_plan(gates, backward, elem, H, grid, H200, 0, 0, tf32, 0, B)
            if p[4] == "" and p[0] == grid:
                times[grid] = p[6]
        assert chosen[6] == pytest.approx(min(times.values())), (backward, chosen, times)
        assert chosen[6] == pytest.approx(times[chosen[0]]) and chosen[6] <= times[spread[0]]


def test_persist_benchmark_bound_carries_the_plan(twin):
    """Each RNN benchmark case's bound (benchmarks/bench_rnn.py) names the plan's grids and batch tiles for an H200
    and its modelled time, T steps of step_ns forward (and backward when training), for the GPU run to set beside
    the measured one."""
    from benchmarks.bench_rnn import persist_bound

    for kind, gates, dtype, elem, T, B, H, train in [("LSTM", 4, torch.bfloat16, 2, 100, 64, 512, True),
                                                     ("GRU", 3, torch.float32, 4, 50, 1, 1024, False)]:
        bound = persist_bound(kind, T, B, H, dtype, train)
        fwd = twin.persist_plan(gates, False, elem, H, 0, H200, 0, 0, elem == 4, 0, B)
        bwd = twin.persist_plan(gates, True, elem, H, 0, H200, 0, 0, elem == 4, 0, B)
        assert (bound["grid"], bound["tiles"]) == (fwd[0], fwd[7])
        assert (bound["grid_backward"], bound["tiles_backward"]) == ((bwd[0], bwd[7]) if train else (0, 0))
        assert bound["model_ms"] == pytest.approx(T * (fwd[6] + (bwd[6] if train else 0)) * 1e-6)
        assert bound["tiles"] == min(4, -(-B // 16)) and bound["model_ms"] > 0


def test_persist_plan_narrows_the_backward_grid_where_the_broadcast_dominates(twin):
    """At batch 64 the backward's operand (dgates, B x 4H) staged by every CTA each step costs more on 128 CTAs than
    the products it spreads: the plan takes fewer (bf16, H 512: 2 x 128 x 64 x 2048 bytes through L2 a step at 128
    CTAs); at batch 1 the forward at H 1024 keeps every SM busy."""
    spread = twin.persist_plan(4, True, 2, 512, 0, H200, 0, 0, False, 0, 0)
    chosen = twin.persist_plan(4, True, 2, 512, 0, H200, 0, 0, False, 0, 64)
    assert spread[0] == 128 and chosen[0] < 64
    assert twin.persist_plan(4, False, 2, 1024, 0, H200, 0, 0, False, 0, 1)[0] == 128
    with pytest.raises(RuntimeError, match="B .* must be non-negative"):
        twin.persist_plan(4, True, 2, 512, 0, H200, 0, 0, False, 0, -1)


# batches the plans are made for (0: none given, the grid spread over the SMs; else the cost model's choice)
BATCHES = (0, 1, 64, 128)
# (dtype bytes, H, proj_size) of LSTMs with a projection that must launch, forward and backward
PROJ_MUST_FIT = [(2, 1024, 512), (2, 1536, 512), (4, 1024, 512), (4, 1024, 256)]


def test_persist_kernels_compile_for_sm90a_without_spills_and_fit_their_grid(twin):
    kernels = _ptxas_report()
    names = {"forward": "persist_forward_kernel", "backward": "persist_backward_kernel"}
    dtypes = {2: ("6__half", "13__nv_bfloat16"), 4: ("If",)}
    # forward and backward in three dtypes, and the one-thread check queued behind each launch
    assert len(kernels) == 7 and len([k for k in kernels if "persist_check_kernel" in k]) == 1, kernels
    for name, info in kernels.items():
        assert "persist" in name
        assert info["spills"] == 0, f"{name} spills: {info}"
    for gates, elem, H in MUST_FIT:
        for direction, stem in names.items():
            for tag, tf32, B in [(tag, tf32, B) for tag in dtypes[elem] for tf32 in (False, True) for B in BATCHES]:
                (name,) = [k for k in kernels if stem in k and tag in k]
                info = kernels[name]
                grid, units, smem, per_sm, why, took_tf32, _, _ = twin.persist_plan(
                    gates, direction == "backward", elem, H, 0, H200, info["regs"], info["smem"], tf32, 0, B)
                assert why == "", f"{name} H{H} B{B}: {why}"
                assert took_tf32 == (tf32 and (gates, elem, H) in TF32_FITS[direction]), f"{name} H{H} tf32 {tf32}"
                assert per_sm >= 1 and grid <= per_sm * H200[0]
                assert smem + info["smem"] <= H200[1]
                assert info["regs"] * 256 * per_sm <= H200[3]
    for elem, H, P in PROJ_MUST_FIT:
        for direction, stem in names.items():
            for tag, B in [(tag, B) for tag in dtypes[elem] for B in BATCHES]:
                (name,) = [k for k in kernels if stem in k and tag in k]
                info = kernels[name]
                grid, units, smem, per_sm, why, _, _, _ = twin.persist_plan(
                    4, direction == "backward", elem, H, 0, H200, info["regs"], info["smem"], True, P, B)
                assert why == "", f"{name} H{H} P{P} B{B}: {why}"
                assert per_sm >= 1 and grid <= per_sm * H200[0] and smem + info["smem"] <= H200[1]
                assert info["regs"] * 256 * per_sm <= H200[3]


# ---- GPU: the kernels themselves ----

@pytest.fixture
def on_gpu(monkeypatch):
    """The persistent backend on the GPU; fp32 exact (TF32 off) unless a test turns allow_tf32 on."""
    if not fusenn.backends()["persistent"].usable:
        pytest.skip(fusenn.backends()["persistent"].detail)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    with fusenn.set_backend("persistent"):
        yield torch.device("cuda")


GPU_CASES = [
    dict(T=100, B=64, H=512), dict(T=200, B=8, H=1024, dtype="bf16"), dict(T=25, B=1, H=1000, dtype="fp16"),
    dict(T=50, B=33, H=129, reverse=True, lengths=[50 - i for i in range(33)]),
    dict(T=256, B=16, H=256, dtype="bf16", reverse=True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items() if k != "lengths"))
def test_persist_gpu_matches_reference_with_gradients(on_gpu, kind, case):
    T, B, H = case["T"], case["B"], case["H"]
    dtype, reverse = DTYPES[case.get("dtype", "fp32")], case.get("reverse", False)
    lens = torch.tensor(case["lengths"]) if "lengths" in case else None
    torch.manual_seed(T + B + H)
    if kind == "lstm":
        inputs = _lstm_inputs(T, B, H, None, dtype, on_gpu)
        upstream = [torch.randn(T, B, H, device=on_gpu), torch.randn(B, H, device=on_gpu),
                    torch.randn(B, H, device=on_gpu)]
        _check_layer(lambda *a: ops.lstm_layer(*a, lengths=lens, reverse=reverse),
                     lambda *a: reference.lstm_layer(*a, lengths=lens, reverse=reverse), inputs, upstream,
                     ("gx", "h0", "c0", "w_hh", "w_hr"))
    else:
        inputs = _gru_inputs(T, B, H, True, dtype, on_gpu)
        upstream = [torch.randn(T, B, H, device=on_gpu), torch.randn(B, H, device=on_gpu)]
        _check_layer(lambda *a: ops.gru_layer(*a, lengths=lens, reverse=reverse),
                     lambda *a: reference.gru_layer(*a, lengths=lens, reverse=reverse), inputs, upstream,
                     ("gx", "h0", "w_hh", "b_hh"))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", ["fp32", "tf32", "bf16"])
@pytest.mark.parametrize("B", [3, 40])
def test_persist_gpu_small(on_gpu, monkeypatch, kind, dtype, B):
    """Small shapes with everything on (lengths, reverse, both regularisers): what benchmarks/device_run.sh
    also runs under compute-sanitizer's memcheck, racecheck and synccheck ("tf32": fp32 under allow_tf32, the
    mma.sync path with its unpadded slices; B 40: three batch tiles a staging round, the last of 8 rows)."""
    torch.manual_seed(5 + B)
    T, H = 3, 33
    kw = dict(lengths=torch.tensor(([3, 1, 2] * B)[:B]), reverse=True, recurrent_dropout=(0.3, 3), zoneout=(0.2, 4))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", dtype == "tf32")
    check = _check_layer_tf32 if dtype == "tf32" else _check_layer
    dt = torch.float32 if dtype == "tf32" else DTYPES[dtype]
    if kind == "lstm":
        inputs = _lstm_inputs(T, B, H, None, dt, on_gpu)
        upstream = [torch.randn(T, B, H, device=on_gpu), torch.randn(B, H, device=on_gpu),
                    torch.randn(B, H, device=on_gpu)]
        check(lambda *a: ops.lstm_layer(*a, **kw), lambda *a: reference.lstm_layer(*a, **kw), inputs,
              upstream, ("gx", "h0", "c0", "w_hh", "w_hr"))
    else:
        inputs = _gru_inputs(T, B, H, True, dt, on_gpu)
        upstream = [torch.randn(T, B, H, device=on_gpu), torch.randn(B, H, device=on_gpu)]
        check(lambda *a: ops.gru_layer(*a, **kw), lambda *a: reference.gru_layer(*a, **kw), inputs,
              upstream, ("gx", "h0", "w_hh", "b_hh"))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("case", [dict(T=100, B=64, H=512), dict(T=200, B=8, H=1024, reverse=True),
                                  dict(T=3, B=3, H=33, lengths=[3, 1, 2], regs=True)],
                         ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items() if k != "lengths"))
def test_persist_gpu_tf32_matches_reference_with_gradients(on_gpu, monkeypatch, kind, case):
    """fp32 under allow_tf32 (torch's default) on the GPU's TF32 tensor cores: within the TF32 tolerance, and
    not the exact path's results."""
    T, B, H, reverse = case["T"], case["B"], case["H"], case.get("reverse", False)
    kw = dict(lengths=torch.tensor(case["lengths"]) if "lengths" in case else None, reverse=reverse)
    if case.get("regs"):
        kw.update(recurrent_dropout=(0.3, 3), zoneout=(0.2, 4))
    torch.manual_seed(T + B + H)
    if kind == "lstm":
        inputs = _lstm_inputs(T, B, H, None, torch.float32, on_gpu)
        upstream = [torch.randn(T, B, H, device=on_gpu), torch.randn(B, H, device=on_gpu),
                    torch.randn(B, H, device=on_gpu)]
        op, ref, names = ops.lstm_layer, reference.lstm_layer, ("gx", "h0", "c0", "w_hh", "w_hr")
    else:
        inputs = _gru_inputs(T, B, H, True, torch.float32, on_gpu)
        upstream = [torch.randn(T, B, H, device=on_gpu), torch.randn(B, H, device=on_gpu)]
        op, ref, names = ops.gru_layer, reference.gru_layer, ("gx", "h0", "w_hh", "b_hh")
    exact = op(*inputs, **kw)[0]
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    out, _ = _check_layer_tf32(lambda *a: op(*a, **kw), lambda *a: ref(*a, **kw), inputs, upstream, names)
    assert (out[0] - exact).abs().max() > 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("case", [dict(T=100, B=16, H=512, P=256, dtype="bf16"),
                                  dict(T=50, B=33, H=129, P=64, reverse=True, lengths=[50 - i for i in range(33)]),
                                  dict(T=3, B=3, H=33, P=17, regs=True, lengths=[3, 1, 2]),
                                  dict(T=20, B=8, H=1024, P=512, tf32=True)],
                         ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items() if k != "lengths"))
def test_persist_gpu_proj_matches_reference_with_gradients(on_gpu, monkeypatch, case):
    """The projection's two grid phases a step on the GPU, forward and backward."""
    T, B, H, P, dtype = case["T"], case["B"], case["H"], case["P"], DTYPES[case.get("dtype", "fp32")]
    kw = dict(lengths=torch.tensor(case["lengths"]) if "lengths" in case else None, reverse=case.get("reverse", False))
    if case.get("regs"):
        kw.update(recurrent_dropout=(0.3, 3), zoneout=(0.2, 4))
    torch.manual_seed(T + B + H + P)
    inputs = _lstm_inputs(T, B, H, P, dtype, on_gpu)
    upstream = [torch.randn(T, B, P, device=on_gpu), torch.randn(B, P, device=on_gpu),
                torch.randn(B, H, device=on_gpu)]
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", case.get("tf32", False))
    check = _check_layer_tf32 if case.get("tf32") else _check_layer
    check(lambda *a: ops.lstm_layer(*a, **kw), lambda *a: reference.lstm_layer(*a, **kw), inputs, upstream,
          ("gx", "h0", "c0", "w_hh", "w_hr"))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("H", [1024, 1136])
def test_persist_gpu_tf32_matches_its_emulation(on_gpu, twin, kind, H):
    """fp32 with TF32 allowed, forward and backward, at H = 1024 (the LSTM's backward on an 8-row m16n8k8 tile)
    and 1136 (12 units per CTA: slices stored unpadded, the LSTM's h staged 64 columns at a time): the GPU's
    results against the host emulation's on the same inputs agree far closer than either does with the exact
    path (only the order of the adds inside an MMA differs), so the emulation stands for the kernel."""
    torch.manual_seed(9)
    T, B = 5, 8
    dy, dh_n, dc_n = torch.randn(T, B, H), torch.randn(B, H), torch.randn(B, H)
    stream = torch.cuda.current_stream().cuda_stream
    if kind == "lstm":
        gx, h0, c0, w_hh, _ = _lstm_inputs(T, B, H, None, torch.float32, "cpu")

        def run(device, tf32):
            x = [t.to(device) for t in (gx, h0, c0, w_hh, dy, dh_n, dc_n)]
            s = stream if device != "cpu" else 0
            fwd = twin.lstm_persist_forward(*x[:4], None, None, False, True, None, None, 0, 0, 1.0, s, 0, tf32)
            bwd = twin.lstm_persist_backward(x[4], x[5], x[6], x[0], x[3], None, None, False, fwd[3], fwd[4], None,
                                             None, 0, 0, 1.0, s, 0, tf32)
            return [fwd[0].cpu(), bwd[0].cpu(), bwd[1].cpu(), bwd[2].cpu()]  # y, dgates, dh_0, dc_0
    else:
        gx, h0, w_hh, b_hh = _gru_inputs(T, B, H, True, torch.float32, "cpu")

        def run(device, tf32):
            x = [t.to(device) for t in (gx, h0, w_hh, b_hh, dy, dh_n)]
            s = stream if device != "cpu" else 0
            fwd = twin.gru_persist_forward(*x[:4], None, False, True, None, None, 0, 0, 1.0, s, 0, tf32)
            bwd = twin.gru_persist_backward(x[4], x[5], x[0], x[2], x[3], None, False, fwd[2], None, None, 0, 0, 1.0,
                                            s, 0, tf32)
            return [fwd[0].cpu(), bwd[0].cpu(), bwd[2].cpu()]  # y, dgates, dh_0

    gpu, emulated, exact = run(on_gpu, True), run("cpu", True), run("cpu", False)
    for g, e, x, name in zip(gpu, emulated, exact, ("y", "dgates", "dh_0", "dc_0")):
        off = (e - x).abs().max().item()
        assert off > 1e-6 * x.abs().max().item(), f"{name}: TF32 on gives the exact path's results"
        assert (g - e).abs().max().item() < 0.1 * off, (name, (g - e).abs().max().item(), off)


def _gpu_lstm_run(device, regs=True):
    torch.manual_seed(0)
    inputs = [x.requires_grad_() for x in _lstm_inputs(60, 16, 512, None, torch.bfloat16, device)[:4]]
    kw = dict(recurrent_dropout=(0.2, 11), zoneout=(0.1, 13)) if regs else {}
    y, h, c = ops.lstm_layer(*inputs, **kw)
    grads = torch.autograd.grad((y.float().square().sum() + h.float().sum()), inputs)
    return [y, h, c] + list(grads)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [_race_case("lstm", 4, 3, 33, reverse=True, lengths=[4, 1, 3], regs=True),
                                  _race_case("gru", 4, 3, 33, reverse=True, lengths=[4, 1, 3], regs=True),
                                  _race_case("lstm", 3, 17, 129, P=64, lengths=[3, 1, 2] * 5 + [1, 3], regs=True)])
def test_persist_gpu_partition_does_not_change_a_bit(on_gpu, twin, case):
    """Exact fp32 on the GPU: every gate product is one thread's FMA chain in k order whatever the grid, so 2, 5 and
    11 CTAs and the plan's give bit-identical results, forward and backward (as the emulation's partition test); a
    CTA reading what another writes in the same phase, or passing a grid barrier early, would break that."""
    inputs, upstream, regs = _race_inputs(case, on_gpu)
    results = []
    for grid in (2, 5, 11, 0):
        fwd = _race_forward(twin, case, inputs, regs, True, grid)
        bwd = _race_backward(twin, case, inputs, upstream, regs, fwd, grid)
        results.append([x.cpu() for x in fwd + bwd])
    for grid, other in zip((5, 11, 0), results[1:]):
        assert _same_bits(results[0], other), f"grid {grid} against 2 CTAs"


@pytest.mark.gpu
@pytest.mark.parametrize("case", TILE_CASES)
def test_persist_gpu_batch_tiles_change_no_bit(on_gpu, twin, case):
    """On the GPU as in the emulation: the plan's batch tiles a round (up to 4, their loads and MMAs / FMAs
    interleaved) give bit for bit what one tile a round gives, forward and backward."""
    inputs, upstream, regs = _race_inputs(case, on_gpu)
    results = []
    for tiles in (1, 0, 2):
        fwd = _race_forward(twin, case, inputs, regs, True, tiles=tiles)
        results.append([x.cpu() for x in fwd + _race_backward(twin, case, inputs, upstream, regs, fwd, tiles=tiles)])
    for tiles, other in zip((0, 2), results[1:]):
        assert _same_bits(results[0], other), f"tiles={tiles} against one tile a round"


@pytest.mark.gpu
def test_persist_gpu_repeats_are_bit_identical(on_gpu):
    first = _gpu_lstm_run(on_gpu)
    for _ in range(19):
        for a, b in zip(first, _gpu_lstm_run(on_gpu)):
            assert torch.equal(a, b)


@pytest.mark.gpu
def test_persist_gpu_correct_beside_a_side_stream_gemm(on_gpu):
    """A GEMM on another stream takes SMs while the cooperative grid runs: still co-resident, same bits."""
    expected = _gpu_lstm_run(on_gpu)
    side = torch.cuda.Stream()
    a = torch.randn(8192, 8192, device=on_gpu, dtype=torch.bfloat16)
    with torch.cuda.stream(side):
        for _ in range(4):
            a = a @ a.t() * 1e-4
    got = _gpu_lstm_run(on_gpu)
    torch.cuda.synchronize()
    for x, y in zip(expected, got):
        assert torch.equal(x, y)


@pytest.mark.gpu
def test_persist_gpu_is_first_under_auto_and_falls_back_with_reasons():
    if not fusenn.backends()["persistent"].usable:
        pytest.skip(fusenn.backends()["persistent"].detail)
    gx, h0, c0, w_hh, _ = _lstm_inputs(3, 4, 64, None, torch.float32, torch.device("cuda"))
    reasons = {name: why(gx, h0, w_hh, None) for name, why in ops.LSTM_SUPPORT.items()}
    with fusenn.set_backend("auto"):
        assert dispatch.choose("lstm", gx.device, reasons, ops.GPU_ORDER) == "persistent"
    gx, h0, c0, w_hh, w_hr = _lstm_inputs(3, 4, 64, 16, torch.float32, torch.device("cuda"))
    reasons = {name: why(gx, h0, w_hh, w_hr) for name, why in ops.LSTM_SUPPORT.items()}
    with fusenn.set_backend("auto"):  # proj_size too
        assert dispatch.choose("lstm", gx.device, reasons, ops.GPU_ORDER) == "persistent"
    with fusenn.set_backend("persistent"), pytest.raises(RuntimeError, match="co-resident"):
        H = 4096
        torch.ops.fusenn_cuda.lstm_persist_forward(
            torch.zeros(1, 1, 4 * H, device="cuda", dtype=torch.bfloat16),
            torch.zeros(1, H, device="cuda", dtype=torch.bfloat16), torch.zeros(1, H, device="cuda",
                                                                                dtype=torch.bfloat16),
            torch.zeros(4 * H, H, device="cuda", dtype=torch.bfloat16), None, None, False, False, None, None, 0, 0,
            1.0, torch.cuda.current_stream().cuda_stream, H)


@pytest.mark.gpu
def test_persist_gpu_runs_on_the_tensors_device(monkeypatch):
    if torch.cuda.device_count() < 2 or not fusenn.backends()["persistent"].usable:
        pytest.skip("needs two GPUs and fusenn._C")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # exact fp32, as the tolerance below assumes
    inputs = _lstm_inputs(5, 3, 33, None, torch.float32, torch.device("cuda:1"))
    with fusenn.set_backend("persistent"):
        y, h, c = ops.lstm_layer(*inputs)
    assert y.device == torch.device("cuda:1")
    assert_close(y, reference.lstm_layer(*[x.double() if x is not None else None for x in inputs])[0], name="y")



@pytest.mark.gpu
def test_persist_gpu_never_waits_for_its_kernels(on_gpu):
    """The layers queue their kernels and return: no host sync in forward or backward (the error flag is checked
    by a kernel queued behind each launch), so the host runs ahead of the GPU and CUDA graphs can capture them."""
    _gpu_lstm_run(on_gpu)  # plans and buffers outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _gpu_lstm_run(on_gpu)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
def test_persist_gpu_barrier_timeout_is_a_device_assert():
    """A grid barrier that times out (a 1 ns bound here: the first CTA at a barrier gives up before the others
    arrive) fails the launch with a device-side assert naming the reason, never returning numbers. In a child
    process: the assert ends the CUDA context."""
    if not fusenn.backends()["persistent"].usable:
        pytest.skip(fusenn.backends()["persistent"].detail)
    body = (
        "import torch, fusenn\nfrom fusenn.ops import rnn as ops\n"
        "gx = torch.randn(50, 4, 4 * 64, device='cuda')\n"
        "h0, c0 = torch.zeros(4, 64, device='cuda'), torch.zeros(4, 64, device='cuda')\n"
        "w = torch.randn(4 * 64, 64, device='cuda') * 0.1\n"
        "with fusenn.set_backend('persistent'):\n"
        "    y = ops.lstm_layer(gx, h0, c0, w, None)[0]\n"
        "torch.cuda.synchronize()\n"
        "print('RETURNED', y.sum().item())\n")
    env = dict(os.environ, FUSENN_PERSIST_TIMEOUT_S="1e-9")
    run = subprocess.run([sys.executable, "-c", body], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "RETURNED" not in run.stdout, run.stdout + run.stderr
    assert "device-side assert" in run.stderr, run.stderr[-3000:]
    assert "grid-wide barrier timed out" in run.stdout + run.stderr, run.stderr[-3000:]

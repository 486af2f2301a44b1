"""The LSTM and GRU layer kernels (Triton, and the C++ layers) against the float64 reference: outputs and
every gradient.

Each case runs fusenn.ops.rnn's layer on the kernel backend (outputs poisoned first), the reference on
float64 copies of the same inputs, and the reference in the inputs' own dtype for PyTorch's error; the
kernel may err 2x PyTorch's error on outputs and 3x on gradients, plus the dtype's floor. Gradients come
from torch.autograd.grad with a random upstream gradient on every output.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fusenn
from fusenn.ops import rnn as ops
from fusenn.reference import rnn as reference
from fusenn.testing import ATOL, assert_close, poisoned_outputs

KERNEL_BACKENDS = ("triton", "cuda", "cpp-host")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _case(T, B, H, dtype="fp32", proj=None, reverse=False, lengths=None, bias=True, gpu=False):
    parts = [f"T{T}", f"B{B}", f"H{H}"] + ([f"proj{proj}"] if proj else []) + [dtype]
    parts += (["reverse"] if reverse else []) + (["packed"] if lengths else []) + ([] if bias else ["nobias"])
    return pytest.param(T, B, H, proj, DTYPES[dtype], reverse, lengths, bias, id="-".join(parts),
                        marks=[pytest.mark.gpu] if gpu else [])


# Realistic sizes, too slow for the interpreter: the fastrnns size, DeepBench-like ones, odd sizes.
GPU_CASES = [
    dict(T=100, B=64, H=512), dict(T=100, B=64, H=512, dtype="bf16"), dict(T=25, B=1, H=1000, dtype="fp16"),
    dict(T=50, B=33, H=129, reverse=True, lengths=[50 - i for i in range(33)]),
    dict(T=150, B=8, H=1024, dtype="bf16", reverse=True),
]


# Packed rows are unsorted and include a length-1 row; B17 spans two programs of 16 rows; H70 / proj40
# span several hidden and projection tiles.
LSTM_CASES = [
    _case(1, 1, 1),
    _case(5, 3, 7),
    _case(5, 3, 33, reverse=True),
    _case(5, 3, 33, lengths=[3, 5, 1]),
    _case(5, 3, 33, reverse=True, lengths=[3, 5, 1]),
    _case(5, 3, 7, proj=3),
    _case(5, 3, 33, proj=7, reverse=True, lengths=[5, 1, 4]),
    _case(3, 2, 70, proj=40, lengths=[3, 2]),
    _case(3, 17, 7, reverse=True, lengths=[3, 1, 2] * 5 + [1, 3]),
    _case(5, 1, 33, "fp16"),
    _case(5, 3, 7, "fp16", reverse=True, lengths=[3, 5, 1]),
    _case(5, 3, 33, "fp16", proj=7),
    _case(5, 3, 33, "bf16"),
    _case(5, 3, 7, "bf16", reverse=True, lengths=[3, 5, 1]),
    _case(1, 3, 33, "bf16", proj=7, reverse=True),
    _case(0, 3, 7, proj=3),
    _case(5, 0, 7),
    _case(35, 20, 650, dtype="bf16", proj=256, gpu=True),
] + [_case(**c, gpu=True) for c in GPU_CASES]

GRU_CASES = [
    _case(1, 1, 1),
    _case(5, 3, 7),
    _case(5, 3, 33, reverse=True),
    _case(5, 3, 33, lengths=[3, 5, 1]),
    _case(5, 3, 7, reverse=True, lengths=[3, 5, 1], bias=False),
    _case(3, 2, 70, lengths=[3, 2]),
    _case(3, 17, 7, reverse=True, lengths=[3, 1, 2] * 5 + [1, 3]),
    _case(5, 1, 33, "fp16"),
    _case(5, 3, 7, "fp16", reverse=True, lengths=[3, 5, 1]),
    _case(5, 3, 33, "bf16"),
    _case(5, 3, 7, "bf16", reverse=True, lengths=[3, 5, 1]),
    _case(0, 3, 7),
    _case(5, 0, 7),
] + [_case(**c, gpu=True) for c in GPU_CASES]

PARAMS = "T,B,H,proj,dtype,reverse,lengths,bias"


@pytest.fixture
def rnn_backend(kernel_backend):
    """kernel_backend, skipping the backends that have no RNN layer kernels (yet)."""
    name, _ = kernel_backend
    if name not in ops.LSTM_SUPPORT or name not in ops.GRU_SUPPORT:
        pytest.skip(f"fusenn.ops.rnn has no {name} implementation")
    return kernel_backend


@pytest.fixture
def split_backend(rnn_backend):
    if rnn_backend[0] != "triton":
        pytest.skip("the split mode is the Triton kernels'")
    return rnn_backend


def _uniform(shape, bound, dtype, device):
    return ((torch.rand(shape, device=device) * 2 - 1) * bound).to(dtype)


def _lstm_inputs(T, B, H, proj, dtype, device):
    P = proj or H
    return [torch.randn(T, B, 4 * H, device=device).to(dtype),  # gx
            (0.5 * torch.randn(B, P, device=device)).to(dtype),  # h0
            (0.5 * torch.randn(B, H, device=device)).to(dtype),  # c0
            _uniform((4 * H, P), H ** -0.5, dtype, device),  # w_hh, torch.nn.LSTM's init
            _uniform((P, H), H ** -0.5, dtype, device) if proj else None]  # w_hr


def _gru_inputs(T, B, H, bias, dtype, device):
    return [torch.randn(T, B, 3 * H, device=device).to(dtype),
            (0.5 * torch.randn(B, H, device=device)).to(dtype),
            _uniform((3 * H, H), H ** -0.5, dtype, device),
            _uniform((3 * H,), H ** -0.5, dtype, device) if bias else None]


def _outputs_and_grads(layer, inputs, upstream):
    """The layer's outputs and the gradients of sum(output * upstream) w.r.t. every float input."""
    inputs = [x.detach().requires_grad_() if x is not None else None for x in inputs]
    outs = layer(*inputs)
    pairs = [(o, u.to(o.dtype)) for o, u in zip(outs, upstream) if o.requires_grad]
    wrt = [x for x in inputs if x is not None]
    grads = torch.autograd.grad([o for o, _ in pairs], wrt, [u for _, u in pairs], allow_unused=True)
    return [o.detach() for o in outs], [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, wrt)]


def _check_layer(op, ref, inputs, upstream, names):
    """op (kernel backend) against ref on float64 copies; PyTorch's error from ref in the inputs' dtype."""
    with poisoned_outputs():
        out, grads = _outputs_and_grads(op, inputs, upstream)
    double = [x.double() if x is not None else None for x in inputs]
    ref_out, ref_grads = _outputs_and_grads(ref, double, upstream)
    base_out, base_grads = _outputs_and_grads(ref, inputs, upstream)
    for o, r, b, name in zip(out, ref_out, base_out, ("y", "h_n", "c_n")):
        assert o.dtype == inputs[0].dtype, f"{name}: dtype {o.dtype}"
        assert_close(o, r, b, name=name)
    wrt = [name for name, x in zip(names, inputs) if x is not None]
    for g, r, b, name in zip(grads, ref_grads, base_grads, wrt):
        assert_close(g, r, b, factor=3.0, name=f"grad {name}")


@pytest.mark.parametrize(PARAMS, LSTM_CASES)
def test_lstm_layer_matches_reference(rnn_backend, T, B, H, proj, dtype, reverse, lengths, bias):
    _, device = rnn_backend
    torch.manual_seed(T * 1000 + B * 100 + H)
    inputs = _lstm_inputs(T, B, H, proj, dtype, device)
    P = proj or H
    upstream = [torch.randn(T, B, P, device=device), torch.randn(B, P, device=device), torch.randn(B, H, device=device)]
    lens = torch.tensor(lengths) if lengths else None

    def layer(fn):
        return lambda gx, h0, c0, w_hh, w_hr: fn(gx, h0, c0, w_hh, w_hr, lengths=lens, reverse=reverse)

    _check_layer(layer(ops.lstm_layer), layer(reference.lstm_layer), inputs, upstream,
                 ("gx", "h0", "c0", "w_hh", "w_hr"))


@pytest.mark.parametrize(PARAMS, GRU_CASES)
def test_gru_layer_matches_reference(rnn_backend, T, B, H, proj, dtype, reverse, lengths, bias):
    _, device = rnn_backend
    torch.manual_seed(T * 1000 + B * 100 + H)
    inputs = _gru_inputs(T, B, H, bias, dtype, device)
    upstream = [torch.randn(T, B, H, device=device), torch.randn(B, H, device=device)]
    lens = torch.tensor(lengths) if lengths else None

    def layer(fn):
        return lambda gx, h0, w_hh, b_hh: fn(gx, h0, w_hh, b_hh, lengths=lens, reverse=reverse)

    _check_layer(layer(ops.gru_layer), layer(reference.gru_layer), inputs, upstream, ("gx", "h0", "w_hh", "b_hh"))


@pytest.mark.parametrize("T", [4, 5], ids=lambda T: f"T{T}")
def test_inference_without_grad_matches_reference(rnn_backend, T):
    """Without grad the kernels keep two alternating state slots instead of every step's state."""
    _, device = rnn_backend
    torch.manual_seed(T)
    lens = torch.tensor([T, 1, T - 2])
    lstm_in = _lstm_inputs(T, 3, 7, 5, torch.float32, device)
    gru_in = _gru_inputs(T, 3, 7, True, torch.float32, device)
    with torch.no_grad(), poisoned_outputs():
        lstm_out = ops.lstm_layer(*lstm_in, lengths=lens, reverse=True)
        gru_out = ops.gru_layer(*gru_in, lengths=lens)
    double = [x.double() for x in lstm_in]
    assert_close(lstm_out, reference.lstm_layer(*double, lengths=lens, reverse=True),
                 reference.lstm_layer(*lstm_in, lengths=lens, reverse=True), name="lstm")
    assert_close(gru_out, reference.gru_layer(*[x.double() for x in gru_in], lengths=lens),
                 reference.gru_layer(*gru_in, lengths=lens), name="gru")


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_gradients_flow_under_autocast(rnn_backend, kind):
    """Under autocast the input GEMM yields bf16 gx; the layer runs in bf16 and its fp32 weights get fp32
    gradients equal to the float64 reference's on the bf16-rounded weights."""
    _, device = rnn_backend
    torch.manual_seed(0)
    T, B, I, H = 4, 3, 5, 7
    G = 4 if kind == "lstm" else 3
    x = torch.randn(T, B, I, device=device)
    w_ih = _uniform((G * H, I), H ** -0.5, torch.float32, device).requires_grad_()
    w_hh = _uniform((G * H, H), H ** -0.5, torch.float32, device).requires_grad_()
    h0 = torch.zeros(B, H, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        gx = F.linear(x, w_ih)
        assert gx.dtype == torch.bfloat16
        out = ops.lstm_layer(gx, h0, h0, w_hh) if kind == "lstm" else ops.gru_layer(gx, h0, w_hh)
        assert all(o.dtype == torch.bfloat16 for o in out)
        out[0].float().square().sum().backward()  # inside: a CPU backward would run under autocast
    assert w_ih.grad.dtype == w_hh.grad.dtype == torch.float32
    assert torch.isfinite(w_ih.grad).all()

    w_ref = w_hh.detach().to(torch.bfloat16).double().requires_grad_()
    gx_ref, h_ref = gx.detach().double(), h0.double()
    ref = reference.lstm_layer(gx_ref, h_ref, h_ref, w_ref) if kind == "lstm" else reference.gru_layer(
        gx_ref, h_ref, w_ref)
    # the upstream gradient is 2 y with y rounded to bf16, as in the kernel's graph
    (grad_ref,) = torch.autograd.grad(ref[0], w_ref, 2 * ref[0].to(torch.bfloat16).double())
    assert_close(w_hh.grad, grad_ref, atol=ATOL[torch.bfloat16], name="grad w_hh")


def test_float64_goes_to_the_reference_or_says_why(device):
    gx, h0, c0, w_hh, _ = _lstm_inputs(2, 1, 3, None, torch.float64, device)
    assert ops.LSTM_SUPPORT["triton"](gx.float(), h0, w_hh, None) is None
    assert "float64" in ops.LSTM_SUPPORT["triton"](gx, h0, w_hh, None)
    with fusenn.set_backend("auto"):
        assert ops.lstm_layer(gx, h0, c0, w_hh)[0].dtype == torch.float64
    if not fusenn.backends()["triton"].usable:
        pytest.skip(fusenn.backends()["triton"].detail)
    with fusenn.set_backend("triton"), pytest.raises(fusenn.BackendError, match="float16, bfloat16 or float32"):
        ops.gru_layer(*_gru_inputs(2, 1, 3, True, torch.float64, device))


# Split mode: NSPLIT programs share each block of batch rows, each taking every NSPLIT-th hidden (and P)
# tile. Under the interpreter each phase of each step is its own launch; on a GPU the same tests run the
# cooperative single launch, whose programs meet at grid barriers.
def _kind(kind, cases):
    return [pytest.param(kind, *c.values, id=f"{kind}-{c.id}", marks=c.marks) for c in cases]


SPLIT_CASES = _kind("lstm", [
    _case(5, 3, 33, proj=7, reverse=True, lengths=[5, 1, 4]),
    _case(3, 2, 70, proj=40, lengths=[3, 2]),
    _case(3, 17, 33, reverse=True, lengths=[3, 1, 2] * 5 + [1, 3]),
    _case(4, 3, 33, "bf16"),
    _case(100, 64, 512, gpu=True),
    _case(50, 8, 1024, "bf16", proj=256, reverse=True, gpu=True),
]) + _kind("gru", [
    _case(5, 3, 33, reverse=True, lengths=[3, 5, 1]),
    _case(3, 17, 70, lengths=[3, 1, 2] * 5 + [1, 3], bias=False),
    _case(4, 3, 33, "bf16"),
    _case(100, 64, 512, gpu=True),
    _case(50, 8, 1024, "bf16", reverse=True, gpu=True),
])


@pytest.mark.parametrize("split", [2, 3])
@pytest.mark.parametrize("kind," + PARAMS, SPLIT_CASES)
def test_split_across_programs_matches_reference(split_backend, monkeypatch, split, kind, T, B, H, proj, dtype,
                                                 reverse, lengths, bias):
    monkeypatch.setenv("FUSENN_RNN_SPLIT", str(split))
    test = test_lstm_layer_matches_reference if kind == "lstm" else test_gru_layer_matches_reference
    test(split_backend, T, B, H, proj, dtype, reverse, lengths, bias)


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_bad_split_setting_says_what_it_takes(split_backend, monkeypatch, value):
    _, device = split_backend
    monkeypatch.setenv("FUSENN_RNN_SPLIT", value)
    with pytest.raises(ValueError, match="FUSENN_RNN_SPLIT must be 'auto' or a positive integer"):
        ops.gru_layer(*_gru_inputs(2, 1, 3, True, torch.float32, device))


def test_lstm_split_with_regularisers_matches_reference(split_backend, monkeypatch):
    """Recurrent dropout and sampled zoneout regenerate the same masks whichever program owns a tile."""
    _, device = split_backend
    monkeypatch.setenv("FUSENN_RNN_SPLIT", "2")
    torch.manual_seed(3)
    T, B, H, P = 4, 3, 33, 20
    inputs = _lstm_inputs(T, B, H, P, torch.float32, device)
    upstream = [torch.randn(T, B, P, device=device), torch.randn(B, P, device=device), torch.randn(B, H, device=device)]
    lens = torch.tensor([4, 2, 3])
    regs = dict(recurrent_dropout=(0.3, 17), zoneout=(0.25, 29))

    def layer(fn):
        return lambda gx, h0, c0, w_hh, w_hr: fn(gx, h0, c0, w_hh, w_hr, lengths=lens, **regs)

    _check_layer(layer(ops.lstm_layer), layer(reference.lstm_layer), inputs, upstream,
                 ("gx", "h0", "c0", "w_hh", "w_hr"))


@pytest.mark.gpu
def test_split_stepwise_on_gpu_matches_cooperative():
    """The GPU runs both split modes: one launch per phase per step, and the cooperative single launch."""
    from fusenn.kernels import gru, lstm

    torch.manual_seed(0)
    gx, h0, c0, w_hh, w_hr = _lstm_inputs(20, 8, 256, 64, torch.bfloat16, torch.device("cuda"))
    outs = [lstm.lstm_forward(gx, h0, c0, w_hh, w_hr, None, False, True, split=4, cooperative=coop)
            for coop in (False, True)]
    for a, b in zip(outs[0][:3] + outs[0][3][:2], outs[1][:3] + outs[1][3][:2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    gx, h0, w_hh, b_hh = _gru_inputs(20, 8, 256, True, torch.bfloat16, torch.device("cuda"))
    outs = [gru.gru_forward(gx, h0, w_hh, b_hh, None, True, True, split=4, cooperative=coop) for coop in (False, True)]
    for a, b in zip(outs[0], outs[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cpp_layers_check_their_inputs(rnn_backend):
    """The C++ ops refuse inconsistent inputs with a message naming the argument, not a crash."""
    name, device = rnn_backend
    if name != "cuda":
        pytest.skip("checks of the C++ layers' ops")
    gx, h0, c0, w_hh, _ = _lstm_inputs(3, 2, 5, None, torch.float32, device)
    lstm, gru = torch.ops.fusenn_cuda.lstm_forward, torch.ops.fusenn_cuda.gru_forward
    regs = (None, None, 0, 0, 1.0, 0)
    with pytest.raises(RuntimeError, match="expected w_hh of dtype Half"):
        lstm(gx.half(), h0.half(), c0.half(), w_hh, None, None, False, True, *regs)
    with pytest.raises(RuntimeError, match=r"expected lengths of shape \[2\]"):
        lstm(gx, h0, c0, w_hh, None, torch.tensor([1, 2, 3], device=device), False, True, *regs)
    with pytest.raises(RuntimeError, match="sampled zoneout .* needs zo_seed"):
        lstm(gx, h0, c0, w_hh, None, None, False, True, None, None, 1, 5, 1.0, 0)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        lstm(gx.double(), h0.double(), c0.double(), w_hh.double(), None, None, False, True, *regs)
    with pytest.raises(RuntimeError, match=r"expected gx of shape \(T, B, 3 \* hidden_size\)"):
        gru(gx[..., :-1].contiguous(), h0, w_hh[:15], None, None, False, True, *regs)
    with pytest.raises(RuntimeError, match=r"expected rscale of shape \[2, 5\]"):
        gru(gx[..., :15].contiguous(), h0, w_hh[:15], None, None, False, True, torch.ones(5, 2, device=device), None, 0,
            0, 1.0, 0)


@pytest.mark.gpu
def test_split_is_bit_equal_to_unsplit_with_a_side_stream_gemm():
    """The cooperative launch against the one-program-per-rows kernel, 20 times, while another stream
    keeps SMs busy with a GEMM: every program of the split launch must be resident (or the launch fails),
    so the results never depend on what else runs. Each split program owns whole tiles of the unsplit
    kernel's loop, so the sums run in the same order: bit-equal."""
    from fusenn.kernels import lstm

    torch.manual_seed(0)
    gx, h0, c0, w_hh, _ = _lstm_inputs(60, 8, 512, None, torch.bfloat16, torch.device("cuda"))
    want = lstm.lstm_forward(gx, h0, c0, w_hh, None, None, False, True, split=1)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    for _ in range(20):
        with torch.cuda.stream(side):
            for _ in range(4):
                a @ a
        got = lstm.lstm_forward(gx, h0, c0, w_hh, None, None, False, True, split=8, cooperative=True)
        for x, y in zip(want[:3] + want[3][:2], got[:3] + got[3][:2]):
            assert torch.equal(x, y)
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_a_barrier_that_times_out_raises():
    """Counters that can never reach their epoch (as if some programs never started): the kernel gives up
    waiting and sets the error flag, and the device assert queued behind the launch fails it instead of
    returning numbers. In a child process: the assert ends the CUDA context."""
    body = (
        "import torch\nfrom fusenn.kernels import lstm\n"
        "def hopeless(rows, device):\n"
        "    bar = torch.zeros(rows + 1, dtype=torch.int32, device=device)\n"
        "    bar[:rows] = -(2**30)\n"
        "    return bar\n"
        "lstm.barrier_buffer = hopeless\n"
        "gx, h0, c0 = torch.randn(2, 4, 256, device='cuda'), torch.zeros(4, 64, device='cuda'), "
        "torch.zeros(4, 64, device='cuda')\n"
        "w_hh = torch.randn(256, 64, device='cuda') * 0.1\n"
        "y = lstm.lstm_forward(gx, h0, c0, w_hh, None, None, False, True, split=4, cooperative=True)[0]\n"
        "torch.cuda.synchronize()\n"
        "print('RETURNED', y.sum().item())\n")
    run = subprocess.run([sys.executable, "-c", body], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "RETURNED" not in run.stdout, run.stdout + run.stderr
    assert "device-side assert" in run.stderr, run.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_bf16_gradients_over_long_sequences(kind):
    """T = 256 in bf16: errors accumulate over the whole recurrence, judged against float64 as always."""
    test = test_lstm_layer_matches_reference if kind == "lstm" else test_gru_layer_matches_reference
    with fusenn.set_backend("triton"):
        test(("triton", torch.device("cuda")), 256, 24, 256, None, torch.bfloat16, False, None, True)

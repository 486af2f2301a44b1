"""CPU routing under `auto`: plain configurations run torch's own kernels (backend "torch"), regularised RNNs
the C++ layers' host code ("cpp") where its CPU kernels are registered, else the reference; the choice is
visible through fusenn.set_logging. The torch path gives torch.nn's results exactly (outputs, states,
gradients, state_dicts both ways). No timings here: benchmarks/ measures speed."""

import logging

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fusenn
import fusenn.reference.philox
import fusenn.testing
from fusenn import dispatch
from fusenn.reference import attention as reference_attention
from fusenn.reference import rnn as reference_rnn

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")


@pytest.fixture
def choices(caplog, monkeypatch):
    """The backend choices made while the test runs, as (op, backend, passed-over text) from fusenn's log."""
    monkeypatch.delenv("FUSENN_BACKEND", raising=False)
    fusenn.set_logging(True)
    caplog.set_level(logging.INFO, logger="fusenn")
    seen = []

    def read():
        seen.clear()
        for record in caplog.records:
            if record.name == "fusenn":
                head, _, passed = record.getMessage().partition(" (passed over ")
                op, _, name = head.partition(": ")
                seen.append((op.split(" ")[0], name, passed[:-1]))  # the text inside "(passed over ...)"
        caplog.clear()
        fusenn.set_logging(True)  # each later choice is logged again, even one already seen
        return list(seen)

    yield read
    fusenn.set_logging(False)


@pytest.fixture
def no_reference(monkeypatch):
    """The reference RNN layers and attention raise if called: proof that another implementation ran."""
    def refuse(*args, **kwargs):
        raise AssertionError("the reference ran")

    for name in ("lstm_layer", "gru_layer"):
        monkeypatch.setattr(reference_rnn, name, refuse)
    monkeypatch.setattr(reference_attention, "scaled_dot_product_attention", refuse)


def _cpp_loaded():
    """Loads the C++ layers' CPU kernels as the tests do (fusenn._C, else a host-only build); None or why not."""
    from conftest import cpp_host_unavailable

    return cpp_host_unavailable()


@pytest.fixture(scope="module", autouse=True)
def cpp_kernels():
    """Every test here sees the C++ kernels loaded wherever they can be (so routing does not depend on test
    order); test_regularised_rnn_falls_back_without_cpp hides them."""
    _cpp_loaded()


def test_backends_table_lists_torch_and_cpp():
    table = fusenn.backends()
    assert table["torch"].usable and "torch" in table["torch"].detail
    assert table["cpp"].detail
    assert dispatch.CPU_ORDER == ("torch", "cpp")


# Which implementation runs

RNNS = [("LSTM", dict(num_layers=2)), ("LSTM", dict(bidirectional=True, proj_size=3)), ("GRU", dict(num_layers=2)),
        ("GRU", dict(bidirectional=True, batch_first=True))]


@pytest.mark.parametrize("mode,kwargs", RNNS, ids=lambda v: str(v))
def test_plain_rnn_runs_torch(choices, no_reference, mode, kwargs):
    m = getattr(fusenn, mode)(5, 7, dropout=0.3 if kwargs.get("num_layers") else 0.0, **kwargs)
    x = torch.randn(4, 3, 5, requires_grad=True)
    m(x)[0].sum().backward()
    m.eval()(x)
    assert {c[:2] for c in choices()} == {(mode.lower(), "torch")}


@pytest.mark.parametrize("mode", ["LSTMCell", "GRUCell"])
def test_cells_run_torch(choices, no_reference, mode):
    getattr(fusenn, mode)(5, 7)(torch.randn(3, 5))
    assert [c[:2] for c in choices()] == [("lstm" if mode == "LSTMCell" else "gru", "torch")]


INSIDE = [dict(zoneout=0.1), dict(recurrent_dropout=0.25), dict(recurrent_dropout=0.25, input_dropout=0.2)]
OUTSIDE = [dict(weight_dropout=0.5), dict(input_dropout=0.2), dict(output_dropout=0.2),
           dict(dropout=0.3, input_dropout=0.2, variational=True)]


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("kwargs", INSIDE, ids=lambda kw: "-".join(kw))
def test_regularisers_inside_the_recurrence_pass_torch_over_and_say_why(choices, mode, kwargs):
    m = getattr(fusenn, mode)(5, 7, 2, **kwargs)
    m(torch.randn(4, 3, 5))
    made = [c for c in choices() if c[0] == mode.lower()]
    want = "cpp" if fusenn.backends()["cpp"].usable else "reference"
    assert [c[1] for c in made] == [want]
    assert "torch: fusenn-only regularisers inside the recurrence: " in made[0][2]
    assert all(k in made[0][2] for k in kwargs if k in ("recurrent_dropout", "zoneout"))
    if want == "reference":
        assert "cpp: " in made[0][2]


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("kwargs", OUTSIDE, ids=lambda kw: "-".join(kw))
def test_regularisers_outside_the_recurrence_run_torch_layer_by_layer(choices, monkeypatch, mode, kwargs):
    """torch's kernel per layer (all directions in one call), fusenn's masks between: the reference's
    numbers for the same seed, and torch's module forward is not what ran."""
    torch.manual_seed(0)
    m = getattr(fusenn, mode)(5, 7, 2, bidirectional=True, **kwargs)
    x = torch.randn(4, 3, 5, requires_grad=True)
    results = []
    for backend in ("auto", "reference"):
        with fusenn.set_backend(backend):
            torch.manual_seed(4)
            y, final = m(x)
            loss = y.square().sum() + sum(f.sum() for f in (final if isinstance(final, tuple) else (final,)))
            results.append([y] + list(torch.autograd.grad(loss, [x] + list(m.parameters()))))
    assert [c[1] for c in choices() if c[0] == mode.lower()] == ["torch", "reference"]
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(getattr(nn, mode), "forward", lambda *a: pytest.fail("torch's module forward ran"))
    m(x)


def test_regularisers_on_packed_input_pass_torch_over(choices):
    packed = pack_padded_sequence(torch.randn(4, 3, 5), [4, 2, 1])
    fusenn.LSTM(5, 7, input_dropout=0.2)(packed)
    made = [c for c in choices() if c[0] == "lstm"]
    assert made[0][1] != "torch" and "torch: fusenn's dropout masks on a PackedSequence input" in made[0][2]


def test_regularised_rnn_falls_back_without_cpp(choices, monkeypatch):
    monkeypatch.setitem(dispatch._STATUS, "cpp", lambda: (False, "fusenn._C was not built: a test says so"))
    assert not fusenn.backends()["cpp"].usable
    fusenn.LSTM(5, 7, recurrent_dropout=0.2)(torch.randn(4, 3, 5))
    made = [c for c in choices() if c[0] == "lstm"]
    assert [c[1] for c in made] == ["reference"]
    assert made[0][2] == ("torch: fusenn-only regularisers inside the recurrence: recurrent_dropout; cpp: fusenn._C "
                          "was not built: a test says so")


def test_regularisers_off_in_eval_run_torch_but_zoneout_does_not(choices):
    fusenn.LSTM(5, 7, 2, input_dropout=0.2, recurrent_dropout=0.3, weight_dropout=0.5).eval()(torch.randn(4, 3, 5))
    assert [c[:2] for c in choices()] == [("lstm", "torch")]
    fusenn.GRU(5, 7, zoneout=0.2).eval()(torch.randn(4, 3, 5))
    made = choices()
    assert made[0][1] != "torch" and "zoneout (its expectation in eval mode)" in made[0][2]


def test_float64_regularised_rnn_takes_the_reference(choices):
    fusenn.LSTM(5, 7, zoneout=0.1, dtype=torch.float64)(torch.randn(4, 3, 5, dtype=torch.float64))
    made = choices()
    assert made[0][1] == "reference"
    if fusenn.backends()["cpp"].usable:
        assert "cpp: the C++ RNN kernels take float16, bfloat16 or float32 inputs, got torch.float64" in made[0][2]


def test_explicit_backends():
    x = torch.randn(4, 3, 5)
    with fusenn.set_backend("torch"):
        fusenn.LSTM(5, 7)(x)
        with pytest.raises(fusenn.BackendError, match="torch: fusenn-only regularisers inside the recurrence: zo"):
            fusenn.LSTM(5, 7, zoneout=0.1)(x)
        fusenn.LSTM(5, 7, 2, input_dropout=0.2, weight_dropout=0.3)(x)  # torch's kernel, auto's masks
        mask = fusenn.functional.dropout_mask((4,), 0.5, seed=1)
        assert torch.equal(mask, fusenn.reference.philox.dropout_mask(4, 0.5, 1))
    with fusenn.set_backend("cpp"):
        if not fusenn.backends()["cpp"].usable:
            with pytest.raises(fusenn.BackendError, match="lstm cannot run on the requested backend \\(cpp: "):
                fusenn.LSTM(5, 7)(x)


def test_reference_stays_selectable(choices, monkeypatch):
    calls = []
    original = reference_rnn.lstm_layer
    monkeypatch.setattr(reference_rnn, "lstm_layer", lambda *a, **k: calls.append(1) or original(*a, **k))
    with fusenn.set_backend("reference"):
        fusenn.LSTM(5, 7, 2)(torch.randn(4, 3, 5))
    assert len(calls) == 2 and [c[:2] for c in choices()] == [("lstm", "reference")]


def test_each_distinct_choice_is_logged_once(choices):
    m = fusenn.LSTM(5, 7)
    for _ in range(3):
        m(torch.randn(4, 3, 5))
    assert len(choices()) == 1
    m(torch.randn(4, 3, 5))
    fusenn.LSTM(5, 7, zoneout=0.1)(torch.randn(4, 3, 5))
    fusenn.LSTM(5, 7, zoneout=0.1)(torch.randn(4, 3, 5))
    assert [c[1] for c in choices() if c[0] == "lstm"] == ["torch", "cpp" if fusenn.backends()["cpp"].usable
                                                           else "reference"]


def test_logging_switch_from_the_environment():
    import subprocess
    import sys

    code = "import torch, fusenn\nfusenn.LSTM(3, 4)(torch.randn(2, 1, 3))\n"
    out = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "FUSENN_LOG": "1"},
                         capture_output=True, text=True, check=True)
    assert "fusenn: lstm on cpu (auto): torch" in out.stderr
    quiet = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "FUSENN_LOG": "0"},
                           capture_output=True, text=True, check=True)
    assert "fusenn:" not in quiet.stderr


def test_attention_and_conv_pool_routing(choices, no_reference):
    q, k, v = (torch.randn(2, 2, 5, 8) for _ in range(3))
    fusenn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    fusenn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.2)  # torch's own dropout
    fusenn.MultiheadAttention(16, 2, batch_first=True)(*(torch.randn(2, 5, 16),) * 3, need_weights=False)
    fusenn.ConvPool2d(3, 4, 3)(torch.randn(1, 3, 9, 9))
    assert {c[:2] for c in choices()} == {("attention", "torch"), ("conv_pool2d", "torch")}


def test_attention_with_a_seed_keeps_fusenns_mask(choices):
    q, k, v = (torch.randn(2, 2, 5, 8) for _ in range(3))
    got = fusenn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.3, seed=5)
    made = choices()
    assert made[0][1] == "reference" and "torch: a seed asks for fusenn's Philox dropout mask" in made[0][2]
    with fusenn.set_backend("reference"):
        assert torch.equal(got, fusenn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.3, seed=5))


def test_attention_still_raises_where_torchs_cpu_kernel_answers():
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 7, 8)
    with pytest.raises(RuntimeError, match="same sequence length"):  # torch's math path's error
        fusenn.functional.scaled_dot_product_attention(q, k, v)


# The torch path gives torch.nn's results exactly

def _leaves_and_grads(module, inp, hx, leaves):
    out, final = module(inp, hx)
    outs = [out.data if hasattr(out, "batch_sizes") else out] + list(final if isinstance(final, tuple) else [final])
    gen = torch.Generator().manual_seed(3)
    sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in outs).backward()
    return outs, [t.grad for t in leaves] + [p.grad for p in module.parameters()]


EXACT = [("LSTM", dict(num_layers=2, bidirectional=True, proj_size=3), "packed"),
         ("LSTM", dict(num_layers=3, dropout=0.4), "padded"),
         ("LSTM", dict(batch_first=True, bias=False), "padded"),
         ("LSTM", dict(num_layers=2), "unbatched"),
         ("GRU", dict(num_layers=2, bidirectional=True, dropout=0.4), "packed"),
         ("GRU", dict(batch_first=True), "padded"),
         ("GRU", dict(num_layers=2, dtype=torch.float64), "padded")]


@pytest.mark.parametrize("mode,kwargs,form", EXACT, ids=lambda v: str(v))
def test_torch_path_equals_torch_nn(mode, kwargs, form):
    """Outputs, final states and every gradient bitwise equal to torch.nn's with the same state_dict and
    the same generator state (so torch's between-layer dropout draws the same masks)."""
    dtype = kwargs.get("dtype", torch.float32)
    theirs = getattr(nn, mode)(5, 7, **kwargs)
    mine = getattr(fusenn, mode)(5, 7, **kwargs)
    mine.load_state_dict(theirs.state_dict())
    bf = kwargs.get("batch_first", False)
    x = torch.randn((6, 5) if form == "unbatched" else (3, 6, 5) if bf else (6, 3, 5), dtype=dtype)
    layers = kwargs.get("num_layers", 1) * (2 if kwargs.get("bidirectional") else 1)
    rows = () if form == "unbatched" else (3,)
    sizes = [kwargs.get("proj_size") or 7] + [7] * (mode == "LSTM")
    hidden = [torch.randn((layers, *rows, s), dtype=dtype) for s in sizes]
    results = []
    for module in (mine, theirs):
        leaves = [x.clone().requires_grad_()] + [h.clone().requires_grad_() for h in hidden]
        inp = leaves[0] if form != "packed" else pack_padded_sequence(leaves[0], [6, 2, 4], enforce_sorted=False)
        hx = tuple(leaves[1:]) if mode == "LSTM" else leaves[1]
        torch.manual_seed(9)
        results.append(_leaves_and_grads(module, inp, hx, leaves))
    (outs, grads), (ref_outs, ref_grads) = results
    for a, b in zip(outs + grads, ref_outs + ref_grads):
        assert torch.equal(a, b)
    theirs.load_state_dict(mine.state_dict())


@pytest.mark.parametrize("mode", ["LSTMCell", "GRUCell"])
def test_torch_path_cells_equal_torch_nn(mode):
    theirs = getattr(nn, mode)(5, 7)
    mine = getattr(fusenn, mode).from_torch(theirs)
    x = torch.randn(3, 5)
    got, want = [], []
    for module, sink in ((mine, got), (theirs, want)):
        leaf = x.clone().requires_grad_()
        out = module(leaf)
        (out[0] * 2 + out[1] if isinstance(out, tuple) else out).sum().backward()
        sink += list(out) if isinstance(out, tuple) else [out]
        sink += [leaf.grad] + [p.grad for p in module.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_torch_path_sdpa_and_conv_pool_equal_torch():
    import torch.nn.functional as F

    q, k, v = (torch.randn(2, 4, 9, 16, requires_grad=True) for _ in range(3))
    mask = torch.rand(2, 1, 9, 9) > 0.3
    for kwargs in (dict(is_causal=True), dict(attn_mask=mask), dict(scale=0.2)):
        got = fusenn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
        want = F.scaled_dot_product_attention(q, k, v, **kwargs)
        assert torch.equal(got, want)
        assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(got.sum(), (q, k, v)),
                                                      torch.autograd.grad(want.sum(), (q, k, v))))
    conv = fusenn.ConvPool2d(3, 4, 3, padding=1, activation="gelu", pool="avg", pool_kernel_size=2)
    seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GELU(), nn.AvgPool2d(2))
    seq[0].load_state_dict(conv.state_dict())
    x = torch.randn(2, 3, 10, 11, requires_grad=True)
    got, want = conv(x), seq(x)
    assert torch.equal(got, want)
    assert torch.equal(torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(want.sum(), x)[0])


def test_torch_path_traces_fullgraph(choices):
    torch._dynamo.reset()
    m = fusenn.GRU(5, 7, 2)
    x = torch.randn(4, 3, 5)
    with torch._dynamo.config.patch(allow_rnn=True):
        got = torch.compile(m, fullgraph=True, backend="eager")(x)
    assert [c[:2] for c in choices()] == [("gru", "torch")]
    torch.testing.assert_close(got, nn.GRU.forward(m, x), rtol=0, atol=0)
    torch._dynamo.reset()


def test_torch_layer_by_layer_path_traces_fullgraph(choices):
    """Masks outside the recurrence, torch's kernel per layer: one graph, the eager numbers for the same seed."""
    torch._dynamo.reset()
    m = fusenn.LSTM(5, 7, 2, input_dropout=0.2, dropout=0.3, variational=True, weight_dropout=0.4)
    x = torch.randn(4, 3, 5)
    compiled = torch.compile(m, fullgraph=True, backend="eager")  # no Dynamo setting
    torch.manual_seed(2)
    got = compiled(x)
    torch.manual_seed(2)
    want = m(x)
    made = {c[:2] for c in choices() if c[0] == "lstm"}
    if tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < (2, 13):
        # torch 2.11's Dynamo mis-traces this path (nn/rnn.py _native): the C++ layers, same masks, serve instead
        assert made & {("lstm", "cpp"), ("lstm", "reference")}
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    else:
        assert made == {("lstm", "torch")}
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch._dynamo.reset()


# The C++ layers' host code for regularised configurations

def test_regularised_rnn_runs_cpp_where_loaded(choices):
    why = _cpp_loaded()
    if why is not None and "no C++ compiler" in why:
        pytest.skip(why)
    assert why is None, why
    assert fusenn.backends()["cpp"].usable
    for mode in ("LSTM", "GRU"):
        torch.manual_seed(0)
        m = getattr(fusenn, mode)(5, 7, 2, bidirectional=True, zoneout=0.1, recurrent_dropout=0.2,
                                  input_dropout=0.2, weight_dropout=0.3)
        x = torch.randn(4, 3, 5, requires_grad=True)
        results = []
        for backend in ("auto", "reference"):
            with fusenn.set_backend(backend):
                torch.manual_seed(4)
                y = m(x)[0]
                results.append([y] + list(torch.autograd.grad(y.square().sum(), [x] + list(m.parameters()))))
        assert [c[1] for c in choices() if c[0] == mode.lower()] == ["cpp", "reference"]
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sliced", [False, True])
def test_grad_matmul_hands_onednn_dense_operands(monkeypatch, sliced):
    """oneDNN's linear takes its reference kernel (~100x slower) for a weight neither row- nor column-major, e.g.
    a column slice (the GRU's [dr, dz] once was): _grad_matmul hands it dense operands only, and the product is
    the float64 one's."""
    from fusenn.ops import rnn as ops

    seen, real = [], ops._onednn_linear

    def spy(a, weight, bias=None):
        seen.append(a.is_contiguous() and (weight.is_contiguous() or weight.t().is_contiguous()))
        return real(a, weight, bias)

    monkeypatch.setattr(ops, "_onednn_linear", spy)
    torch.manual_seed(0)
    g = torch.randn(50, 32, 3 * 129)[..., :2 * 129] if sliced else torch.randn(50, 32, 2 * 129)
    x = torch.randn(50, 32, 129)
    got = ops._grad_matmul(g, x, torch.float32)
    want = g.reshape(-1, 2 * 129).double().t() @ x.reshape(-1, 129).double()
    torch_fp32 = g.reshape(-1, 2 * 129).t() @ x.reshape(-1, 129)
    fusenn.testing.assert_close(got, want, torch_fp32, factor=4.0, name="weight gradient")
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        assert seen == [True]


@pytest.mark.parametrize("mode,kwargs", [("LSTM", dict(zoneout=0.1, recurrent_dropout=0.2)),
                                         ("LSTM", dict(recurrent_dropout=0.3, proj_size=65)),
                                         ("GRU", dict(zoneout=0.2, recurrent_dropout=0.1, bidirectional=True))])
def test_cpp_layers_with_onednn_packed_weights_match_float64(choices, mode, kwargs):
    """At T >= 8 and B x H sizes past the at::mm cut-over (T9 B17 H129) the C++ layers' per-step GEMMs run on
    oneDNN's packed copy of W_hh (csrc/rnn_host.cpp, step_rhs): outputs and every gradient against float64,
    within 4x the reference's own fp32 error."""
    why = _cpp_loaded()
    if why is not None and "no C++ compiler" in why:
        pytest.skip(why)
    assert why is None, why
    torch.manual_seed(0)
    m = getattr(fusenn, mode)(33, 129, 2, **kwargs)
    x = torch.randn(9, 17, 33, requires_grad=True)
    results = []
    for backend, dtype in (("auto", torch.float32), ("reference", torch.float32), ("reference", torch.float64)):
        with fusenn.set_backend(backend):
            model, inputs = m.to(dtype), x.detach().to(dtype).requires_grad_()
            torch.manual_seed(4)
            y = model(inputs)[0]
            grads = torch.autograd.grad(y.square().sum(), [inputs] + list(model.parameters()))
            results.append([t.detach().double() for t in (y, *grads)])
    m.float()
    assert [c[1] for c in choices() if c[0] == mode.lower()][0] == "cpp"
    fusenn.testing.assert_close(results[0], results[2], results[1], factor=4.0, name=mode)


@pytest.mark.parametrize("reverse,lengths", [(False, None), (True, [9, 1, 5])])
def test_cpp_gru_backward_takes_the_gates_its_forward_kept(reverse, lengths):
    """On CPU tensors the C++ GRU's forward keeps every step's activated gates (r, z and n's raw product) when
    saving, and its backward takes them instead of recomputing them with a GEMM over the saved states: the
    same gradients as the recomputing backward, within fp32 rounding, and the float64 reference's; the GEMM over
    T * B rows is not called."""
    why = _cpp_loaded()
    if why is not None and "no C++ compiler" in why:
        pytest.skip(why)
    assert why is None, why
    from fusenn.ops import rnn as ops

    torch.manual_seed(3)
    T, B, H = 9, 3, 33
    gx, h0 = torch.randn(T, B, 3 * H), 0.5 * torch.randn(B, H)
    w, b = torch.randn(3 * H, H) * H ** -0.5, torch.randn(3 * H) * 0.1
    lens = torch.tensor(lengths) if lengths else None
    regs = (0.2, torch.tensor(5), 0.1, torch.tensor(6))
    y, h_n, hs, gates = ops.gru_layer_forward(gx, h0, w, b, lens, reverse, True, *regs, "cuda")
    assert gates.shape == (T, B, 3 * H) and bool(((gates[..., :2 * H] > 0) & (gates[..., :2 * H] < 1)).all())
    dy, dh_n = torch.randn(T, B, H), torch.randn(B, H)
    recomputed = ops.gru_layer_backward(dy, dh_n, gx, w, b, lens, reverse, hs, ops._empty(gx.device), *regs, True,
                                        True, "cuda")

    def gemm_rows(*args):  # the first operand's rows of every GEMM the C++ backward runs (the profiler sees them)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            out = ops.gru_layer_backward(*args)
        return out, [e.input_shapes[0][0] for e in prof.events()
                     if e.name in ("aten::mm", "aten::addmm", "mkldnn::_linear_pointwise") and e.input_shapes
                     and e.input_shapes[0]]

    args = (dy, dh_n, gx, w, b, lens, reverse, hs)
    _, rows = gemm_rows(*args, ops._empty(gx.device), *regs, False, False, "cuda")
    assert T * B in rows, rows  # the recomputing backward's GEMM over every step's state
    kept, rows = gemm_rows(*args, gates, *regs, True, True, "cuda")
    assert T * B not in rows and rows.count(B) == T, rows  # the steps' GEMMs, and the weight gradient's
    for got, want in zip(kept, recomputed):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    exact = [x.double() for x in (gx, h0, w, b)]
    for x in exact:
        x.requires_grad_()
    with torch.random.fork_rng():
        ref_y, ref_h = reference_rnn.gru_layer(*exact, lens, reverse, (0.2, 5), (0.1, 6))
    want = torch.autograd.grad((ref_y * dy.double()).sum() + (ref_h * dh_n.double()).sum(), exact)
    fusenn.testing.assert_close(list(kept), list(want), name="GRU gradients with kept gates")


@pytest.mark.parametrize("backend", ["auto", "cpp", "reference"])
@pytest.mark.parametrize("mode,kwargs", [("LSTM", dict(zoneout=0.1)), ("LSTM", dict(recurrent_dropout=0.2)),
                                         ("GRU", dict(zoneout=0.2, num_layers=2)), ("LSTM", {})])
def test_rnn_modules_jit_trace_in_eval(backend, mode, kwargs):
    """torch.jit.trace of an eval-mode module on each CPU backend: the traced module answers as the eager one on
    new input (the persistent kernels' launch plan, which the tracer cannot record, passes itself over)."""
    if backend == "cpp":
        why = _cpp_loaded()
        if why is not None and "no C++ compiler" in why:
            pytest.skip(why)
        assert why is None, why
    torch.manual_seed(0)
    m = getattr(fusenn, mode)(4, 8, **kwargs).eval()
    with fusenn.set_backend(backend):
        traced = torch.jit.trace(m, torch.randn(5, 3, 4), check_trace=False)
        x = torch.randn(5, 3, 4)
        torch.testing.assert_close(traced(x), m(x))


@pytest.mark.parametrize("numel,p,seed,offset", [(1, 0.5, 0, 0), (40000, 0.1, 7, 3), (4097, 0.9, 2**40 + 1, 2**32 - 5),
                                                 (0, 0.3, 1, 0), (33, 1.0, 2**62 + 9, 0)])
def test_cpp_dropout_mask_is_the_reference_bit_for_bit(choices, numel, p, seed, offset):
    from fusenn.reference import philox

    why = _cpp_loaded()
    if why is not None and "no C++ compiler" in why:
        pytest.skip(why)
    with fusenn.set_backend("cpp"):
        got = fusenn.functional.dropout_mask((numel,), p, seed, offset)
    assert [c[:2] for c in choices()] == [("dropout_mask", "cpp")]
    assert torch.equal(got, philox.dropout_mask(numel, p, seed, offset))


@pytest.mark.parametrize("shape,bias", [((7, 3, 33), True), ((1, 1, 5), False), ((4, 0, 9), True), ((129, 2, 16), True),
                                        ((0, 3, 4), False), ((129, 40, 128), True), ((33, 7, 1000), False)])
def test_cpp_input_projection_is_f_linear(shape, bias):
    """The C++ layers' input GEMM through oneDNN (CPU fp32, backend cpp, at least _ONEDNN_MIN_MACS multiply-adds)
    gives F.linear's output and gradients (float64 reference), empty batches and sequences included; smaller
    GEMMs, other backends and dtypes take F.linear itself."""
    from fusenn.ops import rnn as ops

    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    w = torch.randn(12, shape[-1], requires_grad=True)
    b = torch.randn(12, requires_grad=True) if bias else None
    leaves = [x, w] + ([b] if bias else [])
    y = ops.input_projection(x, w, b, "cpp")
    onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    large = x.numel() * w.shape[0] >= ops._ONEDNN_MIN_MACS  # (empty inputs: F.linear)
    assert (type(y.grad_fn).__name__ == "_OneDNNLinearBackward") == (onednn and large)
    grad = torch.randn_like(y)
    got = [y] + list(torch.autograd.grad(y, leaves, grad))
    doubles = [t.detach().double().requires_grad_() for t in leaves]
    ref_y = torch.nn.functional.linear(doubles[0], doubles[1], doubles[2] if bias else None)
    want = [ref_y] + list(torch.autograd.grad(ref_y, doubles, grad.double()))
    torch_y = torch.nn.functional.linear(x, w, b)  # PyTorch's own fp32 error sets the tolerance
    baseline = [torch_y] + list(torch.autograd.grad(torch_y, leaves, grad))
    assert all(g.dtype == torch.float32 for g in got)
    fusenn.testing.assert_close(got, want, baseline, factor=4.0, name="input projection")
    for backend, dtype in (("reference", torch.float32), ("cpp", torch.float64)):
        plain = ops.input_projection(x.to(dtype), w.to(dtype), b.to(dtype) if bias else None, backend)
        assert "OneDNN" not in type(plain.grad_fn).__name__

"""torch.compile(fullgraph=True) traces fusenn's modules: the backend choice is made at trace time."""

import pytest
import torch

import fusenn

KERNEL_BACKENDS = ("triton", "cuda", "cpp-host")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled(fn):
    return torch.compile(fn, fullgraph=True, backend="eager")


def test_conv_pool_fullgraph():
    m = fusenn.ConvPool2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 9, 11)
    torch.testing.assert_close(compiled(m)(x), m(x))


def test_attention_fullgraph():
    q, k, v = (torch.randn(1, 2, 5, 16) for _ in range(3))
    f = compiled(lambda q, k, v: fusenn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    torch.testing.assert_close(f(q, k, v), fusenn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_lstm_fullgraph_without_dynamo_settings():
    """No Dynamo setting: fusenn.LSTM is an nn.RNNBase, which Dynamo does not refuse as it does nn.LSTM."""
    m = fusenn.LSTM(5, 7, 2, bidirectional=True)
    x = torch.randn(3, 2, 5)
    with fusenn.set_backend("reference"):
        torch.testing.assert_close(compiled(m)(x)[0], m(x)[0])


# The Triton RNN path: the layers are torch.library ops (fusenn::lstm_layer_* / gru_layer_*), so
# torch.compile traces them whole; under the interpreter on CPU the kernels run when the graph does.

def _grads(module, x, out):
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    loss = sum((t.float() * torch.linspace(-1, 1, t.numel(), device=t.device).view(t.shape)).sum() for t in leaves)
    return leaves, torch.autograd.grad(loss, [x] + list(module.parameters()))


def _rnn_cases():
    return [pytest.param(lambda: fusenn.LSTM(3, 5, 2, bidirectional=True, proj_size=2), id="lstm-bi-2layer-proj"),
            pytest.param(lambda: fusenn.LSTM(3, 5, batch_first=True), id="lstm-batch_first"),
            pytest.param(lambda: fusenn.GRU(3, 5, 2, bidirectional=True), id="gru-bi-2layer")]


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("make", _rnn_cases())
def test_rnn_triton_fullgraph_forward_backward(kernel_backend, make, backend):
    torch.manual_seed(0)
    _, device = kernel_backend
    m = make().to(device)
    x = torch.randn(3, 2, 3, device=device, requires_grad=True)
    counters = torch._dynamo.utils.counters
    counters.clear()
    got, got_grads = _grads(m, x, torch.compile(m, fullgraph=True, backend=backend)(x))
    assert counters["stats"]["unique_graphs"] == 1
    want, want_grads = _grads(m, x, m(x))
    for a, b in zip(got + list(got_grads), want + list(want_grads)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_rnn_triton_graph_holds_the_registered_ops(kernel_backend):
    """The compiled graph calls fusenn's ops (not the reference's torch ops, not a graph break)."""
    seen = []
    _, device = kernel_backend

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    for m in (fusenn.LSTM(3, 4, proj_size=2), fusenn.GRU(3, 4)):
        torch.compile(m.to(device), fullgraph=True, backend=backend)(torch.randn(2, 1, 3, device=device))
    assert any("fusenn.lstm_layer_forward" in s for s in seen), seen
    assert any("fusenn.gru_layer_forward" in s for s in seen), seen


@pytest.mark.parametrize("enforce_sorted", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_rnn_packed_input_traces_fullgraph(kernel_backend, kind, enforce_sorted):
    """PackedSequence in and out under fullgraph (torch's own nn.LSTM cannot: it guards on batch_sizes'
    data): the packed layout is built from shapes. Outputs, final states and gradients equal eager's for
    several length patterns through one compiled module."""
    _, device = kernel_backend
    torch.manual_seed(0)
    m = (fusenn.LSTM(3, 4, 2, bidirectional=True, proj_size=2) if kind == "lstm" else
         fusenn.GRU(3, 4, 2, bidirectional=True)).to(device)
    compiled_m = torch.compile(m, fullgraph=True, backend="eager")
    for lengths in ([5, 3, 2], [5, 4, 1], [1, 1, 1]):
        order = [0, 1, 2] if enforce_sorted else [2, 0, 1]
        x = torch.randn(max(lengths), 3, 3, device=device, requires_grad=True)

        def run(module):
            packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor(lengths)[order],
                                                             enforce_sorted=enforce_sorted)
            out, hidden = module(packed)
            return (out.data,) + (tuple(hidden) if kind == "lstm" else (hidden,))

        inputs = [x] + list(m.parameters())
        _assert_identical(_outputs_and_grads(run(compiled_m), inputs), _outputs_and_grads(run(m), inputs))


def _opcheck_cases(device, impl):
    T, B, H, P = 2, 3, 3, 2
    g = torch.Generator().manual_seed(0)

    def r(*shape, grad=True):
        return (torch.randn(*shape, generator=g) * 0.5).to(device).requires_grad_(grad)

    def seed(value):  # the ops take seeds as 0-d int64 tensors
        return torch.tensor(value, dtype=torch.int64)

    lengths = torch.tensor([2, 1, 2], device=device)
    ops = torch.ops.fusenn
    yield "lstm_fwd", ops.lstm_layer_forward.default, (
        r(T, B, 4 * H), r(B, P), r(B, H), r(4 * H, P), r(P, H), lengths, True, True, 0.25, seed(7), 0.5, seed(11),
        impl)
    yield "lstm_fwd_plain", ops.lstm_layer_forward.default, (
        r(T, B, 4 * H), r(B, H), r(B, H), r(4 * H, H), None, None, False, True, None, None, 0.3, None, impl)
    yield "lstm_fwd_nograd", ops.lstm_layer_forward.default, (
        r(T, B, 4 * H, grad=False), r(B, H, grad=False), r(B, H, grad=False), r(4 * H, H, grad=False), None, None,
        False, False, None, None, None, None, impl)
    yield "gru_fwd", ops.gru_layer_forward.default, (r(T, B, 3 * H), r(B, H), r(3 * H, H), r(3 * H), lengths, True,
                                                      True, 0.25, seed(7), 0.5, seed(11), impl)
    yield "gru_fwd_nobias", ops.gru_layer_forward.default, (r(T, B, 3 * H), r(B, H), r(3 * H, H), None, None, False,
                                                             True, None, None, 0.3, None, impl)
    # The backward ops have no derivative of their own: check them on inputs that do not require grad.
    gx, h0, c0, w, wr = (r(T, B, 4 * H, grad=False), r(B, P, grad=False), r(B, H, grad=False),
                         r(4 * H, P, grad=False), r(P, H, grad=False))
    _, _, _, hs, cs, ms, gates, zo_keep = ops.lstm_layer_forward(gx, h0, c0, w, wr, lengths, False, True, 0.25, seed(7),
                                                                 None, None, impl)
    yield "lstm_bwd", ops.lstm_layer_backward.default, (
        r(T, B, P, grad=False), r(B, P, grad=False), r(B, H, grad=False), gx, w, wr, lengths, False, hs, cs, ms,
        gates, zo_keep, 0.25, seed(7), None, None, True, True, impl)
    yield "lstm_bwd_no_weights", ops.lstm_layer_backward.default, (
        r(T, B, P, grad=False), r(B, P, grad=False), r(B, H, grad=False), gx, w, wr, lengths, False, hs, cs, ms,
        gates, zo_keep, 0.25, seed(7), None, None, False, False, impl)
    gx, h0, w, b = r(T, B, 3 * H, grad=False), r(B, H, grad=False), r(3 * H, H, grad=False), r(3 * H, grad=False)
    _, _, hs, gates = ops.gru_layer_forward(gx, h0, w, b, None, True, True, 0.25, seed(7), 0.5, seed(11), impl)
    yield "gru_bwd", ops.gru_layer_backward.default, (
        r(T, B, H, grad=False), r(B, H, grad=False), gx, w, b, None, True, hs, gates, 0.25, seed(7), 0.5, seed(11),
        True, False, impl)


@pytest.mark.parametrize("case", ["lstm_fwd", "lstm_fwd_plain", "lstm_fwd_nograd", "gru_fwd", "gru_fwd_nobias",
                                  "lstm_bwd", "lstm_bwd_no_weights",
                                  "gru_bwd"])
def test_rnn_ops_opcheck(kernel_backend, case):
    op, args = next((op, args) for name, op, args in _opcheck_cases(kernel_backend[1], kernel_backend[0])
                    if name == case)
    torch.library.opcheck(op, args)


# torch.func and higher-order gradients through the Triton RNN path.

def test_rnn_triton_torch_func_grad_and_vmap(kernel_backend):
    _, device = kernel_backend
    torch.manual_seed(0)
    m = fusenn.LSTM(3, 4).to(device)
    x = torch.randn(2, 2, 3, device=device)
    params = dict(m.named_parameters())
    got = torch.func.grad(lambda p: torch.func.functional_call(m, p, (x,))[0].sum())(params)
    want = torch.autograd.grad(m(x)[0].sum(), list(params.values()))
    for a, b in zip(got.values(), want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    xs = torch.randn(2, 2, 2, 3, device=device)
    with torch.no_grad():
        batched = torch.func.vmap(lambda x: m(x)[0])(xs)
        torch.testing.assert_close(batched, torch.stack([m(x)[0] for x in xs]), rtol=0, atol=0)


@pytest.mark.parametrize("make", [lambda: fusenn.LSTM(3, 4, proj_size=2), lambda: fusenn.GRU(3, 4)],
                         ids=["lstm", "gru"])
def test_rnn_triton_double_backward_raises(kernel_backend, make):
    _, device = kernel_backend
    m = make().to(device)
    x = torch.randn(2, 2, 3, device=device, requires_grad=True)
    gx, = torch.autograd.grad(m(x)[0].pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="not differentiable .*double backward"):
        gx.sum().backward()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.func.grad(lambda x: torch.func.grad(lambda x: m(x)[0].pow(2).sum())(x).sum())(x.detach())


# Dropout under torch.compile. Seeds reach the ops as 0-d int64 tensors: drawn in the graph by
# fusenn.ops.draw_seed_tensor (torch.randint, so Dynamo keeps the RNG op and torch.manual_seed repeats a
# compiled run) and read by the kernels, inside the custom ops, which Dynamo does not enter; a call with dropout or a
# regulariser therefore traces whole, and draws the same masks as eager for the same generator state.

@pytest.fixture(params=["reference", "triton"])
def seeded_path(request, device):
    """(backend, device) for the reference and the Triton paths; the backend is set for the test."""
    status = fusenn.backends()[request.param]
    if not status.usable:
        pytest.skip(f"{request.param} backend unusable here: {status.detail}")
    with fusenn.set_backend(request.param):
        yield request.param, device


def _after_seed(fn, *args, seed=0):
    torch.manual_seed(seed)
    return fn(*args)


def _outputs_and_grads(out, inputs):
    outs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    loss = sum((t.float() * torch.linspace(-1, 1, t.numel(), device=t.device).view(t.shape)).sum() for t in outs)
    return [t.detach() for t in outs] + list(torch.autograd.grad(loss, inputs))


def _assert_identical(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def _count_graphs(backend):
    """A compile backend that counts the graphs it receives and the calls to torch.randint in them."""
    seen = dict(graphs=0, randint=0)

    def compiler(gm, example_inputs):
        seen["graphs"] += 1
        seen["randint"] += sum("randint" in str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return torch._dynamo.backends.registry.lookup_backend(backend)(gm, example_inputs)

    return compiler, seen


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_dropout_fullgraph_matches_eager(seeded_path, backend):
    _, device = seeded_path
    x = torch.randn(5, 33, device=device, requires_grad=True)

    def f(x):
        return fusenn.functional.dropout(x, 0.3)

    compiler, seen = _count_graphs(backend)
    c = torch.compile(f, fullgraph=True, backend=compiler)
    got = _outputs_and_grads(_after_seed(c, x), [x])
    _assert_identical(got, _outputs_and_grads(_after_seed(f, x), [x]))
    assert not torch.equal(got[0], _after_seed(c, x, seed=1))  # the seed is drawn per call, not baked in
    assert seen["graphs"] == 1 and seen["randint"] == 1, seen


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_dropout_fullgraph_with_explicit_seed(seeded_path, backend):
    """A Python int seed (a constant of the graph) and a seed tensor passed in both trace and give the
    reference's mask for that seed."""
    from fusenn.reference import philox

    _, device = seeded_path
    x = torch.randn(4, 17, device=device)
    keep = philox.dropout_mask(x.numel(), 0.4, 1234).view(x.shape).to(device)
    want = x * keep / 0.6
    by_int = torch.compile(lambda x: fusenn.functional.dropout(x, 0.4, seed=1234), fullgraph=True, backend=backend)
    torch.testing.assert_close(by_int(x), want, rtol=0, atol=0)
    by_tensor = torch.compile(lambda x, s: fusenn.functional.dropout(x, 0.4, seed=s), fullgraph=True,
                              backend=backend)
    torch.testing.assert_close(by_tensor(x, torch.tensor(1234)), want, rtol=0, atol=0)
    assert torch.equal(fusenn.functional.dropout(x, 0.4, seed=torch.tensor(1234)), want)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_sdpa_dropout_fullgraph_matches_eager(seeded_path, backend):
    _, device = seeded_path
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 6, 8, generator=g).to(device).requires_grad_() for _ in range(3))

    def f(q, k, v):
        return fusenn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True)

    compiler, seen = _count_graphs(backend)
    c = torch.compile(f, fullgraph=True, backend=compiler)
    got = _outputs_and_grads(_after_seed(c, q, k, v), [q, k, v])
    _assert_identical(got, _outputs_and_grads(_after_seed(f, q, k, v), [q, k, v]))
    assert not torch.equal(got[0], _after_seed(c, q, k, v, seed=1))
    assert seen["graphs"] == 1 and seen["randint"] == 1, seen


_ALL_MASKS = dict(dropout=0.3, input_dropout=0.2, output_dropout=0.25, recurrent_dropout=0.35, zoneout=0.2)


def _lstm_case(device, mode="LSTM", **kwargs):
    torch.manual_seed(0)
    m = getattr(fusenn, mode)(3, 4, 2, bidirectional=True, **kwargs).to(device).train()
    x = torch.randn(3, 2, 3, device=device, requires_grad=True)  # padded input (T, B, I)
    return m, x, [x] + list(m.parameters())


@pytest.mark.parametrize("mode,backend", [("LSTM", "eager"), ("LSTM", "aot_eager"), ("GRU", "aot_eager")])
def test_rnn_regularisers_fullgraph_matches_eager(seeded_path, mode, backend):
    """Training mode with between-layer, input, output and recurrent dropout and zoneout: one graph, one
    seed drawn in it, outputs and every gradient identical to eager after the same torch.manual_seed."""
    m, x, inputs = _lstm_case(seeded_path[1], mode, **_ALL_MASKS)
    compiler, seen = _count_graphs(backend)
    got = _outputs_and_grads(_after_seed(torch.compile(m, fullgraph=True, backend=compiler), x), inputs)
    _assert_identical(got, _outputs_and_grads(_after_seed(m, x), inputs))
    assert seen["graphs"] == 1 and seen["randint"] == 1, seen


def test_lstm_variational_weight_dropout_fullgraph_matches_eager(seeded_path):
    """The other mask kinds: time-locked (variational) dropout and DropConnect on W_hh, with a projection."""
    m, x, inputs = _lstm_case(seeded_path[1], variational=True, weight_dropout=0.3, proj_size=2, **_ALL_MASKS)
    got = _outputs_and_grads(_after_seed(torch.compile(m, fullgraph=True, backend="eager"), x), inputs)
    _assert_identical(got, _outputs_and_grads(_after_seed(m, x), inputs))


def test_compiled_lstm_run_repeats_under_manual_seed():
    """torch.manual_seed repeats a compiled run, the next draw gives other masks, and eval mode (zoneout's
    expectation, no draw) is deterministic."""
    torch.manual_seed(0)
    m = fusenn.LSTM(3, 4, input_dropout=0.2, recurrent_dropout=0.3, zoneout=0.25)
    x = torch.randn(3, 2, 3)
    c = torch.compile(m, fullgraph=True, backend="eager")
    with fusenn.set_backend("reference"), torch.no_grad():
        first = _after_seed(c, x)[0]
        assert torch.equal(_after_seed(c, x)[0], first)
        assert not torch.equal(c(x)[0], first)
        assert not torch.equal(_after_seed(c, x, seed=1)[0], first)
        m.eval()
        torch.testing.assert_close(_after_seed(c, x, seed=1)[0], _after_seed(m, x, seed=2)[0], rtol=0, atol=0)


def test_dropout_ops_opcheck_with_seed_tensor(kernel_backend):
    _, device = kernel_backend
    q, k, v = (torch.randn(1, 2, 5, 8, device=device, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.fusenn.attention_forward.default,
                          (q, k, v, None, 0.25, False, 0.3, torch.tensor(99, dtype=torch.int64)))
    torch.library.opcheck(torch.ops.fusenn.dropout_mask.default,
                          (40, 0.5, torch.tensor(2**62 + 5, dtype=torch.int64), 7, device))


# torch.compile(fullgraph=True) with no Dynamo setting, on a patched model and on each fusenn module alone, on
# the reference and the Triton path (under the interpreter on CPU): outputs and gradients equal eager's.

class FramesModel(torch.nn.Module):
    """A CNN over each frame (Conv2d -> ReLU -> MaxPool2d, which patch fuses) -> LSTM -> self-attention -> head,
    written with torch.nn's modules only."""

    def __init__(self):
        super().__init__()
        self.cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2))
        self.lstm = torch.nn.LSTM(18, 6, batch_first=True)
        self.attention = torch.nn.MultiheadAttention(6, 2, batch_first=True)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, frames):  # (B, T, 1, 6, 6)
        b, t = frames.shape[:2]
        features = self.cnn(frames.flatten(0, 1)).view(b, t, -1)
        y, _ = self.lstm(features)
        a, _ = self.attention(y, y, y, need_weights=False)
        return self.head(a + y)


def _patched_frames_model(device):
    torch.manual_seed(0)
    model = FramesModel().to(device)
    report = fusenn.patch(model)
    assert {name for name, _, _ in report.swapped} == {"cnn.0", "lstm", "attention"}, str(report)
    return model


def _assert_compiled_equals_eager(module, args, backend="aot_eager"):
    """module compiled with fullgraph=True (one graph) against module eager: outputs and the gradients of every
    input that requires grad and of every parameter."""
    inputs = [a for a in torch.utils._pytree.tree_leaves(args) if isinstance(a, torch.Tensor) and a.requires_grad]
    inputs += [p for p in module.parameters() if p.requires_grad]
    compiler, seen = _count_graphs(backend)
    got = _outputs_and_grads(torch.compile(module, fullgraph=True, backend=compiler)(*args), inputs)
    want = _outputs_and_grads(module(*args), inputs)
    assert seen["graphs"] == 1, seen
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_patched_model_compiles_fullgraph_and_matches_eager(seeded_path):
    _, device = seeded_path
    model = _patched_frames_model(device)
    frames = torch.randn(2, 3, 1, 6, 6, device=device, requires_grad=True)
    _assert_compiled_equals_eager(model, (frames,))


def test_patched_model_explain_reports_no_graph_break(seeded_path):
    _, device = seeded_path
    model = _patched_frames_model(device)
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 1, 6, 6, device=device))
    assert explanation.graph_count == 1, explanation
    assert explanation.graph_break_count == 0 and not explanation.break_reasons, explanation.break_reasons


def _alone_cases():
    def rnn_input(batch_first=False):
        return torch.randn(2, 3, 4) if batch_first else torch.randn(3, 2, 4)

    yield "lstm", lambda: fusenn.LSTM(4, 5, 2, bidirectional=True, proj_size=3), lambda: (rnn_input(),)
    yield "lstm-hx", lambda: fusenn.LSTM(4, 5, batch_first=True), lambda: (
        rnn_input(True), (torch.randn(1, 2, 5, requires_grad=True), torch.randn(1, 2, 5, requires_grad=True)))
    yield "gru", lambda: fusenn.GRU(4, 5, 2, bidirectional=True), lambda: (rnn_input(),)
    yield "lstmcell", lambda: fusenn.LSTMCell(4, 5), lambda: (
        torch.randn(2, 4, requires_grad=True), (torch.randn(2, 5), torch.randn(2, 5)))
    yield "grucell", lambda: fusenn.GRUCell(4, 5), lambda: (torch.randn(2, 4, requires_grad=True),)
    yield "mha", lambda: fusenn.MultiheadAttention(6, 2), lambda: (
        torch.randn(3, 2, 6, requires_grad=True), torch.randn(4, 2, 6), torch.randn(4, 2, 6), None, False)
    yield "mha-need_weights", lambda: fusenn.MultiheadAttention(6, 2, batch_first=True), lambda: (
        torch.randn(2, 3, 6, requires_grad=True),) * 3
    yield "convpool", lambda: fusenn.ConvPool2d(2, 3, 3, padding=1), lambda: (
        torch.randn(2, 2, 5, 7, requires_grad=True),)
    yield "convpool-avg-gelu", lambda: fusenn.ConvPool2d(2, 3, 3, activation="gelu", pool="avg"), lambda: (
        torch.randn(1, 2, 6, 6, requires_grad=True),)


@pytest.mark.parametrize("case", [c[0] for c in _alone_cases()])
def test_each_module_compiles_fullgraph_and_matches_eager(seeded_path, case):
    _, device = seeded_path
    make, make_args = next((m, a) for name, m, a in _alone_cases() if name == case)
    torch.manual_seed(0)
    module = make().to(device)

    def to(a):
        if isinstance(a, torch.Tensor):
            return a.detach().to(device).requires_grad_(a.requires_grad)
        return tuple(to(t) for t in a) if isinstance(a, tuple) else a

    _assert_compiled_equals_eager(module, tuple(to(a) for a in make_args()))


class _FlattensAndChecks(torch.nn.Module):
    """User code of the kinds a drop-in must keep working: a forward that calls flatten_parameters (as many
    models written for DataParallel do) and a type test on the RNN."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        self.rnn.flatten_parameters()
        y, _ = self.rnn(x)
        return y * 2 if isinstance(self.rnn, torch.nn.RNNBase) and self.rnn.mode in ("LSTM", "GRU") else y


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_flatten_parameters_and_rnnbase_checks_trace(seeded_path, kind):
    _, device = seeded_path
    torch.manual_seed(0)
    model = _FlattensAndChecks(getattr(torch.nn, kind)(3, 4)).to(device)
    fusenn.patch(model)
    x = torch.randn(2, 1, 3, device=device)
    want = model(x)
    torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="eager")(x), want)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0 and not explanation.break_reasons, explanation.break_reasons


def test_torch_rnns_in_the_same_program_are_left_to_dynamo(seeded_path):
    """fusenn sets no Dynamo flag: torch's own nn.LSTM beside a fusenn one still gets Dynamo's own handling
    (a graph break where allow_rnn is off, as in torch 2.11 to 2.13) and the right answer."""
    _, device = seeded_path
    torch.manual_seed(0)
    model = _TwoLSTMs().to(device)
    x = torch.randn(2, 1, 3, device=device)
    want = model(x)
    torch.testing.assert_close(torch.compile(model, backend="eager")(x), want)
    torch._dynamo.reset()
    reasons = torch._dynamo.explain(model)(x).break_reasons
    assert bool(reasons) == (not torch._dynamo.config.allow_rnn), reasons
    if reasons:
        assert "self.theirs" in reasons[0].user_stack[-1].line, reasons  # the break is at torch's LSTM


class _TwoLSTMs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ours, self.theirs = fusenn.LSTM(3, 4), torch.nn.LSTM(4, 4)

    def forward(self, x):
        y = torch.relu(self.ours(x)[0])
        return self.theirs(y)[0] * 2


def test_patch_report_names_the_modules_no_longer_nn_lstm():
    model = torch.nn.Module()
    model.lstm, model.gru, model.cell = torch.nn.LSTM(3, 4), torch.nn.GRU(3, 4), torch.nn.LSTMCell(3, 4)
    report = fusenn.patch(model)
    assert [name for name, _ in report.notes] == ["lstm", "gru"]
    assert "isinstance(m, nn.LSTM) is False" in str(report) and "isinstance(m, nn.GRU) is False" in str(report)
    assert not isinstance(model.lstm, torch.nn.LSTM) and isinstance(model.lstm, torch.nn.RNNBase)
    assert model.lstm.mode == "LSTM" and model.gru.mode == "GRU"
    assert isinstance(model.cell, torch.nn.LSTMCell)  # the cells stay subclasses: Dynamo traces those

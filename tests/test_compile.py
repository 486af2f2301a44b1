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


@pytest.fixture
def allow_rnn():
    """Dynamo refuses every nn.LSTM / nn.GRU subclass unless allow_rnn is set. config.patch, not
    monkeypatch: on torch 2.11 undoing a monkeypatched config attribute deletes it for later tests."""
    with torch._dynamo.config.patch(allow_rnn=True):
        yield


def test_lstm_fullgraph_with_dynamo_rnn_support(allow_rnn):
    """With allow_rnn set, fusenn's forward traces."""
    m = fusenn.LSTM(5, 7, 2, bidirectional=True)
    x = torch.randn(3, 2, 5)
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
def test_rnn_triton_fullgraph_forward_backward(allow_rnn, kernel_backend, make, backend):
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


def test_rnn_triton_graph_holds_the_registered_ops(allow_rnn, kernel_backend):
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
def test_rnn_packed_input_traces_fullgraph(allow_rnn, kernel_backend, kind, enforce_sorted):
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
    _, _, _, hs, cs, ms = ops.lstm_layer_forward(gx, h0, c0, w, wr, lengths, False, True, 0.25, seed(7), None, None,
                                                 impl)
    yield "lstm_bwd", ops.lstm_layer_backward.default, (
        r(T, B, P, grad=False), r(B, P, grad=False), r(B, H, grad=False), gx, w, wr, lengths, False, hs, cs, ms,
        0.25, seed(7), None, None, True, True, impl)
    yield "lstm_bwd_no_weights", ops.lstm_layer_backward.default, (
        r(T, B, P, grad=False), r(B, P, grad=False), r(B, H, grad=False), gx, w, wr, lengths, False, hs, cs, ms,
        0.25, seed(7), None, None, False, False, impl)
    gx, h0, w, b = r(T, B, 3 * H, grad=False), r(B, H, grad=False), r(3 * H, H, grad=False), r(3 * H, grad=False)
    _, _, hs = ops.gru_layer_forward(gx, h0, w, b, None, True, True, 0.25, seed(7), 0.5, seed(11), impl)
    yield "gru_bwd", ops.gru_layer_backward.default, (
        r(T, B, H, grad=False), r(B, H, grad=False), gx, w, b, None, True, hs, 0.25, seed(7), 0.5, seed(11), True,
        False, impl)


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
def test_rnn_regularisers_fullgraph_matches_eager(allow_rnn, seeded_path, mode, backend):
    """Training mode with between-layer, input, output and recurrent dropout and zoneout: one graph, one
    seed drawn in it, outputs and every gradient identical to eager after the same torch.manual_seed."""
    m, x, inputs = _lstm_case(seeded_path[1], mode, **_ALL_MASKS)
    compiler, seen = _count_graphs(backend)
    got = _outputs_and_grads(_after_seed(torch.compile(m, fullgraph=True, backend=compiler), x), inputs)
    _assert_identical(got, _outputs_and_grads(_after_seed(m, x), inputs))
    assert seen["graphs"] == 1 and seen["randint"] == 1, seen


def test_lstm_variational_weight_dropout_fullgraph_matches_eager(allow_rnn, seeded_path):
    """The other mask kinds: time-locked (variational) dropout and DropConnect on W_hh, with a projection."""
    m, x, inputs = _lstm_case(seeded_path[1], variational=True, weight_dropout=0.3, proj_size=2, **_ALL_MASKS)
    got = _outputs_and_grads(_after_seed(torch.compile(m, fullgraph=True, backend="eager"), x), inputs)
    _assert_identical(got, _outputs_and_grads(_after_seed(m, x), inputs))


def test_compiled_lstm_run_repeats_under_manual_seed(allow_rnn):
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

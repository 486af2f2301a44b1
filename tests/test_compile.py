"""torch.compile(fullgraph=True) traces fusenn's modules: the backend choice is made at trace time."""

import pytest
import torch

import fusenn


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


def test_lstm_fullgraph_with_dynamo_rnn_support(monkeypatch):
    """Dynamo refuses every nn.LSTM subclass unless allow_rnn is set; fusenn's forward then traces."""
    monkeypatch.setattr(torch._dynamo.config, "allow_rnn", True)
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
def test_rnn_triton_fullgraph_forward_backward(monkeypatch, kernel_backend, make, backend):
    monkeypatch.setattr(torch._dynamo.config, "allow_rnn", True)
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


def test_rnn_triton_graph_holds_the_registered_ops(monkeypatch, kernel_backend):
    """The compiled graph calls fusenn's ops (not the reference's torch ops, not a graph break)."""
    monkeypatch.setattr(torch._dynamo.config, "allow_rnn", True)
    seen = []
    _, device = kernel_backend

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    for m in (fusenn.LSTM(3, 4, proj_size=2), fusenn.GRU(3, 4)):
        torch.compile(m.to(device), fullgraph=True, backend=backend)(torch.randn(2, 1, 3, device=device))
    assert any("fusenn.lstm_layer_forward" in s for s in seen), seen
    assert any("fusenn.gru_layer_forward" in s for s in seen), seen


def test_rnn_triton_packed_input_is_not_traced_fullgraph(monkeypatch, kernel_backend):
    """A gap, pinned: PackedSequence input needs the batch size from batch_sizes' data, which Dynamo cannot
    guard on; compile without fullgraph (a graph break) or pad the input. Eager packed input still works."""
    monkeypatch.setattr(torch._dynamo.config, "allow_rnn", True)
    _, device = kernel_backend
    m = fusenn.LSTM(3, 4).to(device)
    p = torch.nn.utils.rnn.pack_padded_sequence(torch.randn(3, 2, 3, device=device), torch.tensor([3, 2]))
    with pytest.raises(Exception):
        torch.compile(m, fullgraph=True, backend="eager")(p)
    got = torch.compile(m, backend="eager")(p)  # graph breaks, same result
    torch.testing.assert_close(got[0].data, m(p)[0].data, rtol=0, atol=0)


def _opcheck_cases(device):
    T, B, H, P = 2, 3, 3, 2
    g = torch.Generator().manual_seed(0)

    def r(*shape, grad=True):
        return (torch.randn(*shape, generator=g) * 0.5).to(device).requires_grad_(grad)

    lengths = torch.tensor([2, 1, 2], device=device)
    ops = torch.ops.fusenn
    yield "lstm_fwd", ops.lstm_layer_forward.default, (
        r(T, B, 4 * H), r(B, P), r(B, H), r(4 * H, P), r(P, H), lengths, True, True, 0.25, 7, 0.5, 11)
    yield "lstm_fwd_plain", ops.lstm_layer_forward.default, (
        r(T, B, 4 * H), r(B, H), r(B, H), r(4 * H, H), None, None, False, True, None, 0, 0.3, None)
    yield "lstm_fwd_nograd", ops.lstm_layer_forward.default, (
        r(T, B, 4 * H, grad=False), r(B, H, grad=False), r(B, H, grad=False), r(4 * H, H, grad=False), None, None,
        False, False, None, 0, None, None)
    yield "gru_fwd", ops.gru_layer_forward.default, (r(T, B, 3 * H), r(B, H), r(3 * H, H), r(3 * H), lengths, True,
                                                      True)
    yield "gru_fwd_nobias", ops.gru_layer_forward.default, (r(T, B, 3 * H), r(B, H), r(3 * H, H), None, None, False,
                                                             True)
    # The backward ops have no derivative of their own: check them on inputs that do not require grad.
    gx, h0, c0, w, wr = (r(T, B, 4 * H, grad=False), r(B, P, grad=False), r(B, H, grad=False),
                         r(4 * H, P, grad=False), r(P, H, grad=False))
    _, _, _, hs, cs, ms = ops.lstm_layer_forward(gx, h0, c0, w, wr, lengths, False, True, 0.25, 7, None, None)
    yield "lstm_bwd", ops.lstm_layer_backward.default, (
        r(T, B, P, grad=False), r(B, P, grad=False), r(B, H, grad=False), gx, w, wr, lengths, False, hs, cs, ms,
        0.25, 7, None, None, True, True)
    yield "lstm_bwd_no_weights", ops.lstm_layer_backward.default, (
        r(T, B, P, grad=False), r(B, P, grad=False), r(B, H, grad=False), gx, w, wr, lengths, False, hs, cs, ms,
        0.25, 7, None, None, False, False)
    gx, h0, w, b = r(T, B, 3 * H, grad=False), r(B, H, grad=False), r(3 * H, H, grad=False), r(3 * H, grad=False)
    _, _, hs = ops.gru_layer_forward(gx, h0, w, b, None, True, True)
    yield "gru_bwd", ops.gru_layer_backward.default, (
        r(T, B, H, grad=False), r(B, H, grad=False), gx, w, b, None, True, hs, True, False)


@pytest.mark.parametrize("case", ["lstm_fwd", "lstm_fwd_plain", "lstm_fwd_nograd", "gru_fwd", "gru_fwd_nobias",
                                  "lstm_bwd", "lstm_bwd_no_weights",
                                  "gru_bwd"])
def test_rnn_ops_opcheck(kernel_backend, case):
    op, args = next((op, args) for name, op, args in _opcheck_cases(kernel_backend[1])
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

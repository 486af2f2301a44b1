"""Regularised LSTM/GRU (fusenn.nn.rnn's keyword-only regularisers and fusenn.reference.rnn's in-recurrence
recurrent_dropout / zoneout): default behaviour is torch's, the Triton kernels agree with the reference
for the same seed (outputs and every gradient), masks have the right statistics and structure, eval mode
is deterministic (zoneout's expectation), and weight_dropout leaves the parameters alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusenn
from fusenn.ops import rnn as ops
from fusenn.reference import rnn as reference
from fusenn.reference.philox import dropout_mask

KERNEL_BACKENDS = ("triton", "cuda", "cpp-host")

ALL_ON = dict(dropout=0.3, input_dropout=0.2, output_dropout=0.25, variational=True, weight_dropout=0.3,
              recurrent_dropout=0.35, zoneout=0.2)


def _grads(module, x, seed, backend, hx=None):
    """Output, final state and the gradients of input and every parameter, on `backend`, after manual_seed."""
    x = x.detach().clone().requires_grad_()
    module.zero_grad()
    torch.manual_seed(seed)
    with fusenn.set_backend(backend):
        y, state = module(x, hx)
    y = y.data if isinstance(y, torch.nn.utils.rnn.PackedSequence) else y
    outs = (y,) + tuple(state)
    g = torch.Generator().manual_seed(1)
    torch.autograd.backward(outs, [torch.randn(o.shape, generator=g) for o in outs])
    return [o.detach() for o in outs] + [x.grad] + [p.grad.clone() for p in module.parameters()]


def _capture_layer_inputs(module):
    """Record the input x of every layer call (after input / between-layer dropout)."""
    seen = []
    layer = type(module)._layer

    def capture(x, *args, **kwargs):
        seen.append(x.detach().clone())
        return layer(x, *args, **kwargs)

    module._layer = capture
    return seen


# Defaults

@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_default_module_is_torchs(mode):
    torch.manual_seed(0)
    theirs = getattr(torch.nn, mode)(5, 7, num_layers=2, bidirectional=True)
    mine = getattr(fusenn, mode).from_torch(theirs)
    zeros = dict(input_dropout=0.0, output_dropout=0.0, variational=False, weight_dropout=0.0)
    explicit = getattr(fusenn, mode)(5, 7, num_layers=2, bidirectional=True, **zeros)
    explicit.load_state_dict(theirs.state_dict())
    assert repr(explicit) == repr(mine)
    x = torch.randn(4, 3, 5)
    for m in (mine, explicit):
        torch.manual_seed(3)
        out = m(x)
        after = torch.rand(3)
        torch.manual_seed(3)
        torch.testing.assert_close(out, theirs(x))
        assert torch.equal(after, torch.rand(3))  # the default forward draws nothing from torch's generator


def test_bad_arguments():
    with pytest.raises(ValueError, match="input_dropout"):
        fusenn.LSTM(5, 7, input_dropout=1.5)
    with pytest.raises(ValueError, match="recurrent_dropout must be below 1"):
        fusenn.LSTM(5, 7, recurrent_dropout=1.0)
    with pytest.raises(ValueError, match="zoneout"):
        fusenn.GRU(5, 7, zoneout=-0.1)
    with pytest.raises(TypeError):
        fusenn.LSTM(5, 7, 1, True, False, 0.0, False, 0, None, None, 0.5)  # keyword-only


# Triton kernels against the reference, same seed

LAYER_CASES = [  # T, B, H, proj, lengths, reverse, recurrent_dropout, zoneout
    pytest.param(5, 3, 7, None, None, False, (0.3, 123), None, id="recurrent"),
    pytest.param(5, 3, 7, None, None, False, None, (0.3, 99), id="zoneout"),
    pytest.param(5, 3, 7, None, None, True, None, (0.3, None), id="zoneout-expectation-reverse"),
    pytest.param(5, 3, 33, 7, [5, 1, 4], True, (0.4, 5), (0.3, 77), id="both-proj-packed-reverse"),
    pytest.param(4, 17, 7, None, [3, 1, 2] * 5 + [1, 4], False, (0.4, 2**40 + 5), (0.5, 2**61 + 7), id="both-B17"),
]


GRU_LAYER_CASES = [  # T, B, H, bias, lengths, reverse, recurrent_dropout, zoneout
    pytest.param(5, 3, 7, True, None, False, (0.3, 123), None, id="recurrent"),
    pytest.param(5, 3, 7, True, None, True, None, (0.3, 99), id="zoneout-reverse"),
    pytest.param(5, 3, 7, False, None, False, None, (0.3, None), id="zoneout-expectation-nobias"),
    pytest.param(5, 3, 33, True, [5, 1, 4], True, (0.4, 5), (0.3, 77), id="both-packed-reverse"),
    pytest.param(4, 17, 7, True, [3, 1, 2] * 5 + [1, 4], False, (0.4, 2**40 + 5), (0.5, 2**61 + 7), id="both-B17"),
]


def _matches_reference(layer, inputs, kernel, rd, zo):
    """layer(*inputs, recurrent_dropout=rd, zoneout=zo) on the kernel backend equals the reference, outputs
    and the gradients of every tensor input, for the same seeds."""
    wrt = [t for t in inputs if t is not None]
    results = []
    for backend in ("reference", kernel):
        with fusenn.set_backend(backend):
            outs = layer(*inputs, recurrent_dropout=rd, zoneout=zo)
        ups = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)).to(o.device) for i, o in enumerate(outs)]
        results.append(list(outs) + list(torch.autograd.grad(outs, wrt, ups)))
    assert not torch.allclose(layer(*inputs)[0], results[0][0])  # the regularisers did something
    for i, (a, b) in enumerate(zip(*results)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6, msg=lambda m: f"result {i}: {m}")


@pytest.mark.parametrize("T,B,H,proj,lengths,reverse,rd,zo", LAYER_CASES)
def test_layer_kernel_matches_reference(kernel_backend, T, B, H, proj, lengths, reverse, rd, zo):
    name, device = kernel_backend
    g = torch.Generator().manual_seed(0)
    P = proj or H
    inputs = [torch.randn(T, B, 4 * H, generator=g), torch.randn(B, P, generator=g), torch.randn(B, H, generator=g),
              torch.randn(4 * H, P, generator=g) * 0.3] + ([torch.randn(P, H, generator=g) * 0.3] if proj else [None])
    inputs = [t.to(device).requires_grad_() if t is not None else None for t in inputs]
    lens = torch.tensor(lengths) if lengths else None
    _matches_reference(lambda *a, **r: ops.lstm_layer(*a, lens, reverse, **r), inputs, name, rd, zo)


@pytest.mark.parametrize("T,B,H,bias,lengths,reverse,rd,zo", GRU_LAYER_CASES)
def test_gru_layer_kernel_matches_reference(kernel_backend, T, B, H, bias, lengths, reverse, rd, zo):
    name, device = kernel_backend
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(T, B, 3 * H, generator=g), torch.randn(B, H, generator=g),
              torch.randn(3 * H, H, generator=g) * 0.3] + ([torch.randn(3 * H, generator=g)] if bias else [None])
    inputs = [t.to(device).requires_grad_() if t is not None else None for t in inputs]
    lens = torch.tensor(lengths) if lengths else None
    _matches_reference(lambda *a, **r: ops.gru_layer(*a, lens, reverse, **r), inputs, name, rd, zo)


MODULE_CASES = [
    pytest.param("LSTM", dict(num_layers=2, bidirectional=True), None, id="lstm-2layers-bidir"),
    pytest.param("LSTM", dict(proj_size=3), [4, 2, 3], id="lstm-proj-packed"),
    pytest.param("GRU", dict(num_layers=2, bidirectional=True), [4, 2, 3], id="gru-2layers-bidir-packed"),
]


@pytest.mark.parametrize("mode,kwargs,lengths", MODULE_CASES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_kernel_matches_reference(kernel_backend, mode, kwargs, lengths, training):
    _, device = kernel_backend
    torch.manual_seed(0)
    regs = dict(ALL_ON, dropout=ALL_ON["dropout"] if kwargs.get("num_layers", 1) > 1 else 0.0)
    m = getattr(fusenn, mode)(5, 7, **kwargs, **regs).to(device).train(training)
    x = torch.randn(4, 3, 5, device=device)
    if lengths:
        x = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
    run = (lambda backend: _packed_grads(m, x, 7, backend)) if lengths else (lambda backend: _grads(m, x, 7, backend))
    ref, ker = run("reference"), run(kernel_backend[0])
    for i, (a, b) in enumerate(zip(ref, ker)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=2e-6, msg=lambda msg: f"result {i}: {msg}")
    torch.testing.assert_close(run("reference"), ref, rtol=0, atol=0)  # manual_seed repeats the run
    with fusenn.set_backend("reference"):
        torch.manual_seed(8)  # another seed: training changes the result, eval (deterministic) does not
        assert torch.allclose(_first(m(x)), ref[0]) == (not training)


def _first(out):
    y = out[0]
    return y.data if isinstance(y, torch.nn.utils.rnn.PackedSequence) else y


def _packed_grads(module, packed, seed, backend):
    data = packed.data.detach().clone().requires_grad_()
    module.zero_grad()
    torch.manual_seed(seed)
    with fusenn.set_backend(backend):
        y, state = module(packed._replace(data=data))
    outs = (y.data,) + tuple(state)
    g = torch.Generator().manual_seed(1)
    torch.autograd.backward(outs, [torch.randn(o.shape, generator=g) for o in outs])
    return [o.detach() for o in outs] + [data.grad] + [p.grad.clone() for p in module.parameters()]


# Mask structure and statistics

@pytest.mark.parametrize("variational", [True, False])
def test_input_and_between_layer_masks(variational):
    p = 0.4
    m = fusenn.LSTM(64, 64, num_layers=2, dropout=p, input_dropout=p, variational=variational)
    seen = _capture_layer_inputs(m)
    torch.manual_seed(0)
    with fusenn.set_backend("reference"):  # fusenn's own layers (auto on CPU runs torch's kernel per layer)
        m(torch.ones(6, 8, 64))
    kept = [x != 0 for x in seen]  # layer 0: the input mask; layer 1: the between-layer mask (outputs are nonzero)
    for k in kept:
        assert abs(k.float().mean().item() - (1 - p)) < 0.04
        assert not torch.equal(k[:, 0], k[:, 1])  # rows differ
        assert (k == k[:1]).all().item() == variational  # locked over time exactly when variational
    torch.testing.assert_close(seen[0][kept[0]], torch.full_like(seen[0][kept[0]], 1 / (1 - p)))
    assert not torch.equal(kept[0], kept[1])  # layers differ


def test_output_dropout_leaves_the_recurrent_path_alone():
    p = 0.5
    m = fusenn.LSTM(5, 32, output_dropout=p, variational=True)
    x = torch.randn(6, 4, 5)
    with fusenn.set_backend("reference"):  # under auto, eval mode (no fusenn regulariser) would run torch's LSTM
        y_eval, (h_eval, c_eval) = m.eval()(x)
        torch.manual_seed(1)
        y, (h, c) = m.train()(x)
    torch.testing.assert_close((h, c), (h_eval, c_eval), rtol=0, atol=0)
    kept = y != 0
    torch.testing.assert_close(y[kept], (y_eval / (1 - p))[kept])
    assert abs(kept.float().mean().item() - (1 - p)) < 0.06 and (kept == kept[:1]).all()


def test_recurrent_dropout_is_a_time_locked_mask_on_h():
    T, B, H, p, seed = 4, 3, 16, 0.3, 42
    g = torch.Generator().manual_seed(0)
    gx, w = torch.randn(T, B, 4 * H, generator=g), torch.randn(4 * H, H, generator=g) * 0.3
    h, c = torch.randn(B, H, generator=g), torch.randn(B, H, generator=g)
    y, h_n, c_n = reference.lstm_layer(gx, h, c, w, recurrent_dropout=(p, seed))
    r = dropout_mask(B * H, p, seed).view(B, H).float() / (1 - p)
    ys = []
    for t in range(T):  # the plain layer, one step at a time, with h * r entering each step
        y_t, h, c = reference.lstm_layer(gx[t:t + 1], h * r, c, w)
        ys.append(y_t[0])
    torch.testing.assert_close((y, h_n, c_n), (torch.stack(ys), h, c))
    big = dropout_mask(64 * 256, p, seed)
    assert abs(big.float().mean().item() - (1 - p)) < 0.02


def test_zoneout_masks_and_eval_expectation():
    p = 0.3
    u_h, u_c = reference.zoneout_update(p, 5, 8, 16, 32, 32, "cpu", torch.float32)
    for u in (u_h, u_c):
        assert abs(u.mean().item() - (1 - p)) < 0.02 and not torch.equal(u[0], u[1])  # fresh every step
    assert not torch.equal(u_h, u_c)  # separate masks for h and c
    # p = 1 freezes the state; p = 0 is the plain LSTM
    g = torch.Generator().manual_seed(0)
    gx, w = torch.randn(3, 2, 28, generator=g), torch.randn(28, 7, generator=g)
    h0, c0 = torch.randn(2, 7, generator=g), torch.randn(2, 7, generator=g)
    y, h, c = reference.lstm_layer(gx, h0, c0, w, zoneout=(1.0, 5))
    torch.testing.assert_close((y, h, c), (h0.expand(3, 2, 7), h0, c0))
    torch.testing.assert_close(reference.lstm_layer(gx, h0, c0, w, zoneout=(0.0, 5)),
                               reference.lstm_layer(gx, h0, c0, w))

    m = fusenn.LSTM(5, 7, zoneout=p).eval()
    x = torch.randn(4, 3, 5)
    torch.manual_seed(0)
    a = m(x)
    torch.manual_seed(1)
    torch.testing.assert_close(m(x), a, rtol=0, atol=0)  # eval is deterministic
    gx = F.linear(x, m.weight_ih_l0, m.bias_ih_l0 + m.bias_hh_l0).detach()
    h = c = torch.zeros(3, 7)
    ys = []
    for t in range(4):  # h = p h_prev + (1 - p) h_new, same for c
        _, h_new, c_new = reference.lstm_layer(gx[t:t + 1], h, c, m.weight_hh_l0.detach())
        h, c = p * h + (1 - p) * h_new, p * c + (1 - p) * c_new
        ys.append(h)
    torch.testing.assert_close((a[0], a[1][0][0], a[1][1][0]), (torch.stack(ys), h, c))


def test_gru_recurrent_dropout_and_zoneout_are_the_lstms():
    """The GRU's recurrent dropout is h * r entering each step's product, zoneout mixes h with the LSTM's
    h mask; p = 1 zoneout freezes the state and p = 0 is the plain GRU; eval gives the expectation."""
    T, B, H, p, seed = 4, 3, 16, 0.3, 42
    g = torch.Generator().manual_seed(0)
    gx, w, b = torch.randn(T, B, 3 * H, generator=g), torch.randn(3 * H, H, generator=g) * 0.3, torch.randn(3 * H)
    h0 = torch.randn(B, H, generator=g)
    r = dropout_mask(B * H, p, seed).view(B, H).float() / (1 - p)
    u = reference.zoneout_update(0.2, 9, T, B, H, H, "cpu", torch.float32)[0]
    y, h_n = reference.gru_layer(gx, h0, w, b, recurrent_dropout=(p, seed), zoneout=(0.2, 9))
    h, ys = h0, []
    for t in range(T):  # one plain step at a time: the product sees h * r, then h mixes with u
        gh = (h * r) @ w.t() + b
        rr, zz = torch.sigmoid(gx[t, :, :H] + gh[:, :H]), torch.sigmoid(gx[t, :, H:2 * H] + gh[:, H:2 * H])
        n = torch.tanh(gx[t, :, 2 * H:] + rr * gh[:, 2 * H:])
        h = u[t] * ((1 - zz) * n + zz * h) + (1 - u[t]) * h
        ys.append(h)
    torch.testing.assert_close((y, h_n), (torch.stack(ys), h))
    torch.testing.assert_close(reference.gru_layer(gx, h0, w, b, zoneout=(1.0, 5)), (h0.expand(T, B, H), h0))
    torch.testing.assert_close(reference.gru_layer(gx, h0, w, b, zoneout=(0.0, 5)), reference.gru_layer(gx, h0, w, b))
    m = fusenn.GRU(5, 7, zoneout=p).eval()
    x = torch.randn(4, 3, 5)
    gx = F.linear(x, m.weight_ih_l0, m.bias_ih_l0).detach()
    h, ys = torch.zeros(3, 7), []
    for t in range(4):  # eval: h = p h_prev + (1 - p) h_new
        h = p * h + (1 - p) * reference.gru_layer(gx[t:t + 1], h, m.weight_hh_l0.detach(), m.bias_hh_l0.detach())[1]
        ys.append(h)
    torch.testing.assert_close(m(x)[0], torch.stack(ys))


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_weight_dropout_leaves_parameters_intact(mode):
    p = 0.5
    torch.manual_seed(0)
    m = getattr(fusenn, mode)(5, 32, num_layers=2, weight_dropout=p)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(4, 3, 5)
    torch.manual_seed(1)
    y, _ = m(x)
    y.sum().backward()
    assert m.state_dict().keys() == before.keys()
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    zero = [m.weight_hh_l0.grad == 0, m.weight_hh_l1.grad == 0]
    for z in zero:
        assert abs(z.float().mean().item() - p) < 0.05  # DropConnect: dropped weights get no gradient
    assert not torch.equal(zero[0], zero[1])  # layers differ
    torch.manual_seed(1)
    torch.testing.assert_close(m(x)[0], y, rtol=0, atol=0)
    assert not torch.allclose(m.eval()(x)[0], y)

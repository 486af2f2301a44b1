"""fusenn.functional.dropout: torch's semantics, masks from Philox, regenerated in backward."""

import pytest
import torch

import fusenn
from fusenn.reference import philox as ref

F = fusenn.functional
KERNEL_BACKENDS = ("triton", "cuda")


@pytest.mark.parametrize("shape", [(7,), (3, 33), (2, 5, 13), (0, 4)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dropout_forward_backward(kernel_backend, shape, dtype):
    _, device = kernel_backend
    p, seed = 0.3, 99
    x = torch.randn(shape, device=device).to(dtype).requires_grad_()
    y = F.dropout(x, p, seed=seed)
    keep = ref.dropout_mask(x.numel(), p, seed).view(shape).to(device)
    expected = x.detach().double() * keep / (1 - p)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), expected, rtol=1e-2 if dtype != torch.float32 else 1e-6, atol=0)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad.double(), g.double() * keep / (1 - p),
                               rtol=1e-2 if dtype != torch.float32 else 1e-6, atol=0)


def test_dropout_non_contiguous_uses_logical_order(kernel_backend):
    _, device = kernel_backend
    x = torch.randn(6, 5, device=device)
    a = F.dropout(x.t(), 0.5, seed=3)
    b = F.dropout(x.t().contiguous(), 0.5, seed=3)
    assert torch.equal(a, b)


def test_manual_seed_repeats_a_run():
    x = torch.randn(100)
    torch.manual_seed(0)
    a = F.dropout(x, 0.5)
    torch.manual_seed(0)
    b = F.dropout(x, 0.5)
    c = F.dropout(x, 0.5)
    assert torch.equal(a, b)
    assert not torch.equal(b, c)


def test_eval_and_edge_probabilities():
    x = torch.randn(10)
    assert F.dropout(x, 0.5, training=False) is x
    assert F.dropout(x, 0.0) is x
    assert torch.equal(F.dropout(x, 1.0), torch.zeros_like(x))
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1, but got -0.1"):
        F.dropout(x, -0.1)


def test_dropout_scales_to_keep_the_mean():
    x = torch.ones(1 << 16)
    y = F.dropout(x, 0.25, seed=5)
    assert abs(y.mean().item() - 1.0) < 0.02
    assert set(torch.unique(y).tolist()) <= {0.0, torch.tensor(1 / 0.75).item()}


def test_torchs_signature_and_inplace():
    """torch's parameters (input, p, training, inplace) in its order, so a positional call means the same thing;
    the seed is keyword-only. In place, input holds the out-of-place result for the same seed, and autograd
    records it (a leaf that requires grad is refused, as by torch)."""
    import inspect

    theirs = inspect.signature(torch.nn.functional.dropout).parameters
    ours = inspect.signature(F.dropout).parameters
    assert [(n, p.default) for n, p in theirs.items()] == [(n, p.default) for n, p in list(ours.items())[:4]]
    assert ours["seed"].kind is inspect.Parameter.KEYWORD_ONLY
    x = torch.randn(4, 33)
    want = F.dropout(x, 0.3, seed=7)
    leaf = x.clone().requires_grad_()
    y = leaf * 1
    assert F.dropout(y, 0.3, True, True, seed=7) is y
    assert torch.equal(y, want)
    y.sum().backward()
    assert torch.equal(leaf.grad, (want != 0).float() / 0.7)
    z = x.clone()
    assert F.dropout(z, 1.0, inplace=True) is z and torch.equal(z, torch.zeros_like(x))
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        F.dropout(leaf, 0.3, True, True)

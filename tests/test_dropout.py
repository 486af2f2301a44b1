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

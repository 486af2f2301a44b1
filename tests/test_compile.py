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

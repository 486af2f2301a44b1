"""CUDA-graph capture of fusenn's kernel paths: a replay on new inputs equals an eager call (GPU only)."""

import pytest
import torch

import fusenn

pytestmark = pytest.mark.gpu

CASES = {
    "lstm": (lambda: fusenn.LSTM(32, 64, 2, bidirectional=True, proj_size=16), (7, 4, 32)),
    "gru": (lambda: fusenn.GRU(32, 64, 2), (7, 4, 32)),
    "mha": (lambda: fusenn.MultiheadAttention(64, 4, batch_first=True), (2, 33, 64)),
    "conv_pool": (lambda: fusenn.ConvPool2d(3, 16, 3, padding=1), (2, 3, 17, 13)),
}


def first(out):
    return out[0] if isinstance(out, tuple) else out


def call(name, module, x):
    if name == "mha":
        return module(x, x, x, need_weights=False)[0]
    return first(module(x))


@pytest.mark.parametrize("name", sorted(CASES))
def test_capture_and_replay(name):
    make, shape = CASES[name]
    torch.manual_seed(0)
    with fusenn.set_backend("triton"):
        module = make().cuda().eval()
        static = torch.randn(shape, device="cuda")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():  # warm-up: compile kernels outside the capture
            for _ in range(2):
                call(name, module, static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            out = call(name, module, static)
        fresh = torch.randn(shape, device="cuda")
        static.copy_(fresh)
        graph.replay()
        with torch.no_grad():
            expected = call(name, module, fresh)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)

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


# The C++ RNN layers capture too: backend "cuda", their host loop's GEMMs and step kernels; "persistent", the
# cooperative launches (a cooperative kernel node) and the check queued behind each.
@pytest.mark.parametrize("name,backend", [(n, "triton") for n in sorted(CASES)]
                         + [(n, b) for n in ("gru", "lstm") for b in ("cuda", "persistent")])
def test_capture_and_replay(name, backend):
    make, shape = CASES[name]
    if not fusenn.backends()[backend].usable:
        pytest.skip(f"{backend} backend unusable here: {fusenn.backends()[backend].detail}")
    torch.manual_seed(0)
    with fusenn.set_backend(backend):
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


# Training-mode masks under capture. Every kernel reads its Philox seed from device memory, and the seed is
# drawn by torch's CUDA RNG, which a graph re-draws on each replay from the generator's state then: so two
# replays draw different masks, and a replay right after torch.manual_seed(s) draws the mask an eager call
# right after torch.manual_seed(s) draws.
MASKED = {
    "dropout": (lambda: None, lambda m, x: fusenn.functional.dropout(x, 0.5), (64, 33), ("triton", "cuda")),
    "sdpa": (lambda: None, lambda m, x: fusenn.functional.scaled_dot_product_attention(x, x, x, dropout_p=0.3),
             (2, 4, 33, 16), ("triton",)),
    "lstm": (lambda: fusenn.LSTM(16, 32, 2, input_dropout=0.2, recurrent_dropout=0.3, zoneout=0.2, dropout=0.1),
             lambda m, x: m(x)[0], (7, 4, 16), ("triton", "cuda", "persistent")),
}


@pytest.mark.parametrize("name,backend", [(n, b) for n, case in sorted(MASKED.items()) for b in case[3]])
def test_replays_draw_fresh_masks(name, backend):
    make, call, shape, _ = MASKED[name]
    if not fusenn.backends()[backend].usable:
        pytest.skip(f"{backend} backend unusable here: {fusenn.backends()[backend].detail}")
    torch.manual_seed(0)
    with fusenn.set_backend(backend), torch.no_grad():
        module = make()
        module = module.cuda().train() if module is not None else None
        static = torch.randn(shape, device="cuda")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                call(module, static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = call(module, static)
        torch.manual_seed(1)
        graph.replay()
        first = out.clone()
        graph.replay()
        assert not torch.equal(out, first), "the second replay reused the first replay's masks"
        torch.manual_seed(1)
        expected = call(module, static)
    torch.testing.assert_close(first, expected, rtol=0, atol=0)

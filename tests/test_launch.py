"""What every Triton launcher must get right before a kernel runs on a GPU, checked on CPU where it can be.

- Device guard: each launcher makes its tensors' device current (Triton launches on the current device),
  spied on here under the interpreter; the real cuda:1 launch is a GPU test.
- conv_pool's tuning: the key buckets the batch and image size, and nothing is timed during CUDA-graph
  capture.
- Packed input: the layout reaches the device once and the layers reuse it without copies.
"""

import contextlib

import pytest
import torch
import triton
from torch.nn.utils.rnn import pack_padded_sequence

import fusenn
from fusenn.kernels import attention, conv_pool, gru, lstm, philox
from fusenn.nn.rnn import _packed_layout
from fusenn.ops import rnn as rnn_ops

HAS_GPU = torch.cuda.is_available()


@pytest.fixture
def guarded(monkeypatch):
    """Every launcher's device_guard replaced by a recorder: the devices it was entered with, in order."""
    entered = []

    def guard(tensor):
        entered.append(tensor.device)
        return contextlib.nullcontext()

    for module in (attention, conv_pool, lstm, philox):
        monkeypatch.setattr(module, "device_guard", guard)
    return entered


def test_every_launcher_guards_its_device(guarded):
    device = torch.device("cuda" if HAS_GPU else "cpu")
    with fusenn.set_backend("triton"):
        q = torch.randn(1, 2, 5, 16, device=device, requires_grad=True)
        fusenn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
        assert guarded == [device] * 2, "attention forward and backward"
        guarded.clear()
        fusenn.functional.dropout_mask((7,), 0.5, seed=1, device=device)
        assert guarded == [device], "Philox mask"
        guarded.clear()
        x = torch.randn(1, 3, 6, 6, device=device)
        fusenn.functional.conv_pool2d(x, torch.randn(4, 3, 3, 3, device=device))
        assert guarded == [device], "conv_pool"
        for module in (fusenn.LSTM(3, 4).to(device), fusenn.GRU(3, 4).to(device)):
            guarded.clear()
            module(torch.randn(2, 1, 3, device=device))[0].sum().backward()
            assert guarded == [device] * 2, f"{type(module).__name__} forward and backward"


@pytest.mark.gpu
def test_tensors_on_the_second_gpu_launch_there():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    with fusenn.set_backend("triton"):
        q = torch.randn(2, 3, 70, 64, device=dev, dtype=torch.bfloat16)
        out = fusenn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        want = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)
        lstm_ours = fusenn.LSTM(8, 16).to(dev)
        lstm_theirs = torch.nn.LSTM(8, 16).to(dev)
        lstm_theirs.load_state_dict(lstm_ours.state_dict())
        x = torch.randn(5, 3, 8, device=dev)
        torch.testing.assert_close(lstm_ours(x)[0], lstm_theirs(x)[0], atol=1e-4, rtol=1e-4)
        x = torch.randn(2, 3, 9, 9, device=dev)
        w = torch.randn(8, 3, 3, 3, device=dev)
        torch.testing.assert_close(fusenn.functional.conv_pool2d(x, w),
                                   torch.nn.functional.max_pool2d(torch.relu(torch.nn.functional.conv2d(x, w)), 2),
                                   atol=1e-3, rtol=1e-3)
    assert torch.cuda.current_device() == 0


META = dict(C_in_g=64, KH=3, KW=3, SH=1, SW=1, PADH=1, PADW=1, DH=1, DW=1, PKH=2, PKW=2, PSH=2, PSW=2, PPH=0, PPW=0,
            ACT="relu", MAX_POOL=True, MONOTONE=True, COUNT_INCLUDE_PAD=True, HAS_BIAS=True, STORE_ARGMAX=False,
            CHANNELS_INNER=False, UPCAST=False, PRECISION=None)


def test_conv_pool_tuning_key_buckets_batch_and_image_size():
    key = conv_pool.tuning_key(torch.bfloat16, 64, 64 * 112 * 112, META)
    assert conv_pool.tuning_key(torch.bfloat16, 64, 60 * 112 * 112, META) == key  # another batch size
    assert conv_pool.tuning_key(torch.bfloat16, 64, 64 * 100 * 110, META) == key  # another image size
    assert conv_pool.tuning_key(torch.bfloat16, 64, 2 * 64 * 112 * 112, META) != key  # twice the work
    assert conv_pool.tuning_key(torch.float32, 64, 64 * 112 * 112, META) != key
    assert conv_pool.tuning_key(torch.bfloat16, 128, 64 * 112 * 112, META) != key
    assert conv_pool.tuning_key(torch.bfloat16, 64, 64 * 112 * 112, dict(META, KH=5)) != key


def test_conv_pool_tunes_once_per_key_and_never_while_capturing(monkeypatch):
    monkeypatch.setattr(conv_pool, "_TUNED", {})
    timed = []

    def do_bench(fn, **kwargs):
        fn()
        return 1.0 + len(timed)  # the first candidate timed is the fastest

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    configs = conv_pool.candidates(64, 64 * 9)
    assert conv_pool.default_config(configs) in configs
    key = conv_pool.tuning_key(torch.bfloat16, 64, 4096, META)
    # inside a capture: the default, nothing timed, nothing remembered
    assert conv_pool.choose_config(key, configs, timed.append, capturing=True) is conv_pool.default_config(configs)
    assert timed == [] and conv_pool._TUNED == {}
    # outside: every candidate timed once, the fastest kept
    assert conv_pool.choose_config(key, configs, timed.append, capturing=False) is configs[0]
    assert timed == configs
    # later calls, captured or not, reuse it without timing
    assert conv_pool.choose_config(key, configs, timed.append, capturing=True) is configs[0]
    assert conv_pool.choose_config(key, configs, timed.append, capturing=False) is configs[0]
    assert timed == configs


@pytest.mark.gpu
def test_conv_pool_first_seen_shape_inside_graph_capture():
    x = torch.randn(3, 8, 10, 10, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(16, 8, 3, 3, device="cuda", dtype=torch.bfloat16)
    conv_pool._TUNED.clear()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), fusenn.set_backend("triton"):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fusenn.functional.conv_pool2d(x, w, padding=1)
    graph.replay()
    torch.cuda.synchronize()
    assert conv_pool._TUNED == {}
    want = torch.nn.functional.max_pool2d(torch.relu(torch.nn.functional.conv2d(x.float(), w.float(), padding=1)), 2)
    torch.testing.assert_close(out.float(), want, atol=0.1, rtol=2e-2)


def test_packed_layout_is_built_on_the_device():
    lengths = torch.tensor([5, 3, 3, 1])
    packed = pack_padded_sequence(torch.zeros(5, 4, 1), lengths)
    steps, rows, lens = _packed_layout(packed.batch_sizes, 4, int(lengths.sum()), torch.device("meta"))
    assert steps.device.type == rows.device.type == lens.device.type == "meta"
    steps, rows, lens = _packed_layout(packed.batch_sizes, 4, int(lengths.sum()), torch.device("cpu"))
    assert torch.equal(lens, lengths)
    assert torch.equal(steps, torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 4]))
    assert torch.equal(rows, torch.tensor([0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 0, 0]))
    assert rnn_ops._lengths(lens, lens.device) is lens  # the layers reuse it: no copy per layer and direction


@pytest.mark.gpu
def test_packed_input_never_synchronises():
    lstm_ = fusenn.LSTM(8, 16, num_layers=2, bidirectional=True).cuda()
    packed = pack_padded_sequence(torch.randn(6, 4, 8, device="cuda"), torch.tensor([6, 5, 2, 1]))
    lstm_(packed)  # compile and tune outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with fusenn.set_backend("triton"):
            lstm_(packed)
    finally:
        torch.cuda.set_sync_debug_mode(0)

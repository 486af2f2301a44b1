"""fusenn.patch / fusenn.unpatch on composite models: outputs, gradients and state_dict keys as torch's,
parameters kept as the same objects, what is left alone and why. The attention and conv-pool parts skip
where fusenn.MultiheadAttention / fusenn.ConvPool2d are missing from the build."""

import copy
import pickle
from collections import OrderedDict

import pytest
import torch
from torch import nn

import fusenn

RNN_NAMES = {"encoder.lstm", "encoder.inner.gru", "cells.0", "cells.1"}
CONV_NAMES = {"cnn.0", "cnn.3"}


def require(name):
    if getattr(fusenn, name, None) is None:
        pytest.skip(f"fusenn.{name} is not in this build yet")


class Model(nn.Module):
    """Bidirectional 2-layer LSTM -> GRU (nested two deep) -> LSTMCell and GRUCell (in a ModuleList) over
    time, plus a Sequential CNN over an image, then self-attention and a head."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.lstm = nn.LSTM(5, 7, num_layers=2, bidirectional=True, batch_first=True)
        self.encoder.inner = nn.ModuleDict({"gru": nn.GRU(14, 6)})
        self.cells = nn.ModuleList([nn.LSTMCell(6, 4), nn.GRUCell(4, 4)])
        self.cnn = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(3, 4, 3), nn.GELU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4, 4))
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, seq, image):
        y, _ = self.encoder.lstm(seq)
        y, _ = self.encoder.inner["gru"](y.transpose(0, 1))
        hc = g = None
        steps = []
        for x in y:
            hc = self.cells[0](x, hc)
            g = self.cells[1](hc[0], g)
            steps.append(g)
        z = torch.stack(steps, 1) + self.cnn(image).unsqueeze(1)
        a, _ = self.attention(z, z, z, need_weights=False)
        return self.head(a)


def inputs(batch=3, steps=6):
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(batch, steps, 5, generator=gen, dtype=torch.float64),
            torch.randn(batch, 1, 10, 10, generator=gen, dtype=torch.float64))


def run(model, args, weights):
    model.zero_grad(set_to_none=True)
    out = model(*args)
    (out * weights).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


def assert_grads_close(grads, expected):
    assert grads.keys() == expected.keys()
    for name, want in expected.items():
        if want is None:
            assert grads[name] is None, name
        else:
            torch.testing.assert_close(grads[name], want, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("flags, needs", [
    pytest.param(dict(attention=False, conv_pool=False), (), id="rnn"),
    pytest.param(dict(attention=False), ("ConvPool2d",), id="rnn-conv_pool"),
    pytest.param(dict(conv_pool=False), ("MultiheadAttention",), id="rnn-attention"),
    pytest.param({}, ("ConvPool2d", "MultiheadAttention"), id="all"),
])
def test_patch_then_unpatch_matches_torch(flags, needs):
    for name in needs:
        require(name)
    torch.manual_seed(0)
    model = Model().double()
    model.encoder.inner.requires_grad_(False)  # requires_grad and train/eval mode must survive the swap
    model.cells[1].eval()
    reference = copy.deepcopy(model)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    args = inputs()
    weights = torch.randn(3, 6, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    want, want_grads = run(reference, args, weights)

    report = fusenn.patch(model, **flags)

    expected = RNN_NAMES | (CONV_NAMES if "ConvPool2d" in needs else set())
    expected |= {"attention"} if "MultiheadAttention" in needs else set()
    assert {name for name, _, _ in report.swapped} == expected, str(report)
    assert type(model.encoder.lstm) is fusenn.LSTM and type(model.encoder.inner.gru) is fusenn.GRU
    assert [type(c) for c in model.cells] == [fusenn.LSTMCell, fusenn.GRUCell]
    if "ConvPool2d" not in needs:
        assert ("cnn.0", "nn.Conv2d+nn.ReLU+nn.MaxPool2d", "disabled by conv_pool=False") in report.left
    if "MultiheadAttention" not in needs:
        assert ("attention", "nn.MultiheadAttention", "disabled by attention=False") in report.left
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters()) and len(params) == len(list(model.parameters()))
    assert not model.cells[1].training and model.cells[0].training
    assert all(p.dtype == torch.float64 for p in model.parameters())

    out, grads = run(model, args, weights)
    torch.testing.assert_close(out, want)
    assert_grads_close(grads, want_grads)

    back = fusenn.unpatch(model)

    assert {name for name, _, _ in back.swapped} == expected and not back.left, str(back)
    assert [(n, type(m)) for n, m in model.named_modules()] == [(n, type(m)) for n, m in reference.named_modules()]
    assert all(p is params[n] for n, p in model.named_parameters())
    out, grads = run(model, args, weights)
    torch.testing.assert_close(out, want, rtol=0, atol=0)  # torch's own modules again, on the same values
    assert_grads_close(grads, want_grads)


def test_optimizer_built_before_patch_still_trains_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LSTM(3, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    fusenn.patch(model)
    before = model[0].weight_hh_l0.detach().clone()
    model[0](torch.randn(5, 2, 3))[0].sum().backward()
    optimizer.step()
    assert not torch.equal(model[0].weight_hh_l0, before)


class CustomLSTM(nn.LSTM):
    def forward(self, input, hx=None):
        return super().forward(input * 2, hx)


def test_what_is_left_alone_and_why(monkeypatch):
    model = nn.Module()
    model.custom = CustomLSTM(3, 4)
    model.hooked = nn.GRU(3, 4)
    model.hooked.register_forward_hook(lambda *_: None)
    model.cell = nn.LSTMCell(3, 4)
    model.elman = nn.RNN(3, 4)  # no fusenn twin: not swapped, not reported
    model.mine = fusenn.GRUCell(3, 4)
    model.attention = nn.MultiheadAttention(4, 2)
    model.cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2))
    monkeypatch.delattr(fusenn, "MultiheadAttention", raising=False)
    monkeypatch.delattr(fusenn, "ConvPool2d", raising=False)

    report = fusenn.patch(model, lstm=False)

    assert report.swapped == []
    assert sorted(report.left) == [
        ("attention", "nn.MultiheadAttention", "fusenn.MultiheadAttention unavailable"),
        ("cell", "nn.LSTMCell", "disabled by lstm=False"),
        ("cnn.0", "nn.Conv2d+nn.ReLU+nn.MaxPool2d", "fusenn.ConvPool2d unavailable"),
        ("custom", f"{__name__}.CustomLSTM", "subclass of nn.LSTM (its forward may differ): left alone"),
        ("hooked", "nn.GRU", "has hooks, which its twin would not run: left alone"),
        ("mine", "fusenn.GRUCell", "already fusenn"),
    ]
    assert type(model.custom) is CustomLSTM and type(model.hooked) is nn.GRU and type(model.cell) is nn.LSTMCell
    text = str(report)
    assert text.startswith("0 swapped, 6 left") and "custom (" in text and "disabled by lstm=False" in text


def test_patch_twice_and_unpatch_twice():
    model = nn.Sequential(nn.LSTM(3, 4), nn.GRUCell(3, 4))
    fusenn.patch(model)
    again = fusenn.patch(model)
    assert again.swapped == [] and [reason for _, _, reason in again.left] == ["already fusenn"] * 2
    assert len(fusenn.unpatch(model).swapped) == 2
    nothing = fusenn.unpatch(model)
    assert nothing.swapped == [] and nothing.left == []
    assert [type(m) for m in model] == [nn.LSTM, nn.GRUCell]


def test_shared_module_stays_shared():
    model = nn.Module()
    model.a = model.b = nn.LSTM(3, 4)
    report = fusenn.patch(model)
    assert [name for name, _, _ in report.swapped] == ["a"]
    assert type(model.a) is fusenn.LSTM and model.a is model.b
    fusenn.unpatch(model)
    assert type(model.a) is nn.LSTM and model.a is model.b


def test_model_itself_is_not_swapped():
    lstm = nn.LSTM(3, 4)
    report = fusenn.patch(lstm)
    assert report.swapped == [] and report.left[0][:2] == ("", "nn.LSTM") and "from_torch" in report.left[0][2]
    assert type(lstm) is nn.LSTM


def test_conv_runs_in_sequentials():
    require("ConvPool2d")
    torch.manual_seed(0)
    relu = nn.ReLU()  # one activation module used by two runs
    cnn = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(2, 4, 3, padding=1), act1=relu, pool1=nn.MaxPool2d(2, ceil_mode=True),
        conv2=nn.Conv2d(4, 4, 3, padding=1, bias=False), act2=nn.LeakyReLU(0.2), pool2=nn.AvgPool2d(3, 1, 1),
        conv3=nn.Conv2d(4, 4, 1), bn=nn.BatchNorm2d(4), pool3=nn.MaxPool2d(2),  # not a run: bn between
        conv4=nn.Conv2d(4, 4, 3, padding=1), act4=relu, pool4=nn.AvgPool2d(2, divisor_override=3),
        conv5=nn.Conv2d(4, 4, 3, padding=1), pool5=nn.MaxPool2d(2),
    ))
    model = nn.Sequential(cnn, nn.Flatten())
    model.eval()
    pools = {k: m for k, m in cnn.named_children() if k.startswith(("act", "pool"))}
    keys = list(model.state_dict())
    x = torch.randn(2, 2, 25, 21)
    want = model(x)

    report = fusenn.patch(model)

    assert [name for name, _, _ in report.swapped] == ["0.conv1", "0.conv2", "0.conv5"], str(report)
    assert report.swapped[2][1:] == ("nn.Conv2d+nn.MaxPool2d", "fusenn.ConvPool2d")
    (name, kind, reason), = report.left
    assert (name, kind) == ("0.conv4", "nn.Conv2d+nn.ReLU+nn.AvgPool2d") and "divisor_override" in reason
    assert list(cnn._modules) == ["conv1", "conv2", "conv3", "bn", "pool3", "conv4", "act4", "pool4", "conv5"]
    assert type(cnn.conv1) is fusenn.ConvPool2d and not cnn.conv1.training
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(x), want)
    saved = pickle.loads(pickle.dumps(model))  # what unpatch needs travels with the model
    assert [name for name, _, _ in fusenn.unpatch(saved).swapped] == ["0.conv1", "0.conv2", "0.conv5"]

    back = fusenn.unpatch(model)

    assert [name for name, _, _ in back.swapped] == ["0.conv1", "0.conv2", "0.conv5"] and not back.left
    assert list(cnn._modules) == ["conv1", "act1", "pool1", "conv2", "act2", "pool2", "conv3", "bn", "pool3",
                                  "conv4", "act4", "pool4", "conv5", "pool5"]
    assert all(getattr(cnn, k) is m for k, m in pools.items()) and cnn.act1 is cnn.act4
    assert type(cnn.conv1) is nn.Conv2d and cnn.conv2.bias is None and not cnn.conv1.training
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)


def test_conv_runs_left_in_sequential_subclass_or_when_disabled():
    require("ConvPool2d")

    class Stack(nn.Sequential):
        pass

    model = nn.Sequential(Stack(nn.Conv2d(1, 2, 3), nn.SiLU(), nn.MaxPool2d(2)),
                          nn.Sequential(nn.Conv2d(1, 2, 3), nn.PReLU(), nn.MaxPool2d(2)))
    report = fusenn.patch(model)
    assert report.swapped == []
    (name0, _, reason0), (name1, kind1, reason1) = report.left
    assert name0 == "0.0" and "subclass of nn.Sequential" in reason0
    assert (name1, kind1) == ("1.0", "nn.Conv2d+nn.PReLU+nn.MaxPool2d") and "PReLU" in reason1
    assert fusenn.patch(nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2)), conv_pool=False).left == [
        ("0", "nn.Conv2d+nn.MaxPool2d", "disabled by conv_pool=False")]


def test_unpatch_leaves_a_directly_built_conv_pool():
    require("ConvPool2d")
    model = nn.Sequential(fusenn.ConvPool2d(1, 2, 3))
    (name, kind, reason), = fusenn.unpatch(model).left
    assert (name, kind) == ("0", "fusenn.ConvPool2d") and "not by fusenn.patch" in reason
    assert type(model[0]) is fusenn.ConvPool2d


@pytest.mark.parametrize("config", [
    dict(),
    dict(bias=False),
    dict(add_bias_kv=True, add_zero_attn=True),
    dict(kdim=3, vdim=5, batch_first=True),
], ids=["default", "nobias", "bias_kv-zero_attn", "kdim-vdim-batch_first"])
def test_attention(config):
    require("MultiheadAttention")
    torch.manual_seed(0)
    model = nn.Sequential(nn.MultiheadAttention(8, 2, dtype=torch.float64, **config))
    model[0].eval()
    reference = copy.deepcopy(model)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    gen = torch.Generator().manual_seed(3)
    shape = (2, 4) if config.get("batch_first") else (4, 2)  # batch 2, 4 queries; 4 keys and values
    q = torch.randn(*shape, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(*shape, config.get("kdim", 8), generator=gen, dtype=torch.float64)
    v = torch.randn(*shape, config.get("vdim", 8), generator=gen, dtype=torch.float64)

    def forward(m):
        m.zero_grad(set_to_none=True)
        out, _ = m[0](q, k, v, need_weights=False)
        out.square().sum().backward()
        return out.detach(), {n: p.grad for n, p in m.named_parameters()}

    want, want_grads = forward(reference)
    report = fusenn.patch(model)
    assert report.swapped == [("0", "nn.MultiheadAttention", "fusenn.MultiheadAttention")], str(report)
    assert type(model[0]) is fusenn.MultiheadAttention and not model[0].training
    assert list(model.state_dict()) == keys and all(p is params[n] for n, p in model.named_parameters())
    out, grads = forward(model)
    torch.testing.assert_close(out, want)
    assert_grads_close(grads, want_grads)

    assert fusenn.unpatch(model).swapped == [("0", "fusenn.MultiheadAttention", "nn.MultiheadAttention")]
    assert type(model[0]) is nn.MultiheadAttention and all(p is params[n] for n, p in model.named_parameters())
    torch.testing.assert_close(forward(model)[0], want, rtol=0, atol=0)

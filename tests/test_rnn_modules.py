"""fusenn.LSTM / GRU / LSTMCell / GRUCell against torch.nn with the same state_dict: outputs, final states
and every gradient, over input layouts and configurations; parameters, conversion, dropout and errors."""

import random
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fusenn

KERNEL_BACKENDS = ("triton", "cuda", "cpp-host")

# torch.nn's LSTM warns that oneDNN lacks projections and falls back; that is torch's business, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")


@pytest.fixture(autouse=True)
def reference_backend():
    """These tests check fusenn's own recurrence against torch.nn. Under auto, CPU tensors in a plain
    configuration run torch's own module (tests/test_cpu_routing.py checks that), so the reference is set
    here unless a test sets another backend itself (kernel_backend)."""
    with fusenn.set_backend("reference"):
        yield


TWINS = {"LSTM": (fusenn.LSTM, nn.LSTM), "GRU": (fusenn.GRU, nn.GRU),
         "LSTMCell": (fusenn.LSTMCell, nn.LSTMCell), "GRUCell": (fusenn.GRUCell, nn.GRUCell)}


def tolerances(dtype):
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else {}  # fp32: assert_close's defaults


@dataclass(frozen=True)
class Case:
    mode: str
    layers: int = 1
    bidir: bool = False
    proj: int = 0
    bias: bool = True
    batch_first: bool = False
    form: str = "padded"  # padded | unbatched | packed (unsorted lengths) | packed-sorted
    batch: int = 3
    steps: int = 5
    input_size: int = 5
    hidden: int = 7
    hx: bool = True
    dtype: torch.dtype = torch.float32

    @property
    def id(self):
        parts = [self.mode, f"L{self.layers}"]
        parts += ["bidir"] * self.bidir + [f"proj{self.proj}"] * bool(self.proj) + ["nobias"] * (not self.bias)
        parts += ["batch_first"] * self.batch_first + [self.form]
        parts += [f"B{self.batch}"] * (self.form != "unbatched") + [f"T{self.steps}", f"I{self.input_size}"]
        parts += [f"H{self.hidden}", "hx" if self.hx else "nohx", str(self.dtype).split(".")[-1]]
        return "-".join(parts)

    def build(self):
        kwargs = dict(num_layers=self.layers, bias=self.bias, batch_first=self.batch_first,
                      bidirectional=self.bidir, dtype=self.dtype)
        if self.proj:
            kwargs["proj_size"] = self.proj
        theirs = TWINS[self.mode][1](self.input_size, self.hidden, **kwargs)
        mine = TWINS[self.mode][0](self.input_size, self.hidden, **kwargs)
        mine.load_state_dict(theirs.state_dict())
        return mine, theirs

    def inputs(self, gen):
        """(input leaf, hidden leaves, lengths or None): the tensors gradients are taken for."""
        T, B, I = self.steps, self.batch, self.input_size
        shape = (T, I) if self.form == "unbatched" else (B, T, I) if self.batch_first else (T, B, I)
        x = torch.randn(shape, generator=gen, dtype=self.dtype)
        lengths = None
        if self.form.startswith("packed"):
            rng = random.Random(T * 100 + B)
            lengths = [T] + [rng.randint(1, T) for _ in range(B - 1)]
            rng.shuffle(lengths)
            if self.form == "packed-sorted":
                lengths.sort(reverse=True)
        n = self.layers * (2 if self.bidir else 1)
        rows = () if self.form == "unbatched" else (B,)
        sizes = [self.proj or self.hidden] + [self.hidden] * (self.mode == "LSTM")
        hidden = [torch.randn((n, *rows, s), generator=gen, dtype=self.dtype) for s in sizes] if self.hx else []
        return x, hidden, lengths


def run(module, case, x, hidden, lengths, grad_seed=7):
    """Forward and backward of `module`; returns the outputs and the gradients of input, hx and parameters."""
    x = x.clone().requires_grad_()
    hidden = [h.clone().requires_grad_() for h in hidden]
    inp = x if lengths is None else pack_padded_sequence(x, lengths, batch_first=case.batch_first,
                                                         enforce_sorted=case.form == "packed-sorted")
    hx = None if not hidden else tuple(hidden) if case.mode == "LSTM" else hidden[0]
    out, final = module(inp, hx)
    outs = [out] + list(final if case.mode == "LSTM" else [final])
    if lengths is not None:
        assert isinstance(out, PackedSequence)
        outs = [out.data, out.batch_sizes, out.sorted_indices, out.unsorted_indices] + outs[1:]
    gen = torch.Generator().manual_seed(grad_seed)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)).sum() for t in outs
               if t is not None and t.is_floating_point())
    loss.backward()
    grads = {"input": x.grad, **{f"hx[{i}]": h.grad for i, h in enumerate(hidden)}}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return outs, grads


def assert_same(case, mine, theirs, **tol):
    tol = tol or tolerances(case.dtype)
    (outs, grads), (ref_outs, ref_grads) = mine, theirs
    assert len(outs) == len(ref_outs)
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        if r is None or not r.is_floating_point():
            assert (o is None and r is None) or torch.equal(o, r), f"output {i}"
        else:
            torch.testing.assert_close(o, r, **tol, msg=lambda m, i=i: f"output {i}: {m}")
    assert grads.keys() == ref_grads.keys()
    for name, r in ref_grads.items():
        g = grads[name]
        if g is None and r is None:
            continue
        # A parameter that no element reached (empty batch) may hold None on one side and zeros on the other.
        g, r = (g if g is not None else torch.zeros_like(r)), (r if r is not None else torch.zeros_like(g))
        torch.testing.assert_close(g, r, **tol, msg=lambda m, name=name: f"grad of {name}: {m}")


def check_case(case, device="cpu", **tol):
    torch.manual_seed(0)
    mine, theirs = case.build()
    mine.to(device), theirs.to(device)
    x, hidden, lengths = case.inputs(torch.Generator().manual_seed(1))
    x, hidden = x.to(device), [h.to(device) for h in hidden]
    assert_same(case, run(mine, case, x, hidden, lengths), run(theirs, case, x, hidden, lengths), **tol)


HAND_PICKED = [
    Case("LSTM"),
    Case("LSTM", layers=2, bidir=True, proj=3, form="packed"),
    Case("LSTM", layers=2, bidir=True, proj=3, form="packed-sorted", hx=False),
    Case("LSTM", layers=3, bidir=True, batch_first=True, dtype=torch.float64),
    Case("LSTM", layers=2, proj=5, bias=False, form="packed", batch_first=True, dtype=torch.float64),
    Case("LSTM", layers=2, bidir=True, form="unbatched"),
    Case("LSTM", form="unbatched", proj=2, hx=False, dtype=torch.float64),
    Case("LSTM", layers=2, batch=1, steps=1),
    Case("LSTM", layers=2, bidir=True, proj=4, batch=0, hx=False),
    Case("LSTM", layers=2, bidir=True, batch=0, batch_first=True),
    Case("LSTM", hidden=33, input_size=17, batch=2, steps=3),
    Case("LSTM", form="packed", batch=4, steps=6, bidir=True, hidden=33, dtype=torch.float64),
    Case("GRU"),
    Case("GRU", layers=2, bidir=True, form="packed"),
    Case("GRU", layers=2, form="packed-sorted", batch_first=True, bias=False),
    Case("GRU", layers=3, bidir=True, dtype=torch.float64, hx=False),
    Case("GRU", layers=2, form="unbatched", batch_first=True),
    Case("GRU", bidir=True, form="unbatched", hx=False, dtype=torch.float64),
    Case("GRU", layers=2, bidir=True, batch=1, steps=1, bias=False),
    Case("GRU", layers=2, batch=0, hx=False),
    Case("GRU", hidden=33, input_size=17, batch=2, steps=3, bidir=True),
    Case("GRU", form="packed", batch=4, steps=6, hidden=33, dtype=torch.float64),
]


def random_cases(n, seed=2024):
    """A reproducible random draw over the configuration space, beyond the hand-picked cases."""
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        mode = rng.choice(["LSTM", "GRU"])
        hidden = rng.choice([1, 7, 12])
        cases.append(Case(mode, layers=rng.randint(1, 3), bidir=rng.random() < 0.5,
                          proj=rng.randint(1, hidden - 1) if mode == "LSTM" and hidden > 1 and rng.random() < 0.5
                          else 0,
                          bias=rng.random() < 0.7, batch_first=rng.random() < 0.5,
                          form=rng.choice(["padded", "unbatched", "packed", "packed-sorted"]),
                          batch=rng.randint(1, 4), steps=rng.randint(1, 6), input_size=rng.choice([1, 3, 6]),
                          hidden=hidden, hx=rng.random() < 0.5, dtype=rng.choice([torch.float32, torch.float64])))
    return cases


@pytest.mark.parametrize("case", HAND_PICKED + random_cases(16), ids=lambda c: c.id)
def test_matches_torch(case):
    check_case(case)


def test_random_grid_is_distinct():
    ids = [c.id for c in HAND_PICKED + random_cases(16)]
    assert len(ids) == len(set(ids))


# Parameters, state_dict and conversion

CONFIGS = [("LSTM", dict(num_layers=2, bidirectional=True, proj_size=3)), ("LSTM", dict(bias=False)),
           ("GRU", dict(num_layers=3, bidirectional=True)), ("GRU", dict(bias=False, batch_first=True)),
           ("LSTMCell", {}), ("LSTMCell", dict(bias=False)), ("GRUCell", {}), ("GRUCell", dict(bias=False))]
CONFIG_IDS = [f"{mode}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for mode, kw in CONFIGS]


@pytest.mark.parametrize("mode,kwargs", CONFIGS, ids=CONFIG_IDS)
def test_parameters_and_init_match_torch(mode, kwargs):
    mine_cls, torch_cls = TWINS[mode]
    torch.manual_seed(3)
    mine = mine_cls(5, 7, **kwargs)
    torch.manual_seed(3)
    theirs = torch_cls(5, 7, **kwargs)
    if mode in ("LSTM", "GRU"):  # nn.RNNBase, not nn.LSTM / nn.GRU, so Dynamo traces it (fusenn.nn.rnn)
        assert isinstance(mine, nn.RNNBase) and not isinstance(mine, torch_cls) and mine.mode == mode
    else:
        assert isinstance(mine, torch_cls)
    assert repr(mine) == repr(theirs)
    assert [(n, p.shape) for n, p in mine.named_parameters()] == [(n, p.shape) for n, p in theirs.named_parameters()]
    for (n, p), (_, q) in zip(mine.named_parameters(), theirs.named_parameters()):
        assert torch.equal(p, q), f"{n}: initialisation differs from torch.nn's"


@pytest.mark.parametrize("mode,kwargs", CONFIGS, ids=CONFIG_IDS)
def test_state_dict_round_trips(mode, kwargs):
    mine_cls, torch_cls = TWINS[mode]
    mine, theirs = mine_cls(5, 7, **kwargs), torch_cls(5, 7, **kwargs)
    theirs.load_state_dict(mine.state_dict())  # strict: same keys both ways
    assert list(theirs.state_dict()) == list(mine.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(theirs.state_dict().values(), mine.state_dict().values()))
    other = torch_cls(5, 7, **kwargs)
    mine.load_state_dict(other.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), mine.state_dict().values()))


@pytest.mark.parametrize("mode,kwargs", CONFIGS, ids=CONFIG_IDS)
def test_from_torch_and_to_torch(mode, kwargs):
    mine_cls, torch_cls = TWINS[mode]
    theirs = torch_cls(5, 7, **kwargs, dtype=torch.float64).eval()
    next(theirs.parameters()).requires_grad_(False)
    state = torch.get_rng_state()
    mine = mine_cls.from_torch(theirs)
    assert torch.equal(torch.get_rng_state(), state), "conversion must not draw from torch's RNG"
    back = mine.to_torch()
    assert type(mine) is mine_cls and type(back) is torch_cls
    for module in (mine, back):
        assert repr(module) == repr(theirs) and not module.training
        for (n, p), (_, q) in zip(module.named_parameters(), theirs.named_parameters()):
            assert torch.equal(p, q) and p.dtype == torch.float64 and p.device == q.device, n
            assert p.requires_grad == q.requires_grad and p is not q, n
    x = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(mine(x), theirs(x), **tolerances(torch.float64))
    with pytest.raises(TypeError, match="expects a torch.nn"):
        mine_cls.from_torch(nn.Linear(5, 7))


def test_packed_state_matches_user_order():
    """Unsorted packed input: final states come back in the user's batch order, as torch returns them."""
    mine, theirs = Case("LSTM", bidir=True).build()
    x = torch.randn(4, 3, 5)
    packed = pack_padded_sequence(x, [2, 4, 1], enforce_sorted=False)
    hx = (torch.randn(2, 3, 7), torch.randn(2, 3, 7))
    (out, (h, c)), (ref, (rh, rc)) = mine(packed, hx), theirs(packed, hx)
    assert torch.equal(out.sorted_indices, packed.sorted_indices)
    assert torch.equal(out.unsorted_indices, packed.unsorted_indices)
    torch.testing.assert_close((out.data, h, c), (ref.data, rh, rc))
    # Row 2 has length 1: its forward final state is the one after its only step, in row 2.
    single, _ = mine(x[:1, 2:3], (hx[0][:, 2:3], hx[1][:, 2:3]))
    torch.testing.assert_close(h[0, 2], single[0, 0, :7])


# Dropout between layers

@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_dropout_between_layers(mode):
    mine, theirs = Case(mode, layers=3).build()
    mine.dropout = theirs.dropout = 0.4
    x = torch.randn(5, 3, 5)
    mine.eval(), theirs.eval()
    torch.testing.assert_close(mine(x), theirs(x))  # eval: no dropout, as torch
    mine.train()
    torch.manual_seed(11)
    a, a_state = mine(x)
    torch.manual_seed(11)
    b, b_state = mine(x)
    torch.testing.assert_close((a, a_state), (b, b_state), rtol=0, atol=0)
    assert not torch.allclose(a, mine.eval()(x)[0])

    # The same network built by hand: one-layer torch modules with fusenn's dropout on every output but the last.
    layers = [TWINS[mode][1](5 if layer == 0 else 7, 7) for layer in range(3)]
    for layer, one in enumerate(layers):
        one.load_state_dict({k.replace(f"_l{layer}", "_l0"): v for k, v in mine.state_dict().items()
                             if k.endswith(f"_l{layer}")})
    torch.manual_seed(11)
    y, finals = x, []
    for layer, one in enumerate(layers):
        if layer:
            y = fusenn.functional.dropout(y, 0.4, training=True)
        y, final = one(y)
        finals.append(final)
    state = tuple(torch.cat(s) for s in zip(*finals)) if mode == "LSTM" else torch.cat(finals)
    torch.testing.assert_close((a, a_state), (y, state))


def test_dropout_zero_in_training_matches_torch():
    case = Case("LSTM", layers=2, bidir=True)
    mine, theirs = case.build()
    x, hidden, lengths = case.inputs(torch.Generator().manual_seed(1))
    assert mine.training and theirs.training
    assert_same(case, run(mine, case, x, hidden, lengths), run(theirs, case, x, hidden, lengths))


# Cells

@dataclass(frozen=True)
class CellCase:
    mode: str
    bias: bool = True
    batch: int = 3  # None: unbatched 1-D input
    hx: bool = True
    dtype: torch.dtype = torch.float32
    hidden: int = 7

    @property
    def id(self):
        return "-".join([self.mode, "unbatched" if self.batch is None else f"B{self.batch}", f"H{self.hidden}"]
                        + ["nobias"] * (not self.bias) + ["hx" if self.hx else "nohx", str(self.dtype).split(".")[-1]])


CELL_CASES = [CellCase(mode, **kw) for mode in ("LSTMCell", "GRUCell") for kw in (
    {}, dict(bias=False), dict(batch=None), dict(batch=None, hx=False, dtype=torch.float64), dict(batch=1, hidden=33),
    dict(batch=0), dict(hx=False, dtype=torch.float64))]


@pytest.mark.parametrize("case", CELL_CASES, ids=lambda c: c.id)
def test_cell_matches_torch(case):
    mine_cls, torch_cls = TWINS[case.mode]
    theirs = torch_cls(5, case.hidden, bias=case.bias, dtype=case.dtype)
    mine = mine_cls.from_torch(theirs)
    rows = () if case.batch is None else (case.batch,)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn((*rows, 5), generator=gen, dtype=case.dtype)
    hidden = [torch.randn((*rows, case.hidden), generator=gen, dtype=case.dtype)
              for _ in range(2 if case.mode == "LSTMCell" else 1)] if case.hx else []

    def cell_run(module):
        leaves = [t.clone().requires_grad_() for t in [x] + hidden]
        hx = None if not case.hx else tuple(leaves[1:]) if case.mode == "LSTMCell" else leaves[1]
        out = module(leaves[0], hx)
        outs = list(out) if case.mode == "LSTMCell" else [out]
        gen = torch.Generator().manual_seed(9)
        sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in outs).backward()
        grads = {f"arg{i}": t.grad for i, t in enumerate(leaves)}
        grads.update({n: p.grad for n, p in module.named_parameters()})
        return outs, grads

    assert_same(case, cell_run(mine), cell_run(theirs))


# Errors: torch's own wording wherever torch raises a readable one

def _lstm(**kw):
    return fusenn.LSTM(5, 7, 2, **kw), nn.LSTM(5, 7, 2, **kw)


ERRORS = {
    "LSTM-input-4D": lambda m: m(torch.randn(4, 3, 5, 1)),
    "LSTM-input_size": lambda m: m(torch.randn(4, 3, 3)),
    "LSTM-input-dtype": lambda m: m(torch.randn(4, 3, 5, dtype=torch.float64)),
    "LSTM-hx-shape": lambda m: m(torch.randn(4, 3, 5), (torch.zeros(2, 2, 7), torch.zeros(2, 3, 7))),
    "LSTM-cx-shape": lambda m: m(torch.randn(4, 3, 5), (torch.zeros(2, 3, 7), torch.zeros(2, 3, 6))),
    "LSTM-hx-2D-for-batched": lambda m: m(torch.randn(4, 3, 5), (torch.zeros(2, 7), torch.zeros(2, 7))),
    "LSTM-hx-3D-for-unbatched": lambda m: m(torch.randn(4, 5), (torch.zeros(2, 1, 7), torch.zeros(2, 1, 7))),
    "LSTM-no-steps": lambda m: m(torch.randn(0, 3, 5)),
    "LSTM-input-device": lambda m: m(torch.randn(4, 3, 5, device="meta")),
    "LSTM-hx-device": lambda m: m(torch.randn(4, 3, 5), (torch.zeros(2, 3, 7, device="meta"), torch.zeros(2, 3, 7))),
    "LSTM-three-states": lambda m: m(torch.randn(4, 3, 5), (torch.zeros(2, 3, 7),) * 3),
}
GRU_ERRORS = {
    "GRU-input-1D": lambda m: m(torch.randn(5)),
    "GRU-hx-shape": lambda m: m(torch.randn(4, 3, 5), torch.zeros(2, 3, 6)),
    "GRU-hx-3D-for-unbatched": lambda m: m(torch.randn(4, 5), torch.zeros(2, 1, 7)),
    "GRU-packed-hx-batch": lambda m: m(pack_padded_sequence(torch.randn(4, 3, 5), [4, 3, 2]), torch.zeros(2, 2, 7)),
}
CELL_ERRORS = {
    "LSTMCell-input-3D": ("LSTMCell", lambda m: m(torch.randn(1, 3, 5))),
    "LSTMCell-hx-3D": ("LSTMCell", lambda m: m(torch.randn(3, 5), (torch.zeros(3, 7), torch.zeros(1, 3, 7)))),
    "LSTMCell-input_size": ("LSTMCell", lambda m: m(torch.randn(3, 4))),
    "LSTMCell-hx-batch": ("LSTMCell", lambda m: m(torch.randn(3, 5), (torch.zeros(2, 7), torch.zeros(2, 7)))),
    "LSTMCell-cx-size": ("LSTMCell", lambda m: m(torch.randn(3, 5), (torch.zeros(3, 7), torch.zeros(3, 6)))),
    "LSTMCell-one-state": ("LSTMCell", lambda m: m(torch.randn(3, 5), (torch.zeros(3, 7),))),
    "LSTMCell-three-states": ("LSTMCell", lambda m: m(torch.randn(3, 5), (torch.zeros(3, 7),) * 3)),
    "LSTMCell-hx-one-tensor": ("LSTMCell", lambda m: m(torch.randn(3, 5), torch.zeros(2, 3, 7))),
    "GRUCell-input-3D": ("GRUCell", lambda m: m(torch.randn(1, 3, 5))),
    "GRUCell-hx-3D": ("GRUCell", lambda m: m(torch.randn(3, 5), torch.zeros(1, 3, 7))),
    "GRUCell-input_size": ("GRUCell", lambda m: m(torch.randn(3, 4))),
    "GRUCell-hx-size": ("GRUCell", lambda m: m(torch.randn(3, 5), torch.zeros(3, 6))),
    "GRUCell-unbatched-input-batched-hx": ("GRUCell", lambda m: m(torch.randn(5), torch.zeros(3, 7))),
}


def _same_error(mine, theirs, call):
    with pytest.raises(Exception) as expected:
        call(theirs)
    with pytest.raises(type(expected.value)) as got:
        call(mine)
    assert str(got.value) == str(expected.value)


# auto runs torch's own forward on CPU tensors; the reference is fusenn's own path, which must say the same
ERROR_BACKENDS = ["auto", "reference"]


@pytest.mark.parametrize("backend", ERROR_BACKENDS)
@pytest.mark.parametrize("name", list(ERRORS))
def test_lstm_errors_match_torch(name, backend):
    with fusenn.set_backend(backend):
        _same_error(*_lstm(), ERRORS[name])


@pytest.mark.parametrize("backend", ERROR_BACKENDS)
@pytest.mark.parametrize("name", list(GRU_ERRORS))
def test_gru_errors_match_torch(name, backend):
    with fusenn.set_backend(backend):
        _same_error(fusenn.GRU(5, 7, 2), nn.GRU(5, 7, 2), GRU_ERRORS[name])


@pytest.mark.parametrize("backend", ERROR_BACKENDS)
@pytest.mark.parametrize("name", list(CELL_ERRORS))
def test_cell_errors_match_torch(name, backend):
    mode, call = CELL_ERRORS[name]
    with fusenn.set_backend(backend):
        _same_error(TWINS[mode][0](5, 7), TWINS[mode][1](5, 7), call)


def test_errors_where_torch_has_no_readable_one():
    lstm, gru = fusenn.LSTM(5, 7), fusenn.GRU(5, 7)
    x = torch.randn(4, 3, 5)
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(1, 3, 7\), got \[1, 2, 7\]"):
        lstm(pack_padded_sequence(x, [4, 3, 2]), (torch.zeros(1, 2, 7), torch.zeros(1, 2, 7)))
    with pytest.raises(RuntimeError, match="Input and hidden tensors are not the same dtype, found input tensor with "
                                           "torch.float32 and hidden tensor with torch.float64"):
        lstm(x, (torch.zeros(1, 3, 7, dtype=torch.float64), torch.zeros(1, 3, 7)))
    with pytest.raises(RuntimeError, match="not the same dtype"):
        gru(x, torch.zeros(1, 3, 7, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="not the same dtype"):
        fusenn.GRUCell(5, 7)(x[0], torch.zeros(3, 7, dtype=torch.float64))
    # a hand-made PackedSequence whose sorted_indices disagree with batch_sizes (torch reads garbage)
    packed = pack_padded_sequence(x, [4, 3, 2], enforce_sorted=False)
    bad = torch.nn.utils.rnn.PackedSequence(packed.data, packed.batch_sizes, torch.tensor([1, 0]), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match=r"batch_sizes\[0\] is 3 but sorted_indices has 2 entries"):
        gru(bad)


def test_constructor_arguments_are_torchs():
    with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM"):
        fusenn.GRU(5, 7, proj_size=2)
    with pytest.raises(ValueError, match="proj_size has to be smaller than hidden_size"):
        fusenn.LSTM(5, 7, proj_size=7)
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        fusenn.LSTM(5, 7, dropout=0.5)
    m = fusenn.LSTM(input_size=5, hidden_size=7, num_layers=2, bias=False, batch_first=True, dropout=0.1,
                    bidirectional=True, proj_size=3, device="cpu", dtype=torch.float64)
    assert m.weight_hr_l1_reverse.shape == (3, 7) and m.weight_ih_l1.dtype == torch.float64


# The layer kernels behind fusenn.ops.rnn, driven through the modules

KERNEL_CASES = [Case("LSTM", layers=1, bidir=True, proj=3, form="packed", batch=3, steps=4),
                Case("GRU", layers=2, batch=2, steps=3)]


class TestKernelBackends:
    @pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: c.id)
    def test_module_matches_torch(self, kernel_backend, case):
        _, device = kernel_backend
        check_case(case, device, rtol=1e-4, atol=1e-4)

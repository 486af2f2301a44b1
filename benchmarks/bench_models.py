"""The example models (examples/cnn_lstm.py, seq2seq.py, transformer.py) built from fusenn's layers
against the same models built from torch.nn's: validated at toy size, one training step timed at real
size (forward, backward and an Adam step, so the unfused parts of the model count too)."""

import copy
import os
import sys

import torch

from benchmarks.registry import Case, Check, Entry, register
from fusenn.testing import ATOL, max_error

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")
COMPOSITES = ("cnn_lstm", "seq2seq", "transformer")
sys.path.insert(0, EXAMPLES)  # the examples import their shared _common as scripts do
import _common  # noqa: E402


_example = _common.load


def _models(ex, cfg, device):
    """The fusenn and torch.nn builds of one example with the same weights."""
    torch.manual_seed(0)
    ours = ex.Model(cfg, "fusenn").to(device)
    theirs = ex.Model(cfg, "torch").to(device)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _outputs(ex, name, model, batch):
    """Eval-mode logits and the loss's parameter gradients."""
    model.eval().zero_grad()
    out = model(*batch[:ex.FORWARD_ARGS])
    ex.loss_fn(model, *batch).backward()
    return [out.detach()] + [p.grad for p in model.parameters()]


def validate():
    """fusenn (current backend, fp32) and torch.nn (fp32) models against the torch.nn model in float64."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    checks = []
    for name in COMPOSITES:
        ex = _example(name)
        cfg = ex.CONFIGS["toy"]
        ours, theirs = _models(ex, cfg, device)
        exact = copy.deepcopy(theirs).double()
        batch = ex.make_batch(cfg, 4, torch.Generator(device).manual_seed(0))
        batch64 = [t.double() if t.is_floating_point() else t for t in batch]
        got, base = _outputs(ex, name, ours, batch), _outputs(ex, name, theirs, batch)
        ref = _outputs(ex, name, exact, batch64)
        error = max(max_error(g, r) for g, r in zip(got, ref))
        allowed = 3 * max(max_error(b, r) for b, r in zip(base, ref)) + ATOL[torch.float32]
        checks.append(Check(f"{name}-toy-B4-fwd+bwd", error, allowed))
    return checks


def _setup(name):
    def setup(device):
        ex = _example(name)
        cfg = ex.CONFIGS["real"]
        batch = ex.make_batch(cfg, cfg.batch, torch.Generator(device).manual_seed(0))
        steps = {}
        for impl, model in zip(("fusenn", "torch.nn"), _models(ex, cfg, device)):
            opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)

            def step(model=model, opt=opt):
                loss = ex.loss_fn(model, *batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            steps[impl] = step
        return steps
    return setup


def cases(quick):
    """One fp32 training step per example at its real size; three cases, so --quick keeps them all."""
    out = []
    for name in COMPOSITES:
        cfg = _example(name).CONFIGS["real"]
        out.append(Case(f"{name}-real-B{cfg.batch}-fp32-train-step", _setup(name)))
    return out


register(Entry(op="models", baselines=("torch.nn",), validate=validate, cases=cases))

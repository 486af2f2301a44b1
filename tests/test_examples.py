"""The examples run end to end at toy size on CPU."""

import json
import os
import random
import sys

import pytest
import torch

import fusenn

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


sys.path.insert(0, EXAMPLES)  # the examples import their shared _common as scripts do
import _common  # noqa: E402

load = _common.load


def tiny_ptb(directory, n_lines=1500):
    """A corpus with structure to learn: a few fixed sentences in random order."""
    rng = random.Random(0)
    sentences = ["the cat sat on a mat", "a dog ran far away", "N <unk> sat on the dog", "the mat ran"]
    lines = [rng.choice(sentences) for _ in range(n_lines)]
    for name, part in (("train", lines), ("valid", lines[:10]), ("test", lines[10:20])):
        (directory / f"ptb.{name}.txt").write_text("\n".join(" " + line + " " for line in part) + "\n")


@pytest.mark.parametrize("lstm", ["fusenn", "torch"])
def test_ptb_lm_loss_falls(tmp_path, lstm):
    ptb = load("ptb_lm")
    tiny_ptb(tmp_path)
    log = ptb.main(["--data", str(tmp_path), "--size", "small", "--lstm", lstm, "--epochs", "3",
                    "--no-progress", "--log", str(tmp_path / "log.json")])
    ppl = [e["train_ppl"] for e in log["epochs"]]
    assert ppl[-1] < 0.8 * ppl[0], ppl
    assert log["test_ppl"] < 5  # 11 word types with <eos>: uniform guessing would give 11
    assert (tmp_path / "log.json").exists()


def test_ptb_lm_says_what_is_missing(tmp_path):
    ptb = load("ptb_lm")
    (tmp_path / "ptb.train.txt").write_text("a b\n")
    with pytest.raises(SystemExit, match="lacks ptb.valid.txt, ptb.test.txt"):
        ptb.main(["--data", str(tmp_path)])


# How many of make_batch's tensors each example's Model.forward takes (seq2seq's also takes the target).
COMPOSITES = ["cnn_lstm", "seq2seq", "transformer"]


@pytest.mark.parametrize("name, steps", [("cnn_lstm", 50), ("seq2seq", 30), ("transformer", 80)])
def test_example_loss_falls(tmp_path, name, steps):
    log = load(name).main(["--impl", "fusenn", "--size", "toy", "--steps", str(steps), "--device", "cpu",
                           "--log", str(tmp_path / "log.json")])
    run = log["runs"]["fusenn"]
    assert len(run["losses"]) == steps
    assert sum(run["losses"][-5:]) / 5 < 0.7 * run["losses"][0], run["losses"]
    assert json.loads((tmp_path / "log.json").read_text())["runs"]["fusenn"] == run


def test_example_compare_runs_both_from_one_seed():
    log = load("transformer").main(["--compare", "--size", "toy", "--steps", "2", "--device", "cpu"])
    ours, theirs = log["runs"]["fusenn"], log["runs"]["torch"]
    assert ours["losses"] == pytest.approx(theirs["losses"], rel=1e-4)
    assert ours["samples_per_sec"] > 0 and theirs["samples_per_sec"] > 0


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", COMPOSITES)
def test_example_fusenn_and_torch_agree(device, name, backend):
    """The two builds share a state_dict and, in eval mode, give the same outputs."""
    if not fusenn.backends()[backend].usable:
        pytest.skip(fusenn.backends()[backend].detail)
    ex = load(name)
    cfg = ex.CONFIGS["toy"]
    torch.manual_seed(0)
    ours = ex.Model(cfg, "fusenn").to(device).eval()
    theirs = ex.Model(cfg, "torch").to(device).eval()
    theirs.load_state_dict(ours.state_dict())  # strict: the same parameter names and shapes
    batch = ex.make_batch(cfg, 8, torch.Generator(device).manual_seed(0))
    with torch.no_grad(), fusenn.set_backend(backend):
        got = ours(*batch[:ex.FORWARD_ARGS])
    with torch.no_grad():
        want = theirs(*batch[:ex.FORWARD_ARGS])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

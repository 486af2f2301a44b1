"""The examples run end to end at toy size on CPU."""

import importlib.util
import os
import random
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


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

"""Zaremba, Sutskever and Vinyals (2014), "Recurrent Neural Network Regularization": the word-level
Penn Treebank language model, trainable with fusenn.LSTM or torch.nn.LSTM.

    python examples/ptb_lm.py --data ../shared/data/ptb --size medium --lstm fusenn --log medium.json

Dropout follows the paper: on the non-recurrent connections only (embedding output, between layers,
last layer's output); the recurrence is untouched. Masks come from fusenn's Philox generator, so a run
is repeatable with --seed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

import fusenn
import fusenn.info


@dataclass
class Config:
    hidden: int
    unroll: int
    dropout: float
    init: float
    clip: float
    epochs: int
    decay_after: int  # the learning rate is multiplied by `decay` at the end of each epoch after this one
    decay: float
    layers: int = 2
    batch: int = 20
    lr: float = 1.0


CONFIGS = {
    "small": Config(hidden=200, unroll=20, dropout=0.0, init=0.1, clip=5, epochs=13, decay_after=4, decay=0.5),
    "medium": Config(hidden=650, unroll=35, dropout=0.5, init=0.05, clip=5, epochs=39, decay_after=6, decay=0.8),
    "large": Config(hidden=1500, unroll=35, dropout=0.65, init=0.04, clip=10, epochs=55, decay_after=14,
                    decay=1 / 1.15),
}
FILES = ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt")


def load_corpus(directory: str):
    """Token ids of train/valid/test (one <eos> per line) and the vocabulary, built from train."""
    missing = [f for f in FILES if not os.path.isfile(os.path.join(directory, f))]
    if missing:
        raise SystemExit(f"ptb_lm: {directory!r} lacks {', '.join(missing)}; it needs {', '.join(FILES)} "
                         "(the Mikolov split; see ../shared/data/ptb/README.md)")

    def words(name):
        with open(os.path.join(directory, name)) as f:
            return [w for line in f for w in line.split() + ["<eos>"]]

    train = words(FILES[0])
    vocab = {w: i for i, w in enumerate(sorted(set(train)))}
    splits = []
    for name in FILES:
        toks = train if name == FILES[0] else words(name)
        unknown = sorted({w for w in toks if w not in vocab})
        if unknown:
            raise SystemExit(f"ptb_lm: {name} has words missing from the training vocabulary: {unknown[:5]}")
        splits.append(torch.tensor([vocab[w] for w in toks], dtype=torch.long))
    return splits, vocab


def batchify(data: torch.Tensor, batch: int) -> torch.Tensor:
    """(steps, batch): each column a contiguous stretch of the corpus, as in the paper."""
    steps = data.numel() // batch
    return data[: steps * batch].view(batch, steps).t().contiguous()


class LanguageModel(nn.Module):
    def __init__(self, vocab: int, cfg: Config, lstm_cls):
        super().__init__()
        self.dropout = cfg.dropout
        self.embed = nn.Embedding(vocab, cfg.hidden)
        self.lstm = lstm_cls(cfg.hidden, cfg.hidden, cfg.layers, dropout=cfg.dropout)
        self.decoder = nn.Linear(cfg.hidden, vocab)
        for p in self.parameters():
            nn.init.uniform_(p, -cfg.init, cfg.init)

    def forward(self, tokens, state):
        x = fusenn.functional.dropout(self.embed(tokens), self.dropout, self.training)
        y, state = self.lstm(x, state)
        y = fusenn.functional.dropout(y, self.dropout, self.training)
        return self.decoder(y), state


def show_progress(label, b, batches, count, total, start):
    """One progress bar for training and evaluation: batches done, perplexity so far, words per second."""
    wps = count / max(time.perf_counter() - start, 1e-9)
    done = int(30 * (b + 1) / batches)
    print(f"\r  {label:5s} [{'#' * done}{'.' * (30 - done)}] {b + 1}/{batches} ppl {math.exp(total / count):8.2f} "
          f"{wps:8.0f} wps", end="\n" if b == batches - 1 else "", file=sys.stderr, flush=True)


def evaluate(model, data, cfg, device, label="eval", progress=True):
    model.eval()
    total, count, state, start = 0.0, 0, None, time.perf_counter()
    starts = range(0, data.size(0) - 1, cfg.unroll)
    with torch.no_grad():
        for b, i in enumerate(starts):
            n = min(cfg.unroll, data.size(0) - 1 - i)
            x, y = data[i:i + n].to(device), data[i + 1:i + 1 + n].to(device)
            logits, state = model(x, state)
            total += nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
            if progress and (b % 50 == 0 or b == len(starts) - 1):
                show_progress(label, b, len(starts), count, total, start)
    return math.exp(total / count)


def train_epoch(model, data, cfg, lr, device, progress=True):
    model.train()
    params = list(model.parameters())
    total, count, state, start = 0.0, 0, None, time.perf_counter()
    batches = (data.size(0) - 1) // cfg.unroll
    if batches == 0:
        raise SystemExit(f"ptb_lm: the training data is shorter than one unroll of {cfg.unroll} steps")
    for b, i in enumerate(range(0, batches * cfg.unroll, cfg.unroll)):
        x, y = data[i:i + cfg.unroll].to(device), data[i + 1:i + 1 + cfg.unroll].to(device)
        if state is not None:
            state = tuple(s.detach() for s in state)
        logits, state = model(x, state)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        model.zero_grad(set_to_none=True)
        (loss * cfg.unroll).backward()  # the paper's cost: summed over steps, averaged over the batch
        nn.utils.clip_grad_norm_(params, cfg.clip)
        with torch.no_grad():
            for p in params:
                p.add_(p.grad, alpha=-lr)
        total += loss.item() * y.numel()
        count += y.numel()
        if progress and (b % 50 == 0 or b == batches - 1):
            show_progress("train", b, batches, count, total, start)
    elapsed = time.perf_counter() - start
    return math.exp(total / count), count / elapsed, elapsed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "ptb"))
    parser.add_argument("--size", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--lstm", choices=("fusenn", "torch"), default="fusenn")
    parser.add_argument("--epochs", type=int, help="override the paper's epoch count")
    parser.add_argument("--max-batches", type=int,
                        help="truncate the training, validation and test data to this many batches (smoke runs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log", help="write the per-epoch log as JSON here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    cfg = CONFIGS[args.size]
    (train, valid, test), vocab = load_corpus(args.data)
    train, valid, test = (batchify(d, cfg.batch) for d in (train, valid, test))
    if args.max_batches:
        train, valid, test = (d[: args.max_batches * cfg.unroll + 1] for d in (train, valid, test))
    device = torch.device(args.device)
    print(fusenn.info.summary(device, "fusenn.LSTM" if args.lstm == "fusenn" else "torch.nn.LSTM"), flush=True)
    lstm_cls = fusenn.LSTM if args.lstm == "fusenn" else nn.LSTM
    model = LanguageModel(len(vocab), cfg, lstm_cls).to(device)
    log = {"config": asdict(cfg), "size": args.size, "lstm": args.lstm, "device": str(device),
           "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
           "torch": torch.__version__, "fusenn": fusenn.__version__, "epochs": []}
    lr = cfg.lr
    for epoch in range(1, (args.epochs or cfg.epochs) + 1):
        train_ppl, wps, seconds = train_epoch(model, train, cfg, lr, device, progress=not args.no_progress)
        valid_ppl = evaluate(model, valid, cfg, device, "valid", progress=not args.no_progress)
        log["epochs"].append({"epoch": epoch, "lr": lr, "train_ppl": train_ppl, "valid_ppl": valid_ppl,
                              "words_per_sec": wps, "seconds": seconds})
        print(f"epoch {epoch:3d} lr {lr:.4f} train ppl {train_ppl:8.2f} valid ppl {valid_ppl:8.2f} "
              f"{wps:8.0f} wps {seconds:7.1f} s", flush=True)
        if epoch >= cfg.decay_after:
            lr *= cfg.decay
        if args.log:
            with open(args.log, "w") as f:
                json.dump(log, f, indent=1)
    log["test_ppl"] = evaluate(model, test, cfg, device, "test", progress=not args.no_progress)
    print(f"test ppl {log['test_ppl']:.2f}")
    if args.log:
        with open(args.log, "w") as f:
            json.dump(log, f, indent=1)
    return log


if __name__ == "__main__":
    main()

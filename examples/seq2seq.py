"""Sequence to sequence with attention: a bidirectional LSTM encoder, an LSTM decoder started from the
encoder's final states, and multi-head attention from each decoder state over the encoder states
(Luong et al. 2015, with torch's multi-head attention as the score). fusenn.LSTM and
fusenn.MultiheadAttention (need_weights=False: the flash-attention kernel) or their torch.nn twins.

    python examples/seq2seq.py --size real --impl fusenn --log seq2seq.json
    python examples/seq2seq.py --size real --compare          # both impls, same seed, both speeds

Synthetic task: sort a sequence of random digits. Training uses teacher forcing (the decoder reads the
true previous digit, so the whole target runs through the decoder LSTM in one call); the reported
accuracy is per digit of greedy decoding on held-out sequences, each step fed the model's own output.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

import fusenn

import _common as common  # examples/ is on sys.path when a script here runs


@dataclass
class Config:
    length: int
    digits: int
    embed: int
    hidden: int  # decoder and attention width; each encoder direction has half of it
    heads: int
    batch: int
    steps: int
    lr: float


CONFIGS = {
    "toy": Config(length=6, digits=6, embed=16, hidden=32, heads=2, batch=32, steps=100, lr=1e-2),
    "real": Config(length=32, digits=10, embed=128, hidden=512, heads=8, batch=128, steps=1000, lr=1e-3),
}


def make_batch(cfg: Config, batch: int, generator: torch.Generator):
    """Digit sequences (batch, length) and their sorted copies, on the generator's device."""
    src = torch.randint(0, cfg.digits, (batch, cfg.length), generator=generator, device=generator.device)
    return src, src.sort(-1).values


class Model(nn.Module):
    def __init__(self, cfg: Config, impl: str):
        super().__init__()
        layers = fusenn if impl == "fusenn" else nn
        self.bos = cfg.digits  # the decoder's first input
        self.src_embed = nn.Embedding(cfg.digits, cfg.embed)
        self.tgt_embed = nn.Embedding(cfg.digits + 1, cfg.embed)
        self.encoder = layers.LSTM(cfg.embed, cfg.hidden // 2, batch_first=True, bidirectional=True)
        self.decoder = layers.LSTM(cfg.embed, cfg.hidden, batch_first=True)
        self.attention = layers.MultiheadAttention(cfg.hidden, cfg.heads, batch_first=True)
        self.out = nn.Linear(2 * cfg.hidden, cfg.digits)

    def encode(self, src):
        memory, (h, c) = self.encoder(self.src_embed(src))
        # (2, B, H/2) forward and backward final states -> (1, B, H): the decoder's initial state.
        return memory, tuple(s.transpose(0, 1).reshape(1, src.size(0), -1) for s in (h, c))

    def decode(self, tokens, memory, state):
        """Logits for each position of `tokens` (batch, n) given the state before it."""
        dec, state = self.decoder(self.tgt_embed(tokens), state)
        context, _ = self.attention(dec, memory, memory, need_weights=False)
        return self.out(torch.cat([dec, context], -1)), state

    def forward(self, src, tgt):
        """Teacher-forced logits (batch, length, digits): position t reads tgt[:, t - 1]."""
        memory, state = self.encode(src)
        inputs = torch.cat([torch.full_like(tgt[:, :1], self.bos), tgt[:, :-1]], 1)
        return self.decode(inputs, memory, state)[0]

    def greedy(self, src):
        memory, state = self.encode(src)
        token, out = torch.full_like(src[:, :1], self.bos), []
        for _ in range(src.size(1)):
            logits, state = self.decode(token, memory, state)
            token = logits.argmax(-1)
            out.append(token)
        return torch.cat(out, 1)


FORWARD_ARGS = 2  # make_batch's tensors that Model.forward takes


def loss_fn(model, src, tgt):
    return nn.functional.cross_entropy(model(src, tgt).flatten(0, 1), tgt.flatten())


def accuracy(model, src, tgt):
    return (model.greedy(src) == tgt).float().mean().item()


def main(argv=None) -> dict:
    return common.main(sys.modules[__name__], "seq2seq", "held-out greedy accuracy", argv)


if __name__ == "__main__":
    main()

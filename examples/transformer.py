"""A small pre-norm Transformer encoder whose attention is fusenn.MultiheadAttention (need_weights=False:
the flash-attention kernel) or torch.nn.MultiheadAttention.

    python examples/transformer.py --size real --impl fusenn --log transformer.json
    python examples/transformer.py --size real --compare          # both impls, same seed, both speeds

Synthetic task, a histogram: for every token of a random sequence, predict how many times that token
occurs in the whole sequence (classes 1 .. max_count, the last meaning "max_count or more"). Each
position has to find the others holding the same token, which is what attention does; the answer does
not depend on order, so the model has no position embedding.
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
    vocab: int
    max_count: int
    width: int
    heads: int
    layers: int
    batch: int
    steps: int
    lr: float


CONFIGS = {
    "toy": Config(length=12, vocab=8, max_count=4, width=32, heads=2, layers=2, batch=32, steps=100, lr=3e-3),
    "real": Config(length=512, vocab=256, max_count=8, width=512, heads=8, layers=6, batch=32, steps=1000, lr=3e-4),
}


def make_batch(cfg: Config, batch: int, generator: torch.Generator):
    """Tokens (batch, length) and each token's count class, on the generator's device."""
    tokens = torch.randint(0, cfg.vocab, (batch, cfg.length), generator=generator, device=generator.device)
    counts = (tokens.unsqueeze(-1) == tokens.unsqueeze(-2)).sum(-1)
    return tokens, counts.clamp(max=cfg.max_count) - 1


class Block(nn.Module):
    def __init__(self, cfg: Config, impl: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width)
        self.attention = (fusenn if impl == "fusenn" else nn).MultiheadAttention(cfg.width, cfg.heads,
                                                                                 batch_first=True)
        self.norm2 = nn.LayerNorm(cfg.width)
        self.mlp = nn.Sequential(nn.Linear(cfg.width, 4 * cfg.width), nn.GELU(), nn.Linear(4 * cfg.width, cfg.width))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attention(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class Model(nn.Module):
    def __init__(self, cfg: Config, impl: str):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab, cfg.width)
        self.blocks = nn.Sequential(*(Block(cfg, impl) for _ in range(cfg.layers)))
        self.norm = nn.LayerNorm(cfg.width)
        self.out = nn.Linear(cfg.width, cfg.max_count)

    def forward(self, tokens):
        return self.out(self.norm(self.blocks(self.embed(tokens))))


FORWARD_ARGS = 1  # make_batch's tensors that Model.forward takes


def loss_fn(model, tokens, target):
    return nn.functional.cross_entropy(model(tokens).flatten(0, 1), target.flatten())


def accuracy(model, tokens, target):
    return (model(tokens).argmax(-1) == target).float().mean().item()


def main(argv=None) -> dict:
    return common.main(sys.modules[__name__], "transformer", "held-out per-token accuracy", argv)


if __name__ == "__main__":
    main()

"""A CNN + LSTM sequence classifier: every frame of a clip goes through conv + ReLU + max-pool blocks
(fusenn.ConvPool2d, one fused kernel each, or torch.nn's Conv2d, ReLU, MaxPool2d), the per-frame features
through an LSTM, and its last state is classified.

    python examples/cnn_lstm.py --size real --impl fusenn --log cnn_lstm.json
    python examples/cnn_lstm.py --size real --compare          # both impls, same seed, both speeds

Synthetic data: each frame shows one of `patterns` fixed random templates at a random place, in noise.
The label is the pair (first frame's pattern, last frame's pattern): reversing a clip changes its label,
so a bag of frame features cannot solve it and the LSTM must carry the first frame to the end.
"""

from __future__ import annotations

import sys
import functools
from dataclasses import dataclass

import torch
from torch import nn

import fusenn

import _common as common  # examples/ is on sys.path when a script here runs


@dataclass(frozen=True)  # hashable: templates() caches on it
class Config:
    frames: int
    size: int  # frames are size x size, one channel
    patterns: int
    channels: tuple[int, ...]  # one conv + pool block per entry, each halving the frame
    hidden: int
    batch: int
    steps: int
    lr: float
    noise: float = 0.3


CONFIGS = {
    "toy": Config(frames=5, size=8, patterns=2, channels=(8, 16), hidden=32, batch=32, steps=100, lr=1e-2),
    "real": Config(frames=16, size=32, patterns=8, channels=(32, 64, 128), hidden=512, batch=64, steps=500, lr=1e-3),
}


@functools.lru_cache
def templates(cfg: Config, device: torch.device) -> torch.Tensor:
    """The fixed patterns (patterns, size/2, size/2) of +-1, the same for every seed and device; cached so
    that making a batch never copies from the host."""
    g = torch.Generator().manual_seed(1234)
    side = cfg.size // 2
    return (torch.randint(0, 2, (cfg.patterns, side, side), generator=g) * 2.0 - 1.0).to(device)


def make_batch(cfg: Config, batch: int, generator: torch.Generator):
    """Clips (batch, frames, 1, size, size) and labels first * patterns + last, on the generator's device."""
    device = generator.device
    side = cfg.size // 2
    which = torch.randint(0, cfg.patterns, (batch, cfg.frames), generator=generator, device=device)
    clips = cfg.noise * torch.randn(batch, cfg.frames, cfg.size, cfg.size, generator=generator, device=device)
    # Paste each frame's template at a random offset: index arithmetic instead of a Python loop over frames.
    top, left = (torch.randint(0, cfg.size - side + 1, (batch, cfg.frames, 1, 1), generator=generator,
                               device=device) for _ in range(2))
    r = torch.arange(side, device=device).view(1, 1, side, 1)
    c = torch.arange(side, device=device).view(1, 1, 1, side)
    b = torch.arange(batch, device=device).view(batch, 1, 1, 1)
    f = torch.arange(cfg.frames, device=device).view(1, cfg.frames, 1, 1)
    clips[b, f, top + r, left + c] += templates(cfg, device)[which]
    return clips.unsqueeze(2), which[:, 0] * cfg.patterns + which[:, -1]


def conv_block(impl: str, c_in: int, c_out: int) -> nn.Module:
    # Both forms are an nn.Sequential whose only parameters are entry 0's, so state_dicts move both ways.
    if impl == "fusenn":
        return nn.Sequential(fusenn.ConvPool2d(c_in, c_out, 3, padding=1, activation="relu", pool="max",
                                               pool_kernel_size=2))
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))


class Model(nn.Module):
    def __init__(self, cfg: Config, impl: str):
        super().__init__()
        widths = (1,) + cfg.channels
        self.features = nn.Sequential(*(conv_block(impl, a, b) for a, b in zip(widths, widths[1:])))
        side = cfg.size >> len(cfg.channels)
        self.lstm = (fusenn.LSTM if impl == "fusenn" else nn.LSTM)(cfg.channels[-1] * side * side, cfg.hidden,
                                                                   batch_first=True)
        self.classify = nn.Linear(cfg.hidden, cfg.patterns ** 2)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        B, T = clips.shape[:2]
        feats = self.features(clips.flatten(0, 1)).view(B, T, -1)  # all frames of all clips in one batch
        _, (h, _) = self.lstm(feats)
        return self.classify(h[-1])


FORWARD_ARGS = 1  # make_batch's tensors that Model.forward takes


def loss_fn(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def accuracy(model, x, y):
    return (model(x).argmax(-1) == y).float().mean().item()


def main(argv=None) -> dict:
    return common.main(sys.modules[__name__], "cnn_lstm", "held-out accuracy", argv)


if __name__ == "__main__":
    main()

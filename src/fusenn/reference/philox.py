"""Philox4x32-10 in plain PyTorch: the ground truth for every dropout mask in fusenn.

torch has no full uint32 arithmetic, so words live in int64 tensors holding values in [0, 2**32) and
the 32x32 -> 64 bit products are split into 16-bit halves so that nothing overflows int64.

The mask convention shared by the reference, Triton (kernels/philox.py) and CUDA (csrc/philox.cuh):
element i of a mask drawn with (seed, offset) uses the counter (lo32(offset + i), hi32(offset + i), 0, 0)
and the key (lo32(seed), hi32(seed)); its first output word r keeps the element iff
(r >> 8) >= dropout_threshold(p). Integer comparisons only, so all three agree bit for bit.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10


def dropout_threshold(p: float) -> int:
    """The 24-bit threshold under which an element is dropped: round(p * 2**24)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    return int(round(p * (1 << 24)))


def split_seed(seed):
    """(lo32(seed), hi32(seed)). `seed` is an int, or a 0-d int64 tensor (what fusenn's ops pass, so that
    torch.compile traces the reference paths without reading the value; its range was checked where it was
    made, or it is a device tensor whose two 32-bit words are the key whatever its sign): the key words are
    then 0-d tensors and the rounds below compute the same integers with them."""
    if isinstance(seed, torch.Tensor):
        return seed & MASK32, (seed >> 32) & MASK32
    if not 0 <= seed < (1 << 63):
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return seed & MASK32, seed >> 32


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    lo_part = (a & 0xFFFF) * m  # < 2**48
    hi_part = (a >> 16) * m  # < 2**48
    hi = (hi_part + (lo_part >> 16)) >> 16
    lo = (((hi_part & 0xFFFF) << 16) + lo_part) & MASK32
    return hi, lo


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of counters (int64 tensors holding uint32 words) under key (k0, k1): ints or 0-d int64
    tensors."""
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def philox_uint32(numel: int, seed: int, offset: int = 0, device=None) -> torch.Tensor:
    """First Philox output word for counters offset .. offset + numel - 1, as int64 in [0, 2**32)."""
    k0, k1 = split_seed(seed)
    counter = torch.arange(numel, dtype=torch.int64, device=device) + offset
    zero = torch.zeros_like(counter)
    return philox4x32_10(counter & MASK32, counter >> 32, zero, zero, k0, k1)[0]


def dropout_mask(numel: int, p: float, seed: int, offset: int = 0, device=None) -> torch.Tensor:
    """Flat bool mask, True where the element is kept."""
    threshold = dropout_threshold(p)
    return (philox_uint32(numel, seed, offset, device) >> 8) >= threshold

"""Philox4x32-10 for Triton kernels, and the dropout-mask kernel built on it.

Bit-identical to fusenn.reference.philox and csrc/philox.cuh: see the convention there. Other kernels
call `philox_keep` with the flat counter of each element to regenerate their masks in backward.
Kernels read their seed from device memory (`philox_key`), never from a launch argument: a CUDA graph
bakes launch arguments in at capture, but the seed tensor is refilled by torch's RNG on every replay, so
each replay draws fresh masks as eager calls would.
The 32x32 -> 64 bit product goes through uint64 (umulhi is not available in every Triton version's
interpreter).
"""

import torch
import triton
import triton.language as tl

from fusenn.kernels import device_guard

PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)


@triton.jit
def philox_uint32(counter, k0, k1):
    """First output word of Philox4x32-10 for int64 counters (lo, hi words) and key words k0, k1."""
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    k0 = tl.full(c0.shape, k0, tl.int64).to(tl.uint32)
    k1 = tl.full(c0.shape, k1, tl.int64).to(tl.uint32)
    for _ in tl.static_range(10):
        p0 = c0.to(tl.uint64) * PHILOX_M0
        p1 = c2.to(tl.uint64) * PHILOX_M1
        c0, c1, c2, c3 = (
            (p1 >> 32).to(tl.uint32) ^ c1 ^ k0,
            p1.to(tl.uint32),
            (p0 >> 32).to(tl.uint32) ^ c3 ^ k1,
            p0.to(tl.uint32),
        )
        k0 = k0 + PHILOX_W0
        k1 = k1 + PHILOX_W1
    return c0


@triton.jit
def philox_key(seed_ptr):
    """Key words (lo32, hi32) of the int64 seed at seed_ptr, as int64 scalars."""
    seed = tl.load(seed_ptr)
    return seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF


@triton.jit
def philox_keep(counter, k0, k1, threshold):
    """True where the element with this counter survives dropout (threshold from dropout_threshold)."""
    return (philox_uint32(counter, k0, k1) >> 8).to(tl.int32) >= threshold


@triton.jit(do_not_specialize=["numel", "offset", "threshold"])
def dropout_mask_kernel(out_ptr, numel, offset, seed_ptr, threshold, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    k0, k1 = philox_key(seed_ptr)
    keep = philox_keep(idx + offset, k0, k1, threshold)
    tl.store(out_ptr + idx, keep.to(tl.int8), mask=idx < numel)


def dropout_mask(out, offset: int, seed, threshold: int):
    """Fill the flat bool tensor `out` with the mask for counters offset .. offset + out.numel() - 1;
    `seed` is a 0-d int64 tensor on out's device."""
    numel = out.numel()
    block = 1024
    grid = (triton.cdiv(numel, block),)
    if numel:
        with device_guard(out):
            dropout_mask_kernel[grid](out.view(torch.int8), numel, offset, seed, threshold, BLOCK=block)
    return out

"""Flash-style attention: tiled online-softmax forward and a backward that recomputes the tiles.

Layout: q (N, Hq, L, E), k (N, Hkv, S, E), v (N, Hkv, S, Ev), any strides; query head h reads key/value
head h // (Hq // Hkv), so GQA/MQA never copies K or V. The optional mask is 4-D, broadcastable to
(N, Hq, L, S) through stride 0 on broadcast dims, and is either bool (True = may attend) or additive.

Forward: one program per (BLOCK_M query rows, n, h); it walks the key tiles keeping the running row max
and sum, never holding more than a BLOCK_M x BLOCK_N tile of scores, and saves the log-sum-exp (in the
log2 domain) per row. Causal (top-left: key s is visible to row l iff s <= l) stops the walk at the
diagonal, so fully masked tiles are never loaded.
Backward: dQ programs own query rows (and first write delta = rowsum(dO * O)); dK/dV programs own key
rows and walk the query rows of every query head sharing their kv head, so nothing is accumulated with
atomics and the result is deterministic. Both recompute P = exp2(scores - lse). Where one program cannot
hold both the dK and the dV accumulators in registers (d256, fp32; d128 with dropout under Triton 3.6), dK and
dV are two launches (PART), the dK one with its own tiles where the tables give them ("dk"). fp32 d256 splits
dQ, dV and dK too: two programs per query (key) tile, each accumulating half of the columns (DQ_PARTS,
COL_PARTS), both recomputing P (and dP for dQ and dK); its dV and dK programs sum S (and dP) over two slices
of the head dim, so that fewer operands are live at once.
Tiles per kernel, head dim and dtype (_config) come from the static sm_90a report (benchmarks/static.py).
Grid and offsets: one 1-D grid (a program's (tile, n, h) decoded by _tile), so N * heads has no 65535
limit; offsets are int64 in their n and h parts, and in their row parts too (WIDE) when the host sees a
view whose offsets within a slice reach 2**31 elements (needs_int64).
Dropout: the element (n, h, l, s) is kept iff philox_keep(((n*Hq + h)*L + l)*S + s) (fusenn.kernels.philox),
regenerated in backward; the row sums of the softmax are taken before dropout, as torch does.
Precision: fp16/bf16 tiles feed tl.dot directly with fp32 accumulation; fp32 inputs take what torch's
SDPA does for fp32 on a GPU (its memory-efficient kernel's fp32-accurate "fast fp32" products): Triton's
tf32x3, three TF32 tensor-core products per dot (f32_dot). The interpreter computes every product in IEEE
fp32 (its bf16 dot is wrong).
"""

import torch
import triton
import triton.language as tl

from fusenn.kernels import INTERPRET, NEWER_PTXAS, device_guard
from fusenn.kernels.philox import philox_keep, philox_key

LOG2E = tl.constexpr(1.4426950408889634)
MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2


if INTERPRET:
    @triton.jit
    def _bound(x):
        """A loop bound range() accepts. The interpreter holds scalars as 1-element arrays, which
        numpy >= 2.4 refuses to turn into an int, so take the element out."""
        return x.handle.data.item()

    @triton.jit
    def _opaque_zero():
        return 0

    @triton.jit
    def _cast(x, dtype: tl.constexpr):
        """x.to(dtype) rounding to nearest even, as the GPU does: the interpreter truncates fp32 -> bf16,
        so add half an ulp (ties to even) first."""
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            x = (bits + 0x7FFF + ((bits >> 16) & 1)).to(tl.float32, bitcast=True)
        return x.to(dtype)
else:
    @triton.jit
    def _bound(x):
        return x

    @triton.jit
    def _cast(x, dtype: tl.constexpr):
        return x.to(dtype)

    @triton.jit
    def _opaque_zero():
        """0, from an instruction the compiler may neither move nor merge (not pure)."""
        return tl.inline_asm_elementwise("mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _span(start, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    """Indices start .. start + BLOCK - 1, in int64 when WIDE, so that index * stride cannot wrap around."""
    idx = start + tl.arange(0, BLOCK)
    if WIDE:
        idx = idx.to(tl.int64)
    return idx


@triton.jit
def _tile(L, BLOCK: tl.constexpr):
    """(tile index along the L rows, n * heads + h) of this program: the 1-D grid enumerates the tiles of
    one (n, h) first (programs running side by side share its K and V in L2), and has no 65535 limit."""
    pid = tl.program_id(0)
    tiles = tl.cdiv(L, BLOCK)
    return pid % tiles, pid // tiles


@triton.jit
def _dot(a, b, F32_DOT: tl.constexpr):
    """a @ b with fp32 accumulation; `a` (probabilities, score gradients) is rounded to b's dtype first
    unless the product runs in fp32 (F32_DOT: its input precision, "ieee" or "tf32x3"; "none": b's dtype)."""
    if F32_DOT != "none":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=F32_DOT)
    return tl.dot(a.to(b.dtype), b)


@triton.jit
def _scores(q, k, rows, cols, L, S, mask_base, sml, sms, qk_scale,
            MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, F32_DOT: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) tile of (q k^T * scale + mask) * log2(e); -inf where the key is not visible."""
    return _masked_scores(_dot(q, tl.trans(k), F32_DOT), rows, cols, L, S, mask_base, sml, sms, qk_scale,
                          MASK_KIND, IS_CAUSAL)


@triton.jit
def _masked_scores(qk, rows, cols, L, S, mask_base, sml, sms, qk_scale, MASK_KIND: tl.constexpr,
                   IS_CAUSAL: tl.constexpr):
    """_scores from the product q k^T."""
    s = qk * qk_scale
    in_bounds = (rows[:, None] < L) & (cols[None, :] < S)
    visible = in_bounds
    if IS_CAUSAL:
        visible = visible & (cols[None, :] <= rows[:, None])
    if MASK_KIND != 0:
        m = tl.load(mask_base + rows[:, None] * sml + cols[None, :] * sms, mask=in_bounds, other=0)
        if MASK_KIND == 1:
            visible = visible & (m != 0)
        else:
            s += m.to(tl.float32) * LOG2E
    return tl.where(visible, s, float("-inf"))


@triton.jit
def _dot_nt_sliced(a_base, sar, sac, b_base, sbr, sbc, rows, cols, L, S, E, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, D: tl.constexpr, SLICES: tl.constexpr, F32_DOT: tl.constexpr,
                   WIDE: tl.constexpr):
    """a[rows, :E] @ b[cols, :E]^T summed over SLICES slices of the head dim, each slice of a and b loaded
    apart: the operands live at once are a slice's, not the whole head dim's (b's slices do not depend on
    the caller's loop, and the compiler keeps them in shared memory across it, as it would the whole b)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for c in tl.static_range(SLICES):
        dc = _span(c * (D // SLICES), D // SLICES, WIDE)
        a = tl.load(a_base + rows[:, None] * sar + dc[None, :] * sac, mask=(rows[:, None] < L) & (dc[None, :] < E),
                    other=0.0)
        b = tl.load(b_base + cols[:, None] * sbr + dc[None, :] * sbc, mask=(cols[:, None] < S) & (dc[None, :] < E),
                    other=0.0)
        acc += _dot(a, tl.trans(b), F32_DOT)
    return acc


@triton.jit
def _keep(nh, rows, cols, L, S, SEED, threshold, RELOAD_KEY: tl.constexpr = False):
    """Dropout keep-bits of a tile: the element's flat index in (N, Hq, L, S) is its Philox counter.
    RELOAD_KEY: read the seed afresh for this tile (a volatile load, which the compiler may not hoist out of
    the loop): hoisted, the key words of all ten rounds (k + i * W) are computed once and held in registers
    through the loop, 20 of them, which the dK/dV kernel cannot spare."""
    counter = (nh.to(tl.int64) * L + rows[:, None]) * S + cols[None, :]
    if RELOAD_KEY:
        seed = tl.load(SEED, volatile=True)
        k0, k1 = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    else:
        k0, k1 = philox_key(SEED)  # one cached scalar load per tile
    return philox_keep(counter, k0, k1, threshold)


@triton.jit(do_not_specialize=["threshold"])
def attention_forward_kernel(
        Q, K, V, O, LSE, MASK,
        sqn, sqh, sql, sqd, skn, skh, sks, skd, svn, svh, svs, svd, son, soh, sol, sod, smn, smh, sml, sms,
        H, L, S, E, EV, GROUP, qk_scale, drop_scale, SEED, threshold,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
        MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, F32_DOT: tl.constexpr,
        WIDE: tl.constexpr):
    pid_m, nh = _tile(L, BLOCK_M)
    n = (nh // H).to(tl.int64)
    h = (nh % H).to(tl.int64)
    hk = h // GROUP
    rows = _span(pid_m * BLOCK_M, BLOCK_M, WIDE)
    d = _span(0, D, WIDE)
    dv = _span(0, DV, WIDE)
    q = tl.load(Q + n * sqn + h * sqh + rows[:, None] * sql + d[None, :] * sqd,
                mask=(rows[:, None] < L) & (d[None, :] < E), other=0.0)
    k_base = K + n * skn + hk * skh
    v_base = V + n * svn + hk * svh
    mask_base = MASK + n * smn + h * smh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV], tl.float32)
    hi = S
    if IS_CAUSAL:
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M)
    for start in range(0, _bound(hi), BLOCK_N):
        cols = _span(start, BLOCK_N, WIDE)
        k = tl.load(k_base + cols[:, None] * sks + d[None, :] * skd,
                    mask=(cols[:, None] < S) & (d[None, :] < E), other=0.0)
        s = _scores(q, k, rows, cols, L, S, mask_base, sml, sms, qk_scale, MASK_KIND, IS_CAUSAL, F32_DOT)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: keep exp2 away from NaN
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_keep(nh, rows, cols, L, S, SEED, threshold), p, 0.0)
        v = tl.load(v_base + cols[:, None] * svs + dv[None, :] * svd,
                    mask=(cols[:, None] < S) & (dv[None, :] < EV), other=0.0)
        acc = acc * alpha[:, None] + _dot(p, v, F32_DOT)
        m_i = m_new

    empty = l_i == 0.0  # every key masked out: torch returns zeros there
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc * (drop_scale / l_safe)[:, None]
    tl.store(O + n * son + h * soh + rows[:, None] * sol + dv[None, :] * sod, _cast(out, O.dtype.element_ty),
             mask=(rows[:, None] < L) & (dv[None, :] < EV))
    lse = tl.where(empty, float("inf"), m_i + tl.log2(l_safe))  # +inf makes P = 0 in backward
    tl.store(LSE + nh.to(tl.int64) * L + rows, lse, mask=rows < L)


@triton.jit(do_not_specialize=["threshold"])
def attention_backward_dq_kernel(
        Q, K, V, O, DO, LSE, DELTA, DQ, MASK,
        sqn, sqh, sql, sqd, skn, skh, sks, skd, svn, svh, svs, svd, son, soh, sol, sod,
        sdn, sdh, sdl, sdd, smn, smh, sml, sms,
        H, L, S, E, EV, GROUP, qk_scale, scale, drop_scale, SEED, threshold,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
        MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, F32_DOT: tl.constexpr,
        WIDE: tl.constexpr, DQ_PARTS: tl.constexpr):
    """DQ_PARTS programs per query tile, each accumulating D // DQ_PARTS columns of dQ (all recompute the
    scores and dP): where one program cannot hold the whole dQ dot (_config's DQ_PARTS)."""
    pid_m, nh_part = _tile(L, BLOCK_M)
    nh = nh_part // DQ_PARTS
    part = nh_part % DQ_PARTS
    n = (nh // H).to(tl.int64)
    h = (nh % H).to(tl.int64)
    hk = h // GROUP
    rows = _span(pid_m * BLOCK_M, BLOCK_M, WIDE)
    d = _span(0, D, WIDE)
    dv = _span(0, DV, WIDE)
    dq_cols = _span(part * (D // DQ_PARTS), D // DQ_PARTS, WIDE)
    row_ok = rows < L
    q_mask = row_ok[:, None] & (d[None, :] < E)
    o_mask = row_ok[:, None] & (dv[None, :] < EV)
    q = tl.load(Q + n * sqn + h * sqh + rows[:, None] * sql + d[None, :] * sqd, mask=q_mask, other=0.0)
    do = tl.load(DO + n * sdn + h * sdh + rows[:, None] * sdl + dv[None, :] * sdd, mask=o_mask, other=0.0)
    o = tl.load(O + n * son + h * soh + rows[:, None] * sol + dv[None, :] * sod, mask=o_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + nh.to(tl.int64) * L + rows, delta, mask=row_ok & (part == 0))
    lse = tl.load(LSE + nh.to(tl.int64) * L + rows, mask=row_ok, other=float("inf"))
    k_base = K + n * skn + hk * skh
    v_base = V + n * svn + hk * svh
    mask_base = MASK + n * smn + h * smh

    dq = tl.zeros([BLOCK_M, D // DQ_PARTS], tl.float32)
    hi = S
    if IS_CAUSAL:
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M)
    for start in range(0, _bound(hi), BLOCK_N):
        cols = _span(start, BLOCK_N, WIDE)
        k = tl.load(k_base + cols[:, None] * sks + d[None, :] * skd,
                    mask=(cols[:, None] < S) & (d[None, :] < E), other=0.0)
        v = tl.load(v_base + cols[:, None] * svs + dv[None, :] * svd,
                    mask=(cols[:, None] < S) & (dv[None, :] < EV), other=0.0)
        s = _scores(q, k, rows, cols, L, S, mask_base, sml, sms, qk_scale, MASK_KIND, IS_CAUSAL, F32_DOT)
        p = tl.exp2(s - lse[:, None])
        dp = _dot(do, tl.trans(v), F32_DOT)
        if DROPOUT:
            dp = tl.where(_keep(nh, rows, cols, L, S, SEED, threshold), dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if DQ_PARTS > 1:  # this program's columns of K (in L1: the whole tile was just read)
            k = tl.load(k_base + cols[:, None] * sks + dq_cols[None, :] * skd,
                        mask=(cols[:, None] < S) & (dq_cols[None, :] < E), other=0.0)
        dq += _dot(ds, k, F32_DOT)
    tl.store(DQ + nh.to(tl.int64) * L * E + rows[:, None] * E + dq_cols[None, :],
             _cast(dq * scale, DQ.dtype.element_ty), mask=row_ok[:, None] & (dq_cols[None, :] < E))


@triton.jit(do_not_specialize=["threshold"])
def attention_backward_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV_OUT, MASK,
        sqn, sqh, sql, sqd, skn, skh, sks, skd, svn, svh, svs, svd, sdn, sdh, sdl, sdd, smn, smh, sml, sms,
        H, HKV, L, S, E, EV, GROUP, qk_scale, scale, drop_scale, SEED, threshold,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
        MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, F32_DOT: tl.constexpr,
        WIDE: tl.constexpr, PART: tl.constexpr, COL_PARTS: tl.constexpr):
    """PART 0: dK and dV; 1: dV alone; 2: dK alone (two launches where one program cannot hold both
    accumulators in registers: _config's SPLIT_DKDV). With PART 1 or 2, COL_PARTS programs per key tile each
    accumulate 1 / COL_PARTS of the columns (all recompute P, and dP for dK): _config's COL_PARTS. Those
    programs also sum q k^T and dO v^T over COL_PARTS slices of the head dim (_dot_nt_sliced): where the
    columns are split, whole-head-dim operands do not fit beside the rest either."""
    pid_n, nhk_part = _tile(S, BLOCK_N)
    nhk = nhk_part // COL_PARTS
    cpart = nhk_part % COL_PARTS
    n = (nhk // HKV).to(tl.int64)
    hk = (nhk % HKV).to(tl.int64)
    cols = _span(pid_n * BLOCK_N, BLOCK_N, WIDE)
    d = _span(0, D, WIDE)
    dv = _span(0, DV, WIDE)
    dk_cols = _span(cpart * (D // COL_PARTS), D // COL_PARTS, WIDE)  # this program's columns of dK, dV
    dv_cols = _span(cpart * (DV // COL_PARTS), DV // COL_PARTS, WIDE)
    k_mask = (cols[:, None] < S) & (d[None, :] < E)
    v_mask = (cols[:, None] < S) & (dv[None, :] < EV)
    k_base = K + n * skn + hk * skh
    v_base = V + n * svn + hk * svh
    k = tl.load(k_base + cols[:, None] * sks + d[None, :] * skd, mask=k_mask, other=0.0)
    v = tl.load(v_base + cols[:, None] * svs + dv[None, :] * svd, mask=v_mask, other=0.0)

    dk = tl.zeros([BLOCK_N, D // COL_PARTS], tl.float32)
    dv_acc = tl.zeros([BLOCK_N, DV // COL_PARTS], tl.float32)
    lo = 0
    if IS_CAUSAL:  # rows above the first key of this tile see none of it
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for g in range(_bound(GROUP)):
        h = hk * GROUP + g
        nh = n * H + h
        q_base = Q + n * sqn + h * sqh
        do_base = DO + n * sdn + h * sdh
        mask_base = MASK + n * smn + h * smh
        for start in range(_bound(lo), _bound(L), BLOCK_M):
            rows = _span(start, BLOCK_M, WIDE)
            row_ok = rows < L
            if DROPOUT:  # first, while no score tile is live: Philox's rounds need four words per element
                keep = _keep(nh, rows, cols, L, S, SEED, threshold, RELOAD_KEY=True)
            q = tl.load(q_base + rows[:, None] * sql + d[None, :] * sqd,
                        mask=row_ok[:, None] & (d[None, :] < E), other=0.0)
            do = tl.load(do_base + rows[:, None] * sdl + dv[None, :] * sdd,
                         mask=row_ok[:, None] & (dv[None, :] < EV), other=0.0)
            lse = tl.load(LSE + nh * L + rows, mask=row_ok, other=float("inf"))
            if COL_PARTS > 1:
                qk = _dot_nt_sliced(q_base, sql, sqd, k_base, sks, skd, rows, cols, L, S, E, BLOCK_M, BLOCK_N, D,
                                    COL_PARTS, F32_DOT, WIDE)
                s = _masked_scores(qk, rows, cols, L, S, mask_base, sml, sms, qk_scale, MASK_KIND, IS_CAUSAL)
            else:
                s = _scores(q, k, rows, cols, L, S, mask_base, sml, sms, qk_scale, MASK_KIND, IS_CAUSAL, F32_DOT)
            p = tl.exp2(s - lse[:, None])
            if PART != 2:  # dV += P_dropped^T dO
                do_part = do
                if COL_PARTS > 1:  # only this program's columns of dO (dP is not computed here: PART 1)
                    do_part = tl.load(do_base + rows[:, None] * sdl + dv_cols[None, :] * sdd,
                                      mask=row_ok[:, None] & (dv_cols[None, :] < EV), other=0.0)
                if DROPOUT:
                    dv_acc += _dot(tl.trans(tl.where(keep, p * drop_scale, 0.0)), do_part, F32_DOT)
                else:
                    dv_acc += _dot(tl.trans(p), do_part, F32_DOT)
            if PART != 1:  # dK += dS^T Q
                delta = tl.load(DELTA + nh * L + rows, mask=row_ok, other=0.0)
                if COL_PARTS > 1:
                    dp = _dot_nt_sliced(do_base, sdl, sdd, v_base, svs, svd, rows, cols, L, S, EV, BLOCK_M, BLOCK_N,
                                        DV, COL_PARTS, F32_DOT, WIDE)
                else:
                    dp = _dot(do, tl.trans(v), F32_DOT)
                if DROPOUT:
                    dp = tl.where(keep, dp * drop_scale, 0.0)
                ds = p * (dp - delta[:, None])
                if COL_PARTS > 1:  # this program's columns of Q (in L1: the whole tile was just read)
                    q = tl.load(q_base + rows[:, None] * sql + dk_cols[None, :] * sqd,
                                mask=row_ok[:, None] & (dk_cols[None, :] < E), other=0.0)
                dk += _dot(tl.trans(ds), q, F32_DOT)
    # the store's offsets afresh: computed before the loop, they would be held (or spilled) through it
    pid_n, nhk_part = _tile(S + _opaque_zero(), BLOCK_N)
    cpart = nhk_part % COL_PARTS
    cols = _span(tl.multiple_of(pid_n * BLOCK_N, BLOCK_N), BLOCK_N, WIDE)
    dk_cols = _span(cpart * (D // COL_PARTS), D // COL_PARTS, WIDE)
    dv_cols = _span(cpart * (DV // COL_PARTS), DV // COL_PARTS, WIDE)
    out = (nhk_part // COL_PARTS).to(tl.int64) * S
    if PART != 1:
        tl.store(DK + (out + cols[:, None]) * E + dk_cols[None, :], _cast(dk * scale, DK.dtype.element_ty),
                 mask=(cols[:, None] < S) & (dk_cols[None, :] < E))
    if PART != 2:
        tl.store(DV_OUT + (out + cols[:, None]) * EV + dv_cols[None, :], _cast(dv_acc, DV_OUT.dtype.element_ty),
                 mask=(cols[:, None] < S) & (dv_cols[None, :] < EV))


def _pad(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


# GPU tiles (BLOCK_M query rows, BLOCK_N key rows, num_warps, num_stages) per kernel, head dim bucket and
# dtype, chosen from the static sm_90a report (benchmarks/static.py): no spills, wgmma for fp16/bf16 (at
# least 64 rows per warpgroup: 128 rows on 8 warps, 64 on 4), no dot replicated across warps.
_HALF = {
    ("fwd", 64): (128, 64, 4, 3), ("fwd", 128): (128, 64, 8, 2), ("fwd", 256): (128, 32, 8, 2),
    ("dq", 64): (64, 64, 4, 2), ("dq", 128): (128, 64, 8, 2), ("dq", 256): (128, 64, 8, 1),
    ("dkdv", 64): (64, 64, 4, 2), ("dkdv", 128): (128, 64, 8, 1), ("dkdv", 256): (128, 64, 8, 1),
}
_HALF_DROPOUT = {("fwd", 64): (128, 64, 8, 3), ("dkdv", 64): (128, 64, 8, 2)}
_FP32 = {  # tf32x3 needs three products' operands live: small tiles, dK and dV in two launches
    ("fwd", 64): (64, 32, 4, 2), ("fwd", 128): (64, 32, 4, 1), ("fwd", 256): (16, 32, 8, 1),
    ("dq", 64): (64, 32, 4, 2), ("dq", 128): (16, 32, 4, 1), ("dq", 256): (16, 32, 8, 1),
    ("dkdv", 64): (16, 32, 4, 1), ("dkdv", 128): (16, 32, 4, 1), ("dkdv", 256): (16, 32, 8, 1),
    ("dk", 128): (16, 32, 8, 1),  # the dK launch alone: spills on 4 warps (8 B under 3.6, 120 B under 3.8)
}
# Triton 3.7 on (a newer ptxas) spills in these three at the tiles above; they take smaller key tiles there.
_NEWER_PTXAS = {(torch.float32, "fwd", 128): (64, 16, 4, 1), (torch.float16, "dq", 256): (128, 32, 8, 1),
                (torch.bfloat16, "dq", 256): (128, 32, 8, 1), (torch.float32, "dkdv", 64): (16, 16, 2, 1)}
_DQ_PARTS = {(torch.float32, 256)}  # dQ in two column halves (two programs per tile, both recompute S and dP)
# likewise dV (recomputing S) and dK (S and dP), in their two launches, which also sum S and dP over two slices
# of the head dim: over the whole of it, tf32x3's 16 x 256 and 256 x 32 operands left Triton 3.8's ptxas too few
# registers in the dK launch (~0.9 KB spilled); sliced, both launches take ~168 registers under 3.6 and 3.8
_COL_PARTS = {(torch.float32, 256)}
_SPLIT_DKDV = {256}  # head dims whose dK and dV accumulators do not both fit in one program's registers


def _config(d: int, dtype: torch.dtype, kernel: str, dropout: bool) -> dict:
    """Tile sizes and launch settings of `kernel` ("fwd", "dq", "dkdv"; "dk": the dK launch where dK and dV
    are two, which takes the "dkdv" tiles unless a table has its own). Small tiles under the interpreter
    (many partial tiles get tested, and its cost is per operation), dK/dV split there from head dim 65 up
    so that the tests cover both forms; on the GPU, the tables above."""
    bucket = 64 if d <= 64 else 128 if d <= 128 else 256
    if INTERPRET:
        cfg = dict(BLOCK_M=16, BLOCK_N=16)
        split = d > 64
    else:
        table = _FP32 if dtype == torch.float32 else _HALF
        tile = next(t for name in (("dk", "dkdv") if kernel == "dk" else (kernel,)) for t in (
            _HALF_DROPOUT.get((name, bucket)) if dropout and dtype != torch.float32 else None,
            _NEWER_PTXAS.get((dtype, name, bucket)) if NEWER_PTXAS else None, table.get((name, bucket))) if t)
        cfg = dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), tile))
        # with dropout at d128, dK's Philox rounds beside both accumulators spill under 3.6: two launches (3.8's
        # ptxas fits one launch, with the Philox key reloaded per tile: _keep's RELOAD_KEY)
        split = bucket in _SPLIT_DKDV or dtype == torch.float32 or (dropout and bucket == 128 and not NEWER_PTXAS)
    if kernel == "dkdv":
        cfg["SPLIT_DKDV"] = split
    if kernel == "dq":
        cfg["DQ_PARTS"] = 2 if (d > 64 if INTERPRET else (dtype, bucket) in _DQ_PARTS) else 1
    if kernel in ("dkdv", "dk"):  # used where dK and dV are two launches (interpreter: fp32 there, so both forms run)
        cfg["COL_PARTS"] = 2 if ((d > 64 and dtype == torch.float32) if INTERPRET else
                                 (dtype, bucket) in _COL_PARTS) else 1
    return cfg


INT32_LIMIT = 2**31


def _slice_extent(t) -> int:
    """The largest element offset within one (n, h) slice of a 4-D view: what the kernels compute from
    row and column indices (the n and h parts of every offset are always 64-bit)."""
    if t is None or t.numel() == 0:
        return 0
    return sum((size - 1) * stride for size, stride in zip(t.shape[2:], t.stride()[2:]))


def needs_int64(*tensors) -> bool:
    """Whether the kernels must compute row offsets in int64 (the WIDE flag): some view's offsets within a
    slice reach 2**31 elements, e.g. MultiheadAttention's per-head views of a packed (L, N, 3E) projection
    at L 8192, N 64, E 2048. Below that, int32 offsets are cheaper."""
    return any(_slice_extent(t) >= INT32_LIMIT for t in tensors)


def grid(rows: int, block: int, slices: int) -> tuple:
    """The 1-D grid of programs over `slices` (n, head) pairs of `rows` rows in tiles of `block` (_tile)."""
    return (triton.cdiv(rows, block) * slices,)


def f32_dot(dtype) -> str:
    """How the products run: fp16/bf16 on tensor cores in their dtype; fp32 as torch's SDPA runs it on a
    GPU (its memory-efficient kernel, the one that takes fp32: fp32-accurate products from three TF32
    ones), here Triton's tf32x3; the interpreter computes every product in IEEE fp32."""
    if INTERPRET:
        return "ieee"
    return "tf32x3" if dtype == torch.float32 else "none"


def _mask_args(mask, q):
    """(pointer tensor, kind, 4 strides): bools go in as bytes; no mask passes q as a never-read pointer."""
    if mask is None:
        return q, MASK_NONE, (0, 0, 0, 0)
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), MASK_BOOL, mask.stride()
    return mask, MASK_ADD, mask.stride()


def _common(q, k, v, mask, dropout_p, scale, seed, *written):
    from fusenn.reference.philox import dropout_threshold

    N, H, L, E = q.shape
    HKV, S, EV = k.shape[1], k.shape[2], v.shape[3]
    mask_t, kind, mstrides = _mask_args(mask, q)
    return dict(
        sizes=(N, H, HKV, L, S, E, EV), mask=mask_t, mstrides=mstrides,
        consts=dict(D=_pad(E), DV=_pad(EV), MASK_KIND=kind, DROPOUT=dropout_p > 0.0,
                    F32_DOT=f32_dot(q.dtype), WIDE=needs_int64(q, k, v, mask, *written)),
        qk_scale=scale * 1.4426950408889634, drop_scale=1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0,
        philox=(seed if seed is not None else q, dropout_threshold(dropout_p)))  # q: never read


def attention_forward(q, k, v, mask, dropout_p: float, is_causal: bool, scale: float, seed, out, lse):
    """Fill out (N, Hq, L, Ev) and lse (N, Hq, L) float32 (log2 domain); see the module docstring."""
    c = _common(q, k, v, mask, dropout_p, scale, seed, out)
    N, H, HKV, L, S, E, EV = c["sizes"]
    cfg = _config(max(E, EV), q.dtype, "fwd", dropout_p > 0.0)
    programs = grid(L, cfg["BLOCK_M"], N * H)
    if programs[0] == 0:
        return out, lse
    with device_guard(q):
        attention_forward_kernel[programs](
            q, k, v, out, lse, c["mask"], *q.stride(), *k.stride(), *v.stride(), *out.stride(), *c["mstrides"],
            H, L, S, E, EV, H // HKV, c["qk_scale"], c["drop_scale"], *c["philox"],
            IS_CAUSAL=is_causal, **c["consts"], **cfg)
    return out, lse


def attention_backward(grad, q, k, v, out, lse, mask, dropout_p: float, is_causal: bool, scale: float, seed,
                       dq, dk, dv, delta):
    """Fill the contiguous dq, dk, dv (shapes of q, k, v) and the scratch delta (N, Hq, L) float32."""
    c = _common(q, k, v, mask, dropout_p, scale, seed, out, grad, dq, dk, dv)
    N, H, HKV, L, S, E, EV = c["sizes"]
    cfg = _config(max(E, EV), q.dtype, "dq", dropout_p > 0.0)
    dkdv_cfg = _config(max(E, EV), q.dtype, "dkdv", dropout_p > 0.0)
    parts = [(1, dkdv_cfg), (2, _config(max(E, EV), q.dtype, "dk", dropout_p > 0.0))] if dkdv_cfg.pop(
        "SPLIT_DKDV") else [(0, dict(dkdv_cfg, COL_PARTS=1))]
    shared = (*c["mstrides"],)
    with device_guard(q):
        programs = grid(L, cfg["BLOCK_M"], N * H * cfg["DQ_PARTS"])
        if programs[0]:
            attention_backward_dq_kernel[programs](
                q, k, v, out, grad, lse, delta, dq, c["mask"], *q.stride(), *k.stride(), *v.stride(),
                *out.stride(), *grad.stride(), *shared, H, L, S, E, EV, H // HKV, c["qk_scale"], scale,
                c["drop_scale"], *c["philox"], IS_CAUSAL=is_causal, **c["consts"], **cfg)
        for part, part_cfg in parts:
            programs = grid(S, part_cfg["BLOCK_N"], N * HKV * part_cfg["COL_PARTS"])
            if programs[0]:
                attention_backward_dkdv_kernel[programs](
                    q, k, v, grad, lse, delta, dk, dv, c["mask"], *q.stride(), *k.stride(), *v.stride(),
                    *grad.stride(), *shared, H, HKV, L, S, E, EV, H // HKV, c["qk_scale"], scale, c["drop_scale"],
                    *c["philox"], IS_CAUSAL=is_causal, **c["consts"], **part_cfg, PART=part)
    return dq, dk, dv

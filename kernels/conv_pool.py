"""Fused 2-D convolution + bias + activation + pooling: one kernel that writes only the pooled output.

Implicit GEMM: a program owns a tile of BLOCK_CO output channels (of one group) x BLOCK_P pooled positions
(flattened over batch, pooled rows and columns). For each offset (i, j) of the pooling window it computes
the convolution at the conv-output position under that offset for all BLOCK_P windows at once, as
tl.dot(weight[BLOCK_CO, BLOCK_K], im2col(x)[BLOCK_K, BLOCK_P]) over K = C_in/groups * kh * kw, gathering
the input tile on the fly (any strides, so NCHW and channels_last alike), and folds the result into a
running max (with the first-max index, torch's tie rule) or sum. The full-resolution activation lives
only in registers. Overlapping windows (3x3 stride 2) recompute the conv outputs they share; in exchange
no program depends on another's results.

For non-decreasing activations max(act(z + b)) = act(max(z) + b): the max runs on the raw accumulator
and the bias and activation are applied once per pooled output instead of once per window element.

Tile choice on a GPU (choose_config): every candidate tile is timed once per tuning_key (the layer,
and N * PH * PW to a power of two, so a new batch size seldom re-tunes) and the fastest kept; inside
CUDA-graph capture nothing is timed and an untuned key runs DEFAULT_TILE.

When training with max pooling the kernel also stores, per pooled output, the index of the max within
its window (int8) and the pre-activation value there, so the backward needs neither the full-resolution
activation nor a second convolution.
"""

import torch
import triton
import triton.language as tl
import triton.testing

from fusenn.kernels import INTERPRET, device_guard


@triton.jit
def _erf(x):
    # Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7: libdevice erf is not available in the interpreter.
    a = tl.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    y = 1.0 - poly * tl.exp(-a * a)
    return tl.where(x < 0, -y, y)


@triton.jit
def _activation(z, ACT: tl.constexpr, slope):
    if ACT == "relu":
        z = tl.where(z < 0, 0.0, z)  # NaN stays NaN, as in torch (tl.maximum would drop it)
    elif ACT == "leaky_relu":
        z = tl.where(z >= 0, z, z * slope)
    elif ACT == "gelu":
        z = 0.5 * z * (1.0 + _erf(z * 0.7071067811865476))
    elif ACT == "gelu_tanh":
        # 0.5 z (1 + tanh(u)) = z sigmoid(2u), u = sqrt(2/pi) (z + 0.044715 z^3)
        z = z * tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))
    elif ACT == "silu":
        z = z * tl.sigmoid(z)
    elif ACT == "sigmoid":
        z = tl.sigmoid(z)
    elif ACT == "tanh":
        z = 2.0 * tl.sigmoid(2.0 * z) - 1.0
    return z


@triton.jit
def conv_pool2d_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, arg_ptr, pre_ptr,
    N, H, W, C_out_g, OH, OW, PH, PW,
    sxn, sxc, sxh, sxw, swo, swc, swh, sww, son, soc, soh, sow,
    slope,
    C_in_g: tl.constexpr,  # constexpr: a loop bound and divisor; layers have few distinct channel counts
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PADH: tl.constexpr,
    PADW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    PKH: tl.constexpr, PKW: tl.constexpr, PSH: tl.constexpr, PSW: tl.constexpr, PPH: tl.constexpr,
    PPW: tl.constexpr,
    ACT: tl.constexpr, MAX_POOL: tl.constexpr, MONOTONE: tl.constexpr, COUNT_INCLUDE_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, STORE_ARGMAX: tl.constexpr, CHANNELS_INNER: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_co = tl.program_id(1)
    group = tl.program_id(2)

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < N * PH * PW
    pw = offs_p % PW
    ph = (offs_p // PW) % PH
    n = (offs_p // (PW * PH)).to(tl.int64)  # batch offsets may pass 2**31 elements
    co = group * C_out_g + pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_mask = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO) < C_out_g

    x_rows = x_ptr + n * sxn + (group * C_in_g) * sxc  # [BLOCK_P] pointers to each position's image
    w_rows = w_ptr + co.to(tl.int64) * swo  # [BLOCK_CO]
    h_start = ph * PSH - PPH  # conv-output row and column where each pooling window starts
    w_start = pw * PSW - PPW
    if HAS_BIAS:
        bias = tl.load(b_ptr + co, mask=co_mask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_CO], dtype=tl.float32)

    best = tl.full([BLOCK_CO, BLOCK_P], float("-inf"), tl.float32)  # max: running max; avg: running sum
    if not MAX_POOL:
        best = tl.zeros([BLOCK_CO, BLOCK_P], dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_CO, BLOCK_P], dtype=tl.int32)
    best_pre = tl.zeros([BLOCK_CO, BLOCK_P], dtype=tl.float32)  # pre-activation at the max (non-monotone)

    for widx in range(PKH * PKW):
        oh = h_start + widx // PKW
        ow = w_start + widx % PKW
        valid = p_mask & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)  # window element inside the conv output
        ih0 = oh * SH - PADH
        iw0 = ow * SW - PADW
        acc = tl.zeros([BLOCK_CO, BLOCK_P], dtype=tl.float32)
        # The bound stays an expression of constexprs: the interpreter turns every assigned value into a
        # 1-element array, which range() refuses under numpy >= 2.4.
        for k0 in range(0, C_in_g * KH * KW, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < C_in_g * KH * KW
            if CHANNELS_INNER:  # k = (kh, kw, c): consecutive k read consecutive channels_last addresses
                c = k % C_in_g
                kh = k // (C_in_g * KW)
                kw = (k // C_in_g) % KW
            else:  # k = (c, kh, kw): the order of an NCHW-contiguous weight
                c = k // (KH * KW)
                kh = (k // KW) % KH
                kw = k % KW
            ih = ih0[None, :] + (kh * DH)[:, None]
            iw = iw0[None, :] + (kw * DW)[:, None]
            x_mask = k_mask[:, None] & valid[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            xt = tl.load(x_rows[None, :] + (c * sxc)[:, None] + ih * sxh + iw * sxw, mask=x_mask, other=0.0)
            wt = tl.load(w_rows[:, None] + (c * swc + kh * swh + kw * sww)[None, :],
                         mask=co_mask[:, None] & k_mask[None, :], other=0.0)
            if UPCAST:  # the interpreter multiplies bf16 bit patterns as integers in tl.dot
                xt = xt.to(tl.float32)
                wt = wt.to(tl.float32)
            acc = tl.dot(wt, xt, acc, input_precision=PRECISION)

        if MAX_POOL:
            if MONOTONE:
                v = acc
            else:
                pre = acc + bias[:, None]
                v = _activation(pre, ACT, slope)
            v = tl.where(valid[None, :], v, float("-inf"))  # -inf pool padding
            # strict: the first max in scan order wins, as in torch, and so does a NaN (the last one), so
            # a NaN in the window propagates with its index, as torch's max pooling does
            take = (v > best) | (v != v)
            best = tl.where(take, v, best)
            best_idx = tl.where(take, widx, best_idx)
            if STORE_ARGMAX and not MONOTONE:
                best_pre = tl.where(take, pre, best_pre)
        else:
            v = _activation(acc + bias[:, None], ACT, slope)
            best += tl.where(valid[None, :], v, 0.0)

    if MAX_POOL:
        if MONOTONE:
            best_pre = best + bias[:, None]
            best = _activation(best_pre, ACT, slope)
    else:
        # torch's avg_pool2d divisor: the window clipped to the padded input, or to the input proper
        h_end = tl.minimum(h_start + PKH, OH + PPH)
        w_end = tl.minimum(w_start + PKW, OW + PPW)
        if COUNT_INCLUDE_PAD:
            count = (h_end - h_start) * (w_end - w_start)
        else:
            count = ((tl.minimum(h_end, OH) - tl.maximum(h_start, 0)) *
                     (tl.minimum(w_end, OW) - tl.maximum(w_start, 0)))
        best = best / count.to(tl.float32)[None, :]

    out_offs = (co.to(tl.int64) * soc)[:, None] + (n * son + ph * soh + pw * sow)[None, :]
    out_mask = co_mask[:, None] & p_mask[None, :]
    tl.store(out_ptr + out_offs, best.to(out_ptr.dtype.element_ty), mask=out_mask)
    if STORE_ARGMAX:
        tl.store(arg_ptr + out_offs, best_idx.to(arg_ptr.dtype.element_ty), mask=out_mask)
        tl.store(pre_ptr + out_offs, best_pre.to(pre_ptr.dtype.element_ty), mask=out_mask)


# (BLOCK_CO, BLOCK_P, BLOCK_K, num_warps, num_stages) that ptxas (sm_90a, triton 3.6) fits in registers with
# no spill at the benchmark layers (the static report, benchmarks/static.py, checks every one): the
# gathered im2col addresses cost many registers, so K steps are short, and fp32 (tf32 operands twice the
# size) gets fewer tiles and stages.
HALF_TILES = [(16, 64, 32, 4), (32, 32, 32, 4), (32, 128, 16, 8), (64, 32, 16, 4), (64, 64, 16, 4), (128, 64, 16, 8)]
HALF_CONFIGS = [tile + (stages,) for tile in HALF_TILES for stages in (2, 3)]
FP32_CONFIGS = [(16, 64, 16, 4, 2), (32, 64, 16, 4, 2), (32, 128, 16, 8, 2), (64, 32, 16, 4, 2), (64, 32, 16, 4, 3),
                (128, 64, 16, 8, 2)]


def _gpu_configs(half: bool) -> list:
    return [triton.Config({"BLOCK_CO": co, "BLOCK_P": p, "BLOCK_K": k}, num_warps=warps, num_stages=stages)
            for co, p, k, warps, stages in (HALF_CONFIGS if half else FP32_CONFIGS)]


DEFAULT_TILE = {"BLOCK_CO": 64, "BLOCK_P": 32, "BLOCK_K": 16}  # taken while a CUDA graph is being captured


def candidates(C_out_g: int, K: int, half: bool = True) -> list:
    """The configs worth timing for C_out_g output channels per group and a reduction of K, in fp16/bf16
    (`half`) or fp32: tiles far larger than the channel or reduction extent they would cover are dropped."""
    c_out = max(16, triton.next_power_of_2(C_out_g))
    k = max(16, triton.next_power_of_2(K))
    configs = _gpu_configs(half)
    kept = [c for c in configs if c.kwargs["BLOCK_CO"] <= c_out and c.kwargs["BLOCK_K"] <= k]
    return kept or configs[:1]


def default_config(configs: list):
    """The untimed choice: DEFAULT_TILE where it is a candidate, else the first candidate."""
    return next((c for c in configs if c.kwargs == DEFAULT_TILE), configs[0])


def tuning_key(dtype, C_out_g: int, num_p: int, meta: dict) -> tuple:
    """What the choice of tile depends on: the layer (dtype, channels, kernel, strides, pooling and the
    other constexprs) and the number of pooled positions N * PH * PW rounded up to a power of two, so that
    a new batch size or image size re-tunes only when it crosses a power of two."""
    return (str(dtype), C_out_g, triton.next_power_of_2(max(num_p, 1))) + tuple(sorted(meta.items()))


_TUNED: dict = {}  # tuning_key -> the fastest config


def choose_config(key: tuple, configs: list, run, capturing: bool):
    """The config for `key`: on first sight each candidate is timed running `run(config)` (triton's
    do_bench) and the fastest is kept for every later call. While a CUDA graph is being captured nothing
    is timed (the timing launches would be captured with it): an untuned key then takes default_config,
    not cached, so the first call outside a capture still tunes it."""
    best = _TUNED.get(key)
    if best is not None:
        return best
    if capturing:
        return default_config(configs)
    from triton.runtime import errors

    too_big = tuple(getattr(errors, name) for name in ("OutOfResources", "PTXASError") if hasattr(errors, name))
    timings = []
    for config in configs:
        try:
            timings.append((triton.testing.do_bench(lambda: run(config), warmup=5, rep=20), config))
        except too_big:  # the tile does not fit this GPU
            continue
    best = min(timings, key=lambda t: t[0])[1] if timings else default_config(configs)
    _TUNED[key] = best
    return best


def conv_pool2d(x, weight, bias, out, argmax, pre, stride, padding, dilation, groups, activation,
                negative_slope, monotone, pool, pool_kernel, pool_stride, pool_padding, count_include_pad,
                channels_inner):
    """Fill `out` (and, for max pooling when `argmax` is given, `argmax` and `pre`, laid out like `out`).

    Shapes and options are checked by fusenn.ops.conv_pool; `x` is padded with zeros by `padding` only.
    """
    N, C_in, H, W = x.shape
    C_out, C_in_g, KH, KW = weight.shape
    _, _, PH, PW = out.shape
    OH = (H + 2 * padding[0] - dilation[0] * (KH - 1) - 1) // stride[0] + 1
    OW = (W + 2 * padding[1] - dilation[1] * (KW - 1) - 1) // stride[1] + 1
    C_out_g = C_out // groups
    store_argmax = argmax is not None
    if INTERPRET:
        precision = "ieee"
    elif x.dtype == torch.float32:  # tf32 where torch's own fp32 convolution uses it (its default on GPUs)
        precision = "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    else:
        precision = None  # fp16 / bf16 operands: tensor cores with fp32 accumulation
    args = (x, weight, bias if bias is not None else weight, out, argmax if store_argmax else out,
            pre if store_argmax else out,
            N, H, W, C_out_g, OH, OW, PH, PW, *x.stride(), *weight.stride(), *out.stride(),
            float(negative_slope))
    meta = dict(C_in_g=C_in_g, KH=KH, KW=KW, SH=stride[0], SW=stride[1], PADH=padding[0], PADW=padding[1],
                DH=dilation[0], DW=dilation[1], PKH=pool_kernel[0], PKW=pool_kernel[1], PSH=pool_stride[0],
                PSW=pool_stride[1], PPH=pool_padding[0], PPW=pool_padding[1], ACT=activation, MAX_POOL=pool == "max",
                MONOTONE=monotone and pool == "max", COUNT_INCLUDE_PAD=count_include_pad,
                HAS_BIAS=bias is not None, STORE_ARGMAX=store_argmax, CHANNELS_INNER=channels_inner,
                UPCAST=INTERPRET, PRECISION=precision)
    num_p = N * PH * PW

    def grid(m):
        return triton.cdiv(num_p, m["BLOCK_P"]), triton.cdiv(C_out_g, m["BLOCK_CO"]), groups

    if INTERPRET:
        # Programs run one after another here, so one large tile beats several small ones.
        blocks = dict(BLOCK_CO=min(64, max(16, triton.next_power_of_2(C_out_g))),
                      BLOCK_P=min(128, max(16, triton.next_power_of_2(num_p))),
                      BLOCK_K=min(128, max(16, triton.next_power_of_2(C_in_g * KH * KW))))
        with device_guard(x):
            conv_pool2d_kernel[grid(blocks)](*args, **meta, **blocks)
    else:
        def run(config):
            conv_pool2d_kernel[grid(config.kwargs)](*args, **meta, **config.kwargs, num_warps=config.num_warps,
                                                    num_stages=config.num_stages)

        with device_guard(x):
            configs = candidates(C_out_g, C_in_g * KH * KW, x.dtype != torch.float32)
            capturing = x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
            config = choose_config(tuning_key(x.dtype, C_out_g, num_p, meta), configs, run, capturing)
            run(config)
    return out

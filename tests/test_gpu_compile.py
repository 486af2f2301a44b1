"""Compile every Triton kernel family for sm_90 on this GPU-less machine: catches what only the GPU
compiler rejects (the interpreter runs code it refuses, e.g. globals that are not tl.constexpr).

Kernels decorated in the test process are interpreted, so each check runs in a fresh process with
TRITON_INTERPRET=0: PRELUDE plus a body calling compile_for_sm90 and printing "ok".
"""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Triton's CUDA compiler ships for Linux")

PRELUDE = r"""
import os
os.environ["TRITON_INTERPRET"] = "0"
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_for_sm90(fn, consts, arg_type, **options):
    '''fn with the constexprs `consts`; arg_type(name) gives every other argument's Triton type.'''
    signature = {a: "constexpr" if a in consts else arg_type(a) for a in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
"""


def compile_in_subprocess(body: str):
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", PRELUDE + body], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_philox_compiles_for_sm90():
    compile_in_subprocess(r"""
from fusenn.kernels import philox

types = {"out_ptr": "*i8", "seed_ptr": "*i64"}
kernel = compile_for_sm90(philox.dropout_mask_kernel, {"BLOCK": 1024}, lambda a: types.get(a, "i64"))
assert "mul.hi.u32" in kernel.asm["ptx"] or "mul.wide.u32" in kernel.asm["ptx"], "no 32-bit high multiply"
print("ok")
""")


def test_attention_compiles_for_sm90():
    """Forward, dQ and dK/dV with a bool mask, causal and dropout (the Philox path) in bf16, with int32 and
    with int64 (WIDE) row offsets; WIDE's row offsets are 64-bit multiplies."""
    compile_in_subprocess(r"""
from fusenn.kernels import attention as A

types = {n: "*bf16" for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV_OUT")}
types.update(LSE="*fp32", DELTA="*fp32", MASK="*u8", SEED="*i64", qk_scale="fp32", scale="fp32",
             drop_scale="fp32")
for name, fn in (("fwd", A.attention_forward_kernel), ("dq", A.attention_backward_dq_kernel),
                 ("dkdv", A.attention_backward_dkdv_kernel)):
    cfg = A._config(64, torch.bfloat16, name, True)
    wides = []
    for wide in (False, True):
        consts = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], D=64, DV=64, MASK_KIND=1, IS_CAUSAL=True,
                      DROPOUT=True, F32_DOT="none", WIDE=wide,
                      **({"PART": 0, "COL_PARTS": 1} if name == "dkdv" else {}),
                      **({"DQ_PARTS": cfg["DQ_PARTS"]} if name == "dq" else {}))
        ptx = compile_for_sm90(fn, consts, lambda a: types.get(a, "i32"), num_warps=cfg.get("num_warps", 4),
                               num_stages=cfg.get("num_stages", 2)).asm["ptx"]
        wides.append(ptx.count("mul.lo.s64") + ptx.count("mul.wide.s32") + ptx.count("mad.lo.s64"))
    assert wides[1] > wides[0], (name, wides)
print("ok")
""")


def test_rnn_kernels_compile_for_sm90():
    """LSTM (projection, packed, reverse, recurrent dropout, zoneout) and GRU (bias, packed, reverse, the same
    regularisers), forward and backward, alone on their rows and split cooperatively."""
    compile_in_subprocess(r"""
from fusenn.kernels import gru, lstm


def arg_type(dtype):
    half = {"gx_ptr", "w_hh_ptr", "w_hr_ptr", "b_hh_ptr", "y_ptr", "dy_ptr"}
    return lambda a: ("*i64" if a in ("len_ptr", "zo_seed_ptr") else "*i32" if a == "bar_ptr"
                      else f"*{dtype}" if a in half else "*fp32" if a.endswith("_ptr")
                      else "fp32" if a == "zo_u" else "i32")


# bf16 with both regularisers sampled, split cooperatively over 4 programs (grid barriers); fp32 alone on
# its rows, without recurrent dropout and with zoneout's expectation (the seed pointers never read)
for dtype, precision, rdrop, zoneout, nsplit in (("bf16", "none", True, 1, 4), ("fp32", "tf32", False, 2, 1)):
    H, P = 129, 64
    common = dict(H=H, P=P, HAS_PROJ=True, HAS_LENGTHS=True, REVERSE=True, FP32_DOT=precision, RDROP=rdrop,
                  ZONEOUT=zoneout, BLOCK_B=lstm.BLOCK_B, BLOCK_H=lstm.block_size(H, 64), BLOCK_P=lstm.block_size(P, 32),
                  NSPLIT=nsplit, PHASES=3)
    warps = lstm.dot_warps(common["BLOCK_H"], common["BLOCK_P"])
    compile_for_sm90(lstm.lstm_forward_kernel, dict(common, SAVE=True), arg_type(dtype), num_warps=warps)
    compile_for_sm90(lstm.lstm_backward_kernel, common, arg_type(dtype), num_warps=warps)
    if nsplit > 1:
        ptx = compile_for_sm90(lstm.lstm_forward_kernel, dict(common, SAVE=False), arg_type(dtype),
                               num_warps=warps).asm["ptx"]
        assert "atom.global.gpu.release" in ptx or "atom.release.gpu" in ptx, "no release atomic at the barrier"
        assert "acquire" in ptx, "no acquire atomic at the barrier"
    common = dict(H=H, HAS_BIAS=True, HAS_LENGTHS=True, REVERSE=True, FP32_DOT=precision, RDROP=rdrop,
                  ZONEOUT=zoneout, BLOCK_B=gru.BLOCK_B, BLOCK_H=gru.hidden_block(H, nsplit, 32), NSPLIT=nsplit,
                  PHASES=3)
    warps = gru.dot_warps(common["BLOCK_H"])
    compile_for_sm90(gru.gru_forward_kernel, dict(common, SAVE=True), arg_type(dtype), num_warps=warps)
    compile_for_sm90(gru.gru_backward_kernel, common, arg_type(dtype), num_warps=warps)
print("ok")
""")


def test_conv_pool_kernel_compiles_for_sm90():
    """Overlapping 3x3/2 max pooling with argmax (bf16, channels_last) and avg pooling with GELU (fp32)."""
    compile_in_subprocess(r"""
from fusenn.kernels import conv_pool

config = conv_pool._gpu_configs(False)[2]  # an fp32 tile fits in bf16 too
for dtype, act, pool in (("bf16", "relu", True), ("fp32", "gelu", False)):
    consts = dict(C_in_g=64, KH=3, KW=3, SH=1, SW=1, PADH=1, PADW=1, DH=1, DW=1, PKH=3, PKW=3, PSH=2, PSW=2, PPH=1,
                  PPW=1, ACT=act, MAX_POOL=pool, MONOTONE=pool and act == "relu", COUNT_INCLUDE_PAD=True,
                  HAS_BIAS=True, STORE_ARGMAX=pool, CHANNELS_INNER=True, UPCAST=False,
                  PRECISION="ieee" if dtype == "fp32" else None, **config.kwargs)
    types = {"arg_ptr": "*i8", "pre_ptr": "*fp32", "slope": "fp32"}
    compile_for_sm90(conv_pool.conv_pool2d_kernel, consts,
                     lambda a: types.get(a, f"*{dtype}" if a.endswith("_ptr") else "i32"),
                     num_warps=config.num_warps, num_stages=config.num_stages)
print("ok")
""")


def test_cooperative_launch_and_tf32x3_reach_the_compiled_kernels():
    """What the code relies on from Triton (3.6 to 3.8): the split-mode launch's `launch_cooperative_grid`
    keyword is a CUDA compile option that ends up in the kernel's metadata (which Triton's CUDA launcher
    turns into CU_LAUNCH_ATTRIBUTE_COOPERATIVE), and fp32 attention's input_precision="tf32x3" becomes three
    TF32 tensor-core products per dot (no IEEE fallback)."""
    compile_in_subprocess(r"""
from triton.backends.nvidia.compiler import CUDABackend
from fusenn.kernels import attention as A, gru

options = CUDABackend(GPUTarget("cuda", 90, 32)).parse_options(dict(launch_cooperative_grid=True, num_warps=4))
assert options.launch_cooperative_grid is True  # kernel[grid](..., launch_cooperative_grid=True) is accepted
types = {"gx_ptr": "*bf16", "w_hh_ptr": "*bf16", "b_hh_ptr": "*bf16", "y_ptr": "*bf16", "len_ptr": "*i64",
         "zo_seed_ptr": "*i64", "bar_ptr": "*i32", "zo_u": "fp32"}
consts = dict(H=256, HAS_BIAS=True, HAS_LENGTHS=False, REVERSE=False, SAVE=True, FP32_DOT="none", RDROP=False,
              ZONEOUT=0, BLOCK_B=gru.BLOCK_B, BLOCK_H=32, NSPLIT=8, PHASES=3)
for coop in (True, False):
    kernel = compile_for_sm90(gru.gru_forward_kernel, consts, lambda a: types.get(a, "*fp32" if a.endswith("_ptr")
                              else "i32"), num_warps=4, launch_cooperative_grid=coop)
    assert kernel.metadata.launch_cooperative_grid is coop

dots = {}
for precision, dtype in (("tf32x3", "fp32"), ("none", "bf16")):
    types = {n: f"*{dtype}" for n in ("Q", "K", "V", "O")}
    types.update(LSE="*fp32", MASK=f"*{dtype}", SEED="*i64", qk_scale="fp32", drop_scale="fp32")
    consts = dict(BLOCK_M=64, BLOCK_N=32, D=64, DV=64, MASK_KIND=0, IS_CAUSAL=True, DROPOUT=False, F32_DOT=precision,
                  WIDE=False)
    kernel = compile_for_sm90(A.attention_forward_kernel, consts, lambda a: types.get(a, "i32"), num_warps=4,
                              num_stages=1)
    ttgir = kernel.asm["ttgir"]
    dots[precision] = ttgir.count("ttng.warp_group_dot ") + ttgir.count("tt.dot ")
    if precision == "tf32x3":
        assert "inputPrecision = ieee" not in ttgir
        assert "tf32" in kernel.asm["ptx"], "no TF32 tensor-core instruction"
assert dots == {"tf32x3": 6, "none": 2}, dots  # q k^T and p v, three TF32 products each
print("ok")
""")

"""Compile Triton kernels for sm_90 on this GPU-less machine: catches what only the compiler rejects
(the interpreter runs code the GPU compiler refuses, e.g. globals that are not tl.constexpr)."""

import os
import subprocess
import sys

import pytest

PHILOX = r"""
import os
os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fusenn.kernels import philox

fn = philox.dropout_mask_kernel
consts = {"BLOCK": 1024}
signature = {name: ("constexpr" if name in consts else "*i8" if name == "out_ptr" else "i64")
             for name in fn.arg_names}
src = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32))
assert "mul.hi.u32" in kernel.asm["ptx"] or "mul.wide.u32" in kernel.asm["ptx"], "no 32-bit high multiply"
print("ok")
"""


def compile_in_subprocess(script: str):
    """Kernels decorated in this process are interpreted; a fresh one with TRITON_INTERPRET=0 compiles."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's CUDA compiler ships for Linux")
def test_philox_compiles_for_sm90():
    compile_in_subprocess(PHILOX)


ATTENTION = r"""
import os
os.environ["TRITON_INTERPRET"] = "0"
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fusenn.kernels import attention as A

for name, fn in (("fwd", A.attention_forward_kernel), ("dq", A.attention_backward_dq_kernel),
                 ("dkdv", A.attention_backward_dkdv_kernel)):
    cfg = A._config(64, torch.bfloat16, backward=name != "fwd")
    consts = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], D=64, DV=64, MASK_KIND=1, IS_CAUSAL=True,
                  DROPOUT=True, DOT_F32=False)
    ptrs = {n: "*bf16" for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV_OUT")}
    ptrs.update(LSE="*fp32", DELTA="*fp32", MASK="*u8")
    signature = {a: "constexpr" if a in consts else ptrs.get(a, "fp32" if a in ("qk_scale", "scale", "drop_scale")
                 else "i32") for a in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2)))
print("ok")
"""


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's CUDA compiler ships for Linux")
def test_attention_compiles_for_sm90():
    """Forward, dQ and dK/dV with a bool mask, causal and dropout (the Philox path) in bf16."""
    compile_in_subprocess(ATTENTION)


RNN = r"""
import os
os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fusenn.kernels import gru, lstm

FLOATS = ("rd_scale", "zo_u")
SEEDS = ("rd_k0", "rd_k1", "zo_k0", "zo_k1")


def compile_(fn, dtype, consts, num_warps):
    half_ptrs = {"gx_ptr", "w_hh_ptr", "w_hr_ptr", "b_hh_ptr", "y_ptr", "dy_ptr"}
    signature = {}
    for a in fn.arg_names:
        if a in consts:
            signature[a] = "constexpr"
        elif a == "len_ptr":
            signature[a] = "*i64"
        elif a.endswith("_ptr"):
            signature[a] = f"*{dtype}" if a in half_ptrs else "*fp32"
        else:
            signature[a] = "fp32" if a in FLOATS else "i64" if a in SEEDS else "i32"
    src = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


for dtype in ("bf16", "fp32"):
    H, P = 129, 64
    common = dict(H=H, P=P, HAS_PROJ=True, HAS_LENGTHS=True, REVERSE=True, FP32_DOT=dtype == "fp32", RDROP=True,
                  ZONEOUT=1, BLOCK_B=lstm.BLOCK_B, BLOCK_H=lstm.block_size(H, 64), BLOCK_P=lstm.block_size(P, 32))
    compile_(lstm.lstm_forward_kernel, dtype, dict(common, SAVE=True), lstm.NUM_WARPS)
    compile_(lstm.lstm_backward_kernel, dtype, common, lstm.NUM_WARPS)
    common = dict(H=H, HAS_BIAS=True, HAS_LENGTHS=True, REVERSE=True, FP32_DOT=dtype == "fp32",
                  BLOCK_B=gru.BLOCK_B, BLOCK_H=gru.block_size(H, 32))
    compile_(gru.gru_forward_kernel, dtype, dict(common, SAVE=True), gru.NUM_WARPS)
    compile_(gru.gru_backward_kernel, dtype, common, gru.NUM_WARPS)
print("ok")
"""


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's CUDA compiler ships for Linux")
def test_rnn_kernels_compile_for_sm90():
    """LSTM (projection, packed, reverse, recurrent dropout, zoneout) and GRU, forward and backward."""
    compile_in_subprocess(RNN)


CONV_POOL = r"""
import os
os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fusenn.kernels import conv_pool

fn = conv_pool.conv_pool2d_kernel
for dtype, act, pool in (("bf16", "relu", True), ("fp32", "gelu", False)):
    config = conv_pool._gpu_configs()[2]
    consts = dict(C_in_g=64, KH=3, KW=3, SH=1, SW=1, PADH=1, PADW=1, DH=1, DW=1, PKH=3, PKW=3, PSH=2, PSW=2, PPH=1,
                  PPW=1, ACT=act, MAX_POOL=pool, MONOTONE=pool and act == "relu", COUNT_INCLUDE_PAD=True,
                  HAS_BIAS=True, STORE_ARGMAX=pool, CHANNELS_INNER=True, UPCAST=False,
                  PRECISION="ieee" if dtype == "fp32" else None, **config.kwargs)
    ptrs = {"arg_ptr": "*i8", "pre_ptr": "*fp32"}
    signature = {a: "constexpr" if a in consts else ptrs.get(a, f"*{dtype}") if a.endswith("_ptr")
                 else "fp32" if a == "slope" else "i32" for a in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": config.num_warps, "num_stages": config.num_stages})
print("ok")
"""


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's CUDA compiler ships for Linux")
def test_conv_pool_kernel_compiles_for_sm90():
    """Overlapping 3x3/2 max pooling with argmax (bf16, channels_last) and avg pooling with GELU (fp32)."""
    compile_in_subprocess(CONV_POOL)

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

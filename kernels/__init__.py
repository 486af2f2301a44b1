"""fusenn's Triton kernels, one module per op family (installed as fusenn.kernels).

Triton decides at decoration time whether a @triton.jit function is compiled or interpreted, from
TRITON_INTERPRET; its own library functions (tl.zeros_like, tl.sum, tl.sigmoid...) are decorated when
triton is imported. This package is the one place that handles it: on a machine where torch sees no
CUDA GPU and the variable is unset, it sets TRITON_INTERPRET=1 before any kernel module is imported and,
if triton had already been imported in compiled mode, re-wraps triton.language's library functions for
the interpreter, so the kernels run on CPU tensors whatever the import order. Set TRITON_INTERPRET
yourself (0 or 1) to override.
"""

import os
import sys

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton.language" in sys.modules:  # imported before us, with compiled library functions
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        for name, module in list(sys.modules.items()):
            if name == "triton.language" or name.startswith("triton.language."):
                for attr, value in list(vars(module).items()):
                    if isinstance(value, JITFunction):
                        setattr(module, attr, InterpretedFunction(value.fn))

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _newer_ptxas() -> bool:
    import triton

    return tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 7)


# Triton 3.7 on bundles a newer ptxas, which spills in a few configs where the GPU image's Triton 3.6 does not
# (benchmarks/static.py's report): those take other tiles or stages under it.
NEWER_PTXAS = _newer_ptxas()

if INTERPRET:
    # The interpreter truncates fp32 -> bf16 where the GPU rounds to nearest even, which doubles bf16
    # errors in tests; round as the GPU does.
    import numpy as np
    from triton.language import bfloat16, float32
    from triton.runtime import interpreter as _interpreter

    _truncating_cast = _interpreter.InterpreterBuilder.cast_impl

    def _rounding_cast(self, src, dst_type):
        if src.dtype.scalar == float32 and dst_type.scalar == bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16).view(torch.int16)
            return _interpreter.TensorHandle(rounded.numpy().view(np.uint16), dst_type.scalar)
        return _truncating_cast(self, src, dst_type)

    _interpreter.InterpreterBuilder.cast_impl = _rounding_cast


def device_guard(tensor):
    """The context every launcher runs its kernels in: tensor's CUDA device made current (Triton launches
    on the current device and stream, so tensors on cuda:1 with cuda:0 current would otherwise launch on
    cuda:0); nothing for CPU tensors under the interpreter."""
    import contextlib

    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()

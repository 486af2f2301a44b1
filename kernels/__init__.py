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

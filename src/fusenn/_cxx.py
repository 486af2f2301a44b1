"""The C++ standard to compile fusenn's C++ sources with: the one the installed torch's headers need.

Why here: setup.py (which cannot import fusenn) loads this file by path, and the tests' host-only build imports
it, so both follow torch alike (torch 2.14's headers stop with "#error C++20 or later" under -std=c++17).
"""

import os
import re


def cxx_std() -> str:
    """'c++20' where torch's headers require C++20 (they test __cplusplus against 202002L), else 'c++17'."""
    from torch.utils import cpp_extension

    for include in cpp_extension.include_paths():
        for rel in (("torch", "all.h"), ("torch", "csrc", "api", "include", "torch", "all.h")):
            path = os.path.join(include, *rel)
            if os.path.exists(path):
                with open(path) as f:
                    if re.search(r"__cplusplus\s*<\s*202002L", f.read()):
                        return "c++20"
                return "c++17"
    return "c++17"

"""Which backends exist here, why the others do not, and the one place where an op's backend is chosen.

Backends: ``reference`` (plain PyTorch, any device), ``triton`` (kernels/ on a GPU, or under the Triton
interpreter with CPU tensors), ``cuda`` (the fusenn._C extension built from csrc/), ``persistent`` (its
persistent LSTM / GRU kernels, csrc/rnn_persist.cu; ops without such kernels take ``cuda``'s under it),
``torch`` (torch's own module or function where it computes the same thing: plain configurations, no
fusenn-only regulariser or seed) and ``cpp`` (the host code of the C++ RNN layers, on CPU tensors: fusenn._C's
CPU kernels).
The choice comes from ``fusenn.set_backend(name)`` if called, else the FUSENN_BACKEND environment
variable, else ``auto``: cuda, then triton (or the op's own order), for GPU tensors; torch, then cpp, for
CPU tensors; then the reference. An explicit backend that cannot take the call raises BackendError saying
why; auto falls back to the reference.

``fusenn.set_logging(True)`` or FUSENN_LOG=1 logs each choice (logger "fusenn", to stderr unless the
program configures logging): the op, the backend chosen and why each backend tried before it was passed
over, once per distinct choice.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

NAMES = ("reference", "triton", "cuda", "persistent", "torch", "cpp")
CHOICES = ("auto",) + NAMES
CPU_ORDER = ("torch", "cpp")  # what auto tries for CPU tensors, before the reference


class BackendError(RuntimeError):
    """An explicitly chosen backend cannot run this call."""


@dataclass(frozen=True)
class Backend:
    name: str
    usable: bool
    detail: str  # why not, when unusable; what it runs on, when usable

    def __str__(self):
        return f"{self.name:<10} {'yes' if self.usable else 'no':<4} {self.detail}"


@functools.lru_cache(maxsize=None)
def _triton_status() -> tuple[bool, str, bool]:
    """(importable, detail, interpreting)."""
    try:
        from fusenn import kernels  # sets TRITON_INTERPRET on machines without a GPU
        import triton
    except Exception as exc:  # noqa: BLE001 - any import failure means the backend is unusable
        return False, f"triton is not importable: {exc}", False
    if kernels.INTERPRET:
        return True, f"triton {triton.__version__} under the interpreter (TRITON_INTERPRET=1): CPU tensors", True
    if not torch.cuda.is_available():
        return False, f"triton {triton.__version__} is installed but no GPU is visible and " \
                      "TRITON_INTERPRET is not 1", False
    return True, f"triton {triton.__version__} compiled for {torch.cuda.get_device_name()}", False


def build_record() -> dict:
    """What setup.py recorded of the C++ extension's build (src/fusenn/_build.json), or {}."""
    try:
        with open(os.path.join(os.path.dirname(__file__), "_build.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _why_no_extension(exc: Exception) -> str:
    skipped = build_record().get("skipped_because")
    if skipped:
        return f"fusenn._C was not built: {skipped}"
    return f"fusenn._C does not import ({exc}); reinstall with a CUDA toolkit and a CUDA build of torch"


@functools.lru_cache(maxsize=None)
def _cuda_status() -> tuple[bool, str]:
    try:
        from fusenn import _C
    except ImportError as exc:
        return False, _why_no_extension(exc)
    if not getattr(_C, "with_cuda", False):
        return False, "fusenn._C is a host-only build (no CUDA kernels; its C++ RNN layers run on CPU tensors)"
    if not torch.cuda.is_available():
        return False, "fusenn._C is built but no CUDA GPU is visible"
    return True, f"fusenn._C on {torch.cuda.get_device_name()}"


_CPP_OPS = ("lstm_forward", "lstm_backward", "gru_forward", "gru_backward", "dropout_mask_out")


@functools.lru_cache(maxsize=None)
def _import_extension() -> Optional[str]:
    """None once fusenn._C is imported (registering its ops), else why not."""
    try:
        from fusenn import _C  # noqa: F401
    except ImportError as exc:
        return _why_no_extension(exc)
    return None


def _cpp_status() -> tuple[bool, str]:
    """The C++ RNN layers' CPU kernels: registered by fusenn._C (any build: they are host code), or by a
    host-only build of csrc/ loaded with torch.utils.cpp_extension (as the tests do without fusenn._C)."""
    why = _import_extension()
    if all(_has_cpu_kernel(f"fusenn_cuda::{op}") for op in _CPP_OPS):
        return True, "the C++ RNN layers' and dropout mask's host code (torch.ops.fusenn_cuda CPU kernels): CPU tensors"
    return False, why or "fusenn._C has no CPU kernels for the RNN layers and the dropout mask"


def _has_cpu_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel(op) and torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")


def _persistent_status() -> tuple[bool, str]:
    ok, detail = _cuda_status()
    return ok, f"{detail} (its persistent LSTM / GRU kernels)" if ok else detail


_STATUS = {
    "reference": lambda: (True, "plain PyTorch on any device"),
    "triton": lambda: _triton_status()[:2],
    "cuda": _cuda_status,
    "persistent": _persistent_status,
    "torch": lambda: (True, f"torch {torch.__version__}'s own modules and functions, where they compute the same "
                            "thing (plain configurations)"),
    "cpp": _cpp_status,
}


def backends() -> dict[str, Backend]:
    """Each backend, whether it is usable here and why (not)."""
    return {name: Backend(name, *status()) for name, status in _STATUS.items()}


def triton_interpreting() -> bool:
    return _triton_status()[2]


_chosen: Optional[str] = None


def _validate(name: str) -> str:
    name = name.strip().lower()
    if name not in CHOICES:
        raise ValueError(f"fusenn: unknown backend {name!r}; expected one of {', '.join(CHOICES)}")
    return name


def get_backend() -> str:
    """The backend in force: set_backend's, else FUSENN_BACKEND, else 'auto'."""
    if _chosen is not None:
        return _chosen
    return _validate(os.environ.get("FUSENN_BACKEND", "auto") or "auto")


class set_backend:
    """Choose the backend for later calls; as a context manager, only inside the block.

    >>> fusenn.set_backend("triton")            # from now on
    >>> with fusenn.set_backend("reference"):   # inside the block only
    ...     y = fusenn.functional.dropout(x, 0.1)
    """

    def __init__(self, name: str):
        global _chosen
        self.previous = _chosen
        _chosen = _validate(name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _chosen
        _chosen = self.previous
        return False


def _device_reason(name: str, device: torch.device) -> Optional[str]:
    """Why backend `name` cannot run on `device` at all (None when it can)."""
    usable, detail = _STATUS[name]()
    if not usable:
        return detail
    if name in ("cuda", "persistent") and device.type != "cuda":
        return f"it needs CUDA tensors, got {device.type} tensors"
    if name == "cpp" and device.type != "cpu":
        return f"it runs on CPU tensors, got {device.type} tensors"
    if name == "triton":
        if triton_interpreting() and device.type != "cpu":
            return f"the Triton interpreter (TRITON_INTERPRET=1) runs on CPU tensors, got {device.type} tensors"
        if not triton_interpreting() and device.type != "cuda":
            return (f"compiled Triton kernels need CUDA tensors, got {device.type} tensors; set TRITON_INTERPRET=1 "
                    "before importing fusenn to run them in the interpreter")
    return None


@torch.compiler.assume_constant_result  # torch.compile bakes the choice into the graph, as eager would make it
def choose(op: str, device: torch.device, unsupported: Mapping[str, Optional[str]],
           gpu_order: tuple = ("cuda", "triton")) -> str:
    """The backend that runs `op` on `device`.

    `unsupported` maps each backend the op is implemented on to None, or to the reason it cannot take
    these particular inputs; backends missing from it do not implement the op. The reference must always
    be present and None. `gpu_order`: the kernel backends `auto` tries, in order, for GPU tensors.
    """
    requested = get_backend()
    reasons: dict[str, str] = {}
    kernels = gpu_order if device.type == "cuda" else CPU_ORDER if device.type == "cpu" else ()
    order = (requested,) if requested != "auto" else kernels + ("reference",)
    if requested == "persistent" and "persistent" not in unsupported:
        order = ("cuda",)  # both are fusenn._C: ops without persistent kernels (dropout masks) take its others
    for name in order:
        if name not in unsupported:
            reasons[name] = f"{op} has no {name} implementation"
            continue
        why = _device_reason(name, device) or unsupported[name]
        if why is None:
            if _logging:
                _log(op, device, requested, name, reasons)
            return name
        reasons[name] = why
    listed = "; ".join(f"{k}: {v}" for k, v in reasons.items())
    raise BackendError(f"fusenn: {op} cannot run on the requested backend ({listed})")


_logging = os.environ.get("FUSENN_LOG", "0").strip().lower() not in ("", "0", "false", "no", "off")
_logged: set = set()
logger = logging.getLogger("fusenn")


def set_logging(enabled: bool = True) -> None:
    """Log each backend choice from now on (or stop): the op, its device, the backend chosen and why each
    backend tried before it was passed over, once per distinct choice (enabling starts afresh). Records go
    to the logger "fusenn" at level INFO; it prints them to stderr unless the program has configured
    logging. The environment variable FUSENN_LOG=1 turns it on at import. Under torch.compile a choice is
    made, and logged, when the function is traced."""
    global _logging
    _logging = bool(enabled)
    _logged.clear()


def _log(op: str, device: torch.device, requested: str, name: str, reasons: Mapping[str, str]) -> None:
    key = (op, device.type, requested, name, tuple(reasons.items()))
    if key in _logged:
        return
    _logged.add(key)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    passed = "; ".join(f"{k}: {v}" for k, v in reasons.items())
    logger.info(f"{op} on {device.type} ({requested}): {name}" + (f" (passed over {passed})" if passed else ""))

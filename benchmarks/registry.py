"""The registry every op fills: what to validate on any machine and what to time on a GPU.

Each op family has one module benchmarks/bench_<family>.py that calls `register(Entry(...))`.
- `validate()` runs the op's kernels (Triton under the interpreter on a CPU-only machine) against the
  reference on small fresh random inputs and returns one Check per case.
- `cases(quick)` lists the timed cases; each Case's `setup(device)` returns a dict of zero-argument
  callables, fusenn's first (key "fusenn"), then each baseline a user would pick instead.
- `cpu_cases(quick)` lists the cases timed on a machine without a GPU (CPU tensors, sizes that take
  seconds), in the same form.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


@dataclass
class Check:
    case: str  # reads like the case: "T5-B3-I7-H33-fp32-bidir"
    error: float  # the kernel's max abs error against the float64 reference
    allowed: float  # what the test rule allows (factor x PyTorch's own error + floor)

    @property
    def ok(self) -> bool:
        return self.error == self.error and self.error <= self.allowed  # NaN never passes


@dataclass
class Case:
    name: str  # "B64-T100-I512-H512-bf16-train"
    setup: Callable  # (device) -> {"fusenn": fn, "cudnn": fn, ...}, each fn() runs one step
    flops: Optional[float] = None  # per step, for TFLOP/s
    bytes: Optional[float] = None  # fewest bytes one step must move, for GB/s
    bound: Optional[dict] = None  # an analytic bound shown beside the case (e.g. bytes through L2, grid syncs)


@dataclass
class Entry:
    op: str
    baselines: tuple[str, ...]
    validate: Callable[[], list[Check]]
    cases: Callable[[bool], list[Case]] = field(default=lambda quick: [])
    cpu_cases: Callable[[bool], list[Case]] = field(default=lambda quick: [])


REGISTRY: dict[str, Entry] = {}


def register(entry: Entry) -> Entry:
    if entry.op in REGISTRY:
        raise ValueError(f"benchmark entry {entry.op!r} registered twice")
    REGISTRY[entry.op] = entry
    return entry


def timed_step(forward: Callable, train: bool) -> Callable:
    """One timed step of a case: `forward()` and the backward of its (fp32) sum when training, else forward
    alone under no_grad."""
    if train:
        return lambda: forward().float().sum().backward()

    def infer():
        with torch.no_grad():
            forward()
    return infer

"""python -m benchmarks --static: what every kernel compiles to on Hopper (sm_90a), without a GPU.

Why: registers, spills, shared memory, the MMA instructions chosen and how a dot is spread over warps decide
a kernel's speed before it ever runs, and all of them can be read from the compiler's output here.

How: each Triton launcher (kernels/*.py) is called on meta tensors (shapes and strides, no memory) at the
benchmark shapes, with its kernels swapped for recorders, so the report sees exactly the constexprs,
tiles, warps, stages and grid that the launcher picks (conv_pool: every tile its tuner would time). Each
recorded launch is then compiled by Triton for sm_90a, specialised as Triton specialises a real call
(integers equal to 1 become constants, multiples of 16 and tensors are marked 16-divisible), and read:
- registers, spill bytes, stack: `ptxas -v` on the PTX; shared memory: the kernel's metadata;
- MMA kind: wgmma (HGMMA in the SASS), mma.sync (HMMA) or FMA (a dot with neither); cp.async / TMA;
- replicated dots: from the TTGIR layouts, the tile the warps of a dot cover against the dot's shape (a
  16-row dot on 8 warps laid out [8, 1] covers 128 rows: every product computed 8 times);
- occupancy: resident programs per SM from registers, shared memory and warps (H100/H200 limits), and
  the SMs the grid covers at the case's shape.
csrc/*.cu are compiled with nvcc (-Xptxas -v), their kernels read the same way (256 threads per block,
the csrc launchers' block size).

Writes results/static-sm90a/triton-<version>/<family>.json (one folder per Triton: each bundles its own ptxas,
and the GPU image's 3.6 and a bare install's 3.8 both matter) and prints a table. `violations()` is what the CI test
(tests/test_static.py) fails on: a spill in any default config, a replicated dot in a bf16/fp16 default
config, a bf16/fp16 attention kernel without wgmma. "Default" means what runs without opting in: every
launcher choice and every conv_pool tile the tuner may pick; the RNN split mode (FUSENN_RNN_SPLIT) is
reported but opt-in. Compiles are cached by Triton (its cache directory) and the analysis beside them,
so a second run takes seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SMS = 132  # H100 SXM and H200
REGS_PER_SM, MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM = 65536, 64, 32
SMEM_PER_SM, SMEM_RESERVED_PER_BLOCK, MAX_SMEM_PER_BLOCK = 228 * 1024, 1024, 227 * 1024
CUDA_BLOCK_THREADS = 256


# ---------------------------------------------------------------------------------------------- recording

@dataclasses.dataclass
class Launch:
    family: str
    case: str
    dtype: str
    default: bool
    kernel: str
    fn: object  # the JITFunction
    grid: tuple
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` appends a Launch."""

    def __init__(self, fn, sink):
        self.fn, self.sink = fn, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append((self.fn, tuple(grid), args, kwargs))
        return launch


@contextlib.contextmanager
def _recording(sink):
    from fusenn.kernels import attention, conv_pool, gru, lstm, philox

    patched = [(attention, n) for n in ("attention_forward_kernel", "attention_backward_dq_kernel",
                                        "attention_backward_dkdv_kernel")]
    patched += [(lstm, "lstm_forward_kernel"), (lstm, "lstm_backward_kernel"), (gru, "gru_forward_kernel"),
                (gru, "gru_backward_kernel"), (philox, "dropout_mask_kernel"), (conv_pool, "conv_pool2d_kernel")]
    saved = [(m, n, getattr(m, n)) for m, n in patched] + [(lstm, "sm_count", lstm.sm_count),
                                                           (conv_pool, "choose_config", conv_pool.choose_config)]

    def every_candidate(key, configs, run, capturing):
        for config in configs:
            run(config)
        return configs[0]  # the launcher runs it again: deduplicated in _launches

    try:
        for m, n, fn in saved[:len(patched)]:
            setattr(m, n, _Recorder(fn, sink))
        lstm.sm_count = lambda device: SMS
        conv_pool.choose_config = every_candidate
        yield
    finally:
        for m, n, fn in saved:
            setattr(m, n, fn)


def _meta(*shape, dtype):
    import torch

    return torch.empty(shape, dtype=dtype, device="meta")


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float16", "fp16").replace(
        "float32", "fp32")


# Benchmark shapes (benchmarks/bench_*.py): attention at L 4096 (16k tokens per batch, model width 2048) for
# head dims 64 and 128 in bf16, causal or not, and with a key-padding mask; besides, the dtypes and head
# dims the kernels take (fp16, fp32, 256) and dropout, which the timed cases do not reach.
ATTENTION = [(dt, d, causal, None, 0.0) for dt in ("bf16", "fp16", "fp32") for d in (64, 128, 256)
             for causal in (False, True)]
ATTENTION += [("bf16", 64, False, "keypad", 0.0), ("bf16", 64, True, None, 0.1), ("bf16", 128, True, None, 0.1),
              ("fp32", 64, True, None, 0.1)]
# RNN: (B, H) of bench_rnn (fastrnns, deepbench, small-batch), T 100; the split mode at small batches; the
# PTB-medium shape with recurrent dropout and zoneout (bench_regularisers' kind).
RNN = [(64, 512), (16, 256), (32, 512), (64, 1024), (128, 2048), (1, 1024), (1, 512), (4, 512), (8, 512)]
RNN_SPLIT = [(1, 512), (8, 512), (1, 1024)]
CI_ATTENTION = [c for c in ATTENTION if c[2] or c[3] or c[4]]  # causal code is a superset of non-causal
CI_RNN = [(64, 512)]  # the batch changes the grid only
CI_CONV = ("resnet-stem", "vgg-block3")


def _attention_launches(scope, sink):
    import torch

    from fusenn.kernels import attention as A

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    out = []
    for dt, D, causal, mask, p in (CI_ATTENTION if scope == "ci" else ATTENTION):
        L = 4096
        B, H = 16384 // L, 2048 // D
        q, k, v, o, g = (_meta(B, H, L, D, dtype=dtypes[dt]) for _ in range(5))
        lse, delta = _meta(B, H, L, dtype=torch.float32), _meta(B, H, L, dtype=torch.float32)
        attn_mask = _meta(B, 1, 1, L, dtype=torch.bool).expand(B, H, L, L) if mask else None
        seed = _meta(dtype=torch.int64) if p else None
        case = f"B{B}-H{H}-L{L}-D{D}" + ("-causal" if causal else "") + (f"-{mask}" if mask else "") + (
            f"-dropout{p}" if p else "")
        before = len(sink)
        A.attention_forward(q, k, v, attn_mask, p, causal, D ** -0.5, seed, o, lse)
        A.attention_backward(g, q, k, v, o, lse, attn_mask, p, causal, D ** -0.5, seed, q.clone(), k.clone(),
                             v.clone(), delta)
        out += [("attention", case, dt, True, i) for i in range(before, len(sink))]
    return out


def _rnn_launches(scope, sink):
    import torch

    from fusenn.kernels import gru, lstm

    T = 100
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    cases = [(B, H, 1, None) for B, H in (CI_RNN if scope == "ci" else RNN)]
    cases += [(B, H, lstm.auto_split(B, H, SMS), None) for B, H in ([] if scope == "ci" else RNN_SPLIT)]
    cases += [(20, 650, 1, "regularised")]
    out = []
    seen = set()
    for B, H, nsplit, extra in cases:
        for dt in ("bf16", "fp32"):
            for kind in ("LSTM", "GRU"):
                G = 4 if kind == "LSTM" else 3
                gx = _meta(T, B, G * H, dtype=dtypes[dt])
                h0, w_hh = _meta(B, H, dtype=dtypes[dt]), _meta(G * H, H, dtype=dtypes[dt])
                regs = {}
                if extra:
                    regs = dict(recurrent_dropout=(0.25, _meta(dtype=torch.int64)),
                                zoneout=(0.1, _meta(dtype=torch.int64)))
                case = f"{kind}-B{B}-H{H}" + (f"-split{nsplit}" if nsplit > 1 else "") + (f"-{extra}" if extra else "")
                before = len(sink)
                split = dict(split=nsplit, cooperative=True)
                if kind == "LSTM":
                    for save in (False, True):
                        lstm.lstm_forward(gx, h0, h0, w_hh, None, None, False, save, **regs, **split)
                    hs, cs = _meta(T + 1, B, H, dtype=torch.float32), _meta(T + 1, B, H, dtype=torch.float32)
                    lstm.lstm_backward(_meta(T, B, H, dtype=dtypes[dt]), h0, h0, gx, w_hh, None, None, False, hs, cs,
                                       **regs, **split)
                else:
                    for save in (False, True):
                        gru.gru_forward(gx, h0, w_hh, _meta(G * H, dtype=dtypes[dt]), None, False, save, **regs,
                                        **split)
                    hs = _meta(T + 1, B, H, dtype=torch.float32)
                    gru.gru_backward(_meta(T, B, H, dtype=dtypes[dt]), h0, gx, w_hh, _meta(G * H, dtype=dtypes[dt]),
                                     None, False, hs, **regs, **split)
                for i in range(before, len(sink)):
                    family = "philox" if sink[i][0].__name__ == "dropout_mask_kernel" else "rnn"
                    if family == "philox" and "philox" in seen:
                        continue
                    seen.add(family)
                    out.append((family, case, dt, nsplit == 1, i))
    return out


def _conv_launches(scope, sink):
    import torch

    from benchmarks.bench_conv_pool import LAYERS
    from fusenn.kernels import conv_pool

    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    out = []
    for name, batch, c_in, c_out, size, kernel, stride, padding, pk, ps, pp in LAYERS:
        if scope == "ci" and name not in CI_CONV:
            continue
        conv = (size + 2 * padding - kernel) // stride + 1
        pooled = (conv + 2 * pp - pk) // ps + 1
        for dt in ("bf16", "fp32"):
            x = _meta(batch, c_in, size, size, dtype=dtypes[dt])
            w = _meta(c_out, c_in, kernel, kernel, dtype=dtypes[dt])
            o = _meta(batch, c_out, pooled, pooled, dtype=dtypes[dt])
            before = len(sink)
            # training: the argmax and pre-activation stores too (the inference kernel is this one minus them)
            conv_pool.conv_pool2d(x, w, _meta(c_out, dtype=dtypes[dt]), o, _meta(*o.shape, dtype=torch.int8), o,
                                  [stride] * 2, [padding] * 2, [1, 1], 1, "relu", 0.01, True, "max", [pk] * 2,
                                  [ps] * 2, [pp] * 2, True, False)
            case = f"{name}-B{batch}-C{c_in}to{c_out}-{size}x{size}-k{kernel}s{stride}-max{pk}s{ps}"
            out += [("conv_pool", case, dt, True, i) for i in range(before, len(sink))]
    return out


def _launches(scope: str) -> list[Launch]:
    os.environ.setdefault("FUSENN_POISON", "0")
    sink = []
    with _recording(sink):
        picked = _attention_launches(scope, sink) + _rnn_launches(scope, sink) + _conv_launches(scope, sink)
    launches, seen = [], set()
    for family, case, dtype, default, i in picked:
        fn, grid, args, kwargs = sink[i]
        key = (family, case, fn.__name__, _config_key(fn, args, kwargs))
        if key in seen:  # conv_pool's launcher re-runs the chosen candidate
            continue
        seen.add(key)
        launches.append(Launch(family, case, dtype, default, fn.__name__, fn, grid, args, kwargs))
    return launches


def _config_key(fn, args, kwargs):
    sig, consts, _, options = _signature(fn, args, kwargs)
    return json.dumps([sig, {k: repr(v) for k, v in consts.items()}, options], sort_keys=True)


# ---------------------------------------------------------------------------------------------- compiling

_TORCH_TO_TRITON = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int64": "i64", "int32": "i32",
                    "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}
OPTION_NAMES = ("num_warps", "num_stages", "num_ctas", "maxnreg", "launch_cooperative_grid")


def _signature(fn, args, kwargs):
    """(signature, constexprs, attrs, options) of a call, specialised the way Triton's JIT specialises it."""
    import torch

    bound = dict(zip(fn.arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
    options = {k: v for k, v in kwargs.items() if k in OPTION_NAMES}
    sig, consts, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        name = param.name
        value = bound[name] if name in bound else param.default
        if param.is_constexpr or value is None:
            sig[name] = "constexpr"
            consts[name] = value
            continue
        special = not getattr(param, "do_not_specialize", False)
        if isinstance(value, torch.Tensor):
            sig[name] = "*" + _TORCH_TO_TRITON[str(value.dtype).replace("torch.", "")]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch's allocations are 256-byte aligned
        elif isinstance(value, bool):
            sig[name] = "u1"
        elif isinstance(value, int):
            if special and value == 1:
                sig[name] = "constexpr"
                consts[name] = 1
                continue
            sig[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if special and value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={value!r}")
    return sig, consts, attrs, options


def _compile(launch: Launch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, consts, attrs, options = _signature(launch.fn, launch.args, launch.kwargs)
    src = ASTSource(fn=launch.fn, signature=sig, constexprs={(launch.fn.arg_names.index(k),): v
                                                             for k, v in consts.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options), consts, options


def _tool(name: str):
    """A CUDA tool: the one Triton ships (matching its ptxas), else the CUDA toolkit's, else PATH's."""
    import triton

    for folder in (os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin"),
                   "/usr/local/cuda/bin"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return path
    return shutil.which(name)


def _cache_dir() -> str:
    base = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    path = os.path.join(base, "fusenn-static")
    os.makedirs(path, exist_ok=True)
    return path


PTXAS_PATTERNS = {
    "registers": r"Used (\d+) registers",
    "stack": r"(\d+) bytes stack frame",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
    "static_smem": r"(\d+) bytes smem",
}
SASS_OPS = {"HGMMA": r"\bHGMMA\.", "HMMA": r"\bHMMA\.", "FFMA": r"\bFFMA\b", "LDGSTS": r"\bLDGSTS\b",
            "TMA": r"\bUTMALDG\b|\bUBLKCP\b", "STL": r"\bSTL\b", "LDL": r"\bLDL\b", "BAR": r"\bBAR\.SYNC\b"}


def _ptxas_info(log: str) -> dict:
    info = {}
    for key, pattern in PTXAS_PATTERNS.items():
        m = re.search(pattern, log)
        info[key] = int(m.group(1)) if m else 0
    return info


def _sass_info(sass: str) -> dict:
    counts = {op: len(re.findall(pattern, sass)) for op, pattern in SASS_OPS.items()}
    shapes = sorted(set(re.findall(r"\bHGMMA\.(\d+x\d+x\d+)", sass)) | set(re.findall(r"\bHMMA\.(\d+)\.", sass)))
    return {"sass_counts": counts, "mma_shapes": shapes}


def _binary_info(ptx: str, cubin: bytes) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path, cubin_path = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        with open(cubin_path, "wb") as f:
            f.write(cubin)
        log = subprocess.run([_tool("ptxas"), "-v", "--gpu-name=sm_90a", ptx_path, "-o", os.path.join(tmp, "o")],
                             capture_output=True, text=True).stderr
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin_path], capture_output=True, text=True).stdout
    return {**_ptxas_info(log), **_sass_info(sass)}


LAYOUT = re.compile(r"^(#\w+) = #ttg\.(nvidia_mma|blocked)<\{(.*)\}>", re.M)
DOT = re.compile(r"= (tt\.dot|ttng\.warp_group_dot) .*-> tensor<(\d+)x(\d+)x\w+, (#\w+)>")


def _ints(text: str, field: str) -> list[int]:
    m = re.search(field + r" = \[([\d, ]+)\]", text)
    return [int(x) for x in m.group(1).split(",")] if m else []


def dot_layouts(ttgir: str) -> list[dict]:
    """Every dot of the kernel: its shape (M, N), layout, and how often each product is computed
    (replication: the rows x columns the warps cover, over the dot's)."""
    layouts = {}
    for name, kind, body in LAYOUT.findall(ttgir):
        wpc = _ints(body, "warpsPerCTA")
        if kind == "nvidia_mma":
            version = int(re.search(r"versionMajor = (\d+)", body).group(1))
            instr = _ints(body, "instrShape")
            per_warp = [16, instr[1] if version == 3 else 8]
            layouts[name] = (f"mma.v{version} warps {wpc} instr {instr}", [p * w for p, w in zip(per_warp, wpc)])
        else:
            spt, tpw = _ints(body, "sizePerThread"), _ints(body, "threadsPerWarp")
            layouts[name] = (f"blocked warps {wpc}", [s * t * w for s, t, w in zip(spt, tpw, wpc)])
    dots = []
    for op, m, n, layout in DOT.findall(ttgir):
        m, n = int(m), int(n)
        text, cover = layouts.get(layout, (layout, [m, n]))
        replication = max(1, cover[0] // m) * max(1, cover[1] // n)
        dots.append({"op": op, "shape": [m, n], "layout": text, "replication": replication})
    return dots


def occupancy(registers: int, shared: int, warps: int) -> tuple[int, float]:
    """(resident programs per SM, fraction of the SM's 64 warp slots they fill) on H100/H200."""
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = (REGS_PER_SM // regs_per_warp) // warps
    by_smem = SMEM_PER_SM // (shared + SMEM_RESERVED_PER_BLOCK) if shared else MAX_BLOCKS_PER_SM
    blocks = max(0, min(by_regs, by_smem, MAX_WARPS_PER_SM // warps, MAX_BLOCKS_PER_SM))
    return blocks, blocks * warps / MAX_WARPS_PER_SM


def mma_kind(sass_counts: dict, dots: list) -> str:
    if sass_counts["HGMMA"]:
        return "wgmma"
    if sass_counts["HMMA"]:
        return "mma.sync"
    return "FMA" if dots else "-"


def analyse(launch: Launch) -> dict:
    compiled, consts, options = _compile(launch)
    key = compiled.metadata.hash
    path = os.path.join(_cache_dir(), key + ".json")
    if os.path.exists(path):
        with open(path) as f:
            info = json.load(f)
    else:
        info = _binary_info(compiled.asm["ptx"], compiled.asm["cubin"])
        info["dots"] = dot_layouts(compiled.asm["ttgir"])
        with open(path + ".tmp", "w") as f:
            json.dump(info, f)
        os.replace(path + ".tmp", path)
    warps = compiled.metadata.num_warps
    shared = compiled.metadata.shared
    blocks, occ = occupancy(info["registers"], shared, warps)
    programs = math.prod(launch.grid)
    config = {k: v for k, v in consts.items() if k.startswith("BLOCK") or k in ("NSPLIT", "D", "DV", "PRECISION")}
    config.update(num_warps=warps, num_stages=compiled.metadata.num_stages)
    return {
        "family": launch.family, "kernel": launch.kernel, "case": launch.case, "dtype": launch.dtype,
        "default": launch.default, "config": config,
        "constexprs": {k: v for k, v in consts.items() if isinstance(v, (int, float, str, bool)) or v is None},
        "registers": info["registers"], "spill_stores": info["spill_stores"], "spill_loads": info["spill_loads"],
        "stack": info["stack"], "shared_bytes": shared, "programs_per_sm": blocks, "occupancy": occ,
        "mma": mma_kind(info["sass_counts"], info["dots"]), "mma_shapes": info["mma_shapes"],
        "cp_async": info["sass_counts"]["LDGSTS"] > 0, "tma": info["sass_counts"]["TMA"] > 0,
        "dots": info["dots"], "replication": max([d["replication"] for d in info["dots"]], default=1),
        "sass_counts": info["sass_counts"], "grid": list(launch.grid), "programs": programs,
        "sms_covered": min(programs, SMS), "waves": programs / (SMS * blocks) if blocks else float("inf"),
    }


# ---------------------------------------------------------------------------------------------- CUDA

def _cuda_records() -> list[dict]:
    nvcc = os.environ.get("NVCC") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc")
                                      else shutil.which("nvcc"))
    csrc = os.path.join(ROOT, "csrc")
    if not nvcc or not os.path.isdir(csrc):
        return [{"family": "cuda", "kernel": "-", "case": "-", "error": "no nvcc found: CUDA sources not compiled"}]
    sources = sorted(f for f in os.listdir(csrc) if f.endswith(".cu"))
    digest = hashlib.sha256(b"records v2\0" + subprocess.run([nvcc, "--version"], capture_output=True).stdout)
    for name in sorted(os.listdir(csrc)):
        with open(os.path.join(csrc, name), "rb") as f:
            digest.update(name.encode() + f.read())
    path = os.path.join(_cache_dir(), "cuda-" + digest.hexdigest()[:32] + ".json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    records = []
    for source in sources:
        with tempfile.TemporaryDirectory() as tmp:
            cubin = os.path.join(tmp, "k.cubin")
            out = subprocess.run([nvcc, "-arch=sm_90a", "-cubin", "-O3", "-std=c++17", "-I", csrc, "-Xptxas", "-v",
                                  os.path.join(csrc, source), "-o", cubin], capture_output=True, text=True)
            if out.returncode:
                records.append({"family": "cuda", "kernel": "-", "case": source, "error": out.stderr[-2000:]})
                continue
            sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
        sass_by_fn = dict(re.findall(r"Function : (\S+)\n(.*?)(?=\n\s*Function : |\Z)", sass, re.S))
        for fn, body in re.findall(r"Compiling entry function '(\S+)' for 'sm_90a'\n(.*?)(?=Compiling entry|\Z)",
                                   out.stderr, re.S):
            info = {**_ptxas_info(body), **_sass_info(sass_by_fn.get(fn, ""))}
            # the kernel's code (its last instruction's offset, plus one): what the instruction caches must hold
            offsets = [int(x, 16) for x in re.findall(r"/\*([0-9a-f]{4,})\*/", sass_by_fn.get(fn, ""))]
            warps = CUDA_BLOCK_THREADS // 32
            blocks, occ = occupancy(info["registers"], info["static_smem"], warps)
            records.append({
                "family": "cuda", "kernel": _demangle(fn), "case": source, "dtype": _cuda_dtype(_demangle(fn)),
                "default": True, "config": {"threads": CUDA_BLOCK_THREADS}, "registers": info["registers"],
                "spill_stores": info["spill_stores"], "spill_loads": info["spill_loads"], "stack": info["stack"],
                "shared_bytes": info["static_smem"], "programs_per_sm": blocks, "occupancy": occ,
                "mma": mma_kind(info["sass_counts"], []), "mma_shapes": info["mma_shapes"],
                "cp_async": info["sass_counts"]["LDGSTS"] > 0, "tma": info["sass_counts"]["TMA"] > 0, "dots": [],
                "replication": 1, "sass_counts": info["sass_counts"], "sass_bytes": max(offsets, default=-16) + 16,
                "grid": None, "programs": None,
                "sms_covered": None, "waves": None})
    with open(path, "w") as f:
        json.dump(records, f)
    return records


def _demangle(name: str) -> str:
    tool = shutil.which("c++filt") or _tool("cu++filt")
    if not tool:
        return name
    return subprocess.run([tool, name], capture_output=True, text=True).stdout.strip() or name


def _cuda_dtype(name: str) -> str:
    return "fp16" if "__half" in name else "bf16" if "bfloat16" in name else "fp32" if "float" in name else "-"


# ---------------------------------------------------------------------------------------------- report

# Default configs the report still flags, each with why it is not fixed yet: violations() leaves them out
# and known() lists them apart, so the CI test fails on anything new while these stay visible.
KNOWN: list = []  # (match, why) pairs; none left


def known(r: dict):
    """The reason a record is a known, not yet fixed, violation (KNOWN), or None. A match with NEWER_PTXAS
    holds only under the Triton it names (fusenn.kernels.NEWER_PTXAS: 3.7 on, or before)."""
    from fusenn.kernels import NEWER_PTXAS

    for match, why in KNOWN:
        fields = dict(r, D=r.get("config", {}).get("D"), DROPOUT=r.get("constexprs", {}).get("DROPOUT"),
                      NEWER_PTXAS=NEWER_PTXAS)
        if all(fields.get(k) == v for k, v in match.items()):
            return why
    return None


def violations(records: list[dict], include_known: bool = False) -> list[str]:
    """What the CI test fails on (see the module docstring); KNOWN records only with include_known."""
    bad = []
    for r in records:
        if not include_known and "error" not in r and known(r):
            continue
        if "error" in r:
            bad.append(f"{r['family']} {r['case']}: did not compile: {r['error'][:300]}")
            continue
        if not r["default"]:
            continue
        name = f"{r['family']} {r['kernel']} {r['case']} {r['dtype']} {r['config']}"
        if r["shared_bytes"] > MAX_SMEM_PER_BLOCK or r["programs_per_sm"] == 0:
            bad.append(f"{name}: cannot launch ({r['shared_bytes']} B of shared memory, {r['registers']} registers)")
        if r["spill_stores"] or r["spill_loads"]:
            bad.append(f"{name}: spills {r['spill_stores']} B stored, {r['spill_loads']} B loaded")
        if r["dtype"] in ("bf16", "fp16") and r["replication"] > 1:
            bad.append(f"{name}: a dot computed {r['replication']}x (replicated across warps): {r['dots']}")
        if r["family"] == "attention" and r["dtype"] in ("bf16", "fp16") and r["mma"] != "wgmma":
            bad.append(f"{name}: {r['mma']} instead of wgmma")
    return bad


def collect(scope: str = "full", jobs: int | None = None) -> list[dict]:
    """Every kernel's record; scope 'ci' is the subset the CI test compiles (see CI_*)."""
    launches = _launches(scope)
    jobs = jobs or min(len(launches), os.cpu_count() or 1)
    if jobs > 1 and sys.platform == "linux":
        import multiprocessing

        global _POOL_LAUNCHES
        _POOL_LAUNCHES = launches  # the forked workers inherit them
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            records = pool.map(_analyse_index, range(len(launches)))
    else:
        records = [analyse(launch) for launch in launches]
    return records + _cuda_records()


_POOL_LAUNCHES: list = []


def _analyse_index(i: int) -> dict:
    try:
        return analyse(_POOL_LAUNCHES[i])
    except Exception as exc:  # noqa: BLE001 - a kernel that does not compile is a finding, reported
        launch = _POOL_LAUNCHES[i]
        return {"family": launch.family, "kernel": launch.kernel, "case": launch.case, "dtype": launch.dtype,
                "default": launch.default, "error": repr(exc)[:2000]}


def _row(r: dict) -> str:
    if "error" in r:
        return f"{r['family']:<10} {r['kernel'][:28]:<28} {r['case'][:44]:<44} ERROR {r['error'][:80]}"
    cfg = r["config"]
    tile = "x".join(str(cfg[k]) for k in cfg if k.startswith("BLOCK")) or str(cfg.get("threads", ""))
    occ = f"{r['programs_per_sm']}/{r['occupancy']:.2f}"
    sms = f"{r['sms_covered']}" if r["sms_covered"] is not None else "-"
    spill = f"{r['spill_stores']}/{r['spill_loads']}"
    flag = "" if r["default"] else " (opt-in)"
    return (f"{r['family']:<10} {r['kernel'][:28]:<28} {r['case'][:44]:<44} {r['dtype']:<5} {tile:<14} "
            f"{cfg.get('num_warps', '-')!s:>2}/{cfg.get('num_stages', '-')!s:<2} {r['registers']:>4} {spill:>9} "
            f"{r['shared_bytes'] // 1024:>4}K {occ:>8} {r['mma']:<8} {r['replication']:>3}x {sms:>4}{flag}")


def write(records: list[dict], out_dir: str) -> None:
    from benchmarks.__main__ import environment

    os.makedirs(out_dir, exist_ok=True)
    env = dict(environment(), target="sm_90a", sms=SMS)
    for r in records:
        r["known"] = known(r) if "error" not in r else None
    for family in sorted({r["family"] for r in records}):
        with open(os.path.join(out_dir, f"{family}.json"), "w") as f:
            json.dump({"environment": env, "family": family,
                       "records": [r for r in records if r["family"] == family]}, f, indent=1)


def report_dir(results: str) -> str:
    """results/static-sm90a/triton-<major.minor>: the report of the installed Triton (and its ptxas)."""
    import triton

    return os.path.join(results, "static-sm90a", "triton-" + ".".join(triton.__version__.split(".")[:2]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks --static", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="default: results/static-sm90a/triton-<major.minor>")
    parser.add_argument("--scope", choices=("full", "ci"), default="full")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: one per core)")
    parser.add_argument("--json", default=None, help="also write every record to this one file")
    args = parser.parse_args(argv)
    kernels = sys.modules.get("fusenn.kernels")
    if os.environ.get("TRITON_INTERPRET") == "1" or (kernels is not None and kernels.INTERPRET):
        # kernels decorated for the interpreter cannot be compiled: run in a fresh process
        env = dict(os.environ, TRITON_INTERPRET="0")
        return subprocess.run([sys.executable, "-m", "benchmarks.static", *(argv or sys.argv[1:])], env=env,
                              cwd=ROOT).returncode
    os.environ["TRITON_INTERPRET"] = "0"
    args.out = args.out or report_dir(os.path.join(HERE, "results"))
    records = collect(args.scope, args.jobs)
    write(records, args.out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f)
    print(f"{'family':<10} {'kernel':<28} {'case':<44} {'dtype':<5} {'tile':<14} {'w/s':<5} {'regs':>4} "
          f"{'spill B':>9} {'smem':>5} {'occ':>8} {'mma':<8} {'rep':>4} {'SMs':>4}")
    for r in records:
        print(_row(r))
    bad = violations(records)
    print(f"\nwrote {args.out}; {len(records)} kernels, {len(bad)} violations")
    for line in bad:
        print("  " + line)
    still = [line for line in violations(records, include_known=True) if line not in bad]
    if still:
        print(f"{len(still)} known (static.KNOWN), not yet fixed:")
        for why in sorted({known(r) for r in records if "error" not in r and known(r)}):
            print("  " + why)
        for line in still:
            print("    " + line[:200])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""LSTM and GRU: fusenn's modules against cuDNN (torch.nn) and a torch.compile'd cell loop.

fusenn runs several ways where it can: `fusenn` (the backend `auto` picks on a GPU: the persistent kernels
where they take the inputs, else the Triton kernels),
`fusenn-split` (the Triton kernels' cooperative split mode), `fusenn-cpp` (the C++ layers of
csrc/rnn_host.cpp: a cuBLAS GEMM and a fused kernel per step; needs fusenn._C) and `fusenn-persistent`
(csrc/rnn_persist.cu: W_hh on chip, one cooperative launch per layer; needs fusenn._C), each case with the
persistent design's analytic bound (persist_bound) beside it.
"""

import os

import torch
from torch import nn

import fusenn
from benchmarks.registry import REGISTRY, Case, Check, Entry, register, timed_step
from fusenn.testing import ATOL, max_error

# (module, T, B, I, H, extra constructor arguments) validated on any machine at small sizes.
SMALL = [
    ("LSTM", 5, 3, 7, 33, {}),
    ("LSTM", 4, 2, 5, 7, {"num_layers": 2, "bidirectional": True, "proj_size": 3}),
    ("GRU", 5, 3, 7, 33, {}),
    ("GRU", 3, 1, 5, 7, {"num_layers": 2, "bidirectional": True}),
]


def _grads(module, x):
    x = x.detach().requires_grad_()
    out, _ = module(x)
    out.backward(torch.ones_like(out) / out.numel())
    return [out.detach(), x.grad] + [p.grad for p in module.parameters()]


def validate():
    """fusenn (current backend, fp32) and torch.nn (fp32) against torch.nn in float64; also in the split
    mode timed as fusenn-split (cooperative on a GPU, one launch per phase and step on a CPU), and the C++
    layers (stepwise and persistent) where fusenn._C runs."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    split = "auto" if device == "cuda" else "2"
    checks = []
    for kind, T, B, I, H, extra in SMALL:
        checks.append(_validate_one(kind, T, B, I, H, extra, device))
        check = _with_env(lambda: _validate_one(kind, T, B, I, H, extra, device), FUSENN_RNN_SPLIT=split)()
        checks.append(Check(check.case + f"-split-{split}", check.error, check.allowed))
        if cpp_usable(device):
            check = with_backend(lambda: _validate_one(kind, T, B, I, H, extra, device), "cuda")()
            checks.append(Check(check.case + "-cpp", check.error, check.allowed))
            check = with_backend(lambda: _validate_one(kind, T, B, I, H, extra, device), "persistent")()
            checks.append(Check(check.case + "-persistent", check.error, check.allowed))
    return checks


def cpp_usable(device) -> bool:
    return device == "cuda" and fusenn.backends()["cuda"].usable


def with_backend(fn, name):
    def run():
        with fusenn.set_backend(name):
            return fn()
    return run


def _validate_one(kind, T, B, I, H, extra, device):
    torch.manual_seed(0)
    ours = getattr(fusenn, kind)(I, H, **extra).to(device)
    theirs = getattr(nn, kind)(I, H, **extra).to(device)
    theirs.load_state_dict(ours.state_dict())
    exact = getattr(nn, kind)(I, H, **extra).to(device).double()
    exact.load_state_dict(ours.state_dict())
    x = torch.randn(T, B, I, device=device)
    got, base, ref = _grads(ours, x), _grads(theirs, x), _grads(exact, x.double())
    error = max(max_error(g, r) for g, r in zip(got, ref))
    allowed = 3 * max(max_error(b, r) for b, r in zip(base, ref)) + ATOL[torch.float32]
    name = "-".join([kind, f"T{T}-B{B}-I{I}-H{H}"] + [f"{k}{v}" for k, v in extra.items()])
    return Check(name + "-fwd+bwd", error, allowed)


def _cell_loop(kind, module):
    """What users write when cuDNN cannot do their variant: a compiled cell stepped from Python."""
    w_ih, w_hh, b_ih, b_hh = module.weight_ih_l0, module.weight_hh_l0, module.bias_ih_l0, module.bias_hh_l0

    if kind == "LSTM":
        @torch.compile
        def cell(gx, h, c):
            i, f, g, o = (gx + h @ w_hh.t()).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c

        def run(x):
            gx = torch.nn.functional.linear(x, w_ih, b_ih + b_hh)
            h = c = x.new_zeros(x.size(1), module.hidden_size)
            ys = []
            for t in range(x.size(0)):
                h, c = cell(gx[t], h, c)
                ys.append(h)
            return torch.stack(ys)
    else:
        @torch.compile
        def cell(gx, h):
            xr, xz, xn = gx.chunk(3, -1)
            hr, hz, hn = (h @ w_hh.t() + b_hh).chunk(3, -1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            return (1 - z) * torch.tanh(xn + r * hn) + z * h

        def run(x):
            gx = torch.nn.functional.linear(x, w_ih, b_ih)
            h = x.new_zeros(x.size(1), module.hidden_size)
            ys = []
            for t in range(x.size(0)):
                h = cell(gx[t], h)
                ys.append(h)
            return torch.stack(ys)
    return run


# Grids the persistent kernels are also timed on (FUSENN_PERSIST_GRID) where the batch is large enough for the
# broadcast of h_{t-1} (each CTA stages all of it, every step) to weigh against spreading the gate products over
# more SMs: the first GPU run shows where the plan's grid stands among them.
PERSIST_GRIDS = (16, 32, 64, 128)


def _setup(kind, T, B, I, H, dtype, train):
    def setup(device):
        ours = getattr(fusenn, kind)(I, H, device=device, dtype=dtype)
        theirs = getattr(nn, kind)(I, H, device=device, dtype=dtype)
        theirs.load_state_dict(ours.state_dict())
        x = torch.randn(T, B, I, device=device, dtype=dtype, requires_grad=train)
        loop = _cell_loop(kind, theirs)

        def timed(fn):  # fn(x) -> output
            return timed_step(lambda: fn(x), train)

        impls = {"fusenn": timed(lambda x: ours(x)[0]), "cudnn": timed(lambda x: theirs(x)[0]),
                 "compiled-cell-loop": timed(loop)}
        # the cooperative kernels, opt-in until GPU runs show where they win
        impls["fusenn-split"] = _with_env(timed(lambda x: ours(x)[0]), FUSENN_RNN_SPLIT="auto")
        if cpp_usable(torch.device(device).type):
            impls["fusenn-cpp"] = with_backend(timed(lambda x: ours(x)[0]), "cuda")
            # the persistent kernels; an input they refuse is reported with the reason BackendError gives
            impls["fusenn-persistent"] = with_backend(timed(lambda x: ours(x)[0]), "persistent")
            for grid in PERSIST_GRIDS if B >= 8 else ():
                impls[f"fusenn-persistent-g{grid}"] = with_backend(
                    _with_env(timed(lambda x: ours(x)[0]), FUSENN_PERSIST_GRID=str(grid)), "persistent")
            if B > 16:  # the plan's grid with one batch tile a staging round: what the plan's tiles buy
                impls["fusenn-persistent-t1"] = with_backend(
                    _with_env(timed(lambda x: ours(x)[0]), FUSENN_PERSIST_TILES="1"), "persistent")
        return impls
    return setup


def _with_env(fn, **env):
    """fn run with the environment variables `env` set (forward and backward both read them)."""
    def run():
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return fn()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k)
                else:
                    os.environ[k] = v
    return run


def _flops(kind, T, B, I, H, train):
    gates = 4 if kind == "LSTM" else 3
    fwd = 2 * T * B * gates * H * (I + H)
    return fwd * (3 if train else 1)


# What the persistent kernels' bound assumes of an H100 / H200 (to be replaced by measured numbers): L2
# bandwidth, tensor-core and FMA peaks, one grid-wide barrier.
L2_BYTES_PER_S = 5.5e12
MMA_FLOPS = {torch.bfloat16: 790e12, torch.float16: 790e12, torch.float32: 60e12}
GRID_SYNC_S = 2e-6


def _plan(gates, backward, e, H, B):
    """The launcher's plan for an H200 at batch B (csrc/rnn_persist.cuh, its cost model's choice): (grid, batch
    tiles a staging round, modelled ns a step), or where fusenn._C is not built, ceil(H / 132) units rounded up to
    a multiple of 4 per CTA's grid and nothing modelled."""
    try:
        import fusenn._C  # noqa: F401 - registers torch.ops.fusenn_cuda
        p = torch.ops.fusenn_cuda.persist_plan(gates, backward, e, H, 0, [], 0, 0, e == 4, 0, B)
        return p[0], p[7], p[6]
    except (ImportError, AttributeError, RuntimeError):
        units = -(-(-(-H // 132)) // 4) * 4
        return -(-H // units), None, None


def persist_bound(kind, T, B, H, dtype, train):
    """The persistent kernels' analytic bound per layer (csrc/rnn_persist.cuh): per step, every CTA stages the
    whole recurrent operand through L2 (the broadcast: h_{t-1}, B x H, forward; dgates, B x gates H, backward)
    besides its own gx, state and outputs; the gate products are 2 B gates H^2 FLOPs; one grid sync a step in
    forward and one in backward. The grids are the launcher's plan for an H200 at this batch. Backward adds the
    gates' recomputation and the weight gradient, one GEMM each over T*B rows, counted at the MMA peak. Beside
    it, model_ms: T steps at the plan's own modelled time a step (step_ns, its constants unmeasured: the first
    GPU run shows how far it is off), without the GEMMs."""
    gates = 4 if kind == "LSTM" else 3
    e = torch.finfo(dtype).bits // 8
    (grid, tiles, ns), (grid_bwd, tiles_bwd, ns_bwd) = (_plan(gates, False, e, H, B),
                                                         _plan(gates, True, e, H, B) if train else (0, None, 0.0))
    state = 2 * 4 * B * H * (2 if gates == 4 else 1)  # fp32 h (and c) slots read and written
    own = B * H * 2 * e + B * gates * H * (e + 8) + state
    step_flops = 2 * B * gates * H * H
    passes = [grid * B * H * e + own] + ([grid_bwd * B * gates * H * e + own] if train else [])
    gemm_flops = (2 * 2 * T * B * gates * H * H) if train else 0
    seconds = sum(T * (max(b / L2_BYTES_PER_S, step_flops / MMA_FLOPS[dtype]) + GRID_SYNC_S) for b in passes)
    seconds += gemm_flops / MMA_FLOPS[dtype]
    bound = {"grid": grid, "grid_backward": grid_bwd, "l2_bytes_per_step": [float(b) for b in passes],
             "flops_per_step": float(step_flops), "grid_syncs": T * len(passes), "bound_ms": seconds * 1e3}
    if ns is not None:
        bound.update(tiles=tiles, tiles_backward=tiles_bwd if train else 0,
                     model_ms=T * (ns + (ns_bwd if train else 0.0)) * 1e-6)
    return bound


def cases(quick):
    sizes = [("fastrnns", 100, 64, 512, 512)]
    if not quick:
        sizes += [("deepbench", T, B, H, H) for T, B, H in
                  [(25, 16, 256), (50, 32, 512), (150, 64, 1024), (25, 128, 2048), (50, 1, 1024)]]
    small_batch = [("small-batch", 100, B, 512, 512) for B in (1, 4, 8)]
    out = []
    for kind in ("LSTM", "GRU"):
        for dtype in (torch.float32, torch.bfloat16):
            dname = str(dtype)[6:]
            for label, T, B, I, H in sizes:
                for train in (True, False):
                    mode = "train" if train else "infer"
                    out.append(Case(f"{kind}-{label}-T{T}-B{B}-I{I}-H{H}-{dname}-{mode}",
                                    _setup(kind, T, B, I, H, dtype, train), flops=_flops(kind, T, B, I, H, train),
                                    bound=persist_bound(kind, T, B, H, dtype, train)))
            for label, T, B, I, H in small_batch[:1] if quick else small_batch:
                out.append(Case(f"{kind}-{label}-T{T}-B{B}-I{I}-H{H}-{dname}-infer",
                                _setup(kind, T, B, I, H, dtype, False), flops=_flops(kind, T, B, I, H, False),
                                bound=persist_bound(kind, T, B, H, dtype, False)))
    return out


register(Entry(op="rnn", baselines=("cudnn", "compiled-cell-loop"), validate=validate, cases=cases))


# CPU timing (python -m benchmarks without a GPU): fusenn's modules under auto against torch.nn's, fp32.

def _cpu_setup(kind, T, B, I, H, train, layers=1, bidirectional=False, cell=False):
    def setup(device):
        name, kwargs = (kind + "Cell", {}) if cell else (kind, dict(num_layers=layers, bidirectional=bidirectional))
        ours = getattr(fusenn, name)(I, H, **kwargs)
        theirs = getattr(nn, name)(I, H, **kwargs)
        theirs.load_state_dict(ours.state_dict())
        x = torch.randn(T, B, I, requires_grad=train)

        def forward(module):
            if not cell:
                return module(x)[0]
            state, ys = None, []
            for t in range(T):  # a decode loop: one cell call per step
                state = module(x[t], state)
                ys.append(state[0] if kind == "LSTM" else state)
            return torch.stack(ys)

        def step(module):
            return timed_step(lambda: forward(module), train)

        return {"fusenn": step(ours), "torch": step(theirs)}
    return setup


def cpu_cases(quick):
    specs = [("LSTM", 50, 32, 256, 256, False, 2, False, False), ("LSTM", 50, 32, 256, 256, True, 2, False, False),
             ("LSTM", 35, 20, 650, 650, True, 2, False, False), ("LSTM", 50, 32, 128, 128, True, 1, True, False),
             ("GRU", 50, 32, 256, 256, True, 2, False, False), ("GRU", 50, 32, 256, 256, False, 1, True, False),
             ("LSTM", 50, 32, 256, 256, False, 1, False, True), ("GRU", 50, 32, 256, 256, False, 1, False, True)]
    if not quick:
        specs += [("LSTM", 50, 32, H, H, True, 1, False, False) for H in (64, 128, 512)]
        specs += [("GRU", 50, 32, 256, 256, False, 2, False, False), ("GRU", 50, 32, 128, 128, True, 1, True, False)]
    out = []
    for kind, T, B, I, H, train, layers, bidir, cell in specs:
        label = f"{kind}Cell-decode" if cell else f"{kind}-L{layers}" + ("-bidir" if bidir else "")
        flops = _flops(kind, T, B, I, H, train) * layers * (2 if bidir else 1)
        out.append(Case(f"{label}-T{T}-B{B}-I{I}-H{H}-{'train' if train else 'infer'}",
                        _cpu_setup(kind, T, B, I, H, train, layers, bidir, cell), flops=flops))
    return out


REGISTRY["rnn"].cpu_cases = cpu_cases

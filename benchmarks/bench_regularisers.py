"""Regularised LSTM training steps: fusenn's fused regularisers against the best path a user has today
(cuDNN's nn.LSTM with the masks applied around it where that is possible; a torch.compile'd cell loop
applying the same kind of masks where the mask lives inside the recurrence)."""

import torch
from torch import nn

import fusenn
from benchmarks.bench_rnn import cpp_usable, with_backend
from benchmarks.registry import REGISTRY, Case, Check, Entry, register
from fusenn.testing import max_error

REGULARISERS = {
    "dropout": {"dropout": 0.5},
    "input+output": {"input_dropout": 0.5, "output_dropout": 0.5},
    "variational": {"dropout": 0.5, "input_dropout": 0.5, "output_dropout": 0.5, "variational": True},
    "weight_dropout": {"weight_dropout": 0.5},
    "recurrent_dropout": {"recurrent_dropout": 0.25},
    "zoneout": {"zoneout": 0.1},
}


def _step(module, x, seed):
    torch.manual_seed(seed)
    x = x.detach().requires_grad_()
    out, _ = module(x)
    out.backward(torch.ones_like(out) / out.numel())
    grads = [x.grad] + [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    return [out.detach()] + grads


def validate():
    """The current backend (and the C++ layers where fusenn._C runs) against the reference with the same
    seed: the same masks, so the same numbers (the GRU too; the timed cases are the LSTM's)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    checks = []
    for mode in ("LSTM", "GRU"):
        for name, kwargs in REGULARISERS.items():
            torch.manual_seed(0)
            m = getattr(fusenn, mode)(5, 7, 2, bidirectional=True, **kwargs).to(device).train()
            x = torch.randn(4, 3, 5, device=device)
            with fusenn.set_backend("reference"):
                ref = _step(m, x, seed=1)
            runs = {"": lambda: _step(m, x, seed=1)}
            if cpp_usable(device):
                runs["-cpp"] = with_backend(lambda: _step(m, x, seed=1), "cuda")
            for suffix, run in runs.items():
                error = max(max_error(g, r) for g, r in zip(run(), ref))
                checks.append(Check(f"{mode}-L2-bidir-T4-B3-I5-H7-{name}{suffix}", error, 1e-4))
    return checks


def _locked(shape_bt, features, p, device, dtype):
    """A variational mask (one per batch row and feature), scaled."""
    return torch.bernoulli(torch.full((shape_bt, features), 1 - p, device=device, dtype=dtype)) / (1 - p)


def _baseline(name, kwargs, ref: nn.LSTM):
    """The fastest thing a PyTorch user can write today for this regulariser."""
    p_in, p_out = kwargs.get("input_dropout", 0.0), kwargs.get("output_dropout", 0.0)
    if name in ("dropout", "input+output"):
        drop = nn.functional.dropout
        return lambda x: drop(ref(drop(x, p_in))[0], p_out)
    if name == "variational":
        def variational(x):
            T, B, F = x.shape
            x = x * _locked(B, F, p_in, x.device, x.dtype)
            y = ref(x)[0]  # cuDNN's between-layer dropout is not time-locked: the closest it offers
            return y * _locked(B, y.shape[-1], p_out, y.device, y.dtype)
        return variational
    if name == "weight_dropout":  # AWD-LSTM's WeightDrop: a dropped copy of weight_hh per forward
        def weight_drop(x):
            params = {k: v for k, v in ref.named_parameters()}
            for k in [k for k in params if k.startswith("weight_hh")]:
                params[k] = nn.functional.dropout(params[k], kwargs["weight_dropout"])
            return torch.func.functional_call(ref, params, (x,))[0]
        return weight_drop
    # recurrent_dropout / zoneout: a compiled cell stepped from Python (one layer, as in the case below).
    w_ih, w_hh, b = ref.weight_ih_l0, ref.weight_hh_l0, ref.bias_ih_l0 + ref.bias_hh_l0
    p_rec, p_zone = kwargs.get("recurrent_dropout", 0.0), kwargs.get("zoneout", 0.0)

    @torch.compile
    def cell(gx, h, c, rmask, zh, zc):
        i, f, g, o = (gx + (h * rmask) @ w_hh.t()).chunk(4, -1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        return torch.where(zh, h, h_new), torch.where(zc, c, c_new)

    def loop(x):
        T, B, _ = x.shape
        H = ref.hidden_size
        gx = nn.functional.linear(x, w_ih, b)
        h = c = x.new_zeros(B, H)
        rmask = _locked(B, H, p_rec, x.device, x.dtype) if p_rec else x.new_ones(B, H)
        ys = []
        for t in range(T):
            zh = torch.rand(B, H, device=x.device) < p_zone
            zc = torch.rand(B, H, device=x.device) < p_zone
            h, c = cell(gx[t], h, c, rmask, zh, zc)
            ys.append(h)
        return torch.stack(ys)
    return loop


def cases(quick):
    sizes = [("ptb-medium", 35, 20, 650, 650)] + ([] if quick else [("fastrnns", 100, 64, 512, 512)])
    out = []
    for name, kwargs in REGULARISERS.items():
        layers = 1 if name in ("recurrent_dropout", "zoneout") else 2  # the cell-loop baseline is one layer
        for label, T, B, I, H in sizes:
            for dtype in (torch.float32, torch.bfloat16):
                def setup(device, kwargs=kwargs, name=name, layers=layers, T=T, B=B, I=I, H=H, dtype=dtype):
                    ours = fusenn.LSTM(I, H, layers, device=device, dtype=dtype, **kwargs).train()
                    ref = nn.LSTM(I, H, layers, dropout=kwargs.get("dropout", 0.0), device=device, dtype=dtype)
                    ref.load_state_dict(ours.state_dict())
                    x = torch.randn(T, B, I, device=device, dtype=dtype)
                    base = _baseline(name, kwargs, ref)
                    impls = {"fusenn": lambda: ours(x)[0].float().sum().backward(),
                             "torch": lambda: base(x).float().sum().backward()}
                    if cpp_usable(torch.device(device).type):
                        impls["fusenn-cpp"] = with_backend(impls["fusenn"], "cuda")
                    return impls

                flops = 3 * 2 * T * B * 4 * H * (I + H) * layers
                out.append(Case(f"{name}-{label}-L{layers}-T{T}-B{B}-H{H}-{str(dtype)[6:]}-train", setup, flops=flops))
    return out


register(Entry(op="lstm_regularisers", baselines=("torch",), validate=validate, cases=cases))


# CPU timing (python -m benchmarks without a GPU). Baselines: the LSTMCell loop with the same kinds of masks
# that a user writes today (torch's own cell kernel per step), and torch's plain nn.LSTM of the same size.
CPU_REGULARISERS = {
    "variational+weight_dropout": dict(dropout=0.3, input_dropout=0.3, output_dropout=0.3, variational=True,
                                       weight_dropout=0.5),
    "recurrent_dropout": dict(recurrent_dropout=0.25),
    "zoneout": dict(zoneout=0.1),
    "recurrent_dropout+zoneout+variational": dict(recurrent_dropout=0.25, zoneout=0.1, input_dropout=0.3,
                                                  output_dropout=0.3, variational=True),
}


def _masked_cell_loop(cells, kwargs):
    """A user's training forward with every mask of `kwargs`: per layer and step torch's LSTMCell (GRUCell)
    kernel."""
    gru = isinstance(cells[0], nn.GRUCell)
    p_in, p_out, p_mid = (kwargs.get(k, 0.0) for k in ("input_dropout", "output_dropout", "dropout"))
    p_w, p_rec, p_zo = (kwargs.get(k, 0.0) for k in ("weight_dropout", "recurrent_dropout", "zoneout"))
    locked = kwargs.get("variational", False)

    def drop(x, p):
        if not p:
            return x
        return x * _locked(x.shape[1], x.shape[2], p, x.device, x.dtype) if locked else nn.functional.dropout(x, p)

    def run(x):
        T, B, _ = x.shape
        x = drop(x, p_in)
        for layer, cell in enumerate(cells):
            if layer:
                x = drop(x, p_mid)
            w_hh = nn.functional.dropout(cell.weight_hh, p_w) if p_w else cell.weight_hh
            rmask = _locked(B, cell.hidden_size, p_rec, x.device, x.dtype) if p_rec else None
            h = c = x.new_zeros(B, cell.hidden_size)
            ys = []
            for t in range(T):
                if gru:
                    h_new = torch._VF.gru_cell(x[t], h * rmask if p_rec else h, cell.weight_ih, w_hh, cell.bias_ih,
                                               cell.bias_hh)
                    if p_zo:
                        keep_h = (torch.rand(B, cell.hidden_size) < p_zo).to(x.dtype)
                        h_new = keep_h * h + (1 - keep_h) * h_new
                    h = h_new
                    ys.append(h)
                    continue
                h_new, c_new = torch._VF.lstm_cell(x[t], (h * rmask if p_rec else h, c), cell.weight_ih, w_hh,
                                                   cell.bias_ih, cell.bias_hh)
                if p_zo:
                    keep_h = (torch.rand(B, cell.hidden_size) < p_zo).to(x.dtype)
                    keep_c = (torch.rand(B, cell.hidden_size) < p_zo).to(x.dtype)
                    h_new, c_new = keep_h * h + (1 - keep_h) * h_new, keep_c * c + (1 - keep_c) * c_new
                h, c = h_new, c_new
                ys.append(h)
            x = torch.stack(ys)
        return drop(x, p_out)
    return run


def cpu_cases(quick):
    """The LSTM with each set of regularisers (case names without a prefix), the GRU with those inside the
    recurrence ("GRU-"), each against its masked cell loop and the plain torch module."""
    sizes = [(50, 32, 256, 256)] + ([] if quick else [(35, 20, 650, 650)])
    gru = ("recurrent_dropout", "recurrent_dropout+zoneout+variational")
    runs = [("LSTM", name) for name in CPU_REGULARISERS] + [("GRU", name) for name in gru]
    out = []
    for mode, name in runs:
        kwargs = CPU_REGULARISERS[name]
        for T, B, I, H in sizes:
            def setup(device, kwargs=kwargs, T=T, B=B, I=I, H=H, mode=mode):
                ours = getattr(fusenn, mode)(I, H, 2, **kwargs).train()
                plain = getattr(nn, mode)(I, H, 2)
                plain.load_state_dict(ours.state_dict())
                cells = [getattr(nn, mode + "Cell")(I if layer == 0 else H, H) for layer in range(2)]
                loop = _masked_cell_loop(cells, kwargs)
                x = torch.randn(T, B, I, requires_grad=True)
                return {"fusenn": lambda: ours(x)[0].sum().backward(),
                        "torch-cell-loop": lambda: loop(x).sum().backward(),
                        "torch-plain": lambda: plain(x)[0].sum().backward()}

            flops = 3 * 2 * T * B * (4 if mode == "LSTM" else 3) * H * (I + H) * 2
            prefix = "" if mode == "LSTM" else "GRU-"
            out.append(Case(f"{prefix}{name}-L2-T{T}-B{B}-H{H}-train", setup, flops=flops))
    return out


REGISTRY["lstm_regularisers"].cpu_cases = cpu_cases

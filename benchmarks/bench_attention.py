"""Attention: fusenn's flash-attention kernel against each of torch's SDPA backends."""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fusenn
from benchmarks.registry import REGISTRY, Case, Check, Entry, register, timed_step
from fusenn.reference import attention as reference
from fusenn.testing import ATOL, max_error

SDPA_BACKENDS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-math": SDPBackend.MATH}
MATH_MAX_L = 4096  # beyond, the math backend's L x S scores take tens of GiB

# (B, H, L, S, E, Ev, dtype, causal, mask): small enough for the interpreter.
SMALL = [(2, 2, 33, 17, 40, 40, torch.float16, False, None), (1, 4, 19, 19, 64, 64, torch.bfloat16, True, None),
         (1, 2, 24, 29, 111, 80, torch.float32, False, "bool"), (2, 2, 13, 31, 16, 16, torch.bfloat16, False, "add")]


def _small_case(B, H, L, S, E, Ev, dtype, causal, mask, device):
    q, k, v = (torch.randn(B, H, n, d, device=device).to(dtype).requires_grad_() for n, d in ((L, E), (S, E), (S, Ev)))
    attn_mask = None
    if mask == "bool":
        attn_mask = torch.rand(B, 1, L, S, device=device) > 0.3
    elif mask == "add":
        attn_mask = torch.randn(1, H, 1, S, device=device).to(dtype)
    return q, k, v, attn_mask


def validate():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    checks = []
    for B, H, L, S, E, Ev, dtype, causal, mask in SMALL:
        name = f"B{B}-H{H}-L{L}-S{S}-E{E}-Ev{Ev}-{str(dtype)[6:]}" + ("-causal" if causal else "") + (
            f"-{mask}mask" if mask else "")
        q, k, v, attn_mask = _small_case(B, H, L, S, E, Ev, dtype, causal, mask, device)
        out = fusenn.functional.scaled_dot_product_attention(q, k, v, attn_mask, is_causal=causal)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
        ref_mask = attn_mask.double() if mask == "add" else attn_mask
        ref_out = reference.scaled_dot_product_attention(*ref_in, ref_mask, is_causal=causal)
        ref_grads = torch.autograd.grad(ref_out, ref_in, dout.double())
        base_in = [x.detach().requires_grad_() for x in (q, k, v)]
        with sdpa_kernel(SDPBackend.MATH):
            base_out = F.scaled_dot_product_attention(*base_in, attn_mask, is_causal=causal)
        base_grads = torch.autograd.grad(base_out, base_in, dout)
        for label, got, want, base, factor in [("out", out, ref_out, base_out, 2.0)] + [
                (g, *t, 3.0) for g, t in zip(("dq", "dk", "dv"), zip(grads, ref_grads, base_grads))]:
            checks.append(Check(f"{name}-{label}", max_error(got, want),
                                ATOL[dtype] + factor * max_error(base, want)))
    return checks


def _setup(B, H, L, D, causal, backward, mask):
    def setup(device):
        q, k, v = (torch.randn(B, H, L, D, device=device, dtype=torch.bfloat16, requires_grad=backward)
                   for _ in range(3))
        attn_mask = None
        if mask:  # a quarter of the keys of every sequence padded out, broadcast over heads and queries
            attn_mask = torch.ones(B, 1, 1, L, device=device, dtype=torch.bool)
            attn_mask[..., 3 * L // 4:] = False
        dout = torch.randn_like(q)

        def step(attend):
            if not backward:
                return lambda: attend(q, k, v, attn_mask=attn_mask, is_causal=causal)
            return lambda: torch.autograd.grad(attend(q, k, v, attn_mask=attn_mask, is_causal=causal), (q, k, v),
                                               dout)

        fns = {"fusenn": step(fusenn.functional.scaled_dot_product_attention)}
        for name, backend in SDPA_BACKENDS.items():
            if name == "sdpa-math" and L > MATH_MAX_L:
                continue

            def attend(*args, backend=backend, **kw):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(*args, **kw)

            fns[name] = step(attend)
        return fns

    return setup


def cases(quick):
    lengths = [1024, 4096] if quick else [512, 1024, 2048, 4096, 8192, 16384]
    out = []
    for D in (64, 128):
        H = 2048 // D  # model width 2048
        for L in lengths:
            B = max(1, 16384 // L)  # 16k tokens per batch
            for causal in (False, True):
                for backward in (False, True):
                    flops = 4 * B * H * L * L * D * (0.5 if causal else 1.0) * (3.5 if backward else 1.0)
                    name = f"B{B}-H{H}-L{L}-D{D}-bf16" + ("-causal" if causal else "") + ("-train" if backward else "")
                    out.append(Case(name, _setup(B, H, L, D, causal, backward, False), flops=flops))
    for backward in (False, True):  # key padding: a bool mask applied inside the kernel
        B, H, L, D = 4, 32, 4096, 64
        flops = 4 * B * H * L * L * D * (3.5 if backward else 1.0)
        out.append(Case(f"B{B}-H{H}-L{L}-D{D}-bf16-keypadmask" + ("-train" if backward else ""),
                        _setup(B, H, L, D, False, backward, True), flops=flops))
    return out


register(Entry(op="attention", baselines=tuple(SDPA_BACKENDS), validate=validate, cases=cases))


# CPU timing (python -m benchmarks without a GPU): fusenn under auto against torch's own SDPA and
# nn.MultiheadAttention, fp32.

def _cpu_sdpa(B, H, L, D, causal, train):
    def setup(device):
        q, k, v = (torch.randn(B, H, L, D, requires_grad=train) for _ in range(3))

        def step(attend):
            return timed_step(lambda: attend(q, k, v, is_causal=causal), train)
        return {"fusenn": step(fusenn.functional.scaled_dot_product_attention),
                "torch": step(F.scaled_dot_product_attention)}
    return setup


def _cpu_mha(B, L, E, H, train):
    def setup(device):
        ours = fusenn.MultiheadAttention(E, H, batch_first=True).train(train)
        theirs = torch.nn.MultiheadAttention(E, H, batch_first=True).train(train)
        theirs.load_state_dict(ours.state_dict())
        x = torch.randn(B, L, E, requires_grad=train)

        def step(module):
            return timed_step(lambda: module(x, x, x, need_weights=False)[0], train)
        return {"fusenn": step(ours), "torch": step(theirs)}
    return setup


def cpu_cases(quick):
    out = []
    for L in ([512] if quick else [256, 512, 1024]):
        B, H, D = 4, 8, 64
        for causal, train in ((True, True), (False, False)):
            flops = 4 * B * H * L * L * D * (0.5 if causal else 1.0) * (3.5 if train else 1.0)
            out.append(Case(f"sdpa-B{B}-H{H}-L{L}-D{D}" + ("-causal" if causal else "") + ("-train" if train else ""),
                            _cpu_sdpa(B, H, L, D, causal, train), flops=flops))
    for train in (True, False):
        B, L, E, H = 16, 128, 256, 8
        flops = (8 * B * L * E * E + 4 * B * L * L * E) * (3 if train else 1)
        out.append(Case(f"mha-B{B}-L{L}-E{E}-H{H}" + ("-train" if train else "-eval"), _cpu_mha(B, L, E, H, train),
                        flops=flops))
    return out


REGISTRY["attention"].cpu_cases = cpu_cases

"""Attention: fusenn's SDPA against torch's, the kernel's error judged against torch's own in the same dtype.

Reference: fusenn.reference.attention on float64 copies (checked against torch's SDPA below). Baseline:
torch's math SDPA on the low-precision inputs, given the same Philox dropout mask where there is one.
Outputs may err 2x and gradients 3x as much as the baseline (plus fusenn.testing's floor).
"""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fusenn
from fusenn.reference import attention as ref
from fusenn.testing import assert_close, poisoned_outputs

SDPA = fusenn.functional.scaled_dot_product_attention
DTYPES = [pytest.param(d, id=str(d)[6:]) for d in (torch.float32, torch.float16, torch.bfloat16)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def attention_backend(kernel_backend):
    if kernel_backend[0] != "triton":
        pytest.skip(f"attention has no {kernel_backend[0]} kernel; the Triton one serves GPUs")
    return kernel_backend


def torch_math(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, seed=None):
    """torch's math SDPA, with fusenn's dropout mask for `seed`."""
    keep = None
    if dropout_p > 0.0:
        batch, hq, _, _ = ref.attention_shapes(q, k, v, enable_gqa)
        keep = ref.dropout_keep(batch + (hq, q.size(-2), k.size(-2)), dropout_p, seed, q.device)
    return torch.ops.aten._scaled_dot_product_attention_math(
        q, k, v, attn_mask, dropout_p, is_causal, keep, scale=scale, enable_gqa=enable_gqa)[0]


def check_sdpa(q, k, v, attn_mask=None, grad=True, **kw):
    """fusenn's SDPA (in the backend set by the test) against the float64 reference, forward and backward."""
    inputs = [x.requires_grad_(grad) for x in (q, k, v)]
    with poisoned_outputs():
        out = SDPA(*inputs, attn_mask, **kw)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, inputs, dout) if grad and out.numel() else None
    q64, k64, v64 = [x.detach().double().requires_grad_(grad) for x in inputs]
    mask64 = attn_mask.double() if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
    expected = ref.scaled_dot_product_attention(q64, k64, v64, mask64, **kw)
    base_inputs = [x.detach().requires_grad_(grad) for x in inputs]
    baseline = torch_math(*base_inputs, attn_mask, **kw)
    assert out.dtype == q.dtype
    assert_close(out, expected, baseline, factor=2.0, name="output")
    if grads is not None:
        assert_close(grads, torch.autograd.grad(expected, (q64, k64, v64), dout.double()),
                     torch.autograd.grad(baseline, base_inputs, dout), factor=3.0, name="dq, dk, dv")
    return out


def qkv(B, H, L, S, E, Ev=None, dtype=torch.float32, device="cpu", Hkv=None):
    def make(*shape):
        return torch.randn(shape, device=device).to(dtype)

    return make(B, H, L, E), make(B, Hkv or H, S, E), make(B, Hkv or H, S, Ev or E)


# (B, H, L, S, E, Ev, causal): odd lengths, L != S both ways, head dims that are not powers of two.
SHAPES = [(2, 2, 7, 13, 16, 16, False), (1, 2, 33, 17, 40, 40, False), (1, 2, 33, 17, 40, 24, True),
          (1, 1, 1, 5, 64, 64, False), (1, 2, 17, 33, 64, 64, True), (1, 1, 19, 11, 111, 111, False)]


def shape_id(s):
    B, H, L, S, E, Ev, causal = s
    return f"B{B}-H{H}-L{L}-S{S}-E{E}-Ev{Ev}" + ("-causal" if causal else "")


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sdpa_matches_torch(attention_backend, shape, dtype):
    B, H, L, S, E, Ev, causal = shape
    check_sdpa(*qkv(B, H, L, S, E, Ev, dtype, attention_backend[1]), is_causal=causal)


MASKS = {
    "bool-LS": lambda B, H, L, S: torch.rand(L, S) > 0.3,
    "bool-B1LS-full-row-masked": lambda B, H, L, S: (torch.rand(B, 1, L, S) > 0.5).index_fill_(2, torch.tensor([3]),
                                                                                               False),
    "additive-BHLS": lambda B, H, L, S: torch.randn(B, H, L, S).masked_fill_(torch.rand(B, H, L, S) < 0.2,
                                                                              float("-inf")),
    "additive-1H1S-key-padding": lambda B, H, L, S: torch.zeros(1, H, 1, S).masked_fill_(torch.rand(1, H, 1, S) < 0.3,
                                                                                         float("-inf")),
}


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_sdpa_masks(attention_backend, mask, dtype):
    B, H, L, S = 2, 2, 18, 21
    attn_mask = MASKS[mask](B, H, L, S).to(attention_backend[1])
    if attn_mask.is_floating_point():
        attn_mask = attn_mask.to(dtype)
    check_sdpa(*qkv(B, H, L, S, 32, 32, dtype, attention_backend[1]), attn_mask)


@pytest.mark.parametrize("hkv", [2, 1], ids=["GQA-Hq4-Hkv2", "MQA-Hq4-Hkv1"])
@pytest.mark.parametrize("dtype", [DTYPES[0], DTYPES[2]])
def test_sdpa_gqa(attention_backend, hkv, dtype):
    check_sdpa(*qkv(1, 4, 13, 20, 16, 16, dtype, attention_backend[1], Hkv=hkv), is_causal=True, enable_gqa=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sdpa_dropout_matches_reference_for_a_seed(attention_backend, dtype):
    q, k, v = qkv(1, 2, 21, 19, 40, 40, dtype, attention_backend[1])
    check_sdpa(q, k, v, dropout_p=0.3, seed=1234, is_causal=True)


@pytest.mark.parametrize("E", [100, 111])
def test_sdpa_fp32_wide_head_dims_causal_dropout_gqa(attention_backend, E):
    """fp32 past head dim 64: dK and dV from S and dP summed over slices of the head dim (kernels/attention.py,
    _dot_nt_sliced), with the causal mask, dropout and GQA at once."""
    q, k, v = qkv(1, 2, 19, 23, E, E, torch.float32, attention_backend[1], Hkv=1)
    check_sdpa(q, k, v, dropout_p=0.25, seed=99, is_causal=True, enable_gqa=True)


def test_sdpa_dropout_repeats_bitwise_and_drops_the_right_fraction(attention_backend):
    device = attention_backend[1]
    L, S, p = 64, 32, 0.3
    q, k, _ = qkv(1, 1, L, S, 16, device=device)
    v = torch.eye(S, device=device)[None, None]  # the output is the dropped-out weights themselves
    a = SDPA(q, k, v, dropout_p=p, seed=7)
    assert torch.equal(a, SDPA(q, k, v, dropout_p=p, seed=7))
    assert not torch.equal(a, SDPA(q, k, v, dropout_p=p, seed=8))
    dropped = (a == 0).double().mean().item()
    assert abs(dropped - p) < 0.04, dropped
    torch.manual_seed(3)
    b = SDPA(q, k, v, dropout_p=p)
    torch.manual_seed(3)
    assert torch.equal(b, SDPA(q, k, v, dropout_p=p))


def test_sdpa_empty_and_broadcast_shapes(attention_backend):
    device = attention_backend[1]
    check_sdpa(*qkv(0, 2, 5, 7, 16, device=device))  # empty batch
    check_sdpa(*qkv(1, 1, 4, 0, 16, device=device))  # no keys: zeros, as torch
    # unbatched 2-D query against 3-D keys, and batch dims broadcast (2, 1) x (1, 2)
    check_sdpa(torch.randn(6, 16, device=device), torch.randn(2, 9, 16, device=device),
               torch.randn(2, 9, 8, device=device))
    check_sdpa(torch.randn(2, 1, 6, 16, device=device), torch.randn(1, 2, 9, 16, device=device),
               torch.randn(1, 2, 9, 16, device=device), scale=0.3)


def test_sdpa_op_registration_and_torch_compile(attention_backend):
    q, k, v = [x.requires_grad_() for x in qkv(1, 1, 5, 7, 16, device=attention_backend[1])]
    torch.library.opcheck(torch.ops.fusenn.attention_forward.default, (q, k, v, None, 0.0, True, 0.25, None))
    compiled = torch.compile(lambda q, k, v: SDPA(q, k, v, is_causal=True))
    torch.testing.assert_close(compiled(q, k, v), SDPA(q, k, v, is_causal=True))


def test_sdpa_torch_func_grad_and_vmap_and_no_double_backward(attention_backend):
    """torch.func transforms the kernel path (as the reference path): grad gives autograd's gradients, vmap the
    per-sample loop; a second derivative raises rather than answer wrongly."""
    q, k, v = qkv(2, 2, 5, 7, 8, device=attention_backend[1])

    def loss(q, k, v):
        return SDPA(q, k, v, is_causal=True).pow(2).sum()

    got = torch.func.grad(loss, argnums=(0, 1, 2))(q, k, v)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    for a, b in zip(got, torch.autograd.grad(loss(*leaves), leaves)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    batched = torch.func.vmap(lambda q: SDPA(q, k[0], v[0]))(q)
    torch.testing.assert_close(batched, torch.stack([SDPA(x, k[0], v[0]) for x in q]), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="not differentiable .*double backward"):
        torch.func.grad(lambda q: torch.func.grad(loss)(q, k, v).sum())(q)


def test_reference_matches_torch():
    """The reference itself (float64): against torch's SDPA, every feature."""
    q, k, v = qkv(2, 4, 9, 11, 8, 6, torch.float64, Hkv=2)
    cases = [dict(), dict(is_causal=True, enable_gqa=True), dict(enable_gqa=True, scale=0.7),
             dict(attn_mask=torch.rand(9, 11) > 0.5, enable_gqa=True),
             dict(attn_mask=torch.randn(2, 1, 9, 11, dtype=torch.float64), enable_gqa=True)]
    for kw in cases:
        if "enable_gqa" not in kw:
            kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        else:
            kk, vv = k, v
        torch.testing.assert_close(ref.scaled_dot_product_attention(q, kk, vv, **kw),
                                   F.scaled_dot_product_attention(q, kk, vv, **kw))
    torch.testing.assert_close(ref.scaled_dot_product_attention(q, k, v, dropout_p=0.4, seed=5, enable_gqa=True),
                               torch_math(q, k, v, dropout_p=0.4, seed=5, enable_gqa=True))


def test_reference_rows_with_every_key_masked_give_zeros_and_zero_gradients():
    """As torch's math path: a row whose keys are all masked (a bool mask, or -inf in a float one) gives zeros, and
    no NaN reaches the gradients of q, k, v or of a float mask."""
    q, k, v = qkv(1, 2, 5, 7, 8, dtype=torch.float64)
    bool_mask = torch.rand(5, 7) > 0.3
    bool_mask[2] = False
    float_mask = torch.randn(1, 2, 5, 7, dtype=torch.float64)
    float_mask[:, :, 1] = float("-inf")
    for mask in (bool_mask, float_mask.requires_grad_()):
        inputs = [x.detach().requires_grad_() for x in (q, k, v)] + ([mask] if mask.requires_grad else [])
        got = ref.scaled_dot_product_attention(*inputs[:3], mask)
        theirs = [x.detach().requires_grad_() for x in inputs]
        with sdpa_kernel(SDPBackend.MATH):
            want = F.scaled_dot_product_attention(*theirs[:3], theirs[3] if mask.requires_grad else mask)
        torch.testing.assert_close(got, want)
        dout = torch.randn_like(got)
        grads = torch.autograd.grad(got, inputs, dout)
        torch.testing.assert_close(grads, torch.autograd.grad(want, theirs, dout))
        assert not any(g.isnan().any() for g in grads)


@pytest.mark.parametrize("shapes", [((1, 4, 5, 8), (1, 2, 6, 8), (1, 2, 6, 8)), ((3, 5, 8), (2, 6, 8), (2, 6, 8)),
                                    ((2, 4, 5, 8), (4, 6, 8), (3, 6, 8)), ((2, 3, 5, 8), (2, 3, 6, 8), (2, 2, 6, 8)),
                                    ((2, 3, 4, 5, 8), (2, 3, 2, 6, 8), (2, 3, 2, 6, 8))],
                         ids=["heads-without-gqa", "batch", "value-batch", "value-heads", "5d"])
def test_batch_dims_that_do_not_broadcast_are_refused_in_torchs_words(shapes):
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(RuntimeError) as want, sdpa_kernel(SDPBackend.MATH):
        F.scaled_dot_product_attention(q, k, v)
    with fusenn.set_backend("reference"), pytest.raises(RuntimeError) as got:
        SDPA(q, k, v)
    assert str(got.value) == str(want.value)


def test_auto_backend_and_reasons():
    q, k, v = qkv(1, 1, 3, 4, 300)
    with fusenn.set_backend("triton"), pytest.raises(fusenn.BackendError, match="head dims up to 256"):
        SDPA(q, k, v)
    check_sdpa(q, k, v)  # auto: the reference takes it
    with pytest.raises(RuntimeError, match="attn_mask should not be set when is_causal"):  # torch's type
        SDPA(q, k, v, torch.ones(3, 4, dtype=torch.bool), is_causal=True)
    with pytest.raises(RuntimeError, match="must divide the number of heads in query"):
        SDPA(*qkv(1, 3, 3, 4, 8, Hkv=2), enable_gqa=True)


# MultiheadAttention: fusenn's against torch's with the same state_dict.
MHA_CASES = {
    "batch_first-self": dict(kwargs=dict(batch_first=True), self_attn=True),
    "seq_first-kdim-vdim-kpm": dict(kwargs=dict(kdim=12, vdim=20), kpm=True),
    "bias_kv-zero_attn-kpm-mask": dict(kwargs=dict(add_bias_kv=True, add_zero_attn=True, batch_first=True), kpm=True,
                                       mask="bool"),
    "no-bias-float-mask-3d": dict(kwargs=dict(bias=False), mask="float3d"),
    "causal-hint": dict(kwargs=dict(batch_first=True), mask="causal", self_attn=True),
    "unbatched-kpm": dict(kwargs=dict(), kpm=True, unbatched=True),
}


def mha_inputs(case, N, L, S, E):
    kw = case["kwargs"]
    bf = kw.get("batch_first", False)

    def seq(T, dim):
        if case.get("unbatched"):
            return torch.randn(T, dim)
        return torch.randn(N, T, dim) if bf else torch.randn(T, N, dim)

    query = seq(L, E)
    key = query if case.get("self_attn") else seq(S, kw.get("kdim", E))
    value = query if case.get("self_attn") else seq(S, kw.get("vdim", E))
    S = query.shape[-2 if bf else 0] if case.get("self_attn") else S
    extra = {}
    if case.get("kpm"):
        kpm = torch.rand(N, S) < 0.3
        kpm[:, 0] = False
        extra["key_padding_mask"] = kpm[0] if case.get("unbatched") else kpm
    if case.get("mask") == "bool":
        extra["attn_mask"] = torch.rand(L, S) < 0.2
    elif case.get("mask") == "float3d":
        extra["attn_mask"] = torch.randn(N * 2, L, S)
    elif case.get("mask") == "causal":
        extra["attn_mask"] = torch.ones(L, L, dtype=torch.bool).triu(1)
        extra["is_causal"] = True
    return query, key, value, extra


@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "need_weights"])
@pytest.mark.parametrize("case", list(MHA_CASES))
@pytest.mark.parametrize("backend", ["reference", "triton", "torch"])
def test_multihead_attention_matches_torch(case, need_weights, backend, device):
    if not fusenn.backends()[backend].usable:
        pytest.skip(fusenn.backends()[backend].detail)
    torch.manual_seed(0)
    N, L, S, E = 3, 6, 9, 16
    theirs = torch.nn.MultiheadAttention(E, 2, **MHA_CASES[case]["kwargs"], device=device)
    ours = fusenn.MultiheadAttention(E, 2, **MHA_CASES[case]["kwargs"], device=device)
    ours.load_state_dict(theirs.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    query, key, value, extra = (x.to(device) if isinstance(x, torch.Tensor) else
                                {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in x.items()}
                                for x in mha_inputs(MHA_CASES[case], N, L, S, E))
    with fusenn.set_backend(backend):
        out, weights = ours(query, key, value, need_weights=need_weights, **extra)
        out.sum().backward()
    expected, expected_weights = theirs(query, key, value, need_weights=need_weights, **extra)
    expected.sum().backward()
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)
    assert (weights is None) == (expected_weights is None)
    if weights is not None:
        torch.testing.assert_close(weights, expected_weights)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=2e-5, rtol=1e-4, msg=name)


def test_multihead_attention_state_dict_both_ways_and_dropout():
    ours = fusenn.MultiheadAttention(8, 2, dropout=0.5, kdim=4, vdim=6)
    theirs = torch.nn.MultiheadAttention(8, 2, dropout=0.5, kdim=4, vdim=6)
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x, k, v = torch.randn(5, 2, 8), torch.randn(7, 2, 4), torch.randn(7, 2, 6)
    torch.manual_seed(1)
    a, _ = ours(x, k, v, need_weights=False)
    torch.manual_seed(1)
    assert torch.equal(a, ours(x, k, v, need_weights=False)[0])
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(ours(x, k, v, need_weights=False)[0], theirs(x, k, v, need_weights=False)[0])


def test_multihead_attention_inference_fast_path_and_nested_input_are_torchs():
    """On CPU tensors auto takes torch's whole forward, its inference fast path included: a row whose keys are all
    padded comes out NaN there as in torch (zeros on its training path), and nested-tensor input works."""
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval()
    ours = fusenn.MultiheadAttention(8, 2, batch_first=True).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 5, 8)
    kpm = torch.rand(3, 5) < 0.3
    kpm[:, 0] = False
    kpm[1] = True
    nested = torch.nested.nested_tensor([torch.randn(4, 8), torch.randn(2, 8)])
    with torch.no_grad():
        want = theirs(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
        assert want[1].isnan().all()
        torch.testing.assert_close(ours(x, x, x, key_padding_mask=kpm, need_weights=False)[0], want, equal_nan=True)
        want = theirs(nested, nested, nested, need_weights=False)[0].to_padded_tensor(0.0)
        for backend in ("auto", "reference"):  # nested input takes torch's forward on every backend
            with fusenn.set_backend(backend):
                got = ours(nested, nested, nested, need_weights=False)[0]
            torch.testing.assert_close(got.to_padded_tensor(0.0), want)


@pytest.mark.parametrize("mask", ["key_padding_mask", "attn_mask"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.float64])
def test_multihead_attention_mask_dtype_errors_in_torchs_words(mask, dtype):
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(8, 2)
    ours = fusenn.MultiheadAttention(8, 2)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(5, 3, 8)
    bad = {mask: torch.zeros((3, 5) if mask == "key_padding_mask" else (5, 5), dtype=dtype)}
    with pytest.raises((AssertionError, RuntimeError)) as want:
        theirs(x, x, x, need_weights=False, **bad)
    with fusenn.set_backend("reference"), pytest.raises(want.type) as got:
        ours(x, x, x, need_weights=False, **bad)
    assert str(got.value) == str(want.value)


def test_sdpa_dropout_fraction_within_a_hundredth(attention_backend):
    """The issue's bound: the dropped fraction within 0.01 of p, over 65536 weights (0.01 is ~5 sigma)."""
    device = attention_backend[1]
    L = S = 256
    q, k, _ = qkv(1, 1, L, S, 16, device=device)
    v = torch.eye(S, device=device)[None, None]
    p = 0.3
    dropped = (SDPA(q, k, v, dropout_p=p, seed=11) == 0).double().mean().item()
    assert abs(dropped - p) < 0.01, dropped


GPU_SHAPES = [(2, 4, 113, 203, 64, 64, False), (1, 2, 1023, 1024, 128, 128, True), (1, 2, 257, 255, 80, 80, False),
              (1, 2, 129, 130, 96, 96, True), (1, 1, 200, 300, 256, 256, False), (1, 2, 64, 64, 111, 111, True)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sdpa_realistic_shapes_on_gpu(shape, dtype):
    B, H, L, S, E, Ev, causal = shape
    with fusenn.set_backend("triton"):
        check_sdpa(*qkv(B, H, L, S, E, Ev, dtype, "cuda"), is_causal=causal)


def test_int64_offsets_when_a_view_reaches_2_31_elements():
    """The host's decision (kernels.attention.needs_int64), on meta tensors: no memory behind them."""
    from fusenn.kernels import attention as kernels

    def mha_view(L, N, E, heads):  # MultiheadAttention's per-head q view of a packed (L, N, 3E) projection
        packed = torch.empty(L, N, 3 * E, device="meta")
        return packed[..., :E].view(L, N, heads, E // heads).permute(1, 2, 0, 3)

    assert kernels.needs_int64(mha_view(8192, 64, 2048, 16))  # row stride 3 * 2048 * 64, 8192 rows
    assert not kernels.needs_int64(mha_view(1024, 8, 512, 8))
    big_batch = torch.empty(65536, 16, 2048, 64, device="meta")  # 2**37 elements, but small slices
    assert not kernels.needs_int64(big_batch, None)
    long_rows = torch.empty(1, 1, 2**25 + 1, 64, device="meta")  # one slice past 2**31 elements
    assert kernels.needs_int64(long_rows)
    assert not kernels.needs_int64(long_rows[:, :, :2**25])  # its last offset, 2**31 - 1, fits in int32


@pytest.mark.parametrize("dtype", [DTYPES[0], DTYPES[2]])
def test_sdpa_int64_offsets_path(attention_backend, monkeypatch, dtype):
    """The kernels' WIDE (int64 offsets) mode, forced on small inputs: the same results."""
    from fusenn.kernels import attention as kernels

    monkeypatch.setattr(kernels, "INT32_LIMIT", 1)
    q, k, v = qkv(2, 2, 19, 21, 24, 24, dtype, attention_backend[1])
    assert kernels.needs_int64(q)
    check_sdpa(q, k, v, is_causal=True, dropout_p=0.2, seed=3)
    check_sdpa(q, k, v, torch.rand(19, 21, device=attention_backend[1]) > 0.3)


@pytest.mark.gpu
def test_sdpa_many_heads_times_batch_on_gpu():
    """N * heads = 65536 programs along what used to be grid axis 1 (CUDA caps it at 65535)."""
    q, k, v = (x.requires_grad_() for x in qkv(4096, 16, 17, 17, 64, 64, torch.bfloat16, "cuda"))
    with fusenn.set_backend("triton"):
        out = SDPA(q, k, v, is_causal=True)
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)
    for got, exp in zip(grads, torch.autograd.grad(want.float().square().sum(), (q, k, v))):
        torch.testing.assert_close(got, exp, atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
def test_sdpa_view_into_a_buffer_past_2_31_elements_on_gpu():
    """A per-head view of a packed QKV buffer whose row offsets pass 2**31 elements (8.6 GB in bf16)."""
    from fusenn.kernels import attention as kernels

    L, N, E, heads = 8192, 64, 2048, 16
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GB of GPU memory")
    packed = torch.randn(L, N, 3 * E, device="cuda", dtype=torch.bfloat16)
    q, k, v = (packed[..., i * E:(i + 1) * E].view(L, N, heads, E // heads).permute(1, 2, 0, 3) for i in range(3))
    assert kernels.needs_int64(q)
    with fusenn.set_backend("triton"):
        out = SDPA(q, k, v, is_causal=True)
    for n, h in ((N - 1, heads - 1), (0, 0), (N // 2, 3)):  # the far end of the buffer included
        want = F.scaled_dot_product_attention(q[n:n + 1, h:h + 1], k[n:n + 1, h:h + 1], v[n:n + 1, h:h + 1],
                                              is_causal=True)
        torch.testing.assert_close(out[n:n + 1, h:h + 1], want, atol=2e-2, rtol=2e-2)


GRID_LENGTHS = [1, 63, 65, 127, 129, 1000]


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 80, 128, 256])
@pytest.mark.parametrize("S", GRID_LENGTHS)
@pytest.mark.parametrize("L", GRID_LENGTHS)
def test_sdpa_shape_grid_on_gpu(L, S, D):
    """Every tile edge at every head dim the GPU configs bucket: causal (also with L != S), GQA, dropout."""
    torch.manual_seed(L * 10007 + S * 101 + D)
    with fusenn.set_backend("triton"):
        q, k, v = qkv(2, 4, L, S, D, D, torch.bfloat16, "cuda", Hkv=2)
        check_sdpa(q, k, v, is_causal=(L + S) % 2 == 0, enable_gqa=True)
        q, k, v = qkv(1, 2, L, S, D, D, torch.bfloat16, "cuda")
        check_sdpa(q, k, v, dropout_p=0.2, seed=L + S, is_causal=L >= S)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128, 256])
def test_sdpa_every_dtype_and_head_dim_bucket_on_gpu(dtype, D):
    """The tile tables' every (dtype, head dim) entry, with dropout (its own tiles at d64) and without."""
    with fusenn.set_backend("triton"):
        for p in (0.0, 0.1):
            check_sdpa(*qkv(2, 3, 129, 257, D, D, dtype, "cuda"), dropout_p=p, seed=5, is_causal=True)

"""Philox4x32-10 and dropout masks: known answers, and the three backends agreeing bit for bit."""

import math
import os
import shutil
import subprocess

import pytest
import torch

import fusenn
from fusenn.reference import philox as ref
from fusenn.testing import assert_close, poisoned_outputs

KERNEL_BACKENDS = ("triton", "cuda")
CSRC = os.path.join(os.path.dirname(__file__), "..", "csrc")

# Known-answer vectors of Random123 (kat_vectors): counter, key -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

# (seed, offset, numel, p): odd sizes, seeds and offsets past 32 bits, counters crossing 2**32.
CASES = [
    (0, 0, 1, 0.5),
    (1, 0, 7, 0.5),
    (1234, 5, 1000, 0.1),
    (2**40 + 17, 2**32 - 100, 1025, 0.3),
    (2**62 - 1, 3, 333, 0.9),
    (98765, 0, 4096, 1.0),
    (98765, 0, 129, 0.0),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_reference_known_answers(counter, key, expected):
    words = [torch.tensor([c], dtype=torch.int64) for c in counter]
    got = tuple(int(w) for w in ref.philox4x32_10(*words, *key))
    assert got == expected


def test_mask_element_i_uses_counter_i():
    seed, p = 42, 0.5
    words = ref.philox_uint32(64, seed, offset=1000)
    k0, k1 = ref.split_seed(seed)
    for i in (0, 1, 63):
        c = [torch.tensor([1000 + i]), torch.tensor([0]), torch.tensor([0]), torch.tensor([0])]
        assert int(words[i]) == int(ref.philox4x32_10(*c, k0, k1)[0])
    mask = ref.dropout_mask(64, p, seed, offset=1000)
    assert torch.equal(mask, (words >> 8) >= ref.dropout_threshold(p))


@pytest.mark.parametrize("seed,offset,numel,p", CASES, ids=lambda v: str(v))
def test_kernel_masks_match_reference(kernel_backend, seed, offset, numel, p):
    _, device = kernel_backend
    with poisoned_outputs():
        got = fusenn.functional.dropout_mask((numel,), p, seed, offset, device=device)
    assert_close(got.cpu(), ref.dropout_mask(numel, p, seed, offset), name="mask")


def test_any_slice_regenerates_alone(kernel_backend):
    _, device = kernel_backend
    whole = fusenn.functional.dropout_mask((3, 50), 0.5, seed=7, device=device).flatten()
    part = fusenn.functional.dropout_mask((17,), 0.5, seed=7, offset=61, device=device)
    assert torch.equal(whole[61:78], part)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_mask_fraction_within_statistical_tolerance(kernel_backend, p):
    _, device = kernel_backend
    n = 1 << 15
    kept = fusenn.functional.dropout_mask((n,), p, seed=2024, device=device).float().mean().item()
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)


def test_masks_differ_across_seeds_and_offsets():
    a = ref.dropout_mask(512, 0.5, seed=1)
    assert not torch.equal(a, ref.dropout_mask(512, 0.5, seed=2))
    assert not torch.equal(a, ref.dropout_mask(512, 0.5, seed=1, offset=512))


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build csrc/philox.cuh for the host")
def test_cuda_header_matches_reference_on_host(tmp_path):
    """csrc/philox.cuh is host/device code: compiled for the host, it must draw the reference's masks."""
    src = tmp_path / "philox_host.cpp"
    src.write_text(
        '#include <cstdio>\n#include <cstdlib>\n#include "philox.cuh"\n'
        "int main(int argc, char** argv) {\n"
        "  unsigned long long seed = strtoull(argv[1], 0, 10), offset = strtoull(argv[2], 0, 10);\n"
        "  long long n = atoll(argv[3]); unsigned threshold = strtoul(argv[4], 0, 10);\n"
        "  for (long long i = 0; i < n; ++i) putchar(fusenn::philox_keep(offset + i, seed, threshold) ? '1' : '0');\n"
        "  fusenn::Philox4 k = fusenn::philox4x32_10({0x243F6A88u, 0x85A308D3u, 0x13198A2Eu, 0x03707344u},"
        " 0xA4093822u, 0x299F31D0u);\n"
        '  printf(" %08x %08x %08x %08x", k.x, k.y, k.z, k.w);\n}\n')
    exe = tmp_path / "philox_host"
    subprocess.run(["g++", "-std=c++17", "-O1", f"-I{CSRC}", str(src), "-o", str(exe)], check=True)
    for seed, offset, numel, p in CASES:
        out = subprocess.run([str(exe), str(seed), str(offset), str(numel), str(ref.dropout_threshold(p))],
                             check=True, capture_output=True, text=True).stdout.split()
        got = torch.tensor([c == "1" for c in out[0]])
        assert torch.equal(got, ref.dropout_mask(numel, p, seed, offset)), (seed, offset, numel, p)
        assert [int(w, 16) for w in out[1:]] == list(KAT[2][2])


def test_triton_philox_matches_tl_randint():
    """An independent implementation: Triton's own Philox (tl.randint) with the same key and counter."""
    if not fusenn.backends()["triton"].usable:
        pytest.skip(fusenn.backends()["triton"].detail)
    import triton
    import triton.language as tl

    @triton.jit
    def draw(out_ptr, seed, N: tl.constexpr):
        idx = tl.arange(0, N)
        tl.store(out_ptr + idx, tl.randint(seed, idx.to(tl.uint32)).to(tl.int64, bitcast=False))

    device = "cuda" if torch.cuda.is_available() else "cpu"
    seed = 0x1234_5678_9ABC
    out = torch.empty(64, dtype=torch.int64, device=device)
    draw[(1,)](out, seed, N=64)
    assert torch.equal(out.cpu() & ref.MASK32, ref.philox_uint32(64, seed))


def test_threshold_and_seed_validation():
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
        ref.dropout_threshold(1.5)
    with pytest.raises(ValueError, match="seed"):
        fusenn.functional.dropout_mask((4,), 0.5, seed=-1)
    with pytest.raises(ValueError, match="offset"):
        fusenn.functional.dropout_mask((4,), 0.5, seed=1, offset=-3)


def test_dropout_mask_op_registration():
    """The torch.library op and its fake implementation agree (shape, dtype, device) for torch.compile."""
    torch.library.opcheck(torch.ops.fusenn.dropout_mask.default, (37, 0.25, torch.tensor(11), 3, torch.device("cpu")))

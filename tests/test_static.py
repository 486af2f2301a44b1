"""The static sm_90a report (benchmarks/static.py) on its CI subset: no kernel in a default config spills,
replicates a bf16/fp16 dot across warps, or runs bf16/fp16 attention without wgmma.

The compiles run in a fresh process (kernels decorated here are interpreted) and are cached by Triton, so
only the first run on a machine pays for them. The report's own reading of the compiler output (dot
layouts, occupancy) is checked here on hand-written inputs.
"""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import static

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Triton's CUDA compiler ships for Linux")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("static")
    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run([sys.executable, "-m", "benchmarks.static", "--scope", "ci", "--out", str(out), "--json",
                          str(out / "all.json")], env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert (out / "all.json").exists(), run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads((out / "all.json").read_text())


def test_every_family_compiles_for_sm90a(records):
    families = {r["family"] for r in records}
    assert {"attention", "rnn", "conv_pool", "philox", "cuda"} <= families
    assert not [r for r in records if "error" in r]


def test_no_default_config_spills_replicates_or_misses_wgmma(records):
    bad = static.violations(records)
    assert not bad, "\n".join(bad)


def test_known_issues_are_still_real(records):
    """Every static.KNOWN exemption still matches a record that violates a rule: fixed ones get removed."""
    from fusenn.kernels import NEWER_PTXAS

    flagged = set(static.violations(records, include_known=True)) - set(static.violations(records))
    for match, why in static.KNOWN:
        if match.get("NEWER_PTXAS", NEWER_PTXAS) != NEWER_PTXAS:  # another Triton's exemption
            continue
        hits = [r for r in records if "error" not in r and static.known(r) == why]
        assert hits, f"no record matches KNOWN {match}"
        assert any(line.startswith(f"{r['family']} {r['kernel']} {r['case']} ") for r in hits for line in flagged), \
            f"KNOWN {match} no longer violates anything: remove it"


def test_half_precision_attention_is_wgmma_at_every_head_dim(records):
    half = [r for r in records if r["family"] == "attention" and r["dtype"] in ("bf16", "fp16")]
    assert {r["config"]["D"] for r in half} == {64, 128, 256}
    assert all(r["mma"] == "wgmma" for r in half)


def test_dot_layouts_are_read_from_ttgir():
    ttgir = """
#blocked = #ttg.blocked<{sizePerThread = [1, 4], threadsPerWarp = [8, 4], warpsPerCTA = [4, 1], order = [1, 0]}>
#mma = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [1, 8], instrShape = [16, 8]}>
#mma1 = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [8, 1], instrShape = [16, 32, 16]}>
    %1 = tt.dot %a, %b, %c : tensor<16x32xbf16, #x> * tensor<32x32xbf16, #y> -> tensor<16x32xf32, #mma>
    %2 = ttng.warp_group_dot %a, %b, %c {isAsync = true} : !m * !m -> tensor<64x64xf32, #mma1>
    %3 = ttng.warp_group_dot %a, %b, %c {isAsync = true} : !m * !m -> tensor<128x32xf32, #mma1>
    %4 = tt.dot %a, %b, %c : tensor<16x16xf32, #x> * tensor<16x16xf32, #y> -> tensor<16x16xf32, #blocked>
"""
    dots = static.dot_layouts(ttgir)
    assert [d["replication"] for d in dots] == [2, 2, 1, 2]  # 8 warps x 8 columns over 32; 8 x 16 rows over 64
    assert dots[0]["shape"] == [16, 32] and dots[1]["op"] == "ttng.warp_group_dot"


def test_occupancy_limits():
    assert static.occupancy(128, 0, 4) == (4, 0.25)  # registers: 65536 / (128 * 32 * 4)
    assert static.occupancy(32, 0, 4) == (16, 1.0)  # warp slots: 64 / 4
    assert static.occupancy(64, 100 * 1024, 4)[0] == 2  # shared memory: 228 KB / (100 KB + 1 KB)
    assert static.occupancy(255, 0, 8)[0] == 1

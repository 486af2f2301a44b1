#!/usr/bin/env bash
# One call on a lent GPU machine: build fusenn._C, run the whole test suite (GPU tests included),
# validate and time every op. Logs and results/<gpu>/*.json land in $OUT (or .out/ when unset);
# copy the JSON into benchmarks/results/ and commit it.
#   usage: bash benchmarks/device_run.sh [--quick] [--only OP]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-build-isolation --no-deps -v -e . 2>&1 | grep -E "^fusenn:|error" | tee "$OUT/build.log"
python3 -m fusenn.info | tee -a "$OUT/build.log"
# A hung kernel must not eat the whole call: pytest-timeout (in the GPU image) ends the run with stacks.
TIMEOUT=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout=300 --timeout-method=thread")
python3 -m pytest -q -p no:cacheprovider $TIMEOUT tests 2>&1 | tee "$OUT/tests.log" | tail -n 30
# The persistent RNN kernels under compute-sanitizer on small shapes (its barrier may wait longer there).
if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck synccheck; do
    echo "== compute-sanitizer --tool $tool" | tee -a "$OUT/sanitizer.log"
    FUSENN_PERSIST_TIMEOUT_S=600 compute-sanitizer --tool "$tool" --error-exitcode 1 \
      python3 -m pytest -q -p no:cacheprovider tests/test_persist.py -k gpu_small 2>&1 | tail -n 8 \
      | tee -a "$OUT/sanitizer.log"
  done
fi
python3 -m benchmarks --out "$OUT/results" "$@" 2>&1 | tee "$OUT/bench.log" | tail -n 80

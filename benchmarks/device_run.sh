#!/usr/bin/env bash
# One call on a lent GPU machine: build fusenn._C; first the persistent RNN's GPU tests and compute-sanitizer on
# its small cases (kernels no GPU has run before), then the rest of the test suite, then validate and time every
# op. Every step is bounded in time, and the whole call ends within FUSENN_DEVICE_BUDGET_S seconds (570: inside
# the device tool's 10-minute limit a command); a step the budget cuts says so in its log. Logs and
# results/<gpu>/*.json land in $OUT (or .out/ when unset); copy the JSON into benchmarks/results/ and commit it.
# Where the caller set OUT (the device tool, which returns at most 8 files from it), they end packed in one
# archive, $OUT/device_run.tar.gz: `tar -xzf` it, then copy the JSON.
#   usage: bash benchmarks/device_run.sh [--quick] [--only OP]
set -uo pipefail
cd "$(dirname "$0")/.."
PACK=${OUT:+1}
OUT=${OUT:-.out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
END=$((SECONDS + ${FUSENN_DEVICE_BUDGET_S:-570}))

# bounded CAP CMD...: CMD for at most CAP seconds, and at most what is left of the budget.
bounded() {
  local cap=$1 left=$((END - SECONDS))
  shift
  if ((left < 10)); then
    echo "== skipped, the time budget is spent: $*"
    return 124
  fi
  ((left < cap)) && cap=$left
  timeout --kill-after=10 "$cap" "$@"
  local rc=$?
  ((rc == 124 || rc == 137)) && echo "== stopped after $cap s: $*"
  return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
bounded 420 python3 -m pip install -q --no-build-isolation --no-deps -v -e . 2>&1 | grep -E "^fusenn:|error" \
  | tee "$OUT/build.log"
python3 -m fusenn.info | tee -a "$OUT/build.log"
# A hung test must not eat the whole call: pytest-timeout (in the GPU image) ends it with stacks.
TIMEOUT=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout=120 --timeout-method=thread")
bounded 240 python3 -m pytest -q -p no:cacheprovider $TIMEOUT tests/test_persist.py -m gpu 2>&1 \
  | tee "$OUT/persist.log" | tail -n 30
# The persistent kernels alone (kns=persist) under compute-sanitizer, on the small cases (T3 B3 and B40 H33: exact fp32,
# TF32 mma.sync, bf16 wmma, proj_size); no caching allocator, so an access past a tensor is outside every
# allocation; a barrier that cannot complete under the tool fails in 60 s, not 10 minutes.
if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck synccheck; do
    echo "== compute-sanitizer --tool $tool" | tee -a "$OUT/sanitizer.log"
    FUSENN_PERSIST_TIMEOUT_S=60 PYTORCH_NO_CUDA_MEMORY_CACHING=1 bounded 100 \
      compute-sanitizer --tool "$tool" --kernel-name kns=persist --error-exitcode 1 \
      python3 -m pytest -q -p no:cacheprovider tests/test_persist.py -k "gpu_small or (gpu_proj and H33)" 2>&1 \
      | tee -a "$OUT/sanitizer.log" | tail -n 12
  done
fi
bounded 600 python3 -m pytest -q -p no:cacheprovider $TIMEOUT tests -k "not persist_gpu" 2>&1 \
  | tee "$OUT/tests.log" | tail -n 30
bounded 600 python3 -m benchmarks --out "$OUT/results" "$@" 2>&1 | tee "$OUT/bench.log" | tail -n 80
if [[ -n $PACK ]]; then
  pack=$(mktemp -d)/device_run.tar.gz
  tar -czf "$pack" -C "$OUT" . && rm -rf "${OUT:?}"/* && mv "$pack" "$OUT/" \
    && echo "== packed: $OUT/device_run.tar.gz" || echo "== packing $OUT failed"
fi

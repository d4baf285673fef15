#!/usr/bin/env bash
# The CPU figures of the README (records: benchmarks/results_cpu.jsonl): before (commit c3b87ad, unpacked with
# `git archive c3b87ad src | tar -x -C $BEFORE`) and after, forward and train step, 2 threads.
# Usage: benchmarks/run_cpu_suite.sh OUT.jsonl [BEFORE_DIR]
set -euo pipefail
OUT=$(realpath -m "${1:?output .jsonl}")
BEFORE=${2:-}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$HERE/.venv/bin/python}
# OMP_WAIT_POLICY is left as the caller has it (unset: what users run). It used to default to PASSIVE,
# which on the 2-core Intel Xeon of stop 20 made the 128x128 fp32 forward 1.3-1.5x slower (alternating
# runs: NeRD-Rain 0.69-0.76 against 0.53-0.55 s, -S 0.55 against 0.36 s): threads then sleep between
# the many small parallel regions.
COMMON=(--device cpu --threads 2 --repeats 3 --warmup 1 --output "$OUT")
if [[ -n "$BEFORE" ]]; then
  rm -rf "$BEFORE/benchmarks" && cp -r "$HERE/benchmarks" "$BEFORE/benchmarks"
  (cd "$BEFORE" && $PY benchmarks/bench_forward.py "${COMMON[@]}" --plain --label "before (c3b87ad), plain model")
  (cd "$BEFORE" && $PY benchmarks/bench_train.py "${COMMON[@]}" --no-alloc-tune --label "before (c3b87ad)")
fi
cd "$HERE"
$PY benchmarks/bench_forward.py "${COMMON[@]}" --plain --label "after, plain model (default path)"
$PY benchmarks/bench_forward.py "${COMMON[@]}" --channels-last --dtype fp32 bf16 --label "after, optimize_for_inference"
$PY benchmarks/bench_forward.py "${COMMON[@]}" --channels-last --compile --tile-batch 0 --no-memory \
  --label "after, optimize_for_inference + compile"
$PY benchmarks/bench_train.py "${COMMON[@]}" --no-alloc-tune --label "after, default"
$PY benchmarks/bench_train.py "${COMMON[@]}" --channels-last --label "after, channels-last + allocator"

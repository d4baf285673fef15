#!/usr/bin/env bash
# One prepared benchmark run on a lent GPU (issue #6), about 4 minutes; records go to $OUT/bench_gpu.jsonl.
#   device run: bash tools/device_bench.sh     (timeout_s ~420; then give the machine back)
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"; J=$OUT/bench_gpu.jsonl
# The device image has every dependency but cannot install packages: run from the source tree.
export PYTHONPATH=$PWD/src; PY=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
B="$PY benchmarks/bench_forward.py --device cuda --output $J --repeats 20 --warmup 5"
$B --plain --dtype fp32 --label "plain model" 2>>"$OUT/bench.err"
$B --channels-last --dtype fp32 tf32 bf16 --label "channels-last" 2>>"$OUT/bench.err"
$B --channels-last --cuda-graphs --dtype fp32 bf16 --no-memory --label "channels-last + CUDA graphs" 2>>"$OUT/bench.err"
timeout 240 $B --channels-last --compile --cuda-graphs --dtype bf16 --sizes 256 --no-memory \
  --label "channels-last + compile + CUDA graphs" 2>>"$OUT/bench.err"
$PY benchmarks/bench_train.py --device cuda --output $J --sizes 256 --batch 1 8 --dtype fp32 bf16 \
  --label "train" 2>>"$OUT/bench.err"
$PY benchmarks/bench_train.py --device cuda --output $J --sizes 256 --batch 8 16 --dtype bf16 \
  --channels-last --label "train, channels-last" 2>>"$OUT/bench.err"
$PY benchmarks/summarize.py "$J" | tee "$OUT/bench_gpu.md"

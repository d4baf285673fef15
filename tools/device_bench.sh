#!/usr/bin/env bash
# One prepared run on a lent GPU (issue #6), about 6 minutes: the CUDA fast paths against the golden
# outputs, a kernel profile, then every GPU benchmark figure into $OUT/bench_gpu.jsonl (+ .md).
# Needs the golden files inside the checkout (../shared does not travel):
#   mkdir -p .device_shared && cp -r ../shared/golden .device_shared/
#   device run: bash tools/device_bench.sh, carry [".device_shared"], timeout_s ~480
# Optional steps (torch.compile) run only while DEADLINE (seconds since start, default 420) allows.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"; J=$OUT/bench_gpu.jsonl; E=$OUT/bench.err; DEADLINE=${DEADLINE:-420}
# The device image has every dependency but cannot install packages: run from the source tree.
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1; PY=python3
left() { echo $((DEADLINE - SECONDS)); }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
NERDRAIN_SHARED=$PWD/.device_shared timeout 150 $PY -m pytest -q -s -p no:cacheprovider tests/test_accel.py \
  -k cuda > "$OUT/gpu_tests.txt" 2>&1
for dtype in fp32 bf16; do
  timeout 60 $PY benchmarks/profile_forward.py --device cuda --variant nerd_rain --size 256 --channels-last \
    --dtype $dtype --rows 25 >> "$OUT/profile.txt" 2>>"$E"
done
B="$PY benchmarks/bench_forward.py --device cuda --output $J --repeats 20 --warmup 5"
$B --plain --dtype fp32 --label "plain model" 2>>"$E"
$B --channels-last --dtype fp32 tf32 bf16 --label "channels-last" 2>>"$E"
$B --channels-last --cuda-graphs --dtype fp32 tf32 bf16 --no-memory --tile-batch 16 64 \
  --label "channels-last + CUDA graphs" 2>>"$E"
T="$PY benchmarks/bench_train.py --device cuda --output $J --sizes 256"
$T --batch 1 8 --dtype fp32 bf16 --label "train" 2>>"$E"
$T --batch 8 16 32 --dtype bf16 --channels-last --label "train, channels-last" 2>>"$E"
$T --batch 1 8 16 --dtype bf16 --channels-last --cuda-graphs --label "train, channels-last + CUDA graphs" 2>>"$E"
$PY benchmarks/summarize.py "$J" > "$OUT/bench_gpu.md"
# Optional: torch.compile (minutes of compilation per shape).
[ "$(left)" -gt 60 ] && NERDRAIN_SHARED=$PWD/.device_shared NERDRAIN_SLOW_TESTS=1 timeout "$(left)" \
  $PY -m pytest -q -s -p no:cacheprovider tests/test_accel.py -k "cuda and compile" >> "$OUT/gpu_tests.txt" 2>&1
[ "$(left)" -gt 60 ] && timeout "$(left)" $B --channels-last --compile --cuda-graphs --dtype fp32 bf16 --sizes 256 \
  --no-memory --label "channels-last + compile + CUDA graphs" 2>>"$E"
$PY benchmarks/summarize.py "$J" > "$OUT/bench_gpu.md"
echo "done in ${SECONDS}s"; tail -3 "$OUT/gpu_tests.txt"; cat "$OUT/bench_gpu.md"

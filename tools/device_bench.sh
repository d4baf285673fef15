#!/usr/bin/env bash
# The prepared run on a lent GPU (issue #6), at most DEADLINE seconds, most important first.
# Stop 19's first run (benchmarks/results_gpu_h200.jsonl, 2026-11-27) measured the forward figures:
# split against unsplit q k^T, bf16 weights against autocast, Triton against PyTorch LayerNorm, the
# released code's form side by side, and banded 1024x1024 memory. Its CUDA tests found three faults
# (CUDA generator state on resume, a test leaving cudnn.benchmark on, the float64 channels-last
# attention test), fixed since; this run checks those first, then measures training: the released
# form's training step side by side with ours, the Triton LayerNorm's training kernels against
# PyTorch's LayerNorm (their CUDA tests first), the Trainer's loop, a training profile, compile.
# Records: $OUT/bench_gpu.jsonl (+ .md).
# Needs the golden files inside the checkout (../shared does not travel):
#   mkdir -p .device_shared && cp -r ../shared/golden .device_shared/
#   device run: DEADLINE=420 bash tools/device_bench.sh, carry [".device_shared"], timeout_s 480
# Steps after the tests run only while DEADLINE (seconds since start, default 420) allows. The tests take
# up to 200 s (the CUDA-graph training test alone took over 100 s in stop 19: cuDNN tunes every shape).
# PART=2 (a second run, about 300 s) skips the tests and the first part's steps and runs the compiled
# ones, whose compilation alone may take minutes (inductor compiled a NeRD-Rain-S training step at
# 32x32 in about 9.5 minutes on 2 CPU cores), then NeRD-Rain-S's bf16 rows.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"; J=$OUT/bench_gpu.jsonl; E=$OUT/bench.err; DEADLINE=${DEADLINE:-420}
# The device image has every dependency but cannot install packages: run from the source tree.
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1; PY=python3
left() { echo $((DEADLINE - SECONDS)); }
step() {  # step SECONDS_NEEDED command...: run it if the deadline allows, cut off at the deadline
  local need=$1; shift
  if [ "$(left)" -gt "$need" ]; then timeout "$(left)" "$@" 2>>"$E"; else echo "skipped: $*" >>"$E"; fi
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
T="$PY benchmarks/bench_train.py --device cuda --output $J --sizes 256 --repeats 10 --warmup 3 --channels-last"
B="$PY benchmarks/bench_forward.py --device cuda --output $J --repeats 10 --warmup 3 --channels-last --cuda-graphs"
if [ "${PART:-1}" = 2 ]; then
  step 60 $T --compile --variant nerd_rain --batch 16 --dtype bf16 --cuda-graphs \
    --label "train, channels-last + compile + CUDA graphs"
  step 60 $B --compile --variant nerd_rain --dtype bf16 --sizes 256 --tile-batch 16 --no-memory \
    --label "channels-last + compile + CUDA graphs"
  step 30 $B --variant nerd_rain_s --dtype bf16 --label "NeRD-Rain-S, bf16, channels-last + CUDA graphs"
  step 30 $T --variant nerd_rain_s --batch 8 16 --dtype bf16 --cuda-graphs --label "NeRD-Rain-S train, channels-last + CUDA graphs"
  $PY benchmarks/summarize.py "$J" > "$OUT/bench_gpu.md"
  echo "done in ${SECONDS}s"; cat "$OUT/bench_gpu.md"; exit 0
fi
NERDRAIN_SHARED=$PWD/.device_shared timeout 200 $PY -m pytest -q -s -p no:cacheprovider --durations=5 \
  tests/test_models.py tests/test_accel.py tests/test_training.py tests/test_triton_ln.py \
  -k "channels_last_attention_gradients or cuda_cli_model or cuda_graphs_train_like_eager_steps or cuda_triton_training" \
  > "$OUT/gpu_tests.txt" 2>&1
SBS="$PY benchmarks/side_by_side.py --device cuda --output $J --baseline-dtype tf32"
step 60 $SBS --train --variant nerd_rain --sizes 256 --batch 8 --dtype bf16 --rounds 1 \
  --label "side by side train, channels-last + CUDA graphs"
# The same step with the Triton LayerNorm's training kernels and with PyTorch's LayerNorm (A/B).
for LN in "" --no-triton-ln; do
  step 40 $T --variant nerd_rain --batch 8 --dtype bf16 --cuda-graphs $LN \
    --label "train, channels-last + CUDA graphs${LN:+, PyTorch LayerNorm}"
done
# The real training loop (data workers, fused Adam, EMA) with the Trainer's CUDA graphs.
step 50 $PY benchmarks/bench_trainer.py --device cuda --output $J --variant nerd_rain --dtype bf16 --sizes 256 \
  --batch 16 --channels-last --cuda-graphs --warmup 5 --repeats 20 --label "Trainer loop, channels-last + CUDA graphs"
step 30 $PY benchmarks/profile_forward.py --device cuda --variant nerd_rain --size 256 --batch 8 --channels-last \
  --dtype bf16 --train --calls 2 --rows 30 > "$OUT/profile_train.txt"
$PY benchmarks/summarize.py "$J" > "$OUT/bench_gpu.md"
# Not reached in stop 19: activation checkpointing (the compiled steps are PART=2's).
step 30 $T --variant nerd_rain --batch 16 32 --dtype bf16 --cuda-graphs --activation-checkpointing \
  --label "train, channels-last + CUDA graphs + activation checkpointing"
$PY benchmarks/summarize.py "$J" > "$OUT/bench_gpu.md"
echo "done in ${SECONDS}s"; tail -12 "$OUT/gpu_tests.txt"; cat "$OUT/bench_gpu.md"

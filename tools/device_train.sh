#!/usr/bin/env bash
# One prepared training run on a lent GPU (issue #7): about MINUTES (default 7) of training plus
# start-up, then the fp16 weights and the Rain12 scores in $OUT. Needs .device_data/ (run
# tools/pack_device_data.py here first) carried:   device run, carry [".device_data"], timeout_s 600:
#   MINUTES=7 bash tools/device_train.sh
set -euo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"; MINUTES=${MINUTES:-7}
# The device image has every dependency but cannot install packages: run from the source tree.
export PYTHONPATH=$PWD/src; PY=python3
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt"
# Step time of the training loop itself at the config's shape and settings (data workers, EMA, CUDA
# graphs), to size the cosine schedule to the budget (+10 % for validation and checkpoints).
$PY benchmarks/bench_trainer.py --device cuda --variant nerd_rain_s --sizes 256 --batch 8 --dtype bf16 \
  --channels-last --cuda-graphs --workers 12 --repeats 20 --warmup 5 --output "$OUT/probe.jsonl" > /dev/null
ITERS=$($PY -c "import json; r=json.loads(open('$OUT/probe.jsonl').readline()); print(int($MINUTES*60/(r['step_s']*1.1)))")
echo "training $ITERS iterations" | tee "$OUT/plan.txt"
$PY -m nerdrain train configs/default_weights_gpu.yaml --set iterations=$ITERS --out runs/gpu --quiet 2>&1 \
  | tail -20 > "$OUT/train_tail.txt"
$PY -c "
import torch; from nerdrain import load_model, save_model
save_model(load_model('runs/gpu/final.safetensors'), '$OUT/nerd_rain_s_gpu.safetensors', dtype=torch.float16)"
$PY -m nerdrain evaluate --data .device_data/rain12 --weights "$OUT/nerd_rain_s_gpu.safetensors" --tile 0 \
  --json "$OUT/rain12.json" --quiet | tee "$OUT/rain12.txt"
cp runs/gpu/config.yaml "$OUT/config.yaml"; tar czf "$OUT/tb.tgz" -C runs/gpu tb

"""The benchmark scripts run and print well-formed records (a GPU session depends on them working
first time). Tiny sizes on the CPU; the figures themselves are not checked, only their invariants."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def run(script: str, *args: str) -> str:
    out = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_forward_benchmark_records(tmp_path):
    jsonl = tmp_path / "r.jsonl"
    out = run("bench_forward.py", "--device", "cpu", "--threads", "1", "--variant", "nerd_rain_s", "--dtype", "fp32",
              "bf16", "--sizes", "32", "--tile-size", "32", "--tile-batch", "2", "--repeats", "2", "--warmup", "0",
              "--no-memory", "--channels-last", "--no-split-gram", "--label", "smoke", "--output", str(jsonl))
    recs = records(out)
    assert records(jsonl.read_text()) == recs
    assert [(r["kind"], r["dtype"]) for r in recs] == [
        ("forward_latency", "fp32"), ("tile_throughput", "fp32"), ("forward_latency", "bf16"), ("tile_throughput", "bf16")]
    for r in recs:
        assert r["images_per_s"] == r["batch"] / r["median_s"] and len(r["times_s"]) == 2
        assert r["median_s"] >= r["min_s"] > 0
        assert r["settings"]["label"] == "smoke" and r["settings"]["no_split_gram"]
        assert r["paths"]["channels_last"] and r["machine"]["torch"]
    table = run("summarize.py", str(jsonl))
    assert table.count("| smoke |") == 4


def test_train_benchmark_records():
    recs = records(run("bench_train.py", "--device", "cpu", "--threads", "1", "--variant", "nerd_rain_s",
                       "--sizes", "32", "--batch", "2", "--repeats", "1", "--warmup", "0",
                       "--activation-checkpointing"))
    assert len(recs) == 1
    r = recs[0]
    assert r["kind"] == "train_step" and r["samples_per_s"] == 2 / r["median_s"]
    assert r["settings"]["activation_checkpointing"] and r["peak_memory_bytes"] > 0


def test_trainer_benchmark_times_the_training_loop(tmp_path):
    jsonl = tmp_path / "r.jsonl"
    recs = records(run("bench_trainer.py", "--device", "cpu", "--threads", "1", "--variant", "nerd_rain_s",
                       "--sizes", "32", "--batch", "2", "--repeats", "2", "--warmup", "1", "--workers", "0",
                       "--cuda-graphs", "--output", str(jsonl)))
    (r,) = recs
    assert r["kind"] == "trainer_throughput" and r["step_s"] > 0
    assert abs(r["samples_per_s"] * r["step_s"] - 2) < 1e-9
    assert not r["cuda_graphed"] and r["settings"]["cuda_graphs"]  # asked for, fell back on the CPU
    assert "| trainer_throughput | nerd_rain_s | fp32 | 32 | 2 |" in run("summarize.py", str(jsonl))


def test_op_count_on_the_meta_device():
    (r,) = records(run("count_ops.py", "--variant", "nerd_rain_s", "--size", "64", "--channels-last"))
    assert r["kind"] == "op_count" and r["non_view_ops"] == sum(r["by_op"].values())
    # 6 U-passes (1 + 2 + 3 over the scales) x 13 transformer blocks (2 + 3 encoding, 3 latent,
    # 3 + 2 decoding), two LayerNorms a block
    assert r["by_op"]["native_layer_norm"] == 2 * 6 * 13
    assert "view" not in r["by_op"] and "permute" not in r["by_op"]


def test_profile_prints_an_operator_table():
    text = run("profile_forward.py", "--device", "cpu", "--variant", "nerd_rain_s", "--size", "32", "--calls", "1",
               "--rows", "5")
    assert "aten::" in text and "nerd_rain_s fp32 1x3x32x32" in text
    text = run("profile_forward.py", "--device", "cpu", "--variant", "nerd_rain_s", "--size", "32", "--calls", "1",
               "--rows", "40", "--train")
    assert "1 training steps" in text and "convolution_backward" in text


def test_cpu_memory_record_measures_the_heap():
    recs = records(run("bench_forward.py", "--device", "cpu", "--threads", "1", "--variant", "nerd_rain_s",
                       "--sizes", "64", "--tile-batch", "0", "--repeats", "1", "--warmup", "0", "--channels-last"))
    (memory,) = [r for r in recs if r["kind"] == "forward_peak_memory"]
    # At least the 32-channel feature maps at 64x64 (0.5 MB each) are live at once; under 1 GB.
    assert 2**19 < memory["peak_heap_delta_bytes"] < 2**30, memory

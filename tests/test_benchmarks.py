"""The benchmark scripts run and print well-formed records (a GPU session depends on them working
first time). Tiny sizes on the CPU; the figures themselves are not checked, only their invariants."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nerdrain import load_model
from nerdrain.models.blocks import ChannelAttention, GatedFeedForward, LayerNorm2d
from nerdrain.models.inr import ImplicitDecoder

from conftest import assert_all_outputs_match_golden

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
    text = run("profile_forward.py", "--device", "cpu", "--variant", "nerd_rain_s", "--size", "32", "--calls", "1",
               "--rows", "5", "--dtype", "bf16", "--channels-last", "--optimized")
    assert "'precision': 'bf16', 'half_weights': True" in text  # the CLI's path: weights stored in bf16


def test_cpu_memory_record_measures_the_heap():
    recs = records(run("bench_forward.py", "--device", "cpu", "--threads", "1", "--variant", "nerd_rain_s",
                       "--sizes", "64", "--tile-batch", "0", "--repeats", "1", "--warmup", "0", "--channels-last"))
    (memory,) = [r for r in recs if r["kind"] == "forward_peak_memory"]
    # At least the 32-channel feature maps at 64x64 (0.5 MB each) are live at once; under 1 GB.
    assert 2**19 < memory["peak_heap_delta_bytes"] < 2**30, memory


def released_form_module():
    spec = importlib.util.spec_from_file_location("released_form", BENCH / "released_form.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_released_form_twin_computes_the_golden_outputs(golden_dir):
    """The baseline of the side-by-side figures is the released network, not some other one:
    its forms of LayerNorm, attention, FFN and INR give the golden outputs from the same weights."""
    released_form = released_form_module()
    model = load_model(golden_dir / "official_dim16_seed0.safetensors")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    released_form.to_released_form(model)
    swapped = {type(m) for m in model.modules()}
    assert swapped >= set(released_form.RELEASED_CLASSES.values())
    assert not swapped & {LayerNorm2d, ChannelAttention, GatedFeedForward, ImplicitDecoder}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert_all_outputs_match_golden(model, load_file(str(golden_dir / "official_dim16_seed0_io.safetensors")))


def test_released_form_ensemble_queries_the_grid_points():
    """Its INR queries each feature pixel itself, four times: the library's conv form, to rounding."""
    released_form = released_form_module()
    torch.manual_seed(0)
    inr = ImplicitDecoder(4, hidden=(8, 8))
    features = torch.randn(2, 4, 5, 7)
    expected = inr(features)
    inr.__class__ = released_form.ReleasedImplicitDecoder
    torch.testing.assert_close(inr(features), expected, atol=1e-5, rtol=1e-5)


def test_side_by_side_pairs_the_baseline_with_ours(tmp_path):
    jsonl = tmp_path / "r.jsonl"
    (r,) = records(run("side_by_side.py", "--device", "cpu", "--threads", "1", "--variant", "nerd_rain_s",
                       "--sizes", "32", "--rounds", "2", "--repeats", "1", "--warmup", "0", "--label", "pair",
                       "--output", str(jsonl)))
    assert r["kind"] == "side_by_side" and r["measure"] == "forward_latency" and "error" not in r
    assert len(r["baseline_s"]) == len(r["ours_s"]) == 2
    for speedup, base, ours in zip(r["speedup"], r["baseline_s"], r["ours_s"]):
        assert speedup == pytest.approx(base / ours, abs=1e-3)
    assert r["speedup_min"] <= r["speedup_median"] <= r["speedup_max"]
    assert r["baseline_paths"]["released_form"] and not r["baseline_paths"]["channels_last"]
    assert r["ours_paths"]["channels_last"] and "released_form" not in r["ours_paths"]
    table = run("summarize.py", str(jsonl))
    assert "| speed-up, median (min-max) |" in table and "| pair |" in table


def test_released_form_refuses_our_fast_paths():
    for script, flag in (("bench_forward.py", "--channels-last"), ("bench_train.py", "--activation-checkpointing")):
        out = subprocess.run([sys.executable, str(BENCH / script), "--device", "cpu", "--released-form", flag,
                              "--sizes", "16"], capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert out.returncode != 0 and f"drop {flag}" in out.stderr


def test_side_by_side_stops_at_a_failing_run_and_keeps_its_label(tmp_path):
    jsonl = tmp_path / "r.jsonl"
    (r,) = records(run("side_by_side.py", "--device", "cpu", "--threads", "1", "--variant", "nerd_rain_s",
                       "--sizes", "16", "--rounds", "3", "--repeats", "1", "--warmup", "0", "--ours=--bogus",
                       "--label", "broken", "--output", str(jsonl)))
    assert r["error"] == "ours: bench_forward.py: error: unrecognized arguments: --bogus"
    assert r["settings"]["label"] == "broken" and "speedup" not in r
    assert "| broken |" in run("summarize.py", str(jsonl))


def test_side_by_side_training_steps():
    (r,) = records(run("side_by_side.py", "--device", "cpu", "--threads", "1", "--variant", "nerd_rain_s", "--train",
                       "--sizes", "32", "--batch", "2", "--rounds", "1", "--repeats", "1", "--warmup", "0"))
    assert r["measure"] == "train_step" and r["batch"] == 2 and "error" not in r
    assert r["speedup"] == [round(r["baseline_s"][0] / r["ours_s"][0], 3)]
    base, ours = r["baseline_paths"], r["ours_paths"]
    assert base["released_form"] and not base["cpu_allocator_tuned"] and not base["channels_last"]
    assert not ours["released_form"] and ours["channels_last"]


def test_derain_benchmark_times_a_whole_photo(tmp_path):
    jsonl = tmp_path / "r.jsonl"
    recs = records(run("bench_derain.py", "--device", "cpu", "--threads", "1", "--variant", "nerd_rain_s",
                       "--photo-sizes", "40x72", "--tile", "32", "0", "--repeats", "1", "--warmup", "0",
                       "--output", str(jsonl)))
    tiled, whole = recs
    # 40 x 72 in tiles of 32 overlapping by 16 (half a tile at most): 2 x 4 of them
    assert (tiled["tiles"], tiled["tile_shape"], tiled["network_pixels"]) == (8, [32, 32], 8 * 32 * 32)
    assert (whole["tiles"], whole["tile_shape"], whole["network_pixels"]) == (1, [40, 72], 40 * 72)
    assert all(r["kind"] == "derain_photo" and r["median_s"] > 0 for r in recs)
    run("summarize.py", str(jsonl))  # a record kind it does not tabulate is no error


def test_derain_benchmark_runs_the_model_as_asked(monkeypatch):
    """--channels-last and --dtype reach the model derain runs (they were accepted, recorded in the
    settings and ignored: the stop-16 records ran NCHW fp32 whatever the flags said)."""
    spec = importlib.util.spec_from_file_location("bench_derain", BENCH / "bench_derain.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    import nerdrain

    seen = []

    def fake_derain(photo, model, **kwargs):
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
        seen.append((conv.weight.is_contiguous(memory_format=torch.channels_last), conv.weight.dtype))
        return photo

    monkeypatch.setattr(nerdrain, "derain", fake_derain)
    bench.main(["--device", "cpu", "--variant", "nerd_rain_s", "--photo-sizes", "32x32",
                "--tile", "0", "--repeats", "1", "--warmup", "0", "--channels-last", "--dtype", "fp32", "bf16"])
    assert seen == [(True, torch.float32), (True, torch.bfloat16)]


def test_summarize_has_a_help_and_wants_a_file():
    """``--help`` prints the usage (it was opened as a records file: FileNotFoundError); no file
    at all is a usage error, not an empty table."""
    assert run("summarize.py", "--help").startswith("usage: summarize.py")
    out = subprocess.run([sys.executable, str(BENCH / "summarize.py")], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "required" in out.stderr and not out.stdout

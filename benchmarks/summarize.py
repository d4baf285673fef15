#!/usr/bin/env python
"""Markdown table from benchmark JSON lines, beside the released code's figures.

    python benchmarks/bench_forward.py --device cuda --output results.jsonl
    python benchmarks/bench_train.py --device cuda --output results.jsonl
    python benchmarks/bench_trainer.py --device cuda --output results.jsonl
    python benchmarks/summarize.py results.jsonl

``trainer_throughput`` records (the whole training loop) give their mean step time and are compared
with the released code's training step. ``side_by_side`` records (``side_by_side.py``) get a table
of their own: the baseline timed beside ours, round by round, next to the issue's figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

# The authors' released code as measured for the issue (seconds per call; forward batch 1).
RELEASED = {
    ("cuda", "forward_latency", "nerd_rain", 256, 1): (0.060, 0.069),
    ("cuda", "forward_latency", "nerd_rain_s", 256, 1): (0.058, 0.087),
    ("cuda", "forward_latency", "nerd_rain", 512, 1): (0.137, 0.158),
    ("cuda", "forward_latency", "nerd_rain_s", 512, 1): (0.122, 0.122),
    ("cuda", "forward_latency", "nerd_rain", 1024, 1): (0.482, 0.482),
    ("cuda", "forward_latency", "nerd_rain_s", 1024, 1): (0.414, 0.414),
    ("cuda", "train_step", "nerd_rain", 256, 1): (0.251, 0.251),
    ("cuda", "train_step", "nerd_rain", 256, 8): (0.702, 0.702),
    ("cuda", "train_step", "nerd_rain_s", 256, 1): (0.311, 0.311),
    ("cuda", "train_step", "nerd_rain_s", 256, 8): (0.583, 0.583),
    ("cpu", "forward_latency", "nerd_rain", 256, 1): (5.9, 5.9),
    ("cpu", "forward_latency", "nerd_rain", 128, 1): (1.08, 1.08),
    ("cpu", "forward_latency", "nerd_rain_s", 256, 1): (3.8, 3.8),
    ("cpu", "forward_latency", "nerd_rain_s", 128, 1): (0.67, 0.67),
    ("cpu", "train_step", "nerd_rain", 128, 1): (2.3, 2.3),
    ("cpu", "train_step", "nerd_rain_s", 128, 1): (1.5, 1.5),
}
RELEASED_PEAK_GB = {("nerd_rain", 1024): 5.7, ("nerd_rain_s", 1024): 3.8}  # CUDA fp32 forward


def device_of(rec: dict) -> str:
    return "cuda" if rec["machine"].get("cuda_device") else "cpu"


# A benchmark's switches away from the default forms, as the table names them.
_SETTING_LABELS = (("no_split_gram", "unsplit_gram"), ("no_bands", "whole_maps"),
                   ("no_triton_ln", "torch_layer_norm"), ("fp32_weights", "fp32_weights"))


def paths(rec: dict) -> str:
    p = rec.get("paths") or {}
    on = [k for k in ("channels_last", "compile", "cuda_graphs") if p.get(k)]
    if rec.get("cuda_graphed"):
        on.append("cuda_graphs")
    settings = rec.get("settings", {})
    if settings.get("released_form"):
        on.append("released_form")
    elif p.get("plain"):
        on.append("plain")
    on += [label for setting, label in _SETTING_LABELS if settings.get(setting)]
    return "+".join(on) or "-"


def main(files: list[str]) -> None:
    records = []
    for name in files:
        with open(name) as f:
            records += [json.loads(line) for line in f if line.startswith("{")]
    print("| label | device | kind | variant | dtype | size | batch | paths | s per call | items/s | released s | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        if r.get("kind") not in ("forward_latency", "tile_throughput", "train_step", "trainer_throughput"):
            continue
        dev = device_of(r)
        kind = "train_step" if r["kind"] == "trainer_throughput" else r["kind"]
        ref = RELEASED.get((dev, kind, r["variant"], r["size"], r["batch"]))
        rate = r.get("images_per_s") or r.get("samples_per_s")
        seconds = r["median_s"] if "median_s" in r else r["step_s"]
        speed = f"{ref[0] / seconds:.2f}-{ref[1] / seconds:.2f}x" if ref else ""
        released = f"{ref[0]:g}-{ref[1]:g}" if ref and ref[0] != ref[1] else (f"{ref[0]:g}" if ref else "")
        label = r.get("settings", {}).get("label") or ""
        print(f"| {label} | {r['machine'].get('cuda_device', r['machine']['cpu_model'])} | {r['kind']} | {r['variant']} | "
              f"{r['dtype']} | {r['size']} | {r['batch']} | {paths(r)} | {seconds:.4f} | {rate:.2f} | "
              f"{released} | {speed} |")
    side_by_side([r for r in records if r.get("kind") == "side_by_side"])
    mem = [r for r in records if r.get("kind") == "forward_peak_memory"]
    if mem:
        print("\n| label | device | variant | dtype | size | peak (GB) | released (GB) |")
        print("|---|---|---|---|---|---|---|")
        for r in mem:
            peak = (r.get("peak_allocated_bytes") or r.get("peak_heap_delta_bytes")
                    or r.get("peak_rss_delta_bytes") or 0)
            ref = RELEASED_PEAK_GB.get((r["variant"], r["size"])) if device_of(r) == "cuda" else None
            print(f"| {r.get('settings', {}).get('label') or ''} | {device_of(r)} | {r['variant']} | {r['dtype']} | {r['size']} | {peak / 1e9:.2f} | "
                  f"{ref if ref else ''} |")


def side_by_side(records: list[dict]) -> None:
    if not records:
        return
    print("\n| label | device | measure | variant | size | batch | baseline s | ours | ours s | speed-up, median (min-max) "
          "| issue's released s | ours vs issue's |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        label = r.get("settings", {}).get("label") or ""
        if "error" in r:
            print(f"| {label} | | {r['measure']} | {r['variant']} | {r['size']} | {r['batch']} | error: {r['error']} "
                  "| | | | | |")
            continue
        dev = device_of(r)
        ours_s = statistics.median(r["ours_s"])
        ref = RELEASED.get((dev, r["measure"], r["variant"], r["size"], r["batch"]))
        issue = f"{ref[0]:g}-{ref[1]:g}" if ref and ref[0] != ref[1] else (f"{ref[0]:g}" if ref else "")
        vs_issue = (f"{ref[0] / ours_s:.2f}-{ref[1] / ours_s:.2f}x" if ref and ref[0] != ref[1]
                    else (f"{ref[0] / ours_s:.2f}x" if ref else ""))
        print(f"| {label} | {r['machine'].get('cuda_device', r['machine']['cpu_model'])} | {r['measure']} | "
              f"{r['variant']} | {r['size']} | {r['batch']} | {statistics.median(r['baseline_s']):.4f} "
              f"({r['baseline_dtype']}) | {r['dtype']} {r['ours']} | {ours_s:.4f} | {r['speedup_median']:.2f}x "
              f"({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) | {issue} | {vs_issue} |")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", metavar="FILE.jsonl", help="benchmark records, one JSON object a line")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]).files)

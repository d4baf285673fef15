#!/usr/bin/env python
"""The released code's forms and ours, timed in alternation on one machine: paired speed-ups.

On a shared or virtual machine the time of a forward drifts from minute to minute (on the 2-core
development VM one released-form forward at 128x128 took 1.4 s in one run and 2.0 s a few minutes
later, mostly in page faults). A speed-up taken from two runs at different times inherits that
drift. This runs the baseline (``--released-form``, see ``released_form.py``) and ours in turn,
each round in fresh processes and in alternating order (ABBA), and reports the ratio within each
round, so that a slow spell hits both sides::

    python benchmarks/side_by_side.py --device cpu --threads 2 --sizes 128 256 --rounds 3
    python benchmarks/side_by_side.py --device cuda --sizes 256 --dtype bf16 --rounds 2
    python benchmarks/side_by_side.py --device cuda --train --sizes 256 --batch 8 --dtype bf16

One ``side_by_side`` record per variant and size: the baseline's (fp32 unless ``--baseline-dtype``)
and our per-round median seconds, the speed-up of each round, and the median, min and max of those.
Ours runs with ``--ours`` (default: channels-last on the CPU, channels-last and CUDA graphs on CUDA).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_OURS = {"cpu": "--channels-last", "cuda": "--channels-last --cuda-graphs"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--variant", nargs="+", default=list(common.VARIANTS), choices=common.VARIANTS)
    p.add_argument("--train", action="store_true", help="time training steps (bench_train.py), not forwards")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="square sizes (default: 128 CPU, 256 CUDA)")
    p.add_argument("--batch", type=int, default=None, help="training batch (default: 1 CPU, 8 CUDA); forwards: 1")
    p.add_argument("--dtype", default="fp32", choices=common.DTYPES, help="our precision")
    p.add_argument("--baseline-dtype", default="fp32", choices=common.DTYPES)
    p.add_argument("--ours", default=None,
                   help="extra flags of our runs, one string; write --ours=--channels-last for a single flag")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=None, help="timed calls per run (default 3 CPU, 10 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per run (default 1 CPU, 3 CUDA)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", default=None, help="also append the JSON lines to this file")
    p.add_argument("--label", default=None)
    return p.parse_args(argv)


def run_argv(args: argparse.Namespace, device: str, variant: str, size: int, baseline: bool) -> list[str]:
    argv = ["--device", device, "--variant", variant, "--sizes", str(size), "--repeats", str(args.repeats),
            "--warmup", str(args.warmup), "--dtype", args.baseline_dtype if baseline else args.dtype]
    argv += ["--batch", str(args.batch)] if args.train else ["--tile-batch", "0", "--no-memory"]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return argv + (["--released-form"] if baseline else shlex.split(args.ours))


def timed(args: argparse.Namespace, device: str, variant: str, size: int, baseline: bool) -> dict:
    """One fresh process's record (``error`` set where it failed)."""
    script = HERE / ("bench_train.py" if args.train else "bench_forward.py")
    records = common.run_in_subprocess(script, run_argv(args, device, variant, size, baseline))
    kind = "train_step" if args.train else "forward_latency"
    found = [r for r in records if r.get("kind") == kind or "error" in r]
    record = found[0] if found else {"error": "no record"}
    if isinstance(record.get("error"), list):  # run_in_subprocess gives the last stderr line as a list
        record["error"] = " ".join(record["error"])
    return record


def run_paths(record: dict) -> dict:
    """Which paths a run took: a forward's own ``paths``, a training step's flags."""
    if "paths" in record:
        return record["paths"]
    settings = record.get("settings", {})
    flags = ("released_form", "channels_last", "compile", "cuda_graphs", "adam_fused", "cpu_allocator_tuned")
    return {**{k: settings.get(k) for k in flags}, "cuda_graphed": record.get("cuda_graphed")}


def compare(args: argparse.Namespace, device: str, variant: str, size: int) -> dict:
    record = {"kind": "side_by_side", "measure": "train_step" if args.train else "forward_latency",
              "variant": variant, "size": size, "batch": args.batch if args.train else 1,
              "baseline_dtype": args.baseline_dtype, "dtype": args.dtype, "ours": args.ours,
              "settings": {"rounds": args.rounds, "repeats": args.repeats, "warmup": args.warmup,
                           "threads": args.threads, "label": args.label, "order": "ABBA",
                           "code": common.code_info()}}
    rounds = []
    for index in range(args.rounds):
        order = (True, False) if index % 2 == 0 else (False, True)
        runs = {}
        for baseline in order:
            runs[baseline] = timed(args, device, variant, size, baseline)
            if "error" in runs[baseline]:  # the same failure would recur in every round: stop here
                side = "baseline" if baseline else "ours"
                return {**record, "error": f"{side}: {runs[baseline]['error']}"}
        rounds.append((runs[True], runs[False]))
    base = [b["median_s"] for b, _ in rounds]
    ours = [o["median_s"] for _, o in rounds]
    speedups = [b / o for b, o in zip(base, ours)]
    return {**record, "baseline_s": base, "ours_s": ours, "speedup": [round(s, 3) for s in speedups],
            "speedup_median": statistics.median(speedups), "speedup_min": min(speedups),
            "speedup_max": max(speedups), "baseline_paths": run_paths(rounds[0][0]),
            "ours_paths": run_paths(rounds[0][1]), "machine": rounds[0][1]["machine"]}


def main(argv=None) -> None:
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    if args.sizes is None:
        args.sizes = [256] if kind == "cuda" else [128]
    if args.train and args.batch is None:
        args.batch = 8 if kind == "cuda" else 1
    args.repeats = args.repeats or (10 if kind == "cuda" else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if kind == "cuda" else 1)
    args.ours = DEFAULT_OURS[kind] if args.ours is None else args.ours
    for variant in args.variant:
        for size in args.sizes:
            common.emit(compare(args, str(device), variant, size), args.output)


if __name__ == "__main__":
    main()

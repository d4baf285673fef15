#!/usr/bin/env python
"""Throughput of the real training loop (``nerdrain.training.Trainer``), not of an isolated step.

``bench_train.py`` times one optimisation step on a fixed batch; this runs ``Trainer.train`` as
``nerd-rain train`` does (data loading and augmentation in worker processes, fused Adam, clipping
at 1.0, EMA, loss logging every 25 iterations) on random image pairs written to a temporary
folder, and prints one JSON line (``trainer_throughput``) per variant, dtype, size and batch::

    python benchmarks/bench_trainer.py --device cpu --variant nerd_rain_s --sizes 64 --repeats 3   # smoke
    python benchmarks/bench_trainer.py --device cuda --dtype bf16 --sizes 256 --batch 8 16 \\
        --channels-last --cuda-graphs                                   # the Trainer's CUDA graphs

``--warmup`` iterations (compilation, graph capture, cuDNN autotuning) are run first and not
timed; the ``--repeats`` iterations after them are timed together, synchronised at both ends.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(p, released_form=False)
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="patch sizes (default: 128 CPU, 256 CUDA)")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default: 1 CPU, 8 CUDA)")
    p.add_argument("--workers", type=int, default=None, help="data-loader workers (default: 1 CPU, 8 CUDA)")
    return p.parse_args(argv)


def write_pairs(root: Path, size: int, count: int = 8) -> Path:
    """``count`` random rainy/clean pairs a little larger than the patches, in input/ + target/."""
    rng = np.random.default_rng(0)
    for sub in ("input", "target"):
        (root / sub).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (size + 32, size + 32, 3), dtype=np.uint8)).save(root / sub / f"{i}.png")
    return root


def measure(variant: str, dtype: str, size: int, batch: int, args: argparse.Namespace,
            device: torch.device) -> dict:
    from nerdrain.config import TrainConfig, from_dict
    from nerdrain.training import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = from_dict(TrainConfig, {
            "model": {"name": variant},
            "data": {"patch_size": size, "batch_size": batch, "num_workers": args.workers,
                     "sources": [{"kind": "paired", "root": str(write_pairs(Path(tmp) / "pairs", size))}]},
            "iterations": args.warmup + args.repeats, "seed": args.seed, "bf16": dtype == "bf16",
            "compile": args.compile, "cuda_graphs": args.cuda_graphs, "channels_last": args.channels_last,
            "optim": {"lr": 1e-4, "grad_clip": 1.0}, "ema_decay": 0.999, "log_every": 25,
            "checkpoint_every": 10 ** 9, "device": device.type})
        trainer = Trainer(cfg, Path(tmp) / "run", progress=False)
        marks: dict[int, float] = {}

        def mark(optimizer, *_) -> None:  # after each optimiser step; trainer.iteration counts completed ones
            done = trainer.iteration + 1
            if done in (args.warmup, args.warmup + args.repeats):
                common.synchronize(device)
                marks[done] = time.perf_counter()

        trainer.optimizer.register_step_post_hook(mark)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with common.precision("tf32" if dtype == "tf32" else "fp32", device):  # TF32 flags; bf16 is the config's
            trainer.train()
        seconds = marks[args.warmup + args.repeats] - marks[args.warmup]
        return {"step_s": seconds / args.repeats, "samples_per_s": batch * args.repeats / seconds,
                "cuda_graphed": trainer.graph_step is not None,
                "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}


def main(argv=None) -> None:
    args = parse_args(argv)
    device = common.setup(args)
    cuda = device.type == "cuda"
    args.sizes = args.sizes or [256 if cuda else 128]
    args.batch = args.batch or [8 if cuda else 1]
    args.workers = args.workers if args.workers is not None else (8 if cuda else 1)
    args.warmup = max(args.warmup, 1)
    info = common.machine_info(device)
    for variant in args.variant:
        for dtype in args.dtype:
            for size in args.sizes:
                for batch in args.batch:
                    record = measure(variant, dtype, size, batch, args, device)
                    common.emit({"kind": "trainer_throughput", "variant": variant, "dtype": dtype, "size": size,
                                 "batch": batch, **record,
                                 "settings": common.settings(args, workers=args.workers, optimizer="Adam (fused)",
                                                             grad_clip=1.0, ema_decay=0.999),
                                 "machine": info}, args.output)
                    if cuda:
                        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

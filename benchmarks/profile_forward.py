#!/usr/bin/env python
"""Where a NeRD-Rain forward (or, with ``--train``, a training step) spends its time:
torch.profiler's operator table, slowest first.

A diagnostic beside the benchmarks (which give the figures): it shows which operators a speed-up
should go after. Eager execution, so every kernel is visible (CUDA graphs would hide them)::

    python benchmarks/profile_forward.py --device cuda --variant nerd_rain --size 256 --channels-last
    python benchmarks/profile_forward.py --device cuda --train --batch 8 --dtype bf16 --channels-last
    python benchmarks/profile_forward.py --device cpu --size 64 --rows 15      # smoke test

On the CPU the profiler's own bookkeeping can inflate the times of large operators several-fold
(seen on the 2-core machine: 3.4 ms for a convolution that takes 0.5 ms unprofiled); compare
shares with care and take figures from the benchmarks.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402


def train_step(model: torch.nn.Module, x: torch.Tensor, dtype: str, device: torch.device):
    """One training step as the Trainer takes it: forward, NeRDRainLoss, backward, fused Adam."""
    from nerdrain.config import TrainConfig
    from nerdrain.losses import NeRDRainLoss
    from nerdrain.training import build_optimizer

    loss_fn, target = NeRDRainLoss().to(device), torch.rand_like(x)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], TrainConfig())

    def step() -> None:
        with common.precision(dtype, device):
            outputs = model.forward_all(x)
        loss, _ = loss_fn(outputs, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--variant", default="nerd_rain", choices=common.VARIANTS)
    p.add_argument("--dtype", default="fp32", choices=common.DTYPES)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--calls", type=int, default=3, help="profiled forwards (after 3 warm-ups)")
    p.add_argument("--rows", type=int, default=30)
    p.add_argument("--optimized", action="store_true",
                   help="profile the forward through optimize_for_inference (bf16/fp16: weights stored in "
                        "that dtype, as the CLI runs it) instead of autocast over the bare model")
    p.add_argument("--train", action="store_true",
                   help="profile training steps (forward, NeRDRainLoss, backward, fused Adam) instead")
    args = p.parse_args(argv)
    if args.optimized and args.train:
        p.error("--optimized profiles a forward through optimize_for_inference, not a training step")
    device = common.resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = common.build_model(args.variant, device).train(args.train)
    x = torch.rand(args.batch, 3, args.size, args.size, device=device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def forward() -> None:
        with torch.no_grad(), common.precision(args.dtype, device):
            model(x)

    call, paths = forward, ""
    if args.train:
        call = train_step(model, x, args.dtype, device)
    elif args.optimized:  # the shipped path in place of the bare one
        from nerdrain.accel import optimize_for_inference

        fast = optimize_for_inference(model, device, channels_last=args.channels_last,
                                      dtype=common.INFERENCE_DTYPES[args.dtype])
        call, paths = functools.partial(fast, x), f", optimize_for_inference {fast.paths}"

    for _ in range(3):
        call()
    common.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.calls):
            call()
        common.synchronize(device)
    sort = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"# {args.variant} {args.dtype} {args.batch}x3x{args.size}x{args.size} channels_last={args.channels_last} "
          f"on {torch.cuda.get_device_name(device) if device.type == 'cuda' else common.cpu_model()}, "
          f"{args.calls} {'training steps' if args.train else 'forwards'}{paths}")
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()

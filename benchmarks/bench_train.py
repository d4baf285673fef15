#!/usr/bin/env python
"""NeRD-Rain training-step benchmark: forward + NeRDRainLoss + backward + Adam step.

Prints one JSON object per line (machine info, exact settings, measurement). Examples::

    python benchmarks/bench_train.py --device cpu --sizes 64 --repeats 1               # smoke test
    python benchmarks/bench_train.py --device cpu --threads 2 --sizes 128 --batch 1    # CPU figures
    python benchmarks/bench_train.py --device cuda --dtype fp32 tf32 bf16 --sizes 256 \\
        --batch 1 8 --channels-last --compile                                          # GPU figures

One record (``train_step``) per variant, dtype, patch size and batch: median seconds per step,
samples/s and peak memory (CUDA ``max_memory_allocated``; CPU peak RSS of the process during the
measurement, and its growth over the RSS before the model was built).
``--released-form`` times the baseline: the model in the released code's forms
(``released_form.py``) with PyTorch's default Adam and glibc malloc left alone.
``--cuda-graphs`` captures the whole step (forward, loss, backward, clipping, Adam with
``capturable=True``) in one CUDA graph per shape, falling back to eager steps if capture fails.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(p)
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="square patch sizes (default: 128 on CPU, 256 on CUDA)")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default: 1 on CPU, 1 8 on CUDA)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--grad-clip", type=float, default=0.0, help="clip_grad_norm_ max norm (0: off)")
    p.add_argument("--no-alloc-tune", action="store_true", help="CPU: leave glibc malloc alone")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute transformer blocks in backward (less memory, more compute)")
    return p.parse_args(argv)


class Step:
    """One optimisation step on a fixed batch, eager or CUDA-graphed."""

    def __init__(self, model, loss_fn, device, dtype: str, args, x, y):
        self.model, self.loss_fn, self.device, self.dtype, self.args = model, loss_fn, device, dtype, args
        self.x, self.y = x, y
        params = [p for p in model.parameters() if p.requires_grad]
        if args.cuda_graphs and device.type == "cuda":
            self.optimizer = torch.optim.Adam(params, lr=args.lr, capturable=True)
        elif args.released_form:  # the released code's optimiser: PyTorch's default Adam
            self.optimizer = torch.optim.Adam(params, lr=args.lr)
        else:  # the Trainer's optimizer: fused where this PyTorch has the kernel
            from nerdrain.config import OptimConfig, TrainConfig
            from nerdrain.training import build_optimizer

            self.optimizer = build_optimizer(params, TrainConfig(optim=OptimConfig(lr=args.lr)))
        self.params = params
        self.graph = None
        self.forward_all = torch.compile(model.forward_all) if args.compile else model.forward_all
        if args.cuda_graphs:
            if device.type != "cuda":
                warnings.warn("--cuda-graphs needs CUDA; timing eager steps", stacklevel=2)
            else:
                try:
                    self._capture()
                except Exception as err:  # noqa: BLE001
                    warnings.warn(f"CUDA graph capture of the train step failed ({err}); eager steps",
                                  stacklevel=2)
                    self.graph = None

    def _eager(self) -> torch.Tensor:
        with common.precision(self.dtype, self.device):
            outputs = self.forward_all(self.x)
            loss, _ = self.loss_fn(outputs, self.y)
        self.optimizer.zero_grad(set_to_none=not self.args.cuda_graphs)
        loss.backward()
        if self.args.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.args.grad_clip)
        self.optimizer.step()
        return loss

    def _capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._eager()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static_loss = self._eager()
        self.graph = graph

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self._eager()


def main(argv=None) -> None:
    args = parse_args(argv)
    device = common.setup(args)
    if args.sizes is None:
        args.sizes = [256] if device.type == "cuda" else [128]
    if args.batch is None:
        args.batch = [1, 8] if device.type == "cuda" else [1]
    tuned = False
    if device.type == "cpu" and not (args.no_alloc_tune or args.released_form):
        from nerdrain.accel import tune_cpu_allocator

        tuned = tune_cpu_allocator()
    from nerdrain.losses import NeRDRainLoss

    info = common.machine_info(device)
    for variant in args.variant:
        for dtype in args.dtype:
            for size in args.sizes:
                for batch in args.batch:
                    model = common.build_model(variant, device, args.seed, args.released_form).train()
                    model.set_activation_checkpointing(args.activation_checkpointing)
                    if args.channels_last:
                        model.to(memory_format=torch.channels_last)
                    g = torch.Generator().manual_seed(args.seed)
                    x = torch.rand(batch, 3, size, size, generator=g).to(device)
                    y = torch.rand(batch, 3, size, size, generator=g).to(device)
                    if args.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                        y = y.contiguous(memory_format=torch.channels_last)
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                        rss_before = None
                    else:
                        rss_before = common.current_rss_bytes() if common.reset_peak_rss() else None
                    step = Step(model, NeRDRainLoss().to(device), device, dtype, args, x, y)
                    timing = common.time_fn(step, device, args.warmup, args.repeats)
                    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                            else common.peak_rss_bytes())
                    common.emit({"kind": "train_step", "variant": variant, "dtype": dtype, "size": size,
                                 "batch": batch, **timing, "samples_per_s": batch / timing["median_s"],
                                 "peak_memory_bytes": peak,
                                 "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda"
                                 else "process_peak_rss",
                                 "peak_rss_delta_bytes": None if rss_before is None else peak - rss_before,
                                 "cuda_graphed": step.graph is not None,
                                 "settings": common.settings(args, optimizer="Adam", lr=args.lr,
                                                             adam_fused=bool(step.optimizer.defaults.get("fused")),
                                                             activation_checkpointing=args.activation_checkpointing,
                                                             grad_clip=args.grad_clip,
                                                             loss="NeRDRainLoss()",
                                                             cpu_allocator_tuned=tuned),
                                 "machine": info}, args.output)
                    del step, model, x, y
                    if device.type == "cuda":
                        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""NeRD-Rain forward benchmark: batch-1 latency, batched-tile throughput and peak memory.

Prints one JSON object per line (machine info, exact settings, measurement). Examples::

    python benchmarks/bench_forward.py --device cpu --sizes 64 --repeats 1          # smoke test
    python benchmarks/bench_forward.py --device cpu --threads 2 --channels-last      # CPU figures
    python benchmarks/bench_forward.py --device cuda --dtype fp32 tf32 bf16 \\
        --sizes 256 512 1024 --tile-batch 16 --channels-last --cuda-graphs            # GPU figures

Records: ``forward_latency`` (batch 1, per size), ``tile_throughput`` (``--tile-batch`` tiles of
``--tile-size``, images/s) and ``forward_peak_memory`` (CUDA: ``max_memory_allocated`` during
one forward; CPU, in a fresh subprocess: the growth of peak RSS over one forward, and of the heap
in use, ``common.PeakHeap``, which unlike RSS does not count freed memory malloc keeps).
``--plain`` times the bare model (``torch.no_grad``, autocast for bf16) instead of
:func:`nerdrain.accel.optimize_for_inference`; ``--released-form`` times the baseline, the bare
model in the released code's forms (``released_form.py``), so that speed-ups are measured side by
side; ``--fp32-weights`` keeps its bf16 path on autocast
over fp32 weights (no bf16 copy of the weights), the form before ``half_weights``.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(p)
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="square sizes for batch-1 latency (default: 128 256 on CPU, 256 512 1024 on CUDA)")
    p.add_argument("--tile-size", type=int, default=256, help="tile side for the throughput test")
    p.add_argument("--tile-batch", type=int, nargs="+", default=None,
                   help="tiles per call for the throughput test (default: 4 on CPU, 16 on CUDA; 0 skips)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory records")
    p.add_argument("--plain", action="store_true", help="time the bare model, not optimize_for_inference")
    p.add_argument("--fp32-weights", action="store_true",
                   help="bf16: autocast over fp32 weights (optimize_for_inference(half_weights=False))")
    p.add_argument("--no-alloc-tune", action="store_true",
                   help="CPU: leave glibc malloc alone (optimize_for_inference tunes it by default)")
    p.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_runner(model: torch.nn.Module, device: torch.device, dtype: str, args: argparse.Namespace):
    if args.plain or args.released_form:
        model.eval()
        if args.channels_last:
            model.to(memory_format=torch.channels_last)

        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), common.precision(dtype, device):
                return model(x)
        return run, {"compile": False, "cuda_graphs": False, "channels_last": args.channels_last,
                     "precision": dtype, "plain": True, "released_form": args.released_form}
    from nerdrain.accel import optimize_for_inference

    fast = optimize_for_inference(model, device, compile=args.compile, cuda_graphs=args.cuda_graphs,
                                  channels_last=args.channels_last, dtype=common.INFERENCE_DTYPES[dtype],
                                  cpu_allocator=False if args.no_alloc_tune else None,
                                  half_weights=not args.fp32_weights)
    return fast, dict(fast.paths)


def allocator_tuned() -> bool:
    """Whether nerdrain.accel tuned glibc malloc in this process (it does so only once imported)."""
    accel = sys.modules.get("nerdrain.accel")
    return bool(accel and accel._allocator_tuned)


def run_settings(args: argparse.Namespace) -> dict:
    return common.settings(args, plain=args.plain or args.released_form, tile_size=args.tile_size, tile_batch=args.tile_batch,
                           cpu_allocator_tuned=allocator_tuned(), fp32_weights=args.fp32_weights)


def inputs(batch: int, size: int, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def memory_record(args, variant, dtype, size, device, info) -> dict:
    """Peak memory of one batch-1 forward at ``size``."""
    base = {"kind": "forward_peak_memory", "variant": variant, "dtype": dtype, "size": size, "batch": 1}
    if device.type == "cuda":
        model = common.build_model(variant, device, args.seed, args.released_form)
        run, paths = make_runner(model, device, dtype, args)
        x = inputs(1, size, device, args.channels_last)
        run(x)  # compile / capture / cudnn autotune first
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run(x)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {**base, "peak_allocated_bytes": peak, "peak_minus_resident_bytes": peak - before,
                "peak_reserved_bytes": torch.cuda.max_memory_reserved(device), "paths": paths,
                "settings": run_settings(args), "machine": info}
    argv = ["--memory-worker", "--device", "cpu", "--variant", variant, "--dtype", dtype,
            "--sizes", str(size), "--seed", str(args.seed)]
    for flag in ("compile", "channels_last", "plain", "no_alloc_tune", "no_split_gram", "no_bands", "fp32_weights",
                 "no_triton_ln", "released_form"):
        if getattr(args, flag):
            argv.append("--" + flag.replace("_", "-"))
    if args.threads:
        argv += ["--threads", str(args.threads)]
    records = common.run_in_subprocess(Path(__file__), argv)
    rec = records[0] if records else {"error": "no output"}
    return {**base, **rec, "settings": run_settings(args), "machine": info}


def memory_worker(args: argparse.Namespace, device: torch.device) -> None:
    """In a fresh process: growth of peak RSS over the first forward at this size (CPU)."""
    variant, dtype, size = args.variant[0], args.dtype[0], args.sizes[0]
    model = common.build_model(variant, device, args.seed, args.released_form)
    run, paths = make_runner(model, device, dtype, args)
    run(inputs(1, 16, device, args.channels_last))  # load kernels / libraries at a negligible size
    x = inputs(1, size, device, args.channels_last)
    reset = common.reset_peak_rss()
    before = common.current_rss_bytes() if reset else common.max_rss_bytes()
    heap_before = common.heap_in_use_bytes()
    with common.PeakHeap() as heap:
        run(x)
    after = common.peak_rss_bytes()
    common.emit({"peak_rss_bytes": after, "peak_rss_delta_bytes": after - before,
                 "peak_heap_delta_bytes": None if heap_before is None else heap.peak - heap_before,
                 "cpu_allocator_tuned": allocator_tuned(),
                 "rss_method": "VmHWM after clear_refs, minus VmRSS before" if reset
                 else "ru_maxrss after minus before (0 if below an earlier peak)", "paths": paths})


def main(argv=None) -> None:
    args = parse_args(argv)
    device = common.setup(args)
    if args.memory_worker:
        memory_worker(args, device)
        return
    if args.sizes is None:
        args.sizes = [256, 512, 1024] if device.type == "cuda" else [128, 256]
    if args.tile_batch is None:
        args.tile_batch = [16] if device.type == "cuda" else [4]
    info = common.machine_info(device)
    for variant in args.variant:
        for dtype in args.dtype:
            model = common.build_model(variant, device, args.seed, args.released_form)
            run, paths = make_runner(model, device, dtype, args)
            for size in args.sizes:
                x = inputs(1, size, device, args.channels_last)
                timing = common.time_fn(functools.partial(run, x), device, args.warmup, args.repeats)
                common.emit({"kind": "forward_latency", "variant": variant, "dtype": dtype, "size": size,
                             "batch": 1, **timing, "images_per_s": 1 / timing["median_s"], "paths": paths,
                             "settings": run_settings(args), "machine": info}, args.output)
            for batch in (b for b in args.tile_batch if b > 0):
                x = inputs(batch, args.tile_size, device, args.channels_last)
                timing = common.time_fn(functools.partial(run, x), device, args.warmup, args.repeats)
                common.emit({"kind": "tile_throughput", "variant": variant, "dtype": dtype,
                             "size": args.tile_size, "batch": batch, **timing,
                             "images_per_s": batch / timing["median_s"], "paths": paths,
                             "settings": run_settings(args), "machine": info}, args.output)
            del model, run
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if not args.no_memory:
                for size in args.sizes:
                    common.emit(memory_record(args, variant, dtype, size, device, info), args.output)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

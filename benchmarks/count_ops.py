#!/usr/bin/env python
"""Operators a NeRD-Rain inference forward dispatches on the GPU code path, counted on the meta
device (no data, no GPU needed): a machine-independent proxy for its kernel launches.

At batch 1 a GPU forward is bound by its thousands of small kernels more than by arithmetic, so
fewer operators is a speed-up any GPU will show; this lets a session without one see it. The meta
device takes the code's non-CPU branches, as CUDA does (``SPLIT_GRAM_DEVICES`` gets "meta"
added, so the split ``q k^T`` form is counted; LayerNorm counts one operator a call, PyTorch's or
the Triton kernel alike). Views (reshapes, permutes, slices) and allocations launch nothing and are
left out. Autocast's casts are not seen (autocast does not act on meta tensors)::

    python benchmarks/count_ops.py --variant nerd_rain nerd_rain_s --size 256 --channels-last
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

VIEWS = {"view", "_unsafe_view", "permute", "transpose", "t", "slice", "select", "unsqueeze", "squeeze", "expand",
         "as_strided", "alias", "reshape", "_reshape_alias", "unflatten", "split", "split_with_sizes", "chunk",
         "unbind", "detach", "lift_fresh", "diagonal", "empty", "empty_strided", "empty_like"}


class Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name not in VIEWS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def count(variant: str, size: int, channels_last: bool) -> collections.Counter[str]:
    from nerdrain import create_model
    from nerdrain.models import blocks

    blocks.SPLIT_GRAM_DEVICES = set(blocks.SPLIT_GRAM_DEVICES) | {"meta"}
    model = create_model(variant).to("meta").eval()
    x = torch.empty(1, 3, size, size, device="meta")
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), Counter() as counter:
        model(x)
    return counter.counts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", nargs="+", default=list(common.VARIANTS), choices=common.VARIANTS)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--output", default=None, help="also append the JSON lines to this file")
    p.add_argument("--label", default=None)
    args = p.parse_args(argv)
    for variant in args.variant:
        counts = count(variant, args.size, args.channels_last)
        common.emit({"kind": "op_count", "variant": variant, "size": args.size, "batch": 1,
                     "channels_last": args.channels_last, "non_view_ops": sum(counts.values()),
                     "by_op": dict(counts.most_common()),
                     "settings": {"label": args.label, "code": common.code_info()}}, args.output)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Time to derain a whole photo with ``nerdrain.derain``, tiles and blending included: what a user
of ``nerd-rain derain`` waits for, where ``bench_forward.py`` times the network alone.

One JSON line (``derain_photo``) per variant, precision, photo size and tile size, with the tile
count and the pixels the network ran on (the tiles' area, overlaps counted each time). The model
runs through :func:`nerdrain.accel.optimize_for_inference` with the flags given
(``--channels-last``, ``--dtype``, ``--compile``, ``--cuda-graphs``); ``nerd-rain derain`` runs it
channels-last, in fp32 unless ``--half``::

    python benchmarks/bench_derain.py --device cpu --variant nerd_rain_s --photo-sizes 768x1024 --tile 512 \
        --channels-last
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def photo_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(side) for side in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 768x1024, got {text!r}") from None
    return h, w


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(p, released_form=False)
    p.add_argument("--photo-sizes", type=photo_size, nargs="+", default=[(768, 1024)], help="HxW (default 768x1024)")
    p.add_argument("--tile", type=int, nargs="+", default=[512], help="tile sides (0: whole photo; default 512)")
    p.add_argument("--overlap", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4, help="tiles per forward (default 4)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = common.setup(args)
    import nerdrain
    from nerdrain.accel import optimize_for_inference
    from nerdrain.tiling import TileConfig, count_tiles, tile_shape

    for variant, dtype in itertools.product(args.variant, args.dtype):
        model = optimize_for_inference(common.build_model(variant, device, args.seed), device,
                                       channels_last=args.channels_last, compile=args.compile,
                                       cuda_graphs=args.cuda_graphs, dtype=common.INFERENCE_DTYPES[dtype])
        rng = np.random.default_rng(args.seed)  # the same photos for every variant and precision
        for h, w in args.photo_sizes:
            photo = (rng.random((h, w, 3)) * 255).astype(np.uint8)
            for tile in args.tile:
                cfg = TileConfig(tile=tile, overlap=args.overlap, batch_size=args.batch_size)
                (th, tw), tiles = tile_shape(h, w, cfg), count_tiles(h, w, cfg)
                with torch.inference_mode():
                    timing = common.time_fn(lambda: nerdrain.derain(photo, model, tile=tile, overlap=args.overlap,
                                                                    batch_size=args.batch_size, device=device),
                                            device, args.warmup, args.repeats)
                common.emit({"kind": "derain_photo", "variant": variant, "precision": dtype, "paths": model.paths,
                             "photo": [h, w], "tile": tile, "tile_shape": [th, tw], "tiles": tiles,
                             "network_pixels": tiles * th * tw, **timing,
                             "machine": common.machine_info(device), "settings": common.settings(args)},
                            args.output)


if __name__ == "__main__":
    main()

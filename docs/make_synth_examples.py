"""Render docs/synth_examples.jpg: clean / light / heavy synthetic rain on scikit-image photos.

Only photos shipped with scikit-image and the noise-based streaks (no streak database) are
used, so nothing from outside the repository ends up in it.  Run:

    python docs/make_synth_examples.py [--out docs/synth_examples.jpg] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image, ImageDraw, ImageFont

from nerdrain.data.synth import RainSynthesizer
from nerdrain.metrics import psnr, to_uint8

PHOTOS = ("astronaut", "coffee", "chelsea")
CELL = 300  # rain is rendered at the benchmarks' pixel scale (321 px short side), then cropped
LABEL_H = 28


def y_psnr(a: np.ndarray, b: np.ndarray) -> float:
    return psnr(to_uint8(a), to_uint8(b), "rain200")


def load_photo(name: str) -> np.ndarray:
    im = Image.fromarray(getattr(skimage.data, name)())
    f = 321 / min(im.size)
    im = im.resize((round(im.width * f), round(im.height * f)), Image.Resampling.BICUBIC)
    left, top = (im.width - CELL) // 2, (im.height - CELL) // 2
    im = im.crop((left, top, left + CELL, top + CELL))
    return np.asarray(im, dtype=np.float32) / 255.0


def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1
    except TypeError:
        return ImageFont.load_default()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "synth_examples.jpg")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    synths = {"light": RainSynthesizer("light"), "heavy": RainSynthesizer("heavy")}
    gap = 4
    cols = 1 + len(synths)
    grid = Image.new("RGB", (cols * CELL + (cols - 1) * gap,
                             len(PHOTOS) * (CELL + LABEL_H) + (len(PHOTOS) - 1) * gap), "white")
    draw = ImageDraw.Draw(grid)
    fnt = font(18)
    for r, name in enumerate(PHOTOS):
        clean = load_photo(name)
        y0 = r * (CELL + LABEL_H + gap)
        cells = [("clean", clean)]
        for k, (preset, s) in enumerate(synths.items()):
            rainy = s.render(clean, np.random.default_rng([args.seed, r, k]))
            cells.append((f"{preset}  {y_psnr(rainy, clean):.1f} dB", rainy))
        for c, (label, img) in enumerate(cells):
            x0 = c * (CELL + gap)
            grid.paste(Image.fromarray(np.round(img * 255).astype(np.uint8)), (x0, y0 + LABEL_H))
            draw.text((x0 + 6, y0 + 4), f"{name}: {label}" if c == 0 else label, fill="black", font=fnt)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out, quality=85, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()

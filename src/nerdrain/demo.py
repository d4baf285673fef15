"""``nerd-rain demo``: rain rendered onto a photo that scikit-image ships, derained, side by side.

Works on a fresh install with no downloads: the photo comes with scikit-image, the rain from
:mod:`nerdrain.data.synth`, the weights from the package.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image, ImageDraw, ImageFont

from .data.synth import RainSynthesizer
from .files import check_output_folder
from .imageio import quantize, save_png
from .inference import derain, resolve_device
from .metrics import score

DEMO_PHOTO = "coffee"  # 400 x 600, not in any deraining benchmark
DEMO_FILES = ("rainy.png", "derained.png", "clean.png", "comparison.png")


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1
    except TypeError:
        return ImageFont.load_default()


def side_by_side(images: list[np.ndarray], labels: list[str], gap: int = 6, label_height: int = 30) -> Image.Image:
    """uint8 HxWx3 images in a row, each with a caption above it."""
    h, w = images[0].shape[:2]
    canvas = Image.new("RGB", (len(images) * w + (len(images) - 1) * gap, h + label_height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (img, label) in enumerate(zip(images, labels)):
        x = i * (w + gap)
        canvas.paste(Image.fromarray(img), (x, label_height))
        draw.text((x + 6, 6), label, fill="black", font=_font(18))
    return canvas


def run_demo(out_dir: str | Path = "nerdrain-demo", model=None, device: str = "auto", preset: str = "light",
             seed: int = 0, verbose: bool = True) -> dict[str, dict[str, float]]:
    """Write rainy/derained/clean PNGs and ``comparison.png``; return and print PSNR/SSIM (rain200).

    Files of those names in ``out_dir`` are replaced, nothing else there is touched. Paths that
    cannot take them fail before the work, so that no run leaves some of the four and not others.
    """
    out = Path(out_dir)
    check_output_folder(out, DEMO_FILES)
    clean = getattr(skimage.data, DEMO_PHOTO)()
    rainy_f = RainSynthesizer(preset).render(clean.astype(np.float32) / 255, np.random.default_rng(seed))
    rainy = quantize(rainy_f, 8)
    dev = resolve_device(device)
    if model is None:
        from .checkpoint import load_default_model

        model = load_default_model(dev)
    derained = derain(rainy, model, device=dev, tile=0 if dev.type == "cuda" else None)

    scores = {}
    for name, image in (("rainy", rainy), ("derained", derained)):
        psnr, ssim = score(image, clean, "rain200")
        scores[name] = {"psnr": psnr, "ssim": ssim}
    out.mkdir(parents=True, exist_ok=True)
    for name, image in zip(DEMO_FILES, (rainy, derained, clean)):
        save_png(image, out / name)
    labels = [f"rainy  {scores['rainy']['psnr']:.2f} dB / {scores['rainy']['ssim']:.4f}",
              f"derained  {scores['derained']['psnr']:.2f} dB / {scores['derained']['ssim']:.4f}",
              "clean"]
    save_png(np.asarray(side_by_side([rainy, derained, clean], labels)), out / "comparison.png")
    if verbose:
        print(f"photo: scikit-image '{DEMO_PHOTO}', synthetic {preset} rain (seed {seed})")
        for name, s in scores.items():
            print(f"{name:>9}: PSNR {s['psnr']:.2f} dB  SSIM {s['ssim']:.4f}  (vs clean, rain200 protocol)")
        print(f"wrote {out / 'comparison.png'} (rainy | derained | clean)")
    return scores

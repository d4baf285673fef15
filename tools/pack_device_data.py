"""Pack the training data a lent GPU needs into ``.device_data/`` (git-ignored, carried by the device tool).

Only the checkout travels to the device machine, at most 64 MiB with the repository itself (~22 MB),
so the data is cut to about 38 MB: clean photos re-encoded as JPEG at quality 80 (rain is rendered
on top, so the mild extra compression barely matters), every eighth Garg & Nayar streak as grayscale
PNG (the synthesiser reads them as luminance anyway), real pairs as JPEG at quality 95 (input and
target alike), and 4 Rain12 pairs for validation. Run from the repository root: ``python tools/pack_device_data.py [--shared ../shared]``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def reencode(src: Path, dst_root: Path, rel_root: Path, mode: str, fmt: str, every: int = 1, **save) -> None:
    for path in images(src)[::every]:
        rel = path.relative_to(rel_root)
        out = (dst_root / rel).with_suffix(".jpg" if fmt == "JPEG" else ".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as im:
            im.convert(mode).save(out, fmt, **save)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default="../shared", help="the shared folder beside the checkout")
    parser.add_argument("--out", default=".device_data")
    args = parser.parse_args()
    data, out = Path(args.shared) / "data", Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    reencode(data / "clean", out / "clean", data / "clean", "RGB", "JPEG", quality=80)
    reencode(data / "streaks", out / "streaks", data / "streaks", "L", "PNG", every=8, optimize=True)
    reencode(data / "train_real", out / "train_real", data / "train_real", "RGB", "JPEG", quality=95)
    for pair in images(data / "rain12" / "target")[:4]:
        for side in ("input", "target"):
            (out / "rain12" / side).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(data / "rain12" / side / pair.name, out / "rain12" / side / pair.name)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {total / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()

"""Find (rainy, clean) image pairs in the folder layouts deraining datasets are shipped in.

Each benchmark comes in the layout of whichever code base released it, so the layout is
detected automatically (and can be forced). Layouts, in detection order:

``input_target``  ``input/NAME`` + ``target/NAME`` (Restormer's test sets, ../shared/data);
                  other folder names via ``input_dir`` / ``target_dir``.
``ddn``           ``rainy_image/N_K.ext`` + ``ground_truth/N.ext`` (DDN-Data): several rainy
                  versions K share one clean image, each is a pair.
``jorder``        ``rain/X2/NAMEx2.ext`` (or ``rain/NAMEx2.ext``) + ``norain/NAME.ext``: JORDER's
                  release of Rain100L/H and Rain200L/H (``norain-12x2.png`` is the rainy
                  ``norain-12.png``); a rainy name without ``x2`` pairs with the same clean name.
``prenet``        ``rainy/rain-N.ext`` + ``norain-N.ext`` beside ``rainy/`` or inside it, or
                  ``rain-N.ext`` + ``norain-N.ext`` in one folder (PReNet's Rain100H/L).
``did``           one file per pair, rainy and clean halves side by side (DID-MDN's Rain1200:
                  rainy on the left). Detected only when every image is exactly twice as wide
                  as tall, as DID-MDN's are; other side-by-side sets need ``layout="did"``.

Pairs are matched by file stem, never by sorted position, so a file without its partner is an
error rather than a silent shift of every later pair.

Every reader here, 8- or 16-bit, and :func:`image_size` refuse images over one pixel limit,
:func:`nerdrain.imageio.read_photo`'s (``NERDRAIN_MAX_PIXELS``, 300 million by default), in its
words; Pillow's own guard (~179 Mpx) is not used (:func:`nerdrain.imageio.open_image`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
from PIL import Image

from ..files import same_file
from ..imageio import DATASET_EXTENSIONS, open_image, read_photo, stores_16_bits

__all__ = [
    "LAYOUTS",
    "Pair",
    "check_pair_sizes",
    "detect_layout",
    "find_pairs",
    "image_size",
    "load_clean",
    "load_pair",
    "match_folders",
    "match_predictions",
    "read_rgb",
    "read_scored",
    "read_training",
]

LAYOUTS: Final = ("input_target", "prenet", "ddn", "jorder", "did")

_LAYOUT_HELP: Final = (
    "input_target (input/ + target/), "
    "ddn (rainy_image/N_K + ground_truth/N), "
    "jorder (rain/X2/NAMEx2 or rain/NAMEx2 + norain/NAME), "
    "prenet (rainy/rain-N + norain-N, or rain-N + norain-N in one folder), "
    "did (side-by-side rainy|clean images, twice as wide as tall)"
)
_DDN_RAINY: Final = re.compile(r"(?P<clean>.+)_\d+")
_JORDER_RAINY: Final = re.compile(r"(?P<clean>.+)x2")
_SIDES: Final = ("left", "right")
_MAX_LISTED: Final = 10


@dataclass(frozen=True)
class Pair:
    """One rainy/clean pair. ``crop`` is ``(input_half, target_half)``, e.g. ``("left", "right")``,
    when both images are halves of one side-by-side file (then ``input == target``)."""

    name: str
    input: Path
    target: Path
    crop: tuple[str, str] | None = None


def _images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``; hidden files (macOS ``._x.png``) are not images."""
    if not folder.is_dir():
        return []
    return [
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in DATASET_EXTENSIONS and not p.name.startswith(".")
    ]


def _natural_key(name: str) -> list[int | str]:
    """Sort ``rain-2`` before ``rain-10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _listing(paths: Iterable[Path], root: Path) -> str:
    names = sorted(
        (str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in paths),
        key=_natural_key,
    )
    return shortened(names)


def shortened(items: Sequence[str], separator: str = ", ") -> str:
    """The first few of ``items`` and how many more: a one-line error stays readable."""
    more = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return separator.join(items[:_MAX_LISTED]) + more


def _by_key(paths: Iterable[Path], key: Callable[[str], str], root: Path) -> dict[str, Path]:
    """Index files by ``key(stem)``; two files with one key (``a.png``, ``a.jpg``) are ambiguous."""
    index: dict[str, Path] = {}
    for path in paths:
        k = key(path.stem)
        if k in index:
            raise ValueError(
                f"{root}: ambiguous files {_listing([index[k], path], root)} share the name {k!r}"
            )
        index[k] = path
    return index


def _check_partners(root: Path, unmatched: list[Path]) -> None:
    if unmatched:
        raise ValueError(
            f"{root}: no partner for {len(unmatched)} file(s): {_listing(unmatched, root)}"
        )


def _prenet_files(root: Path, prefix: str) -> list[Path]:
    """``prefix``-named images in ``root/rainy`` or ``root`` (clean ones sit in either)."""
    return [p for p in _images(root / "rainy") + _images(root) if p.stem.startswith(prefix)]


def _is_side_by_side(path: Path) -> bool:
    try:
        with open_image(path) as img:  # reads the header only
            width, height = img.size
    except _READ_ERRORS as err:
        raise _unreadable(path, err) from None
    return width == 2 * height


def detect_layout(root: str | Path) -> str:
    """The first layout that ``root`` looks like, in the module docstring's detection order
    (input_target, ddn, jorder, prenet, did; not ``LAYOUTS``' order)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder")
    if _images(root / "input") and _images(root / "target"):
        return "input_target"
    if _images(root / "rainy_image") and _images(root / "ground_truth"):
        return "ddn"
    if _images(_jorder_rainy_dir(root)) and _images(root / "norain"):
        return "jorder"
    if _prenet_files(root, "rain-") and _prenet_files(root, "norain-"):
        return "prenet"
    loose = _images(root)
    if loose and all(_is_side_by_side(p) for p in loose):
        return "did"
    raise ValueError(f"{root}: no known pair layout found; looked for {_LAYOUT_HELP}")


def _two_folders(
    root: Path, input_dir: Path, target_dir: Path, clean_key: Callable[[str], str | None]
) -> list[Pair]:
    """Pairs from a rainy folder and a clean folder; ``clean_key`` maps a rainy stem to the
    stem of its clean image."""
    _check_not_empty(root, (input_dir, target_dir))
    clean = _by_key(_images(target_dir), str, root)
    rainy = _by_key(_images(input_dir), str, root)
    keys = {stem: clean_key(stem) for stem in rainy}
    used = set(keys.values())
    _check_partners(
        root,
        [rainy[s] for s, k in keys.items() if k not in clean]
        + [path for stem, path in clean.items() if stem not in used],
    )
    return [Pair(stem, rainy[stem], clean[keys[stem]]) for stem in rainy]


def _check_not_empty(root: Path, folders: Iterable[Path]) -> None:
    for folder in folders:
        if not _images(folder):
            raise ValueError(f"{root}: no images in {folder}")


def _keyed_pairs(root: Path, rainy_files: list[Path], rainy_key: Callable[[str], str],
                 clean_files: list[Path], clean_key: Callable[[str], str]) -> list[Pair]:
    """One pair per rainy file, with the clean file whose stem gives the same key (one to one)."""
    rainy = _by_key(rainy_files, rainy_key, root)
    clean = _by_key(clean_files, clean_key, root)
    _check_partners(
        root,
        [p for k, p in rainy.items() if k not in clean]
        + [p for k, p in clean.items() if k not in rainy],
    )
    return [Pair(path.stem, path, clean[k]) for k, path in rainy.items()]


def _ddn_clean_stem(stem: str) -> str | None:
    """``"12_3"`` -> ``"12"``: DDN's rainy version 3 of clean image 12."""
    match = _DDN_RAINY.fullmatch(stem)
    return match["clean"] if match else None


def _prenet_pairs(root: Path) -> list[Pair]:
    rainy_files, clean_files = _prenet_files(root, "rain-"), _prenet_files(root, "norain-")
    if not rainy_files and not clean_files:  # else a NaN score of 0 images
        raise ValueError(f"{root}: no rain-N / norain-N images for the prenet layout (in {root} or its rainy/)")
    return _keyed_pairs(root, rainy_files, lambda s: s.removeprefix("rain-"),
                        clean_files, lambda s: s.removeprefix("norain-"))


def _jorder_rainy_dir(root: Path) -> Path:
    """``rain/X2`` (the heavy sets) where it holds images, else ``rain`` (the light ones)."""
    return root / "rain" / "X2" if _images(root / "rain" / "X2") else root / "rain"


def _jorder_clean_stem(stem: str) -> str:
    """``"norain-12x2"`` -> ``"norain-12"``; a name without ``x2`` is its clean image's own."""
    match = _JORDER_RAINY.fullmatch(stem)
    return match["clean"] if match else stem


def _jorder_pairs(root: Path) -> list[Pair]:
    rainy_dir, clean_dir = _jorder_rainy_dir(root), root / "norain"
    _check_not_empty(root, (rainy_dir, clean_dir))
    return _keyed_pairs(root, _images(rainy_dir), _jorder_clean_stem, _images(clean_dir), _jorder_clean_stem)


def _did_pairs(root: Path, rainy_side: str) -> list[Pair]:
    if rainy_side not in _SIDES:
        raise ValueError(f"did_rainy_side must be 'left' or 'right', got {rainy_side!r}")
    files = _images(root)
    if not files:
        raise ValueError(f"{root}: no images for the did layout")
    clean_side = "right" if rainy_side == "left" else "left"
    _by_key(files, str, root)  # rejects a.png beside a.jpg: names must be unique
    return [Pair(p.stem, p, p, (rainy_side, clean_side)) for p in files]


def find_pairs(
    root: str | Path,
    layout: str | None = None,
    *,
    input_dir: str | Path | None = None,
    target_dir: str | Path | None = None,
    did_rainy_side: str = "left",
) -> list[Pair]:
    """All pairs under ``root``, sorted naturally by name (the rainy file's stem).

    ``layout`` forces one of ``LAYOUTS`` instead of detecting it. ``input_dir`` / ``target_dir``
    (relative to ``root`` or absolute) rename the two folders of the input_target (default) or
    ddn layout. ``did_rainy_side`` says which half of a did image is rainy.
    """
    root = Path(root)
    if (input_dir is None) != (target_dir is None):
        raise ValueError("give input_dir and target_dir together")
    if layout is None:
        layout = "input_target" if input_dir is not None else detect_layout(root)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if input_dir is not None and layout not in ("input_target", "ddn"):
        raise ValueError(
            f"input_dir/target_dir apply to the input_target and ddn layouts, not {layout}"
        )

    if layout == "input_target":
        pairs = _two_folders(
            root, root / (input_dir or "input"), root / (target_dir or "target"), str
        )
    elif layout == "ddn":
        pairs = _two_folders(
            root,
            root / (input_dir or "rainy_image"),
            root / (target_dir or "ground_truth"),
            _ddn_clean_stem,
        )
    elif layout == "prenet":
        pairs = _prenet_pairs(root)
    elif layout == "jorder":
        pairs = _jorder_pairs(root)
    else:
        pairs = _did_pairs(root, did_rainy_side)
    return sorted(pairs, key=lambda pair: _natural_key(pair.name))


def _image_folder(folder: Path, what: str) -> list[Path]:
    """The images of ``folder``; a missing or empty folder is an error."""
    if not folder.is_dir():
        raise ValueError(f"{what} folder {folder} is not a folder")
    if not (images := _images(folder)):
        raise ValueError(f"no images in {what} folder {folder}")
    return images


def _check_matched(problems: list[str]) -> None:
    """One error for the files left without a partner (``problems``: one phrase per side)."""
    if problems:
        raise ValueError("; ".join(problems) + " (files are matched by name without extension)")


def match_folders(pred_dir: Path, gt_dir: Path) -> list[Pair]:
    """Saved predictions (``input``) and their ground truth (``target``), matched by file stem and
    naturally sorted; unmatched files on either side are an error naming them."""
    pred_images, gt_images = _image_folder(pred_dir, "prediction"), _image_folder(gt_dir, "ground-truth")
    if same_file(pred_dir, gt_dir):  # every image against itself: an infinite PSNR
        raise ValueError(f"prediction folder {pred_dir} and ground-truth folder {gt_dir} are the same folder")
    preds = _by_key(pred_images, str, pred_dir)
    gts = _by_key(gt_images, str, gt_dir)
    problems = []
    if missing_gt := [p for stem, p in preds.items() if stem not in gts]:
        problems.append(f"{len(missing_gt)} prediction(s) in {pred_dir} without ground truth in "
                        f"{gt_dir}: {_listing(missing_gt, pred_dir)}")
    if missing_pred := [p for stem, p in gts.items() if stem not in preds]:
        problems.append(f"{len(missing_pred)} ground-truth image(s) in {gt_dir} without a prediction "
                        f"in {pred_dir}: {_listing(missing_pred, gt_dir)}")
    _check_matched(problems)
    return [Pair(stem, preds[stem], gts[stem]) for stem in sorted(preds, key=_natural_key)]


def match_predictions(pred_dir: Path, pairs: Sequence[Pair], data_dir: Path) -> list[tuple[Path, Pair]]:
    """Each pair of ``data_dir`` (``find_pairs``) with its saved prediction ``pred_dir/<pair.name>.*``,
    the name ``evaluate --save`` gives it, in the pairs' order; a pair without a prediction or a
    prediction without a pair is an error naming them."""
    pred_images = _image_folder(pred_dir, "prediction")
    if any(same_file(pred_dir, folder) for folder in {pair.target.parent for pair in pairs}):
        raise ValueError(f"prediction folder {pred_dir} holds the clean images of {data_dir}")
    preds = _by_key(pred_images, str, pred_dir)
    names = {pair.name for pair in pairs}
    problems = []
    if extra := [p for stem, p in preds.items() if stem not in names]:
        problems.append(f"{len(extra)} prediction(s) in {pred_dir} without a pair in {data_dir}: "
                        f"{_listing(extra, pred_dir)}")
    if missing := [pair.name for pair in pairs if pair.name not in preds]:
        problems.append(f"{len(missing)} pair(s) of {data_dir} without a prediction in {pred_dir}: "
                        f"{shortened(missing)}")
    _check_matched(problems)
    return [(preds[pair.name], pair) for pair in pairs]


# Truncated or corrupt files: Pillow's messages omit the file. (Images over the pixel limit are
# refused by open_image, naming it.)
_READ_ERRORS: Final = (OSError, SyntaxError, EOFError)


def _unreadable(path: Path, err: BaseException) -> ValueError:
    reason = " ".join(str(err).split()) or type(err).__name__
    return ValueError(f"{path}: cannot read the image ({reason})")


# Pillow modes the readers refuse, in words for their messages ("a 1 image" says nothing).
_MODE_WORDS: Final = {"1": "1-bit black-and-white", "I": "32-bit integer", "F": "32-bit floating-point",
                      "CMYK": "CMYK", "YCbCr": "YCbCr", "LAB": "CIELAB"}


def _mode_words(mode: str) -> str:
    return _MODE_WORDS.get(mode, f"Pillow {mode!r} mode")


def _is_16_bit(img: Image.Image, path: Path, accept_16_bits: bool) -> bool:
    """Whether the opened file stores 16 bits a value; refused where not ``accept_16_bits``, and
    32-bit grey and float files always: MATLAB would read them at full depth, not as 8 bits."""
    deep = stores_16_bits(img)
    depth = ("16-bit" if deep and not accept_16_bits else None if deep else
             _mode_words(img.mode) if img.mode in ("I", "F") else None)
    if depth:
        raise ValueError(f"{path}: {depth} images are not supported; "
                         f"use {'8- or 16-bit' if accept_16_bits else '8-bit'} images")
    return deep


def _read_8bit(path: Path, pixels: Callable[[Image.Image], np.ndarray],
               read_16_bits: Callable[[Path], np.ndarray] | None = None) -> np.ndarray:
    """``pixels`` of the opened file. 16-bit files go to ``read_16_bits``; without it, they are
    refused, and so are 32-bit files (see :func:`_is_16_bit`)."""
    try:
        with open_image(path) as img:
            if not _is_16_bit(img, path, accept_16_bits=read_16_bits is not None):
                return pixels(img)
    except _READ_ERRORS as err:
        raise _unreadable(path, err) from None
    return read_16_bits(path)


def _rgb(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def read_rgb(path: Path) -> np.ndarray:
    """uint8 RGB of an 8-bit file, the network's input; grey, palette and alpha images become RGB
    as Pillow converts them. 16-bit and float files are refused (see :func:`_read_8bit`)."""
    return _read_8bit(path, _rgb)


def _rgb_16_bits(path: Path) -> np.ndarray:
    """uint16 RGB at full depth (Pillow alone keeps only the high bytes of colour files)."""
    return np.rint(read_photo(path, apply_orientation=False).rgb * 65535).astype(np.uint16)


def read_training(path: Path) -> np.ndarray:
    """Training pixels: :func:`read_rgb`'s uint8 RGB of 8-bit files, and uint16 RGB of 16-bit ones
    at full depth (users' own pairs may be 16-bit; the benchmarks' are 8-bit), both as Pillow
    decodes them, without EXIF orientation, so that a pair mixing the two stays aligned."""
    return _read_8bit(path, _rgb, _rgb_16_bits)


def _as_matlab_reads(img: Image.Image, path: Path) -> np.ndarray:
    """What imread gives of 8-bit colour (HxWx3) and grey (HxW) files; what it gives of others the
    scripts cannot score."""
    if img.mode in ("RGB", "RGBA"):
        return np.asarray(img.convert("RGB"))
    if img.mode in ("L", "LA"):
        return np.asarray(img.convert("L"))
    what = ("a palette image (MATLAB's imread gives its colour indices, not its colours)" if img.mode in ("P", "PA")
            else f"a {_mode_words(img.mode)} image")
    raise ValueError(f"{path}: {what}, which the MATLAB scripts cannot score; save it as RGB or grey")


def read_scored(path: Path) -> np.ndarray:
    """uint8 pixels of an 8-bit file as MATLAB's ``imread`` gives them to the scoring scripts:
    HxWx3 for colour, HxW for grey (alpha, which imread returns apart, dropped). Other modes
    (palette, whose indices imread returns; 1-bit; CMYK) are refused naming the file, as are
    16-bit and float files (see :func:`_read_8bit`)."""
    return _read_8bit(path, lambda img: _as_matlab_reads(img, path))


def image_size(path: Path, *, training_pair: bool = False) -> tuple[int, int]:
    """(width, height) of an image file once it is known to read to its end: a PNG by the checksums
    of all its chunks, some 30 times cheaper than decoding it (0.14 s per 1000 Rain200 files against
    4.3 s), and decoded only where they fail (a file missing just its end marker has all its
    pixels); other formats by decoding them (1.0 s per 1000 such JPEGs). With ``training_pair``,
    the depths :func:`read_training` refuses are refused too, in its words."""
    try:
        with open_image(path) as img:
            if training_pair:
                _is_16_bit(img, path, accept_16_bits=True)
            size = img.size
            if img.format == "PNG" and _chunks_intact(img):
                return size
        with open_image(path) as img:
            img.load()
    except _READ_ERRORS as err:
        raise _unreadable(path, err) from None
    return size


def _chunks_intact(png: Image.Image) -> bool:
    try:
        png.verify()
    except _READ_ERRORS:
        return False
    return True


def check_pair_sizes(pair: Pair, input_size: tuple[int, int], target_size: tuple[int, int]) -> None:
    """Raise :func:`load_pair`'s error where ``pair``'s files, of these (width, height)s, do not
    make a pair: two sizes, or a side-by-side image of odd width."""
    if pair.crop is not None:
        if input_size[0] % 2:
            raise ValueError(f"{pair.input}: side-by-side image has odd width {input_size[0]}")
    elif input_size != target_size:
        raise ValueError(f"size mismatch: input {pair.input} is {input_size[0]}x{input_size[1]} "
                         f"but target {pair.target} is {target_size[0]}x{target_size[1]}")


def _size(img: np.ndarray) -> tuple[int, int]:
    return img.shape[1], img.shape[0]


def _half(img: np.ndarray, side: str, path: Path) -> np.ndarray:
    width = img.shape[1]
    return img[:, : width // 2] if side == "left" else img[:, width // 2 :]


def clean_label(pair: Pair) -> str:
    """Where the clean image of ``pair`` is, for messages: its file, and which half of it."""
    return f"{pair.target} ({pair.crop[1]} half)" if pair.crop is not None else str(pair.target)


def load_clean(pair: Pair) -> np.ndarray:
    """The clean image of ``pair`` alone, as :func:`read_scored` gives it (its rainy file is not read)."""
    clean = read_scored(pair.target)
    if pair.crop is None:
        return clean
    check_pair_sizes(pair, _size(clean), _size(clean))
    return _half(clean, pair.crop[1], pair.target)


def _grey_to_rgb(img: np.ndarray) -> np.ndarray:
    """Three equal channels, as Pillow converts grey to RGB."""
    return np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img


def load_pair(pair: Pair, read: Callable[[Path], np.ndarray] = read_rgb, *,
              scored: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(rainy, clean) of equal size, as ``read`` gives them (uint8 RGB HxWx3 by default;
    :func:`read_training` for training); with ``scored``, clean as :func:`read_scored` gives it
    (HxW for grey files)."""
    read_clean = read_scored if scored else read
    if pair.crop is not None:
        both = read_clean(pair.input)
        check_pair_sizes(pair, _size(both), _size(both))
        return _grey_to_rgb(_half(both, pair.crop[0], pair.input)), _half(both, pair.crop[1], pair.input)
    rainy, clean = read(pair.input), read_clean(pair.target)
    check_pair_sizes(pair, _size(rainy), _size(clean))
    return rainy, clean

"""Reading and writing users' photos as they come.

``read_photo`` turns any file Pillow can open into a :class:`Photo`: float32 RGB in
[0, 1] plus everything needed to write the result back faithfully (alpha, bit depth,
grayscale-ness, ICC profile, EXIF).  ``write_photo`` writes such a photo atomically.

What is kept, and how
---------------------
* **EXIF orientation** is applied to the pixels on read (same transforms as
  ``PIL.ImageOps.exif_transpose``) and the Orientation tag is then set to 1 in the kept
  EXIF.  The original EXIF bytes are kept verbatim apart from that one value (patched in
  place, so maker notes and their offsets survive); only when the EXIF block cannot be
  parsed is it re-serialised by Pillow.  For TIFF inputs, whose "EXIF" is the TIFF
  directory itself, the descriptive tags and the Exif sub-directory are carried over.
* **ICC profiles** are kept and re-embedded.  CMYK inputs are converted to sRGB through
  their embedded profile (LittleCMS via ``PIL.ImageCms``) and written with an sRGB
  profile; without a profile Pillow's plain CMYK->RGB conversion is used.
* **Alpha** (RGBA, LA, PA, palette or ``tRNS`` transparency) is split off, passed
  through untouched and re-attached on write (JPEG cannot store alpha: it is dropped).
* **Bit depth.** 16-bit inputs are read at full 16-bit precision and written back as
  16-bit PNGs.  Pillow 13 has no 16-bit RGB mode: it reads 16-bit RGB(A) PNG/TIFF as
  8-bit (keeping only the high bytes) and cannot write them.  We therefore let Pillow's
  own C decoder run a second time with the byte order of the raw mode swapped, which
  yields the low bytes (unfiltering, interlacing and TIFF compression all still handled
  by Pillow/libtiff); 16-bit gray+alpha PNGs are decoded once as raw bytes.  16-bit
  PNGs are written by a small PNG encoder in this module (IHDR, iCCP, eXIf, IDAT with
  per-row adaptive filters, IEND).  Mode ``I`` (32-bit integer) images are taken as
  16-bit data (clipped to 0..65535, with a note); mode ``F`` is taken as [0, 1] data and written as
  16-bit.  16-bit data written as JPEG/WebP is reduced to 8 bits; 16-bit TIFF output is
  kept for grayscale (``I;16``) but reduced to 8 bits for colour (Pillow cannot write
  16-bit RGB TIFF).
* **Grayscale** inputs (1, L, LA, I;16, I, F) are expanded to three equal channels for
  the network and converted back with the ITU-R 601 weights (as Pillow's ``L`` mode).
* Multi-frame files (GIF, APNG, multi-page TIFF): the first frame only (``Photo.frames``
  says how many there were; ``derain_files`` notes it).  XMP, text
  chunks, DPI and other metadata are not carried over.

Huge images
-----------
Pillow's decompression-bomb guard (a warning above ~89 Mpx, an error above ~179 Mpx) is
replaced by our own limit: images up to :data:`DEFAULT_MAX_PIXELS` (300 Mpx, e.g. a
20000 x 15000 panorama) are accepted; above it ``read_photo`` raises an
:class:`ImageReadError` before decoding anything.  Override it per call with
``max_pixels=`` (``0`` = no limit) or process-wide with the environment variable
``NERDRAIN_MAX_PIXELS``.  Note that inference needs roughly 35 bytes per pixel of host
memory (float32 copies of the input and the output; 34 measured for a 6000 x 4000 photo),
i.e. ~10 GB at 300 Mpx.  The dataset readers (:mod:`nerdrain.data.pairs`) and training's
check of its files open images through :func:`open_image`, under the same limit.

Quantisation is round-half-up after clipping to [0, 1]: ``floor(x * (2**bits - 1) + 0.5)``.
"""

from __future__ import annotations

import dataclasses
import io
import os
import stat
import struct
import sys
import threading
import warnings
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, TiffTags, UnidentifiedImageError

from .files import atomic_write, broken_link, same_file

__all__ = [
    "DATASET_EXTENSIONS",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageReadError",
    "ImageWriteError",
    "Photo",
    "WRITE_FORMATS",
    "apply_orientation",
    "check_writable_size",
    "fit_metadata",
    "format_for_path",
    "open_image",
    "photo_from_pil",
    "photo_to_pil",
    "quantize",
    "read_photo",
    "resolve_max_pixels",
    "rgb_to_gray",
    "save_png",
    "write_photo",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Extensions of the files taken as photos when a folder is given to derain (case-insensitive).
#: Phone formats Pillow may lack a reader for (HEIC, AVIF before Pillow 11.2) are listed too: such
#: a photo is named with its problem, not passed over as if the folder held none.
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".ppm", ".pgm", ".pnm", ".tga",
     ".apng", ".avif", ".heic", ".heif"}
)
#: Those of dataset folders (pairs, clean photos, predictions): the formats benchmarks come in.
#: Narrower on purpose: a stray ``a.gif`` preview beside ``a.png`` must not make pairs ambiguous.
DATASET_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})

#: Largest image (in pixels) ``read_photo`` accepts unless told otherwise.
DEFAULT_MAX_PIXELS = 300_000_000

#: Output suffix -> Pillow format name.
WRITE_FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".jpe": "JPEG",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}

_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_ORIENTATION_TAG = 0x0112
_EXIF_HEADER = b"Exif\x00\x00"
_PIL_GLOBALS_LOCK = threading.Lock()


class ImageReadError(ValueError):
    """A file could not be read as an image.  ``str()`` is one line: ``"<path>: <reason>"``."""

    def __init__(self, path: PathLike, reason: str):
        self.path = str(path)
        self.reason = " ".join(str(reason).split())
        super().__init__(f"{self.path}: {self.reason}")


class ImageWriteError(ValueError):
    """An image could not be written.  ``str()`` is one line: ``"<path>: <reason>"``."""

    def __init__(self, path: PathLike, reason: str):
        self.path = str(path)
        self.reason = " ".join(str(reason).split())
        super().__init__(f"{self.path}: {self.reason}")


@dataclass
class Photo:
    """A decoded photo plus what is needed to write the result back faithfully.

    ``rgb`` is float32 HxWx3 in [0, 1] (grayscale images are replicated to three
    channels); ``alpha`` is float32 HxW in [0, 1] or ``None``; ``bit_depth`` is 8 or 16;
    ``mode`` the original Pillow mode; ``grayscale`` whether to write back one channel.
    To write a result, replace the pixels: ``dataclasses.replace(photo, rgb=out)``.
    """

    rgb: np.ndarray
    alpha: np.ndarray | None = None
    bit_depth: int = 8
    mode: str = "RGB"
    grayscale: bool = False
    icc_profile: bytes | None = None
    exif: bytes | None = None
    format: str | None = None
    frames: int = 1  # frames (or pages) in the file; only the first is read
    notes: tuple[str, ...] = ()  # what could not be kept as it was (for the user, one line each)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return int(self.rgb.shape[1]), int(self.rgb.shape[0])


# --------------------------------------------------------------------------- helpers


def quantize(x: np.ndarray, bits: int, *, scratch: bool = False) -> np.ndarray:
    """Clip to [0, 1] and round half up to ``bits`` (8 -> uint8, 16 -> uint16), C-contiguous.

    In float32 arithmetic: ``floor(clip(x) * maxv + 0.5)``; NaN counts as 0, infinities clip.
    A large photo has one float32 working copy, made by the clipping (``scratch``: ``x`` is a
    float32 array the caller no longer needs, which then serves as that copy).
    """
    maxv = (1 << bits) - 1
    owned = isinstance(x, np.ndarray) and x.dtype != np.float32  # converted below into a fresh array
    x = np.asarray(x, dtype=np.float32)
    work = x if (owned or scratch) and x.flags.writeable else None
    # fmax/fmin, unlike clip, take the bound over a NaN: NaN -> 0 with no isnan pass or extra copy.
    y = np.fmax(x, np.float32(0.0), out=work)
    np.fmin(y, np.float32(1.0), out=y)
    y *= np.float32(maxv)
    y += np.float32(0.5)  # now >= 0.5, so the cast's truncation is the floor
    return y.astype(np.uint8 if bits <= 8 else np.uint16, order="C")


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma (Pillow's ``L`` conversion weights) of an HxWx3 float array."""
    rgb = np.asarray(rgb, dtype=np.float32)
    return rgb[..., 0] * _LUMA[0] + rgb[..., 1] * _LUMA[1] + rgb[..., 2] * _LUMA[2]


def apply_orientation(a: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1..8) to an HxW[xC] array, like ``exif_transpose``."""
    if orientation == 2:  # FLIP_LEFT_RIGHT
        a = a[:, ::-1]
    elif orientation == 3:  # ROTATE_180
        a = a[::-1, ::-1]
    elif orientation == 4:  # FLIP_TOP_BOTTOM
        a = a[::-1]
    elif orientation == 5:  # TRANSPOSE
        a = np.swapaxes(a, 0, 1)
    elif orientation == 6:  # ROTATE_270 (i.e. 90 degrees clockwise)
        a = np.rot90(a, -1)
    elif orientation == 7:  # TRANSVERSE
        a = np.swapaxes(a, 0, 1)[::-1, ::-1]
    elif orientation == 8:  # ROTATE_90 (counter-clockwise)
        a = np.rot90(a, 1)
    return np.ascontiguousarray(a)


def format_for_path(path: PathLike) -> str:
    """Pillow format name for an output path's suffix (``.png`` -> ``"PNG"``)."""
    suffix = Path(path).suffix.lower()
    try:
        return WRITE_FORMATS[suffix]
    except KeyError:
        known = ", ".join(sorted(WRITE_FORMATS))
        raise ImageWriteError(path, f"unsupported output format {suffix or '(no suffix)'!r} (use one of {known})") from None


#: Largest side each output format can store (libwebp's limit; JPEG's 16-bit size fields).
_MAX_SIDE = {"WEBP": 16383, "JPEG": 65535}


def check_writable_size(path: PathLike, width: int, height: int) -> None:
    """Refuse, before any work, an image too large for the format its output path asks for."""
    fmt = format_for_path(path)
    limit = _MAX_SIDE.get(fmt)
    if limit is not None and max(width, height) > limit:
        raise ImageWriteError(path, f"{width}x{height} is too large for {fmt} (at most {limit} pixels a side); "
                              "write PNG or TIFF instead")


#: Largest EXIF block (with its "Exif\0\0" header) a JPEG can carry: one APP1 segment of 65535
#: bytes, less its 2-byte length.
_JPEG_MAX_EXIF = 65533


def _exif_block(exif: bytes | None) -> bytes | None:
    """EXIF as a JPEG's APP1 segment holds it, after the ``Exif\0\0`` header: Pillow writes a
    JPEG's EXIF as given, and WebP files give theirs without it (the PNG, WebP and TIFF writers
    take either)."""
    if not exif:
        return None
    return exif if exif.startswith(_EXIF_HEADER) else _EXIF_HEADER + exif


def _written_bits(photo: Photo, fmt: str) -> int:
    """16 where ``fmt`` can store the photo's 16 bits (PNG; TIFF for grey without alpha, as Pillow
    writes no other 16-bit TIFF), else 8."""
    if photo.bit_depth <= 8 or fmt in ("JPEG", "WEBP"):
        return 8
    if fmt == "TIFF" and not (photo.grayscale and photo.alpha is None):
        return 8
    return 16


def fit_metadata(photo: Photo, path: PathLike) -> Photo:
    """``photo`` without what the output format cannot store, with a note saying so each (rather
    than failing the file, or losing it unsaid): EXIF over a JPEG's 64 KB, alpha in a JPEG, 16 bits
    where only 8 can be written."""
    fmt = format_for_path(path)
    exif = _exif_block(photo.exif)
    notes = list(photo.notes)
    if fmt == "JPEG" and exif and len(exif) > _JPEG_MAX_EXIF:
        notes.append(f"its EXIF ({len(exif):,} bytes) is more than a JPEG holds (64 KB): not kept")
        photo = dataclasses.replace(photo, exif=None)
    if fmt == "JPEG" and photo.alpha is not None:  # dropped; worth a word where not all opaque
        if np.min(photo.alpha) < 1:
            notes.append("its transparency (alpha) cannot be stored in a JPEG: not kept (write PNG, WebP or TIFF)")
        photo = dataclasses.replace(photo, alpha=None)
    if _written_bits(photo, fmt) < photo.bit_depth:
        notes.append(f"its 16 bits per sample are written as 8 in this {fmt} (write PNG to keep them)")
        photo = dataclasses.replace(photo, bit_depth=8)
    return dataclasses.replace(photo, notes=tuple(notes))


def resolve_max_pixels(max_pixels: int | None) -> int:
    """The pixel limit ``read_photo`` applies: ``max_pixels``, else ``NERDRAIN_MAX_PIXELS``,
    else :data:`DEFAULT_MAX_PIXELS` (0: no limit)."""
    if max_pixels is None:
        env = os.environ.get("NERDRAIN_MAX_PIXELS", "").strip()
        if not env:
            return DEFAULT_MAX_PIXELS
        try:
            return int(float(env))
        except ValueError:
            raise ValueError(f"NERDRAIN_MAX_PIXELS={env!r} is not a number of pixels") from None
    return int(max_pixels)


# --------------------------------------------------------------------------- EXIF


def _exif_reset_orientation(raw: bytes) -> bytes | None:
    """Return ``raw`` with the IFD0 Orientation value set to 1, patched in place.

    Returns None when the block cannot be parsed (the caller then re-serialises).
    """
    data = bytearray(raw)
    base = len(_EXIF_HEADER) if data.startswith(_EXIF_HEADER) else 0
    head = bytes(data[base : base + 4])
    if head == b"II*\x00":
        e = "<"
    elif head == b"MM\x00*":
        e = ">"
    else:
        return None
    try:
        (ifd,) = struct.unpack_from(e + "I", data, base + 4)
        (n,) = struct.unpack_from(e + "H", data, base + ifd)
        for i in range(n):
            off = base + ifd + 2 + 12 * i
            tag, typ, count = struct.unpack_from(e + "HHI", data, off)
            if tag == _ORIENTATION_TAG:
                if count != 1 or typ not in (3, 4):  # SHORT or LONG
                    return None
                struct.pack_into(e + ("H" if typ == 3 else "I"), data, off + 8, 1)
                break
    except struct.error:
        return None
    return bytes(data)


_TIFF_DESCRIPTIVE_TAGS = (
    0x010E,  # ImageDescription
    0x010F,  # Make
    0x0110,  # Model
    0x0131,  # Software
    0x0132,  # DateTime
    0x013B,  # Artist
    0x8298,  # Copyright
)


def _extract_exif(img: Image.Image, reset: bool) -> tuple[int, bytes | None, str | None]:
    """(orientation, EXIF bytes to keep, what went wrong or None).  ``reset``: the caller applies
    the orientation to the pixels, so the kept Orientation becomes 1; else it stays as it was."""
    unreadable = None
    try:
        exif = img.getexif()
        orientation = int(exif.get(_ORIENTATION_TAG, 1) or 1)
    except Exception:  # noqa: BLE001 - Pillow raises many types for malformed EXIF
        exif, orientation = None, 1
        unreadable = "its EXIF could not be read" + (": orientation not applied" if reset else "")
    if orientation not in range(1, 9):
        orientation = 1
    raw = img.info.get("exif")
    if isinstance(raw, (bytes, bytearray)) and raw:
        patched = _exif_reset_orientation(bytes(raw)) if reset else bytes(raw)
        if patched is not None:
            return orientation, patched, unreadable
    if exif is None:
        return orientation, None, unreadable and unreadable + ", EXIF not kept"
    if len(exif) == 0:
        return orientation, None, None
    try:
        if (img.format or "").upper() == "TIFF":
            # The TIFF directory is not EXIF: keep only descriptive tags + Exif IFD.
            new = Image.Exif()
            for tag in _TIFF_DESCRIPTIVE_TAGS:
                if tag in exif:
                    new[tag] = exif[tag]
            sub = exif.get_ifd(0x8769)
            if sub:
                new[0x8769] = sub
            if _ORIENTATION_TAG in exif:
                new[_ORIENTATION_TAG] = 1 if reset else exif[_ORIENTATION_TAG]
            if len(new) == 0:
                return orientation, None, None
            return orientation, new.tobytes(), None
        if reset and _ORIENTATION_TAG in exif:
            exif[_ORIENTATION_TAG] = 1
        return orientation, exif.tobytes(), None
    except Exception:  # noqa: BLE001 - as above, when writing the EXIF back
        return orientation, None, "its EXIF could not be re-encoded: not kept"


# --------------------------------------------------------------------------- reading


def _swap16(rawmode: str) -> str | None:
    """'RGB;16B' -> 'RGB;16L' etc.; native ('N' / none) resolved for this machine."""
    base, sep, suffix = rawmode.rpartition(";16")
    if not sep or suffix not in ("", "B", "L", "N"):
        return None
    order = suffix or "N"
    if order == "N":
        order = "L" if sys.byteorder == "little" else "B"
    return f"{base};16{'B' if order == 'L' else 'L'}"


def _tile_rawmode(tile) -> str | None:
    args = tile[3]
    if isinstance(args, str):
        return args
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        return args[0]
    return None


def stores_16_bits(img: Image.Image) -> bool:
    """16 bits per sample, which Pillow reads as 8-bit RGB(A) (high bytes only) for colour and
    grey+alpha files (raw modes ``RGB;16B``, ``LA;16B``, ...) and as ``I;16`` for grey ones."""
    if img.mode.startswith("I;16"):
        return True
    return any((_tile_rawmode(t) or "").startswith((f"{img.mode};16", "LA;16")) for t in img.tile)


def _with_rawmode(tile, rawmode: str):
    args = tile[3]
    new_args = rawmode if isinstance(args, str) else (rawmode, *args[1:])
    if hasattr(tile, "_replace"):
        return tile._replace(args=new_args)
    return (tile[0], tile[1], tile[2], new_args, *tile[4:])


def _decode_16bit(path: Path, img: Image.Image) -> np.ndarray | None:
    """Full-precision pixels (uint16 HxWxC) of a 16-bit RGB/RGBA/LA file Pillow reads as 8-bit.

    Returns None when the file is not such a file (or this Pillow exposes it differently).
    ``img`` is freshly opened and not yet loaded; it is loaded here (high bytes).
    """
    if img.mode not in ("RGB", "RGBA") or not img.tile:
        return None
    rawmodes = {_tile_rawmode(t) for t in img.tile}
    if len(rawmodes) != 1:
        return None
    (rawmode,) = rawmodes
    if rawmode is None:
        return None
    if rawmode == "LA;16B" and img.format == "PNG":
        # 4 bytes per pixel: decode them verbatim as RGBA = (G hi, G lo, A hi, A lo).
        img.tile = [_with_rawmode(t, "RGBA") for t in img.tile]
        img.load()
        b = np.asarray(img).astype(np.uint16)
        return np.stack([(b[..., 0] << 8) | b[..., 1], (b[..., 2] << 8) | b[..., 3]], axis=-1)
    if not rawmode.startswith(img.mode + ";16"):
        return None
    low_mode = _swap16(rawmode)
    if low_mode is None:
        return None
    img.load()
    hi = np.asarray(img).astype(np.uint16)
    with open(path, "rb") as fh, Image.open(fh) as img2:  # a file object, as in _read_locked
        if img2.mode != img.mode or {_tile_rawmode(t) for t in img2.tile} != {rawmode}:
            return None
        img2.tile = [_with_rawmode(t, low_mode) for t in img2.tile]
        img2.load()
        lo = np.asarray(img2).astype(np.uint16)
    return (hi << 8) | lo


def _transparency_mask(values: np.ndarray, key) -> np.ndarray | None:
    """Alpha (float32) from a tRNS-style colour key, or None."""
    if key is None or isinstance(key, bytes):
        return None
    key_arr = np.asarray(key).reshape(-1)
    if values.ndim == 2:
        if key_arr.size != 1:
            return None
        hit = values == key_arr[0]
    else:
        if key_arr.size != values.shape[-1]:
            return None
        hit = np.all(values == key_arr, axis=-1)
    return np.where(hit, np.float32(0.0), np.float32(1.0))


def _cmyk_to_rgb(img: Image.Image, icc: bytes | None) -> tuple[Image.Image, bytes | None, str | None]:
    """RGB through the file's CMYK profile where it can be used (sRGB profile attached), else a
    naive conversion (and a note saying so): a CMYK profile must not be attached to RGB."""
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
            out = ImageCms.profileToProfile(img, src, srgb, outputMode="RGB")
            if out is not None:
                return out, srgb.tobytes(), None
        except Exception:  # noqa: BLE001 - littleCMS raises PyCMSError, OSError, ...
            return img.convert("RGB"), None, "its CMYK colour profile could not be applied: colours converted naively"
    return img.convert("RGB"), None, None


def _clipped(raw: np.ndarray, low: float, high: float, which: str, notes: list[str]) -> np.ndarray:
    """``raw`` clipped to [low, high], with a note where that changed any pixel ("N% of its
    ``which`` and were clipped"): they would come out white or black without a word."""
    outside = float(np.mean((raw < low) | (raw > high)))
    if outside:
        notes.append(f"{outside:.1%} of its {which} and were clipped")
    return np.clip(raw, low, high)


def photo_from_pil(
    img: Image.Image,
    *,
    apply_exif_orientation: bool = False,
    _pixels16: np.ndarray | None = None,
) -> Photo:
    """Convert a (loaded) Pillow image into a :class:`Photo`.

    ``apply_exif_orientation`` rotates the pixels as the EXIF orientation says (done by
    :func:`read_photo`; off for in-memory images so the caller's geometry is kept).
    The kept EXIF says 1 for the orientation only when it was applied.
    """
    mode = img.mode
    icc = img.info.get("icc_profile") or None
    orientation, exif, exif_note = _extract_exif(img, reset=apply_exif_orientation)
    notes = [exif_note] if exif_note else []
    if not apply_exif_orientation:
        orientation = 1
    alpha = None
    bit_depth = 8
    grayscale = mode in _GRAY_MODES
    transparency = img.info.get("transparency")

    if _pixels16 is not None:
        bit_depth = 16
        p = _pixels16.astype(np.float32) / np.float32(65535.0)
        if p.shape[-1] == 2:  # 16-bit gray + alpha
            grayscale = True
            rgb = np.repeat(p[..., :1], 3, axis=-1)
            alpha = p[..., 1]
        else:
            rgb = p[..., :3]
            if p.shape[-1] == 4:
                alpha = p[..., 3]
            else:
                alpha = _transparency_mask(_pixels16, transparency)
    elif mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        bit_depth = 16
        raw = np.asarray(img)
        if mode == "I":
            raw = _clipped(raw, 0, 65535, "32-bit integer pixels lie outside 0..65535", notes)
        g = raw.astype(np.float32) / np.float32(65535.0)
        rgb = np.repeat(g[..., None], 3, axis=-1)
        alpha = _transparency_mask(raw, transparency)
    elif mode == "F":
        bit_depth = 16
        raw = np.nan_to_num(np.asarray(img, dtype=np.float32))
        g = _clipped(raw, 0.0, 1.0, "float pixels lie outside [0, 1]", notes)
        rgb = np.repeat(g[..., None], 3, axis=-1)
    elif mode in ("1", "L"):
        raw = np.asarray(img.convert("L"))
        rgb = np.repeat((raw.astype(np.float32) / 255.0)[..., None], 3, axis=-1)
        alpha = _transparency_mask(raw, transparency if mode == "L" else None)
        if alpha is None and mode == "1" and transparency is not None:
            alpha = _transparency_mask(raw, 255 if transparency else 0)
    elif mode in ("LA", "La"):
        la = np.asarray(img.convert("LA")).astype(np.float32) / 255.0
        rgb = np.repeat(la[..., :1], 3, axis=-1)
        alpha = la[..., 1]
    elif mode == "CMYK":
        rgb_img, icc, cmyk_note = _cmyk_to_rgb(img, icc)
        notes += [cmyk_note] if cmyk_note else []
        rgb = np.asarray(rgb_img).astype(np.float32) / 255.0
    else:
        has_alpha = mode in ("RGBA", "RGBa", "PA") or (mode in ("P", "RGB") and transparency is not None)
        conv = img.convert("RGBA") if has_alpha else img.convert("RGB")
        a = np.asarray(conv).astype(np.float32) / 255.0
        rgb = a[..., :3]
        alpha = a[..., 3] if has_alpha else None

    rgb = apply_orientation(np.asarray(rgb, dtype=np.float32), orientation)
    if alpha is not None:
        alpha = apply_orientation(np.asarray(alpha, dtype=np.float32), orientation)
    return Photo(
        rgb=np.ascontiguousarray(rgb, dtype=np.float32),
        alpha=alpha,
        bit_depth=bit_depth,
        mode=mode,
        grayscale=grayscale,
        icc_profile=bytes(icc) if icc else None,
        exif=exif,
        format=img.format,
        notes=tuple(notes),
    )


def _decode_reason(err: BaseException) -> str:
    msg = " ".join(str(err).split())
    low = msg.lower()
    if "truncated" in low or "premature end" in low or "unexpected end" in low:
        return f"truncated image file ({msg})" if msg else "truncated image file"
    if isinstance(err, MemoryError):
        return "not enough memory to decode the image"
    return f"cannot decode image ({type(err).__name__}: {msg})" if msg else f"cannot decode image ({type(err).__name__})"


def read_photo(path: PathLike, *, max_pixels: int | None = None, apply_orientation: bool = True) -> Photo:
    """Read a photo file as a :class:`Photo` (see the module docstring for what is kept).

    ``max_pixels``: refuse larger images (None: :data:`DEFAULT_MAX_PIXELS` or the
    ``NERDRAIN_MAX_PIXELS`` environment variable; 0: no limit). ``apply_orientation=False`` leaves
    the pixels as Pillow decodes them (it applies a TIFF's own orientation, not a PNG's or JPEG's
    EXIF), as the dataset readers of :mod:`nerdrain.data.pairs` take 8-bit files.
    Raises :class:`ImageReadError` for missing, unreadable, non-image, truncated or
    too-large files; the pixels are fully decoded here so truncation is caught here.
    """
    p = Path(path)
    limit = resolve_max_pixels(max_pixels)
    if not p.exists():
        raise ImageReadError(path, broken_link(p) or "no such file")
    if p.is_dir():
        raise ImageReadError(path, "is a directory, not an image file")
    try:
        info = p.stat()
    except OSError as e:
        raise ImageReadError(path, f"cannot access file ({e.strerror or e})") from None
    if not stat.S_ISREG(info.st_mode):  # a pipe's size reads 0, and opening one may wait forever
        kind = "a pipe" if stat.S_ISFIFO(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode) else "a device"
        raise ImageReadError(path, f"{kind}, not a file: save the image to a file first")
    if info.st_size == 0:
        raise ImageReadError(path, "empty file")

    with _without_pillow_guard(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        photo = _read_locked(p, path, limit, apply_orientation)
    return _warnings_as_notes(photo, caught)


@contextmanager
def _without_pillow_guard() -> Iterator[None]:
    """Pillow's decompression-bomb guard (~179 Mpx, a module global) off: our pixel limit
    (:func:`resolve_max_pixels`) replaces it. Other threads' reads wait meanwhile."""
    with _PIL_GLOBALS_LOCK:
        old_limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = old_limit


def _pixel_count(pixels: int) -> str:
    """A pixel count in words: megapixels from one million up, else the count itself (a limit of
    479 pixels is not "0 megapixels")."""
    if pixels < 1_000_000:
        return f"{pixels} pixels"
    return f"{pixels / 1e6:.1f}".rstrip("0").rstrip(".") + " megapixels"


def _check_pixel_limit(path: PathLike, width: int, height: int, limit: int) -> None:
    if limit > 0 and width * height > limit:
        raise ImageReadError(
            path,
            f"image too large: {width}x{height} = {_pixel_count(width * height)} exceeds the limit of "
            f"{_pixel_count(limit)} (raise it with NERDRAIN_MAX_PIXELS, or max_pixels= where a function takes it)",
        )


@contextmanager
def open_image(path: PathLike) -> Iterator[Image.Image]:
    """``Image.open(path)`` (its header read, its pixels not yet) under :func:`read_photo`'s pixel
    limit instead of Pillow's guard, refused with read_photo's :class:`ImageReadError` above it: the
    dataset readers and training's start check take exactly the images read_photo takes."""
    limit = resolve_max_pixels(None)
    with _without_pillow_guard():
        img = Image.open(path)
    with img:
        _check_pixel_limit(path, *img.size, limit)
        yield img


def _warnings_as_notes(photo: Photo, caught: list[warnings.WarningMessage]) -> Photo:
    """What Pillow warned while reading a file (corrupt EXIF, say: plain ``UserWarning``s) as the
    photo's notes: a warning names Pillow's source line, not the photo, so in a batch no one could
    tell which file it meant. Other warnings (about code, or an unclosed file the garbage collector
    came upon meanwhile) are passed on as they came, to the usual filters."""
    notes = []
    for w in caught:
        if issubclass(w.category, UserWarning):
            notes.append("the image library warned: " + " ".join(str(w.message).split()))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not notes:
        return photo
    return dataclasses.replace(photo, notes=tuple(dict.fromkeys((*photo.notes, *notes))))


def _read_locked(p: Path, path: PathLike, limit: int, apply_orientation: bool) -> Photo:
    # Opened from a file object, not the path: given a path, Pillow memory-maps uncompressed
    # single-strip images, and for a TIFF whose orientation swaps the sides (5 to 8) it maps the
    # strip with the swapped size, scrambling the pixels.
    try:
        fh = open(p, "rb")
    except PermissionError:
        raise ImageReadError(path, "permission denied") from None
    except OSError as e:
        raise ImageReadError(path, f"cannot open file ({e.strerror or e})") from None
    with fh:
        return _read_open(fh, p, path, limit, apply_orientation)


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")  # little- and big-endian


def _tiff_problem(fh) -> str:
    """Why Pillow could not open a file that starts as a TIFF: a sample layout it has no mode for,
    or a damaged file (which no re-saving with other samples would mend)."""
    from PIL import TiffImagePlugin

    problem = _reader_says(TiffImagePlugin.TiffImageFile, fh)
    if problem == "unknown pixel mode":
        return "a TIFF whose pixel format cannot be read (floating-point colour, say): save it with 8 or 16 bits per sample"
    return f"a damaged TIFF ({problem})"


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Bit depths each PNG colour type allows (PNG specification, table 11.1).
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


def _png_problem(fh) -> str:
    """Why Pillow could not open a file that starts as a PNG, read from its chunks up to the
    first IDAT: Pillow only says it cannot identify it, as of a file that is no image at all."""
    fh.seek(len(_PNG_SIGNATURE))
    first = True
    while True:
        head = fh.read(8)
        if len(head) < 8:
            return "a truncated PNG (it ends before its pixels)"
        length, kind = struct.unpack(">I4s", head)
        data, crc = fh.read(length), fh.read(4)
        if len(data) < length or len(crc) < 4:
            return "a truncated PNG (it ends before its pixels)"
        name = kind.decode("latin-1")
        if struct.unpack(">I", crc)[0] != zlib.crc32(kind + data):
            return f"a damaged PNG (its {name} chunk fails its checksum)"
        if first and kind != b"IHDR":
            return f"a damaged PNG (its first chunk is {name!r}, not its header IHDR)"
        first = False
        if kind == b"IHDR" and length >= 10:
            width, height, depth, colour = struct.unpack(">IIBB", data[:10])
            if not width or not height:
                return f"a damaged PNG (its header gives it {width}x{height} pixels)"
            if depth not in _PNG_DEPTHS.get(colour, ()):
                return f"a damaged PNG (bit depth {depth} with colour type {colour} is no PNG pixel format)"
        if kind in (b"IDAT", b"IEND"):
            break
    from PIL import PngImagePlugin

    return f"a damaged PNG ({_reader_says(PngImagePlugin.PngImageFile, fh)})"


def _reader_says(reader, fh) -> str:
    """What one Pillow format reader says of the file, as one line: Image.open tries them all and
    says only that none identified it."""
    fh.seek(0)
    try:
        reader(fh).close()
        return "cannot identify image file"
    except Exception as e:  # noqa: BLE001 - what the reader says is the reason, whatever its type
        return " ".join(str(e).split()) or type(e).__name__


def _read_open(fh, p: Path, path: PathLike, limit: int, apply_orientation: bool) -> Photo:
    try:
        img = Image.open(fh)
    except UnidentifiedImageError:
        fh.seek(0)
        magic = fh.read(len(_PNG_SIGNATURE))
        if magic[:4] in _TIFF_MAGIC:
            raise ImageReadError(path, _tiff_problem(fh)) from None
        if magic == _PNG_SIGNATURE:
            raise ImageReadError(path, _png_problem(fh)) from None
        suffix = p.suffix.lower()
        if suffix in IMAGE_EXTENSIONS and suffix not in Image.registered_extensions():
            raise ImageReadError(path, f"cannot read {suffix} files: this Pillow has no reader for them "
                                       "(convert them to JPEG or PNG)") from None
        raise ImageReadError(path, "not an image (cannot identify image file)") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error) as e:
        raise ImageReadError(path, _decode_reason(e)) from None
    with img:
        w, h = img.size
        if w < 1 or h < 1:
            raise ImageReadError(path, f"image has no pixels ({w}x{h})")
        _check_pixel_limit(path, w, h, limit)
        try:
            pixels16 = _decode_16bit(p, img)
            img.load()
            photo = photo_from_pil(img, apply_exif_orientation=apply_orientation, _pixels16=pixels16)
            return dataclasses.replace(photo, frames=max(1, int(getattr(img, "n_frames", 1))))
        except ImageReadError:
            raise
        except MemoryError:
            raise ImageReadError(path, f"not enough memory to decode a {w}x{h} image") from None
        except (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, zlib.error) as e:
            raise ImageReadError(path, _decode_reason(e)) from None


# --------------------------------------------------------------------------- writing


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    a16, b16, c16 = a.astype(np.int16), b.astype(np.int16), c.astype(np.int16)
    p = a16 + b16 - c16
    pa, pb, pc = np.abs(p - a16), np.abs(p - b16), np.abs(p - c16)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def _filter_rows(rows: np.ndarray, prev: np.ndarray, bpp: int) -> np.ndarray:
    """Adaptive PNG filtering (libpng's minimum-sum-of-absolute-differences heuristic).

    ``rows``: uint8 (n, stride) raw scanlines; ``prev``: the scanline above the first.
    Returns uint8 (n, 1 + stride) with the filter type byte first.
    """
    up = np.concatenate([prev[None], rows[:-1]], axis=0)
    left = np.zeros_like(rows)
    left[:, bpp:] = rows[:, :-bpp]
    upleft = np.zeros_like(rows)
    upleft[:, bpp:] = up[:, :-bpp]
    cands = np.stack(
        [
            rows,
            rows - left,
            rows - up,
            rows - ((left.astype(np.uint16) + up) >> 1).astype(np.uint8),
            rows - _paeth(left, up, upleft),
        ]
    )
    score = np.abs(cands.view(np.int8).astype(np.int32)).sum(axis=2)  # (5, n)
    best = np.argmin(score, axis=0)
    out = np.empty((rows.shape[0], rows.shape[1] + 1), dtype=np.uint8)
    out[:, 0] = best
    out[:, 1:] = cands[best, np.arange(rows.shape[0])]
    return out


def _write_png16(fp, samples: np.ndarray, icc: bytes | None, exif: bytes | None) -> None:
    """Write a 16-bit PNG.  ``samples``: uint16 HxW (gray) or HxWxC, C in 1..4."""
    if samples.ndim == 2:
        samples = samples[..., None]
    h, w, c = samples.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    fp.write(b"\x89PNG\r\n\x1a\n")
    fp.write(_png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)))
    if icc:
        fp.write(_png_chunk(b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(icc)))
    if exif:
        if exif.startswith(_EXIF_HEADER):
            exif = exif[len(_EXIF_HEADER) :]
        fp.write(_png_chunk(b"eXIf", exif))
    bpp = 2 * c
    stride = w * bpp
    be = samples.astype(">u2", copy=False)
    comp = zlib.compressobj(6)
    prev = np.zeros(stride, dtype=np.uint8)
    pending = bytearray()
    block = max(1, (4 << 20) // max(stride, 1))  # ~4 MiB of scanlines at a time
    for r0 in range(0, h, block):
        rows = np.ascontiguousarray(be[r0 : r0 + block]).view(np.uint8).reshape(-1, stride)
        pending += comp.compress(_filter_rows(rows, prev, bpp).tobytes())
        prev = rows[-1].copy()
        if len(pending) >= (1 << 20):
            fp.write(_png_chunk(b"IDAT", bytes(pending)))
            pending.clear()
    pending += comp.flush()
    fp.write(_png_chunk(b"IDAT", bytes(pending)))
    fp.write(_png_chunk(b"IEND", b""))


def _guard_paths(guard) -> list[Path]:
    if guard is None:
        return []
    if isinstance(guard, (str, os.PathLike)):
        return [Path(guard)]
    if isinstance(guard, Iterable):
        return [Path(g) for g in guard]
    return [Path(guard)]


def _output_planes(photo: Photo, fmt: str) -> tuple[np.ndarray, int, str]:
    """(uint samples HxW or HxWxC, bits, Pillow mode or 'PNG16') for a photo and format."""
    rgb = np.asarray(photo.rgb, dtype=np.float32)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"photo.rgb must be HxWx3, got shape {rgb.shape}")
    alpha = photo.alpha
    if alpha is not None:
        alpha = np.asarray(alpha, dtype=np.float32)
        if alpha.shape != rgb.shape[:2]:
            raise ValueError(f"photo.alpha shape {alpha.shape} does not match the image {rgb.shape[:2]}")
    if fmt == "JPEG":
        alpha = None
    bits = _written_bits(photo, fmt)
    gray = photo.grayscale and fmt != "WEBP"  # WebP has no grayscale mode
    planes = [rgb_to_gray(rgb)[..., None]] if gray else [rgb]
    if alpha is not None:
        planes.append(alpha[..., None])
    data = quantize(np.concatenate(planes, axis=-1), bits, scratch=True)  # a fresh array: worked on in place
    if fmt == "PNG" and bits == 16:
        return data, 16, "PNG16"
    if bits == 16:  # TIFF, gray, no alpha
        return data[..., 0], 16, "I;16"
    nch = data.shape[-1]
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[nch]
    if nch == 1:
        data = data[..., 0]
    return data, 8, mode


# What a TIFF's own directory says about its pixels (size, samples, strips, compression...). In
# EXIF copied from another format they describe that file, a phone's JPEG naming its stored size
# in IFD0, say: Pillow lets them override its own, so a turned photo was written with its sides
# swapped (or not at all). The writer sets them; the EXIF's are left out.
_TIFF_LAYOUT_TAGS = frozenset({
    0x00FE, 0x00FF, 0x0100, 0x0101, 0x0102, 0x0103, 0x0106, 0x010A, 0x0111, 0x0115, 0x0116, 0x0117,
    0x011C, 0x013D, 0x0140, 0x0142, 0x0143, 0x0144, 0x0145, 0x014A, 0x0152, 0x0153, 0x0201, 0x0202,
    0x0212, 0x0214,
})


def _tiff_params(exif: bytes | None) -> dict:
    """The EXIF (without layout tags) and compression for a TIFF: LZW, except for EXIF with
    sub-directories (Exif, GPS): Pillow compresses TIFFs with libtiff, which cannot write them (it
    fails the file), so those are written uncompressed, metadata kept."""
    if not exif:
        return {"compression": "tiff_lzw"}
    tags = Image.Exif()
    tags.load(exif)
    for tag in _TIFF_LAYOUT_TAGS & set(tags):
        del tags[tag]
    params: dict = {"compression": "raw" if any(tag in tags for tag in TiffTags.TAGS_V2_GROUPS) else "tiff_lzw"}
    if len(tags):
        params["exif"] = tags.tobytes()
    return params


def write_photo(
    path: PathLike,
    photo: Photo,
    *,
    overwrite_guard_path: PathLike | Iterable[PathLike] | None = None,
    quality: int = 95,
) -> Path:
    """Write ``photo`` to ``path`` atomically; the format comes from the suffix.

    PNG (default choice of callers), JPEG (``quality``, 4:4:4 chroma), WebP (``quality``)
    and TIFF (LZW; uncompressed where the EXIF has Exif or GPS sub-directories) are
    supported.  ICC profile and EXIF are embedded, alpha re-attached
    (not for JPEG), grayscale written as grayscale, 16-bit kept in PNG.  The file is
    written to a temporary file in the same folder and moved into place with
    ``os.replace``; on any error the temporary file is removed, so no partial output is
    left.  ``overwrite_guard_path`` (the input path, or several) may never be written:
    :class:`ImageWriteError` is raised instead.  Returns the path written.
    """
    out = Path(path)
    for g in _guard_paths(overwrite_guard_path):
        if same_file(out, g):
            raise ImageWriteError(path, f"refusing to overwrite the input file {g}")
    fmt = format_for_path(out)
    if out.is_dir():
        raise ImageWriteError(path, "is a directory")
    parent = out.parent
    if not parent.is_dir():
        raise ImageWriteError(path, f"output folder {parent} does not exist")

    data, bits, mode = _output_planes(photo, fmt)
    icc = photo.icc_profile or None
    exif = _exif_block(photo.exif)

    try:
        with atomic_write(out) as fp:
            if mode == "PNG16":
                _write_png16(fp, data, icc, exif)
            else:
                img = Image.fromarray(data)
                if img.mode != mode:
                    img = img.convert(mode)
                params: dict = {}
                if icc:
                    params["icc_profile"] = icc
                if exif:
                    params["exif"] = exif
                if fmt == "JPEG":
                    params.update(quality=quality, subsampling=0)
                elif fmt == "WEBP":
                    params.update(quality=quality)
                elif fmt == "TIFF":
                    params.pop("exif", None)
                    params.update(_tiff_params(exif))
                img.save(fp, format=fmt, **params)
    except ImageWriteError:
        raise
    except (PermissionError, FileExistsError) as e:  # creating the temporary file, or renaming it
        raise ImageWriteError(path, f"cannot write in {parent} ({e.strerror or e})") from None
    except OSError as e:  # e.filename would be the temporary file's: name the problem only
        raise ImageWriteError(path, f"cannot write image ({e.strerror or e})") from e
    except (ValueError, TypeError, struct.error, zlib.error) as e:
        raise ImageWriteError(path, f"cannot write image ({type(e).__name__}: {e})") from e
    return out


def save_png(image: np.ndarray, path: PathLike) -> Path:
    """An 8-bit array (HxWx3, or HxW grey) as a PNG, atomically: an interrupted run never leaves a
    truncated file under the final name. For photos with metadata: :func:`write_photo`."""
    path = Path(path)
    with atomic_write(path) as f:
        Image.fromarray(image).save(f, format="PNG")
    return path


def photo_to_pil(photo: Photo) -> Image.Image:
    """A Pillow image of a photo (8-bit, or ``I;16`` for 16-bit grayscale without alpha).

    16-bit colour is reduced to 8 bits (Pillow has no 16-bit RGB mode).  ICC profile and
    EXIF are put in ``info`` so ``img.save`` keeps them.
    """
    bits = 16 if photo.bit_depth > 8 and photo.grayscale and photo.alpha is None else 8
    gray = photo.grayscale
    planes = [rgb_to_gray(photo.rgb)[..., None]] if gray else [np.asarray(photo.rgb, dtype=np.float32)]
    if photo.alpha is not None:
        planes.append(np.asarray(photo.alpha, dtype=np.float32)[..., None])
    data = quantize(np.concatenate(planes, axis=-1), bits, scratch=True)  # a fresh array: worked on in place
    if bits == 16:
        img = Image.fromarray(data[..., 0])
        if img.mode != "I;16":
            img = img.convert("I;16")
    else:
        nch = data.shape[-1]
        img = Image.fromarray(data[..., 0] if nch == 1 else data)
    if photo.icc_profile:
        img.info["icc_profile"] = photo.icc_profile
    if photo.exif:
        img.info["exif"] = _exif_block(photo.exif)
    return img

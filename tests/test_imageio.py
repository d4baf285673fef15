"""Reading and writing real-world photos: modes, bit depths, metadata, errors, atomicity."""

from __future__ import annotations

import dataclasses
import io
import os
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageOps

from nerdrain import imageio as nio
from nerdrain.imageio import (
    ImageReadError,
    ImageWriteError,
    Photo,
    apply_orientation,
    quantize,
    read_photo,
    write_photo,
)

RNG = np.random.default_rng(1234)


# --------------------------------------------------------------------------- helpers


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _filter_scanlines(raw: np.ndarray, bpp: int, ftype: int) -> np.ndarray:
    """Reference PNG filtering of raw uint8 scanlines (n, stride) with one filter type."""
    rows = raw.astype(np.int32)
    up = np.vstack([np.zeros((1, rows.shape[1]), np.int32), rows[:-1]])
    left = np.zeros_like(rows)
    left[:, bpp:] = rows[:, :-bpp]
    ul = np.zeros_like(rows)
    ul[:, bpp:] = up[:, :-bpp]
    if ftype == 0:
        f = rows
    elif ftype == 1:
        f = rows - left
    elif ftype == 2:
        f = rows - up
    elif ftype == 3:
        f = rows - (left + up) // 2
    else:
        p = left + up - ul
        pa, pb, pc = abs(p - left), abs(p - up), abs(p - ul)
        f = rows - np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, ul))
    out = np.empty((rows.shape[0], rows.shape[1] + 1), np.uint8)
    out[:, 0] = ftype
    out[:, 1:] = (f % 256).astype(np.uint8)
    return out


_ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]


def make_png16(samples: np.ndarray, *, interlace: bool = False, filters=(0, 1, 2, 3, 4), extra: bytes = b"") -> bytes:
    """An independent little 16-bit PNG encoder for test inputs (all filter types, Adam7)."""
    if samples.ndim == 2:
        samples = samples[..., None]
    h, w, c = samples.shape
    ct = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    bpp = 2 * c

    def encode(sub: np.ndarray) -> bytes:
        if sub.size == 0:
            return b""
        raw = sub.astype(">u2").reshape(sub.shape[0], -1).view(np.uint8)
        lines = [_filter_scanlines(raw, bpp, filters[i % len(filters)])[i] for i in range(raw.shape[0])]
        return b"".join(line.tobytes() for line in lines)

    if interlace:
        data = b"".join(encode(samples[y0::dy, x0::dx]) for x0, y0, dx, dy in _ADAM7)
    else:
        data = encode(samples)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, ct, 0, 0, 1 if interlace else 0))
        + extra
        + _chunk(b"IDAT", zlib.compress(data))
        + _chunk(b"IEND", b"")
    )


def make_tiff16(samples: np.ndarray, *, deflate: bool = False, byteorder: str = "<") -> bytes:
    """A minimal single-strip 16-bit RGB(A) TIFF (uncompressed or Adobe deflate)."""
    h, w, c = samples.shape
    data = samples.astype(byteorder + "u2").tobytes()
    if deflate:
        data = zlib.compress(data)
    entries = [
        (256, 3, 1, w), (257, 3, 1, h), (258, 3, c, None), (259, 3, 1, 8 if deflate else 1),
        (262, 3, 1, 2), (273, 4, 1, None), (277, 3, 1, c), (278, 3, 1, h),
        (279, 4, 1, len(data)), (284, 3, 1, 1),
    ]
    if c == 4:
        entries.append((338, 3, 1, 2))
    ifd_size = 2 + 12 * len(entries) + 4
    bps_off = 8 + ifd_size
    data_off = bps_off + 2 * c
    out = (b"II*\x00" if byteorder == "<" else b"MM\x00*") + struct.pack(byteorder + "I", 8)
    out += struct.pack(byteorder + "H", len(entries))
    for tag, typ, cnt, val in entries:
        val = bps_off if tag == 258 else data_off if tag == 273 else val
        if typ == 3 and cnt == 1:
            out += struct.pack(byteorder + "HHIHH", tag, typ, cnt, val, 0)
        else:
            out += struct.pack(byteorder + "HHII", tag, typ, cnt, val)
    out += struct.pack(byteorder + "I", 0) + struct.pack(byteorder + f"{c}H", *([16] * c))
    return out + data


def _u16(x: np.ndarray) -> np.ndarray:
    return np.floor(np.asarray(x, np.float64) * 65535 + 0.5).astype(np.int64)


def _u8(x: np.ndarray) -> np.ndarray:
    return np.floor(np.asarray(x, np.float64) * 255 + 0.5).astype(np.int64)


def _srgb_icc() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _exif(orientation: int | None = None) -> Image.Exif:
    ex = Image.Exif()
    ex[0x010F] = "TestMake"
    ex[0x0110] = "TestModel"
    if orientation is not None:
        ex[0x0112] = orientation
    return ex


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- the test encoder itself


def test_reference_encoder_agrees_with_pillow_high_bytes():
    a = RNG.integers(0, 65536, (9, 11, 3), dtype=np.uint16)
    for interlace in (False, True):
        img = Image.open(io.BytesIO(make_png16(a, interlace=interlace)))
        assert img.mode == "RGB"  # Pillow's own reading: 8-bit (high bytes)
        np.testing.assert_array_equal(np.asarray(img), (a >> 8).astype(np.uint8))


# --------------------------------------------------------------------------- reading


def test_read_rgb_png_exact(tmp_path):
    a = RNG.integers(0, 256, (13, 17, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "a.png")
    ph = read_photo(tmp_path / "a.png")
    assert ph.rgb.dtype == np.float32 and ph.rgb.shape == (13, 17, 3)
    assert ph.alpha is None and ph.bit_depth == 8 and ph.mode == "RGB" and not ph.grayscale
    assert ph.format == "PNG"
    np.testing.assert_array_equal(_u8(ph.rgb), a)


@pytest.mark.parametrize("ct,chans", [(2, 3), (6, 4), (4, 2), (0, 1)])
@pytest.mark.parametrize("interlace", [False, True])
def test_read_16bit_png_full_precision(tmp_path, ct, chans, interlace):
    a = RNG.integers(0, 65536, (21, 19, chans), dtype=np.uint16)
    a[0, 0] = 0
    a[-1, -1] = 65535
    (tmp_path / "x.png").write_bytes(make_png16(a, interlace=interlace))
    ph = read_photo(tmp_path / "x.png")
    assert ph.bit_depth == 16
    if chans in (1, 2):
        assert ph.grayscale
        np.testing.assert_array_equal(ph.rgb[..., 0], ph.rgb[..., 2])
        np.testing.assert_array_equal(_u16(ph.rgb[..., 0]), a[..., 0])
    else:
        assert not ph.grayscale
        np.testing.assert_array_equal(_u16(ph.rgb), a[..., :3])
    if chans in (2, 4):
        np.testing.assert_array_equal(_u16(ph.alpha), a[..., -1])
    else:
        assert ph.alpha is None


def test_read_16bit_rgb_png_with_trns_colour_key(tmp_path):
    a = RNG.integers(0, 65536, (6, 7, 3), dtype=np.uint16)
    key = (1000, 2000, 3000)
    a[2, 3] = key
    trns = _chunk(b"tRNS", struct.pack(">HHH", *key))
    (tmp_path / "k.png").write_bytes(make_png16(a, extra=trns))
    ph = read_photo(tmp_path / "k.png")
    assert ph.bit_depth == 16 and ph.alpha is not None
    assert ph.alpha[2, 3] == 0.0 and ph.alpha.sum() == a.shape[0] * a.shape[1] - 1


@pytest.mark.parametrize("deflate", [False, True])
@pytest.mark.parametrize("byteorder", ["<", ">"])
@pytest.mark.parametrize("chans", [3, 4])
def test_read_16bit_tiff_full_precision(tmp_path, deflate, byteorder, chans):
    a = RNG.integers(0, 65536, (8, 10, chans), dtype=np.uint16)
    (tmp_path / "t.tif").write_bytes(make_tiff16(a, deflate=deflate, byteorder=byteorder))
    ph = read_photo(tmp_path / "t.tif")
    assert ph.bit_depth == 16
    np.testing.assert_array_equal(_u16(ph.rgb), a[..., :3])
    if chans == 4:
        np.testing.assert_array_equal(_u16(ph.alpha), a[..., 3])


def test_read_grayscale_modes(tmp_path):
    g = RNG.integers(0, 256, (9, 8), dtype=np.uint8)
    Image.fromarray(g).save(tmp_path / "l.png")
    ph = read_photo(tmp_path / "l.png")
    assert ph.grayscale and ph.mode == "L" and ph.bit_depth == 8
    for c in range(3):
        np.testing.assert_array_equal(_u8(ph.rgb[..., c]), g)

    g16 = RNG.integers(0, 65536, (9, 8), dtype=np.uint16)
    Image.fromarray(g16).save(tmp_path / "i16.png")
    ph = read_photo(tmp_path / "i16.png")
    assert ph.grayscale and ph.bit_depth == 16 and ph.mode.startswith("I")
    np.testing.assert_array_equal(_u16(ph.rgb[..., 1]), g16)

    Image.fromarray(g16.astype(np.int32)).convert("I").save(tmp_path / "i32.tif")
    ph = read_photo(tmp_path / "i32.tif")
    assert ph.grayscale and ph.bit_depth == 16
    np.testing.assert_array_equal(_u16(ph.rgb[..., 0]), g16)

    la = np.stack([g, 255 - g], axis=-1)
    Image.fromarray(la).save(tmp_path / "la.png")
    ph = read_photo(tmp_path / "la.png")
    assert ph.grayscale and ph.mode == "LA"
    np.testing.assert_array_equal(_u8(ph.alpha), 255 - g)

    Image.fromarray(g > 128).save(tmp_path / "bw.png")
    ph = read_photo(tmp_path / "bw.png")
    assert ph.grayscale and set(np.unique(ph.rgb)) <= {0.0, 1.0}


def test_read_rgba_alpha_split(tmp_path):
    a = RNG.integers(0, 256, (7, 9, 4), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "a.png")
    ph = read_photo(tmp_path / "a.png")
    np.testing.assert_array_equal(_u8(ph.rgb), a[..., :3])
    np.testing.assert_array_equal(_u8(ph.alpha), a[..., 3])


def test_read_palette_with_and_without_transparency(tmp_path):
    a = RNG.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    p = Image.fromarray(a).quantize(16)
    p.save(tmp_path / "p.png")
    ph = read_photo(tmp_path / "p.png")
    assert ph.alpha is None and ph.mode == "P"
    np.testing.assert_array_equal(_u8(ph.rgb), np.asarray(p.convert("RGB")))

    p.info["transparency"] = 3
    p.save(tmp_path / "pt.png", transparency=3)
    p.save(tmp_path / "pt.gif", transparency=3)
    for name in ("pt.png", "pt.gif"):
        ph = read_photo(tmp_path / name)
        assert ph.alpha is not None
        idx = np.asarray(p)
        np.testing.assert_array_equal(ph.alpha == 0, idx == 3)
        ref = np.asarray(Image.open(tmp_path / name).convert("RGBA"))[..., :3]
        np.testing.assert_array_equal(_u8(ph.rgb), ref)


def test_multi_frame_files_read_their_first_frame_and_say_how_many(tmp_path):
    frames = [RNG.integers(0, 256, (10, 12, 3), dtype=np.uint8) for _ in range(3)]
    first, *rest = (Image.fromarray(f) for f in frames)
    first.save(tmp_path / "pages.tif", save_all=True, append_images=rest)  # lossless, unlike GIF
    ph = read_photo(tmp_path / "pages.tif")
    assert ph.frames == 3
    np.testing.assert_array_equal(_u8(ph.rgb), frames[0])
    first.save(tmp_path / "one.tif")
    assert read_photo(tmp_path / "one.tif").frames == 1


def test_read_cmyk_jpeg(tmp_path):
    a = RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    cmyk = Image.fromarray(a).convert("CMYK")
    cmyk.save(tmp_path / "c.jpg", quality=100)
    ph = read_photo(tmp_path / "c.jpg")
    assert ph.mode == "CMYK" and ph.rgb.shape == (16, 16, 3) and ph.icc_profile is None
    ref = np.asarray(Image.open(tmp_path / "c.jpg").convert("RGB"))
    np.testing.assert_array_equal(_u8(ph.rgb), ref)


def test_read_webp_and_tiff(tmp_path):
    a = RNG.integers(0, 256, (12, 14, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "a.webp", lossless=True)
    Image.fromarray(a).save(tmp_path / "a.tif", compression="tiff_lzw")
    for name in ("a.webp", "a.tif"):
        ph = read_photo(tmp_path / name)
        np.testing.assert_array_equal(_u8(ph.rgb), a)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applied_and_reset(tmp_path, orientation):
    a = RNG.integers(0, 256, (6, 10, 3), dtype=np.uint8)  # non-square, asymmetric
    img = Image.fromarray(a)
    img.save(tmp_path / "o.png", exif=_exif(orientation))
    ph = read_photo(tmp_path / "o.png")
    ref = ImageOps.exif_transpose(Image.open(tmp_path / "o.png"))
    np.testing.assert_array_equal(_u8(ph.rgb), np.asarray(ref))
    ex = Image.Exif()
    ex.load(ph.exif)
    assert ex.get(0x0112) == 1
    assert ex.get(0x010F) == "TestMake" and ex.get(0x0110) == "TestModel"


# The stored pixels as a viewer shows them, for the orientations that swap the sides.
_SIDE_SWAPPING = {
    5: lambda a: a.swapaxes(0, 1),  # transpose
    6: lambda a: np.rot90(a, -1),  # 90 degrees clockwise
    7: lambda a: np.rot90(a, -1)[::-1],  # transverse: clockwise, then flipped upside down
    8: lambda a: np.rot90(a, 1),  # 90 degrees counter-clockwise
}


@pytest.mark.parametrize("mode", ["RGB", "I;16"])
def test_orientation_left_as_stored_on_request(tmp_path, mode):
    """Dataset readers take pixels as stored, as the 8-bit pair reader (and MATLAB) do."""
    a = RNG.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    stored = a if mode == "RGB" else a[..., 0].astype(np.uint16) * 257 + a[..., 1]
    Image.fromarray(stored).save(tmp_path / "o.png", exif=_exif(6))
    ph = read_photo(tmp_path / "o.png", apply_orientation=False)
    got = _u8(ph.rgb) if mode == "RGB" else _u16(ph.rgb[..., 0])
    np.testing.assert_array_equal(got, stored)


@pytest.mark.parametrize("orientation", sorted(_SIDE_SWAPPING))
@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16"])
def test_uncompressed_tiff_with_side_swapping_orientation(tmp_path, mode, orientation):
    # Pillow memory-maps such files when opened by name, with the sides already swapped.
    a = RNG.integers(0, 256, (6, 10, 4), dtype=np.uint8)
    stored = {"L": a[..., 0], "RGBA": a, "I;16": a[..., 0].astype(np.uint16) * 257 + a[..., 1]}[mode]
    Image.fromarray(stored).save(tmp_path / "o.tif", exif=_exif(orientation))  # uncompressed, one strip
    ph = read_photo(tmp_path / "o.tif")
    want = _SIDE_SWAPPING[orientation](stored)
    if mode == "RGBA":
        np.testing.assert_array_equal(_u8(ph.rgb), want[..., :3])
        np.testing.assert_array_equal(_u8(ph.alpha), want[..., 3])
    else:
        got = _u8(ph.rgb[..., 0]) if mode == "L" else _u16(ph.rgb[..., 0])
        np.testing.assert_array_equal(got, want)


def test_apply_orientation_matches_pillow_for_all_values():
    a = RNG.integers(0, 256, (5, 8, 3), dtype=np.uint8)
    for o in range(1, 9):
        img = Image.fromarray(a)
        ex = _exif(o)
        buf = io.BytesIO()
        img.save(buf, format="PNG", exif=ex)
        ref = ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue())))
        np.testing.assert_array_equal(apply_orientation(a, o), np.asarray(ref))


def test_exif_reset_keeps_other_bytes_verbatim(tmp_path):
    a = RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "e.jpg", exif=_exif(6))
    raw = Image.open(tmp_path / "e.jpg").info["exif"]
    ph = read_photo(tmp_path / "e.jpg")
    assert len(ph.exif) == len(raw)
    diff = [i for i, (x, y) in enumerate(zip(ph.exif, raw)) if x != y]
    assert 1 <= len(diff) <= 2  # only the Orientation value changed


def test_icc_and_exif_kept(tmp_path):
    icc = _srgb_icc()
    a = RNG.integers(0, 256, (8, 9, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "m.jpg", icc_profile=icc, exif=_exif(1), quality=95)
    ph = read_photo(tmp_path / "m.jpg")
    assert ph.icc_profile == icc
    assert ph.exif is not None
    for name in ("o.png", "o.jpg", "o.webp", "o.tif"):
        write_photo(tmp_path / name, ph)
        back = Image.open(tmp_path / name)
        assert back.info.get("icc_profile") == icc, name
        ex = back.getexif()
        assert ex.get(0x010F) == "TestMake", name


def test_exif_of_a_webp_kept_in_a_jpeg(tmp_path):
    # WebP stores EXIF without the "Exif\0\0" header a JPEG's APP1 segment needs.
    a = RNG.integers(0, 256, (8, 9, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "a.webp", lossless=True, exif=_exif())
    assert not Image.open(tmp_path / "a.webp").info["exif"].startswith(b"Exif")
    write_photo(tmp_path / "o.jpg", read_photo(tmp_path / "a.webp"))
    back = Image.open(tmp_path / "o.jpg").getexif()
    assert back.get(0x010F) == "TestMake" and back.get(0x0110) == "TestModel"


@pytest.mark.parametrize("mode", ["RGB", "L", "I;16"])
def test_tiff_output_keeps_exif_and_gps_subdirectories(tmp_path, mode):
    # A camera's EXIF has them; Pillow's compressed (libtiff) TIFF writer fails on them.
    a = RNG.integers(0, 256, (8, 9, 3), dtype=np.uint8)
    ex = _exif()
    ex.get_ifd(0x8769)[0x9003] = "2024:05:06 07:08:09"  # DateTimeOriginal
    ex.get_ifd(0x8825)[0x0001] = "N"  # GPSLatitudeRef
    Image.fromarray(a).save(tmp_path / "cam.jpg", exif=ex, quality=95)
    ph = read_photo(tmp_path / "cam.jpg")
    if mode != "RGB":
        ph = dataclasses.replace(ph, grayscale=True, bit_depth=16 if mode == "I;16" else 8)
    write_photo(tmp_path / "o.tif", ph)
    back = Image.open(tmp_path / "o.tif")
    assert back.mode == mode and back.size == (9, 8)
    got = back.getexif()
    assert got.get(0x010F) == "TestMake"
    assert got.get_ifd(0x8769).get(0x9003) == "2024:05:06 07:08:09"
    assert got.get_ifd(0x8825).get(0x0001) == "N"
    if mode == "RGB":
        np.testing.assert_array_equal(np.asarray(back), _u8(ph.rgb))
    write_photo(tmp_path / "plain.tif", dataclasses.replace(ph, exif=_exif().tobytes()))
    assert Image.open(tmp_path / "plain.tif").info["compression"] == "tiff_lzw"  # still compressed otherwise


@pytest.mark.parametrize("sub_ifd", [False, True])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_tiff_output_ignores_layout_tags_in_the_exif(tmp_path, mode, sub_ifd):
    # A phone's JPEG EXIF names the stored size in IFD0 (ImageWidth/ImageLength), here 9 x 8 turned
    # to 8 x 9 by its orientation: in a TIFF those tags are the file's own layout, so the writer's
    # must win, or the pixels are read with the wrong width (or the file fails to write).
    a = RNG.integers(0, 256, (8, 9, 3), dtype=np.uint8)
    ex = _exif(orientation=6)
    ex[0x0100], ex[0x0101], ex[0x0106], ex[0x0115] = 9, 8, 2, 3  # width, length, RGB, 3 samples
    if sub_ifd:
        ex.get_ifd(0x8769)[0x9003] = "2024:05:06 07:08:09"  # DateTimeOriginal
    Image.fromarray(a).save(tmp_path / "phone.png", exif=ex)
    ph = read_photo(tmp_path / "phone.png")
    if mode == "L":
        ph = dataclasses.replace(ph, grayscale=True)
    write_photo(tmp_path / "o.tif", ph)
    back = Image.open(tmp_path / "o.tif")
    assert back.mode == mode and back.size == (8, 9)
    want = np.rot90(a, -1) if mode == "RGB" else _u8(nio.rgb_to_gray(ph.rgb))
    np.testing.assert_array_equal(np.asarray(back), want)
    got = back.getexif()
    assert got.get(0x010F) == "TestMake"
    if sub_ifd:
        assert got.get_ifd(0x8769).get(0x9003) == "2024:05:06 07:08:09"


def test_errors_are_one_line_and_name_the_file(tmp_path):
    a = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "good.png")
    Image.fromarray(a).save(tmp_path / "good.jpg")
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    data = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.jpg").write_text("this is not an image\n")
    (tmp_path / "empty.png").write_bytes(b"")
    cases = {
        "trunc.png": "truncated",
        "trunc.jpg": "truncated",
        "text.jpg": "not an image",
        "empty.png": "empty",
        "missing.png": "no such file",
    }
    for name, word in cases.items():
        with pytest.raises(ImageReadError) as ei:
            read_photo(tmp_path / name)
        msg = str(ei.value)
        assert isinstance(ei.value, ValueError)
        assert "\n" not in msg
        assert name in msg and word in msg, msg
        assert ei.value.path.endswith(name)
    with pytest.raises(ImageReadError, match="directory"):
        read_photo(tmp_path)


def test_large_image_policy(tmp_path, monkeypatch):
    # A PNG header claiming 20000 x 20000 (400 Mpx): refused before decoding anything.
    hdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
    (tmp_path / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + hdr + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b""))
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageReadError, match="too large.*400 megapixels"):
        read_photo(tmp_path / "huge.png")
    assert Image.MAX_IMAGE_PIXELS == before  # Pillow's global restored

    a = RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "small.png")
    with pytest.raises(ImageReadError, match="too large"):
        read_photo(tmp_path / "small.png", max_pixels=100)
    monkeypatch.setenv("NERDRAIN_MAX_PIXELS", "100")
    with pytest.raises(ImageReadError, match="too large"):
        read_photo(tmp_path / "small.png")
    assert read_photo(tmp_path / "small.png", max_pixels=0).rgb.shape == (20, 30, 3)
    monkeypatch.delenv("NERDRAIN_MAX_PIXELS")
    # Above Pillow's own bomb limit but below ours: accepted (header-only check here).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert read_photo(tmp_path / "small.png").rgb.shape == (20, 30, 3)


# --------------------------------------------------------------------------- writing


def test_quantize_round_half_up_and_clip():
    x = np.array([-0.5, 0.0, 0.25, 0.5, 1.0, 1.5, np.nan], np.float32)
    np.testing.assert_array_equal(quantize(x, 8), [0, 0, 64, 128, 255, 255, 0])
    assert quantize(x, 16).dtype == np.uint16
    grid = np.linspace(0, 1, 10001, dtype=np.float32)
    np.testing.assert_array_equal(quantize(grid, 8), np.floor(grid * np.float32(255) + np.float32(0.5)))


def _quantize_reference(values, bits: int) -> list[int]:
    """quantize's documented rule, one float32 scalar at a time."""
    maxv, out = np.float32((1 << bits) - 1), []
    for v in np.asarray(values, dtype=np.float32).ravel():
        c = np.float32(0.0) if np.isnan(v) else min(max(v, np.float32(0.0)), np.float32(1.0))
        out.append(int(np.floor(c * maxv + np.float32(0.5))))
    return out


@pytest.mark.parametrize("bits", [8, 16])
def test_quantize_matches_its_rule_on_nan_inf_out_of_range_and_halves(bits):
    maxv = (1 << bits) - 1
    k = np.arange(0, maxv, maxv // 255)
    halves = ((k + 0.5) / maxv).astype(np.float32)  # x * maxv lands on k + 0.5 or beside it
    near = np.concatenate([halves, np.nextafter(halves, np.float32(0)), np.nextafter(halves, np.float32(1))])
    special = np.array([np.nan, np.inf, -np.inf, -0.0, -1e30, 1e30, -0.5, 1.5, 1.0, 0.0], np.float32)
    x = RNG.permutation(np.concatenate([near, special, RNG.uniform(-0.2, 1.2, 3000).astype(np.float32)]))
    with np.errstate(invalid="ignore"):  # inf * maxv % 1
        product = x * np.float32(maxv)
        half = (product % 1 == 0.5) & (x >= 0) & (x <= 1)
    ref = np.array(_quantize_reference(x, bits))
    assert half.sum() >= k.size and (ref[half] == np.floor(product[half]) + 1).all()  # halves go up
    n = x.size - x.size % 6
    grid = x[:n].reshape(-1, 2, 3)
    for arr in (x, x.astype(np.float64), grid.transpose(1, 0, 2), grid[:, ::-1]):
        q = quantize(arr, bits)
        assert q.dtype == (np.uint8 if bits == 8 else np.uint16) and q.flags.c_contiguous
        np.testing.assert_array_equal(q.ravel(), _quantize_reference(arr, bits))
        scratch = np.array(arr, dtype=np.float32)
        np.testing.assert_array_equal(quantize(scratch, bits, scratch=True), q)


def test_quantize_makes_one_float32_working_copy():
    """A 6000x4000 photo's float32 copies are 288 MB each: quantize makes one (besides its result)."""
    x = RNG.random((1000, 1000), dtype=np.float32)
    for arr, scratch, copies in ((x, False, 1), (x.astype(np.float64), False, 1), (x.copy(), True, 0)):
        tracemalloc.start()
        quantize(arr, 8, scratch=scratch)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < x.nbytes * copies + x.size + 100_000, (arr.dtype, scratch, peak)


def test_write_8bit_roundtrip_exact(tmp_path):
    a = RNG.integers(0, 256, (11, 13, 4), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "in.png")
    ph = read_photo(tmp_path / "in.png")
    out = write_photo(tmp_path / "out.png", ph)
    assert out == tmp_path / "out.png"
    back = Image.open(out)
    assert back.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(back), a)


def test_write_grayscale_stays_grayscale(tmp_path):
    g = RNG.integers(0, 256, (9, 10), dtype=np.uint8)
    Image.fromarray(g).save(tmp_path / "g.png")
    ph = read_photo(tmp_path / "g.png")
    write_photo(tmp_path / "o.png", ph)
    back = Image.open(tmp_path / "o.png")
    assert back.mode == "L"
    np.testing.assert_array_equal(np.asarray(back), g)
    # A derained (now colour) result is converted with the standard luma weights.
    rgb = RNG.random((9, 10, 3), dtype=np.float32)
    write_photo(tmp_path / "c.png", dataclasses.replace(ph, rgb=rgb))
    ref = quantize(0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2], 8)
    assert np.abs(np.asarray(Image.open(tmp_path / "c.png")).astype(int) - ref).max() <= 1
    write_photo(tmp_path / "g.jpg", ph)
    assert Image.open(tmp_path / "g.jpg").mode == "L"


@pytest.mark.parametrize("chans", [1, 2, 3, 4])
def test_write_16bit_png(tmp_path, chans):
    a = RNG.integers(0, 65536, (17, 23, chans), dtype=np.uint16)
    (tmp_path / "in.png").write_bytes(make_png16(a))
    ph = read_photo(tmp_path / "in.png")
    icc = _srgb_icc()
    ph = dataclasses.replace(ph, icc_profile=icc, exif=_exif(1).tobytes())
    write_photo(tmp_path / "out.png", ph)
    back = read_photo(tmp_path / "out.png")
    assert back.bit_depth == 16 and back.grayscale == (chans <= 2)
    np.testing.assert_array_equal(_u16(back.rgb), _u16(ph.rgb))
    if chans in (2, 4):
        np.testing.assert_array_equal(_u16(back.alpha), a[..., -1])
    pil = Image.open(tmp_path / "out.png")  # a valid PNG for Pillow too
    pil.load()
    assert pil.info.get("icc_profile") == icc
    assert pil.getexif().get(0x010F) == "TestMake"
    if chans == 3:
        np.testing.assert_array_equal(np.asarray(pil), (a >> 8).astype(np.uint8))
    if chans == 1:
        assert pil.mode.startswith("I")
        np.testing.assert_array_equal(np.asarray(pil), a[..., 0])


def test_write_16bit_png_large_rows_and_filters(tmp_path):
    # Smooth data (so the adaptive filter picks various types) spanning several blocks.
    y, x = np.mgrid[0:300, 0:257]
    a = np.stack([(x * 200 + y * 7) % 65536, (y * 211) % 65536, (x * y) % 65536], axis=-1).astype(np.uint16)
    ph = Photo(rgb=a.astype(np.float32) / 65535, bit_depth=16, mode="RGB")
    write_photo(tmp_path / "big.png", ph)
    np.testing.assert_array_equal(_u16(read_photo(tmp_path / "big.png").rgb), a)


def test_write_formats_and_alpha_handling(tmp_path):
    a = RNG.integers(0, 256, (12, 12, 4), dtype=np.uint8)
    ph = Photo(rgb=a[..., :3] / np.float32(255), alpha=a[..., 3] / np.float32(255), mode="RGBA")
    write_photo(tmp_path / "o.jpg", ph)
    assert Image.open(tmp_path / "o.jpg").mode == "RGB"  # JPEG: alpha dropped
    write_photo(tmp_path / "o.webp", ph)
    assert Image.open(tmp_path / "o.webp").mode == "RGBA"
    write_photo(tmp_path / "o.tif", ph)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o.tif")), a)
    with pytest.raises(ImageWriteError, match="unsupported output format"):
        write_photo(tmp_path / "o.xyz", ph)


def test_write_refuses_input_and_is_atomic(tmp_path, monkeypatch):
    a = RNG.integers(0, 256, (10, 10, 3), dtype=np.uint8)
    src = tmp_path / "in.png"
    Image.fromarray(a).save(src)
    before = src.read_bytes()
    ph = read_photo(src)
    with pytest.raises(ImageWriteError, match="refusing to overwrite the input"):
        write_photo(src, ph, overwrite_guard_path=src)
    with pytest.raises(ImageWriteError, match="refusing"):
        write_photo(tmp_path / "." / "in.png", ph, overwrite_guard_path=[tmp_path / "other.png", str(src)])
    assert src.read_bytes() == before

    # An existing output is replaced only when the new file is complete.
    dst = tmp_path / "out.png"
    dst.write_bytes(b"previous")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(ImageWriteError, match="disk full"):
        write_photo(dst, ph)
    assert dst.read_bytes() == b"previous"
    assert _no_temp_files(tmp_path)

    monkeypatch.setattr(nio, "_write_png16", lambda fp, *a, **k: (fp.write(b"\x89PNG partial"), boom()))
    with pytest.raises(ImageWriteError):
        write_photo(dst, dataclasses.replace(ph, bit_depth=16))
    assert dst.read_bytes() == b"previous"
    assert _no_temp_files(tmp_path)
    monkeypatch.undo()

    write_photo(dst, ph)
    np.testing.assert_array_equal(np.asarray(Image.open(dst)), a)
    assert _no_temp_files(tmp_path)
    if os.name == "posix":
        assert dst.stat().st_mode & 0o044  # not left private (0600) by mkstemp


def test_write_into_missing_folder_fails_cleanly(tmp_path):
    ph = Photo(rgb=np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ImageWriteError, match="does not exist"):
        write_photo(tmp_path / "nope" / "o.png", ph)


def test_photo_pil_roundtrip():
    a = RNG.integers(0, 256, (5, 6, 4), dtype=np.uint8)
    img = Image.fromarray(a)
    img.info["icc_profile"] = b"fake"
    ph = nio.photo_from_pil(img)
    back = nio.photo_to_pil(ph)
    assert back.mode == "RGBA" and back.info["icc_profile"] == b"fake"
    np.testing.assert_array_equal(np.asarray(back), a)


@pytest.mark.parametrize("fmt", ["tif", "webp", "jpg"])
def test_exif_orientation_other_formats(tmp_path, fmt):
    a = RNG.integers(0, 256, (8, 16, 3), dtype=np.uint8)
    params = {"lossless": True} if fmt == "webp" else {"quality": 100} if fmt == "jpg" else {}
    Image.fromarray(a).save(tmp_path / f"o.{fmt}", exif=_exif(6), **params)
    ph = read_photo(tmp_path / f"o.{fmt}")
    assert ph.rgb.shape == (16, 8, 3)  # rotated exactly once
    ref = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / f"o.{fmt}")))
    np.testing.assert_array_equal(_u8(ph.rgb), ref)
    ex = Image.Exif()
    ex.load(ph.exif)
    assert ex.get(0x0112, 1) == 1 and ex.get(0x010F) == "TestMake"


def test_cmyk_with_unusable_profile_falls_back_and_drops_it(tmp_path):
    a = RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    cmyk = Image.fromarray(a).convert("CMYK")
    cmyk.save(tmp_path / "c.jpg", quality=100, icc_profile=_srgb_icc())  # an RGB profile on CMYK data
    ph = read_photo(tmp_path / "c.jpg")
    assert ph.icc_profile is None  # never attach a non-RGB (or mismatched) profile to RGB output
    np.testing.assert_array_equal(_u8(ph.rgb), np.asarray(Image.open(tmp_path / "c.jpg").convert("RGB")))


def test_a_tiff_pillow_cannot_decode_is_named_as_such(tmp_path):
    """Floating-point colour TIFFs (HDR work, scientific cameras) are TIFFs, not 'not an image'."""
    tifffile = pytest.importorskip("tifffile")  # comes with scikit-image
    path = tmp_path / "float.tif"
    tifffile.imwrite(path, np.random.default_rng(0).random((8, 9, 3), dtype=np.float32), photometric="rgb")
    with pytest.raises(ImageReadError, match="a TIFF whose pixel format cannot be read") as err:
        read_photo(path)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)
    (tmp_path / "junk.tif").write_bytes(b"not a TIFF at all")
    with pytest.raises(ImageReadError, match="not an image"):
        read_photo(tmp_path / "junk.tif")


def _jpeg_with_cut_exif(path: Path) -> np.ndarray:
    """A JPEG whose EXIF directory promises 5 entries and holds less than one: Pillow warns."""
    a = RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    exif = b"Exif\x00\x00II*\x00" + struct.pack("<IH", 8, 5) + b"\x12\x01\x03\x00\x01\x00\x00\x00\x06\x00"
    Image.fromarray(a).save(path, quality=100, exif=exif)
    with pytest.warns(UserWarning, match="Corrupt EXIF data"):
        return np.asarray(Image.open(path).convert("RGB"))


def test_what_pillow_warns_about_a_file_becomes_a_note_on_it(tmp_path):
    """Pillow's warnings name its own source line, not the photo: in a batch no one could tell which
    file was meant. They become the photo's notes (derain_files prints 'note: <file>: ...')."""
    import warnings

    expected = _jpeg_with_cut_exif(tmp_path / "cut.jpg")
    (tmp_path / "cut.tif").write_bytes(b"II*\x00" + b"\xff" * 50)  # Pillow warns, then fails
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning that escapes fails the test
        ph = read_photo(tmp_path / "cut.jpg")
        with pytest.raises(ImageReadError):
            read_photo(tmp_path / "cut.tif")
    np.testing.assert_array_equal(_u8(ph.rgb), expected)
    assert ph.notes == ("the image library warned: Corrupt EXIF data. Expecting to read 12 bytes but only got 10.",)


def test_a_broken_tiff_is_not_blamed_on_its_pixel_format(tmp_path):
    (tmp_path / "cut.tif").write_bytes(b"II*\x00" + b"\xff" * 50)
    with pytest.raises(ImageReadError) as err:
        read_photo(tmp_path / "cut.tif")
    assert str(err.value) == f"{tmp_path / 'cut.tif'}: a damaged TIFF (Missing dimensions)"


def _chunk(kind: bytes, data: bytes) -> bytes:
    """A PNG chunk as the PNG specification lays it out: length, type, data, CRC-32 of type + data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, depth: int = 8, colour: int = 2, ihdr_crc_flip: int = 0, ends: bool = True) -> bytes:
    ihdr = bytearray(_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)))
    ihdr[-1] ^= ihdr_crc_flip
    rows = b"".join(b"\x00" + bytes(3 * width) for _ in range(height))
    rest = _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"") if ends else b""
    return b"\x89PNG\r\n\x1a\n" + bytes(ihdr) + rest


@pytest.mark.parametrize("data, reason", [
    (_png(0, 5), "a damaged PNG (its header gives it 0x5 pixels)"),
    (_png(5, 0), "a damaged PNG (its header gives it 5x0 pixels)"),
    (_png(5, 5, ihdr_crc_flip=0x01), "a damaged PNG (its IHDR chunk fails its checksum)"),
    (_png(5, 5, depth=7), "a damaged PNG (bit depth 7 with colour type 2 is no PNG pixel format)"),
    (_png(5, 5, ends=False), "a truncated PNG (it ends before its pixels)"),
    (_png(5, 5)[:8] + _png(5, 5)[33:], "a damaged PNG (its first chunk is 'IDAT', not its header IHDR)"),
], ids=["0xN", "Nx0", "crc", "depth", "cut", "headless"])
def test_a_damaged_png_is_named_as_such_not_as_no_image(tmp_path, data, reason):
    """A PNG with a corrupt header is a PNG, damaged: 'not an image' would send the user looking
    for a wrong extension or a text file."""
    good = _png(5, 5)
    (tmp_path / "good.png").write_bytes(good)
    assert read_photo(tmp_path / "good.png").size == (5, 5)  # the hand-made file is a valid PNG
    (tmp_path / "bad.png").write_bytes(data)
    with pytest.raises(ImageReadError) as err:
        read_photo(tmp_path / "bad.png")
    assert str(err.value) == f"{tmp_path / 'bad.png'}: {reason}"

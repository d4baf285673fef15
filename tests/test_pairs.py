"""Pair discovery on every supported layout, built in tmp_path; pixel values encode which image
a file is, so a pair matched by position instead of by name shows up as a wrong value."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nerdrain.data.pairs import (LAYOUTS, Pair, detect_layout, find_pairs, image_size, load_pair, read_rgb,
                                  read_scored, read_training)
from nerdrain.imageio import Photo, write_photo

from conftest import DATA  # the one place ../shared is located (NERDRAIN_SHARED overrides)

RAIN12 = DATA / "rain12"
CLEAN = 100  # clean images hold value id + CLEAN, rainy ones hold id


def _write(path: Path, value: int, size: tuple[int, int] = (8, 6), mode: str = "RGB") -> Path:
    """A flat image of ``value`` (width, height = size), written in ``mode``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode in ("L", "P") else (value,) * len(mode)).save(path)
    return path


def _assert_matched(pairs: list[Pair], ids: dict[str, int]) -> None:
    """Every pair holds rainy id and clean id + CLEAN for the id its name maps to."""
    assert [p.name for p in pairs] == list(ids)
    for pair in pairs:
        rainy, clean = load_pair(pair)
        assert rainy.dtype == np.uint8 and rainy.ndim == 3 and rainy.shape[2] == 3
        assert np.all(rainy == ids[pair.name]), pair
        assert np.all(clean == ids[pair.name] + CLEAN), pair


def test_input_target(tmp_path: Path) -> None:
    for name, i in {"rain-2": 2, "rain-10": 10, "a": 1}.items():
        _write(tmp_path / "input" / f"{name}.png", i)
        _write(tmp_path / "target" / f"{name}.png", i + CLEAN)
    assert detect_layout(tmp_path) == "input_target"
    pairs = find_pairs(tmp_path)
    _assert_matched(pairs, {"a": 1, "rain-2": 2, "rain-10": 10})  # natural order
    assert all(p.crop is None and p.input.parent.name == "input" for p in pairs)


def test_explicit_folders(tmp_path: Path) -> None:
    for i in (3, 20):
        _write(tmp_path / "wet" / f"{i}.png", i)
        _write(tmp_path / "dry" / f"{i}.png", i + CLEAN)
    with pytest.raises(ValueError, match="no known pair layout"):
        detect_layout(tmp_path)
    pairs = find_pairs(tmp_path, input_dir="wet", target_dir="dry")
    _assert_matched(pairs, {"3": 3, "20": 20})
    absolute = find_pairs("/", input_dir=tmp_path / "wet", target_dir=tmp_path / "dry")
    assert absolute == pairs
    with pytest.raises(ValueError, match="together"):
        find_pairs(tmp_path, input_dir="rain")


@pytest.mark.parametrize("clean_in", ["parent", "rainy", "flat"])
def test_prenet(tmp_path: Path, clean_in: str) -> None:
    rainy_dir = tmp_path if clean_in == "flat" else tmp_path / "rainy"
    clean_dir = tmp_path if clean_in == "parent" else rainy_dir
    for i in (1, 2, 10, 12):
        _write(rainy_dir / f"rain-{i}.png", i)
        _write(clean_dir / f"norain-{i}.png", i + CLEAN)
    assert detect_layout(tmp_path) == "prenet"
    _assert_matched(find_pairs(tmp_path), {f"rain-{i}": i for i in (1, 2, 10, 12)})


@pytest.mark.parametrize("rainy_dir", ["rain/X2", "rain"])
def test_jorder(tmp_path: Path, rainy_dir: str) -> None:
    """JORDER's release of Rain100L/H and Rain200L/H: rain/X2/norain-Nx2.png (rain/ directly for the
    light sets) beside norain/norain-N.png; rainstreak/ holds the streaks alone and is no pair."""
    for i in (1, 2, 10):
        _write(tmp_path / rainy_dir / f"norain-{i}x2.png", i)
        _write(tmp_path / "norain" / f"norain-{i}.png", i + CLEAN)
        _write(tmp_path / "rainstreak" / f"norain-{i}x2.png", 0)
    assert detect_layout(tmp_path) == "jorder"
    _assert_matched(find_pairs(tmp_path), {f"norain-{i}x2": i for i in (1, 2, 10)})


def test_jorder_with_the_clean_names_on_both_sides(tmp_path: Path) -> None:
    for i in (4, 11):
        _write(tmp_path / "rain" / f"{i}.png", i)
        _write(tmp_path / "norain" / f"{i}.png", i + CLEAN)
    _assert_matched(find_pairs(tmp_path), {"4": 4, "11": 11})


def test_ddn_several_rainy_versions_per_clean_image(tmp_path: Path) -> None:
    # Sorted as strings, rainy_image/ lists 12_1 before 1_1 but ground_truth/ lists 1 before 12.
    ids = {"1_1": 1, "1_2": 1, "1_10": 1, "2_1": 2, "12_1": 12}
    for name, i in ids.items():
        _write(tmp_path / "rainy_image" / f"{name}.jpg", i, mode="L")
    for i in (1, 2, 12):
        _write(tmp_path / "ground_truth" / f"{i}.png", i + CLEAN)
    assert detect_layout(tmp_path) == "ddn"
    pairs = find_pairs(tmp_path)
    assert [p.name for p in pairs] == ["1_1", "1_2", "1_10", "2_1", "12_1"]
    for pair in pairs:  # JPEG: flat grey survives to within a level or two
        rainy, clean = load_pair(pair)
        assert np.abs(rainy.astype(int) - ids[pair.name]).max() <= 2
        assert np.all(clean == ids[pair.name] + CLEAN)


def _write_side_by_side(path: Path, left: int, right: int, height: int = 6) -> None:
    img = np.zeros((height, 2 * height, 3), np.uint8)
    img[:, :height], img[:, height:] = left, right
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def test_did(tmp_path: Path) -> None:
    for i in (2, 10):
        _write_side_by_side(tmp_path / f"{i}.png", i, i + CLEAN)
    assert detect_layout(tmp_path) == "did"
    pairs = find_pairs(tmp_path)
    assert pairs[0].crop == ("left", "right") and pairs[0].input == pairs[0].target
    _assert_matched(pairs, {"2": 2, "10": 10})
    rainy, clean = load_pair(find_pairs(tmp_path, did_rainy_side="right")[0])
    assert np.all(rainy == 2 + CLEAN) and np.all(clean == 2)
    assert rainy.shape == (6, 6, 3)


def test_did_forced_on_other_aspect_and_odd_width(tmp_path: Path) -> None:
    _write(tmp_path / "wide.png", 7, size=(10, 3))
    _write(tmp_path / "odd.png", 7, size=(9, 3))
    with pytest.raises(ValueError, match="no known pair layout"):
        detect_layout(tmp_path)  # not twice as wide as tall: not auto-detected
    pairs = {p.name: p for p in find_pairs(tmp_path, "did")}
    assert load_pair(pairs["wide"])[0].shape == (3, 5, 3)
    with pytest.raises(ValueError, match=r"odd\.png.*odd width 9"):
        load_pair(pairs["odd"])
    with pytest.raises(ValueError, match="did_rainy_side"):
        find_pairs(tmp_path, "did", did_rainy_side="top")


def test_extensions_case_insensitive_and_hidden_files_ignored(tmp_path: Path) -> None:
    _write(tmp_path / "input" / "a.PNG", 1)
    _write(tmp_path / "target" / "a.TIF", 1 + CLEAN)
    _write(tmp_path / "input" / "b.JPEG", 2)
    _write(tmp_path / "target" / "b.bmp", 2 + CLEAN)
    _write(tmp_path / "input" / "._a.png", 0)  # macOS resource fork
    (tmp_path / "input" / "notes.txt").write_text("not an image")
    pairs = find_pairs(tmp_path)
    assert [p.name for p in pairs] == ["a", "b"]
    _assert_matched(pairs[:1], {"a": 1})


def test_modes_converted_to_rgb(tmp_path: Path) -> None:
    for mode in ("L", "RGBA", "P"):
        _write(tmp_path / "input" / f"{mode}.png", 50, mode=mode)
        _write(tmp_path / "target" / f"{mode}.png", 50, mode=mode)
    for pair in find_pairs(tmp_path):
        rainy, clean = load_pair(pair)
        assert rainy.shape == clean.shape == (6, 8, 3) and rainy.dtype == np.uint8


@pytest.mark.parametrize(
    ("layout", "files", "orphans"),
    [
        ("input_target", ["input/a.png", "input/b.png", "target/a.png", "target/c.png"],
         ["input/b.png", "target/c.png"]),
        ("prenet", ["rainy/rain-1.png", "rainy/rain-2.png", "norain-1.png"],
         ["rainy/rain-2.png"]),
        ("ddn", ["rainy_image/1_1.png", "rainy_image/x.png", "ground_truth/1.png",
                 "ground_truth/3.png"],
         ["rainy_image/x.png", "ground_truth/3.png"]),
        ("jorder", ["rain/X2/norain-1x2.png", "rain/X2/norain-2x2.png", "norain/norain-1.png",
                    "norain/norain-3.png"],
         ["rain/X2/norain-2x2.png", "norain/norain-3.png"]),
    ],
)  # fmt: skip
def test_missing_partner_names_the_files(
    tmp_path: Path, layout: str, files: list[str], orphans: list[str]
) -> None:
    for f in files:
        _write(tmp_path / f, 1)
    with pytest.raises(ValueError, match="no partner") as err:
        find_pairs(tmp_path)
    for orphan in orphans:
        assert orphan in str(err.value)
    assert f"{len(orphans)} file(s)" in str(err.value)
    assert detect_layout(tmp_path) == layout


def test_size_mismatch_names_both_files_and_sizes(tmp_path: Path) -> None:
    _write(tmp_path / "input" / "a.png", 1, size=(8, 6))
    _write(tmp_path / "target" / "a.png", 1, size=(9, 6))
    (pair,) = find_pairs(tmp_path)
    with pytest.raises(ValueError, match="size mismatch") as err:
        load_pair(pair)
    message = str(err.value)
    assert str(pair.input) in message and "8x6" in message
    assert str(pair.target) in message and "9x6" in message


def test_ambiguous_stems_rejected(tmp_path: Path) -> None:
    _write(tmp_path / "input" / "a.png", 1)
    _write(tmp_path / "input" / "a.jpg", 1)
    _write(tmp_path / "target" / "a.png", 1)
    with pytest.raises(ValueError, match=r"ambiguous.*input/a\.jpg.*input/a\.png"):
        find_pairs(tmp_path)


def test_unrecognised_folder_lists_the_layouts(tmp_path: Path) -> None:
    (tmp_path / "input").mkdir()
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(ValueError, match="no known pair layout") as err:
        find_pairs(tmp_path)
    assert all(layout in str(err.value) for layout in LAYOUTS)
    with pytest.raises(ValueError, match="not a folder"):
        detect_layout(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown layout"):
        find_pairs(tmp_path, "rain100")
    with pytest.raises(ValueError, match="no images in"):
        find_pairs(tmp_path, "input_target")


def test_rain12() -> None:
    if not RAIN12.is_dir():
        pytest.skip(f"shared data not found at {RAIN12}")
    assert detect_layout(RAIN12) == "input_target"
    pairs = find_pairs(RAIN12)
    assert len(pairs) == 12 and pairs[0].name == "rain-001"
    rainy, clean = load_pair(pairs[0])
    assert rainy.shape == clean.shape == (320, 480, 3)


def test_truncated_image_error_names_the_file(tmp_path: Path) -> None:
    for sub in ("input", "target"):
        (tmp_path / sub).mkdir()
        Image.fromarray(np.full((32, 32, 3), 100, np.uint8)).save(tmp_path / sub / "1.png")
    cut = tmp_path / "input" / "1.png"
    cut.write_bytes(cut.read_bytes()[:60])
    with pytest.raises(ValueError, match="cannot read the image") as err:
        load_pair(find_pairs(tmp_path)[0])
    assert str(cut) in str(err.value)


@pytest.mark.parametrize("alpha, grey", [(False, False), (True, False), (True, True)])
def test_16_bit_colour_files_are_refused_not_cut_to_8_bits(tmp_path: Path, alpha: bool, grey: bool) -> None:
    # Pillow opens 16-bit RGB, RGBA and grey+alpha PNGs as 8-bit RGB(A), keeping the high bytes.
    rng = np.random.default_rng(0)
    rgb = rng.random((6, 8, 3), dtype=np.float32)
    if grey:
        rgb[...] = rgb[..., :1]
    photo = Photo(rgb=rgb, alpha=np.ones((6, 8), np.float32) if alpha else None, bit_depth=16, grayscale=grey)
    deep = write_photo(tmp_path / "deep.png", photo)
    with pytest.raises(ValueError, match="16-bit") as err:
        read_rgb(deep)
    assert str(deep) in str(err.value)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_image_size_reads_files_to_their_end(tmp_path: Path, suffix: str) -> None:
    """Truncated in its pixels, past the header Image.open reads: refused naming the file. A PNG
    that lost only its end marker (IEND, 12 bytes) fails its checksum walk but has every pixel, as
    read_rgb reads it: accepted."""
    rng = np.random.default_rng(0)
    path = tmp_path / f"a{suffix}"
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(path)
    intact = path.read_bytes()
    assert image_size(path) == (40, 30)
    path.write_bytes(intact[: len(intact) * 2 // 3])
    with pytest.raises(ValueError, match="cannot read the image") as err:
        image_size(path)
    assert str(err.value).startswith(f"{path}: ")
    if suffix == ".png":
        path.write_bytes(intact[:-12])
        assert image_size(path) == (40, 30) and read_rgb(path).shape == (30, 40, 3)


def test_unreadable_file_in_a_did_folder_is_named_during_detection(tmp_path: Path) -> None:
    _write(tmp_path / "a.png", 10, size=(16, 8))
    (tmp_path / "b.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read the image") as err:
        find_pairs(tmp_path)
    assert str(tmp_path / "b.png") in str(err.value)


def test_an_image_over_the_pixel_limit_is_a_read_error_naming_the_file(tmp_path: Path, monkeypatch) -> None:
    """The limit is read_photo's (NERDRAIN_MAX_PIXELS), in detection and reading alike, not Pillow's
    decompression-bomb guard (here made small: over twice 100 pixels would be its error)."""
    big = _write(tmp_path / "big.png", 10, size=(64, 32))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert find_pairs(tmp_path)[0].crop == ("left", "right") and read_rgb(big).shape == (32, 64, 3)
    monkeypatch.setenv("NERDRAIN_MAX_PIXELS", "2047")
    for read in (find_pairs, read_rgb):
        with pytest.raises(ValueError, match="image too large: 64x32") as err:
            read(big if read is read_rgb else tmp_path)
        assert str(err.value).startswith(f"{big}: ")


@pytest.mark.parametrize("root", ["empty", "input_target", "missing"])
def test_forced_prenet_without_its_files_is_an_error_not_zero_pairs(tmp_path: Path, root: str) -> None:
    """Zero pairs would be scored as a NaN mean with success, as the other layouts do not allow."""
    folder = tmp_path / root
    if root != "missing":
        folder.mkdir()
    if root == "input_target":
        _write(folder / "input" / "rain-1.png", 1)
        _write(folder / "target" / "rain-1.png", 1 + CLEAN)
    with pytest.raises(ValueError, match="no rain-N / norain-N images"):
        find_pairs(folder, "prenet")


def test_refused_modes_are_named_in_words_not_pillow_codes(tmp_path: Path) -> None:
    """Pillow's mode "1" pasted into a sentence read "a 1 image"; "F" and "I" were as cryptic."""
    Image.new("1", (8, 6), 1).save(tmp_path / "bw.png")
    Image.new("CMYK", (8, 6), (0, 50, 100, 0)).save(tmp_path / "ink.jpg")
    Image.fromarray(np.full((6, 8), 0.5, np.float32)).save(tmp_path / "float.tif")
    Image.fromarray(np.full((6, 8), 70000, np.int32)).save(tmp_path / "int.tif")
    cases = [
        ("bw.png", "1", read_scored, "a 1-bit black-and-white image, which the MATLAB scripts cannot score"),
        ("ink.jpg", "CMYK", read_scored, "a CMYK image, which the MATLAB scripts cannot score"),
        ("float.tif", "F", read_rgb, "32-bit floating-point images are not supported; use 8-bit images"),
        ("int.tif", "I", read_training, "32-bit integer images are not supported; use 8- or 16-bit images"),
    ]
    for name, mode, read, words in cases:
        with Image.open(tmp_path / name) as img:
            assert img.mode == mode
        with pytest.raises(ValueError) as err:
            read(tmp_path / name)
        assert str(err.value).startswith(f"{tmp_path / name}: {words}")

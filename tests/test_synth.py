"""Tests for rain synthesis (nerdrain.data.synth)."""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nerdrain.metrics import psnr, rgb_to_y, to_uint8
from nerdrain.data.synth import (
    PRESETS,
    RainConfig,
    RainMixer,
    RainSynthesizer,
    get_preset,
    render_mixed,
    synthesize_folder,
)

from conftest import DATA  # the one place ../shared is located (NERDRAIN_SHARED overrides)

BSDS = DATA / "clean" / "bsds500"
STREAKS = DATA / "streaks" / "garg06"
needs_bsds = pytest.mark.skipif(not BSDS.is_dir(), reason=f"shared data absent: {BSDS}")
needs_streaks = pytest.mark.skipif(not STREAKS.is_dir(), reason=f"shared data absent: {STREAKS}")


# -- local helpers (independent of the project's metrics module) ------------------------------


def y_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Y-PSNR of the 8-bit images, as the rain200 benchmark protocol computes it."""
    return psnr(to_uint8(np.asarray(a, np.float32)), to_uint8(np.asarray(b, np.float32)), "rain200")


def orientation_deg(gray: np.ndarray) -> float:
    """Streak angle from vertical (positive = top leans right) via the structure tensor."""
    from scipy import ndimage

    # smoothing first: raw differences of pixelated thin lines are biased towards the diagonals
    gr, gc = np.gradient(ndimage.gaussian_filter(gray.astype(np.float64), 1.5))
    jrr, jcc, jrc = (gr * gr).sum(), (gc * gc).sum(), (gr * gc).sum()
    return math.degrees(0.5 * math.atan2(2 * jrc, jcc - jrr))


def _skimage_photos() -> list[np.ndarray]:
    import skimage.data as skd

    return [getattr(skd, n)().astype(np.float32) / 255.0 for n in ("astronaut", "coffee", "chelsea")]


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    return _skimage_photos()


def _mean_psnr(synthesizer: RainSynthesizer, images: list[np.ndarray], seeds: int) -> float:
    vals = [y_psnr(synthesizer.render(im, np.random.default_rng(1000 + 7 * i + k)), im)
            for i, im in enumerate(images) for k in range(seeds)]
    return float(np.mean(vals))


# -- API --------------------------------------------------------------------------------------


def test_presets_and_get_preset():
    assert {"light", "heavy"} <= set(PRESETS)
    assert get_preset("heavy") is PRESETS["heavy"]
    with pytest.raises(ValueError, match="light") as exc:
        get_preset("drizzle")
    assert "heavy" in str(exc.value) and "drizzle" in str(exc.value)
    with pytest.raises(ValueError):
        RainSynthesizer("monsoon")
    with pytest.raises(ValueError):
        RainConfig(layers=(3, 2))
    with pytest.raises(ValueError):
        RainConfig(length=(50.0, 10.0))
    cfg = RainConfig(layers=[2, 3], density=[0.1, 0.2])  # lists, as YAML gives them
    assert cfg.layers == (2, 3) and cfg.density == (0.1, 0.2) and hash(cfg)
    with pytest.raises(ValueError):
        RainConfig(density=(0.1,))
    with pytest.raises(Exception):  # frozen
        PRESETS["light"].density = (0.0, 1.0)  # type: ignore[misc]


def test_input_validation():
    s = RainSynthesizer("light")
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        s.render(np.zeros((8, 8), np.float32), rng)
    with pytest.raises(TypeError):
        s.render(np.zeros((8, 8, 3), np.uint8), rng)


@pytest.mark.parametrize("preset", ["light", "heavy"])
def test_determinism(preset):
    clean = np.random.default_rng(5).random((40, 57, 3), dtype=np.float32)
    s = RainSynthesizer(preset)
    a = s.render(clean, np.random.default_rng(123))
    b = RainSynthesizer(preset).render(clean, np.random.default_rng(123))
    c = s.render(clean, np.random.default_rng(124))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # sample + apply is the same as render, and apply replays exactly
    params = s.sample(np.random.default_rng(123))
    np.testing.assert_array_equal(s.apply(clean, params), a)


@pytest.mark.parametrize("shape", [(1, 1), (16, 16), (17, 33), (5, 200), (301, 7), (256, 256),
                                   (768, 1024)])
@pytest.mark.parametrize("preset", ["light", "heavy"])
def test_shape_range_dtype(preset, shape):
    clean = np.full(shape + (3,), 0.5, np.float32)
    out = RainSynthesizer(preset).render(clean, np.random.default_rng(shape[0] * 31 + shape[1]))
    assert out.shape == clean.shape and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0


def test_float64_input_and_rain_is_additive_grey():
    clean = np.random.default_rng(1).random((64, 64, 3)) * 0.3  # float64, dark: no clipping
    cfg = replace(PRESETS["light"], splash=(0.0, 0.0))
    out = RainSynthesizer(cfg).render(clean, np.random.default_rng(2))
    assert out.dtype == np.float32
    diff = out - clean.astype(np.float32)
    assert diff.min() >= -1e-6 and diff.max() > 0.05
    np.testing.assert_allclose(diff[..., 0], diff[..., 2], atol=1e-5)


# -- calibration ------------------------------------------------------------------------------


def test_psnr_bands_on_skimage_photos(photos):
    light = _mean_psnr(RainSynthesizer("light"), photos, seeds=3)
    heavy = _mean_psnr(RainSynthesizer("heavy"), photos, seeds=3)
    assert 25.0 <= light <= 29.0, light
    assert 12.0 <= heavy <= 16.0, heavy


@needs_bsds
def test_psnr_bands_on_bsds500():
    files = sorted(BSDS.glob("*.jpg"))[:8]
    assert files
    images = [np.asarray(Image.open(f).convert("RGB"), np.float32) / 255.0 for f in files]
    light = _mean_psnr(RainSynthesizer("light"), images, seeds=1)
    heavy = _mean_psnr(RainSynthesizer("heavy"), images, seeds=1)
    assert 25.0 <= light <= 29.0, light
    assert 12.0 <= heavy <= 16.0, heavy


@needs_bsds
@needs_streaks
def test_streak_database_bands_on_bsds500():
    files = sorted(BSDS.glob("*.jpg"))[8:14]
    images = [np.asarray(Image.open(f).convert("RGB"), np.float32) / 255.0 for f in files]
    for preset, lo, hi in (("light", 24.0, 30.0), ("heavy", 12.0, 17.0)):
        cfg = replace(PRESETS[preset], streak_db_prob=1.0)
        value = _mean_psnr(RainSynthesizer(cfg, streak_dir=STREAKS), images, seeds=1)
        assert lo <= value <= hi, (preset, value)


def test_heavy_has_veil_and_is_stronger(photos):
    im = photos[0]
    heavy = RainSynthesizer("heavy")
    params = heavy.sample(np.random.default_rng(3))
    assert params.haze > 0
    veil_only = heavy.apply(im, replace(params, layers=(), splash=0.0))
    dark = rgb_to_y(to_uint8(im), rounded=True) < 60
    assert dark.mean() > 0.05
    lift = float(veil_only[dark].mean() - im[dark].mean())
    assert lift > 0.02, lift
    # the veil keeps the scene (a transmission blend, not a flat overlay)
    assert np.corrcoef(veil_only.ravel(), im.ravel())[0, 1] > 0.9
    # full heavy rain lifts dark regions more and is far stronger than light
    full = heavy.apply(im, params)
    assert full[dark].mean() - im[dark].mean() > 0.1
    light = RainSynthesizer("light").render(im, np.random.default_rng(3))
    assert y_psnr(full, im) < y_psnr(light, im) - 8.0
    assert RainSynthesizer("light").sample(np.random.default_rng(0)).haze == 0.0


@pytest.mark.parametrize("angle", [-30.0, 0.0, 25.0])
def test_streak_direction_follows_angle(angle):
    cfg = RainConfig(layers=(1, 1), angle=(angle, angle), angle_jitter=0.0, haze=(0.0, 0.0),
                     splash=(0.0, 0.0), density=(0.08, 0.08))
    s = RainSynthesizer(cfg)
    for seed in range(2):
        rain = s.render(np.zeros((128, 192, 3), np.float32), np.random.default_rng(seed))
        assert rain.max() > 0.2
        est = orientation_deg(rain.mean(axis=-1))
        assert abs(est - angle) < 4.0, (angle, est)


@needs_streaks
def test_streak_database_layer_follows_angle():
    for angle in (-20.0, 20.0):
        cfg = RainConfig(layers=(1, 1), angle=(angle, angle), angle_jitter=0.0, streak_db_prob=1.0)
        s = RainSynthesizer(cfg, streak_dir=STREAKS)
        params = s.sample(np.random.default_rng(0))
        assert params.layers[0].source == "database"
        rain = s.apply(np.zeros((160, 240, 3), np.float32), params)
        assert abs(orientation_deg(rain.mean(axis=-1)) - angle) < 5.0


def test_depth_layers_near_vs_far():
    params = RainSynthesizer("heavy").sample(np.random.default_rng(0))
    layers = sorted(params.layers, key=lambda layer: layer.depth)
    near, far = layers[0], layers[-1]
    assert len(layers) >= 3
    assert near.length > far.length and near.width > far.width
    assert near.brightness > far.brightness and near.density < far.density
    assert near.blur >= far.blur


def test_render_mixed(photos):
    im = photos[2][:128, :128]
    a = render_mixed(im, np.random.default_rng(9))
    b = render_mixed(im, np.random.default_rng(9))
    np.testing.assert_array_equal(a, b)
    mixer = RainMixer(("light", "heavy"), weights=(1, 1))
    psnrs = [y_psnr(mixer.render(im, np.random.default_rng(k)), im) for k in range(10)]
    assert max(psnrs) > 22 and min(psnrs) < 18
    only_heavy = [y_psnr(render_mixed(im, np.random.default_rng(k), weights=(0, 1)), im)
                  for k in range(3)]
    assert max(only_heavy) < 18
    for bad in ((0, 0), (float("nan"), 1), (float("inf"), 1), (-1, 2)):
        with pytest.raises(ValueError, match="finite non-negative numbers"):
            RainMixer(("light", "heavy"), weights=bad)


def test_fast_enough_for_a_data_loader():
    s = RainSynthesizer("heavy")
    clean = np.random.default_rng(0).random((256, 256, 3), dtype=np.float32)
    s.render(clean, np.random.default_rng(0))
    times = []
    for k in range(3):
        t0 = time.perf_counter()
        s.render(clean, np.random.default_rng(k))
        times.append(time.perf_counter() - t0)
    assert min(times) < 0.5  # target is < 0.1 s; loose bound for loaded CI machines


# -- dataset writer ---------------------------------------------------------------------------


def _write_clean_folder(folder: Path, photos: list[np.ndarray]) -> list[str]:
    folder.mkdir(parents=True)
    names = []
    for i, im in enumerate(photos):
        crop = (im[:60, :70] * 255).round().astype(np.uint8)
        name = f"img{i}.png" if i % 2 == 0 else f"img{i}.jpg"
        Image.fromarray(crop).save(folder / name)
        names.append(name)
    (folder / "notes.txt").write_text("not an image")
    return names


def _left_by_a_kill(temporary: Path) -> None:
    """Half a PNG under ``temporary``, as a SIGKILL of an earlier version left it an hour ago (its
    name does not give its writer: it goes by age)."""
    temporary.write_bytes(b"\x89PNG half")
    an_hour_ago = time.time() - 3700
    os.utime(temporary, (an_hour_ago, an_hour_ago))


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


def test_synthesize_folder_round_trip(tmp_path, photos):
    clean = tmp_path / "clean"
    _write_clean_folder(clean, photos)
    out = tmp_path / "out"
    summary = synthesize_folder(clean, out, preset="heavy", count_per_image=2, seed=4, size=48)
    assert summary.written == 6 and summary.failed == []
    inputs = sorted(p.name for p in (out / "input").iterdir())
    targets = sorted(p.name for p in (out / "target").iterdir())
    assert inputs == targets == sorted(f"img{i}_{k:03d}.png" for i in range(3) for k in range(2))
    assert not _leftovers(out)
    for name in inputs:
        x = np.asarray(Image.open(out / "input" / name))
        y = np.asarray(Image.open(out / "target" / name))
        assert x.shape == y.shape == (48, 48, 3) and x.dtype == np.uint8
        assert (x.astype(int) - y.astype(int)).mean() > 5  # heavy rain brightens
    # reproducible for a seed; outputs are protected unless overwrite=True
    with pytest.raises(FileExistsError):
        synthesize_folder(clean, out, preset="heavy", count_per_image=2, seed=4, size=48)
    first = (out / "input" / inputs[0]).read_bytes()
    _left_by_a_kill(out / "target" / f".{inputs[1]}.0badf00d.tmp")
    synthesize_folder(clean, out, preset="heavy", count_per_image=2, seed=4, size=48,
                      overwrite=True)
    assert (out / "input" / inputs[0]).read_bytes() == first
    assert not _leftovers(out)
    # whole images, one per source, same names
    out1 = tmp_path / "out1"
    assert synthesize_folder(clean, out1).written == 3
    assert sorted(p.name for p in (out1 / "input").iterdir()) == ["img0.png", "img1.png", "img2.png"]
    assert np.asarray(Image.open(out1 / "target" / "img0.png")).shape == (60, 70, 3)


@pytest.mark.parametrize("size, shape", [(np.int64(24), (24, 24)), (24.0, (24, 24)), ([20, np.int32(28)], (20, 28))])
def test_synthesize_folder_takes_sizes_as_whole_numbers_of_any_type(tmp_path, photos, size, shape):
    clean = tmp_path / "clean"
    _write_clean_folder(clean, photos[:1])
    assert synthesize_folder(clean, tmp_path / "out", size=size).written == 1
    assert np.asarray(Image.open(tmp_path / "out" / "input" / "img0.png")).shape == shape + (3,)


@pytest.mark.parametrize("size", ["32", 24.5, (24,), (24, "x")])
def test_synthesize_folder_refuses_sizes_that_are_not_whole_numbers(tmp_path, photos, size):
    clean = tmp_path / "clean"
    _write_clean_folder(clean, photos[:1])
    with pytest.raises(TypeError, match="size .--size. must be a whole number"):
        synthesize_folder(clean, tmp_path / "out", size=size)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("names", [("img.jpg", "img.png"), ("IMG.jpg", "img.png"), ("caf\u00e9.png", "cafe\u0301.jpg")])
def test_synthesize_folder_refuses_photos_whose_outputs_would_be_one_file(tmp_path, photos, names):
    """Two photos whose names differ only by extension, letter case or accent form (NFC or NFD)
    would be one output file, on macOS and Windows (which ignore case, macOS the accent form) even
    where Linux keeps them apart: the second pair would replace the first, counted as two."""
    clean = tmp_path / "clean"
    clean.mkdir()
    for name, photo in zip(names, photos):
        Image.fromarray((photo[:40, :50] * 255).round().astype(np.uint8)).save(clean / name)
    first, second = sorted(names)
    with pytest.raises(ValueError, match=f"{first} and {second}: their outputs would be one file"):
        synthesize_folder(clean, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_synthesize_folder_never_writes_sources(tmp_path, photos):
    ds = tmp_path / "ds"
    _write_clean_folder(ds / "target", photos[:1])
    before = (ds / "target" / "img0.png").read_bytes()
    with pytest.raises(ValueError, match="source"):
        synthesize_folder(ds / "target", ds, overwrite=True)
    assert (ds / "target" / "img0.png").read_bytes() == before
    with pytest.raises(FileNotFoundError):
        synthesize_folder(tmp_path / "missing", tmp_path / "o")


def test_synthesize_folder_leaves_no_partial_files(tmp_path, photos, monkeypatch):
    """A pair that cannot be written leaves neither half, and the batch goes on."""
    clean = tmp_path / "clean"
    _write_clean_folder(clean, photos)
    out = tmp_path / "out"
    calls = {"n": 0}
    real_save = Image.Image.save

    def flaky_save(self, fp, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # second pair, its rainy input: fail after a partial write
            fp.write(b"\x89PNG partial")
            raise OSError("disk full")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", flaky_save)
    lines: list[str] = []
    summary = synthesize_folder(clean, out, preset="light", log=lines.append)
    assert summary.written == 2 and summary.failed == [(str(clean / "img1.jpg"), "OSError: disk full")]
    assert lines == [f"error: {clean / 'img1.jpg'}: OSError: disk full"]
    assert not _leftovers(out)
    # the other pairs are complete, the failed pair left nothing behind
    assert sorted(p.name for p in (out / "input").iterdir()) == ["img0.png", "img2.png"]
    assert sorted(p.name for p in (out / "target").iterdir()) == ["img0.png", "img2.png"]
    Image.open(out / "input" / "img0.png").verify()


def test_streak_dir_validation(tmp_path):
    with pytest.raises(FileNotFoundError):
        RainSynthesizer("light", streak_dir=tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError):
        RainSynthesizer("light", streak_dir=tmp_path / "empty")


def test_streak_database_with_local_images(tmp_path):
    """The database path works with any white-on-black streak images, not only Garg & Nayar."""
    d = tmp_path / "streaks"
    d.mkdir()
    rng = np.random.default_rng(0)
    img = np.zeros((80, 120), np.float32)
    img.flat[rng.integers(0, img.size, 60)] = 1.0
    from scipy import ndimage

    img = ndimage.uniform_filter1d(img, 15, axis=0) * 15
    Image.fromarray((np.clip(img, 0, 1) * 240).astype(np.uint8)).save(d / "s.png")
    cfg = RainConfig(layers=(2, 2), angle=(10.0, 10.0), angle_jitter=0.0, streak_db_prob=1.0)
    s = RainSynthesizer(cfg, streak_dir=d)
    out = s.render(np.zeros((50, 70, 3), np.float32), np.random.default_rng(1))
    assert out.max() > 0.1 and out.shape == (50, 70, 3)
    assert abs(orientation_deg(out.mean(-1)) - 10.0) < 8.0


def _streak_folder(folder: Path) -> Path:
    """Two small white-on-black streak images: enough for a database."""
    folder.mkdir(parents=True)
    for i in range(2):
        img = np.zeros((40, 60), np.uint8)
        img[:, 10 + 20 * i] = 230
        Image.fromarray(img).save(folder / f"s{i}.png")
    return folder


def test_streak_folder_skips_subfolders_and_hidden_files(tmp_path):
    d = _streak_folder(tmp_path / "streaks")
    (d / "sub.png").mkdir()
    (d / "._s0.png").write_bytes(b"macOS resource fork")
    s = RainSynthesizer("light", streak_dir=d)
    assert [p.name for p in s.streak_files] == ["s0.png", "s1.png"]
    s.check_streaks()  # nothing unreadable is left to report


def test_unreadable_streak_image_stops_synthesize_folder_before_any_output(tmp_path, photos):
    clean = tmp_path / "clean"
    _write_clean_folder(clean, photos)
    d = _streak_folder(tmp_path / "streaks")
    (d / "t.png").write_bytes((d / "s0.png").read_bytes()[:60])  # truncated
    (d / "u.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"t\.png: .*truncated.*\(and 1 more unreadable streak images\)"):
        synthesize_folder(clean, out, streak_dir=d)
    assert not out.exists()


def test_streak_image_read_during_rendering_names_the_file(tmp_path):
    d = _streak_folder(tmp_path / "streaks")
    s = RainSynthesizer(RainConfig(layers=(2, 2), streak_db_prob=1.0), streak_dir=d)
    (d / "s0.png").write_bytes((d / "s0.png").read_bytes()[:60])
    (d / "s1.png").write_bytes((d / "s0.png").read_bytes())
    with pytest.raises(ValueError, match=r"s[01]\.png: .*truncated"):
        s.render(np.zeros((30, 30, 3), np.float32), np.random.default_rng(0))


def test_synthesize_folder_reports_an_unreadable_photo_and_goes_on(tmp_path, photos):
    clean = tmp_path / "clean"
    _write_clean_folder(clean, photos)
    (clean / "img0b.png").write_bytes((clean / "img0.png").read_bytes()[:300])  # truncated, sorts second
    before = {p.name: p.read_bytes() for p in clean.iterdir()}
    out = tmp_path / "out"
    lines: list[str] = []
    summary = synthesize_folder(clean, out, count_per_image=2, size=32, log=lines.append)
    assert summary.written == 6
    assert [path for path, _ in summary.failed] == [str(clean / "img0b.png")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {clean / 'img0b.png'}: truncated")
    made = sorted(f"img{i}_{k:03d}.png" for i in range(3) for k in range(2))
    assert sorted(p.name for p in (out / "input").iterdir()) == made
    assert sorted(p.name for p in (out / "target").iterdir()) == made
    assert not _leftovers(out)
    assert {p.name: p.read_bytes() for p in clean.iterdir()} == before


def test_resume_keeps_complete_pairs_and_makes_the_rest(tmp_path, photos, monkeypatch):
    """After Ctrl-C (or a kill that left half a pair) ``resume`` completes the set: kept pairs are
    not rewritten, the others come out as an uninterrupted run makes them."""
    clean = tmp_path / "clean"
    _write_clean_folder(clean, photos)
    options = dict(preset="heavy", count_per_image=2, seed=3, size=32)
    ref = tmp_path / "ref"
    assert synthesize_folder(clean, ref, **options).written == 6
    names = sorted(p.name for p in (ref / "input").iterdir())

    out = tmp_path / "out"
    calls = {"n": 0}
    real_save = Image.Image.save

    def interrupted_save(self, fp, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # the third pair's rainy input: Ctrl-C while it is being written
            fp.write(b"\x89PNG partial")
            raise KeyboardInterrupt
        return real_save(self, fp, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Image.Image, "save", interrupted_save)
        with pytest.raises(KeyboardInterrupt):
            synthesize_folder(clean, out, **options)
    assert not _leftovers(out)
    for sub in ("input", "target"):  # two whole pairs, nothing of the third
        assert sorted(p.name for p in (out / sub).iterdir()) == names[:2]
    with pytest.raises(FileExistsError, match="--resume"):
        synthesize_folder(clean, out, **options)
    with pytest.raises(ValueError, match="choose one"):
        synthesize_folder(clean, out, **options, overwrite=True, resume=True)

    # a kill between the two halves of a pair leaves one of them: that pair is incomplete
    (out / "input" / names[1]).unlink()
    marker = np.full((32, 32, 3), 7, np.uint8)  # stands for a kept pair: must not be rewritten
    Image.fromarray(marker).save(out / "input" / names[0])
    _left_by_a_kill(out / "input" / f".{names[2]}.0badf00d.tmp")
    summary = synthesize_folder(clean, out, **options, resume=True)
    assert (summary.kept, summary.written, summary.failed) == (1, 5, [])
    assert np.array_equal(np.asarray(Image.open(out / "input" / names[0])), marker)
    for sub in ("input", "target"):
        assert sorted(p.name for p in (out / sub).iterdir()) == names
        for name in names[1:] if sub == "input" else names:
            assert (out / sub / name).read_bytes() == (ref / sub / name).read_bytes()
    assert not _leftovers(out)


def test_rain_depends_on_the_name_not_its_unicode_spelling(tmp_path, photos):
    """macOS writes 'é' decomposed (NFD), Linux tools composed (NFC): one photo name, one rain."""
    import unicodedata

    renders = []
    for form in ("NFC", "NFD"):
        clean = tmp_path / form
        clean.mkdir()
        Image.fromarray((photos[0][:40, :50] * 255).round().astype(np.uint8)).save(
            clean / unicodedata.normalize(form, "café.png"))
        assert synthesize_folder(clean, tmp_path / f"out_{form}", preset="heavy").written == 1
        (rainy,) = (tmp_path / f"out_{form}" / "input").iterdir()
        renders.append(np.asarray(Image.open(rainy)))
    assert np.array_equal(renders[0], renders[1])


@pytest.mark.skipif(sys.platform in ("darwin", "win32"), reason="file names there are always Unicode")
def test_photo_named_in_another_encoding_is_rendered(tmp_path, photos):
    """A Latin-1 name from an old archive is not UTF-8: Python holds it with a surrogate escape."""
    clean = tmp_path / "clean"
    clean.mkdir()
    pixels = (photos[0][:40, :50] * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(os.fsdecode(bytes(clean) + b"/caf\xe9.png"))
    summary = synthesize_folder(clean, tmp_path / "out", log=pytest.fail)
    assert (summary.written, summary.failed) == (1, [])
    target = os.fsdecode(bytes(tmp_path / "out" / "target") + b"/caf\xe9.png")
    assert np.array_equal(np.asarray(Image.open(target)), pixels)


def test_report_of_a_photo_whose_name_holds_a_line_break_is_one_line(tmp_path, photos):
    clean = tmp_path / "clean"
    _write_clean_folder(clean, photos[:1])
    (clean / "bad\nname.png").write_bytes(b"not a png")
    lines: list[str] = []
    summary = synthesize_folder(clean, tmp_path / "out", log=lines.append)
    assert summary.written == 1 and [path for path, _ in summary.failed] == [str(clean / "bad\nname.png")]
    assert lines == [f"error: {clean}/bad\\nname.png: not an image (cannot identify image file)"]

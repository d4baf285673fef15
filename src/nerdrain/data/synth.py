"""Rain synthesis: render plausible, varied rain onto clean photos.

Only a handful of real paired training images exist, so training data are mostly clean photos
with rain rendered on the fly.  The renderer imitates how the Rain100/Rain200 benchmarks were
made (grey streak layers added to the photo and clipped to [0, 1]) and adds the effects of heavy
rain that those data show: several streak layers at different depths, a scattering veil (haze)
and droplets.  Presets are calibrated so that the rainy-vs-clean Y-PSNR matches the benchmarks
(``light`` ~ Rain100L/Rain200L, ``heavy`` ~ Rain100H/Rain200H).

Conventions
-----------
* Images are float32 ``H x W x 3`` arrays in [0, 1].
* Streak angles are in degrees from the vertical; a positive angle leans the top of a streak to
  the right (``/``), a negative one to the left (``\\``).
* Lengths, widths and blur radii are in pixels at the benchmark scale (Rain200 images are
  481x321), because training crops and test images share that pixel scale.
"""

from __future__ import annotations

import functools
import math
import sys
import unicodedata
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from scipy import ndimage

from ..checks import whole_number
from ..files import check_output_folder, name_key, one_line, remove_stale_temporaries
from ..imageio import (DATASET_EXTENSIONS, ImageReadError, quantize, read_photo, resolve_max_pixels,
                       rgb_to_gray, save_png)

__all__ = [
    "RainConfig",
    "StreakLayerParams",
    "RainParams",
    "PRESETS",
    "get_preset",
    "RainSynthesizer",
    "RainMixer",
    "render_mixed",
    "synthesize_folder",
    "SynthSummary",
    "streak_orientation",
]

Range = tuple[float, float]

# How a layer's parameters change from the nearest (depth 0) to the farthest (depth 1) layer,
# relative to the mid-depth values drawn from the config ranges.  Near drops cross the exposure
# as long, wide, bright, defocused and few streaks; far ones as short, thin, dim and many.
_NEAR_FAR = {
    "length": (1.5, 0.5),
    "width": (1.5, 0.6),
    "brightness": (1.15, 0.6),
    "coverage": (0.6, 1.4),
}
_SHORT_SHARE = 0.5  # half of a layer's streaks are shorter, so lengths vary within a layer
_SHORT_RATIO = (0.35, 0.7)
_RANGE_FIELDS = ("density", "length", "angle", "width", "brightness", "blur", "haze", "airlight",
                 "splash", "splash_brightness")


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RainConfig:
    """Ranges that the per-sample rain parameters are drawn from (uniformly unless noted).

    Streak ranges describe a mid-depth layer; nearer and farther layers are scaled from it by
    ``depth_spread`` (see ``_NEAR_FAR``), so one range yields a coherent multi-depth rain.
    """

    layers: tuple[int, int] = (1, 2)
    """Number of streak layers, inclusive range."""
    density: Range = (0.05, 0.07)
    """Streak area over image area, all layers summed, overlaps counted (the rain rate)."""
    length: Range = (30.0, 70.0)
    """Streak length in pixels."""
    angle: Range = (-35.0, 35.0)
    """Main rain direction, degrees from vertical, drawn once per image."""
    angle_jitter: float = 3.0
    """Max per-layer deviation from the main direction (wind varies with depth)."""
    width: Range = (0.4, 0.7)
    """Gaussian sigma across a streak, pixels."""
    brightness: Range = (0.38, 0.52)
    """Peak added intensity of a single streak."""
    blur: Range = (0.0, 0.5)
    """Defocus sigma of the nearest layer; far layers are sharp."""
    depth_spread: float = 1.0
    """0: all layers alike; 1: full near/far contrast."""
    haze: Range = (0.0, 0.0)
    """Veil strength, 1 - mean transmission."""
    haze_prob: float = 0.0
    """Probability that an image gets the veil at all."""
    airlight: Range = (0.8, 1.0)
    """Grey level A of the scattered light."""
    splash: Range = (0.0, 0.0)
    """Droplets per pixel."""
    splash_brightness: Range = (0.2, 0.5)
    """Peak intensity of a droplet."""
    streak_db_prob: float = 0.0
    """Probability that a layer is cut from the streak database (only with a ``streak_dir``)."""
    screen_prob: float = 0.0
    """Probability of a screen blend instead of the benchmarks' clipped addition."""

    def __post_init__(self) -> None:
        # accept lists (YAML/JSON configs) but keep the frozen value immutable and hashable
        object.__setattr__(self, "layers", tuple(int(v) for v in self.layers))
        for name in _RANGE_FIELDS:
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        for name in _RANGE_FIELDS + ("layers",):
            if len(getattr(self, name)) != 2:
                raise ValueError(f"{name} must be a (lo, hi) pair, got {getattr(self, name)}")
        lo, hi = self.layers
        if not (1 <= lo <= hi):
            raise ValueError(f"layers must satisfy 1 <= lo <= hi, got {self.layers}")
        for name in _RANGE_FIELDS:
            a, b = getattr(self, name)
            if a > b:
                raise ValueError(f"{name} range must be (lo, hi) with lo <= hi, got {(a, b)}")
        for name in ("haze_prob", "streak_db_prob", "screen_prob", "depth_spread"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.length[0] < 1 or self.density[0] < 0 or self.width[0] < 0 or self.blur[0] < 0:
            raise ValueError("length must be >= 1 and density, width, blur >= 0")
        if self.haze[0] < 0 or self.haze[1] >= 1:
            raise ValueError(f"haze must lie in [0, 1), got {self.haze}")


PRESETS: dict[str, RainConfig] = {
    # Rain100L / Rain200L: sparse, thin, long streaks of one direction, no veil (~27 dB Y-PSNR).
    "light": RainConfig(
        layers=(1, 2),
        density=(0.05, 0.07),
        length=(30.0, 70.0),
        angle=(-35.0, 35.0),
        angle_jitter=3.0,
        width=(0.4, 0.7),
        brightness=(0.38, 0.52),
        blur=(0.0, 0.5),
        depth_spread=0.5,
        splash=(0.0, 0.0001),
        splash_brightness=(0.15, 0.35),
        streak_db_prob=0.3,
    ),
    # Between the two, for training variety (DID-Data "medium"-like, ~20 dB).
    "medium": RainConfig(
        layers=(2, 3),
        density=(0.15, 0.25),
        length=(40.0, 90.0),
        angle=(-25.0, 25.0),
        angle_jitter=8.0,
        width=(0.5, 0.9),
        brightness=(0.4, 0.55),
        blur=(0.2, 0.8),
        haze=(0.05, 0.15),
        haze_prob=0.5,
        airlight=(0.75, 0.95),
        splash=(0.0, 0.0003),
        splash_brightness=(0.2, 0.45),
        streak_db_prob=0.3,
        screen_prob=0.1,
    ),
    # Rain100H / Rain200H: dense, long, bright streaks in several directions, a veil and
    # droplets (~14 dB Y-PSNR).
    "heavy": RainConfig(
        layers=(3, 4),
        density=(0.6, 0.9),
        length=(70.0, 140.0),
        angle=(-12.0, 12.0),
        angle_jitter=12.0,
        width=(0.5, 0.85),
        brightness=(0.32, 0.46),
        blur=(0.2, 0.6),
        haze=(0.05, 0.2),
        haze_prob=1.0,
        airlight=(0.75, 0.95),
        splash=(0.0001, 0.0005),
        splash_brightness=(0.2, 0.5),
        streak_db_prob=0.3,
    ),
}


def get_preset(name: str) -> RainConfig:
    """Look a preset up by name, failing with the list of valid names."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        valid = ", ".join(repr(k) for k in PRESETS)
        raise ValueError(f"unknown rain preset {name!r}; valid presets: {valid}") from None


# --------------------------------------------------------------------------------------------
# drawn parameters
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreakLayerParams:
    """One drawn streak layer; kept so a render can be inspected or replayed."""

    depth: float
    angle: float
    length: float
    width: float
    brightness: float
    density: float
    """Streak seeds per pixel, derived from ``coverage``."""
    blur: float
    coverage: float = 0.0
    short_ratio: float = 0.5
    source: Literal["noise", "database"] = "noise"
    db_file: str | None = None
    db_scale: float = 1.0
    db_shift: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class RainParams:
    """Everything drawn for one image; ``RainSynthesizer.apply`` is deterministic given it."""

    layers: tuple[StreakLayerParams, ...]
    haze: float
    airlight: float
    splash: float
    splash_brightness: Range
    blend: Literal["add", "screen"]
    seed: int


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _rot(deg: float) -> np.ndarray:
    """Matrix taking the unit direction of a 0-degree streak to that of a ``deg`` streak.

    A streak of angle a runs along (row, col) = (cos a, -sin a); R(a) @ (1, 0) gives exactly
    that and R(a) @ R(b) = R(a + b).
    """
    t = math.radians(deg)
    c, s = math.cos(t), math.sin(t)
    return np.array([[c, s], [-s, c]], dtype=np.float64)


def streak_orientation(gray: np.ndarray, smooth: float = 1.0) -> float:
    """Dominant streak angle (degrees from vertical, positive = ``/``) of a grey image.

    Uses the image-wide structure tensor: gradients are perpendicular to streaks.  Light
    pre-smoothing removes the pull of pixelated thin lines towards the grid axes.
    """
    g = np.asarray(gray, dtype=np.float64)
    if smooth > 0:
        g = ndimage.gaussian_filter(g, smooth)
    gr = ndimage.sobel(g, axis=0)
    gc = ndimage.sobel(g, axis=1)
    jrr, jcc, jrc = float((gr * gr).sum()), float((gc * gc).sum()), float((gr * gc).sum())
    return math.degrees(0.5 * math.atan2(2.0 * jrc, jcc - jrr))


def _gauss_peak(sigma: float) -> float:
    """Centre value of scipy's normalised 1-D Gaussian kernel (to keep streak peaks fixed)."""
    if sigma <= 0:
        return 1.0
    r = int(4.0 * sigma + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    return float(1.0 / np.exp(-0.5 * (x / sigma) ** 2).sum())


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Smooth (smoothstep) interpolation weights from ``n_in`` control points to ``n_out``."""
    pos = np.linspace(0.0, n_in - 1.0, n_out)
    i0 = np.clip(np.floor(pos).astype(int), 0, max(n_in - 2, 0))
    f = np.clip(pos - i0, 0.0, 1.0)
    f = f * f * (3.0 - 2.0 * f)
    m = np.zeros((n_out, n_in), dtype=np.float32)
    m[np.arange(n_out), i0] = 1.0 - f
    m[np.arange(n_out), np.minimum(i0 + 1, n_in - 1)] += f
    return m


def _smooth_field(rng: np.random.Generator, h: int, w: int, cells: int = 4) -> np.ndarray:
    """Low-frequency random field in [0, 1]: cheap stand-in for a scene depth map."""
    gh = max(2, round(cells * h / max(h, w)) + 1)
    gw = max(2, round(cells * w / max(h, w)) + 1)
    grid = rng.random((gh, gw), dtype=np.float32)
    return _interp_matrix(h, gh) @ grid @ _interp_matrix(w, gw).T


def _lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * t


def _load_rgb(path: Path) -> np.ndarray:
    """HxWx3 float32 in [0, 1]: EXIF orientation applied, 16-bit and grey files read as they are,
    errors naming the file (:func:`nerdrain.imageio.read_photo`)."""
    return read_photo(path).rgb


# --------------------------------------------------------------------------------------------
# synthesizer
# --------------------------------------------------------------------------------------------


class RainSynthesizer:
    """Draws rain parameters from a ``RainConfig`` and renders them onto clean images.

    Cheap enough to run inside a data loader (scipy separable filters on a rotated canvas; no
    per-pixel Python).  ``streak_dir`` enables the Garg & Nayar streak database; the database
    is optional so the library never depends on data outside the package.
    """

    _DB_CACHE_SIZE = 48

    def __init__(self, config: RainConfig | str = "light",
                 streak_dir: str | Path | None = None) -> None:
        self.config: RainConfig = get_preset(config) if isinstance(config, str) else config
        if not isinstance(self.config, RainConfig):
            raise TypeError(f"config must be a RainConfig or preset name, got {type(config)}")
        self.streak_files: tuple[Path, ...] = ()
        if streak_dir is not None:
            d = Path(streak_dir)
            if not d.is_dir():
                raise FileNotFoundError(f"streak database folder not found: {d}")
            self.streak_files = tuple(sorted(p for p in d.iterdir()  # a folder named x.png is no image
                                             if p.suffix.lower() in DATASET_EXTENSIONS and p.is_file()
                                             and not p.name.startswith(".")))
            if not self.streak_files:
                raise ValueError(f"no streak images in {d}")
        self._db_cache: OrderedDict[str, tuple[np.ndarray, float, float]] = OrderedDict()

    def check_streaks(self) -> None:
        """Decode every streak image now, so that a bad one stops a run before its first output
        rather than in the middle of it (they are otherwise read when first drawn).

        Raises :class:`~nerdrain.imageio.ImageReadError` naming the first unreadable file.
        """
        bad = []
        for f in self.streak_files:
            try:
                read_photo(f)
            except ImageReadError as err:
                bad.append(err)
        if bad:
            more = f" (and {len(bad) - 1} more unreadable streak images)" if len(bad) > 1 else ""
            raise ImageReadError(bad[0].path, bad[0].reason + more)

    # -- parameters ---------------------------------------------------------------------------

    def sample(self, rng: np.random.Generator) -> RainParams:
        """Draw one image's rain; separated from ``apply`` so draws can be logged/replayed."""
        cfg = self.config
        u = rng.uniform
        n = int(rng.integers(cfg.layers[0], cfg.layers[1] + 1))
        base_angle = float(u(*cfg.angle))
        if n == 1:
            depths = [float(u(0.3, 0.7))]
        else:  # evenly spread from near to far, jittered
            depths = [float(np.clip(i / (n - 1) + u(-0.1, 0.1), 0.0, 1.0)) for i in range(n)]
        layers = []
        use_db = bool(self.streak_files) and cfg.streak_db_prob > 0
        shares = [_lerp(*_NEAR_FAR["coverage"], self._eff_depth(z)) for z in depths]
        total = float(u(*cfg.density))
        for z, share in zip(depths, shares):
            t = self._eff_depth(z)

            def fac(key: str, t: float = t) -> float:
                near, far = _NEAR_FAR[key]
                return _lerp(near, far, t)

            length = max(1.0, float(u(*cfg.length)) * fac("length"))
            width = float(u(*cfg.width)) * fac("width")
            coverage = total * share / sum(shares)
            short = float(u(*_SHORT_RATIO))
            mean_len = length * (1.0 - _SHORT_SHARE * (1.0 - short))
            layer = StreakLayerParams(
                depth=z,
                angle=base_angle + float(u(-cfg.angle_jitter, cfg.angle_jitter)),
                length=length,
                width=width,
                brightness=float(u(*cfg.brightness)) * fac("brightness"),
                coverage=coverage,
                density=coverage / (mean_len * max(1.0, 2.5 * width)),
                short_ratio=short,
                blur=float(u(*cfg.blur)) * (1.0 - z) ** 2,
            )
            if use_db and rng.random() < cfg.streak_db_prob:
                f = self.streak_files[int(rng.integers(len(self.streak_files)))]
                layer = replace(layer, source="database", db_file=str(f),
                                db_scale=float(u(0.6, 1.3)) * _lerp(1.3, 0.7, t),
                                db_shift=(float(u(0, 1e4)), float(u(0, 1e4))))
            layers.append(layer)
        hazy = cfg.haze[1] > 0 and rng.random() < cfg.haze_prob
        haze = float(u(*cfg.haze)) if hazy else 0.0
        blend: Literal["add", "screen"] = "screen" if rng.random() < cfg.screen_prob else "add"
        return RainParams(
            layers=tuple(layers),
            haze=haze,
            airlight=float(u(*cfg.airlight)),
            splash=float(u(*cfg.splash)),
            splash_brightness=cfg.splash_brightness,
            blend=blend,
            seed=int(rng.integers(0, 2**63 - 1)),
        )

    def _eff_depth(self, z: float) -> float:
        """Depth used for the near/far scaling, pulled to mid-depth by ``depth_spread`` < 1."""
        return z * self.config.depth_spread + 0.5 * (1.0 - self.config.depth_spread)

    # -- rendering ----------------------------------------------------------------------------

    def render(self, clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Rainy version of ``clean`` (float32 HxWx3 in [0, 1]); same rng state -> same output."""
        self._check(clean)
        return self.apply(clean, self.sample(rng))

    def apply(self, clean: np.ndarray, params: RainParams) -> np.ndarray:
        """Render already drawn parameters (deterministic)."""
        h, w = self._check(clean)
        img = np.asarray(clean, dtype=np.float32)
        rain = self.rain_layer(params, h, w)
        if params.haze > 0:
            img = self._veil(img, params)
        if params.blend == "screen":
            out = 1.0 - (1.0 - img) * (1.0 - np.clip(rain, 0.0, 1.0))[..., None]
        else:
            out = img + rain[..., None]
        return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)

    def rain_layer(self, params: RainParams, height: int, width: int) -> np.ndarray:
        """Additive grey rain (streaks + droplets), float32 HxW, not clipped."""
        rain = np.zeros((height, width), dtype=np.float32)
        for i, layer in enumerate(params.layers):
            lrng = np.random.default_rng([params.seed, i])
            if layer.source == "database" and layer.db_file is not None:
                rain += self._db_layer(layer, height, width)
            else:
                rain += self._noise_layer(layer, height, width, lrng)
        if params.splash > 0:
            rain += self._droplets(params, height, width,
                                   np.random.default_rng([params.seed, 1_000_003]))
        return rain

    @staticmethod
    def _check(clean: np.ndarray) -> tuple[int, int]:
        a = np.asarray(clean)
        if not np.issubdtype(a.dtype, np.floating):
            raise TypeError(f"expected a float image in [0, 1], got dtype {a.dtype}")
        if a.ndim != 3 or a.shape[2] != 3 or a.shape[0] < 1 or a.shape[1] < 1:
            raise ValueError(f"expected an HxWx3 image, got shape {a.shape}")
        return int(a.shape[0]), int(a.shape[1])

    def _noise_layer(self, p: StreakLayerParams, h: int, w: int,
                     rng: np.random.Generator) -> np.ndarray:
        """Sparse seeds motion-blurred along a vertical canvas, then rotated onto the image.

        Blurring along an axis makes the cost independent of streak length and angle; one
        bilinear resampling does the rotation.
        """
        L = max(1, int(round(p.length)))
        sw, sb = max(p.width, 0.0), max(p.blur, 0.0)
        pad = L + int(math.ceil(4 * (sw + sb))) + 2
        t = math.radians(p.angle)
        c, s = abs(math.cos(t)), abs(math.sin(t))
        ch = int(math.ceil(h * c + w * s)) + 2 * pad
        cw = int(math.ceil(w * c + h * s)) + 2 * pad
        canvas = np.zeros(ch * cw, dtype=np.float32)
        # two length groups so streaks within one layer are not all equally long
        count = int(rng.poisson(p.density * ch * cw))
        idx = rng.integers(0, ch * cw, size=count)
        val = rng.uniform(0.35, 1.0, size=count).astype(np.float32)
        short = rng.random(count) < _SHORT_SHARE
        canvas[idx[~short]] = val[~short]
        canvas = canvas.reshape(ch, cw)
        Ls = max(1, int(round(L * p.short_ratio)))
        layer = self._streak_blur(canvas, L)
        if short.any():
            c2 = np.zeros(ch * cw, dtype=np.float32)
            c2[idx[short]] = val[short]
            layer += self._streak_blur(c2.reshape(ch, cw), Ls)
        if sw > 0.3:
            layer = ndimage.gaussian_filter1d(layer, sw, axis=1, mode="constant", truncate=3.0)
            layer *= np.float32(1.0 / _gauss_peak(sw))
        if sb > 0.2:
            layer = ndimage.gaussian_filter(layer, sb, mode="constant", truncate=3.0)
        layer *= np.float32(p.brightness)
        # output (r, c) -> canvas: rotate by -angle around the centres
        m = _rot(-p.angle)
        out_c = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
        can_c = np.array([(ch - 1) / 2.0, (cw - 1) / 2.0])
        return ndimage.affine_transform(layer, m, offset=can_c - m @ out_c, output_shape=(h, w),
                                        order=1, mode="constant", cval=0.0, prefilter=False)

    @staticmethod
    def _streak_blur(canvas: np.ndarray, length: int) -> np.ndarray:
        """Box blur of ``length`` plus a short taper box; scaled so a lone seed keeps its peak."""
        out = ndimage.uniform_filter1d(canvas, length, axis=0, mode="constant")
        taper = max(1, length // 4)
        if taper > 1:
            out = ndimage.uniform_filter1d(out, taper, axis=0, mode="constant")
        out *= np.float32(length)
        return out

    def _db_image(self, path: str) -> tuple[np.ndarray, float, float]:
        """Grey streak image normalised to peak ~1, its streak angle and coverage (LRU cached)."""
        hit = self._db_cache.get(path)
        if hit is not None:
            self._db_cache.move_to_end(path)
            return hit
        g = rgb_to_gray(_load_rgb(Path(path)))
        peak = float(np.percentile(g, 99.9))
        g = g / max(peak, 1e-3)
        entry = (g, streak_orientation(g), max(float((g > 0.25).mean()), 1e-3))
        self._db_cache[path] = entry
        if len(self._db_cache) > self._DB_CACHE_SIZE:
            self._db_cache.popitem(last=False)
        return entry

    def _db_layer(self, p: StreakLayerParams, h: int, w: int) -> np.ndarray:
        """Database streaks, tiled (wrap), scaled and rotated to the layer's angle.

        A database image has a fixed streak coverage, so denser layers overlay up to three
        shifted, rescaled copies and the rest of the layer's energy (coverage x brightness^2)
        is matched with the gain.
        """
        assert p.db_file is not None
        img, own_angle, own_cov = self._db_image(p.db_file)
        if p.blur > 0.2:
            img = ndimage.gaussian_filter(img, p.blur / p.db_scale, mode="wrap", truncate=3.0)
        copies = int(np.clip(round(p.coverage / own_cov), 1, 3))
        out_c = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
        size = np.array(img.shape, dtype=np.float64)
        layer = np.zeros((h, w), dtype=np.float32)
        for j in range(copies):
            # output direction of p.angle must map to the database's own streak direction
            m = _rot(own_angle - p.angle) / (p.db_scale * (1.0 + 0.17 * j))
            src_c = (np.array(p.db_shift) + j * size * (0.382, 0.618)) % size
            layer += ndimage.affine_transform(img, m, offset=src_c - m @ out_c,
                                              output_shape=(h, w), order=1, mode="grid-wrap",
                                              prefilter=False)
        ratio = float(np.clip(p.coverage / (copies * own_cov), 0.25, 2.0))
        return layer * np.float32(1.15 * p.brightness * math.sqrt(ratio))

    @staticmethod
    def _droplets(params: RainParams, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
        """Small bright blobs: drops on/near the lens and splashes, as in Rain100H/200H."""
        out = np.zeros((h, w), dtype=np.float32)
        for sigma, share in ((0.9, 0.7), (1.8, 0.3)):
            count = int(rng.poisson(params.splash * share * h * w))
            if count == 0:
                continue
            seeds = np.zeros(h * w, dtype=np.float32)
            seeds[rng.integers(0, h * w, size=count)] = rng.uniform(
                *params.splash_brightness, size=count)
            blob = ndimage.gaussian_filter(seeds.reshape(h, w), sigma, mode="constant",
                                           truncate=3.0)
            out += blob * np.float32(1.0 / _gauss_peak(sigma) ** 2)
        return out

    def _veil(self, img: np.ndarray, params: RainParams) -> np.ndarray:
        """Atmospheric scattering I = J t + A (1 - t) with a smooth, uneven transmission t.

        Without scene depth, a low-frequency random field plus a top-is-farther ramp stands in
        for it, so the veil thickens unevenly like real rain fog.
        """
        h, w = img.shape[:2]
        rng = np.random.default_rng([params.seed, 2_000_003])
        f = _smooth_field(rng, h, w, cells=int(rng.integers(2, 6)))
        ramp = np.linspace(1.0, 0.0, h, dtype=np.float32)[:, None] * np.float32(rng.uniform(0, 0.5))
        d = 0.6 + 0.8 * f + ramp  # mean about 1.0 + ramp/2
        d /= np.float32(d.mean())
        t = np.clip(1.0 - params.haze * d, 0.05, 1.0).astype(np.float32)[..., None]
        return img * t + np.float32(params.airlight) * (1.0 - t)


# --------------------------------------------------------------------------------------------
# mixing light and heavy
# --------------------------------------------------------------------------------------------


class RainMixer:
    """Picks a preset per sample, because training mixes light and heavy rain."""

    def __init__(self, presets: Sequence[str | RainConfig] = ("light", "heavy"),
                 weights: Sequence[float] | None = None,
                 streak_dir: str | Path | None = None) -> None:
        if len(presets) == 0:
            raise ValueError("need at least one preset")
        self.synths = [RainSynthesizer(p, streak_dir) for p in presets]
        wts = np.ones(len(presets)) if weights is None else np.asarray(weights, dtype=np.float64)
        if wts.shape != (len(presets),) or not np.isfinite(wts).all() or (wts < 0).any() or wts.sum() <= 0:
            raise ValueError(f"weights must be {len(presets)} finite non-negative numbers, not all 0, got {weights}")
        self.weights = wts / wts.sum()

    def render(self, clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        k = int(rng.choice(len(self.synths), p=self.weights))
        return self.synths[k].render(clean, rng)


@functools.lru_cache(maxsize=16)
def _cached_mixer(presets: tuple[str, ...], weights: tuple[float, ...] | None,
                  streak_dir: str | None) -> RainMixer:
    return RainMixer(presets, weights, streak_dir)


def render_mixed(clean: np.ndarray, rng: np.random.Generator,
                 presets: Sequence[str] = ("light", "heavy"),
                 weights: Sequence[float] | None = None,
                 streak_dir: str | Path | None = None) -> np.ndarray:
    """One-call light/heavy mix; synthesizers are cached so the database cache survives."""
    mixer = _cached_mixer(tuple(presets), None if weights is None else tuple(map(float, weights)),
                          None if streak_dir is None else str(streak_dir))
    return mixer.render(clean, rng)


# --------------------------------------------------------------------------------------------
# dataset writer
# --------------------------------------------------------------------------------------------


def _crop_size(size: int | tuple[int, int]) -> tuple[int, int]:
    """``size`` as (h, w), refused where it is not positive or has more pixels than ``read_photo``
    accepts: smaller photos are upscaled to cover a crop, so a typo would end in a MemoryError."""
    side = whole_number(size)
    if side is not None:
        sides: tuple[int | None, ...] = (side, side)
    else:  # a string "32" would have been read as (3, 2)
        sides = tuple(map(whole_number, size)) if isinstance(size, (tuple, list)) else ()
    if len(sides) != 2 or None in sides:
        raise TypeError(f"size (--size) must be a whole number or an (h, w) pair of them, got {size!r}")
    th, tw = sides
    if th < 1 or tw < 1:
        raise ValueError(f"size (--size) must be positive, got {size}")
    limit = resolve_max_pixels(None)
    if limit > 0 and th * tw > limit:
        raise ValueError(f"size (--size) {th}x{tw} is {th * tw:,} pixels, more than the limit of {limit:,} "
                         "(NERDRAIN_MAX_PIXELS sets it)")
    return th, tw


def _crop(img: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Random crop to ``size`` (h, w); smaller images are first upscaled to cover it."""
    th, tw = size
    h, w = img.shape[:2]
    if h < th or w < tw:
        f = max(th / h, tw / w)
        nh, nw = max(th, math.ceil(h * f)), max(tw, math.ceil(w * f))
        im = Image.fromarray(quantize(img, 8)).resize((nw, nh), Image.Resampling.BICUBIC)
        img = np.asarray(im, dtype=np.float32) / 255.0
        h, w = nh, nw
    r = int(rng.integers(0, h - th + 1))
    c = int(rng.integers(0, w - tw + 1))
    return img[r:r + th, c:c + tw]


@dataclass
class SynthSummary:
    """Outcome of :func:`synthesize_folder`."""

    written: int = 0
    kept: int = 0
    """Complete pairs of an earlier run left as they were (``resume=True``)."""
    failed: list[tuple[str, str]] = field(default_factory=list)
    """(photo, reason) for each photo that did not give all of its pairs."""


def _name_seed(name: str) -> int:
    """A photo's name as a number for its seed: the same for the same name spelt in either Unicode
    form (macOS writes 'é' decomposed, Linux tools composed) and for names that are not UTF-8 (an
    old Latin-1 archive's, held by Python with surrogate escapes)."""
    return zlib.crc32(unicodedata.normalize("NFC", name).encode("utf-8", "surrogateescape"))


def _failure(err: Exception, src: Path) -> str:
    """Why ``src`` gave no pair, for a line that already names it."""
    if isinstance(err, ImageReadError) and err.path == str(src):
        return err.reason
    if isinstance(err, MemoryError):
        return "not enough memory to render the pair (a smaller --size?)"
    msg = " ".join(str(err).split())
    return f"{type(err).__name__}: {msg}" if msg else type(err).__name__


def _check_one_source_per_output(jobs: dict[Path, list[tuple[int, str]]]) -> None:
    """Photos whose names differ only by extension, letter case or accent form (NFC or NFD) would
    write one output file (on macOS and Windows, which compare names by :func:`name_key`, even
    where Linux keeps them apart): the second pair would replace the first, counted as two."""
    source_of: dict[str, Path] = {}
    for src, pairs in jobs.items():
        for _, name in pairs:
            other = source_of.setdefault(name_key(name), src)
            if other != src:
                raise ValueError(f"{src.parent}: {other.name} and {src.name}: their outputs would be one file "
                                 f"({name}; names differ only by extension, letter case or accent form)")


def synthesize_folder(clean_dir: str | Path, out_dir: str | Path, preset: str | RainConfig = "light",
                      count_per_image: int = 1, seed: int = 0,
                      streak_dir: str | Path | None = None,
                      size: int | tuple[int, int] | None = None,
                      overwrite: bool = False, resume: bool = False,
                      log: Callable[[str], object] | None = None) -> SynthSummary:
    """Write a paired set ``out_dir/input/NAME.png`` (rainy) + ``out_dir/target/NAME.png`` (clean).

    Each (image, copy) gets its own seed from ``seed`` and the file name, so results do not
    shift when files are added.  ``size`` random-crops (int or (h, w)) before rendering.
    Existing outputs are an error unless ``overwrite`` (replace them) or ``resume`` (continue a
    run with the same options: pairs whose two files exist are kept, the rest are made, a half
    pair left by a killed run included); source images are never written.
    Bad options and outputs fail before anything is created.  A photo that cannot be read or
    rendered is reported as one line ``error: <photo>: <reason>`` on stderr (or to ``log``, a
    callable taking the line) and the batch goes on; each pair appears whole or not at all.
    """
    clean_dir, out_dir = Path(clean_dir), Path(out_dir)
    if overwrite and resume:
        raise ValueError("overwrite (--overwrite) replaces earlier outputs, resume (--resume) keeps them: "
                         "choose one")
    if not clean_dir.is_dir():
        raise FileNotFoundError(f"clean image folder not found: {clean_dir}")
    if count_per_image < 1:
        raise ValueError(f"count_per_image (--count) must be at least 1, got {count_per_image}")
    if seed < 0:
        raise ValueError(f"seed (--seed) must be a non-negative integer, got {seed}")
    crop = None if size is None else _crop_size(size)
    sources = sorted(p for p in clean_dir.iterdir()
                     if p.is_file() and p.suffix.lower() in DATASET_EXTENSIONS
                     and not p.name.startswith("."))
    if not sources:
        raise ValueError(f"no images ({', '.join(sorted(DATASET_EXTENSIONS))}) in {clean_dir}")
    synth = RainSynthesizer(preset, streak_dir)
    synth.check_streaks()
    in_dir, tg_dir = out_dir / "input", out_dir / "target"

    jobs = {src: [(k, f"{src.stem}.png" if count_per_image == 1 else f"{src.stem}_{k:03d}.png")
                  for k in range(count_per_image)] for src in sources}
    names = [name for pairs in jobs.values() for _, name in pairs]
    _check_one_source_per_output(jobs)
    check_output_folder(in_dir, names)
    check_output_folder(tg_dir, names)
    src_set = {p.resolve() for p in sources}
    for name in names:
        for dest in (in_dir / name, tg_dir / name):
            if dest.resolve() in src_set:
                raise ValueError(f"refusing to overwrite source image {dest}")
            if dest.exists() and not (overwrite or resume):
                raise FileExistsError(f"{dest} exists (continue an earlier run with the same options: nerd-rain synth "
                                      "--resume, resume=True; replace outputs: --overwrite, overwrite=True)")
    in_dir.mkdir(parents=True, exist_ok=True)
    tg_dir.mkdir(parents=True, exist_ok=True)
    if resume or overwrite:  # what a killed run was writing
        for folder in (in_dir, tg_dir):
            remove_stale_temporaries(folder, names)

    summary = SynthSummary()
    for src, pairs in jobs.items():
        if resume:  # deterministic pairs: a complete one is what this run would write
            done = [(k, name) for k, name in pairs if (in_dir / name).is_file() and (tg_dir / name).is_file()]
            summary.kept += len(done)
            pairs = [pair for pair in pairs if pair not in done]
            if not pairs:
                continue
        try:
            photo = _load_rgb(src)
            for k, name in pairs:
                rng = np.random.default_rng([seed, _name_seed(src.name), k])
                clean_u8 = quantize(photo if crop is None else _crop(photo, crop, rng), 8)
                rainy = synth.render(clean_u8.astype(np.float32) / 255.0, rng)
                save_png(clean_u8, tg_dir / name)
                try:
                    save_png(quantize(rainy, 8), in_dir / name)
                except BaseException:
                    (tg_dir / name).unlink(missing_ok=True)  # never leave half a pair
                    raise
                summary.written += 1
        except Exception as err:  # noqa: BLE001 - one bad photo must not stop the batch
            summary.failed.append((str(src), _failure(err, src)))
            line = f"error: {one_line(str(src))}: {one_line(summary.failed[-1][1])}"
            if log is not None:
                log(line)
            else:
                print(line, file=sys.stderr)
    return summary

"""Metrics checked against hand computations, scikit-image, direct re-implementations of the
MATLAB definitions, and Rain12 figures measured by an independent implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.signal import correlate2d
from skimage import img_as_ubyte
from skimage.metrics import structural_similarity

from nerdrain.metrics import PROTOCOLS, psnr, rgb_to_y, score, ssim, to_uint8

from conftest import DATA  # the one place ../shared is located (NERDRAIN_SHARED overrides)

RAIN12 = DATA / "rain12"


def _gray(value: int, shape: tuple[int, int] = (16, 16)) -> np.ndarray:
    return np.full((*shape, 3), value, dtype=np.uint8)


def _smooth_rgb(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Natural-ish image: smooth gradients plus noise, so SSIM is far from both 0 and 1."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = 128 + 60 * np.sin(xx / 23.0)[..., None] * np.cos(yy / 17.0)[..., None]
    noisy = base + rng.normal(0, 20, (h, w, 3))
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _degrade(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    return np.clip(img.astype(np.int16) + rng.integers(-25, 26, img.shape), 0, 255).astype(np.uint8)


def _fspecial_gaussian() -> np.ndarray:
    """MATLAB fspecial('gaussian', 11, 1.5) in 2-D, renormalised as ssim_index.m does."""
    x, y = np.meshgrid(np.arange(-5, 6), np.arange(-5, 6))
    h = np.exp(-(x * x + y * y) / (2 * 1.5 * 1.5))
    h[h < np.finfo(float).eps * h.max()] = 0
    h = h / h.sum()
    return h / h.sum()


def _reference_ssim(img1: np.ndarray, img2: np.ndarray) -> float:
    """Wang's SSIM with 2-D 'valid' correlation (filter2), L = 255, straight from the paper."""
    window = _fspecial_gaussian()

    def filt(a: np.ndarray) -> np.ndarray:
        return correlate2d(a, window, mode="valid")

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu1, mu2 = filt(img1), filt(img2)
    s1 = filt(img1 * img1) - mu1 * mu1
    s2 = filt(img2 * img2) - mu2 * mu2
    s12 = filt(img1 * img2) - mu1 * mu2
    smap = (2 * mu1 * mu2 + c1) * (2 * s12 + c2) / ((mu1**2 + mu2**2 + c1) * (s1 + s2 + c2))
    return float(smap.mean())


def _reference_box_subsample(img: np.ndarray, f: int) -> np.ndarray:
    """imfilter(img, ones(f)/f^2, 'symmetric', 'same') sampled at (1:f:end, 1:f:end), with loops.

    MATLAB puts the kernel centre at floor((f+1)/2) (1-based), so output (i, j) averages rows
    i - c .. i - c + f - 1 with c = floor((f+1)/2) - 1; an index outside the image is mirrored
    including the edge pixel: -1 -> 0, n -> n - 1.
    """
    h, w = img.shape
    c = (f + 1) // 2 - 1

    def mirror(k: int, n: int) -> int:
        if k < 0:
            return -k - 1
        if k >= n:
            return 2 * n - 1 - k
        return k

    out = np.empty(((h + f - 1) // f, (w + f - 1) // f))
    for oi, i in enumerate(range(0, h, f)):
        rows = [mirror(i - c + a, h) for a in range(f)]
        for oj, j in enumerate(range(0, w, f)):
            cols = [mirror(j - c + b, w) for b in range(f)]
            out[oi, oj] = img[np.ix_(rows, cols)].sum() / (f * f)
    return out


def _reference_y_double(img: np.ndarray) -> np.ndarray:
    rgb = img.astype(np.float64)
    return (16 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255) / 255


# --- rgb_to_y ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rgb", "expected"),
    [
        ((0, 0, 0), 16),  # offset only
        ((255, 255, 255), 235),  # 16 + 219
        ((255, 0, 0), 81),  # 16 + 65.481 = 81.481
        ((0, 255, 0), 145),  # 16 + 128.553 = 144.553
        ((0, 0, 255), 41),  # 16 + 24.966 = 40.966
        ((100, 100, 100), 102),  # 16 + 219 * 100 / 255 = 101.88
        # 299*6 + 587*34 + 114*182 = 42500, so Y = 16 + 219 * 42500 / 255000 = 52.5 exactly:
        # MATLAB rounds half away from zero to 53 (half to even would give 52).
        ((6, 34, 182), 53),
    ],
)
def test_rgb_to_y_rounded_by_hand(rgb: tuple[int, int, int], expected: int) -> None:
    img = np.array([[rgb]], dtype=np.uint8)
    assert rgb_to_y(img, rounded=True)[0, 0] == expected


def test_rgb_to_y_rounded_matches_exact_arithmetic_on_every_colour() -> None:
    """Over all 2^24 colours, Y equals exact rational rounding except at the exact .5 ties,
    where the floating point order decides between the two neighbours."""
    g, b = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    ties = 0
    for r in range(256):
        img = np.stack([np.full_like(g, r), g, b], axis=-1).astype(np.uint8)
        num = 65481 * r + 128553 * g + 24966 * b  # 1000 * (65.481 R + 128.553 G + 24.966 B)
        exact_twice = 2 * num + 2 * 16 * 255000  # 2 * 255000 * Y, an integer
        tie = exact_twice % 255000 == 0
        tie &= (exact_twice // 255000) % 2 == 1
        expected = (num + 16 * 255000 + 127500) // 255000  # floor(Y + 0.5) exactly
        got = rgb_to_y(img, rounded=True)
        assert np.array_equal(got[~tie], expected[~tie])
        assert np.all((got[tie] == expected[tie]) | (got[tie] == expected[tie] - 1))
        ties += int(tie.sum())
    assert ties == 194


def test_rgb_to_y_double_path() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    y = rgb_to_y(img, rounded=False)
    np.testing.assert_allclose(y, _reference_y_double(img), rtol=0, atol=1e-14)
    assert rgb_to_y(_gray(0), rounded=False)[0, 0] == pytest.approx(16 / 255, abs=1e-15)
    assert rgb_to_y(_gray(255), rounded=False)[0, 0] == pytest.approx(235 / 255, abs=1e-15)


# --- PSNR --------------------------------------------------------------------------------------


def test_psnr_by_hand() -> None:
    # gray 100 -> Y 101.88 -> 102; gray 110 -> Y 110.47 -> 110: a constant difference of 8.
    assert psnr(_gray(100), _gray(110)) == pytest.approx(20 * math.log10(255 / 8), abs=1e-12)
    # did_ddn: unrounded Y differs by 219 * 10 / 255 / 255 everywhere, peak 1.
    d = 219 * 10 / 255 / 255
    assert psnr(_gray(100), _gray(110), "did_ddn") == pytest.approx(-20 * math.log10(d), abs=1e-9)
    # Half the pixels differ by 219 (black vs white): mse = 219^2 / 2.
    half = _gray(0)
    half[:8] = 255
    expected = 20 * math.log10(255 / math.sqrt(219**2 / 2))
    assert psnr(_gray(0), half) == pytest.approx(expected, abs=1e-12)
    expected = 10 * math.log10(1 / ((219 / 255) ** 2 / 2))
    assert psnr(_gray(0), half, "did_ddn") == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_identical_images(protocol: str) -> None:
    img = _smooth_rgb(np.random.default_rng(1), 40, 50)
    assert psnr(img, img, protocol) == math.inf
    assert ssim(img, img, protocol) == pytest.approx(1.0, abs=1e-12)


# --- SSIM --------------------------------------------------------------------------------------


def test_ssim_rain200_matches_skimage_valid_region() -> None:
    rng = np.random.default_rng(2)
    clean = _smooth_rgb(rng, 61, 83)
    rainy = _degrade(rng, clean)
    y1, y2 = rgb_to_y(rainy, rounded=True), rgb_to_y(clean, rounded=True)
    _, smap = structural_similarity(
        y1,
        y2,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=255,
        K1=0.01,
        K2=0.03,
        full=True,
    )
    expected = smap[5:-5, 5:-5].mean()
    assert 0.2 < expected < 0.95
    assert ssim(rainy, clean) == pytest.approx(expected, abs=1e-10)
    assert ssim(rainy, clean) == pytest.approx(_reference_ssim(y1, y2), abs=1e-10)


@pytest.mark.parametrize(
    ("shape", "f"),
    [
        ((200, 301), 1),  # round(200/256) = 1: no subsampling
        ((401, 515), 2),  # odd sizes, even box: the window reaches one pixel forward
        ((640, 643), 3),  # 640/256 = 2.5: MATLAB rounds to 3, numpy's round would give 2
    ],
)
def test_ssim_did_ddn_matches_direct_ssim_m(shape: tuple[int, int], f: int) -> None:
    rng = np.random.default_rng(3)
    clean = _smooth_rgb(rng, *shape)
    rainy = _degrade(rng, clean)
    y1, y2 = _reference_y_double(rainy) * 255, _reference_y_double(clean) * 255
    if f > 1:
        y1, y2 = _reference_box_subsample(y1, f), _reference_box_subsample(y2, f)
    expected = _reference_ssim(y1, y2)
    assert ssim(rainy, clean, "did_ddn") == pytest.approx(expected, abs=1e-10)


def test_ssim_did_ddn_box_filter_direction() -> None:
    """A 2x2 box in imfilter averages (i, i+1), mirroring the last row/column onto itself."""
    from nerdrain.metrics import _box_subsample

    img = np.arange(12, dtype=np.float64).reshape(3, 4)  # rows step 4, columns step 1
    # (i, j) -> mean of img[i:i+2, j:j+2], with row 3 -> row 2 and column 4 -> column 3.
    expected = np.array([[2.5, 4.5], [8.5, 10.5]])
    np.testing.assert_array_equal(_box_subsample(img, 2), expected)


# --- score, inputs, quantisation ---------------------------------------------------------------


def test_score_is_psnr_and_ssim() -> None:
    rng = np.random.default_rng(4)
    clean = _smooth_rgb(rng, 30, 40)
    rainy = _degrade(rng, clean)
    for protocol in PROTOCOLS:
        assert score(rainy, clean, protocol) == (
            psnr(rainy, clean, protocol),
            ssim(rainy, clean, protocol),
        )


@pytest.mark.parametrize(
    ("pred", "target", "message"),
    [
        (np.zeros((20, 20, 1), np.uint8), np.zeros((20, 20, 1), np.uint8), "HxWx3"),
        (np.zeros((20, 20, 4), np.uint8), np.zeros((20, 20, 4), np.uint8), "HxWx3"),
        (np.zeros((20, 20, 3), np.float32), np.zeros((20, 20, 3), np.uint8), "uint8"),
        (np.zeros((20, 20, 3), np.uint8), np.zeros((20, 21, 3), np.uint8), "differ in shape"),
        (np.zeros((10, 20, 3), np.uint8), np.zeros((10, 20, 3), np.uint8), "at least 11x11"),
        (np.zeros((10, 20, 3), np.uint8), np.zeros((10, 20, 3), np.uint8), "got 20x10$"),  # W x H
    ],
)
def test_bad_inputs_raise(pred: np.ndarray, target: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ssim(pred, target)


def test_grey_images_score_their_own_values_under_rain200() -> None:
    """The rain200 script converts only three-channel images (``if size(img, 3) == 3``): a grey
    HxW image, as MATLAB's imread gives a grey file, is scored on its own values 0..255."""
    grey100, grey110 = np.full((16, 16), 100, np.uint8), np.full((16, 16), 110, np.uint8)
    assert psnr(grey100, grey110) == pytest.approx(20 * math.log10(255 / 10), abs=1e-12)
    # Flat images: sigma = 0, so SSIM = (2 mu1 mu2 + C1) / (mu1^2 + mu2^2 + C1), C1 = (0.01 * 255)^2.
    c1 = (0.01 * 255) ** 2
    assert ssim(grey100, grey110) == pytest.approx((2 * 100 * 110 + c1) / (100**2 + 110**2 + c1), abs=1e-12)
    # Beside an RGB image: RGB grey 100 has Y round(16 + 100 * 219 / 255) = 102, the grey one 100.
    assert psnr(_gray(100), grey100) == pytest.approx(20 * math.log10(255 / 2), abs=1e-12)
    assert psnr(grey100, _gray(100)) == pytest.approx(20 * math.log10(255 / 2), abs=1e-12)


def test_grey_images_are_refused_under_did_ddn() -> None:
    """The did_ddn script calls rgb2ycbcr on every image, which MATLAB refuses for a 2-D array."""
    grey = np.full((16, 16), 100, np.uint8)
    for metric in (psnr, ssim, score):
        with pytest.raises(ValueError, match="^target: a grey image, which the did_ddn protocol cannot score"):
            metric(_gray(100), grey, "did_ddn")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_empty_images_raise_instead_of_scoring_nan(protocol: str) -> None:
    # No pixels, no mean squared error: a score (NaN, with numpy's warnings) would be meaningless.
    empty = np.zeros((0, 5, 3), np.uint8)
    for metric in (psnr, ssim, score):
        with pytest.raises(ValueError, match="pred: empty image"):
            metric(empty, empty, protocol)


def test_unknown_protocol_raises() -> None:
    with pytest.raises(ValueError, match="unknown protocol"):
        psnr(_gray(0), _gray(0), "rain100")


def test_to_uint8_matches_img_as_ubyte_and_torch_round() -> None:
    # Values at and around every k + 0.5 boundary, plus out-of-range ones that get clipped.
    k = np.arange(255, dtype=np.float64)
    centres = (k + 0.5) / 255
    values = np.concatenate([centres, np.nextafter(centres, 0), np.nextafter(centres, 1)])
    values = np.concatenate([values, [-0.3, 0.0, 1.0, 1.7, 0.5, 2.5 / 255]])
    x64 = values.reshape(1, -1, 3)
    for x in (x64, x64.astype(np.float32)):
        assert np.array_equal(to_uint8(x), img_as_ubyte(np.clip(x, 0, 1)))
    t = torch.from_numpy(x64.astype(np.float32)).permute(2, 0, 1)  # CHW
    expected = (t.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(to_uint8(t), expected)
    assert np.array_equal(to_uint8(t[None]), expected[None])  # BCHW -> BHWC


def test_to_uint8_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="HxWx3"):
        to_uint8(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="float"):
        to_uint8(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(np.full((4, 4, 3), np.nan))
    with pytest.raises(ValueError, match="3xHxW"):
        to_uint8(torch.zeros(4, 4, 3))


# --- Rain12 ------------------------------------------------------------------------------------


def test_rain12_input_vs_target_rain200() -> None:
    if not RAIN12.is_dir():
        pytest.skip(f"shared data not found at {RAIN12}")
    names = sorted(p.name for p in (RAIN12 / "input").iterdir())
    assert len(names) == 12
    scores = [
        score(
            np.asarray(Image.open(RAIN12 / "input" / name).convert("RGB")),
            np.asarray(Image.open(RAIN12 / "target" / name).convert("RGB")),
            "rain200",
        )
        for name in names
    ]
    mean_psnr, mean_ssim = np.mean(scores, axis=0)
    assert mean_psnr == pytest.approx(30.130, abs=0.0015)  # the figure the README quotes
    assert mean_ssim == pytest.approx(0.8552, abs=0.00015)
    # ... and what an independent implementation gives: Y as rgb2ycbcr.m computes it on uint8 (its
    # coefficients times 1/255, summed left to right, + 16: ties are decided by the last bit, so the
    # order matters), rounded half away from zero; skimage's PSNR and SSIM (Gaussian 11x11,
    # sigma 1.5) over the 'valid' region.
    from skimage.metrics import peak_signal_noise_ratio

    def y_channel(path):
        r, g, b = np.moveaxis(np.asarray(Image.open(path).convert("RGB"), dtype=np.float64), -1, 0)
        return np.floor((1 / 255 * 65.481) * r + (1 / 255 * 128.553) * g + (1 / 255 * 24.966) * b + 16 + 0.5)

    independent = []
    for name in names:
        y_in, y_gt = y_channel(RAIN12 / "input" / name), y_channel(RAIN12 / "target" / name)
        _, smap = structural_similarity(y_in, y_gt, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                        data_range=255, K1=0.01, K2=0.03, full=True)
        independent.append((peak_signal_noise_ratio(y_gt, y_in, data_range=255), smap[5:-5, 5:-5].mean()))
    np.testing.assert_allclose(np.mean(independent, axis=0), (mean_psnr, mean_ssim), rtol=0, atol=1e-9)

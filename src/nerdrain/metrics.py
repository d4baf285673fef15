"""PSNR and SSIM exactly as the paper's MATLAB evaluation scripts compute them.

Deraining papers report numbers from MATLAB scripts whose details (rounding of Y, peak value,
'valid' filtering, the 2009 ssim.m subsampling) move PSNR by tenths of a dB, so a Python
re-implementation is only comparable to the paper's table if it reproduces them literally.
Two protocols (the project's specification, ``SPEC.md`` in ``../shared``, "Evaluation protocols of the paper"):

``"rain200"`` (Rain200L/H, SPA-Data; Restormer-style ``evaluate_PSNR_SSIM.m``)
    Y of ``rgb2ycbcr`` on uint8 images, i.e. rounded to uint8; PSNR with peak 255;
    SSIM by Wang's 2003 ``ssim_index.m`` (Gaussian 11x11, sigma 1.5, 'valid' region, L = 255).

``"did_ddn"`` (DID-Data, DDN-Data; PReNet-style ``statistic.m``)
    ``rgb2ycbcr(im2double(img))``, Y not rounded, on the [0, 1] scale; PSNR by MATLAB's
    ``psnr`` with peak 1; SSIM by Wang's 2009 ``ssim.m`` called as ``ssim(x*255, x_true*255)``,
    i.e. on the unrounded Y scaled back to [0, 255] with L = 255, after its automatic
    f x f box-filter-and-subsample step, f = max(1, round(min(H, W) / 256)).

Images are uint8 arrays as MATLAB's ``imread`` gives the scripts saved 8-bit files: HxWx3 for
colour, HxW for grey; quantise network outputs with :func:`to_uint8` first. The rain200 script
converts only three-channel images (``if size(img, 3) == 3``), so a grey image is scored on its own
values, 0..255, where an RGB file of the same grey would have Y in 16..235; the did_ddn script calls
``rgb2ycbcr`` on every image, which MATLAB refuses for a 2-D one, so grey images are refused there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
    import torch

__all__ = ["PROTOCOLS", "check_scorable", "check_ssim_size", "rgb_to_y", "psnr", "ssim", "score", "to_uint8"]

PROTOCOLS: Final = ("rain200", "did_ddn")

# rgb2ycbcr.m: T = scaleFactor.T * origT with scaleFactor.T = 1/255 for uint8 and double input.
_Y_COEFFS: Final = tuple((1 / 255) * c for c in (65.481, 128.553, 24.966))
_SSIM_K1: Final = 0.01
_SSIM_K2: Final = 0.03
_SSIM_L: Final = 255.0
_WINDOW_SIZE: Final = 11
_WINDOW_SIGMA: Final = 1.5


def _matlab_round(x: np.ndarray | float) -> np.ndarray | float:
    """MATLAB ``round``: half away from zero (numpy's ``round`` is half to even)."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def _check_uint8(img: np.ndarray, name: str) -> None:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8:
        got = img.dtype if isinstance(img, np.ndarray) else type(img).__name__
        raise ValueError(f"{name}: expected a uint8 numpy array (use to_uint8), got {got}")
    if img.size == 0:  # the mean squared error of no pixels would be NaN, not a score
        raise ValueError(f"{name}: empty image of shape {img.shape}")


def _check_rgb_shape(img: np.ndarray, name: str) -> None:
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"{name}: expected an RGB image of shape HxWx3, got shape {img.shape}")


def _check_rgb_uint8(img: np.ndarray, name: str) -> None:
    """Reject anything but the uint8 HxWx3 arrays the MATLAB scripts read from 8-bit colour files."""
    _check_uint8(img, name)
    _check_rgb_shape(img, name)


def check_scorable(img: np.ndarray, protocol: str, name: str = "image") -> None:
    """Raise a ``ValueError`` starting with ``name`` unless ``img`` is what ``protocol``'s script can
    score: uint8 HxWx3, or HxW grey under rain200 (the did_ddn script's ``rgb2ycbcr`` fails on it)."""
    _check_uint8(img, name)
    if img.ndim == 2:
        if protocol == "did_ddn":
            raise ValueError(f"{name}: a grey image, which the did_ddn protocol cannot score: its MATLAB script "
                             "calls rgb2ycbcr on every image, an error for a grey one (save it as RGB)")
        return
    _check_rgb_shape(img, name)


def _check_pair(pred: np.ndarray, target: np.ndarray, protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    check_scorable(pred, protocol, "pred")
    check_scorable(target, protocol, "target")
    if pred.shape[:2] != target.shape[:2]:
        raise ValueError(f"pred and target differ in shape: {pred.shape} vs {target.shape}")


def rgb_to_y(img: np.ndarray, *, rounded: bool) -> np.ndarray:
    """Y channel of MATLAB ``rgb2ycbcr``, as float64.

    ``rounded=True``: the uint8 path, ``imlincomb(T1, R, T2, G, T3, B, 16)`` evaluated in double
    left to right on R, G, B in 0..255, then rounded half away from zero and saturated to uint8;
    values are integers in [16, 235]. ``rounded=False``: the ``im2double`` path, Y in
    [16/255, 235/255]. Exact ties occur (194 colours, e.g. RGB (6, 34, 182) gives 52.5), where
    the last bit decides, so the coefficients and the order of operations follow rgb2ycbcr.m.
    """
    _check_rgb_uint8(img, "img")
    r, g, b = (img[..., c].astype(np.float64) for c in range(3))
    if rounded:
        y = _Y_COEFFS[0] * r + _Y_COEFFS[1] * g + _Y_COEFFS[2] * b + 16.0
        return np.clip(_matlab_round(y), 0.0, 255.0)
    r, g, b = r / 255, g / 255, b / 255  # im2double
    return _Y_COEFFS[0] * r + _Y_COEFFS[1] * g + _Y_COEFFS[2] * b + (1 / 255) * 16.0


def _y(img: np.ndarray, *, rounded: bool) -> np.ndarray:
    """What the script scores of ``img``: Y of an RGB image; a grey one's own values (rain200 only)."""
    return img.astype(np.float64) if img.ndim == 2 else rgb_to_y(img, rounded=rounded)


def psnr(pred: np.ndarray, target: np.ndarray, protocol: str = "rain200") -> float:
    """PSNR of the Y channel in dB; ``inf`` for identical images, as MATLAB returns."""
    _check_pair(pred, target, protocol)
    rounded = protocol == "rain200"
    diff = _y(pred, rounded=rounded) - _y(target, rounded=rounded)
    mse = float(np.mean(diff * diff))
    if mse == 0.0:
        return float("inf")
    if rounded:  # evaluate_PSNR_SSIM.m: 20*log10(255/rmse)
        return float(20 * np.log10(255.0 / np.sqrt(mse)))
    return float(10 * np.log10(1.0 / mse))  # psnr.m: 10*log10(peakval^2/immse), peakval 1


def _gaussian_1d() -> np.ndarray:
    """1-D factor of ``fspecial('gaussian', 11, 1.5)``; its outer product is the 2-D window
    (to ~1e-17), and separable filtering is 11 times cheaper than the 2-D ``filter2``."""
    x = np.arange(_WINDOW_SIZE, dtype=np.float64) - (_WINDOW_SIZE - 1) / 2
    g = np.exp(-(x * x) / (2 * _WINDOW_SIGMA**2))
    return g / g.sum()


def _filter_valid(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``filter2(g * g', img, 'valid')``: correlation without padding, output (H-10)x(W-10)."""
    r = (len(g) - 1) // 2
    out = ndimage.correlate1d(img, g, axis=0, mode="constant")[r : img.shape[0] - r]
    return ndimage.correlate1d(out, g, axis=1, mode="constant")[:, r : img.shape[1] - r]


def _subsampling(height: int, width: int) -> int:
    """``ssim.m``'s factor f (did_ddn): images of 384 pixels a side or more are averaged f x f."""
    return max(1, int(_matlab_round(min(height, width) / 256)))


def _check_window_fits(height: int, width: int) -> None:
    if min(height, width) < _WINDOW_SIZE:
        raise ValueError(f"SSIM needs images of at least {_WINDOW_SIZE}x{_WINDOW_SIZE} "
                         f"(after subsampling), got {width}x{height}")


def check_ssim_size(height: int, width: int, protocol: str) -> None:
    """Raise :func:`ssim`'s ``ValueError`` where ``protocol``'s SSIM cannot score an image of this
    size, without scoring one: before a model is run on it, or a training run starts."""
    if protocol == "did_ddn":
        f = _subsampling(height, width)
        height, width = -(-height // f), -(-width // f)  # img(1:f:end, 1:f:end)
    _check_window_fits(height, width)


def _ssim_valid_mean(img1: np.ndarray, img2: np.ndarray) -> float:
    """Mean SSIM map shared by ``ssim_index.m`` (2003) and ``ssim.m`` (2009), whose C1, C2 > 0
    branch is the plain formula, with statistics over the 'valid' region only."""
    _check_window_fits(*img1.shape)
    c1 = (_SSIM_K1 * _SSIM_L) ** 2
    c2 = (_SSIM_K2 * _SSIM_L) ** 2
    g = _gaussian_1d()
    mu1 = _filter_valid(img1, g)
    mu2 = _filter_valid(img2, g)
    mu1_sq, mu2_sq, mu1_mu2 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    sigma1_sq = _filter_valid(img1 * img1, g) - mu1_sq
    sigma2_sq = _filter_valid(img2 * img2, g) - mu2_sq
    sigma12 = _filter_valid(img1 * img2, g) - mu1_mu2
    ssim_map = ((2 * mu1_mu2 + c1) * (2 * sigma12 + c2)) / (
        (mu1_sq + mu2_sq + c1) * (sigma1_sq + sigma2_sq + c2)
    )
    return float(ssim_map.mean())


def _box_subsample(img: np.ndarray, f: int) -> np.ndarray:
    """``imfilter(img, ones(f)/f^2, 'symmetric', 'same')`` then ``img(1:f:end, 1:f:end)``.

    imfilter correlates with the kernel centre at floor((f+1)/2) (1-based), so output pixel i
    averages input i - (f-1)//2 .. i + f//2: for even f the window reaches further forward than
    back, unlike scipy's uniform_filter. 'symmetric' mirrors including the edge pixel.
    """
    before, after = (f - 1) // 2, f // 2
    padded = np.pad(img, ((before, after), (before, after)), mode="symmetric")
    h, w = img.shape
    rows = sum(padded[k : k + h, :] for k in range(f)) / f
    box = sum(rows[:, k : k + w] for k in range(f)) / f
    return box[::f, ::f]


def ssim(pred: np.ndarray, target: np.ndarray, protocol: str = "rain200") -> float:
    """Mean SSIM of the Y channel (``ssim_index.m`` for rain200, ``ssim.m`` for did_ddn)."""
    _check_pair(pred, target, protocol)
    if protocol == "rain200":
        return _ssim_valid_mean(_y(pred, rounded=True), _y(target, rounded=True))
    y1 = rgb_to_y(pred, rounded=False) * 255
    y2 = rgb_to_y(target, rounded=False) * 255
    f = _subsampling(*y1.shape)
    if f > 1:
        y1, y2 = _box_subsample(y1, f), _box_subsample(y2, f)
    return _ssim_valid_mean(y1, y2)


def score(pred: np.ndarray, target: np.ndarray, protocol: str) -> tuple[float, float]:
    """(PSNR, SSIM) of one image pair under ``protocol``; datasets report per-image means."""
    return psnr(pred, target, protocol), ssim(pred, target, protocol)


def to_uint8(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """Quantise a float image in [0, 1] to uint8, the bytes a saved 8-bit PNG holds.

    Clamp to [0, 1], multiply by 255 in the array's own precision (float32 for network outputs)
    and round half to even: what ``(x.clamp(0, 1) * 255).round()`` in torch and skimage's
    ``img_as_ubyte`` give, i.e. the usual way PNGs are saved from tensors. ``floor(x * 255 + 0.5)``
    would differ at exact ties. Accepts numpy HxWx3 or torch CHW / BCHW (returned as HxWx3 /
    BxHxWx3); float64 is kept, other float types are computed in float32.
    """
    if isinstance(x, np.ndarray):
        if x.ndim != 3 or x.shape[2] != 3:
            raise ValueError(f"expected a numpy image of shape HxWx3, got {x.shape}")
        arr = x
    else:
        import torch  # deferred: scoring saved images must not pay for importing torch

        if not isinstance(x, torch.Tensor):
            raise ValueError(f"expected a numpy array or torch tensor, got {type(x).__name__}")
        if x.ndim not in (3, 4) or x.shape[-3] != 3:
            raise ValueError(f"expected a tensor of shape 3xHxW or Bx3xHxW, got {tuple(x.shape)}")
        x = x.detach().cpu().movedim(-3, -1)
        if x.is_floating_point() and x.dtype != torch.float64:
            x = x.float()
        arr = x.numpy()
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"expected a float image in [0, 1], got dtype {arr.dtype}")
    if arr.dtype != np.float64:
        arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ValueError("image contains NaN or infinite values")
    scaled = np.clip(arr, 0, 1) * arr.dtype.type(255)
    return np.rint(scaled).astype(np.uint8)

"""The paper's paired training augmentation, applied identically to input and target.

1. **Reflect padding** when the image is smaller than the patch size P, on the right and bottom,
   mirror-style without repeating the edge pixel (numpy's ``'reflect'``); the mirroring repeats
   periodically when the pad exceeds the image, so any size works.
2. **Saturation** with probability 1/3: factor ``f ~ U(0.8, 1.2)``; ``out = clamp(gray + f * (img -
   gray), 0, 1)`` with ``gray = 0.299 R + 0.587 G + 0.114 B`` (ITU-R 601 weights, which sum to 1 so
   grey pixels stay grey). Per pixel, so applying it after the crop is equivalent and cheaper.
3. **Random crop** P x P at a uniform position (``randint(0, H - P)`` inclusive).
4. **One of the 8 dihedral transforms** (flips and rotations), uniformly; see :func:`dihedral`.

All randomness comes from the ``torch.Generator`` passed in, so the same generator state reproduces
the same patches exactly (training seeds one per sample number: :class:`~nerdrain.data.datasets.TrainingStream`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "AugmentConfig",
    "AugmentParams",
    "augment_pair",
    "sample_params",
    "apply_params",
    "dihedral",
    "dihedral_inverse",
    "DIHEDRAL_INVERSE",
    "reflect_pad_to",
    "adjust_saturation",
    "GRAY_WEIGHTS",
]

# ITU-R 601-2 luma weights (PIL's 'L' conversion); they sum to exactly 1.
GRAY_WEIGHTS = (0.299, 0.587, 0.114)

# k -> the k' with dihedral(dihedral(x, k), k') == x. Rotations by 90 and 270 degrees undo each
# other; every other element (flips, 180-degree rotation, the two transposes) is an involution.
DIHEDRAL_INVERSE = (0, 1, 2, 5, 4, 3, 6, 7)


@dataclass(frozen=True)
class AugmentConfig:
    patch_size: int = 256
    flips: bool = True
    saturation_prob: float = 1 / 3
    saturation_range: tuple[float, float] = (0.8, 1.2)


@dataclass(frozen=True)
class AugmentParams:
    """One draw of the random choices: crop corner, dihedral index, saturation factor or None."""

    top: int
    left: int
    k: int
    saturation: float | None


def dihedral(x: Tensor, k: int) -> Tensor:
    """Element ``k`` (0..7) of the dihedral group acting on the last two dims (H, W).

    Numbering: 0 identity, 1 flip H (upside down), 2 flip W
    (mirror), 3/4/5 ``rot90`` by 1/2/3 quarter turns (``torch.rot90`` on dims (H, W)), 6 flip H then
    ``rot90`` once, 7 flip W then ``rot90`` once. Works for C x H x W and B x C x H x W.
    """
    hw = (-2, -1)
    if k == 0:
        return x
    if k == 1:
        return x.flip(-2)
    if k == 2:
        return x.flip(-1)
    if k in (3, 4, 5):
        return torch.rot90(x, k - 2, dims=hw)
    if k == 6:
        return torch.rot90(x.flip(-2), 1, dims=hw)
    if k == 7:
        return torch.rot90(x.flip(-1), 1, dims=hw)
    raise ValueError(f"dihedral index must be in 0..7, got {k}")


def dihedral_inverse(x: Tensor, k: int) -> Tensor:
    """Undo :func:`dihedral` ``(., k)``."""
    return dihedral(x, DIHEDRAL_INVERSE[k])


def _reflect_index(n: int, size: int, device: torch.device) -> Tensor:
    """Indices 0..size-1 into a length-n axis, mirrored without edge repeat beyond n - 1."""
    i = torch.arange(size, device=device)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    j = i % period
    return torch.where(j < n, j, period - j)


def reflect_pad_to(x: Tensor, min_h: int, min_w: int) -> Tensor:
    """Reflect-pad ``x`` (..., H, W) on the bottom/right up to at least ``min_h`` x ``min_w``."""
    h, w = x.shape[-2:]
    if h >= min_h and w >= min_w:
        return x
    if h < min_h:
        x = x.index_select(-2, _reflect_index(h, min_h, x.device))
    if w < min_w:
        x = x.index_select(-1, _reflect_index(w, min_w, x.device))
    return x


def adjust_saturation(x: Tensor, factor: float) -> Tensor:
    """``clamp(gray + factor * (x - gray), 0, 1)`` on (..., 3, H, W) images in [0, 1].

    ``gray = 0.299 R + 0.587 G + 0.114 B`` (PIL's luma). Single-channel images are returned as is.
    """
    c = x.shape[-3]
    if c == 1:
        return x
    if c != 3:
        raise ValueError(f"saturation needs 1 or 3 channels, got {c}")
    r, g, b = x.unbind(-3)
    gray = (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(-3)
    return (gray + factor * (x - gray)).clamp(0.0, 1.0)


def sample_params(h: int, w: int, cfg: AugmentConfig, generator: torch.Generator) -> AugmentParams:
    """Draw the random choices for an (already padded) H x W image.

    Always consumes the same amount of randomness (two uniforms, three integers), whatever the
    outcome, so the stream stays aligned across config changes.
    """
    p = cfg.patch_size
    if h < p or w < p:
        raise ValueError(f"image {h}x{w} is smaller than the patch size {p}; pad it first")
    u = torch.rand(2, generator=generator, dtype=torch.float64)
    top = int(torch.randint(0, h - p + 1, (1,), generator=generator))
    left = int(torch.randint(0, w - p + 1, (1,), generator=generator))
    k = int(torch.randint(0, 8, (1,), generator=generator))
    lo, hi = cfg.saturation_range
    sat = lo + (hi - lo) * float(u[1]) if float(u[0]) < cfg.saturation_prob else None
    return AugmentParams(top=top, left=left, k=k if cfg.flips else 0, saturation=sat)


def apply_params(x: Tensor, params: AugmentParams, cfg: AugmentConfig) -> Tensor:
    """Crop, saturate and transform one padded C x H x W image according to ``params``."""
    p = cfg.patch_size
    x = x[..., params.top : params.top + p, params.left : params.left + p]
    if params.saturation is not None:
        x = adjust_saturation(x, params.saturation)
    return dihedral(x, params.k).contiguous()


def augment_pair(
    inp: Tensor, tgt: Tensor, cfg: AugmentConfig, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Augment a (rainy, clean) pair of C x H x W float images in [0, 1] identically.

    Returns two C x P x P tensors (P = ``cfg.patch_size``).
    """
    if inp.shape != tgt.shape:
        raise ValueError(f"input {tuple(inp.shape)} and target {tuple(tgt.shape)} differ in shape")
    if inp.dim() != 3:
        raise ValueError(f"expected C x H x W tensors, got shape {tuple(inp.shape)}")
    p = cfg.patch_size
    inp = reflect_pad_to(inp, p, p)
    tgt = reflect_pad_to(tgt, p, p)
    params = sample_params(inp.shape[-2], inp.shape[-1], cfg, generator)
    return apply_params(inp, params, cfg), apply_params(tgt, params, cfg)

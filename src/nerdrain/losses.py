"""The training loss of NeRD-Rain, as the project's specification (``SPEC.md`` in ``../shared``) states it.

Per output scale s in (full, 1/2, 1/4), against the target at that scale::

    Charbonnier(pred_s, tgt_s)  +  0.01 * FFT(pred_s, tgt_s)  +  0.05 * Edge(pred_s, tgt_s)

summed over the three scales, plus ``0.1 * [L1(r2, tgt_half) + L1(r1, tgt_quarter)]`` on the two
INR-corrected images. The targets at 1/2 and 1/4 size come from a Gaussian pyramid computed like
``kornia.geometry.transform.build_pyramid(target, 3)`` (reimplemented here; kornia is not a
dependency).

* **Charbonnier**: ``mean(sqrt((x - y)**2 + eps**2))`` with ``eps = 1e-3`` (``eps**2`` inside the
  root). It never reaches 0: identical inputs give ``eps``.
* **FFT**: ``mean(|fft2(x) - fft2(y)|)`` over the last two dims, the mean *complex modulus* of the
  spectral difference, as the SPEC writes it. The form some deraining code uses instead (L1 of the
  stacked real and imaginary parts, ``mean((|Re| + |Im|) / 2)``) is ``FFTLoss(mode="real_imag")``.
* **Edge**: Charbonnier between Laplacians, with the SPEC's Laplacian::

      z   = zeros_like(x); z[..., ::2, ::2] = 4 * x[..., ::2, ::2]
      lap = x - conv_gauss(z)          # 5x5 kernel outer([.05,.25,.4,.25,.05]), replicate pad 2

  ``laplacian(..., prefilter=True)`` gives MPRNet's variant, which Gaussian-filters before
  subsampling; the two coincide on constant images but not in general.
* **Pyramid** (kornia ``pyrdown`` with its defaults ``border_type='reflect'``,
  ``align_corners=False``): blur with the 5x5 kernel ``outer([1,4,6,4,1]) / 256`` after reflect
  padding of 2, then ``F.interpolate(size=(H // 2, W // 2), mode='bilinear', align_corners=False)``.
  For even H and W that bilinear halving is exactly the mean of each 2x2 block. Reflect padding
  needs each side > 2, so the pyramid of a 4x4 image can go one level down, like kornia.
* **L1**: ``mean(|x - y|)`` (``nn.L1Loss``).

Precision: every loss evaluates in float32 with autocast disabled (float64 inputs stay float64), so
it can be called on bf16/fp16 outputs produced under autocast; ``torch.fft`` has no bf16 support and
the Charbonnier ``eps**2 = 1e-6`` would be lost next to O(1) values in half precision.

Imports only torch.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .torch_compat import is_compiling, no_autocast

__all__ = [
    "CharbonnierLoss",
    "EdgeLoss",
    "FFTLoss",
    "NeRDRainLoss",
    "LossParts",
    "charbonnier",
    "fft_loss",
    "conv_gauss",
    "laplacian",
    "edge_loss",
    "pyrdown",
    "build_pyramid",
]

# 1-D taps of the two 5x5 separable kernels.
_EDGE_TAPS = (0.05, 0.25, 0.4, 0.25, 0.05)  # MPRNet EdgeLoss kernel (sums to 1)
_PYR_TAPS = (1.0 / 16, 4.0 / 16, 6.0 / 16, 4.0 / 16, 1.0 / 16)  # kornia pyramid kernel / 256


# --------------------------------------------------------------------------------------------------
# precision helpers


def _hi(x: Tensor) -> Tensor:
    """float16/bfloat16 (and integer) tensors to float32; float32/float64 unchanged."""
    if x.dtype in (torch.float32, torch.float64):
        return x
    return x.float()


def _promote(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    x, y = _hi(x), _hi(y)
    if x.dtype != y.dtype:
        dt = torch.promote_types(x.dtype, y.dtype)
        x, y = x.to(dt), y.to(dt)
    return x, y


def _kernel5(taps: tuple[float, ...], channels: int, like: Tensor) -> Tensor:
    build = _build_kernel5 if is_compiling() else _cached_kernel5  # dynamo folds it in as a constant
    return build(taps, channels, like.dtype, like.device)


def _build_kernel5(taps: tuple[float, ...], channels: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    # A normal tensor even under inference mode, so that a training step can save it for backward.
    with torch.inference_mode(False):
        k = torch.tensor(taps, dtype=dtype, device=device)
        return torch.outer(k, k).expand(channels, 1, 5, 5).contiguous()


# Cached per device: building it copies from host memory, which a CUDA-graph capture of the eager
# training step forbids (the warm-up steps before the capture fill the cache).
_cached_kernel5 = functools.lru_cache(maxsize=64)(_build_kernel5)


# --------------------------------------------------------------------------------------------------
# functional forms


def charbonnier(x: Tensor, y: Tensor, eps: float = 1e-3) -> Tensor:
    """``mean(sqrt((x - y)^2 + eps^2))`` (SPEC: eps = 1e-3)."""
    x, y = _promote(x, y)
    with no_autocast(x.device.type):
        diff = x - y
        return torch.mean(torch.sqrt(diff * diff + eps * eps))


def fft_loss(x: Tensor, y: Tensor, mode: str = "modulus") -> Tensor:
    """Mean absolute difference of the 2-D spectra (``torch.fft.fft2`` over the last two dims).

    ``mode="modulus"`` (SPEC, default): ``mean(|F(x) - F(y)|)``, complex modulus.
    ``mode="real_imag"``: ``mean`` of ``|.|`` over ``stack([Re, Im], -1)`` of ``F(x) - F(y)``.
    """
    x, y = _promote(x, y)
    with no_autocast(x.device.type):
        diff = torch.fft.fft2(x) - torch.fft.fft2(y)
        if mode == "modulus":
            return torch.mean(torch.abs(diff))
        if mode == "real_imag":
            return torch.mean(torch.abs(torch.stack([diff.real, diff.imag], dim=-1)))
    raise ValueError(f"unknown FFT loss mode {mode!r} (expected 'modulus' or 'real_imag')")


def conv_gauss(x: Tensor) -> Tensor:
    """Depthwise 5x5 filter ``outer([.05,.25,.4,.25,.05])`` with replicate padding of 2.

    The released code builds the kernel for 3 channels; here it is built for ``x``'s channel count
    (identical for RGB).
    """
    x = _hi(x)
    with no_autocast(x.device.type):
        c = x.shape[1]
        xp = F.pad(x, (2, 2, 2, 2), mode="replicate")
        return F.conv2d(xp, _kernel5(_EDGE_TAPS, c, x), groups=c)


def laplacian(x: Tensor, prefilter: bool = False) -> Tensor:
    """One Laplacian-pyramid band of ``x`` (B x C x H x W).

    Default (SPEC): ``z = 0``; ``z[..., ::2, ::2] = 4 * x[..., ::2, ::2]``; ``x - conv_gauss(z)``.
    ``prefilter=True`` (MPRNet's ``laplacian_kernel``) subsamples ``conv_gauss(x)`` instead.
    """
    x = _hi(x)
    with no_autocast(x.device.type):
        g = conv_gauss(x) if prefilter else x
        return x - conv_gauss(g * _even_pixels_times_4(g))


def _even_pixels_times_4(like: Tensor) -> Tensor:
    """H x W: 4 where row and column are both even, else 0.

    ``g * this`` is ``z = 0; z[..., ::2, ::2] = 4 * g[..., ::2, ::2]`` for finite ``g``, as one
    element-wise product, which ``torch.compile`` handles (inductor 2.13 fails on the assignment:
    "vr must not be None").
    """
    h, w = like.shape[-2:]
    rows = torch.arange(h, device=like.device) % 2 == 0
    cols = torch.arange(w, device=like.device) % 2 == 0
    return (rows[:, None] & cols[None, :]).to(like.dtype) * 4


def edge_loss(x: Tensor, y: Tensor, eps: float = 1e-3) -> Tensor:
    """``Charbonnier(laplacian(x), laplacian(y))``."""
    x, y = _promote(x, y)
    return charbonnier(laplacian(x), laplacian(y), eps)


def pyrdown(x: Tensor, border_type: str = "reflect", align_corners: bool = False) -> Tensor:
    """Like ``kornia.geometry.transform.pyrdown`` with factor 2.

    Blur with ``outer([1,4,6,4,1]) / 256`` after padding by 2 with ``F.pad(mode=border_type)``, then
    bilinear resize to ``(H // 2, W // 2)``. With ``align_corners=False`` and even sizes this is the
    mean of each 2x2 block of the blurred image.
    """
    x = _hi(x)
    with no_autocast(x.device.type):
        b, c, h, w = x.shape
        xp = F.pad(x, (2, 2, 2, 2), mode=border_type)
        blurred = F.conv2d(xp, _kernel5(_PYR_TAPS, c, x), groups=c)
        return F.interpolate(
            blurred, size=(h // 2, w // 2), mode="bilinear", align_corners=align_corners
        )


def build_pyramid(
    x: Tensor, max_level: int, border_type: str = "reflect", align_corners: bool = False
) -> list[Tensor]:
    """Like ``kornia.geometry.transform.build_pyramid``: ``[x, pyrdown(x), ...]``, ``max_level`` items."""
    pyramid = [x]
    for _ in range(max_level - 1):
        pyramid.append(pyrdown(pyramid[-1], border_type, align_corners))
    return pyramid


# --------------------------------------------------------------------------------------------------
# modules


class CharbonnierLoss(nn.Module):
    """``mean(sqrt((x - y)^2 + eps^2))``; the SPEC uses ``eps = 1e-3``."""

    def __init__(self, eps: float = 1e-3) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return charbonnier(x, y, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class FFTLoss(nn.Module):
    """``mean(|fft2(x) - fft2(y)|)`` (complex modulus; see :func:`fft_loss` for ``mode``)."""

    def __init__(self, mode: str = "modulus") -> None:
        super().__init__()
        if mode not in ("modulus", "real_imag"):
            raise ValueError(f"unknown FFT loss mode {mode!r}")
        self.mode = mode

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return fft_loss(x, y, self.mode)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class EdgeLoss(nn.Module):
    """Edge loss: ``Charbonnier(laplacian(x), laplacian(y))`` (see :func:`laplacian`)."""

    def __init__(self, eps: float = 1e-3) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return edge_loss(x, y, self.eps)


class LossParts(NamedTuple):
    """Unweighted loss terms, each summed over the three scales."""

    char: Tensor  # sum over 3 scales of Charbonnier
    fft: Tensor  # sum over 3 scales of FFT loss
    edge: Tensor  # sum over 3 scales of edge loss
    inr_l1: Tensor  # L1(r2, target_half) + L1(r1, target_quarter)


_OUTPUT_NAMES = ("full", "mid", "small", "inr_mid", "inr_small")  # NeRDRainOutputs fields
# Index of each name in the released model's 7-tuple [full, mid, small, r2, m/2, r1, x1].
_RELEASED_INDEX = {"full": 0, "mid": 1, "small": 2, "inr_mid": 3, "inr_small": 5}


def _get_outputs(outputs: Any) -> dict[str, Tensor]:
    if all(hasattr(outputs, n) for n in _OUTPUT_NAMES):
        return {n: getattr(outputs, n) for n in _OUTPUT_NAMES}
    if isinstance(outputs, dict):
        return {n: outputs[n] for n in _OUTPUT_NAMES}
    if isinstance(outputs, (list, tuple)) and len(outputs) == 7:
        return {n: outputs[i] for n, i in _RELEASED_INDEX.items()}
    raise TypeError(
        "outputs must have attributes full, mid, small, inr_mid, inr_small (or be a dict with those keys, "
        "or the released model's 7-item list)"
    )


class NeRDRainLoss(nn.Module):
    """The NeRD-Rain training objective (SPEC).

    ``forward(outputs, target) -> (total, parts)`` where ``outputs`` has attributes ``full`` (H),
    ``mid`` (H/2), ``small`` (H/4), ``inr_mid`` (r2, H/2), ``inr_small`` (r1, H/4) (a
    ``NeRDRainOutputs``; a dict
    with those keys, or the released 7-item list, is accepted too) and ``target`` is B x C x H x W.

    ``total = sum_s [char_w * Char + fft_w * FFT + edge_w * Edge](out_s, tgt_s)
    + inr_w * (L1(r2, tgt_half) + L1(r1, tgt_quarter))``, the targets coming from
    :func:`build_pyramid` ``(target, 3)``. ``parts`` is a dict of detached tensors: the unweighted
    scale sums ``char``, ``fft``, ``edge``, ``inr_l1`` and ``total``.
    """

    def __init__(
        self,
        char_weight: float = 1.0,
        fft_weight: float = 0.01,
        edge_weight: float = 0.05,
        inr_weight: float = 0.1,
        charbonnier_eps: float = 1e-3,
        fft_mode: str = "modulus",
    ) -> None:
        super().__init__()
        self.char_weight = char_weight
        self.fft_weight = fft_weight
        self.edge_weight = edge_weight
        self.inr_weight = inr_weight
        self.char = CharbonnierLoss(charbonnier_eps)
        self.fft = FFTLoss(fft_mode)
        self.edge = EdgeLoss(charbonnier_eps)

    def parts(self, outputs: Any, target: Tensor) -> LossParts:
        """The four unweighted terms (with gradients)."""
        o = _get_outputs(outputs)
        target = _hi(target)
        with torch.no_grad() if not target.requires_grad else contextlib.nullcontext():
            t_full, t_half, t_quarter = build_pyramid(target, 3)
        pairs = ((o["full"], t_full), (o["mid"], t_half), (o["small"], t_quarter))
        for name, (pred, tgt) in zip(("full", "mid", "small"), pairs):
            if pred.shape != tgt.shape:
                raise ValueError(
                    f"output {name!r} has shape {tuple(pred.shape)} but its target has "
                    f"{tuple(tgt.shape)} (H and W should be multiples of 4)"
                )
        char = sum(self.char(p, t) for p, t in pairs)
        fft = sum(self.fft(p, t) for p, t in pairs)
        edge = sum(self.edge(p, t) for p, t in pairs)
        r2, r1 = _hi(o["inr_mid"]), _hi(o["inr_small"])
        with no_autocast(target.device.type):
            inr = F.l1_loss(r2, t_half.to(r2.dtype)) + F.l1_loss(r1, t_quarter.to(r1.dtype))
        return LossParts(char, fft, edge, inr)

    def forward(self, outputs: Any, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        p = self.parts(outputs, target)
        total = (
            self.char_weight * p.char
            + self.fft_weight * p.fft
            + self.edge_weight * p.edge
            + self.inr_weight * p.inr_l1
        )
        logs = {k: v.detach() for k, v in p._asdict().items()}
        logs["total"] = total.detach()
        return total, logs

    def extra_repr(self) -> str:
        return (
            f"char_weight={self.char_weight}, fft_weight={self.fft_weight}, "
            f"edge_weight={self.edge_weight}, inr_weight={self.inr_weight}"
        )

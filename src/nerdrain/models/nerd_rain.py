"""NeRD-Rain: bidirectional multi-scale implicit neural representations for deraining.

Three scales (1/4, 1/2, 1) of the same U-shaped transformer, unfolded into 1, 2 and 3 passes.
Coarse to fine, an INR refines each coarse image and its upsampled result guides the next scale;
fine to coarse, feedback-fusion units feed the latents of consecutive passes back into the
coarser decoders. Chen, Pan, Dong, CVPR 2024 (arXiv 2404.01547).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import whole_number
from ..torch_compat import autocast_enabled
from .blocks import Downsample, TransformerBlock, Upsample, conv1x1, conv3x3, transformer_stage
from .fusion import FeedbackFusion
from .inr import ImplicitDecoder

PASSES_PER_SCALE = (1, 2, 3)  # coarse (1/4) to fine (1/1)
SIZE_MULTIPLE = 16  # two U-net downsamplings below the 1/4 scale


@dataclass(frozen=True)
class NeRDRainConfig:
    dim: int = 48
    depths: tuple[int, int, int] = (2, 3, 3)  # transformer blocks at widths dim, 2*dim, 4*dim
    heads: tuple[int, int, int] = (1, 2, 4)
    ffn_expansion: float = 2.66
    inr_hidden: tuple[int, ...] = (256, 256, 256)

    def __post_init__(self):
        """Settings that cannot build a working network fail here, naming the field, instead of as
        a shape error deep in the first forward."""

        def require(ok: bool, field: str, what: str) -> None:
            if not ok:
                raise ValueError(f"NeRDRainConfig.{field}: expected {what}, got {getattr(self, field)!r}")

        def numbers_of(field: str, low: int, count: int | None = None) -> None:
            """Whole numbers >= ``low`` (numpy ones too), stored as a tuple of ints (JSON, hashing)."""
            values = getattr(self, field)
            ints = [whole_number(v) for v in values] if isinstance(values, (tuple, list)) else None
            require(ints is not None and (count is None or len(ints) == count)
                    and all(v is not None and v >= low for v in ints),
                    field, f"{count or 'any number of'} integers >= {low}")
            object.__setattr__(self, field, tuple(ints))

        dim = whole_number(self.dim)
        # Downsample halves the channels before pixel-unshuffle: the width must stay even.
        require(dim is not None and dim >= 2 and dim % 2 == 0, "dim", "an even integer >= 2")
        object.__setattr__(self, "dim", dim)
        levels = len(PASSES_PER_SCALE)
        numbers_of("depths", 0, levels)
        numbers_of("heads", 1, levels)
        numbers_of("inr_hidden", 1)
        widths = (dim, dim * 2, dim * 4)
        require(all(width % heads == 0 for width, heads in zip(widths, self.heads)), "heads",
                f"head counts dividing the widths {widths}")
        expansion = self.ffn_expansion
        require(isinstance(expansion, numbers.Real) and not isinstance(expansion, bool) and math.isfinite(expansion)
                and int(dim * expansion) >= 1, "ffn_expansion", "a factor giving dim * factor >= 1")
        object.__setattr__(self, "ffn_expansion", float(expansion))


class Encoded(NamedTuple):
    skips: tuple[torch.Tensor, ...]  # finest first
    latent: torch.Tensor


class NeRDRainOutputs(NamedTuple):
    """Everything the released model returns; ``official_order`` gives its list order."""

    full: torch.Tensor  # derained image, H
    mid: torch.Tensor  # derained 1/2-scale image
    small: torch.Tensor  # derained 1/4-scale image
    inr_mid: torch.Tensor  # INR-refined 1/2-scale image (r2)
    guide_mid: torch.Tensor  # 1/2-scale input corrected by the upsampled 1/4 INR image (m)
    inr_small: torch.Tensor  # INR-refined 1/4-scale image (r1)
    input_small: torch.Tensor  # 1/4-scale input

    def official_order(self) -> tuple[torch.Tensor, ...]:
        # The released model returns the half-scale guide divided by two.
        return (self.full, self.mid, self.small, self.inr_mid, self.guide_mid / 2, self.inr_small,
                self.input_small)


class UNetPass(nn.Module):
    """One unfolded pass: a 3-level Restormer encoder, latent stage and decoder."""

    def __init__(self, cfg: NeRDRainConfig):
        super().__init__()
        widths = (cfg.dim, cfg.dim * 2, cfg.dim * 4)

        def stage(level: int) -> nn.Sequential:
            return transformer_stage(widths[level], cfg.depths[level], cfg.heads[level], cfg.ffn_expansion)

        self.encoders = nn.ModuleList(stage(level) for level in (0, 1))
        self.downs = nn.ModuleList(Downsample(widths[level]) for level in (0, 1))
        self.latent = stage(2)
        # Decoder modules are listed deepest first, the order they run in.
        self.ups = nn.ModuleList(Upsample(widths[level]) for level in (2, 1))
        self.reduces = nn.ModuleList(conv1x1(widths[level], widths[level - 1]) for level in (2, 1))
        self.decoders = nn.ModuleList(stage(level) for level in (1, 0))

    def encode(self, x: torch.Tensor) -> Encoded:
        skips = []
        for encoder, down in zip(self.encoders, self.downs):
            x = encoder(x)
            skips.append(x)
            x = down(x)
        return Encoded(tuple(skips), self.latent(x))

    def decode(self, latent: torch.Tensor, skips: tuple[torch.Tensor, ...],
               reduces: Sequence[nn.Module] | None = None) -> torch.Tensor:
        x = latent
        for up, reduce, decoder, skip in zip(self.ups, reduces or self.reduces, self.decoders, reversed(skips)):
            x = decoder(reduce(torch.cat([up(x), skip], dim=1)))
        return x


def downsample2(x: torch.Tensor) -> torch.Tensor:
    """``F.interpolate(scale_factor=0.5)`` with the default nearest mode, as the released code."""
    return x[..., ::2, ::2]


def upsample2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Reflect-pad bottom/right to a multiple; repeats the reflection for inputs smaller than the pad."""
    while True:
        pad_h = -x.shape[-2] % multiple
        pad_w = -x.shape[-1] % multiple
        if not (pad_h or pad_w):
            return x
        step_h, step_w = min(pad_h, x.shape[-2] - 1), min(pad_w, x.shape[-1] - 1)
        if (pad_h and step_h == 0) or (pad_w and step_w == 0):  # a 1-pixel side has nothing to mirror
            x = F.pad(x, (0, pad_w if step_w == 0 else 0, 0, pad_h if step_h == 0 else 0), mode="replicate")
        else:
            x = F.pad(x, (0, step_w, 0, step_h), mode="reflect")


def _check_batch(x: torch.Tensor, weight: torch.Tensor) -> None:
    """A wrong input fails here in words, not as a shape or scalar-type error several layers in."""
    if x.dim() != 4 or x.shape[1] != 3 or 0 in x.shape:
        raise ValueError(f"expected a batch of RGB images, B x 3 x H x W with none of them 0, got shape "
                         f"{tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected float images in [0, 1], got {x.dtype} (divide 8-bit values by 255)")
    if x.dtype != weight.dtype and not autocast_enabled(x.device.type):  # autocast casts for itself
        raise TypeError(f"the input is {x.dtype} but the weights are {weight.dtype}; convert one to the other "
                        f"(x.to({weight.dtype}) or model.to({x.dtype}))")


class NeRDRain(nn.Module):
    def __init__(self, cfg: NeRDRainConfig = NeRDRainConfig()):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        n_scales = len(PASSES_PER_SCALE)
        self.embed = nn.ModuleList(conv3x3(3, dim) for _ in range(n_scales))
        self.passes = nn.ModuleList(
            nn.ModuleList(UNetPass(cfg) for _ in range(n)) for n in PASSES_PER_SCALE)
        # Between two passes of one scale, the decoder output becomes the next encoder's input.
        self.context = nn.ModuleList(
            nn.ModuleList(conv3x3(dim, dim) for _ in range(n - 1)) for n in PASSES_PER_SCALE)
        self.output = nn.ModuleList(conv3x3(dim, 3) for _ in range(n_scales))
        # Coarse to fine: the two coarse scales lift their latent to image size for an INR.
        self.inr_lift = nn.ModuleList(
            nn.Sequential(Upsample(dim * 4), Upsample(dim * 2)) for _ in range(n_scales - 1))
        self.inr = nn.ModuleList(ImplicitDecoder(dim, cfg.inr_hidden) for _ in range(n_scales - 1))
        # Fine to coarse: fuse latents of consecutive passes (full 1+2, full 2+3, half 1+2).
        self.fusion = nn.ModuleList(FeedbackFusion(dim * 4) for _ in range(3))
        # The released third full-scale pass decodes with the second pass's level-1 channel
        # reduction; its own stays in checkpoints unused. Kept (frozen) so official state dicts
        # round-trip unchanged and parameter counts match; frozen so DDP and optimisers skip it.
        self.passes[2][2].reduces[1].requires_grad_(False)

    def set_activation_checkpointing(self, enabled: bool = True) -> NeRDRain:
        """Recompute each transformer block in backward instead of storing its activations.

        Same outputs and gradients; for training at batch sizes or patch sizes that would not fit
        otherwise (see :class:`~nerdrain.models.blocks.TransformerBlock`). No effect without autograd.
        """
        for module in self.modules():
            if isinstance(module, TransformerBlock):
                module.checkpointing = enabled
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Derained image for any H, W >= 1 (reflect-padded internally, cropped back)."""
        _check_batch(x, self.embed[0].weight)
        h, w = x.shape[-2:]
        return self.forward_all(pad_to_multiple(x, SIZE_MULTIPLE)).full[..., :h, :w]

    def forward_all(self, x: torch.Tensor) -> NeRDRainOutputs:
        _check_batch(x, self.embed[0].weight)
        h, w = x.shape[-2:]
        if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
            raise ValueError(f"forward_all needs H and W divisible by {SIZE_MULTIPLE}, got {h}x{w}; "
                             "call the model itself to pad arbitrary sizes")
        (small_pass,), (mid_pass1, mid_pass2), (_, max_pass2, max_pass3) = self.passes
        x_mid = downsample2(x)
        scale_inputs = (downsample2(x_mid), x_mid, x)

        # Coarse to fine: each coarse scale's first encoder feeds an INR whose refined image,
        # upsampled, corrects the next scale's input.
        guide = scale_inputs[0]
        first_encodings, inr_images, guides = [], [], [guide]
        for scale in (0, 1):
            encoded = self.passes[scale][0].encode(self.embed[scale](guide))
            inr_image = guide + self.inr[scale](self.inr_lift[scale](encoded.latent))
            guide = scale_inputs[scale + 1] + upsample2(inr_image)
            first_encodings.append(encoded)
            inr_images.append(inr_image)
            guides.append(guide)
        enc_small, enc_mid1 = first_encodings

        # Full scale: three unfolded passes; the first two decode into the next one's input.
        # Only the latents are kept (for the feedback) and the last pass's skips: the earlier
        # passes' full-resolution skips are dropped once decoded, which lowers peak inference memory.
        features = self.embed[2](guides[2])
        max_latents = []
        for index, unet in enumerate(self.passes[2]):
            encoded = unet.encode(features)
            max_latents.append(encoded.latent)
            if index < len(self.context[2]):
                features = self.context[2][index](unet.decode(encoded.latent, encoded.skips))
        del features
        max_skips = encoded.skips

        # Fine to coarse: fused latents of consecutive passes steer the coarser decoders.
        feedback_mid1 = downsample2(self.fusion[0](max_latents[0], max_latents[1]))
        feedback_mid2 = downsample2(self.fusion[1](max_latents[1], max_latents[2]))
        decoded = mid_pass1.decode(enc_mid1.latent + feedback_mid1, enc_mid1.skips)
        enc_mid2 = mid_pass2.encode(self.context[1][0](decoded))
        feedback_small = downsample2(self.fusion[2](enc_mid1.latent, enc_mid2.latent))

        # The last decoder of each scale, coarse to fine, adds the coarser one's upsampled features;
        # the full scale's last pass borrows a channel reducer of the second (as the released code).
        last_decoders = (
            (small_pass, enc_small.latent + feedback_small, enc_small.skips, None),
            (mid_pass2, enc_mid2.latent + feedback_mid2, enc_mid2.skips, None),
            (max_pass3, max_latents[2], max_skips, (max_pass3.reduces[0], max_pass2.reduces[1])),
        )
        restored, coarser = [], None
        for scale, (unet, latent, skips, reduces) in enumerate(last_decoders):
            decoded = unet.decode(latent, skips, reduces)
            if coarser is not None:
                decoded = decoded + upsample2(coarser)
            restored.append(self.output[scale](decoded) + scale_inputs[scale])
            coarser = decoded
        small, mid, full = restored

        return NeRDRainOutputs(
            full=full,
            mid=mid,
            small=small,
            inr_mid=inr_images[1],
            guide_mid=guides[1],
            inr_small=inr_images[0],
            input_small=scale_inputs[0],
        )

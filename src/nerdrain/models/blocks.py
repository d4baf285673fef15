"""Restormer building blocks as NeRD-Rain uses them (channel attention, gated FFN)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..torch_compat import autocast_enabled, is_compiling, no_autocast
from . import triton_ln


def conv3x3(in_channels: int, out_channels: int, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)


def conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, bias=False)


class LayerNorm2d(nn.Module):
    """Per-pixel LayerNorm over channels.

    ``F.layer_norm`` on a channels-last view is one fused kernel; the released code computes the
    variance of a permuted copy, which dominates CPU time. Statistics are always accumulated in
    fp32: for half-precision maps with half-precision weights (``model.to(torch.bfloat16)``) the
    kernel does so itself, reading and writing the half map (autocast would otherwise cast the map
    to fp32 and back, two more passes over it); for half maps with fp32 weights (autocast alone)
    the map is cast up and the result down. Channels-last maps on GPUs with Triton go through
    :mod:`~nerdrain.models.triton_ln`'s kernels instead (in training too), which do neither.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if triton_ln.applies(x):  # on GPUs: Triton kernels, several times faster (a backward for training)
            y = triton_ln.try_layer_norm(x, self.weight, self.bias, self.eps)
            if y is not None:
                return y
        y = x.permute(0, 2, 3, 1)
        if x.dtype == self.weight.dtype:
            with no_autocast(x.device.type):
                y = F.layer_norm(y, y.shape[-1:], self.weight, self.bias, self.eps)
        else:
            y = F.layer_norm(y.float(), y.shape[-1:], self.weight.float(), self.bias.float(), self.eps).to(x.dtype)
        return y.permute(0, 3, 1, 2)


def _in_place_ok(fresh: torch.Tensor, other: torch.Tensor) -> bool:
    """Whether ``fresh`` (a temporary this module made) may take the result of an op with ``other``.

    Only without autograd (which may have saved ``fresh``), and only where the out-of-place op
    would give the same shape and dtype. Saves an allocation per op; on CPU without allocator
    tuning each large allocation is fresh memory, page-faulted in by the kernel.
    """
    return not torch.is_grad_enabled() and fresh.shape == other.shape and fresh.dtype == other.dtype


def _add(x: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """``x + fresh`` (bitwise the same), in place into ``fresh`` where allowed."""
    return fresh.add_(x) if _in_place_ok(fresh, x) else x + fresh


def _mul(fresh: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``fresh * y`` (bitwise the same), in place into ``fresh`` where allowed."""
    return fresh.mul_(y) if _in_place_ok(fresh, y) else fresh * y


def is_channels_last(x: torch.Tensor) -> bool:
    """Stored NHWC (and not also NCHW-contiguous, as 1x1 images are)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


# Inference on maps larger than this works in horizontal bands of about this many pixels, so that
# the wide intermediate maps (3x the channels in attention, 5.3x in the FFN, 256 in the INR) exist
# one band at a time. Exact: each band is computed with the rows its 3x3 convolutions need.
BAND_PIXELS = 1 << 17


class Band(NamedTuple):
    top: int  # the output rows [top, bottom)
    bottom: int
    lo: int  # the input rows [lo, hi) they need: `halo` more on each side, within the image
    hi: int

    def crop(self, y: torch.Tensor) -> torch.Tensor:
        """The output rows of a result computed on the input rows."""
        return y[:, :, self.top - self.lo:self.bottom - self.lo]


def row_bands(x: torch.Tensor, halo: int = 1) -> list[Band] | None:
    """How to cut ``x`` into bands, or ``None`` where it is small or autograd is recording (which
    would keep every band's intermediates anyway)."""
    h, w = x.shape[-2:]
    rows = max(8, BAND_PIXELS // w)
    if torch.is_grad_enabled() or h <= rows:
        return None
    return [Band(top, min(top + rows, h), max(top - halo, 0), min(top + rows + halo, h)) for top in range(0, h, rows)]


def banded(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, bands: list[Band]) -> torch.Tensor:
    """``fn(x)`` a band at a time, for a ``fn`` that looks no further up or down than the bands' halo."""
    out = None
    for band in bands:
        y = band.crop(fn(x[:, :, band.lo:band.hi]))
        if out is None:
            out = empty_map_like(x, y.shape[1], y.dtype)
        out[:, :, band.top:band.bottom] = y
    return out


def empty_map_like(x: torch.Tensor, channels: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised map of ``x``'s batch, size, device and memory layout."""
    layout = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    b, _, h, w = x.shape
    return torch.empty((b, channels, h, w), dtype=dtype, device=x.device, memory_format=layout)


def pixel_major(t: torch.Tensor) -> torch.Tensor:
    """A B x C x N view of a B x C x H x W map, without copies in either layout."""
    b, c, h, w = t.shape
    if is_channels_last(t):  # B x N x C in memory
        return t.permute(0, 2, 3, 1).reshape(b, h * w, c).transpose(1, 2)
    return t.reshape(b, c, h * w)


class _PixelMajorSplit(torch.autograd.Function):
    """``pixel_major(qkv).split(c, dim=1)`` whose backward writes the three gradients straight into
    one channels-last map, as the convolutions before it want it (see :func:`split_channels`)."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, c: int) -> tuple[torch.Tensor, ...]:
        ctx.like, ctx.c = (qkv.shape, qkv.dtype, qkv.device), c
        return pixel_major(qkv).split(c, dim=1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: torch.Tensor | None) -> tuple[torch.Tensor, None]:
        shape, dtype, device = ctx.like
        grad = torch.empty(shape, dtype=dtype, device=device, memory_format=torch.channels_last)
        for part, g in zip(pixel_major(grad).split(ctx.c, dim=1), grads):
            part.zero_() if g is None else part.copy_(g)
        return grad, None


def split_channels(qkv: torch.Tensor, c: int) -> tuple[torch.Tensor, ...]:
    """q, k, v: B x C x N views of a B x 3C x H x W map.

    In training on a channels-last map the gradients of the three views would otherwise be
    concatenated in NCHW order and then converted back to channels-last for the convolutions'
    backward, two passes over the widest map of attention. With :class:`_PixelMajorGram` this
    made a CPU training step at 128x128 4-13 % faster (fp32 and bf16, both variants).
    """
    if torch.is_grad_enabled() and qkv.requires_grad and is_channels_last(qkv):
        return _PixelMajorSplit.apply(qkv, c)
    return pixel_major(qkv).split(c, dim=1)


# Device types on which the pixel reduction of q k^T is split into chunks (see channel_gram); the
# benchmarks empty it to time the other form, the tests add "cpu" to check it against the golden.
SPLIT_GRAM_DEVICES = {"cuda"}
_GRAM_CHUNK = 256  # pixels per chunk: enough work per partial product, few partials to sum


def channel_gram(q: torch.Tensor, k: torch.Tensor, heads: int, split: bool) -> torch.Tensor:
    """``q_h k_h^T`` per head: B x heads x d x d from B x C x N ``q`` and ``k`` (C = heads * d).

    ``split=False``: one bmm per head (or per image), reducing over all N pixels at once. On CUDA
    that is a d x d result with a reduction tens of thousands long, which cuBLAS runs on a handful
    of thread blocks: the H200 profile showed a quarter of an fp32 forward in it (143 us for
    0.3 GFLOP at 256x256). ``split=True`` computes the full C x C product of S chunks of the
    pixels as one batched bmm (S x C x C partial sums, enough blocks to fill the GPU), sums the
    partials and takes the per-head diagonal blocks. The same sums in another order; it needs
    either batch 1 or channels-last ``q``/``k`` so that the chunks are views, not copies.

    With autograd on pixel-major (channels-last) ``q`` and ``k``, the gradients come out
    pixel-major too (:class:`_PixelMajorGram`), as the rest of their gradient is.
    """
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad) and q.stride(1) == 1 == k.stride(1):
        return _PixelMajorGram.apply(q, k, heads, split)
    return _gram(q, k, heads, split)


def _gram(q: torch.Tensor, k: torch.Tensor, heads: int, split: bool) -> torch.Tensor:
    b, c, n = q.shape
    d = c // heads
    chunks = min(n // _GRAM_CHUNK, 1024)
    if not split or chunks < 2 or not (b == 1 or q.stride(1) == 1 and k.stride(1) == 1):
        q_heads, k_heads = q.unflatten(1, (heads, d)), k.unflatten(1, (heads, d))
        if b == 1:  # heads as the bmm batch (strided views, no copies)
            return torch.bmm(q_heads[0], k_heads[0].transpose(1, 2)).unsqueeze(0)
        # images as the bmm batch, one call per head
        return torch.stack([torch.bmm(q_heads[:, i], k_heads[:, i].transpose(1, 2)) for i in range(heads)], dim=1)
    length = n // chunks
    main = chunks * length

    def pieces(t: torch.Tensor) -> torch.Tensor:  # B*S x C x length views of the first `main` pixels
        return t[:, :, :main].unflatten(2, (chunks, length)).transpose(1, 2).flatten(0, 1)

    full = torch.bmm(pieces(q), pieces(k).transpose(1, 2)).unflatten(0, (b, chunks)).sum(1)
    if main < n:  # the remaining pixels
        full = full + torch.bmm(q[:, :, main:], k[:, :, main:].transpose(1, 2))
    blocks = full.view(b, heads, d, heads, d).diagonal(dim1=1, dim2=3)  # B x d x d x heads
    return blocks.permute(0, 3, 1, 2)


class _PixelMajorGram(torch.autograd.Function):
    """:func:`channel_gram` with gradients stored B x N x C, like pixel-major ``q`` and ``k``.

    bmm's own backward returns them B x C x N (pixels fastest): they would then be added to the
    norms' pixel-major gradients and copied into the channels-last map in transposing passes.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, heads: int, split: bool) -> torch.Tensor:
        ctx.save_for_backward(q, k)
        ctx.heads = heads
        return _gram(q, k, heads, split)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        q, k = ctx.saved_tensors
        b, c, n = q.shape
        heads, d = ctx.heads, c // ctx.heads

        def product(g: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
            """``g_h @ other_h`` per head, as a B x C x N view of a B x N x C tensor."""
            other_t = other.transpose(1, 2).unflatten(2, (heads, d)).transpose(1, 2).flatten(0, 1)  # B*h x N x d
            result_t = torch.bmm(other_t, g.flatten(0, 1).transpose(1, 2).to(other.dtype))  # (g_h other_h)^T
            if heads == 1:  # already B x N x C
                return result_t.view(b, n, c).transpose(1, 2)
            out = torch.empty((b, n, c), dtype=result_t.dtype, device=result_t.device)
            out.view(b, n, heads, d).copy_(result_t.view(b, heads, n, d).transpose(1, 2))
            return out.transpose(1, 2)

        grad_q = product(grad, k) if ctx.needs_input_grad[0] else None
        grad_k = product(grad.transpose(-2, -1), q) if ctx.needs_input_grad[1] else None
        return grad_q, grad_k, None, None


class ChannelAttention(nn.Module):
    """Restormer's MDTA: attention across channels, so cost is linear in the pixel count.

    Computed without copies in either memory layout (NCHW or channels-last). Two exact rewrites
    of the released form (equal up to float rounding): L2-normalising q and k before ``q k^T`` is
    the same as dividing ``q k^T`` by the outer product of their norms, which saves two passes
    over q and k; and ``project_out(attn @ v)`` is ``(W_out blockdiag(attn)) @ v``, a C x C
    weight per image applied once, which saves the ``attn @ v`` pass over the pixels.
    In inference on large maps q and k exist one band of rows at a time (see ``row_bands``):
    only their products and norms are kept, and v.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = conv1x1(dim, dim * 3)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, 3, padding=1, groups=dim * 3, bias=False)
        self.project_out = conv1x1(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        heads = self.heads
        split = x.device.type in SPLIT_GRAM_DEVICES
        bands = row_bands(x)
        if bands is None:
            qkv = self.qkv_dwconv(self.qkv(x))
            q, k, v = split_channels(qkv, c)  # B x C x N views
            gram = channel_gram(q, k, heads, split)
            norms = self._norms(qkv, q, k)
        else:
            gram, norms, v = self._in_bands(x, bands, split)
        norms = norms.clamp_min(1e-12)  # F.normalize's eps: x / max(||x||, 1e-12)
        scale = self.temperature / (norms[:, :heads] * norms[:, heads:].transpose(-2, -1))
        attn = (gram * scale).softmax(dim=-1)
        weight = self.project_out.weight.reshape(c, heads, c // heads)
        fused = torch.einsum("ohi,bhij->bohj", weight, attn.to(weight.dtype)).reshape(b, c, c).to(v.dtype)
        if v.stride(1) == 1:  # channels-last: out^T = v^T fused^T, B x N x C, i.e. NHWC
            return torch.bmm(v.transpose(1, 2), fused.transpose(1, 2)).view(b, h, w, c).permute(0, 3, 1, 2)
        return torch.bmm(fused, v).view(b, c, h, w)

    def _in_bands(self, x: torch.Tensor, bands: list[Band], split: bool) -> tuple[torch.Tensor, ...]:
        """Gram matrix, norms and v as in ``forward``, with q and k made one band at a time."""
        c = x.shape[1]
        grams, norms, v_map = [], [], None
        for band in bands:
            qkv = band.crop(self.qkv_dwconv(self.qkv(x[:, :, band.lo:band.hi])))
            q, k, _ = split_channels(qkv, c)
            grams.append(channel_gram(q, k, self.heads, split))
            norms.append(self._norms(qkv, q, k))
            if v_map is None:
                v_map = empty_map_like(x, c, qkv.dtype)
            v_map[:, :, band.top:band.bottom] = qkv[:, 2 * c:]
        # the norm of the per-band norms is the norm over all pixels
        return torch.stack(grams).sum(0), torch.linalg.vector_norm(torch.stack(norms), dim=0), pixel_major(v_map)

    def _norms(self, qkv: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """L2 norms over the pixels of q's heads, then k's: B x 2*heads x d x 1.

        Without autograd both come from one reduction over q and k's channels of ``qkv`` (one
        kernel instead of two on the GPU), in CPU inference as the root of a sum of squares (over a
        channels-last map, pixels 3C apart, 2-3x faster than ``vector_norm``). With autograd, two
        ``vector_norm`` of the q and k views, so their gradients join the rest of q's and k's (see
        :func:`split_channels`); ``vector_norm``'s gradient at a zero norm is 0 where the root's
        would be NaN.
        """
        if torch.is_grad_enabled():
            return torch.cat([torch.linalg.vector_norm(t.unflatten(1, (self.heads, -1)), dim=-1, keepdim=True)
                              for t in (q, k)], dim=1)
        qk = pixel_major(qkv)[:, :2 * q.shape[1]].unflatten(1, (2 * self.heads, -1))
        if qk.device.type != "cpu":
            return torch.linalg.vector_norm(qk, dim=-1, keepdim=True)
        return qk.float().square().sum(-1, keepdim=True).sqrt().to(qk.dtype)


# oneDNN convolution with an element-wise post-op (the op inductor uses after freezing): None where
# this PyTorch lacks it; the tests set it to None to check the fallback.
_CONV_POINTWISE = (getattr(torch.ops.mkldnn, "_convolution_pointwise", None)
                   if torch.backends.mkldnn.is_available() else None)


def depthwise_gelu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``GELU(depthwise 3x3 conv(x))``.

    In CPU inference one oneDNN kernel applies the GELU as it writes the convolution's output,
    which saves a pass over the FFN's widest map (at 127 x 128 x 128 in fp32, 1.6 ms became 1.05).
    Its erf GELU differs from PyTorch's by float rounding (about 1e-6 in fp32); in bf16 it is
    applied before the output is rounded to bf16, not after, so it is if anything closer. fp32
    only without autocast, which would run the convolution in half precision; bf16 maps with bf16
    weights (``optimize_for_inference``'s half-weight copy) under autocast too, which leaves them
    as they are. Not while tracing for ``torch.compile``, which makes this fusion itself.
    """
    groups = x.shape[1]
    fusable = (x.dtype == weight.dtype == torch.bfloat16
               or x.dtype == weight.dtype == torch.float32 and not autocast_enabled("cpu"))
    if (_CONV_POINTWISE is not None and x.device.type == "cpu" and fusable
            and not torch.is_grad_enabled() and not is_compiling()):
        return _CONV_POINTWISE(x, weight, None, [1, 1], [1, 1], [1, 1], groups, "gelu", [], "none")
    return F.gelu(F.conv2d(x, weight, padding=1, groups=groups))


class GatedFeedForward(nn.Module):
    """Restormer's GDFN: depthwise-conv features gated by a GELU branch.

    On CPU in channels-last, the gate and value halves are computed by two half-width convolutions
    (the same weights, sliced; exact): halves of one NHWC tensor are strided, and element-wise
    GELU and product over strided halves cost about three times as much as over dense tensors.
    """

    def __init__(self, dim: int, expansion: float):
        super().__init__()
        hidden = int(dim * expansion)
        self.hidden = hidden
        self.project_in = conv1x1(dim, hidden * 2)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2, bias=False)
        self.project_out = conv1x1(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bands = row_bands(x)
        return self._forward(x) if bands is None else banded(self._forward, x, bands)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and is_channels_last(x):
            h, w_in, w_dw = self.hidden, self.project_in.weight, self.dwconv.weight
            gate = depthwise_gelu(F.conv2d(x, w_in[:h]), w_dw[:h])
            value = F.conv2d(F.conv2d(x, w_in[h:]), w_dw[h:], padding=1, groups=h)
        else:
            gate, value = self.dwconv(self.project_in(x)).chunk(2, dim=1)
            gate = F.gelu(gate)
        return self.project_out(_mul(gate, value))


class TransformerBlock(nn.Module):
    """Pre-norm attention and FFN, each with a residual.

    ``checkpointing`` (set through :meth:`NeRDRain.set_activation_checkpointing`): in training,
    keep only the block's input for backward and recompute the rest there. The blocks hold most of
    a training step's saved activations (the FFN's hidden maps alone, 2.66x the width, are about
    half): on the CPU a step's peak memory fell 4x for 4 % more time.
    """

    def __init__(self, dim: int, heads: int, ffn_expansion: float):
        super().__init__()
        self.norm1 = LayerNorm2d(dim)
        self.attn = ChannelAttention(dim, heads)
        self.norm2 = LayerNorm2d(dim)
        self.ffn = GatedFeedForward(dim, ffn_expansion)
        self.checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _add(x, self.attn(self.norm1(x)))
        return _add(x, self.ffn(self.norm2(x)))


def transformer_stage(dim: int, depth: int, heads: int, ffn_expansion: float) -> nn.Sequential:
    return nn.Sequential(*(TransformerBlock(dim, heads, ffn_expansion) for _ in range(depth)))


class Downsample(nn.Sequential):
    """Halve the size and double the channels: conv to dim/2, then pixel-unshuffle."""

    def __init__(self, dim: int):
        super().__init__(nn.Conv2d(dim, dim // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))


class Upsample(nn.Sequential):
    """Double the size and halve the channels: conv to 2*dim, then pixel-shuffle."""

    def __init__(self, dim: int):
        super().__init__(nn.Conv2d(dim, dim * 2, 3, padding=1, bias=False), nn.PixelShuffle(2))

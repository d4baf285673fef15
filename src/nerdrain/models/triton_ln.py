"""Per-pixel LayerNorm of channels-last maps as one Triton kernel, for GPU inference.

PyTorch's LayerNorm kernel gives each row (here: each pixel) a thread block of its own. With rows
of 32-192 channels that leaves most threads idle and the launch latency-bound: on an H200 it took
27 us a call for 48 channels at 256x256, 156 calls and a quarter of a bf16 NeRD-Rain forward,
in fp32 and bf16 alike. This kernel normalises a tile of rows per program (statistics in fp32),
reading and writing each element once.

Used by :class:`~nerdrain.models.blocks.LayerNorm2d` only where it applies (:func:`applies`):
Triton installed, a device type in :data:`DEVICES`, channels-last storage, no autograd, not while
``torch.compile`` traces (inductor writes its own fused kernel); everywhere else, and after the
kernel once fails on a device (:func:`try_layer_norm` warns), PyTorch's ``F.layer_norm`` runs. Tests run it on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import warnings

import torch

from ..torch_compat import is_compiling

# Device types the kernel is used on; the benchmarks empty it to time PyTorch's kernel, the tests
# add "cpu" to run the kernel in Triton's interpreter.
DEVICES = {"cuda"}
_MAX_ELEMENTS = 2**31 - 1  # int32 offsets inside the kernel
_TILE = 4096  # elements a program normalises: rows x next power of two of the channels


@functools.cache
def available() -> bool:
    return importlib.util.find_spec("triton") is not None


def applies(x: torch.Tensor) -> bool:
    return (x.device.type in DEVICES and not torch.is_grad_enabled() and x.numel() <= _MAX_ELEMENTS
            and x.dim() == 4 and x.permute(0, 2, 3, 1).is_contiguous()
            and not is_compiling() and available())


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def layer_norm_rows(x_ptr, w_ptr, b_ptr, y_ptr, rows, channels, eps,
                        BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
        r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        c = tl.arange(0, BLOCK_C)
        mask = (r[:, None] < rows) & (c[None, :] < channels)
        offsets = r[:, None] * channels + c[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / channels
        centred = tl.where(mask, x - mean[:, None], 0.0)
        inv_std = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / channels + eps)
        w = tl.load(w_ptr + c, mask=c < channels, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + c, mask=c < channels, other=0.0).to(tl.float32)
        y = centred * inv_std[:, None] * w[None, :] + b[None, :]
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)

    return layer_norm_rows, triton.next_power_of_2, triton.cdiv


def try_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor | None:
    """:func:`layer_norm_channels_last`, or ``None`` (with a warning, once) where Triton fails here,
    e.g. a GPU it cannot compile for or no writable cache: the kernel is then off for that device type."""
    try:
        return layer_norm_channels_last(x, weight, bias, eps)
    except Exception as err:  # noqa: BLE001 - any Triton failure: PyTorch's LayerNorm from now on
        DEVICES.discard(x.device.type)
        warnings.warn(f"Triton LayerNorm failed ({type(err).__name__}: {err}); using PyTorch's", stacklevel=3)
        return None


def layer_norm_channels_last(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the channels of each pixel of a channels-last B x C x H x W map (same
    layout and dtype out); ``weight`` and ``bias`` may be fp32 with a half-precision map."""
    kernel, next_power_of_2, cdiv = _kernel()
    b, c, h, w = x.shape
    rows = b * h * w
    y = torch.empty_like(x, memory_format=torch.channels_last)
    block_c = next_power_of_2(c)
    block_rows = max(1, _TILE // block_c)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():  # launch on x's GPU
        kernel[(cdiv(rows, block_rows),)](x, weight.contiguous(), bias.contiguous(), y, rows, c, eps,
                                          BLOCK_ROWS=block_rows, BLOCK_C=block_c)
    return y


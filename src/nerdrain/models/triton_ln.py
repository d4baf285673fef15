"""Per-pixel LayerNorm of channels-last maps as Triton kernels, for GPU inference and training.

PyTorch's LayerNorm kernel gives each row (here: each pixel) a thread block of its own. With rows
of 32-192 channels that leaves most threads idle and the launch latency-bound: on an H200 it took
27 us a call for 48 channels at 256x256, 156 calls and a quarter of a bf16 NeRD-Rain forward,
in fp32 and bf16 alike. This kernel normalises a tile of rows per program (statistics in fp32),
reading and writing each element once.

In training (autograd on) the forward also keeps each row's mean and 1/std (fp32), and the backward
is one more kernel: the input gradient row by row, the weight and bias gradients as per-program
partial sums added up afterwards. PyTorch's path there casts a half map up to fp32 and the result
back down (autocast keeps the LayerNorm weights fp32), three kernels forward and three backward;
these read and write the half map directly.

Used by :class:`~nerdrain.models.blocks.LayerNorm2d` only where it applies (:func:`applies`):
Triton installed, a device type in :data:`DEVICES`, channels-last storage, not while
``torch.compile`` traces (inductor writes its own fused kernel); everywhere else, and after a
kernel once fails on a device (:func:`try_layer_norm` warns), PyTorch's ``F.layer_norm`` runs.
Tests run it on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``).

A kernel that compiles but computes wrong numbers on some GPU (a compiler bug, a tiling edge case)
would raise nothing, so before the kernels first serve a device, dtypes, channel count and
direction (inference, or training with the backward) they are checked once against PyTorch's
LayerNorm on a small map (:func:`_self_check`); a mismatch warns and turns them off like a failure.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import types
import warnings

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from ..torch_compat import is_compiling, no_autocast

# Device types the kernel is used on; the benchmarks empty it to time PyTorch's kernel, the tests
# add "cpu" to run the kernel in Triton's interpreter.
DEVICES = {"cuda"}
_MAX_ELEMENTS = 2**31 - 1  # int32 offsets inside the kernel
_TILE = 4096  # elements a program normalises: rows x next power of two of the channels
# First-use checks done: (device, map dtype, weight dtype, channels, backward) -> passed
_checks: dict[tuple, bool] = {}


@functools.cache
def available() -> bool:
    return importlib.util.find_spec("triton") is not None


def applies(x: torch.Tensor) -> bool:
    return (x.device.type in DEVICES and x.numel() <= _MAX_ELEMENTS
            and x.dim() == 4 and x.permute(0, 2, 3, 1).is_contiguous()
            and not is_compiling() and available())


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def layer_norm_rows(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, rows, channels, eps,
                        BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr, STATS: tl.constexpr):
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
        if STATS:  # for the backward
            tl.store(mean_ptr + r, mean, mask=r < rows)
            tl.store(rstd_ptr + r, inv_std, mask=r < rows)

    @triton.jit
    def layer_norm_rows_backward(x_ptr, w_ptr, mean_ptr, rstd_ptr, dy_ptr, dx_ptr, partial_ptr,
                                 rows, channels, tiles, programs,
                                 BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
        """dx = rstd (w dy - mean_c(w dy) - xhat mean_c(w dy xhat)) per row; this program's sums
        of dy xhat and dy over its tiles of rows go to rows ``pid`` and ``programs + pid`` of
        ``partial`` (weight and bias gradients once summed over the programs)."""
        pid = tl.program_id(0)
        c = tl.arange(0, BLOCK_C)
        c_mask = c < channels
        w = tl.load(w_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_C], dtype=tl.float32)
        db = tl.zeros([BLOCK_C], dtype=tl.float32)
        for tile in range(pid, tiles, programs):
            r = tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
            mask = (r[:, None] < rows) & c_mask[None, :]
            offsets = r[:, None] * channels + c[None, :]
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + r, mask=r < rows, other=0.0)
            rstd = tl.load(rstd_ptr + r, mask=r < rows, other=0.0)
            x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            w_dy = w[None, :] * dy
            mean_w_dy_x_hat = tl.sum(w_dy * x_hat, axis=1) / channels
            mean_w_dy = tl.sum(w_dy, axis=1) / channels
            dx = (w_dy - x_hat * mean_w_dy_x_hat[:, None] - mean_w_dy[:, None]) * rstd[:, None]
            tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dw += tl.sum(dy * x_hat, axis=0)
            db += tl.sum(dy, axis=0)
        tl.store(partial_ptr + pid * channels + c, dw, mask=c_mask)
        tl.store(partial_ptr + (programs + pid) * channels + c, db, mask=c_mask)

    return types.SimpleNamespace(forward=layer_norm_rows, backward=layer_norm_rows_backward, cdiv=triton.cdiv)


def _tiling(channels: int) -> tuple[int, int]:
    """Rows a program normalises at once, and the channels padded to a power of two."""
    block_c = 1 << (channels - 1).bit_length()
    return max(1, _TILE // block_c), block_c


def _on_device(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()  # launch on x's GPU


def _fall_back(x: torch.Tensor, reason: str) -> None:
    """Turn the kernels off for ``x``'s device type, with a warning (once: they are off after)."""
    DEVICES.discard(x.device.type)
    warnings.warn(f"Triton LayerNorm {reason}; using PyTorch's", stacklevel=4)


# Raised through the kernels' calls but not by them: non-reentrant activation checkpointing stops
# its recomputation this way once the last tensor it needs is saved (the LayerNorm's, where it
# ends a checkpointed region).
_NOT_FAILURES = getattr(torch.utils.checkpoint, "_StopRecomputationError", ())


def _failed(err: Exception) -> str:
    return f"failed ({type(err).__name__}: {err})"


def try_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor | None:
    """:func:`layer_norm_channels_last` (:class:`LayerNormChannelsLast` under autograd), or ``None``
    (with a warning, once) where Triton fails here, e.g. a GPU it cannot compile for or no writable
    cache, or computes wrong numbers in its first-use check: the kernels are then off for that
    device type. Also ``None``, without a warning, while a CUDA graph is captured before the check
    could run (its host sync is illegal there): the graph records PyTorch's LayerNorm."""
    backward = torch.is_grad_enabled()
    try:
        if not _checked(x, weight, eps, backward):
            return None
        if backward:
            return LayerNormChannelsLast.apply(x, weight, bias, eps)
        return layer_norm_channels_last(x, weight, bias, eps)
    except _NOT_FAILURES:
        raise
    except Exception as err:  # noqa: BLE001 - any Triton failure: PyTorch's LayerNorm from now on
        _fall_back(x, _failed(err))
        return None


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _checked(x: torch.Tensor, weight: torch.Tensor, eps: float, backward: bool) -> bool:
    """Whether the kernels passed their first-use check for maps like ``x``: run now if not yet
    (unless a CUDA graph is being captured), once per process; a mismatch turns them off."""
    key = (x.device, x.dtype, weight.dtype, x.shape[1], backward)
    if key not in _checks:
        if _capturing(x):
            return False
        mismatch = _self_check(*key, eps)
        _checks[key] = mismatch is None
        if mismatch:
            _fall_back(x, f"first-use check failed ({mismatch})")
    return _checks[key]


def _self_check(device: torch.device, dtype: torch.dtype, weight_dtype: torch.dtype, channels: int,
                backward: bool, eps: float) -> str | None:
    """The kernels on a small seeded map against ``F.layer_norm`` in fp32 of the same rounded inputs:
    which result is off and by how much, or ``None``. Why: the kernels were validated only in
    Triton's interpreter, and wrong numbers on a GPU would raise nothing. The map spans a few row
    tiles, the last one partial, with odd sizes (masks); the backward runs two programs over several
    tiles each. Allowed error, relative to each result's largest value: 1e-4 (fp32 math in both,
    summed in other orders), or 4 rounding steps of a half-precision result (rounded once)."""
    generator = torch.Generator().manual_seed(0)
    block_rows, _ = _tiling(channels)
    x = torch.randn(2, channels, 3, block_rows // 2 + 1, generator=generator) * 3 + 1
    x = x.to(device, dtype).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(channels, generator=generator) * 0.5 + 1).to(device, weight_dtype)
    bias = torch.randn(channels, generator=generator).to(device, weight_dtype)
    exact = [t.to(torch.float32, copy=True).requires_grad_(backward) for t in (x, weight, bias)]
    # own saved tensors: inside a checkpointed block the checkpoint's hooks must not see this graph
    with no_autocast(device.type), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        y = F.layer_norm(exact[0].permute(0, 2, 3, 1), (channels,), exact[1], exact[2], eps).permute(0, 3, 1, 2)
        if backward:
            dy = torch.randn(x.shape, generator=generator).to(device, dtype)  # NCHW: made channels-last
            expected = [y.detach(), *torch.autograd.grad(y, exact, dy.float())]
            out, mean, rstd = _forward(x, weight, bias, eps, stats=True)
            results = [out, *layer_norm_channels_last_backward(dy, x, weight, mean, rstd, programs=2)]
        else:
            expected, results = [y], [layer_norm_channels_last(x, weight, bias, eps)]
    names = ("output", "input gradient", "weight gradient", "bias gradient")
    for name, result, reference in zip(names, results, expected):
        error = ((result.float() - reference).abs().max() / reference.abs().max()).item()
        allowed = max(1e-4, 4 * torch.finfo(result.dtype).eps)
        if not error <= allowed:  # NaN fails too
            return (f"{name} off by {error:.2g} of its largest value, {allowed:.0e} allowed; {device}, "
                    f"{dtype} map, {weight_dtype} weights, {channels} channels")
    return None


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, stats: bool):
    """The output, and each row's mean and 1/std (fp32) where ``stats``."""
    kernels = _kernels()
    b, c, h, w = x.shape
    rows = b * h * w
    y = torch.empty_like(x, memory_format=torch.channels_last)
    mean, rstd = (torch.empty(rows if stats else 0, device=x.device, dtype=torch.float32) for _ in range(2))
    block_rows, block_c = _tiling(c)
    grid = (kernels.cdiv(rows, block_rows),)
    with _on_device(x):
        kernels.forward[grid](x, weight.contiguous(), bias.contiguous(), y, mean, rstd, rows, c, eps,
                              BLOCK_ROWS=block_rows, BLOCK_C=block_c, STATS=stats)
    return y, mean, rstd


def layer_norm_channels_last(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the channels of each pixel of a channels-last B x C x H x W map (same
    layout and dtype out); ``weight`` and ``bias`` may be fp32 with a half-precision map."""
    return _forward(x, weight, bias, eps, stats=False)[0]


def _programs(x: torch.Tensor, tiles: int) -> int:
    """Backward programs: a few per SM, each summing the weight and bias gradients of its tiles,
    so the partial sums stay small (programs x channels) and every SM is busy."""
    if x.is_cuda:
        return min(tiles, 4 * torch.cuda.get_device_properties(x.device).multi_processor_count)
    return min(tiles, 4)  # the interpreter: a few programs, each over several tiles


def layer_norm_channels_last_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                      mean: torch.Tensor, rstd: torch.Tensor, programs: int | None = None):
    """Input (x's dtype, channels-last), weight and bias gradients (the weight's dtype); ``programs``
    (default :func:`_programs`) fewer than the tiles makes each program loop over several."""
    kernels = _kernels()
    b, c, h, w = x.shape
    rows = b * h * w
    dy = dy.contiguous(memory_format=torch.channels_last)
    dx = torch.empty_like(x, memory_format=torch.channels_last)
    block_rows, block_c = _tiling(c)
    tiles = kernels.cdiv(rows, block_rows)
    programs = programs or _programs(x, tiles)
    partial = torch.empty(2, programs, c, device=x.device, dtype=torch.float32)
    with _on_device(x):
        kernels.backward[(programs,)](x, weight.contiguous(), mean, rstd, dy, dx, partial, rows, c, tiles,
                                      programs, BLOCK_ROWS=block_rows, BLOCK_C=block_c)
    dw, db = partial.sum(1).to(weight.dtype)
    return dx, dw, db


class LayerNormChannelsLast(torch.autograd.Function):
    """:func:`layer_norm_channels_last` with a Triton backward. No host syncs: CUDA-graph capture
    works; activation checkpointing recomputes the forward with its statistics."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, rstd = _forward(x, weight, bias, eps, stats=True)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.eps = eps
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        try:
            dx, dw, db = layer_norm_channels_last_backward(dy, x, weight, mean, rstd)
        except Exception as err:  # noqa: BLE001 - as in the forward: PyTorch's from now on
            _fall_back(x, _failed(err))
            dx, dw, db = _pytorch_backward(dy, x, weight, bias, ctx.eps)
        return dx, dw, db, None


def _pytorch_backward(dy, x, weight, bias, eps):
    """The three gradients through PyTorch's LayerNorm (fp32 math, as the kernel's)."""
    with torch.enable_grad():
        x, weight, bias = (t.detach().requires_grad_() for t in (x, weight, bias))
        y = F.layer_norm(x.permute(0, 2, 3, 1).float(), x.shape[1:2], weight.float(), bias.float(), eps)
        return torch.autograd.grad(y.permute(0, 3, 1, 2).to(x.dtype), (x, weight, bias), dy)

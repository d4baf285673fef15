"""Seamless tiled inference for images of any size.

The image is covered by equally sized tiles on a regular grid (``n`` tiles per axis,
spaced evenly so that neighbouring tiles overlap by at least ``overlap`` pixels and the
last tile ends exactly at the border; no padding beyond the image).  ``n`` is what tiles of
the configured size need; each is then cut to the smallest multiple of ``multiple`` that
still covers the axis with ``n`` of them, so a side just over the tile size does not cost
two full tiles.  Tiles are cut from
the input where it lives (usually CPU memory), moved to the model's device
``batch_size`` at a time, and the results are blended on the CPU into a float32 output
buffer (the summed weights are kept per axis, not as a full-size map), so device memory is
bounded by one batch of tiles and host memory by about twice the image.

Blending window (separable, per axis): weight 1 in a tile's interior and on sides that
are image borders; on each side that has a neighbour, across the whole overlap with it,
a ramp that is 0 over the outer quarter -- the tile's own border pixels, degraded by
padding and missing context, which the neighbour's inner quarter (weight 1) covers --
then a raised cosine over the middle half and 1 over the inner quarter.  The neighbours'
ramps are complementary, so the prediction cross-fades smoothly from one tile to the
next.  The accumulated output is divided by the accumulated weight (at least 1/2 per
axis at every pixel), so the blend is exact for pointwise models (tiled == untiled),
exact for a model that sees ``r`` pixels around each one when the outer quarter of
every overlap is at least ``r`` wide, and seam-free for convolutional ones.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch

from .checks import whole_number
from .devices import resolve_device
from .torch_compat import OutOfMemoryError

__all__ = [
    "DEFAULT_BYTES_PER_PIXEL",
    "RELEASED_WINDOW",
    "TileConfig",
    "count_tiles",
    "default_tile_for_device",
    "eval_mode",
    "is_oom_error",
    "model_device",
    "model_dtype",
    "released_window_starts",
    "run_released_windows",
    "run_tiled",
    "run_with_oom_fallback",
    "tile_positions",
    "tile_shape",
]

log = logging.getLogger("nerdrain")

#: Conservative device-memory estimate (bytes per input pixel, per tile in a batch) for
#: NeRD-Rain inference in float32, used by :func:`default_tile_for_device`.  It covers
#: the peak of the activations, not the weights (those are already resident).  Measured
#: peaks of a 1024x1024 ``nerd_rain`` forward in float32: 4.9 GB on an H200 (about 4.7 KB
#: per pixel, before banded inference), 2.3 GB on the CPU with it (2.2 KB); 16 KiB leaves
#: room for the CUDA caching allocator, cuDNN workspaces and fragmentation.  A 512x512
#: tile is then budgeted at 4 GiB.
DEFAULT_BYTES_PER_PIXEL = 16 * 1024


@dataclass(frozen=True)
class TileConfig:
    """Tiling parameters.

    ``tile``: tile side in pixels (0 = whole image at once, else at least ``multiple``);
    rounded down to a multiple of ``multiple`` and clamped to the image size.  ``overlap``: minimum overlap between
    neighbouring tiles (clamped to half a tile).  ``batch_size``: tiles per model call.
    """

    tile: int = 512
    overlap: int = 32
    batch_size: int = 4
    multiple: int = 16

    def __post_init__(self) -> None:
        for name in ("tile", "overlap", "batch_size", "multiple"):
            value = whole_number(getattr(self, name))
            if value is None:  # 16.5 would fail later, deep in torch
                raise TypeError(f"{name} must be an integer, got {getattr(self, name)!r}")
            object.__setattr__(self, name, value)
        if self.tile < 0 or 0 < self.tile < self.multiple:
            # below the network's size step a tile would be padded up to it: many times the work
            raise ValueError(f"tile must be 0 (whole image) or at least {self.multiple}, got {self.tile}")
        if self.overlap < 0:
            raise ValueError(f"overlap must be >= 0, got {self.overlap}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {self.multiple}")


ModelLike = Callable[[torch.Tensor], torch.Tensor]


def model_device(model: ModelLike) -> torch.device | None:
    """The device of a module's first parameter/buffer; None for parameter-less callables."""
    if isinstance(model, torch.nn.Module):
        for t in model.parameters():
            return t.device
        for t in model.buffers():
            return t.device
    return None


def model_dtype(model: ModelLike) -> torch.dtype | None:
    """The floating type a module's weights are stored in (its first floating-point parameter's);
    None for parameter-less callables."""
    if isinstance(model, torch.nn.Module):
        return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    return None


# Modules inside eval_mode now: how many callers hold each, and the training flags found by the first
_eval_holders: dict[int, tuple[int, list[tuple[torch.nn.Module, bool]]]] = {}
_eval_holders_lock = threading.Lock()


@contextlib.contextmanager
def eval_mode(model: ModelLike) -> Iterator[None]:
    """A module in eval mode for the block, then each of its submodules as it was: ``train(True)``
    would also unfreeze the parts a fine-tuning run keeps in eval mode (a frozen BatchNorm).

    Threads sharing one model share its mode: the first one in records the flags, the last one out
    restores them, so no thread's model goes back to training mode under another's forward."""
    if not isinstance(model, torch.nn.Module):
        yield
        return
    with _eval_holders_lock:
        holders, modes = _eval_holders.get(id(model), (0, []))
        if holders == 0:
            modes = [(m, m.training) for m in model.modules()]
            model.eval()
        _eval_holders[id(model)] = (holders + 1, modes)
    try:
        yield
    finally:
        with _eval_holders_lock:
            holders, modes = _eval_holders.pop(id(model))
            if holders > 1:
                _eval_holders[id(model)] = (holders - 1, modes)
            else:
                for m, training in modes:
                    m.training = training


def _tile_side(cfg: TileConfig) -> int:
    t = cfg.tile
    if t >= cfg.multiple:
        t -= t % cfg.multiple
    return t


def tile_positions(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels covering ``size`` pixels.

    Evenly spaced, first at 0, last at ``size - tile``; consecutive tiles overlap by at
    least ``overlap`` (``0 <= overlap < tile``: otherwise tiles would leave gaps or never advance).
    """
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"tile_positions needs tile >= 1 and 0 <= overlap < tile, got tile {tile}, overlap {overlap}")
    if tile >= size:
        return [0]
    stride = tile - overlap
    n = math.ceil((size - tile) / stride) + 1
    span = size - tile
    return [(i * span + (n - 1) // 2) // (n - 1) for i in range(n)]


def _axis(size: int, tile: int, cfg: TileConfig) -> tuple[int, int, list[int]]:
    """(tile, overlap, starts) along one side: as many tiles as ``tile`` needs, each shrunk to
    the smallest multiple of ``cfg.multiple`` that still covers the side with them. A 520-pixel
    side takes two tiles of 512 or two of 288: the same count, 44 % of the pixels."""
    tile = min(tile, size)
    overlap = min(cfg.overlap, tile // 2)
    count = len(tile_positions(size, tile, overlap))
    if count > 1:
        shrunk = -(-(size + (count - 1) * overlap) // count)  # count tiles overlapping by `overlap`
        shrunk += -shrunk % cfg.multiple
        if shrunk < tile:
            tile, overlap = shrunk, min(cfg.overlap, shrunk // 2)
    return tile, overlap, tile_positions(size, tile, overlap)


def _grid(h: int, w: int, cfg: TileConfig) -> tuple[int, int, list[int], list[int], int, int]:
    """(tile_h, tile_w, ys, xs, overlap_h, overlap_w) for an HxW image."""
    t = _tile_side(cfg)
    if t <= 0:
        return h, w, [0], [0], 0, 0
    (th, oh, ys), (tw, ow, xs) = _axis(h, t, cfg), _axis(w, t, cfg)
    return th, tw, ys, xs, oh, ow


def count_tiles(height: int, width: int, cfg: TileConfig) -> int:
    """Number of tiles ``run_tiled`` uses per image of this size."""
    _, _, ys, xs, _, _ = _grid(height, width, cfg)
    return len(ys) * len(xs)


def tile_shape(height: int, width: int, cfg: TileConfig) -> tuple[int, int]:
    """(height, width) of the tiles ``run_tiled`` cuts from an image of this size."""
    th, tw, _, _, _, _ = _grid(height, width, cfg)
    return th, tw


#: Weight given to the outer quarter of an overlap (the tile's own border pixels, where
#: zero padding and the missing context hurt most): none, as the neighbour's inner quarter
#: covers them with weight 1; any share of those pixels would stay in the result.
EDGE_WEIGHT = 0.0


def _ramp(n: int) -> torch.Tensor:
    """Raised-cosine ramp of n strictly positive values rising towards 1 (complementary to its reverse)."""
    i = torch.arange(n, dtype=torch.float64)
    return (0.5 - 0.5 * torch.cos(math.pi * (i + 0.5) / n)).float()


def _overlap_ramp(n: int) -> torch.Tensor:
    """Rising weights across an overlap of n pixels, seen from the tile entering it.

    Outer quarter (the tile's border): :data:`EDGE_WEIGHT`; middle half: raised cosine;
    inner quarter: 1.  The falling ramp of the neighbour is this reversed, and the two
    sum to 1 across the middle half, so the cross-fade is smooth.
    """
    m = n // 4
    core = n - 2 * m
    r = torch.ones(n)
    r[:m] = EDGE_WEIGHT
    r[m : m + core] = _ramp(core)
    return r


def _axis_weights(starts: list[int], tile: int) -> list[torch.Tensor]:
    """1-D blending weights for each tile along one axis (ramps only towards neighbours)."""
    out = []
    for k, s in enumerate(starts):
        w = torch.ones(tile)
        if k > 0:
            ov = min(starts[k - 1] + tile - s, tile // 2)
            if ov > 0:
                w[:ov] = _overlap_ramp(ov)
        if k + 1 < len(starts):
            ov = min(s + tile - starts[k + 1], tile // 2)
            if ov > 0:
                w[tile - ov :] = torch.minimum(w[tile - ov :], torch.flip(_overlap_ramp(ov), dims=[0]))
        out.append(w)
    return out


def _check_output(out: torch.Tensor, expected: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model returned {type(out).__name__}, expected a tensor")
    if tuple(out.shape) != expected:
        raise ValueError(f"the model returned shape {tuple(out.shape)} for an input of shape {expected}")
    return out


def run_tiled(
    model: ModelLike,
    image: torch.Tensor,
    cfg: TileConfig = TileConfig(),
    *,
    progress: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Run ``model`` over ``image`` (Bx3xHxW or 3xHxW float) tile by tile; see the module doc.

    Tiles go to ``device`` (default: the model's device, else the image's).  Returns a
    float32 tensor of the image's shape on the image's device; ``image`` itself is left
    as it was, also by a model that works on its input in place.
    """
    if not isinstance(image, torch.Tensor) or not image.is_floating_point():
        # an integer image would reach the model as 0..255, not the [0, 1] it expects
        got = image.dtype if isinstance(image, torch.Tensor) else type(image).__name__
        raise TypeError(f"image: expected a floating-point torch tensor, got {got}")
    if not isinstance(cfg, TileConfig):
        raise TypeError(f"cfg: expected a TileConfig, got {type(cfg).__name__}")
    squeeze = image.dim() == 3
    if squeeze:
        image = image.unsqueeze(0)
    if image.dim() != 4:
        raise ValueError(f"expected a Bx3xHxW or 3xHxW tensor, got shape {tuple(image.shape)}")
    b, c, h, w = image.shape
    if h < 1 or w < 1:
        raise ValueError(f"empty image of shape {tuple(image.shape)}")
    if device is not None:
        dev = resolve_device(device)  # one line for a device that is unknown or absent here
    else:
        dev = model_device(model) or image.device

    # no_grad rather than inference_mode: the result is an ordinary tensor that callers
    # may modify in place or feed to autograd later.
    with torch.no_grad():
        if _tile_side(cfg) <= 0:
            out = _run_whole(model, image, cfg.batch_size, dev, progress)
        else:
            out = _run_tiles(model, image, cfg, dev, progress)
    return out.squeeze(0) if squeeze else out


def _run_whole(model: ModelLike, image: torch.Tensor, batch_size: int, dev: torch.device, progress: bool) -> torch.Tensor:
    b = image.shape[0]
    parts = []
    bar = _bar(b if b > 1 else 0, progress, "images")
    try:
        for i in range(0, b, batch_size):
            # a copy, as the tiled path's stack is: a model working in place must not change the caller's image
            x = image[i : i + batch_size].to(dev, torch.float32, copy=True, memory_format=torch.contiguous_format)
            y = _check_output(model(x), tuple(x.shape))
            parts.append(y.to(image.device, dtype=torch.float32))
            if bar is not None:
                bar.update(x.shape[0])
    finally:
        if bar is not None:
            bar.close()
    return torch.cat(parts, dim=0) if parts else image.to(torch.float32)  # an empty batch, as the tiled path


def _bar(total: int, progress: bool, unit: str):
    if not progress or total <= 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit[:-1] if unit.endswith("s") else unit, desc=unit, leave=False, dynamic_ncols=True)


def _box_outputs(model: ModelLike, image: torch.Tensor, boxes: list[tuple[int, int, int]], size: tuple[int, int],
                 dev: torch.device, batch_size: int, progress: bool, unit: str) -> Iterator[torch.Tensor]:
    """The model's float32 CPU output for each ``(image index, top, left)`` box of ``size``, in
    order: cut from the image where it lives, sent to ``dev`` ``batch_size`` at a time."""
    th, tw = size
    bar = _bar(len(boxes) if len(boxes) > 1 else 0, progress, unit)
    try:
        for k in range(0, len(boxes), batch_size):
            chunk = boxes[k : k + batch_size]
            x_in = torch.stack([image[i, :, y : y + th, x : x + tw] for i, y, x in chunk]).to(dev, torch.float32)
            y_out = _check_output(model(x_in), tuple(x_in.shape)).to("cpu", torch.float32)
            del x_in
            if bar is not None:  # before handing them out: the caller stops asking after the last one
                bar.update(len(chunk))
            yield from y_out
    finally:
        if bar is not None:
            bar.close()


def _run_tiles(model: ModelLike, image: torch.Tensor, cfg: TileConfig, dev: torch.device, progress: bool) -> torch.Tensor:
    b, c, h, w = image.shape
    th, tw, ys, xs, _, _ = _grid(h, w, cfg)
    wy, wx = _axis_weights(ys, th), _axis_weights(xs, tw)
    out = torch.zeros(b, c, h, w, dtype=torch.float32)

    jobs = [(bi, iy, ix) for bi in range(b) for iy in range(len(ys)) for ix in range(len(xs))]
    boxes = [(bi, ys[iy], xs[ix]) for bi, iy, ix in jobs]
    for (bi, iy, ix), tile_out in zip(jobs, _box_outputs(model, image, boxes, (th, tw), dev, cfg.batch_size,
                                                          progress, "tiles")):
        y0, x0 = ys[iy], xs[ix]
        out[bi, :, y0 : y0 + th, x0 : x0 + tw].addcmul_(tile_out, wy[iy][:, None] * wx[ix][None, :])
    # A tile's weight is the product of its axis weights, so the summed weight is the outer product
    # of the axes' sums: divided out a band of rows at a time, with no full-size weight map.
    total_y, total_x = _axis_totals(ys, wy, h), _axis_totals(xs, wx, w)
    rows = max(1, _DIVIDE_BAND_PIXELS // w)
    for r in range(0, h, rows):
        out[:, :, r : r + rows].div_(total_y[r : r + rows, None] * total_x[None, :])
    return out.to(image.device)


#: Pixels of summed weight made at a time when dividing the blended output by it.
_DIVIDE_BAND_PIXELS = 1 << 20


def _axis_totals(starts: list[int], weights: list[torch.Tensor], size: int) -> torch.Tensor:
    """The tiles' weights along one axis summed at each of its ``size`` pixels."""
    total = torch.zeros(size, dtype=torch.float32)
    for s, weight in zip(starts, weights):
        total[s : s + len(weight)] += weight
    return total


# ------------------------------------------------------------------ the released test script

#: Side of the windows the released test script runs the network on (``../shared/SPEC.md``).
RELEASED_WINDOW = 256


def released_window_starts(size: int, window: int = RELEASED_WINDOW) -> list[int]:
    """Where the released test script's windows start along a side: every ``window`` pixels,
    the last one shifted back to end at the border (the script fails on sides under ``window``)."""
    if size < window:
        raise ValueError(f"the released test script's {window}x{window} windows need sides of at least "
                         f"{window} pixels, got {size}")
    return [min(start, size - window) for start in range(0, size, window)]


def run_released_windows(model: ModelLike, image: torch.Tensor, window: int = RELEASED_WINDOW, *,
                         batch_size: int = 4, progress: bool = False) -> torch.Tensor:
    """``model`` over ``image`` (Bx3xHxW float) as the released test script runs it, to score
    as the paper did: ``window`` x ``window`` windows (:func:`released_window_starts`) with hard
    seams, no blending. Where a border window was shifted onto its neighbour, the shifted one's
    pixels are kept, as a script writing the windows in turn keeps them (SPEC.md does not say).
    Returns float32 on the image's device; for reproducing scores, not for photos (see
    :func:`run_tiled`)."""
    if image.dim() != 4:
        raise ValueError(f"expected a Bx3xHxW tensor, got shape {tuple(image.shape)}")
    b, c, h, w = image.shape
    boxes = [(i, y, x) for i in range(b) for y in released_window_starts(h, window)
             for x in released_window_starts(w, window)]
    dev = model_device(model) or image.device
    out = torch.empty(b, c, h, w, dtype=torch.float32)
    with torch.no_grad():  # in order: later windows overwrite earlier ones
        for (i, y, x), window_out in zip(boxes, _box_outputs(model, image, boxes, (window, window), dev,
                                                             batch_size, progress, "windows")):
            out[i, :, y : y + window, x : x + window] = window_out
    return out.to(image.device)


# --------------------------------------------------------------------------- memory


def is_oom_error(err: BaseException) -> bool:
    """True for CUDA/MPS/CPU out-of-memory errors raised by torch."""
    if isinstance(err, OutOfMemoryError):
        return True
    if isinstance(err, RuntimeError):
        msg = str(err).lower()
        return "out of memory" in msg or "can't allocate memory" in msg or "failed to allocate" in msg
    return False


def _release_device_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and hasattr(mps, "empty_cache") and torch.backends.mps.is_available():
        mps.empty_cache()


def run_with_oom_fallback(
    model: ModelLike,
    image: torch.Tensor,
    cfg: TileConfig = TileConfig(),
    *,
    progress: bool = False,
    device: torch.device | str | None = None,
    min_tile: int = 64,
) -> torch.Tensor:
    """:func:`run_tiled`, retrying with smaller tiles when memory runs out.

    On an out-of-memory error the batch is halved first, while it held more than one tile
    (or image): that saves memory without changing the result.  At one a call, the tile
    side is halved (rounded down to ``cfg.multiple``; a whole-image run starts from the
    image's longer side) and the overlap kept at most a quarter of the tile; this repeats
    down to ``min_tile`` (and no tile below ``cfg.multiple``), below which
    ``torch.OutOfMemoryError`` is raised with a message saying what was tried.  Each retry
    is logged on the ``nerdrain`` logger.
    """
    h, w = image.shape[-2:]
    cur = cfg
    while True:
        failed_msg = None
        try:
            return run_tiled(model, image, cur, progress=progress, device=device)
        except Exception as e:  # noqa: BLE001 - filtered just below
            if not is_oom_error(e):
                raise
            failed_msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        # Out of the except block: the traceback (and the tensors it pins) is released.
        _release_device_memory()
        side = _tile_side(cur)
        eff = min(side, max(h, w)) if side > 0 else max(h, w)
        per_call = min(cur.batch_size, max(1, image.shape[0] * (count_tiles(h, w, cur) if side > 0 else 1)))
        if per_call > 1:  # the same tiles, fewer at a time: the same result
            new = replace(cur, batch_size=per_call // 2)
            log.warning("out of memory with %d %s at a time; retrying with %d",
                        per_call, "tiles" if side > 0 else "images", new.batch_size)
            cur = new
            continue
        new_tile = eff // 2
        if new_tile >= cur.multiple:
            new_tile -= new_tile % cur.multiple
        new_tile = max(new_tile, min(min_tile, eff - 1))
        # below ``multiple`` TileConfig refuses a tile: that is as far as halving goes, whatever min_tile says
        if eff <= min_tile or new_tile < cur.multiple:
            where = f"tile {eff}x{eff}" if side > 0 else "the whole image"
            raise OutOfMemoryError(
                f"out of memory even with {where}, one at a time "
                f"(smallest tile tried: {eff}; last error: {failed_msg}). "
                "Try a smaller --tile, --half, or --device cpu."
            )
        new = replace(cur, tile=new_tile, batch_size=1, overlap=min(cur.overlap, new_tile // 4))
        log.warning("out of memory with %s; retrying with tile %d",
                    f"tile {eff}" if side > 0 else "the whole image", new.tile)
        cur = new


def default_tile_for_device(
    device: torch.device | str | None,
    *,
    batch_size: int = 1,
    bytes_per_pixel: int = DEFAULT_BYTES_PER_PIXEL,
    usable_fraction: float = 0.7,
    min_tile: int = 128,
    max_tile: int = 2048,
    fixed_tile: int = 512,
    multiple: int = 16,
) -> int:
    """A tile side that should fit the device.

    CUDA: ``usable_fraction`` of the currently free memory (``torch.cuda.mem_get_info``)
    divided by ``bytes_per_pixel * batch_size`` gives the pixels per tile; its square
    root, rounded down to ``multiple`` and clamped to [``min_tile``, ``max_tile``], is the
    tile side.  CPU, MPS and anything else: ``fixed_tile`` (512).  Out-of-memory errors
    from a too-optimistic estimate are handled by :func:`run_with_oom_fallback`.
    """
    dev = resolve_device(device) if device == "auto" else torch.device(device or "cpu")
    if dev.type != "cuda" or not torch.cuda.is_available():
        return fixed_tile
    try:
        free, _total = torch.cuda.mem_get_info(dev)
    except Exception:  # noqa: BLE001 - any failure: fall back to the fixed size
        return fixed_tile
    pixels = usable_fraction * free / (bytes_per_pixel * max(1, batch_size))
    side = int(math.sqrt(max(pixels, 0.0)))
    side -= side % multiple
    return int(min(max(side, min_tile), max_tile))

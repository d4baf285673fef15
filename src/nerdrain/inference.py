"""Python API for deraining images and batches of files (behind ``nerd-rain derain``).

* :func:`derain` -- one image given as a ``PIL.Image``, a numpy array or a torch tensor;
  returns the same kind of object.
* :func:`derain_files` -- files, folders (and, ``recursive``, their subfolders) and globs in,
  PNG (or another format) files out; one failing file never stops the batch.
* :func:`resolve_device` -- ``"auto" | "cpu" | "cuda[:N]" | "mps" | None`` to a device.

Inference is tiled (:mod:`nerdrain.tiling`) with automatic fallback to smaller tiles
when device memory runs out.
"""

from __future__ import annotations

import dataclasses
import glob
import numbers
import os
import stat
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from nerdrain.devices import resolve_device
from nerdrain.files import (
    broken_link,
    missing_folders,
    name_key,
    name_problem,
    one_line,
    racily_clean,
    remove_empty_folders,
    remove_stale_temporaries,
    same_file,
    write_problem,
)
from nerdrain.imageio import (
    IMAGE_EXTENSIONS,
    WRITE_FORMATS,
    ImageReadError,
    ImageWriteError,
    Photo,
    check_writable_size,
    fit_metadata,
    photo_from_pil,
    photo_to_pil,
    quantize,
    read_photo,
    resolve_max_pixels,
    rgb_to_gray,
    write_photo,
)
from nerdrain.tiling import (
    ModelLike,
    TileConfig,
    count_tiles,
    default_tile_for_device,
    eval_mode,
    model_device,
    model_dtype,
    run_with_oom_fallback,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "Summary",
    "clear_default_model_cache",
    "derain",
    "derain_files",
    "expand_inputs",
    "plan_outputs",
    "resolve_device",
]

#: Show a per-image tile progress bar (in derain_files) from this many tiles on.
_TILE_BAR_MIN_TILES = 9


# --------------------------------------------------------------------------- precision


class _Precision(torch.nn.Module):
    """Runs the wrapped model in a reduced precision and returns float32: under autocast (``half``
    over fp32 weights), or, for a model whose weights are already half precision (as
    ``model.half()`` leaves them), with its input cast to their type."""

    def __init__(self, model: ModelLike, device_type: str, dtype: torch.dtype, autocast: bool = True):
        super().__init__()
        self.inner = model
        self.device_type = device_type
        self.dtype = dtype
        self.autocast = autocast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.autocast:
            return self.inner(x.to(self.dtype)).float()
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            y = self.inner(x)
        return y.float()


def _stored_dtype(model: ModelLike) -> torch.dtype | None:
    """The floating type of a plain module's weights (a ``FastInference`` casts for itself)."""
    from nerdrain.accel import FastInference

    return None if isinstance(model, FastInference) else model_dtype(model)


def half_dtype(dev: torch.device) -> torch.dtype:
    """The reduced precision ``half`` means on ``dev``: bfloat16, else float16 where bf16 is not supported."""
    if dev.type == "mps":
        return torch.float16
    if dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


@dataclass
class _Runner:
    """A model ready to run: resolved device, tiling parameters, autocast."""

    model: ModelLike
    device: torch.device
    tile: int
    overlap: int
    batch_size: int
    half: bool

    def config(self) -> TileConfig:
        return TileConfig(tile=self.tile, overlap=self.overlap, batch_size=self.batch_size)

    def __call__(self, x: torch.Tensor, *, progress: bool = False) -> torch.Tensor:
        """Bx3xHxW float in [0, 1] (any device) -> float32 on x's device, clamped to [0, 1]."""
        net: ModelLike = self.model
        stored = _stored_dtype(self.model)
        if self.half:
            net = _Precision(self.model, self.device.type, half_dtype(self.device))
        elif stored is not None and stored != torch.float32:
            net = _Precision(self.model, self.device.type, stored, autocast=False)
        with eval_mode(self.model):
            y = run_with_oom_fallback(net, x, self.config(), progress=progress, device=self.device)
        return y.clamp_(0.0, 1.0)

    def n_tiles(self, height: int, width: int) -> int:
        return count_tiles(height, width, self.config())


def _prepare(
    model: ModelLike | None,
    *,
    tile: int | None,
    overlap: int,
    batch_size: int,
    device: str | torch.device | None,
    half: bool,
    fallback_device: torch.device | None = None,
) -> _Runner:
    # bad tiling values fail here, once and before any model is loaded or moved, not for every file
    TileConfig(tile=0 if tile is None else tile, overlap=overlap, batch_size=batch_size)
    if model is None:
        dev = resolve_device(device)
        model = _default_model(dev)
    elif isinstance(model, (str, os.PathLike)):
        dev = resolve_device(device)
        model = _path_model(model, dev)
    elif not callable(model):
        raise TypeError(f"model: expected a NeRD-Rain model, another callable or a checkpoint path, "
                        f"not {type(model).__name__}")
    else:
        if device is not None:
            dev = resolve_device(device)
            if isinstance(model, torch.nn.Module) and model_device(model) not in (None, dev):
                model.to(dev)  # in place, as nn.Module.to does
        else:
            dev = model_device(model) or fallback_device or torch.device("cpu")
    if tile is None:
        tile = default_tile_for_device(dev, batch_size=batch_size)
    return _Runner(model=model, device=dev, tile=tile, overlap=overlap, batch_size=batch_size, half=bool(half))


# --------------------------------------------------------------------------- the default model

_default_models: dict[torch.device, torch.nn.Module] = {}
_default_models_lock = threading.Lock()
#: The model last read from a checkpoint path: (the file as it was read, on which device), the model.
_path_model_kept: tuple[tuple, torch.nn.Module] | None = None


def _one_device(dev: torch.device) -> torch.device:
    """``dev`` as the cache keys name it: "cuda" and "cuda:0" are one device, one model."""
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return dev


def _kept(model: torch.nn.Module) -> torch.nn.Module:
    """A model derain keeps for itself, never handed out: in eval mode, without gradients."""
    model.eval().requires_grad_(False)
    return model


def _default_model(dev: torch.device) -> torch.nn.Module:
    """The default weights on ``dev``, read at the first call for that device and kept: a notebook
    deraining photo after photo would otherwise read and build the network (about 0.4 s) each time.
    The kept model is derain's own, never handed out (``load_default_model`` gives each caller a
    fresh one to change); threads asking at once share one load."""
    dev = _one_device(dev)
    with _default_models_lock:
        model = _default_models.get(dev)
        if model is None:
            from nerdrain import checkpoint

            model = _kept(checkpoint.load_default_model(dev))
            _default_models[dev] = model
    return model


def _path_model(path: str | os.PathLike[str], dev: torch.device) -> torch.nn.Module:
    """The checkpoint at ``path`` on ``dev``, kept until another path or device is asked for, for
    the reason the default model is kept. The file is known by its resolved name, inode, size,
    modification and change times, so one rewritten since (a training run's newer weights) is read
    again; one changed in the 2 s before it was read is not kept, as a rewrite right after could
    leave all of these as they were (:func:`nerdrain.files.racily_clean`)."""
    global _path_model_kept
    from nerdrain.checkpoint import load_model

    dev = _one_device(dev)
    read_ns = time.time_ns()
    try:
        info = os.stat(path)
    except (OSError, ValueError):  # load_model says what is wrong with the path, in its words
        return load_model(path, dev)
    key = (os.path.realpath(path), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns, dev)
    with _default_models_lock:
        if _path_model_kept is None or _path_model_kept[0] != key:
            _path_model_kept = None  # the previous model's memory freed before the next one is built
            model = _kept(load_model(path, dev))
            if racily_clean(info, read_ns):
                return model
            _path_model_kept = (key, model)
        return _path_model_kept[1]


def clear_default_model_cache() -> None:
    """Forget the models that :func:`derain` and :func:`derain_files` kept (the default one per
    device, and the one last read from a checkpoint path), releasing their memory; on a GPU,
    ``torch.cuda.empty_cache()`` afterwards hands it back to the driver.  The next call reads
    the weights again."""
    global _path_model_kept
    with _default_models_lock:
        _default_models.clear()
        _path_model_kept = None


# --------------------------------------------------------------------------- derain


def derain(
    image: Image.Image | np.ndarray | torch.Tensor,
    model: ModelLike | None = None,
    *,
    tile: int | None = None,
    overlap: int = 32,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    half: bool = False,
    progress: bool = False,
) -> Image.Image | np.ndarray | torch.Tensor:
    """Derain one image; the result has the input's type, shape and value range.

    * ``PIL.Image``: returns a ``PIL.Image`` of the same mode family -- RGB stays RGB,
      RGBA keeps its alpha exactly, L stays L, LA keeps alpha, I;16 and I come back as
      I;16 (16-bit), F stays F ([0, 1]), 1 becomes L, palette images come back as
      RGB/RGBA, CMYK as RGB; ``info['icc_profile']`` and
      ``info['exif']`` are carried over.  EXIF orientation is *not* applied (the pixels
      are taken as they are in memory).
    * ``numpy.ndarray``: HxW, HxWx1, HxWx3 or HxWx4 (alpha passed through exactly);
      uint8 -> uint8, uint16 -> uint16 (full range), float -> same float dtype in [0, 1].
    * ``torch.Tensor``: 3xHxW or Bx3xHxW float in [0, 1]; returns the same shape and
      dtype on the same device.

    ``model``: any module/callable mapping Bx3xHxW [0, 1] float tensors to the same
    shape, or a checkpoint path for :func:`nerdrain.load_model` (the last one read is kept for the
    next calls on that device while the file is unchanged), or None: the project's default
    NeRD-Rain-S weights, loaded on ``device`` at the first call and kept for the next ones on that
    device (:func:`clear_default_model_cache` releases what is kept).  A module is run in eval mode (each submodule's
    training flag is restored afterwards); one whose weights are half precision gets its input in that type.
    Float images must be finite (``ValueError`` otherwise; values outside [0, 1] are clipped,
    with a warning where far outside).  With an explicit
    ``device`` it is moved there (in place).  ``device=None`` with a model: the model's
    device.  ``tile``: tile side (None: chosen for the device, 0: whole image at once);
    ``overlap``/``batch_size``: see :class:`nerdrain.tiling.TileConfig`.  ``half``:
    autocast (bfloat16 on CUDA/CPU, float16 on MPS or pre-Ampere CUDA); the output is
    float32 either way.  Out-of-memory errors are retried with fewer tiles at a time, then smaller ones.
    """
    if not isinstance(image, (Image.Image, np.ndarray, torch.Tensor)):  # before a model is loaded for it
        hint = "; for image files use derain_files" if isinstance(image, (str, os.PathLike)) else ""
        raise TypeError(f"derain() takes a PIL.Image, numpy array or torch tensor, not {type(image).__name__}{hint}")
    fallback = image.device if isinstance(image, torch.Tensor) else None
    runner = _prepare(
        model, tile=tile, overlap=overlap, batch_size=batch_size, device=device, half=half, fallback_device=fallback
    )
    if isinstance(image, Image.Image):
        return _derain_pil(image, runner, progress)
    if isinstance(image, np.ndarray):
        return _derain_numpy(image, runner, progress)
    return _derain_tensor(image, runner, progress)


def _rgb_to_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1).unsqueeze(0)


def _tensor_to_rgb(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t[0].permute(1, 2, 0).cpu().numpy(), dtype=np.float32)


def _derain_photo(photo: Photo, runner: _Runner, progress: bool) -> Photo:
    out = runner(_rgb_to_tensor(photo.rgb), progress=progress)
    return dataclasses.replace(photo, rgb=_tensor_to_rgb(out))


def _derain_pil(img: Image.Image, runner: _Runner, progress: bool) -> Image.Image:
    img.load()
    if img.mode == "F":  # a float image as an array is: NaN refused, 0-255 values warned (not silently 0 and 1)
        _check_float_image(np.array(img, dtype=np.float32))  # a writable copy, as torch.from_numpy wants
    photo = photo_from_pil(img, apply_exif_orientation=False)
    result = _derain_photo(photo, runner, progress)
    if img.mode == "F":  # float image: stay float (values in [0, 1]); its clipping was said above
        return Image.fromarray(np.clip(rgb_to_gray(result.rgb), 0.0, 1.0).astype(np.float32))
    for note in result.notes:  # what the returned image could not keep, as derain_files reports it
        warnings.warn(f"the image: {note}", stacklevel=3)
    out = photo_to_pil(result)
    if photo.alpha is not None and photo.bit_depth == 8 and out.mode in ("RGBA", "LA"):
        # Pass the original alpha band through bit-exactly.
        src = img if img.mode in ("RGBA", "LA") else img.convert("RGBA" if out.mode == "RGBA" else "LA")
        out.putalpha(src.getchannel("A"))
    for key in ("dpi",):
        if key in img.info:
            out.info[key] = img.info[key]
    return out


def _check_float_image(values: np.ndarray | torch.Tensor) -> None:
    """One NaN or infinity would spread through the convolutions to the whole output, so such
    images are refused; values far outside [0, 1] (a 0-255 image passed as float) are clipped by
    the output, so they earn a warning."""
    if isinstance(values, np.ndarray):
        values = torch.from_numpy(values)
    bad = int((~torch.isfinite(values)).sum())
    if bad:
        raise ValueError(f"float image has {bad} NaN or infinite value(s); derain needs finite values in [0, 1]")
    low, high = float(values.min()), float(values.max())
    if low < -0.01 or high > 1.01:
        # Advice only where the range says what the image is: a resampling filter's small over- and
        # undershoot of a [0, 1] image is neither 8-bit nor [-1, 1], and either remedy would ruin it.
        hint = (" (divide 8-bit values by 255)" if high > 2 else
                " (map [-1, 1] values to [0, 1] with x * 0.5 + 0.5)" if low < -0.5 else "")
        warnings.warn(f"float image values span [{low:g}, {high:g}], not [0, 1]: the result is clipped to [0, 1]"
                      f"{hint}", stacklevel=4)


def _derain_numpy(a: np.ndarray, runner: _Runner, progress: bool) -> np.ndarray:
    if not a.dtype.isnative:  # big-endian data (from a FITS or TIFF reader): the same values, native order
        a = a.astype(a.dtype.newbyteorder("="))
    if a.dtype == np.uint8:
        scale = 255.0
    elif a.dtype == np.uint16:
        scale = 65535.0
    elif np.issubdtype(a.dtype, np.floating):
        scale = None
    else:
        raise TypeError(f"numpy images must be uint8, uint16 or float, not {a.dtype}")
    if a.ndim == 2:
        chans = None
    elif a.ndim == 3 and a.shape[2] in (1, 3, 4):
        chans = a.shape[2]
    else:
        raise ValueError(f"numpy images must be HxW, HxWx1, HxWx3 or HxWx4, got shape {a.shape}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"empty image of shape {a.shape}")

    # The float input is bound to no name here, so it is freed when the runner returns, and the
    # runner's result (its own, clamped in place) is worked on in place: a large photo holds
    # about two float32 copies at a time, not five.
    out = runner(_rgb_to_tensor(_numpy_to_rgb(a, scale, chans)), progress=progress)[0].permute(1, 2, 0)
    res = out.cpu().numpy()
    if chans is None:
        res = rgb_to_gray(res)
    elif chans == 1:
        res = rgb_to_gray(res)[..., None]
    if scale is not None:
        q = quantize(res, 8 if a.dtype == np.uint8 else 16, scratch=True)
    else:
        q = np.ascontiguousarray(np.clip(res, 0.0, 1.0, out=res), dtype=a.dtype)
    if chans == 4:
        q = np.concatenate([q, a[..., 3:4]], axis=2)  # alpha passed through exactly
    return q


def _numpy_to_rgb(a: np.ndarray, scale: float | None, chans: int | None) -> np.ndarray:
    """HxWx3 float32 in [0, 1] of a checked numpy image (its alpha left out), converted once."""
    f = np.divide(a, np.float32(scale), dtype=np.float32) if scale is not None else a.astype(np.float32)
    if scale is None:
        _check_float_image(f[..., :3] if chans == 4 else f)
    if chans is None:
        return np.repeat(f[..., None], 3, axis=2)
    if chans == 1:
        return np.repeat(f, 3, axis=2)
    return f[..., :3]


def _derain_tensor(t: torch.Tensor, runner: _Runner, progress: bool) -> torch.Tensor:
    if not t.is_floating_point():
        raise TypeError(f"tensors must be float in [0, 1], not {t.dtype}")
    if t.layout != torch.strided:
        raise TypeError(f"tensors must be dense (torch.strided), not {t.layout}")
    if t.device.type == "meta":
        raise ValueError("a tensor on the meta device holds no values to derain")
    squeeze = t.dim() == 3
    x = t.unsqueeze(0) if squeeze else t
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"tensors must be 3xHxW or Bx3xHxW, got shape {tuple(t.shape)}")
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"empty image of shape {tuple(t.shape)}")
    if x.shape[0] == 0:
        return t.detach().clone()
    _check_float_image(x.detach())
    y = runner(x, progress=progress).to(device=t.device, dtype=t.dtype)
    return y.squeeze(0) if squeeze else y


# --------------------------------------------------------------------------- files


@dataclass
class Summary:
    """Outcome of :func:`derain_files`."""

    ok: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)
    #: outputs an earlier run wrote, kept as they were (``skip_existing``); their inputs were not read
    skipped: list[Path] = field(default_factory=list)


def _has_glob(s: str) -> bool:
    return any(ch in s for ch in "*?[")


def expand_inputs(
    inputs: Iterable[str | os.PathLike[str]],
    *,
    skip_suffix: str | None = None,
    recursive: bool = False,
    exclude: Iterable[str | os.PathLike[str]] = (),
) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files, folders (image extensions only, hidden files skipped; links with an image name that
    lead nowhere listed too, to fail named when read) and globs -> (unique files
    in order, [(input, problem)] for inputs that matched nothing, or subfolders that could not be
    listed).

    ``skip_suffix``: when expanding folders and globs, skip files whose stem ends with
    it (our own earlier outputs written beside the inputs).  ``recursive``: search the subfolders
    of folders (and of the folders a glob matches) too, except hidden ones, links to folders (so
    that a link loop cannot make the walk endless) and the folders in ``exclude`` (an output folder
    inside an input folder, whose results must not be derained again).
    """
    files, _, problems, _ = _expand(inputs, skip_suffix, recursive, exclude)
    return files, problems


def _expand(
    inputs: Iterable[str | os.PathLike[str]],
    skip_suffix: str | None,
    recursive: bool,
    exclude: Iterable[str | os.PathLike[str]],
) -> tuple[list[Path], list[Path], list[tuple[str, str]], list[tuple[str, str]]]:
    """:func:`expand_inputs`, with each file's folder relative to the folder given (or matched)
    that it was found in: ``Path()`` where it was found at the top, or given itself; and
    [(folder, note)] for folders whose photos were found but not all of their subfolders searched
    (without -r) or links to folders followed (with -r)."""
    files: list[Path] = []
    subfolders: list[Path] = []
    problems: list[tuple[str, str]] = []
    seen: set[str] = set()
    walk = _Walk(skip_suffix, recursive, {_real_key(e) for e in exclude})
    for item in inputs:
        s = os.fspath(item)
        try:
            found, problem = walk.expand_one(s)
        except OSError as err:  # a folder that cannot be listed, a name too long: that input fails, not the batch
            found, problem = [], err.strerror or str(err)
        problems += walk.take_problems()  # subfolders that could not be listed, named each on its own
        if problem is not None:
            problems.append((s, problem))
        for f, subfolder in found:
            key = _real_key(f)
            if key not in seen:
                seen.add(key)
                files.append(f)
                subfolders.append(subfolder)
    return files, subfolders, problems, walk.notes


def _real_key(p: str | os.PathLike[str]) -> str:
    return os.path.normcase(os.path.realpath(p))


@dataclass
class _Walk:
    """How inputs are expanded into files: :func:`expand_inputs`'s options, and the problems met
    in subfolders of the input being expanded."""

    skip_suffix: str | None
    recursive: bool
    exclude: set[str]
    problems: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)

    def take_problems(self) -> list[tuple[str, str]]:
        problems, self.problems = self.problems, []
        return problems

    def ours(self, p: Path) -> bool:
        return bool(self.skip_suffix) and p.stem.endswith(self.skip_suffix)

    def expand_one(self, s: str) -> tuple[list[tuple[Path, Path]], str | None]:
        """One input: (its files with their subfolders, or the problem where it gives none)."""
        p = Path(s)
        try:  # stat, not is_dir/exists: those answer False where the file system cannot be asked (Python 3.14)
            mode: int | None = p.stat().st_mode
        except ValueError:  # a NUL in the name
            mode = None
        except OSError as err:  # nothing there; a pattern (an invalid name on Windows) is matched below
            if not (isinstance(err, (FileNotFoundError, NotADirectoryError)) or _has_glob(s)):
                raise
            mode = None
        if mode is not None and stat.S_ISDIR(mode):
            return self.folder(p)
        if mode is not None:
            return [(p, Path())], None
        if _has_glob(s):
            found: list[tuple[Path, Path]] = []
            for m in map(Path, sorted(glob.glob(s))):
                if (m.is_file() or broken_link(m)) and not self.ours(m):
                    found.append((m, Path()))
                elif self.recursive and m.is_dir() and _real_key(m) not in self.exclude:
                    try:  # as the shell's expansion of the pattern would give this folder
                        found += self.folder(m)[0]
                    except OSError as err:
                        self.problems.append((str(m), f"cannot be listed ({err.strerror or err})"))
            return found, None if found else "no files match this pattern"
        return [], broken_link(p) or "no such file or directory"

    def folder(self, root: Path) -> tuple[list[tuple[Path, Path]], str | None]:
        """A folder's photos (and, recursive, its subfolders'), sorted by name folder by folder."""
        found: list[tuple[Path, Path]] = []
        ours = subfolders = links = 0
        visited: set[tuple[int, int]] = set()  # a bind mount can make a loop without a link
        pending = [Path()]
        while pending:
            relative = pending.pop()
            try:
                with os.scandir(root / relative) as listing:
                    entries = sorted((e for e in listing if not e.name.startswith(".")), key=lambda e: e.name)
                info = os.stat(root / relative)
            except OSError as err:
                if relative == Path():
                    raise
                self.problems.append((str(root / relative), f"cannot be listed ({err.strerror or err})"))
                continue
            if (info.st_dev, info.st_ino) in visited:
                continue
            visited.add((info.st_dev, info.st_ino))
            below = []
            for entry in entries:
                path = Path(entry.path)
                if _is_dir(entry):
                    if _real_key(path) in self.exclude:  # the output folder: never an input, nor missed
                        continue
                    if not self.recursive:
                        subfolders += 1
                    elif entry.is_symlink():
                        links += 1
                    else:
                        below.append(relative / entry.name)
                elif path.suffix.lower() in IMAGE_EXTENSIONS and (_is_file(entry) or broken_link(path)):
                    # a link to nothing is listed, to fail named when read rather than go unseen
                    if self.ours(path):
                        ours += 1
                    else:
                        found.append((path, relative))
            pending += reversed(below)
        unsearched = _unsearched(subfolders, links)
        if found:
            if unsearched:  # the photos found alone would pass for the whole folder's
                self.notes.append((str(root), unsearched))
            return found, None
        if ours:
            below_too = " and its subfolders" if self.recursive else ""
            return [], f"only earlier outputs (*{self.skip_suffix}) in this folder{below_too}"
        below_too = " or its subfolders" if self.recursive else ""
        return [], f"no image files in this folder{below_too}" + (f" ({unsearched})" if unsearched else "")


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _is_file(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False


def _unsearched(subfolders: int, links: int) -> str:
    """That a folder's folders were not looked in: 'no image files' alone would puzzle whoever gave
    holiday/ of day1/, day2/ (without -r), or of links to them, and its photos alone derained
    whoever gave holiday/ of photos and day1/. Empty where all were searched."""
    if subfolders:
        return f"its {subfolders} subfolder{'s are' if subfolders > 1 else ' is'} not searched without -r"
    if links:
        return f"its {links} link{'s to folders are' if links > 1 else ' to a folder is'} not followed"
    return ""


def _ext_for(fmt: str) -> str:
    ext = "." + fmt.lower().lstrip(".")
    if ext not in WRITE_FORMATS:
        raise ValueError(f"unsupported output format {fmt!r} (use one of png, jpg, jpeg, webp, tif, tiff)")
    return ext


def _ends_with_separator(output: str) -> bool:
    return output.endswith(tuple(filter(None, ("/", os.sep, os.altsep))))


#: Image formats Pillow may have no plugin for, so that its list of extensions lacks them.
_OTHER_IMAGE_SUFFIXES = frozenset({".jxl", ".jxr", ".exr", ".hdr", ".svg", ".dng", ".cr2", ".cr3", ".nef", ".arw",
                                   ".orf", ".rw2", ".raf"})


def _is_image_suffix(suffix: str) -> bool:
    """Whether an output named with ``suffix`` reads as an image file (out.jxl), never a folder
    (results.v2): such a name in a format not written is refused rather than made a folder."""
    return suffix in IMAGE_EXTENSIONS or suffix in _OTHER_IMAGE_SUFFIXES or suffix in Image.registered_extensions()


def _output_is_folder(output: str, inputs: Sequence[str]) -> bool:
    out = Path(output)
    if out.is_dir() or _ends_with_separator(output):
        return True
    if len(inputs) != 1:
        return True
    only = os.fspath(inputs[0])
    if Path(only).is_dir() or (not Path(only).exists() and _has_glob(only)):
        return True
    return out.suffix.lower() not in WRITE_FORMATS


def _check_output(output: str, inputs: Sequence[str], fmt: str | None) -> None:
    """Fail before any work, in one line, for an output no file of the batch could be written to,
    or a single output file whose suffix contradicts the format asked for (which was meant?)."""
    out = Path(output)
    for part in (out, *out.parents):  # a name no file system here takes: before anything asks about the path
        too_long = name_problem(part)
        if too_long is not None:
            raise ValueError(f"output {output}: {too_long}" if part == out else
                             f"output {output}: folder {part}: {too_long}")
    if not _output_is_folder(output, inputs):
        named = WRITE_FORMATS[out.suffix.lower()]
        if fmt is not None and WRITE_FORMATS[_ext_for(fmt)] != named:
            raise ValueError(f"output {output}: its suffix asks for {named} but the format given is {fmt}; leave the "
                             "format out (a single output's suffix chooses its format)")
        return
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {output}: exists and is not a folder")
    named_like_a_file = not out.exists() and not _ends_with_separator(output)
    suffix = out.suffix.lower()
    if named_like_a_file and suffix not in WRITE_FORMATS and _is_image_suffix(suffix):
        raise ValueError(f"output {output}: cannot write {suffix} files; use .png, .jpg, .webp or .tif "
                         "(a trailing / makes it a folder)")
    if named_like_a_file and suffix in WRITE_FORMATS:
        raise ValueError(f"output {output}: a file name, but the inputs are several images or a folder; "
                         "give a folder (a trailing / makes any name one)")
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ValueError(f"output {output}: {existing} is not a folder")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"output {output}: cannot write in {existing} (permission denied)")


#: Quality of JPEG and WebP outputs where none is asked for.
_DEFAULT_QUALITY = 95
_FORMATS_WITH_QUALITY = frozenset({"JPEG", "WEBP"})


def _check_quality(quality: object) -> None:
    if isinstance(quality, bool) or not isinstance(quality, numbers.Integral):
        raise ValueError(f"quality {quality}: must be a whole number from 1 to 100")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality {quality}: must be 1 to 100")


def _output_format(output: str | None, inputs: Sequence[str], fmt: str | None) -> str:
    """The Pillow format every output of the batch is written in: a single output file's suffix
    chooses it, else ``fmt`` (PNG where none is given)."""
    if output is not None and not _output_is_folder(output, inputs):
        return WRITE_FORMATS[Path(output).suffix.lower()]
    return WRITE_FORMATS[_ext_for(fmt or "png")]


def _check_quality_is_used(quality: int, written: str) -> None:
    """A quality for PNG or TIFF outputs (a ``--format jpg`` forgotten) would be ignored over a
    whole batch: refused before any work, while the command is easily fixed."""
    if written not in _FORMATS_WITH_QUALITY:
        raise ValueError(f"quality {quality}: only JPEG and WebP outputs have one, and these are {written}; "
                         "write jpg or webp, or leave the quality out")


def plan_outputs(
    files: Sequence[Path],
    inputs: Sequence[str],
    output: str | None,
    *,
    suffix: str = "_derained",
    fmt: str = "png",
    subfolders: Sequence[str | os.PathLike[str]] | None = None,
) -> list[tuple[Path, Path | None, str | None]]:
    """Decide each input file's output path: [(input, output or None, problem or None)].

    * ``output=None``: beside the input, ``<stem><suffix>.<fmt>`` (photo.jpg ->
      photo_derained.png; photo.jpg and photo.png in one folder -> photo_jpg_derained.png,
      photo_png_derained.png).
    * ``output`` is a folder -- an existing folder, a path ending in a separator, or
      anything but a single plain input file with an image-suffixed output -- then
      ``<folder>/<subfolder>/<stem>.<fmt>`` (created if missing; ``subfolders[i]``, relative,
      mirrors where a recursive search found ``files[i]``; none: all at the top), or
      ``<stem><suffix>.<fmt>`` where that folder is the input's own (so that it cannot replace
      another photo there).  Inputs whose outputs would share a folder and a stem are told apart
      by their extension (a.jpg, a.png -> a_jpg.png, a_png.png), then by their folder (x/1.jpg,
      y/1.jpg -> x_1_jpg.png, y_1_jpg.png), then by a counter.
    * Otherwise ``output`` is the file to write; its suffix chooses the format.

    An output that would be an input file (any of them), that two inputs would share, or
    whose name is too long for its file system, is a problem for that input.
    """
    ext = _ext_for(fmt)
    plan: list[tuple[Path, Path | None, str | None]] = []
    if output is None:
        targets = [f.with_name(f"{name}{suffix}{ext}") for f, name in zip(files, _names_beside(files))]
    elif _output_is_folder(output, inputs):
        folders = [Path(output) / sub for sub in subfolders] if subfolders is not None else [Path(output)] * len(files)
        keys = [_real_key(folder) for folder in folders]
        # in an input's own folder an output named like an input could replace another photo there
        targets = [folder / (f"{name}{suffix}{ext}" if _same_dir(f.parent, key) else f"{name}{ext}")
                   for f, folder, key, name in zip(files, folders, keys, _unique_names_per_folder(files, keys))]
    else:
        targets = [Path(output)]
    input_keys = {os.path.normcase(os.path.realpath(f)): f for f in files}
    claimed: dict[str, Path] = {}
    for f, t in zip(files, targets):
        too_long = name_problem(t)  # a long photo name with the suffix added: before its pixels are run
        if too_long is not None:
            plan.append((f, None, f"output {t}: {too_long}"))
            continue
        key = os.path.normcase(os.path.realpath(t))
        clash = input_keys.get(key)
        if clash is None and t.exists():
            clash = next((g for g in files if same_file(g, t)), None)
        if clash is not None:
            plan.append((f, None, f"output {t} would overwrite the input file {clash}"))
        elif key in claimed:
            plan.append((f, None, f"output {t} is already the output of {claimed[key]}"))
        else:
            claimed[key] = f
            plan.append((f, t, None))
    return plan


def _same_dir(folder: Path, real_folder: str) -> bool:
    return os.path.normcase(os.path.realpath(folder)) == real_folder


def _names_beside(files: Sequence[Path]) -> list[str]:
    """Output stems beside the inputs: unique within each folder (photo.jpg and photo.png
    in one folder -> photo_jpg, photo_png)."""
    return _unique_names_per_folder(files, [_real_key(f.parent) for f in files])


def _unique_names_per_folder(files: Sequence[Path], folders: Sequence[str]) -> list[str]:
    """Output stems unique among the outputs that go to one folder (``folders[i]``: ``files[i]``'s)."""
    by_folder: dict[str, list[int]] = {}
    for i, folder in enumerate(folders):
        by_folder.setdefault(folder, []).append(i)
    names = [""] * len(files)
    for indices in by_folder.values():
        for i, name in zip(indices, _unique_names([files[i] for i in indices])):
            names[i] = name
    return names


def _unique_names(files: Sequence[Path]) -> list[str]:
    """Output stems for one folder: the plainest name that no other input shares, by :func:`name_key`
    (macOS and Windows file systems ignore letter case: IMG.png and img.png would be one file)."""

    def candidates(f: Path) -> list[str]:
        ext = f.suffix.lstrip(".").lower() or "noext"
        return [f.stem, f"{f.stem}_{ext}", f"{f.parent.name}_{f.stem}_{ext}"]

    options = [candidates(f) for f in files]
    names: list[str] = []
    for level in range(3):
        counts = Counter(name_key(opts[level]) for opts in options)
        names = [opts[level] for opts in options]
        if all(counts[name_key(n)] == 1 for n in names):
            return names
        # keep the plainer name for inputs that were already unique at this level
        options = [[opts[level]] * 3 if counts[name_key(opts[level])] == 1 else opts for opts in options]
    seen: Counter[str] = Counter()
    unique = []
    for name in names:
        key = name_key(name)
        seen[key] += 1
        unique.append(name if seen[key] == 1 else f"{name}_{seen[key]}")
    return unique


def _is_done(output: Path | None) -> bool:
    """Whether an earlier run wrote ``output``: a file under its name is complete, as outputs are
    written atomically; an empty one (another tool's, a disk repair) holds no photo."""
    try:
        info = output.stat() if output is not None else None
    except (OSError, ValueError):
        return False
    return info is not None and stat.S_ISREG(info.st_mode) and info.st_size > 0


def _remove_partial_outputs(outputs: Iterable[Path | None]) -> None:
    """Remove the hidden temporary files that a run killed outright (SIGKILL, power loss: no
    clean-up could run) left while writing these outputs, our own names for these outputs only;
    another run's that is still writing them is kept. A folder that cannot be listed or changed
    keeps them: its photos fail on their own when written."""
    by_folder: dict[Path, list[str]] = {}
    for output in outputs:
        if output is not None:
            by_folder.setdefault(output.parent, []).append(output.name)
    for folder, names in by_folder.items():
        try:
            remove_stale_temporaries(folder, names)
        except OSError:
            pass


def _reason(err: BaseException) -> str:
    if isinstance(err, ImageWriteError):  # the file that failed is the output, not the input named first
        return f"output {err.path}: {err.reason}"
    if isinstance(err, ImageReadError):
        return err.reason
    msg = " ".join(str(err).split())
    return f"{type(err).__name__}: {msg}" if msg else type(err).__name__


def derain_files(
    inputs: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str] | None = None,
    model: ModelLike | None = None,
    *,
    tile: int | None = None,
    overlap: int = 32,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    half: bool = False,
    suffix: str = "_derained",
    fmt: str | None = None,
    progress: bool = True,
    max_pixels: int | None = None,
    log: Any = None,
    skip_existing: bool = False,
    quality: int | None = None,
    recursive: bool = False,
) -> Summary:
    """Derain files, folders and globs; see :func:`expand_inputs` for which files a folder
    gives (``recursive``: its subfolders' too, never the output folder's), and :func:`plan_outputs`
    for where results go (``recursive``: each in the subfolder mirroring its input's).

    Each output keeps the input's EXIF (orientation applied and reset), ICC profile,
    alpha, grayscale-ness and 16-bit depth (PNG).  Inputs are never overwritten; outputs
    are written atomically (the hidden partial files a killed run left for them are removed).  A file that fails is reported as one line
    ``error: <path>: <reason>`` on stderr (or to ``log``, a callable taking the line)
    and the batch goes on; a multi-frame file (GIF, multi-page TIFF) gets a line
    ``note: <path>: ...`` (only its first frame is derained), as does a folder whose photos were
    derained but not its subfolders (not ``recursive``) or the folders it links to (``recursive``).  ``fmt``: the format of outputs
    beside the inputs or in a folder (None: PNG); a single output file's suffix chooses its own
    (a ``fmt`` that contradicts it is a ``ValueError``).  ``progress``: a tqdm bar
    over files, plus one over tiles for large images.  ``skip_existing``: leave the photos whose
    output is already there (a non-empty file: outputs are written atomically, so one under its
    final name is complete; its contents are not read), so that an interrupted batch, run again,
    goes on where it stopped; one ``note:`` line says how many were skipped.  ``quality``: of JPEG
    and WebP outputs, 1 to 100 (None: 95); a ``ValueError`` for outputs in another format, where it
    would mean nothing.  Returns a :class:`Summary`.
    """
    if isinstance(inputs, (str, os.PathLike)):  # one path, not a sequence of its characters
        inputs = [inputs]
    in_strs = [os.fspath(i) for i in inputs]
    out_str = os.fspath(output) if output is not None else None
    if fmt is not None:
        _ext_for(fmt)  # validate before any work
    max_pixels = resolve_max_pixels(max_pixels)
    if quality is not None:
        _check_quality(quality)
    if out_str is not None:
        _check_output(out_str, in_strs, fmt)
    if quality is not None:
        _check_quality_is_used(quality, _output_format(out_str, in_strs, fmt))
    quality = _DEFAULT_QUALITY if quality is None else int(quality)
    fmt = fmt or "png"
    # earlier outputs are not inputs: those beside the inputs by their suffix, those in -o by their folder
    exclude = [out_str] if out_str is not None and _output_is_folder(out_str, in_strs) else []
    files, subfolders, problems, notes = _expand(in_strs, suffix, recursive, exclude)
    summary = Summary()

    def report(path: str, reason: str, kind: str = "error") -> None:
        if kind == "error":
            summary.failed.append((path, reason))
        say(f"{kind}: {one_line(path)}: {one_line(reason)}")

    def say(line: str) -> None:
        if log is not None:
            log(line)
        elif progress:
            from tqdm.auto import tqdm

            tqdm.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)

    for path, reason in problems:
        report(path, reason)
    for path, note in notes:
        report(path, note, "note")
    if not files:
        return summary

    plan = plan_outputs(files, in_strs, out_str, suffix=suffix, fmt=fmt, subfolders=subfolders)
    _remove_partial_outputs(dst for _, dst, _ in plan)
    if skip_existing:
        summary.skipped = [dst for _, dst, problem in plan if problem is None and _is_done(dst)]
        if summary.skipped:
            done = set(summary.skipped)
            plan = [entry for entry in plan if entry[1] not in done]
            say(f"note: {len(done)} of {len(files)} photo{'s' * (len(files) != 1)} skipped: their outputs exist")
        if not plan:
            return summary
    runner = _prepare(model, tile=tile, overlap=overlap, batch_size=batch_size, device=device, half=half)
    all_inputs = list(files)
    folder_problems: dict[Path, str | None] = {}  # each output folder tried once, before its first photo runs
    made: list[Path] = []  # the folders this run created: removed at the end where it wrote nothing in them

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan), unit="file", desc="derain", dynamic_ncols=True)
    try:
        for src, dst, problem in plan:
            if bar is not None:
                bar.set_postfix_str(src.name, refresh=False)
            try:
                if problem is not None:
                    report(str(src), problem)
                    continue
                assert dst is not None
                photo = read_photo(src, max_pixels=max_pixels)
                check_writable_size(dst, *photo.size)  # before the network runs, not after
                if dst.parent not in folder_problems:  # made for a photo that was read, not left empty
                    made += missing_folders(dst.parent)
                    folder_problems[dst.parent] = write_problem(dst.parent)
                if folder_problems[dst.parent] is not None:
                    report(str(src), f"output {dst}: {folder_problems[dst.parent]}")
                    continue
                h, w = photo.rgb.shape[:2]
                tile_bar = progress and runner.n_tiles(h, w) >= _TILE_BAR_MIN_TILES
                result = _derain_photo(photo, runner, tile_bar)
                result = fit_metadata(result, dst)
                write_photo(dst, result, overwrite_guard_path=all_inputs, quality=quality)
                summary.ok += 1
                summary.outputs.append(dst)
                if photo.frames > 1:
                    report(str(src), f"{photo.frames} frames or pages; only the first was derained", "note")
                for note in result.notes:
                    report(str(src), note, "note")
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # noqa: BLE001 - one bad file must not stop the batch
                report(str(src), _reason(e))
            finally:
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        remove_empty_folders(made)
    return summary

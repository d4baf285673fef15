"""Scoring derained images the way the paper's MATLAB scripts do (see :mod:`nerdrain.metrics`).

* :func:`evaluate_folders` -- saved predictions against ground truth, matched by file name.
* :func:`evaluate_saved` -- saved predictions against a paired dataset's clean images, in any layout.
* :func:`evaluate_model` -- run a model (or any restore callable) over a paired dataset
  (:func:`nerdrain.data.pairs.find_pairs`), score its 8-bit predictions, optionally save them.
* :func:`evaluate_pairs` -- the loop behind :func:`evaluate_model`, also used by training.
* :func:`format_table`, :func:`write_json`, :func:`write_csv` -- report output.

Every prediction is scored as the 8-bit image ``save_dir`` receives (:func:`nerdrain.metrics.to_uint8`),
so scoring a model directly and scoring those PNGs with :func:`evaluate_folders` give the same
numbers. Images are read as MATLAB's ``imread`` gives them to the scripts
(:func:`nerdrain.data.pairs.read_scored`): colour files as RGB (alpha dropped), grey files as grey,
scored on their own values by the rain200 script and refused by the did_ddn one, whose
``rgb2ycbcr`` fails on them in MATLAB; palette files are refused (imread gives their indices), and
so are 16-bit or float files rather than quantised, since the MATLAB scripts' peak of 255 assumes
8-bit files and a silent conversion would score something else than what was submitted.

Identical images have infinite PSNR, as in MATLAB, and a mean over a set containing one is
infinite too. JSON has no infinity, so :func:`write_json` stores it as ``null``; :func:`write_csv`
writes ``inf``, which ``float()`` reads back.

Images that cannot be read or scored do not stop a run: the others are scored, then
:class:`IncompleteEvaluation` names them all and carries the others' scores (``report``), with
no mean (NaN, ``null`` in JSON): a mean over the rest is not the dataset's score.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .data.checked import CheckedFiles
from .data.pairs import (
    Pair,
    clean_label,
    find_pairs,
    load_clean,
    load_pair,
    match_folders,
    match_predictions,
    read_scored,
    shortened,
)
from .devices import resolve_device
from .files import atomic_write, check_output_folder, output_file
from .imageio import save_png
from .metrics import PROTOCOLS, check_scorable, check_ssim_size, score, to_uint8
from .tiling import TileConfig, eval_mode, run_released_windows, run_tiled

__all__ = [
    "ImageScore",
    "EvalReport",
    "IncompleteEvaluation",
    "evaluate_pairs",
    "evaluate_model",
    "evaluate_folders",
    "evaluate_saved",
    "scoring_problems",
    "format_table",
    "write_json",
    "write_csv",
]


@dataclass
class ImageScore:
    name: str
    psnr: float
    ssim: float


@dataclass
class EvalReport:
    """Per-image scores under one protocol; ``psnr`` / ``ssim`` are their means, NaN if there are
    none or if ``failed`` names images that could not be scored (``"file: why"`` each)."""

    protocol: str
    images: list[ImageScore] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.images)

    def _mean(self, values: list[float]) -> float:
        return float(np.mean(values)) if self.images and not self.failed else float("nan")

    @property
    def psnr(self) -> float:
        return self._mean([s.psnr for s in self.images])

    @property
    def ssim(self) -> float:
        return self._mean([s.ssim for s in self.images])

    def to_dict(self) -> dict[str, Any]:
        """The JSON schema of :func:`write_json`, with raw floats (``inf`` and NaN kept)."""
        return {"protocol": self.protocol, "mean": {"psnr": self.psnr, "ssim": self.ssim},
                "count": self.count, "images": [vars(s).copy() for s in self.images],
                "failed": list(self.failed)}


class IncompleteEvaluation(ValueError):
    """Some images could not be scored; one line names them all, and ``report`` keeps the scores
    of the others (with ``failed`` filled in and no mean) so that they can still be written out."""

    def __init__(self, report: EvalReport) -> None:
        self.report = report
        failed = report.failed
        super().__init__(f"{len(failed)} of {len(failed) + report.count} image(s) could not be scored, so no "
                         f"mean is given: {shortened(failed, '; ')}")


Restorer = Callable[[torch.Tensor], torch.Tensor]


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")


def _size(img: np.ndarray) -> str:
    return f"{img.shape[1]}x{img.shape[0]}"


def _check_all_scored(report: EvalReport) -> None:
    """Raise one error naming every file that could not be scored (each tried in turn, so one run
    finds them all): a mean over the others would not be the dataset's score."""
    if report.failed:
        raise IncompleteEvaluation(report)


def evaluate_pairs(restore: Restorer, pairs: Sequence[Pair], protocol: str = "rain200",
                   device: torch.device | str = "cpu", progress: bool = False,
                   on_prediction: Callable[[Pair, np.ndarray], None] | None = None) -> EvalReport:
    """Run ``restore`` (1x3xHxW float in [0, 1] on ``device`` -> same shape) over ``pairs``;
    score its 8-bit quantised output against the clean image. ``on_prediction(pair, uint8 HxWx3)``
    sees each prediction as scored (e.g. to save it). Pairs that cannot be read or scored are
    named together in one :class:`IncompleteEvaluation` once all were tried; errors of ``restore``
    stop at once."""
    _check_protocol(protocol)
    device = resolve_device(device)
    report = EvalReport(protocol)
    with torch.inference_mode():
        for pair in tqdm(pairs, desc="evaluate", disable=not progress, leave=False):
            try:
                rainy, clean = _load_scorable(pair, protocol)
            except ValueError as err:  # a bad file: the others are still run (see _check_all_scored)
                report.failed.append(str(err))
                continue
            # PIL-backed arrays are read-only; torch warns on (and must not share) them.
            x = torch.from_numpy(rainy.copy()).permute(2, 0, 1)[None].float().div(255).to(device)
            try:
                y = restore(x)
            except ValueError as err:  # an image it cannot run on (a side under 256 for the released windows)
                raise ValueError(f"{pair.input}: {err}") from None
            # An integer output (0..255, say) would pass .float() below and be clipped to [0, 1].
            if not isinstance(y, torch.Tensor) or tuple(y.shape) != tuple(x.shape) or not y.is_floating_point():
                got = f"{y.dtype} of shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
                raise ValueError(f"{pair.name}: restore returned {got} for a float input of shape {tuple(x.shape)}")
            try:
                prediction = to_uint8(y[0].float())
            except ValueError as err:  # NaN or infinite values
                raise ValueError(f"{pair.name}: restore's output: {err}") from None
            if on_prediction is not None:
                on_prediction(pair, prediction)
            try:
                report.images.append(ImageScore(pair.name, *score(prediction, clean, protocol)))
            except ValueError as err:  # what score refuses that _load_scorable let through
                report.failed.append(f"{pair.input}: {err}")
    _check_all_scored(report)
    return report


def _load_scorable(pair: Pair, protocol: str) -> tuple[np.ndarray, np.ndarray]:
    """(rainy RGB, clean as the protocol's script reads it), or the ValueError naming the file."""
    rainy, clean = load_pair(pair, scored=True)
    check_scorable(clean, protocol, clean_label(pair))
    try:
        check_ssim_size(*clean.shape[:2], protocol)
    except ValueError as err:  # named as a failed score names it
        raise ValueError(f"{pair.input}: {err}") from None
    return rainy, clean


def scoring_problems(pairs: Sequence[Pair], protocol: str, checked: CheckedFiles | None = None) -> list[str]:
    """``"file: why"`` for each pair :func:`evaluate_pairs` would fail to score for its files
    (all are read: a validation set is small), so that training can learn of them at its start;
    pairs ``checked`` records as good, their files unchanged since, are not read again."""
    def scorable(pair: Pair) -> tuple[int, int]:
        _load_scorable(pair, protocol)
        return 0, 0  # nothing to keep but that it passed

    return (checked or CheckedFiles()).check(f"validation pairs ({protocol})", pairs,
                                             lambda pair: [pair.input, pair.target], scorable)[1]


def _tiled(model: Restorer, cfg: TileConfig) -> Restorer:
    # No out-of-memory fallback to smaller tiles, unlike derain: scores must not depend on memory.
    return lambda x: run_tiled(model, x, cfg)


def _saver(folder: Path) -> Callable[[Pair, np.ndarray], None]:
    return lambda pair, prediction: save_png(prediction, folder / f"{pair.name}.png")


def evaluate_model(model_or_restore: Restorer, data_dir: str | Path, protocol: str = "rain200", *,
                   layout: str | None = None, save_dir: str | Path | None = None,
                   device: torch.device | str = "cpu", tile: int = 0, overlap: int = 32,
                   released_windows: bool = False, progress: bool = False) -> EvalReport:
    """Derain every pair of ``data_dir`` (``find_pairs(data_dir, layout)``) and score the results.

    ``model_or_restore`` maps Bx3xHxW float tensors in [0, 1] to the same shape; an
    ``nn.Module`` is moved to ``device`` (in place) and run in eval mode, each submodule's
    training flag restored afterwards. ``tile`` > 0 runs it tile by tile (:func:`nerdrain.tiling.run_tiled`
    with ``overlap``); 0 on the whole image; ``released_windows`` on the released test script's
    256x256 windows with hard seams (:func:`nerdrain.tiling.run_released_windows`), as the
    paper's figures were made. Each prediction is quantised to 8 bits (:func:`to_uint8`) before
    scoring and, with ``save_dir``, saved as ``save_dir/<name>.png``.
    """
    _check_protocol(protocol)
    device = resolve_device(device)
    tiling = TileConfig(tile=tile, overlap=overlap)  # checks the values before any work
    if released_windows and tile > 0:
        raise ValueError("released_windows (--released-windows) runs the released script's 256x256 windows: "
                         "give no tile (--tile) with it")
    pairs = find_pairs(data_dir, layout)
    if released_windows:
        restore = functools.partial(run_released_windows, model_or_restore)
    else:
        restore = _tiled(model_or_restore, tiling) if tile > 0 else model_or_restore
    on_prediction = None
    if save_dir is not None:
        out = Path(save_dir)
        sources = {p.input.parent.resolve() for p in pairs} | {p.target.parent.resolve() for p in pairs}
        if out.resolve() in sources:
            raise ValueError(f"save_dir {out} holds the dataset's own images; choose another folder")
        check_output_folder(out, [f"{p.name}.png" for p in pairs])  # fails now, not after the model ran
        out.mkdir(parents=True, exist_ok=True)
        on_prediction = _saver(out)

    if isinstance(model_or_restore, torch.nn.Module):
        model_or_restore.to(device)
    with eval_mode(model_or_restore):
        return evaluate_pairs(restore, pairs, protocol, device, progress, on_prediction)


def evaluate_folders(pred_dir: str | Path, gt_dir: str | Path, protocol: str = "rain200",
                     progress: bool = False) -> EvalReport:
    """Score saved predictions in ``pred_dir`` against ``gt_dir``, as the MATLAB scripts do.

    Files are matched by name without extension (``x.png`` against ``x.jpg``); a prediction
    without ground truth, or ground truth without a prediction, is a ``ValueError`` naming
    the files. Images must be 8-bit (see the module doc); unreadable files, size mismatches and
    images too small to score are named together in one :class:`IncompleteEvaluation` once all
    were tried.
    """
    _check_protocol(protocol)
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    matched = [(pair.input, pair) for pair in match_folders(pred_dir, gt_dir)]  # load_clean reads the target
    return _score_saved(matched, protocol, progress)


def evaluate_saved(pred_dir: str | Path, data_dir: str | Path, protocol: str = "rain200", *,
                   layout: str | None = None, progress: bool = False) -> EvalReport:
    """Score the predictions :func:`evaluate_model` saved in ``pred_dir`` (or any named alike:
    ``<pair name>.<image extension>``) against the clean images of ``data_dir``'s pairs
    (``find_pairs(data_dir, layout)``): the same scores as the model run that saved them, in every
    layout, DID's side-by-side halves and DDN's shared ground truth included. Missing or extra
    predictions are a ``ValueError`` naming them; bad files as in :func:`evaluate_folders`."""
    _check_protocol(protocol)
    data_dir = Path(data_dir)
    return _score_saved(match_predictions(Path(pred_dir), find_pairs(data_dir, layout), data_dir), protocol,
                        progress)


def _score_saved(matched: list[tuple[Path, Pair]], protocol: str, progress: bool) -> EvalReport:
    """Score each saved prediction against its pair's clean image; bad files are collected."""
    report = EvalReport(protocol)
    for pred_path, pair in tqdm(matched, desc="evaluate", disable=not progress, leave=False):
        try:
            report.images.append(_score_file(pred_path, pair, protocol))
        except ValueError as err:  # a bad file: the others are still scored (see _check_all_scored)
            report.failed.append(str(err))
    _check_all_scored(report)
    return report


def _score_file(pred_path: Path, pair: Pair, protocol: str) -> ImageScore:
    pred, gt = read_scored(pred_path), load_clean(pair)
    check_scorable(pred, protocol, str(pred_path))
    check_scorable(gt, protocol, clean_label(pair))
    if pred.shape[:2] != gt.shape[:2]:
        raise ValueError(f"size mismatch: prediction {pred_path} is {_size(pred)} "
                         f"but ground truth {clean_label(pair)} is {_size(gt)}")
    try:
        return ImageScore(pair.name, *score(pred, gt, protocol))
    except ValueError as err:  # too small for SSIM
        raise ValueError(f"{pred_path}: {err}") from None


def _fmt(value: float, digits: int) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else str(value)


def _align(rows: list[list[str]]) -> list[str]:
    """First column left-aligned, the others right-aligned, two spaces apart."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            .rstrip() for r in rows]


def format_table(report: EvalReport, per_image: bool = False) -> str:
    """A small aligned text table: protocol, count, mean PSNR (dB, 3 decimals) and mean SSIM
    (4 decimals); with ``per_image``, preceded by one row per image. Where images failed, the count
    says of how many (``2 of 3``) and the means are ``nan``."""
    lines = []
    count = f"{report.count} of {report.count + len(report.failed)}" if report.failed else str(report.count)
    if per_image:
        lines += _align([["image", "PSNR (dB)", "SSIM"]]
                        + [[s.name, _fmt(s.psnr, 3), _fmt(s.ssim, 4)] for s in report.images])
        lines.append("")
    lines += _align([["protocol", "images", "PSNR (dB)", "SSIM"],
                     [report.protocol, count, _fmt(report.psnr, 3), _fmt(report.ssim, 4)]])
    return "\n".join(lines)


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None  # float(): numpy's float32 is no JSON number


def write_json(report: EvalReport, path: str | Path) -> Path:
    """``{"protocol", "mean": {"psnr", "ssim"}, "count", "images": [{"name", "psnr", "ssim"}],
    "failed": ["file: why"]}``; an infinite PSNR (identical images) and a mean not given (images
    failed) are written as ``null``, keeping the file standard JSON."""
    data = report.to_dict()
    data["mean"] = {k: _json_float(v) for k, v in data["mean"].items()}
    for image in data["images"]:
        image["psnr"], image["ssim"] = _json_float(image["psnr"]), _json_float(image["ssim"])
    path = output_file(path)
    with atomic_write(path) as f:
        f.write((json.dumps(data, indent=2, allow_nan=False) + "\n").encode("utf-8"))
    return path


def write_csv(report: EvalReport, path: str | Path) -> Path:
    """One ``name,psnr,ssim`` row per scored image under that header, full precision (``inf`` for
    identical images)."""
    path = output_file(path)
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["name", "psnr", "ssim"])
    writer.writerows([s.name, repr(float(s.psnr)), repr(float(s.ssim))] for s in report.images)
    with atomic_write(path) as f:
        f.write(text.getvalue().encode("utf-8"))
    return path

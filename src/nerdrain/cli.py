"""``nerd-rain``: a thin command-line shell over the library (each command calls one function)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import sys
import threading
import time
import warnings
from typing import TYPE_CHECKING

from . import __version__

if TYPE_CHECKING:
    from .evaluate import EvalReport


def _model(args: argparse.Namespace):
    """The model, ready for ``args.device``; with ``--half`` on CPU/CUDA already in half precision
    (``_half_left`` says whether autocast must still provide it)."""
    from .checkpoint import load_default_model, load_model
    from .devices import resolve_device

    if args.weights == "":  # "$W" with W unset: not a request for the shipped weights
        raise ValueError("--weights: an empty name; give a checkpoint file")
    device = resolve_device(getattr(args, "device", "auto"))
    model = load_model(args.weights, device) if args.weights is not None else load_default_model(device)
    if device.type in ("cpu", "cuda"):
        # Exact fp32 (TF32 off on CUDA) unless --half; the NHWC layout is oneDNN's native one
        # (~1.7x faster on batched CPU tiles) and the one cuDNN prefers. With --half the weights
        # are stored in half precision once, instead of autocast casting them at every call.
        from .accel import optimize_for_inference
        from .inference import half_dtype

        dtype = half_dtype(device) if getattr(args, "half", False) else None
        fast = {"compile": getattr(args, "compile", False), "cuda_graphs": getattr(args, "cuda_graphs", False)}
        if device.type == "cuda":
            import torch

            # Tiles of a photo share one shape (and a folder of camera photos, a few): cuDNN's
            # autotuning runs once per shape, as in the GPU figures of the README.
            torch.backends.cudnn.benchmark = True
        model = optimize_for_inference(model, device, channels_last=True, dtype=dtype, **fast)
    else:
        from .accel import FastPathWarning

        for flag, where in (("compile", "on CPU and CUDA"), ("cuda_graphs", "on CUDA only")):
            if getattr(args, flag, False):
                warnings.warn(f"--{flag.replace('_', '-')} applies {where}, not {device.type}; running without it",
                              FastPathWarning, stacklevel=2)
    return model


def _half_left(args: argparse.Namespace) -> bool:
    """``--half`` on a device where ``_model`` did not already store the weights in half precision."""
    from .devices import resolve_device

    return args.half and resolve_device(args.device).type not in ("cpu", "cuda")


def cmd_derain(args: argparse.Namespace) -> int:
    from .inference import derain_files

    model = _model(args)
    summary = derain_files(args.inputs, args.output, model, tile=args.tile, overlap=args.overlap,
                           batch_size=args.batch_size, device=args.device, half=_half_left(args), fmt=args.format,
                           progress=not args.quiet, skip_existing=args.skip_existing,
                           quality=args.quality, recursive=args.recursive)
    skipped = f", {len(summary.skipped)} skipped" if args.skip_existing else ""
    print(f"{summary.ok} derained, {len(summary.failed)} failed{skipped}", file=sys.stderr)
    return 1 if summary.failed or not (summary.ok or summary.skipped) else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from . import evaluate
    from .files import output_file, same_file

    if not (args.pred or args.gt or args.data):
        raise ValueError("nothing to evaluate: give --pred DIR --gt DIR, --pred DIR --data DIR, or --data DIR")
    if (args.pred or args.gt) and (not args.pred or bool(args.gt) == bool(args.data)):
        raise ValueError("score saved predictions with --pred DIR and either --gt DIR or --data DIR (a dataset), "
                         "or run a model with --data DIR")
    model_only = [flag for flag, value in (("--layout", args.layout and args.gt), ("--save", args.save),
                                           ("--weights", args.weights is not None), ("--tile", args.tile),
                                           ("--released-windows", args.released_windows)) if value]
    if args.pred and model_only:  # silently ignored, they would leave a wrong idea of what was scored
        raise ValueError(f"{', '.join(model_only)}: only with --data (a model run), not with --pred/--gt")
    for report_file in filter(None, (args.json, args.csv)):  # a bad path fails now, not after the scoring
        output_file(report_file)
    if args.json and args.csv and same_file(args.json, args.csv):
        raise ValueError(f"--json and --csv name the same file {args.csv}: the second report would replace the "
                         "first; give two paths")

    try:
        report = _evaluation(args)
    except evaluate.IncompleteEvaluation as err:  # the images that were scored are not lost
        _report_scores(args, err.report)
        raise
    _report_scores(args, report)
    return 0


def _evaluation(args: argparse.Namespace) -> EvalReport:
    """The scores ``nerd-rain evaluate`` asked for: saved predictions, or a model run."""
    from . import evaluate

    if args.pred and args.gt:
        return evaluate.evaluate_folders(args.pred, args.gt, args.protocol, progress=not args.quiet)
    if args.pred:
        return evaluate.evaluate_saved(args.pred, args.data, args.protocol, layout=args.layout,
                                       progress=not args.quiet)
    from .devices import resolve_device
    from .tiling import is_oom_error

    device = resolve_device(args.device)
    try:
        return evaluate.evaluate_model(_model(args), args.data, args.protocol, layout=args.layout,
                                       save_dir=args.save, device=device, tile=args.tile, overlap=args.overlap,
                                       released_windows=args.released_windows, progress=not args.quiet)
    except RuntimeError as err:  # torch.OutOfMemoryError is one (and only exists from torch 2.5)
        if not is_oom_error(err):
            raise
        raise ValueError(f"out of memory on {device} with tile {args.tile or 'whole image'}: pass a smaller "
                         "--tile (scores change slightly with tiling)") from None


def _report_scores(args: argparse.Namespace, report: EvalReport) -> None:
    """The table on stdout, and the --json / --csv files asked for."""
    from . import evaluate

    print(evaluate.format_table(report, per_image=args.per_image))
    if args.json:
        evaluate.write_json(report, args.json)
    if args.csv:
        evaluate.write_csv(report, args.csv)


_REPORT_GRACE_S = 10.0


def _not_first_on_machine() -> bool:
    """Under ``torchrun``, every process runs the command: an error they all meet alike (a bad
    option, a bad config file) is reported by the first process on each machine only."""
    return os.environ.get("LOCAL_RANK", "0") != "0" and os.environ.get("WORLD_SIZE", "1") != "1"


def _leave_the_report() -> int:
    """Exit without a word, after a moment: under ``torchrun`` the process that reports the error
    exits first, so that the job ends with its message and torchrun names it as the root cause
    (it then ends this one)."""
    time.sleep(_REPORT_GRACE_S)
    return 2


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .training import ReportedElsewhere, TrainingInterrupted, train

    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, one line for the whole job
    try:
        cfg = load_config(args.config, args.set)
    except (ValueError, OSError):
        if _not_first_on_machine():
            return _leave_the_report()
        raise
    try:
        final = train(cfg, args.out, resume=args.resume or False, progress=not args.quiet, overwrite=args.overwrite)
    except ReportedElsewhere:
        return _leave_the_report()
    except TrainingInterrupted as stop:
        if main_rank:
            print(stop, file=sys.stderr)
        return 128 + stop.signum  # the shell's convention for "ended by signal N"
    if main_rank:
        print(f"final weights: {final}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from .data.synth import synthesize_folder

    def count(n: int, what: str) -> str:
        return f"{n} {what}{'s' * (n != 1)}"

    summary = synthesize_folder(args.clean, args.out, preset=args.preset, count_per_image=args.count,
                                seed=args.seed, streak_dir=args.streaks, size=args.size, overwrite=args.overwrite,
                                resume=args.resume)
    kept = f", kept {count(summary.kept, 'complete pair')} of an earlier run" if args.resume else ""
    print(f"wrote {count(summary.written, 'pair')} to {args.out} (input/ + target/){kept}, "
          f"{count(len(summary.failed), 'photo')} failed")
    return 1 if summary.failed else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.output, model=_model(args), device=args.device)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import export_official, read_checkpoint, save_model
    from .files import same_file

    if same_file(args.output, args.input):  # a conversion may lose precision: the input stays as it is
        raise ValueError(f"{args.output}: is the input file; write the conversion to another file")
    model, stored = read_checkpoint(args.input)
    dtype = stored if args.dtype == "same" else getattr(torch, args.dtype)
    out = (export_official(model, args.output, dtype) if args.to_official
           else save_model(model, args.output, dtype=dtype))
    print(f"{args.input} -> {out} (dim={model.cfg.dim}, {str(dtype).removeprefix('torch.')})")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .models import list_models, model_config

    for name in list_models():
        print(name, json.dumps(asdict(model_config(name))))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nerd-rain", description="NeRD-Rain single-image deraining")
    parser.add_argument("--version", action="version", version=f"nerdrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def device_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default="auto", metavar="DEVICE",
                       help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps (default: auto)")

    def weights_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--weights", help="checkpoint: the authors' .pth or a .safetensors (default: shipped weights)")

    def model_options(p: argparse.ArgumentParser, tile_default: int | None, tile_help: str) -> None:
        weights_option(p)
        device_option(p)
        p.add_argument("--tile", type=int, default=tile_default,
                       help=f"tile size in pixels, 0 or at least 16; 0 = whole image at once (default: {tile_help})")
        p.add_argument("--overlap", type=int, default=32, help="tile overlap, blended smoothly (default: 32)")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        p.add_argument("--cuda-graphs", action="store_true",
                       help="CUDA: capture each tile shape once and replay it (same outputs, less launch overhead)")
        p.add_argument("--compile", action="store_true",
                       help="torch.compile the network (same outputs in fp32; minutes for the first tile of a shape)")

    p = sub.add_parser("derain", help="derain photos (files, folders, globs)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    p.add_argument("-o", "--output", help="output file (.png, .jpg, .webp or .tif) or folder (an existing one, any name "
                                           "ending in /, or a name without an image suffix) (default: beside each "
                                           "input, *_derained.png, or the --format's extension)")
    p.add_argument("-r", "--recursive", action="store_true",
                   help="search folders' subfolders too (not hidden ones, links to folders or the output folder); "
                        "with -o the subfolders are mirrored there, else outputs go beside each input")
    model_options(p, None, "512 on CPU/MPS; on CUDA by free memory")
    p.add_argument("--batch-size", type=int, default=4, help="tiles per forward pass (default: 4)")
    p.add_argument("--half", action="store_true",
                   help="bfloat16 (fp16 where bf16 is unsupported): faster on recent GPUs and AVX512-BF16 CPUs, "
                        "within 1/255 mean of fp32")
    p.add_argument("--format", choices=["png", "jpg", "webp", "tif"],
                   help="format of outputs written beside the inputs or into a folder (default: png); a single output "
                        "file's suffix chooses its own")
    p.add_argument("--quality", type=int, metavar="N",
                   help="JPEG and WebP quality, 1-100 (default: 95; both stay lossy at 100); refused for PNG and TIFF")
    p.add_argument("--skip-existing", action="store_true",
                   help="leave the photos whose output file is already there (an interrupted batch, run again, goes "
                        "on where it stopped; an empty file is derained again) (default: replace outputs)")
    p.set_defaults(func=cmd_derain)

    p = sub.add_parser("evaluate", help="PSNR/SSIM as the paper's MATLAB scripts compute them")
    p.add_argument("--pred", help="folder of predictions to score against --gt, or against --data's clean images")
    p.add_argument("--gt", help="folder of ground-truth images")
    p.add_argument("--data", help="paired dataset to run the model on; with --pred, whose clean images to score "
                                  "predictions saved by --save against (any layout)")
    p.add_argument("--layout", help="force the dataset layout (input_target, prenet, ddn, jorder, did)")
    p.add_argument("--protocol", default="rain200", choices=["rain200", "did_ddn"],
                   help="rain200: Rain200L/H, SPA-Data; did_ddn: DID-Data, DDN-Data (default: rain200)")
    p.add_argument("--save", help="with --data: save the 8-bit PNG predictions here")
    p.add_argument("--json", help="write the scores as JSON")
    p.add_argument("--csv", help="write per-image scores as CSV")
    p.add_argument("--per-image", action="store_true", help="print a row per image")
    model_options(p, 0, "0; the paper's test script cuts 256x256 windows with hard seams instead: "
                        "--released-windows")
    p.add_argument("--released-windows", action="store_true",
                   help="with --data: run the model as the released test script does, on 256x256 windows with "
                        "hard seams, to score as the paper's figures were made (sides under 256 are refused)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("train", help="train with a YAML config (works under torchrun)")
    p.add_argument("config", help="YAML experiment file (the source tree's configs/ has examples)")
    p.add_argument("--out", required=True, help="run folder: checkpoints, logs, final weights")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--resume", nargs="?", const=True, help="resume from OUT/last.pt or the given checkpoint")
    existing.add_argument("--overwrite", action="store_true",
                          help="start afresh in an OUT that holds an earlier run, replacing it (default: refuse)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bar: a line every log_every iterations instead (for a log file)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("synth", help="render rain onto clean photos: a paired dataset on disk")
    p.add_argument("clean", help="folder of clean photos")
    p.add_argument("out", help="output folder (input/ and target/ are created)")
    p.add_argument("--preset", default="light", help="light, medium or heavy (default: light)")
    p.add_argument("--count", type=int, default=1, help="rainy versions per clean photo (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="the same seed renders the same rain (default: 0)")
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace outputs that exist (default: refuse)")
    existing.add_argument("--resume", action="store_true",
                          help="continue an earlier run with the same options (after a failure or Ctrl-C): keep the "
                               "pairs whose input/ and target/ files both exist, make the rest")
    p.add_argument("--streaks", help="Garg & Nayar streak database folder (optional; its images are all read "
                                     "before the first pair is written)")
    p.add_argument("--size", type=int, help="random square crops of this size; smaller photos are upscaled to cover "
                                            "it (no more pixels than a photo may have: NERDRAIN_MAX_PIXELS)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("demo", help="rain on a sample photo, derained, side by side, with scores")
    p.add_argument("-o", "--output", default="nerdrain-demo",
                   help="output folder (default: nerdrain-demo); its rainy.png, derained.png, clean.png and "
                        "comparison.png are replaced, nothing else there is touched")
    weights_option(p)
    device_option(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("convert", help="convert checkpoints: authors' .pth <-> our .safetensors")
    p.add_argument("input", help="checkpoint: the authors' .pth, a bare state dict, or ours")
    p.add_argument("output", help="our .safetensors (weights + config), or with --to-official the authors' format")
    p.add_argument("--to-official", action="store_true",
                   help="write the authors' key names: a .pth their scripts load, or a bare .safetensors")
    p.add_argument("--dtype", default="same", choices=["same", "float32", "float16", "bfloat16"],
                   help="precision of the written weights (default: same as the input's)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("models", help="list the model variants")
    p.set_defaults(func=cmd_models)
    return parser


class _Terminated(KeyboardInterrupt):
    """SIGTERM as an interrupt, so that it unwinds like Ctrl-C: temporary files removed, no
    partial outputs (training stops at an iteration boundary instead: ``training.StopSignals``)."""

    signum = signal.SIGTERM


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A fast path that falls back says so in one line, like the other reports."""
    from .accel import FastPathWarning

    if issubclass(category, FastPathWarning):
        print(f"warning: {message}", file=sys.stderr if file is None else file)
    else:
        _show_warning(message, category, filename, lineno, file, line)


_show_warning = warnings.showwarning


def _reader_gone() -> int:
    """The output's reader went away (``nerd-rain evaluate ... | head -1``): stop quietly, as
    command-line tools do, with the shell's status for SIGPIPE; what is still buffered for the
    closed pipe goes nowhere (else the interpreter's last flush would complain)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is no file (replaced by a caller): nothing to silence
        pass
    return 128 + getattr(signal, "SIGPIPE", 13)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        with contextlib.redirect_stderr(io.StringIO()) if _not_first_on_machine() else contextlib.nullcontext():
            args = parser.parse_args(argv)
    except SystemExit as stop:
        if stop.code and _not_first_on_machine():  # a bad command line: the first process said what is wrong
            return _leave_the_report()
        raise
    on_term = args.func is not cmd_train and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if on_term else None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_line
            code = args.func(args)
        sys.stdout.flush()  # a reader gone (| head) found here, not in the interpreter's last flush
        return code
    except BrokenPipeError:
        return _reader_gone()
    except (ValueError, OSError) as err:  # CheckpointError, ImageReadError and bad configs are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print("interrupted", file=sys.stderr)
        return 128 + getattr(err, "signum", signal.SIGINT)  # the shell's convention: 130, or 143 for SIGTERM
    finally:
        if on_term:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())

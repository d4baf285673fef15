"""Training with the paper's recipe, from a laptop CPU to many GPUs under ``torchrun`` (DDP).

Resumable exactly: a checkpoint holds model, optimiser, scheduler, EMA, RNG states and the
iteration, and the data stream is a pure function of (seed, sample number), so training 2 + 2
iterations gives the same weights as 4. Ctrl-C, SIGTERM or SIGUSR1 (a cluster's preemption) stops a
run after the current iteration with a checkpoint of it (:class:`TrainingInterrupted`). A loss that
is not finite stops it before the ruined state is logged or saved (:class:`TrainingDiverged`).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .accel import FastPathWarning
from .checkpoint import TORCH_MAGIC, CheckpointError, load_default_model, load_model, save_model, torch_load
from .config import ConfigError, TrainConfig, to_dict
from .data.augment import AugmentConfig
from .data.checked import CHECKED_FILES, CheckedFiles
from .data.datasets import DecodedImages, PairedSource, StreamSampler, SyntheticSource, TrainingStream, file_problems
from .data.pairs import find_pairs, shortened
from .devices import resolve_device
from .evaluate import EvalReport, IncompleteEvaluation, evaluate_pairs, scoring_problems
from .files import atomic_write, remove_stale_temporaries, same_file
from .losses import NeRDRainLoss
from .models import NeRDRain, create_model

LAST = "last.pt"
FINAL = "final.safetensors"
BEST = "best.safetensors"
RUN_FILES = (LAST, FINAL, BEST)  # what a run writes besides config.yaml and tb/


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _changed_keys(old: dict, new: dict, ignore: set[str], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts (``ignore``: dotted keys)."""
    changed = []
    for key in sorted(set(old) | set(new)):
        if f"{prefix}{key}" in ignore:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, ignore, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changed


def _uses_cuda(device_pref: str) -> bool:
    return torch.cuda.is_available() and device_pref in ("auto", "cuda")


def join_process_group(device_pref: str) -> DistInfo:
    """Join the process group ``torchrun`` describes in the environment (``LOCAL_RANK`` etc.)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if _uses_cuda(device_pref) else "gloo")
    return DistInfo(dist.get_rank() if world_size > 1 else 0, world_size, local_rank)


def training_device(device_pref: str, info: DistInfo) -> torch.device:
    """This process's device: under ``torchrun`` on GPUs, the one of its local rank."""
    if device_pref not in ("auto", "cpu"):
        resolve_device(device_pref)  # one line for a device this machine lacks
    if _uses_cuda(device_pref):
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu" if device_pref == "auto" else device_pref)


class ReportedElsewhere(RuntimeError):
    """Setting up the run failed, and another process of the job reports why: under ``torchrun``
    an error that every process meets alike (a bad folder, a model that does not build) is
    reported by the first of them only, not once per process."""


class UnusableFiles(ValueError):
    """Training or validation files the start's check refused. Under ``torchrun`` each process
    checks its share, and the processes' lists are joined into one error (see
    :meth:`Trainer._errors_reported_once`): one line naming them all, not one per process."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(f"{len(problems)} training or validation file(s) cannot be used (found before training; "
                         f"data.check_files: false skips this check): {shortened(problems, '; ')}")


class TrainingDiverged(ValueError):
    """The loss or the weights stopped being finite. Found at the next log, validation or
    checkpoint, before it: no checkpoint or best weights of the ruined state are written."""


def build_model(cfg: TrainConfig) -> NeRDRain:
    """The config's network, checked by a forward pass on a 16x16 input (milliseconds, no
    randomness drawn), so that overrides that cannot work fail now, in one line naming them."""
    try:
        model = create_model(cfg.model.name, **cfg.model.overrides)
        with torch.no_grad():
            model.forward_all(torch.zeros(1, 3, 16, 16))
    except Exception as err:  # noqa: BLE001 - whatever fails in building or running it, the config is why
        raise ConfigError(f"config.model: {cfg.model.name} with overrides {cfg.model.overrides} does not build "
                          f"({' '.join(str(err).split())[:200]})") from None
    return model


def load_training_checkpoint(path: Path, device: torch.device) -> dict:
    """A ``last.pt`` of ``nerd-rain train`` (tensors and plain containers only), or one line saying
    why not."""
    with path.open("rb") as f:
        torch_file = f.read(4).startswith(TORCH_MAGIC)
    state = torch_load(path, device, "training checkpoint") if torch_file else None
    if not isinstance(state, dict) or not {"iteration", "model", "optimizer"} <= set(state):
        raise CheckpointError(f"{path}: not a training checkpoint of nerd-rain train (weights to start from "
                              "go in model.weights; --resume takes RUN/last.pt)")
    return state


def build_stream(cfg: TrainConfig) -> TrainingStream:
    sources = []
    cache = DecodedImages(cfg.data.cache_mb * 2**20)  # one budget for all sources, per process
    for source in cfg.data.sources:
        if source.kind == "paired":
            sources.append(PairedSource(source.root, source.layout, cache))
        else:  # "synthetic" (the config allows no other kind)
            sources.append(SyntheticSource(source.root, source.presets, source.streak_dir, cache))
    augment = AugmentConfig(patch_size=cfg.data.patch_size, flips=cfg.data.flips,
                            saturation_prob=cfg.data.saturation_prob)
    return TrainingStream(sources, [s.weight for s in cfg.data.sources], augment, cfg.seed)


def lr_at(iteration: int, cfg: TrainConfig) -> float:
    """Learning rate of the optimiser step that follows ``iteration`` completed steps.

    Linear warm-up over ``warmup_iters`` steps from ``lr / warmup`` (step ``k`` uses
    ``lr * (1/w + (1 - 1/w) * k / w)``), then cosine from ``lr`` down to ``min_lr`` over the
    remaining ``iterations - warmup_iters`` steps, held at ``min_lr`` after that.

    A closed form of (iteration, config): resuming needs only the iteration, and resuming with a
    longer ``iterations`` re-plans the cosine for the new length.
    """
    lr, warmup = cfg.optim.lr, cfg.optim.warmup_iters
    if iteration < warmup:
        start = 1.0 / warmup
        return lr * (start + (1.0 - start) * iteration / warmup)
    span = max(1, cfg.iterations - max(warmup, 0))
    t = min(iteration - max(warmup, 0), span)
    return cfg.optim.min_lr + (lr - cfg.optim.min_lr) * (1.0 + math.cos(math.pi * t / span)) / 2.0


def adam_settings(cfg: TrainConfig) -> dict:
    """Adam's hyperparameters besides the learning rate, as the config sets them."""
    o = cfg.optim
    return dict(betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def build_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Adam:
    """Adam, with the fused kernel where this PyTorch has one for the parameters' device.

    Fused: one kernel for all parameters instead of a sequence of multi-tensor ops; on the 2-core
    CPU the step of NeRD-Rain took 21-25 ms instead of 77-95 (NeRD-Rain-S: 15 instead of 38).
    The same update up to float rounding; without a fused kernel (older PyTorch, other devices) the
    default implementation runs.
    """
    kwargs = dict(lr=cfg.optim.lr, **adam_settings(cfg))
    try:
        return torch.optim.Adam(params, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):  # no fused kernel here
        return torch.optim.Adam(params, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to ``min_lr`` over the remaining iterations (:func:`lr_at`)."""
    base = cfg.optim.lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_at(it, cfg) / base if base else 0.0)


def atomic_save(obj: dict, path: Path) -> None:
    """``torch.save`` that never leaves half a checkpoint (:func:`nerdrain.files.atomic_write`)."""
    with atomic_write(path) as f:
        torch.save(obj, f)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by a signal after finishing an iteration and checkpointing it.

    A ``KeyboardInterrupt``, so that ``except Exception`` does not swallow it; ``--resume``
    continues exactly where it stopped.
    """

    def __init__(self, signum: int, iteration: int, iterations: int, checkpoint: Path):
        super().__init__(f"interrupted by {signal.Signals(signum).name} at iteration {iteration} of {iterations}: "
                         f"checkpoint {checkpoint}; continue with --resume")
        self.signum, self.iteration, self.checkpoint = signum, iteration, checkpoint


class SetUpInterrupted(KeyboardInterrupt):
    """A stop signal (SIGTERM, SIGUSR1) during a run's set-up: no iteration to finish, it ends like
    Ctrl-C (exit code 128 + ``signum`` from the CLI), with the files checked so far recorded."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name} before training started")
        self.signum = signum


@contextmanager
def _stop_signals_interrupt() -> Iterator[None]:
    """While setting up (the start's check of a large set takes minutes), a stop signal other than
    Ctrl-C, which interrupts already, raises :class:`SetUpInterrupted` instead of ending the process."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise SetUpInterrupted(signum)

    others = [signum for signum in StopSignals.SIGNALS if signum != signal.SIGINT]
    previous = {signum: signal.signal(signum, interrupt) for signum in others}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class StopSignals:
    """While active (main thread only): SIGINT, SIGTERM and SIGUSR1 ask the loop to stop after the
    iteration.

    A second SIGINT a second or more after the first aborts at once (``KeyboardInterrupt``, no
    checkpoint); sooner, it is the same request again (``torchrun`` forwards the terminal's Ctrl-C
    to its workers, which already had it).

    Python runs signal handlers between operations, so during one long operation (seconds, for a
    CPU convolution on a large patch) the handler waits, and repeats of a signal merge into one. A
    watcher thread therefore sees each signal as it arrives (``signal.set_wakeup_fd``); if a second
    SIGINT finds the handler still waiting a second later, it ends the process with exit code 130
    (a checkpoint being written then leaves a hidden temporary file, removed when the run resumes;
    the previous checkpoint is intact).
    """

    # SIGUSR1: what SLURM's --signal=USR1@SECONDS sends ahead of a time limit or preemption, whose
    # default action would end the process at once, without a checkpoint
    SIGNALS = (signal.SIGINT, signal.SIGTERM, *((signal.SIGUSR1,) if hasattr(signal, "SIGUSR1") else ()))

    def __init__(self, announce: bool = True, clock: Callable[[], float] = time.monotonic):
        self.received: int | None = None
        self.announce = announce
        self.clock = clock
        self._at = 0.0
        self._handled_at = -math.inf  # time.monotonic() of the handler's latest run, for the watcher
        self._previous: dict[int, object] = {}
        self._watcher: threading.Thread | None = None
        self._exited = threading.Event()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        read_end, self._wake = os.pipe()
        try:
            os.set_blocking(self._wake, False)
            self._previous_wakeup = signal.set_wakeup_fd(self._wake, warn_on_full_buffer=False)
        except (ValueError, OSError):  # Windows wants a socket here: no watcher, handlers only
            os.close(read_end)
            os.close(self._wake)
            return self
        self._watcher = threading.Thread(target=self._watch, args=(read_end,), name="stop-signals", daemon=True)
        self._watcher.start()
        return self

    def __exit__(self, *exc) -> None:
        self._exited.set()
        try:  # the handlers first: a signal from here on is the caller's again
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
            self._previous.clear()
        finally:
            if self._watcher is not None:
                signal.set_wakeup_fd(self._previous_wakeup)
                try:
                    os.write(self._wake, b"\0")  # no signal is 0: the watcher's cue to end
                except OSError:  # it has ended already (and closed its end)
                    pass
                os.close(self._wake)
                self._watcher.join(timeout=5)
                self._watcher = None

    def _watch(self, read_end: int) -> None:
        # Every signal with a Python handler writes its number here (SIGCHLD too, once a DataLoader
        # has workers): only ours count.
        first = None
        try:
            while True:
                for signum in os.read(read_end, 64):
                    if signum == 0:
                        return
                    if signum not in self.SIGNALS:
                        continue
                    arrived = time.monotonic()
                    if first is None:
                        first = arrived
                    elif signum == signal.SIGINT and arrived - first >= 1.0:
                        # Python's handler decides, if it runs within a second; if it is stuck
                        # behind a long operation, the abort is done here.
                        if self._exited.wait(1.0):
                            return
                        if self._handled_at < arrived:
                            sys.stderr.write("SIGINT again: aborting without a checkpoint\n")
                            sys.stderr.flush()
                            os._exit(128 + signal.SIGINT)
        finally:
            os.close(read_end)

    def _handle(self, signum: int, frame) -> None:
        self._handled_at = time.monotonic()
        now = self.clock()
        if self.received is not None:
            if signum == signal.SIGINT and now - self._at >= 1.0:
                raise KeyboardInterrupt
            return
        self.received, self._at = signum, now
        if self.announce:
            tqdm.write(f"{signal.Signals(signum).name}: stopping after this iteration, with a checkpoint "
                       "(Ctrl-C again to abort without one)")


# Errors a data worker meets in the data (unreadable, truncated, missing files): one line for the
# user. Anything else from a worker is a bug, and keeps its traceback.
_DATA_ERRORS = ("ValueError", "OSError", "ImageReadError", "UnidentifiedImageError", "FileNotFoundError",
                "PermissionError", "EOFError", "SyntaxError")


def _next_batch(batches: Iterator):
    try:
        return next(batches)
    except Exception as err:  # noqa: BLE001 - only a data worker's data error is rewritten
        lines = str(err).strip().splitlines()
        caught = re.match(r"Caught (\w+) in DataLoader worker", lines[0]) if lines else None
        if caught and caught[1] in _DATA_ERRORS:  # the worker's traceback, re-raised by DataLoader
            raise ValueError(f"training data: {lines[-1]}") from None
        raise


def _lost_a_process(err: RuntimeError) -> bool:
    """Whether a collective failed because another process of the job ended: gloo (DDP on CPUs, and
    the host-side vote under NCCL) finds its connection closed. A backend's own fault (a CUDA error
    under NCCL, say) is this process's news and keeps its message."""
    return isinstance(err, dist.DistNetworkError) or re.search(r"Connection (closed|reset) by peer", str(err)) is not None


# Data workers hand their batches over through Unix sockets that multiprocessing makes in
# TMPDIR/pymp-XXXXXXXX/listener-XXXXXXXX. A path past the system's limit (sun_path holds 108 bytes
# on Linux, 104 on macOS, with the closing NUL) fails inside the worker, and the run waited forever
# for its first batch.
_SOCKET_PATH_LIMIT = 103 if sys.platform == "darwin" else 107
_WORKER_SOCKET_TAIL = len("/pymp-12345678/listener-12345678")


def max_temp_dir_for_workers() -> int:
    """The longest temporary folder (in bytes) whose data workers' sockets the system accepts."""
    return _SOCKET_PATH_LIMIT - _WORKER_SOCKET_TAIL


def _check_temp_dir_for_workers(num_workers: int) -> None:
    if num_workers == 0 or not hasattr(socket, "AF_UNIX"):
        return
    folder = tempfile.gettempdir()
    if len(os.fsencode(folder)) > max_temp_dir_for_workers():
        raise ConfigError(f"data.num_workers: the temporary folder {folder} is too long a path for the sockets "
                          f"data workers pass batches through ({len(os.fsencode(folder))} bytes, at most "
                          f"{max_temp_dir_for_workers()}): set TMPDIR to a shorter folder (TMPDIR=/tmp) "
                          "or data.num_workers to 0")


def _ignore_stop_signals(worker_id: int) -> None:
    """Data workers leave the stop signals (Ctrl-C, SIGTERM, SIGUSR1) to the training process, which stops them itself;
    on their own they would exit and the loader would fail the run mid-iteration."""
    for signum in StopSignals.SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _start_process_helpers(workers: bool) -> None:
    """Under spawn and forkserver (macOS's way, and Linux's from Python 3.14) multiprocessing runs a
    resource tracker, and a fork server, in the run's process group, started by the first progress
    bar (tqdm's lock) or data worker, with no handler for SIGUSR1: a preemption signal to the group
    killed the tracker, which left a warning of leaked semaphores and a traceback for each. Started
    here with the stop signals held back, they inherit that and never see them; the signals that
    arrive meanwhile wait, and are handled once let through. ``workers``: data workers will start
    (the fork server is theirs)."""
    method = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    if method == "fork" or not hasattr(signal, "pthread_sigmask"):  # no helpers (Windows: nor SIGUSR1)
        return
    from multiprocessing import forkserver, resource_tracker  # POSIX's
    held = signal.pthread_sigmask(signal.SIG_BLOCK, StopSignals.SIGNALS)
    try:
        resource_tracker.ensure_running()
        if method == "forkserver" and workers:
            forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


class AllOutputs(nn.Module):
    """Routes ``forward`` to ``forward_all``, so DDP's hooks and ``torch.compile`` see training calls."""

    def __init__(self, model: NeRDRain):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        return self.model.forward_all(x)


class WeightEMA(AveragedModel):
    """Exponential moving average of the weights and buffers, exactly as ``AveragedModel`` with
    ``get_ema_multi_avg_fn`` computes it (same state dict, so checkpoints load either way).

    The library's update copies its step counter from the CPU to the device at every step, and a
    blocking copy to a GPU waits for all queued work: the GPU would idle while the host launches the
    next step. Here the counter stays on the host and the update only queues kernels.
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        averaged = [*self.module.parameters(), *self.module.buffers()]
        current = [*model.parameters(), *model.buffers()]
        if len({(t.device, t.dtype) for t in averaged}) > 1 or not all(t.is_floating_point() for t in averaged):
            return super().update_parameters(model)  # mixed tensors: the library's grouping (and its sync)
        if self.n_averaged.item() == 0:  # a CPU tensor: no device sync
            for mean, value in zip(averaged, current, strict=True):
                mean.copy_(value)
        else:
            self.multi_avg_fn(averaged, current, self.n_averaged)  # the EMA's lerp ignores the count
        self.n_averaged += 1


class CudaGraphStep:
    """A step's forward, loss, backward and clipping, captured once as a CUDA graph and replayed.

    Launched one by one, the thousands of small kernels of a NeRD-Rain forward and backward keep the
    GPU waiting on the CPU; a replay launches them all at once (on an H200, ``bench_train.py``'s
    step in one graph ran NeRD-Rain at batch 8 in 313 ms against the released code's 702). Each
    batch is copied into the graph's static inputs; the gradients and loss terms it computes live
    in its static outputs (``p.grad`` points at them). The optimiser step, the schedule and the EMA
    stay outside, eager, so the learning rate stays a plain float and nothing is stepped during
    the warm-up.
    """

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]],
                 optimizer: torch.optim.Optimizer, rainy: torch.Tensor, clean: torch.Tensor, warmup: int = 3):
        self.rainy, self.clean = rainy.clone(), clean.clone()
        device = rainy.device
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
            for _ in range(warmup):
                optimizer.zero_grad(set_to_none=True)
                fn(self.rainy, self.clean)
        torch.cuda.current_stream(device).wait_stream(stream)
        optimizer.zero_grad(set_to_none=True)  # the captured backward allocates them in the graph's pool
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.parts = fn(self.rainy, self.clean)

    def __call__(self, rainy: torch.Tensor, clean: torch.Tensor) -> dict[str, torch.Tensor]:
        self.rainy.copy_(rainy, non_blocking=True)
        self.clean.copy_(clean, non_blocking=True)
        self.graph.replay()
        return self.parts


class Trainer:
    """One training run in ``out_dir``.

    ``resume``: ``True`` continues from ``out_dir/last.pt`` where it exists (else starts from
    scratch); a path continues from that checkpoint, which must exist. A resumed run does not read
    ``model.weights``: the checkpoint replaces them, and the file may be gone by then.
    Without ``resume``, a folder holding an earlier run's outputs is refused unless ``overwrite``
    (which removes them when training starts).
    """

    def __init__(self, cfg: TrainConfig, out_dir: str | Path, progress: bool = True,
                 resume: bool | str | Path = False, overwrite: bool = False):
        if resume and overwrite:
            raise ValueError("resume (--resume) continues the run in out_dir, overwrite (--overwrite) replaces it: "
                             "choose one")
        _start_process_helpers(cfg.data.num_workers > 0)  # before the first progress bar
        self.cfg = cfg
        self.out = Path(out_dir)
        self.overwrite = overwrite
        self.dist = join_process_group(cfg.device)
        self.progress = progress and self.dist.is_main
        # Collectives on the host (gloo): the setup's error exchange, and the per-iteration
        # stop-signal vote, which under NCCL would read a GPU tensor back, a sync that keeps the
        # host from queuing the next step ahead.
        self.control_group = (dist.new_group(backend="gloo")
                              if self.dist.world_size > 1 and dist.get_backend() != "gloo" else None)
        try:
            with self._errors_reported_once():
                self._set_up(resume)
        except BaseException as err:  # Ctrl-C or a stop signal (see train) too: the check read files worth keeping
            self._record_check_of_a_failed_start(err)
            raise
        self._note_unchanged_files()

        wrapped: nn.Module = AllOutputs(self.model)
        if self.dist.world_size > 1:  # wrap AllOutputs, not the model: DDP must see the training forward
            # Depthwise-conv weight grads differ from their bucket views only in the stride of a
            # size-1 dim; DDP copies them correctly but warns on every rank.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            wrapped = DistributedDataParallel(
                wrapped, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.step_model = torch.compile(wrapped) if cfg.compile else wrapped
        self.graph_step: CudaGraphStep | None = None
        self.use_graphs = cfg.cuda_graphs and self._graphs_possible()
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolutions once

    def _set_up(self, resume: bool | str | Path) -> None:
        """Everything that may fail for a reason in the config, the files or the machine."""
        cfg = self.cfg
        self.resumed_from = self._checkpoint_to_resume(resume)
        # Another run's checkpoint continues here: in a folder holding a run, it would replace that one.
        elsewhere = self.resumed_from is not None and not same_file(self.resumed_from, self.out / LAST)
        if (not resume or elsewhere) and not self.overwrite and (earlier := self._earlier_outputs()):
            names = dict.fromkeys("TensorBoard logs" if p.parent.name == "tb" else p.name for p in earlier)
            what_to_do = (f"--resume {self.resumed_from} would replace it; resume that run in another --out, or "
                          "this one with --resume" if elsewhere else
                          "continue it with --resume, replace it with --overwrite, or choose another --out")
            raise FileExistsError(f"{self.out} holds an earlier run ({', '.join(names)}): {what_to_do}")
        self.device = training_device(cfg.device, self.dist)
        # Listed on every process, so that a bad folder stops all of them here, not rank 0 alone.
        self.val_pairs = find_pairs(cfg.val.root)[: cfg.val.max_images] if cfg.val.root else []
        self.stream = build_stream(cfg)
        self.checked_files: CheckedFiles | None = None
        if cfg.data.check_files:
            self._check_files()
        torch.manual_seed(cfg.seed)  # identical initial weights in every process
        self.model: NeRDRain = build_model(cfg)
        if cfg.model.weights and self.resumed_from is None:
            self.model.load_state_dict(self._initial_weights(cfg.model.weights))
        self.model = self.model.to(self.device)
        self.model.set_activation_checkpointing(cfg.activation_checkpointing)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(params, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.ema = WeightEMA(self.model, cfg.ema_decay) if cfg.ema_decay else None
        self.loss = NeRDRainLoss(**vars(cfg.loss))
        self.iteration = 0
        self.samples = 0  # of the data stream read so far, all processes together: where it goes on
        self.best_psnr = -math.inf
        self._nonfinite_at: torch.Tensor | None = None  # see _watch_loss
        self._nonfinite_loss: torch.Tensor | None = None
        if self.resumed_from is not None:
            self.load_state_dict(load_training_checkpoint(self.resumed_from, self.device))

    def _check_files(self) -> None:
        """Read every training and validation file now, each process its share: a bad one would
        otherwise stop the run when first drawn, hours in maybe (the training files are checked
        without decoding PNGs, see :func:`nerdrain.data.datasets.file_problems`). Files the run
        folder's record (:mod:`nerdrain.data.checked`) holds as good and unchanged are not read
        again: a resume takes seconds, not the minutes of a large set. The record is written when
        training starts (or the start fails), once every process has read it."""
        rank, world = self.dist.rank, self.dist.world_size
        self.checked_files = CheckedFiles(self.out / CHECKED_FILES, rank)
        problems = (file_problems(self.stream.sources, rank, world, self.progress, self.checked_files)
                    + scoring_problems(self.val_pairs[rank::world], self.cfg.val.protocol, self.checked_files))
        if problems:
            raise UnusableFiles(problems)

    def _note_unchanged_files(self) -> None:
        """Say how many files the check let pass unread, unchanged since the recorded one: a resume's
        start in seconds is then told from a check that did nothing (all processes' shares counted)."""
        if self.checked_files is None:
            return
        counts = torch.tensor([self.checked_files.unchanged, self.checked_files.files])
        if self.dist.world_size > 1:
            dist.all_reduce(counts, group=self.control_group)
        unchanged, files = counts.tolist()
        if unchanged and self.dist.is_main:
            tqdm.write(f"note: {unchanged} of {files} training and validation files not read again: unchanged "
                       f"since the last check (recorded in {self.out / CHECKED_FILES})")

    def _record_check_of_a_failed_start(self, err: BaseException) -> None:
        """Where a start that checked the files fails (bad files, say), record what passed, so that
        the next start reads only the files fixed. Where the run folder does not exist yet, only if
        the files or an interruption stopped the start: the folder then holds the record alone (no
        earlier run: a start without --resume may use it); another error (a config refused) leaves
        no folder behind. After the processes' exchange of errors: every process has read the
        record by then."""
        checked = getattr(self, "checked_files", None)
        over_the_files = (isinstance(err, (UnusableFiles, KeyboardInterrupt))
                          or isinstance(err.__cause__, UnusableFiles))  # another process's, under DDP
        if checked is not None and (self.out.is_dir() or (checked.passed and over_the_files)):
            with suppress(OSError):  # the start's own error is the one to tell
                checked.save(self.dist.world_size)

    @contextmanager
    def _errors_reported_once(self) -> Iterator[None]:
        """Run a setup step on every process; under DDP, each then learns whether any failed.

        Of the processes that failed with the same message, the lowest rank raises its error and
        the others, and those that did not fail, raise :class:`ReportedElsewhere` (which the CLI
        leaves unprinted): one line for an error all meet alike, one per process for those that
        differ. Where every process that failed found bad files in its share of the data
        (:class:`UnusableFiles`), their lists are joined, and reported as one error. Left alone, a
        process that failed would exit and those that did not would wait in their next collective
        until ``torchrun`` ends them.
        """
        error: Exception | None = None
        try:
            yield
        except Exception as err:  # noqa: BLE001 - exchanged, then raised again below
            error = err
        if self.dist.world_size > 1:
            # A list of bad files is sent as a list, to be joined; other errors as their message.
            sent = error.problems if isinstance(error, UnusableFiles) else None if error is None else str(error)
            received: list[str | list[str] | None] = [None] * self.dist.world_size
            dist.all_gather_object(received, sent, group=self.control_group)
            failed = [rank for rank, message in enumerate(received) if message is not None]
            joined = None
            if failed and all(isinstance(received[rank], list) for rank in failed):
                joined = UnusableFiles([problem for rank in failed for problem in received[rank]])
                error = None if error is None else joined
                messages = [None if message is None else str(joined) for message in received]
            else:
                messages = [str(UnusableFiles(m)) if isinstance(m, list) else m for m in received]
            if error is not None and messages.index(str(error)) != self.dist.rank:
                raise ReportedElsewhere(f"process {messages.index(str(error))} reports it: {error}") from error
            if error is None and failed:
                raise ReportedElsewhere(f"process {failed[0]} failed: {messages[failed[0]]}") from joined
        if error is not None:
            raise error

    def _graphs_possible(self) -> bool:
        why = ("they need a CUDA device" if self.device.type != "cuda" else
               "DDP's gradient all-reduce is not captured" if self.dist.world_size > 1 else None)
        if why is not None and self.dist.is_main:  # the same on every process: said once
            warnings.warn(f"cuda_graphs: {why}; training without them", FastPathWarning, stacklevel=3)
        return why is None

    def _checkpoint_to_resume(self, resume: bool | str | Path) -> Path | None:
        if not resume:
            return None
        if resume is True:
            path = self.out / LAST
            return path if path.is_file() else None
        path = Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"--resume: checkpoint {path} not found")
        return path

    def _earlier_outputs(self) -> list[Path]:
        """What a fresh run here would overwrite (or, for TensorBoard, mix its logs with)."""
        return [p for p in (*(self.out / n for n in RUN_FILES), *self.out.glob("tb/events.out.tfevents.*"))
                if p.exists()]

    def _initial_weights(self, source: str) -> dict[str, torch.Tensor]:
        start = load_default_model() if source == "default" else load_model(source)
        weights = start.state_dict()
        # Compared by shapes, not configs: the FFN factor read off an authors' file is one of many
        # that build the same tensors, and heads or FFN width of a level without blocks build none.
        if {k: v.shape for k, v in weights.items()} != {k: v.shape for k, v in self.model.state_dict().items()}:
            raise ConfigError(f"model.weights: {source} holds {start.cfg}, but the config builds "
                              f"{self.model.cfg}; set model.name/overrides to match")
        return weights

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        state = {
            "iteration": self.iteration,
            "samples": self.samples,
            "world_size": self.dist.world_size,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "best_psnr": self.best_psnr,
            "config": yaml.safe_dump(to_dict(self.cfg)),
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.device.type == "cuda":  # this process's device only: touching the others makes contexts there
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict) -> None:
        saved = yaml.safe_load(state["config"]) if isinstance(state.get("config"), str) else None
        current = to_dict(self.cfg)
        network = ("name", "overrides")
        if saved is not None and any(saved["model"].get(k) != current["model"][k] for k in network):
            trained, builds = saved["model"], current["model"]
            raise CheckpointError(f"{self.resumed_from}: trained as {trained.get('name')} with overrides "
                                  f"{trained.get('overrides')}, but the config builds {builds['name']} with "
                                  f"{builds['overrides']}; resume with the config it was trained with")
        self.iteration = int(state["iteration"])
        if self.iteration > self.cfg.iterations:  # its weights are past what the config asks for
            raise CheckpointError(f"{self.resumed_from}: the run is at iteration {self.iteration}, past iterations "
                                  f"({self.cfg.iterations}); set iterations to {self.iteration} or more to continue "
                                  "it (last.pt can be used as weights as it is)")
        self.samples = int(state.get("samples", self.iteration * self.cfg.data.batch_size * self.dist.world_size))
        if saved is not None and self.dist.is_main:
            # Length, validation, logging, the device and what a step costs (not what it computes, up
            # to rounding) may change freely; anything else makes the resumed run differ from an
            # uninterrupted one, which deserves a word.
            # The batch counts across processes (older checkpoints do not say how many there were).
            split = {"data.batch_size"} if "world_size" in state else set()
            changed = _changed_keys(saved, current, ignore={"iterations", "val", "log_every", "checkpoint_every",
                                                            "device", "model.weights", "data.num_workers",
                                                            "data.cache_mb", "data.check_files", "compile",
                                                            "channels_last", "activation_checkpointing",
                                                            "cuda_graphs", *split})
            if changed:
                tqdm.write(f"note: resuming with changed settings ({', '.join(changed)}): the run goes on "
                           "differently from one that was never interrupted")
            if split:
                self._note_global_batch(saved["data"]["batch_size"], int(state["world_size"]))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # the saved groups carry the old config's values
            group.update(adam_settings(self.cfg))
        # The schedule is a closed form of the iteration under the *current* config (which may
        # have changed, e.g. a longer run); the saved scheduler state is informational only.
        self.scheduler.base_lrs = [self.cfg.optim.lr for _ in self.optimizer.param_groups]
        self.scheduler.last_epoch = self.iteration
        for group, factor in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas):
            group["initial_lr"] = self.cfg.optim.lr
            group["lr"] = self.cfg.optim.lr * factor(self.iteration)  # exactly what LambdaLR computes
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        self.scheduler._step_count = self.iteration + 1  # as an uninterrupted run's (construction counts one)
        torch.set_rng_state(state["rng_cpu"].cpu())
        self.best_psnr = float(state["best_psnr"])
        scored_on = ("root", "protocol", "max_images")  # what makes two validation scores comparable
        if saved is not None and any(saved.get("val", {}).get(k) != current["val"][k] for k in scored_on):
            self.best_psnr = -math.inf  # a score on another set: the next validation starts the new best
            if self.dist.is_main and math.isfinite(float(state["best_psnr"])) and self.cfg.val.root:
                tqdm.write(f"note: the validation set changed; {BEST} (scored {float(state['best_psnr']):.2f} dB "
                           "on the earlier one) is replaced at the next validation")
        if self.ema is not None:
            if "ema" in state:
                self.ema.load_state_dict(state["ema"])
            else:  # EMA switched on at resume: start averaging from the loaded weights
                self.ema = WeightEMA(self.model, self.cfg.ema_decay)
        if self.device.type == "cuda":
            self._restore_cuda_rng(state.get("rng_cuda"))

    def _restore_cuda_rng(self, saved: torch.Tensor | list | tuple | None) -> None:
        """The saved generator state of this device, if the checkpoint has one. ``torch.load`` maps it
        to the training device, but CUDA takes generator states from CPU byte tensors only; checkpoints
        before stop 19 hold a list, one per visible GPU, whose first is the device of rank 0."""
        if isinstance(saved, (list, tuple)):
            saved = saved[self.device.index or 0] if len(saved) > (self.device.index or 0) else None
        if isinstance(saved, torch.Tensor):
            torch.cuda.set_rng_state(saved.cpu(), self.device)

    def _note_global_batch(self, batch_size: int, world_size: int) -> None:
        """Say so where the resumed run's global batch (per process x processes) differs from the checkpoint's."""
        now = self.cfg.data.batch_size * self.dist.world_size
        if batch_size * world_size != now:
            processes = "process" if world_size == 1 else "processes"
            tqdm.write(f"note: the global batch changes from {batch_size * world_size} ({batch_size} per process x "
                       f"{world_size} {processes}) to {now} ({self.cfg.data.batch_size} x {self.dist.world_size}): "
                       f"the data goes on from sample {self.samples}, and the learning rate follows the iteration "
                       "as before, so the run differs from one that was never interrupted")

    def save(self) -> None:
        if self.dist.is_main:
            atomic_save(self.state_dict(), self.out / LAST)

    @property
    def eval_model(self) -> NeRDRain:
        return self.ema.module if self.ema is not None else self.model

    # -- loop -------------------------------------------------------------------------------

    def validate(self, writer) -> float | None:
        """Score the validation set (every process its share); the main process logs the score and
        keeps the best weights."""
        if not self.val_pairs:
            return None
        return self._record_validation(self._validation_report(), writer)

    def _validation_report(self) -> EvalReport:
        """The scores of all validation pairs, in their order, each process scoring every
        ``world_size``-th from its rank: under DDP a long validation takes 1/W of the time, and no
        process waits out another's whole validation in a collective (whose timeout, 30 minutes by
        default, would end the job). Every process raises, or none does: files that could not be
        scored (:class:`IncompleteEvaluation`), or an error of the model in any process's share."""
        rank, world = self.dist.rank, self.dist.world_size
        model = self.eval_model
        model.eval()
        try:
            # NaN outputs or out of memory in one share: all learn of it, not left in the gather below
            with self._errors_reported_once():
                try:
                    own = evaluate_pairs(model, self.val_pairs[rank::world], self.cfg.val.protocol, self.device)
                except IncompleteEvaluation as err:  # gathered first, so that every process learns of it
                    own = err.report
        finally:
            model.train()
        shares = [(own.images, own.failed)]
        if world > 1:
            shares = [None] * world
            dist.all_gather_object(shares, (own.images, own.failed), group=self.control_group)
        order = {pair.name: i for i, pair in enumerate(self.val_pairs)}
        report = EvalReport(self.cfg.val.protocol)
        report.images = sorted((s for images, _ in shares for s in images), key=lambda s: order[s.name])
        report.failed = [f for _, failed in shares for f in failed]
        if report.failed:
            raise IncompleteEvaluation(report)
        return report

    def _record_validation(self, report: EvalReport, writer) -> float:
        """Keep the best score; the main process logs it and writes the best weights."""
        improved = report.psnr > self.best_psnr
        if improved:
            self.best_psnr = report.psnr
        if not self.dist.is_main:
            return report.psnr
        if writer is not None:
            writer.add_scalar("val/psnr", report.psnr, self.iteration)
            writer.add_scalar("val/ssim", report.ssim, self.iteration)
        if improved:
            save_model(self.eval_model, self.out / BEST, extra_metadata={"iteration": str(self.iteration),
                                                                         "val_psnr": f"{report.psnr:.4f}"})
        tqdm.write(f"iter {self.iteration}: val PSNR {report.psnr:.3f} dB SSIM {report.ssim:.4f} "
                   f"({report.count} images, best {self.best_psnr:.3f})")
        return report.psnr

    def train(self) -> Path:
        cfg = self.cfg
        with self._errors_reported_once():
            self.out.mkdir(parents=True, exist_ok=True)
            if self.dist.is_main:
                remove_stale_temporaries(self.out, [*RUN_FILES, "config.yaml"])  # of a killed run
                for earlier in self._earlier_outputs() if self.overwrite else ():
                    earlier.unlink()
                with atomic_write(self.out / "config.yaml") as f:
                    f.write(yaml.safe_dump(to_dict(cfg)).encode())
            if self.checked_files is not None:
                self.checked_files.save(self.dist.world_size)
            _check_temp_dir_for_workers(cfg.data.num_workers)
            loader = DataLoader(
                self.stream, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers,
                sampler=StreamSampler(cfg.data.batch_size, self.dist.rank, self.dist.world_size, self.samples),
                pin_memory=self.device.type == "cuda", persistent_workers=cfg.data.num_workers > 0,
                worker_init_fn=_ignore_stop_signals,
                # its own generator: starting the iterator must not draw from the global RNG, whose
                # state is checkpointed (samples themselves are a pure function of the sample number)
                generator=torch.Generator().manual_seed(cfg.seed))
            writer = self._writer()
        self.model.train()
        bar = tqdm(total=cfg.iterations, initial=self.iteration, disable=not self.progress, desc="train",
                   dynamic_ncols=True)
        batches = iter(loader)
        try:
            with StopSignals(announce=self.dist.is_main) as signals:
                self._loop(batches, writer, bar, signals)
        except RuntimeError as err:
            if self.dist.world_size > 1 and _lost_a_process(err):  # its own error is the news, not this one's
                raise ConnectionError(f"another process of the job stopped during iteration {self.iteration + 1} "
                                      "(its message says why); this one stops too: continue from the last "
                                      "checkpoint with --resume") from None
            raise
        finally:
            # Stop the data workers now: left to the garbage collector after an error, they outlive
            # it to interpreter exit, where a SIGTERM they ignore is all they would get.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            bar.close()
            if writer is not None:
                writer.close()
        final = self.out / FINAL
        if self.dist.is_main:
            save_model(self.eval_model, final, extra_metadata={"iteration": str(self.iteration)})
        self._barrier()
        return final

    def _loop(self, batches: Iterator, writer, bar, signals: StopSignals) -> None:
        cfg = self.cfg
        started, first_sample = time.perf_counter(), self.samples
        checkpointed = self.iteration  # a fresh run's 0 or the resumed checkpoint's
        while self.iteration < cfg.iterations:
            try:
                batch = _next_batch(batches)
            except Exception:
                self._keep_iterations_done(checkpointed)
                raise
            rainy, clean = (t.to(self.device, non_blocking=True) for t in batch)
            if cfg.channels_last:
                rainy = rainy.contiguous(memory_format=torch.channels_last)
            parts = self._forward_backward_graphed(rainy, clean) if self.use_graphs else None
            if parts is None:
                self.optimizer.zero_grad(set_to_none=True)
                parts = self._forward_backward(rainy, clean)
            self.optimizer.step()
            lr = self.optimizer.param_groups[0]["lr"]  # this step's: the scheduler moves on to the next
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            self.iteration += 1
            self.samples += cfg.data.batch_size * self.dist.world_size
            self._watch_loss(parts["total"])

            logging = self.iteration % cfg.log_every == 0 or self.iteration == cfg.iterations
            validating = cfg.val.root and (self.iteration % cfg.val.every == 0 or self.iteration == cfg.iterations)
            saving = self.iteration % cfg.checkpoint_every == 0 or self.iteration == cfg.iterations
            if logging or validating or saving:  # the same iterations in every process
                self._stop_if_diverged(checkpointed)
            if logging:
                try:
                    self._log(parts, lr, (self.samples - first_sample) / (time.perf_counter() - started), bar, writer)
                except OSError:  # a full disk or quota under the logs (or the job's output file)
                    self._keep_iterations_done(checkpointed)
                    raise
            bar.update(1)
            if validating:
                try:
                    report = self._validation_report()
                except Exception as err:  # every process has it (see _validation_report)
                    self._keep_iterations_done(checkpointed)
                    self._barrier()  # the checkpoint is complete before any process exits
                    if not isinstance(err, IncompleteEvaluation):
                        raise
                    if not self.dist.is_main:  # said once, by the main one
                        raise ReportedElsewhere(f"process 0 reports it: {err}") from None
                    raise ValueError(f"validation: {err}") from None  # names the files; say which set
                try:
                    self._record_validation(report, writer)
                except Exception:  # the main process's alone (writing best.safetensors)
                    self._keep_iterations_done(checkpointed)
                    raise
            if saving:
                self.save()
                checkpointed = self.iteration
            stop = self._stop_signal(signals)
            if stop and self.iteration < cfg.iterations:
                if not saving:
                    self._stop_if_diverged(checkpointed)
                    self.save()
                self._barrier()  # the checkpoint is complete before any process exits
                raise TrainingInterrupted(stop, self.iteration, cfg.iterations, self.out / LAST)

    def _log(self, parts: dict[str, torch.Tensor], lr: float, rate: float, bar, writer) -> None:
        """The loss terms (averaged over the processes), learning rate and speed: on the bar, or a
        line where there is none, and in TensorBoard."""
        logged = self._mean_across_ranks(parts)
        bar.set_postfix(loss=f"{logged['total']:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.2f}")
        if self.dist.is_main and not self.progress:  # no bar (-q, a batch job's log): a line instead
            terms = ", ".join(f"{key} {value:.4g}" for key, value in logged.items() if key != "total")
            tqdm.write(f"iter {self.iteration}/{self.cfg.iterations}: loss {logged['total']:.4g} ({terms}), "
                       f"lr {lr:.2e}, {rate:.3g} samples/s")
        if writer is not None:
            for key, value in logged.items():
                writer.add_scalar(f"train/{key}", value, self.iteration)
            writer.add_scalar("train/lr", lr, self.iteration)
            writer.add_scalar("train/samples_per_s", rate, self.iteration)

    def _keep_iterations_done(self, checkpointed: int) -> None:
        """Before an error found hours in (a bad training or validation file, a log that cannot be
        written): the iterations since the last checkpoint are complete, so checkpoint them. Under
        DDP only where rank 0 hit the error; elsewhere it is blocked in the next collective until
        torchrun ends it. Not where the run diverged since: that is said instead, and the last good
        checkpoint kept."""
        if not self.dist.is_main or self.iteration <= checkpointed:
            return
        diverged = self._divergence(checkpointed, local=True)
        if diverged is not None:
            tqdm.write(f"note: {diverged}", file=sys.stderr)
        else:
            self.save()
            tqdm.write(f"note: iteration {self.iteration} checkpointed in {self.out / LAST}; once the "
                       "error below is dealt with, continue with --resume", file=sys.stderr)

    def _watch_loss(self, total: torch.Tensor) -> None:
        """Keep the first iteration whose loss is not finite, and that loss, on the device: read
        only at the next check (:meth:`_stop_if_diverged`), no sync in every step."""
        total = total.detach().float()
        if self._nonfinite_at is None:
            self._nonfinite_at, self._nonfinite_loss = torch.zeros((), dtype=torch.int64, device=total.device), total
        first = ~torch.isfinite(total) & (self._nonfinite_at == 0)
        self._nonfinite_at = torch.where(first, self.iteration, self._nonfinite_at)
        self._nonfinite_loss = torch.where(first, total, self._nonfinite_loss)

    def _divergence(self, checkpointed: int, local: bool = False) -> str | None:
        """Why the run cannot go on (None: it can): a loss that was not finite, in any process unless
        ``local``, or weights that are not (the same in every process: DDP keeps them equal)."""
        first = (torch.stack([self._nonfinite_at.cpu().double(), self._nonfinite_loss.cpu().double()])
                 if self._nonfinite_at is not None else torch.zeros(2, dtype=torch.float64))
        if self.dist.world_size > 1 and not local:
            shares = [torch.zeros_like(first) for _ in range(self.dist.world_size)]
            dist.all_gather(shares, first, group=self.control_group)
            first = min((share for share in shares if share[0] > 0), key=lambda share: share[0].item(), default=first)
        kept = f"{self.out / LAST} holds iteration {checkpointed}" if checkpointed else "no checkpoint was written"
        advice = (f"training diverged; {kept}: continue with --resume after lowering optim.lr or setting "
                  "optim.grad_clip (the same settings take the same path)")
        if first[0] > 0:
            return f"the loss is {first[1].item()} at iteration {int(first[0])}: {advice}"
        weights = [*self.model.parameters(), *(self.ema.parameters() if self.ema is not None else ())]
        if not torch.stack([w.detach().isfinite().all() for w in weights]).all():
            return (f"the weights are not finite after the step of iteration {self.iteration} (its loss was "
                    f"finite): {advice}")
        return None

    def _stop_if_diverged(self, checkpointed: int) -> None:
        """Stop, every process together, before a ruined state is logged, scored or checkpointed."""
        why = self._divergence(checkpointed)
        if why is not None:
            if not self.dist.is_main:
                raise ReportedElsewhere(f"process 0 reports it: {why}")
            raise TrainingDiverged(why)

    def _forward_backward(self, rainy: torch.Tensor, clean: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms of one batch, gradients accumulated into ``.grad`` and clipped."""
        # No autocast weight-cast cache: each weight is cast once per forward anyway, and the cache
        # must be off under CUDA-graph capture.
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False) if self.cfg.bf16
                    else nullcontext())
        with autocast:
            outputs = self.step_model(rainy)
        loss, parts = self.loss(outputs, clean)
        loss.backward()
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        return parts

    def _forward_backward_graphed(self, rainy: torch.Tensor, clean: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """``_forward_backward`` by replaying its CUDA graph, captured at the first call; ``None``
        (and eager steps from then on) where capture fails."""
        if self.graph_step is None:
            try:
                self.graph_step = CudaGraphStep(self._forward_backward, self.optimizer, rainy, clean)
            except Exception as err:  # noqa: BLE001 - any capture failure: train eagerly
                torch.cuda.synchronize(self.device)
                warnings.warn(f"cuda_graphs: capturing the training step failed ({type(err).__name__}: {err}); "
                              "training without them", FastPathWarning, stacklevel=2)
                self.use_graphs = False
                return None
        return self.graph_step(rainy, clean)

    def _mean_across_ranks(self, parts: dict[str, torch.Tensor]) -> dict[str, float]:
        values = torch.stack([v.float() for v in parts.values()]).to(self.device)
        if self.dist.world_size > 1:
            dist.all_reduce(values)
            values /= self.dist.world_size
        return dict(zip(parts, values.tolist()))

    def _stop_signal(self, signals: StopSignals) -> int:
        """The stop signal that reached this process or, under DDP, any process (0: none), so that
        all stop after the same iteration. Also the per-iteration barrier (main may have checkpointed)."""
        stop = signals.received or 0
        if self.dist.world_size > 1:
            flag = torch.tensor([stop], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control_group)
            stop = int(flag.item())
        return stop

    def _barrier(self) -> None:
        if self.dist.world_size > 1:
            dist.barrier()

    def _writer(self):
        if not self.dist.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            tqdm.write("tensorboard is not installed: no TensorBoard logs (pip install 'nerdrain[train]')")
            return None
        # purge_step: after a crash and resume, TensorBoard hides what was logged past the checkpoint.
        # The checkpoint's own iteration was logged before it was saved and is not logged again.
        return SummaryWriter(str(self.out / "tb"), purge_step=self.iteration + 1 if self.iteration else None)


def train(cfg: TrainConfig, out_dir: str | Path, resume: bool | str = False, progress: bool = True,
          overwrite: bool = False) -> Path:
    """Train and return the path of the final weights (loadable with :func:`nerdrain.load_model`)."""
    try:
        with _stop_signals_interrupt():
            trainer = Trainer(cfg, out_dir, progress, resume=resume, overwrite=overwrite)
        if resume and trainer.dist.is_main:
            done = ": the run is complete, nothing to train" if trainer.iteration == cfg.iterations else ""
            tqdm.write(f"resumed at iteration {trainer.iteration} of {cfg.iterations}{done}" if trainer.resumed_from
                       else f"--resume: no checkpoint at {trainer.out / LAST}; starting from scratch")
        return trainer.train()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

"""The training loop: exact resume, DDP equivalence, learning, checkpoints, logs and the CLI.

Every run uses a tiny network on small pairs generated here, so the module takes seconds; only the
smoke test reads ../shared/data (and skips without it).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from PIL import Image
from safetensors.torch import load_file

from nerdrain import create_model, load_model, save_model
from nerdrain.checkpoint import CheckpointError, load_default_model
from nerdrain.cli import main
from nerdrain.config import ConfigError, TrainConfig, from_dict
from nerdrain.data import checked as checked_module
from nerdrain.data.checked import CHECKED_FILES
from nerdrain.training import (BEST, FINAL, LAST, StopSignals, Trainer, TrainingInterrupted, WeightEMA, atomic_save,
                               build_optimizer, build_stream, lr_at, max_temp_dir_for_workers, train)

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
TINY = {"name": "nerd_rain_s", "overrides": {"dim": 8, "depths": [1, 1, 1], "inr_hidden": [16, 16, 16]}}


def torchrun(tmp_path: Path) -> list[str]:
    """torchrun, two processes. Its rendezvous store listens on a port the system picks as it binds
    (port 0), which the workers share: a free port looked up beforehand could be taken by another
    program first. Its logs go to the test's folder, not to torchelastic_* folders left in /tmp."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts", "0",
            "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", "--local-addr=127.0.0.1",
            "--log-dir", str(tmp_path / "torchelastic")]


def subprocess_env() -> dict[str, str]:
    """A training subprocess's environment: one thread per process, this checkout's package."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


@contextlib.contextmanager
def one_torch_thread():
    """The tiny model is far faster on one thread, above all on a busy 2-core machine; the count
    is set back after, for the test files that run later."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def one_thread():
    with one_torch_thread():
        yield


def make_pairs(root: Path, count: int = 3, size: tuple[int, int] = (40, 52), seed: int = 0) -> Path:
    """``count`` random rainy/clean PNG pairs (input/, target/) of ``size`` (H, W)."""
    rng = np.random.default_rng(seed)
    (root / "input").mkdir(parents=True)
    (root / "target").mkdir()
    for i in range(count):
        clean = rng.integers(0, 200, (*size, 3), dtype=np.uint8)
        rainy = np.clip(clean.astype(int) + rng.integers(0, 56, size)[..., None], 0, 255).astype(np.uint8)
        Image.fromarray(rainy).save(root / "input" / f"{i}.png")
        Image.fromarray(clean).save(root / "target" / f"{i}.png")
    return root


def config_dict(data_root: Path, **top) -> dict:
    cfg = {
        "model": TINY,
        "data": {"patch_size": 32, "batch_size": 1, "num_workers": 0,
                 "sources": [{"kind": "paired", "root": str(data_root)}]},
        "iterations": 4,
        "ema_decay": 0.9,
        "optim": {"lr": 1e-3, "warmup_iters": 2, "min_lr": 1e-5},
        "log_every": 1,
        "checkpoint_every": 1,
    }
    for key, value in top.items():
        if isinstance(value, dict):
            cfg[key] = {**cfg.get(key, {}), **value}
        else:
            cfg[key] = value
    return cfg


def make_config(data_root: Path, **top) -> TrainConfig:
    return from_dict(TrainConfig, config_dict(data_root, **top))


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same(a, b, where: str = "state") -> None:
    """Nested dicts/lists/tensors equal exactly (tensors by ``torch.equal``)."""
    if isinstance(a, torch.Tensor):
        if not (isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)):
            pytest.fail(f"{where} differs (max |diff| "
                        f"{(a.double() - torch.as_tensor(b).double()).abs().max().item():.3g})")
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(set(a) ^ set(b))}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def no_tmp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_pairs(tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, data_root) -> Path:
    """Four iterations in one go (EMA, warm-up and cosine on): the reference for the resume tests."""
    out = tmp_path_factory.mktemp("straight")
    with one_torch_thread():  # set up before the test's own one_thread
        train(make_config(data_root), out, progress=False)
    return out


# -- learning-rate schedule ---------------------------------------------------------------------


def test_lr_schedule_warmup_then_cosine():
    cfg = from_dict(TrainConfig, {"iterations": 12, "optim": {"lr": 1e-3, "min_lr": 1e-5, "warmup_iters": 4}})
    lrs = [lr_at(i, cfg) for i in range(13)]
    assert lrs[0] == pytest.approx(1e-3 / 4)  # LinearLR-style ramp starts at lr / warmup
    assert all(a < b for a, b in zip(lrs[:4], lrs[1:5]))  # rising during warm-up
    assert lrs[4] == pytest.approx(1e-3)  # peak right after warm-up
    assert all(a > b for a, b in zip(lrs[4:12], lrs[5:13]))  # then strictly decaying
    assert lrs[8] == pytest.approx((1e-3 + 1e-5) / 2)  # cosine midpoint: halfway between lr and min_lr
    assert lrs[12] == pytest.approx(1e-5)  # and min_lr at the end
    assert lr_at(100, cfg) == pytest.approx(1e-5)  # held there
    no_warmup = from_dict(TrainConfig, {"iterations": 10, "optim": {"lr": 1e-3, "min_lr": 0.0}})
    assert lr_at(0, no_warmup) == pytest.approx(1e-3)
    assert lr_at(5, no_warmup) == pytest.approx(5e-4)


def test_adam_two_steps_by_hand_and_fused_where_available():
    """Two Adam steps against the textbook update, computed here in float64."""
    cfg = from_dict(TrainConfig, {"optim": {"lr": 0.01, "betas": [0.9, 0.99], "eps": 1e-3, "weight_decay": 0.1}})
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(7, 5))
    optimizer = build_optimizer([param], cfg)
    fused_expected = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4)  # CPU kernel since 2.4
    assert optimizer.defaults.get("fused") is (True if fused_expected else None)
    p, m, v = param.detach().double().clone(), 0.0, 0.0
    for t, grad in enumerate((torch.randn(7, 5), torch.randn(7, 5)), start=1):
        param.grad = grad.clone()
        optimizer.step()
        g = grad.double() + 0.1 * p  # L2 weight decay, added to the gradient as torch's Adam does
        m, v = 0.9 * m + 0.1 * g, 0.99 * v + 0.01 * g * g
        p = p - 0.01 * (m / (1 - 0.9 ** t)) / ((v / (1 - 0.99 ** t)).sqrt() + 1e-3)
        torch.testing.assert_close(param.detach().double(), p, atol=1e-6, rtol=1e-6)


def test_optimizer_uses_the_scheduled_lr(tmp_path, data_root):
    cfg = make_config(data_root, iterations=5, optim={"warmup_iters": 2})
    trainer = Trainer(cfg, tmp_path, progress=False)
    seen = []
    trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    trainer.train()
    assert seen == pytest.approx([lr_at(i, cfg) for i in range(5)], rel=1e-12)
    assert seen[0] == pytest.approx(cfg.optim.lr / 2)


# -- resume -------------------------------------------------------------------------------------


def assert_same_runs(a: Path, b: Path) -> None:
    final_a, final_b = load_file(a / "final.safetensors"), load_file(b / "final.safetensors")
    assert_same(final_a, final_b, "final")
    ckpt_a, ckpt_b = load_ckpt(a / LAST), load_ckpt(b / LAST)
    assert ckpt_a["iteration"] == ckpt_b["iteration"] == 4
    for key in ("model", "ema", "optimizer", "scheduler", "rng_cpu", "samples", "best_psnr"):
        assert_same(ckpt_a[key], ckpt_b[key], key)
    assert ckpt_a["optimizer"]["state"], "Adam state (exp_avg, exp_avg_sq, step) is checkpointed"


def test_resume_extending_the_run_is_exact(tmp_path, data_root, straight_run):
    """2 iterations (iterations=2), then ``--resume`` with iterations=4 == 4 in one go, bit for bit."""
    out = tmp_path / "run"
    train(make_config(data_root, iterations=2), out, progress=False)
    half = load_file(out / "final.safetensors")
    assert load_ckpt(out / LAST)["iteration"] == 2
    # not vacuous: after 2 iterations the weights still differ from the straight run's
    assert any(not torch.equal(v, load_file(straight_run / "final.safetensors")[k]) for k, v in half.items())
    train(make_config(data_root, iterations=4), out, resume=True, progress=False)
    assert_same_runs(straight_run, out)
    assert no_tmp_files(out)


def test_resume_after_a_crash_is_exact(tmp_path, data_root, straight_run, monkeypatch):
    """A run planned for 4 iterations dies after checkpointing iteration 2; resuming finishes it exactly."""
    import nerdrain.training as training

    class Crash(Exception):
        pass

    real_save = training.atomic_save

    def save_then_crash(obj, path):
        real_save(obj, path)
        if obj["iteration"] == 2:
            raise Crash

    monkeypatch.setattr(training, "atomic_save", save_then_crash)
    out = tmp_path / "run"
    with pytest.raises(Crash):
        train(make_config(data_root), out, progress=False)
    assert not (out / "final.safetensors").exists()
    monkeypatch.setattr(training, "atomic_save", real_save)
    train(make_config(data_root), out, resume=str(out / LAST), progress=False)
    assert_same_runs(straight_run, out)


def test_stop_signal_checkpoints_the_iteration_and_resume_finishes_exactly(tmp_path, data_root, straight_run):
    """SIGINT mid-run: the iteration in progress finishes and is checkpointed (none was due), the run
    stops, the signal handlers are restored; ``--resume`` then ends where the straight run does."""
    out = tmp_path / "run"
    cfg = make_config(data_root, checkpoint_every=100)
    trainer = Trainer(cfg, out, progress=False)
    handler_before = signal.getsignal(signal.SIGINT)

    def interrupt(optimizer, args, kwargs):
        if trainer.iteration == 1:  # within the second iteration
            os.kill(os.getpid(), signal.SIGINT)

    trainer.optimizer.register_step_post_hook(interrupt)
    with pytest.raises(TrainingInterrupted) as stop:
        trainer.train()
    assert (stop.value.signum, stop.value.iteration) == (signal.SIGINT, 2)
    assert str(stop.value).startswith("interrupted by SIGINT at iteration 2 of 4: checkpoint ")
    assert load_ckpt(out / LAST)["iteration"] == 2
    assert not (out / "final.safetensors").exists() and no_tmp_files(out)
    assert signal.getsignal(signal.SIGINT) is handler_before
    train(cfg, out, resume=True, progress=False)
    assert_same_runs(straight_run, out)


_WITHOUT_POSIX_SIGNALS = """
import multiprocessing, signal
for name in ("SIGUSR1", "SIGHUP", "pthread_sigmask"):  # as on Windows
    delattr(signal, name)
multiprocessing.set_start_method("spawn")
from nerdrain import cli, training
with training.StopSignals(announce=False) as signals:
    training._start_process_helpers(workers=True)
print(sorted(s.name for s in signals.SIGNALS))
"""


def test_stop_signals_work_without_sigusr1_and_signal_masks():
    """Windows has neither SIGUSR1 nor pthread_sigmask: importing and starting the stop-signal
    handling must not need them (an AttributeError there would stop every run at its start)."""
    result = subprocess.run([sys.executable, "-c", _WITHOUT_POSIX_SIGNALS], env=subprocess_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[-2] == "['SIGINT', 'SIGTERM']"


def test_a_second_ctrl_c_a_second_later_aborts_at_once():
    """The first SIGINT asks for a stop; a repeat within a second (torchrun forwarding the terminal's
    Ctrl-C) is the same request; one a second or more later aborts; SIGTERM never aborts."""
    clock = iter([100.0, 100.5, 100.9, 101.2])
    with StopSignals(announce=False, clock=lambda: next(clock)) as signals:
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.received == signal.SIGINT
        os.kill(os.getpid(), signal.SIGINT)  # 0.5 s later
        os.kill(os.getpid(), signal.SIGTERM)  # 0.9 s later
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # 1.2 s later
    assert signals.received == signal.SIGINT


def interrupt_cli_run(tmp_path: Path, data_root: Path, signum: int, launcher: list[str],
                      start_method: str | None = None) -> tuple[int, str, Path]:
    """Start an endless training run in a session of its own, wait for its first checkpoints, send
    ``signum`` to the whole process group (as a terminal's Ctrl-C or a batch system does: data
    workers and, under torchrun, the agent get it too); return (exit code, output, run folder).
    ``start_method``: how its processes start theirs (a ``sitecustomize`` sets it in each)."""
    cfg_path, out = tmp_path / "cfg.yaml", tmp_path / "run"
    cfg_path.write_text(yaml.safe_dump(config_dict(data_root, iterations=10**6, checkpoint_every=3,
                                                   data={"num_workers": 1})))
    env = subprocess_env()
    if start_method is not None:
        site = tmp_path / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(
            f"import multiprocessing\nmultiprocessing.set_start_method({start_method!r}, force=True)\n")
        env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    proc = subprocess.Popen([*launcher, "-m", "nerdrain.cli", "train", str(cfg_path), "--out", str(out), "-q"],
                            env=env, cwd=tmp_path, start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not (out / LAST).is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it was interrupted"
        os.killpg(proc.pid, signum)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, output, out


def assert_stopped_with_a_checkpoint(signum: int, code: int, output: str, out: Path) -> None:
    name = signal.Signals(signum).name
    assert code == 128 + signum, output[-3000:]
    stopped = re.search(rf"interrupted by {name} at iteration (\d+) of 1000000: checkpoint (.+); continue with "
                        "--resume", output)
    assert stopped, output[-3000:]
    assert not re.search("Traceback|DataLoader worker|resource_tracker", output), output[-3000:]
    assert load_ckpt(out / LAST)["iteration"] == int(stopped[1]) >= 3
    assert Path(stopped[2]) == out / LAST and no_tmp_files(out)


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="needs POSIX process groups")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None)])
def test_cli_stops_with_a_checkpoint_on_a_signal_to_the_process_group(tmp_path, data_root, signum):
    assert_stopped_with_a_checkpoint(signum, *interrupt_cli_run(tmp_path, data_root, signum, [sys.executable]))


@pytest.mark.skipif(not (hasattr(os, "killpg") and hasattr(signal, "SIGUSR1")), reason="needs POSIX process groups")
@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_a_signal_to_the_process_group_stops_the_run_cleanly_under_spawn_and_forkserver(tmp_path, data_root,
                                                                                      start_method):
    """macOS starts processes by spawn, Linux from Python 3.14 by forkserver: multiprocessing then runs
    a resource tracker (and a fork server) in the run's process group, which has no handler for
    SIGUSR1; killed by a cluster's preemption signal, it left a warning of leaked semaphores and a
    traceback for each of them."""
    signum = signal.SIGUSR1
    assert_stopped_with_a_checkpoint(signum, *interrupt_cli_run(tmp_path, data_root, signum, [sys.executable],
                                                                start_method))


@pytest.mark.skipif(not (hasattr(os, "killpg") and torch.distributed.is_available()),
                    reason="needs POSIX process groups and torch.distributed")
def test_torchrun_processes_stop_after_the_same_iteration(tmp_path, data_root):
    """Ctrl-C under torchrun reaches both workers (from the terminal and again from the agent), at
    different moments of their step: they agree on one iteration, and rank 0 checkpoints it."""
    launcher = torchrun(tmp_path)
    code, output, out = interrupt_cli_run(tmp_path, data_root, signal.SIGINT, launcher)
    stopped = re.findall(r"interrupted by SIGINT at iteration (\d+) of 1000000", output)
    assert len(stopped) == 1, output[-3000:]  # one line for the job, from rank 0
    assert load_ckpt(out / LAST)["iteration"] == int(stopped[0]) >= 3
    assert code != 0 and no_tmp_files(out)


def test_weight_ema_matches_pytorchs_averaged_model():
    """The host-counted EMA gives PyTorch's AveragedModel EMA exactly, update by update, and the same
    state dict (so checkpoints written by either load into the other)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    model = create_model(TINY["name"], **TINY["overrides"])
    ours = WeightEMA(model, 0.9)
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ours.update_parameters(model)
        reference.update_parameters(model)
        assert_same(ours.state_dict(), reference.state_dict(), "EMA")
    assert int(ours.n_averaged) == 3
    assert not torch.equal(next(ours.module.parameters()), next(model.parameters()))  # it averages


def test_weight_ema_with_an_integer_buffer_matches_too():
    """BatchNorm's step counter is an integer buffer: the update takes the library's grouping path."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    ours = WeightEMA(model, 0.9)
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for _ in range(3):
        model(torch.randn(2, 3, 4, 4))  # moves the running statistics and the counter
        with torch.no_grad():
            model[0].weight.add_(1)
        ours.update_parameters(model)
        reference.update_parameters(model)
        assert_same(ours.state_dict(), reference.state_dict(), "EMA")


def test_resume_switching_ema_on(tmp_path, data_root):
    """A checkpoint without EMA resumed with EMA on: averaging starts from the resumed weights."""
    out = tmp_path / "run"
    train(make_config(data_root, iterations=1, ema_decay=None), out, progress=False)
    assert "ema" not in load_ckpt(out / LAST)
    train(make_config(data_root, iterations=2, ema_decay=0.5), out, resume=True, progress=False)
    ckpt, final = load_ckpt(out / LAST), load_file(out / "final.safetensors")
    assert ckpt["iteration"] == 2 and int(ckpt["ema"]["n_averaged"]) == 1
    # one update of a fresh average copies the weights: the final (EMA) weights are the model's
    assert_same({k: final[k] for k in ckpt["model"]}, dict(ckpt["model"]), "ema")


def test_a_training_checkpoint_loads_as_the_weights_the_run_would_save(tmp_path, data_root, straight_run):
    """``RUN/last.pt`` stands for the weights at its iteration: the EMA, as ``final.safetensors``
    holds them (so an interrupted run can be used and converted), or the trained weights without one."""
    from_last, final = load_model(straight_run / LAST), load_model(straight_run / "final.safetensors")
    assert from_last.cfg == final.cfg
    assert_same(from_last.state_dict(), final.state_dict(), "last.pt as weights")
    raw = load_ckpt(straight_run / LAST)["model"]
    assert any(not torch.equal(v, raw[k]) for k, v in final.state_dict().items())  # the EMA, not the raw weights
    converted = tmp_path / "w.safetensors"
    assert main(["convert", str(straight_run / LAST), str(converted)]) == 0
    assert_same(load_model(converted).state_dict(), final.state_dict(), "converted last.pt")

    out = tmp_path / "run"
    train(make_config(data_root, iterations=1, ema_decay=None), out, progress=False)
    assert_same(load_model(out / LAST).state_dict(), dict(load_ckpt(out / LAST)["model"]), "without EMA")


def test_atomic_save_keeps_previous_checkpoint_on_failure(tmp_path, monkeypatch):
    path = tmp_path / LAST
    atomic_save({"iteration": 1, "w": torch.arange(4.0)}, path)
    real_save = torch.save

    def broken_save(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(1000)}, f)  # some bytes reach the file, then the disk "fails"
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"iteration": 2, "w": torch.ones(4)}, path)
    monkeypatch.undo()
    state = load_ckpt(path)
    assert state["iteration"] == 1 and torch.equal(state["w"], torch.arange(4.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST]  # no temporary file left behind


def test_resume_without_checkpoint_starts_from_scratch(tmp_path, data_root, capsys):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(config_dict(data_root, iterations=1)))
    out = tmp_path / "run"
    assert main(["train", str(cfg_path), "--out", str(out), "--resume", "-q"]) == 0
    assert "starting from scratch" in capsys.readouterr().out
    assert load_ckpt(out / LAST)["iteration"] == 1
    load_model(out / "final.safetensors")
    # an explicitly named checkpoint that does not exist is an error, not a silent fresh start
    assert main(["train", str(cfg_path), "--out", str(tmp_path / "other"), "--resume",
                 str(tmp_path / "missing.pt"), "-q"]) == 2
    assert "missing.pt" in capsys.readouterr().err


def test_cuda_graphs_without_cuda_warn_and_train_exactly_as_eager(tmp_path, data_root, straight_run):
    if torch.cuda.is_available():
        pytest.skip("checks the fallback where CUDA is absent")
    with pytest.warns(UserWarning, match="cuda_graphs: they need a CUDA device"):
        train(make_config(data_root, cuda_graphs=True), tmp_path, progress=False)
    assert_same_runs(straight_run, tmp_path)


def test_cuda_graphs_unavailable_is_one_warning_line_from_the_first_process(tmp_path, data_root, capsys):
    """The fallback is the same on every process: under torchrun only rank 0 says so, and the CLI
    says it in one line, as for the other fast paths."""
    import nerdrain.training as training

    trainer = Trainer.__new__(Trainer)
    trainer.device = torch.device("cpu")
    trainer.dist = training.DistInfo(rank=1, world_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trainer._graphs_possible() is False
    if torch.cuda.is_available():
        return
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(config_dict(data_root, iterations=1, cuda_graphs=True)))
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "-q"]) == 0
    assert [line for line in capsys.readouterr().err.splitlines() if "cuda_graphs" in line] == [
        "warning: cuda_graphs: they need a CUDA device; training without them"]


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@CUDA
@pytest.mark.parametrize("bf16", [False, True])
def test_cuda_graphs_train_like_eager_steps(tmp_path, data_root, bf16, monkeypatch):
    """Graph replays compute the eager step (cuDNN may pick other algorithms: close, not equal),
    and a run resumes from its checkpoint into a fresh capture."""
    # A trainer on CUDA turns cuDNN's autotuning on for its process (the training shapes are
    # fixed); here the process is the test session's, so the setting is put back afterwards.
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    def config(graphs: bool, **top) -> TrainConfig:
        return make_config(data_root, device="cuda", cuda_graphs=graphs, bf16=bf16, channels_last=True,
                           optim={"grad_clip": 0.5}, **top)

    finals = {}
    for graphs in (False, True):
        trainer = Trainer(config(graphs), tmp_path / str(graphs), progress=False)
        start = {k: v.float().cpu().clone() for k, v in trainer.model.state_dict().items()}
        assert torch.backends.cudnn.benchmark
        finals[graphs] = load_file(trainer.train())
        assert (trainer.graph_step is not None) == graphs  # really captured, no silent fallback
    resumed = tmp_path / "resumed"
    train(config(True, iterations=2), resumed, progress=False)
    train(config(True), resumed, resume=True, progress=False)
    finals["resumed"] = load_file(resumed / "final.safetensors")

    def largest(a: dict, b: dict) -> float:
        return max((a[k].float() - b[k].float()).abs().max().item() for k in a)

    moved = largest(finals[False], {k: start[k] for k in finals[False]})
    assert moved > 5e-4  # four Adam steps of lr up to 1e-3, seen through an EMA of decay 0.9
    tolerance = moved / 10 if bf16 else 1e-4
    assert largest(finals[True], finals[False]) < tolerance
    assert largest(finals["resumed"], finals[True]) < tolerance


def test_resume_gives_cuda_its_generator_state_as_a_cpu_tensor_of_its_own_device(monkeypatch):
    """``torch.load`` maps a checkpoint to the training device, the CUDA generator state too, but
    CUDA takes generator states from CPU byte tensors only: resuming on a GPU failed with "RNG state
    must be a torch.ByteTensor" (seen on the H200 in stop 19 by the test above). Checkpoints before
    then hold one state per visible GPU: the process takes its own device's, if there is one."""
    from types import SimpleNamespace

    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append((state, device)))
    process = SimpleNamespace(device=torch.device("cuda", 1))
    mine, other = torch.arange(16, dtype=torch.uint8), torch.zeros(16, dtype=torch.uint8)
    Trainer._restore_cuda_rng(process, mine)  # saved since stop 19: the saving process's device
    Trainer._restore_cuda_rng(process, [other, mine])  # before: one per GPU that rank 0 saw
    Trainer._restore_cuda_rng(process, [other])  # saved where this process's GPU did not exist
    Trainer._restore_cuda_rng(process, None)  # saved by a run on the CPU
    assert [(state.device.type, state.tolist(), device) for state, device in calls] == [
        ("cpu", list(range(16)), torch.device("cuda", 1))] * 2


def test_tensorboard_logs(straight_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((straight_run / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(straight_run / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/total", "train/char", "train/fft", "train/edge", "train/inr_l1", "train/lr"} <= tags
    totals = acc.Scalars("train/total")
    assert [e.step for e in totals] == [1, 2, 3, 4]
    assert all(math.isfinite(e.value) and e.value > 0 for e in totals)
    # logged beside the loss of iteration i: the lr of that iteration's step (warm-up from lr/2 over
    # 2 steps, then cosine from 1e-3 to 1e-5 over the last 2), not the next one's
    lrs = [e.value for e in acc.Scalars("train/lr")]
    assert lrs == pytest.approx([5e-4, 7.5e-4, 1e-3, 1e-5 + (1e-3 - 1e-5) / 2], rel=1e-6)


def test_without_a_progress_bar_a_line_every_log_every_iterations(tmp_path, data_root, capsys):
    """``-q`` (a batch job's log file): the loss terms, learning rate and speed of every logged
    iteration as a line, the values TensorBoard gets (no line where a progress bar shows them)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(make_config(data_root, iterations=2), out, progress=False)
    lines = re.findall(r"^iter (\d+)/2: loss (\S+) \(char (\S+), fft (\S+), edge (\S+), inr_l1 (\S+)\), "
                       r"lr (\S+), (\S+) samples/s$", capsys.readouterr().out, re.MULTILINE)
    assert [int(line[0]) for line in lines] == [1, 2]
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    for step, *values, lr, rate in lines:
        for name, value in zip(("total", "char", "fft", "edge", "inr_l1"), values):
            assert float(value) == pytest.approx(acc.Scalars(f"train/{name}")[int(step) - 1].value, rel=1e-3)
        assert float(rate) > 0
    assert [float(line[6]) for line in lines] == [5e-4, 7.5e-4]  # warm-up from lr / 2 over 2 steps
    train(make_config(data_root, iterations=3), out, progress=True, resume=True)
    assert "iter 3/3" not in capsys.readouterr().out


def test_tensorboard_logs_after_a_crash_and_resume_are_those_of_a_straight_run(tmp_path, data_root,
                                                                                straight_run):
    """Killed after logging iteration 3 with the checkpoint at 2: the resumed run's logs show each
    iteration once, with the straight run's values (the checkpoint's own iteration is not lost)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    class Crash(Exception):
        pass

    out = tmp_path / "run"
    trainer = Trainer(make_config(data_root, checkpoint_every=2), out, progress=False)

    def crash(optimizer, args, kwargs):
        if trainer.iteration == 3:  # within the fourth iteration
            raise Crash

    trainer.optimizer.register_step_post_hook(crash)
    with pytest.raises(Crash):
        trainer.train()
    assert load_ckpt(out / LAST)["iteration"] == 2
    train(make_config(data_root, checkpoint_every=2), out, resume=True, progress=False)

    def totals(run: Path) -> list[tuple[int, float]]:
        acc = EventAccumulator(str(run / "tb"))
        acc.Reload()
        return [(e.step, e.value) for e in acc.Scalars("train/total")]

    assert [step for step, _ in totals(out)] == [1, 2, 3, 4]
    assert totals(out) == totals(straight_run)


# -- DDP ----------------------------------------------------------------------------------------




@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_two_processes_match_one_process_with_double_batch(tmp_path, data_root, capsys):
    """torchrun, 2 gloo processes x batch 1 == 1 process x batch 2: same samples, averaged gradients.

    Adam is nearly invariant to the scale of the gradient, which would hide a summed-instead-of-averaged
    loss; a large ``eps`` makes its steps proportional to the gradient (lr * g / (|g| + 1)), so the
    comparison sees the scale too (checked below by doubling the learning rate).
    """
    base = config_dict(data_root, iterations=3, optim={"lr": 0.05, "eps": 1.0, "warmup_iters": 1},
                       checkpoint_every=2, val={"root": str(data_root), "every": 2})
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(base))
    ddp_out = tmp_path / "ddp"
    env = subprocess_env()
    cmd = [*torchrun(tmp_path), "-m", "nerdrain.cli", "train", str(cfg_path), "--out", str(ddp_out), "-q",
           "--set", "data.batch_size=1"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Grad strides" not in result.stderr
    # Validated by both processes, each its share: the score is the evaluation module's on all pairs
    # (the final weights are those validated at the last iteration), logged once.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from nerdrain.evaluate import evaluate_pairs
    from nerdrain.data.pairs import find_pairs

    acc = EventAccumulator(str(ddp_out / "tb"))
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("val/psnr")}
    expected = evaluate_pairs(load_model(ddp_out / "final.safetensors"), find_pairs(data_root), "rain200", "cpu")
    assert sorted(logged) == [2, 3] and logged[3] == pytest.approx(expected.psnr, rel=1e-6, abs=0)
    assert re.findall(r"iter (\d+): val PSNR", result.stdout) == ["2", "3"]

    single_out = tmp_path / "single"
    train(from_dict(TrainConfig, {**base, "data": {**base["data"], "batch_size": 2}}), single_out, progress=False)

    ddp_final, single_final = load_file(ddp_out / "final.safetensors"), load_file(single_out / "final.safetensors")
    assert set(ddp_final) == set(single_final)
    diff = max((ddp_final[k] - single_final[k]).abs().max().item() for k in single_final)
    assert diff < 1e-5
    ddp_ckpt, single_ckpt = load_ckpt(ddp_out / LAST), load_ckpt(single_out / LAST)
    assert ddp_ckpt["iteration"] == 3
    diff_model = max((ddp_ckpt["model"][k].float() - v.float()).abs().max().item()
                     for k, v in single_ckpt["model"].items())
    assert diff_model < 1e-5

    # Sensitivity: a doubled gradient (here: doubled lr) moves the weights by far more than the tolerance.
    doubled = tmp_path / "doubled"
    train(from_dict(TrainConfig, {**base, "data": {**base["data"], "batch_size": 2},
                                  "optim": {**base["optim"], "lr": 0.1}}), doubled, progress=False)
    doubled_final = load_file(doubled / "final.safetensors")
    assert max((doubled_final[k] - single_final[k]).abs().max().item() for k in single_final) > 1e-3

    # Only rank 0 writes: one TensorBoard event file, no stray temporary files.
    assert len(list((ddp_out / "tb").glob("events.out.tfevents.*"))) == 1
    assert (ddp_out / "config.yaml").is_file() and no_tmp_files(ddp_out)

    # Resumed in one process at batch 2 (the same global batch): no note of changed settings (that
    # of the files not read again aside), and it goes on as the single-process run does.
    longer = {**base, "iterations": 5, "data": {**base["data"], "batch_size": 2}}
    capsys.readouterr()
    train(from_dict(TrainConfig, longer), ddp_out, resume=True, progress=False)
    assert [line for line in capsys.readouterr().out.splitlines()
            if line.startswith("note:") and "not read again" not in line] == []
    train(from_dict(TrainConfig, longer), single_out, resume=True, progress=False)
    ddp_final, single_final = load_file(ddp_out / "final.safetensors"), load_file(single_out / "final.safetensors")
    assert max((ddp_final[k] - single_final[k]).abs().max().item() for k in single_final) < 1e-5


def test_under_ddp_each_process_validates_its_share_and_all_get_the_whole_score(tmp_path, monkeypatch):
    """Rank 1 of 2 scores pairs 1, 3 (rank 0: 0, 2, 4) and gathers the rest: a long validation
    takes half the time, and no process waits a whole validation in a collective (whose default
    timeout would end the job). The score is evaluate_pairs' over all pairs, in their order."""
    import nerdrain.training as training
    from nerdrain.evaluate import evaluate_pairs

    val = make_pairs(tmp_path / "val", count=5)
    trainer = Trainer(make_config(val, val={"root": str(val)}), tmp_path / "run", progress=False)
    whole = evaluate_pairs(trainer.eval_model, trainer.val_pairs, "rain200", "cpu")
    rank0 = evaluate_pairs(trainer.eval_model, trainer.val_pairs[0::2], "rain200", "cpu")
    scored = []
    real_evaluate = training.evaluate_pairs
    monkeypatch.setattr(training, "evaluate_pairs", lambda model, pairs, *a: scored.extend(pairs) or
                        real_evaluate(model, pairs, *a))

    def all_gather_object(out, obj, group=None):
        out[:] = [(rank0.images, rank0.failed) if isinstance(obj, tuple) else None, obj]  # scores; errors: none

    monkeypatch.setattr(training.dist, "all_gather_object", all_gather_object)
    trainer.dist = training.DistInfo(rank=1, world_size=2)
    assert trainer.validate(None) == whole.psnr
    assert [p.name for p in scored] == ["1", "3"]
    assert not (tmp_path / "run" / BEST).exists()  # only rank 0 writes


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_under_ddp_an_error_in_one_share_stops_every_process_at_the_validation(tmp_path, monkeypatch, failing_rank):
    """The model fails on one process's share (NaN outputs, out of memory there): every process
    still meets the others and learns of it, instead of the others waiting in the gather of the
    scores until torchrun ends them (the main one without keeping the iterations done). Seen from
    rank 1 of 2: its own error is raised by it; rank 0's is reported by rank 0."""
    import nerdrain.training as training

    val = make_pairs(tmp_path / "val", count=4)
    trainer = Trainer(make_config(val, val={"root": str(val)}), tmp_path / "run", progress=False)
    trainer.dist = training.DistInfo(rank=1, world_size=2)
    nan_error = "1.png: restore's output: NaN"
    if failing_rank == 1:
        monkeypatch.setattr(training, "evaluate_pairs", lambda *a: (_ for _ in ()).throw(ValueError(nan_error)))
    exchanged = []

    def all_gather_object(out, obj, group=None):
        exchanged.append(obj)
        if isinstance(obj, tuple):  # the scores: rank 0's share scored nothing here
            out[:] = [([], []), obj]
        else:  # the errors met
            out[:] = [nan_error if failing_rank == 0 else None, obj]

    monkeypatch.setattr(training.dist, "all_gather_object", all_gather_object)
    expected = ValueError if failing_rank == 1 else training.ReportedElsewhere
    with pytest.raises(expected, match=re.escape(nan_error)):
        trainer.validate(None)
    assert exchanged[0] == (nan_error if failing_rank == 1 else None)
    assert len(exchanged) == 1  # no process goes on to gather scores that some cannot give
    assert trainer.eval_model.training  # back in training mode


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("case", ["config", "folder", "files"])
def test_a_setup_error_under_torchrun_is_printed_once(tmp_path, data_root, case):
    """An error every process meets alike (a bad config key, read before the processes meet; an
    earlier run in --out, found after) is one line for the job, from rank 0, not one per process;
    so are bad files found in both processes' shares of the data, named together."""
    cfg_path, out = tmp_path / "cfg.yaml", tmp_path / "run"
    if case == "files":  # pairs 0 and 2 are rank 0's share, 1 rank 1's
        data_root = make_pairs(tmp_path / "pairs", count=3)
        bad = [data_root / "input" / f"{i}.png" for i in (1, 2)]
        for path in bad:
            path.write_bytes(b"not a PNG")
    cfg_path.write_text(yaml.safe_dump(config_dict(data_root)))
    out.mkdir()
    if case != "files":
        (out / LAST).write_bytes(b"an earlier run's checkpoint")
    extra = ["--set", "optim.lrr=1"] if case == "config" else []
    env = subprocess_env()
    cmd = [*torchrun(tmp_path), "-m", "nerdrain.cli", "train", str(cfg_path), "--out", str(out), "-q", *extra]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error: ")]
    expected = {"config": "error: config.optim: unknown key(s) lrr (did you mean lr?)",
                "folder": f"error: {out} holds an earlier run (last.pt)",
                "files": "error: 2 training or validation file(s) cannot be used"}[case]
    assert len(errors) == 1 and errors[0].startswith(expected), result.stderr[-3000:]
    if case == "files":
        assert all(f"{path}: " in errors[0] for path in bad), errors[0]
    assert result.returncode != 0
    root_cause = result.stderr.partition("Root Cause")[2]  # torchrun's summary names the process that reported
    assert re.search(r"rank\s*: (\d+)", root_cause)[1] == "0", result.stderr[-3000:]


def trainer_of_two_processes(monkeypatch, rank: int, sent: dict[int, object]) -> Trainer:
    """A bare Trainer as process ``rank`` of 2, whose error exchange checks what it sends and
    receives ``sent`` (what each process sent)."""
    import nerdrain.training as training

    def all_gather_object(out, obj, group=None):
        assert obj == sent[rank]
        out[:] = [sent[0], sent[1]]

    monkeypatch.setattr(training.dist, "all_gather_object", all_gather_object)
    trainer = Trainer.__new__(Trainer)
    trainer.dist, trainer.control_group = training.DistInfo(rank=rank, world_size=2), None
    return trainer


@pytest.mark.parametrize("rank, own, rank0, raised", [
    (1, "same", "same", "quiet"),  # rank 0 reports it
    (1, "mine", "theirs", "own"),  # an error of this process alone: it reports it
    (1, None, "theirs", "quiet"),  # failed elsewhere: this process ends too, without a word
    (0, "mine", None, "own"),
    (0, None, None, None),  # nobody failed: go on
])
def test_setup_errors_are_reported_by_the_first_process_that_has_them(monkeypatch, rank, own, rank0, raised):
    import nerdrain.training as training

    messages = {0: rank0, 1: own} if rank == 1 else {0: own, 1: None}
    trainer = trainer_of_two_processes(monkeypatch, rank, messages)

    def set_up():
        with trainer._errors_reported_once():
            if own is not None:
                raise ValueError(own)

    if raised is None:
        set_up()
        return
    with pytest.raises(ValueError if raised == "own" else training.ReportedElsewhere) as err:
        set_up()
    if raised == "quiet":
        failed = 0 if rank0 is not None else 1
        assert str(err.value).startswith(f"process {failed} ") and str(err.value).endswith(messages[failed])


@pytest.mark.parametrize("rank", [0, 1])
def test_bad_files_found_by_several_processes_are_reported_once_together(monkeypatch, rank):
    """Each process checks its share of the files: the bad ones of every share are named in one
    error, raised by the first process that found any, not in one line per process."""
    import nerdrain.training as training

    found = {0: ["a.png: truncated"], 1: ["b.png: not an image", "c.png: 16x16, too small"]}
    trainer = trainer_of_two_processes(monkeypatch, rank, found)
    with pytest.raises(training.UnusableFiles if rank == 0 else training.ReportedElsewhere) as err:
        with trainer._errors_reported_once():
            raise training.UnusableFiles(found[rank])
    message = str(err.value)
    assert message.startswith("3 training or validation file(s) cannot be used" if rank == 0 else
                              "process 0 reports it: 3 training or validation file(s)")
    assert message.endswith("a.png: truncated; b.png: not an image; c.png: 16x16, too small")


def test_a_process_without_bad_files_learns_that_the_files_stopped_the_start(monkeypatch):
    """Its error's cause is the joined list: it records its share of the check in a new run folder
    too (see _record_check_of_a_failed_start), as those that found bad files do."""
    import nerdrain.training as training

    trainer = trainer_of_two_processes(monkeypatch, 1, {0: ["a.png: truncated"], 1: None})
    with pytest.raises(training.ReportedElsewhere) as err:
        with trainer._errors_reported_once():
            pass
    assert isinstance(err.value.__cause__, training.UnusableFiles)
    assert err.value.__cause__.problems == ["a.png: truncated"]


@pytest.mark.parametrize("rank", [0, 1])
def test_bad_files_beside_another_error_are_each_reported_by_their_process(monkeypatch, rank):
    import nerdrain.training as training

    errors = {0: training.UnusableFiles(["a.png: truncated"]), 1: ValueError("out of memory")}
    trainer = trainer_of_two_processes(monkeypatch, rank, {0: ["a.png: truncated"], 1: "out of memory"})
    with pytest.raises(type(errors[rank])) as err:
        with trainer._errors_reported_once():
            raise errors[rank]
    assert err.value is errors[rank]


def test_the_cli_leaves_an_error_another_process_reports_unprinted(tmp_path, data_root, monkeypatch, capsys):
    import nerdrain.cli as cli
    import nerdrain.training as training

    def failed_elsewhere(*args, **kwargs):
        raise training.ReportedElsewhere("process 0 reports it: something")

    monkeypatch.setattr(training, "train", failed_elsewhere)
    monkeypatch.setattr(cli, "_REPORT_GRACE_S", 0.0)
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(config_dict(data_root)))
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "-q"]) == 2
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")  # a config error: the first process on the machine reports it
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "-q", "--set", "optim.lrr=1"]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "-q", "--set", "optim.lrr=1"]) == 2
    assert capsys.readouterr().err.startswith("error: config.optim: unknown key(s) lrr")


def test_a_bad_command_line_under_torchrun_is_reported_by_the_first_process(monkeypatch, capsys):
    import nerdrain.cli as cli

    monkeypatch.setattr(cli, "_REPORT_GRACE_S", 0.0)
    monkeypatch.setenv("LOCAL_RANK", "1")  # left in the environment of a lone process: no job to leave it to
    with pytest.raises(SystemExit):
        main(["train", "cfg.yaml"])
    assert "the following arguments are required: --out" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "cfg.yaml"]) == 2  # no --out
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SystemExit) as stop:
        main(["train", "cfg.yaml"])
    assert stop.value.code == 2
    assert "the following arguments are required: --out" in capsys.readouterr().err


# -- learning -----------------------------------------------------------------------------------


def test_overfits_one_synthetic_pair(tmp_path):
    """A tiny model learns to remove synthetic rain from one 48x48 image: +5 dB well within budget."""
    from nerdrain.data.synth import RainSynthesizer

    coarse = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    smooth = torch.nn.functional.interpolate(coarse, size=(48, 48), mode="bicubic", align_corners=False)
    clean = (0.15 + 0.7 * smooth.clamp(0, 1))[0].permute(1, 2, 0).numpy().astype(np.float32)
    rainy = RainSynthesizer("light").render(clean, np.random.default_rng(0))
    clean8 = np.round(clean * 255).astype(np.uint8)
    rainy8 = np.round(np.clip(rainy, 0, 1) * 255).astype(np.uint8)
    root = tmp_path / "pair"
    (root / "input").mkdir(parents=True)
    (root / "target").mkdir()
    Image.fromarray(rainy8).save(root / "input" / "a.png")
    Image.fromarray(clean8).save(root / "target" / "a.png")

    def psnr(x: np.ndarray) -> float:
        return 10 * math.log10(1.0 / np.mean((x.astype(np.float64) / 255 - clean8 / 255) ** 2))

    input_psnr = psnr(rainy8)
    assert 20 < input_psnr < 32  # visible rain

    cfg = from_dict(TrainConfig, {
        "model": TINY,
        "data": {"patch_size": 48, "batch_size": 1, "num_workers": 0, "flips": False, "saturation_prob": 0.0,
                 "sources": [{"kind": "paired", "root": str(root)}]},
        "iterations": 100, "optim": {"lr": 3e-3, "warmup_iters": 5, "min_lr": 3e-4},
        "log_every": 1000, "checkpoint_every": 1000,
    })
    final = train(cfg, tmp_path / "run", progress=False)
    model = load_model(final).eval()
    with torch.no_grad():
        out = model(torch.from_numpy(rainy8).permute(2, 0, 1)[None].float() / 255)
    out8 = np.round(out[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.uint8)
    assert psnr(out8) > input_psnr + 5


# -- CLI smoke ----------------------------------------------------------------------------------


def test_cli_smoke_config(tmp_path):
    if not (SHARED / "data" / "samples").is_dir() or not (SHARED / "data" / "clean").is_dir():
        pytest.skip(f"{SHARED / 'data'} is absent (the smoke config reads ../shared/data)")
    out = tmp_path / "smoke"
    env = subprocess_env()
    cmd = [sys.executable, "-m", "nerdrain.cli", "train", "configs/smoke.yaml", "--out", str(out), "-q",
           "--set", "iterations=2", "--set", "data.patch_size=32", "--set", "val.max_images=1",
           "--set", "val.every=2", "--set", "model.overrides.depths=[1,1,1]"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    model = load_model(out / "final.safetensors")
    assert model.cfg.dim == 8 and tuple(model.cfg.depths) == (1, 1, 1)
    assert (out / "best.safetensors").is_file()  # validation ran and saved the best weights
    assert load_ckpt(out / LAST)["iteration"] == 2
    assert list((out / "tb").glob("events.out.tfevents.*"))


def test_best_weights_restart_when_the_validation_set_changes(tmp_path, data_root, capsys):
    """A best score from another validation set is no yardstick: a resume that changes the set
    starts a new best (the next validation replaces best.safetensors), one that keeps it does not."""
    out = tmp_path / "run"
    train(make_config(data_root, iterations=2, val={"root": str(data_root), "every": 2, "max_images": 1}), out,
          progress=False)
    best = load_ckpt(out / LAST)["best_psnr"]
    assert math.isfinite(best) and (out / BEST).is_file()
    capsys.readouterr()
    same = Trainer(make_config(data_root, val={"root": str(data_root), "every": 2, "max_images": 1}), out,
                   progress=False, resume=True)
    assert same.best_psnr == best and "validation set changed" not in capsys.readouterr().out
    other = Trainer(make_config(data_root, val={"root": str(data_root), "every": 2, "max_images": 2}), out,
                    progress=False, resume=True)
    assert other.best_psnr == -math.inf
    assert f"the validation set changed; best.safetensors (scored {best:.2f} dB" in capsys.readouterr().out
    unvalidated = Trainer(make_config(data_root), out, progress=False, resume=True)  # no val.root: no best to replace
    assert unvalidated.best_psnr == -math.inf and "validation set changed" not in capsys.readouterr().out


def test_fine_tuning_starts_from_the_given_weights(tmp_path, data_root):
    """model.weights: the run starts from the file's weights, not from the seeded initialisation."""
    source = create_model(TINY["name"], **TINY["overrides"])
    for p in source.parameters():  # unlike anything a seeded init gives
        p.data.uniform_(-0.5, 0.5)
    save_model(source, tmp_path / "start.safetensors")
    cfg = make_config(data_root, model={"weights": str(tmp_path / "start.safetensors")})
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    assert_same(trainer.model.state_dict(), source.state_dict(), "initial weights")
    assert_same(trainer.ema.module.state_dict(), source.state_dict(), "initial EMA")


def test_resumed_fine_tuning_does_not_read_the_starting_weights(tmp_path, data_root):
    """The checkpoint replaces model.weights on --resume, so that file is not read (it may be gone)."""
    start = tmp_path / "start.safetensors"
    save_model(create_model(TINY["name"], **TINY["overrides"]), start)
    cfg = make_config(data_root, iterations=1, model={"weights": str(start)})
    out = tmp_path / "run"
    train(cfg, out, progress=False)
    start.unlink()
    trainer = Trainer(make_config(data_root, iterations=2, model={"weights": str(start)}), out, progress=False,
                      resume=True)
    assert trainer.resumed_from == out / LAST and trainer.iteration == 1
    assert_same(trainer.model.state_dict(), load_ckpt(out / LAST)["model"], "resumed weights")
    with pytest.raises(CheckpointError, match="start.safetensors"):  # no checkpoint: model.weights is read
        Trainer(cfg, tmp_path / "fresh", progress=False, resume=True)


def test_fine_tuning_from_a_different_model_is_a_config_error(tmp_path, data_root):
    save_model(create_model("nerd_rain_s", dim=8), tmp_path / "other.safetensors")
    cfg = make_config(data_root, model={"weights": str(tmp_path / "other.safetensors")})
    with pytest.raises(ConfigError, match="model.weights"):
        Trainer(cfg, tmp_path / "run", progress=False)


def test_fine_tuning_from_an_authors_file_of_the_configured_network(tmp_path, data_root):
    """Its FFN factor is read off the shapes as 1.1, which builds the same tensors as the
    configured 1.09: the run starts from its weights."""
    from nerdrain.checkpoint import export_official

    overrides = {**TINY["overrides"], "dim": 14, "ffn_expansion": 1.09}
    source = create_model(TINY["name"], **overrides)
    for p in source.parameters():  # unlike anything a seeded init gives
        p.data.uniform_(-0.5, 0.5)
    path = export_official(source, tmp_path / "start.pth")
    cfg = make_config(data_root, model={**TINY, "overrides": overrides, "weights": str(path)})
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    assert_same(trainer.model.state_dict(), source.state_dict(), "initial weights")


def test_fine_tuning_from_the_default_weights(tmp_path, data_root):
    cfg = make_config(data_root, model={"name": "nerd_rain_s", "overrides": {}, "weights": "default"})
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    assert_same(trainer.model.state_dict(), load_default_model().state_dict(), "default weights")


def test_activation_checkpointing_trains_like_storing_activations(tmp_path, data_root, straight_run):
    """Recomputing the blocks in backward gives the same run (to float rounding), with less memory."""
    train(make_config(data_root, activation_checkpointing=True), tmp_path, progress=False)
    expected, got = load_ckpt(straight_run / LAST), load_ckpt(tmp_path / LAST)
    assert got["iteration"] == expected["iteration"] == 4
    for name, value in expected["model"].items():
        torch.testing.assert_close(got["model"][name], value, atol=1e-5, rtol=1e-4, msg=name)


# -- bad input: one line, nothing hanging ---------------------------------------------------------


def test_stale_temporary_checkpoints_are_removed(tmp_path, data_root):
    out = tmp_path / "run"
    out.mkdir()
    an_hour_ago = time.time() - 3700
    for name in (LAST, BEST, FINAL, "config.yaml"):  # every file a run writes, as a SIGKILL leaves them
        (out / f".{name}.1a2b3c4d.tmp").write_bytes(b"half a file from a killed process")
        os.utime(out / f".{name}.1a2b3c4d.tmp", (an_hour_ago, an_hour_ago))  # of an earlier version: by age
    train(make_config(data_root, iterations=1), out, progress=False)
    assert no_tmp_files(out) and (out / LAST).is_file()


def test_a_fresh_run_does_not_overwrite_an_earlier_one(tmp_path, data_root, capsys):
    """Forgetting --resume must not replace a run's checkpoint; --overwrite starts afresh, with
    none of the earlier run's files or logs left."""
    out = tmp_path / "run"
    train(make_config(data_root, iterations=2), out, progress=False)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "config.yaml"}
    assert {LAST, "final.safetensors"} <= set(before)
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(config_dict(data_root, iterations=1)))
    assert main(["train", str(config), "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {out} holds an earlier run (last.pt, final.safetensors, TensorBoard logs)")
    assert "\n" not in err
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.name in before} == before
    with pytest.raises(ValueError, match="choose one"):
        train(make_config(data_root, iterations=1), out, progress=False, resume=True, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.name in before} == before
    assert main(["train", str(config), "--out", str(out), "-q", "--overwrite"]) == 0
    assert load_ckpt(out / LAST)["iteration"] == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/total")] == [1]  # the earlier run logged 1 and 2


def test_resuming_another_runs_checkpoint_into_a_run_folder_is_refused(tmp_path, data_root, straight_run):
    """--resume PATH continues that checkpoint's run in --out: where --out holds another run, its
    checkpoint and weights would be replaced without a word, so it is refused as a fresh run is."""
    out = tmp_path / "other"
    train(make_config(data_root, iterations=1), out, progress=False)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError) as err:
        train(make_config(data_root, iterations=6), out, resume=straight_run / LAST, progress=False)
    assert str(err.value).startswith(f"{out} holds an earlier run (last.pt, final.safetensors, TensorBoard logs): ")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    train(make_config(data_root, iterations=2), out, resume=out / ".." / out.name / LAST, progress=False)  # its own
    assert load_ckpt(out / LAST)["iteration"] == 2


def test_a_data_worker_error_is_one_line_and_the_run_exits(tmp_path):
    """An unreadable training image in a worker process: one line naming it, exit 2, no hang (the
    workers, which ignore SIGTERM, are shut down by the trainer, not left to interpreter exit)."""
    root = make_pairs(tmp_path / "pairs", count=1)
    image = root / "input" / "0.png"
    image.write_bytes(image.read_bytes()[:120])  # truncated
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(config_dict(root, data={"num_workers": 1, "check_files": False})))
    env = subprocess_env()
    result = subprocess.run([sys.executable, "-m", "nerdrain.cli", "train", str(config), "--out", str(tmp_path / "run"),
                             "-q"], env=env, capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: training data: ") and str(image) in lines[0]


def test_bad_files_are_named_before_training_starts(tmp_path):
    """Found when first drawn, a bad file would stop a run hours in: every training and validation
    file is read at the start (a truncated PNG cut in its pixels, past the header Image.open reads,
    a pair of two sizes, a palette clean image validation cannot score), all named in one line."""
    root = make_pairs(tmp_path / "pairs", count=3)
    cut = root / "input" / "1.png"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size * 2 // 3])
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(root / "target" / "2.png")  # input is 52 wide
    val = make_pairs(tmp_path / "val", count=2)
    Image.open(val / "target" / "0.png").convert("P").save(val / "target" / "0.png")
    cfg = make_config(root, val={"root": str(val)})
    with pytest.raises(ValueError, match=r"^3 training or validation file\(s\) cannot be used") as err:
        Trainer(cfg, tmp_path / "run", progress=False)
    message = str(err.value)
    assert "\n" not in message and f"{cut}: cannot read the image" in message
    assert f"input {root / 'input' / '2.png'} is 52x40 but target {root / 'target' / '2.png'} is 50x40" in message
    assert f"{val / 'target' / '0.png'}: a palette image" in message
    assert not (tmp_path / "run").exists()  # files written just now are not recorded: no record, no folder
    Trainer(make_config(root, val={"root": str(val)}, data={"check_files": False}), tmp_path / "run", progress=False)


@pytest.fixture
def content_reads(monkeypatch, exact_timestamps):
    """The files the start's check reads (training files, validation pairs' files), in order."""
    import nerdrain.data.datasets as datasets_module
    import nerdrain.evaluate as evaluate_module
    reads: list[Path] = []

    def counted(read, files):
        def wrapper(item, *args, **kwargs):
            reads.extend(files(item))
            return read(item, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(datasets_module, "image_size", counted(datasets_module.image_size, lambda path: [path]))
    monkeypatch.setattr(evaluate_module, "load_pair",
                        counted(evaluate_module.load_pair, lambda pair: [pair.input, pair.target]))
    return reads


def rewrite_png(path: Path, value: int, mtime_ns: int | None = None) -> None:
    """New pixels, same image size; the modification time set to ``mtime_ns`` where given."""
    Image.fromarray(np.full((40, 52, 3), value, np.uint8)).save(path)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def test_a_restart_reads_only_the_files_changed_since_the_last_check(tmp_path, content_reads):
    """A resumed run re-reads no file the last start checked unless its size, modification or change
    time differs: new bytes with a new mtime, new bytes with size and mtime put back (the change time
    still moves), an added pair; a removed pair leaves nothing to read. A start stopped by a bad file
    records the good ones: once it is fixed, it alone is read."""
    root = make_pairs(tmp_path / "pairs", count=3)
    val = make_pairs(tmp_path / "val", count=2, seed=1)
    cfg = make_config(root, iterations=1, val={"root": str(val)})
    out = tmp_path / "run"
    train(cfg, out, progress=False)
    all_files = {*root.rglob("*.png"), *val.rglob("*.png")}
    assert set(content_reads) == all_files  # the first start reads everything

    def reads_at_restart() -> set[Path]:
        content_reads.clear()
        Trainer(cfg, out, progress=False, resume=True).train()  # the record is written when training starts
        return set(content_reads)

    assert reads_at_restart() == set()
    changed = root / "input" / "1.png"
    rewrite_png(changed, 7, changed.stat().st_mtime_ns + 10**9)
    changed_val = val / "target" / "0.png"
    rewrite_png(changed_val, 9, changed_val.stat().st_mtime_ns + 10**9)
    assert reads_at_restart() == {changed, val / "input" / "0.png", changed_val}
    assert reads_at_restart() == set()

    for name in ("input", "target"):
        Image.fromarray(np.zeros((40, 52, 3), np.uint8)).save(root / name / "3.png")
    assert reads_at_restart() == {root / "input" / "3.png", root / "target" / "3.png"}
    for name in ("input", "target"):
        (root / name / "0.png").unlink()
    assert reads_at_restart() == set()

    corrupted = root / "target" / "2.png"  # a pixel byte changed in place, size and mtime put back
    before = corrupted.stat()
    data = bytearray(corrupted.read_bytes())
    data[-40] ^= 0xFF
    time.sleep(0.01)
    corrupted.write_bytes(bytes(data))
    os.utime(corrupted, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert corrupted.stat().st_size == before.st_size
    also_changed = root / "input" / "2.png"
    rewrite_png(also_changed, 3, also_changed.stat().st_mtime_ns + 10**9)
    content_reads.clear()
    with pytest.raises(ValueError, match=r"^1 training or validation file\(s\) cannot be used"):
        Trainer(cfg, out, progress=False, resume=True)
    assert set(content_reads) == {corrupted, also_changed}
    rewrite_png(corrupted, 5)  # fixed: the failed start recorded the good files, not read again
    assert reads_at_restart() == {corrupted}


def npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@pytest.mark.parametrize("content", [b"", b"not a record", b"PK\x03\x04 cut short", npz_bytes(other=np.zeros(3)),
                                     npz_bytes(version=np.array(1), keys=np.zeros(2), results=np.zeros((2, 2)))])
def test_a_broken_or_foreign_check_record_is_ignored(tmp_path, content_reads, content):
    """A record that cannot be read (emptied, another program's file, a truncated archive, one
    from another version) is no reason to stop: the files are all checked again."""
    root = make_pairs(tmp_path / "pairs", count=2)
    cfg = make_config(root, iterations=1)
    out = tmp_path / "run"
    train(cfg, out, progress=False)
    records = list((out / CHECKED_FILES).iterdir())
    assert records
    for record in records:
        record.write_bytes(content)
    content_reads.clear()
    Trainer(cfg, out, progress=False, resume=True)
    assert set(content_reads) == set(root.rglob("*.png"))


def test_a_check_record_of_another_version_is_ignored(tmp_path, content_reads, monkeypatch):
    root = make_pairs(tmp_path / "pairs", count=2)
    cfg = make_config(root, iterations=1)
    out = tmp_path / "run"
    train(cfg, out, progress=False)
    monkeypatch.setattr(checked_module, "VERSION", checked_module.VERSION + 1)
    content_reads.clear()
    Trainer(cfg, out, progress=False, resume=True)
    assert set(content_reads) == set(root.rglob("*.png"))


def test_a_bad_file_found_mid_run_keeps_the_iterations_done(tmp_path, capsys):
    """The iterations since the last checkpoint are complete when a bad file is drawn: they are
    checkpointed before the error, and --resume goes on from there once the file is fixed."""
    root = make_pairs(tmp_path / "pairs", count=3)
    cfg = make_config(root, iterations=12, checkpoint_every=100, data={"check_files": False})  # found when drawn
    stream = build_stream(cfg)
    names = [pair.name for pair in stream.sources[0].pairs]
    bad = stream.choose(3)[1]  # what sample 3 (iteration 4, batch 1) draws
    first = next(n for n in range(cfg.iterations) if stream.choose(n)[1] == bad)
    assert first >= 1, "the seed draws the bad pair at once: pick another sample to break"
    image = root / "input" / f"{names[bad]}.png"
    intact = image.read_bytes()
    image.write_bytes(intact[:120])  # truncated
    out = tmp_path / "run"
    with pytest.raises(Exception, match=re.escape(str(image))):
        train(cfg, out, progress=False)
    assert load_ckpt(out / LAST)["iteration"] == first
    assert f"note: iteration {first} checkpointed in {out / LAST}" in capsys.readouterr().err
    image.write_bytes(intact)
    train(cfg, out, progress=False, resume=True)
    assert load_ckpt(out / LAST)["iteration"] == cfg.iterations


def test_a_bad_validation_file_keeps_the_iterations_done(tmp_path, data_root, capsys):
    """Validation finds an unreadable image (at iteration 2, hours in for a real run): one line
    naming it, and the iterations done are checkpointed first, so --resume goes on once it is fixed."""
    val = make_pairs(tmp_path / "val", count=2)
    image = val / "input" / "1.png"
    intact = image.read_bytes()
    image.write_bytes(intact[:120])  # truncated
    cfg = make_config(data_root, val={"root": str(val), "every": 2}, checkpoint_every=100,
                      data={"check_files": False})  # found at the first validation
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"^validation: 1 of 2 image\(s\) could not be scored") as err:
        train(cfg, out, progress=False)
    assert str(image) in str(err.value) and "\n" not in str(err.value)
    assert load_ckpt(out / LAST)["iteration"] == 2
    assert f"note: iteration 2 checkpointed in {out / LAST}" in capsys.readouterr().err
    image.write_bytes(intact)
    train(cfg, out, progress=False, resume=True)
    assert load_ckpt(out / LAST)["iteration"] == cfg.iterations and (out / BEST).is_file()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_only_a_lost_connection_is_told_as_another_process_stopping():
    """A backend's own fault (NCCL reporting a CUDA error) is this process's error: replacing it by
    'another process stopped' would leave every process silent about the cause."""
    from nerdrain.training import _lost_a_process

    assert _lost_a_process(torch.distributed.DistNetworkError("Connection closed by peer [10.0.0.2]:29500"))
    assert _lost_a_process(RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection reset by peer"))
    assert not _lost_a_process(torch.distributed.DistBackendError("CUDA error: an illegal memory access"))
    assert not _lost_a_process(RuntimeError("Expected all tensors to be on the same device"))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_under_torchrun_a_process_that_loses_another_says_so_in_one_line(tmp_path):
    """Rank 1 draws a bad file: it reports it; rank 0, whose next collective then fails, says in
    one line that another process stopped, instead of a traceback from inside DDP."""
    root = make_pairs(tmp_path / "pairs", count=6)  # pairs are first drawn in epoch 0: at samples 0-5
    base = config_dict(root, iterations=12, checkpoint_every=100, data={"check_files": False})  # found when drawn
    stream = build_stream(from_dict(TrainConfig, base))
    first_draw = {}
    for n in range(2 * base["iterations"]):  # 2 processes x batch 1: rank n % 2 reads sample n
        first_draw.setdefault(stream.choose(n)[1], n)
    bad = next((item for item, n in first_draw.items() if n % 2 == 1 and n >= 3), None)
    assert bad is not None, "rank 1 draws no pair first: pick another seed"
    names = [pair.name for pair in stream.sources[0].pairs]
    image = root / "input" / f"{names[bad]}.png"
    image.write_bytes(image.read_bytes()[:120])  # truncated
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(base))
    env = subprocess_env()
    cmd = [*torchrun(tmp_path), "-m", "nerdrain.cli", "train", str(cfg_path), "--out", str(tmp_path / "run"), "-q"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode != 0
    # before torchrun's own report: a path in it (PyTorch 2.13), or its logger's name (2.2)
    ours = re.split(r"torch[/.]distributed[/.]elastic", result.stderr)[0]
    errors = [line for line in ours.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in ours and len(errors) == 2, result.stderr[-3000:]
    assert errors[0].startswith("error: training data: ") or str(image) in errors[0], errors
    iteration = first_draw[bad] // 2 + 1
    assert errors[1] == (f"error: another process of the job stopped during iteration {iteration} (its message "
                         "says why); this one stops too: continue from the last checkpoint with --resume")


@pytest.mark.parametrize("content, problem", [
    (b"PK\x03\x04 and then nothing", "truncated or damaged: a zip archive"),
    (b"garbage", "not a training checkpoint of nerd-rain train"),
    (b"", "not a training checkpoint of nerd-rain train"),
])
def test_resume_from_a_broken_checkpoint_is_one_line(tmp_path, data_root, content, problem):
    out = tmp_path / "run"
    out.mkdir()
    (out / LAST).write_bytes(content)
    with pytest.raises(CheckpointError, match=problem) as err:
        Trainer(make_config(data_root), out, progress=False, resume=True)
    assert str(out / LAST) in str(err.value) and "\n" not in str(err.value)


def test_resume_from_weights_or_another_model_is_refused(tmp_path, data_root, straight_run):
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        Trainer(make_config(data_root), tmp_path / "a", progress=False, resume=straight_run / "final.safetensors")
    other = make_config(data_root, model={"overrides": {**TINY["overrides"], "dim": 16}})
    with pytest.raises(CheckpointError, match="resume with the config it was trained with"):
        Trainer(other, tmp_path / "b", progress=False, resume=straight_run / LAST)


def test_resume_past_the_configured_iterations_is_refused_and_a_finished_run_says_so(tmp_path, data_root,
                                                                                     straight_run, capsys):
    """A checkpoint at iteration 4 cannot become a 2-iteration run: refused in one line naming both
    numbers, nothing written (else final.safetensors would hold 4 iterations beside a config.yaml
    saying 2). Resuming a finished run trains nothing and says so."""
    with pytest.raises(CheckpointError, match=re.escape(f"{straight_run / LAST}: the run is at iteration 4, past "
                                                        "iterations (2); set iterations to 4 or more")):
        Trainer(make_config(data_root, iterations=2), tmp_path / "short", progress=False, resume=straight_run / LAST)
    assert not (tmp_path / "short").exists()
    out = tmp_path / "run"
    train(make_config(data_root, iterations=2), out, progress=False)
    final = load_file(out / FINAL)
    capsys.readouterr()
    train(make_config(data_root, iterations=2), out, progress=False, resume=True)
    assert "resumed at iteration 2 of 2: the run is complete, nothing to train" in capsys.readouterr().out
    assert_same(load_file(out / FINAL), final, "final")
    assert load_ckpt(out / LAST)["iteration"] == 2


def test_resume_with_changed_settings_says_so(tmp_path, data_root, straight_run, capsys):
    Trainer(make_config(data_root, seed=99, iterations=8), tmp_path / "a", progress=False,
            resume=straight_run / LAST)
    out = capsys.readouterr().out
    assert "note: resuming with changed settings (seed: 1234 -> 99)" in out and "iterations" not in out


def test_resume_with_other_speed_and_memory_settings_has_no_note(tmp_path, data_root, straight_run, capsys):
    """Compiling, channels-last, activation checkpointing and CUDA graphs change what a step costs,
    not what it computes (up to rounding, as another device does): moving a run to a smaller GPU
    with activation checkpointing on is no change of the run to warn of."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cuda_graphs without CUDA says so
        Trainer(make_config(data_root, compile=True, channels_last=True, activation_checkpointing=True,
                            cuda_graphs=True), tmp_path / "a", progress=False, resume=straight_run / LAST)
    assert "changed settings" not in capsys.readouterr().out


def test_resume_steps_with_the_optimiser_settings_of_the_new_config(tmp_path, data_root, straight_run):
    """The note above says the run goes on differently; it must, with the settings it names."""
    optim = {"betas": [0.5, 0.6], "eps": 1e-3, "weight_decay": 0.25}
    trainer = Trainer(make_config(data_root, iterations=5, optim=optim), tmp_path, progress=False,
                      resume=straight_run / LAST)
    seen = []
    trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.extend(opt.param_groups))
    trainer.train()
    assert seen and all((tuple(g["betas"]), g["eps"], g["weight_decay"]) == ((0.5, 0.6), 1e-3, 0.25)
                        for g in seen)


def test_resume_with_another_global_batch_reads_on_from_the_next_sample(tmp_path, data_root, monkeypatch, capsys):
    """The stream is numbered by sample: 2 iterations at batch 2 read samples 0-3, so the resumed
    run at batch 1 reads 4, 5 (not 2, 3 again), and says that the global batch changed."""
    from nerdrain.data.datasets import TrainingStream

    drawn = []
    real_getitem = TrainingStream.__getitem__
    monkeypatch.setattr(TrainingStream, "__getitem__", lambda self, n: drawn.append(n) or real_getitem(self, n))
    out = tmp_path / "run"
    train(make_config(data_root, iterations=2, data={"batch_size": 2}), out, progress=False)
    assert drawn == [0, 1, 2, 3]
    drawn.clear()
    capsys.readouterr()
    train(make_config(data_root, iterations=4), out, progress=False, resume=True)
    assert drawn == [4, 5]
    assert load_ckpt(out / LAST)["samples"] == 6
    note = capsys.readouterr().out
    assert "note: the global batch changes from 2 (2 per process x 1 process) to 1 (1 x 1)" in note
    assert "batch_size" not in note  # said once, as the global batch


@pytest.mark.parametrize("overrides", [{"bogus": 3}, {"dim": 7}, {"dim": -1}, {"depths": [1]}])
def test_model_overrides_that_cannot_build_fail_at_start(tmp_path, data_root, overrides):
    cfg = make_config(data_root, model={"overrides": {**TINY["overrides"], **overrides}})
    with pytest.raises(ConfigError, match="config.model: nerd_rain_s with overrides .* does not build"):
        Trainer(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not hasattr(signal, "set_wakeup_fd") or os.name != "posix", reason="POSIX signals")
def test_a_second_ctrl_c_aborts_even_during_one_long_operation(tmp_path):
    """Inside one long operation Python's handler waits (and merges repeated signals): the watcher
    thread sees the second Ctrl-C and ends the process, instead of the operation running on."""
    script = tmp_path / "long.py"
    script.write_text(
        "import sys, time, torch\n"
        "from nerdrain.training import StopSignals\n"
        "torch.set_num_threads(1)\n"
        "a = torch.randn(9000, 9000)\n"
        "with StopSignals(announce=False):\n"
        "    print('ready', flush=True)\n"
        "    started = time.monotonic()\n"
        "    a @ a  # about 10 s on one core, all inside one call\n"
        "    print('finished after', time.monotonic() - started, flush=True)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        time.sleep(2.0)  # a second or more later is an abort; the exact 1 s threshold is tested on a fake clock
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "finished" not in out, f"the operation ran to its end ({out.strip()}): no abort"
    assert proc.returncode == 130 and "SIGINT again: aborting without a checkpoint" in err
    assert took < 5


@pytest.mark.skipif(not hasattr(signal, "SIGCHLD"), reason="POSIX signals")
def test_other_signals_do_not_turn_one_ctrl_c_into_an_abort(tmp_path):
    """DataLoader workers make torch handle SIGCHLD in Python: a child exiting before the one
    Ctrl-C must not count as the first of two (the watcher would abort the graceful stop)."""
    script = tmp_path / "one.py"
    script.write_text(
        "import os, signal, subprocess, time\n"
        "from nerdrain.training import StopSignals\n"
        "signal.signal(signal.SIGCHLD, lambda *a: None)  # as torch's DataLoader does\n"
        "with StopSignals(announce=False) as signals:\n"
        "    subprocess.run(['true'])\n"
        "    time.sleep(1.5)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(2.5)  # the graceful stop: finishing the iteration, writing the checkpoint\n"
        "    print('stopped gracefully', signals.received == signal.SIGINT, flush=True)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "stopped gracefully True" in result.stdout, result.stderr


def _socket_binds(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.bind(str(path))
        except OSError:
            return False
    path.unlink()
    return True


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="no Unix sockets here")
def test_a_temporary_folder_too_long_for_the_workers_sockets_is_refused_not_a_hang(tmp_path, monkeypatch, data_root):
    """Data workers hand batches over through Unix sockets that multiprocessing makes in
    TMPDIR/pymp-XXXXXXXX/listener-XXXXXXXX; past the system's length limit the worker fails to make
    one and the run waited forever for its first batch. The limit is the system's own: a real
    socket of that shape binds in the longest folder allowed and fails in one a byte longer."""
    def folder_of_length(n: int) -> Path:
        base = str(tmp_path / "t")
        path = Path(base + "x" * (n - len(os.fsencode(base))))
        (path / "pymp-12345678").mkdir(parents=True)
        return path

    longest = max_temp_dir_for_workers()
    assert len(os.fsencode(str(tmp_path))) + 3 < longest, "pytest's folder is already too long for this test"
    fits, too_long = folder_of_length(longest), folder_of_length(longest + 1)
    assert _socket_binds(fits / "pymp-12345678" / "listener-12345678")
    assert not _socket_binds(too_long / "pymp-12345678" / "listener-12345678")

    monkeypatch.setattr(tempfile, "tempdir", str(too_long))
    cfg = make_config(data_root, iterations=1, data={"num_workers": 1})
    with pytest.raises(ConfigError, match=re.escape(f"data.num_workers: the temporary folder {too_long}")) as err:
        train(cfg, tmp_path / "run", progress=False)
    assert "TMPDIR" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run" / LAST).exists()
    train(make_config(data_root, iterations=1), tmp_path / "run0", progress=False)  # no workers, no sockets
    assert (tmp_path / "run0" / FINAL).exists()


def test_a_restart_says_how_many_files_it_did_not_read_again(tmp_path, exact_timestamps, capsys):
    """A resume's start in seconds is told from a check that read nothing: one note counts the files
    the record let pass unread (a validation pair's two files count as two; one changed file
    makes its pair read again)."""
    root = make_pairs(tmp_path / "pairs", count=3)
    val = make_pairs(tmp_path / "val", count=2, seed=1)
    cfg = make_config(root, iterations=1, val={"root": str(val)})
    out = tmp_path / "run"
    train(cfg, out, progress=False)
    assert "not read again" not in capsys.readouterr().out  # nothing recorded before the first start
    Trainer(cfg, out, progress=False, resume=True)
    assert "note: 10 of 10 training and validation files not read again: unchanged since the last check" \
        in capsys.readouterr().out
    changed = val / "input" / "1.png"
    rewrite_png(changed, 7, changed.stat().st_mtime_ns + 10**9)
    Trainer(cfg, out, progress=False, resume=True)
    assert "note: 8 of 10 training and validation files not read again" in capsys.readouterr().out


def test_a_failed_first_start_records_the_files_that_passed(tmp_path, content_reads):
    """A first start stopped by a bad file, in a run folder it would have made, still records the
    good files there: once the bad one is fixed, the next start reads it alone. The folder then
    holds no earlier run, so a start without --resume is not refused."""
    root = make_pairs(tmp_path / "pairs", count=3)
    bad = root / "input" / "1.png"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    cfg = make_config(root, iterations=1)
    out = tmp_path / "new" / "run"
    with pytest.raises(ValueError, match=r"^1 training or validation file\(s\) cannot be used"):
        Trainer(cfg, out, progress=False)
    assert [p.relative_to(out).parts[0] for p in out.rglob("*") if p.is_file()] == [CHECKED_FILES]
    rewrite_png(bad, 5)
    content_reads.clear()
    Trainer(cfg, out, progress=False)
    assert content_reads == [bad]


class _InfiniteGradient(torch.autograd.Function):
    """The identity, whose backward overflows: a finite loss with infinite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def fault_loss_at(monkeypatch, iteration: int, fault: str) -> None:
    """The loss of ``iteration`` made ``fault``: "nan", "inf", or "gradient" (finite, but its
    gradients infinite)."""
    from nerdrain.losses import NeRDRainLoss

    real_forward = NeRDRainLoss.forward
    calls = []

    def faulty_forward(self, outputs, target):
        total, parts = real_forward(self, outputs, target)
        calls.append(1)
        if len(calls) == iteration:
            total = _InfiniteGradient.apply(total) if fault == "gradient" else total * float(fault)
            parts = {**parts, "total": total.detach()}
        return total, parts

    monkeypatch.setattr(NeRDRainLoss, "forward", faulty_forward)


@pytest.mark.parametrize("fault", ["nan", "inf", "gradient"])
def test_a_diverging_run_stops_naming_the_iteration_and_keeps_the_last_good_checkpoint(tmp_path, data_root,
                                                                                         monkeypatch, fault):
    """The loss of iteration 3 is not finite (or iteration 4's is, but its gradients overflow): the
    run stops at the next check (iteration 4: logged and checkpointed) with one line naming the
    iteration, and last.pt still holds iteration 2's finite weights, not the ruined ones of 4."""
    fault_loss_at(monkeypatch, 4 if fault == "gradient" else 3, fault)
    out = tmp_path / "run"
    cfg = make_config(data_root, iterations=6, log_every=4, checkpoint_every=2)
    expected = ("the weights are not finite after the step of iteration 4 (its loss was finite)"
                if fault == "gradient" else f"the loss is {fault} at iteration 3")
    with pytest.raises(ValueError, match=re.escape(expected)) as err:
        train(cfg, out, progress=False)
    assert "\n" not in str(err.value) and f"{out / LAST} holds iteration 2" in str(err.value)
    state = load_ckpt(out / LAST)
    assert state["iteration"] == 2 and all(t.isfinite().all() for t in state["model"].values())
    assert not (out / FINAL).exists()


@pytest.mark.parametrize("rank", [0, 1])
def test_under_ddp_a_loss_that_is_not_finite_in_any_process_stops_them_all(tmp_path, data_root, monkeypatch, rank):
    """Each process sees only its own batch's loss: they exchange the first iteration each found
    not finite, and all stop naming the earliest (rank 1's iteration 5 before rank 0's 7), said
    once, by process 0."""
    import nerdrain.training as training

    trainer = Trainer(make_config(data_root), tmp_path / "run", progress=False)
    trainer.dist = training.DistInfo(rank=rank, world_size=2)
    found = {0: (7, math.nan), 1: (5, -math.inf)}
    trainer.iteration = found[rank][0]
    trainer._watch_loss(torch.tensor(found[rank][1]))
    trainer.iteration = 8

    def all_gather(out, tensor, group=None):
        out[:] = [tensor if r == rank else torch.tensor(found[r], dtype=tensor.dtype) for r in range(2)]

    monkeypatch.setattr(training.dist, "all_gather", all_gather)
    expected = "the loss is -inf at iteration 5: training diverged; " + re.escape(f"{tmp_path / 'run' / LAST}") + \
        " holds iteration 4"
    with pytest.raises(training.ReportedElsewhere if rank else training.TrainingDiverged, match=expected):
        trainer._stop_if_diverged(4)


def test_a_bad_file_after_a_diverged_iteration_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """An error found between checks (a bad file drawn) checkpoints the iterations done, but not
    when the loss was not finite meanwhile: then it says so, and last.pt stays the good one."""
    root = make_pairs(tmp_path / "pairs", count=6, size=(32, 32))
    cfg = make_config(root, iterations=12, checkpoint_every=4, log_every=100, data={"check_files": False})
    stream = build_stream(cfg)
    name = stream.sources[0].pairs[stream.choose(5)[1]].name  # drawn first by iteration 6: epoch 0 draws each once
    (root / "input" / f"{name}.png").write_bytes(b"not a png")
    fault_loss_at(monkeypatch, 5, "nan")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=re.escape(f"{name}.png")):
        train(cfg, out, progress=False)
    assert load_ckpt(out / LAST)["iteration"] == 4
    assert f"note: the loss is nan at iteration 5: training diverged; {out / LAST} holds iteration 4" \
        in capsys.readouterr().err


@pytest.mark.parametrize("channel", ["tensorboard", "stdout"])
def test_a_log_that_cannot_be_written_keeps_the_iterations_done(tmp_path, data_root, monkeypatch, channel):
    """A full disk or quota under the TensorBoard logs or the job's output file (often another
    filesystem than the run's) stops the run at a log, hours after the last checkpoint maybe: the
    iterations done are checkpointed first, as for a bad file, and --resume goes on from there."""
    import errno
    import nerdrain.training as training
    from torch.utils.tensorboard import SummaryWriter

    full = OSError(errno.ENOSPC, "No space left on device")
    if channel == "tensorboard":
        real_add_scalar = SummaryWriter.add_scalar

        def add_scalar(self, tag, value, step=None, *args, **kwargs):
            if step == 3:
                raise full
            return real_add_scalar(self, tag, value, step, *args, **kwargs)

        monkeypatch.setattr(SummaryWriter, "add_scalar", add_scalar)
    else:
        real_write = training.tqdm.write

        def write(message, *args, **kwargs):
            if message.startswith("iter 3/"):
                raise full
            return real_write(message, *args, **kwargs)

        monkeypatch.setattr(training.tqdm, "write", write)
    out = tmp_path / "run"
    cfg = make_config(data_root, checkpoint_every=100)
    with pytest.raises(OSError, match="No space left on device"):
        train(cfg, out, progress=False)
    assert load_ckpt(out / LAST)["iteration"] == 3


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_during_the_start_check_keeps_what_it_read(tmp_path, content_reads, monkeypatch, signum):
    """Ctrl-C or a preemption's SIGTERM during the start's check of a large set (minutes for
    SPA-Data) ends the start (exit 130 or 143 from the CLI), recording the files read so far: the
    next start reads only the rest."""
    import nerdrain.data.datasets as datasets_module

    root = make_pairs(tmp_path / "pairs", count=3)
    cfg = make_config(root, iterations=1)
    counted_read = datasets_module.image_size

    def read_then_signal(path, *args, **kwargs):
        result = counted_read(path, *args, **kwargs)
        if len(content_reads) == 3:
            os.kill(os.getpid(), signum)  # the third read's result is lost with it
        return result

    class Unhandled(BaseException):
        """Raised by the test's own handler: a SIGTERM that train() leaves to it must not end pytest."""

    def unhandled(*args):
        raise Unhandled

    monkeypatch.setattr(datasets_module, "image_size", read_then_signal)
    # Ctrl-C's handler is Python's own, which a process started in the background (SIGINT ignored,
    # as by `cmd &` in a script) does not have: there the test failed, training to the end.
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, unhandled),
                signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler)}
    try:
        with pytest.raises(KeyboardInterrupt) as stop:
            train(cfg, tmp_path / "run", progress=False)
    finally:
        for signum_set, handler in previous.items():
            signal.signal(signum_set, handler)
    assert getattr(stop.value, "signum", signal.SIGINT) == signum
    assert signal.getsignal(signal.SIGTERM) is previous[signal.SIGTERM]
    monkeypatch.setattr(datasets_module, "image_size", counted_read)
    first_reads = list(content_reads)
    content_reads.clear()
    Trainer(cfg, tmp_path / "run", progress=False)
    assert set(content_reads) == set(root.rglob("*.png")) - set(first_reads[:2])

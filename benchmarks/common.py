"""Shared helpers for the NeRD-Rain benchmarks: machine info, settings, timing, JSON output.

Every record a benchmark prints is one JSON object per line (JSON Lines) holding the machine and
library information, the exact settings and the measurement, so results from different machines
can be concatenated and compared.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT / "src"))

DTYPES = ("fp32", "tf32", "bf16")
VARIANTS = ("nerd_rain", "nerd_rain_s")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def code_info() -> dict:
    """Which nerdrain is being measured: its path and, in a git checkout, the commit and dirtiness."""
    import nerdrain

    path = Path(nerdrain.__file__).resolve().parent
    info = {"nerdrain_path": str(path), "git_commit": None, "git_dirty": None}
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=20)
        if rev.returncode == 0:
            info["git_commit"] = rev.stdout.strip()
            status = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=path,
                                    capture_output=True, text=True, timeout=20)
            info["git_dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def machine_info(device: torch.device) -> dict:
    info = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cuda_available": torch.cuda.is_available(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({
            "cuda_device": props.name,
            "cuda_capability": f"{props.major}.{props.minor}",
            "cuda_memory_gib": round(props.total_memory / 2**30, 1),
            "cuda_runtime": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "nvidia_driver": _nvidia_driver(),
            "triton": _version_of("triton"),
        })
    return info


def _version_of(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def add_common_args(parser: argparse.ArgumentParser, released_form: bool = True) -> None:
    """The flags every benchmark shares; ``released_form``: whether it can time the baseline twin."""
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--variant", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--dtype", nargs="+", default=None, choices=DTYPES,
                        help="fp32, tf32 (CUDA matmul/conv TF32), bf16 (autocast); default fp32 on CPU, "
                             "all three on CUDA")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--cuda-graphs", action="store_true", help="CUDA-graph the step (CUDA only)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (median reported)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up iterations")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="also append the JSON lines to this file")
    parser.add_argument("--label", default=None, help="free-form label stored in every record")
    parser.add_argument("--no-split-gram", action="store_true",
                        help="compute attention's q k^T in one reduction over the pixels on CUDA too")
    parser.add_argument("--no-bands", action="store_true",
                        help="run inference on large maps whole, not in bands of rows")
    parser.add_argument("--no-triton-ln", action="store_true",
                        help="LayerNorm by PyTorch's kernel on CUDA too, not the Triton one")
    if released_form:
        parser.add_argument("--released-form", action="store_true",
                            help="time the baseline: the network in the released code's forms (released_form.py), "
                                 "bare, NCHW, no allocator tuning, plain Adam")


# --dtype to optimize_for_inference's dtype argument
INFERENCE_DTYPES = {"fp32": None, "tf32": "tf32", "bf16": torch.bfloat16}


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    return dev


def setup(args: argparse.Namespace) -> torch.device:
    if getattr(args, "released_form", False):
        ours = [flag for flag in ("compile", "cuda_graphs", "channels_last", "activation_checkpointing")
                if getattr(args, flag, False)]
        if ours:
            raise SystemExit(f"--released-form times the released code as it runs; drop --{ours[0].replace('_', '-')}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.dtype is None:
        args.dtype = ["fp32", "tf32", "bf16"] if device.type == "cuda" else ["fp32"]
    if args.repeats is None:
        args.repeats = 20 if device.type == "cuda" else 3
    if args.warmup is None:
        args.warmup = 5 if device.type == "cuda" else 1
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    from nerdrain.models import blocks

    if args.no_split_gram:
        blocks.SPLIT_GRAM_DEVICES = set()
    if args.no_bands:
        blocks.BAND_PIXELS = 1 << 62
    if args.no_triton_ln:
        blocks.triton_ln.DEVICES.clear()
    return device


@contextlib.contextmanager
def precision(dtype: str, device: torch.device):
    """fp32 (TF32 off), tf32 (TF32 on for matmul and cuDNN), bf16 (autocast, TF32 off)."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    tf32 = dtype == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        if dtype == "bf16":
            # No weight-cast cache: it is unsafe under CUDA-graph capture and each weight is
            # used once per forward anyway.
            with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> dict:
    """Warm up, then time ``repeats`` calls (synchronised on CUDA); seconds."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "repeats": repeats,
        "warmup": warmup,
        "times_s": [round(t, 6) for t in times],
    }


def max_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _proc_status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs``); False where that is impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _mallinfo2() -> Callable[[], _MallInfo2] | None:
    try:
        mallinfo2 = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    return mallinfo2


def heap_in_use_bytes() -> int | None:
    """Bytes glibc malloc has handed out and not had back (all arenas and mmapped blocks), or None
    without glibc >= 2.33. Unlike RSS it ignores freed memory the allocator keeps."""
    mallinfo2 = _mallinfo2()
    if mallinfo2 is None:
        return None
    info = mallinfo2()
    return info.uordblks + info.hblkhd


class PeakHeap(TorchDispatchMode):
    """Highest :func:`heap_in_use_bytes` after any operator inside the block: on the CPU the
    counterpart of CUDA's ``max_memory_allocated`` (tensors, plus the libraries' own buffers)."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = heap_in_use_bytes() or 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, heap_in_use_bytes() or 0)
        return out


def current_rss_bytes() -> int | None:
    return _proc_status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """Peak RSS since start or the last :func:`reset_peak_rss` (VmHWM), else ``ru_maxrss``."""
    hwm = _proc_status_bytes("VmHWM")
    return hwm if hwm is not None else max_rss_bytes()


def run_in_subprocess(script: Path, argv: list[str]) -> list[dict]:
    """Run a benchmark script's own measurement in a fresh interpreter; return its JSON records."""
    out = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True)
    if out.returncode != 0:
        return [{"error": (out.stderr or out.stdout).strip().splitlines()[-1:] or ["failed"]}]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def emit(record: dict, output: str | None = None) -> None:
    line = json.dumps(record, sort_keys=False)
    print(line, flush=True)
    if output:
        with open(output, "a") as f:
            f.write(line + "\n")


def settings(args: argparse.Namespace, **extra) -> dict:
    keys = ("compile", "cuda_graphs", "channels_last", "repeats", "warmup", "threads", "seed", "label",
            "no_split_gram", "no_bands", "no_triton_ln", "released_form")
    env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "THP_MEM_ALLOC_ENABLE")
           if k in os.environ}
    return {**{k: getattr(args, k, None) for k in keys}, **extra, "env": env, "code": code_info()}


def build_model(variant: str, device: torch.device, seed: int = 0, released_form: bool = False) -> torch.nn.Module:
    """A randomly initialised variant (speed does not depend on the weights), in the released
    code's forms where asked (the baseline)."""
    from nerdrain import create_model

    torch.manual_seed(seed)
    model = create_model(variant).to(device)
    if released_form:
        from released_form import to_released_form

        to_released_form(model)
    return model

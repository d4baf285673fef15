"""Which device to run on: one place that turns the user's choice into a ``torch.device`` or a
one-line error (the library's modules all take devices through it)."""

from __future__ import annotations

import torch


def resolve_device(spec: str | int | torch.device | None = "auto") -> torch.device:
    """``None``/``"auto"``: CUDA if available, else MPS if available, else CPU.

    Explicit ``"cuda"``, ``"cuda:N"`` (or ``N``, as PyTorch reads it) or ``"mps"`` that is not
    available, and devices we do not run on (``meta``, ``xpu``, ...), given as a string or as a
    ``torch.device``, raise ``ValueError`` with a one-line explanation.
    """
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = torch.device("cuda", spec) if spec >= 0 else f"{spec}"
    if isinstance(spec, torch.device):
        dev = spec
    elif spec is not None and not isinstance(spec, str):
        raise ValueError(f"unknown device {spec!r} (use auto, cpu, cuda, cuda:N or mps)")
    else:
        s = (spec or "auto").strip().lower()
        if s == "auto":
            if torch.cuda.is_available():
                return torch.device("cuda")
            if _mps_available():
                return torch.device("mps")
            return torch.device("cpu")
        try:
            dev = torch.device(s)
        except (RuntimeError, ValueError):
            raise ValueError(f"unknown device {spec!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if dev.type not in ("cpu", "cuda", "mps"):  # torch knows more (xpu, meta, ...); we run on these
        raise ValueError(f"unsupported device {str(spec)!r} (use auto, cpu, cuda, cuda:N or mps)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(spec)!r} requested but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(spec)!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type == "mps" and not _mps_available():
        raise ValueError(f"device {str(spec)!r} requested but MPS is not available")
    return dev


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())

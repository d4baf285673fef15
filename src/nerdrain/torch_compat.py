"""Small checks whose PyTorch API differs across the versions this package supports (>= 2.2)."""

from __future__ import annotations

import contextlib

import torch

#: What PyTorch raises when a device runs out of memory: ``torch.OutOfMemoryError`` from 2.5, the same
#: class under ``torch.cuda`` before (2.2 has only that one)
OutOfMemoryError: type[RuntimeError] = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def is_compiling() -> bool:
    """Whether ``torch.compile`` is tracing the current call (``False`` where it cannot say)."""
    return getattr(torch.compiler, "is_compiling", lambda: False)()


def autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # PyTorch < 2.4 takes no device
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    except RuntimeError:  # a device autocast does not know (meta, ...): never on there
        return False


def no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off for ``device_type`` where it is on (an op that must see its inputs' own dtypes)."""
    return torch.autocast(device_type, enabled=False) if autocast_enabled(device_type) else contextlib.nullcontext()


def load_state_dict_assigned(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``module.load_state_dict(state, assign=True)`` (strict) with each parameter's ``requires_grad``
    kept, as newer PyTorch keeps it: 2.2 wraps every assigned tensor in a new, trainable Parameter."""
    trainable = {name: p.requires_grad for name, p in module.named_parameters()}
    module.load_state_dict(state, assign=True)
    for name, p in module.named_parameters():
        p.requires_grad_(trainable[name])

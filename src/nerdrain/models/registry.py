"""Named model variants, timm style: a variant is a tiny function holding only its numbers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields, replace

from .nerd_rain import NeRDRain, NeRDRainConfig

_VARIANTS: dict[str, Callable[[], NeRDRainConfig]] = {}


def register_model(fn: Callable[[], NeRDRainConfig]) -> Callable[[], NeRDRainConfig]:
    if fn.__name__ in _VARIANTS:
        raise ValueError(f"model variant {fn.__name__!r} is already registered")
    _VARIANTS[fn.__name__] = fn
    return fn


@register_model
def nerd_rain() -> NeRDRainConfig:
    return NeRDRainConfig(dim=48)


@register_model
def nerd_rain_s() -> NeRDRainConfig:
    return NeRDRainConfig(dim=32)


def list_models() -> list[str]:
    return sorted(_VARIANTS)


def model_config(name: str, **overrides) -> NeRDRainConfig:
    if name not in _VARIANTS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    base = _VARIANTS[name]()
    unknown = sorted(set(overrides) - {f.name for f in fields(base)})
    if unknown:
        raise ValueError(f"unknown setting {unknown[0]!r} for {name}; settings: "
                         f"{', '.join(f.name for f in fields(base))}")
    return replace(base, **overrides)  # NeRDRainConfig normalises lists and numpy numbers itself


def create_model(name: str = "nerd_rain", **overrides) -> NeRDRain:
    """Build a variant, e.g. ``create_model("nerd_rain_s")`` or ``create_model("nerd_rain", dim=16)``."""
    return NeRDRain(model_config(name, **overrides))

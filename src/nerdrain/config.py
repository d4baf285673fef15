"""Typed experiment configuration: frozen dataclasses filled from YAML, with ``key=value`` overrides.

YAML is read as ``yaml.safe_load`` reads it, except that a key given twice is refused (YAML would
keep the last one silently); every key is checked against the dataclass fields, every value
against its type, and names and numbers against what they may be (a protocol, a preset, a positive
size) in ``__post_init__``, so a typo fails at start-up with the key's name instead of hours into a run.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .data.pairs import LAYOUTS
from .data.synth import PRESETS
from .metrics import PROTOCOLS
from .models import list_models


class ConfigError(ValueError):
    """A bad configuration: unknown key, wrong type or malformed override; the message names the key."""


class _KeyTwice(yaml.YAMLError):
    pass


class _Loader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, refusing a key given twice in one mapping: YAML keeps the last
    without a word, so a section written twice would lose the first one's values."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *defaults" may be overridden key by key
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):  # super() says what is wrong with it
                continue
            if key in seen:
                raise _KeyTwice(f"key {key!r} given twice (again at line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: plain data only


def _require(ok: bool, key: str, what: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: {what}, got {value!r}")


def _one_of(value: Any, options: typing.Iterable[str], key: str) -> None:
    options = tuple(options)
    _require(value in options, key, f"expected one of {', '.join(options)}", value)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "nerd_rain_s"
    overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {dim: 16}
    # Start from these weights (fine-tuning): a checkpoint load_model reads (the authors' .pth,
    # ours), or "default" for the package's default weights. --resume takes precedence.
    weights: str | None = None

    def __post_init__(self):
        _one_of(self.name, list_models(), "name")
        # "" is no request to start from scratch (that is null): a variable left unset, say
        _require(self.weights is None or bool(self.weights), "weights",
                 "expected a checkpoint file or default (null to start from scratch)", self.weights)


@dataclass(frozen=True)
class SourceConfig:
    """One stream of training pairs: rain synthesised onto clean photos, or real pairs on disk."""

    kind: str = "paired"  # "paired" or "synthetic"
    root: str = ""
    weight: float = 1.0  # share of the samples drawn from this source
    layout: str | None = None  # paired: force a layout instead of detecting it
    presets: tuple[str, ...] = ("light", "heavy")  # synthetic: rain presets mixed uniformly
    streak_dir: str | None = None  # synthetic: Garg & Nayar streak database, optional

    def __post_init__(self):
        _one_of(self.kind, ("paired", "synthetic"), "kind")
        _require(bool(self.root), "root", "expected a folder", self.root)
        _require(self.weight > 0, "weight", "expected a positive share", self.weight)
        if self.layout is not None:
            _one_of(self.layout, LAYOUTS, "layout")
        _require(bool(self.presets), "presets", "expected at least one preset", self.presets)
        for preset in self.presets:
            _one_of(preset, PRESETS, "presets")


@dataclass(frozen=True)
class DataConfig:
    sources: tuple[SourceConfig, ...] = ()
    patch_size: int = 256
    batch_size: int = 1  # per process
    num_workers: int = 2
    flips: bool = True
    saturation_prob: float = 1 / 3
    cache_mb: int = 2048  # decoded images each data-loading process keeps; past it, read at each use
    check_files: bool = True  # read every training and validation file at the start, not when first drawn

    def __post_init__(self):
        _require(self.patch_size > 0 and self.patch_size % 16 == 0, "patch_size",
                 "expected a positive multiple of 16 (the network's size step)", self.patch_size)
        _require(self.batch_size >= 1, "batch_size", "expected at least 1", self.batch_size)
        _require(self.num_workers >= 0, "num_workers", "expected 0 or more", self.num_workers)
        _require(0 <= self.saturation_prob <= 1, "saturation_prob", "expected a probability", self.saturation_prob)
        _require(self.cache_mb >= 0, "cache_mb", "expected 0 (no cache) or more", self.cache_mb)


@dataclass(frozen=True)
class ValidationConfig:
    root: str | None = None  # paired folder; none disables validation
    protocol: str = "rain200"
    every: int = 1000
    max_images: int | None = None

    def __post_init__(self):
        _one_of(self.protocol, PROTOCOLS, "protocol")
        _require(self.every >= 1, "every", "expected at least 1", self.every)
        _require(self.max_images is None or self.max_images >= 1, "max_images", "expected at least 1",
                 self.max_images)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    min_lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_iters: int = 0
    grad_clip: float | None = None

    def __post_init__(self):
        _require(self.lr > 0, "lr", "expected a positive learning rate", self.lr)
        _require(0 <= self.min_lr <= self.lr, "min_lr", f"expected 0 to lr ({self.lr})", self.min_lr)
        _require(all(0 <= b < 1 for b in self.betas), "betas", "expected two values in [0, 1)", self.betas)
        _require(self.eps > 0, "eps", "expected a positive number", self.eps)
        _require(self.weight_decay >= 0, "weight_decay", "expected 0 or more", self.weight_decay)
        _require(self.warmup_iters >= 0, "warmup_iters", "expected 0 or more", self.warmup_iters)
        _require(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "expected a positive norm or null",
                 self.grad_clip)


@dataclass(frozen=True)
class LossConfig:
    char_weight: float = 1.0
    fft_weight: float = 0.01
    edge_weight: float = 0.05
    inr_weight: float = 0.1

    def __post_init__(self):
        for name in ("char_weight", "fft_weight", "edge_weight", "inr_weight"):
            _require(getattr(self, name) >= 0, name, "expected 0 or more (a negative weight maximises its term)",
                     getattr(self, name))


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    val: ValidationConfig = ValidationConfig()
    optim: OptimConfig = OptimConfig()
    loss: LossConfig = LossConfig()
    iterations: int = 1000
    seed: int = 1234
    bf16: bool = False  # autocast the forward pass in bfloat16
    compile: bool = False  # torch.compile the model
    channels_last: bool = False
    activation_checkpointing: bool = False  # recompute transformer blocks in backward: less memory
    cuda_graphs: bool = False  # replay forward + backward as one CUDA graph (CUDA, one process)
    ema_decay: float | None = None
    log_every: int = 50
    checkpoint_every: int = 1000
    device: str = "auto"

    def __post_init__(self):
        _require(self.iterations >= 1, "iterations", "expected at least 1", self.iterations)
        _require(0 <= self.seed < 2**64, "seed", "expected 0 to 2**64 - 1 (what numpy and torch both take)",
                 self.seed)
        _require(self.ema_decay is None or 0 < self.ema_decay < 1, "ema_decay", "expected a value in (0, 1) or null",
                 self.ema_decay)
        _require(self.log_every >= 1, "log_every", "expected at least 1", self.log_every)
        _require(self.checkpoint_every >= 1, "checkpoint_every", "expected at least 1", self.checkpoint_every)
        _require(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device) is not None, "device",
                 "expected auto, cpu, cuda, cuda:N or mps", self.device)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, {} if value is None else value, where)  # an empty YAML section: defaults
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ValueError as err:
                errors.append(str(err))
        raise ConfigError("; ".join(errors))
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        item_hints = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_hints) != len(value):
            raise ConfigError(f"{where}: expected {len(item_hints)} items, got {len(value)}")
        return tuple(_coerce(v, h, f"{where}[{i}]") for i, (v, h) in enumerate(zip(value, item_hints)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        except ValueError:
            raise ConfigError(f"{where}: expected float, got {value!r}") from None
        if not math.isfinite(number):  # .inf or .nan would train to NaN weights without a word
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, data)) - names)
    if unknown:
        hints_ = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, names, 1)) else k
                  for k in unknown]
        raise ConfigError(f"{where}: unknown key(s) {', '.join(hints_)}; known: {', '.join(sorted(names))}")
    values = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**values)
    except ConfigError as err:  # a __post_init__ check names the field; add where it sits
        raise ConfigError(f"{where}.{err}") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``["optim.lr=2e-4", "data.sources.0.root=/x"]`` applied to a nested dict (values parsed as YAML)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        try:
            value = _load_yaml(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML "
                              f"({getattr(err, 'problem', None) or ' '.join(str(err).split())})") from None
        node: Any = data
        *parents, leaf = key.split(".")
        try:
            for part in parents:
                if isinstance(node, list):
                    node = node[int(part)]
                elif isinstance(node, dict):
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
                else:
                    raise TypeError(f"{part!r} is inside a {type(node).__name__}")
            if isinstance(node, list):
                node[int(leaf)] = value
            elif isinstance(node, dict):
                node[leaf] = value
            else:
                raise TypeError(f"{leaf!r} is inside a {type(node).__name__}")
        except (IndexError, ValueError, TypeError) as err:
            raise ConfigError(f"override {item!r}: no such key path ({err})") from None
    return data


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    try:
        data = _load_yaml(Path(path).read_text(encoding="utf-8")) if path else {}
    except _KeyTwice as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise ConfigError(f"{path}: not valid YAML{at} ({getattr(err, 'problem', None) or err})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top level, got {type(data).__name__}")
    return from_dict(TrainConfig, apply_overrides(data or {}, list(overrides)))


def to_dict(cfg: Any) -> dict:
    """Plain (YAML-safe) dict of a config, tuples as lists."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))

"""Reading and writing NeRD-Rain weights: the authors' checkpoints and our safetensors files.

The authors' key names are flat and irregular (``down1_2_max2`` but ``encoder_level1_max2``,
``decoder_level1_mid1`` but ``up2_1_mid``), so our modules use their own structure and a
table-driven key map converts, in the spirit of timm's ``checkpoint_filter_fn``. Hyperparameters
are read off tensor shapes, as spandrel does, so any width trained with the released code loads.
"""

from __future__ import annotations

import json
import math
import re
import stat
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from .devices import resolve_device
from .files import atomic_write, missing_folders, output_file, remove_empty_folders
from .models import NeRDRain, NeRDRainConfig
from .models.inr import CONSTANT_INPUTS, ImplicitDecoder
from .torch_compat import load_state_dict_assigned

SCALE_NAMES = ("small", "mid", "max")
FORMAT_TAG = "nerdrain"

# UNetPass child -> (official module name, suffix style). The authors suffix encoder, latent and
# decoder stages with the pass number ("mid1"), but resamplers of the first pass with none ("mid").
_PASS_PARTS = {
    "encoders.0": ("encoder_level1", "numbered"),
    "encoders.1": ("encoder_level2", "numbered"),
    "latent": ("latent", "numbered"),
    "reduces.0": ("reduce_chan_level2", "numbered"),
    "reduces.1": ("reduce_chan_level1", "numbered"),
    "decoders.0": ("decoder_level2", "numbered"),
    "decoders.1": ("decoder_level1", "numbered"),
    "downs.0": ("down1_2", "resampler"),
    "downs.1": ("down2_3", "resampler"),
    "ups.0": ("up3_2", "resampler"),
    "ups.1": ("up2_1", "resampler"),
}
_FUSION_PARTS = {"proj_x": "query_conv", "proj_y": "key_conv", "mix_x": "gamma1", "mix_y": "gamma2"}
_INR_LIFT_NAMES = ("upsmall2mid", "upmid2max")
_INR_NAMES = ("INR", "INR2")

# Leaf-level differences: the authors wrap LayerNorm, depthwise convs and resamplers in containers.
_INNER_RULES = (
    (re.compile(r"\.norm(\d)\.(weight|bias)$"), r".norm\1.body.\2"),
    (re.compile(r"\.(qkv_dwconv|dwconv)\.weight$"), r".\1.main.0.weight"),
)


class CheckpointError(ValueError):
    """A file that cannot be loaded as NeRD-Rain weights; the message is one line."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No file at the path given: caught as ``FileNotFoundError`` too, as from ``open``."""


def _pass_suffix(scale: int, index: int, style: str) -> str:
    name = SCALE_NAMES[scale]
    if scale == 0:
        return name
    if style == "numbered" or index > 0:
        return f"{name}{index + 1}"
    return name


def official_key(key: str) -> str:
    """Our state-dict key -> the released code's key."""
    head, *rest = key.split(".")
    if head == "passes":
        scale, index, *tail = rest
        part = ".".join(tail[:2]) if tail[0] in ("encoders", "downs", "ups", "reduces", "decoders") else tail[0]
        official, style = _PASS_PARTS[part]
        remainder = ".".join(tail[len(part.split(".")):])
        if part.startswith(("downs", "ups")):
            remainder = "body." + remainder
        key_out = f"{official}_{_pass_suffix(int(scale), int(index), style)}.{remainder}"
    elif head == "embed":
        key_out = f"patch_embed_{SCALE_NAMES[int(rest[0])]}.proj.{rest[1]}"
    elif head == "output":
        key_out = f"output_{SCALE_NAMES[int(rest[0])]}.{rest[1]}"
    elif head == "context":
        scale, index, param = rest
        number = "" if int(scale) == 1 else str(int(index) + 1)  # one mid context, two max ones
        key_out = f"output_{SCALE_NAMES[int(scale)]}_context{number}.{param}"
    elif head == "inr_lift":
        which, step, *tail = rest
        key_out = f"{_INR_LIFT_NAMES[int(which)]}{int(step) + 1}.body.{'.'.join(tail)}"
    elif head == "inr":
        which, _, layer, param = rest  # MLP layers sit at even indices between the ReLUs there
        key_out = f"{_INR_NAMES[int(which)]}.imnet.layers.{2 * int(layer)}.{param}"
    elif head == "fusion":
        which, part, param = rest
        key_out = f"BF{int(which) + 1}.{_FUSION_PARTS[part]}.{param}"
    else:
        raise KeyError(f"no official name for {key!r}")
    for pattern, replacement in _INNER_RULES:
        key_out = pattern.sub(replacement, key_out)
    return key_out


def key_map(model: NeRDRain) -> dict[str, str]:
    """Our key -> official key for every tensor of ``model``."""
    return {key: official_key(key) for key in model.state_dict()}


def to_official_state_dict(model: NeRDRain) -> dict[str, torch.Tensor]:
    return {official_key(k): v for k, v in model.state_dict().items()}


def from_official_state_dict(state: Mapping[str, torch.Tensor], model: NeRDRain) -> dict[str, torch.Tensor]:
    """Official names -> ours; keys the model does not know are left under their own names."""
    inverse = {official: ours for ours, official in key_map(model).items()}
    return {inverse.get(k, k): v for k, v in state.items()}


# ---------------------------------------------------------------------------------------------
# Reading hyperparameters off shapes


def _is_official(state: Mapping[str, torch.Tensor]) -> bool:
    return "patch_embed_max.proj.weight" in state


def _count_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return len({int(m.group(1)) for k in state if (m := pattern.match(k))})


def infer_config(state: Mapping[str, torch.Tensor]) -> NeRDRainConfig:
    """Width, depths, heads, FFN expansion and INR widths from an official-named state dict.

    A level without blocks (depth 0) has no heads or FFN to read: those keep their defaults,
    which give the same tensors.
    """
    dim = state["patch_embed_max.proj.weight"].shape[0]
    depths = tuple(_count_blocks(state, f"{names[0]}_max1") for names in _LEVELS)
    temperatures = [_level_shape(state, level, "attn.temperature") for level in range(len(_LEVELS))]
    heads = tuple(shape[0] if shape else default for shape, default in zip(temperatures, NeRDRainConfig().heads))
    ffn_outs = [_level_shape(state, level, "ffn.project_out.weight") for level in range(len(_LEVELS))]
    hidden = {dim << level: shape[1] for level, shape in enumerate(ffn_outs) if shape}
    inr = {int(m.group(1)): v.shape[0] for k, v in state.items()
           if (m := re.fullmatch(r"INR\.imnet\.layers\.(\d+)\.(?:weight|bias)", k))}
    inr_hidden = tuple(inr[i] for i in sorted(inr)[:-1])
    return NeRDRainConfig(dim=dim, depths=depths, heads=heads, ffn_expansion=_ffn_expansion(hidden),
                          inr_hidden=inr_hidden)


# The official module names at each width (dim, 2 dim, 4 dim); their blocks share heads and FFN width.
_LEVELS = (("encoder_level1", "decoder_level1"), ("encoder_level2", "decoder_level2"), ("latent",))


def _level_shape(state: Mapping[str, torch.Tensor], level: int, leaf: str) -> torch.Size | None:
    """The shape of ``leaf`` in the blocks at ``level``, from whichever block of any pass holds it:
    a tensor missing from one block is then reported as missing, not read as another width."""
    pattern = re.compile(rf"(?:{'|'.join(_LEVELS[level])})_\w+\.\d+\.{re.escape(leaf)}")
    return next((v.shape for k, v in state.items() if pattern.fullmatch(k)), None)


def _ffn_expansion(hidden: Mapping[int, int]) -> float:
    """A factor that gives each FFN width seen (``{block width: hidden width}``) through the
    model's ``int(width * factor)``: the default where it does, else the shortest decimal.

    Every factor in [h/w, (h+1)/w) at the widest level gives the same tensors, so the one trained
    with is not always recoverable; h/w itself can come out a hair below h in floating point.
    """
    default = NeRDRainConfig().ffn_expansion
    if not hidden:
        return default
    width, features = max(hidden.items())
    exact = (features + 0.5) / width  # mid-interval: floors to every level's width
    candidates = (default, *(math.ceil(features / width * 10**n) / 10**n for n in range(7)), exact)
    return next((f for f in candidates if all(int(w * f) == h for w, h in hidden.items())), exact)


# ---------------------------------------------------------------------------------------------
# Files


_PICKLE_SUFFIXES = frozenset({".pth", ".pt", ".bin", ".ckpt", ".pkl"})
_CHECKPOINT_SUFFIXES = _PICKLE_SUFFIXES | {".safetensors"}


TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # how torch.save's files start: a zip archive; a plain pickle


def _checkpoint_path(path: str | Path) -> Path:
    """``path`` as a Path; an empty name is refused, which Path would read as the current folder."""
    if isinstance(path, str) and not path:
        raise CheckpointNotFoundError("an empty name; give a checkpoint file")
    return Path(path)


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and (safetensors) metadata; never unpickles anything but tensors and containers.

    The format is told from the contents, not the name, so a renamed file still loads: safetensors
    starts with the length of its JSON header (8 bytes, little-endian) and then its ``{``, which
    a zip archive or a pickle never do.
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path}: no such file") from None
    except OSError as err:  # a name too long, a folder that cannot be looked into
        raise CheckpointError(f"{path}: cannot be read ({err.strerror or err})") from None
    if stat.S_ISDIR(mode):
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    if not stat.S_ISREG(mode):  # neither torch.load nor safetensors reads one that cannot seek
        raise CheckpointError(f"{path}: not a regular file (a device or a pipe); give a checkpoint file")
    with path.open("rb") as f:
        head = f.read(_HEAD_BYTES)
    what = _stand_in(path, head)
    if what:
        raise CheckpointError(f"{path}: {what}")
    torch_file = head.startswith(TORCH_MAGIC)
    header_length = _safetensors_header_length(head)
    if header_length is not None or (not torch_file and path.suffix.lower() == ".safetensors"):
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            return load_file(str(path)), metadata
        except Exception as err:  # safetensors' own error type is not exported by every version
            shortfall = _safetensors_shortfall(path, header_length)
            if shortfall:
                raise CheckpointError(f"{path}: truncated: {shortfall} {_TRUNCATED_HINT}") from None
            raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(err)})") from None
    if not torch_file:
        raise CheckpointError(f"{path}: not a readable checkpoint: neither a PyTorch file nor safetensors")
    obj = torch_load(path, "cpu")
    if _is_training_checkpoint(obj):
        return _training_weights(obj, path)
    return _state_dict_in(obj, path), {}


_TRUNCATED_HINT = "(an incomplete download or copy?)"
_SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own limit on the JSON header


def _safetensors_header_length(head: bytes) -> int | None:
    """The length of the JSON header that ``head`` starts with, if it is a safetensors file's start:
    8 bytes of length, little-endian, then the header's ``{``. A torch zip or pickle has neither."""
    if len(head) > 8 and head[8:9] == b"{":
        length = int.from_bytes(head[:8], "little")
        if length <= _SAFETENSORS_MAX_HEADER:
            return length
    return None


def _safetensors_shortfall(path: Path, header_length: int | None) -> str | None:
    """How a safetensors file falls short of the length its header gives, if it does: a cut file
    is told apart from a damaged one, since the header says where the last tensor ends."""
    if header_length is None:
        return None
    size = path.stat().st_size
    if size < 8 + header_length:
        return f"{size} bytes, shorter than its {8 + header_length}-byte header"
    try:
        with path.open("rb") as f:
            f.seek(8)
            header = json.loads(f.read(header_length))
        end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):  # a damaged header: safetensors says
        return None
    expected = 8 + header_length + int(end)
    return f"{size} of the {expected} bytes its header describes" if size < expected else None


def _state_dict_in(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside what a training script saved.

    Scripts wrap it with their epoch and optimizer state, some twice (``{'model': {'state_dict':
    ...}}``), under names of their own (``{'netG': ..., 'netD': ...}``), or save numbers beside the
    tensors; BasicSR keeps the EMA beside the weights (``params_ema``). The known wrapper names
    are taken in order of preference, the one holding a NeRD-Rain first; other names only where
    one entry holds a NeRD-Rain.
    """
    while isinstance(obj, Mapping) and not _all_tensors(obj):
        if any(isinstance(v, torch.Tensor) and _anchor_prefix(k) is not None for k, v in obj.items()):
            return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        holders = [k for k, v in obj.items() if isinstance(v, Mapping) and _holds_network(v)]
        known = [w for w in _WRAPPERS if isinstance(obj.get(w), Mapping)]
        chosen = next((w for w in known if w in holders), None) or (known[0] if known and not holders else None)
        if chosen is None and len(holders) > 1:
            raise CheckpointError(f"{path}: NeRD-Rain weights under {len(holders)} keys "
                                  f"({', '.join(repr(k) for k in holders)}); save the one to load")
        if chosen is None and not holders:
            break
        obj = obj[chosen if chosen is not None else holders[0]]
    if isinstance(obj, Mapping) and _all_tensors(obj):
        return dict(obj)
    held = (f"top-level keys: {_summarise([str(k) for k in obj])}" if isinstance(obj, Mapping)
            else f"a {type(obj).__name__}, not a state dict")
    raise CheckpointError(f"{path}: no NeRD-Rain weights found ({held})")


def _holds_network(obj: Mapping, depth: int = 4) -> bool:
    """Whether a NeRD-Rain's tensors are in ``obj`` or in the mappings inside it."""
    return any((isinstance(v, torch.Tensor) and _anchor_prefix(k) is not None)
               or (depth > 0 and isinstance(v, Mapping) and _holds_network(v, depth - 1)) for k, v in obj.items())


_HEAD_BYTES = 64  # enough to tell the formats, and the files left in place of weights, apart


def _stand_in(path: Path, head: bytes) -> str | None:
    """What a file is that was left where weights were expected, told from its first bytes: a
    clone without Git LFS, a download that saved the host's web page (the authors' weights are on
    Google Drive), a compressed or a plain zip archive. None for anything else."""
    if not head:
        return "is empty (0 bytes)"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the file itself (fetch it with git lfs pull)"
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").lower().startswith((b"<!doctype html", b"<html")):
        return "a web page (HTML), not a checkpoint (a download that saved the page instead of the file?)"
    if head.startswith(b"\x1f\x8b"):
        return "gzip-compressed; decompress it first"
    if head.startswith(TORCH_MAGIC[0]):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):  # a truncated torch file: torch_load says so
            return None
        if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
            inside = [name for name in names if Path(name).suffix.lower() in _CHECKPOINT_SUFFIXES]
            if inside:  # weights shared as an archive of them
                return f"a zip archive holding {_summarise(inside)}, not one; extract it first"
            return "a zip archive but not a PyTorch file (no data.pkl in it)"
    return None


_WRAPPERS = ("state_dict", "params_ema", "params", "model", "net", "network")


def _all_tensors(obj: Mapping) -> bool:
    return all(isinstance(v, torch.Tensor) for v in obj.values())


def _is_training_checkpoint(obj: Any) -> bool:
    """A ``RUN/last.pt`` of ``nerd-rain train`` (see ``training.Trainer.state_dict``)."""
    return (isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping) and isinstance(obj.get("config"), str)
            and "iteration" in obj)


def _training_weights(state: Mapping[str, Any], path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The weights a training checkpoint stands for, as the run would save them at this iteration:
    the EMA where it keeps one (as ``final.safetensors`` does), else the trained weights; with the
    network's config read from the run's settings."""
    import yaml

    from .models.registry import model_config

    try:
        network = yaml.safe_load(state["config"])["model"]
        cfg = model_config(network["name"], **(network.get("overrides") or {}))
    except (yaml.YAMLError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: a training checkpoint whose settings name no usable model ({err})") from None
    weights = state["model"]
    ema = state.get("ema")
    if isinstance(ema, Mapping) and int(ema.get("n_averaged", 0)) > 0:
        weights = {k: v for k, v in ema.items() if k.startswith("module.")}  # load_model drops the prefix
    return dict(weights), {"format": FORMAT_TAG, "config": json.dumps(asdict(cfg)),
                           "iteration": str(state["iteration"])}


def torch_load(path: Path, device: str | torch.device, what: str = "PyTorch checkpoint") -> Any:
    """``torch.load`` with ``weights_only=True`` (tensors and plain containers only), every failure
    one line naming the file."""
    try:
        with path.open("rb") as f, warnings.catch_warnings():  # a file object: newer torch.load reads a
            # *.safetensors name as safetensors; a plain pickle makes it warn about the protocol, before
            # the error we report anyway
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(f, map_location=device, weights_only=True)
    except Exception as err:  # torch raises many types for truncated/foreign/pickled-object files
        cut_short = _cut_short(path, err)  # first: PyTorch 2.2 words a cut pickle as a weights-only refusal
        if cut_short:
            raise CheckpointError(f"{path}: {cut_short} {_TRUNCATED_HINT}") from None
        if "Weights only load failed" in str(err):  # torch's advice to unpickle anyway is not ours to give
            raise CheckpointError(f"{path}: holds pickled Python objects besides tensors; refused, since "
                                  "unpickling them could run code (save a state dict of tensors)") from None
        reason = _first_line(err).split(". ")[0]  # torch's first sentence; the rest is advice
        raise CheckpointError(f"{path}: not a readable {what} ({reason})") from None


def _cut_short(path: Path, err: Exception) -> str | None:
    """What ``torch.load``'s ``err`` means where the file was cut short, in place of the reader's
    internals ('failed finding central directory', '[Errno 22] Invalid argument', EOFError)."""
    if isinstance(err, EOFError) or "unexpected EOF" in str(err):  # torch's legacy format: a plain pickle
        return "truncated: the pickled data ends early"
    with path.open("rb") as f:
        zipped = f.read(len(TORCH_MAGIC[0])) == TORCH_MAGIC[0]
    if zipped and not zipfile.is_zipfile(path):  # the index at its end, which torch.save writes last, is gone
        return "truncated or damaged: a zip archive (PyTorch's format) without its index"
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


_ANCHORS = ("patch_embed_max.proj.weight", "embed.2.weight")  # the authors' names; ours


def _anchor_prefix(key: Any) -> str | None:
    """What precedes a width-defining tensor's name in ``key`` (a wrapper's prefix), if it names one."""
    if isinstance(key, str):
        for anchor in _ANCHORS:
            if key == anchor or key.endswith("." + anchor):
                return key[: -len(anchor)]
    return None


_WRAPPER_PREFIX = re.compile(r"(?:(?:module|_orig_mod)\.)+")  # DataParallel/DDP, torch.compile, nested


def _unprefixed(state: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The network's own keys, as saved from inside a wrapper: DataParallel or DDP (``module.``),
    ``torch.compile`` (``_orig_mod.``), an ``AveragedModel`` EMA (``module.`` and its
    ``n_averaged``), a Lightning module (``model.`` beside its other parts), or nested ones.

    The prefix is what precedes the width-defining tensor; keys outside it belong to the
    wrapper, not the network. DataParallel's and compile's prefixes are taken off every key that
    carries them, since a state dict merged from a wrapped model and a plain one has them on some
    keys only; a tensor found both with and without one is refused, not chosen.
    """
    unwrapped = {k: k[m.end():] if (m := _WRAPPER_PREFIX.match(k)) else k for k in state}
    prefixes = sorted({p for name in unwrapped.values() if (p := _anchor_prefix(name)) is not None})
    if len(prefixes) > 1:
        raise CheckpointError(f"{path}: holds {len(prefixes)} networks (key prefixes "
                              f"{', '.join(repr(p) for p in prefixes)}); save the one to load as a state dict")
    prefix = prefixes[0] if prefixes else ""
    wrapped = bool(prefix) or any(name != k for k, name in unwrapped.items())
    network: dict[str, torch.Tensor] = {}
    saved_as: dict[str, str] = {}
    for key, value in state.items():
        name = unwrapped[key][len(prefix):]
        if not unwrapped[key].startswith(prefix) or (wrapped and "." not in name):
            continue  # a Lightning module's other parts; AveragedModel's n_averaged (no tensor of the network's)
        if name in saved_as:
            raise CheckpointError(f"{path}: holds {name} twice ({saved_as[name]!r}, {key!r}); "
                                  "save the one to load as a state dict")
        network[name], saved_as[name] = value, key
    return network


def _summarise(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def load_model(path: str | Path, device: str | torch.device | None = None) -> NeRDRain:
    """Load the authors' ``.pth`` files, bare state dicts (.pth/.safetensors), our own files, or
    a training run's ``last.pt`` (as the weights the run would save at its iteration: the EMA).

    Our files carry their config (``last.pt``: the run's settings); for the others variant and
    width are read off the tensor shapes. The format is told from the file's first bytes, so a
    renamed file loads too. The model is returned in eval mode, fp32.

    A file that cannot be loaded raises :class:`CheckpointError` (a ``ValueError``) with one line
    naming it and the problem; a path with no file, :class:`CheckpointNotFoundError`, which is
    also a ``FileNotFoundError``. A ``device`` that is unknown or absent raises ``ValueError``.
    """
    model, _ = read_checkpoint(path)
    if device is None:
        return model
    return model.to(resolve_device(device))


def read_checkpoint(path: str | Path) -> tuple[NeRDRain, torch.dtype]:
    """:func:`load_model` on the CPU, with the floating-point type the weights were stored in,
    from one read of the file (a conversion keeps that type)."""
    path = _checkpoint_path(path)
    state, metadata = _read_tensors(path)
    state = _unprefixed(state, path)
    stored = _first_float_dtype(state)  # the network's own: a wrapper's other tensors may differ
    if metadata.get("format") == FORMAT_TAG and "config" in metadata:
        try:
            settings = json.loads(metadata["config"])
            cfg = NeRDRainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})
        except (ValueError, TypeError, AttributeError) as err:  # JSONDecodeError is a ValueError
            raise CheckpointError(f"{path}: its stored config cannot build a NeRD-Rain ({_first_line(err)})") from None
    elif _is_official(state):
        try:
            cfg = infer_config(state)
        except (KeyError, IndexError, ZeroDivisionError, ValueError) as err:
            raise CheckpointError(f"{path}: NeRD-Rain keys found but the shapes are inconsistent ({err})") from None
    elif "embed.2.weight" in state:
        raise CheckpointError(f"{path}: our key names but no config metadata (save the model with "
                              "nerdrain.save_model, which stores it)")
    else:
        found = f"keys: {_summarise(list(state))}" if state else "no tensors"
        raise CheckpointError(f"{path}: not a NeRD-Rain checkpoint (no 'patch_embed_max.proj.weight'; {found})")
    # Built without storage and checked: a width read off one wrong tensor must fail in words, not
    # by allocating a network of that width. The network then takes the file's tensors as its own,
    # so that it is built once and not initialised at random only to be overwritten.
    with torch.device("meta"):
        model = NeRDRain(cfg)
    if _is_official(state):
        state = from_official_state_dict(state, model)
    _check_tensors(model, state, path)
    _check_finite(state, path)
    load_state_dict_assigned(model, _own_fp32_tensors(state))
    _make_constants(model)
    return model.eval(), stored


def _own_fp32_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp32 copies for the network to take as its weights: safetensors' tensors are views of the
    file mapped into memory (a file rewritten in place would change the weights, and a shortened
    one crash the process), and tensors a file stored as one, under two names, would be tied."""
    return {k: v.to(torch.float32, memory_format=torch.contiguous_format, copy=True) for k, v in state.items()}


def _make_constants(model: NeRDRain) -> None:
    """The buffers no checkpoint holds (non-persistent), made for a network built on the meta device."""
    for module in model.modules():
        if isinstance(module, ImplicitDecoder):
            module.constant_inputs = torch.tensor(CONSTANT_INPUTS)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a constant added to the network and not here: it would fail at the first forward
        raise RuntimeError(f"load_model: no values for {', '.join(left)}; make them in _make_constants")


def _check_tensors(model: NeRDRain, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """One line listing what keeps ``state`` from loading into ``model`` strictly, if anything."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{official_key(k)} {tuple(state[k].shape)} vs {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing {_summarise([official_key(k) for k in missing])}")
    if unexpected:
        problems.append(f"unexpected {_summarise(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch {_summarise(shapes, 2)}")
    # A weight as integers would be cast to nonsense, and a meta tensor (a model saved before its
    # weights were materialised) has no values at all.
    empty = [official_key(k) for k, v in state.items() if k in expected and v.is_meta]
    if empty:
        problems.append(f"no values (meta tensors) {_summarise(empty)}")
    integral = [f"{official_key(k)} {str(v.dtype).removeprefix('torch.')}" for k, v in state.items()
                if k in expected and not v.is_floating_point()]
    if integral:
        problems.append(f"not floating-point {_summarise(integral, 2)}")
    if problems:
        raise CheckpointError(f"{path}: does not match NeRD-Rain dim={model.cfg.dim}: " + "; ".join(problems))


def _check_finite(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """One NaN weight spreads through the convolutions to every pixel, which is then written as
    black: such weights are refused, naming the tensors, rather than loaded to make black photos.

    A tensor's sum is finite only where all its values are, and costs a tenth of ``isfinite``'s
    mask over every value (which took most of ``load_model``'s time): the mask is looked at only
    for a tensor whose sum is not finite, which finite values too large to add up can also give."""
    bad = [official_key(k) for k, v in state.items() if not torch.isfinite(v.sum()) and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path}: NaN or infinite values in {_summarise(bad)}; the network would output "
                              "nothing usable (saved from a diverged training run?)")


def _weight_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A floating-point type to store weights in (``torch.float16`` or ``"float16"``); an integer
    type would round almost every weight to zero."""
    named = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if dtype is not None and not (isinstance(named, torch.dtype) and named.is_floating_point):
        raise ValueError(f"weights are stored in a floating-point type such as torch.float16, not {dtype!r}")
    return named


def _network(model: Any) -> NeRDRain:
    """The NeRD-Rain inside DDP or ``torch.compile`` wrappers; anything else is refused."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    if not isinstance(model, NeRDRain):
        raise TypeError(f"expected a NeRD-Rain model (nerdrain.create_model / load_model), not {type(model).__name__}")
    return model


def _destination(path: str | Path) -> Path:
    if Path(path).is_dir():
        raise ValueError(f"{path}: is a folder; give the file to write")
    return Path(path)


def _write(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """``write`` into ``path`` atomically; where it fails, the folders made for it go too."""
    made = missing_folders(path.parent)
    try:
        with atomic_write(output_file(path)) as f:
            write(f)
    except BaseException:
        remove_empty_folders(made)
        raise
    return path


def _cpu_tensors(state: Mapping[str, torch.Tensor], dtype: torch.dtype | str | None,
                 path: Path) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies to write to ``path``, floating-point ones in ``dtype`` where given.

    A weight beyond ``dtype``'s range (float16's 65504) would be written as infinity, and the
    file refused by every load: refused here instead, naming the tensor.
    """
    dtype = _weight_dtype(dtype)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in state.items()}
    overflowed = [k for k, v in tensors.items()
                  if v.is_floating_point() and not torch.isfinite(v).all() and torch.isfinite(state[k]).all()]
    if overflowed:
        largest = max(state[k].detach().abs().max().item() for k in overflowed)
        raise ValueError(f"{path}: weights of {_summarise(overflowed)} up to {largest:.3g} do not fit in "
                         f"{str(dtype).removeprefix('torch.')} (at most {torch.finfo(dtype).max:.5g}); "
                         "keep float32 or use bfloat16")
    return tensors


def stored_dtype(path: str | Path) -> torch.dtype:
    """The floating-point type a checkpoint's weights are stored in (the network's own, as
    :func:`read_checkpoint` gives it), without building the network; ``nerd-rain convert`` takes the
    type from its one :func:`read_checkpoint` instead."""
    path = _checkpoint_path(path)
    return _first_float_dtype(_unprefixed(_read_tensors(path)[0], path))


def _first_float_dtype(state: Mapping[str, torch.Tensor]) -> torch.dtype:
    return next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)


def save_model(model: NeRDRain, path: str | Path, dtype: torch.dtype | None = None,
               extra_metadata: Mapping[str, str] | None = None) -> Path:
    """Write safetensors with the config needed to rebuild the model (atomically).

    A name ending in ``.pth``/``.pt`` (PyTorch's pickles) is refused: the file would not be what
    its name says, for other tools; :func:`export_official` writes the authors' ``.pth`` format.
    """
    if Path(path).suffix.lower() in _PICKLE_SUFFIXES:
        raise ValueError(f"{path}: our weights are safetensors files; name it .safetensors "
                         "(the authors' .pth format: export_official, or nerd-rain convert --to-official)")
    model = _network(model)
    reserved = sorted({"format", "config"} & set(extra_metadata or {}))
    if reserved:  # replaced, they would leave a file load_model cannot rebuild the model from
        raise ValueError(f"extra_metadata: {reserved[0]!r} is save_model's own; name it otherwise")
    not_text = [k for k, v in (extra_metadata or {}).items() if not (isinstance(k, str) and isinstance(v, str))]
    if not_text:  # safetensors stores text only, and says so without naming the entry
        raise ValueError(f"extra_metadata: {not_text[0]!r}: keys and values must be strings")
    path = _destination(path)
    tensors = _cpu_tensors(model.state_dict(), dtype, path)
    metadata = {"format": FORMAT_TAG, "config": json.dumps(asdict(model.cfg)), **(extra_metadata or {})}
    return _write(path, lambda f: f.write(safetensors_bytes(tensors, metadata=metadata)))


def export_official(model: NeRDRain, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """The weights under the authors' key names, atomically: a ``.safetensors`` name gives a bare
    state dict in safetensors, any other a ``.pth`` their test script loads (``{'state_dict': ...}``)."""
    model = _network(model)
    path = _destination(path)
    state = _cpu_tensors(to_official_state_dict(model), dtype, path)
    if path.suffix.lower() == ".safetensors":
        return _write(path, lambda f: f.write(safetensors_bytes(state)))
    return _write(path, lambda f: torch.save({"state_dict": state}, f))


# ---------------------------------------------------------------------------------------------
# Weights shipped with the package


@dataclass(frozen=True)
class PretrainedWeights:
    """Metadata for weights we ship; the model card beside the file says how they were made."""

    name: str
    file: str
    variant: str
    card: str
    description: str


DEFAULT_WEIGHTS = PretrainedWeights(
    name="nerd_rain_s_synthetic",
    file="nerd_rain_s_synthetic.safetensors",
    variant="nerd_rain_s",
    card="nerd_rain_s_synthetic.md",
    description="NeRD-Rain-S trained by this project on rain synthesised onto clean photos",
)


def default_weights_path() -> Path:
    return Path(str(resources.files("nerdrain") / "weights" / DEFAULT_WEIGHTS.file))


def load_default_model(device: str | torch.device | None = None) -> NeRDRain:
    """The project's own default weights (shipped in the package, no download)."""
    path = default_weights_path()
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path}: default weights are not installed; pass --weights FILE")
    return load_model(path, device)

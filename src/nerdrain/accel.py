"""Optional inference fast paths: channels-last, torch.compile, CUDA graphs, reduced precision.

:func:`optimize_for_inference` wraps a NeRD-Rain model (or any ``x -> y`` module) in a module that
applies the requested fast paths. Each path is optional and falls back cleanly, with a
:class:`FastPathWarning`, where it is not supported (CUDA graphs on the CPU, ``torch.compile``
failing for a shape or backend, glibc-specific allocator tuning elsewhere); the result then comes
from the plain model, so the wrapper is always safe to use.

The exact paths (fp32 with channels-last, compile or CUDA graphs) reproduce the plain model to
float rounding (the tests hold them to the golden outputs within 1e-4). ``dtype=torch.bfloat16``
(autocast, by default over a copy of the model with its weights stored in that dtype) is
approximate: the stated tolerance, tested in ``tests/test_models.py`` and ``tests/test_accel.py``,
is a mean absolute error under 1/255 and a worst pixel under 0.1 on images in [0, 1].
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from .devices import resolve_device
from .tiling import model_device, model_dtype

__all__ = ["FastInference", "FastPathWarning", "optimize_for_inference", "tune_cpu_allocator"]

_PRECISIONS = {None: "fp32", "fp32": "fp32", torch.float32: "fp32", "tf32": "tf32",
               "bf16": "bf16", torch.bfloat16: "bf16", "fp16": "fp16", torch.float16: "fp16"}
_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}

_allocator_tuned = False


class FastPathWarning(UserWarning):
    """A requested fast path is unavailable here; the plain model is used instead."""


def _warn(msg: str) -> None:
    warnings.warn(msg, FastPathWarning, stacklevel=3)


def tune_cpu_allocator() -> bool:
    """Keep freed tensor memory in the process heap (glibc only); returns whether it applied.

    By default glibc serves blocks over a (dynamic, at most 32 MiB) threshold with ``mmap`` and
    gives them back on ``free``, so every large activation of a forward pass page-faults its
    memory in again: at 256x256 that is about a million minor faults and a third of the CPU time
    of a NeRD-Rain forward, spent zeroing pages in the kernel. Serving all blocks from the heap
    and never trimming it removes that cost; the process keeps its peak memory reserved (and
    reuses it) instead of returning it to the system. Process-wide and not undone; numerics are
    unaffected.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        gnu_get_libc_version = libc.gnu_get_libc_version  # absent on musl: not glibc
    except (OSError, AttributeError):
        return False
    del gnu_get_libc_version
    m_trim_threshold, m_mmap_max = -1, -4
    ok = bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
    _allocator_tuned = ok
    return ok


def _precision_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    stack = contextlib.ExitStack()
    if device.type == "cuda":
        old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)

        def restore() -> None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old

        stack.callback(restore)
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
    if precision in _HALF:
        # Caching autocast's weight casts is unsafe across CUDA-graph captures; casts are cheap.
        stack.enter_context(torch.autocast(device.type, dtype=_HALF[precision], cache_enabled=False))
    return stack


def _inductor_config(settings: dict) -> contextlib.AbstractContextManager:
    if not settings:
        return contextlib.nullcontext()
    try:
        import torch._inductor.config as inductor_config

        return inductor_config.patch(**settings)
    except (ImportError, AttributeError, RuntimeError) as err:
        _warn(f"inductor settings {settings} unavailable ({err}); compiling without them")
        settings.clear()
        return contextlib.nullcontext()


class _Graphed:
    """One captured CUDA graph for one input shape: static input, static output."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor,
                 context: Callable[[], contextlib.AbstractContextManager], warmup: int = 2):
        self.static_x = example.clone()
        stream = torch.cuda.Stream(device=example.device)
        stream.wait_stream(torch.cuda.current_stream(example.device))
        with torch.cuda.stream(stream), context():
            for _ in range(warmup):  # warm-up off the default stream, as capture requires
                fn(self.static_x)
        torch.cuda.current_stream(example.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), context():
            self.static_y = fn(self.static_x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.static_x.copy_(x)
        self.graph.replay()
        return self.static_y.clone()  # the next replay overwrites static_y


def _half_weights_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module | None:
    """A copy of ``model`` with its floating-point weights stored in ``dtype``, or ``None``.

    Autocast casts every weight of a convolution or matmul at every call: about 600 casts per
    NeRD-Rain forward (copies were 13 % of its GPU time at 256x256 in bf16 on an H200, these and
    LayerNorm's casts, see ``LayerNorm2d``, most of them). Weights cast once give the same
    products (autocast's cast is the same rounding); ops autocast keeps in fp32 (LayerNorm's
    affine, softmax) see the rounded weights, well within the bf16 tolerance.
    """
    try:
        return copy.deepcopy(model).to(dtype)
    except Exception as err:  # noqa: BLE001 - a module that cannot be copied keeps autocast's casts
        _warn(f"could not copy the model to store its weights in {dtype} ({type(err).__name__}: {err}); "
              "autocast casts them at every call")
        return None


class FastInference(nn.Module):
    """``x -> y`` like the wrapped model, through the fast paths that are active (see ``paths``).

    Inputs may live on any device and have any floating dtype (the model gets them in the type its
    weights are stored in, float32 under half autocast); the output has the input's dtype,
    the standard (contiguous NCHW) layout and lives on the model's device (where ``.to()`` last
    moved it). Runs without autograd.
    With a half precision and ``half_weights``, it runs a copy of the model whose weights are
    stored in that precision (``model`` itself is left in fp32).
    """

    def __init__(self, model: nn.Module, device: torch.device, *, compile: bool, cuda_graphs: bool,
                 channels_last: bool, precision: str, max_graphs: int = 4,
                 compile_options: dict | None = None, half_weights: bool = True):
        super().__init__()
        copied = _half_weights_copy(model, _HALF[precision]) if half_weights and precision in _HALF else None
        self.model = copied if copied is not None else model
        self._device = device  # for a model without weights, which cannot say where it runs
        self.precision = precision
        self.channels_last = channels_last
        self.max_graphs = max(1, int(max_graphs))
        self._graphs: OrderedDict[tuple, _Graphed] = OrderedDict()
        self.paths = {"channels_last": channels_last, "compile": False, "cuda_graphs": False,
                      "precision": precision, "half_weights": copied is not None}
        self._compiled: Callable | None = None
        self._inductor_config: dict = {}
        if compile:
            if not hasattr(torch, "compile"):
                _warn("torch.compile is unavailable in this PyTorch; running eagerly")
            else:
                options = dict(compile_options or {})
                options.setdefault("dynamic", False)  # one specialised graph per input shape
                if device.type == "cpu" and not ({"mode", "options", "backend"} & options.keys()):
                    # Weights as constants: inductor prepacks them for oneDNN (about 1.3x at
                    # 128x128 on 2 cores). Later changes to the weights are not seen. Set around
                    # each call, since compiling happens at the first call for each shape
                    # (``options={"freezing": True}`` is not honoured).
                    self._inductor_config = {"freezing": True}
                try:
                    self._compiled = torch.compile(self.model, **options)
                    self.paths["compile"] = True
                except Exception as err:  # noqa: BLE001 - any backend failure means: run eagerly
                    _warn(f"torch.compile failed ({type(err).__name__}: {err}); running eagerly")
        if cuda_graphs:
            if device.type != "cuda" or not torch.cuda.is_available():
                _warn(f"CUDA graphs need a CUDA device, not {device}; running without them")
            else:
                self.paths["cuda_graphs"] = True

    @property
    def device(self) -> torch.device:
        """Where the weights are now: ``.to()`` after wrapping moves them, and the inputs follow."""
        return model_device(self.model) or self._device

    # The function the graphs capture: compiled if compile works, else the plain model.
    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if self._compiled is not None:
            try:
                with _inductor_config(self._inductor_config):
                    return self._compiled(x)
            except Exception as err:  # noqa: BLE001
                y = self.model(x)  # if the plain model fails too, its error propagates
                _warn(f"torch.compile failed at run time ({type(err).__name__}: {err}); "
                      "running eagerly from now on")
                self._compiled = None
                self.paths["compile"] = False
                return y
        return self.model(x)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point image tensor, got {x.dtype}")
        x = x.to(self._input_dtype())
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _input_dtype(self) -> torch.dtype:
        """float32 under half autocast, which casts for itself; else the type the weights are stored
        in, as a model made ``.half()`` or ``.double()`` before wrapping needs."""
        if self.precision in _HALF:
            return torch.float32
        return model_dtype(self.model) or torch.float32

    def _graphed(self, x: torch.Tensor) -> torch.Tensor | None:
        key = (tuple(x.shape), x.stride(), x.dtype, x.device)
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = _Graphed(self._run, x, lambda: _precision_context(self.precision, self.device))
            except Exception as err:  # noqa: BLE001 - capture failures fall back to eager
                torch.cuda.synchronize(self.device)
                with _precision_context(self.precision, self.device):
                    y = self._run(x)  # an input the model itself rejects raises here, graphs kept
                _warn(f"CUDA graph capture failed ({type(err).__name__}: {err}); running without graphs")
                self.paths["cuda_graphs"] = False
                self._graphs.clear()
                return y
            self._graphs[key] = entry
            while len(self._graphs) > self.max_graphs:  # least recently used goes
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        return entry(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = x.dtype
        with torch.no_grad():
            x = self._prepare(x)
            y = self._graphed(x) if self.paths["cuda_graphs"] and x.device.type == "cuda" else None
            if y is None:
                with _precision_context(self.precision, self.device):
                    y = self._run(x)
            return y.to(out_dtype).contiguous()

    def clear_graphs(self) -> None:
        """Release the captured CUDA graphs (and the memory pools they hold)."""
        self._graphs.clear()

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.paths.items())


def optimize_for_inference(
    model: nn.Module,
    device: str | torch.device | None = None,
    *,
    compile: bool = False,
    cuda_graphs: bool = False,
    channels_last: bool = False,
    dtype: torch.dtype | str | None = None,
    cpu_allocator: bool | None = None,
    max_graphs: int = 4,
    compile_options: dict | None = None,
    half_weights: bool = True,
) -> FastInference:
    """Return a module computing ``model(x)`` through the requested fast paths.

    ``model`` is put in eval mode and moved to ``device`` (default: where it is; a name is checked
    as :func:`nerdrain.devices.resolve_device` does) in place; with
    ``channels_last`` its weights are also converted to the channels-last memory format (values
    unchanged). Options:

    - ``channels_last``: run in the NHWC memory format (oneDNN on CPU, cuDNN on CUDA prefer it).
    - ``compile``: ``torch.compile`` with ``dynamic=False`` and, on CPU, inductor's ``freezing``
      (weights become constants: changing them later is not seen); ``compile_options`` are passed
      on and take precedence. A failure, at wrap time or at the first call, warns and runs the
      plain model from then on. Compiling takes minutes on CPU, once per input shape.
    - ``cuda_graphs``: capture one CUDA graph per input shape (at most ``max_graphs`` cached, least
      recently used evicted); on a non-CUDA device it warns and runs without. Combined with
      ``compile``, the compiled function is captured.
    - ``dtype``: ``None``/``torch.float32`` (exact), ``"tf32"`` (TF32 matmul and convolutions on
      CUDA for the call; same as fp32 elsewhere), ``torch.bfloat16``/``torch.float16`` (autocast;
      approximate, see the module docstring).
    - ``half_weights``: with a half ``dtype``, run a copy of the model with its weights stored in
      that dtype (cast once instead of by autocast at every call; ``model`` stays fp32, and the
      copy takes half its weights' memory again). ``False``: no copy, autocast over fp32 weights.
    - ``cpu_allocator``: on CPU, :func:`tune_cpu_allocator` (``None``: do it where glibc allows,
      silently; ``True``: warn where it cannot; ``False``: leave the allocator alone).
    """
    if not isinstance(model, nn.Module):  # it is moved, put in eval mode and wrapped as a submodule
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    try:
        precision = _PRECISIONS[dtype]
    except (KeyError, TypeError):  # TypeError: an unhashable value such as a list
        raise ValueError(f"dtype must be one of None, float32, 'tf32', bfloat16, float16; got {dtype!r}") from None
    if device is None:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    else:
        device = resolve_device(device)  # one line for a device that is unknown or absent here
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    model.eval().to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if device.type == "cpu" and cpu_allocator is not False:
        if not tune_cpu_allocator() and cpu_allocator:
            _warn("CPU allocator tuning needs glibc on Linux; leaving the allocator alone")
    if precision == "fp16" and device.type == "cpu":
        _warn("float16 autocast on CPU is slow or unsupported; using bfloat16")
        precision = "bf16"
    return FastInference(model, device, compile=compile, cuda_graphs=cuda_graphs,
                         channels_last=channels_last, precision=precision, max_graphs=max_graphs,
                         compile_options=compile_options, half_weights=half_weights)

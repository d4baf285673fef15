"""Inference fast paths against the authors' golden outputs, and their clean fallbacks."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from safetensors.torch import load_file

from nerdrain import load_model
from nerdrain.accel import FastInference, FastPathWarning, optimize_for_inference, tune_cpu_allocator

from conftest import assert_all_outputs_match_golden

CASES = ("case0", "case1")
SLOW = os.environ.get("NERDRAIN_SLOW_TESTS") == "1"


@pytest.fixture
def model(golden_dir):
    """A fresh golden model per test: the fast paths modify it in place (memory format)."""
    return load_model(golden_dir / "official_dim16_seed0.safetensors")


@pytest.fixture(scope="module")
def golden_io(golden_dir):
    return load_file(str(golden_dir / "official_dim16_seed0_io.safetensors"))


def assert_matches_golden(fast, golden_io, atol=1e-4):
    for case in CASES:
        x = golden_io[f"{case}.input"]
        y = fast(x)
        assert y.dtype == x.dtype and y.is_contiguous()
        torch.testing.assert_close(y, golden_io[f"{case}.output0"], atol=atol, rtol=0, msg=case)


def test_no_fast_path_is_the_plain_model(model, golden_io):
    fast = optimize_for_inference(model, "cpu")
    assert isinstance(fast, FastInference)
    assert fast.paths == {"channels_last": False, "compile": False, "cuda_graphs": False, "precision": "fp32",
                          "half_weights": False}
    assert_matches_golden(fast, golden_io)


def test_channels_last_matches_golden(model, golden_io):
    fast = optimize_for_inference(model, "cpu", channels_last=True)
    assert fast.paths["channels_last"]
    assert_matches_golden(fast, golden_io)


def test_channels_last_forward_all_matches_all_seven_golden_outputs(model, golden_io):
    assert_all_outputs_match_golden(model, golden_io, channels_last=True)


def test_fused_depthwise_gelu_matches_separate_ops_and_its_fallback_the_golden(model, golden_io, monkeypatch):
    """CPU inference (fp32, or bf16 maps with bf16 weights) computes the FFN's GELU inside the
    depthwise convolution (oneDNN)."""
    from nerdrain.models import blocks

    if blocks._CONV_POINTWISE is None:
        pytest.skip("this PyTorch has no oneDNN convolution with post-ops")
    x = torch.randn(2, 40, 17, 23).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(40, 1, 3, 3)
    expected = torch.nn.functional.gelu(torch.nn.functional.conv2d(x, weight, padding=1, groups=40))
    calls = []
    fused = blocks._CONV_POINTWISE
    monkeypatch.setattr(blocks, "_CONV_POINTWISE", lambda *args: calls.append(1) or fused(*args))
    with torch.no_grad():
        torch.testing.assert_close(blocks.depthwise_gelu(x, weight), expected, atol=1e-5, rtol=0)
    assert calls == [1]
    blocks.depthwise_gelu(x, weight)  # with autograd: the separate ops
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        blocks.depthwise_gelu(x, weight)  # fp32 weights under autocast: a bf16 convolution, not fused
        assert calls == [1]
        # bf16 map and weights (the half-weight copy): fused, with or without autocast around it,
        # rounded once to bf16 from the exact value (separate ops round the convolution first)
        x_half, weight_half = x.bfloat16(), weight.bfloat16()
        exact = torch.nn.functional.gelu(torch.nn.functional.conv2d(x_half.double(), weight_half.double(),
                                                                    padding=1, groups=40))
        y = blocks.depthwise_gelu(x_half, weight_half)
    assert calls == [1, 1] and y.dtype == torch.bfloat16
    assert ((y.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()  # within one bf16 rounding
    monkeypatch.setattr(blocks, "_CONV_POINTWISE", None)
    assert_all_outputs_match_golden(model, golden_io, channels_last=True)


def test_cuda_graphs_on_cpu_warn_and_fall_back(model, golden_io):
    with pytest.warns(FastPathWarning, match="CUDA graphs need a CUDA device"):
        fast = optimize_for_inference(model, "cpu", cuda_graphs=True, channels_last=True)
    assert not fast.paths["cuda_graphs"]
    assert_matches_golden(fast, golden_io)


def test_failing_compile_warns_and_falls_back(model, golden_io, monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("backend exploded")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    fast = optimize_for_inference(model, "cpu", compile=True)
    assert fast.paths["compile"]
    with pytest.warns(FastPathWarning, match="backend exploded"):
        y = fast(golden_io["case0.input"])
    assert not fast.paths["compile"]
    torch.testing.assert_close(y, golden_io["case0.output0"], atol=1e-4, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once
        assert_matches_golden(fast, golden_io)


def test_input_errors_still_raise(model):
    fast = optimize_for_inference(model, "cpu")
    with pytest.raises(TypeError, match="floating-point"):
        fast(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


@pytest.mark.parametrize("half_weights", [True, False])
def test_bfloat16_autocast_within_stated_tolerance(model, golden_io, half_weights):
    fast = optimize_for_inference(model, "cpu", channels_last=True, dtype=torch.bfloat16, half_weights=half_weights)
    assert fast.paths["precision"] == "bf16" and fast.paths["half_weights"] == half_weights
    # half_weights runs a bf16 copy; the caller's model keeps its fp32 weights either way
    assert {p.dtype for p in fast.model.parameters()} == {torch.bfloat16 if half_weights else torch.float32}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    for case in CASES:
        y = fast(golden_io[f"{case}.input"])
        assert y.dtype == torch.float32
        err = (y - golden_io[f"{case}.output0"]).abs()
        assert err.mean() < 1 / 255 and err.max() < 0.1  # the stated bf16 tolerance


def test_half_weights_leave_autocast_no_weight_to_cast(model, golden_io):
    """With bf16 weights no parameter is cast during a forward (autocast casts each at every call)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CastsOfParameters(TorchDispatchMode):
        def __init__(self, params):
            super().__init__()
            self.ptrs, self.count = {p.data_ptr() for p in params}, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.ptrs:
                self.count += 1
            return func(*args, **(kwargs or {}))

    x = golden_io["case0.input"]
    counts = {}
    for half_weights in (False, True):
        fast = optimize_for_inference(model, "cpu", dtype=torch.bfloat16, half_weights=half_weights)
        with CastsOfParameters(fast.model.parameters()) as mode:
            fast(x)
        counts[half_weights] = mode.count
    assert counts[False] > 100 and counts[True] == 0, counts


def test_model_that_cannot_be_copied_keeps_fp32_weights_with_a_warning(golden_io):
    class Uncopyable(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(x)

        def __deepcopy__(self, memo):
            raise TypeError("holds a handle")

    net = Uncopyable()
    with pytest.warns(FastPathWarning, match="could not copy"):
        fast = optimize_for_inference(net, "cpu", dtype=torch.bfloat16)
    assert not fast.paths["half_weights"] and fast.model is net
    x = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(fast(x), net(x).detach(), atol=0.02, rtol=0)


def test_unknown_dtype_is_rejected(model):
    with pytest.raises(ValueError, match="dtype"):
        optimize_for_inference(model, "cpu", dtype=torch.int8)


@pytest.mark.parametrize("dtype", [["bf16"], {}, "half", torch.float64])
def test_any_unknown_dtype_is_a_value_error_naming_it(dtype):
    with pytest.raises(ValueError, match=r"dtype must be one of .*got"):
        optimize_for_inference(torch.nn.Conv2d(3, 3, 1), "cpu", dtype=dtype)


@pytest.mark.parametrize("device, problem", [("bogus", "unknown device 'bogus'"), ("meta", "unsupported device"),
                                             pytest.param("cuda", "CUDA is not available", marks=pytest.mark.skipif(
                                                 torch.cuda.is_available(), reason="CUDA is available here"))])
def test_bad_device_is_a_value_error_before_the_model_moves(device, problem):
    net = torch.nn.Conv2d(3, 3, 1)
    with pytest.raises(ValueError, match=problem):
        optimize_for_inference(net, device)
    assert net.weight.device.type == "cpu" and net.training  # left as it was


def test_a_plain_function_is_refused_as_not_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module, got function"):
        optimize_for_inference(lambda x: x, "cpu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_a_model_stored_in_another_precision_gets_its_input_in_that_type(dtype):
    """``model.half()`` (or ``.double()``) before wrapping: the model runs in its own type, as
    derain runs such a module, and the output comes back in the input's type."""
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 3, 3, padding=1).to(dtype)
    fast = optimize_for_inference(net, "cpu")
    x = torch.rand(1, 3, 8, 8)
    y = fast(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, net(x.to(dtype)).detach().float(), atol=0, rtol=0)


def test_inputs_follow_the_model_when_the_wrapper_is_moved():
    """``fast.to(device)`` (as ``derain(..., device=...)`` does) moves the weights; the inputs must
    go where the weights now are, not where they were at wrapping time."""
    net = torch.nn.Conv2d(3, 3, 1)
    fast = optimize_for_inference(net, "cpu")
    fast.to("meta")  # a second device that every machine has
    assert fast.device == torch.device("meta") and net.weight.is_meta
    y = fast(torch.rand(1, 3, 8, 8))
    assert y.is_meta and y.shape == (1, 3, 8, 8)


def test_tune_cpu_allocator_is_idempotent():
    first = tune_cpu_allocator()
    assert isinstance(first, bool)
    assert tune_cpu_allocator() == first


@pytest.mark.skipif(not SLOW, reason="torch.compile on CPU takes minutes; set NERDRAIN_SLOW_TESTS=1")
@pytest.mark.parametrize("channels_last", [False, True])
def test_compile_matches_golden(model, golden_io, channels_last):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathWarning)  # a silent fallback would prove nothing
        fast = optimize_for_inference(model, "cpu", compile=True, channels_last=channels_last)
        assert_matches_golden(fast, golden_io)
    assert fast.paths["compile"]


@pytest.mark.parametrize("channels_last", [False, True])
def test_autograd_and_no_grad_paths_agree(model, golden_io, channels_last):
    """Without autograd the blocks work in place; with it (training) they must not, same values."""
    x = golden_io["case0.input"]
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model.eval()
    with torch.no_grad():
        fast = model.forward_all(x)
    slow = model.forward_all(x)
    slow.full.sum().backward()  # the graph is intact: nothing it saved was overwritten
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(slow.full.detach(), golden_io["case0.output0"], atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- CUDA (run on a lent GPU)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def golden_errors(fast, golden_io) -> dict[str, tuple[float, float]]:
    """(mean, max) absolute error of the full-resolution output per golden case."""
    errors = {}
    for case in CASES:
        y = fast(golden_io[f"{case}.input"])
        assert y.dtype == torch.float32 and y.is_contiguous()
        err = (y.cpu() - golden_io[f"{case}.output0"]).abs()
        errors[case] = (err.mean().item(), err.max().item())
    print(f"golden errors {fast.paths}: {errors}")
    return errors


@CUDA
def test_cuda_plain_fp32_matches_all_seven_golden_outputs(model, golden_io, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # PyTorch's default is True
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert_all_outputs_match_golden(model, golden_io, device="cuda")


@CUDA
@pytest.mark.parametrize("cuda_graphs", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_fp32_fast_paths_match_golden(model, golden_io, channels_last, cuda_graphs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathWarning)  # a silent fallback would prove nothing
        fast = optimize_for_inference(model, "cuda", channels_last=channels_last, cuda_graphs=cuda_graphs)
        errors = golden_errors(fast, golden_io)
        assert all(worst <= 1e-4 for _, worst in errors.values()), errors
        if cuda_graphs:
            # Replays of a captured graph: a new input of the same shape, and the earlier result
            # must not be overwritten by it (outputs are copied out of the graph's buffers).
            first = fast(golden_io["case0.input"])
            second = fast(golden_io["case0.input"].flip(-1))
            torch.testing.assert_close(first.cpu(), golden_io["case0.output0"], atol=1e-4, rtol=0)
            assert not torch.allclose(first, second)
    assert fast.paths["cuda_graphs"] == cuda_graphs


@CUDA
@pytest.mark.parametrize("half_weights", [True, False])
@pytest.mark.parametrize("dtype", ["tf32", torch.bfloat16, torch.float16])
def test_cuda_reduced_precision_within_stated_tolerance(model, golden_io, dtype, half_weights):
    fast = optimize_for_inference(model, "cuda", channels_last=True, cuda_graphs=True, dtype=dtype,
                                  half_weights=half_weights)
    for mean, worst in golden_errors(fast, golden_io).values():
        assert mean < 1 / 255 and worst < 0.1  # the stated reduced-precision tolerance
    assert fast.paths["cuda_graphs"]
    assert fast.paths["half_weights"] == (half_weights and dtype != "tf32")


@CUDA
@pytest.mark.skipif(not SLOW, reason="torch.compile takes minutes; set NERDRAIN_SLOW_TESTS=1")
def test_cuda_compile_with_graphs_matches_golden(model, golden_io):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathWarning)
        fast = optimize_for_inference(model, "cuda", compile=True, cuda_graphs=True, channels_last=True)
        errors = golden_errors(fast, golden_io)
    assert fast.paths["compile"] and fast.paths["cuda_graphs"]
    assert all(worst <= 1e-4 for _, worst in errors.values()), errors


@CUDA
def test_cuda_cli_model_derains_like_golden(golden_dir, golden_io, monkeypatch):
    from argparse import Namespace

    from nerdrain.cli import _model
    from nerdrain.inference import derain

    # The CLI turns cuDNN's autotuning on for its process, as the README's GPU figures had it; here
    # the process is the test session's, so the setting is put back afterwards.
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    model = _model(Namespace(weights=str(golden_dir / "official_dim16_seed0.safetensors"), device="cuda"))
    assert torch.backends.cudnn.benchmark
    for case in CASES:
        y = derain(golden_io[f"{case}.input"].cuda(), model, tile=0)
        torch.testing.assert_close(y.cpu(), golden_io[f"{case}.output0"].clamp(0, 1), atol=1e-4, rtol=0, msg=case)

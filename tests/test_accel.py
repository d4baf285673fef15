"""Inference fast paths against the authors' golden outputs, and their clean fallbacks."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from safetensors.torch import load_file

from nerdrain import load_model
from nerdrain.accel import FastInference, FastPathWarning, optimize_for_inference, tune_cpu_allocator

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
    assert fast.paths == {"channels_last": False, "compile": False, "cuda_graphs": False, "precision": "fp32"}
    assert_matches_golden(fast, golden_io)


def test_channels_last_matches_golden(model, golden_io):
    fast = optimize_for_inference(model, "cpu", channels_last=True)
    assert fast.paths["channels_last"]
    assert_matches_golden(fast, golden_io)


@pytest.mark.parametrize("case", CASES)
def test_channels_last_forward_all_matches_all_seven_golden_outputs(model, golden_io, case):
    model.to(memory_format=torch.channels_last)
    x = golden_io[f"{case}.input"].contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        outputs = model.eval().forward_all(x).official_order()
    assert outputs[0].is_contiguous(memory_format=torch.channels_last)  # the layout is kept throughout
    for index, output in enumerate(outputs):
        torch.testing.assert_close(output, golden_io[f"{case}.output{index}"], atol=1e-4, rtol=0,
                                   msg=f"{case} output{index}")


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


def test_bfloat16_autocast_within_stated_tolerance(model, golden_io):
    fast = optimize_for_inference(model, "cpu", channels_last=True, dtype=torch.bfloat16)
    assert fast.paths["precision"] == "bf16"
    for case in CASES:
        y = fast(golden_io[f"{case}.input"])
        assert y.dtype == torch.float32
        err = (y - golden_io[f"{case}.output0"]).abs()
        assert err.mean() < 1 / 255 and err.max() < 0.1  # the stated bf16 tolerance


def test_unknown_dtype_is_rejected(model):
    with pytest.raises(ValueError, match="dtype"):
        optimize_for_inference(model, "cpu", dtype=torch.int8)


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

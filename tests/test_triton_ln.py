"""The Triton LayerNorm kernel (GPU inference) against float64 LayerNorm and the golden outputs.

Without a GPU the kernel runs in Triton's interpreter on the CPU, in a subprocess (the interpreter
is chosen when the kernel is first compiled, so it needs a fresh process with ``TRITON_INTERPRET``
set). Triton is not a dependency: where it is not installed these tests skip, and LayerNorm2d
uses PyTorch's kernel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nerdrain.models import triton_ln
from nerdrain.models.blocks import LayerNorm2d

from conftest import GOLDEN, assert_all_outputs_match_golden

ROOT = Path(__file__).resolve().parents[1]
TRITON = pytest.mark.skipif(not triton_ln.available(), reason="triton is not installed (optional)")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (batch, channels, height, width): NeRD-Rain's widths, an odd one and one that fills no tile
SHAPES = [(1, 48, 17, 23), (2, 96, 9, 11), (1, 192, 5, 7), (1, 3, 4, 4), (2, 255, 3, 5)]
DTYPES = [("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "bfloat16")]  # (map, weights)


def kernel_errors(device: str) -> dict[str, float]:
    """Worst error against float64 LayerNorm of the same (rounded) inputs, in units of the output
    dtype's rounding step at 1 (so bf16 rounding of outputs near 8 counts as 8 units)."""
    errors = {}
    torch.manual_seed(0)
    for shape in SHAPES:
        for x_dtype, w_dtype in DTYPES:
            c = shape[1]
            x = (torch.randn(shape) * 3 + 1).to(getattr(torch, x_dtype)).to(device)
            x = x.contiguous(memory_format=torch.channels_last)
            w, b = (torch.randn(c) * 0.5 + 1).to(getattr(torch, w_dtype)), torch.randn(c).to(getattr(torch, w_dtype))
            y = triton_ln.layer_norm_channels_last(x, w.to(device), b.to(device), 1e-5)
            assert y.dtype == x.dtype and y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
            ref = F.layer_norm(x.double().permute(0, 2, 3, 1), (c,), w.double(), b.double(), 1e-5).permute(0, 3, 1, 2)
            step = torch.finfo(x.dtype).eps
            errors[f"{shape} {x_dtype}/{w_dtype}"] = ((y.double().cpu() - ref.cpu()).abs().max() / step).item()
    return errors


def interpreted(code: str) -> dict:
    """Run ``code`` (which prints one JSON line last) with the kernel in Triton's interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT / 'tests'}"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            env=env, cwd=ROOT / "tests", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_within_rounding(errors: dict[str, float]) -> None:
    # fp32: a few units of float rounding; half maps: the output's own rounding (values up to ~10)
    for case, units in errors.items():
        assert units <= (64 if "float32/" in case else 16), (case, units)


@TRITON
def test_kernel_equals_float64_layer_norm_in_the_interpreter():
    assert_within_rounding(interpreted("""
        import json, test_triton_ln
        print(json.dumps(test_triton_ln.kernel_errors("cpu")))
    """))


@TRITON
def test_golden_model_through_the_kernel_in_the_interpreter():
    if not GOLDEN.exists():
        pytest.skip(f"{GOLDEN} is absent")
    calls = interpreted(f"""
        import json
        from safetensors.torch import load_file
        from nerdrain import load_model
        from nerdrain.models import triton_ln
        from conftest import assert_all_outputs_match_golden

        triton_ln.DEVICES.add("cpu")
        count = [0]
        kernel = triton_ln.layer_norm_channels_last
        def counted(*args):
            count[0] += 1
            return kernel(*args)
        triton_ln.layer_norm_channels_last = counted
        model = load_model("{GOLDEN / 'official_dim16_seed0.safetensors'}")
        io = load_file("{GOLDEN / 'official_dim16_seed0_io.safetensors'}")
        assert_all_outputs_match_golden(model, io, channels_last=True)
        print(json.dumps(count[0]))
    """)
    assert calls == 2 * 156  # every LayerNorm of both golden cases


def test_used_only_where_it_applies(monkeypatch):
    monkeypatch.setattr(triton_ln, "available", lambda: True)
    monkeypatch.setattr(triton_ln, "DEVICES", {"cpu"})
    x = torch.rand(1, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert triton_ln.applies(x)
        assert not triton_ln.applies(x.contiguous())  # NCHW rows are not contiguous
    assert not triton_ln.applies(x)  # autograd: PyTorch's kernel, which has a backward
    monkeypatch.setattr(triton_ln, "DEVICES", {"cuda"})
    with torch.no_grad():
        assert not triton_ln.applies(x)
    # where it does not apply, LayerNorm2d is PyTorch's LayerNorm over channels
    norm = LayerNorm2d(8)
    torch.testing.assert_close(norm(x), F.layer_norm(x.permute(0, 2, 3, 1), (8,)).permute(0, 3, 1, 2))


@CUDA
@TRITON
def test_cuda_kernel_equals_float64_layer_norm():
    assert_within_rounding(kernel_errors("cuda"))


@CUDA
@TRITON
def test_cuda_golden_model_runs_the_kernel(golden_dir, monkeypatch):
    from safetensors.torch import load_file

    from nerdrain import load_model

    calls = []
    kernel = triton_ln.layer_norm_channels_last
    monkeypatch.setattr(triton_ln, "layer_norm_channels_last", lambda *a: calls.append(1) or kernel(*a))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = load_model(golden_dir / "official_dim16_seed0.safetensors")
    io = load_file(str(golden_dir / "official_dim16_seed0_io.safetensors"))
    assert_all_outputs_match_golden(model, io, channels_last=True, device="cuda")
    assert len(calls) == 2 * 156


def test_a_failing_kernel_warns_once_and_pytorch_takes_over(monkeypatch):
    monkeypatch.setattr(triton_ln, "available", lambda: True)
    monkeypatch.setattr(triton_ln, "DEVICES", {"cpu"})
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("no compiler for this GPU")

    monkeypatch.setattr(triton_ln, "layer_norm_channels_last", broken)
    norm = LayerNorm2d(8)
    x = torch.rand(1, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    expected = F.layer_norm(x.permute(0, 2, 3, 1), (8,)).permute(0, 3, 1, 2)
    with torch.no_grad():
        with pytest.warns(UserWarning, match="Triton LayerNorm failed.*no compiler"):
            torch.testing.assert_close(norm(x), expected)
        torch.testing.assert_close(norm(x), expected)  # no second attempt, no second warning
    assert calls == [1] and not triton_ln.DEVICES

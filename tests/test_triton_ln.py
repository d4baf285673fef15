"""The Triton LayerNorm kernels (forward, and backward for training) against float64 LayerNorm,
the golden outputs and PyTorch's LayerNorm in a training step.

Without a GPU the kernel runs in Triton's interpreter on the CPU, in a subprocess (the interpreter
is chosen when the kernel is first compiled, so it needs a fresh process with ``TRITON_INTERPRET``
set). Triton is not a dependency: where it is not installed these tests skip, and LayerNorm2d
uses PyTorch's kernel.
"""

from __future__ import annotations

import importlib.metadata
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


def _triton_release() -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in importlib.metadata.version("triton").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):  # none, or a build under another name
        return (999,)


# Triton 2.2's interpreter (PyTorch 2.2 brings it) looks up triton.language among the kernel module's
# globals (ours imports it inside a function, so that triton stays optional) and fails on more after
INTERPRETER = pytest.mark.skipif(triton_ln.available() and _triton_release() < (3,),
                                 reason="Triton 2.x's interpreter cannot run these kernels")

# (batch, channels, height, width): NeRD-Rain's widths, an odd one and one that fills no tile
SHAPES = [(1, 48, 17, 23), (2, 96, 9, 11), (1, 192, 5, 7), (1, 3, 4, 4), (2, 255, 3, 5)]
DTYPES = [("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "bfloat16")]  # (map, weights)


@pytest.fixture(autouse=True)
def no_first_use_checks_yet(monkeypatch):
    """Each test starts with the kernels' first-use checks not yet run."""
    monkeypatch.setattr(triton_ln, "_checks", {})


def cases(device: str):
    """(name, channels-last map, weight, bias) for each of SHAPES and DTYPES, rounded to the dtype."""
    torch.manual_seed(0)
    for shape in SHAPES:
        for x_dtype, w_dtype in DTYPES:
            c = shape[1]
            x = (torch.randn(shape) * 3 + 1).to(getattr(torch, x_dtype)).to(device)
            x = x.contiguous(memory_format=torch.channels_last)
            w, b = (torch.randn(c) * 0.5 + 1).to(getattr(torch, w_dtype)), torch.randn(c).to(getattr(torch, w_dtype))
            yield f"{shape} {x_dtype}/{w_dtype}", x, w.to(device), b.to(device)


def kernel_errors(device: str) -> dict[str, float]:
    """Worst error against float64 LayerNorm of the same (rounded) inputs, in units of the output
    dtype's rounding step at 1 (so bf16 rounding of outputs near 8 counts as 8 units)."""
    errors = {}
    for case, x, w, b in cases(device):
        c = x.shape[1]
        y = triton_ln.layer_norm_channels_last(x, w, b, 1e-5)
        assert y.dtype == x.dtype and y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
        ref = F.layer_norm(x.double().permute(0, 2, 3, 1), (c,), w.double(), b.double(), 1e-5).permute(0, 3, 1, 2)
        step = torch.finfo(x.dtype).eps
        errors[case] = ((y.double().cpu() - ref.cpu()).abs().max() / step).item()
    return errors


def gradient_errors(device: str) -> dict[str, float]:
    """The training path's output and input, weight and bias gradients (for a random upstream
    gradient in the map's dtype) against float64 autograd through LayerNorm of the same rounded
    inputs: worst error in units of each result's own dtype's rounding step at its largest value."""
    errors = {}
    for case, x, w, b in cases(device):
        dy = torch.randn(x.shape).to(x.dtype).to(device)
        inputs = [t.detach().requires_grad_() for t in (x, w, b)]
        y = triton_ln.LayerNormChannelsLast.apply(*inputs, 1e-5)
        results = [y, *torch.autograd.grad(y, inputs, dy)]
        assert [t.dtype for t in results] == [x.dtype, x.dtype, w.dtype, w.dtype]
        assert all(t.is_contiguous(memory_format=torch.channels_last) for t in results[:2])
        exact = [t.detach().cpu().double().requires_grad_() for t in (x, w, b)]
        ref = F.layer_norm(exact[0].permute(0, 2, 3, 1), x.shape[1:2], exact[1], exact[2], 1e-5).permute(0, 3, 1, 2)
        refs = [ref, *torch.autograd.grad(ref, exact, dy.cpu().double())]
        for name, result, expected in zip(("y", "dx", "dweight", "dbias"), results, refs):
            units = torch.finfo(result.dtype).eps * expected.abs().max()
            errors[f"{case} {name}"] = ((result.detach().cpu().double() - expected).abs().max() / units).item()
    return errors


def training_step_errors(device: str) -> dict:
    """A NeRD-Rain-S (dim 8) training step (forward_all, NeRDRainLoss, backward) on channels-last
    fp32 maps on ``device``, through the Triton kernels and through PyTorch's LayerNorm, plain and
    with activation checkpointing: each one's worst parameter gradient error against the step in
    float64 on the CPU (PyTorch's LayerNorm), relative to that gradient's largest value; with the
    LayerNorm calls, the kernels' forward and backward calls and the first-use checks run."""
    from unittest import mock

    from nerdrain import create_model
    from nerdrain.losses import NeRDRainLoss

    calls = {"layer_norm": 0, "forward": 0, "backward": 0, "checks": 0}

    def counted(name, function):
        return lambda *args, **kwargs: calls.__setitem__(name, calls[name] + 1) or function(*args, **kwargs)

    def gradients(on: str, dtype: torch.dtype, triton: bool, checkpointing: bool = False) -> list:
        torch.manual_seed(0)
        model = create_model("nerd_rain_s", dim=8).to(on, dtype, memory_format=torch.channels_last)
        model.set_activation_checkpointing(checkpointing).train()
        for module in model.modules():
            if isinstance(module, LayerNorm2d):
                module.register_forward_hook(lambda *_: calls.__setitem__("layer_norm", calls["layer_norm"] + 1))
        g = torch.Generator().manual_seed(1)
        x, target = (torch.rand(2, 3, 32, 32, generator=g).to(on, dtype).contiguous(memory_format=torch.channels_last)
                     for _ in range(2))
        with mock.patch.object(triton_ln, "DEVICES", {on} if triton else set()):
            NeRDRainLoss()(model.forward_all(x), target)[0].backward()
        return [None if p.grad is None else p.grad.cpu().double() for p in model.parameters()]

    def worst_error(grads: list) -> float:
        assert [g is None for g in grads] == [r is None for r in exact]  # the same parameters unused
        return max(((g - r).abs().max() / r.abs().max()).item() for g, r in zip(grads, exact) if r is not None)

    exact = gradients("cpu", torch.float64, triton=False)
    result = {}
    with (mock.patch.object(triton_ln, "_forward", counted("forward", triton_ln._forward)),
          mock.patch.object(triton_ln, "layer_norm_channels_last_backward",
                            counted("backward", triton_ln.layer_norm_channels_last_backward)),
          mock.patch.object(triton_ln, "_self_check", counted("checks", triton_ln._self_check))):
        for checkpointing in (False, True):
            pytorch = worst_error(gradients(device, torch.float32, False, checkpointing))
            calls.update(dict.fromkeys(calls, 0))
            triton = worst_error(gradients(device, torch.float32, True, checkpointing))
            result[f"checkpointing={checkpointing}"] = {"triton": triton, "pytorch": pytorch, **calls}
    return result


def assert_training_step_matches(result: dict) -> None:
    # Gradients as close to float64's as PyTorch's LayerNorm in float32 gets (about 2e-4 of the
    # largest, on the CPU), from every LayerNorm of the step through the kernels
    plain, recomputed = result["checkpointing=False"], result["checkpointing=True"]
    for case in (plain, recomputed):
        assert case["triton"] <= 1.5 * case["pytorch"] + 1e-6, result
    # each first-use check (one per channel count, in the first step only) runs a forward and a backward
    assert recomputed["checks"] == 0, result
    forward, backward = (plain[name] - plain["checks"] for name in ("forward", "backward"))
    assert plain["layer_norm"] > 0 and backward == forward == plain["layer_norm"], result
    # activation checkpointing runs each transformer block's forward again in the backward
    assert recomputed["backward"] == backward and recomputed["forward"] > forward, result


def interpreted(code: str) -> dict:
    """Run ``code`` (which prints one JSON line last) with the kernel in Triton's interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT / 'tests'}"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            env=env, cwd=ROOT / "tests", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_gradients_within_rounding(errors: dict[str, float]) -> None:
    # each result within a few rounding steps of its own dtype at its largest value (measured: 1.5)
    for case, units in errors.items():
        assert units <= 4, (case, units)


def assert_within_rounding(errors: dict[str, float]) -> None:
    # fp32: a few units of float rounding; half maps: the output's own rounding (values up to ~10)
    for case, units in errors.items():
        assert units <= (64 if "float32/" in case else 16), (case, units)


@TRITON
@INTERPRETER
def test_kernel_equals_float64_layer_norm_in_the_interpreter():
    assert_within_rounding(interpreted("""
        import json, test_triton_ln
        print(json.dumps(test_triton_ln.kernel_errors("cpu")))
    """))


@TRITON
@INTERPRETER
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
        assert all(triton_ln._checks.values())
        print(json.dumps(count[0] - len(triton_ln._checks)))
    """)
    assert calls == 2 * 156  # every LayerNorm of both golden cases (besides one first-use check per width)


@TRITON
@INTERPRETER
def test_training_kernels_equal_float64_layer_norm_gradients_in_the_interpreter():
    assert_gradients_within_rounding(interpreted("""
        import json, test_triton_ln
        print(json.dumps(test_triton_ln.gradient_errors("cpu")))
    """))


@TRITON
@INTERPRETER
def test_training_step_through_the_kernels_in_the_interpreter_equals_pytorchs():
    assert_training_step_matches(interpreted("""
        import json, test_triton_ln
        print(json.dumps(test_triton_ln.training_step_errors("cpu")))
    """))


def test_used_only_where_it_applies(monkeypatch):
    """Which maps take the kernels, whether Triton is installed or not (``available`` is patched,
    nothing is compiled): grad mode plays no part, since the kernels have a backward."""
    monkeypatch.setattr(triton_ln, "available", lambda: True)
    monkeypatch.setattr(triton_ln, "DEVICES", {"cpu"})
    x = torch.rand(1, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    for training in (True, False):
        with torch.set_grad_enabled(training):
            assert triton_ln.applies(x)
    assert not triton_ln.applies(x.contiguous())  # NCHW rows are not contiguous
    monkeypatch.setattr(triton_ln, "is_compiling", lambda: True)
    assert not triton_ln.applies(x)  # inductor fuses its own
    monkeypatch.setattr(triton_ln, "is_compiling", lambda: False)
    monkeypatch.setattr(triton_ln, "DEVICES", {"cuda"})
    assert not triton_ln.applies(x)  # a CPU map where the kernels serve CUDA ones only
    # where it does not apply, LayerNorm2d is PyTorch's LayerNorm over channels
    norm = LayerNorm2d(8)
    torch.testing.assert_close(norm(x), F.layer_norm(x.permute(0, 2, 3, 1), (8,)).permute(0, 3, 1, 2))


@CUDA
@TRITON
def test_cuda_kernel_equals_float64_layer_norm():
    assert_within_rounding(kernel_errors("cuda"))


@CUDA
@TRITON
def test_cuda_triton_training_kernels_equal_float64_layer_norm_gradients():
    assert_gradients_within_rounding(gradient_errors("cuda"))


@CUDA
@TRITON
def test_cuda_triton_training_step_equals_pytorchs(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert_training_step_matches(training_step_errors("cuda"))


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
    assert all(triton_ln._checks.values()) and len(calls) == 2 * 156 + len(triton_ln._checks)


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


def pytorch_layer_norm_with_statistics(x, weight, bias, eps, stats):
    """What the Triton forward returns, computed by PyTorch: for the backward's fallback without Triton."""
    rows = x.permute(0, 2, 3, 1).float()
    var, mean = torch.var_mean(rows, dim=-1, correction=0)
    y = F.layer_norm(rows, rows.shape[-1:], weight.float(), bias.float(), eps).permute(0, 3, 1, 2)
    return y.to(x.dtype), mean.flatten(), (var + eps).rsqrt().flatten()


@pytest.mark.parametrize("failing", ["forward", "backward"])
def test_a_failing_training_kernel_warns_once_and_pytorch_takes_over(monkeypatch, failing):
    """In training the forward kernel failing gives PyTorch's LayerNorm; the backward kernel failing
    (after the forward ran) gives PyTorch's gradients for the saved inputs, and its LayerNorm after."""
    monkeypatch.setattr(triton_ln, "available", lambda: True)
    monkeypatch.setattr(triton_ln, "DEVICES", {"cpu"})

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler for this GPU")

    if failing == "forward":
        monkeypatch.setattr(triton_ln, "_forward", broken)
    else:
        monkeypatch.setattr(triton_ln, "_forward", pytorch_layer_norm_with_statistics)
        monkeypatch.setattr(triton_ln, "layer_norm_channels_last_backward", broken)
        monkeypatch.setattr(triton_ln, "_self_check", lambda *args: None)  # passed, on other maps
    torch.manual_seed(0)
    norm = LayerNorm2d(8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(2, 8, 4, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(2, 8, 4, 5, dtype=torch.float64)

    def gradients(module, x):
        x = x.detach().requires_grad_()
        return torch.autograd.grad(module(x), [x, *module.parameters()], dy)

    expected = gradients(norm.double(), x.contiguous())  # NCHW: PyTorch's LayerNorm
    x32, norm32 = x.float(), LayerNorm2d(8)
    norm32.load_state_dict(norm.float().state_dict())
    with pytest.warns(UserWarning, match="Triton LayerNorm failed.*no compiler"):
        first = gradients(norm32, x32)
    assert not triton_ln.DEVICES
    second = gradients(norm32, x32)  # PyTorch's from now on, no second warning
    for got in (first, second):
        for a, b in zip(got, expected):
            torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


def pytorch_layer_norm_backward(dy, x, weight, mean, rstd, programs=None):
    """What the Triton backward returns, computed by PyTorch (for LayerNorm2d's eps; the bias plays
    no part in the gradients)."""
    return triton_ln._pytorch_backward(dy, x, weight, torch.zeros_like(weight), 1e-5)


def with_pytorch_kernels(monkeypatch) -> dict[str, int]:
    """The kernels' launchers replaced by PyTorch's (no Triton needed) on CPU maps; their calls counted."""
    monkeypatch.setattr(triton_ln, "available", lambda: True)
    monkeypatch.setattr(triton_ln, "DEVICES", {"cpu"})
    calls = {"forward": 0, "backward": 0}

    def counted(name, function):
        return lambda *args, **kwargs: calls.__setitem__(name, calls[name] + 1) or function(*args, **kwargs)

    monkeypatch.setattr(triton_ln, "_forward", counted("forward", pytorch_layer_norm_with_statistics))
    monkeypatch.setattr(triton_ln, "layer_norm_channels_last_backward",
                        counted("backward", pytorch_layer_norm_backward))
    return calls


def random_layer_norm(channels: int) -> LayerNorm2d:
    torch.manual_seed(0)
    norm = LayerNorm2d(channels)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    return norm


def pytorch_layer_norm(norm: LayerNorm2d, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], norm.weight, norm.bias, norm.eps).permute(0, 3, 1, 2)


def channels_last_map(*shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("wrong, training", [("output", False), ("output", True), ("input gradient", True),
                                             ("weight gradient", True), ("bias gradient", True)])
def test_a_kernel_computing_wrong_numbers_is_caught_on_first_use(monkeypatch, wrong, training):
    """A kernel that runs but is off by 1e-3 of its values in one result (ten times what fp32 is
    allowed): the first use warns which, the kernels are off, and the layer is PyTorch's LayerNorm."""
    with_pytorch_kernels(monkeypatch)
    names = ("output", "input gradient", "weight gradient", "bias gradient")
    launcher = "_forward" if wrong == "output" else "layer_norm_channels_last_backward"
    right = getattr(triton_ln, launcher)

    def off(*args, **kwargs):
        results = list(right(*args, **kwargs))
        index = names.index(wrong) - (wrong != "output")  # the backward's results start at the input gradient
        results[index] = results[index] * (1 + 1e-3)
        return results

    monkeypatch.setattr(triton_ln, launcher, off)
    norm, x = random_layer_norm(8), channels_last_map(2, 8, 5, 7)
    with torch.set_grad_enabled(training):
        with pytest.warns(UserWarning, match=rf"first-use check failed \({wrong} off by 0.001 of"):
            y = norm(x)
        assert torch.equal(y, pytorch_layer_norm(norm, x))
    assert not triton_ln.DEVICES and triton_ln._checks == {(x.device, torch.float32, torch.float32, 8, training): False}


def test_the_first_use_check_runs_once_per_device_dtypes_width_and_direction(monkeypatch):
    calls = with_pytorch_kernels(monkeypatch)
    checked = []
    check = triton_ln._self_check
    monkeypatch.setattr(triton_ln, "_self_check", lambda *key: checked.append(key[:-1]) or check(*key))
    uses = [(8, torch.float32, False), (8, torch.float32, True), (8, torch.bfloat16, False), (16, torch.float32, False)]
    for channels, dtype, training in uses + uses:
        norm = random_layer_norm(channels)
        with torch.set_grad_enabled(training):
            y = norm(channels_last_map(1, channels, 5, 7).to(dtype))
            if training:
                y.sum().backward()
    cpu = torch.device("cpu")
    assert checked == [(cpu, dtype, torch.float32, channels, training) for channels, dtype, training in uses]
    # the layers' calls went through the kernels (each check one forward, and one backward in training)
    assert calls == {"forward": 2 * len(uses) + len(uses), "backward": 2 + 1}


def test_a_first_use_check_inside_activation_checkpointing_leaves_its_recomputation_alone(monkeypatch):
    """The check's own autograd graph (PyTorch's gradients to compare with) saves its tensors
    outside the checkpoint's hooks, which would count them in the original forward only."""
    from torch.utils.checkpoint import checkpoint

    with_pytorch_kernels(monkeypatch)
    norm, x = random_layer_norm(8), channels_last_map(2, 8, 5, 7).requires_grad_()
    # a block as in the model: the LayerNorm's tensors are not the last it saves
    checkpoint(lambda x: norm(x).sin(), x, use_reentrant=False).sum().backward()
    expected = torch.autograd.grad(pytorch_layer_norm(norm, x).sin().sum(), [x, *norm.parameters()])
    for got, want in zip([x.grad, norm.weight.grad, norm.bias.grad], expected):
        torch.testing.assert_close(got, want)
    assert list(triton_ln._checks.values()) == [True]


def test_no_first_use_check_while_a_cuda_graph_is_captured(monkeypatch):
    """The check's host sync is illegal in capture: an unchecked width goes to PyTorch's LayerNorm
    (captured in the graph), the kernels stay on, and the check runs at the first use after."""
    calls = with_pytorch_kernels(monkeypatch)
    monkeypatch.setattr(triton_ln, "_capturing", lambda x: True)
    norm, x = random_layer_norm(8), channels_last_map(1, 8, 5, 7)
    with torch.no_grad():
        assert torch.equal(norm(x), pytorch_layer_norm(norm, x))
        assert calls["forward"] == 0 and not triton_ln._checks and triton_ln.DEVICES == {"cpu"}
        monkeypatch.setattr(triton_ln, "_capturing", lambda x: False)
        norm(x)
    assert calls["forward"] == 2 and list(triton_ln._checks.values()) == [True]


@TRITON
@INTERPRETER
def test_the_real_kernels_pass_their_first_use_check_in_the_interpreter():
    """For NeRD-Rain's widths, an odd one and one that fills no tile, in each of DTYPES, inference
    and training; and LayerNorm2d then runs through the kernels (one forward launch per call after
    the check's), without a warning."""
    result = interpreted("""
        import json, warnings
        import torch
        from nerdrain.models import triton_ln
        from nerdrain.models.blocks import LayerNorm2d
        from test_triton_ln import DTYPES, channels_last_map, pytorch_layer_norm, random_layer_norm

        warnings.simplefilter("error")
        triton_ln.DEVICES.add("cpu")
        mismatches = {f"{c} {x}/{w} backward={b}": triton_ln._self_check(
                          torch.device("cpu"), getattr(torch, x), getattr(torch, w), c, b, 1e-5)
                      for c in (48, 255, 3) for x, w in DTYPES for b in (False, True)}
        launches = []
        forward = triton_ln._forward
        triton_ln._forward = lambda *args, **kwargs: launches.append(1) or forward(*args, **kwargs)
        norm, x = random_layer_norm(48), channels_last_map(1, 48, 5, 7)
        errors = []
        for training in (False, True, False, True):
            with torch.set_grad_enabled(training):
                errors.append((norm(x) - pytorch_layer_norm(norm, x)).abs().max().item())
        print(json.dumps({"mismatches": mismatches, "launches": len(launches), "errors": errors,
                          "checks": list(triton_ln._checks.values()), "on": sorted(triton_ln.DEVICES)}))
    """)
    assert result["mismatches"] == dict.fromkeys(result["mismatches"])  # all None
    assert result["checks"] == [True, True] and "cpu" in result["on"]
    assert result["launches"] == 2 + 4 and max(result["errors"]) < 1e-4, result


def test_a_layer_norm_ending_a_checkpointed_region_keeps_the_kernels(monkeypatch):
    """Non-reentrant checkpointing stops its recomputation by raising, once the last tensor it needs
    is saved; where that is the LayerNorm's, the exception passes through the kernels' error
    handling, which must not take it for a failure of theirs (a warning, the kernels off)."""
    import warnings

    from torch.utils.checkpoint import checkpoint

    calls = with_pytorch_kernels(monkeypatch)
    norm, x = random_layer_norm(8), channels_last_map(2, 8, 5, 7).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (checkpoint(lambda x: norm(x) * 2, x, use_reentrant=False) ** 2).sum().backward()
    expected = torch.autograd.grad(((pytorch_layer_norm(norm, x) * 2) ** 2).sum(), [x, *norm.parameters()])
    for got, want in zip([x.grad, norm.weight.grad, norm.bias.grad], expected):
        torch.testing.assert_close(got, want)
    assert triton_ln.DEVICES == {"cpu"} and calls["backward"] == 2  # the check's, and the layer's

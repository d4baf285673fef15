"""The network against the authors' golden outputs, and its behaviour at any size and dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from nerdrain import create_model, load_model
from nerdrain.models import list_models
from nerdrain.models.inr import ImplicitDecoder

from conftest import assert_all_outputs_match_golden


@pytest.fixture(scope="module")
def golden_model(golden_dir):
    return load_model(golden_dir / "official_dim16_seed0.safetensors")


@pytest.fixture(scope="module")
def golden_io(golden_dir):
    return load_file(str(golden_dir / "official_dim16_seed0_io.safetensors"))


@pytest.mark.parametrize("name, count", [("nerd_rain", 22_893_146), ("nerd_rain_s", 10_530_314)])
def test_parameter_counts_equal_released_models(name, count):
    model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == count
    assert len(model.state_dict()) == 947


def test_registry_overrides_and_unknown_names():
    assert set(list_models()) >= {"nerd_rain", "nerd_rain_s"}
    assert create_model("nerd_rain", dim=16).cfg.dim == 16
    with pytest.raises(ValueError, match="unknown model 'nerd'"):
        create_model("nerd")


@pytest.mark.parametrize("overrides, field", [
    ({"dim": 7}, "dim"),  # Downsample halves the width before pixel-unshuffle
    ({"dim": 0}, "dim"),
    ({"dim": "8"}, "dim"),
    ({"dim": 8, "heads": (3, 3, 3)}, "heads"),
    ({"heads": (0, 1, 1)}, "heads"),
    ({"heads": (1, 2)}, "heads"),
    ({"depths": (-1, 1, 1)}, "depths"),
    ({"ffn_expansion": 0}, "ffn_expansion"),
    ({"inr_hidden": (0,)}, "inr_hidden"),
])
def test_settings_that_cannot_build_a_network_fail_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"NeRDRainConfig.{field}: expected"):
        create_model("nerd_rain_s", **overrides)


def test_settings_given_as_numpy_numbers_lists_or_whole_floats_are_stored_as_python_ints_and_tuples():
    """As configs arrive from YAML, JSON or numpy; stored normalised, so equal configs compare and
    hash equal and save as JSON."""
    import json
    from dataclasses import asdict

    import numpy as np

    from nerdrain.models.nerd_rain import NeRDRainConfig

    cfg = NeRDRainConfig(dim=np.int64(16), depths=[2, 3, 3], heads=tuple(np.array([1, 2, 4])),
                         ffn_expansion=np.float32(2.5), inr_hidden=[256.0, 256, 256])
    assert cfg == NeRDRainConfig(dim=16, ffn_expansion=2.5) and hash(cfg) == hash(NeRDRainConfig(dim=16, ffn_expansion=2.5))
    assert json.loads(json.dumps(asdict(cfg)))["heads"] == [1, 2, 4]
    assert type(cfg.dim) is int and type(cfg.ffn_expansion) is float


def test_unknown_settings_are_named_and_unusual_valid_ones_run():
    with pytest.raises(ValueError, match="unknown setting 'foo' for nerd_rain_s; settings: dim, depths"):
        create_model("nerd_rain_s", foo=1)
    # No transformer blocks, and an INR without hidden layers: odd, but a network that runs.
    model = create_model("nerd_rain_s", dim=6, depths=(0, 0, 0), heads=(1, 1, 3), inr_hidden=()).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 20, 24)).shape == (1, 3, 20, 24)


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 4, 32, 32), (1, 1, 32, 32), (0, 3, 32, 32), (1, 3, 0, 8)])
def test_inputs_that_are_not_a_batch_of_rgb_images_are_refused_in_words(shape):
    model = create_model("nerd_rain_s", dim=8, depths=(1, 1, 1), inr_hidden=(16,)).eval()
    for forward in (model, model.forward_all):
        with pytest.raises(ValueError, match=r"expected a batch of RGB images, B x 3 x H x W"):
            forward(torch.rand(shape))


def test_inputs_not_in_the_weights_type_are_refused_in_words():
    """A uint8 batch (0-255, not [0, 1]) or a float64 one from numpy, outside autocast: one line
    saying what to convert, not a scalar-type error from a kernel several layers in."""
    model = create_model("nerd_rain_s", dim=8, depths=(1, 1, 1), inr_hidden=(16,)).eval()
    for forward in (model, model.forward_all):
        with pytest.raises(TypeError, match=r"float images in \[0, 1\], got torch.uint8"):
            forward(torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8))
        with pytest.raises(TypeError, match=r"the input is torch.float64 but the weights are torch.float32"):
            forward(torch.rand(1, 3, 16, 16, dtype=torch.float64))
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts for itself
        assert model.to(torch.bfloat16)(x).shape == x.shape


@pytest.mark.parametrize("case", ["case0", "case1"])
def test_forward_all_matches_golden_outputs(golden_model, golden_io, case):
    with torch.no_grad():
        outputs = golden_model.forward_all(golden_io[f"{case}.input"]).official_order()
    assert len(outputs) == 7
    for index, output in enumerate(outputs):
        expected = golden_io[f"{case}.output{index}"]
        assert output.shape == expected.shape
        torch.testing.assert_close(output, expected, atol=1e-4, rtol=0, msg=f"{case} output{index}")


def test_call_returns_final_image_only(golden_model, golden_io):
    x = golden_io["case0.input"]
    with torch.no_grad():
        y = golden_model(x)
    torch.testing.assert_close(y, golden_io["case0.output0"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (17, 31), (321, 481)])
def test_any_size_is_reflect_padded_and_cropped(golden_model, size):
    h, w = size
    x = torch.rand(1, 3, h, w)
    with torch.no_grad():
        y = golden_model(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    if h > 15 and w > 15:  # one reflection suffices: compare with an explicit pad + crop
        padded = F.pad(x, (0, -w % 16, 0, -h % 16), mode="reflect")
        with torch.no_grad():
            expected = golden_model.forward_all(padded).full[..., :h, :w]
        torch.testing.assert_close(y, expected)


def test_forward_all_rejects_unpadded_sizes(golden_model):
    with pytest.raises(ValueError, match="divisible by 16"):
        golden_model.forward_all(torch.rand(1, 3, 17, 32))


def test_bfloat16_weights_and_autocast_run_close_to_fp32(golden_model, golden_io):
    x = golden_io["case1.input"]
    reference = golden_io["case1.output0"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_out = golden_model(x)
    bf16_model = create_model("nerd_rain", dim=16)
    bf16_model.load_state_dict(golden_model.state_dict())
    bf16_model.to(torch.bfloat16).eval()
    with torch.no_grad():
        bf16_out = bf16_model(x.to(torch.bfloat16))
    assert bf16_out.dtype == torch.bfloat16
    # Stated tolerance for bf16 paths: mean error under 1/255, worst pixel under 0.1.
    for out in (autocast_out.float(), bf16_out.float()):
        err = (out - reference).abs()
        assert err.mean() < 1 / 255 and err.max() < 0.1


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
def test_layer_norm_of_bf16_maps_under_autocast(weight_dtype):
    """Per pixel over channels, as fp64 computes it from the same rounded inputs; with bf16
    weights the bf16 map goes through one kernel, never cast (autocast alone would cast it)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from nerdrain.models.blocks import LayerNorm2d

    class MapCasts(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].dim() == 4:
                MapCasts.count += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    norm = LayerNorm2d(24)
    with torch.no_grad():
        norm.weight.normal_(1, 0.3)
        norm.bias.normal_(0, 0.3)
    norm.to(weight_dtype)
    x = (torch.randn(2, 24, 9, 11) * 3 + 1).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), MapCasts():
        y = norm(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert MapCasts.count == (0 if weight_dtype == torch.bfloat16 else 2)
    x64 = x.double()
    mean, var = x64.mean(1, keepdim=True), x64.var(1, unbiased=False, keepdim=True)
    expected = (x64 - mean) / (var + norm.eps).sqrt() * norm.weight.double()[:, None, None] \
        + norm.bias.double()[:, None, None]
    torch.testing.assert_close(y.double(), expected, atol=0.02, rtol=2 ** -8)  # bf16 rounding of the output


@pytest.mark.parametrize("channels_last", [False, True])
def test_meta_device_forward_gives_shapes_without_memory(channels_last):
    """Shape inference on the meta device (no data, no memory), e.g. before loading weights."""
    model = create_model("nerd_rain_s").to("meta").eval()
    x = torch.empty(2, 3, 48, 80, device="meta")
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        outputs = model.forward_all(x)
    assert outputs.full.shape == (2, 3, 48, 80) and outputs.small.shape == (2, 3, 12, 20)
    assert outputs.full.device.type == "meta"


def test_inr_conv_form_equals_four_way_ensemble_mlp():
    """The released INR: MLP on unfolded 3x3 features plus 20 constant inputs, averaged 4 times."""
    torch.manual_seed(0)
    dim, b, h, w = 4, 2, 5, 7
    inr = ImplicitDecoder(dim, hidden=(8, 8))
    feats = torch.randn(b, dim, h, w)
    unfolded = F.unfold(feats, 3, padding=1).transpose(1, 2)  # B x HW x 9*dim
    extra = torch.tensor([0.0] * 18 + [2.0, 2.0]).expand(b, h * w, 20)
    q = torch.cat([unfolded, extra], dim=-1)
    preds = []
    for _ in range(4):  # the local ensemble: four identical queries, area weights 1/4 each
        x = q
        for i, layer in enumerate(inr.layers):
            x = layer(x)
            if i < len(inr.layers) - 1:
                x = torch.relu(x)
        preds.append(x * 0.25)
    expected = sum(preds).transpose(1, 2).reshape(b, 3, h, w)
    torch.testing.assert_close(inr(feats), expected, atol=1e-5, rtol=1e-5)


def test_third_full_scale_pass_shares_second_pass_reduction():
    model = create_model("nerd_rain", dim=8)
    unused = model.passes[2][2].reduces[1]
    assert not unused.weight.requires_grad
    x = torch.rand(1, 3, 32, 32)
    before = model(x)
    with torch.no_grad():
        unused.weight.add_(1.0)
    torch.testing.assert_close(model(x), before)  # never used
    with torch.no_grad():
        model.passes[2][1].reduces[1].weight.add_(0.1)
    assert not torch.allclose(model(x), before)  # the shared one is


@pytest.mark.parametrize("batch, heads, channels, height, width, channels_last", [
    (1, 1, 48, 64, 64, True),     # chunks of 256 pixels, no remainder
    (1, 2, 96, 32, 33, True),     # a remainder of 32 pixels
    (2, 4, 64, 17, 31, True),     # batch > 1 through channels-last views
    (1, 4, 32, 40, 40, False),    # NCHW at batch 1
    (3, 2, 16, 16, 32, False),    # NCHW at batch > 1: falls back to per-head products
])
def test_split_channel_gram_equals_per_head_products(batch, heads, channels, height, width, channels_last):
    from nerdrain.models.blocks import channel_gram

    x = torch.randn(batch, 3 * channels, height, width, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    n, d = height * width, channels // heads
    if channels_last:  # the layout ChannelAttention hands over: B x 3C x N views of NHWC memory
        qkv = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(batch, n, -1).transpose(1, 2)
    else:
        qkv = x.reshape(batch, 3 * channels, n)
    q, k, _ = qkv.split(channels, dim=1)
    q.requires_grad_(True)
    expected = torch.einsum("bhin,bhjn->bhij", q.unflatten(1, (heads, d)), k.unflatten(1, (heads, d)))
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), q)
    for split in (False, True):
        gram = channel_gram(q, k, heads, split=split)
        torch.testing.assert_close(gram, expected.detach(), atol=1e-10, rtol=0)
        (grad,) = torch.autograd.grad(gram.square().sum(), q)
        torch.testing.assert_close(grad, expected_grad, atol=1e-9, rtol=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
@pytest.mark.parametrize("batch, heads, split", [(1, 1, False), (2, 2, False), (1, 2, True)])
def test_channels_last_attention_gradients_equal_nchw_ones_and_stay_channels_last(batch, heads, split, device,
                                                                                 monkeypatch):
    """In training on channels-last maps, attention's q k^T and q/k/v split have their own backward
    (pixel-major gradients): input and parameter gradients equal plain autograd's through the NCHW
    path, in float64, and the input gradient comes out channels-last. cuDNN takes no float64
    channels-last maps (its convolutions hand back NCHW ones), so on CUDA the channels-last side
    runs in float32 without TF32 and is compared with the float64 gradients at float32's precision."""
    import copy

    from nerdrain.models import blocks

    monkeypatch.setattr(blocks, "SPLIT_GRAM_DEVICES", {device} if split else set())
    dtype = torch.float64 if device == "cpu" else torch.float32
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # matmuls are full fp32 by default
    torch.manual_seed(0)
    attention = blocks.ChannelAttention(16, heads).double().to(device)
    with torch.no_grad():
        attention.temperature.uniform_(0.5, 2.0)
    x = torch.randn(batch, 16, 24, 23, dtype=torch.float64, device=device)  # 552 pixels: 2 chunks + remainder
    upstream = torch.randn(batch, 16, 24, 23, dtype=torch.float64, device=device)

    def gradients(channels_last: bool, dtype: torch.dtype):
        layout = torch.channels_last if channels_last else torch.contiguous_format
        module = copy.deepcopy(attention).to(dtype=dtype, memory_format=layout)
        inp = x.to(dtype).contiguous(memory_format=layout).requires_grad_(True)
        params = list(module.parameters())
        grads = torch.autograd.grad((module(inp) * upstream.to(dtype)).sum(), [inp, *params])
        return grads

    calls = {"split": 0, "gram": 0}
    for name, key in (("_PixelMajorSplit", "split"), ("_PixelMajorGram", "gram")):
        real_apply = getattr(blocks, name).apply
        monkeypatch.setattr(getattr(blocks, name), "apply",
                            lambda *a, _real=real_apply, _key=key: calls.__setitem__(_key, calls[_key] + 1) or _real(*a))
    expected = gradients(channels_last=False, dtype=torch.float64)
    assert calls == {"split": 0, "gram": 0}
    got = gradients(channels_last=True, dtype=dtype)
    assert calls == {"split": 1, "gram": 1}
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    tolerance = {"atol": 1e-10, "rtol": 1e-9} if dtype == torch.float64 else {"atol": 1e-4, "rtol": 1e-4}
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.double(), b, **tolerance)


@pytest.mark.parametrize("channels_last", [False, True])
def test_split_gram_form_matches_golden_outputs(golden_dir, golden_io, monkeypatch, channels_last):
    """The CUDA form of q k^T, forced on the CPU: all seven outputs still match the released code."""
    from nerdrain.models import blocks

    monkeypatch.setattr(blocks, "SPLIT_GRAM_DEVICES", {"cpu"})
    model = load_model(golden_dir / "official_dim16_seed0.safetensors").eval()
    assert_all_outputs_match_golden(model, golden_io, channels_last)


def test_activation_checkpointing_keeps_gradients_and_saves_memory():
    def saved_bytes_and_grads(checkpointing: bool):
        torch.manual_seed(0)
        model = create_model("nerd_rain_s", dim=8).set_activation_checkpointing(checkpointing).train()
        x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outputs = model.forward_all(x)
        loss = sum(o.square().mean() for o in outputs)
        loss.backward()
        return sum(storages.values()), outputs, [p.grad for p in model.parameters() if p.requires_grad]

    plain_bytes, plain_out, plain_grads = saved_bytes_and_grads(False)
    ckpt_bytes, ckpt_out, ckpt_grads = saved_bytes_and_grads(True)
    for a, b in zip(plain_out, ckpt_out):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    for a, b in zip(plain_grads, ckpt_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert ckpt_bytes < plain_bytes / 2, (ckpt_bytes, plain_bytes)


@pytest.mark.parametrize("channels_last", [False, True])
def test_banded_inference_matches_golden_outputs(golden_dir, golden_io, monkeypatch, channels_last):
    """Large maps go through attention, FFN and INR in bands of rows; forced here onto the golden
    inputs (bands of 8 rows, 2 to 8 per map, batch 1 and 2), all seven outputs still match."""
    from nerdrain.models import blocks, inr

    monkeypatch.setattr(blocks, "BAND_PIXELS", 64)
    calls = {"blocks": [], "inr": []}
    real_row_bands = blocks.row_bands

    def counting(where):
        def row_bands(x, halo=1):
            bands = real_row_bands(x, halo)
            calls[where].append(len(bands or ()))
            return bands
        return row_bands

    monkeypatch.setattr(blocks, "row_bands", counting("blocks"))
    monkeypatch.setattr(inr, "row_bands", counting("inr"))
    model = load_model(golden_dir / "official_dim16_seed0.safetensors").eval()
    assert_all_outputs_match_golden(model, golden_io, channels_last)
    # Attention and FFN (two calls per block) and the INR all went through bands, up to 8 of them.
    assert max(calls["blocks"]) == 8 and max(calls["inr"]) >= 2

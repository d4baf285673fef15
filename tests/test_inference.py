"""The derain() API and batch processing of files, with stand-in models."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from nerdrain import inference
from nerdrain.imageio import Photo, read_photo, write_photo
from nerdrain.inference import Summary, derain, derain_files, expand_inputs, plan_outputs, resolve_device

RNG = np.random.default_rng(7)


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def affine(x: torch.Tensor) -> torch.Tensor:
    return x * 0.9 + 0.05


class TinyNet(torch.nn.Module):
    """A small conv net; records whether it ran in training mode."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, :, 1, 1] = torch.eye(3)
            self.conv.bias.zero_()
        self.modes: list[bool] = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.conv(x)


def _q8(x):
    return np.floor(np.clip(x, 0, 1) * 255 + 0.5).astype(np.int64)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _no_temp(folder: Path) -> bool:
    return not any(p.name.endswith(".tmp") for p in folder.rglob("*"))


# --------------------------------------------------------------------------- derain(): PIL


def test_pil_rgb():
    a = RNG.integers(0, 256, (21, 34, 3), dtype=np.uint8)
    out = derain(Image.fromarray(a), affine, tile=16, overlap=4)
    assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == (34, 21)
    ref = _q8(a / 255.0 * 0.9 + 0.05)
    assert np.abs(np.asarray(out).astype(np.int64) - ref).max() <= 1


def test_pil_rgba_alpha_passed_through_exactly():
    a = RNG.integers(0, 256, (19, 23, 4), dtype=np.uint8)
    out = derain(Image.fromarray(a), affine, tile=0)
    assert out.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(out)[..., 3], a[..., 3])
    assert np.abs(np.asarray(out)[..., :3].astype(np.int64) - _q8(a[..., :3] / 255 * 0.9 + 0.05)).max() <= 1


def test_pil_grayscale_and_other_modes():
    g = RNG.integers(0, 256, (15, 17), dtype=np.uint8)
    out = derain(Image.fromarray(g), identity)
    assert out.mode == "L"
    np.testing.assert_array_equal(np.asarray(out), g)

    la = Image.fromarray(np.stack([g, 255 - g], -1))
    out = derain(la, identity)
    assert out.mode == "LA"
    np.testing.assert_array_equal(np.asarray(out), np.asarray(la))

    g16 = RNG.integers(0, 65536, (15, 17), dtype=np.uint16)
    out = derain(Image.fromarray(g16), identity)
    assert out.mode == "I;16"
    np.testing.assert_array_equal(np.asarray(out), g16)

    f = RNG.random((6, 7), dtype=np.float32)
    out = derain(Image.fromarray(f), identity)
    assert out.mode == "F"
    np.testing.assert_allclose(np.asarray(out), f, atol=1e-6)

    p = Image.fromarray(RNG.integers(0, 256, (10, 10, 3), dtype=np.uint8)).quantize(8)
    out = derain(p, identity)
    assert out.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out), np.asarray(p.convert("RGB")))
    p.info["transparency"] = 2
    out = derain(p, identity)
    assert out.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(out)[..., 3] == 0, np.asarray(p) == 2)


def test_pil_keeps_icc_in_info():
    img = Image.fromarray(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    img.info["icc_profile"] = icc
    assert derain(img, identity).info.get("icc_profile") == icc


def test_pil_keeps_the_exif_orientation_it_does_not_apply(tmp_path):
    # The pixels stay as stored, so the EXIF must still say how to turn them.
    a = RNG.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "TestMake"
    Image.fromarray(a).save(tmp_path / "o.png", exif=exif)
    out = derain(Image.open(tmp_path / "o.png"), identity)
    assert out.size == (24, 16)
    np.testing.assert_array_equal(np.asarray(out), a)
    kept = Image.Exif()
    kept.load(out.info["exif"])
    assert kept.get(0x0112) == 6 and kept.get(0x010F) == "TestMake"


def test_pil_says_what_it_could_not_keep_as_a_warning_at_the_callers_line():
    """derain_files reports such notes per file; an in-memory image gets them as warnings."""
    img = Image.new("CMYK", (16, 16), (10, 20, 30, 0))
    img.info["icc_profile"] = b"not a profile"
    with pytest.warns(UserWarning, match="the image: its CMYK colour profile could not be applied") as caught:
        derain(img, identity)
    assert [Path(w.filename).name for w in caught] == [Path(__file__).name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing lost, nothing said
        derain(Image.new("RGB", (16, 16), (10, 20, 30)), identity)


# --------------------------------------------------------------------------- derain(): numpy


@pytest.mark.parametrize("shape", [(13, 29), (13, 29, 1), (13, 29, 3), (13, 29, 4)])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64])
def test_numpy_dtypes_and_shapes(shape, dtype):
    if np.issubdtype(dtype, np.integer):
        a = RNG.integers(0, np.iinfo(dtype).max + 1, shape).astype(dtype)
    else:
        a = RNG.random(shape).astype(dtype)
    out = derain(a, identity, tile=16, overlap=4)
    assert isinstance(out, np.ndarray) and out.dtype == a.dtype and out.shape == a.shape and out.flags.c_contiguous
    if len(shape) == 3 and shape[2] == 4:
        np.testing.assert_array_equal(out[..., 3], a[..., 3])  # alpha exactly
        cmp_out, cmp_in = out[..., :3], a[..., :3]
    else:
        cmp_out, cmp_in = out, a
    if np.issubdtype(dtype, np.integer) and len(shape) == 3 and shape[2] >= 3:  # k / maxv * maxv rounds back to k
        np.testing.assert_array_equal(cmp_out, cmp_in)
    elif np.issubdtype(dtype, np.integer):  # through the luma weights, which sum to 1 only nearly
        assert np.abs(cmp_out.astype(np.int64) - cmp_in.astype(np.int64)).max() <= 1
    else:
        np.testing.assert_allclose(cmp_out, cmp_in, atol=1e-6)


def test_numpy_values_and_clipping():
    a = np.full((5, 6, 3), 1.0, np.float32)
    out = derain(a, lambda x: x * 2 - 0.5)
    assert out.max() <= 1.0 and out.min() >= 0.0
    u = np.full((5, 6, 3), 100, np.uint8)
    np.testing.assert_array_equal(derain(u, affine), np.full((5, 6, 3), int(np.floor((100 / 255 * 0.9 + 0.05) * 255 + 0.5))))


def test_bad_inputs():
    with pytest.raises(TypeError):
        derain(np.zeros((4, 4, 3), np.int32), identity)
    with pytest.raises(ValueError):
        derain(np.zeros((4, 4, 2), np.uint8), identity)
    with pytest.raises(TypeError):
        derain([[0.0]], identity)
    with pytest.raises(TypeError):
        derain(torch.zeros(3, 4, 4, dtype=torch.uint8), identity)
    with pytest.raises(ValueError):
        derain(torch.zeros(1, 4, 4, 4), identity)


# --------------------------------------------------------------------------- derain(): tensors


@pytest.mark.parametrize("shape", [(3, 37, 41), (2, 3, 37, 41)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tensor_shapes(shape, dtype):
    x = torch.rand(shape, dtype=dtype)
    out = derain(x, affine, tile=16, overlap=4, batch_size=3)
    assert isinstance(out, torch.Tensor) and out.shape == x.shape and out.dtype == dtype and out.device == x.device
    torch.testing.assert_close(out, (x * 0.9 + 0.05).clamp(0, 1), atol=1e-5, rtol=0)


def test_module_runs_in_eval_mode_and_flag_is_restored():
    net = TinyNet().train()
    x = torch.rand(1, 3, 20, 20)
    out = derain(x, net, tile=0)
    assert net.modes == [False] and net.training
    torch.testing.assert_close(out, x, atol=1e-6, rtol=0)


def test_each_submodules_training_flag_is_restored():
    """Fine-tuning with a frozen BatchNorm (eval inside a training model): a preview through derain
    must not unfreeze it."""
    net = torch.nn.Sequential(TinyNet(), torch.nn.BatchNorm2d(3), TinyNet()).train()
    net[1].eval()
    net[2].eval()
    derain(torch.rand(1, 3, 8, 8), net, tile=0)
    assert net[0].modes == [False] and net[2].modes == [False]
    assert [m.training for m in net.modules()] == [True, True, True, False, False, False]  # as they were


def test_threads_sharing_a_training_model_all_run_it_in_eval_mode():
    """Two threads derain with one model left in training mode, the second starting while the first
    runs: the first to finish must not put the model back in training mode while the other still
    runs it, and the last one out restores it."""
    import threading

    class Gate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inside = {name: threading.Event() for name in ("first", "second")}
            self.first_done, self.modes = threading.Event(), {}

        def forward(self, x):
            name = threading.current_thread().name
            self.inside[name].set()
            if name == "first":
                assert self.inside["second"].wait(timeout=30)
            else:
                assert self.first_done.wait(timeout=30)
            self.modes[name] = self.training
            return x

    net = Gate().train()
    threads = {name: threading.Thread(target=derain, args=(torch.rand(1, 3, 8, 8), net), kwargs={"tile": 0},
                                      name=name) for name in ("first", "second")}
    threads["first"].start()
    assert net.inside["first"].wait(timeout=30)
    threads["second"].start()
    threads["first"].join(timeout=30)
    net.first_done.set()
    threads["second"].join(timeout=30)
    assert net.modes == {"first": False, "second": False}
    assert net.training


def test_half_autocast_on_cpu():
    net = TinyNet()
    x = torch.rand(1, 3, 24, 24)
    out = derain(x, net, tile=16, overlap=4, half=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x, atol=1e-2, rtol=0)  # bfloat16 precision


def test_default_model_is_loaded_lazily(monkeypatch, no_cached_default):
    import nerdrain.checkpoint as ckpt

    calls = []

    def fake_load(device=None):
        calls.append(device)
        return TinyNet()

    monkeypatch.setattr(ckpt, "load_default_model", fake_load)
    x = torch.rand(3, 10, 10)
    out = derain(x, device="cpu")
    assert calls == [torch.device("cpu")]
    torch.testing.assert_close(out, x, atol=1e-6, rtol=0)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    auto = resolve_device("auto")
    assert resolve_device(None) == auto
    if not torch.cuda.is_available():
        assert auto.type in ("cpu", "mps")
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu-ish")


def test_devices_we_do_not_run_on_are_refused_before_the_model_moves():
    net = TinyNet()
    for device in (torch.device("meta"), "meta", 2.5):
        with pytest.raises(ValueError, match="device"):
            derain(torch.rand(3, 8, 8), net, device=device)
    assert all(p.device.type == "cpu" for p in net.parameters())  # untouched, still usable
    torch.testing.assert_close(derain(torch.rand(3, 8, 8), net, tile=0).shape, torch.Size([3, 8, 8]))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda:0' requested but CUDA is not available"):
            resolve_device(0)  # PyTorch reads an integer as a CUDA index


def test_model_given_as_a_checkpoint_path(tmp_path):
    from nerdrain import create_model, save_model

    torch.manual_seed(0)
    model = create_model("nerd_rain_s", dim=8, depths=(1, 1, 1), inr_hidden=(16,))
    path = save_model(model, tmp_path / "tiny.safetensors")
    x = torch.rand(1, 3, 24, 32)
    torch.testing.assert_close(derain(x, str(path), tile=0), derain(x, model, tile=0), atol=0, rtol=0)
    with pytest.raises(TypeError, match="checkpoint path, not int"):
        derain(x, 5)


def test_a_checkpoint_path_is_read_once_until_the_file_changes(tmp_path, monkeypatch, no_cached_default,
                                                               exact_timestamps):
    """derain(photo, "weights.pth") in a loop read and built the network at every call; the last
    model read from a path is kept while the file is unchanged, and a file rewritten since (another
    size or time) is read again, as is any file after clear_default_model_cache. (Files written
    just now count as settled here; with coarse timestamps, see the next test.)"""
    from nerdrain import checkpoint, clear_default_model_cache, create_model, files, save_model

    torch.manual_seed(0)
    model = create_model("nerd_rain_s", dim=8, depths=(1, 1, 1), inr_hidden=(16,))
    path = save_model(model, tmp_path / "tiny.safetensors")
    reads = []
    read = checkpoint._read_tensors
    monkeypatch.setattr(checkpoint, "_read_tensors", lambda p: reads.append(p) or read(p))
    x = torch.rand(1, 3, 24, 32)
    expected = derain(x, model, tile=0)
    for spelling in (str(path), path, tmp_path / "." / "tiny.safetensors"):
        torch.testing.assert_close(derain(x, spelling, tile=0), expected, atol=0, rtol=0)
    assert len(reads) == 1

    with torch.no_grad():
        model.fusion[0].mix_x.bias.add_(0.5)  # other weights, other outputs
    save_model(model, path)
    os.utime(path, ns=(0, 10**18))  # surely another time than the first file's, however coarse the clock
    changed = derain(x, path, tile=0)
    assert len(reads) == 2 and not torch.equal(changed, expected)
    torch.testing.assert_close(changed, derain(x, model, tile=0), atol=0, rtol=0)

    other = save_model(model, tmp_path / "other.safetensors")
    derain(x, other, tile=0)
    derain(x, path, tile=0)  # the last path only is kept: one model's memory, not one per file tried
    assert len(reads) == 4
    clear_default_model_cache()
    derain(x, path, tile=0)
    assert len(reads) == 5

    monkeypatch.setattr(files, "TIMESTAMP_GRANULE_NS", 2 * 10**9)  # coarse: one written just now is not kept
    save_model(model, path)
    derain(x, path, tile=0)
    derain(x, path, tile=0)  # read again: the first could not trust the file's stat
    assert len(reads) == 7


@pytest.mark.parametrize("timestamps", ["coarse", "exact"])
def test_a_checkpoint_rewritten_in_place_with_its_size_and_mtime_is_read_again(tmp_path, request, timestamps,
                                                                             no_cached_default):
    """The same file (inode), rewritten with other weights of the same size and its mtime set back:
    the second derain must run the new weights, as a model built from them directly does. With
    coarse timestamps a file changed in the 2 s before it was read is never trusted by its stat
    (git's "racily clean" rule); with exact ones its change time still tells the rewrite."""
    from nerdrain import create_model, save_model

    if timestamps == "exact":
        request.getfixturevalue("exact_timestamps")
    torch.manual_seed(0)
    a = create_model("nerd_rain_s", dim=8, depths=(1, 1, 1), inr_hidden=(16,))
    b = create_model("nerd_rain_s", dim=8, depths=(1, 1, 1), inr_hidden=(16,))
    path = save_model(a, tmp_path / "weights.safetensors")
    b_bytes = save_model(b, tmp_path / "b.safetensors").read_bytes()
    x = torch.rand(1, 3, 24, 32)
    of_a = derain(x, a, tile=0)
    torch.testing.assert_close(derain(x, path, tile=0), of_a, atol=0, rtol=0)

    before = os.stat(path)
    assert len(b_bytes) == before.st_size
    with open(path, "r+b") as f:  # in place: the same inode
        f.write(b_bytes)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    expected = derain(x, b, tile=0)
    assert not torch.equal(expected, of_a)
    torch.testing.assert_close(derain(x, path, tile=0), expected, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_model_in_half_precision_gets_its_input_in_that_type(dtype):
    """``model.half()`` is a natural thing to try; the input is cast to the weights' type and the
    result comes back in the input's own type, close to the fp32 model's."""
    from nerdrain import create_model

    torch.manual_seed(0)
    model = create_model("nerd_rain_s", dim=8, depths=(1, 1, 1), inr_hidden=(16,))
    x = torch.rand(1, 3, 24, 32)
    reference = derain(x, model, tile=0)
    try:
        out = derain(x, model.to(dtype), tile=0)
    except RuntimeError as err:  # PyTorch 2.2 lacks CPU fp16 kernels (reflection pad, layer norm, ...)
        if "not implemented for 'Half'" not in str(err):
            raise
        pytest.skip(f"this PyTorch cannot run fp16 on the CPU: {err}")
    assert out.dtype == torch.float32 and next(model.parameters()).dtype == dtype
    assert 0 < (out - reference).abs().mean() < 1 / 255


def test_non_finite_float_images_are_refused_and_0_255_floats_warned():
    a = RNG.random((6, 7, 3), dtype=np.float32)
    a[2, 3, 1] = np.nan
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        derain(a, identity)
    t = torch.rand(3, 6, 7)
    t[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        derain(t, identity)
    with pytest.warns(UserWarning, match="divide 8-bit values by 255"):
        out = derain(RNG.random((6, 7, 3), dtype=np.float32) * 255, identity)
    assert out.max() <= 1.0


def test_a_minus_one_to_one_image_is_told_how_to_map_it_not_to_divide_by_255():
    """Normalised with mean 0.5 and std 0.5, as many torch pipelines do: dividing by 255 would be
    wrong advice."""
    t = torch.rand(3, 6, 7) * 2 - 1
    with pytest.warns(UserWarning, match=r"not \[0, 1\].*x \* 0\.5 \+ 0\.5") as record:
        derain(t, identity)
    assert len(record) == 1 and "255" not in str(record[0].message)


@pytest.mark.parametrize("low, high", [(-0.05, 0.9), (0.1, 1.05), (-0.98, 1.02)])
def test_the_range_hint_fits_the_values(low, high):
    """A [0, 1] image a resampling filter made over- or undershoot a little is neither 8-bit nor
    [-1, 1] (mapping it would ruin it); a [-1, 1] one that overshoots a little is not 8-bit."""
    t = torch.rand(3, 6, 7) * 0.8 + 0.1
    t[0, 0, :2] = torch.tensor([low, high])
    with pytest.warns(UserWarning, match=r"not \[0, 1\]") as record:
        derain(t, identity)
    message = str(record[0].message)
    assert len(record) == 1 and "255" not in message
    assert ("x * 0.5 + 0.5" in message) == (low < -0.5)


def test_float_pil_images_are_checked_as_float_arrays_are():
    f = RNG.random((6, 7), dtype=np.float32)
    f[2, 3] = np.nan
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        derain(Image.fromarray(f), identity)
    with pytest.warns(UserWarning, match="divide 8-bit values by 255"):
        derain(Image.fromarray(RNG.random((6, 7), dtype=np.float32) * 255), identity)


def test_big_endian_arrays_read_as_their_values():
    a = RNG.integers(0, 65536, (6, 7, 3), dtype=np.uint16)
    np.testing.assert_array_equal(derain(a.astype(">u2"), affine), derain(a, affine))


def test_argument_types_and_empty_batches():
    x = torch.rand(1, 3, 8, 8)
    for name, value in (("overlap", None), ("batch_size", None), ("tile", 2.5)):  # tile=None: the default
        with pytest.raises(TypeError, match=f"{name} must be an integer, got {value}"):
            derain(x, identity, **{name: value})
    torch.testing.assert_close(derain(x, identity, tile=16.0, batch_size=np.int64(2)), x)  # whole numbers
    empty = torch.rand(0, 3, 8, 8)
    assert derain(empty, identity).shape == empty.shape
    with pytest.raises(ValueError, match="empty image"):
        derain(torch.rand(1, 3, 0, 8), identity)
    with pytest.raises(ValueError, match="meta device"):
        derain(torch.rand(1, 3, 8, 8, device="meta"), identity)


# --------------------------------------------------------------------------- derain_files


@pytest.fixture()
def photo_folder(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    a = RNG.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(a).save(d / "good1.png")
    Image.fromarray(a[::-1]).save(d / "good2.jpg", quality=95)
    big = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(big).save(d / "full.png")
    data = (d / "full.png").read_bytes()
    (d / "broken.png").write_bytes(data[: len(data) // 2])
    (d / "full.png").unlink()
    (d / "notes.jpg").write_text("not an image at all\n")
    (d / "readme.txt").write_text("ignored: not an image extension\n")
    return d


def test_folder_with_good_and_bad_files(photo_folder, tmp_path, capsys):
    before = _files(photo_folder)
    out = tmp_path / "out"
    s = derain_files([str(photo_folder)], str(out), affine, tile=16, overlap=4, progress=False)
    assert isinstance(s, Summary)
    assert s.ok == 2 and len(s.failed) == 2
    assert sorted(p.name for p in s.outputs) == ["good1.png", "good2.png"]
    assert all(p.exists() for p in s.outputs)
    failed = {Path(p).name: r for p, r in s.failed}
    assert set(failed) == {"broken.png", "notes.jpg"}
    assert "truncated" in failed["broken.png"] and "not an image" in failed["notes.jpg"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2
    assert all(line.startswith("error: ") for line in err)
    assert any("broken.png: truncated" in line for line in err) and any("notes.jpg: not an image" in line for line in err)
    assert _files(photo_folder) == before  # inputs untouched, nothing added beside them
    assert sorted(os.listdir(out)) == ["good1.png", "good2.png"]  # no partial / temp files
    assert _no_temp(tmp_path)
    ref = _q8(np.asarray(Image.open(photo_folder / "good1.png")) / 255 * 0.9 + 0.05)
    assert np.abs(np.asarray(Image.open(out / "good1.png")).astype(np.int64) - ref).max() <= 1


@pytest.mark.skipif(os.name != "posix", reason="symbolic links")
@pytest.mark.parametrize("recursive", [False, True])
def test_a_link_to_nothing_in_a_folder_is_named_not_skipped(tmp_path, recursive, capsys):
    """A photo in a folder that is a link whose target is gone (a library on an unplugged drive)
    or a loop was passed over in silence, the run saying all went well; it fails on its own, named
    with what is wrong, given in the folder or by itself, and the others are derained."""
    _photos(tmp_path / "in", ["good.png"])
    os.symlink(tmp_path / "unplugged" / "IMG_1.jpg", tmp_path / "in" / "gone.jpg")
    os.symlink("loop.png", tmp_path / "in" / "loop.png")
    out = tmp_path / "out"
    s = derain_files([str(tmp_path / "in")], str(out), identity, tile=0, progress=False, recursive=recursive)
    failed = {Path(p).name: r for p, r in s.failed}
    assert [p.name for p in s.outputs] == ["good.png"] and sorted(failed) == ["gone.jpg", "loop.png"]
    assert failed["gone.jpg"] == f"broken link to {tmp_path / 'unplugged' / 'IMG_1.jpg'} (No such file or directory)"
    assert failed["loop.png"] == "broken link to loop.png (Too many levels of symbolic links)"
    assert sorted(p.name for p in out.iterdir()) == ["good.png"]
    s = derain_files([str(tmp_path / "in" / "gone.jpg")], str(tmp_path / "out2"), _never, tile=0, progress=False)
    assert [r for _, r in s.failed] == [failed["gone.jpg"]] and not (tmp_path / "out2").exists()
    s = derain_files([str(tmp_path / "in" / "*.jpg")], str(tmp_path / "out3"), _never, tile=0, progress=False)
    assert s.failed == [(str(tmp_path / "in" / "gone.jpg"), failed["gone.jpg"])]
    capsys.readouterr()


@pytest.mark.skipif(os.name != "posix", reason="named pipes, /dev/null")
def test_a_pipe_or_a_device_is_named_as_such_not_as_an_empty_file(tmp_path):
    """derain <(curl ...) hands over a pipe, whose size reads 0: 'empty file' blamed a photo that
    was there. A pipe or device is named for what it is, without waiting on it."""
    os.mkfifo(tmp_path / "photo.png")  # no writer: opening it would wait forever
    s = derain_files([str(tmp_path / "photo.png"), os.devnull], str(tmp_path / "out"), _never, tile=0,
                     progress=False)
    assert s.failed == [(str(tmp_path / "photo.png"), "a pipe, not a file: save the image to a file first"),
                        (os.devnull, "a device, not a file: save the image to a file first")]


def test_multi_frame_file_is_derained_with_a_note(tmp_path):
    frames = [Image.fromarray(np.full((8, 10, 3), v, dtype=np.uint8)) for v in (40, 200)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    lines = []
    s = derain_files([str(tmp_path / "anim.gif")], str(tmp_path / "out"), identity, tile=0, progress=False,
                     log=lines.append)
    assert s.ok == 1 and not s.failed
    assert lines == [f"note: {tmp_path / 'anim.gif'}: 2 frames or pages; only the first was derained"]
    assert np.asarray(Image.open(tmp_path / "out" / "anim.png")).max() == 40  # the first frame


def test_float_pixels_outside_the_unit_range_are_clipped_with_a_note(tmp_path):
    """A float TIFF holding 0..255 instead of 0..1 would come out nearly white: say so."""
    values = np.linspace(0, 255, 8 * 10, dtype=np.float32).reshape(8, 10)
    Image.fromarray(values, "F").save(tmp_path / "f.tif")
    lines = []
    s = derain_files([str(tmp_path / "f.tif")], str(tmp_path / "out"), identity, tile=0, progress=False,
                     log=lines.append)
    assert s.ok == 1
    outside = np.mean(values > 1)
    assert lines == [f"note: {tmp_path / 'f.tif'}: {outside:.1%} of its float pixels lie outside [0, 1] "
                     "and were clipped"]


def test_32_bit_integer_pixels_outside_16_bits_are_clipped_with_a_note(tmp_path):
    """A 32-bit integer TIFF (a scientific camera's) is taken as 16-bit data: values above 65535
    (or below 0) came out white (black) without a word; say so, as for float pixels. The pixels
    that fit are kept exactly."""
    values = (np.arange(8 * 10, dtype=np.int32).reshape(8, 10) - 10) * 1000  # -10000 .. 69000
    Image.fromarray(values, "I").save(tmp_path / "i.tif")
    lines = []
    s = derain_files([str(tmp_path / "i.tif")], str(tmp_path / "out"), identity, tile=0, progress=False,
                     log=lines.append)
    assert s.ok == 1
    outside = np.mean((values < 0) | (values > 65535))
    assert lines == [f"note: {tmp_path / 'i.tif'}: {outside:.1%} of its 32-bit integer pixels lie outside "
                     "0..65535 and were clipped"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "i.png")), np.clip(values, 0, 65535))


def test_cmyk_with_an_unusable_profile_is_converted_with_a_note(tmp_path):
    Image.new("CMYK", (6, 4), (0, 128, 255, 10)).save(tmp_path / "c.jpg", icc_profile=b"not a profile")
    lines = []
    s = derain_files([str(tmp_path / "c.jpg")], str(tmp_path / "out"), identity, tile=0, progress=False,
                     log=lines.append)
    assert s.ok == 1 and len(lines) == 1 and "CMYK colour profile could not be applied" in lines[0]
    assert Image.open(tmp_path / "out" / "c.png").info.get("icc_profile") is None  # not the CMYK one


def test_bad_pixel_limit_in_the_environment_is_one_error_before_any_file(tmp_path, monkeypatch):
    monkeypatch.setenv("NERDRAIN_MAX_PIXELS", "lots")
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="NERDRAIN_MAX_PIXELS='lots' is not a number"):
        derain_files([str(tmp_path / "a.png")], str(tmp_path / "out"), identity, tile=0, progress=False)
    assert not (tmp_path / "out").exists()


def test_outputs_beside_inputs_with_suffix(photo_folder):
    s = derain_files([str(photo_folder / "good1.png"), str(photo_folder / "good2.jpg")], None, identity, tile=0, progress=True)
    assert s.ok == 2 and not s.failed
    assert [p.name for p in s.outputs] == ["good1_derained.png", "good2_derained.png"]
    assert all(p.parent == photo_folder for p in s.outputs)
    # A second run over the folder does not pick up its own outputs.
    files, _ = expand_inputs([str(photo_folder)], skip_suffix="_derained")
    assert not any(f.stem.endswith("_derained") for f in files)
    s2 = derain_files([str(photo_folder)], None, identity, tile=0, progress=False)
    assert sorted(p.name for p in s2.outputs) == ["good1_derained.png", "good2_derained.png"]


def test_single_file_output_path_and_format(photo_folder, tmp_path):
    src = photo_folder / "good1.png"
    s = derain_files([str(src)], str(tmp_path / "result.png"), identity, tile=0, progress=False)
    assert s.outputs == [tmp_path / "result.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "result.png")), np.asarray(Image.open(src)))
    s = derain_files([str(src)], str(tmp_path / "result.jpg"), identity, tile=0, progress=False)
    assert Image.open(s.outputs[0]).format == "JPEG"
    s = derain_files([str(src)], str(tmp_path / "newdir") + os.sep, identity, tile=0, progress=False)
    assert s.outputs == [tmp_path / "newdir" / "good1.png"]
    s = derain_files([str(src)], None, identity, tile=0, fmt="webp", progress=False)
    assert s.outputs == [photo_folder / "good1_derained.webp"]


def test_globs_and_missing_inputs(photo_folder, tmp_path):
    s = derain_files(
        [str(photo_folder / "good*"), str(tmp_path / "nothing_here.png"), str(tmp_path / "*.nomatch")],
        str(tmp_path / "o"),
        identity,
        tile=0,
        progress=False,
    )
    assert s.ok == 2
    reasons = dict(s.failed)
    assert reasons[str(tmp_path / "nothing_here.png")] == "no such file or directory"
    assert "no files match" in reasons[str(tmp_path / "*.nomatch")]


def test_a_pattern_whose_name_the_file_system_refuses_is_still_matched(photo_folder, monkeypatch):
    """Windows refuses '*' in a name (ERROR_INVALID_NAME), and its shell leaves globs to the program:
    that refusal means 'a pattern', not an input that failed."""
    real_stat = Path.stat

    def windows_stat(self, *args, **kwargs):
        if "*" in str(self):
            raise OSError(22, "The filename, directory name, or volume label syntax is incorrect")
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", windows_stat)
    files, problems = expand_inputs([str(photo_folder / "good*")])
    assert [f.name for f in files] == ["good1.png", "good2.jpg"] and problems == []


def test_output_never_equals_an_input(photo_folder, tmp_path):
    before = _files(photo_folder)
    src = photo_folder / "good1.png"
    s = derain_files([str(src)], str(src), identity, tile=0, progress=False)
    assert s.ok == 0 and "overwrite the input" in s.failed[0][1]
    # Output folder == input folder: outputs there take the suffix, as beside the inputs, so
    # good2.jpg's output cannot replace a good2.png that is not part of the batch.
    (photo_folder / "good2.png").write_bytes(b"someone else's photo")
    s = derain_files([str(photo_folder / "good1.png"), str(photo_folder / "good2.jpg")], str(photo_folder),
                     identity, tile=0, progress=False)
    assert [p.name for p in s.outputs] == ["good1_derained.png", "good2_derained.png"] and not s.failed
    assert (photo_folder / "good2.png").read_bytes() == b"someone else's photo"
    (photo_folder / "good2.png").unlink()
    for p in s.outputs:
        p.unlink()
    # An empty suffix beside the input is the input itself.
    s = derain_files([str(src)], None, identity, tile=0, suffix="", progress=False)
    assert s.ok == 0 and "overwrite the input" in s.failed[0][1]
    after = _files(photo_folder)
    assert {k: v for k, v in after.items() if k in before} == before


def test_colliding_stems_are_disambiguated(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    a = RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(a).save(d / "x.png")
    Image.fromarray(a).save(d / "x.jpg")
    plan = plan_outputs(sorted(d.iterdir()), [str(d)], str(tmp_path / "o"))
    assert sorted(t.name for _, t, _ in plan) == ["x_jpg.png", "x_png.png"]
    s = derain_files([str(d)], str(tmp_path / "o"), identity, tile=0, progress=False)
    assert s.ok == 2


def test_exif_orientation_icc_and_exif_kept(tmp_path):
    a = RNG.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    ex = Image.Exif()
    ex[0x0112] = 6
    ex[0x010F] = "RainCam"
    Image.fromarray(a).save(tmp_path / "rot.jpg", exif=ex, icc_profile=icc, quality=95)
    s = derain_files([str(tmp_path / "rot.jpg")], None, identity, tile=16, overlap=4, progress=False)
    out = Image.open(s.outputs[0])
    assert out.format == "PNG"
    assert out.size == (24, 40)  # 40x24 rotated by 90 degrees
    assert out.info.get("icc_profile") == icc
    oex = out.getexif()
    assert oex.get(0x010F) == "RainCam" and oex.get(0x0112, 1) == 1


def test_16bit_png_in_16bit_png_out(tmp_path):
    a = RNG.integers(0, 65536, (20, 26, 3), dtype=np.uint16)
    write_photo(tmp_path / "deep.png", Photo(rgb=a / np.float32(65535), bit_depth=16, mode="RGB"))
    g = RNG.integers(0, 65536, (20, 26), dtype=np.uint16)
    Image.fromarray(g).save(tmp_path / "gray16.png")
    s = derain_files([str(tmp_path / "deep.png"), str(tmp_path / "gray16.png")], str(tmp_path / "o"), identity,
                     tile=16, overlap=4, progress=False)
    assert s.ok == 2
    deep = read_photo(tmp_path / "o" / "deep.png")
    assert deep.bit_depth == 16 and not deep.grayscale
    assert np.abs(np.floor(deep.rgb.astype(np.float64) * 65535 + 0.5) - a).max() <= 1
    gray = Image.open(tmp_path / "o" / "gray16.png")
    assert gray.mode.startswith("I")
    assert np.abs(np.asarray(gray).astype(np.int64) - g).max() <= 1


def test_rgba_and_grayscale_files(tmp_path):
    a = RNG.integers(0, 256, (12, 14, 4), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "rgba.png")
    Image.fromarray(a[..., 0]).save(tmp_path / "gray.png")
    s = derain_files([str(tmp_path / "rgba.png"), str(tmp_path / "gray.png")], str(tmp_path / "o"), affine,
                     tile=0, progress=False)
    assert s.ok == 2
    rgba = np.asarray(Image.open(tmp_path / "o" / "rgba.png"))
    assert rgba.shape == (12, 14, 4)
    np.testing.assert_array_equal(rgba[..., 3], a[..., 3])
    assert Image.open(tmp_path / "o" / "gray.png").mode == "L"


def test_model_failure_is_reported_per_file(photo_folder, tmp_path):
    def explode(x):
        raise RuntimeError("kaboom\nsecond line")

    lines = []
    s = derain_files([str(photo_folder / "good1.png")], str(tmp_path / "o"), explode, tile=0, progress=False,
                     log=lines.append)
    assert s.ok == 0 and s.failed == [(str(photo_folder / "good1.png"), "RuntimeError: kaboom second line")]
    assert lines == [f"error: {photo_folder / 'good1.png'}: RuntimeError: kaboom second line"]
    assert not (tmp_path / "o" / "good1.png").exists()


def test_write_failure_leaves_nothing_behind(photo_folder, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(Image.Image, "save", boom)
    out = tmp_path / "o"
    s = derain_files([str(photo_folder / "good1.png")], str(out), identity, tile=0, progress=False)
    assert s.ok == 0 and "no space left" in s.failed[0][1]
    assert not out.exists()  # no temporary file, nor the folder the run made for its output


def test_bad_format_rejected_early(photo_folder):
    with pytest.raises(ValueError, match="unsupported output format"):
        derain_files([str(photo_folder)], None, identity, fmt="bmp2")


def test_large_image_shows_tile_progress(tmp_path, capsys):
    a = RNG.integers(0, 256, (80, 80, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "big.png")
    s = derain_files([str(tmp_path / "big.png")], str(tmp_path / "o"), identity, tile=16, overlap=4, progress=True)
    assert s.ok == 1
    assert inference._TILE_BAR_MIN_TILES <= 36


def test_colliding_stems_beside_the_inputs_are_disambiguated(tmp_path):
    """photo.jpg and photo.png in one folder, no -o: both derained, neither output the other's."""
    for ext in ("jpg", "png"):
        Image.fromarray(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"photo.{ext}")
    Image.fromarray(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "other.png")
    s = derain_files([str(tmp_path)], None, identity, tile=0, progress=False)
    assert s.ok == 3 and not s.failed
    assert sorted(p.name for p in s.outputs) == ["other_derained.png", "photo_jpg_derained.png",
                                                 "photo_png_derained.png"]


def test_output_names_that_read_as_files(tmp_path):
    """-o d.gif (a format we do not write) is refused, not made a folder; a trailing / makes a
    folder of any name."""
    for name in ("a.png", "b.png"):
        Image.fromarray(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / name)
    with pytest.raises(ValueError, match="cannot write .gif files"):
        derain_files([str(tmp_path / "a.png")], str(tmp_path / "d.gif"), identity, tile=0, progress=False)
    assert not (tmp_path / "d.gif").exists()
    s = derain_files([str(tmp_path / "a.png"), str(tmp_path / "b.png")], str(tmp_path / "res.png") + "/", identity,
                     tile=0, progress=False)
    assert s.ok == 2 and sorted(p.name for p in (tmp_path / "res.png").iterdir()) == ["a.png", "b.png"]


def test_too_large_for_the_output_format_fails_before_the_network_runs(tmp_path):
    Image.fromarray(np.zeros((2, 16400, 3), np.uint8)).save(tmp_path / "wide.png")

    def never(x):
        raise AssertionError("the network ran")

    s = derain_files([str(tmp_path / "wide.png")], None, never, tile=0, fmt="webp", progress=False)
    assert s.ok == 0 and "16400x2 is too large for WEBP (at most 16383 pixels a side)" in s.failed[0][1]


def test_rerun_into_the_inputs_own_folder(tmp_path):
    """-o at the inputs' folder twice: the second run derains the photo again, not its output."""
    Image.fromarray(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    for _ in range(2):
        s = derain_files([str(tmp_path)], str(tmp_path), identity, tile=0, progress=False)
        assert s.ok == 1 and not s.failed and [p.name for p in s.outputs] == ["a_derained.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "a_derained.png"]


def test_exif_too_large_for_a_jpeg_is_dropped_with_a_note(tmp_path):
    """A PNG may carry more EXIF than a JPEG's 64 KB segment: the photo is written, without it."""
    exif = Image.Exif()
    exif[0x010E] = "x" * 70_000  # ImageDescription
    Image.fromarray(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "big.png", exif=exif)
    lines = []
    s = derain_files([str(tmp_path / "big.png")], str(tmp_path / "out"), identity, tile=0, fmt="jpg",
                     progress=False, log=lines.append)
    assert s.ok == 1 and not s.failed
    assert len(lines) == 1 and "is more than a JPEG holds (64 KB): not kept" in lines[0]
    assert "exif" not in Image.open(tmp_path / "out" / "big.jpg").info


def test_alpha_and_16_bits_the_output_cannot_store_get_a_note(tmp_path):
    rgba = Image.fromarray(RNG.integers(0, 256, (8, 8, 4), dtype=np.uint8))
    rgba.save(tmp_path / "rgba.png")
    Image.fromarray(RNG.integers(0, 65536, (8, 8), dtype=np.uint16)).save(tmp_path / "g16.png")
    notes = {}
    for name, out in [("rgba.png", "a.jpg"), ("g16.png", "b.jpg"), ("g16.png", "c.tif"), ("rgba.png", "d.png")]:
        lines = []
        s = derain_files([str(tmp_path / name)], str(tmp_path / out), identity, tile=0, progress=False,
                         log=lines.append)
        assert s.ok == 1 and not s.failed
        notes[out] = lines
    assert Image.open(tmp_path / "a.jpg").mode == "RGB" and Image.open(tmp_path / "b.jpg").mode == "L"
    assert len(notes["a.jpg"]) == 1 and "transparency (alpha) cannot be stored in a JPEG" in notes["a.jpg"][0]
    assert len(notes["b.jpg"]) == 1 and "16 bits per sample are written as 8" in notes["b.jpg"][0]
    assert Image.open(tmp_path / "c.tif").mode == "I;16" and notes["c.tif"] == []  # kept: nothing to say
    assert notes["d.png"] == []


def test_an_opaque_alpha_dropped_by_a_jpeg_gets_no_note(tmp_path):
    # Every pixel fully opaque: the JPEG shows exactly what the PNG did, nothing is lost to report.
    a = RNG.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    a[..., 3] = 255
    Image.fromarray(a).save(tmp_path / "opaque.png")
    lines = []
    s = derain_files([str(tmp_path / "opaque.png")], str(tmp_path / "o.jpg"), identity, tile=0, progress=False,
                     log=lines.append)
    assert s.ok == 1 and lines == []
    assert Image.open(tmp_path / "o.jpg").mode == "RGB"


def test_a_line_break_in_a_file_name_keeps_the_report_one_line(tmp_path):
    bad = tmp_path / "bad\nname.jpg"
    bad.write_bytes(b"not a photo")
    lines = []
    s = derain_files([str(bad)], str(tmp_path / "out"), identity, tile=0, progress=False, log=lines.append)
    assert len(s.failed) == 1 and len(lines) == 1 and "\n" not in lines[0] and "bad\\nname.jpg" in lines[0]


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="names are bytes on Linux, not on Windows or macOS")
def test_a_name_that_is_no_utf8_is_reported_with_its_bytes_escaped(tmp_path):
    """A photo named in Latin-1 (an old camera card: b'caf\\xe9.jpg'): Python holds the byte as the
    surrogate U+DCE9, which the report printed as '\\udce9', a character no one named it with;
    the byte is shown as '\\xe9', as for the line break above."""
    folder = os.fsencode(tmp_path)
    with open(folder + b"/caf\xe9.jpg", "wb") as f:
        f.write(b"not a photo")
    lines = []
    s = derain_files([str(tmp_path)], str(tmp_path / "out"), identity, tile=0, progress=False, log=lines.append)
    assert len(s.failed) == 1 and lines == [f"error: {tmp_path}/caf\\xe9.jpg: {s.failed[0][1]}"]


def test_a_folder_of_earlier_outputs_says_so(tmp_path):
    Image.fromarray(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "a_derained.png")
    s = derain_files([str(tmp_path)], None, identity, tile=0, progress=False)
    assert s.failed == [(str(tmp_path), "only earlier outputs (*_derained) in this folder")]


@pytest.mark.parametrize("as_path", [str, Path])
def test_one_path_is_one_input_not_a_sequence_of_characters(tmp_path, as_path, monkeypatch):
    Image.fromarray(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    monkeypatch.chdir(tmp_path)  # "." among the characters would be this folder
    s = derain_files(as_path("a.png"), tmp_path / "out", identity, tile=0, progress=False)
    assert s.ok == 1 and not s.failed and [p.name for p in s.outputs] == ["a.png"]


def test_same_names_from_different_folders_get_distinct_outputs(tmp_path):
    from nerdrain.inference import plan_outputs

    files = [tmp_path / "x" / "1.jpg", tmp_path / "y" / "1.jpg", tmp_path / "x" / "1.png", tmp_path / "x" / "2.jpg"]
    plan = plan_outputs(files, [str(tmp_path / "x"), str(tmp_path / "y")], str(tmp_path / "out"))
    names = [out.name for _, out, problem in plan]
    assert all(problem is None for _, _, problem in plan)
    assert names == ["x_1_jpg.png", "y_1_jpg.png", "1_png.png", "2.png"]


def test_names_that_differ_only_in_case_get_outputs_that_differ_otherwise(tmp_path):
    """macOS and Windows file systems ignore letter case (and macOS how an accent is stored, NFC or
    NFD): x/IMG.jpg and y/img.jpg written as out/IMG.png and out/img.png would be one file there, the
    second photo's result over the first's."""
    files = [tmp_path / "x" / "IMG.jpg", tmp_path / "y" / "img.jpg", tmp_path / "x" / "b.JPG", tmp_path / "x" / "B.png",
             tmp_path / "x" / "caf\u00e9.jpg", tmp_path / "x" / "cafe\u0301.png"]
    plan = plan_outputs(files, [str(tmp_path / "x"), str(tmp_path / "y")], str(tmp_path / "out"))
    names = [out.name for _, out, problem in plan]
    assert all(problem is None for _, _, problem in plan)
    assert names == ["x_IMG_jpg.png", "y_img_jpg.png", "b_jpg.png", "B_png.png", "caf\u00e9_jpg.png",
                     "cafe\u0301_png.png"]


def test_phone_formats_in_a_folder_are_derained_or_named_not_skipped(tmp_path):
    """An iPhone export (HEIC, which Pillow cannot read) or AVIF photos beside JPEGs: each is
    derained or named with its problem; none is passed over unsaid, as if the folder held only JPEGs."""
    from PIL import features

    Image.fromarray(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    (tmp_path / "b.heic").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64))
    expected_outputs = ["a.png"]
    if features.check("avif"):  # Pillow 11.2 and later, built with libavif
        Image.fromarray(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "c.avif")
        expected_outputs.append("c.png")
    s = derain_files([str(tmp_path)], str(tmp_path / "out"), identity, tile=0, progress=False)
    assert sorted(p.name for p in s.outputs) == expected_outputs
    assert s.failed == [(str(tmp_path / "b.heic"), "cannot read .heic files: this Pillow has no reader for them "
                                                   "(convert them to JPEG or PNG)")]
    with pytest.raises(ValueError, match="cannot write .heic files"):  # not a folder named out.heic
        derain_files([str(tmp_path / "a.jpg")], str(tmp_path / "out.heic"), identity, tile=0, progress=False)
    assert not (tmp_path / "out.heic").exists()


def _two_photos(folder: Path) -> list[str]:
    for name in ("a.png", "b.png"):
        Image.fromarray(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / name)
    return [str(folder / "a.png"), str(folder / "b.png")]


def _never(x):
    raise AssertionError("the network ran")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="the superuser may write in a read-only folder")
def test_a_read_only_folder_beside_the_inputs_fails_its_photos_before_the_network_runs(tmp_path):
    """Photos on a read-only card or a shared folder, no -o: each is named with the reason, and
    none is run through the network only for its result to have nowhere to go."""
    inputs = _two_photos(tmp_path)
    tmp_path.chmod(0o555)
    try:
        s = derain_files(inputs, None, _never, tile=0, progress=False)
    finally:
        tmp_path.chmod(0o755)
    assert s.ok == 0 and [reason for _, reason in s.failed] == [
        f"output {tmp_path / f'{n}_derained.png'}: cannot write in {tmp_path} (Permission denied)" for n in "ab"]


@pytest.mark.skipif(not os.path.isdir("/proc/self") or os.geteuid() != 0,
                    reason="needs Linux's /proc, where the superuser passes the permission check but cannot write")
def test_an_output_folder_that_cannot_be_made_fails_its_photos_before_the_network_runs(tmp_path):
    out = Path("/proc/nerdrain-no-such-folder")
    s = derain_files(_two_photos(tmp_path), str(out), _never, tile=0, progress=False)
    assert s.ok == 0 and [reason for _, reason in s.failed] == [
        f"output {out / f'{n}.png'}: cannot write in {out} (No such file or directory)" for n in "ab"]


@pytest.mark.parametrize("pathlib_checks", ["this Python's", "Python 3.14's"])
def test_an_input_name_too_long_for_the_file_system_fails_alone(tmp_path, monkeypatch, pathlib_checks):
    """Python 3.14's Path.is_dir and Path.exists are os.path's, which answer False where the file
    system cannot be asked: the reason must not turn into 'no such file or directory'."""
    if pathlib_checks == "Python 3.14's":
        monkeypatch.setattr(Path, "is_dir", lambda self: os.path.isdir(self))
        monkeypatch.setattr(Path, "exists", lambda self: os.path.exists(self))
    good = _two_photos(tmp_path)[0]
    too_long = str(tmp_path / ("x" * 300 + ".png"))  # a name over the 255 bytes file systems allow
    s = derain_files([too_long, good], str(tmp_path / "out"), identity, tile=0, progress=False)
    assert s.ok == 1 and [p.name for p in s.outputs] == ["a.png"]
    assert s.failed == [(too_long, "File name too long")]


@pytest.mark.parametrize("to_own_folder", [False, True])
def test_an_output_name_too_long_for_the_file_system_fails_alone_before_the_network_runs(tmp_path, to_own_folder):
    """A 250-byte photo name fits, but beside it <stem>_derained.png (246 + 13 = 259 bytes) does
    not: that photo fails in one line before its pixels are run, and the batch goes on. In another
    folder its output <stem>.png (250 bytes) fits and is written."""
    good = _two_photos(tmp_path)[0]
    long_in = tmp_path / ("x" * 246 + ".png")
    Image.fromarray(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(long_in)
    ran = []

    def counting(x):
        ran.append(x.shape)
        return x

    out = str(tmp_path) if to_own_folder else None  # the inputs' own folder: <stem>_derained.png there too
    s = derain_files([str(long_in), good], out, counting, tile=0, progress=False)
    target = tmp_path / ("x" * 246 + "_derained.png")
    assert s.ok == 1 and [p.name for p in s.outputs] == ["a_derained.png"] and len(ran) == 1
    assert s.failed == [(str(long_in), f"output {target}: name too long for the file system (259 bytes, at most 255)")]

    s = derain_files([str(long_in)], str(tmp_path / "out"), identity, tile=0, progress=False)
    assert s.ok == 1 and not s.failed and [p.name for p in (tmp_path / "out").iterdir()] == ["x" * 246 + ".png"]


@pytest.mark.parametrize("name, trailer, what", [("y" * 256 + ".png", "", ""), ("z" * 256, "/", ""),
                                                 ("z" * 256, "/o.png", "folder {folder}: ")],
                         ids=["file", "folder", "parent"])
def test_an_output_name_too_long_for_the_file_system_given_with_o_is_refused_before_any_work(tmp_path, name,
                                                                                          trailer, what):
    photo = _two_photos(tmp_path)[0]
    output = str(tmp_path / name) + trailer
    with pytest.raises(ValueError) as info:
        derain_files([photo], output, _never, tile=0, progress=False)
    size = len(name)
    assert str(info.value) == (f"output {output}: {what.format(folder=tmp_path / name)}name too long for the file "
                               f"system ({size} bytes, at most 255)")


@pytest.mark.parametrize("name", ["out.jxl", "out.JXL", "scan.pdf", "raw.dng", "pic.exr"])
def test_an_image_file_name_in_a_format_not_written_is_refused_not_made_a_folder(tmp_path, name):
    """-o out.jxl for one photo names a file the tool cannot write (JPEG XL): refused in one line
    naming the formats it writes, not a folder called out.jxl with out.jxl/a.png inside."""
    photo = _two_photos(tmp_path)[0]
    suffix = Path(name).suffix
    with pytest.raises(ValueError) as info:
        derain_files([photo], str(tmp_path / name), _never, tile=0, progress=False)
    assert str(info.value) == (f"output {tmp_path / name}: cannot write {suffix.lower()} files; use .png, .jpg, .webp "
                               "or .tif (a trailing / makes it a folder)")
    assert not (tmp_path / name).exists()


@pytest.mark.parametrize("name, slash, exists", [("results.v2", "/", False), ("results.v2", "", False),
                                                 ("out.jxl", "/", False), ("out.jxl", "", True)])
def test_folder_names_with_a_dot_stay_folders(tmp_path, name, slash, exists):
    """A version-like suffix is no image format; a trailing / or an existing folder makes any name one."""
    photo = _two_photos(tmp_path)[0]
    if exists:
        (tmp_path / name).mkdir()
    s = derain_files([photo], str(tmp_path / name) + slash, identity, tile=0, progress=False)
    assert s.ok == 1 and s.outputs == [tmp_path / name / "a.png"]


def test_a_folder_of_subfolders_says_they_are_not_searched(tmp_path):
    """holiday/ holding day1/ and day2/: 'no image files' alone would leave the user puzzled."""
    for name in ("day1", "day2", ".thumbnails"):  # a hidden folder is nothing the user meant
        (tmp_path / "holiday" / name).mkdir(parents=True)
        Image.fromarray(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "holiday" / name / "a.png")
    (tmp_path / "holiday" / "notes.txt").write_text("not a photo")
    (tmp_path / "one" / "day1").mkdir(parents=True)
    s = derain_files([str(tmp_path / "holiday"), str(tmp_path / "one"), str(tmp_path / "one" / "day1")], None, _never,
                     tile=0, progress=False)
    assert s.ok == 0 and s.failed == [
        (str(tmp_path / "holiday"), "no image files in this folder (its 2 subfolders are not searched without -r)"),
        (str(tmp_path / "one"), "no image files in this folder (its 1 subfolder is not searched without -r)"),
        (str(tmp_path / "one" / "day1"), "no image files in this folder")]


def test_a_folder_of_photos_and_subfolders_notes_that_they_were_not_searched(tmp_path):
    """holiday/ holding a.png and day1/ of more photos, without -r: a.png alone was derained
    without a word, and the user took day1/ as done. The output folder inside it, hidden folders
    and folders given without subfolders earn no note."""
    _photos(tmp_path / "holiday", ["a.png"])
    _photos(tmp_path / "holiday" / "day1", ["b.png"])
    _photos(tmp_path / "holiday" / ".thumbnails", ["a.png"])
    (tmp_path / "holiday" / "derained").mkdir()  # an earlier run's -o
    _photos(tmp_path / "flat", ["c.png"])
    holiday, flat, out = (str(tmp_path / name) for name in ("holiday", "flat", "holiday/derained"))
    lines: list[str] = []
    s = derain_files([holiday, flat], out, identity, tile=0, progress=False, log=lines.append)
    assert s.ok == 2 and not s.failed
    assert lines == [f"note: {holiday}: its 1 subfolder is not searched without -r"]
    lines.clear()
    s = derain_files([holiday, flat], out, identity, tile=0, progress=False, log=lines.append, recursive=True)
    assert s.ok == 3 and lines == []


@pytest.mark.skipif(os.name != "posix", reason="symbolic links")
def test_with_r_a_folder_of_photos_and_links_to_folders_notes_the_links_not_followed(tmp_path):
    """holiday/ holding a.png and a link to day1/, with -r: the link is not followed (a loop could
    make the walk endless), and a.png alone derained without a word would pass for the whole
    folder's, as with subfolders left out without -r; a folder without photos says so already."""
    _photos(tmp_path / "holiday", ["a.png"])
    _photos(tmp_path / "elsewhere" / "day1", ["b.png"])
    (tmp_path / "holiday" / "day1").symlink_to(tmp_path / "elsewhere" / "day1", target_is_directory=True)
    holiday = str(tmp_path / "holiday")
    lines: list[str] = []
    s = derain_files([holiday], str(tmp_path / "out"), identity, tile=0, progress=False, log=lines.append,
                     recursive=True)
    assert s.ok == 1 and not s.failed
    assert lines == [f"note: {holiday}: its 1 link to a folder is not followed"]


def test_an_output_folder_the_run_made_and_wrote_nothing_in_is_removed(tmp_path):
    """Every photo failed, or Ctrl-C during the first: no empty out/ (nor its new parents) is left
    behind as if there were results; a folder that was there before stays."""
    (tmp_path / "bad.png").write_bytes(b"not a photo")
    s = derain_files([str(tmp_path / "bad.png")], str(tmp_path / "new" / "out") + "/", identity, tile=0,
                     progress=False)
    assert s.ok == 0 and len(s.failed) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["bad.png"]

    photo = _two_photos(tmp_path)[0]

    def interrupted(x):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        derain_files([photo], str(tmp_path / "out") + "/", interrupted, tile=0, progress=False)
    assert not (tmp_path / "out").exists()

    (tmp_path / "kept").mkdir()
    s = derain_files([str(tmp_path / "bad.png")], str(tmp_path / "kept"), identity, tile=0, progress=False)
    assert s.ok == 0 and (tmp_path / "kept").is_dir()
    s = derain_files([str(tmp_path / "bad.png"), photo], str(tmp_path / "out"), identity, tile=0, progress=False)
    assert s.ok == 1 and [p.name for p in (tmp_path / "out").iterdir()] == ["a.png"]


def test_photos_that_cannot_be_read_leave_no_output_folder_behind(tmp_path):
    """The output folder is made for a photo that will be written: a batch of unreadable files
    (HEICs without a reader, say) leaves no empty folder, as before the write probe."""
    (tmp_path / "a.png").write_bytes(b"not a png")
    s = derain_files([str(tmp_path / "a.png")], str(tmp_path / "out" / "sub"), _never, tile=0, progress=False)
    assert s.ok == 0 and len(s.failed) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


# --------------------------------------------------------------------------- rerunning a batch: skip_existing


def _photos(folder: Path, names: Sequence[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name for name in names]
    for path in paths:
        Image.fromarray(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
    return paths


_KILLED_MID_WRITE = """
import os, signal, sys
from PIL import Image
from nerdrain.inference import derain_files

def killed_mid_write(self, fp, *args, **kwargs):
    if os.path.basename(fp.name).startswith(".b.png."):  # a's output written, b's half
        fp.write(b"\\x89PNG half a photo")
        fp.flush()
        os.kill(os.getpid(), signal.SIGKILL)  # no clean-up runs, as on a power loss
    return save(self, fp, *args, **kwargs)

save, Image.Image.save = Image.Image.save, killed_mid_write
derain_files([sys.argv[1]], sys.argv[2], lambda x: x, tile=0, progress=False)
"""


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_a_run_killed_mid_write_leaves_no_partial_file_after_the_next_run(tmp_path):
    """SIGKILL while an output was being written leaves its hidden temporary file, which no
    clean-up could remove; the next run into that folder, skip_existing or not, removes the
    temporaries of the outputs it plans (never counting them as outputs), and nothing else."""
    import signal
    import subprocess
    import sys

    _photos(tmp_path / "in", ["a.png", "b.png", "c.png"])
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    killed = subprocess.run([sys.executable, "-c", _KILLED_MID_WRITE, str(tmp_path / "in"), str(out)], env=env,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL
    (leftover,) = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert leftover.startswith(".b.png.") and sorted(p.name for p in out.iterdir()) == [leftover, "a.png"]
    users = [".b.png.tmp", "b.png.0123abcd.tmp", ".b.png.0123abcd.tmp.bak", ".other.png.0123abcd.tmp"]
    for name in users:  # like ours, but not ours, or not for an output of this run
        (out / name).write_bytes(b"the user's")

    s = derain_files([str(tmp_path / "in")], str(out), identity, tile=0, progress=False, skip_existing=True)
    assert s.skipped == [out / "a.png"] and s.outputs == [out / "b.png", out / "c.png"] and not s.failed
    assert sorted(p.name for p in out.iterdir()) == sorted([*users, "a.png", "b.png", "c.png"])
    assert all((out / name).read_bytes() == b"the user's" for name in users)

    (out / leftover).write_bytes(b"half a photo")  # a run where every output was there already
    s = derain_files([str(tmp_path / "in")], str(out), _never, tile=0, progress=False, skip_existing=True)
    assert len(s.skipped) == 3 and not (out / leftover).exists()


def test_skip_existing_continues_an_interrupted_batch_where_it_stopped(tmp_path):
    """Ctrl-C at the second of three photos, then the same command with skip_existing: the first
    output is kept as it is, only the two missing ones are run, and one note says how many were skipped."""
    a, b, c = _photos(tmp_path / "in", ["a.png", "b.png", "c.png"])
    out = tmp_path / "out"
    calls = []

    def stops_at_the_second(x):
        calls.append(x.shape)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return x

    with pytest.raises(KeyboardInterrupt):
        derain_files([str(tmp_path / "in")], str(out), stops_at_the_second, tile=0, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["a.png"] and _no_temp(tmp_path)
    kept = (out / "a.png").read_bytes()

    lines = []
    ran = []
    s = derain_files([str(tmp_path / "in")], str(out), lambda x: ran.append(x.shape) or affine(x), tile=0,
                     progress=False, skip_existing=True, log=lines.append)
    assert len(ran) == 2 and s.ok == 2 and not s.failed
    assert s.outputs == [out / "b.png", out / "c.png"] and s.skipped == [out / "a.png"]
    assert lines == ["note: 1 of 3 photos skipped: their outputs exist"]
    assert (out / "a.png").read_bytes() == kept  # not run again through the (other) model
    for src in (b, c):
        expected = _q8(np.asarray(Image.open(src)) / 255 * 0.9 + 0.05)
        assert np.abs(np.asarray(Image.open(out / src.name)).astype(np.int64) - expected).max() <= 1

    # everything done: nothing runs, nothing fails, and the outputs stay as they are
    before = _files(out)
    s = derain_files([str(tmp_path / "in")], str(out), _never, tile=0, progress=False, skip_existing=True,
                     log=lines.append)
    assert s.ok == 0 and not s.failed and len(s.skipped) == 3 and _files(out) == before
    assert lines[-1] == "note: 3 of 3 photos skipped: their outputs exist"


def test_without_skip_existing_outputs_are_replaced(tmp_path):
    _photos(tmp_path / "in", ["a.png"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.png").write_bytes(b"an older output")
    s = derain_files([str(tmp_path / "in")], str(tmp_path / "out"), identity, tile=0, progress=False)
    assert s.ok == 1 and not s.skipped
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "a.png")),
                                  np.asarray(Image.open(tmp_path / "in" / "a.png")))


def test_skip_existing_counts_a_file_with_something_in_it_as_done_and_redoes_an_empty_one(tmp_path):
    """Outputs are written atomically, so a file under an output's name is complete: its contents are
    not read (a 1,000-photo rerun stays quick). An empty file is no photo (another tool's, a disk
    repair): it is derained again. A folder in the output's place is no output: that photo fails."""
    _photos(tmp_path / "in", ["empty.png", "folder.png", "done.png"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "empty.png").write_bytes(b"")
    (out / "folder.png").mkdir()
    (out / "done.png").write_bytes(b"not checked")
    lines = []
    s = derain_files([str(tmp_path / "in")], str(out), identity, tile=0, progress=False, skip_existing=True,
                     log=lines.append)
    assert s.skipped == [out / "done.png"] and (out / "done.png").read_bytes() == b"not checked"
    assert s.outputs == [out / "empty.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(out / "empty.png")),
                                  np.asarray(Image.open(tmp_path / "in" / "empty.png")))
    assert s.failed == [(str(tmp_path / "in" / "folder.png"), f"output {out / 'folder.png'}: is a directory")]
    assert lines[0] == "note: 1 of 3 photos skipped: their outputs exist"


def test_skip_existing_beside_the_inputs(tmp_path):
    a, b = _photos(tmp_path, ["a.jpg", "b.jpg"])
    assert derain_files([str(a)], None, identity, tile=0, progress=False).ok == 1
    ran = []
    s = derain_files([str(tmp_path)], None, lambda x: ran.append(1) or x, tile=0, progress=False,
                     skip_existing=True, log=[].append)
    assert len(ran) == 1 and s.outputs == [tmp_path / "b_derained.png"] and s.skipped == [tmp_path / "a_derained.png"]


# --------------------------------------------------------------------------- quality of JPEG and WebP outputs


@pytest.mark.parametrize("fmt, pillow_format, extra", [("jpg", "JPEG", {"subsampling": 0}), ("webp", "WEBP", {})])
@pytest.mark.parametrize("quality", [None, 40, 100])
def test_quality_of_jpeg_and_webp_outputs(tmp_path, fmt, pillow_format, extra, quality):
    """The bytes Pillow writes for the same pixels at that quality (95 when none is given)."""
    (photo,) = _photos(tmp_path / "in", ["a.png"])
    s = derain_files([str(photo)], str(tmp_path / "out"), identity, tile=0, fmt=fmt, quality=quality,
                     progress=False)
    assert s.ok == 1
    expected = tmp_path / f"expected.{fmt}"
    Image.open(photo).convert("RGB").save(expected, format=pillow_format, quality=quality or 95, **extra)
    assert s.outputs[0].read_bytes() == expected.read_bytes()


@pytest.mark.parametrize("quality, problem", [
    (0, "quality 0: must be 1 to 100"), (101, "quality 101: must be 1 to 100"),
    (80.5, "quality 80.5: must be a whole number from 1 to 100"), (True, "quality True: must be a whole number")])
def test_a_quality_out_of_range_is_refused_before_any_work(tmp_path, quality, problem):
    (photo,) = _photos(tmp_path / "in", ["a.png"])
    with pytest.raises(ValueError, match="^" + problem):
        derain_files([str(photo)], str(tmp_path / "out.jpg"), _never, tile=0, quality=quality, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


@pytest.mark.parametrize("output, fmt, written", [("out/", None, "PNG"), ("out/", "tif", "TIFF"),
                                                  ("out.png", None, "PNG"), ("out.tiff", None, "TIFF")])
def test_a_quality_for_outputs_that_have_none_is_refused_before_any_work(tmp_path, output, fmt, written):
    """--quality 80 with PNG outputs (a --format jpg forgotten) would be ignored for a whole batch:
    refused at once, while the command is easily fixed."""
    (photo,) = _photos(tmp_path / "in", ["a.png"])
    with pytest.raises(ValueError) as info:
        derain_files([str(photo)], str(tmp_path / output), _never, tile=0, fmt=fmt, quality=80, progress=False)
    assert str(info.value) == (f"quality 80: only JPEG and WebP outputs have one, and these are {written}; write "
                               "jpg or webp, or leave the quality out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


# --------------------------------------------------------------------------- recursive: folders of folders


def _tree(root: Path) -> list[str]:
    """Every file and folder under ``root``, as relative paths with / (links listed, not followed)."""
    return sorted(p.relative_to(root).as_posix() + ("/" if p.is_dir() and not p.is_symlink() else "")
                  for p in root.rglob("*"))


def _holiday(tmp_path: Path) -> Path:
    """holiday/ with photos at three depths, a hidden folder, a folder of notes and an empty one."""
    root = tmp_path / "holiday"
    _photos(root, ["a.png"])
    _photos(root / "day1", ["b.png", "c.jpg"])
    _photos(root / "day1" / "night", ["d.png"])
    _photos(root / ".thumbnails", ["a.png"])  # hidden: a viewer's cache, nothing the user meant
    (root / "empty").mkdir()
    (root / "notes").mkdir()
    (root / "notes" / "list.txt").write_text("not a photo")
    return root


def test_recursive_mirrors_the_subfolders_under_the_output_folder(tmp_path):
    root = _holiday(tmp_path)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    out = tmp_path / "out"
    s = derain_files([str(root)], str(out), identity, tile=0, progress=False, recursive=True)
    assert s.ok == 4 and not s.failed
    assert _tree(out) == ["a.png", "day1/", "day1/b.png", "day1/c.png", "day1/night/", "day1/night/d.png"]
    assert s.outputs == [out / "a.png", out / "day1" / "b.png", out / "day1" / "c.png",
                         out / "day1" / "night" / "d.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(out / "day1" / "night" / "d.png")),
                                  np.asarray(Image.open(root / "day1" / "night" / "d.png")))
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before  # inputs untouched, none added


def test_recursive_without_an_output_folder_writes_beside_each_input_and_a_rerun_skips_those(tmp_path):
    root = _holiday(tmp_path)
    for _ in range(2):  # the second run finds its own outputs in the subfolders: not derained again
        s = derain_files([str(root)], None, identity, tile=0, progress=False, recursive=True)
        assert s.ok == 4 and not s.failed
        assert [p.relative_to(root).as_posix() for p in s.outputs] == [
            "a_derained.png", "day1/b_derained.png", "day1/c_derained.png", "day1/night/d_derained.png"]
    assert not (root / ".thumbnails" / "a_derained.png").exists()


@pytest.mark.parametrize("output", ["holiday/derained", "holiday/derained/", "holiday/day1/../derained"])
def test_recursive_never_descends_into_its_output_folder_inside_the_input(tmp_path, output, monkeypatch):
    """-r holiday/ -o holiday/derained/, run twice: the second run must not derain the first run's
    outputs (into holiday/derained/derained/...)."""
    root = _holiday(tmp_path)
    monkeypatch.chdir(tmp_path)
    ran = []
    for run in (1, 2):
        s = derain_files(["holiday"], output, lambda x: ran.append(1) or x, tile=0, progress=False, recursive=True)
        assert s.ok == 4 and len(ran) == 4 * run and not s.failed
    assert _tree(root / "derained") == ["a.png", "day1/", "day1/b.png", "day1/c.png", "day1/night/",
                                        "day1/night/d.png"]


def test_recursive_into_the_input_folder_itself_keeps_the_suffix_in_every_subfolder(tmp_path):
    root = _holiday(tmp_path)
    for _ in range(2):
        s = derain_files([str(root)], str(root), identity, tile=0, progress=False, recursive=True)
        assert s.ok == 4 and not s.failed
    assert [p for p in _tree(root) if "derained" in p] == [
        "a_derained.png", "day1/b_derained.png", "day1/c_derained.png", "day1/night/d_derained.png"]


@pytest.mark.skipif(os.name != "posix", reason="symbolic links")
def test_recursive_follows_no_link_to_a_folder_so_a_loop_ends(tmp_path):
    """Links to folders are not followed (as find and cp -r do): a link to the folder itself or to
    the one above would make the walk endless, or derain what was never given. Links to photos are."""
    root = _holiday(tmp_path)
    (root / "day1" / "loop").symlink_to(root, target_is_directory=True)
    (root / "up").symlink_to("..", target_is_directory=True)
    _photos(tmp_path / "elsewhere", ["e.png"])
    (root / "linked.png").symlink_to(tmp_path / "elsewhere" / "e.png")
    out = tmp_path / "out"
    s = derain_files([str(root)], str(out), identity, tile=0, progress=False, recursive=True)
    assert s.ok == 5 and not s.failed
    assert _tree(out) == ["a.png", "day1/", "day1/b.png", "day1/c.png", "day1/night/", "day1/night/d.png",
                          "linked.png"]


@pytest.mark.skipif(os.name != "posix", reason="symbolic links")
def test_recursive_a_tree_of_links_only_says_they_are_not_followed(tmp_path):
    _photos(tmp_path / "real", ["a.png"])
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "day1").symlink_to(tmp_path / "real", target_is_directory=True)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    s = derain_files([str(tmp_path / "links"), str(tmp_path / "empty")], None, _never, tile=0, progress=False,
                     recursive=True)
    assert s.ok == 0 and s.failed == [
        (str(tmp_path / "links"), ("no image files in this folder or its subfolders (its 1 link to a folder is not "
                                   "followed)")),
        (str(tmp_path / "empty"), "no image files in this folder or its subfolders")]
    (tmp_path / "empty" / "sub" / "x_derained.png").write_bytes(b"an earlier output")
    s = derain_files([str(tmp_path / "empty")], None, _never, tile=0, progress=False, recursive=True)
    assert s.failed == [(str(tmp_path / "empty"), ("only earlier outputs (*_derained) in this folder and its "
                                                   "subfolders"))]


def test_recursive_name_clashes_follow_the_rules_within_each_output_folder(tmp_path):
    """x.png at the top and in day1/ no longer clash (they go to two folders); x.png and x.jpg in
    one folder, or day1/ of two inputs merged in one output folder, are told apart as without -r."""
    _photos(tmp_path / "a", ["x.png"])
    _photos(tmp_path / "a" / "day1", ["x.png", "x.jpg"])
    _photos(tmp_path / "b" / "day1", ["y.png"])
    _photos(tmp_path / "c" / "day1", ["y.png"])
    out = tmp_path / "out"
    s = derain_files([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c")], str(out), identity, tile=0,
                     progress=False, recursive=True)
    assert s.ok == 5 and not s.failed
    assert _tree(out) == ["day1/", "day1/day1_y_png.png", "day1/day1_y_png_2.png", "day1/x_jpg.png",
                          "day1/x_png.png", "x.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(out / "day1" / "day1_y_png_2.png")),
                                  np.asarray(Image.open(tmp_path / "c" / "day1" / "y.png")))


def test_recursive_pattern_walks_the_folders_it_matches_but_not_the_output_folder(tmp_path, monkeypatch):
    _photos(tmp_path / "trips" / "2023" / "day1", ["a.png"])
    _photos(tmp_path / "trips" / "2024", ["b.png"])
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        s = derain_files(["trips/*"], "trips/derained", identity, tile=0, progress=False, recursive=True)
        assert s.ok == 2 and not s.failed
    assert _tree(tmp_path / "trips" / "derained") == ["b.png", "day1/", "day1/a.png"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="the superuser may list any folder")
def test_recursive_a_subfolder_that_cannot_be_listed_fails_alone(tmp_path):
    root = _holiday(tmp_path)
    (root / "day1").chmod(0o000)
    try:
        s = derain_files([str(root)], str(tmp_path / "out"), identity, tile=0, progress=False, recursive=True)
    finally:
        (root / "day1").chmod(0o755)
    assert s.ok == 1 and s.failed == [(str(root / "day1"), "cannot be listed (Permission denied)")]


def test_recursive_a_subfolder_that_cannot_be_listed_fails_alone_any_user(tmp_path, monkeypatch):
    """The same as the superuser meets it (an unreadable network folder): os.scandir refuses it."""
    root = _holiday(tmp_path)
    real_scandir = os.scandir

    def refusing(path="."):
        if Path(path) == root / "day1":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(inference.os, "scandir", refusing)
    s = derain_files([str(root)], str(tmp_path / "out"), identity, tile=0, progress=False, recursive=True)
    assert s.ok == 1 and s.failed == [(str(root / "day1"), "cannot be listed (Permission denied)")]


def test_plan_outputs_puts_each_output_in_its_subfolder(tmp_path):
    files = [tmp_path / "in" / "a.png", tmp_path / "in" / "day1" / "a.png", tmp_path / "in" / "day1" / "a.jpg"]
    plan = plan_outputs(files, [str(tmp_path / "in")], str(tmp_path / "out"),
                        subfolders=[Path(), Path("day1"), Path("day1")])
    assert [(out, problem) for _, out, problem in plan] == [
        (tmp_path / "out" / "a.png", None), (tmp_path / "out" / "day1" / "a_png.png", None),
        (tmp_path / "out" / "day1" / "a_jpg.png", None)]


def test_recursive_pattern_with_a_folder_that_cannot_be_listed_names_it_and_goes_on(tmp_path, monkeypatch):
    _photos(tmp_path / "trips" / "2023", ["a.png"])
    _photos(tmp_path / "trips" / "2024", ["b.png"])
    real_scandir = os.scandir

    def refusing(path="."):
        if Path(path) == tmp_path / "trips" / "2023":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(inference.os, "scandir", refusing)
    s = derain_files([str(tmp_path / "trips" / "*")], str(tmp_path / "out"), identity, tile=0, progress=False,
                     recursive=True)
    assert s.ok == 1 and s.outputs == [tmp_path / "out" / "b.png"]
    assert s.failed == [(str(tmp_path / "trips" / "2023"), "cannot be listed (Permission denied)")]

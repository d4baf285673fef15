"""Loading the authors' checkpoint formats and ours; the key map both ways; one-line errors."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from nerdrain import CheckpointError, create_model, load_model, save_model
from nerdrain.checkpoint import (
    _ffn_expansion,
    export_official,
    from_official_state_dict,
    infer_config,
    read_checkpoint,
    stored_dtype,
    to_official_state_dict,
)


@pytest.fixture(scope="module")
def official_state(golden_dir):
    return load_file(str(golden_dir / "official_dim16_seed0.safetensors"))


def assert_one_line_naming(err: pytest.ExceptionInfo, path) -> None:
    message = str(err.value)
    assert "\n" not in message and str(path) in message


def test_key_map_round_trips_golden_state_dict(official_state):
    model = create_model("nerd_rain", dim=16)
    ours = from_official_state_dict(official_state, model)
    assert set(ours) == set(model.state_dict())
    model.load_state_dict(ours)
    back = to_official_state_dict(model)
    assert set(back) == set(official_state)
    assert all(torch.equal(back[k], official_state[k]) for k in official_state)


def test_key_map_covers_full_size_released_key_lists(golden_dir):
    import json

    for variant, filename in [("nerd_rain", "official_nerd_rain_keys.json"),
                              ("nerd_rain_s", "official_nerd_rain_s_keys.json")]:
        released = json.loads((golden_dir / filename).read_text())["state_dict"]
        ours = {k: list(v.shape) for k, v in to_official_state_dict(create_model(variant)).items()}
        assert ours == {k: list(v) for k, v in released.items()}


def test_infers_variant_width_from_shapes(tmp_path):
    model = create_model("nerd_rain_s")
    assert infer_config(to_official_state_dict(model)) == model.cfg


def prefixed(prefix, state):
    return {prefix + k: v for k, v in state.items()}


WRAPPED = {  # how other training code saves the weights
    "net": lambda s: {"net": dict(s), "epoch": 1},
    "nested": lambda s: {"model": {"state_dict": prefixed("module.", s)}, "optimizer": {}},
    "compiled": lambda s: prefixed("_orig_mod.", s),
    "ddp_of_compiled": lambda s: prefixed("module._orig_mod.", s),
    "averaged_model": lambda s: {**prefixed("module.", s), "n_averaged": torch.tensor(7)},
    "lightning": lambda s: {"state_dict": {**prefixed("model.", s), "loss.vgg.weight": torch.zeros(2)}},
}


@pytest.mark.parametrize("wrap", ["authors", "bare", "module_prefix", "safetensors", *WRAPPED])
def test_loads_authors_and_bare_formats(tmp_path, official_state, wrap):
    if wrap == "authors":
        path = tmp_path / "model_best.pth"
        state = {f"module.{k}": v for k, v in official_state.items()}
        torch.save({"epoch": 3, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}, path)
    elif wrap == "bare":
        path = tmp_path / "bare.pth"
        torch.save(dict(official_state), path)
    elif wrap == "module_prefix":
        path = tmp_path / "dp.pth"
        torch.save({f"module.{k}": v for k, v in official_state.items()}, path)
    elif wrap in WRAPPED:
        path = tmp_path / f"{wrap}.pth"
        torch.save(WRAPPED[wrap](official_state), path)
    else:
        path = tmp_path / "bare.safetensors"
        save_file(dict(official_state), str(path))
    model = load_model(path)
    assert not model.training and model.cfg.dim == 16
    back = to_official_state_dict(model)
    assert all(torch.equal(back[k], official_state[k]) for k in official_state)


@pytest.mark.parametrize("wrap", [
    lambda s: {"generator": dict(s), "discriminator": {"conv.weight": torch.zeros(1)}, "epoch": 3},
    lambda s: {"netG": {"state_dict": prefixed("module.", s)}, "iter": 9},
    lambda s: {**s, "epoch": 5, "best_psnr": 31.2},
], ids=["gan", "unknown_then_known_wrapper", "numbers_beside_the_tensors"])
def test_weights_under_a_key_of_any_name_are_found(tmp_path, official_state, wrap):
    """Training code names its wrappers freely: the one entry holding a NeRD-Rain is it, and
    numbers saved beside the weights are no weights."""
    path = tmp_path / "other_code.pth"
    torch.save(wrap(official_state), path)
    back = to_official_state_dict(load_model(path))
    assert all(torch.equal(back[k], official_state[k]) for k in official_state)


@pytest.mark.parametrize("content, problem", [
    (lambda s: {"g": dict(s), "g_ema": dict(s)}, "NeRD-Rain weights under 2 keys ('g', 'g_ema'); save the one to load"),
    (lambda s: {"epoch": 3, "optimizer": {"state": {}}},
     "no NeRD-Rain weights found (top-level keys: 2 (epoch, optimizer))"),
    (lambda s: [dict(s)], "no NeRD-Rain weights found (a list, not a state dict)"),
])
def test_where_the_weights_are_unclear_or_absent_the_file_says_what_it_holds(tmp_path, official_state, content,
                                                                            problem):
    path = tmp_path / "unclear.pth"
    torch.save(content(official_state), path)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert str(err.value) == f"{path}: {problem}"


def test_a_checkpoint_saved_from_cuda_loads_on_a_machine_without_it(tmp_path, official_state):
    """The authors trained on GPUs: their files record a CUDA device for every tensor, which
    plain torch.load refuses without CUDA. Written here by tagging CPU storages as torch.save
    tags CUDA ones."""
    import torch.serialization as serialization

    def cuda_tag(storage):
        return "cuda:0"

    serialization.register_package(-100, cuda_tag, lambda storage, location: None)
    try:
        path = tmp_path / "model_best.pth"
        torch.save({"epoch": 1, "state_dict": prefixed("module.", official_state)}, path)
    finally:
        serialization._package_registry[:] = [p for p in serialization._package_registry if p[1] is not cuda_tag]
    if not torch.cuda.is_available():
        # the file really asks for CUDA (PyTorch 2.2 wraps the refusal in an UnpicklingError)
        with pytest.raises((RuntimeError, pickle.UnpicklingError), match="CUDA"):
            torch.load(path, weights_only=True)
    model = load_model(path)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    back = to_official_state_dict(model)
    assert all(torch.equal(back[k], official_state[k]) for k in official_state)


def test_the_stored_type_is_the_networks_not_a_wrappers_other_tensors(tmp_path, official_state):
    """A Lightning checkpoint whose loss network (float32) comes before the fp16 model: the type a
    conversion keeps is the model's, whichever function is asked."""
    path = tmp_path / "lightning.ckpt"
    half = {k: v.half() for k, v in official_state.items()}
    torch.save({"state_dict": {"loss.vgg.weight": torch.zeros(2), **prefixed("model.", half)}}, path)
    assert read_checkpoint(path)[1] == torch.float16
    assert stored_dtype(path) == torch.float16


def test_save_model_round_trip_keeps_config_and_weights(tmp_path):
    model = create_model("nerd_rain", dim=8, depths=(1, 2, 2), inr_hidden=(32, 32))
    path = save_model(model, tmp_path / "ours.safetensors")
    loaded = load_model(path)
    assert loaded.cfg == model.cfg
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert not list(tmp_path.glob(".*tmp"))


def test_fp16_saved_weights_load_as_fp32(tmp_path):
    model = create_model("nerd_rain", dim=8)
    loaded = load_model(save_model(model, tmp_path / "half.safetensors", dtype=torch.float16))
    assert next(loaded.parameters()).dtype == torch.float32
    ref = model.state_dict()["embed.0.weight"]
    torch.testing.assert_close(loaded.state_dict()["embed.0.weight"], ref.half().float())


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable checkpoint: neither a PyTorch file nor safe") as err:
        load_model(path)
    assert_one_line_naming(err, path)


def test_a_missing_file_is_both_a_checkpoint_error_and_file_not_found(tmp_path):
    """A notebook catches a wrong path as it would from open(): FileNotFoundError (an OSError)."""
    path = tmp_path / "typo.pth"
    for catch in (FileNotFoundError, CheckpointError):
        with pytest.raises(catch, match="typo.pth: no such file") as err:
            load_model(path)
        assert_one_line_naming(err, path)
    assert isinstance(err.value, ValueError) and str(err.value) == f"{path}: no such file"
    with pytest.raises(FileNotFoundError, match="^an empty name; give a checkpoint file$"):
        load_model("")  # not the current folder, which Path("") would name


def test_a_path_that_is_no_regular_file_is_not_called_missing(tmp_path):
    """/dev/null, or a pipe (``--weights <(...)``): there, but nothing a checkpoint can be read from;
    and a name the file system refuses to look up."""
    import os

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    for path in (pipe, "/dev/null"):
        with pytest.raises(CheckpointError) as err:
            load_model(path)
        assert not isinstance(err.value, FileNotFoundError)
        assert str(err.value) == f"{path}: not a regular file (a device or a pipe); give a checkpoint file"
    long_name = tmp_path / ("w" * 300 + ".pth")  # the file system cannot be asked: said so, not 'no such file'
    with pytest.raises(CheckpointError, match=r"\.pth: cannot be read \(File name too long\)$") as err:
        load_model(long_name)
    assert not isinstance(err.value, FileNotFoundError)


def _zip_without_torch_data(path):
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("weights/readme.txt", "the weights are elsewhere")


def _zip_of_checkpoints(path):
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        for name in ("Rain200L/model_best.pth", "Rain200H/model_best.pth", "README.txt"):
            archive.writestr(name, b"\x80\x02")


@pytest.mark.parametrize("name, write, problem", [
    ("empty.pth", lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
    ("empty.safetensors", lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
    ("model.pth", lambda p: p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 9\n"),
     "a Git LFS pointer, not the file itself (fetch it with git lfs pull)"),
    ("model.pth", lambda p: p.write_text("<!DOCTYPE html>\n<html><title>Google Drive</title></html>"),
     "a web page (HTML), not a checkpoint (a download that saved the page instead of the file?)"),
    ("model.pth.gz", lambda p: p.write_bytes(b"\x1f\x8b\x08\x00" + bytes(40)),
     "gzip-compressed; decompress it first"),
    ("model.zip", _zip_without_torch_data, "a zip archive but not a PyTorch file (no data.pkl in it)"),
    ("weights.pth", _zip_of_checkpoints,
     "a zip archive holding 2 (Rain200H/model_best.pth, Rain200L/model_best.pth), not one; extract it first"),
])
def test_files_that_are_not_checkpoints_say_what_they_are(tmp_path, name, write, problem):
    """What a failed download or a clone without Git LFS leaves in place of the weights is named
    as such, not as a file of no known kind."""
    path = tmp_path / name
    write(path)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert_one_line_naming(err, path)
    assert str(err.value) == f"{path}: {problem}"


TRUNCATED_WRITERS = {  # file name -> how it was saved before being cut
    "cut.pth": lambda p, s: torch.save({"state_dict": s}, p),
    "legacy_cut.pth": lambda p, s: torch.save({"state_dict": s}, p, _use_new_zipfile_serialization=False),
    "cut.safetensors": lambda p, s: save_file(s, str(p)),
    "renamed_cut.pth": lambda p, s: save_file(s, str(p)),  # safetensors under a .pth name
}


@pytest.mark.parametrize("name", TRUNCATED_WRITERS)
@pytest.mark.parametrize("keep", [0.004, 0.5, 0.999])
def test_truncated_files_are_called_truncated(tmp_path, official_state, name, keep):
    """An interrupted download or copy says so, wherever it was cut, instead of relaying the reader's
    internals ('failed finding central directory', '[Errno 22] Invalid argument', 'EOFError',
    'incomplete metadata, file not fully covered') or calling a cut safetensors file neither format."""
    path = tmp_path / name
    TRUNCATED_WRITERS[name](path, dict(official_state))
    whole = path.stat().st_size
    cut = int(whole * keep)
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert_one_line_naming(err, path)
    message = str(err.value)
    assert message.startswith(f"{path}: truncated") and message.endswith("(an incomplete download or copy?)")
    if "safetensors" in name or name.startswith("renamed"):  # its header tells how long it should be
        header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
        described = (f"{cut} of the {whole} bytes its header describes" if cut >= header
                     else f"{cut} bytes, shorter than its {header}-byte header")
        assert described in message


def test_a_truncated_training_checkpoint_is_called_truncated(tmp_path):
    """--resume reads RUN/last.pt without load_model's checks of what a file is: a cut one says so too."""
    from nerdrain.training import load_training_checkpoint

    path = tmp_path / "last.pt"
    torch.save({"iteration": 3, "model": {"w": torch.zeros(5000)}, "optimizer": {}}, path)
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(CheckpointError) as err:
        load_training_checkpoint(path, torch.device("cpu"))
    assert str(err.value) == (f"{path}: truncated or damaged: a zip archive (PyTorch's format) without its index "
                              "(an incomplete download or copy?)")


def test_foreign_state_dict_is_named_as_such(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.bias": torch.zeros(10)}, path)
    with pytest.raises(CheckpointError, match="not a NeRD-Rain checkpoint") as err:
        load_model(path)
    assert_one_line_naming(err, path)
    assert str(err.value).endswith("; keys: 2 (conv1.weight, fc.bias))")


def test_missing_unexpected_and_mismatched_keys_are_summarised(tmp_path, official_state):
    state = dict(official_state)
    del state["BF1.gamma1.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["output_max.weight"] = torch.zeros(3, 16, 5, 5)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    message = str(err.value)
    assert_one_line_naming(err, path)
    assert "missing 1 (BF1.gamma1.weight)" in message
    assert "unexpected 1 (extra.weight)" in message
    assert "output_max.weight (3, 16, 5, 5) vs (3, 16, 3, 3)" in message


@pytest.mark.parametrize("key", ["encoder_level1_max1.0.attn.temperature", "latent_max1.0.ffn.project_out.weight",
                                 "INR.imnet.layers.6.bias", "INR.imnet.layers.2.weight"])
def test_a_missing_tensor_the_shape_is_read_from_is_named_as_missing(tmp_path, official_state, key):
    """The tensors the width, heads, FFN and INR sizes are read off can be missing like any other:
    named as missing, not as 'shapes inconsistent' or as mismatches of the tensors around them."""
    path = tmp_path / "one_short.pth"
    torch.save({k: v for k, v in official_state.items() if k != key}, path)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert str(err.value) == f"{path}: does not match NeRD-Rain dim=16: missing 1 ({key})"


class Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_arbitrary_pickles_are_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Payload()}, f)
    with pytest.raises(CheckpointError, match="pickled Python objects besides tensors; refused") as err:
        load_model(path)
    assert "unpickled!" not in capsys.readouterr().out
    assert_one_line_naming(err, path)
    assert "weights_only" not in str(err.value)  # no advice to switch the protection off


def test_format_is_read_from_the_contents_not_the_name(tmp_path, official_state):
    """A renamed file still loads: safetensors named .pth, a torch pickle named .safetensors."""
    ours = save_model(create_model("nerd_rain", dim=16), tmp_path / "ours.safetensors")
    renamed = ours.rename(tmp_path / "ours.pth")
    assert load_model(renamed).cfg.dim == 16
    pickled = tmp_path / "official.safetensors"
    torch.save({"state_dict": dict(official_state)}, pickled)
    assert load_model(pickled).cfg.dim == 16


def test_safetensors_whose_header_length_starts_with_a_pickle_byte(tmp_path):
    """The header length's first byte can be 0x80, a pickle's first byte: still safetensors."""
    model = create_model("nerd_rain", dim=16)
    for pad in range(256):
        path = save_model(model, tmp_path / "w.safetensors", extra_metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no padding gave a header length ending in 0x80")
    assert load_model(path).cfg.dim == 16


@pytest.mark.parametrize("write", [save_model, export_official])
def test_a_failed_write_leaves_neither_a_file_nor_the_folders_made_for_it(tmp_path, monkeypatch, write):
    import errno
    import os

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    out = tmp_path / "new" / "deeper" / "w.safetensors"
    with pytest.raises(OSError, match="No space left on device"):
        write(tiny(), out)
    assert list(tmp_path.iterdir()) == []


def test_save_model_refuses_a_pickle_name(tmp_path):
    with pytest.raises(ValueError, match="name it .safetensors"):
        save_model(create_model("nerd_rain", dim=16), tmp_path / "mine.pth")
    assert not list(tmp_path.iterdir())


def tiny():
    torch.manual_seed(0)
    return create_model("nerd_rain_s", dim=8, depths=(1, 1, 1), inr_hidden=(16,))


def test_weights_are_stored_only_in_floating_point_types(tmp_path):
    model = tiny()
    for dtype in (torch.int8, "int8", "nope"):
        with pytest.raises(ValueError, match="floating-point type"):
            save_model(model, tmp_path / "w.safetensors", dtype=dtype)
    assert not (tmp_path / "w.safetensors").exists()
    path = save_model(model, tmp_path / "w.safetensors", dtype="float16")
    assert {t.dtype for t in load_file(str(path)).values()} == {torch.float16}


def test_save_model_wants_a_model_and_a_file_name(tmp_path):
    with pytest.raises(TypeError, match="not Identity"):
        save_model(torch.nn.Identity(), tmp_path / "w.safetensors")
    with pytest.raises(TypeError, match="not OrderedDict"):
        save_model(tiny().state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="is a folder"):
        save_model(tiny(), tmp_path)


@pytest.mark.parametrize("config, problem", [
    ('{"dim": 8, "foo": 1}', "unexpected keyword"),
    ("[1, 2]", "object has no attribute"),
    ("{bad", "Expecting property name"),
    ('{"dim": 7}', "NeRDRainConfig.dim"),
])
def test_a_stored_config_that_cannot_build_is_one_line_naming_the_file(tmp_path, config, problem):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in tiny().state_dict().items()}, str(path),
              metadata={"format": "nerdrain", "config": config})
    with pytest.raises(CheckpointError, match=problem) as err:
        load_model(path)
    assert_one_line_naming(err, path)


def test_load_model_checks_the_device(tmp_path):
    path = save_model(tiny(), tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="unknown device 'xyz'"):
        load_model(path, device="xyz")


@pytest.mark.parametrize("overrides", [
    {"depths": (0, 1, 1)}, {"depths": (1, 1, 0)}, {"depths": (0, 0, 0)},  # levels without blocks
    {"dim": 14, "ffn_expansion": 1.09},  # 61/56 * 56 floors to 60 in floating point
    {"dim": 24, "ffn_expansion": 2.7},
])
def test_authors_layout_of_any_valid_config_loads_back(tmp_path, overrides):
    """Hyperparameters read off the shapes rebuild exactly the exported tensors."""
    torch.manual_seed(0)
    model = create_model("nerd_rain", **{"dim": 8, "inr_hidden": (16,), **overrides})
    loaded = load_model(export_official(model, tmp_path / "w.pth"))
    exported, back = to_official_state_dict(model), to_official_state_dict(loaded)
    assert back.keys() == exported.keys() and all(torch.equal(back[k], exported[k]) for k in exported)


def test_ffn_factor_read_off_shapes_reproduces_every_width():
    """For each width and hidden width the trained factor could give, the factor read back gives
    the same hidden widths at all three levels (int(width * factor), as the blocks build them)."""
    for dim in range(2, 66, 2):
        for features in range(4, 4 * dim * 4):  # factors up to 4
            factor = _ffn_expansion({4 * dim: features})
            assert [int(w * factor) for w in (dim, 2 * dim, 4 * dim)] == [features // 4, features // 2, features]


def test_two_networks_in_one_file_are_named_not_guessed(tmp_path, official_state):
    path = tmp_path / "two.pth"
    torch.save({**prefixed("model.", official_state), **prefixed("model_ema.", official_state)}, path)
    with pytest.raises(CheckpointError, match="holds 2 networks .key prefixes 'model.', 'model_ema.'") as err:
        load_model(path)
    assert_one_line_naming(err, path)


def _alternately(prefix, state):
    return {(prefix + k if i % 2 else k): v for i, (k, v) in enumerate(state.items())}


@pytest.mark.parametrize("mix", [
    lambda s: _alternately("module.", s),
    lambda s: prefixed("module.", _alternately("_orig_mod.", s)),
    lambda s: {"state_dict": _alternately("module.", s), "epoch": 2},
], ids=["module_on_some_keys", "compiled_on_some_keys", "wrapped"])
def test_a_wrapper_prefix_on_some_keys_only_still_loads(tmp_path, official_state, mix):
    """A state dict merged from a DataParallel or compiled model and a plain one carries their
    prefixes on some keys only: every tensor is still the network's, once."""
    path = tmp_path / "mixed.pth"
    torch.save(mix(official_state), path)
    back = to_official_state_dict(load_model(path))
    assert all(torch.equal(back[k], official_state[k]) for k in official_state)


def test_a_tensor_under_a_wrapper_prefix_and_without_is_named_not_guessed(tmp_path, official_state):
    path = tmp_path / "twice.pth"
    torch.save({**official_state, "module.BF1.gamma1.bias": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert str(err.value) == (f"{path}: holds BF1.gamma1.bias twice ('BF1.gamma1.bias', 'module.BF1.gamma1.bias'); "
                              "save the one to load as a state dict")


@pytest.mark.parametrize("values, dtype, refused", [
    ([float("nan"), 0.0], torch.float32, True),
    ([float("inf"), 1.0], torch.float32, True),
    ([float("inf"), float("-inf")], torch.float32, True),  # they cancel to NaN in a sum
    ([float("nan"), 0.0], torch.bfloat16, True),
    ([3e38, 3e38], torch.float32, False),  # finite, though their sum is not
    ([60000.0, 60000.0], torch.float16, False),
], ids=["nan", "inf", "both_infinities", "bf16_nan", "fp32_sum_overflows", "fp16_sum_overflows"])
def test_non_finite_weights_are_refused_and_only_they(tmp_path, official_state, values, dtype, refused):
    """Weights that would make every output NaN are refused, naming the tensor; large finite ones,
    whose sum overflows the type, are weights like any other."""
    state = {k: v.to(dtype) for k, v in official_state.items()}
    key = "patch_embed_max.proj.weight"
    state[key] = state[key].clone()
    state[key].view(-1)[: len(values)] = torch.tensor(values, dtype=dtype)
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    if refused:
        with pytest.raises(CheckpointError) as err:
            load_model(path)
        assert str(err.value).startswith(f"{path}: NaN or infinite values in 1 ({key});")
    else:
        assert to_official_state_dict(load_model(path))[key].view(-1)[0] == values[0]


def test_weights_without_values_or_as_integers_are_refused(tmp_path, official_state):
    """Meta tensors crashed load_state_dict with a page-long traceback; integer ones were cast
    to float without a word."""
    meta = {k: torch.empty(v.shape, device="meta") for k, v in official_state.items()}
    integral = {**official_state, "output_max.weight": official_state["output_max.weight"].to(torch.int8)}
    for name, state, problem in [("meta.pth", meta, r"no values \(meta tensors\) 947 \(BF1"),
                                 ("int.pth", integral, r"not floating-point 1 \(output_max.weight int8\)")]:
        torch.save(state, tmp_path / name)
        with pytest.raises(CheckpointError, match=problem) as err:
            load_model(tmp_path / name)
        assert_one_line_naming(err, tmp_path / name)


def test_a_wrong_width_fails_in_words_before_building_that_network(tmp_path, official_state, monkeypatch):
    """The width is read off one tensor; a wrong one (here 2048: a network of ~160 GB) must be
    reported as a shape mismatch, not allocated first."""
    import nerdrain.checkpoint as checkpoint

    real = checkpoint.NeRDRain

    def guarded(cfg):
        if cfg.dim > 16 and torch.empty(0).device.type != "meta":  # torch.get_default_device is 2.3+
            raise AssertionError(f"allocating a network of width {cfg.dim}")
        return real(cfg)

    monkeypatch.setattr(checkpoint, "NeRDRain", guarded)
    state = {**official_state, "patch_embed_max.proj.weight": torch.zeros(2048, 3, 3, 3)}
    torch.save(state, tmp_path / "w.pth")
    mismatch = r"dim=2048: shape mismatch .*\(2, 128, 3, 3\) vs \(2, 16384, 3, 3\)"
    with pytest.raises(CheckpointError, match=mismatch) as err:
        load_model(tmp_path / "w.pth")
    assert_one_line_naming(err, tmp_path / "w.pth")


def test_load_model_builds_the_network_once_and_it_owns_its_weights(tmp_path, official_state, monkeypatch):
    """One build (on the meta device, then given the file's tensors), not a checked skeleton and a
    randomly initialised copy: the model must still be a plain trainable fp32 network on the CPU,
    its weights untied even where the file stored two of them as one tensor, computing what the
    same weights loaded into a freshly built network compute."""
    import nerdrain.checkpoint as checkpoint
    from nerdrain.models import NeRDRain

    builds = []
    monkeypatch.setattr(checkpoint, "NeRDRain", lambda cfg: builds.append(cfg) or NeRDRain(cfg))
    state = {k: v.half() for k, v in official_state.items()}  # read as fp32 copies
    state["BF1.gamma2.weight"] = state["BF1.gamma1.weight"] = official_state["BF1.gamma1.weight"]  # one tensor
    torch.save(state, tmp_path / "w.pth")
    model = load_model(tmp_path / "w.pth")
    assert len(builds) == 1
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors.values())
    assert len({t.untyped_storage().data_ptr() for t in tensors.values()}) == len(tensors)

    reference = NeRDRain(model.cfg).eval()
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in reference.parameters()]
    assert not model.training
    reference.load_state_dict(from_official_state_dict({k: v.float() for k, v in state.items()}, reference))
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_weights_loaded_from_safetensors_do_not_change_with_the_file(tmp_path, official_state):
    """safetensors maps the file into memory: the network must hold copies, or rewriting the file in
    place (``cp`` over it) would change the loaded weights, and shortening it crash the process."""
    path = tmp_path / "w.safetensors"
    save_file(dict(official_state), str(path))
    model = load_model(path)
    size = path.stat().st_size
    with open(path, "r+b") as f:  # the same file, not a new one renamed over it
        f.seek(size // 2)
        f.write(bytes(size - size // 2))
    back = to_official_state_dict(model)
    assert all(torch.equal(back[k], official_state[k]) for k in official_state)


def test_extra_metadata_cannot_replace_what_load_model_rebuilds_from(tmp_path):
    model = tiny()
    for key in ("config", "format"):
        with pytest.raises(ValueError, match=f"extra_metadata: '{key}' is save_model's own"):
            save_model(model, tmp_path / "w.safetensors", extra_metadata={key: '{"dim": 16}'})
    for bad in ({"iteration": 5}, {5: "five"}):
        with pytest.raises(ValueError, match="keys and values must be strings"):
            save_model(model, tmp_path / "w.safetensors", extra_metadata=bad)
    assert not list(tmp_path.iterdir())
    path = save_model(model, tmp_path / "w.safetensors", extra_metadata={"iteration": "5"})
    assert load_model(path).cfg == model.cfg

"""The command line as a user runs it: exit codes, one-line errors, outputs on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nerdrain import create_model, load_model, save_model
from nerdrain.cli import main
from nerdrain.metrics import score


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("nerd_rain_s", dim=8, depths=(1, 1, 1), inr_hidden=(16, 16, 16))
    return save_model(model, tmp_path_factory.mktemp("w") / "tiny.safetensors")


def write_image(path, seed, size=(40, 56)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def test_derain_folder_with_one_bad_file(tmp_path, tiny_weights, capsys):
    src = tmp_path / "photos"
    src.mkdir()
    write_image(src / "a.png", 0)
    write_image(src / "b.jpg", 1)
    (src / "broken.png").write_bytes((src / "a.png").read_bytes()[:200])
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    out = tmp_path / "out"
    code = main(["derain", str(src), "-o", str(out), "--weights", str(tiny_weights), "--tile", "32",
                 "--overlap", "8", "-q"])
    assert code == 1  # something failed
    err = capsys.readouterr().err
    assert "broken.png" in err and "2 derained, 1 failed" in err
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # inputs untouched


def test_derain_single_file_default_output_beside_input(tmp_path, tiny_weights):
    write_image(tmp_path / "rainy.png", 2, size=(17, 31))
    assert main(["derain", str(tmp_path / "rainy.png"), "--weights", str(tiny_weights), "--tile", "0", "-q"]) == 0
    with Image.open(tmp_path / "rainy_derained.png") as img:
        assert img.size == (31, 17)


@pytest.mark.parametrize("device, problem", [("gpu", "unknown device 'gpu'"),
                                             ("cuda:99", "device 'cuda:99' requested but")])
def test_derain_bad_device_is_one_line_error_before_any_output(tmp_path, tiny_weights, capsys, device, problem):
    write_image(tmp_path / "rainy.png", 5)
    code = main(["derain", str(tmp_path / "rainy.png"), "--weights", str(tiny_weights), "--device", device, "-q"])
    err = capsys.readouterr().err
    assert code == 2 and problem in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rainy.png"]


@pytest.mark.parametrize("device", ["xpu", "meta"])
def test_derain_device_torch_knows_but_we_do_not_run_on(tmp_path, tiny_weights, capsys, device):
    write_image(tmp_path / "rainy.png", 5)
    code = main(["derain", str(tmp_path / "rainy.png"), "--weights", str(tiny_weights), "--device", device, "-q"])
    err = capsys.readouterr().err
    assert code == 2 and f"unsupported device '{device}'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flags, problem", [(["--tile", "-5"], "tile must be 0"), (["--tile", "7"], "at least 16"),
                                            (["--overlap", "-1"], "overlap"), (["--batch-size", "0"], "batch_size")])
def test_derain_bad_tiling_is_one_usage_error_not_one_per_file(tmp_path, tiny_weights, capsys, flags, problem):
    for i in range(2):
        write_image(tmp_path / f"{i}.png", i)
    code = main(["derain", str(tmp_path / "0.png"), str(tmp_path / "1.png"), "-o", str(tmp_path / "o"),
                 "--weights", str(tiny_weights), "-q", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and problem in err[0] and "0.png" not in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("output, problem", [("notes.txt", "exists and is not a folder"),
                                             ("res.png", "a file name, but the inputs are several images or a folder")])
def test_derain_unusable_output_fails_before_any_work(tmp_path, tiny_weights, capsys, output, problem):
    for i in range(2):
        write_image(tmp_path / f"{i}.png", i)
    (tmp_path / "notes.txt").write_text("mine")
    code = main(["derain", str(tmp_path / "0.png"), str(tmp_path / "1.png"), "-o", str(tmp_path / output),
                 "--weights", str(tiny_weights), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and problem in err[0]
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "res.png").exists()


def test_derain_write_error_names_the_output(tmp_path, tiny_weights, capsys):
    write_image(tmp_path / "s.png", 0)
    (tmp_path / "o" / "s.png").mkdir(parents=True)  # where the output would go: a folder
    assert main(["derain", str(tmp_path / "s.png"), "-o", str(tmp_path / "o"), "--weights", str(tiny_weights),
                 "--tile", "0", "-q"]) == 1
    assert f"error: {tmp_path / 's.png'}: output {tmp_path / 'o' / 's.png'}: is a directory" in capsys.readouterr().err


def test_sigterm_unwinds_like_ctrl_c_with_exit_143(tmp_path, monkeypatch, capsys):
    """A batch system's SIGTERM raises an interrupt in the command (so temporary files are
    removed on the way out, see test_atomic_write_removes_the_temporary_file_on_interrupt)."""
    import os
    import signal
    import time

    from nerdrain import inference

    def terminated_midway(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
        raise AssertionError("SIGTERM did not interrupt the command")

    monkeypatch.setattr(inference, "derain_files", terminated_midway)
    previous = signal.getsignal(signal.SIGTERM)
    write_image(tmp_path / "s.png", 0)
    assert main(["derain", str(tmp_path / "s.png"), "-q"]) == 143
    assert "interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == previous  # restored


def test_empty_weights_name_is_refused_not_replaced_by_the_shipped_weights(tmp_path, capsys):
    """``--weights "$W"`` with W unset: the run must not go on with the default weights unasked."""
    write_image(tmp_path / "x.png", 3)
    assert main(["derain", str(tmp_path / "x.png"), "-o", str(tmp_path / "out"), "--weights", ""]) == 2
    assert capsys.readouterr().err == "error: --weights: an empty name; give a checkpoint file\n"
    assert not (tmp_path / "out").exists()


def test_weights_folder_is_named_as_a_folder(tmp_path, capsys):
    write_image(tmp_path / "x.png", 3)
    (tmp_path / "w.pth").mkdir()
    assert main(["derain", str(tmp_path / "x.png"), "--weights", str(tmp_path / "w.pth")]) == 2
    assert "w.pth: is a folder, not a checkpoint file" in capsys.readouterr().err


def test_derain_half_stores_weights_in_bf16_and_stays_close_to_fp32(tmp_path, tiny_weights):
    from argparse import Namespace

    from nerdrain.cli import _model

    model = _model(Namespace(weights=str(tiny_weights), device="cpu", half=True))
    assert model.paths["precision"] == "bf16" and model.paths["half_weights"]
    write_image(tmp_path / "rainy.png", 4, size=(33, 47))
    outputs = {}
    for flags in ([], ["--half"]):
        out = tmp_path / f"out{len(flags)}"
        assert main(["derain", str(tmp_path / "rainy.png"), "-o", str(out), "--weights", str(tiny_weights),
                     "--device", "cpu", "--tile", "0", "-q", *flags]) == 0
        outputs[len(flags)] = np.asarray(Image.open(out / "rainy.png"), dtype=np.float64)
    err = np.abs(outputs[1] - outputs[0]) / 255
    assert 0 < err.mean() < 1 / 255 and err.max() < 0.1  # really bf16; within the stated tolerance


def _derained(tmp_path, weights, name, *flags):
    out = tmp_path / name
    assert main(["derain", str(tmp_path / "rainy.png"), "-o", str(out), "--weights", str(weights), "--device", "cpu",
                 "--tile", "32", "--overlap", "8", "-q", *flags]) == 0
    return np.asarray(Image.open(out / "rainy.png"))


def test_derain_cuda_graphs_on_cpu_fall_back_in_one_line(tmp_path, tiny_weights, capsys):
    write_image(tmp_path / "rainy.png", 5)
    plain = _derained(tmp_path, tiny_weights, "plain")
    capsys.readouterr()
    graphed = _derained(tmp_path, tiny_weights, "graphs", "--cuda-graphs")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "warning: CUDA graphs need a CUDA device, not cpu; running without them"
    assert lines[1:] == ["1 derained, 0 failed"]
    np.testing.assert_array_equal(graphed, plain)


def test_derain_compile_falls_back_in_one_line_where_it_fails(tmp_path, tiny_weights, capsys, monkeypatch):
    """``--compile`` reaches torch.compile; where that cannot work (no compiler, an old PyTorch), the
    network runs eagerly with the same outputs."""
    write_image(tmp_path / "rainy.png", 6)
    plain = _derained(tmp_path, tiny_weights, "plain")
    calls = []

    def no_compiler(model, **options):
        calls.append(options)
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", no_compiler)
    capsys.readouterr()
    compiled = _derained(tmp_path, tiny_weights, "compiled", "--compile")
    assert calls and calls[0].get("dynamic") is False
    assert capsys.readouterr().err.splitlines() == [
        "warning: torch.compile failed (RuntimeError: no C++ compiler); running eagerly", "1 derained, 0 failed"]
    np.testing.assert_array_equal(compiled, plain)


def test_bad_weights_is_one_line_error(tmp_path, capsys):
    write_image(tmp_path / "x.png", 3)
    bogus = tmp_path / "weights.pth"
    bogus.write_text("not a checkpoint")
    assert main(["derain", str(tmp_path / "x.png"), "--weights", str(bogus)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(bogus) in err


def test_weights_with_nan_are_refused_before_any_output(tmp_path, capsys):
    """A diverged training run saves NaN weights: every photo would come out black (NaN written
    as 0), with exit 0. They are refused in one line naming the file and a tensor."""
    torch.manual_seed(0)
    model = create_model("nerd_rain_s", dim=8, depths=(1, 1, 1), inr_hidden=(16, 16, 16))
    with torch.no_grad():
        model.embed[2].weight[0, 0, 0, 0] = float("nan")
    weights = save_model(model, tmp_path / "diverged.safetensors")
    write_image(tmp_path / "x.png", 3)
    assert main(["derain", str(tmp_path / "x.png"), "--weights", str(weights), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {weights}: NaN or infinite values in 1 (patch_embed_max.proj.weight); "
                   "the network would output nothing usable (saved from a diverged training run?)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diverged.safetensors", "x.png"]


def prediction_folders(tmp_path, count, gt_seed, pred_seed):
    """``pred/`` and ``gt/`` under ``tmp_path``, each with images ``0.png`` ... named alike."""
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir(), gt.mkdir()
    for i in range(count):
        write_image(gt / f"{i}.png", gt_seed + i)
        write_image(pred / f"{i}.png", pred_seed + i)
    return pred, gt


def test_evaluate_folders_writes_json_and_csv(tmp_path, capsys):
    pred, gt = prediction_folders(tmp_path, 2, 10, 20)
    out_json, out_csv = tmp_path / "s.json", tmp_path / "s.csv"
    assert main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--json", str(out_json), "--csv", str(out_csv),
                 "-q"]) == 0
    report = json.loads(out_json.read_text())
    expected = [score(np.asarray(Image.open(pred / f"{i}.png")), np.asarray(Image.open(gt / f"{i}.png")), "rain200")
                for i in range(2)]
    assert report["count"] == 2
    assert report["mean"]["psnr"] == pytest.approx(np.mean([e[0] for e in expected]))
    assert len(out_csv.read_text().strip().splitlines()) == 3
    assert "PSNR" in capsys.readouterr().out


def test_evaluate_model_on_dataset(tmp_path, tiny_weights):
    for sub in ("input", "target"):
        (tmp_path / "data" / sub).mkdir(parents=True)
    write_image(tmp_path / "data" / "input" / "1.png", 4)
    write_image(tmp_path / "data" / "target" / "1.png", 5)
    out_json = tmp_path / "r.json"
    assert main(["evaluate", "--data", str(tmp_path / "data"), "--weights", str(tiny_weights), "--save",
                 str(tmp_path / "pred"), "--json", str(out_json), "-q"]) == 0
    assert json.loads(out_json.read_text())["images"][0]["name"] == "1"
    assert (tmp_path / "pred" / "1.png").is_file()


@pytest.mark.parametrize("extra", [["--layout", "did"], ["--save", "out"], ["--weights", "w.pth", "--layout", "did"],
                                   ["--released-windows"], ["--tile", "256"]])
def test_evaluate_pred_refuses_options_of_a_model_run(tmp_path, capsys, extra):
    """--pred scores saved files: a --save that writes nothing, a --layout that splits nothing or a --tile
    that cuts nothing is an error."""
    for folder in ("pred", "gt"):
        (tmp_path / folder).mkdir()
        write_image(tmp_path / folder / "1.png", 7)
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "-q", *extra]) == 2
    err = capsys.readouterr().err
    assert "only with --data" in err and all(flag in err for flag in extra if flag.startswith("--"))


def test_evaluate_released_windows_on_a_dataset(tmp_path, tiny_weights, capsys):
    """The released script's windows: a 256-pixel image runs, with --tile it is refused, and an
    image under 256 is named in one line."""
    for name, size in (("big", 256), ("small", 200)):
        root = tmp_path / name
        for folder, value in (("input", 90), ("target", 100)):
            (root / folder).mkdir(parents=True)
            Image.fromarray(np.full((size, 264, 3), value, np.uint8)).save(root / folder / "1.png")
    common = ["evaluate", "--weights", str(tiny_weights), "--device", "cpu", "-q", "--released-windows"]
    assert main([*common, "--data", str(tmp_path / "big")]) == 0
    assert "rain200" in capsys.readouterr().out
    assert main([*common, "--data", str(tmp_path / "big"), "--tile", "64"]) == 2
    assert "give no tile" in capsys.readouterr().err
    assert main([*common, "--data", str(tmp_path / "small")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "small" / "input" / "1.png") in err and "at least 256" in err


def test_evaluate_needs_something_to_do(capsys):
    assert main(["evaluate"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_convert_round_trip_through_official_format(tmp_path, tiny_weights):
    official = tmp_path / "official.pth"
    back = tmp_path / "back.safetensors"
    assert main(["convert", str(tiny_weights), str(official), "--to-official"]) == 0
    assert main(["convert", str(official), str(back)]) == 0
    from nerdrain import load_model

    a, b = load_model(tiny_weights), load_model(back)
    assert a.cfg == b.cfg
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_convert_of_the_authors_file_reproduces_the_golden_outputs(tmp_path, golden_dir):
    """Authors' .pth -> ours -> authors' .pth: the weights come back bit for bit, and give the
    released code's seven outputs."""
    from safetensors.torch import load_file

    from nerdrain.checkpoint import to_official_state_dict

    golden = load_file(str(golden_dir / "official_dim16_seed0_io.safetensors"))
    state = load_file(str(golden_dir / "official_dim16_seed0.safetensors"))
    authors, ours, back = tmp_path / "model_best.pth", tmp_path / "ours.safetensors", tmp_path / "back.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}, "optimizer": {}}, authors)
    assert main(["convert", str(authors), str(ours)]) == 0
    assert main(["convert", str(ours), str(back), "--to-official"]) == 0
    model = load_model(back)
    assert all(torch.equal(v, state[k]) for k, v in to_official_state_dict(model).items())
    with torch.no_grad():
        outputs = model.forward_all(golden["case0.input"]).official_order()
    for index, output in enumerate(outputs):
        torch.testing.assert_close(output, golden[f"case0.output{index}"], atol=1e-4, rtol=0)


def test_convert_to_official_safetensors_is_a_bare_state_dict_under_official_names(tmp_path, tiny_weights):
    from safetensors.torch import load_file

    from nerdrain import load_model
    from nerdrain.checkpoint import to_official_state_dict

    out = tmp_path / "official.safetensors"
    assert main(["convert", str(tiny_weights), str(out), "--to-official"]) == 0
    expected = to_official_state_dict(load_model(tiny_weights))
    written = load_file(str(out))
    assert set(written) == set(expected) and all(torch.equal(written[k], expected[k]) for k in expected)


@pytest.mark.parametrize("flags, expected", [([], torch.bfloat16), (["--dtype", "float32"], torch.float32)])
def test_convert_keeps_the_stored_precision_unless_told(tmp_path, flags, expected):
    from safetensors.torch import load_file

    from nerdrain.checkpoint import stored_dtype

    half = save_model(create_model("nerd_rain_s", dim=8), tmp_path / "bf16.safetensors", dtype=torch.bfloat16)
    assert stored_dtype(half) == torch.bfloat16
    for extra, name in (([], "ours.safetensors"), (["--to-official"], "official.pth")):
        assert main(["convert", str(half), str(tmp_path / name), *extra, *flags]) == 0
        assert stored_dtype(tmp_path / name) == expected
    assert {v.dtype for v in load_file(str(tmp_path / "ours.safetensors")).values()} == {expected}


@pytest.mark.parametrize("extra", [[], ["--to-official"]])
def test_convert_to_a_type_too_narrow_for_the_weights_writes_nothing(tmp_path, capsys, extra):
    """float16 holds magnitudes up to 65504: a weight of 1e5 would be written as infinity, and
    the file then refused by every load. One line, and no file."""
    model = create_model("nerd_rain_s", dim=8)
    with torch.no_grad():
        model.fusion[0].mix_x.bias.fill_(1e5)
    source = save_model(model, tmp_path / "wide.safetensors")
    out = tmp_path / "new" / ("narrow.pth" if extra else "narrow.safetensors")
    assert main(["convert", str(source), str(out), "--dtype", "float16", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {out}: ")
    assert "up to 1e+05 do not fit in float16 (at most 65504)" in err
    assert not out.parent.exists()  # nor the folder made for it
    assert main(["convert", str(source), str(out), "--dtype", "bfloat16", *extra]) == 0  # whose range is float32's
    assert load_model(out).fusion[0].mix_x.bias.min() == torch.tensor(1e5).bfloat16().float()


def test_convert_reads_its_input_once(tmp_path, monkeypatch):
    """An authors' fp16 .pth -> ours: one read of the input gives both the weights and their type."""
    from nerdrain import checkpoint, load_model

    torch.manual_seed(0)
    model = create_model("nerd_rain_s", dim=8, depths=(1, 1, 1), inr_hidden=(16,))
    official = checkpoint.export_official(model, tmp_path / "authors.pth", dtype=torch.float16)
    reads = []
    real_read = checkpoint._read_tensors
    monkeypatch.setattr(checkpoint, "_read_tensors", lambda path: reads.append(path) or real_read(path))
    assert main(["convert", str(official), str(tmp_path / "ours.safetensors")]) == 0
    assert reads == [official]
    monkeypatch.undo()
    assert checkpoint.stored_dtype(tmp_path / "ours.safetensors") == torch.float16
    back = load_model(tmp_path / "ours.safetensors")
    for key, value in model.state_dict().items():  # the fp16 rounding of each weight, nothing more
        assert torch.equal(back.state_dict()[key], value.half().float()), key


def test_convert_refuses_a_pth_name_for_our_format(tmp_path, tiny_weights, capsys):
    assert main(["convert", str(tiny_weights), str(tmp_path / "ours.pth")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ours.pth" in err and "--to-official" in err
    assert not (tmp_path / "ours.pth").exists()


@pytest.mark.parametrize("flags", [["--dtype", "float16"], ["--to-official"]])
def test_convert_never_overwrites_its_input(tmp_path, tiny_weights, capsys, flags):
    """Output spelled as the input, or a link to it: refused, the input's bytes unchanged."""
    import shutil

    weights = Path(shutil.copy(tiny_weights, tmp_path / "w.safetensors"))
    (tmp_path / "link.safetensors").symlink_to(weights)
    original = weights.read_bytes()
    for output in (weights, tmp_path / "." / "w.safetensors", tmp_path / "link.safetensors"):
        assert main(["convert", str(weights), str(output), *flags]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(output) in err and "is the input file" in err
    assert weights.read_bytes() == original


def test_demo_writes_comparison(tmp_path, tiny_weights, capsys):
    assert main(["demo", "-o", str(tmp_path / "demo"), "--weights", str(tiny_weights), "--device", "cpu"]) == 0
    assert (tmp_path / "demo" / "comparison.png").is_file()
    assert "derained: PSNR" in capsys.readouterr().out


def test_models_lists_variants(capsys):
    assert main(["models"]) == 0
    assert "nerd_rain_s" in capsys.readouterr().out


def test_python_dash_m_runs_the_cli():
    """``python -m nerdrain`` is the CLI (the device scripts run it from a source tree)."""
    import subprocess
    import sys

    import nerdrain

    done = subprocess.run([sys.executable, "-m", "nerdrain", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and nerdrain.__version__ in done.stdout + done.stderr


def clean_folder(folder, names=("a.png", "b.png", "c.png")):
    folder.mkdir()
    for i, name in enumerate(names):
        write_image(folder / name, 10 + i)
    return folder


@pytest.mark.parametrize("options, problem", [(["--seed", "-1"], "--seed"), (["--size", "0"], "--size"),
                                              (["--size", "101"], "--size) 101x101 is 10,201 pixels, more than the limit of 10,000"),
                                              (["--count", "0"], "--count")])
def test_synth_bad_option_is_one_line_error_before_any_output(tmp_path, capsys, monkeypatch, options, problem):
    """A crop with more pixels than a photo may have is refused (with the default limit, --size 100000
    would end in a MemoryError after the folders were made)."""
    monkeypatch.setenv("NERDRAIN_MAX_PIXELS", "10000")  # 100x100
    clean = clean_folder(tmp_path / "clean")
    assert main(["synth", str(clean), str(tmp_path / "out"), *options]) == 2
    err = capsys.readouterr().err
    assert problem in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_synth_output_that_is_not_a_folder_is_refused_before_any_output(tmp_path, capsys):
    clean = clean_folder(tmp_path / "clean")
    (tmp_path / "afile").write_bytes(b"keep me")
    assert main(["synth", str(clean), str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err
    assert "afile" in err and "not a folder" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "afile").read_bytes() == b"keep me"
    out = tmp_path / "out"
    (out / "target" / "b.png").mkdir(parents=True)  # in the way of the second pair
    assert main(["synth", str(clean), str(out)]) == 2
    err = capsys.readouterr().err
    assert "b.png: exists and is not a file" in err and len(err.strip().splitlines()) == 1
    assert not (out / "input").exists() and [p.name for p in (out / "target").iterdir()] == ["b.png"]


def test_synth_size_at_the_pixel_limit_is_accepted(tmp_path, monkeypatch):
    monkeypatch.setenv("NERDRAIN_MAX_PIXELS", "10000")
    clean = clean_folder(tmp_path / "clean", ["a.png"])  # 40x56: upscaled to cover the crop
    assert main(["synth", str(clean), str(tmp_path / "out"), "--size", "100"]) == 0
    with Image.open(tmp_path / "out" / "input" / "a.png") as img:
        assert img.size == (100, 100)


def test_synth_folder_with_one_bad_photo_goes_on_and_exits_1(tmp_path, capsys):
    clean = clean_folder(tmp_path / "clean", ["a.png", "c.png", "d.png"])
    (clean / "b_corrupt.png").write_bytes((clean / "a.png").read_bytes()[:200])
    out = tmp_path / "out"
    assert main(["synth", str(clean), str(out)]) == 1
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith(f"error: {clean / 'b_corrupt.png'}: truncated image file")
    assert "wrote 3 pairs" in captured.out and "1 photo failed" in captured.out
    for sub in ("input", "target"):
        assert sorted(p.name for p in (out / sub).iterdir()) == ["a.png", "c.png", "d.png"]


def test_synth_rerun_is_refused_with_how_to_continue_and_resume_makes_only_the_missing_pairs(tmp_path, capsys):
    clean = clean_folder(tmp_path / "clean")
    out = tmp_path / "out"
    assert main(["synth", str(clean), str(out), "--seed", "5"]) == 0
    (out / "input" / "b.png").unlink()  # half a pair, as a killed run may leave it
    kept = (out / "input" / "a.png").stat().st_ino  # a rewrite (atomic: a new file) changes it
    capsys.readouterr()
    assert main(["synth", str(clean), str(out), "--seed", "5"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--resume" in err and "--overwrite" in err
    assert main(["synth", str(clean), str(out), "--seed", "5", "--resume"]) == 0
    assert "wrote 1 pair to" in capsys.readouterr().out
    assert (out / "input" / "b.png").is_file() and (out / "input" / "a.png").stat().st_ino == kept
    with pytest.raises(SystemExit) as stop:  # argparse: the two options exclude each other
        main(["synth", str(clean), str(out), "--resume", "--overwrite"])
    assert stop.value.code == 2


def test_synth_help_documents_resume(capsys):
    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    assert "--resume" in capsys.readouterr().out


def test_demo_output_that_is_a_file_is_refused(tmp_path, tiny_weights, capsys):
    (tmp_path / "afile").write_bytes(b"keep me")
    assert main(["demo", "-o", str(tmp_path / "afile"), "--weights", str(tiny_weights), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'afile'}: exists and is not a folder\n"
    assert (tmp_path / "afile").read_bytes() == b"keep me"


def test_demo_output_name_taken_by_a_folder_is_refused_before_any_output(tmp_path, tiny_weights, capsys):
    out = tmp_path / "d2"
    (out / "comparison.png").mkdir(parents=True)
    assert main(["demo", "-o", str(out), "--weights", str(tiny_weights), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {out / 'comparison.png'}: exists and is not a file\n"
    assert [p.name for p in out.iterdir()] == ["comparison.png"] and not any((out / "comparison.png").iterdir())


def test_evaluate_report_path_that_cannot_be_written_fails_before_scoring(tmp_path, capsys, monkeypatch):
    from nerdrain import evaluate

    for folder in ("pred", "gt"):
        (tmp_path / folder).mkdir()
        write_image(tmp_path / folder / "0.png", 0)
    (tmp_path / "scores.json").mkdir()  # a folder where the report should go
    monkeypatch.setattr(evaluate, "evaluate_folders", lambda *a, **k: pytest.fail("scored before the check"))
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"),
                 "--json", str(tmp_path / "scores.json"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "scores.json" in err and "\n" not in err


@pytest.mark.parametrize("flags, lines", [
    (["--compile"], ["--compile applies on CPU and CUDA, not mps; running without it"]),
    (["--cuda-graphs"], ["--cuda-graphs applies on CUDA only, not mps; running without it"]),
])
def test_fast_path_flags_on_other_devices_name_the_flag_given(flags, lines, monkeypatch):
    """On MPS (faked here: this machine has none) neither path runs; the warning names what was asked."""
    import argparse
    import warnings

    import nerdrain.checkpoint
    import nerdrain.devices
    from nerdrain.cli import _model

    monkeypatch.setattr(nerdrain.devices, "resolve_device", lambda spec: torch.device("mps"))
    monkeypatch.setattr(nerdrain.checkpoint, "load_default_model", lambda device: torch.nn.Identity())
    args = argparse.Namespace(weights=None, device="mps", half=False, compile="--compile" in flags,
                              cuda_graphs="--cuda-graphs" in flags)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _model(args)
    assert [str(w.message) for w in caught] == lines


@pytest.mark.parametrize("csv_name", ["scores.txt", "./sub/../scores.txt"])
def test_evaluate_refuses_one_file_for_json_and_csv(tmp_path, capsys, monkeypatch, csv_name):
    """The CSV would silently replace the JSON (or the other way round): one of the two reports lost."""
    from nerdrain import evaluate

    for folder in ("pred", "gt"):
        (tmp_path / folder).mkdir()
        write_image(tmp_path / folder / "0.png", 0)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(evaluate, "evaluate_folders", lambda *a, **k: pytest.fail("scored before the check"))
    assert main(["evaluate", "--pred", "pred", "--gt", "gt", "--json", str(tmp_path / "scores.txt"),
                 "--csv", csv_name, "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--json and --csv" in err and "scores.txt" in err
    assert not (tmp_path / "scores.txt").exists()


def test_evaluate_with_an_unreadable_file_names_it_and_keeps_the_other_scores(tmp_path, capsys):
    """Exit 2 and no mean, but the images that were scored are written to --csv / --json, not lost."""
    pred, gt = prediction_folders(tmp_path, 3, 30, 40)
    (pred / "1.png").write_bytes(b"not a png")
    out_json, out_csv = tmp_path / "s.json", tmp_path / "s.csv"
    assert main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--json", str(out_json), "--csv", str(out_csv),
                 "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{pred / '1.png'}: cannot read the image" in err and "no mean" in err
    expected = {f"{i}": score(np.asarray(Image.open(pred / f"{i}.png")), np.asarray(Image.open(gt / f"{i}.png")),
                              "rain200") for i in (0, 2)}
    rows = out_csv.read_text().splitlines()
    assert rows[0] == "name,psnr,ssim" and len(rows) == 3
    assert {name: (float(p), float(s)) for name, p, s in (r.split(",") for r in rows[1:])} == expected
    report = json.loads(out_json.read_text())
    assert report["mean"] == {"psnr": None, "ssim": None} and report["count"] == 2
    assert {s["name"]: (s["psnr"], s["ssim"]) for s in report["images"]} == expected
    assert len(report["failed"]) == 1 and str(pred / "1.png") in report["failed"][0]


def test_evaluate_saved_predictions_against_a_dataset_of_another_layout(tmp_path, tiny_weights, capsys):
    """--save names predictions after the rainy files (rain-N); --pred with --data finds their clean images
    (norain-N), where --pred with --gt matches nothing."""
    data = tmp_path / "data"
    data.mkdir()
    for i in (1, 2):
        write_image(data / f"rain-{i}.png", 50 + i)
        write_image(data / f"norain-{i}.png", 60 + i)
    run = ["evaluate", "--data", str(data), "--weights", str(tiny_weights), "--device", "cpu", "-q"]
    assert main([*run, "--save", str(tmp_path / "pred"), "--json", str(tmp_path / "run.json")]) == 0
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--data", str(data), "--layout", "prenet",
                 "--json", str(tmp_path / "saved.json"), "-q"]) == 0
    saved = json.loads((tmp_path / "saved.json").read_text())
    expected = [score(np.asarray(Image.open(tmp_path / "pred" / f"rain-{i}.png")),
                      np.asarray(Image.open(data / f"norain-{i}.png")), "rain200") for i in (1, 2)]
    assert [(s["name"], s["psnr"], s["ssim"]) for s in saved["images"]] == [
        (f"rain-{i}", *e) for i, e in zip((1, 2), expected)]
    assert saved == json.loads((tmp_path / "run.json").read_text())
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--data", str(data), "--gt", str(data), "-q"]) == 2
    assert "either --gt DIR or --data DIR" in capsys.readouterr().err
    assert main(["evaluate", "--gt", str(data), "-q"]) == 2


def test_derain_format_that_contradicts_the_output_files_suffix_is_refused(tmp_path, tiny_weights, capsys):
    """-o out.jpg --format webp: which one was meant cannot be known; it wrote a JPEG, ignoring --format."""
    write_image(tmp_path / "s.png", 0)
    code = main(["derain", str(tmp_path / "s.png"), "-o", str(tmp_path / "out.jpg"), "--format", "webp",
                 "--weights", str(tiny_weights), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: output {tmp_path / 'out.jpg'}: its suffix asks for JPEG but the format given "
                                 "is webp; leave the format out (a single output's suffix chooses its format)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.png"]
    # the same format both ways is no contradiction; into a folder --format chooses
    for output, fmt, written in [("same.jpeg", "jpg", "same.jpeg"), ("dir/", "webp", "dir/s.webp")]:
        assert main(["derain", str(tmp_path / "s.png"), "-o", str(tmp_path / output), "--format", fmt,
                     "--weights", str(tiny_weights), "--tile", "0", "-q"]) == 0
        with Image.open(tmp_path / written) as img:
            assert img.format == {"jpg": "JPEG", "webp": "WEBP"}[fmt]


def test_derain_skip_existing_runs_only_the_missing_photos_and_says_how_many_it_skipped(tmp_path, tiny_weights,
                                                                                       capsys):
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(3):
        write_image(src / f"{i}.png", i)
    out = tmp_path / "out"
    command = ["derain", str(src), "-o", str(out), "--weights", str(tiny_weights), "--tile", "0", "-q"]
    assert main(command) == 0
    (out / "1.png").unlink()  # the photo a Ctrl-C stopped
    (out / "0.png").write_bytes(b"kept as it is")
    capsys.readouterr()
    assert main([*command, "--skip-existing"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["note: 2 of 3 photos skipped: their outputs exist", "1 derained, 0 failed, 2 skipped"]
    assert (out / "0.png").read_bytes() == b"kept as it is" and (out / "1.png").is_file()
    assert main([*command, "--skip-existing"]) == 0  # all done: a success, not 'nothing derained'
    assert capsys.readouterr().err.strip().splitlines()[-1] == "0 derained, 0 failed, 3 skipped"


@pytest.mark.parametrize("flags, problem", [
    (["--quality", "0", "--format", "jpg"], "quality 0: must be 1 to 100"),
    (["--quality", "80"], ("quality 80: only JPEG and WebP outputs have one, and these are PNG; write jpg or webp, "
                           "or leave the quality out"))])
def test_derain_quality_that_means_nothing_is_one_line_error_before_any_output(tmp_path, tiny_weights, capsys, flags,
                                                                              problem):
    write_image(tmp_path / "s.png", 0)
    code = main(["derain", str(tmp_path / "s.png"), "-o", str(tmp_path / "out"), "--weights", str(tiny_weights), "-q",
                 *flags])
    assert code == 2 and capsys.readouterr().err.strip().splitlines() == [f"error: {problem}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.png"]


def test_derain_quality_sets_the_jpeg_quality(tmp_path, tiny_weights):
    """The JPEG's quantization tables are those libjpeg scales for that quality (95 by default)."""
    write_image(tmp_path / "s.png", 0)
    for flags, quality in (([], 95), (["--quality", "30"], 30)):
        out = tmp_path / f"q{quality}.jpg"
        assert main(["derain", str(tmp_path / "s.png"), "-o", str(out), *flags, "--weights", str(tiny_weights),
                     "--tile", "0", "-q"]) == 0
        Image.new("RGB", (8, 8)).save(tmp_path / "reference.jpg", quality=quality, subsampling=0)
        with Image.open(out) as ours, Image.open(tmp_path / "reference.jpg") as reference:
            assert ours.quantization == reference.quantization


def test_derain_help_documents_the_options_for_large_folders(capsys):
    with pytest.raises(SystemExit):
        main(["derain", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--quality N" in out and "1-100" in out and "--skip-existing" in out and "-r, --recursive" in out


def test_derain_recursive_mirrors_subfolders_and_a_rerun_leaves_its_output_folder_alone(tmp_path, tiny_weights,
                                                                                       capsys, monkeypatch):
    """nerd-rain derain -r holiday -o holiday/derained, twice, the second time with --skip-existing."""
    for name in ("holiday/a.png", "holiday/day1/b.png", "holiday/day1/night/c.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        write_image(tmp_path / name, len(name))
    monkeypatch.chdir(tmp_path)
    command = ["derain", "-r", "holiday", "-o", "holiday/derained", "--weights", str(tiny_weights), "--tile", "0",
               "-q"]
    assert main(command) == 0
    assert capsys.readouterr().err.strip().splitlines() == ["3 derained, 0 failed"]
    written = sorted(p.relative_to(tmp_path / "holiday" / "derained").as_posix()
                     for p in (tmp_path / "holiday" / "derained").rglob("*.png"))
    assert written == ["a.png", "day1/b.png", "day1/night/c.png"]
    assert main([*command, "--skip-existing"]) == 0
    assert capsys.readouterr().err.strip().splitlines() == ["note: 3 of 3 photos skipped: their outputs exist",
                                                            "0 derained, 0 failed, 3 skipped"]


@pytest.mark.parametrize("unbuffered", [False, True])
@pytest.mark.parametrize("command", ["models", "evaluate"])
def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path, command, unbuffered):
    """nerd-rain evaluate ... | head -1: once head has its line the rest of the output has nowhere to
    go; the command stops as command-line tools do, with the shell's status for SIGPIPE (141) and no
    'error: [Errno 32] Broken pipe' or traceback, whether the write fails in the command or at exit."""
    import os
    import subprocess
    import sys

    args = ["models"]
    if command == "evaluate":
        for folder in ("pred", "gt"):
            (tmp_path / folder).mkdir()
            for i in range(3):
                write_image(tmp_path / folder / f"{i}.png", i, size=(16, 16))
        args = ["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--per-image", "-q"]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src")
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    child = subprocess.Popen([sys.executable, "-m", "nerdrain", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env)
    child.stdout.close()  # the reader is gone before the first line
    err = child.stderr.read()
    assert child.wait(timeout=60) == 141 and err == b""

"""Evaluation over folders and models, built in tmp_path. The independent truth for a model run is
:func:`nerdrain.metrics.score` of arrays read straight from the files: an identity model must score
exactly what its input scores."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nerdrain.data.pairs import find_pairs
from nerdrain.evaluate import (
    EvalReport,
    ImageScore,
    evaluate_folders,
    evaluate_model,
    evaluate_pairs,
    evaluate_saved,
    format_table,
    scoring_problems,
    write_csv,
    write_json,
)
from nerdrain.metrics import score, to_uint8

NAMES = ("a", "rain-2", "rain-10")  # in natural order, as reports list them


def _image(rng: np.random.Generator, h: int = 40, w: int = 48) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    base = 128 + 60 * np.sin(xx / 7.0)[..., None] * np.cos(yy / 5.0)[..., None]
    return np.clip(np.rint(base + rng.normal(0, 15, (h, w, 3))), 0, 255).astype(np.uint8)


def _save(img: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return path


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """input/NAME.png (rainy = clean + noise) and target/NAME.png."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for name in reversed(NAMES):
        clean = _image(rng)
        rainy = np.clip(clean.astype(np.int16) + rng.integers(-30, 31, clean.shape), 0, 255)
        _save(clean, root / "target" / f"{name}.png")
        _save(rainy.astype(np.uint8), root / "input" / f"{name}.png")
    return root


def _read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _truth(root: Path, protocol: str, restore=lambda x: x) -> list[tuple[str, float, float]]:
    """Scores computed without the evaluate module: files read here, restore applied to floats."""
    out = []
    for name in NAMES:
        rainy = _read(root / "input" / f"{name}.png")
        pred = to_uint8(restore(rainy.astype(np.float32) / np.float32(255)))
        out.append((name, *score(pred, _read(root / "target" / f"{name}.png"), protocol)))
    return out


def _rows(report: EvalReport) -> list[tuple[str, float, float]]:
    return [(s.name, s.psnr, s.ssim) for s in report.images]


# --- evaluate_folders ----------------------------------------------------------------------------


def test_folders_match_by_stem_across_extensions(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    truth = []
    for name in ("x", "y"):
        pred, gt = _image(rng), _image(rng)
        _save(pred, tmp_path / "pred" / f"{name}.png")
        gt_path = _save(gt, tmp_path / "gt" / f"{name}.jpg")
        truth.append((name, *score(pred, _read(gt_path), "rain200")))  # the JPEG as decoded
    report = evaluate_folders(tmp_path / "pred", tmp_path / "gt")
    assert report.protocol == "rain200" and report.count == 2
    assert _rows(report) == truth
    assert report.psnr == pytest.approx(np.mean([t[1] for t in truth]))


def test_folders_identical_images_give_infinite_psnr(tmp_path: Path) -> None:
    img = _image(np.random.default_rng(2))
    _save(img, tmp_path / "pred" / "same.png")
    _save(img, tmp_path / "gt" / "same.png")
    report = evaluate_folders(tmp_path / "pred", tmp_path / "gt", "did_ddn")
    assert report.images[0].psnr == math.inf and report.psnr == math.inf
    assert report.images[0].ssim == pytest.approx(1.0)


def test_folders_unmatched_files_are_named(tmp_path: Path) -> None:
    img = _image(np.random.default_rng(3))
    for name in ("a", "b", "extra_pred"):
        _save(img, tmp_path / "pred" / f"{name}.png")
    for name in ("a", "b", "extra_gt"):
        _save(img, tmp_path / "gt" / f"{name}.png")
    with pytest.raises(ValueError) as err:
        evaluate_folders(tmp_path / "pred", tmp_path / "gt")
    message = str(err.value)
    assert "without ground truth" in message and "extra_pred.png" in message
    assert "without a prediction" in message and "extra_gt.png" in message
    assert "a.png" not in message.replace("extra_", "")


def test_folders_refuse_one_folder_as_both_sides(tmp_path: Path) -> None:
    """Every image scored against itself: an infinite PSNR that says nothing, as if it were a result."""
    _save(_image(np.random.default_rng(3)), tmp_path / "gt" / "a.png")
    (tmp_path / "link").symlink_to(tmp_path / "gt")
    for pred in (tmp_path / "gt", tmp_path / "link", tmp_path / "gt" / ".." / "gt"):
        with pytest.raises(ValueError, match="same folder") as err:
            evaluate_folders(pred, tmp_path / "gt")
        assert str(pred) in str(err.value)


def test_folders_list_at_most_ten_names(tmp_path: Path) -> None:
    img = _image(np.random.default_rng(4), 16, 16)
    _save(img, tmp_path / "gt" / "0.png")
    for i in range(13):
        _save(img, tmp_path / "pred" / f"p{i}.png")
    with pytest.raises(ValueError, match=r"13 prediction\(s\).*p0\.png.*p9\.png and 3 more") as err:
        evaluate_folders(tmp_path / "pred", tmp_path / "gt")
    assert "p10.png" not in str(err.value)


def test_folders_size_mismatch_names_both_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    pred = _save(_image(rng, 40, 48), tmp_path / "pred" / "x.png")
    gt = _save(_image(rng, 40, 50), tmp_path / "gt" / "x.png")
    with pytest.raises(ValueError, match="size mismatch") as err:
        evaluate_folders(tmp_path / "pred", tmp_path / "gt")
    message = str(err.value)
    assert f"{pred} is 48x40" in message and f"{gt} is 50x40" in message


def test_folders_refuse_16_bit_and_bad_arguments(tmp_path: Path) -> None:
    _save(_image(np.random.default_rng(6)), tmp_path / "gt" / "x.png")
    (tmp_path / "pred").mkdir()
    Image.fromarray(np.full((40, 48), 1000, np.uint16)).save(tmp_path / "pred" / "x.png")
    with pytest.raises(ValueError, match="8-bit"):
        evaluate_folders(tmp_path / "pred", tmp_path / "gt")
    with pytest.raises(ValueError, match="unknown protocol"):
        evaluate_folders(tmp_path / "pred", tmp_path / "gt", "rain100")
    with pytest.raises(ValueError, match="not a folder"):
        evaluate_folders(tmp_path / "missing", tmp_path / "gt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        evaluate_folders(tmp_path / "empty", tmp_path / "gt")


def _flat(path: Path, value: int, mode: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (24, 16), value if mode in ("L", "P") else (value,) * len(mode)).save(path)
    return path


def test_grey_files_are_scored_as_the_matlab_scripts_read_them(tmp_path: Path) -> None:
    """imread gives a grey PNG as a 2-D array: the rain200 script scores its own values (no
    rgb2ycbcr, Y would be in 16..235); the did_ddn one's rgb2ycbcr fails on it, so it is refused."""
    _flat(tmp_path / "gt" / "x.png", 110, "L")
    _flat(tmp_path / "pred" / "x.png", 100, "L")
    report = evaluate_folders(tmp_path / "pred", tmp_path / "gt")
    c1 = (0.01 * 255) ** 2  # flat images: SSIM = (2 mu1 mu2 + C1) / (mu1^2 + mu2^2 + C1)
    assert report.psnr == pytest.approx(20 * math.log10(255 / 10), abs=1e-12)
    assert report.ssim == pytest.approx((2 * 100 * 110 + c1) / (100**2 + 110**2 + c1), abs=1e-12)
    _flat(tmp_path / "pred" / "x.png", 100, "RGBA")  # Y = round(16 + 100 * 219 / 255) = 102; alpha dropped
    assert evaluate_folders(tmp_path / "pred", tmp_path / "gt").psnr == pytest.approx(20 * math.log10(255 / 8))
    with pytest.raises(ValueError, match="could not be scored") as err:
        evaluate_folders(tmp_path / "pred", tmp_path / "gt", "did_ddn")
    assert f"{tmp_path / 'gt' / 'x.png'}: a grey image, which the did_ddn protocol cannot score" in str(err.value)


def test_a_model_is_scored_against_grey_ground_truth_as_matlab_reads_it(tmp_path: Path) -> None:
    """The grey rainy file goes to the model as RGB; its RGB prediction's Y (102 for 100) is
    scored against the grey clean file's own values (110)."""
    _flat(tmp_path / "data" / "input" / "x.png", 100, "L")
    _flat(tmp_path / "data" / "target" / "x.png", 110, "L")
    report = evaluate_model(lambda x: x, tmp_path / "data")
    assert report.psnr == pytest.approx(20 * math.log10(255 / 8), abs=1e-12)
    with pytest.raises(ValueError, match="a grey image, which the did_ddn protocol cannot score"):
        evaluate_model(lambda x: x, tmp_path / "data", "did_ddn")


@pytest.mark.parametrize("protocol", ["rain200", "did_ddn"])
def test_pairs_too_small_for_ssim_are_named_before_any_is_run(tmp_path: Path, protocol: str) -> None:
    """SSIM's 11x11 window needs 11 pixels a side (did_ddn subsamples only images of 384 or more,
    to 128 or more): a clean file 10 pixels high cannot be scored, which the training's check at
    its start (scoring_problems) must say, not its first validation hours later; 11 is scored."""
    for name, height in (("low", 10), ("fits", 11)):
        for folder, value in (("input", 100), ("target", 110)):
            path = tmp_path / "data" / folder / f"{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (400, height), (value,) * 3).save(path)
    pairs = sorted(find_pairs(tmp_path / "data"), key=lambda pair: pair.name)
    assert [pair.name for pair in pairs] == ["fits", "low"]
    low_input = tmp_path / "data" / "input" / "low.png"
    message = f"{low_input}: SSIM needs images of at least 11x11 (after subsampling), got 400x10"
    assert scoring_problems(pairs, protocol) == [message]
    with pytest.raises(ValueError, match="could not be scored") as err:
        evaluate_pairs(lambda x: x, pairs, protocol)
    assert err.value.report.failed == [message] and [image.name for image in err.value.report.images] == ["fits"]


def test_palette_files_are_refused_naming_them(tmp_path: Path) -> None:
    """imread gives a palette PNG's colour indices, which the scripts would score as intensities."""
    _flat(tmp_path / "gt" / "x.png", 110, "RGB")
    pred = _flat(tmp_path / "pred" / "x.png", 100, "P")
    with pytest.raises(ValueError, match="could not be scored") as err:
        evaluate_folders(tmp_path / "pred", tmp_path / "gt")
    assert f"{pred}: a palette image (MATLAB's imread gives its colour indices" in str(err.value)


def test_folders_go_on_past_bad_files_and_name_them_all(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    for name in ("1", "2", "3", "4", "5"):
        _save(_image(rng), tmp_path / "gt" / f"{name}.png")
    good = {name: _save(_image(rng), tmp_path / "pred" / f"{name}.png") for name in ("1", "4")}
    (tmp_path / "pred" / "2.png").write_bytes(b"not a png")  # unreadable
    _save(_image(rng, 40, 40), tmp_path / "pred" / "3.png")  # wrong size
    _save(_image(rng)[:8], tmp_path / "gt" / "5.png")  # too small for SSIM (both sides)
    _save(_image(rng)[:8], tmp_path / "pred" / "5.png")
    with pytest.raises(ValueError, match=r"^3 of 5 image\(s\) could not be scored") as err:
        evaluate_folders(tmp_path / "pred", tmp_path / "gt")
    message = str(err.value)
    assert "\n" not in message
    for bad in ("2.png: cannot read", "3.png is 40x40", "5.png: SSIM needs images of at least 11x11"):
        assert bad in message
    assert "1.png" not in message and "4.png" not in message
    report = err.value.report  # the others' scores are kept (the CLI still writes them), with no mean
    assert _rows(report) == [(name, *score(_read(path), _read(tmp_path / "gt" / f"{name}.png"), "rain200"))
                             for name, path in good.items()]
    assert len(report.failed) == 3 and "2.png: cannot read" in report.failed[0]
    assert math.isnan(report.psnr) and math.isnan(report.ssim)


def test_model_goes_on_past_an_unreadable_input_and_saves_the_others(dataset: Path, tmp_path: Path) -> None:
    (dataset / "input" / "rain-2.png").write_bytes(b"not a png")
    out = tmp_path / "preds"
    with pytest.raises(ValueError, match=r"^1 of 3 image\(s\).*input/rain-2\.png: cannot read the image"):
        evaluate_model(lambda x: x, dataset, save_dir=out)
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "rain-10.png"]  # the one after it too
    assert np.array_equal(_read(out / "rain-10.png"), _read(dataset / "input" / "rain-10.png"))


# --- evaluate_saved ------------------------------------------------------------------------------


def _did_and_ddn(tmp_path: Path) -> dict[str, tuple[Path, dict[str, np.ndarray]]]:
    """A DID folder (rainy | clean side by side) and a DDN one (two rainy versions of one clean
    image), each with the clean image every pair is scored against, cut here with numpy."""
    rng = np.random.default_rng(11)
    did, ddn = tmp_path / "did", tmp_path / "ddn"
    did_clean = {}
    for name in ("7", "12"):
        rainy, clean = _image(rng, 24, 24), _image(rng, 24, 24)  # DID's files are twice as wide as tall
        _save(np.concatenate([rainy, clean], axis=1), did / f"{name}.png")
        did_clean[name] = _read(did / f"{name}.png")[:, 24:]
    clean = _image(rng, 24, 30)
    _save(clean, ddn / "ground_truth" / "3.png")
    for k in (1, 2):
        _save(_image(rng, 24, 30), ddn / "rainy_image" / f"3_{k}.png")
    return {"did": (did, did_clean), "ddn": (ddn, {"3_1": clean, "3_2": clean})}


@pytest.mark.parametrize("layout", ["did", "ddn"])
def test_saved_predictions_of_every_layout_score_against_the_datasets_clean_images(tmp_path: Path,
                                                                                 layout: str) -> None:
    """--pred with --gt cannot score DID (the ground truth is half of a file) nor DDN (named N, not N_K)."""
    root, clean = _did_and_ddn(tmp_path)[layout]
    rng = np.random.default_rng(12)
    preds = {name: _save(_image(rng, *image.shape[:2]), tmp_path / "preds" / f"{name}.png")
             for name, image in clean.items()}
    report = evaluate_saved(tmp_path / "preds", root, "did_ddn")
    assert report.protocol == "did_ddn" and not report.failed
    assert _rows(report) == [(name, *score(_read(preds[name]), clean[name], "did_ddn"))
                             for name in sorted(clean, key=int if layout == "did" else None)]


def test_saved_predictions_missing_or_extra_are_named(tmp_path: Path) -> None:
    root, _ = _did_and_ddn(tmp_path)["ddn"]
    img = _image(np.random.default_rng(13), 24, 30)
    for name in ("3_1", "3_9"):
        _save(img, tmp_path / "preds" / f"{name}.png")
    with pytest.raises(ValueError) as err:
        evaluate_saved(tmp_path / "preds", root)
    message = str(err.value)
    assert "3_9.png" in message and "without a pair" in message
    assert "3_2" in message and "without a prediction" in message and "3_1" not in message


def test_saved_predictions_in_the_clean_folder_are_refused(dataset: Path) -> None:
    """The clean images scored against themselves: an infinite PSNR that says nothing."""
    with pytest.raises(ValueError, match="holds the clean images"):
        evaluate_saved(dataset / "target", dataset)
    assert evaluate_saved(dataset / "input", dataset).count == len(NAMES)  # the rainy inputs' own score


def test_saved_prediction_of_another_size_names_the_file_and_the_half(tmp_path: Path) -> None:
    root, _ = _did_and_ddn(tmp_path)["did"]
    rng = np.random.default_rng(14)
    _save(_image(rng, 24, 24), tmp_path / "preds" / "7.png")
    _save(_image(rng, 24, 48), tmp_path / "preds" / "12.png")  # the whole side-by-side file's size
    with pytest.raises(ValueError) as err:
        evaluate_saved(tmp_path / "preds", root)
    assert f"prediction {tmp_path / 'preds' / '12.png'} is 48x24" in str(err.value)
    assert f"ground truth {root / '12.png'} (right half) is 24x24" in str(err.value)
    assert _rows(err.value.report)[0][0] == "7"


# --- evaluate_model ------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["rain200", "did_ddn"])
def test_model_identity_scores_the_input(dataset: Path, protocol: str) -> None:
    report = evaluate_model(lambda x: x, dataset, protocol)
    assert report.protocol == protocol
    assert _rows(report) == _truth(dataset, protocol)


def test_model_saves_pngs_that_round_trip(dataset: Path, tmp_path: Path) -> None:
    def restore(x: torch.Tensor) -> torch.Tensor:
        return (x * 0.8 + 0.13).clamp(0, 1)  # not identity: the saved bytes must be the scored ones

    out = tmp_path / "out" / "preds"
    report = evaluate_model(restore, dataset, save_dir=out)
    assert _rows(report) == _truth(dataset, "rain200", lambda a: np.clip(a * np.float32(0.8) + np.float32(0.13), 0, 1))
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.png" for n in NAMES)  # no temp files
    with Image.open(out / "a.png") as saved:
        assert saved.mode == "RGB" and saved.size == (48, 40)
    again = evaluate_folders(out, dataset / "target")
    assert _rows(again) == _rows(report)


def test_model_refuses_to_save_over_the_dataset(dataset: Path) -> None:
    with pytest.raises(ValueError, match="save_dir"):
        evaluate_model(lambda x: x, dataset, save_dir=dataset / "target")


class _Scale(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = torch.nn.Parameter(torch.ones(()))
        self.calls: list[tuple[tuple[int, ...], bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((tuple(x.shape), self.training))
        return x * self.gain


def test_model_module_eval_mode_and_tiling(dataset: Path) -> None:
    model = _Scale()
    whole = evaluate_model(model, dataset)
    assert model.training  # flag restored
    assert set(model.calls) == {((1, 3, 40, 48), False)}
    model.calls.clear()
    tiled = evaluate_model(model, dataset, tile=16, overlap=4)
    assert _rows(tiled) == _rows(whole) == _truth(dataset, "rain200")
    assert model.calls and all(shape[2:] == (16, 16) and not training for shape, training in model.calls)


def test_model_bad_output_names_the_image(dataset: Path) -> None:
    with pytest.raises(ValueError, match="a: restore returned"):
        evaluate_model(lambda x: x[..., :-1], dataset)
    with pytest.raises(ValueError, match="tile"):
        evaluate_model(lambda x: x, dataset, tile=-1)


def test_model_integer_or_nan_output_is_refused_naming_the_image(dataset: Path) -> None:
    # 0..255 integers are not the [0, 1] floats restore must return: scoring them clipped is wrong.
    with pytest.raises(ValueError, match=r"a: restore returned torch\.uint8"):
        evaluate_model(lambda x: (x * 255).round().to(torch.uint8), dataset)
    with pytest.raises(ValueError, match="a: restore's output: image contains NaN"):
        evaluate_model(lambda x: x * math.nan, dataset)


def test_unknown_device_is_one_value_error(dataset: Path) -> None:
    for run in (lambda: evaluate_model(lambda x: x, dataset, device="bogus"),
                lambda: evaluate_pairs(lambda x: x, find_pairs(dataset), device="bogus")):
        with pytest.raises(ValueError, match="unknown device 'bogus'"):
            run()


def test_unwritable_save_dir_fails_before_the_model_runs(dataset: Path, tmp_path: Path) -> None:
    calls = []

    def restore(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape)
        return x

    (tmp_path / "out" / "rain-10.png").mkdir(parents=True)  # the last image's output name
    (tmp_path / "afile").write_text("x")
    for save_dir, problem in ((tmp_path / "out", "rain-10.png: exists and is not a file"),
                              (tmp_path / "afile", "afile: exists and is not a folder")):
        with pytest.raises(ValueError, match=problem):
            evaluate_model(restore, dataset, save_dir=save_dir)
    assert not calls


def test_evaluate_pairs_does_not_warn(dataset: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = evaluate_pairs(lambda x: x, find_pairs(dataset))
    assert report.count == len(NAMES)


def test_rain12_identity(data_dir: Path) -> None:
    report = evaluate_model(lambda x: x, data_dir / "rain12")
    assert report.count == 12
    assert report.psnr == pytest.approx(30.130, abs=0.0015)
    assert report.ssim == pytest.approx(0.8552, abs=0.00015)


def test_rain12_on_the_released_windows(data_dir: Path) -> None:
    """The model sees only 256x256 windows; a pointwise one scores as on whole images."""
    model = _Scale()
    report = evaluate_model(model, data_dir / "rain12", released_windows=True)
    assert {shape for shape, _ in model.calls} == {(4, 3, 256, 256)}  # 4 windows of 481 x 321, a batch
    assert _rows(report) == _rows(evaluate_model(lambda x: x, data_dir / "rain12"))


def test_released_windows_refuse_small_images_naming_them_and_a_tile(dataset: Path) -> None:
    with pytest.raises(ValueError, match=r"input[/\\]a\.png: the released test script's 256x256 windows need"):
        evaluate_model(lambda x: x, dataset, released_windows=True)
    with pytest.raises(ValueError, match="give no tile"):
        evaluate_model(lambda x: x, dataset, released_windows=True, tile=64)


# --- output --------------------------------------------------------------------------------------


def _report() -> EvalReport:
    return EvalReport("rain200", [ImageScore("rain-1", 31.25, 0.91), ImageScore("rain-2", math.inf, 1.0)])


def _strict_json(text: str) -> dict:
    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_write_json_schema_and_infinity(tmp_path: Path) -> None:
    data = _strict_json(write_json(_report(), tmp_path / "r.json").read_text())
    assert data == {
        "protocol": "rain200",
        "mean": {"psnr": None, "ssim": pytest.approx(0.955)},
        "count": 2,
        "images": [{"name": "rain-1", "psnr": 31.25, "ssim": 0.91},
                   {"name": "rain-2", "psnr": None, "ssim": 1.0}],
        "failed": [],
    }
    finite = EvalReport("did_ddn", [ImageScore("x", 30.123456789012345, 0.5)])
    data = _strict_json(write_json(finite, tmp_path / "f.json").read_text())
    assert data["mean"] == {"psnr": 30.123456789012345, "ssim": 0.5}  # full precision


def test_write_csv(tmp_path: Path) -> None:
    with write_csv(_report(), tmp_path / "r.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["name", "psnr", "ssim"], ["rain-1", "31.25", "0.91"], ["rain-2", "inf", "1.0"]]
    assert float(rows[2][1]) == math.inf


@pytest.mark.parametrize("write", [write_json, write_csv])
def test_report_path_that_is_a_folder_or_below_a_file_is_one_line(tmp_path: Path, write) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a file"):
        write(_report(), tmp_path)
    with pytest.raises(ValueError, match="afile: exists and is not a folder"):
        write(_report(), tmp_path / "afile" / "r.out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing left behind


def test_write_json_takes_numpy_floats_as_write_csv_does(tmp_path: Path) -> None:
    report = EvalReport("rain200", [ImageScore("x", np.float32(30.5), np.float32(0.75))])
    data = _strict_json(write_json(report, tmp_path / "r.json").read_text())
    assert data["images"] == [{"name": "x", "psnr": 30.5, "ssim": 0.75}]  # both exact in float32
    with write_csv(report, tmp_path / "r.csv").open(newline="") as f:
        assert list(csv.reader(f))[1] == ["x", "30.5", "0.75"]


def test_format_table() -> None:
    lines = format_table(_report()).splitlines()
    assert lines[0].split() == ["protocol", "images", "PSNR", "(dB)", "SSIM"]
    assert lines[1].split() == ["rain200", "2", "inf", "0.9550"]
    report = EvalReport("rain200", [ImageScore("rain-1", 31.25, 0.91), ImageScore("rain-10", 29.0, 0.8)])
    table = format_table(report, per_image=True).splitlines()
    assert table[1].split() == ["rain-1", "31.250", "0.9100"]
    assert table[2].split() == ["rain-10", "29.000", "0.8000"]
    assert len({len(line) for line in table[:3]}) == 1  # aligned
    assert table[-1].split() == ["rain200", "2", "30.125", "0.8550"]
    report.failed.append("rain-3.png: cannot read the image")
    assert format_table(report).splitlines()[1].split() == ["rain200", "2", "of", "3", "nan", "nan"]

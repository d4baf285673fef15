"""The shipped default weights load without downloads and really derain."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch

from nerdrain import checkpoint, clear_default_model_cache, derain, load_default_model
from nerdrain.checkpoint import default_weights_path
from nerdrain.data.synth import RainSynthesizer
from nerdrain.metrics import psnr


def test_default_weights_ship_within_size_limit_and_load():
    assert default_weights_path().stat().st_size <= 25 * 2**20
    model = load_default_model("cpu")
    assert model.cfg.dim == 32 and not model.training


def test_default_weights_remove_synthetic_rain():
    clean = skimage.data.chelsea()[40:232, 120:376]  # 192 x 256, a photo no training set contains
    rainy = RainSynthesizer("light").render(clean.astype(np.float32) / 255, np.random.default_rng(7))
    rainy = np.floor(rainy * 255 + 0.5).astype(np.uint8)
    derained = derain(rainy, load_default_model("cpu"), tile=0)
    assert psnr(derained, clean) > psnr(rainy, clean) + 2.0


@pytest.fixture
def weight_reads(monkeypatch):
    """The paths the checkpoint reader opens, in order."""
    reads = []
    read = checkpoint._read_tensors
    monkeypatch.setattr(checkpoint, "_read_tensors", lambda path: reads.append(path) or read(path))
    return reads


PHOTO = np.random.default_rng(3).integers(0, 256, (24, 40, 3), dtype=np.uint8)


def test_derain_reads_the_default_weights_once_per_device(no_cached_default, weight_reads):
    """A notebook deraining photo after photo with derain(photo) paid a read and build of the
    network (about 0.4 s) at every call."""
    first = derain(PHOTO, device="cpu", tile=0)
    second = derain(PHOTO, device=torch.device("cpu"), tile=0)
    assert len(weight_reads) == 1
    assert np.array_equal(second, first)
    assert np.array_equal(first, derain(PHOTO, load_default_model("cpu"), tile=0))  # a fresh load agrees
    clear_default_model_cache()
    derain(PHOTO, device="cpu", tile=0)
    assert len(weight_reads) == 3  # the fresh load above, then the read after clearing


def test_a_changed_default_model_leaves_derain_alone(no_cached_default):
    """load_default_model gives every caller a model of its own: zeroing one, or putting it in
    training mode, changes nothing that derain(photo) gives afterwards."""
    before = derain(PHOTO, device="cpu", tile=0)
    mine = load_default_model("cpu")
    with torch.no_grad():
        for p in mine.parameters():
            p.zero_()
    mine.train()
    assert np.array_equal(derain(PHOTO, device="cpu", tile=0), before)
    assert not any(p.abs().sum() for p in mine.parameters())  # and derain left the caller's copy alone


def test_threads_share_one_loaded_default_model(no_cached_default, weight_reads):
    start = threading.Barrier(3)

    def run(_):
        start.wait()
        return derain(PHOTO, device="cpu", tile=0)

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(run, range(3)))
    assert len(weight_reads) == 1
    assert all(np.array_equal(r, results[0]) for r in results)


def test_bad_arguments_are_refused_before_the_default_model_is_loaded(no_cached_default, weight_reads, monkeypatch):
    """A wrong tiling value or a file name given as the image fails at once, in one line, without
    reading the weights (or taking GPU memory for them); a path points to derain_files."""
    from nerdrain import inference

    tile_choices = []  # the device's tile is chosen from a batch size already checked
    monkeypatch.setattr(inference, "default_tile_for_device", lambda dev, batch_size: tile_choices.append(batch_size))
    for kwargs, error in [({"tile": -1}, ValueError), ({"batch_size": "4"}, TypeError), ({"overlap": -1}, ValueError)]:
        with pytest.raises(error, match=next(iter(kwargs))):
            derain(PHOTO, device="cpu", **kwargs)
    for path in ("rain.jpg", Path("rain.jpg")):
        with pytest.raises(TypeError, match="not (str|PosixPath|WindowsPath).*derain_files"):
            derain(path, device="cpu")
    assert weight_reads == [] and tile_choices == []

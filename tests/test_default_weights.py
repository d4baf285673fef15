"""The shipped default weights load without downloads and really derain."""

from __future__ import annotations

import numpy as np
import skimage.data

from nerdrain import derain, load_default_model
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

"""Shared test fixtures. Data under ../shared (beside the checkout) is optional: tests skip without it.

``NERDRAIN_SHARED`` points at another copy of that folder (the device machine gets only the checkout,
so a GPU run carries the golden files inside it).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(os.environ.get("NERDRAIN_SHARED", Path(__file__).resolve().parents[2] / "shared"))
GOLDEN = SHARED / "golden"
DATA = SHARED / "data"

torch.set_num_threads(min(2, torch.get_num_threads()))


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (it lives in ../shared beside the checkout)")
    return path


@pytest.fixture
def no_cached_default():
    """No default model kept by derain before the test, nor the test's own (a stand-in) after it."""
    from nerdrain import clear_default_model_cache

    clear_default_model_cache()
    yield
    clear_default_model_cache()


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return require(GOLDEN)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return require(DATA)


def assert_all_outputs_match_golden(model, golden_io, channels_last: bool = False, device: str = "cpu") -> None:
    """All seven outputs of both golden cases within 1e-4, in either memory layout, on ``device``."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device, memory_format=layout).eval()
    for case in ("case0", "case1"):
        x = golden_io[f"{case}.input"].to(device).contiguous(memory_format=layout)
        with torch.no_grad():
            outputs = model.forward_all(x).official_order()
        if channels_last:
            assert outputs[0].is_contiguous(memory_format=torch.channels_last)  # the layout is kept
        for index, output in enumerate(outputs):
            torch.testing.assert_close(output.cpu(), golden_io[f"{case}.output{index}"], atol=1e-4, rtol=0,
                                       msg=f"{case} output{index}")

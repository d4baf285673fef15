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


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return require(GOLDEN)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return require(DATA)

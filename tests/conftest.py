"""Shared test fixtures. Data under ../shared (beside the checkout) is optional: tests skip without it.

``NERDRAIN_SHARED`` points at another copy of that folder (the device machine gets only the checkout,
so a GPU run carries the golden files inside it).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from nerdrain.torch_compat import autocast_enabled

SHARED = Path(os.environ.get("NERDRAIN_SHARED", Path(__file__).resolve().parents[2] / "shared"))
GOLDEN = SHARED / "golden"
DATA = SHARED / "data"

torch.set_num_threads(min(2, torch.get_num_threads()))


# Set by pytest for each test, and by torch the first time it needs its compiler's cache
_SET_BY_THE_TOOLS = {"PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR"}


def _process_state() -> dict:
    """What a test may change for the whole process (torch's threads and backend switches, the
    folder, the environment, the handlers of the stop signals): a test that leaves any of it
    changed makes later tests depend on the order they run in."""
    return {
        "torch threads": torch.get_num_threads(),
        "grad mode": torch.is_grad_enabled(),
        "default dtype": torch.get_default_dtype(),
        "autocast on cpu": autocast_enabled("cpu"),
        "fp32 matmul precision": torch.get_float32_matmul_precision(),
        "cudnn.benchmark": torch.backends.cudnn.benchmark,
        "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "mkldnn.enabled": torch.backends.mkldnn.enabled,
        "deterministic algorithms": torch.are_deterministic_algorithms_enabled(),
        "working folder": os.getcwd(),
        "environment": {key: value for key, value in os.environ.items() if key not in _SET_BY_THE_TOOLS},
        "handlers": {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)},
    }


def _left_as_found(before: dict, who: str):
    after = _process_state()
    changed = {key: (before[key], after[key]) for key in before if after[key] != before[key]}
    if "environment" in changed:
        old, new = changed["environment"]
        changed["environment"] = {key: (old.get(key), new.get(key)) for key in old.keys() | new.keys()
                                  if old.get(key) != new.get(key)}
    assert not changed, f"{who} left changed for the tests after it (before, after): {changed}"


@pytest.fixture(autouse=True)
def process_state_is_left_as_found():
    before = _process_state()
    yield
    _left_as_found(before, "this test")


@pytest.fixture(autouse=True, scope="module")
def process_state_is_left_as_found_by_the_module():
    """The same for the module's own fixtures (set up once, before the first test that uses them)."""
    before = _process_state()
    yield
    _left_as_found(before, "this test module (or a fixture of its own)")


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


@pytest.fixture
def exact_timestamps(monkeypatch):
    """Files the test has just written count as settled, as on a filesystem whose timestamps tell
    every write apart: their check results are recorded (see nerdrain.data.checked), a model read
    from one is kept (nerdrain.inference)."""
    from nerdrain import files
    monkeypatch.setattr(files, "TIMESTAMP_GRANULE_NS", 0)

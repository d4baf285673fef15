"""What ``pip`` builds: the source distribution is the whole project, the wheel carries what the
package reads at run time, and the build itself raises no deprecation that would stop it later."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Built as pip builds from a checkout: the sdist first, then the wheel from the unpacked sdist. A
# SetuptoolsDeprecationWarning is an error here: each names a date after which the build fails.
_BUILD = """
import sys, warnings
from setuptools import build_meta
from setuptools.warnings import SetuptoolsDeprecationWarning
warnings.simplefilter("error", SetuptoolsDeprecationWarning)
build = build_meta.build_sdist if sys.argv[1] == "sdist" else build_meta.build_wheel
print(build(sys.argv[2]))
"""


def _tracked_files() -> list[str]:
    """The project as committed, less the checkout's own dotfiles (.gitignore, .ci)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return sorted(name for name in listing.decode().split("\0") if name and not name.startswith("."))


def _build(kind: str, source: Path, out: Path) -> Path:
    pytest.importorskip("setuptools", minversion="77")
    done = subprocess.run([sys.executable, "-c", _BUILD, kind, str(out)], cwd=source, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, object]:
    tracked = _tracked_files()
    work = tmp_path_factory.mktemp("build")
    checkout = work / "checkout"  # the tracked files only: nothing a local build or run left behind
    for name in tracked:
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, checkout / name)
    sdist = _build("sdist", checkout, work / "dist")
    with tarfile.open(sdist) as archive:
        archive.extractall(work / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        sdist_files = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    wheel = _build("wheel", work / "unpacked" / sdist.name.removesuffix(".tar.gz"), work / "dist")
    with zipfile.ZipFile(wheel) as archive:
        wheel_files = set(archive.namelist())
    return {"tracked": tracked, "sdist": sdist_files, "wheel": wheel_files}


def test_sdist_holds_the_whole_project(built):
    """Tests with their conftest, the configs the README and tests name, benchmarks, tools, docs."""
    missing = [name for name in built["tracked"] if name not in built["sdist"]]
    assert not missing, f"tracked files left out of the sdist: {missing}"


def test_wheel_holds_the_package_and_its_data(built):
    """Every module, the shipped default weights and their model card; no tests or tooling."""
    package = {name.removeprefix("src/") for name in built["tracked"] if name.startswith("src/nerdrain/")}
    assert any(name.endswith(".safetensors") for name in package) and any(name.endswith(".md") for name in package)
    missing = sorted(package - built["wheel"])
    assert not missing, f"package files left out of the wheel: {missing}"
    outside = sorted(name for name in built["wheel"]
                     if not name.startswith(("nerdrain/", "nerdrain-")) or "__pycache__" in name)
    assert not outside, f"the wheel holds files outside the package: {outside}"

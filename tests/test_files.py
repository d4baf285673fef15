"""atomic_write: a file appears whole under its name, or not at all."""

from __future__ import annotations

import os

import pytest

from nerdrain.files import atomic_write


def test_contents_appear_only_when_the_block_ends(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with atomic_write(path) as f:
        f.write(b"new")
        assert path.read_bytes() == b"old"  # readers still see the previous file
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError, ValueError])
def test_an_interrupt_or_error_leaves_the_previous_file_and_no_temporary_one(tmp_path, error):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(error):
        with atomic_write(path) as f:
            f.write(b"half of it")
            raise error()
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_usual_permissions_not_private(tmp_path):
    mask = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "out.bin") as f:
            f.write(b"x")
    finally:
        os.umask(mask)
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o644


def test_a_failed_rename_names_the_destination_and_removes_the_temporary_file(tmp_path):
    dest = tmp_path / "out.png"
    dest.mkdir()  # a folder where the file should go: the final rename fails
    with pytest.raises(IsADirectoryError) as info:
        with atomic_write(dest) as f:
            f.write(b"data")
    assert info.value.filename == str(dest) and ".tmp" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"] and not any(dest.iterdir())


def test_a_missing_folder_names_the_destination(tmp_path):
    dest = tmp_path / "missing" / "out.bin"
    with pytest.raises(FileNotFoundError) as info:
        with atomic_write(dest):
            pass
    assert info.value.filename == str(dest)

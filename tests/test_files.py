"""atomic_write: a file appears whole under its name, or not at all; what a killed writer left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nerdrain.files import atomic_write, remove_stale_temporaries


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


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_what_a_killed_writer_left_is_found_and_removed_and_nothing_else(tmp_path):
    """SIGKILL runs no clean-up: the temporary file stays. A resumed run removes exactly those of
    the names it writes, never the files themselves nor other hidden files."""
    code = ("import sys, time\nfrom nerdrain.files import atomic_write\n"
            "with atomic_write(sys.argv[1]) as f:\n    f.write(b'half'); f.flush(); print('writing', flush=True); "
            "time.sleep(60)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "a.png")], stdout=subprocess.PIPE, env=env)
    assert child.stdout.readline() == b"writing\n"
    child.send_signal(signal.SIGKILL)
    child.wait()
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".a.png.") and left[0].endswith(".tmp")

    kept = ["a.png", "b.png", ".b.png.0123abcd.tmp", ".a.png.notours.tmp", ".a.png.0123ABCD.tmp"]
    for name in kept:
        (tmp_path / name).write_bytes(b"keep")
    assert remove_stale_temporaries(tmp_path, ["a.png"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    assert remove_stale_temporaries(tmp_path / "missing", ["a.png"]) == 0


@pytest.mark.skipif(os.name != "posix", reason="a 255-byte name limit (ext4, APFS, tmpfs)")
def test_a_name_that_fits_the_file_system_is_written_though_its_temporary_name_would_not(tmp_path):
    """The temporary name adds a dot, a token and '.tmp' to the file's: a 250-byte name fits the
    file system's 255 bytes, so the file is written (and a killed writer's leftover still found)."""
    name = "é" * 122 + "xy.png"  # 250 bytes in UTF-8
    assert len(os.fsencode(name)) == 250
    with atomic_write(tmp_path / name) as f:
        f.write(b"data")
    assert [p.name for p in tmp_path.iterdir()] == [name] and (tmp_path / name).read_bytes() == b"data"

    with pytest.raises(KeyboardInterrupt):  # what the temporary file was called: a leftover of a kill
        with atomic_write(tmp_path / name) as f:
            left = next(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp"))
            raise KeyboardInterrupt
    assert len(os.fsencode(left)) <= 255
    left = _with_writer(left, _dead_pid())  # as a killed process left it
    (tmp_path / left).write_bytes(b"half")
    assert remove_stale_temporaries(tmp_path, [name]) == 1
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_name_problem_counts_bytes_against_the_file_systems_limit(tmp_path):
    from nerdrain.files import name_problem

    assert name_problem(tmp_path / ("x" * 251 + ".png")) is None
    assert name_problem(tmp_path / "missing" / "folder" / ("x" * 251 + ".png")) is None
    assert name_problem(tmp_path / ("é" * 126 + ".png")) == "name too long for the file system (256 bytes, at most 255)"


# files.py alone (standard library only), not the package with torch: a child that starts in a blink
_WRITES_UNTIL_TOLD = ("import importlib.util, sys\n"
                      "spec = importlib.util.spec_from_file_location('files', sys.argv[2])\n"
                      "files = importlib.util.module_from_spec(spec); spec.loader.exec_module(files)\n"
                      "with files.atomic_write(sys.argv[1]) as f:\n"
                      "    f.write(b'whole'); f.flush(); print('writing', flush=True); sys.stdin.readline()\n")


def _dead_pid() -> int:
    """The process id of a child that has ended and been reaped: no process has it now (until the
    system hands the number out again, long after a test)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _with_writer(temporary: str, pid: int, host: str | None = None) -> str:
    """``temporary`` (a name atomic_write gave) as written by process ``pid`` (of machine ``host``)."""
    stem, writer, token, suffix = temporary.rsplit(".", 3)
    return f"{stem}.{host or writer.split('-')[0]}-{pid}.{token}.{suffix}"


@pytest.mark.skipif(os.name != "posix", reason="process ids looked up with kill(pid, 0)")
def test_another_live_runs_temporary_is_kept_and_its_file_arrives_whole(tmp_path):
    """Two runs writing the same output into one folder: the second one's clean-up, while the first
    is still writing, must leave the first one's temporary file, which then becomes the output."""
    files_py = Path(__file__).resolve().parents[1] / "src" / "nerdrain" / "files.py"
    writer = subprocess.Popen([sys.executable, "-c", _WRITES_UNTIL_TOLD, str(tmp_path / "a.png"), str(files_py)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert writer.stdout.readline() == b"writing\n"
        (temporary,) = [p.name for p in tmp_path.iterdir()]
        assert str(writer.pid) in temporary
        assert remove_stale_temporaries(tmp_path, ["a.png"]) == 0
        assert [p.name for p in tmp_path.iterdir()] == [temporary]
        writer.communicate(b"done\n", timeout=60)
    finally:
        writer.kill()
        writer.wait()
    assert writer.returncode == 0
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"] and (tmp_path / "a.png").read_bytes() == b"whole"


@pytest.mark.skipif(os.name != "posix", reason="process ids looked up with kill(pid, 0)")
def test_only_a_dead_writer_on_this_machine_counts_as_gone(tmp_path):
    """A temporary named after a live process (a sleeping child) stays, one after a process that
    has ended goes; one written from another machine (a shared network folder) stays, whatever its
    process id says here."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with pytest.raises(KeyboardInterrupt):  # a temporary file of our own, to read the name's form
            with atomic_write(tmp_path / "a.png"):
                ours = next(p.name for p in tmp_path.iterdir())
                raise KeyboardInterrupt
        stem, writer, token, suffix = ours.rsplit(".", 3)
        host, pid = writer.split("-")
        assert (stem, pid, suffix) == (".a.png", str(os.getpid()), "tmp") and len(host) == len(token) == 8
        dead = _dead_pid()
        names = {"live": _with_writer(ours, sleeper.pid), "dead": _with_writer(ours, dead),
                 "other host": _with_writer(ours, dead, host=f"{int(host, 16) ^ 1:08x}")}
        for name in names.values():
            (tmp_path / name).write_bytes(b"half")
        assert remove_stale_temporaries(tmp_path, ["a.png"]) == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names["live"], names["other host"]])
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_temporary_of_an_earlier_version_goes_only_once_untouched_for_an_hour(tmp_path):
    """Names without the writer (an earlier version's) cannot tell a live writer from a killed one:
    a file modified recently may be being written; one untouched for over an hour is left over."""
    import time

    fresh, old = tmp_path / ".a.png.0123abcd.tmp", tmp_path / ".a.png.89abcdef.tmp"
    fresh.write_bytes(b"being written")
    old.write_bytes(b"left by a kill")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    assert remove_stale_temporaries(tmp_path, ["a.png"]) == 1
    assert [p.name for p in tmp_path.iterdir()] == [fresh.name]


def test_without_posix_calls_the_helpers_answer_as_windows_needs(tmp_path, monkeypatch):
    """Windows has no pathconf, and its os.kill(pid, 0) would end the process rather than look it
    up; its st_ctime is the creation time: a name limit of 255, "cannot be told", the mtime."""
    from nerdrain import files

    monkeypatch.delattr(os, "pathconf")
    assert files.name_max(tmp_path) == 255

    def kill(pid, sig):
        raise AssertionError(f"os.kill({pid}, {sig}) would end process {pid} on Windows")

    monkeypatch.setattr(os, "kill", kill)
    monkeypatch.setattr(os, "name", "nt")
    assert files._process_gone(os.getpid()) is None
    st = os.stat_result((0o100644, 0, 0, 1, 0, 0, 5, 1, 2, 3, 1, 2, 3, 1_000, 2_000, 3_000))  # a, m, c times
    assert files.last_change_ns(st) == 2_000

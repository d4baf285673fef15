"""Writing files so that a crash, a kill or a full disk never leaves half of one under its name."""

from __future__ import annotations

import os
import re
import secrets
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


_TOKEN_BYTES = 4  # of the random part of a temporary file's name
_DEFAULT_NAME_MAX = 255  # bytes in a name: ext4, XFS, APFS, NTFS (in UTF-16 units), tmpfs
_TEMPORARY_EXTRA = len(f"..{'0' * 2 * _TOKEN_BYTES}.tmp")  # what a temporary name adds to the file's


def name_max(folder: str | Path) -> int:
    """The longest name, in bytes, the file system of ``folder`` (or of the nearest folder above
    it that exists) allows."""
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if os.path.isdir(p)), Path("."))
    try:
        return int(os.pathconf(existing, "PC_NAME_MAX"))
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows), or no answer
        return _DEFAULT_NAME_MAX


def name_problem(path: str | Path) -> str | None:
    """Why ``path``'s name could not be created, found without creating it: more bytes than its
    file system allows (a long photo name with a suffix added, say). None where it fits."""
    path = Path(path)
    size, limit = len(os.fsencode(path.name)), name_max(path.parent)
    return f"name too long for the file system ({size} bytes, at most {limit})" if size > limit else None


def _temporary_stem(name: str, limit: int) -> str:
    """``name``, shortened where needed so that the temporary name built on it stays within
    ``limit`` bytes: a name that fits its file system is written, however little room it leaves."""
    while len(os.fsencode(name)) > limit - _TEMPORARY_EXTRA:
        name = name[:-1]
    return name


def one_line(text: str) -> str:
    """A file name may hold line breaks; a report stays one line per file (escaped as ``\\n``)."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _naming(err: OSError, path: Path) -> OSError:
    """The same error about ``path``: the hidden temporary name would mean nothing to the user."""
    return OSError(err.errno, err.strerror, os.fspath(path))


@contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file whose contents appear under ``path`` only when the block ends without error.

    It is written as a hidden temporary file beside ``path``, flushed to disk, then renamed over
    it: until then readers see the previous file (or none), and on any exception, Ctrl-C included,
    the temporary file is removed. Created with ``open(..., "xb")``, so it gets the usual
    permissions (0666 less the umask), unlike ``mkstemp``'s 0600. Where the temporary file cannot
    be created or renamed (``path`` is a folder, say), the ``OSError`` names ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{_temporary_stem(path.name, name_max(path.parent))}.{secrets.token_hex(_TOKEN_BYTES)}.tmp")
    try:
        f = open(tmp, "xb")
    except OSError as err:
        raise _naming(err, path) from None
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        try:
            os.replace(tmp, path)
        except OSError as err:
            raise _naming(err, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder: str | Path, names: Iterable[str]) -> int:
    """Remove the temporary files that :func:`atomic_write` left in ``folder`` for files named
    ``names`` when its process was killed outright (SIGKILL, power loss: no clean-up could run);
    how many went. Another process writing one of them at that moment fails to rename it: for a
    caller that knows none is (a resumed run), or whose outputs would replace that one's anyway (derain)."""
    folder = Path(folder)
    stems = {_temporary_stem(name, name_max(folder)) for name in names}
    pattern = re.compile(rf"\.(.+)\.[0-9a-f]{{{2 * _TOKEN_BYTES}}}\.tmp")
    removed = 0
    if folder.is_dir():
        for entry in os.scandir(folder):
            match = pattern.fullmatch(entry.name)
            if match and match.group(1) in stems and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed += 1
    return removed


def check_output_folder(folder: str | Path, names: Iterable[str] = ()) -> None:
    """Fail in one line naming the path, before anything is written, where files could not be
    written into ``folder``: it, or the nearest folder above it that exists, is a file, or one of
    ``names`` in it exists and is not a file (a folder, say)."""
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        problem = "exists and is not a folder" if existing == folder else f"{existing} is not a folder"
        raise ValueError(f"{folder}: {problem}")
    for name in names:
        path = folder / name
        if path.exists() and not path.is_file():
            raise ValueError(f"{path}: exists and is not a file")


def missing_folders(folder: str | Path) -> list[Path]:
    """The folders that making ``folder`` would create, outermost first."""
    folder = Path(folder)
    return [p for p in (folder, *folder.parents) if not os.path.lexists(p)][::-1]


def remove_empty_folders(folders: Iterable[Path]) -> None:
    """Remove those of ``folders`` (outermost first, as :func:`missing_folders` lists them) that
    are empty, innermost first: a run that made its output folder and wrote nothing there (every
    photo failed, Ctrl-C) leaves none behind, as if it held results."""
    for folder in reversed(list(folders)):
        try:
            os.rmdir(folder)
        except OSError:  # something is in it, or it is gone already
            pass


def write_problem(folder: str | Path) -> str | None:
    """Why files cannot be written in ``folder`` (made where missing), found by making one there
    and removing it: a permission check alone passes the superuser, and read-only mounts or
    network file systems that refuse root only say so when asked to write. None where they can."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        return f"cannot write in {folder} ({err.strerror or err})"
    return None


def output_file(path: str | Path) -> Path:
    """``path``, its folder made, after checking a file can be written there: one line naming
    the path where it is a folder or below a file."""
    path = Path(path)
    check_output_folder(path.parent, [path.name])
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether writing ``a`` would replace ``b``: the same file through links or another
    spelling of the path, or, where one does not exist yet, the same resolved name."""
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))

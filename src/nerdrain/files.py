"""Writing files so that a crash, a kill or a full disk never leaves half of one under its name."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import socket
import tempfile
import time
import unicodedata
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


_TOKEN_BYTES = 4  # of the random part of a temporary file's name
_HOST_DIGITS = 8  # hex digits naming the writer's machine in a temporary file's name
_PID_DIGITS = 10  # at most, of the writer's process id (32 bits)
_DEFAULT_NAME_MAX = 255  # bytes in a name: ext4, XFS, APFS, NTFS (in UTF-16 units), tmpfs
# What a temporary name adds to the file's: ".NAME.HOST-PID.TOKEN.tmp"
_TEMPORARY_EXTRA = len(f"..{'0' * _HOST_DIGITS}-{'9' * _PID_DIGITS}.{'0' * 2 * _TOKEN_BYTES}.tmp")
_TEMPORARY = re.compile(
    rf"\.(.+)\.([0-9a-f]{{{_HOST_DIGITS}}})-([0-9]{{1,{_PID_DIGITS}}})\.[0-9a-f]{{{2 * _TOKEN_BYTES}}}\.tmp")
# Before the writer was named (".NAME.TOKEN.tmp"), and how long one must lie untouched to count as
# a killed writer's: a writer modifies its file as it encodes, then renames it within seconds.
_UNNAMED_TEMPORARY_EXTRA = len(f"..{'0' * 2 * _TOKEN_BYTES}.tmp")
_UNNAMED_TEMPORARY = re.compile(rf"\.(.+)\.[0-9a-f]{{{2 * _TOKEN_BYTES}}}\.tmp")
STALE_AFTER_S = 3600
# Coarsest timestamps in use (FAT's 2 s mtime): a file changed later than this before it was read may
# be rewritten after it with its size and times unchanged (git's "racily clean" files; Linux's own
# timestamps move by the clock tick, not the nanosecond).
TIMESTAMP_GRANULE_NS = 2 * 10**9


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


def name_key(name: str) -> str:
    """``name`` as macOS and Windows file systems compare names, ignoring letter case (and on macOS
    how an accent is stored, NFC or NFD): two names with one key are one file there."""
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", name).casefold())


def _temporary_stem(name: str, limit: int, extra: int = _TEMPORARY_EXTRA) -> str:
    """``name``, shortened where needed so that the temporary name built on it stays within
    ``limit`` bytes: a name that fits its file system is written, however little room it leaves."""
    while len(os.fsencode(name)) > limit - extra:
        name = name[:-1]
    return name


def _host_id() -> str:
    """The machine whose process ids a temporary file's name gives: its name, as a folder shared
    over the network is written from several, and on Linux its pid namespace, as containers on one
    machine number their processes apart."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except (OSError, AttributeError):
        namespace = ""
    identity = f"{socket.gethostname()}\0{namespace}".encode(errors="surrogateescape")
    return hashlib.sha256(identity).hexdigest()[:_HOST_DIGITS]


def _process_gone(pid: int) -> bool | None:
    """Whether no process ``pid`` runs here (a zombie still counts as running); None where that
    cannot be told (on Windows, ``os.kill`` would end it)."""
    if os.name != "posix":
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # another user's (EPERM), or no such pid at all
        return False
    return False


def last_change_ns(st: os.stat_result) -> int:
    """When the file's bytes last changed: the change time, which, unlike an mtime (set into the
    future by an archive, say), no program sets; Windows has only the mtime."""
    return st.st_mtime_ns if os.name == "nt" else st.st_ctime_ns


def racily_clean(st: os.stat_result, read_ns: int) -> bool:
    """Whether the file ``st`` describes changed so near ``read_ns`` (when it was read) that a
    rewrite after that could leave its size and times as they are: what was read cannot be
    known, by a later stat, to be what the file still holds."""
    return last_change_ns(st) > read_ns - TIMESTAMP_GRANULE_NS


def broken_link(path: str | Path) -> str | None:
    """What is wrong with ``path`` where it is a link that leads to no file (its target gone, an
    unplugged drive, a loop): "broken link to TARGET (why)". None where it is no link, or leads
    somewhere."""
    try:
        target = os.readlink(path)
    except (OSError, ValueError):  # no link (or a NUL in the name)
        return None
    try:
        os.stat(path)
    except OSError as err:
        return f"broken link to {target} ({err.strerror or err})"
    return None


def one_line(text: str) -> str:
    """A file name may hold line breaks, or bytes that are no UTF-8 (an old camera card's Latin-1),
    which Python holds as surrogates and would print as ``\\udce9``: a report stays one line per
    file, naming it with what it holds (escaped as ``\\n``, ``\\xe9``)."""
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no byte became (a Windows name): left to the stream
        pass
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _naming(err: OSError, path: Path) -> OSError:
    """The same error about ``path``: the hidden temporary name would mean nothing to the user."""
    return OSError(err.errno, err.strerror, os.fspath(path))


@contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file whose contents appear under ``path`` only when the block ends without error.

    It is written as a hidden temporary file beside ``path`` (named after it and its writer: see
    :func:`remove_stale_temporaries`), flushed to disk, then renamed over
    it: until then readers see the previous file (or none), and on any exception, Ctrl-C included,
    the temporary file is removed. Created with ``open(..., "xb")``, so it gets the usual
    permissions (0666 less the umask), unlike ``mkstemp``'s 0600. Where the temporary file cannot
    be created or renamed (``path`` is a folder, say), the ``OSError`` names ``path``.
    """
    path = Path(path)
    stem = _temporary_stem(path.name, name_max(path.parent))
    tmp = path.with_name(f".{stem}.{_host_id()}-{os.getpid()}.{secrets.token_hex(_TOKEN_BYTES)}.tmp")
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
    how many went.

    Only a dead writer's go: the name gives the writer's machine and process id, so a file that
    another process still writes (a second run writing the same outputs) is kept, and so is one
    written from another machine (a shared network folder), whose processes cannot be seen from
    here. Where a process cannot be looked up (Windows), and for names without the writer (from
    earlier versions), only a file untouched for :data:`STALE_AFTER_S` seconds counts as left."""
    folder = Path(folder)
    names, limit = list(names), name_max(folder)
    stems = {_temporary_stem(name, limit) for name in names}
    unnamed_stems = {_temporary_stem(name, limit, _UNNAMED_TEMPORARY_EXTRA) for name in names}
    here = _host_id()
    removed = 0
    if folder.is_dir():
        for entry in os.scandir(folder):
            if not entry.is_file(follow_symlinks=False):
                continue
            if (match := _TEMPORARY.fullmatch(entry.name)) and match.group(1) in stems:
                gone = _process_gone(int(match.group(3))) if match.group(2) == here else False
            elif (match := _UNNAMED_TEMPORARY.fullmatch(entry.name)) and match.group(1) in unnamed_stems:
                gone = None
            else:
                continue
            try:
                if gone is None:
                    gone = time.time() - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S
                if gone:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:  # renamed into place by its writer meanwhile
                pass
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

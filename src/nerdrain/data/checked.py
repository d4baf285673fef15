"""What the training start's data check found good, recorded in the run folder, so that a resumed
or restarted run reads again only the files changed since: SPA-Data's 1.3 million files take
minutes to check, and seconds to list and stat.

A result is keyed by what was checked (a file, a validation pair and its protocol), the checker's
:data:`VERSION`, the image readers' pixel limit (``NERDRAIN_MAX_PIXELS``), and each file's path,
size, modification and change time (``st_ctime_ns``, which no program can set back: new bytes with
the size and mtime put back still count as a change; on Windows it is the creation time, so size
and mtime alone count there). The
keys are 64-bit hashes, kept as sorted arrays beside each file's two results (an image's width
and height): 24 bytes a file where Python objects would take hundreds. Each process writes its own record (``rank-N.npz``) and reads them all, so a resume
with another number of processes, whose shares differ, still finds every file's result.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import time
import zipfile
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import PIL
from tqdm.auto import tqdm

from ..files import atomic_write, racily_clean, remove_stale_temporaries
from ..imageio import resolve_max_pixels

__all__ = ["CHECKED_FILES", "VERSION", "CheckedFiles"]

CHECKED_FILES = "checked-files"  # the folder of the records in a run folder


def _release() -> str:
    try:
        return importlib.metadata.version("nerdrain")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _rules_version(rule_files: Sequence[Path]) -> int:
    """A hash of the code that decides what passes and of the Pillow that decodes: any change to a
    rule (a depth refused, a size too small to score) voids earlier records by itself, where a
    number raised by hand is forgotten by the change that needed it. At worst an edit elsewhere
    in these modules costs one full check."""
    digest = hashlib.blake2b(PIL.__version__.encode(), digest_size=7)
    for path in rule_files:
        try:
            digest.update(path.read_bytes())
        except OSError:  # installed without its sources (compiled files only): the release stands for them
            digest.update(f"nerdrain {_release()}".encode())
            break
    return int.from_bytes(digest.digest(), "little")


# the modules of the check's rules: file_problems, image_size and check_pair_sizes, the validation's
# _load_scorable with load_pair, check_scorable and check_ssim_size, the depths of imageio
_PACKAGE = Path(__file__).resolve().parent.parent
_RULE_FILES = tuple(_PACKAGE / name for name in ("data/checked.py", "data/datasets.py", "data/pairs.py",
                                                  "imageio.py", "evaluate.py", "metrics.py"))
VERSION = _rules_version(_RULE_FILES)  # earlier results count only under the same rules
_RECORD = re.compile(r"rank-(\d+)\.npz")
_UNREADABLE_RECORD = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)

Item = TypeVar("Item", bound=Hashable)
Size = tuple[int, int]


def _key(what: str, item: object, files: Sequence[Path], max_pixels: int, now_ns: int) -> int | None:
    """The hash of ``item`` checked as ``what`` under the pixel limit ``max_pixels`` with ``files``
    as they are now; None where one cannot be stat'ed (the check then says why) or changed too near
    ``now_ns`` to be told from a rewrite after the check (it is then checked, its result not recorded)."""
    parts: list[object] = [VERSION, max_pixels, what, repr(item)]
    for path in files:
        try:
            st = os.stat(path)
        except OSError:
            return None
        if racily_clean(st, now_ns):  # a rewrite after the check could keep its size and times
            return None
        parts += [os.fspath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    return int.from_bytes(hashlib.blake2b(json.dumps(parts).encode(), digest_size=8).digest(), "little")


def _read_record(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(keys, results) of a record file, None where it is not one this version wrote (broken,
    foreign, older): its files are then checked again rather than the run stopped."""
    try:
        with np.load(path, allow_pickle=False) as record:
            version, keys, results = record["version"], record["keys"], record["results"]
    except _UNREADABLE_RECORD:
        return None
    if (version.shape != () or version != VERSION or keys.dtype != np.uint64 or keys.ndim != 1
            or results.dtype != np.int64 or results.shape != (len(keys), 2)):
        return None
    return keys, results


class CheckedFiles:
    """The check's results recorded in ``folder`` (None: none, and nothing recorded) by earlier
    starts, and those of this one, which :meth:`save` records as process ``rank``'s."""

    def __init__(self, folder: Path | None = None, rank: int = 0):
        self.folder, self.rank = folder, rank
        records = [_read_record(path) for path in self._records()]
        records = [record for record in records if record is not None]
        keys = np.concatenate([k for k, _ in records]) if records else np.zeros(0, np.uint64)
        results = np.concatenate([r for _, r in records]) if records else np.zeros((0, 2), np.int64)
        order = np.argsort(keys, kind="stable")
        self._keys, self._results = keys[order], results[order]
        self._passed: dict[int, Size] = {}
        self.unchanged = self.files = 0  # files this start let pass unread for the record, files in all

    def _records(self) -> list[Path]:
        if self.folder is None or not self.folder.is_dir():
            return []
        return [self.folder / entry.name for entry in os.scandir(self.folder) if _RECORD.fullmatch(entry.name)]

    def _recorded(self, keys: Sequence[int | None]) -> list[Size | None]:
        wanted = np.array([0 if key is None else key for key in keys], np.uint64)
        at = np.minimum(np.searchsorted(self._keys, wanted), max(len(self._keys) - 1, 0))
        found = (self._keys[at] == wanted) if len(self._keys) else np.zeros(len(keys), bool)
        return [tuple(map(int, self._results[i])) if hit and key is not None else None
                for key, i, hit in zip(keys, at, found)]

    def check(self, what: str, items: Sequence[Item], files: Callable[[Item], Sequence[Path]],
              check: Callable[[Item], Size], progress: bool = False) -> tuple[dict[Item, Size], list[str]]:
        """``check`` each item whose ``files`` changed since the recorded check (``check`` gives two
        ints to keep, an image's (width, height), or raises ValueError naming a bad file); the
        others' results come from the record: (each good item's result, the errors)."""
        max_pixels = resolve_max_pixels(None)  # a file passed under a larger limit is checked again
        now_ns = time.time_ns()
        item_files = [files(item) for item in items]
        # stat'ed before reading: a change meanwhile counts
        keys = [_key(what, item, paths, max_pixels, now_ns) for item, paths in zip(items, item_files)]
        recorded = self._recorded(keys)
        self.files += sum(map(len, item_files))
        self.unchanged += sum(len(paths) for paths, result in zip(item_files, recorded) if result is not None)
        results: dict[Item, Size] = {}
        problems = []
        for item, key, result in tqdm(list(zip(items, keys, recorded)), desc=f"check {what}",
                                      disable=not progress, leave=False):
            if result is None:
                try:
                    result = check(item)
                except ValueError as err:
                    problems.append(str(err))
                    continue
            results[item] = result
            if key is not None:
                self._passed[key] = result
        return results, problems

    @property
    def passed(self) -> int:
        """How many items passed this start's check (read or recorded), to be recorded by :meth:`save`."""
        return len(self._passed)

    def save(self, world_size: int) -> None:
        """Record this start's good results as process ``rank``'s; process 0 also removes those of
        ranks a larger run had (their files are in this run's shares, recorded again)."""
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"rank-{self.rank}.npz"
        remove_stale_temporaries(self.folder, [name])  # of a killed start; no other process writes this name
        with atomic_write(self.folder / name) as f:
            np.savez(f, version=np.array(VERSION), keys=np.fromiter(self._passed, np.uint64, len(self._passed)),
                     results=np.array(list(self._passed.values()), np.int64).reshape(-1, 2))
        if self.rank == 0:
            for path in self._records():
                if int(_RECORD.fullmatch(path.name).group(1)) >= world_size:
                    path.unlink(missing_ok=True)

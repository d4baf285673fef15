"""Training pairs as a deterministic stream: sample number -> (rainy patch, clean patch).

Every random choice for sample ``n`` (which source, the crop, the rain, the flips) comes from a
generator seeded by ``(seed, n)``, and which image from the source's shuffled order for epoch
``n // len(source)`` (seeded by the seed, the source and the epoch). Resuming at iteration ``i``
therefore only needs ``i``; worker count and process count do not change what sample ``n`` is;
and synthetic rain never runs out, since each sample number renders fresh rain.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..config import DataConfig
from ..imageio import DATASET_EXTENSIONS, read_photo
from .augment import AugmentConfig, augment_pair, reflect_pad_to
from .checked import CheckedFiles
from .pairs import check_pair_sizes, find_pairs, image_size, load_pair, read_training
from .synth import RainMixer


_INTEGER_PEAKS = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    """CHW float32 in [0, 1] of an HxWx3 image: 8- or 16-bit integers over their peak, floats as they are."""
    peak = _INTEGER_PEAKS.get(img.dtype)
    array = img.astype(np.float32) / np.float32(peak) if peak else img.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


class DecodedImages:
    """Decoded images that one data-loading process keeps for reuse, up to ``max_bytes``.

    Every worker fills its own. Past the budget an image is decoded again at each use, as the
    released code does for every sample: a set of any size (SPA-Data's 638k pairs would take
    250 GB) trains in bounded memory, and a small one is decoded once.
    """

    def __init__(self, max_bytes: int = DataConfig.cache_mb * 2**20):
        self.max_bytes = max_bytes
        self.used = 0
        self._arrays: dict[Hashable, tuple[np.ndarray, ...]] = {}

    def get(self, key: Hashable, decode: Callable[[], tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
        arrays = self._arrays.get(key)
        if arrays is None:
            arrays = decode()
            size = sum(a.nbytes for a in arrays)
            if self.used + size <= self.max_bytes:
                self._arrays[key] = arrays
                self.used += size
        return arrays


class PairedSource:
    """Real (rainy, clean) pairs from any layout :func:`find_pairs` knows, kept as 8- or 16-bit
    pixels (:func:`read_training`: one or two bytes a value, not float32's four) and converted per
    sample."""

    def __init__(self, root: str | Path, layout: str | None = None, cache: DecodedImages | None = None):
        self.pairs = find_pairs(root, layout)
        self.cache = DecodedImages() if cache is None else cache

    def __len__(self) -> int:
        return len(self.pairs)

    def sample(self, index: int, rng: np.random.Generator, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self.pairs[index]
        rainy, clean = self.cache.get(("pair", pair.input, pair.target, pair.crop), lambda: load_pair(pair, read_training))
        return _to_tensor(rainy), _to_tensor(clean)


def _clean_photo(path: Path) -> tuple[np.ndarray]:
    """8-bit photos as uint8 (exactly: ``k / 255`` in float32 rounds back to ``k``), others as float32."""
    photo = read_photo(path)
    if photo.bit_depth == 8:
        return (np.rint(photo.rgb * 255).astype(np.uint8),)
    return (photo.rgb,)


class SyntheticSource:
    """Clean photos with rain rendered on the fly onto a patch-sized crop."""

    def __init__(self, root: str | Path, presets: Sequence[str] = ("light", "heavy"),
                 streak_dir: str | Path | None = None, cache: DecodedImages | None = None):
        root = Path(root)
        self.paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in DATASET_EXTENSIONS and p.is_file()
                            and not any(part.startswith(".") for part in p.relative_to(root).parts))
        if not self.paths:
            raise ValueError(f"{root}: no clean images found for rain synthesis")
        self.mixer = RainMixer(tuple(presets), streak_dir=streak_dir)
        if streak_dir is not None:  # a bad streak image stops training now, not hours in
            self.mixer.synths[0].check_streaks()
        self.cache = DecodedImages() if cache is None else cache

    def __len__(self) -> int:
        return len(self.paths)

    def sample(self, index: int, rng: np.random.Generator, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.paths[index]
        (photo,) = self.cache.get(("photo", path), lambda: _clean_photo(path))
        h, w = photo.shape[:2]
        padded_h, padded_w = max(h, patch_size), max(w, patch_size)  # as reflect_pad_to makes it
        top = int(rng.integers(0, padded_h - patch_size + 1))
        left = int(rng.integers(0, padded_w - patch_size + 1))
        if (padded_h, padded_w) == (h, w):  # only the crop converted to float
            clean = _to_tensor(photo[top:top + patch_size, left:left + patch_size])
        else:
            clean = reflect_pad_to(_to_tensor(photo), patch_size, patch_size)
            clean = clean[:, top:top + patch_size, left:left + patch_size].contiguous()
        rainy = self.mixer.render(clean.permute(1, 2, 0).numpy(), rng)
        return _to_tensor(rainy), clean


def file_problems(sources: Sequence[PairedSource | SyntheticSource], rank: int = 0, world: int = 1,
                  progress: bool = False, checked: CheckedFiles | None = None) -> list[str]:
    """``"file: why"`` for each file of ``sources`` that would stop training when drawn (unreadable,
    a pair's file of 32 bits a value, or a pair of two sizes), found without decoding PNGs
    (:func:`image_size`); this process's share of them: every ``world``-th pair and photo from ``rank``.
    Files ``checked`` records as good and unchanged since are not read again."""
    pairs = [pair for source in sources if isinstance(source, PairedSource) for pair in source.pairs][rank::world]
    photos = [path for source in sources if isinstance(source, SyntheticSource) for path in source.paths][rank::world]
    pair_files = dict.fromkeys(path for pair in pairs for path in (pair.input, pair.target))  # DDN shares clean files
    photo_files = [path for path in dict.fromkeys(photos) if path not in pair_files]
    checker = checked or CheckedFiles()
    # two records: a pair's file is read at read_training's depths, a photo at any
    sizes, problems = checker.check("training pair files", list(pair_files), lambda path: [path],
                                    lambda path: image_size(path, training_pair=True), progress)
    photo_sizes, photo_problems = checker.check("training photos", photo_files, lambda path: [path],
                                                lambda path: image_size(path), progress)
    sizes |= photo_sizes
    problems += photo_problems
    for pair in pairs:
        if pair.input in sizes and pair.target in sizes:
            try:
                check_pair_sizes(pair, sizes[pair.input], sizes[pair.target])
            except ValueError as err:
                problems.append(str(err))
    return problems


# Tells the epoch orders' random streams apart from the samples' (which are keyed [seed, n]).
_EPOCH_STREAM = 0x5EED


class TrainingStream(Dataset):
    """Indexable by sample number; mixes sources by weight and applies the paper's augmentation."""

    def __init__(self, sources: Sequence[PairedSource | SyntheticSource], weights: Sequence[float],
                 augment: AugmentConfig, seed: int):
        if not sources:
            raise ValueError("no training sources configured (data.sources is empty)")
        self.sources = list(sources)
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (len(self.sources),) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"source weights must be {len(self.sources)} non-negative numbers, not all 0; "
                             f"got {list(weights)}")
        self.weights = w / w.sum()
        self.augment = augment
        self.seed = seed
        self._orders: dict[int, tuple[tuple[int, int], np.ndarray]] = {}

    def __len__(self) -> int:
        return 2**62  # a stream: the sampler decides how far it is read

    def _choose(self, n: int) -> tuple[int, int, np.random.Generator]:
        """Sample ``n``'s source (by weight) and item: the item at position ``n mod len`` of that
        source's shuffled order for epoch ``n // len``, so that a lone source is read as the paper's
        shuffling DataLoader reads it, every item once an epoch, still as a pure function of ``n``."""
        rng = np.random.default_rng([self.seed, n])
        source = int(rng.choice(len(self.sources), p=self.weights))
        epoch, position = divmod(n, len(self.sources[source]))
        return source, int(self._epoch_order(source, epoch)[position]), rng

    def _epoch_order(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        if self._orders.get(source, (None,))[0] != key:  # one order kept per source: samples come in sequence
            order = np.random.default_rng([self.seed, source, epoch, _EPOCH_STREAM]).permutation(len(self.sources[source]))
            self._orders[source] = (key, order)
        return self._orders[source][1]

    def choose(self, n: int) -> tuple[int, int]:
        """``(source index, item index)`` of sample ``n``, without decoding or rendering anything."""
        source, item, _ = self._choose(n)
        return source, item

    def __getitem__(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        source, item, rng = self._choose(n)
        rainy, clean = self.sources[source].sample(item, rng, self.augment.patch_size)
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        return augment_pair(rainy, clean, self.augment, generator)


class StreamSampler(Sampler[int]):
    """Sample numbers for one process: iteration ``i`` of rank ``r`` reads its slice of the global batch.

    From ``start_sample`` ``S``, the global batch of iteration ``i`` is samples
    ``[S + i*B*W, S + (i+1)*B*W)``; rank ``r`` takes ``B`` of them. One process with batch ``B*W``
    therefore sees exactly what ``W`` processes see, and a run resumed from the samples read so far
    neither repeats nor skips any, whatever its batch.
    """

    def __init__(self, batch_size: int, rank: int = 0, world_size: int = 1, start_sample: int = 0):
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.start_sample = start_sample

    def __iter__(self) -> Iterator[int]:
        first = self.start_sample + self.rank * self.batch_size
        while True:
            yield from range(first, first + self.batch_size)
            first += self.world_size * self.batch_size

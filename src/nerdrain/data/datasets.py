"""Training pairs as a deterministic stream: sample number -> (rainy patch, clean patch).

Every random choice for sample ``n`` (which source, which image, the crop, the rain, the flips)
comes from a generator seeded by ``(seed, n)``. Resuming at iteration ``i`` therefore only needs
``i``; worker count and process count do not change what sample ``n`` is; and synthetic rain never
runs out, since each sample number renders fresh rain.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..imageio import DATASET_EXTENSIONS, read_photo
from .augment import AugmentConfig, augment_pair, reflect_pad_to
from .pairs import find_pairs, load_pair
from .synth import RainMixer



def _to_tensor(img: np.ndarray) -> torch.Tensor:
    array = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else img.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


class PairedSource:
    """Real (rainy, clean) pairs from any layout :func:`find_pairs` knows; decoded once, cached.

    The cache holds the 8-bit pixels, converted to float per sample: every data worker fills its
    own, and as float32 Rain200H's 1800 pairs took 6.7 GB in each.
    """

    def __init__(self, root: str | Path, layout: str | None = None):
        self.pairs = find_pairs(root, layout)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def sample(self, index: int, rng: np.random.Generator, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index not in self._cache:
            self._cache[index] = load_pair(self.pairs[index])
        rainy, clean = self._cache[index]
        return _to_tensor(rainy), _to_tensor(clean)


class SyntheticSource:
    """Clean photos with rain rendered on the fly onto a patch-sized crop."""

    def __init__(self, root: str | Path, presets: Sequence[str] = ("light", "heavy"),
                 streak_dir: str | Path | None = None):
        root = Path(root)
        self.paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in DATASET_EXTENSIONS and p.is_file()
                            and not any(part.startswith(".") for part in p.relative_to(root).parts))
        if not self.paths:
            raise ValueError(f"{root}: no clean images found for rain synthesis")
        self.mixer = RainMixer(tuple(presets), streak_dir=streak_dir)
        if streak_dir is not None:  # a bad streak image stops training now, not hours in
            self.mixer.synths[0].check_streaks()
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def sample(self, index: int, rng: np.random.Generator, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index not in self._cache:
            self._cache[index] = _to_tensor(read_photo(self.paths[index]).rgb)
        clean = reflect_pad_to(self._cache[index], patch_size, patch_size)
        top = int(rng.integers(0, clean.shape[1] - patch_size + 1))
        left = int(rng.integers(0, clean.shape[2] - patch_size + 1))
        clean = clean[:, top:top + patch_size, left:left + patch_size]
        rainy = self.mixer.render(clean.permute(1, 2, 0).numpy(), rng)
        return _to_tensor(rainy), clean.contiguous()


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

    def __len__(self) -> int:
        return 2**62  # a stream: the sampler decides how far it is read

    def _choose(self, n: int) -> tuple[int, int, np.random.Generator]:
        rng = np.random.default_rng([self.seed, n])
        source = int(rng.choice(len(self.sources), p=self.weights))
        return source, int(rng.integers(len(self.sources[source]))), rng

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

    The global batch of iteration ``i`` is samples ``[i*B*W, (i+1)*B*W)``; rank ``r`` takes
    ``B`` of them. One process with batch ``B*W`` therefore sees exactly what ``W`` processes see.
    """

    def __init__(self, batch_size: int, rank: int = 0, world_size: int = 1, start_iteration: int = 0):
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.start_iteration = start_iteration

    def __iter__(self) -> Iterator[int]:
        iteration = self.start_iteration
        while True:
            first = (iteration * self.world_size + self.rank) * self.batch_size
            yield from range(first, first + self.batch_size)
            iteration += 1

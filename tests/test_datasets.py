"""The training stream: a pure function of (seed, sample number); the sampler; source weights."""

from __future__ import annotations

import inspect
import itertools
import os
import struct
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from nerdrain.data import checked as checked_module
from nerdrain.data.augment import AugmentConfig
from nerdrain.data.checked import CHECKED_FILES, CheckedFiles
from nerdrain.data import datasets
from nerdrain.data.datasets import (
    DecodedImages,
    PairedSource,
    StreamSampler,
    SyntheticSource,
    TrainingStream,
    file_problems,
)
from nerdrain.data.pairs import load_pair, read_training
from nerdrain.imageio import read_photo


def write_pairs(root: Path, count: int, size: tuple[int, int], seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    (root / "input").mkdir(parents=True)
    (root / "target").mkdir()
    pairs = []
    for i in range(count):
        rainy = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        clean = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(rainy).save(root / "input" / f"{i}.png")
        Image.fromarray(clean).save(root / "target" / f"{i}.png")
        pairs.append((rainy, clean))
    return pairs


def write_clean(root: Path, count: int, size: tuple[int, int], seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / f"c{i}.png")


@pytest.fixture
def mixed_stream_factory(tmp_path):
    write_pairs(tmp_path / "pairs", 3, (40, 36))
    write_clean(tmp_path / "clean", 2, (50, 45))

    def make(seed: int = 7) -> TrainingStream:
        sources = [PairedSource(tmp_path / "pairs"), SyntheticSource(tmp_path / "clean", ["light", "heavy"])]
        return TrainingStream(sources, [1, 1], AugmentConfig(patch_size=32), seed)

    return make


def test_stream_is_a_pure_function_of_seed_and_n(mixed_stream_factory):
    a, b = mixed_stream_factory(), mixed_stream_factory()
    order = [5, 0, 3, 5, 1, 2, 4]
    first = {n: a[n] for n in order}  # access order, repeats and caches must not matter
    for n in reversed(order):
        rainy, clean = b[n]
        assert rainy.shape == clean.shape == (3, 32, 32) and rainy.dtype == torch.float32
        assert torch.equal(rainy, first[n][0]) and torch.equal(clean, first[n][1])
    kinds = {a.choose(n)[0] for n in range(6)}
    assert kinds == {0, 1}, "both sources are exercised"
    for m, n in itertools.combinations(range(6), 2):
        assert not torch.equal(first.get(m, a[m])[0], first.get(n, a[n])[0]), (m, n)
    other_seed = mixed_stream_factory(seed=8)
    assert any(not torch.equal(other_seed[n][0], first[n][0]) for n in range(6))


def test_paired_patch_is_the_file_content(tmp_path):
    """Patch = image, no flips, no saturation: the stream yields the PNG bytes / 255 exactly."""
    pairs = write_pairs(tmp_path / "pairs", 2, (32, 32))
    stream = TrainingStream([PairedSource(tmp_path / "pairs")], [1.0],
                            AugmentConfig(patch_size=32, flips=False, saturation_prob=0.0), seed=0)
    for n in range(4):
        _, item = stream.choose(n)
        rainy, clean = stream[n]
        expected_rainy, expected_clean = (torch.from_numpy(x).permute(2, 0, 1).float() / 255 for x in pairs[item])
        assert torch.equal(rainy, expected_rainy) and torch.equal(clean, expected_clean)


def held_bytes(obj) -> int:
    """Bytes of the arrays and tensors an object holds in its attributes (nested containers too)."""
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(held_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(held_bytes(v) for v in obj)
    return sum(held_bytes(v) for v in vars(obj).values()) if hasattr(obj, "__dict__") else 0


def test_paired_source_holds_no_more_than_the_8_bit_pixels(tmp_path):
    """Each data worker caches every pair it has read: at one byte per value, not four."""
    pairs = write_pairs(tmp_path / "pairs", 3, (40, 36))
    source = PairedSource(tmp_path / "pairs")
    for index in range(3):
        rainy, clean = source.sample(index, np.random.default_rng(0), 32)
        assert rainy.dtype == torch.float32
        assert torch.equal(rainy, torch.from_numpy(pairs[index][0]).permute(2, 0, 1).float() / 255)
    assert held_bytes(source) <= 3 * 2 * 40 * 36 * 3


def _write_png16_rgb(path: Path, values: np.ndarray) -> None:
    """A 16-bit RGB PNG written by hand (IHDR depth 16, colour type 2, filter 0 on every row)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    h, w, _ = values.shape
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_paired_source_reads_16_bit_pairs_at_full_depth(tmp_path):
    """Users' own pairs may be 16-bit: value / 65535, not the high byte / 255 nor a refusal; at two
    bytes a value in the cache."""
    h, w = 6, 8
    rainy16 = (1000 + 7 * np.arange(h * w * 3)).reshape(h, w, 3).astype(np.uint16)  # odd steps: not k * 257
    clean16 = (40001 + 3 * np.arange(h * w)).reshape(h, w).astype(np.uint16)
    _write_png16_rgb(tmp_path / "pairs" / "input" / "a.png", rainy16)
    (tmp_path / "pairs" / "target").mkdir()
    Image.fromarray(clean16).save(tmp_path / "pairs" / "target" / "a.png")  # 16-bit grey (I;16)
    source = PairedSource(tmp_path / "pairs")
    rainy, clean = source.sample(0, np.random.default_rng(0), 4)
    np.testing.assert_allclose(rainy.permute(1, 2, 0).numpy(), rainy16 / 65535, rtol=0, atol=1e-7)
    np.testing.assert_allclose(clean.permute(1, 2, 0).numpy(), np.repeat(clean16[..., None] / 65535, 3, axis=2),
                               rtol=0, atol=1e-7)
    assert held_bytes(source) <= 2 * (h * w * 3) * 2


def test_the_start_check_refuses_the_32_bit_pair_files_training_would_refuse(tmp_path):
    """The check at the start must find every file that stops training when drawn: a 32-bit float
    TIFF passed it (it decodes) and stopped the run at its first draw. 16-bit files train, so the
    refusal says to use 8- or 16-bit images; a 16-bit pair passes both."""
    root = tmp_path / "pairs"
    for folder in ("input", "target"):
        (root / folder).mkdir(parents=True)
    Image.fromarray(np.full((20, 24), 0.5, np.float32), "F").save(root / "input" / "float.tif")
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(root / "target" / "float.tif")
    _write_png16_rgb(root / "input" / "deep.png", np.full((20, 24, 3), 1000, np.uint16))
    Image.fromarray(np.full((20, 24), 40001, np.uint16)).save(root / "target" / "deep.png")
    source = PairedSource(root)
    float_pair, deep_pair = sorted(source.pairs, key=lambda pair: pair.name != "float")
    with pytest.raises(ValueError) as drawn:
        load_pair(float_pair, read_training)
    assert str(drawn.value) == f"{float_pair.input}: 32-bit floating-point images are not supported; use 8- or 16-bit images"
    load_pair(deep_pair, read_training)
    assert file_problems([source]) == [str(drawn.value)]


def test_cache_keeps_what_fits_its_budget_and_reads_the_rest_again(tmp_path, monkeypatch):
    """A set larger than the budget trains in bounded memory, with the same pixels."""
    pairs = write_pairs(tmp_path / "pairs", 3, (40, 36))
    pair_bytes = 2 * 40 * 36 * 3
    source = PairedSource(tmp_path / "pairs", cache=DecodedImages(max_bytes=pair_bytes * 3 // 2))
    reads = []
    monkeypatch.setattr(datasets, "load_pair", lambda pair, read: reads.append(pair.name) or load_pair(pair, read))
    for _ in range(2):
        for index in range(3):
            rainy, clean = source.sample(index, np.random.default_rng(0), 32)
            assert torch.equal(rainy, torch.from_numpy(pairs[index][0]).permute(2, 0, 1).float() / 255)
            assert torch.equal(clean, torch.from_numpy(pairs[index][1]).permute(2, 0, 1).float() / 255)
    assert len(reads) == 5 and source.cache.used == pair_bytes  # the first pair kept, the others read twice
    assert held_bytes(source) <= pair_bytes * 3 // 2


def test_synthetic_crops_of_8_bit_photos_are_their_exact_pixels(tmp_path):
    """Cached as uint8, a crop converts back to exactly the float values of the file's bytes."""
    photo = np.random.default_rng(1).integers(0, 256, (37, 45, 3), dtype=np.uint8)
    (tmp_path / "clean").mkdir()
    Image.fromarray(photo).save(tmp_path / "clean" / "p.png")
    source = SyntheticSource(tmp_path / "clean", ["light"])
    for seed in range(5):
        rng = np.random.default_rng(seed)
        top, left = int(rng.integers(0, 37 - 32 + 1)), int(rng.integers(0, 45 - 32 + 1))  # as the source draws
        _, clean = source.sample(0, np.random.default_rng(seed), 32)
        expected = photo[top:top + 32, left:left + 32].astype(np.float32) / 255.0
        assert torch.equal(clean, torch.from_numpy(expected).permute(2, 0, 1))
    assert held_bytes(source.cache) == photo.nbytes


def test_synthetic_rain_makes_the_input_differ(tmp_path):
    write_clean(tmp_path / "clean", 1, (40, 40))
    stream = TrainingStream([SyntheticSource(tmp_path / "clean", ["heavy"])], [1.0],
                            AugmentConfig(patch_size=32), seed=0)
    rainy, clean = stream[0]
    assert rainy.shape == clean.shape == (3, 32, 32)
    assert 0 <= float(rainy.min()) and float(rainy.max()) <= 1
    assert (rainy - clean).abs().mean() > 1e-3


class FakeSource:
    """Only a length: ``choose`` must not decode or render anything."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def sample(self, *args):  # pragma: no cover - must not be called
        raise AssertionError("choose() rendered a sample")


def test_source_weights_are_respected():
    stream = TrainingStream([FakeSource(5), FakeSource(3)], [0.8, 0.2], AugmentConfig(patch_size=32), seed=1234)
    picks = np.array([stream.choose(n) for n in range(2000)])
    share = float((picks[:, 0] == 0).mean())
    assert abs(share - 0.8) < 4 * np.sqrt(0.8 * 0.2 / 2000)  # within 4 standard deviations
    assert set(picks[picks[:, 0] == 0, 1]) == set(range(5))  # every item of each source appears
    assert set(picks[picks[:, 0] == 1, 1]) == set(range(3))
    # unnormalised weights mean the same thing
    scaled = TrainingStream([FakeSource(5), FakeSource(3)], [8, 2], AugmentConfig(patch_size=32), seed=1234)
    assert [scaled.choose(n) for n in range(200)] == [tuple(p) for p in picks[:200].tolist()]


def test_a_source_is_read_in_shuffled_epochs():
    """As the paper's shuffling DataLoader reads its training set: each run of len(source) samples
    of a lone source is a permutation of its items, a different one each epoch; mixed with another
    source, no item repeats within such a run (drawn with replacement, a run of 7 would miss
    7 * (6/7)^7 = 2.4 items on average)."""
    lone = TrainingStream([FakeSource(7)], [1.0], AugmentConfig(patch_size=32), seed=1234)
    epochs = [[lone.choose(n)[1] for n in range(e * 7, (e + 1) * 7)] for e in range(4)]
    for order in epochs:
        assert sorted(order) == list(range(7))
    assert len({tuple(order) for order in epochs}) > 1, "the order is reshuffled between epochs"
    mixed = TrainingStream([FakeSource(7), FakeSource(3)], [0.5, 0.5], AugmentConfig(patch_size=32), seed=1234)
    for e in range(20):
        drawn = [item for source, item in (mixed.choose(n) for n in range(e * 7, (e + 1) * 7)) if source == 0]
        assert len(drawn) == len(set(drawn)), (e, drawn)


def test_zero_weight_source_is_never_drawn():
    stream = TrainingStream([FakeSource(2), FakeSource(2)], [0, 1], AugmentConfig(patch_size=32), seed=0)
    assert {stream.choose(n)[0] for n in range(300)} == {1}


@pytest.mark.parametrize("weights", [[1], [1, -1], [0, 0], [1, float("nan")]])
def test_bad_weights_are_rejected(weights):
    with pytest.raises(ValueError, match="weights"):
        TrainingStream([FakeSource(2), FakeSource(2)], weights, AugmentConfig(), seed=0)


def test_no_sources_is_an_error():
    with pytest.raises(ValueError, match="sources"):
        TrainingStream([], [], AugmentConfig(), seed=0)


@pytest.mark.parametrize("batch, world", [(1, 2), (2, 3), (3, 1), (4, 4)])
def test_sampler_ranks_interleave_to_the_single_process_sequence(batch, world):
    iterations = 5
    per_rank = [list(itertools.islice(iter(StreamSampler(batch, r, world)), iterations * batch))
                for r in range(world)]
    single = list(itertools.islice(iter(StreamSampler(batch * world)), iterations * batch * world))
    assert single == list(range(iterations * batch * world))  # global batch i = [i*B*W, (i+1)*B*W)
    for i in range(iterations):
        global_batch = [n for rank in per_rank for n in rank[i * batch:(i + 1) * batch]]
        assert global_batch == single[i * batch * world:(i + 1) * batch * world]
    assert sorted(n for rank in per_rank for n in rank) == single  # no sample twice, none skipped


def test_sampler_start_sample_resumes_the_sequence():
    for rank in range(2):
        full = list(itertools.islice(iter(StreamSampler(3, rank, 2)), 30))
        resumed = list(itertools.islice(iter(StreamSampler(3, rank, 2, start_sample=24)), 18))  # iteration 4
        assert resumed == full[12:]


def test_dataloader_batches_follow_the_sampler():
    class Numbers(torch.utils.data.Dataset):
        def __getitem__(self, n):
            return torch.tensor(n)

    loader = DataLoader(Numbers(), batch_size=2, sampler=StreamSampler(2, rank=1, world_size=3, start_sample=6))
    batches = [b.tolist() for b in itertools.islice(iter(loader), 2)]
    assert batches == [[8, 9], [14, 15]]


def test_synthetic_source_skips_hidden_files_and_reads_16_bit_photos(tmp_path):
    """macOS' ._x.png beside x.png is not a photo; a 16-bit grey photo is not white."""
    root = tmp_path / "clean"
    root.mkdir()
    grey = np.linspace(0, 1, 24 * 32).reshape(24, 32)
    Image.fromarray((grey * 65535).astype(np.uint16)).save(root / "g16.png")
    (root / "._g16.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (root / ".cache").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / ".cache" / "thumb.png")
    source = SyntheticSource(root, ["light"])
    assert [p.name for p in source.paths] == ["g16.png"]
    _, clean = source.sample(0, np.random.default_rng(0), 16)
    assert clean.shape == (3, 16, 16) and 0 < float(clean.mean()) < 1
    _, padded = source.sample(0, np.random.default_rng(0), 32)  # 24 x 32 reflect-padded below: no crop
    np.testing.assert_allclose(padded[0, :24].numpy(), grey, atol=1 / 65535)  # all 16 bits, not clipped to 255
    assert len(np.unique(padded[0, :24].numpy())) == 24 * 32  # every value its own: not 8-bit steps


def test_synthetic_source_checks_its_streak_images_when_built(tmp_path):
    """Training reads streak images when it first draws them: a bad one must stop the run at its
    start, in one line naming the file, not hours in."""
    root = tmp_path / "clean"
    root.mkdir()
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(root / "c.png")
    streaks = tmp_path / "streaks"
    streaks.mkdir()
    Image.fromarray(np.full((20, 6), 200, np.uint8)).save(streaks / "good.png")
    assert SyntheticSource(root, ["light"], streak_dir=streaks).paths  # a good folder builds
    (streaks / "bad.png").write_bytes((streaks / "good.png").read_bytes()[:40])
    with pytest.raises(ValueError, match=r"bad\.png: "):
        SyntheticSource(root, ["light"], streak_dir=streaks)


def test_check_records_serve_any_number_of_processes(tmp_path, monkeypatch, exact_timestamps):
    """Each process records its share's results and reads every process's record: after a start
    with one process, two read nothing (their shares differ from any earlier process's); after
    one with two, one reads nothing, and process 0 removes the record of rank 1, which no longer runs."""
    write_pairs(tmp_path / "pairs", 5, (40, 36))
    write_clean(tmp_path / "clean", 3, (50, 45))
    every_file = set((tmp_path / "pairs").rglob("*.png")) | set((tmp_path / "clean").glob("*.png"))
    reads: list[Path] = []
    monkeypatch.setattr(datasets, "image_size", lambda path, **_: reads.append(path) or Image.open(path).size)
    record = tmp_path / "run" / CHECKED_FILES

    def start(world: int) -> set[Path]:
        reads.clear()
        sources = [PairedSource(tmp_path / "pairs"), SyntheticSource(tmp_path / "clean", ["light"])]
        processes = [CheckedFiles(record, rank) for rank in range(world)]  # as a Trainer's: all read, then write
        for rank, checked in enumerate(processes):
            assert datasets.file_problems(sources, rank, world, checked=checked) == []
        for checked in processes:
            checked.save(world)
        return set(reads)

    assert start(1) == every_file
    assert start(2) == set()
    assert sorted(p.name for p in record.iterdir()) == ["rank-0.npz", "rank-1.npz"]
    (tmp_path / "clean" / "c0.png").unlink()  # the shares shift: still nothing to read
    every_file.discard(tmp_path / "clean" / "c0.png")
    assert start(1) == set()
    assert sorted(p.name for p in record.iterdir()) == ["rank-0.npz"]
    assert start(3) == set()
    (record / "rank-0.npz").unlink()  # rank 0's share, recorded by ranks 1 and 2 alone, is partly read again
    assert set() < start(1) < every_file


def test_the_start_check_and_the_readers_apply_one_pixel_limit(tmp_path, monkeypatch, exact_timestamps):
    """Every file training reads, 8- or 16-bit pair or photo, and the start check standing for its
    reader, take read_photo's limit (NERDRAIN_MAX_PIXELS) and not Pillow's decompression-bomb guard
    (~179 Mpx, which no setting of ours moves): before, the check refused photos between the two
    that training reads, and 8-bit pairs, unlike 16-bit ones, were past NERDRAIN_MAX_PIXELS's reach.
    A small Pillow guard and a small limit stand for the real ones; the images are 24x20 = 480 px.
    What passed under one limit is checked again under another."""
    root = tmp_path / "pairs"
    for folder in ("input", "target"):
        (root / folder).mkdir(parents=True)
    Image.fromarray(np.full((20, 24, 3), 10, np.uint8)).save(root / "input" / "flat.png")
    Image.fromarray(np.full((20, 24, 3), 20, np.uint8)).save(root / "target" / "flat.jpg")
    _write_png16_rgb(root / "input" / "deep.png", np.full((20, 24, 3), 1000, np.uint16))
    _write_png16_rgb(root / "target" / "deep.png", np.full((20, 24, 3), 2000, np.uint16))
    (tmp_path / "clean").mkdir()
    Image.fromarray(np.full((20, 24, 3), 30, np.uint8)).save(tmp_path / "clean" / "photo.jpg")
    sources = [PairedSource(root), SyntheticSource(tmp_path / "clean", ["light"])]
    files = [path for pair in sources[0].pairs for path in (pair.input, pair.target)] + sources[1].paths

    def read(path: Path) -> None:
        read_training(path) if path.parent.parent == root else read_photo(path)

    pillow_limit = Image.MAX_IMAGE_PIXELS
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow refuses over twice this
    for path in files:
        read(path)
    record = tmp_path / "run" / CHECKED_FILES
    checked = CheckedFiles(record)
    assert file_problems(sources, checked=checked) == []
    checked.save(1)

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pillow_limit)
    monkeypatch.setenv("NERDRAIN_MAX_PIXELS", "479")
    errors = []
    for path in files:
        with pytest.raises(ValueError) as refused:
            read(path)
        errors.append(str(refused.value))
    limit = "exceeds the limit of 479 pixels (raise it with NERDRAIN_MAX_PIXELS, or max_pixels= where a function takes it)"
    assert errors == [f"{path}: image too large: 24x20 = 480 pixels {limit}" for path in files]
    assert sorted(file_problems(sources, checked=CheckedFiles(record))) == sorted(errors)  # passed at 300 Mpx
    monkeypatch.setenv("NERDRAIN_MAX_PIXELS", "480")
    assert file_problems(sources) == []


def test_a_file_checked_as_a_photo_is_checked_again_as_a_pair_file(tmp_path, exact_timestamps):
    """A 32-bit float TIFF is a good clean photo (read_photo takes any depth) but not a pair's file
    (read_training refuses 32 bits): recorded good as a photo, it is still refused once a pair uses it."""
    write_pairs(tmp_path / "pairs", 2, (40, 36))
    deep = tmp_path / "pairs" / "target" / "0.tif"
    Image.fromarray(np.random.default_rng(0).random((40, 36), np.float32)).save(deep)
    (tmp_path / "pairs" / "target" / "0.png").unlink()
    record = tmp_path / "run" / CHECKED_FILES

    def problems(source) -> list[str]:
        checked = CheckedFiles(record)
        found = datasets.file_problems([source], checked=checked)
        checked.save(1)
        return found

    assert problems(SyntheticSource(tmp_path / "pairs" / "target", ["light"])) == []
    assert (tmp_path / "run" / CHECKED_FILES / "rank-0.npz").is_file()
    assert problems(PairedSource(tmp_path / "pairs")) == [
        f"{deep}: 32-bit floating-point images are not supported; use 8- or 16-bit images"]


class CoarseTimestamps:
    """``os`` as seen on a filesystem keeping whole ``seconds`` of modification and change time
    (FAT: 2 s; ext3, HFS+: 1 s; Linux's own move by the clock tick only)."""

    def __init__(self, seconds: int):
        self.granule = seconds * 10**9

    def __getattr__(self, name):
        return getattr(os, name)

    def stat(self, path, *args, **kwargs):
        st = os.stat(path, *args, **kwargs)
        return SimpleNamespace(st_size=st.st_size, st_mtime_ns=st.st_mtime_ns - st.st_mtime_ns % self.granule,
                               st_ctime_ns=st.st_ctime_ns - st.st_ctime_ns % self.granule)


def test_a_file_rewritten_within_its_timestamps_granule_is_read_again(tmp_path, monkeypatch):
    """Where timestamps are coarse, a file rewritten with as many bytes just after the check read it
    keeps its size, mtime and change time: what the check found must not be recorded then (git's
    "racily clean" files), or the new bytes would pass unread."""
    monkeypatch.setattr(checked_module, "os", CoarseTimestamps(2))
    write_pairs(tmp_path / "pairs", 1, (40, 36))
    record = tmp_path / "run" / CHECKED_FILES
    target = tmp_path / "pairs" / "target" / "0.png"
    corrupted = bytearray(target.read_bytes())
    corrupted[-40] ^= 0xFF

    def problems() -> list[str]:
        checked = CheckedFiles(record)
        found = datasets.file_problems([PairedSource(tmp_path / "pairs")], checked=checked)
        checked.save(1)
        return found

    time.sleep(-time.time() % 2 + 0.05)  # early in a granule: the rewrite falls in the same one
    target.write_bytes(target.read_bytes())
    assert problems() == []
    target.write_bytes(bytes(corrupted))
    assert [problem.split(":")[0] for problem in problems()] == [str(target)]


def test_a_settled_file_with_an_mtime_in_the_future_is_recorded(tmp_path, monkeypatch, exact_timestamps):
    """An mtime says nothing of when the bytes changed (an archive sets it, into the future where its
    maker's clock ran ahead): a file changed long enough before the check is recorded whatever it says."""
    write_pairs(tmp_path / "pairs", 1, (40, 36))
    future = time.time_ns() + 3600 * 10**9
    for path in (tmp_path / "pairs").rglob("*.png"):
        os.utime(path, ns=(future, future))
    reads: list[Path] = []
    monkeypatch.setattr(datasets, "image_size", lambda path, **_: reads.append(path) or Image.open(path).size)
    for _ in range(2):
        checked = CheckedFiles(tmp_path / "run" / CHECKED_FILES)
        assert datasets.file_problems([PairedSource(tmp_path / "pairs")], checked=checked) == []
        checked.save(1)
    assert len(reads) == 2  # the first check's two files, none at the second


def test_the_check_record_version_covers_every_rule_of_the_check():
    """A record is reused only under the rules that wrote it: the version is taken from the source of
    every function that decides what passes (a rule added to any of them, such as the 32-bit pair
    file's, voids earlier records without a number to remember to raise)."""
    from nerdrain import evaluate, imageio, metrics
    from nerdrain.data import pairs
    rules = [datasets.file_problems, pairs.image_size, pairs.check_pair_sizes, pairs.load_pair, pairs.clean_label,
             imageio.stores_16_bits, evaluate._load_scorable, metrics.check_scorable, metrics.check_ssim_size,
             CheckedFiles.check]
    covered = {path.resolve() for path in checked_module._RULE_FILES}
    assert {Path(inspect.getsourcefile(rule)).resolve() for rule in rules} <= covered
    assert checked_module.VERSION == checked_module._rules_version(checked_module._RULE_FILES)


def test_the_rules_version_does_without_the_sources_of_the_rules(tmp_path):
    """Installed from compiled files only, the check's modules cannot be read: the version then
    stands on the release, instead of the import failing, and still changes with a rule's code."""
    from nerdrain.data.checked import _rules_version

    rule = tmp_path / "rule.py"
    rule.write_text("LIMIT = 1\n")
    first = _rules_version([rule])
    assert _rules_version([rule]) == first
    rule.write_text("LIMIT = 2\n")
    assert _rules_version([rule]) != first
    assert isinstance(_rules_version([tmp_path / "gone.py"]), int)

"""Tiled inference: exact coverage, seamless blending, batching, small images, OOM fallback."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nerdrain import tiling
from nerdrain.torch_compat import OutOfMemoryError
from nerdrain.tiling import (
    TileConfig,
    count_tiles,
    default_tile_for_device,
    is_oom_error,
    released_window_starts,
    run_released_windows,
    run_tiled,
    run_with_oom_fallback,
    tile_positions,
    tile_shape,
)


def pointwise(x: torch.Tensor) -> torch.Tensor:
    return x * 0.8 + 0.1


def conv_stack(seed: int = 1, layers: int = 5) -> torch.nn.Module:
    """Fixed random 3x3 convs with zero padding: receptive field and strong border effects."""
    g = torch.Generator().manual_seed(seed)
    mods = []
    for _ in range(layers):
        c = torch.nn.Conv2d(3, 3, 3, padding=1)
        with torch.no_grad():
            c.weight.copy_(torch.rand(c.weight.shape, generator=g) * (2.0 / 27.0))
            c.bias.zero_()
        mods.append(c)
    return torch.nn.Sequential(*mods).eval()


def smooth_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    img = torch.stack(
        [0.5 + 0.3 * torch.sin(6 * xx + 2 * yy), 0.5 + 0.3 * torch.cos(5 * yy - 3 * xx), 0.4 + 0.2 * xx * yy]
    )[None]
    return img + 0.02 * torch.rand(img.shape, generator=g)


def hard_seams(model, img: torch.Tensor, tile: int) -> torch.Tensor:
    """Non-overlapping tiles pasted side by side (no blending): the thing to avoid."""
    out = torch.empty_like(img)
    h, w = img.shape[-2:]
    with torch.no_grad():
        for y in range(0, h, tile):
            for x in range(0, w, tile):
                out[..., y : y + tile, x : x + tile] = model(img[..., y : y + tile, x : x + tile])
    return out


def zone_ratio(grad: torch.Tensor, zones: list[tuple[int, int]], border: int = 6, near: int = 25) -> float:
    """Worst (max gradient inside a seam zone) / (mean gradient just outside it)."""
    worst = 0.0
    n = grad.numel()
    for lo, hi in zones:
        inside = grad[max(lo - 1, 0) : hi].max()
        outside = torch.cat([grad[max(lo - near, border) : max(lo - 1, border)], grad[hi : min(hi + near, n - border)]])
        worst = max(worst, (inside / outside.mean()).item())
    return worst


def blend_zones(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    pos = tile_positions(size, tile, overlap)
    return [(b, a + tile) for a, b in zip(pos[:-1], pos[1:])]


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("size,tile,overlap", [(97, 32, 8), (131, 32, 8), (64, 64, 8), (65, 64, 8), (1000, 512, 32), (33, 16, 0)])
def test_tile_positions_cover_and_overlap(size, tile, overlap):
    pos = tile_positions(size, tile, overlap)
    assert pos[0] == 0 and pos[-1] + tile == size
    assert all(b > a for a, b in zip(pos, pos[1:]))
    assert all(a + tile - b >= overlap for a, b in zip(pos, pos[1:]))  # at least the overlap
    assert tile_positions(10, 32, 8) == [0]


def test_weights_ramp_only_towards_neighbours():
    pos = tile_positions(131, 32, 8)
    ws = tiling._axis_weights(pos, 32)
    assert all(((w >= 0) & (w <= 1)).all() for w in ws)
    assert ws[0][0] == 1.0 and ws[-1][-1] == 1.0  # image borders keep full weight
    assert ws[0][-1] == 0 and ws[-1][0] == 0  # tile borders facing a neighbour are left to it
    # Complementary ramps: weights of two neighbours sum to ~1 across the middle of their overlap.
    a, b = pos[0], pos[1]
    ov = a + 32 - b
    s = ws[0][32 - ov :] + ws[1][:ov]
    assert torch.allclose(s[ov // 4 : ov - ov // 4], torch.ones(ov - 2 * (ov // 4)), atol=1e-6)


def test_summed_weight_along_an_axis_by_hand():
    """Tiles at 0 and 4 of 16 pixels: an 8-pixel overlap ramp (0, 0, then sin^2 of pi/16, 3pi/16, 5pi/16,
    7pi/16, then 1, 1) rising into the second tile over pixels 4..11, falling out of the first over 8..15."""
    s = [math.sin(math.pi * k / 16) ** 2 for k in (1, 3, 5, 7)]
    expected = [1, 1, 1, 1, 1, 1, 1 + s[0], 1 + s[1], 1 + s[2], 1 + s[3],  # the first tile's 1 plus the rise
                1 + s[3], 1 + s[2], 1 + s[1], 1 + s[0], 1, 1, 1, 1, 1, 1]  # the fall plus the second's 1
    total = tiling._axis_totals([0, 4], tiling._axis_weights([0, 4], 16), 20)
    torch.testing.assert_close(total, torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)


@pytest.mark.parametrize("h, w, tile, overlap", [(33, 40, 32, 16), (97, 131, 32, 8), (50, 300, 48, 40)])
def test_tiled_result_is_the_weighted_mean_of_the_tiles(h, w, tile, overlap):
    """Each pixel is the mean of the tiles' outputs there, weighted by the product of their axis
    weights (the sum of products computed here in full): a model giving each tile its own constant
    shows the blend exactly, uneven spacing (three tiles over a pixel) included."""
    cfg = TileConfig(tile=tile, overlap=overlap, batch_size=2)
    th, tw, ys, xs, _, _ = tiling._grid(h, w, cfg)
    wy, wx = tiling._axis_weights(ys, th), tiling._axis_weights(xs, tw)
    image = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    num = torch.zeros(1, 3, h, w, dtype=torch.float64)
    den = torch.zeros(h, w, dtype=torch.float64)
    for iy, y in enumerate(ys):
        for ix, x in enumerate(xs):
            weight = (wy[iy][:, None] * wx[ix][None, :]).double()
            num[..., y : y + th, x : x + tw] += image[..., y : y + th, x : x + tw].double().mean() * weight
            den[y : y + th, x : x + tw] += weight
    out = run_tiled(lambda t: t.mean(dim=(1, 2, 3), keepdim=True).expand_as(t).clone(), image, cfg)
    torch.testing.assert_close(out, (num / den).float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [1, 15, 16, 17, 48, 49, 50, 63, 64, 65, 97, 131, 520, 1000])
@pytest.mark.parametrize("tile, overlap", [(16, 0), (32, 8), (50, 4), (64, 32), (64, 40), (48, 100), (512, 32)])
def test_every_pixel_is_covered_by_a_tile_that_weighs_at_least_a_half(size, tile, overlap):
    """The blend divides by the summed weight: along each axis some tile must count at every pixel
    (images smaller than a tile, sides of a pixel, overlap 0 or over half a tile alike)."""
    cfg = TileConfig(tile=tile, overlap=overlap)
    th, _, ys, _, _, _ = tiling._grid(size, 1, cfg)
    best = torch.zeros(size)
    for y, w in zip(ys, tiling._axis_weights(ys, th)):
        best[y : y + th] = torch.maximum(best[y : y + th], w)
    assert ys[0] == 0 and ys[-1] + th == size and best.min() >= 0.5


def test_config_validation_and_counts():
    with pytest.raises(ValueError):
        TileConfig(tile=-1)
    with pytest.raises(ValueError):
        TileConfig(batch_size=0)
    assert count_tiles(97, 131, TileConfig(tile=32, overlap=8)) == len(tile_positions(97, 32, 8)) * len(
        tile_positions(131, 32, 8)
    )
    assert count_tiles(4000, 6000, TileConfig(tile=0)) == 1
    assert count_tiles(10, 10, TileConfig(tile=512)) == 1


def test_default_tile_on_cpu():
    assert default_tile_for_device("cpu") == 512
    if not torch.cuda.is_available():  # "auto" is the CPU here, as resolve_device reads it
        assert default_tile_for_device("auto") == 512
    assert default_tile_for_device(torch.device("cpu"), batch_size=8) == 512


# --------------------------------------------------------------------------- (a) exact coverage


def test_tiled_equals_untiled_for_pointwise_model_odd_size():
    x = torch.rand(1, 3, 97, 131, generator=torch.Generator().manual_seed(0))
    cfg = TileConfig(tile=32, overlap=8, batch_size=4)
    assert count_tiles(97, 131, cfg) > 12
    out = run_tiled(pointwise, x, cfg)
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, pointwise(x), atol=1e-6, rtol=0)


def test_tiled_3d_input_and_multiple_rounding():
    x = torch.rand(3, 45, 70)
    out = run_tiled(pointwise, x, TileConfig(tile=37, overlap=5))  # 37 -> 32 (multiple of 16)
    assert out.shape == x.shape
    torch.testing.assert_close(out, pointwise(x), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- (b) no seams


def test_blending_hides_seams_that_hard_tiling_shows():
    model = conv_stack()
    img = smooth_image(160, 200)
    with torch.no_grad():
        full = model(img)
    tile, overlap = 64, 16
    blended = run_tiled(model, img, TileConfig(tile=tile, overlap=overlap, batch_size=3))
    hard = hard_seams(model, img, tile)

    # The tiled result differs from the untiled one only slightly; hard seams do not.
    d_blend = (blended - full).abs()
    d_hard = (hard - full).abs()
    assert d_blend.max() < 0.01
    assert d_hard.max() > 0.1
    assert d_blend.max() < d_hard.max() / 20

    # The difference is spread out: it changes little from one pixel to the next.
    step_blend = (d_blend[..., 1:] - d_blend[..., :-1]).abs().max()
    step_hard = (d_hard[..., 1:] - d_hard[..., :-1]).abs().max()
    assert step_blend < 0.005 < step_hard

    # No step in the output: gradients at tile boundaries are like those nearby.
    for axis, size in ((-1, 200), (-2, 160)):
        gb = blended.diff(dim=axis).abs().mean(dim=(0, 1, 2 if axis == -1 else 3))
        gh = hard.diff(dim=axis).abs().mean(dim=(0, 1, 2 if axis == -1 else 3))
        hard_zones = [(b, b + 1) for b in range(tile, size, tile)]
        assert zone_ratio(gb, blend_zones(size, tile, overlap)) < 1.5
        assert zone_ratio(gh, hard_zones) > 3.0  # the check can fail: hard seams are caught


# --------------------------------------------------------------------------- (c) batching


def test_batching_matches_batch_size_one():
    model = conv_stack(seed=3)
    x = torch.rand(2, 3, 70, 90, generator=torch.Generator().manual_seed(5))
    ref = run_tiled(model, x, TileConfig(tile=32, overlap=8, batch_size=1))
    for bs in (2, 4, 7, 100):
        out = run_tiled(model, x, TileConfig(tile=32, overlap=8, batch_size=bs))
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    # batch images are independent
    single = run_tiled(model, x[1:], TileConfig(tile=32, overlap=8, batch_size=3))
    torch.testing.assert_close(ref[1:], single, atol=1e-6, rtol=0)


def test_model_sees_tiles_of_the_configured_size_in_batches():
    seen = []

    def spy(t):
        seen.append(tuple(t.shape))
        return t

    run_tiled(spy, torch.rand(1, 3, 100, 150), TileConfig(tile=48, overlap=8, batch_size=4), progress=True)
    assert all(s[1:] == (3, 48, 48) for s in seen)
    assert all(s[0] <= 4 for s in seen) and seen[0][0] == 4
    assert sum(s[0] for s in seen) == count_tiles(100, 150, TileConfig(tile=48, overlap=8))


# --------------------------------------------------------------------------- (d) small images


@pytest.mark.parametrize("h,w", [(20, 30), (1, 1), (5, 200), (200, 5)])
def test_image_smaller_than_tile(h, w):
    model = conv_stack(seed=2)
    x = torch.rand(1, 3, h, w)
    with torch.no_grad():
        ref = model(x)
    out = run_tiled(model, x, TileConfig(tile=64, overlap=16))
    if h <= 64 and w <= 64:
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    else:
        assert out.shape == ref.shape
        assert (out - ref).abs().max() < 0.05
    torch.testing.assert_close(run_tiled(model, x, TileConfig(tile=0)), ref, atol=1e-6, rtol=0)


def test_model_with_wrong_output_shape_is_reported():
    with pytest.raises(ValueError, match="shape"):
        run_tiled(lambda t: t[..., :-1], torch.rand(1, 3, 40, 40), TileConfig(tile=32, overlap=8))


@pytest.mark.parametrize("field, value", [("tile", 16.5), ("tile", "64"), ("overlap", 2.5),
                                          ("batch_size", 2.5), ("multiple", None), ("tile", True)])
def test_config_fields_must_be_integers(field, value):
    with pytest.raises(TypeError, match=f"{field} must be an integer"):
        TileConfig(**{field: value})


def test_config_takes_whole_numbers_of_any_type_as_ints():
    cfg = TileConfig(tile=64.0, overlap=np.int64(8), batch_size=np.float32(2.0))
    assert (cfg.tile, cfg.overlap, cfg.batch_size) == (64, 8, 2) and type(cfg.batch_size) is int


@pytest.mark.parametrize("tile, overlap", [(16, 16), (16, 20), (16, -4), (0, 0)])
def test_tile_positions_refuse_overlaps_that_leave_gaps_or_never_advance(tile, overlap):
    with pytest.raises(ValueError, match="0 <= overlap < tile"):
        tile_positions(100, tile, overlap)


def test_run_tiled_argument_errors_are_one_line():
    x = torch.rand(1, 3, 20, 20)
    with pytest.raises(TypeError, match="floating-point.*uint8"):  # the model would see 0..255
        run_tiled(pointwise, (x * 255).to(torch.uint8), TileConfig(tile=16))
    with pytest.raises(TypeError, match="floating-point.*ndarray"):
        run_tiled(pointwise, x.numpy(), TileConfig(tile=16))
    with pytest.raises(TypeError, match="TileConfig"):
        run_tiled(pointwise, x, 16)
    with pytest.raises(ValueError, match="unknown device 'bogus'"):
        run_tiled(pointwise, x, TileConfig(tile=16), device="bogus")


@pytest.mark.parametrize("tile", [0, 16])
def test_empty_batch_gives_an_empty_result_tiled_or_whole(tile):
    x = torch.rand(0, 3, 20, 20)
    out = run_tiled(pointwise, x, TileConfig(tile=tile))
    assert out.shape == x.shape and out.dtype == torch.float32


@pytest.mark.parametrize("tile", [0, 16])
def test_a_model_working_in_place_leaves_the_image_alone(tile):
    def in_place(t: torch.Tensor) -> torch.Tensor:  # as a first nn.ReLU(inplace=True) would
        return t.mul_(0.8).add_(0.1)

    x = torch.rand(2, 3, 20, 36)
    before = x.clone()
    out = run_tiled(in_place, x, TileConfig(tile=tile, overlap=8))
    assert torch.equal(x, before)
    torch.testing.assert_close(out, pointwise(before), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- (e) OOM fallback


class FakeOOM:
    """A pointwise model that runs out of memory for tiles larger than ``limit``."""

    def __init__(self, limit: int, exc=None):
        self.limit = limit
        self.calls: list[tuple[int, ...]] = []
        self.exc = exc

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(t.shape))
        if max(t.shape[-2:]) > self.limit:
            if self.exc is not None:
                raise self.exc
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return pointwise(t)


def test_oom_fallback_halves_tile_until_it_fits(caplog):
    x = torch.rand(1, 3, 100, 150)
    model = FakeOOM(limit=40)
    with caplog.at_level("WARNING", logger="nerdrain"):
        out = run_with_oom_fallback(model, x, TileConfig(tile=128, overlap=32, batch_size=4), min_tile=16)
    torch.testing.assert_close(out, pointwise(x), atol=1e-6, rtol=0)
    sizes = [max(c[-2:]) for c in model.calls]
    # tile 128 on 100 x 150: the whole 100-pixel side, and two tiles of 96 (not 128) across 150
    assert model.calls[0][-2:] == (100, 96) and 64 in sizes and max(sizes[-1:]) <= 40
    assert max(c[0] for c in model.calls if max(c[-2:]) <= 40) <= 1  # batch halved 4 -> 2 -> 1
    assert "out of memory" in caplog.text and "retrying" in caplog.text


def test_oom_fallback_from_whole_image():
    x = torch.rand(1, 3, 90, 120)
    model = FakeOOM(limit=70)
    out = run_with_oom_fallback(model, x, TileConfig(tile=0), min_tile=16)
    torch.testing.assert_close(out, pointwise(x), atol=1e-6, rtol=0)
    assert model.calls[0][-2:] == (90, 120)


def test_oom_fallback_gives_up_with_clear_message():
    model = FakeOOM(limit=8)
    with pytest.raises(OutOfMemoryError, match="out of memory even with tile 64"):
        run_with_oom_fallback(model, torch.rand(1, 3, 200, 200), TileConfig(tile=256), min_tile=64)
    assert min(max(c[-2:]) for c in model.calls) == 64


@pytest.mark.parametrize("multiple", [16, 40])
def test_oom_fallback_stops_at_the_smallest_tile_the_config_allows(multiple):
    model = FakeOOM(limit=1)  # never fits
    with pytest.raises(OutOfMemoryError, match="out of memory even with"):
        run_with_oom_fallback(model, torch.rand(1, 3, 100, 100), TileConfig(tile=96, multiple=multiple), min_tile=8)
    assert min(max(c[-2:]) for c in model.calls) >= multiple


def test_oom_fallback_recognises_runtime_error_messages_and_passes_other_errors():
    x = torch.rand(1, 3, 64, 64)
    model = FakeOOM(limit=40, exc=RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    out = run_with_oom_fallback(model, x, TileConfig(tile=64, overlap=8), min_tile=16)
    torch.testing.assert_close(out, pointwise(x), atol=1e-6, rtol=0)

    bad = FakeOOM(limit=8, exc=ValueError("something else"))
    with pytest.raises(ValueError, match="something else"):
        run_with_oom_fallback(bad, x, TileConfig(tile=64), min_tile=16)
    assert len(bad.calls) == 1  # not retried
    assert is_oom_error(OutOfMemoryError("x")) and not is_oom_error(ValueError("out of memory"))


# --- the released test script's windows --------------------------------------------------------


def test_released_windows_start_every_256_pixels_the_last_shifted_to_the_border():
    assert released_window_starts(256) == [0]
    assert released_window_starts(481) == [0, 225]
    assert released_window_starts(512) == [0, 256]
    assert released_window_starts(1000) == [0, 256, 512, 744]
    with pytest.raises(ValueError, match="need sides of at least 256 pixels, got 255"):
        released_window_starts(255)


def test_released_windows_have_hard_seams_where_the_shifted_window_wins():
    """Each window filled with its own number shows which one each pixel comes from: 300 x 520
    has windows at rows 0, 44 and columns 0, 256, 264, numbered row by row; no blending."""
    calls = []

    def window_number(x: torch.Tensor) -> torch.Tensor:
        first = sum(shape[0] for shape in calls) + 1
        calls.append(tuple(x.shape))
        return torch.stack([torch.full_like(window, first + k) for k, window in enumerate(x)])

    out = run_released_windows(window_number, torch.rand(1, 3, 300, 520), batch_size=4)
    assert calls == [(4, 3, 256, 256), (2, 3, 256, 256)]
    expected = torch.empty(300, 520)
    for rows, first in ((slice(0, 44), 1), (slice(44, 300), 4)):
        expected[rows, :256], expected[rows, 256:264], expected[rows, 264:] = first, first + 1, first + 2
    assert torch.equal(out[0, 0], expected) and torch.equal(out[0, 2], expected)


def test_released_windows_of_a_pointwise_model_give_its_whole_image_result():
    image = torch.rand(2, 3, 300, 520)
    assert torch.equal(run_released_windows(pointwise, image, batch_size=3), pointwise(image))


@pytest.mark.parametrize("size, tile, expected", [
    ((520, 520), 512, (288, 288)),  # two tiles a side either way: 31 % of the pixels
    ((768, 1024), 512, (400, 368)),  # 2 x 3 tiles
    ((3024, 4032), 512, (464, 480)),  # a 12 MP photo: 7 x 9 tiles
    ((300, 500), 512, (300, 500)),  # one tile: the image
])
def test_tiles_shrink_to_the_smallest_that_keeps_their_count(size, tile, expected):
    """A side just over the tile size needs two tiles, but not two full ones: each is cut to the
    smallest multiple of 16 that still covers the side overlapping by ``overlap``."""
    seen = []

    def recording(x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape[-2:]))
        return pointwise(x)

    cfg = TileConfig(tile=tile, overlap=32, batch_size=64)
    image = torch.rand(1, 3, *size)
    out = run_tiled(recording, image, cfg)
    assert set(seen) == {expected} == {tile_shape(*size, cfg)}
    h, w = size
    full = [len(tile_positions(side, min(tile, side), 32)) for side in (h, w)]
    assert count_tiles(h, w, cfg) == full[0] * full[1]  # as many tiles as the full-size ones need
    torch.testing.assert_close(out, pointwise(image), atol=1e-6, rtol=0)


# --- progress, exactness for local models, out-of-memory retries by batch ---------------------


class _CountingBar:
    """Stands in for tqdm: records each bar's total and how far it got."""

    bars: list[list[int]] = []

    def __init__(self, total, **_):
        self.state = [total, 0]
        _CountingBar.bars.append(self.state)

    def update(self, n):
        self.state[1] += n

    def close(self):
        pass


@pytest.mark.parametrize("run, unit_total", [
    (lambda: run_tiled(pointwise, torch.rand(3, 3, 100, 150), TileConfig(tile=48, overlap=8, batch_size=4),
                       progress=True), 3 * 12),  # 3 x 4 tiles of 48 per image
    (lambda: run_released_windows(pointwise, torch.rand(2, 3, 300, 520), batch_size=4, progress=True), 2 * 6),
    (lambda: run_tiled(pointwise, torch.rand(3, 3, 40, 50), TileConfig(tile=0, batch_size=2), progress=True), 3),
])
def test_progress_bars_end_at_their_total(monkeypatch, run, unit_total):
    import tqdm.auto

    _CountingBar.bars = []
    monkeypatch.setattr(tqdm.auto, "tqdm", _CountingBar)
    run()
    assert _CountingBar.bars == [[unit_total, unit_total]]


def receptive_field_model(radius: int) -> torch.nn.Module:
    """``radius`` zero-padded 3x3 convs: each output pixel sees exactly ``radius`` pixels around it."""
    return conv_stack(seed=4, layers=radius)


@pytest.mark.parametrize("h, w, tile, overlap", [
    (200, 260, 64, 24),  # outer quarter of each overlap (6) >= the radius (5)
    (97, 131, 50, 40),  # a tile side that is not a multiple of 16, rounded down to 48
    (160, 64, 64, 32),  # a side equal to the tile; overlap clamped to half a tile
    (300, 45, 96, 64),  # overlap over half the tile
    (257, 1, 64, 24),  # one pixel wide
])
def test_tiles_give_the_whole_image_result_of_a_local_model_when_overlaps_cover_its_reach(h, w, tile, overlap):
    """Pixels within ``radius`` of a tile's border facing a neighbour are wrong (zero padding); with the
    outer quarter of every overlap at least that wide, blending must leave none of them in the result."""
    model = receptive_field_model(radius=5)
    image = smooth_image(h, w)
    with torch.no_grad():
        whole = model(image)
    cfg = TileConfig(tile=tile, overlap=overlap, batch_size=3)
    assert count_tiles(h, w, cfg) > 1
    torch.testing.assert_close(run_tiled(model, image, cfg), whole, atol=2e-6, rtol=0)


class BatchOOM:
    """A pointwise model that runs out of memory for more than ``limit`` tiles at once."""

    def __init__(self, limit: int):
        self.limit = limit
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(t.shape))
        if t.shape[0] > self.limit:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return pointwise(t)


@pytest.mark.parametrize("tile", [64, 0])
def test_oom_fallback_first_lowers_the_batch_keeping_the_tile(tile):
    """Fewer tiles per call give the same result; smaller tiles do not (less context, more seams).
    So memory is first saved on the batch, down to one tile, also at the smallest tile."""
    x = torch.rand(3, 3, 100, 150)
    model = BatchOOM(limit=1)
    out = run_with_oom_fallback(model, x, TileConfig(tile=tile, overlap=16, batch_size=8), min_tile=64)
    torch.testing.assert_close(out, pointwise(x), atol=1e-6, rtol=0)
    fitting = {c[-2:] for c in model.calls if c[0] == 1}
    assert fitting == {tile_shape(100, 150, TileConfig(tile=tile, overlap=16))}  # the tile asked for

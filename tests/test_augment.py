from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from nerdrain.data.augment import (
    DIHEDRAL_INVERSE,
    AugmentConfig,
    adjust_saturation,
    apply_params,
    augment_pair,
    dihedral,
    dihedral_inverse,
    reflect_pad_to,
    sample_params,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def coord_image(h: int, w: int) -> torch.Tensor:
    """3 x H x W image whose channels encode row, column and a mix: every pixel unique."""
    r = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w) / h
    c = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w) / w
    return torch.stack([r, c, (r + 2 * c) / 3]).contiguous()


def find_crop(padded: torch.Tensor, patch: torch.Tensor):
    """(top, left, k) such that dihedral(padded crop, k) == patch, or None."""
    p = patch.shape[-1]
    _, h, w = padded.shape
    for k in range(8):
        undone = dihedral_inverse(patch, k)
        for top in range(h - p + 1):
            for left in range(w - p + 1):
                if torch.equal(padded[:, top : top + p, left : left + p], undone):
                    return top, left, k
    return None


# ------------------------------------------------------------------------------ dihedral


def test_dihedral_elements_distinct_and_invertible():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).view(2, 4, 4)
    outs = [dihedral(x, k) for k in range(8)]
    for i in range(8):
        for j in range(i + 1, 8):
            assert not torch.equal(outs[i], outs[j]), (i, j)
    for k in range(8):
        torch.testing.assert_close(dihedral_inverse(dihedral(x, k), k), x)
        torch.testing.assert_close(dihedral(dihedral_inverse(x, k), k), x)
        assert DIHEDRAL_INVERSE[DIHEDRAL_INVERSE[k]] == k
    # batched input transforms each image the same way
    xb = torch.stack([x, x + 100])
    for k in range(8):
        torch.testing.assert_close(dihedral(xb, k)[1], dihedral(x + 100, k))
    with pytest.raises(ValueError):
        dihedral(x, 8)


def test_dihedral_numbering():
    x = torch.arange(6, dtype=torch.float32).view(1, 2, 3)  # non-square: catches H/W mix-ups
    torch.testing.assert_close(dihedral(x, 1), x.flip(1))
    torch.testing.assert_close(dihedral(x, 2), x.flip(2))
    torch.testing.assert_close(dihedral(x, 3), torch.rot90(x, dims=(1, 2)))
    torch.testing.assert_close(dihedral(x, 4), torch.rot90(x, k=2, dims=(1, 2)))
    torch.testing.assert_close(dihedral(x, 5), torch.rot90(x, k=3, dims=(1, 2)))
    torch.testing.assert_close(dihedral(x, 6), torch.rot90(x.flip(1), dims=(1, 2)))
    torch.testing.assert_close(dihedral(x, 7), torch.rot90(x.flip(2), dims=(1, 2)))
    # 7 is the transpose, 6 the anti-transpose
    torch.testing.assert_close(dihedral(x, 7), x.transpose(1, 2))
    torch.testing.assert_close(dihedral(x, 6), x.transpose(1, 2).flip(1).flip(2))
    assert {tuple(dihedral(x, k).shape) for k in (3, 5, 6, 7)} == {(1, 3, 2)}


# ------------------------------------------------------------------------------ padding


def test_reflect_pad_matches_numpy_reflect():
    x = torch.rand(3, 5, 7)
    for mh, mw in [(5, 7), (8, 7), (5, 12), (30, 40), (9, 13)]:
        got = reflect_pad_to(x, mh, mw)
        ph, pw = max(mh - 5, 0), max(mw - 7, 0)
        ref = np.pad(x.numpy(), ((0, 0), (0, ph), (0, pw)), mode="reflect")
        np.testing.assert_array_equal(got.numpy(), ref)
    # mirror without repeating the edge pixel: [a, b, c] -> [a, b, c, b, a, b, c]
    row = torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 3)
    assert reflect_pad_to(row, 1, 7).flatten().tolist() == [1, 2, 3, 2, 1, 2, 3]
    one = torch.tensor([4.0]).view(1, 1, 1)
    assert reflect_pad_to(one, 3, 2).flatten().tolist() == [4.0] * 6


def test_small_image_is_reflect_padded_before_crop():
    h, w, p = 10, 300, 64
    img = torch.rand(3, h, w)
    cfg = AugmentConfig(patch_size=p, flips=False, saturation_prob=0.0)
    padded = np.pad(img.numpy(), ((0, 0), (0, p - h), (0, 0)), mode="reflect")
    # padded rows mirror the image: row 10 = row 8, row 11 = row 7, ... row 18 = row 0, row 19 = row 1
    np.testing.assert_array_equal(padded[:, 10], padded[:, 8])
    np.testing.assert_array_equal(padded[:, 18], padded[:, 0])
    np.testing.assert_array_equal(padded[:, 19], padded[:, 1])
    for seed in range(3):
        out_i, out_t = augment_pair(img, img.clone(), cfg, gen(seed))
        assert out_i.shape == (3, p, p)
        torch.testing.assert_close(out_i, out_t)
        # height 10 < 64: the crop must start at row 0 and contain the mirrored rows
        cols = [
            c for c in range(w - p + 1) if np.array_equal(padded[:, :, c : c + p], out_i.numpy())
        ]
        assert cols, "output is not a crop of the reflect-padded image"


# ------------------------------------------------------------------------------ saturation


def test_saturation_identity_gray_and_hand_values():
    x = torch.rand(3, 8, 8)
    torch.testing.assert_close(adjust_saturation(x, 1.0), x)
    gray = torch.rand(1, 8, 8).expand(3, 8, 8)
    for f in (0.8, 1.2, 0.0, 3.0):
        torch.testing.assert_close(adjust_saturation(gray, f), gray)
    # pure red, factor 0.5: gray = 0.299; R = 0.299 + 0.5 * 0.701; G = B = 0.299 - 0.5 * 0.299
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    torch.testing.assert_close(
        adjust_saturation(red, 0.5).flatten(), torch.tensor([0.6495, 0.1495, 0.1495])
    )
    # factor 2: R = 0.299 + 2 * 0.701 = 1.701 -> clamped to 1; G = B = 0.299 - 0.598 < 0 -> 0
    torch.testing.assert_close(adjust_saturation(red, 2.0).flatten(), torch.tensor([1.0, 0.0, 0.0]))
    one = torch.rand(1, 4, 4)
    torch.testing.assert_close(adjust_saturation(one, 1.2), one)


def test_saturation_probability_and_range():
    cfg = AugmentConfig(patch_size=4)
    sats = [sample_params(4, 4, cfg, gen(s)).saturation for s in range(600)]
    applied = [s for s in sats if s is not None]
    assert 150 < len(applied) < 250  # ~1/3 of 600 = 200
    assert all(0.8 <= s <= 1.2 for s in applied)
    never = AugmentConfig(patch_size=4, saturation_prob=0.0)
    assert all(sample_params(4, 4, never, gen(s)).saturation is None for s in range(50))


# ------------------------------------------------------------------------------ pairs


def test_pair_gets_identical_transforms():
    img = coord_image(40, 50)
    cfg = AugmentConfig(patch_size=16, saturation_prob=1.0)
    for seed in range(10):
        a, b = augment_pair(img, img.clone(), cfg, gen(seed))
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        # 1 - x commutes with everything here (the luma weights sum to 1, the clamp is symmetric)
        a, b = augment_pair(img, 1 - img, cfg, gen(seed))
        torch.testing.assert_close(b, 1 - a)


def test_output_is_a_dihedral_image_of_a_crop():
    img = coord_image(20, 24)
    cfg = AugmentConfig(patch_size=8, saturation_prob=0.0)
    seen_k = set()
    for seed in range(12):
        g = gen(seed)
        params = sample_params(20, 24, cfg, gen(seed))
        a, _ = augment_pair(img, img, cfg, g)
        assert a.shape == (3, 8, 8)
        found = find_crop(img, a)
        assert found is not None
        top, left, k = found
        assert (top, left, k) == (params.top, params.left, params.k)
        torch.testing.assert_close(a, apply_params(img, params, cfg))
        seen_k.add(k)
    assert len(seen_k) > 3


def test_dihedral_choice_is_uniform_and_flips_can_be_disabled():
    cfg = AugmentConfig(patch_size=4)
    counts = Counter(sample_params(4, 4, cfg, gen(s)).k for s in range(1600))
    assert set(counts) == set(range(8))
    assert all(150 < n < 250 for n in counts.values())  # 200 expected each
    off = AugmentConfig(patch_size=4, flips=False)
    assert {sample_params(4, 4, off, gen(s)).k for s in range(100)} == {0}


def test_crop_positions_cover_the_image():
    cfg = AugmentConfig(patch_size=4)
    tops = {sample_params(6, 9, cfg, gen(s)).top for s in range(200)}
    lefts = {sample_params(6, 9, cfg, gen(s)).left for s in range(200)}
    assert tops == {0, 1, 2}
    assert lefts == {0, 1, 2, 3, 4, 5}


def test_exact_size_and_determinism():
    x = torch.rand(3, 33, 70)
    y = torch.rand(3, 33, 70)
    cfg = AugmentConfig(patch_size=32)
    a1, b1 = augment_pair(x, y, cfg, gen(123))
    a2, b2 = augment_pair(x, y, cfg, gen(123))
    assert a1.shape == b1.shape == (3, 32, 32)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    different = [not torch.equal(augment_pair(x, y, cfg, gen(s))[0], a1) for s in range(124, 134)]
    assert any(different)
    # a generator continues its stream: consecutive calls differ but replay identically
    g1, g2 = gen(7), gen(7)
    seq1 = [augment_pair(x, y, cfg, g1)[0] for _ in range(3)]
    seq2 = [augment_pair(x, y, cfg, g2)[0] for _ in range(3)]
    assert all(torch.equal(u, v) for u, v in zip(seq1, seq2))


def test_default_patch_256_with_padding():
    x = torch.rand(3, 100, 300)
    a, b = augment_pair(x, x.clone(), AugmentConfig(), gen(0))
    assert a.shape == b.shape == (3, 256, 256)
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1


def test_shape_errors():
    with pytest.raises(ValueError):
        augment_pair(torch.rand(3, 8, 8), torch.rand(3, 8, 9), AugmentConfig(patch_size=4), gen(0))
    with pytest.raises(ValueError):
        augment_pair(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), AugmentConfig(4), gen(0))

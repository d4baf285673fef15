"""Tests of nerdrain.losses against values worked out by hand.

Hand derivations used below (1-D, because every operator here is separable):

* Edge-loss Gaussian ``w = [.05,.25,.4,.25,.05]``, replicate padding. For a constant image the
  first filtering gives the constant back; zero insertion times 2 (per dimension) gives
  ``z = [2,0,2,0,...]``; filtering ``z`` with replicate padding gives, for even n >= 4,
  ``a = [1.5, 1.1, 1, ..., 1, 0.9, 0.5]`` (e.g. a_0 = 2*(.05+.25+.4+.05), the two left pad taps
  copying z_0 = 2; a_{n-1} = 2*.25, the right pad copying z_{n-1} = 0). So
  ``laplacian(c)[i, j] = c * (1 - a_i * a_j)``: zero in the interior, *not* at the border.
* Rows alternating s = [1,-1,1,-1,1,-1,1,-1] (constant along columns): filtered s =
  [.5,.1,0,0,0,0,-.1,-.5]; zero insertion x2 of its even samples = [1,0,0,0,0,0,-.2,0]; filtered
  again: A s = [.7,.3,.05,0,-.01,-.05,-.08,-.05]; so laplacian = s_i - (A s)_i * a_j. Without the
  first filtering (the SPEC's short form) it would be s_i - a_i * a_j.
* Pyramid kernel [1,4,6,4,1]/16, reflect padding: row [0,1,2,3] pads to [2,1,0,1,2,3,2,1] and blurs
  to b = [12,18,30,36]/16 = [.75,1.125,1.875,2.25]. The 4x4 image 4i+j blurs to 4 b_i + b_j; 2x2
  block means of b are m = [.9375, 2.0625]; so pyrdown = 4 m_p + m_q.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch

from nerdrain.losses import (
    CharbonnierLoss,
    EdgeLoss,
    FFTLoss,
    NeRDRainLoss,
    build_pyramid,
    conv_gauss,
    laplacian,
    pyrdown,
)

EPS = 1e-3


class Out(NamedTuple):
    full: torch.Tensor
    mid: torch.Tensor
    small: torch.Tensor
    inr_mid: torch.Tensor
    inr_small: torch.Tensor


def a_vec(n: int) -> torch.Tensor:
    """Low-pass response to a constant 1 along one axis, length n (even, >= 4); see module doc."""
    a = torch.ones(n, dtype=torch.float64)
    a[0], a[1], a[-2], a[-1] = 1.5, 1.1, 0.9, 0.5
    return a


# ------------------------------------------------------------------------------ Charbonnier


def test_charbonnier_hand_values():
    x = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    y = torch.tensor([[[[0.0, 3e-3], [-4e-3, 1.0]]]], dtype=torch.float64)
    # sqrt(0 + 1e-6) = 1e-3; sqrt(9e-6 + 1e-6) = sqrt(1e-5); sqrt(16e-6 + 1e-6) = sqrt(1.7e-5);
    # sqrt(1 + 1e-6)
    expected = (1e-3 + math.sqrt(1e-5) + math.sqrt(1.7e-5) + math.sqrt(1 + 1e-6)) / 4
    got = CharbonnierLoss()(x, y)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # symmetric, and identical inputs give exactly eps (not 0)
    assert CharbonnierLoss()(y, x).item() == pytest.approx(expected, rel=1e-12)
    assert CharbonnierLoss()(y, y).item() == pytest.approx(EPS, rel=1e-12)
    assert CharbonnierLoss(eps=0.5)(y, y).item() == pytest.approx(0.5, rel=1e-12)


# ------------------------------------------------------------------------------ FFT


@pytest.mark.parametrize("c", [0.3, -0.7])
def test_fft_loss_constant_offset(c):
    # FFT2 of a constant c on HxW is c*H*W at DC and 0 elsewhere, per channel.
    tgt = torch.rand(2, 3, 4, 6, dtype=torch.float64)
    pred = tgt + c
    # complex modulus: |c| H W / (H W) = |c|
    assert FFTLoss()(pred, tgt).item() == pytest.approx(abs(c), rel=1e-10)
    # stacked real/imag: |c| H W / (2 H W) = |c| / 2
    assert FFTLoss("real_imag")(pred, tgt).item() == pytest.approx(abs(c) / 2, rel=1e-10)


def test_fft_loss_complex_spectrum():
    # x = [0,1,0,0] along W: X_k = exp(-2 pi i k / 4) = [1, -i, -1, i], all of modulus 1.
    x = torch.tensor([0.0, 1.0, 0.0, 0.0]).view(1, 1, 1, 4)
    y = torch.zeros_like(x)
    assert FFTLoss()(x, y).item() == pytest.approx(1.0, abs=1e-6)
    # real/imag stacked: |.| values [1,0, 0,1, 1,0, 0,1] -> mean 0.5
    assert FFTLoss("real_imag")(x, y).item() == pytest.approx(0.5, abs=1e-6)
    # x = [1,2] along W: X = [3, -1] -> (3 + 1) / 2
    x2 = torch.tensor([1.0, 2.0]).view(1, 1, 1, 2)
    assert FFTLoss()(x2, torch.zeros_like(x2)).item() == pytest.approx(2.0, abs=1e-6)
    with pytest.raises(ValueError):
        FFTLoss("bogus")


# ------------------------------------------------------------------------------ Laplacian / edge


def test_conv_gauss_preserves_constants():
    c = torch.full((1, 3, 7, 9), 0.42, dtype=torch.float64)
    torch.testing.assert_close(conv_gauss(c), c)


@pytest.mark.parametrize("n", [4, 8, 16])
def test_laplacian_of_constant_is_zero_inside_not_at_border(n):
    c = 0.6
    x = torch.full((1, 3, n, n), c, dtype=torch.float64)
    a = a_vec(n)
    expected = c * (1 - torch.outer(a, a))
    lap = laplacian(x)
    for ch in range(3):
        torch.testing.assert_close(lap[0, ch], expected)
    if n >= 8:
        assert lap[..., 2:-2, 2:-2].abs().max().item() < 1e-12
    assert lap[0, 0, 0, 0].item() == pytest.approx(c * (1 - 1.5 * 1.5))


def test_laplacian_follows_spec_form_and_prefilter_variant_differs():
    s = torch.tensor([1.0, -1.0] * 4, dtype=torch.float64)
    x = s.view(1, 1, 8, 1).expand(1, 3, 8, 8).contiguous()
    a = a_vec(8)
    As = torch.tensor([0.7, 0.3, 0.05, 0.0, -0.01, -0.05, -0.08, -0.05], dtype=torch.float64)
    released = s[:, None] - torch.outer(As, a)  # MPRNet: filter -> subsample -> zero-insert -> filter
    short = s[:, None] - torch.outer(a, a)  # subsample -> zero-insert -> filter (SPEC one-liner)
    torch.testing.assert_close(laplacian(x, prefilter=True)[0, 1], released)
    torch.testing.assert_close(laplacian(x)[0, 1], short)
    assert not torch.allclose(released, short)


def test_edge_loss_identical_and_constant_inputs():
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    # identical inputs: Laplacians equal, Charbonnier of zero difference = eps
    assert EdgeLoss()(x, x).item() == pytest.approx(EPS, rel=1e-12)
    # adding a constant changes the Laplacian only at the border (see a_vec) -> hand formula
    n, c = 16, 0.25
    a = a_vec(n)
    d = c * (1 - torch.outer(a, a))
    expected = torch.sqrt(d * d + EPS * EPS).mean().item()
    assert EdgeLoss()(x + c, x).item() == pytest.approx(expected, rel=1e-10)
    # two constant images behave the same way
    p = torch.full((1, 3, n, n), 0.9, dtype=torch.float64)
    t = torch.full((1, 3, n, n), 0.65, dtype=torch.float64)
    assert EdgeLoss()(p, t).item() == pytest.approx(expected, rel=1e-10)


def test_edge_loss_matches_charbonnier_of_laplacians():
    torch.manual_seed(0)
    x, y = torch.rand(2, 1, 3, 12, 10, dtype=torch.float64)
    lx, ly = laplacian(x), laplacian(y)
    expected = torch.sqrt((lx - ly) ** 2 + EPS**2).mean()
    torch.testing.assert_close(EdgeLoss()(x, y), expected)


# ------------------------------------------------------------------------------ pyramid


def test_pyrdown_4x4_hand_values():
    x = torch.arange(16, dtype=torch.float64).view(1, 1, 4, 4)  # x[i, j] = 4 i + j
    expected = torch.tensor([[4.6875, 5.8125], [9.1875, 10.3125]], dtype=torch.float64)
    torch.testing.assert_close(pyrdown(x)[0, 0], expected)
    # align_corners=True samples the blurred corners 4 b_i + b_j, i, j in {0, 3}: the values given
    # in kornia's own pyrdown docstring, [[3.75, 5.25], [9.75, 11.25]].
    corners = torch.tensor([[3.75, 5.25], [9.75, 11.25]], dtype=torch.float64)
    torch.testing.assert_close(pyrdown(x, align_corners=True)[0, 0], corners)


def test_pyrdown_even_size_is_2x2_mean_of_blur():
    torch.manual_seed(1)
    x = torch.rand(2, 3, 12, 8, dtype=torch.float64)
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=torch.float64) / 16
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    blur = torch.nn.functional.conv2d(
        xp, torch.outer(k, k).expand(3, 1, 5, 5).contiguous(), groups=3
    )
    expected = torch.nn.functional.avg_pool2d(blur, 2)
    torch.testing.assert_close(pyrdown(x), expected)


def test_pyramid_shapes_and_constant():
    x = torch.full((2, 3, 32, 48), 0.37)
    pyr = build_pyramid(x, 3)
    assert [tuple(p.shape) for p in pyr] == [(2, 3, 32, 48), (2, 3, 16, 24), (2, 3, 8, 12)]
    assert pyr[0] is x
    for p in pyr:
        torch.testing.assert_close(p, torch.full_like(p, 0.37))
    y = torch.rand(1, 3, 16, 16)
    pyr = build_pyramid(y, 3)
    torch.testing.assert_close(pyr[2], pyrdown(pyrdown(y)))


# ------------------------------------------------------------------------------ NeRDRainLoss


def test_total_loss_constant_outputs_by_hand():
    # target 0 (pyramid of 0 is 0), every output the constant c.
    c, n = 0.2, 16
    tgt = torch.zeros(1, 3, n, n, dtype=torch.float64)

    def full(s):
        return torch.full((1, 3, s, s), c, dtype=torch.float64)

    outs = Out(full(n), full(n // 2), full(n // 4), full(n // 2), full(n // 4))
    total, parts = NeRDRainLoss()(outs, tgt)

    char = 3 * math.sqrt(c * c + EPS * EPS)
    fft = 3 * c
    edge = 0.0
    for s in (n, n // 2, n // 4):
        a = a_vec(s)
        d = c * (1 - torch.outer(a, a))
        edge += torch.sqrt(d * d + EPS * EPS).mean().item()
    l1 = 2 * c
    assert parts["char"].item() == pytest.approx(char, rel=1e-10)
    assert parts["fft"].item() == pytest.approx(fft, rel=1e-10)
    assert parts["edge"].item() == pytest.approx(edge, rel=1e-10)
    assert parts["inr_l1"].item() == pytest.approx(l1, rel=1e-10)
    expected = char + 0.01 * fft + 0.05 * edge + 0.1 * l1
    assert total.item() == pytest.approx(expected, rel=1e-10)
    assert parts["total"].item() == pytest.approx(expected, rel=1e-10)


def test_total_loss_combines_parts_with_weights():
    torch.manual_seed(2)
    tgt = torch.rand(2, 3, 32, 32)
    outs = Out(
        torch.rand(2, 3, 32, 32),
        torch.rand(2, 3, 16, 16),
        torch.rand(2, 3, 8, 8),
        torch.rand(2, 3, 16, 16),
        torch.rand(2, 3, 8, 8),
    )
    t0, t1, t2 = build_pyramid(tgt, 3)
    ch, ff, ed = CharbonnierLoss(), FFTLoss(), EdgeLoss()
    pairs = [(outs.full, t0), (outs.mid, t1), (outs.small, t2)]
    char = sum(ch(p, t) for p, t in pairs)
    fft = sum(ff(p, t) for p, t in pairs)
    edge = sum(ed(p, t) for p, t in pairs)
    l1 = (outs.inr_mid - t1).abs().mean() + (outs.inr_small - t2).abs().mean()

    total, parts = NeRDRainLoss()(outs, tgt)
    torch.testing.assert_close(total, char + 0.01 * fft + 0.05 * edge + 0.1 * l1)
    for k, v in {"char": char, "fft": fft, "edge": edge, "inr_l1": l1}.items():
        torch.testing.assert_close(parts[k], v)
        assert not parts[k].requires_grad

    w = NeRDRainLoss(char_weight=2.0, fft_weight=0.5, edge_weight=3.0, inr_weight=0.0)
    total_w, _ = w(outs, tgt)
    torch.testing.assert_close(total_w, 2.0 * char + 0.5 * fft + 3.0 * edge)

    # the released 7-item list [full, mid, small, r2, m/2, r1, x1] and a dict give the same
    released = [outs.full, outs.mid, outs.small, outs.inr_mid, torch.zeros(1), outs.inr_small, torch.zeros(1)]
    torch.testing.assert_close(NeRDRainLoss()(released, tgt)[0], total)
    torch.testing.assert_close(NeRDRainLoss()(outs._asdict(), tgt)[0], total)


def test_shape_mismatch_is_reported():
    tgt = torch.rand(1, 3, 32, 32)
    outs = Out(*(torch.rand(1, 3, s, s) for s in (32, 16, 16, 16, 8)))
    with pytest.raises(ValueError, match="small"):
        NeRDRainLoss()(outs, tgt)


def test_gradients_flow_to_every_output():
    torch.manual_seed(3)
    tgt = torch.rand(1, 3, 32, 32)
    outs = Out(*(torch.rand(1, 3, s, s, requires_grad=True) for s in (32, 16, 8, 16, 8)))
    total, _ = NeRDRainLoss()(outs, tgt)
    total.backward()
    for name, t in outs._asdict().items():
        assert t.grad is not None, name
        assert torch.isfinite(t.grad).all(), name
        assert t.grad.abs().sum() > 0, name


def test_bf16_autocast():
    torch.manual_seed(4)
    tgt = torch.rand(1, 3, 32, 32)
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    base = [torch.rand(1, 3, s, s) for s in (32, 16, 8, 16, 8)]
    loss_fn = NeRDRainLoss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = Out(*(conv(b) for b in base))
        assert outs.full.dtype == torch.bfloat16
        total, parts = loss_fn(outs, tgt)
    assert total.dtype == torch.float32
    assert torch.isfinite(total)
    total.backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
    # same value as the fp32 loss on the (bf16-rounded) outputs
    ref, _ = loss_fn(Out(*(o.detach().float() for o in outs)), tgt)
    torch.testing.assert_close(total.detach(), ref, rtol=1e-5, atol=1e-6)


def test_cached_filter_kernel_is_usable_for_backward_after_inference_mode():
    """The Gaussian kernel is cached per device; one first made under inference mode must still be
    a normal tensor, or a later training step could not save it for backward."""
    from nerdrain.losses import edge_loss

    x, y = torch.rand(1, 5, 24, 24), torch.rand(1, 5, 24, 24)  # 5 channels: a kernel no other test caches first
    with torch.inference_mode():
        expected = edge_loss(x, y)
    x.requires_grad_(True)
    loss = edge_loss(x, y)
    loss.backward()
    assert torch.equal(loss.detach(), expected) and x.grad is not None and x.grad.abs().sum() > 0

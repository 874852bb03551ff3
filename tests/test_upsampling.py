"""Edge-aware joint upsampling (guided filter) of class probabilities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from idgbr_geo import upsampling as U


def _brute_box(x: torch.Tensor, r: int, w: torch.Tensor | None = None) -> torch.Tensor:
    out = torch.zeros_like(x)
    h, wd = x.shape[-2:]
    for i in range(h):
        for j in range(wd):
            sl = (slice(max(0, i - r), i + r + 1), slice(max(0, j - r), j + r + 1))
            if w is None:
                out[..., i, j] = x[(..., *sl)].mean((-2, -1))
            else:
                ww = w[sl]
                out[..., i, j] = (x[(..., *sl)] * ww).sum((-2, -1)) / ww.sum()
    return out


@pytest.mark.parametrize("r", [1, 2, 5])
def test_box_mean_is_the_clipped_window_mean(r):
    g = torch.Generator().manual_seed(r)
    x = torch.rand(2, 3, 17, 13, generator=g)
    torch.testing.assert_close(U.box_mean(x, r), _brute_box(x, r), atol=1e-6, rtol=0)
    w = (torch.rand(17, 13, generator=g) > 0.3).float()
    w[:3, :3] = 0  # a window with no weight at all gives 0, never NaN
    got = U.box_mean(x, 1, w)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[..., 5:, 5:], _brute_box(x, 1, w)[..., 5:, 5:],
                               atol=1e-6, rtol=0)


def test_guided_filter_keeps_constants_and_linear_functions_of_the_guide():
    g = torch.rand(1, 40, 50, generator=torch.Generator().manual_seed(0))
    const = torch.full((2, 40, 50), 0.3)
    torch.testing.assert_close(U.guided_filter(g, const, 2, 1e-3), const, atol=1e-5, rtol=0)
    lin = 0.2 + 0.5 * g
    torch.testing.assert_close(U.guided_filter(g, lin, 3, 1e-8), lin, atol=1e-3, rtol=0)


def test_colour_guide_with_identical_bands_equals_the_grey_guide():
    g = torch.rand(1, 30, 30, generator=torch.Generator().manual_seed(1))
    p = torch.rand(2, 30, 30, generator=torch.Generator().manual_seed(2))
    grey = U.guided_filter(g, p, 2, 1e-3)
    # three equal bands: the colour filter's variance is 3x the grey one's along (1,1,1)
    colour = U.guided_filter(g.expand(3, -1, -1).contiguous(), p, 2, 3e-3)
    torch.testing.assert_close(grey, colour, atol=1e-4, rtol=0)


def _edge_scene(factor: int = 4, size: int = 96, col: int = 41, seed: int = 0):
    """A native image (3, size, size) with a vertical edge at ``col`` (off the model grid),
    its model-grid version and the model's soft probabilities there."""
    rng = np.random.default_rng(seed)
    img = np.full((3, size, size), 0.3, np.float32)
    img[:, :, col:] = 0.7
    img += rng.normal(0, 0.01, img.shape).astype(np.float32)
    high = torch.from_numpy(img)
    low = F.avg_pool2d(high[None], factor)[0]
    # the 'model' is right on its own grid (a pixel is building when mostly building),
    # but soft: a ramp over a few model pixels
    p1 = (low.mean(0) > 0.5).float()
    p1 = F.avg_pool2d(p1[None, None], 3, stride=1, padding=1, count_include_pad=False)[0, 0]
    return high, low, torch.stack([1 - p1, p1])


def test_guided_upsampling_puts_the_boundary_on_the_native_edge():
    high, low, probs = _edge_scene()
    size = tuple(high.shape[-2:])
    bil = F.interpolate(probs[None], size=size, mode="bilinear", align_corners=False)[0]
    got = U.upsample_probabilities(probs, low, high)
    truth = np.zeros(size, bool)
    truth[:, 41:] = True
    err_bil = (bil.argmax(0).numpy().astype(bool) != truth).mean()
    err_got = (got.argmax(0).numpy().astype(bool) != truth).mean()
    assert err_got == 0 < err_bil
    # and the probabilities are sharper across the edge than the bilinear ones
    assert (got[1, :, 41] - got[1, :, 40]).mean() > 2 * (bil[1, :, 41] - bil[1, :, 40]).mean()


@pytest.mark.parametrize("k", [2, 3])
def test_results_are_probabilities(k):
    g = torch.Generator().manual_seed(k)
    high = torch.rand(3, 64, 72, generator=g)
    low = F.avg_pool2d(high[None], 4)[0]
    probs = torch.softmax(torch.randn(k, 16, 18, generator=g) * 4, 0)
    for colour in (False, True):
        q = U.upsample_probabilities(probs, low, high, eps=1e-5, colour=colour)
        assert q.shape == (k, 64, 72)
        assert (q >= 0).all()
        torch.testing.assert_close(q.sum(0), torch.ones(64, 72), atol=1e-5, rtol=0)


def test_probabilities_that_do_not_sum_to_one_are_renormalised():
    g = torch.Generator().manual_seed(3)
    high = torch.rand(3, 32, 32, generator=g)
    low = F.avg_pool2d(high[None], 2)[0]
    probs = torch.rand(2, 16, 16, generator=g)  # e.g. a user's two probability bands
    q = U.upsample_probabilities(probs, low, high)
    assert (q >= 0).all()
    torch.testing.assert_close(q.sum(0), torch.ones(32, 32), atol=1e-5, rtol=0)


def test_nodata_is_left_out_of_the_fit_and_gets_the_bilinear_values():
    high, low, probs = _edge_scene()
    valid_low = torch.ones(low.shape[1:], dtype=torch.bool)
    valid_low[5:9, 3:7] = False
    valid_high = torch.ones(high.shape[1:], dtype=torch.bool)
    valid_high[20:36, 12:28] = False  # (the same ground)
    outs = []
    for junk in (0.0, 1e6):
        h, lo = high.clone(), low.clone()
        h[:, ~valid_high] = float("nan") if junk else 0.0
        lo[:, ~valid_low] = junk  # whatever the invalid model pixels hold
        outs.append(U.upsample_probabilities(probs, lo, h, valid_low=valid_low,
                                             valid_high=valid_high))
    a, b = outs
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    bil = F.interpolate(probs[None], size=tuple(high.shape[-2:]), mode="bilinear",
                        align_corners=False)[0]
    torch.testing.assert_close(a[:, ~valid_high], bil[:, ~valid_high])


def test_colour_guide_sees_edges_of_equal_brightness():
    """Red against green of the same mean: invisible to the grey guide, not to the colour
    one (the option measured in benchmarks/native_resolution.py)."""
    img = np.zeros((3, 64, 64), np.float32)
    img[0, :, :27] = 0.8
    img[1, :, 27:] = 0.8
    high = torch.from_numpy(img)
    low = F.avg_pool2d(high[None], 4)[0]
    p1 = torch.zeros(16, 16)
    p1[:, 7:] = 1.0
    p1 = F.avg_pool2d(p1[None, None], 3, stride=1, padding=1, count_include_pad=False)[0, 0]
    probs = torch.stack([1 - p1, p1])
    truth = np.zeros((64, 64), bool)
    truth[:, 27:] = True
    col = U.upsample_probabilities(probs, low, high, colour=True, eps=1e-3, radius=2)
    grey = U.upsample_probabilities(probs, low, high, colour=False, eps=1e-3, radius=2)
    assert (col.argmax(0).numpy().astype(bool) != truth).mean() == 0
    assert (grey.argmax(0).numpy().astype(bool) != truth).mean() > 0


def test_closed_form_rgb_solve_matches_linalg():
    g = torch.Generator().manual_seed(5)
    m = torch.rand(3, 3, 8, 9, generator=g)
    spd = torch.einsum("ijhw,kjhw->ikhw", m, m) + 1e-3 * torch.eye(3)[:, :, None, None]
    iu = torch.triu_indices(3, 3)
    rhs = torch.rand(2, 3, 8, 9, generator=g)
    got = U._solve_symmetric(3, spd[iu[0], iu[1]], rhs)
    want = torch.linalg.solve(spd.permute(2, 3, 0, 1), rhs.permute(2, 3, 1, 0)).permute(3, 2, 0, 1)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


def test_radius_keeps_the_reach_inside_the_stitching_margin():
    assert U.radius_for(64) == min(U.RADIUS, 7)  # the bundled cards' overlap
    for overlap in (0, 8, 16, 32, 48, 64, 128):
        r = U.radius_for(overlap)
        assert 1 <= r <= U.RADIUS
        assert 2 * r + 2 <= max(overlap / 4, 4)

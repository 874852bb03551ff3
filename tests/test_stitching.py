"""The row-band stitcher against a brute-force whole-raster blend."""

from __future__ import annotations

import numpy as np
import pytest

from idgbr_geo.stitching import RowStitcher, taper, window_weights


def _windows(height: int, width: int, size: int, step: int) -> list[tuple[int, int, int, int]]:
    rows = list(range(0, max(height - size, 0) + 1, step))
    cols = list(range(0, max(width - size, 0) + 1, step))
    if rows[-1] + size < height:
        rows.append(height - size)
    if cols[-1] + size < width:
        cols.append(width - size)
    return [(r, c, min(size, height - r), min(size, width - c)) for r in rows for c in cols]


@pytest.mark.parametrize(("height", "width", "size", "step", "capacity", "block"), [
    (300, 170, 64, 48, 64 + 32, 32),    # capacity barely above a window: constant wrap-around
    (257, 90, 100, 70, 100 + 64, 64),   # height not a multiple of anything
    (128, 128, 128, 128, 128 + 256, 256),  # one window, capacity larger than the raster
])
def test_ring_buffer_equals_whole_raster_blend(height, width, size, step, capacity, block):
    rng = np.random.default_rng(height)
    k, overlap = 3, size - step
    acc = np.zeros((k, height, width))
    wsum = np.zeros((height, width))
    valid_all = np.zeros((height, width), bool)
    got_ids = np.full((height, width), 99, np.uint8)
    got_probs = np.zeros((k, height, width), np.float32)
    flushed: list[tuple[int, int]] = []

    def flush(r0, r1, strip):
        flushed.append((r0, r1))
        ids = strip.class_ids()
        got_ids[r0:r1] = np.where(strip.covered, ids, 255)
        got_probs[:, r0:r1] = strip.probs

    st = RowStitcher(width, height, k, capacity=capacity, block=block, flush=flush)
    row = -1
    for r, c, h, w in _windows(height, width, size, step):
        if r != row:
            st.finish_before(r)
            row = r
        p = rng.random((k, h, w)).astype(np.float32)
        valid = rng.random((h, w)) > 0.1 if rng.random() < 0.5 else np.ones((h, w), bool)
        wt = window_weights(r, c, h, w, height, width, overlap)
        st.add(r, c, p, wt, None if valid.all() else valid)  # None: all valid
        acc[:, r:r + h, c:c + w] += p * (wt * valid)
        wsum[r:r + h, c:c + w] += wt * valid
        valid_all[r:r + h, c:c + w] |= valid
    st.close()

    # every row flushed exactly once, in order, in whole block rows (the last one may be
    # cut by the raster's edge)
    assert all(r0 % block == 0 and r1 - r0 == min(block, height - r0) for r0, r1 in flushed)
    assert flushed[0][0] == 0 and flushed[-1][1] == height
    assert all(a[1] == b[0] for a, b in zip(flushed, flushed[1:], strict=False))
    covered = (wsum > 0) & valid_all
    want = acc / np.where(wsum > 0, wsum, 1)
    np.testing.assert_allclose(got_probs, want, atol=1e-5)
    want_ids = np.where(covered, want.argmax(0), 255)
    assert (got_ids == want_ids).mean() > 0.9999  # ties in float32 vs float64 aside


def test_window_outside_open_band_is_an_error():
    st = RowStitcher(10, 400, 2, capacity=128, block=64, flush=lambda *a: None)
    st.add(0, 0, np.ones((2, 64, 10), np.float32), np.ones((64, 10), np.float32),
           np.ones((64, 10), bool))
    with pytest.raises(RuntimeError):
        st.add(100, 0, np.ones((2, 64, 10), np.float32), np.ones((64, 10), np.float32),
               np.ones((64, 10), bool))


def test_taper_zero_margin_then_ramp_and_no_taper_at_raster_border():
    w = taper(64, 0, 200, 32)  # left edge on the border, right edge inside
    assert w[0] == 1.0 and w[31] == 1.0
    assert w[-1] == 0.0 and w[-8] == 0.0  # outer quarter of the overlap is zero
    assert 0.0 < w[-12] < 1.0
    assert np.all(np.diff(w[32:]) <= 0)


def test_binary_stitcher_matches_two_class_stitcher():
    """Blending only class 1 of a two-class softmax gives the same ids and probabilities."""
    height, width, size, step = 200, 150, 64, 40
    rng = np.random.default_rng(7)
    out: dict[bool, tuple[np.ndarray, np.ndarray]] = {}
    windows = _windows(height, width, size, step)
    data = []
    for _r, _c, h, w in windows:
        p1 = rng.random((h, w)).astype(np.float32)
        valid = rng.random((h, w)) > 0.2 if rng.random() < 0.5 else None
        data.append((np.stack([1 - p1, p1]), valid))
    for binary in (False, True):
        ids = np.zeros((height, width), np.uint8)
        probs = np.zeros((2, height, width), np.float32)

        def flush(r0, r1, strip, ids=ids, probs=probs):
            ids[r0:r1] = np.where(strip.covered, strip.class_ids(), 255)
            probs[:, r0:r1] = np.where(strip.covered, strip.probs, 0)

        st = RowStitcher(width, height, 2, capacity=size + 32, block=32, flush=flush,
                         binary=binary)
        row = -1
        for (r, c, h, w), (p, valid) in zip(windows, data, strict=True):
            if r != row:
                st.finish_before(r)
                row = r
            st.add(r, c, p, window_weights(r, c, h, w, height, width, size - step), valid)
        st.close()
        out[binary] = (ids, probs)
    assert (out[True][0] != out[False][0]).mean() < 1e-4  # float ties only
    np.testing.assert_allclose(out[True][1], out[False][1], atol=1e-5)
    with pytest.raises(ValueError):
        RowStitcher(10, 10, 3, capacity=10, block=8, flush=lambda *a: None, binary=True)

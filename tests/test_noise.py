"""Diffusion noise keyed by raster position: same pixel, same noise, standard normal."""

from __future__ import annotations

import numpy as np

from idgbr_geo import noise
from idgbr_geo.noise import batch_noise, position_noise


def _numpy_reference(seed: int, origin: tuple[int, int], shape: tuple[int, int, int]
                     ) -> np.ndarray:
    """The same keys and Box-Muller transform in plain numpy float64 (the original code)."""
    c, h, w = shape
    with np.errstate(over="ignore"):
        rows = np.arange(origin[0], origin[0] + h, dtype=np.uint64)
        cols = np.arange(origin[1], origin[1] + w, dtype=np.uint64)
        base = noise._mix(np.array([seed], dtype=np.uint64))
        base = noise._mix(base ^ np.uint64(0))
        chan = noise._mix(base ^ (np.arange(c, dtype=np.uint64) * np.uint64(0x2545F4914F6CDD1D)))
        key = (rows[:, None] << np.uint64(32)) + cols[None, :]
        bits = noise._mix(chan[:, None, None] ^ noise._mix(key)[None])
    u1 = ((bits >> np.uint64(40)).astype(np.float64) + 0.5) / 16777216.0
    u2 = (((bits >> np.uint64(8)) & np.uint64(0xFFFFFF)).astype(np.float64) + 0.5) / 16777216.0
    return (np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)).astype(np.float32)


def test_noise_matches_the_float64_box_muller_reference():
    z = position_noise(7, (96, 32), (3, 64, 80))
    ref = _numpy_reference(7, (96, 32), (3, 64, 80))
    assert z.dtype == np.float32 and z.shape == ref.shape
    np.testing.assert_allclose(z, ref, rtol=0, atol=2e-6)


def test_overlapping_windows_share_their_noise_and_it_is_standard_normal():
    a = position_noise(1, (0, 0), (2, 64, 64))
    b = position_noise(1, (16, 32), (2, 64, 64))
    assert np.array_equal(a[:, 16:, 32:], b[:, :48, :32])
    assert not np.array_equal(a, position_noise(2, (0, 0), (2, 64, 64)))
    assert not np.array_equal(a[0], a[1])  # channels are independent draws
    big = position_noise(0, (0, 0), (4, 256, 256)).ravel()
    assert abs(big.mean()) < 0.01 and abs(big.std() - 1) < 0.01
    assert abs((np.abs(big) < 1.96).mean() - 0.95) < 0.005


def test_latent_scale_origins_and_batches():
    z = position_noise(3, (8, 4), (2, 4, 4), scale=4)
    assert np.array_equal(z, position_noise(3, (0, 0), (2, 6, 5), scale=4)[:, 2:, 1:])
    t = batch_noise(3, [(0, 0), (8, 4)], (2, 4, 4), scale=4)
    assert tuple(t.shape) == (2, 2, 4, 4) and np.array_equal(t[1].numpy(), z)

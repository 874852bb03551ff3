"""Diffusion noise keyed by global pixel position.

Every pixel's noise is a pure function of (seed, stream, channel, row, column) in the
coordinates of the whole raster, not of the window it is sampled in. Overlapping windows
therefore see identical noise where they overlap (so stitching does not average
independent samples into mush), and a run is reproducible bit for bit for a seed whatever
the tile size, batch size or number of workers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijective, well-scrambled uint64 -> uint64 map."""
    z = z + _GOLD
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def position_noise(
    seed: int,
    origin: tuple[int, int],
    shape: tuple[int, int, int],
    *,
    stream: int = 0,
    scale: int = 1,
) -> np.ndarray:
    """Standard-normal noise of ``shape`` (channels, h, w) for a window at ``origin``.

    ``origin`` is the (row, col) of the window's top-left pixel in full-resolution raster
    coordinates; ``scale`` > 1 samples a grid that is ``scale`` times coarser (latent
    resolution), whose cell (i, j) covers full-resolution pixel (i*scale, j*scale).
    ``stream`` separates independent draws (e.g. the start noise and a per-step noise).
    """
    c, h, w = shape
    r0, c0 = origin
    if r0 % scale or c0 % scale:
        raise ValueError(f"window origin {origin} is not a multiple of the latent scale {scale}")
    with np.errstate(over="ignore"):
        rows = np.arange(r0 // scale, r0 // scale + h, dtype=np.uint64)
        cols = np.arange(c0 // scale, c0 // scale + w, dtype=np.uint64)
        base = _mix(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
        base = _mix(base ^ np.uint64(stream * 0x632BE59BD9B4E019 & 0xFFFFFFFFFFFFFFFF))
        chan = _mix(base ^ (np.arange(c, dtype=np.uint64) * np.uint64(0x2545F4914F6CDD1D)))
        key = (rows[:, None] << np.uint64(32)) + cols[None, :]
        bits = _mix(chan[:, None, None] ^ _mix(key)[None])
    return _box_muller(bits)


def _box_muller(bits: np.ndarray) -> np.ndarray:
    """Two 24-bit uniforms from each 64-bit key -> one standard normal (float32).

    The transcendental part runs in torch (float64, vectorised and threaded): numpy's
    float64 ``log`` / ``cos`` are scalar loops, ~3.8 ms for a 6-class 512 px window's
    latent noise against ~0.5 ms, and the same values."""
    b = torch.from_numpy(bits.view(np.int64))  # same bits; the masks drop the sign
    u1 = (((b >> 40) & 0xFFFFFF).double() + 0.5) / 16777216.0
    u2 = (((b >> 8) & 0xFFFFFF).double() + 0.5) / 16777216.0
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return z.float().numpy()


def batch_noise(
    seed: int,
    origins: Sequence[tuple[int, int]],
    shape: tuple[int, int, int],
    *,
    stream: int = 0,
    scale: int = 1,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Stack :func:`position_noise` for a batch of window origins -> (B, c, h, w) tensor."""
    arr = np.stack([position_noise(seed, o, shape, stream=stream, scale=scale) for o in origins])
    return torch.from_numpy(arr).to(device)

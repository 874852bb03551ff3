"""Inputs whose values do not use the model's value range: a per-band linear stretch.

The models learned from 8-bit products (0..255). Many satellite images arrive as 16-bit
integers holding 11-14-bit values (0..2047 of 0..65535) or as reflectance scaled to
0..10000: divided by the card's range for their type they are almost black, and the
network finds nothing, without a word. For such an input the engine maps each band
linearly from a low to a high percentile of its values (sampled once over the whole scene,
so every window gets the same mapping and the tiles still join) onto the card's range, and
says so; ``value_range`` (CLI ``--value-range LOW,HIGH``) sets the mapping instead, the
same for every band (``0,65535`` keeps a uint16 input as it is).

8-bit inputs are never stretched: they are the products the models were trained on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import rasterio
from rasterio.windows import Window

#: percentiles of each band mapped to the bottom and top of the card's range. Chosen on
#: held-out 8-bit scenes written as 12-bit data (release/research/value_stretch.py, see
#: docs/experiments.md): across 7 sources of both 2-class models, 0-100% and 0.1-99.9%
#: change the models' IoU least (mean +0.0 and -0.2 points; 0.5-99.5% and tighter: -0.5
#: or worse, single sources by up to 3.5); of the two, 0.1-99.9% is not set by a few hot
#: pixels (one saturated pixel decides a min-max stretch)
LOW_PERCENTILE = 0.1
HIGH_PERCENTILE = 99.9
#: stretch when every band's high percentile lies below this share of the card's range
#: (a uint16 image of 14 bits or fewer) ...
UNDERUSED = 0.25
#: ... or when more than this share of the valid values lies above the range (floats in
#: 0..10000 on a card for 0..1; a few hot pixels alone do not count)
OVER_SHARE = 0.01
#: the sample: up to SAMPLE_GRID x SAMPLE_GRID windows of SAMPLE_SIZE pixels spread evenly
#: over the scene (~1 MP read once, whatever the scene's size)
SAMPLE_GRID = 8
SAMPLE_SIZE = 128


@dataclass(frozen=True)
class Stretch:
    """Raw values ``low`` .. ``high`` (per band) -> 0 .. ``target`` (the card's range for
    the input's type), clipped."""

    low: tuple[float, ...]
    high: tuple[float, ...]
    target: float

    def apply(self, data: np.ndarray) -> np.ndarray:
        """(bands, H, W) raw values -> float32 values in 0..target."""
        low = np.asarray(self.low, np.float32)[:, None, None]
        span = np.asarray(self.high, np.float32)[:, None, None] - low
        scale = np.float32(self.target) / span
        out = np.subtract(data, low, dtype=np.float32)
        out *= scale
        return np.clip(out, 0, self.target, out=out)

    def describe(self) -> str:
        """e.g. ``12..2047, 10..1990, 8..1720``."""
        return ", ".join(f"{lo:g}..{hi:g}" for lo, hi in zip(self.low, self.high, strict=True))


def check_value_range(value_range: Sequence[float]) -> str | None:
    """What is wrong with a user's (low, high), or None."""
    if (len(value_range) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v)
                                         for v in value_range)
            or not value_range[0] < value_range[1]):
        return f"must be two finite numbers LOW,HIGH with LOW < HIGH (got {value_range!r})"
    return None


def sample_values(ds: rasterio.DatasetReader, bands: Sequence[int], all_valid: bool
                  ) -> np.ndarray:
    """(bands, N) valid values from windows spread over the scene (nodata, masked and
    non-finite pixels left out; ``all_valid``: the bands have no mask to read)."""
    size = min(SAMPLE_SIZE, ds.width, ds.height)
    nx = min(SAMPLE_GRID, max(1, ds.width // size))
    ny = min(SAMPLE_GRID, max(1, ds.height // size))
    parts = []
    for y in np.linspace(0, ds.height - size, ny).round().astype(int):
        for x in np.linspace(0, ds.width - size, nx).round().astype(int):
            win = Window(int(x), int(y), size, size)
            data = ds.read(list(bands), window=win).reshape(len(bands), -1)
            ok = np.ones(data.shape[1], bool)
            if not all_valid:
                ok &= ds.dataset_mask(window=win).reshape(-1) > 0
            if data.dtype.kind == "f":
                ok &= np.isfinite(data).all(0)
            parts.append(data[:, ok])
    return np.concatenate(parts, axis=1)


def plan_stretch(ds: rasterio.DatasetReader, bands: Sequence[int], target: float,
                 value_range: Sequence[float] | None = None, *, all_valid: bool = False
                 ) -> tuple[Stretch | None, str | None]:
    """The stretch for an input (None: use the values as they are) and, when it was chosen
    from the data, a sentence saying what it does. ``target``: the card's range for the
    input's type; ``value_range``: the user's (low, high), applied to every band;
    ``all_valid``: the bands have no nodata or mask (the engine's ``Source.all_valid``)."""
    n = len(bands)
    if value_range is not None:
        return Stretch((float(value_range[0]),) * n, (float(value_range[1]),) * n,
                       target), None
    if np.dtype(ds.dtypes[bands[0] - 1]) == np.uint8:
        return None, None
    values = sample_values(ds, bands, all_valid)
    if values.shape[1] == 0:
        return None, None
    high = np.percentile(values, HIGH_PERCENTILE, axis=1)
    over = float((values > target).any(0).mean())
    if high.max() >= UNDERUSED * target and over <= OVER_SHARE:
        return None, None
    low = np.percentile(values, LOW_PERCENTILE, axis=1)
    high = np.maximum(high, low + max(1e-6, 1e-6 * abs(float(high.max()))))
    stretch = Stretch(tuple(float(v) for v in low), tuple(float(v) for v in high), target)
    why = (f"values up to {float(values.max()):g} do not fit" if over > OVER_SHARE else
           f"{HIGH_PERCENTILE:g}% of its values lie below {float(high.max()):g}, a small "
           f"part of")
    return stretch, (f"{why} the model's 0..{target:g} for {ds.dtypes[bands[0] - 1]} input: "
                     f"stretching each band from its {LOW_PERCENTILE:g} to its "
                     f"{HIGH_PERCENTILE:g} percentile ({stretch.describe()}) onto that "
                     f"range (set the mapping with the value range option)")

"""A user's coarse map (``refine --coarse``), read window by window.

A class-id raster or K probability bands made by any tool, on the input's grid (or another
grid the engine reads it through). For each window the engine needs it on the model grid
(what the refiner sees) and, when the window is resampled, also as the user gave it, so
that the pixels the refiner leaves alone keep the user's own classes at the input's
resolution (:func:`idgbr_geo.engine.refine_raster`). Nearest resampling here is GDAL's
(pixel-centre aligned), so both grids hold the same classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from rasterio.enums import Resampling
from rasterio.errors import RasterioError

from .errors import InputError
from .tiling import Source, Tile, clip, model_extent


@dataclass
class UserMap:
    """One window of a user's coarse map on the input grid (h, w), as the user gave it: the
    class ids (``ids``, (h, w)) or the probability bands (``bands``, (K, h, w) raw values,
    divided by ``divisor``); ``valid`` (h, w): where both the map and the image hold data
    (None: everywhere)."""

    ids: np.ndarray | None
    bands: np.ndarray | None
    divisor: float
    valid: np.ndarray | None

    @property
    def nbytes(self) -> int:
        arrays = (self.ids, self.bands, self.valid)
        return sum(a.nbytes for a in arrays if a is not None)

    def fill(self, out: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
        """Write its probabilities into ``out`` (K, h, w) float32: the one-hot of the class
        ids, or the scaled bands; only where ``where`` (h, w) is True when given."""
        k = out.shape[0]
        for c in range(k):
            if self.ids is not None:
                v = self.ids == c
            else:
                assert self.bands is not None
                v = self.bands[c].astype(np.float32) / np.float32(self.divisor)
            if where is None:
                out[c] = v
            else:
                np.copyto(out[c], v, where=where)
        return out


def centres(n_to: int, n_from: int) -> np.ndarray:
    """Nearest (pixel-centre aligned) index into an axis of ``n_from`` pixels for each of
    ``n_to`` pixels spanning the same extent: GDAL's nearest-neighbour resampling."""
    i = ((np.arange(n_to) + 0.5) * (n_from / n_to)).astype(np.int64)
    return np.minimum(i, n_from - 1)


def nearest(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(..., h, w) ``a`` resampled (nearest, pixel-centre aligned) to (..., *shape)."""
    h, w = a.shape[-2:]
    if (h, w) == tuple(shape):
        return a
    return a[..., centres(shape[0], h)[:, None], centres(shape[1], w)[None]]


def read_user_map(ds: Any, tile: Tile, src: Source, k: int, *, native: bool = False
                  ) -> tuple[np.ndarray, np.ndarray, UserMap | None]:
    """Read a user's coarse map for a tile: one class-id band -> one-hot, or K probability
    bands (uint8 0..255 or float 0..1). Returns (probabilities, valid) on the model grid
    and, with ``native`` and a resampled window, the map on the input grid as given
    (:class:`UserMap`, its ``valid`` the map's own only; else None).

    Class ids are read at the input's resolution and picked from there for the model grid
    (nearest, as GDAL resamples), so the two grids hold the same classes; every valid pixel
    of the window is checked to be a class of the model's."""
    win = clip(tile.window, src.width, src.height)
    out = model_extent(tile, win, src.factor)
    resampled = (int(win.height), int(win.width)) != out
    try:
        if ds.count == 1:
            ids = ds.read(1, window=win)
            valid = ds.read_masks(1, window=win) > 0
            if np.issubdtype(ids.dtype, np.floating):
                raise InputError("coarse map is a float raster; give class ids (integers) or "
                                 f"{k} probability bands")
            bad = valid & ((ids < 0) | (ids >= k))
            if bad.any():
                raise InputError(f"coarse map has class id {int(ids[bad].max())} but the model "
                                 f"knows {k} classes (0..{k - 1})")
            user = None
            if native and resampled:
                user = UserMap(ids, None, 1.0, None if valid.all() else valid)
            ids_m, valid_m = nearest(ids, out), nearest(valid, out)
            onehot = np.zeros((k, *out), np.float32)
            idx = np.where(valid_m, ids_m, 0).astype(np.int64)
            np.put_along_axis(onehot, idx[None], 1.0, axis=0)
            return onehot, valid_m, user
        if ds.count != k:
            raise InputError(f"coarse map has {ds.count} bands: give 1 class-id band or {k} "
                             "probability bands")
        p = ds.read(window=win, out_shape=(k, *out), resampling=Resampling.bilinear)
        valid = ds.dataset_mask(window=win, out_shape=out) > 0
        divisor = 255.0 if p.dtype == np.uint8 else 1.0
        p = p.astype(np.float32) / divisor
        user = None
        if native and resampled:
            nv = ds.dataset_mask(window=win) > 0
            user = UserMap(None, ds.read(window=win), divisor, None if nv.all() else nv)
        return p, valid, user
    except RasterioError as exc:
        raise InputError(f"failed to read the coarse map: {exc}") from None

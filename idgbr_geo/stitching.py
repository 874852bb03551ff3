"""Seamless stitching of overlapping window predictions, row band by row band.

Each window's per-class probabilities are weighted by a window that is 1 in its interior
and tapers only across the overlap with a neighbour: exactly 0 for the outer quarter of the
overlap (where a network's prediction is spoiled by the window edge), then a linear ramp.
Edges on the raster border are never tapered. The blended result is the weighted sum
divided by the summed weights, so for a translation-equivariant model whose receptive
field is at most half the overlap the stitched map equals the whole-image prediction.

Only the rows of windows still open are held in memory; finished rows are handed to a
writer callback one output block row at a time, so memory stays flat as the scene grows.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np


class Strip:
    """Finished rows: weighted sums and weights. Class ids need only the argmax of the sums,
    so the division into probabilities is done only when something asks for them.

    A binary stitcher keeps only class 1 (``acc`` has one channel): class 0 is the rest."""

    def __init__(self, acc: np.ndarray, wsum: np.ndarray, covered: np.ndarray,
                 binary: bool = False) -> None:
        self.acc, self.wsum, self.covered, self.binary = acc, wsum, covered, binary
        self._probs: np.ndarray | None = None

    @property
    def probs(self) -> np.ndarray:
        """Blended probabilities (K, h, W)."""
        if self._probs is None:
            p = self.acc / np.where(self.wsum > 0, self.wsum, 1.0)
            if self.binary:
                p = np.concatenate([np.where(self.wsum > 0, 1.0 - p[0], 0.0)[None], p])
            self._probs = p.astype(np.float32, copy=False)
        return self._probs

    def rows(self, a: int, b: int) -> Strip:
        """Rows ``a..b`` of this strip (views, no copy)."""
        return Strip(self.acc[:, a:b], self.wsum[a:b], self.covered[a:b], self.binary)

    def class_ids(self) -> np.ndarray:
        """Argmax class per pixel (uint8), without forming probabilities."""
        if self.binary:  # p1 > p0 = 1 - p1
            return (2.0 * self.acc[0] > self.wsum).astype(np.uint8)
        if self.acc.shape[0] == 2:
            return (self.acc[1] > self.acc[0]).astype(np.uint8)
        return self.acc.argmax(axis=0).astype(np.uint8)


#: flush(row0, row1, strip) for finished rows
FlushFn = Callable[[int, int, Strip], None]


def taper(length: int, start: int, total: int, overlap: float) -> np.ndarray:
    """1-D weights for pixels ``start .. start+length`` of an axis of size ``total``.

    Edges strictly inside the raster ramp up over ``overlap`` pixels after a zero margin of
    ``overlap / 4``; edges on the raster border stay at 1.
    """
    w = np.ones(length, np.float32)
    if overlap <= 0:
        return w
    margin = overlap / 4.0
    ramp = overlap - 2.0 * margin
    d = np.arange(length, dtype=np.float32) + 0.5
    if start > 0:
        w = np.minimum(w, np.clip((d - margin) / ramp, 0.0, 1.0))
    if start + length < total:
        w = np.minimum(w, np.clip((length - d - margin) / ramp, 0.0, 1.0))
    return w


def window_weights(row0: int, col0: int, h: int, w: int, height: int, width: int,
                   overlap: float) -> np.ndarray:
    """2-D blending weights (h, w) for a window clipped to the raster (read-only: shared
    between the windows with the same size and the same edges inside the raster)."""
    return _weights(h, w, row0 > 0, row0 + h < height, col0 > 0, col0 + w < width, overlap)


@lru_cache(maxsize=64)
def _weights(h: int, w: int, top: bool, bottom: bool, left: bool, right: bool,
             overlap: float) -> np.ndarray:
    # taper() looks only at whether each edge lies inside the raster
    ty = taper(h, int(top), h + int(top) + int(bottom), overlap)
    tx = taper(w, int(left), w + int(left) + int(right), overlap)
    out = np.outer(ty, tx)
    out.flags.writeable = False
    return out


class RowStitcher:
    """Accumulates weighted probabilities for a band of rows and flushes finished rows.

    Windows must arrive in row-major order (all windows of a window-row before the next);
    call :meth:`finish_before` with the first row of each new window-row. The band is a ring
    buffer (raster row r lives at buffer row r mod capacity), so finished rows are never
    copied, only handed out and cleared.

    ``binary=True`` (two classes whose probabilities sum to one, as a softmax's do) blends
    only class 1: a third less work for the writer thread, same result.
    """

    def __init__(self, width: int, height: int, num_classes: int, *, capacity: int,
                 block: int, flush: FlushFn, binary: bool = False) -> None:
        if binary and num_classes != 2:
            raise ValueError("a binary stitcher needs exactly two classes")
        self.binary = binary
        self.width, self.height, self.k = width, height, num_classes
        self.block = block
        # whole block rows, so that a block row never wraps around the ring buffer
        self.capacity = min(-(-capacity // block) * block, height)
        self.flush = flush
        self.base = 0  # first raster row not yet flushed
        self.acc = np.zeros((1 if binary else num_classes, self.capacity, width), np.float32)
        self.wsum = np.zeros((self.capacity, width), np.float32)
        self.valid = np.zeros((self.capacity, width), bool)

    def add(self, row0: int, col0: int, probs: np.ndarray, weight: np.ndarray,
            valid: np.ndarray | None) -> None:
        """Add one window's probabilities (K, h, w) with weights (h, w) and validity (h, w;
        None when every pixel is valid)."""
        h, w = weight.shape
        if self.binary:
            probs = probs[1:]
        if row0 < self.base or row0 + h > self.base + self.capacity:
            raise RuntimeError(f"window rows {row0}..{row0 + h} outside the open band "
                               f"{self.base}..{self.base + self.capacity}")
        all_valid = valid is None
        wv = weight if valid is None else weight * valid
        cols = slice(col0, col0 + w)
        r = row0 % self.capacity
        first = min(h, self.capacity - r)  # rows before the buffer wraps around
        for dst, src in ((slice(r, r + first), slice(0, first)), (slice(0, h - first),
                                                                 slice(first, h))):
            if src.stop <= src.start:
                continue
            self.acc[:, dst, cols] += probs[:, src] * wv[src]
            self.wsum[dst, cols] += wv[src]
            if all_valid:
                self.valid[dst, cols] = True
            else:
                self.valid[dst, cols] |= valid[src]  # type: ignore[index]

    def finish_before(self, row: int) -> None:
        """Rows above ``row`` get no more contributions: flush them in whole blocks."""
        end = min(row // self.block * self.block, self.height)
        if end > self.base:
            self._flush_to(end)

    def close(self) -> None:
        """Flush everything that is left."""
        if self.base < self.height:
            self._flush_to(self.height)

    def _flush_to(self, end: int) -> None:
        r0 = self.base
        # one whole block row at a time: GDAL writes (compresses) a fully written block at
        # once, in the writer's thread while the network runs, instead of holding partly
        # written blocks in its cache and compressing them all at close, after the network
        while r0 < end:
            b0 = r0 % self.capacity
            r1 = min(r0 + self.block, end, r0 + self.capacity - b0)
            rows = slice(b0, b0 + r1 - r0)
            wsum = self.wsum[rows]
            covered = (wsum > 0) & self.valid[rows]
            self.flush(r0, r1, Strip(self.acc[:, rows], wsum, covered, self.binary))
            self.acc[:, rows] = 0
            wsum[:] = 0
            self.valid[rows] = False
            r0 = r1
        self.base = end

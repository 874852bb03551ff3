"""Seamless stitching of overlapping window predictions, row band by row band.

Each window's per-class probabilities are weighted by a window that is 1 in its interior
and tapers only across the overlap with a neighbour: exactly 0 for the outer quarter of the
overlap (where a network's prediction is spoiled by the window edge), then a linear ramp.
Edges on the raster border are never tapered. The blended result is the weighted sum
divided by the summed weights, so for a translation-equivariant model whose receptive
field is at most half the overlap the stitched map equals the whole-image prediction.

Only the rows of windows still open are held in memory; finished rows are handed to a
writer callback in block-aligned strips, so memory stays flat as the scene grows.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

#: rows handed to the writer at a time (finished block rows are emitted in such strips)
FLUSH_ROWS = 64

class Strip:
    """Finished rows: weighted sums and weights. Class ids need only the argmax of the sums,
    so the division into probabilities is done only when something asks for them."""

    def __init__(self, acc: np.ndarray, wsum: np.ndarray, covered: np.ndarray) -> None:
        self.acc, self.wsum, self.covered = acc, wsum, covered
        self._probs: np.ndarray | None = None

    @property
    def probs(self) -> np.ndarray:
        """Blended probabilities (K, h, W)."""
        if self._probs is None:
            self._probs = self.acc / np.where(self.wsum > 0, self.wsum, 1.0)
        return self._probs

    def class_ids(self) -> np.ndarray:
        """Argmax class per pixel (uint8), without forming probabilities."""
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
    """2-D blending weights (h, w) for a window clipped to the raster."""
    return np.outer(taper(h, row0, height, overlap), taper(w, col0, width, overlap))


class RowStitcher:
    """Accumulates weighted probabilities for a band of rows and flushes finished rows.

    Windows must arrive in row-major order (all windows of a window-row before the next);
    call :meth:`finish_before` with the first row of each new window-row.
    """

    def __init__(self, width: int, height: int, num_classes: int, *, capacity: int,
                 block: int, flush: FlushFn) -> None:
        self.width, self.height, self.k = width, height, num_classes
        self.block = block
        self.capacity = min(capacity, height)
        self.flush = flush
        self.base = 0  # raster row held at buffer row 0
        self.acc = np.zeros((num_classes, self.capacity, width), np.float32)
        self.wsum = np.zeros((self.capacity, width), np.float32)
        self.valid = np.zeros((self.capacity, width), bool)

    def add(self, row0: int, col0: int, probs: np.ndarray, weight: np.ndarray,
            valid: np.ndarray) -> None:
        """Add one window's probabilities (K, h, w) with weights (h, w) and validity (h, w)."""
        h, w = weight.shape
        r = row0 - self.base
        if r < 0 or r + h > self.capacity:
            raise RuntimeError(f"window rows {row0}..{row0 + h} outside the open band "
                               f"{self.base}..{self.base + self.capacity}")
        wv = weight * valid
        self.acc[:, r:r + h, col0:col0 + w] += probs * wv
        self.wsum[r:r + h, col0:col0 + w] += wv
        self.valid[r:r + h, col0:col0 + w] |= valid

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
        n = end - self.base
        for r in range(0, n, FLUSH_ROWS):  # in short strips: small temporaries on wide rasters
            r1 = min(r + FLUSH_ROWS, n)
            wsum = self.wsum[r:r1]
            covered = (wsum > 0) & self.valid[r:r1]
            self.flush(self.base + r, self.base + r1, Strip(self.acc[:, r:r1], wsum, covered))
        keep = self.capacity - n
        if keep > 0:
            self.acc[:, :keep] = self.acc[:, n:]
            self.wsum[:keep] = self.wsum[n:]
            self.valid[:keep] = self.valid[n:]
        self.acc[:, keep:] = 0
        self.wsum[keep:] = 0
        self.valid[keep:] = False
        self.base = end

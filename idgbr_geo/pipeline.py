"""The threads around the networks in a run of :func:`idgbr_geo.engine.refine_raster`.

A reader thread reads the windows in order, normalises them for the network and queues
them (:func:`read_windows`); the model's thread takes them in batches of one shape
(:func:`batches`); a writer thread stitches the finished windows in reading order and
writes the output strip by strip (:class:`StripWriter`), so that reading, the networks and
writing overlap and the output never depends on thread timing.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import rasterio
import torch

from .cards import ModelCard
from .stitching import RowStitcher, window_weights
from .tiling import Source, Tile, clip, read_window
from .tuning import background_priority
from .user_maps import UserMap, read_user_map

#: end of the windows (reader -> model thread) and of the results (-> writer); ABORT: the
#: run failed, the writer stops without finishing the file
DONE = object()
ABORT = object()


@dataclass
class WindowItem:
    tile: Tile
    data: np.ndarray  # normalised network input (bands, mh, mw), model grid, 0 where no data
    mask: np.ndarray  # (mh, mw) bool
    coarse: np.ndarray | None  # (K, mh, mw) float32 probabilities from a user's map
    #: the window's raw pixels (bands, h, w) on the input grid and their validity (None:
    #: all valid), kept when the results are upsampled edge-aware; else None
    native: np.ndarray | None = None
    native_valid: np.ndarray | None = None
    #: a user's coarse map at the input's resolution, when it is resampled (else None)
    user: UserMap | None = None
    #: every pixel valid / any pixel valid (worked out here, in the reader thread)
    full: bool = field(init=False)
    any: bool = field(init=False)

    def __post_init__(self) -> None:
        self.full = bool(self.mask.all())
        self.any = self.full or bool(self.mask.any())


def read_windows(src: Source, tiles: Sequence[Tile], coarse_ds: Any, card: ModelCard,
            out: queue.Queue, stop: threading.Event, native: bool = False) -> None:
    """Background reader: windows in order onto ``out``, normalised for the network (off
    the model's thread), then DONE (or the exception); with ``native`` each window's
    pixels at the input's resolution too (the queue bounds how many are held, as raw
    values: uint8 stays uint8), and a user's coarse map at the input's resolution whenever
    the window is resampled (:func:`~idgbr_geo.input_grid.keep_user_map`). In its own
    rasterio Env, so that GDAL's messages about the file (``Warning 1: ...``) go to Python
    logging, where the CLI shows them as one ``Warning:`` line (or not at all with
    --quiet)."""
    background_priority()
    keep_user = coarse_ds is not None and src.factor != 1.0
    try:
        torch.set_num_threads(1)  # torch ops here (resampling) stay serial
        with rasterio.Env():
            for tile in tiles:
                if stop.is_set():
                    break  # DONE below wakes a model worker waiting for windows
                got = read_window(src, tile, native=native, native_mask=keep_user)
                mask = got.mask
                coarse = user = None
                if coarse_ds is not None:
                    coarse, cvalid, user = read_user_map(coarse_ds, tile, src,
                                                         card.num_classes, native=keep_user)
                    mask = mask & cvalid
                    if user is not None and got.native_valid is not None:  # the image's
                        user.valid = (got.native_valid if user.valid is None
                                      else user.valid & got.native_valid)
                item = WindowItem(tile, card.normalization.apply(got.data, src.dtype), mask, coarse,
                             got.native, got.native_valid, user)
                if not item.full:
                    item.data[:, ~mask] = 0.0
                out.put(item)
        out.put(DONE)
    except BaseException as exc:  # forwarded to the consumer
        out.put(exc)


def batches(q: queue.Queue, batch_size: int) -> Iterator[list[WindowItem]]:
    """Group consecutive same-shape items into batches."""
    batch: list[WindowItem] = []
    while True:
        item = q.get()
        if item is DONE:
            break
        if isinstance(item, BaseException):
            raise item
        if batch and (len(batch) >= batch_size or item.tile.model_size != batch[0].tile.model_size):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


class StripWriter(threading.Thread):
    """Background blending + writing of finished row strips."""

    def __init__(self, stitcher: RowStitcher, src: Source, overlap_px: float) -> None:
        super().__init__(daemon=True)
        self.q: queue.Queue = queue.Queue(maxsize=8)
        self.stitcher, self.src, self.overlap_px = stitcher, src, overlap_px
        self.error: BaseException | None = None
        self.row = -1

    def run(self) -> None:
        background_priority()
        pending: dict[int, list[tuple[Tile, np.ndarray | None, np.ndarray | None]]] = {}
        next_seq = 0
        try:
            while True:
                item = self.q.get()
                if item is DONE:
                    break
                if item is ABORT:  # the run failed: stop without finishing the file
                    return
                seq, results = item
                pending[seq] = results
                # model workers finish batches out of order: stitch them in reading order,
                # so the sums (and so the output) do not depend on thread timing
                while next_seq in pending:
                    for tile, probs, valid in pending.pop(next_seq):
                        self._add(tile, probs, valid)
                    next_seq += 1
            if pending:
                raise RuntimeError(f"batches {sorted(pending)} arrived without batch {next_seq}")
            self.stitcher.close()
        except BaseException as exc:
            self.error = exc

    def _add(self, tile: Tile, probs: np.ndarray | None, valid: np.ndarray | None) -> None:
        win = clip(tile.window, self.src.width, self.src.height)
        if tile.row != self.row:
            self.stitcher.finish_before(int(win.row_off))
            self.row = tile.row
        if probs is None:
            return
        r0, c0, h, w = int(win.row_off), int(win.col_off), int(win.height), int(win.width)
        weight = window_weights(r0, c0, h, w, self.src.height, self.src.width, self.overlap_px)
        self.stitcher.add(r0, c0, probs, weight, valid)

    def abort(self) -> None:
        """Stop the thread after the strip it is writing and wait for it, so that nothing
        writes to the output while the failed run closes it (GDAL datasets are not
        thread-safe; a write racing the close could crash the process at exit)."""
        while self.is_alive():
            try:
                self.q.put(ABORT, timeout=0.1)
                break
            except queue.Full:
                continue
        self.join()

    def put(self, item: Any) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.q.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

"""Writing results: tiled, compressed GeoTIFFs on the input's grid, strip by strip.

The class raster is uint8 class ids with a colour table, class names and colours in the
metadata (tags ``IDGBR_CLASSES``/``IDGBR_COLORS``), nodata 255 where the input had no data,
and optionally a confidence band. Per-class probabilities go to a separate uint8 raster.
Strips arrive block-aligned from the stitcher, so every block is written once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.enums import Resampling
from rasterio.windows import Window

from .cards import hex_to_rgb
from .stitching import Strip

NODATA = 255
BLOCK = 256


def base_profile(like: rasterio.DatasetReader, count: int, *, block: int = BLOCK) -> dict[str, Any]:
    """A tiled, DEFLATE-compressed uint8 profile on ``like``'s grid (CRS and transform)."""
    profile: dict[str, Any] = {
        "driver": "GTiff", "dtype": "uint8", "count": count,
        "width": like.width, "height": like.height,
        "transform": like.transform, "crs": like.crs,
        "tiled": True, "blockxsize": block, "blockysize": block,
        "compress": "deflate", "BIGTIFF": "IF_SAFER", "interleave": "band",
    }
    if like.crs is None:
        profile.pop("crs")
        if like.transform.is_identity:
            profile.pop("transform")
    return profile


def colormap(colors: list[str]) -> dict[int, tuple[int, int, int, int]]:
    cmap = {i: (*hex_to_rgb(c), 255) for i, c in enumerate(colors)}
    cmap[NODATA] = (0, 0, 0, 0)
    return cmap


class ResultWriter:
    """Writes class ids (+ confidence) and optional probabilities for finished strips."""

    def __init__(self, path: Path, like: rasterio.DatasetReader, classes: list[str],
                 colors: list[str], *, confidence: bool = False,
                 probabilities: Path | None = None, prob_dtype: str = "uint8",
                 tags: dict[str, Any] | None = None) -> None:
        self.classes = classes
        self.confidence = confidence
        profile = base_profile(like, 2 if confidence else 1)
        self.ds = rasterio.open(path, "w", nodata=NODATA, **profile)
        self.ds.write_colormap(1, colormap(colors))
        self.ds.set_band_description(1, "class")
        if confidence:
            self.ds.set_band_description(2, "confidence")
        self.ds.update_tags(IDGBR_CLASSES=json.dumps(classes), IDGBR_COLORS=json.dumps(colors),
                            **{k: str(v) for k, v in (tags or {}).items()})
        self.prob = None
        self.prob_dtype = np.dtype(prob_dtype)
        if probabilities is not None:
            profile = base_profile(like, len(classes))
            profile["dtype"] = self.prob_dtype.name
            self.prob = rasterio.open(probabilities, "w", nodata=None, **profile)
            for i, name in enumerate(classes):
                self.prob.set_band_description(i + 1, name)
            self.prob.update_tags(IDGBR_CLASSES=json.dumps(classes))

    def write(self, row0: int, row1: int, strip: Strip) -> None:
        """Write rows ``row0..row1`` of a finished strip (class ids, confidence, probabilities)."""
        covered = strip.covered
        full = bool(covered.all())
        win = Window(0, row0, covered.shape[1], row1 - row0)
        ids = strip.class_ids()
        if not full:
            ids[~covered] = NODATA
        self.ds.write(ids, 1, window=win)
        if self.confidence:
            conf = np.rint(strip.probs.max(axis=0) * 255).astype(np.uint8)
            if not full:
                conf[~covered] = 0
            self.ds.write(conf, 2, window=win)
        if self.prob is not None:
            if self.prob_dtype == np.uint8:
                p = np.rint(np.clip(strip.probs, 0, 1) * 255).astype(np.uint8)
            else:
                p = strip.probs.astype(self.prob_dtype)
            if not full:
                p[:, ~covered] = 0
            self.prob.write(p, window=win)

    def close(self) -> None:
        self.ds.close()
        if self.prob is not None:
            self.prob.close()


def to_cog(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, categorical: bool) -> None:
    """Copy a GeoTIFF to a Cloud-Optimized GeoTIFF with overviews (mode for class ids)."""
    rasterio.shutil.copy(
        src, dst, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=512, BIGTIFF="IF_SAFER",
        OVERVIEW_RESAMPLING=(Resampling.mode if categorical else Resampling.average).name.upper(),
    )

"""Writing results: tiled, compressed GeoTIFFs on the input's grid, strip by strip.

The class raster is uint8 class ids with a colour table, class names and colours in the
metadata (tags ``IDGBR_CLASSES``/``IDGBR_COLORS``), nodata 255 where the input had no data,
and optionally a confidence band. Per-class probabilities go to a separate uint8 raster.
Strips arrive as whole block rows from the stitcher, so GDAL writes (and compresses) every
block once, as soon as it is complete.
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
from rasterio.errors import RasterioError
from rasterio.windows import Window

from .cards import hex_to_rgb
from .errors import OutputError
from .files import output_name, write_errors
from .rasters import sensor_georeferencing
from .stitching import Strip

NODATA = 255
BLOCK = 256
#: DEFLATE level of the class raster. GDAL's default (6) spends 1.6-4x the CPU of level 3 on
#: class maps (67 MP, measured: 0.14-0.79 vs 0.09-0.21 CPU-s, the most on maps with many
#: small regions) for files that are 1.5-1.9x smaller but tiny either way (0.6-5 MB); on a
#: small machine that CPU is taken from the network.
CLASS_ZLEVEL = 3
#: rows turned into ids / confidence / probabilities at a time (bounds the float temporaries;
#: the uint8 results of a whole block row are then written in one call)
CHUNK_ROWS = 64


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
        how = sensor_georeferencing(like)  # keep the input's GCPs or RPCs
        if how == "ground control points":
            points, crs = like.gcps
            profile.update(gcps=points, crs=crs)
        elif how == "RPCs":
            profile["rpcs"] = like.rpcs
    return profile


def colormap(colors: list[str]) -> dict[int, tuple[int, int, int, int]]:
    cmap = {i: (*hex_to_rgb(c), 255) for i, c in enumerate(colors)}
    cmap[NODATA] = (0, 0, 0, 0)
    return cmap


class ResultWriter:
    """Writes class ids (+ confidence) and optional probabilities for finished strips.

    Write failures (disk full, folder made read-only) raise one :class:`OutputError` naming
    the output, also those GDAL only notices when it closes the file (see :meth:`close`).
    """

    def __init__(self, path: Path, like: rasterio.DatasetReader, classes: list[str],
                 colors: list[str], *, confidence: bool = False,
                 probabilities: Path | None = None, prob_dtype: str = "uint8",
                 tags: dict[str, Any] | None = None) -> None:
        self.classes = classes
        self.confidence = confidence
        profile = base_profile(like, 2 if confidence else 1)
        profile["zlevel"] = CLASS_ZLEVEL
        self.path, self.prob_path = Path(path), probabilities
        self.prob = None
        self.height, self.rows_written = like.height, 0
        with write_errors(path):
            self.ds = rasterio.open(path, "w", nodata=NODATA, **profile)
            self.ds.write_colormap(1, colormap(colors))
            self.ds.set_band_description(1, "class")
            if confidence:
                self.ds.set_band_description(2, "confidence")
            self.ds.update_tags(IDGBR_CLASSES=json.dumps(classes),
                                IDGBR_COLORS=json.dumps(colors),
                                **{k: str(v) for k, v in (tags or {}).items()})
        self.prob_dtype = np.dtype(prob_dtype)
        if probabilities is not None:
            profile = base_profile(like, len(classes))
            profile["dtype"] = self.prob_dtype.name
            try:
                with write_errors(probabilities):
                    self.prob = rasterio.open(probabilities, "w", nodata=None, **profile)
                    for i, name in enumerate(classes):
                        self.prob.set_band_description(i + 1, name)
                    self.prob.update_tags(IDGBR_CLASSES=json.dumps(classes))
            except BaseException:
                self.ds.close()
                raise

    def write(self, row0: int, row1: int, strip: Strip) -> None:
        """Write rows ``row0..row1`` of a finished strip (class ids, confidence, probabilities)."""
        h, w = strip.covered.shape
        win = Window(0, row0, w, row1 - row0)
        ids = np.empty((h, w), np.uint8)
        conf = np.empty((h, w), np.uint8) if self.confidence else None
        p = (np.empty((len(self.classes), h, w), self.prob_dtype) if self.prob is not None
             else None)
        for a in range(0, h, CHUNK_ROWS):
            b = min(a + CHUNK_ROWS, h)
            part = strip.rows(a, b)
            hole = None if part.covered.all() else ~part.covered
            ids[a:b] = part.class_ids()
            if hole is not None:
                ids[a:b][hole] = NODATA
            if conf is not None:
                np.rint(part.probs.max(axis=0) * 255, out=conf[a:b], casting="unsafe")
                if hole is not None:
                    conf[a:b][hole] = 0
            if p is not None:
                if self.prob_dtype == np.uint8:
                    np.rint(np.clip(part.probs, 0, 1) * 255, out=p[:, a:b], casting="unsafe")
                else:
                    p[:, a:b] = part.probs
                if hole is not None:
                    p[:, a:b][:, hole] = 0
        with write_errors(self.path):
            self.ds.write(ids, 1, window=win)
            if conf is not None:
                self.ds.write(conf, 2, window=win)
        if p is not None:
            with write_errors(self.prob_path):
                self.prob.write(p, window=win)
        self.rows_written += row1 - row0

    def close(self) -> None:
        """Close both files and check them: GDAL reports a write that fails while it
        closes (the last blocks, the block index) only on stderr, so a full disk would
        otherwise leave a truncated GeoTIFF that looks complete. (Not checked when the run
        stopped early: the files are then discarded and the first error is the one to tell.)"""
        with write_errors(self.path):
            self.ds.close()
        if self.prob is not None:
            with write_errors(self.prob_path):
                self.prob.close()
        if self.rows_written >= self.height:
            check_complete(self.path)
            if self.prob is not None:
                check_complete(self.prob_path)


def check_complete(path: str | os.PathLike[str]) -> None:
    """Raise :class:`OutputError` unless the GeoTIFF at ``path`` holds every block it
    indexes: the file opens, and no block is missing or runs past the end of the file.

    Reads the block index only (no pixels): ~10 ms for 67 MP.
    """
    name = output_name(path)
    size = os.path.getsize(path)
    try:
        with rasterio.open(path) as ds:
            end = 0
            for b in ds.indexes:
                bh, bw = ds.block_shapes[b - 1]
                for i in range(-(-ds.height // bh)):
                    for j in range(-(-ds.width // bw)):
                        off = ds.get_tag_item(f"BLOCK_OFFSET_{j}_{i}", "TIFF", bidx=b)
                        n = ds.get_tag_item(f"BLOCK_SIZE_{j}_{i}", "TIFF", bidx=b)
                        if not off or not n or int(off) == 0:
                            raise OutputError(f"cannot write {name}: block {i},{j} of band {b} "
                                              "is missing (disk full?)")
                        end = max(end, int(off) + int(n))
    except RasterioError:
        raise OutputError(f"cannot write {name}: the written file is unreadable "
                          "(disk full?)") from None
    if end > size:
        raise OutputError(f"cannot write {name}: the file was cut short at {size} bytes "
                          "(disk full?)")


def to_cog(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, categorical: bool) -> None:
    """Copy a GeoTIFF to a Cloud-Optimized GeoTIFF with overviews (mode for class ids)."""
    with write_errors(dst):
        rasterio.shutil.copy(
            src, dst, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=512, BIGTIFF="IF_SAFER",
            OVERVIEW_RESAMPLING=(Resampling.mode if categorical else Resampling.average
                                 ).name.upper(),
        )
    check_complete(dst)

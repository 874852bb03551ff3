"""Reading and tiling: open an input raster, check it, and read it window by window.

Windows are laid on the input's own pixel grid. When the model was trained at another
ground sample distance (GSD), each window is resampled on read (rasterio ``out_shape``) to
the model's GSD, so the engine never holds more than a few windows of the scene.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import RasterioError
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from .errors import InputError, UserError

#: relative GSD difference under which an input is used as is (no resampling)
GSD_TOLERANCE = 0.05


class NoCRSWarning(UserWarning):
    """The input has no CRS: the run continues in pixel space."""


def open_raster(path: str | os.PathLike[str], what: str = "input") -> rasterio.DatasetReader:
    """Open a raster or raise one clear :class:`InputError`."""
    p = os.fspath(path)
    if "://" not in p and not p.startswith("/vsi") and not os.path.exists(p):
        raise InputError(f"{what} {p} does not exist")
    if os.path.isdir(p):
        raise InputError(f"{what} {p} is a folder, not a raster")
    try:
        return rasterio.open(p)
    except RasterioError as exc:
        raise InputError(f"{what} {p} is not a readable raster ({_short(exc)})") from None


def _short(exc: BaseException) -> str:
    """First line of an error, preferring GDAL's own cause over rasterio's wrapper text."""
    cause = exc.__cause__ or exc.__context__
    if cause is not None and "previous exception" in str(exc):
        exc = cause
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def ground_gsd(ds: rasterio.DatasetReader) -> float | None:
    """Ground pixel size in metres (mean of across and down), or None without a CRS.

    The same measurement as the training chips use (:func:`pixel_ground_size`), so a model's
    declared GSD and an input's GSD are comparable.
    """
    if ds.crs is None:
        return None
    dx, dy = pixel_ground_size(ds.crs, ds.transform, ds.width, ds.height)
    return (dx + dy) / 2


def pixel_ground_size(crs: Any, transform: Any, width: int, height: int) -> tuple[float, float]:
    """Ground size in metres of one pixel (across, down) at the raster centre.

    Map units are not ground metres: Web-Mercator pixels shrink by cos(latitude) on the
    ground, geographic pixels are degrees, UTM has a scale factor. So the centre pixel and
    its neighbours are taken to longitude/latitude and measured on the WGS 84 ellipsoid.
    """
    from pyproj import CRS, Geod, Transformer

    c = CRS.from_user_input(crs)
    cx, cy = width / 2.0, height / 2.0
    pts = [transform @ (cx, cy), transform @ (cx + 1, cy), transform @ (cx, cy + 1)]
    if c.is_geographic or c.is_projected:
        to_ll = Transformer.from_crs(c, c.geodetic_crs or "EPSG:4326", always_xy=True)
        lon, lat = to_ll.transform([p[0] for p in pts], [p[1] for p in pts])
        geod = Geod(ellps="WGS84")
        _, _, dx = geod.inv(lon[0], lat[0], lon[1], lat[1])
        _, _, dy = geod.inv(lon[0], lat[0], lon[2], lat[2])
        if math.isfinite(dx) and math.isfinite(dy) and dx > 0 and dy > 0:
            return float(dx), float(dy)
    unit = c.axis_info[0].unit_conversion_factor if c.axis_info else 1.0
    return (math.hypot(transform.a, transform.d) * unit,
            math.hypot(transform.b, transform.e) * unit)


@dataclass
class Source:
    """An opened, validated input with the decisions the engine needs."""

    ds: rasterio.DatasetReader
    path: str
    bands: list[int]
    gsd: float | None
    #: input pixels per model pixel (1.0 = no resampling)
    factor: float = 1.0
    warnings: list[str] = field(default_factory=list)

    @property
    def width(self) -> int:
        return self.ds.width

    @property
    def height(self) -> int:
        return self.ds.height

    @property
    def all_valid(self) -> bool:
        """No nodata value, mask or alpha on the used bands: skip reading masks."""
        flags = [self.ds.mask_flag_enums[b - 1] for b in self.bands]
        return all(f == [MaskFlags.all_valid] for f in flags)

    @property
    def dtype(self) -> str:
        return self.ds.dtypes[self.bands[0] - 1]


def select_bands(ds: rasterio.DatasetReader, wanted: int, bands: Sequence[int] | None) -> list[int]:
    """The 1-based band indexes to feed a model that reads ``wanted`` bands."""
    if bands:
        bad = [b for b in bands if b < 1 or b > ds.count]
        if bad:
            raise InputError(f"--bands {','.join(map(str, bands))}: the input has bands "
                             f"1..{ds.count} only")
        if len(bands) != wanted:
            raise InputError(f"the model reads {wanted} band(s) but --bands selects {len(bands)}")
        return list(bands)
    usable = [i + 1 for i, ci in enumerate(ds.colorinterp) if ci != ColorInterp.alpha]
    if len(usable) == wanted:
        return usable
    raise InputError(f"the input has {ds.count} band(s) ({len(usable)} not alpha) but the model "
                     f"reads {wanted}; choose them with --bands, e.g. --bands "
                     f"{','.join(str(i) for i in range(1, wanted + 1))}")


def open_source(path: str | os.PathLike[str], *, model_bands: int, bands: Sequence[int] | None,
                model_gsd: float | None, gsd: float | None = None) -> Source:
    """Open and validate an input raster for a model reading ``model_bands`` bands."""
    ds = open_raster(path)
    try:
        chosen = select_bands(ds, model_bands, bands)
        dtypes = {ds.dtypes[b - 1] for b in chosen}
        if len(dtypes) > 1:
            raise InputError(f"the selected bands have mixed data types {sorted(dtypes)}")
        dt = np.dtype(dtypes.pop())
        if dt.kind not in "uif":
            raise InputError(f"unsupported data type {dt.name}")
        src = Source(ds=ds, path=os.fspath(path), bands=chosen, gsd=gsd or ground_gsd(ds))
        if ds.crs is None:
            msg = (f"{src.path} has no CRS: continuing in pixel space (the output has no CRS "
                   "either" + (", and its GSD is assumed to be the model's; set --gsd)"
                               if gsd is None else ")"))
            src.warnings.append(msg)
            warnings.warn(msg, NoCRSWarning, stacklevel=2)
        if model_gsd and src.gsd:
            ratio = model_gsd / src.gsd
            if abs(ratio - 1.0) > GSD_TOLERANCE:
                src.factor = ratio
        return src
    except BaseException:
        ds.close()
        raise


@dataclass(frozen=True)
class Tile:
    """One window: its extent on the input grid and its size/origin on the model grid."""

    index: int
    row: int  # window-row number, for the row-by-row stitcher
    window: Window  # on the input grid; may extend past the raster's right/bottom edge
    model_size: tuple[int, int]  # (h, w) fed to the network (multiples of stride_multiple)
    origin: tuple[int, int]  # top-left on the model grid, multiple of stride_multiple


def _starts(length: int, tile: int, stride: int, multiple: int) -> list[int]:
    """Window starts covering [0, length): regular stride, last window flush with the end
    (rounded up to ``multiple``, so it may overhang the end by < multiple pixels)."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    last = _round_up(length - tile, multiple)
    if last > starts[-1]:
        starts.append(last)
    return starts


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def plan_tiles(width: int, height: int, *, tile_size: int, overlap: int, factor: float = 1.0,
               multiple: int = 8) -> list[Tile]:
    """Lay overlapping windows over a ``width`` x ``height`` raster.

    ``tile_size`` and ``overlap`` are in model pixels; ``factor`` is input pixels per model
    pixel. Windows are aligned to ``multiple`` model pixels so position-keyed diffusion noise
    lines up exactly where windows overlap.
    """
    if tile_size <= 2 * overlap:
        raise UserError(f"tile size {tile_size} must be larger than twice the overlap ({overlap})")
    if tile_size % multiple or overlap % multiple:
        raise UserError(f"tile size and overlap must be multiples of {multiple} for this model")
    mw, mh = math.ceil(width / factor), math.ceil(height / factor)
    tiles: list[Tile] = []
    rows = _starts(mh, tile_size, tile_size - overlap, multiple)
    cols = _starts(mw, tile_size, tile_size - overlap, multiple)
    for ri, r in enumerate(rows):
        th = min(tile_size, _round_up(mh - r, multiple))
        for c in cols:
            tw = min(tile_size, _round_up(mw - c, multiple))
            if factor == 1.0:
                win = Window(c, r, tw, th)
            else:
                c0, r0 = round(c * factor), round(r * factor)
                win = Window(c0, r0, round((c + tw) * factor) - c0, round((r + th) * factor) - r0)
            tiles.append(Tile(len(tiles), ri, win, (th, tw), (r, c)))
    return tiles


def clip(win: Window, width: int, height: int) -> Window:
    """The part of ``win`` inside the raster."""
    c0, r0 = int(win.col_off), int(win.row_off)
    return Window(c0, r0, max(0, min(width - c0, int(win.width))),
                  max(0, min(height - r0, int(win.height))))


def model_extent(tile: Tile, clipped: Window, factor: float) -> tuple[int, int]:
    """(h, w) on the model grid of the clipped (inside-raster) part of a tile."""
    if factor == 1.0:
        return int(clipped.height), int(clipped.width)
    h = min(tile.model_size[0], max(1, round(clipped.height / factor)))
    w = min(tile.model_size[1], max(1, round(clipped.width / factor)))
    return h, w


def read_tile(src: Source, tile: Tile) -> tuple[np.ndarray, np.ndarray]:
    """Raw pixels (bands, mh, mw) and validity mask (mh, mw; True = data) of a tile's part
    inside the raster, on the model grid. Nodata values, internal masks and alpha bands are
    all honoured through GDAL's dataset mask.

    Pixels are read at the input's resolution and resampled to the model grid with torch
    (:func:`resample`): GDAL's resampling on read costs five times the read itself and would
    not hide behind the network on a small machine."""
    win = clip(tile.window, src.width, src.height)
    out = model_extent(tile, win, src.factor)
    try:
        data = src.ds.read(src.bands, window=win)
        if src.all_valid:
            mask = np.ones(out, bool)
        else:
            mask = src.ds.dataset_mask(window=win, out_shape=out,
                                       resampling=Resampling.nearest) > 0
    except RasterioError as exc:
        raise InputError(f"failed to read {src.path} at window {win.col_off},{win.row_off}: "
                         f"{_short(exc)} (truncated or corrupt file?)") from None
    if data.shape[1:] != out:
        data = resample(data, out)
    return data, mask


def resample(data: np.ndarray, out: tuple[int, int]) -> np.ndarray:
    """Bilinear resampling of (bands, h, w) to (bands, *out), pixel-centre aligned like GDAL
    and antialiased when shrinking. uint8 stays uint8 (rounded, as GDAL would; torch's
    channels-last uint8 kernel is ~8x faster than float), other types become float32."""
    import torch
    import torch.nn.functional as F

    if data.dtype == np.uint8:
        hwc = np.empty((*data.shape[1:], data.shape[0]), np.uint8)
        for b in range(data.shape[0]):  # band by band: 3x faster than a transposing copy
            hwc[:, :, b] = data[b]
        x = torch.from_numpy(hwc).permute(2, 0, 1)[None]  # a channels-last view
    else:
        x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None]
    y = F.interpolate(x, size=out, mode="bilinear", align_corners=False, antialias=True)
    return np.ascontiguousarray(y[0].numpy())


def open_coarse(path: str | os.PathLike[str], like: rasterio.DatasetReader
                ) -> rasterio.io.DatasetReaderBase:
    """Open a user's coarse map on the input's grid (reprojected with nearest if needed)."""
    ds = open_raster(path, what="coarse map")
    same = (ds.width == like.width and ds.height == like.height
            and ds.transform.almost_equals(like.transform) and ds.crs == like.crs)
    if same:
        return ds
    if ds.crs is None or like.crs is None:
        ds.close()
        raise InputError(f"coarse map {path} is not on the input's grid and cannot be "
                         "reprojected onto it (missing CRS)")
    vrt = WarpedVRT(ds, crs=like.crs, transform=like.transform, width=like.width,
                    height=like.height, resampling=Resampling.nearest)
    return vrt

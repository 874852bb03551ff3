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

import numpy as np
import rasterio
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import RasterioError
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from .cards import Normalization
from .errors import IdgbrWarning, InputError, UserError, first_line
from .rasters import grid_difference, ground_gsd, open_raster, same_gsd, sensor_georeferencing
from .stretch import Stretch, plan_stretch

#: Largest resampling factor, either way, between the input's GSD and the model's.
#: Shrinking by f reads (f x window)^2 input pixels per window and keeps f x window input
#: rows of per-class sums in the stitcher: at 16 and the cards' 512-pixel windows that is
#: 8192^2 pixels per read (0.8 GB as float32 RGB) and ~70 kB per input column, and beyond it
#: memory runs away (1000 m pixels on a 0.25 m model used 3.3 GB and crashed). Enlarging by
#: f multiplies the windows by f^2 and gives the model nothing finer than f x f of its pixels
#: per input pixel, no boundary left to refine (100 m on 0.25 m planned 71,824 windows for a
#: small file). 16 still covers 3 cm drone imagery on a 0.25 m model and 10 m imagery on a
#: 1 m land-cover model; anything further is almost surely a wrong pixel size.
MAX_RESAMPLING = 16.0
#: A value range "fits" the card when the valid values lie within
#: [-SLACK x range, (1 + SLACK) x range]: reflectances a little over 1 pass, 0..255 data on a
#: 0..1 card does not.
VALUE_RANGE_SLACK = 0.5


class NoCRSWarning(IdgbrWarning):
    """The input has no CRS: the run continues in pixel space."""


class ValueRangeWarning(IdgbrWarning):
    """The input's values do not fit the model card's normalisation (e.g. 0..255 floats on
    a card for 0..1 floats): the run continues, but the model sees the wrong brightness."""


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
    #: (low, high) raw values that fit the model card's normalisation; None: no check
    value_limits: tuple[float, float] | None = None
    #: raw values -> the card's range, for inputs that do not use it (:mod:`.stretch`)
    stretch: Stretch | None = None
    #: ``gsd`` is the card's assumption for an input without a CRS, not the file's or a user's
    gsd_assumed: bool = False

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

    def check_values(self, data: np.ndarray, valid: np.ndarray) -> None:
        """Warn (once per source, so once per run) when valid values do not fit the card's
        value range: the network would then run on wrong brightness without a word."""
        if self.value_limits is None:
            return
        vals = data if valid.all() else data[:, valid]
        if vals.size == 0:
            return
        lo, hi = self.value_limits
        vmin, vmax = float(vals.min()), float(vals.max())
        if vmin < lo or vmax > hi:
            self.value_limits = None  # once
            span = hi / (1 + VALUE_RANGE_SLACK)
            self._warn(f"{self.path} has values from {vmin:g} to {vmax:g} but the model card "
                       f"normalises {self.dtype} input as 0..{span:g}: the results may be "
                       f"meaningless; rescale the input to 0..{span:g}")

    def _warn(self, msg: str) -> None:
        self.warnings.append(msg)
        warnings.warn(msg, ValueRangeWarning, stacklevel=3)


class BandSelectionWarning(IdgbrWarning):
    """The model's bands were picked from a file with more bands (or in another order) by
    the file's colour interpretation: say which ones, so a wrong guess is seen."""


def select_bands(ds: rasterio.DatasetReader, wanted: int, bands: Sequence[int] | None,
                 names: Sequence[str] | None = None) -> list[int]:
    """The 1-based band indexes to feed a model that reads ``wanted`` bands.

    ``bands`` (the user's choice) wins. Otherwise, when the model's ``names`` (the card's
    ``band_names``, e.g. red, green, blue) are each declared by exactly one band of the
    file (its colour interpretation), those bands in the model's order: a 4-band RGB +
    undeclared-mask drone export or a blue, green, red, NIR satellite product then runs
    without a bands option. Else all non-alpha bands, if there are exactly ``wanted``."""
    if bands:
        bad = [b for b in bands if b < 1 or b > ds.count]
        if bad:
            raise InputError(f"$bands {','.join(map(str, bands))}: the input has bands "
                             f"1..{ds.count} only", options=["bands"])
        if len(bands) != wanted:
            raise InputError(f"the model reads {wanted} band(s) but $bands selects {len(bands)}",
                             options=["bands"])
        return list(bands)
    usable = non_alpha_bands(ds)
    by_colour = bands_by_colour(ds, names) if names and len(names) == wanted else None
    if by_colour is not None:
        return by_colour
    if len(usable) == wanted:
        return usable
    example = (f"{','.join([str(usable[0])] * wanted)} to feed its one band as every "
               "colour" if len(usable) == 1 and wanted > 1
               else ','.join(str(i) for i in range(1, wanted + 1)))
    raise InputError(f"the input has {ds.count} band(s) ({len(usable)} not alpha) but the model "
                     f"reads {wanted}; choose them with $bands (e.g. {example})",
                     options=["bands"])


def non_alpha_bands(ds: rasterio.DatasetReader) -> list[int]:
    """The 1-based indexes of the bands that are not alpha."""
    return [i + 1 for i, ci in enumerate(ds.colorinterp) if ci != ColorInterp.alpha]


def bands_by_colour(ds: rasterio.DatasetReader, names: Sequence[str]) -> list[int] | None:
    """The bands whose colour interpretation is each of ``names`` in turn, or None unless
    every name is declared by exactly one band (a name that is no colour interpretation,
    e.g. ``nir``, gives None)."""
    found = []
    for name in names:
        ci = getattr(ColorInterp, name.lower(), None)
        hits = [i + 1 for i, c in enumerate(ds.colorinterp) if ci is not None and c == ci]
        if len(hits) != 1:
            return None
        found.append(hits[0])
    return found


def open_source(path: str | os.PathLike[str], *, model_bands: int, bands: Sequence[int] | None,
                model_gsd: float | None, gsd: float | None = None,
                gsd_without_crs: float | None = None,
                normalization: Normalization | None = None,
                band_names: Sequence[str] | None = None,
                value_range: Sequence[float] | None = None,
                gsd_estimated: bool = False) -> Source:
    """Open and validate an input raster for a model reading ``model_bands`` bands.

    ``gsd`` overrides the file's pixel size; a file without a CRS and no ``gsd`` is taken to
    have ``gsd_without_crs`` (the card's; None: ``model_gsd``, i.e. no resampling), and
    ``gsd_assumed`` is set: with ``gsd_estimated`` (the card estimates such a GSD, which the
    caller then does) its warning says so instead;
    ``normalization`` (the card's) enables the :class:`ValueRangeWarning` checks;
    ``band_names`` (the card's) let :func:`select_bands` pick bands by colour. With
    ``normalization``, an input that does not use the card's value range gets a
    :class:`~idgbr_geo.stretch.Stretch` (``value_range``: the user's (low, high) instead)."""
    if gsd is not None and not (math.isfinite(gsd) and gsd > 0):
        raise InputError(f"GSD {gsd} m: give a finite pixel size greater than 0")
    ds = open_raster(path)
    try:
        chosen = select_bands(ds, model_bands, bands, band_names)
        dtypes = {ds.dtypes[b - 1] for b in chosen}
        if len(dtypes) > 1:
            raise InputError(f"the selected bands have mixed data types {sorted(dtypes)}")
        dt = np.dtype(dtypes.pop())
        if dt.kind not in "uif":
            raise InputError(f"unsupported data type {dt.name}")
        src = Source(ds=ds, path=os.fspath(path), bands=chosen,
                     gsd=gsd if gsd is not None else ground_gsd(ds))
        if not bands and chosen != non_alpha_bands(ds):
            msg = (f"{src.path} has {ds.count} band(s): reading bands "
                   f"{','.join(map(str, chosen))} as {', '.join(band_names or [])} (by their "
                   f"colour interpretation; choose others with the bands option)")
            src.warnings.append(msg)
            warnings.warn(msg, BandSelectionWarning, stacklevel=2)
        if src.gsd is not None and not (math.isfinite(src.gsd) and src.gsd > 0):
            raise InputError(f"{src.path}: its geotransform gives no usable pixel size "
                             f"({src.gsd:g} m; corrupt?): give the true one with $gsd",
                             options=["gsd"])
        how = sensor_georeferencing(ds)
        if how is not None:
            msg = (f"{src.path} is georeferenced by {how} only: running at "
                   f"{'the given' if gsd is not None else 'their'} pixel size, "
                   f"{src.gsd:.3g} m; the outputs keep the {how} (warp them onto a map "
                   f"grid with e.g. gdalwarp)")
            src.warnings.append(msg)
            warnings.warn(msg, NoCRSWarning, stacklevel=2)
        elif ds.crs is None:
            if gsd is None and gsd_without_crs is not None and model_gsd:
                src.gsd, src.gsd_assumed = gsd_without_crs, True
            msg = no_crs_message(src.path, model_gsd, gsd, gsd_without_crs,
                                 estimated=gsd_estimated and src.gsd_assumed)
            src.warnings.append(msg)
            warnings.warn(msg, NoCRSWarning, stacklevel=2)
        if model_gsd and src.gsd:
            factor = resampling_factor(src.gsd, model_gsd)
            if factor is None:
                raise InputError(_resampling_error(src.path, src.gsd, model_gsd, gsd is None),
                                 options=["gsd"])
            src.factor = factor
        if normalization is not None:
            src.stretch, why = plan_stretch(ds, chosen, normalization.divisor(dt), value_range,
                                            all_valid=src.all_valid)
            if why is not None:
                src._warn(f"{src.path}: {why}")
            if src.stretch is None:
                _value_limits(src, dt, normalization)
        return src
    except BaseException:
        ds.close()
        raise


def resampling_factor(gsd: float, model_gsd: float) -> float | None:
    """Input pixels per model pixel for an input at ``gsd`` and a model at ``model_gsd``
    (1.0 within the GSD tolerance), or None beyond :data:`MAX_RESAMPLING` either way."""
    ratio = model_gsd / gsd
    if not 1 / MAX_RESAMPLING <= ratio <= MAX_RESAMPLING:
        return None
    return 1.0 if same_gsd(gsd, model_gsd) else ratio


def no_crs_message(path: str, model_gsd: float | None, gsd: float | None,
                   gsd_without_crs: float | None = None, estimated: bool = False) -> str:
    """The :class:`NoCRSWarning` text: what the run does without a CRS and, unless a GSD is
    given, which one it assumes (warnings are shown as they are, not rendered per caller
    like a :class:`UserError`'s ``$option``: the option is named in words)."""
    msg = f"{path} has no CRS: continuing in pixel space (the output has no CRS either)"
    if estimated:
        msg += ("; its ground sample distance is unknown: estimating it from the image "
                "(give the true one with the gsd option)")
    elif gsd is None and model_gsd:
        assumed = (f"the model's default for images without a CRS, {gsd_without_crs:g} m"
                   if gsd_without_crs is not None else f"the model's {model_gsd:g} m")
        msg += (f"; its ground sample distance is unknown: assuming {assumed} per pixel "
                "(give the true one with the gsd option)")
    return msg


def _resampling_error(path: str, gsd: float, model_gsd: float, from_file: bool) -> str:
    """One line for a GSD too far from the model's (see :data:`MAX_RESAMPLING`)."""
    lo, hi = model_gsd / MAX_RESAMPLING, model_gsd * MAX_RESAMPLING
    what = f"{path} has {gsd:.4g} m pixels" if from_file else f"the given GSD is {gsd:.4g} m"
    hint = ("; if the file's pixel size is wrong, give the true one with $gsd" if from_file
            else "")
    return (f"{what} but the model works at {model_gsd:g} m: resampling by more than "
            f"{MAX_RESAMPLING:g}x is refused; resample the input to between {lo:g} and "
            f"{hi:g} m first{hint}")


def _value_limits(src: Source, dt: np.dtype, norm: Normalization) -> None:
    """Set ``src.value_limits`` for the per-window check, or warn at once when the card
    declares no range for the input's type (e.g. uint32 on a card for uint8/uint16)."""
    key = "float" if dt.kind == "f" else dt.name
    divisor = norm.divisor(dt)
    if key not in norm.value_range:
        src._warn(f"{src.path} holds {dt.name} pixels but the model card declares value "
                  f"ranges for {', '.join(norm.value_range) or 'no type'} only: values are "
                  f"divided by {divisor:g}; rescale the input to a declared type")
        return
    lo, hi = -VALUE_RANGE_SLACK * divisor, (1 + VALUE_RANGE_SLACK) * divisor
    if dt.kind in "ui" and lo <= np.iinfo(dt).min and np.iinfo(dt).max <= hi:
        return  # every value of the type fits: nothing to check
    src.value_limits = (lo, hi)


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


@dataclass
class WindowPixels:
    """What :func:`read_window` read for one tile."""

    #: raw values (bands, mh, mw) on the model grid (float32 when resampled), 0 where invalid
    data: np.ndarray
    #: (mh, mw) bool, True = data
    mask: np.ndarray
    #: with ``native=True`` and resampling: the raw pixels (bands, h, w) of the clipped
    #: window on the input grid, as read (nodata values and NaN left as they are)
    native: np.ndarray | None = None
    #: their validity (h, w) (also with ``native_mask=True`` alone); None: every native
    #: pixel is valid, or not asked for
    native_valid: np.ndarray | None = None


def read_tile(src: Source, tile: Tile) -> tuple[np.ndarray, np.ndarray]:
    """Raw pixels (bands, mh, mw) and validity mask (mh, mw; True = data) of a tile's part
    inside the raster, on the model grid (:func:`read_window`)."""
    got = read_window(src, tile)
    return got.data, got.mask


def read_window(src: Source, tile: Tile, *, native: bool = False,
                native_mask: bool = False) -> WindowPixels:
    """Raw pixels and validity of a tile's part inside the raster, on the model grid, and
    with ``native`` the same window's pixels at the input's resolution (for an edge-aware
    upsampling of the results, :mod:`idgbr_geo.upsampling`; the model grid's own array
    when the window is not resampled). ``native_mask``: keep the validity at the input's
    resolution (``native_valid``) of a resampled window even without its pixels (for a
    user's coarse map kept at its own resolution, :func:`idgbr_geo.engine.refine_raster`).
    Nodata values, internal masks and alpha bands are all honoured through GDAL's dataset
    mask, and non-finite values (NaN, inf) are nodata too: a float raster without a nodata
    tag often marks gaps with NaN.

    Pixels are read at the input's resolution and resampled to the model grid with torch
    (:func:`resample`): GDAL's resampling on read costs five times the read itself and would
    not hide behind the network on a small machine. Where some pixels are invalid they are
    left out of the resampling (:func:`_resample_valid`), so they never bleed into their
    valid neighbours; invalid pixels hold 0."""
    win = clip(tile.window, src.width, src.height)
    out = model_extent(tile, win, src.factor)
    try:
        data = src.ds.read(src.bands, window=win)
        valid = None if src.all_valid else src.ds.dataset_mask(window=win) > 0
    except RasterioError as exc:
        raise InputError(f"failed to read {src.path} at window {win.col_off},{win.row_off}: "
                         f"{first_line(exc)} (truncated or corrupt file?)") from None
    if data.dtype.kind == "f":
        finite = np.isfinite(data).all(0)
        if not finite.all():
            valid = finite if valid is None else valid & finite
    if src.stretch is not None:
        data = src.stretch.apply(data)
    raw = raw_valid = None
    if native or (native_mask and data.shape[1:] != out):
        # (the resampling and the normalisation after it make new arrays)
        raw = data if native else None
        raw_valid = None if valid is None or valid.all() else valid
    if valid is None or valid.all():
        mask = np.ones(out, bool)
        if data.shape[1:] != out:
            data = resample(data, out)
    elif data.shape[1:] == out:
        mask = valid
        data[:, ~valid] = 0
    else:
        data, mask = _resample_valid(data, valid, out)
    src.check_values(data, mask)
    return WindowPixels(data, mask, raw, raw_valid)


def _resample_valid(data: np.ndarray, valid: np.ndarray, out: tuple[int, int]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Resample only the valid pixels (normalised convolution: the resampled data with
    invalid pixels at 0, divided by the resampled validity) -> float32 data and the mask of
    model pixels at least half covered by valid ones."""
    stack = np.empty((data.shape[0] + 1, *data.shape[1:]), np.float32)
    stack[:-1] = data
    stack[:-1, ~valid] = 0
    stack[-1] = valid
    res = resample(stack, out)
    weight = res[-1]
    mask = weight >= 0.5
    data = np.divide(res[:-1], weight, out=np.zeros_like(res[:-1]), where=mask)
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
    if grid_difference(like, ds) is None:
        return ds
    if ds.crs is None or like.crs is None:
        ds.close()
        raise InputError(f"coarse map {path} is not on the input's grid and cannot be "
                         "reprojected onto it (missing CRS)")
    vrt = WarpedVRT(ds, crs=like.crs, transform=like.transform, width=like.width,
                    height=like.height, resampling=Resampling.nearest)
    return vrt

"""Opening rasters, comparing grids and measuring ground pixel size: one rule for all.

Every command opens its rasters with :func:`open_raster` (one clear :class:`InputError`
for a missing, folder or unreadable file), checks that maps share a pixel grid with
:func:`check_same_grid`, and compares ground sample distances (GSD) with
:func:`same_gsd`, so refine, training, evaluate, vectorize and preview agree on what a
raster is and when two of them line up.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import rasterio
import rasterio.transform
from rasterio.errors import NotGeoreferencedWarning, RasterioError

from .errors import InputError, first_line

#: Relative GSD difference under which a raster is used at its own pixel size (not
#: resampled): at inference against the model's GSD, in training against the target GSD.
#: 5 % is well inside the scale jitter the networks see in training.
GSD_TOLERANCE = 0.05
#: Largest difference between two geotransforms on "one grid", in pixels: rounding in
#: another tool's GeoTIFF writer, never a real shift.
GRID_TOLERANCE_PX = 1e-3
#: Fewest ground control points from which a raster's pixel size is taken (an affine
#: transform has six unknowns: three points fix it).
MIN_GCPS = 3


def open_raster(path: str | os.PathLike[str], what: str = "input") -> rasterio.DatasetReader:
    """Open a raster or raise one clear :class:`InputError` naming it as ``what``.

    rasterio's "not georeferenced" warning is silenced: code that needs a CRS checks for
    one and says what it does without (the engine's :class:`NoCRSWarning`, vectorize's
    ground-size error)."""
    p = os.fspath(path)
    if "://" not in p and not p.startswith("/vsi") and not os.path.exists(p):
        raise InputError(f"{what} {p} does not exist")
    if os.path.isdir(p):
        raise InputError(f"{what} {p} is a folder, not a raster")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(p)
    except RasterioError as exc:
        raise InputError(f"{what} {p} is not a readable raster ({first_line(exc)})") from None


def same_grid(a: Any, b: Any) -> bool:
    """Do two datasets lie on one pixel grid: same size, geotransforms within
    :data:`GRID_TOLERANCE_PX`, same CRS when both have one."""
    return grid_difference(a, b) is None


def grid_difference(a: Any, b: Any) -> str | None:
    """How ``b``'s grid differs from ``a``'s (None: the same grid, see :func:`same_grid`)."""
    if (a.height, a.width) != (b.height, b.width):
        return f"{a.width}x{a.height} vs {b.width}x{b.height} pixels"
    tolerance = GRID_TOLERANCE_PX * max(abs(a.transform.a), abs(a.transform.e), 1e-12)
    if not a.transform.almost_equals(b.transform, precision=tolerance):
        return (f"their geotransforms differ ({tuple(a.transform)[:6]} vs "
                f"{tuple(b.transform)[:6]})")
    if a.crs and b.crs and a.crs != b.crs:
        return f"CRS {a.crs} vs {b.crs}"
    return None


def check_same_grid(ref: Any, other: Any, what: str, ref_what: str = "PRED") -> None:
    """Raise :class:`InputError` unless ``other`` lies on ``ref``'s pixel grid."""
    diff = grid_difference(ref, other)
    if diff is not None:
        raise InputError(f"{ref_what} and {what} are on different grids: {diff}")


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


def mean_gsd(size: tuple[float, float]) -> float:
    """One GSD for a pixel of ground size (across, down): their mean. The single number a
    model card declares and an input is compared with."""
    return (size[0] + size[1]) / 2


def gcp_grid(ds: Any) -> tuple[Any, Any] | None:
    """For a raster georeferenced by ground control points only (no CRS on its grid, e.g.
    a satellite scene before orthorectification): the GCPs' CRS and the affine transform
    that fits them best, or None (a CRS on the grid, fewer than :data:`MIN_GCPS` points, or
    points that fit no transform)."""
    if ds.crs is not None:
        return None
    points, crs = ds.gcps
    if crs is None or len(points) < MIN_GCPS:
        return None
    try:
        transform = rasterio.transform.from_gcps(points)
    except (ArithmeticError, ValueError, RasterioError):
        return None
    if not all(math.isfinite(v) for v in transform[:6]) or transform.determinant == 0:
        return None
    return crs, transform


def sensor_georeferencing(ds: Any) -> str | None:
    """How a raster without a CRS on its grid is still georeferenced (a satellite scene
    before orthorectification): ``"ground control points"`` (see :func:`gcp_grid`),
    ``"RPCs"`` (rational polynomial coefficients), or None."""
    if ds.crs is not None:
        return None
    if gcp_grid(ds) is not None:
        return "ground control points"
    return "RPCs" if ds.rpcs is not None else None


def _rpc_gsd(ds: Any) -> float:
    """Ground size in metres of the centre pixel by the raster's RPCs (at their mean
    height): the mean of its width and height on the WGS 84 ellipsoid."""
    from pyproj import Geod

    r, c = ds.height / 2.0, ds.width / 2.0
    with rasterio.transform.RPCTransformer(ds.rpcs) as rpc:
        lon, lat = rpc.xy([r, r, r + 1], [c, c + 1, c], offset="ul")
    geod = Geod(ellps="WGS84")
    _, _, dx = geod.inv(lon[0], lat[0], lon[1], lat[1])
    _, _, dy = geod.inv(lon[0], lat[0], lon[2], lat[2])
    return mean_gsd((float(dx), float(dy)))


def ground_gsd(ds: Any) -> float | None:
    """A dataset's GSD in metres (:func:`mean_gsd` of :func:`pixel_ground_size`; without a
    CRS on the grid, by its ground control points or RPCs,
    :func:`sensor_georeferencing`), None without any georeferencing, NaN when it gives no
    ground size (corrupt)."""
    crs, transform = ds.crs, ds.transform
    try:
        if crs is None:
            grid = gcp_grid(ds)
            if grid is None:
                return None if ds.rpcs is None else _rpc_gsd(ds)
            crs, transform = grid
        return mean_gsd(pixel_ground_size(crs, transform, ds.width, ds.height))
    except (ArithmeticError, ValueError, RuntimeError, RasterioError):
        return math.nan  # (pyproj errors are RuntimeErrors)


def same_gsd(gsd: float, target: float) -> bool:
    """Is ``gsd`` within :data:`GSD_TOLERANCE` of ``target`` (no resampling needed)?"""
    return abs(target / gsd - 1.0) <= GSD_TOLERANCE

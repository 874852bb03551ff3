"""Class raster -> GeoPackage layers (buildings, roads, ...), in windows, for huge scenes.

This module turns the scene-wide regions found by :mod:`idgbr_geo.polygonize` (exact windowed
polygonization, window-edge merging) into per-class layers: it finishes each region as soon as
it is complete (pixel -> map coordinates with the raster's affine transform, holes filled,
small ones dropped, simplified or regularized), adds road centerlines and the attributes
(ground-metre area/perimeter, mean confidence/probability, scene) and writes GeoPackages.

Ground units: for projected CRSs areas/lengths are map units times the CRS linear unit factor;
for geographic CRSs and (non-transverse) Mercator projections such as Web Mercator the
geometries are reprojected to the UTM zone of the scene centre before measuring, giving true
ground metres (to UTM's < 0.1 % scale error within a zone).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pyogrio
import pyproj
import rasterio
import shapely
from affine import Affine
from shapely.geometry import Polygon

from .centerlines import build_centerlines
from .errors import InputError, OutputError, UserError
from .files import atomic_output, check_distinct, check_output
from .polygonize import (
    CENTERLINE_HALO,
    ClassRasterInfo,
    Finisher,
    Regions,
    inspect_class_raster,
    polygonize_regions,
)
from .rasters import open_raster
from .regularize import regularize_polygons, separate_overlaps, simplify_fast

# the polygonization names are re-exported: they were long importable from here
__all__ = [
    "CENTERLINE_HALO", "DEFAULT_MIN_AREA_M2", "DEFAULT_MIN_AREA_PIXELS", "GDAL_CACHE_MB",
    "AreaSpec", "ClassRasterInfo", "Finisher", "GeoPackageWriter", "Ground", "Regions",
    "check_class_names", "check_gpkg_output", "default_min_area", "inspect_class_raster",
    "layer_name", "polygonize_regions", "vectorize_layers", "vectorize_raster",
]

#: minimum feature area (m^2) per class keyword; other classes default to 9 pixels
DEFAULT_MIN_AREA_M2 = {"building": 4.0, "road": 20.0}
DEFAULT_MIN_AREA_PIXELS = 9.0
#: GDAL block cache while vectorizing (MB), unless GDAL_CACHEMAX is set in the environment
GDAL_CACHE_MB = 64

AreaSpec = float | dict[str, float] | None


# ----------------------------------------------------------------------------- names
def layer_name(class_name: str) -> str:
    """GeoPackage layer name for a class ('building' -> 'buildings', 'road' -> 'roads')."""
    name = re.sub(r"[^0-9a-zA-Z_]+", "_", class_name.strip().lower()).strip("_") or "class"
    plural = {"building": "buildings", "road": "roads"}
    name = plural.get(name, name)
    return name if not name[0].isdigit() else f"c_{name}"


#: layer name prefixes a GeoPackage reserves for its own tables (and SQLite for its own)
_RESERVED_LAYER_PREFIXES = ("gpkg_", "rtree_", "sqlite_")


def check_class_names(names: Sequence[str] | str) -> list[str]:
    """Validate class names given by class id (``["background", "building"]``, or the same as
    one comma-separated string) and return them stripped.

    For class rasters made by other tools, which carry no ``IDGBR_CLASSES`` tag. Each name must
    contain a letter or digit, and the names must give distinct, usable GeoPackage layer names
    (see :func:`layer_name`; so ``Building`` and ``building`` are the same name). Ids named
    ``background``, ``bg`` or ``nodata`` give no layer. Raises :class:`UserError`.
    """
    if isinstance(names, str):
        names = names.split(",")
    try:
        out = [n.strip() for n in names]
    except (TypeError, AttributeError):
        raise UserError(f"class names must be a list of strings, not {names!r}") from None
    if not out:
        raise UserError("no class names given")
    layers: dict[str, str] = {}
    for cid, name in enumerate(out):
        if not re.search(r"[0-9A-Za-z]", name):
            raise UserError(f"class name {name!r} (id {cid}) has no letter or digit: every "
                            "class needs a name that can be a layer name")
        layer = layer_name(name)
        if layer.startswith(_RESERVED_LAYER_PREFIXES) or layer == "road_centerlines":
            raise UserError(f"class name {name!r} (id {cid}) gives the layer name {layer!r}, "
                            "which is reserved (GeoPackage tables, the centerline layer)")
        if layer in layers:
            raise UserError(f"class names {layers[layer]!r} and {name!r} (id {cid}) both give "
                            f"the layer {layer!r}: class names must be unique")
        layers[layer] = name
    return out


# --------------------------------------------------------------------------- ground metres
class Ground:
    """Measures geometries in ground metres, whatever the CRS (see module docstring)."""

    def __init__(self, crs: Any, bounds: tuple[float, float, float, float]) -> None:
        self.crs = pyproj.CRS.from_user_input(crs.to_wkt() if hasattr(crs, "to_wkt") else crs)
        op = self.crs.coordinate_operation
        method = (op.method_name if op is not None else "").lower()
        self.reproject = self.crs.is_geographic or (
            "mercator" in method and "transverse" not in method)
        self.x_scale = 1.0  # x stretch that makes map units locally isotropic on the ground
        self._factor = 1.0
        cx, cy = (bounds[0] + bounds[2]) / 2, (bounds[1] + bounds[3]) / 2
        if self.reproject:
            lon, lat = pyproj.Transformer.from_crs(self.crs, "EPSG:4326", always_xy=True) \
                .transform(cx, cy)
            if not (math.isfinite(lon) and math.isfinite(lat)):
                raise ValueError(f"the scene centre ({cx}, {cy}) has no longitude/latitude")
            zone = int((lon + 180) // 6) % 60 + 1
            utm = pyproj.CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)
            self._to_utm = pyproj.Transformer.from_crs(self.crs, utm, always_xy=True)
            if self.crs.is_geographic:
                self.x_scale = math.cos(math.radians(lat))
        else:
            self._factor = float(self.crs.axis_info[0].unit_conversion_factor or 1.0)

    def metric(self, geoms: np.ndarray) -> np.ndarray:
        """The geometries in a local metric CRS (metres)."""
        if self.reproject:
            return shapely.transform(
                geoms, lambda xy: np.column_stack(self._to_utm.transform(xy[:, 0], xy[:, 1])))
        return geoms if self._factor == 1.0 else shapely.transform(geoms,
                                                                   lambda xy: xy * self._factor)

    def area(self, geoms: np.ndarray) -> np.ndarray:
        return shapely.area(self.metric(geoms))

    def length(self, geoms: np.ndarray) -> np.ndarray:
        return shapely.length(self.metric(geoms))

    def m2_per_unit2(self, transform: Affine, col: float, row: float) -> float:
        """Ground m^2 per squared map unit near pixel (col, row) (for area thresholds)."""
        x, y = transform @ (col, row)
        size = math.sqrt(abs(transform.determinant))  # also right for rotated grids
        px = shapely.box(x, y, x + size, y + size)
        return float(self.area(np.array([px]))[0] / px.area)


def _per_class(spec: AreaSpec, name: str, default: float) -> float:
    """Resolve a per-class area option: a number, a {class: area} dict, or None (default)."""
    if spec is None:
        return default
    if isinstance(spec, dict):
        for key, value in spec.items():
            if key.lower() in {name.lower(), layer_name(name)}:
                return float(value)
        return default
    return float(spec)


def default_min_area(name: str, pixel_m2: float) -> float:
    """Per-class default minimum area in m^2 (keyword match, else 9 pixels)."""
    for key, value in DEFAULT_MIN_AREA_M2.items():
        if key in name.lower():
            return value
    return DEFAULT_MIN_AREA_PIXELS * pixel_m2


def _fill_holes(geoms: np.ndarray, max_hole: float) -> np.ndarray:
    """Drop interior rings smaller than ``max_hole`` (map units^2)."""
    if max_hole <= 0:
        return geoms
    out = geoms.copy()
    for k in np.nonzero(shapely.get_num_interior_rings(geoms) > 0)[0]:
        g = geoms[k]
        holes = [r for r in g.interiors if Polygon(r).area >= max_hole]
        out[k] = Polygon(g.exterior, holes)
    return out


def _valid_polygons(geoms: np.ndarray) -> np.ndarray:
    """Repair invalid geometries, keeping the largest polygon of each."""
    bad = np.nonzero(~shapely.is_valid(geoms) | (shapely.get_type_id(geoms) != 3))[0]
    for k in bad:
        fixed = shapely.make_valid(geoms[k])
        parts = [p for p in shapely.get_parts(fixed) if isinstance(p, Polygon) and p.area > 0]
        geoms[k] = max(parts, key=lambda p: p.area) if parts else None
    return geoms


# ------------------------------------------------------------------------------ layers
def vectorize_layers(
    class_raster: str | Path,
    *,
    probabilities: str | Path | None = None,
    simplify: float | None = None,
    min_area: AreaSpec = None,
    fill_holes: AreaSpec = None,
    regularize: bool = False,
    centerlines: bool = False,
    spur_length: float | None = None,
    window_size: int = 2048,
    scene: str | None = None,
    classes: Sequence[str] | str | None = None,
    progress: bool = False,
) -> dict[str, gpd.GeoDataFrame]:
    """Vectorize a class raster into ``{layer name: GeoDataFrame}`` in the raster's CRS.

    ``simplify``: Douglas-Peucker tolerance in map units (default one pixel, 0 = off; with
    ``regularize`` buildings get the rectilinear fit instead, which simplifies by one pixel).
    ``min_area`` / ``fill_holes``: m^2, a number for all classes or ``{class: m2}``; features
    (holes) smaller than that are dropped (filled). Defaults: building 4, road 20, other classes
    9 pixels; holes default to the class's minimum area. ``regularize`` makes building
    footprints rectilinear; ``centerlines`` adds a ``road_centerlines`` layer (spurs shorter than
    ``spur_length`` metres, default 20 pixels, are pruned). Background and nodata give nothing.

    ``classes``: class names by class id (e.g. ``["background", "building"]``), for rasters
    without the ``IDGBR_CLASSES`` tag that ``refine`` writes (their layers are otherwise
    ``class_1``, ``class_2``, ...); they replace the tag's names. Checked by
    :func:`check_class_names`; a class id in the raster without a name is an error.
    """
    names = check_class_names(classes) if classes is not None else None
    # every block is read once (plus centerline halos): GDAL's default block cache (5 % of RAM)
    # would only keep the whole decompressed scene in memory
    # (rasterio.Env takes GDAL_CACHEMAX in bytes)
    cache = {} if "GDAL_CACHEMAX" in os.environ else {"GDAL_CACHEMAX": GDAL_CACHE_MB * 2**20}
    with rasterio.Env(**cache):
        src = open_raster(class_raster, "class raster")
        prob = (open_raster(probabilities, "probabilities raster")
                if probabilities is not None else None)
        try:
            info = inspect_class_raster(src)
            if names is not None:
                info = dataclasses.replace(info, classes=names)
            scene = scene if scene is not None else info.path.stem
            n_known = len(info.classes) if info.classes else 0
            road_ids = [k for k in range(max(n_known, 1)) if "road" in info.name(k).lower()]
            shaper = _Shaper(info, simplify, min_area, fill_holes, regularize,
                             named=names is not None)
            regions, road_parts = polygonize_regions(
                src, info, window_size=window_size, probabilities=prob,
                centerline_ids=road_ids if centerlines else (), finish=shaper, progress=progress)
        finally:
            src.close()
            if prob is not None:
                prob.close()
    ground = shaper.ground
    ids = sorted(set(int(c) for c in regions.class_id)
                 | {k for k in range(n_known) if not info.is_background(k)})
    if not ids and info.classes is not None:
        whose = "the class names" if names is not None else "its classes"
        raise InputError(f"{info.path.name}: {whose} {info.classes} have no foreground "
                         "class to vectorize")
    ids = ids or [1]  # untagged and all background: an empty `class_1` layer
    layers: dict[str, gpd.GeoDataFrame] = {}
    for cid in ids:
        name = info.name(cid)
        part = regions.subset(regions.class_id == cid)
        b = shapely.bounds(part.geometry).T  # spatial order: independent of the window size
        part = part.subset(np.lexsort((b[2], b[3], b[0], b[1])) if len(part.geometry) else [])
        geoms = part.geometry
        if shaper.regularizes(name):
            geoms = _valid_polygons(separate_overlaps(geoms))
            part = part.with_geometry(geoms).subset(~shapely.is_missing(geoms))
            geoms = part.geometry
        px = np.maximum(part.pixels, 1) * 255.0
        nan = np.full(len(geoms), np.nan)
        layers[_unique(layer_name(name), layers)] = gpd.GeoDataFrame({
            "class": np.full(len(geoms), name, dtype=object),
            "class_id": np.full(len(geoms), cid, dtype=np.int32),
            "area_m2": ground.area(geoms),
            "perimeter_m": ground.length(geoms),
            "mean_confidence": part.conf_sum / px if info.has_confidence else nan,
            "mean_probability": part.prob_sum / px if prob is not None else nan,
            "scene": np.full(len(geoms), scene, dtype=object),
        }, geometry=gpd.GeoSeries(geoms, crs=info.crs), crs=info.crs)
    if centerlines:
        spur = (20 * shaper.pixel if spur_length is None
                else spur_length / math.sqrt(shaper.m2_per_u2))
        lines = build_centerlines(shaper.to_map(np.asarray(road_parts, dtype=object)), spur)
        if shaper.tol > 0 and len(lines):
            lines = shapely.simplify(lines, shaper.tol, preserve_topology=False)
        layers["road_centerlines"] = gpd.GeoDataFrame({
            "class": np.full(len(lines), "road_centerline", dtype=object),
            "length_m": ground.length(lines),
            "scene": np.full(len(lines), scene, dtype=object),
        }, geometry=gpd.GeoSeries(lines, crs=info.crs), crs=info.crs)
    return layers


class _Shaper:
    """Finishes regions as soon as they are complete: pixel -> map coordinates, fill holes,
    drop small features, simplify or regularize (see :func:`polygonize_regions`)."""

    def __init__(self, info: ClassRasterInfo, simplify: float | None, min_area: AreaSpec,
                 fill_holes: AreaSpec, regularize: bool, named: bool = False) -> None:
        tr = info.transform
        self.info, self.regularize = info, regularize
        self.named = named  # class names were given: an id without one is an error
        self.matrix = [tr.a, tr.b, tr.d, tr.e, tr.c, tr.f]
        self.pixel = math.sqrt(abs(tr.a * tr.e - tr.b * tr.d))
        # a corrupt or absurd transform (zero pixel size, a centre outside the CRS's world)
        # has no ground size: say so instead of dividing by it
        try:
            with np.errstate(all="ignore"):
                self.ground = Ground(info.crs, _bounds(info))
                self.m2_per_u2 = self.ground.m2_per_unit2(tr, info.width / 2, info.height / 2)
        except (ValueError, OverflowError, pyproj.exceptions.ProjError):
            self.m2_per_u2 = math.nan
        if not (0 < self.pixel < math.inf and 0 < self.m2_per_u2 < math.inf):
            raise InputError(f"{info.path.name}: its georeferencing gives no ground size "
                             f"(pixel size {tr.a:g} x {tr.e:g}, origin {tr.c:g}, {tr.f:g} in "
                             f"{info.crs}): check its transform and CRS")
        pixel_m2 = self.pixel ** 2 * self.m2_per_u2
        self.tol = self.pixel if simplify is None else float(simplify)
        self.min_area, self.fill_holes, self.pixel_m2 = min_area, fill_holes, pixel_m2

    def regularizes(self, name: str) -> bool:
        return self.regularize and "build" in name.lower()

    def to_map(self, geoms: np.ndarray) -> np.ndarray:
        return _affine(geoms, self.matrix)

    def __call__(self, geoms_px: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
        out = np.full(len(geoms_px), None, dtype=object)
        for cid in np.unique(class_ids):
            classes = self.info.classes or []
            if self.named and not 0 <= cid < len(classes):
                need = (f"name every id from 0 to {int(cid)} (nodata excepted)" if cid >= 0
                        else "names cover class ids 0, 1, 2, ... only")
                raise InputError(
                    f"{self.info.path.name} has class id {int(cid)}, but {len(classes)} class "
                    f"names were given ({', '.join(classes)}): {need}")
            sel = np.nonzero(class_ids == cid)[0]
            name = self.info.name(int(cid))
            min_a = _per_class(self.min_area, name, default_min_area(name, self.pixel_m2))
            hole_a = _per_class(self.fill_holes, name, min_a)
            # canonical rings (fixed start vertex; merged pieces also lose their collinear
            # window-edge vertices): Douglas-Peucker then gives the same result whether or not
            # a polygon was cut by window edges
            geoms = shapely.normalize(self.to_map(geoms_px[sel]))
            geoms = _fill_holes(geoms, hole_a / self.m2_per_u2)
            big = self.ground.area(geoms) >= min_a
            geoms = geoms[big]
            if self.regularizes(name):
                geoms = regularize_polygons(geoms, unit=self.pixel, x_scale=self.ground.x_scale,
                                            separate=False)
            elif self.tol > 0:
                geoms = simplify_fast(geoms, self.tol)
            out[sel[big]] = _valid_polygons(geoms)
        return out


def _bounds(info: ClassRasterInfo) -> tuple[float, float, float, float]:
    xs, ys = zip(*(info.transform @ (c, r) for c in (0, info.width) for r in (0, info.height)),
                 strict=True)
    return min(xs), min(ys), max(xs), max(ys)


def _affine(geoms: np.ndarray, m: list[float]) -> np.ndarray:
    """Pixel -> map coordinates with the raster's affine transform (vectorized)."""
    if len(geoms) == 0:
        return np.asarray(geoms, dtype=object)
    a, b, d, e, xo, yo = m
    return shapely.transform(geoms, lambda xy: np.column_stack(
        [a * xy[:, 0] + b * xy[:, 1] + xo, d * xy[:, 0] + e * xy[:, 1] + yo]))


def _unique(name: str, taken: dict) -> str:
    k, out = 2, name
    while out in taken:
        out, k = f"{name}_{k}", k + 1
    return out


# ------------------------------------------------------------------------------ writing
class GeoPackageWriter:
    """Write layers from one or several scenes into one GeoPackage, atomically.

    Use as a context manager; :meth:`add` appends each scene's layers (reprojected to the CRS a
    layer was created with, so scenes in different CRSs can share one file). The file appears
    under its final name only when the block ends without error.
    """

    def __init__(self, path: str | Path, overwrite: bool = False) -> None:
        self.path = check_output(path, overwrite)
        self.overwrite = overwrite
        self._ctx: Any = None
        self._tmp: Path | None = None
        self._crs: dict[str, Any] = {}

    def __enter__(self) -> GeoPackageWriter:
        self._ctx = atomic_output(self.path, self.overwrite)
        self._tmp = self._ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> bool | None:
        if exc[0] is None and not self._crs:
            err = OutputError(f"nothing to write to {self.path}: no layers were added")
            self._ctx.__exit__(OutputError, err, None)  # removes the temporary file
            raise err
        return self._ctx.__exit__(*exc)

    def add(self, layers: dict[str, gpd.GeoDataFrame]) -> None:
        if self._tmp is None:
            raise RuntimeError("GeoPackageWriter.add() outside its `with` block")
        for name, gdf in layers.items():
            if name in self._crs and gdf.crs is not None and not gdf.crs.equals(self._crs[name]):
                gdf = gdf.to_crs(self._crs[name])
            kinds = set(gdf.geom_type.unique())
            gtype = "LineString" if "road_centerlines" == name else "Polygon"
            promote = bool(kinds - {gtype})
            try:
                pyogrio.write_dataframe(gdf, self._tmp, layer=name, driver="GPKG",
                                        append=name in self._crs, promote_to_multi=promote,
                                        geometry_type=None if len(gdf) else gtype)
            except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError, OSError) as exc:
                raise OutputError(f"cannot write {self.path}: {exc}") from None
            self._crs.setdefault(name, gdf.crs)


def check_gpkg_output(path: str | Path, overwrite: bool) -> Path:
    """Validate a GeoPackage output path early (exists, folder, suffix)."""
    out = check_output(path, overwrite)
    if out.suffix.lower() != ".gpkg":
        raise OutputError(f"{out} must end in .gpkg (GeoPackage)")
    return out


def vectorize_raster(
    class_raster: str | Path,
    out_gpkg: str | Path | GeoPackageWriter,
    *,
    probabilities: str | Path | None = None,
    simplify: float | None = None,
    min_area: AreaSpec = None,
    fill_holes: AreaSpec = None,
    regularize: bool = False,
    centerlines: bool = False,
    spur_length: float | None = None,
    window_size: int = 2048,
    scene: str | None = None,
    classes: Sequence[str] | str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Vectorize a class raster into a GeoPackage (or into an open :class:`GeoPackageWriter`,
    e.g. to merge several scenes with a ``scene`` attribute). Returns a summary:
    ``{"output", "scene", "layers": {name: feature count}}``. See :func:`vectorize_layers`
    (``classes``: names by class id for rasters without the ``IDGBR_CLASSES`` tag)."""
    if classes is not None:
        classes = check_class_names(classes)  # before any file is touched
    # fail before the expensive part; an input is never replaced, even with overwrite
    target = out_gpkg.path if isinstance(out_gpkg, GeoPackageWriter) else out_gpkg
    check_distinct({"class raster": class_raster, "$probabilities raster": probabilities},
                   {"output": target})
    if not isinstance(out_gpkg, GeoPackageWriter):
        out = check_gpkg_output(out_gpkg, overwrite)
    layers = vectorize_layers(class_raster, probabilities=probabilities, simplify=simplify,
                              min_area=min_area, fill_holes=fill_holes, regularize=regularize,
                              centerlines=centerlines, spur_length=spur_length,
                              window_size=window_size, scene=scene, classes=classes,
                              progress=progress)
    if isinstance(out_gpkg, GeoPackageWriter):
        out_gpkg.add(layers)
        out = out_gpkg.path
    else:
        with GeoPackageWriter(out, overwrite) as writer:
            writer.add(layers)
    return {"output": str(out), "scene": scene if scene is not None else Path(class_raster).stem,
            "layers": {k: int(len(v)) for k, v in layers.items()}}

"""Class raster -> GeoPackage layers (buildings, roads, ...), in windows, for huge scenes.

How the windowed polygonization stays exact: each window is labelled into 4-connected
components of equal class (``skimage.measure.label``) and the *label* image is polygonized with
``rasterio.features.shapes`` in pixel coordinates (integers, so shared edges match exactly).
Components that continue into the next window are found by comparing the label columns/rows on
both sides of every internal window edge; the pairs form a graph whose connected components
(``scipy.sparse.csgraph``) are the scene-wide regions, and only those pieces are unioned. The
result equals polygonizing the whole raster at once (same polygons, same areas). Regions that do
not touch an internal window edge are finished at once (mapped to the CRS with the raster's
affine transform, holes filled, small ones dropped, simplified or regularized); only the
edge-touching pieces wait, raw, for the merge. Memory therefore holds one window, one row of
window edges, the finished features and the few pending pieces.

Ground units: for projected CRSs areas/lengths are map units times the CRS linear unit factor;
for geographic CRSs and (non-transverse) Mercator projections such as Web Mercator the
geometries are reprojected to the UTM zone of the scene centre before measuring, giving true
ground metres (to UTM's < 0.1 % scale error within a zone).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pyogrio
import pyproj
import rasterio
import shapely
from affine import Affine
from rasterio.errors import RasterioIOError
from rasterio.features import shapes
from rasterio.windows import Window
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from shapely.geometry import Polygon
from skimage.measure import label as label_components
from tqdm import tqdm

from .centerlines import build_centerlines, skeleton_lines
from .errors import InputError, OutputError
from .files import atomic_output, check_output
from .regularize import regularize_polygons, separate_overlaps, simplify_fast

#: minimum feature area (m^2) per class keyword; other classes default to 9 pixels
DEFAULT_MIN_AREA_M2 = {"building": 4.0, "road": 20.0}
DEFAULT_MIN_AREA_PIXELS = 9.0
#: GDAL block cache while vectorizing (MB), unless GDAL_CACHEMAX is set in the environment
GDAL_CACHE_MB = 64
#: halo (pixels) read around each window for the road skeleton (> half the widest road)
CENTERLINE_HALO = 96

AreaSpec = float | dict[str, float] | None


# ----------------------------------------------------------------------------- raster input
@dataclass
class ClassRasterInfo:
    """What the vectorizer needs to know about a class raster."""

    path: Path
    classes: list[str] | None  # from the IDGBR_CLASSES tag, None if missing
    nodata: float | None
    has_confidence: bool
    crs: Any
    transform: Affine
    width: int
    height: int

    def name(self, class_id: int) -> str:
        if self.classes is not None and 0 <= class_id < len(self.classes):
            return self.classes[class_id]
        return f"class_{class_id}"

    def is_background(self, class_id: int) -> bool:
        if self.classes is None or class_id >= len(self.classes):
            return class_id == 0
        return self.classes[class_id].strip().lower() in {"background", "bg", "nodata"}


def _open(path: str | Path) -> rasterio.DatasetReader:
    if not Path(path).exists():
        raise InputError(f"{path} does not exist")
    try:
        return rasterio.open(path)
    except RasterioIOError as exc:
        raise InputError(f"cannot open {path} as a raster: {str(exc).splitlines()[0]}") from None


def inspect_class_raster(src: rasterio.DatasetReader) -> ClassRasterInfo:
    """Validate a class raster (integer band 1, optional confidence band 2, a CRS)."""
    name = Path(src.name).name
    if src.count > 2:
        raise InputError(f"{name} has {src.count} bands: not a class raster (expected band 1 "
                         "= class ids, optional band 2 = confidence)")
    if np.dtype(src.dtypes[0]).kind not in "iu":
        raise InputError(f"{name} is a {src.dtypes[0]} raster: not a class raster "
                         "(expected integer class ids)")
    if np.dtype(src.dtypes[0]).itemsize > 4:
        raise InputError(f"{name} has {src.dtypes[0]} values: class ids must fit in 32 bits")
    if src.crs is None:
        raise InputError(f"{name} has no CRS: cannot georeference vector features "
                         "(assign one, e.g. gdal_edit.py -a_srs EPSG:XXXX)")
    classes = None
    tag = src.tags().get("IDGBR_CLASSES")
    if tag:
        try:
            parsed = json.loads(tag)
            if isinstance(parsed, list) and all(isinstance(c, str) for c in parsed):
                classes = parsed
        except json.JSONDecodeError:
            classes = None
    return ClassRasterInfo(Path(src.name), classes, src.nodata, src.count == 2, src.crs,
                           src.transform, src.width, src.height)


def layer_name(class_name: str) -> str:
    """GeoPackage layer name for a class ('building' -> 'buildings', 'road' -> 'roads')."""
    name = re.sub(r"[^0-9a-zA-Z_]+", "_", class_name.strip().lower()).strip("_") or "class"
    plural = {"building": "buildings", "road": "roads"}
    name = plural.get(name, name)
    return name if not name[0].isdigit() else f"c_{name}"


def _probability_bands(prob: rasterio.DatasetReader, info: ClassRasterInfo) -> dict[int, int]:
    """class id -> 1-based band of the probabilities raster (by description, else by index)."""
    if (prob.width, prob.height) != (info.width, info.height) or not np.allclose(
            tuple(prob.transform), tuple(info.transform)):
        raise InputError(f"probabilities raster {Path(prob.name).name} is not on the same grid "
                         f"as {info.path.name}")
    desc = [(d or "").strip().lower() for d in prob.descriptions]
    mapping = {}
    for k in range(max(len(info.classes or []), prob.count)):
        cname = info.name(k).lower()
        if cname in desc:
            mapping[k] = desc.index(cname) + 1
        elif k < prob.count:
            mapping[k] = k + 1
    return mapping


# ------------------------------------------------------------------- windowed polygonization
#: finishes a batch of regions: (pixel-coordinate polygons, class ids) -> geometries (None = drop)
Finisher = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class Regions:
    """Scene-wide regions, one row per 4-connected class component."""

    geometry: np.ndarray  # shapely Polygons (pixel coordinates x=col, y=row, unless finished)
    class_id: np.ndarray
    pixels: np.ndarray
    conf_sum: np.ndarray  # sum of confidence (0..255) over the region, 0 if not available
    prob_sum: np.ndarray  # sum of the class probability (0..255), 0 if not available

    @staticmethod
    def concat(parts: list[Regions]) -> Regions:
        if not parts:
            e = np.empty(0)
            return Regions(np.empty(0, dtype=object), e.astype(np.int64), e, e, e)
        return Regions(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                         ("geometry", "class_id", "pixels", "conf_sum", "prob_sum")))

    def with_geometry(self, geometry: np.ndarray) -> Regions:
        return Regions(geometry, self.class_id, self.pixels, self.conf_sum, self.prob_sum)

    def subset(self, keep: np.ndarray) -> Regions:
        return Regions(self.geometry[keep], self.class_id[keep], self.pixels[keep],
                       self.conf_sum[keep], self.prob_sum[keep])

    def finished(self, finish: Finisher | None) -> Regions:
        """Apply ``finish`` and drop the regions it rejects (None)."""
        if finish is None or len(self.geometry) == 0:
            return self
        out = self.with_geometry(finish(self.geometry, self.class_id))
        return out.subset(~shapely.is_missing(out.geometry))


def _windows(width: int, height: int, size: int) -> Iterable[tuple[int, int, Window]]:
    for i, row in enumerate(range(0, height, size)):
        for j, col in enumerate(range(0, width, size)):
            yield i, j, Window(col, row, min(size, width - col), min(size, height - row))


def _edge_pairs(lab_a: np.ndarray, cls_a: np.ndarray, lab_b: np.ndarray, cls_b: np.ndarray,
                off_a: int, off_b: int) -> np.ndarray:
    """Global id pairs of components that touch across a window edge (same class)."""
    ok = (lab_a > 0) & (lab_b > 0) & (cls_a == cls_b)
    if not ok.any():
        return np.empty((0, 2), dtype=np.int64)
    pairs = np.stack([lab_a[ok] + off_a, lab_b[ok] + off_b], axis=1).astype(np.int64)
    return np.unique(pairs, axis=0)


def _touches_internal_edge(polys: np.ndarray, win: Window, width: int, height: int) -> np.ndarray:
    """Pieces that reach a window edge shared with another window (may continue there)."""
    b = shapely.bounds(polys)
    c0, r0 = int(win.col_off), int(win.row_off)
    c1, r1 = c0 + int(win.width), r0 + int(win.height)
    return (((c0 > 0) & (b[:, 0] == c0)) | ((c1 < width) & (b[:, 2] == c1))
            | ((r0 > 0) & (b[:, 1] == r0)) | ((r1 < height) & (b[:, 3] == r1)))


def polygonize_regions(
    src: rasterio.DatasetReader,
    info: ClassRasterInfo,
    *,
    window_size: int = 2048,
    probabilities: rasterio.DatasetReader | None = None,
    centerline_ids: Iterable[int] = (),
    finish: Finisher | None = None,
    progress: bool = False,
) -> tuple[Regions, list]:
    """Polygonize every non-background class region of the raster, window by window.

    Regions entirely inside a window are passed to ``finish`` (e.g. filter, simplify,
    regularize) right away; only pieces touching an internal window edge are kept raw until
    they are merged, so memory holds the finished features, not the pixel outlines.
    Returns the regions and the road centerline pieces (pixel coordinates; empty unless
    ``centerline_ids`` is given).
    """
    window_size = max(1, int(window_size))
    centerline_ids = sorted(set(centerline_ids))
    prob_bands = _probability_bands(probabilities, info) if probabilities is not None else {}
    seen: set[int] = set()
    done: list[Regions] = []
    pending: list[Regions] = []
    pending_gids, pairs_l, road_parts = [], [], []
    left_edge: tuple[np.ndarray, np.ndarray, int] | None = None
    top_edges: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}
    offset = 0
    n_win = math.ceil(info.width / window_size) * math.ceil(info.height / window_size)
    for i, j, win in tqdm(_windows(info.width, info.height, window_size), total=n_win,
                          desc="polygonize", unit="win", disable=not progress):
        vals = src.read(1, window=win)
        if vals.dtype.kind == "u" and vals.dtype.itemsize <= 2:  # bincount: ~4x faster
            uniq = np.nonzero(np.bincount(vals.ravel()))[0].astype(vals.dtype)
        else:
            uniq = np.unique(vals)
        seen.update(int(v) for v in uniq)
        if len(seen) > 256:
            raise InputError(f"{info.path.name} has more than 256 distinct values: "
                             "not a class raster")
        keep_vals = [v for v in uniq if not info.is_background(int(v))
                     and (info.nodata is None or v != info.nodata)]
        keep = np.isin(vals, keep_vals)
        work = vals.astype(np.int32 if vals.dtype.itemsize < 4 else np.int64)
        sentinel = int(min(keep_vals)) - 1 if keep_vals else -1  # never a kept class id
        work[~keep] = sentinel
        lab = label_components(work, background=sentinel, connectivity=1).astype(np.int32)
        n = int(lab.max())
        if j > 0 and left_edge is not None:
            pairs_l.append(_edge_pairs(left_edge[0], left_edge[1], lab[:, 0], work[:, 0],
                                       left_edge[2], offset))
        if i > 0 and j in top_edges:
            t = top_edges[j]
            pairs_l.append(_edge_pairs(t[0], t[1], lab[0, :], work[0, :], t[2], offset))
        left_edge = (lab[:, -1].copy(), work[:, -1].copy(), offset)
        top_edges[j] = (lab[-1, :].copy(), work[-1, :].copy(), offset)
        if n:
            flat = lab.ravel()
            cls_of = np.zeros(n + 1, dtype=np.int64)
            cls_of[flat] = work.ravel()
            conf = np.zeros(n + 1)
            if info.has_confidence:
                conf = np.bincount(flat, weights=_as_255(src.read(2, window=win)).ravel(),
                                   minlength=n + 1)
            prob = np.zeros(n + 1)
            if prob_bands:
                pick = np.zeros(vals.shape, dtype=np.float64)
                for cid in np.unique(cls_of[1:]):
                    band = prob_bands.get(int(cid))
                    if band is not None:
                        m = keep & (vals == cid)
                        pick[m] = _as_255(probabilities.read(band, window=win))[m]
                prob = np.bincount(flat, weights=pick.ravel(), minlength=n + 1)
            polys, labels = _polygonize_labels(lab, win)
            regions = Regions(polys, cls_of[labels],
                              np.bincount(flat, minlength=n + 1)[labels].astype(float),
                              conf[labels], prob[labels])
            touch = _touches_internal_edge(polys, win, info.width, info.height)
            pending.append(regions.subset(touch))
            pending_gids.append(labels[touch] + offset)
            done.append(regions.subset(~touch).finished(finish))
        if centerline_ids:
            road_parts.extend(_window_centerlines(src, info, win, centerline_ids))
        offset += n
    if pending_gids:
        merged = _merge_regions(Regions.concat(pending), np.concatenate(pending_gids), pairs_l)
        done.append(merged.finished(finish))
    return Regions.concat(done), road_parts


def _as_255(band: np.ndarray) -> np.ndarray:
    """Confidence/probability on the 0..255 scale of the contract (float bands hold 0..1)."""
    return band * 255.0 if band.dtype.kind == "f" else band


def _polygonize_labels(lab: np.ndarray, win: Window) -> tuple[np.ndarray, np.ndarray]:
    """GDAL-polygonize a label image in scene pixel coordinates; build the polygons
    vectorized (one coordinate array per window instead of a Polygon() call per feature)."""
    flat: list = []
    ring_len, ring_poly, labels = [], [], []
    tr = Affine.translation(win.col_off, win.row_off)
    for k, (geom, value) in enumerate(shapes(lab, mask=lab > 0, connectivity=4, transform=tr)):
        for ring in geom["coordinates"]:
            flat.extend(ring)
            ring_len.append(len(ring))
            ring_poly.append(k)
        labels.append(int(value))
    if not labels:
        return np.empty(0, dtype=object), np.empty(0, dtype=np.int64)
    rings = shapely.linearrings(np.asarray(flat, dtype=float),
                                indices=np.repeat(np.arange(len(ring_len)), ring_len))
    return shapely.polygons(rings, indices=np.asarray(ring_poly)), np.asarray(labels, np.int64)


def _window_centerlines(src: rasterio.DatasetReader, info: ClassRasterInfo, win: Window,
                        ids: list[int]) -> list:
    """Skeleton line pieces of one window's road mask, read with a halo."""
    h = CENTERLINE_HALO
    r0, c0 = max(0, int(win.row_off) - h), max(0, int(win.col_off) - h)
    r1 = min(info.height, int(win.row_off + win.height) + h)
    c1 = min(info.width, int(win.col_off + win.width) + h)
    padded = src.read(1, window=Window(c0, r0, c1 - c0, r1 - r0))
    core = (slice(int(win.row_off) - r0, int(win.row_off) - r0 + int(win.height)),
            slice(int(win.col_off) - c0, int(win.col_off) - c0 + int(win.width)))
    return skeleton_lines(np.isin(padded, ids), core, (r0, c0))


def _merge_regions(pieces: Regions, gids: np.ndarray, pairs_l: list) -> Regions:
    """Union the pieces of regions cut by window edges (graph components of edge pairs)."""
    nodes, node_of = np.unique(gids, return_inverse=True)
    pairs = np.concatenate(pairs_l) if pairs_l else np.empty((0, 2), dtype=np.int64)
    if len(pairs) == 0 and len(nodes) == len(gids):
        return pieces
    a, b = np.searchsorted(nodes, pairs[:, 0]), np.searchsorted(nodes, pairs[:, 1])
    graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(len(nodes), len(nodes)))
    _, comp = connected_components(graph, directed=False)
    group = comp[node_of]
    order = np.argsort(group, kind="stable")
    g_sorted = group[order]
    starts = np.r_[0, np.nonzero(np.diff(g_sorted))[0] + 1]
    counts = np.diff(np.r_[starts, len(order)])
    first = order[starts]
    out = pieces.geometry[first].copy()
    for k in np.nonzero(counts > 1)[0]:
        union = shapely.union_all(pieces.geometry[order[starts[k]:starts[k] + counts[k]]])
        # drop the collinear vertices the window edges left (GDAL output has none)
        out[k] = shapely.simplify(union, 0.0, preserve_topology=False)
    n_groups = len(starts)
    gidx = np.searchsorted(g_sorted[starts], group)
    return Regions(out, pieces.class_id[first], np.bincount(gidx, pieces.pixels, n_groups),
                   np.bincount(gidx, pieces.conf_sum, n_groups),
                   np.bincount(gidx, pieces.prob_sum, n_groups))


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
    """
    # every block is read once (plus centerline halos): GDAL's default block cache (5 % of RAM)
    # would only keep the whole decompressed scene in memory
    cache = {} if "GDAL_CACHEMAX" in os.environ else {"GDAL_CACHEMAX": GDAL_CACHE_MB}
    with rasterio.Env(**cache):
        src = _open(class_raster)
        prob = _open(probabilities) if probabilities is not None else None
        try:
            info = inspect_class_raster(src)
            scene = scene if scene is not None else info.path.stem
            n_known = len(info.classes) if info.classes else 0
            road_ids = [k for k in range(max(n_known, 1)) if "road" in info.name(k).lower()]
            shaper = _Shaper(info, simplify, min_area, fill_holes, regularize)
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
        raise InputError(f"{info.path.name}: its classes {info.classes} have no foreground "
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
                 fill_holes: AreaSpec, regularize: bool) -> None:
        tr = info.transform
        self.info, self.regularize = info, regularize
        self.matrix = [tr.a, tr.b, tr.d, tr.e, tr.c, tr.f]
        self.pixel = math.sqrt(abs(tr.a * tr.e - tr.b * tr.d))
        self.ground = Ground(info.crs, _bounds(info))
        self.m2_per_u2 = self.ground.m2_per_unit2(tr, info.width / 2, info.height / 2)
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
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Vectorize a class raster into a GeoPackage (or into an open :class:`GeoPackageWriter`,
    e.g. to merge several scenes with a ``scene`` attribute). Returns a summary:
    ``{"output", "scene", "layers": {name: feature count}}``. See :func:`vectorize_layers`."""
    if not isinstance(out_gpkg, GeoPackageWriter):
        out = check_gpkg_output(out_gpkg, overwrite)  # fail before the expensive part
    layers = vectorize_layers(class_raster, probabilities=probabilities, simplify=simplify,
                              min_area=min_area, fill_holes=fill_holes, regularize=regularize,
                              centerlines=centerlines, spur_length=spur_length,
                              window_size=window_size, scene=scene, progress=progress)
    if isinstance(out_gpkg, GeoPackageWriter):
        out_gpkg.add(layers)
        out = out_gpkg.path
    else:
        with GeoPackageWriter(out, overwrite) as writer:
            writer.add(layers)
    return {"output": str(out), "scene": scene if scene is not None else Path(class_raster).stem,
            "layers": {k: int(len(v)) for k, v in layers.items()}}

"""Exact windowed polygonization of a class raster: the region geometry, not the layers.

Split from :mod:`idgbr_geo.vectorize` so the pixel-exact machinery (windows, labelling, window
edge merging) can be read and tested on its own; the per-class layers, attributes and
post-processing that consume its :class:`Regions` stay there.

How the windowed polygonization stays exact: each window is labelled into 4-connected
components of equal class (``skimage.measure.label``) and the *label* image is polygonized with
``rasterio.features.shapes`` in pixel coordinates (integers, so shared edges match exactly).
Components that continue into the next window are found by comparing the label columns/rows on
both sides of every internal window edge; the pairs form a graph whose connected components
(``scipy.sparse.csgraph``) are the scene-wide regions, and only those pieces are unioned. The
result equals polygonizing the whole raster at once (same polygons, same areas). Regions that do
not touch an internal window edge are finished at once (by the caller's ``finish``, e.g. mapped
to the CRS, holes filled, small ones dropped, simplified or regularized); only the edge-touching
pieces wait, raw, for the merge. Memory therefore holds one window, one row of window edges,
the finished features and the few pending pieces.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import shapely
from affine import Affine
from rasterio.features import shapes
from rasterio.windows import Window
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from skimage.measure import label as label_components
from tqdm import tqdm

from .centerlines import skeleton_lines
from .errors import InputError
from .files import output_name, read_errors
from .rasters import sensor_georeferencing

#: halo (pixels) read around each window for the road skeleton (> half the widest road)
CENTERLINE_HALO = 96


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


def check_map_grid(src: rasterio.DatasetReader, name: str) -> None:
    """Polygons need a CRS on the raster's grid: one :class:`InputError` saying how to get
    one otherwise (``refine --vector`` checks its input with this before any work)."""
    how = sensor_georeferencing(src)
    if how is not None:
        raise InputError(f"{name} is georeferenced by {how} only: cannot place vector "
                         "features; warp it onto a map grid first (e.g. gdalwarp -r near"
                         f"{' -rpc' if how == 'RPCs' else ''})")
    if src.crs is None:
        raise InputError(f"{name} has no CRS: cannot georeference vector features "
                         "(assign one, e.g. gdal_edit.py -a_srs EPSG:XXXX)")


def inspect_class_raster(src: rasterio.DatasetReader) -> ClassRasterInfo:
    """Validate a class raster (integer band 1, optional confidence band 2, a CRS)."""
    path = output_name(src.name)  # refine --vector reads its output's temporary file
    name = path.name
    if src.count > 2:
        raise InputError(f"{name} has {src.count} bands: not a class raster (expected band 1 "
                         "= class ids, optional band 2 = confidence)")
    if np.dtype(src.dtypes[0]).kind not in "iu":
        raise InputError(f"{name} is a {src.dtypes[0]} raster: not a class raster "
                         "(expected integer class ids)")
    if np.dtype(src.dtypes[0]).itemsize > 4:
        raise InputError(f"{name} has {src.dtypes[0]} values: class ids must fit in 32 bits")
    check_map_grid(src, name)
    classes = None
    tag = src.tags().get("IDGBR_CLASSES")
    if tag:
        try:
            parsed = json.loads(tag)
            if isinstance(parsed, list) and all(isinstance(c, str) for c in parsed):
                classes = parsed
        except json.JSONDecodeError:
            classes = None
    return ClassRasterInfo(path, classes, src.nodata, src.count == 2, src.crs,
                           src.transform, src.width, src.height)


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
        with read_errors(info.path, "class raster"):
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
                with read_errors(info.path, "class raster"):
                    band2 = src.read(2, window=win)
                conf = np.bincount(flat, weights=_as_255(band2).ravel(), minlength=n + 1)
            prob = np.zeros(n + 1)
            if prob_bands:
                pick = np.zeros(vals.shape, dtype=np.float64)
                for cid in np.unique(cls_of[1:]):
                    band = prob_bands.get(int(cid))
                    if band is not None:
                        m = keep & (vals == cid)
                        with read_errors(probabilities.name, "probabilities raster"):
                            pband = probabilities.read(band, window=win)
                        pick[m] = _as_255(pband)[m]
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
    with read_errors(info.path, "class raster"):
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

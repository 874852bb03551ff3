"""Building regularization: pixel-staircase outlines -> rectilinear footprints.

Why: a polygonized building mask follows pixel edges, so a rotated roof becomes a staircase.
GIS users expect footprints with straight walls meeting at right angles, aligned with the
building's own orientation. Per building we

1. estimate the dominant wall direction from the minimum-area oriented rectangle,
2. rotate the lightly simplified outline so that direction is the x axis, classify each edge
   as horizontal or vertical, group consecutive edges of the same kind into one wall at their
   length-weighted mean position, and drop walls shorter than ``min_edge`` (merging neighbours),
3. intersect consecutive walls -> a rectilinear ring, rotate back.

A result is accepted only if it is a valid polygon whose area is within ``max_area_change`` of
the raw polygon; otherwise the oriented minimum rectangle is tried (near-rectangular shapes),
and as a last resort the simplified outline is kept. Overlaps created between neighbouring
buildings are cut away afterwards, so buildings the raster separates stay separate.
"""

from __future__ import annotations

import math

import numpy as np
import shapely
from shapely.geometry import Polygon


def dominant_angles(envelopes: np.ndarray) -> np.ndarray:
    """Dominant wall direction (radians, in [-pi/4, pi/4)) from minimum-area oriented
    rectangles (``shapely.oriented_envelope`` of the buildings).

    On pixel-staircase outlines the oriented rectangle is far more stable than edge-angle
    histograms (measured: <= 1.3 degrees off for a 20 x 12 px building, versus up to 6-10
    degrees for length-weighted edge angles of the simplified outline).
    """
    envelopes = np.asarray(envelopes, dtype=object)
    theta = np.zeros(len(envelopes))
    ok = shapely.get_type_id(envelopes) == 3  # degenerate inputs give points/lines: angle 0
    if ok.any():
        ring = shapely.get_exterior_ring(envelopes[ok])
        p0 = shapely.get_coordinates(shapely.get_point(ring, 0))
        p1 = shapely.get_coordinates(shapely.get_point(ring, 1))
        d = p1 - p0
        theta[ok] = (np.arctan2(d[:, 1], d[:, 0]) + math.pi / 4) % (math.pi / 2) - math.pi / 4
    return theta


def dominant_angle(poly: Polygon) -> float:
    """Dominant wall direction of one polygon (see :func:`dominant_angles`)."""
    return float(dominant_angles(np.array([shapely.oriented_envelope(poly)]))[0])


def _runs(p: list[list[float]]) -> list[list[float]] | None:
    """Group the edges of an (open) rotated ring into alternating horizontal/vertical walls.

    Returns ``[is_horizontal, position, length]`` per wall, or None if the ring has only one
    kind of edge. Plain Python: rings have ~10 vertices, where numpy call overhead dominates.
    """
    n = len(p)
    edges = []  # (horizontal, position * weight, weight, projected length)
    for k in range(n):
        x0, y0 = p[k]
        x1, y1 = p[k + 1 - n]
        dx, dy = x1 - x0, y1 - y0
        w = math.hypot(dx, dy) + 1e-12
        if abs(dx) >= abs(dy):
            edges.append((True, (y0 + y1) * 0.5 * w, w, abs(dx)))
        else:
            edges.append((False, (x0 + x1) * 0.5 * w, w, abs(dy)))
    start = next((k for k in range(n) if edges[k][0] != edges[k - 1][0]), None)
    if start is None:
        return None
    runs: list[list[float]] = []
    for k in range(start, start + n):
        h, pw, w, length = edges[k % n]
        if runs and runs[-1][0] == h:
            r = runs[-1]
            r[1] += pw
            r[3] += w
            r[2] += length
        else:
            runs.append([h, pw, length, w])
    return [[h, pw / w, length] for h, pw, length, w in runs]


def _drop_short(runs: list[list[float]], min_edge: float) -> list[list[float]]:
    """Remove walls shorter than ``min_edge``; the two neighbours (same kind) become one wall."""
    while len(runs) > 4:
        i = min(range(len(runs)), key=lambda k: runs[k][2])
        if runs[i][2] >= min_edge:
            break
        n = len(runs)
        runs = runs[(i - 1) % n:] + runs[:(i - 1) % n]  # rotate: removed triple is runs[0:3]
        a, b = runs[0], runs[2]
        wa, wb = a[2] + 1e-12, b[2] + 1e-12
        runs = [[a[0], (a[1] * wa + b[1] * wb) / (wa + wb), a[2] + b[2]], *runs[3:]]
    return runs


def rectilinear_ring(coords: np.ndarray, theta: float, min_edge: float) -> np.ndarray | None:
    """A rectilinear version of a closed ring aligned to ``theta``; None if impossible."""
    p = np.asarray(coords, dtype=float)[:-1]
    if len(p) < 4:
        return None
    origin = p.mean(axis=0)
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -s], [s, c]])  # local -> world
    q = ((p - origin) @ rot).tolist()  # world -> local (x along theta)
    runs = _runs(q)
    if runs is None:
        return None
    runs = _drop_short(runs, min_edge)
    if len(runs) < 4 or len(runs) % 2:
        return None
    verts = []
    for k, r in enumerate(runs):
        nxt = runs[(k + 1) % len(runs)]
        verts.append((nxt[1], r[1]) if r[0] else (r[1], nxt[1]))
    local = np.asarray(verts + verts[:1], dtype=float)
    return local @ rot.T + origin


def simplify_fast(geoms: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker (~9x faster than the topology-preserving variant on pixel outlines);
    only the rare results that come out invalid are redone with topology preservation."""
    out = shapely.simplify(geoms, tolerance, preserve_topology=False)
    bad = ~shapely.is_valid(out) | shapely.is_empty(out)
    if np.any(bad):
        out[bad] = shapely.simplify(geoms[bad], tolerance, preserve_topology=True)
    return out


def regularize_polygon(poly: Polygon, unit: float, max_area_change: float = 0.1,
                       simple: Polygon | None = None, envelope: Polygon | None = None,
                       theta: float | None = None) -> Polygon:
    """Rectilinear footprint of one building polygon (see module docstring).

    ``simple`` is ``poly`` simplified by about one pixel, ``envelope`` its oriented envelope
    and ``theta`` its dominant angle (computed here if not given; batches vectorize them).
    """
    area = poly.area
    if area <= 0:
        return poly
    if simple is None:
        simple = shapely.simplify(poly, unit, preserve_topology=True)
    if envelope is None:
        envelope = shapely.oriented_envelope(poly)
    if theta is None:
        theta = float(dominant_angles(np.array([envelope]))[0])
    coords = np.asarray(simple.exterior.coords)
    min_edge = 2.0 * unit
    ring = rectilinear_ring(coords, theta, min_edge)
    if ring is not None:
        holes = []
        for interior in simple.interiors:
            h = rectilinear_ring(np.asarray(interior.coords), theta, min_edge)
            if h is not None:
                holes.append(h)
        cand = Polygon(ring, holes)
        if not cand.is_valid and holes:
            cand = Polygon(ring)
        if cand.is_valid and abs(cand.area / area - 1.0) <= max_area_change:
            return cand
    if isinstance(envelope, Polygon) and abs(envelope.area / area - 1.0) <= max_area_change:
        return envelope
    return simple if simple.is_valid and not simple.is_empty else poly


def separate_overlaps(reg: np.ndarray) -> np.ndarray:
    """Cut away overlaps between regularized neighbours (later index yields to earlier)."""
    reg = np.asarray(reg, dtype=object).copy()
    if len(reg) < 2:
        return reg
    tree = shapely.STRtree(reg)
    left, right = tree.query(reg, predicate="intersects")
    pairs = left < right
    left, right = left[pairs], right[pairs]
    overlap = shapely.area(shapely.intersection(reg[left], reg[right])) > 0
    for i, j in zip(left[overlap], right[overlap], strict=True):
        diff = shapely.make_valid(shapely.difference(reg[j], reg[i]))
        parts = [g for g in shapely.get_parts(diff) if isinstance(g, Polygon)]
        if parts:
            reg[j] = max(parts, key=lambda g: g.area)
    return reg


def regularize_polygons(
    geoms: np.ndarray, *, unit: float, max_area_change: float = 0.1, x_scale: float = 1.0,
    separate: bool = True,
) -> np.ndarray:
    """Regularize an array of building polygons.

    ``unit`` is one pixel in map units (walls shorter than two pixels are merged away).
    ``x_scale`` stretches x before the right-angle fitting (e.g. ``cos(latitude)`` for a
    geographic CRS, where a degree of longitude is shorter than a degree of latitude), so that
    right angles are right on the ground. ``separate`` cuts overlaps between the results (off
    when regularizing in batches: call :func:`separate_overlaps` on the whole layer instead).
    """
    geoms = np.asarray(geoms, dtype=object)
    if geoms.size == 0:
        return geoms
    work = geoms
    if x_scale != 1.0:
        work = shapely.transform(geoms, lambda xy: xy * np.array([x_scale, 1.0]))
        unit = unit * min(1.0, x_scale)
    simple = simplify_fast(work, unit)
    envelopes = shapely.oriented_envelope(work)
    thetas = dominant_angles(envelopes)
    out = np.empty(len(work), dtype=object)
    for k, (g, sg, env) in enumerate(zip(work, simple, envelopes, strict=True)):
        if isinstance(g, Polygon) and isinstance(sg, Polygon):
            out[k] = regularize_polygon(g, unit, max_area_change, sg, env, float(thetas[k]))
        else:
            out[k] = g
    if separate:
        out = separate_overlaps(out)
    if x_scale != 1.0:
        out = shapely.transform(out, lambda xy: xy / np.array([x_scale, 1.0]))
    return out

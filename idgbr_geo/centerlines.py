"""Road centerlines: road mask -> skeleton -> pixel graph -> connected, pruned LineStrings.

Why windows: the skeleton is computed window by window on the road mask read with a halo
(``halo`` pixels on each side, wider than half the widest road), and only the skeleton pixels
inside the window's core are kept, so memory is bounded by one padded window plus the lines.
Each core pixel emits the graph edges to its east, south-east, south and south-west skeleton
neighbours (the neighbour may lie in the next window's core, read through the halo), so every
pixel edge of the whole scene is emitted exactly once; diagonal edges are skipped where an
orthogonal path exists, which keeps 8-connected skeletons free of fake triangle junctions.
Merging the edges with ``shapely.line_merge`` (first per window, then across windows) joins
them into maximal LineStrings that meet at junction pixels; spurs (a free end at one side, a
junction at the other) shorter than ``spur_length`` are pruned and the rest re-merged.
"""

from __future__ import annotations

import numpy as np
import shapely
from skimage.morphology import skeletonize


def skeleton_lines(mask: np.ndarray, core: tuple[slice, slice], origin: tuple[int, int]) -> list:
    """Skeleton graph edges of one padded window, merged into LineStrings (pixel coordinates).

    ``mask`` is the padded boolean road mask, ``core`` the slices of the window's core inside
    it and ``origin`` the (row, col) of ``mask[0, 0]`` in the scene. Coordinates are pixel
    centres in scene pixel space (x = col + 0.5, y = row + 0.5).
    """
    if not mask.any():
        return []
    skel = skeletonize(mask)
    padded = np.zeros((skel.shape[0] + 2, skel.shape[1] + 2), dtype=bool)
    padded[1:-1, 1:-1] = skel
    rs, cs = core
    rows, cols = np.nonzero(skel[rs, cs])
    if rows.size == 0:
        return []
    r = rows + rs.start + 1  # index into `padded`
    c = cols + cs.start + 1
    east, south = padded[r, c + 1], padded[r + 1, c]
    west = padded[r, c - 1]
    se = padded[r + 1, c + 1] & ~east & ~south
    sw = padded[r + 1, c - 1] & ~west & ~south
    segs = []
    for ok, dr, dc in ((east, 0, 1), (south, 1, 0), (se, 1, 1), (sw, 1, -1)):
        if ok.any():
            r0, c0 = r[ok] - 1, c[ok] - 1
            a = np.stack([c0, r0], axis=1)
            b = np.stack([c0 + dc, r0 + dr], axis=1)
            segs.append(np.stack([a, b], axis=1))
    if not segs:
        return []
    seg = np.concatenate(segs).astype(float)
    seg[..., 0] += origin[1] + 0.5
    seg[..., 1] += origin[0] + 0.5
    lines = shapely.linestrings(seg.reshape(-1, 2), indices=np.repeat(np.arange(len(seg)), 2))
    merged = shapely.line_merge(shapely.multilinestrings(lines))
    return list(shapely.get_parts(merged))


def _merge(lines: np.ndarray) -> np.ndarray:
    if len(lines) == 0:
        return np.empty(0, dtype=object)
    return shapely.get_parts(shapely.line_merge(shapely.multilinestrings(lines)))


def _node_degree(lines: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Degree of the start and end node of each line (how many line ends meet there)."""
    ends = np.concatenate([shapely.get_coordinates(shapely.get_point(lines, 0)),
                           shapely.get_coordinates(shapely.get_point(lines, -1))])
    _, inverse, counts = np.unique(np.round(ends, 6), axis=0, return_inverse=True,
                                   return_counts=True)
    deg = counts[inverse.ravel()]
    return deg[: len(lines)], deg[len(lines):]


def build_centerlines(parts: list | np.ndarray, spur_length: float,
                      max_rounds: int = 10) -> np.ndarray:
    """Join per-window line parts into a connected network and prune short spurs.

    Lengths are in the parts' coordinate units. Isolated lines (free at both ends) shorter
    than ``spur_length`` are dropped too: they are skeleton noise, not roads.
    """
    lines = _merge(np.asarray(parts, dtype=object))
    for _ in range(max_rounds):
        if len(lines) == 0:
            break
        d0, d1 = _node_degree(lines)
        short = shapely.length(lines) < spur_length
        closed = shapely.is_closed(lines)
        free0, free1 = d0 == 1, d1 == 1
        drop = short & ~closed & (free0 | free1)
        if not drop.any():
            break
        lines = _merge(lines[~drop])
    return lines

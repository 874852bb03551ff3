"""Road centerlines: connectivity, junctions, spur pruning, window independence, length_m."""

from __future__ import annotations

import json

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from rasterio.transform import from_origin
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from idgbr_geo.centerlines import build_centerlines, skeleton_lines
from idgbr_geo.vectorize import vectorize_layers, vectorize_raster

GSD = 0.5


def road_grid(size: int = 300) -> np.ndarray:
    """3 x 3 grid of 9 px wide roads (ends inside the raster), a 2 px bump and a long branch."""
    arr = np.zeros((size, size), np.uint8)
    for k in (50, 150, 250):
        arr[k - 4:k + 5, 20:281] = 2
        arr[20:281, k - 4:k + 5] = 2
    arr[100:104, 150:157] = 2  # bump on a road side: its skeleton spur must be pruned
    arr[196:200, 154:200] = 2  # 45 px dead-end branch: kept
    arr[5:15, 5:15] = 1  # a building, not a road
    return arr


def write(path, arr, classes=("background", "building", "road")):
    with rasterio.open(path, "w", driver="GTiff", width=arr.shape[1], height=arr.shape[0],
                       count=1, dtype="uint8", crs="EPSG:32631", nodata=255,
                       transform=from_origin(500000, 5700000, GSD, GSD)) as dst:
        dst.write(arr, 1)
        dst.update_tags(IDGBR_CLASSES=json.dumps(list(classes)))
    return path


def graph(lines: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Node degrees and number of connected components of a line network."""
    ends = np.concatenate([shapely.get_coordinates(shapely.get_point(lines, 0)),
                           shapely.get_coordinates(shapely.get_point(lines, -1))])
    nodes, inv = np.unique(np.round(ends, 6), axis=0, return_inverse=True)
    inv = inv.ravel()
    n = len(lines)
    adj = coo_matrix((np.ones(n), (inv[:n], inv[n:])), shape=(len(nodes), len(nodes)))
    degree = np.bincount(inv, minlength=len(nodes))
    return nodes, degree, connected_components(adj, directed=False)[0]


@pytest.mark.parametrize("window", [2048, 64, 37])
def test_road_grid_network(tmp_path, window):
    path = write(tmp_path / "r.tif", road_grid())
    lines = vectorize_layers(path, centerlines=True, window_size=window)["road_centerlines"]
    assert lines.geometry.geom_type.eq("LineString").all() and lines.is_valid.all()
    _, degree, n_components = graph(lines.geometry.values)
    assert n_components == 1  # one connected network, junctions joined
    assert np.sum(degree == 4) == 9  # the 9 crossings
    assert np.sum(degree == 3) == 1  # where the branch leaves its road
    assert np.sum(degree == 1) == 13  # 12 road ends + the branch end: the bump spur is pruned
    total = 6 * 260 * GSD + 45 * GSD
    assert lines["length_m"].sum() == pytest.approx(total, rel=0.05)
    assert lines["length_m"].to_numpy() == pytest.approx(lines.geometry.length.to_numpy())


def test_windowed_centerlines_equal_whole(tmp_path):
    path = write(tmp_path / "r.tif", road_grid())
    whole = vectorize_layers(path, centerlines=True, simplify=0)["road_centerlines"]
    small = vectorize_layers(path, centerlines=True, simplify=0,
                             window_size=41)["road_centerlines"]
    a = shapely.union_all(whole.geometry.values)
    b = shapely.union_all(small.geometry.values)
    assert len(whole) == len(small)
    assert a.length == pytest.approx(b.length, rel=1e-9)
    assert a.hausdorff_distance(b) < 1e-9


def test_spur_pruning_threshold():
    mask = np.zeros((120, 200), bool)
    mask[56:65, 10:190] = True  # road along x
    mask[20:56, 98:101] = True  # 36 px side road
    parts = skeleton_lines(mask, (slice(0, 120), slice(0, 200)), (0, 0))
    kept = build_centerlines(parts, spur_length=20)
    pruned = build_centerlines(parts, spur_length=60)
    assert len(kept) == 3 and len(pruned) == 1
    assert shapely.length(pruned[0]) > 170


def test_centerlines_gpkg_layer_and_no_roads(tmp_path):
    out = tmp_path / "o.gpkg"
    vectorize_raster(write(tmp_path / "r.tif", road_grid()), out, centerlines=True)
    gdf = pyogrio.read_dataframe(out, layer="road_centerlines")
    assert len(gdf) > 0 and gdf.crs.to_epsg() == 32631 and "length_m" in gdf.columns
    only_buildings = write(tmp_path / "b.tif", road_grid(), classes=("background", "building"))
    layers = vectorize_layers(only_buildings, centerlines=True)
    assert len(layers["road_centerlines"]) == 0  # no road class: empty layer, not an error

"""Building regularization: right angles, orientation, area, validity, separation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import rasterio
import shapely
from rasterio.features import rasterize, shapes
from rasterio.transform import from_origin
from shapely import affinity
from shapely.geometry import Polygon, box, shape

from idgbr_geo.regularize import dominant_angle, regularize_polygons
from idgbr_geo.vectorize import vectorize_layers


def raw_polygons(geoms: list, size: int = 200) -> np.ndarray:
    """Rasterize shapes (pixel units) and polygonize them back: pixel-staircase outlines."""
    arr = rasterize([(g, k + 1) for k, g in enumerate(geoms)], out_shape=(size, size),
                    dtype="int32")
    found = sorted(((shape(g), v) for g, v in shapes(arr, mask=arr > 0)), key=lambda t: t[1])
    return np.array([g for g, _ in found], dtype=object)


def corner_angles(poly: Polygon) -> np.ndarray:
    """Interior turning angles (degrees, 0..180) at each vertex of the exterior."""
    c = np.asarray(poly.exterior.coords)[:-1]
    a, b = np.roll(c, 1, axis=0) - c, np.roll(c, -1, axis=0) - c
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return np.degrees(np.arccos(np.clip(cos, -1, 1)))


def wall_directions(poly: Polygon) -> np.ndarray:
    d = np.diff(np.asarray(poly.exterior.coords), axis=0)
    return np.degrees(np.arctan2(d[:, 1], d[:, 0])) % 90.0


def angle_error(directions: np.ndarray, truth: float) -> float:
    diff = (directions - truth % 90.0 + 45.0) % 90.0 - 45.0
    return float(np.max(np.abs(diff)))


@pytest.mark.parametrize("angle", [0, 12, 30, 45, 63, 80])
def test_rotated_rectangles_become_oriented_rectangles(angle):
    target = affinity.rotate(box(60, 80, 140, 120), angle, origin="centroid")
    raw = raw_polygons([target])
    reg = regularize_polygons(raw, unit=1.0)[0]
    assert reg.is_valid and len(reg.exterior.coords) - 1 == 4
    assert corner_angles(reg) == pytest.approx([90.0] * 4, abs=1e-6)
    assert angle_error(wall_directions(reg), angle) < 3.0
    assert reg.area == pytest.approx(raw[0].area, rel=0.04)
    assert reg.symmetric_difference(target).area / target.area < 0.08


@pytest.mark.parametrize("angle", [0, 25, -35])
def test_l_shapes_keep_six_right_angles(angle):
    ell = shapely.union_all([box(50, 50, 130, 80), box(50, 50, 80, 150)])
    target = affinity.rotate(ell, angle, origin="centroid")
    raw = raw_polygons([target])
    reg = regularize_polygons(raw, unit=1.0)[0]
    assert reg.is_valid and len(reg.exterior.coords) - 1 == 6
    angles = corner_angles(reg)
    assert angles == pytest.approx([90.0] * 6, abs=1e-6)
    assert angle_error(wall_directions(reg), angle) < 3.0
    assert reg.area == pytest.approx(raw[0].area, rel=0.04)


def test_adjacent_buildings_stay_separate():
    # two rotated buildings separated by a gap of ~1 pixel
    a = affinity.rotate(box(40, 60, 100, 100), 20, origin=(100, 100))
    b = affinity.rotate(box(101.5, 60, 160, 100), 20, origin=(100, 100))
    raw = raw_polygons([a, b])
    assert len(raw) == 2
    reg = regularize_polygons(raw, unit=1.0)
    assert all(g.is_valid for g in reg)
    assert shapely.intersection(reg[0], reg[1]).area == pytest.approx(0.0, abs=1e-9)
    for r, g in zip(reg, raw, strict=True):
        assert r.area == pytest.approx(g.area, rel=0.06)


def test_irregular_blobs_stay_valid_and_close_in_area():
    rng = np.random.default_rng(4)
    blobs = []
    for k in range(12):
        cx, cy = 30 + (k % 4) * 45, 40 + (k // 4) * 55
        pts = [(cx + r * math.cos(t), cy + r * math.sin(t))
               for t, r in zip(np.linspace(0, 2 * math.pi, 9)[:-1], rng.uniform(8, 18, 8),
                               strict=True)]
        blobs.append(Polygon(pts))
    raw = raw_polygons(blobs)
    reg = regularize_polygons(raw, unit=1.0)
    assert len(reg) == len(raw)
    assert all(g.is_valid and g.geom_type == "Polygon" for g in reg)
    ratio = shapely.area(reg) / shapely.area(raw)
    assert np.all(np.abs(ratio - 1) <= 0.1)  # the documented acceptance bound


def test_dominant_angle_of_a_rotated_square():
    for angle in (-44, -10, 0, 33, 44):
        sq = affinity.rotate(box(0, 0, 10, 6), angle)
        assert math.degrees(dominant_angle(sq)) == pytest.approx(angle, abs=1e-6)


def test_vectorize_regularize_in_map_coordinates(tmp_path):
    target = affinity.rotate(box(60, 70, 130, 110), 27, origin="centroid")
    arr = rasterize([(target, 1)], out_shape=(200, 200), dtype="uint8")
    path = tmp_path / "b.tif"
    with rasterio.open(path, "w", driver="GTiff", width=200, height=200, count=1,
                       dtype="uint8", crs="EPSG:32631", nodata=255,
                       transform=from_origin(500000, 5700000, 0.3, 0.3)) as dst:
        dst.write(arr, 1)
        dst.update_tags(IDGBR_CLASSES=json.dumps(["background", "building"]))
    raw = vectorize_layers(path, simplify=0)["buildings"]
    reg = vectorize_layers(path, regularize=True)["buildings"]
    poly = reg.geometry.iloc[0]
    assert len(poly.exterior.coords) - 1 == 4
    assert corner_angles(poly) == pytest.approx([90.0] * 4, abs=1e-6)
    # raster rows go down, so a counter-clockwise pixel rotation is clockwise on the map
    assert angle_error(wall_directions(poly), -27) < 3.0
    assert reg["area_m2"].iloc[0] == pytest.approx(raw["area_m2"].iloc[0], rel=0.04)


def test_right_angles_on_the_ground_in_a_geographic_crs(tmp_path):
    # a rectangle on the ground; one pixel is twice as tall as wide on the ground at 60 N, so
    # in pixel space the building is stretched 2x along x (a parallelogram)
    ground = affinity.rotate(box(-25, -12, 25, 12), 35, origin=(0, 0))
    target = affinity.translate(affinity.scale(ground, 2.0, 1.0, origin=(0, 0)), 100, 100)
    arr = rasterize([(target, 1)], out_shape=(200, 200), dtype="uint8")
    path = tmp_path / "g.tif"
    with rasterio.open(path, "w", driver="GTiff", width=200, height=200, count=1,
                       dtype="uint8", crs="EPSG:4326", nodata=255,
                       transform=from_origin(10.0, 60.0, 4e-6, 4e-6)) as dst:  # 60 deg N
        dst.write(arr, 1)
        dst.update_tags(IDGBR_CLASSES=json.dumps(["background", "building"]))
    reg = vectorize_layers(path, regularize=True)["buildings"]
    utm = reg.to_crs(reg.estimate_utm_crs()).geometry.iloc[0]
    assert len(utm.exterior.coords) - 1 == 4
    assert corner_angles(utm) == pytest.approx([90.0] * 4, abs=0.2)

"""The shared raster rules: one opener, one grid comparison, one ground GSD and tolerance."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from synth import write_gcp_raster, write_raster, write_rpc_raster

from idgbr_geo.errors import InputError
from idgbr_geo.rasters import (
    GSD_TOLERANCE,
    check_same_grid,
    ground_gsd,
    open_raster,
    pixel_ground_size,
    same_grid,
    same_gsd,
)

ORIGIN = (500000.0, 4000000.0)  # UTM 33N central meridian: scale factor 0.9996


def test_pixel_ground_size_projected_webmercator_geographic():
    # UTM: map metres / scale factor 0.9996 on the central meridian
    gx, gy = pixel_ground_size("EPSG:32633", from_origin(*ORIGIN, 0.5, 0.5), 100, 100)
    assert gx == pytest.approx(0.5 / 0.9996, rel=2e-4) and gy == pytest.approx(gx, rel=1e-3)
    # Web-Mercator at 60 deg N: ground = map size x cos(lat)
    from pyproj import Transformer

    x, y = Transformer.from_crs(4326, 3857, always_xy=True).transform(10.0, 60.0)
    gx, gy = pixel_ground_size("EPSG:3857", from_origin(x - 50, y + 50, 1.0, 1.0), 100, 100)
    assert gx == pytest.approx(math.cos(math.radians(60)), rel=5e-3)
    assert gy == pytest.approx(gx, rel=5e-3)
    # geographic at 45 deg: a degree of longitude is shorter than a degree of latitude
    gx, gy = pixel_ground_size("EPSG:4326", from_origin(10.0, 45.0005, 1e-5, 1e-5), 100, 100)
    assert gx == pytest.approx(1e-5 * 111320 * math.cos(math.radians(45)), rel=5e-3)
    assert gy == pytest.approx(1e-5 * 111132, rel=5e-3)


def test_ground_gsd_is_the_mean_of_the_pixel_ground_size(tmp_path):
    path = write_raster(tmp_path / "a.tif", np.zeros((1, 10, 10), np.uint8), res=0.5)
    with rasterio.open(path) as ds:
        gx, gy = pixel_ground_size(ds.crs, ds.transform, ds.width, ds.height)
        assert ground_gsd(ds) == pytest.approx((gx + gy) / 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nocrs = write_raster(tmp_path / "b.tif", np.zeros((1, 10, 10), np.uint8), crs=None)
    with open_raster(nocrs) as ds:
        assert ground_gsd(ds) is None


def test_one_gsd_tolerance_both_ways():
    assert same_gsd(0.25, 0.25) and same_gsd(0.25 * (1 + GSD_TOLERANCE / 2), 0.25)
    assert not same_gsd(0.3, 0.25) and not same_gsd(0.25, 0.3)


def test_open_raster_says_what_is_wrong_in_one_line(tmp_path):
    with pytest.raises(InputError, match=r"^label raster .*nope.tif does not exist$"):
        open_raster(tmp_path / "nope.tif", "label raster")
    with pytest.raises(InputError, match="is a folder, not a raster"):
        open_raster(tmp_path)
    (tmp_path / "text.tif").write_text("not a raster")
    with pytest.raises(InputError, match=r"^input .*text.tif is not a readable raster \(") as e:
        open_raster(tmp_path / "text.tif")
    assert "\n" not in str(e.value)


def test_open_raster_does_not_warn_about_a_missing_crs(tmp_path):
    """Code that needs a CRS says so itself; rasterio's own warning is noise."""
    path = tmp_path / "plain.tif"
    with rasterio.open(path, "w", driver="GTiff", width=4, height=4, count=1,
                       dtype="uint8") as ds:
        ds.write(np.zeros((1, 4, 4), np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        open_raster(path).close()


def test_same_grid_tolerates_rounding_not_shifts(tmp_path):
    data = np.zeros((1, 20, 30), np.uint8)
    a = write_raster(tmp_path / "a.tif", data)
    rounded = write_raster(tmp_path / "r.tif", data, origin=(ORIGIN[0] + 1e-5, ORIGIN[1]))
    shifted = write_raster(tmp_path / "s.tif", data, origin=(ORIGIN[0] + 0.3, ORIGIN[1]))
    other_crs = write_raster(tmp_path / "c.tif", data, crs="EPSG:32632")
    smaller = write_raster(tmp_path / "m.tif", data[:, :10])
    with rasterio.open(a) as ref:
        with rasterio.open(rounded) as ds:
            assert same_grid(ref, ds)
            check_same_grid(ref, ds, "TRUTH")
        for path, why in ((shifted, "geotransforms differ"), (other_crs, "CRS"),
                          (smaller, "30x20 vs 30x10 pixels")):
            with rasterio.open(path) as ds:
                assert not same_grid(ref, ds)
                with pytest.raises(InputError, match=f"^INPUT and COARSE are on different "
                                                     f"grids: .*{why}"):
                    check_same_grid(ref, ds, "COARSE", ref_what="INPUT")


def test_ground_gsd_from_ground_control_points(tmp_path):
    from idgbr_geo.rasters import gcp_grid, ground_gsd, sensor_georeferencing

    data = np.zeros((1, 40, 60), np.uint8)
    with rasterio.open(write_gcp_raster(tmp_path / "g.tif", data, gsd=0.4)) as ds:
        assert ds.crs is None and gcp_grid(ds) is not None
        assert ground_gsd(ds) == pytest.approx(0.4, rel=0.01)
    # two points fix no affine transform: no GSD, as without any georeferencing
    with rasterio.open(write_gcp_raster(tmp_path / "two.tif", data, n_points=2)) as ds:
        assert gcp_grid(ds) is None and ground_gsd(ds) is None
    # a CRS on the grid wins over any points
    with rasterio.open(write_raster(tmp_path / "grid.tif", data, res=0.3)) as ds:
        assert gcp_grid(ds) is None and ground_gsd(ds) == pytest.approx(0.3, rel=0.01)
    # RPCs only: the centre pixel's size through them
    with rasterio.open(write_rpc_raster(tmp_path / "rpc.tif", data, gsd=0.5)) as ds:
        assert sensor_georeferencing(ds) == "RPCs"
        assert ground_gsd(ds) == pytest.approx(0.5, rel=0.01)

"""Reading and tiling: window plans, windowed reads, resampling onto the model grid."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.enums import Resampling
from synth import write_raster

from idgbr_geo.tiling import open_source, plan_tiles, read_tile, read_window, resample


def _smooth(h: int, w: int, dtype=np.uint8, scale: float = 200.0) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    bands = [np.sin(yy / 9.0) * np.cos(xx / 13.0), np.sin((xx + yy) / 17.0), xx / w]
    return np.stack([(0.5 + 0.5 * b) * scale for b in bands]).astype(dtype)


@pytest.mark.parametrize("out", [(96, 120), (40, 50)])  # upsampling and shrinking
def test_resample_matches_gdal_bilinear_away_from_the_edges(tmp_path, out):
    data = _smooth(64, 80)
    path = write_raster(tmp_path / "s.tif", data)
    with rasterio.open(path) as ds:
        gdal = ds.read(out_shape=(3, *out), resampling=Resampling.bilinear).astype(float)
    ours = resample(data, out)
    assert ours.dtype == np.uint8 and ours.shape == (3, *out)
    inner = (slice(None), slice(3, -3), slice(3, -3))
    assert np.abs(ours.astype(float)[inner] - gdal[inner]).max() <= 2.0


def test_resample_gives_float32_for_other_types():
    data = _smooth(30, 30, np.uint16, scale=4000.0)
    ours = resample(data, (45, 45))
    assert ours.dtype == np.float32 and ours.shape == (3, 45, 45)
    assert 0 <= ours.min() and ours.max() <= 4000


def test_read_tile_native_and_resampled(tmp_path):
    data = _smooth(100, 130)
    fine = write_raster(tmp_path / "fine.tif", data, res=0.25)
    src = open_source(fine, model_bands=3, bands=None, model_gsd=0.25)
    tiles = plan_tiles(src.width, src.height, tile_size=64, overlap=16, factor=src.factor,
                       multiple=8)
    pixels, mask = read_tile(src, tiles[0])
    assert src.factor == 1.0 and mask.all()
    np.testing.assert_array_equal(pixels, data[:, :64, :64])  # raw values, no resampling
    src.ds.close()

    coarse = write_raster(tmp_path / "coarse.tif", data, res=0.5)  # model wants 0.25 m
    src = open_source(coarse, model_bands=3, bands=None, model_gsd=0.25)
    tiles = plan_tiles(src.width, src.height, tile_size=64, overlap=16, factor=src.factor,
                       multiple=8)
    pixels, mask = read_tile(src, tiles[0])
    assert src.factor == pytest.approx(0.5, rel=0.01)  # ground GSD: UTM scale factor
    win = tiles[0].window
    assert (int(win.height), int(win.width)) == (32, 32)
    assert pixels.shape == (3, 64, 64) and mask.shape == (64, 64) and mask.all()
    np.testing.assert_array_equal(pixels, resample(data[:, :32, :32], (64, 64)))
    src.ds.close()


def test_read_window_keeps_the_native_pixels_of_a_resampled_window(tmp_path):
    data = _smooth(100, 130, np.float32, scale=1.0)
    data[:, 5:8, 9:12] = np.nan
    fine = write_raster(tmp_path / "fine.tif", data, res=0.0625)  # 4x finer than the model
    src = open_source(fine, model_bands=3, bands=None, model_gsd=0.25)
    tiles = plan_tiles(src.width, src.height, tile_size=16, overlap=0, factor=src.factor)
    got = read_window(src, tiles[0], native=True)
    win = tiles[0].window
    h, w = int(win.height), int(win.width)
    assert got.native is not None and got.native.shape == (3, h, w)
    # as read: NaN left in place (the model-grid data has 0 there), validity beside it
    np.testing.assert_array_equal(got.native, data[:, :h, :w])
    assert got.native_valid is not None and not got.native_valid[5:8, 9:12].any()
    assert got.native_valid.sum() == h * w - 9
    pixels, mask = read_tile(src, tiles[0])  # the same model-grid read
    np.testing.assert_array_equal(got.data, pixels)
    np.testing.assert_array_equal(got.mask, mask)
    assert read_window(src, tiles[-1], native=True).native_valid is None  # all valid there
    assert read_window(src, tiles[0]).native is None  # only when asked for
    assert read_window(src, tiles[0]).native_valid is None
    only_mask = read_window(src, tiles[0], native_mask=True)  # the validity without pixels
    assert only_mask.native is None
    np.testing.assert_array_equal(only_mask.native_valid, got.native_valid)
    src.ds.close()
    # at the model's GSD nothing is resampled: the native pixels, when asked for (a card's
    # edge_filter), are the model grid's own, and a validity alone is not kept
    same = open_source(write_raster(tmp_path / "same.tif", data, res=0.25), model_bands=3,
                       bands=None, model_gsd=0.25)
    t = plan_tiles(same.width, same.height, tile_size=64, overlap=16)[0]
    got = read_window(same, t, native=True)
    assert got.native is got.data and got.native.shape == (3, 64, 64)
    assert got.native_valid is not None and not got.native_valid[5:8, 9:12].any()
    assert read_window(same, t, native_mask=True).native_valid is None
    assert read_window(same, t).native is None
    same.ds.close()


@pytest.mark.parametrize("res", [0.25, 0.3, 0.2])  # native, enlarged and shrunk on read
def test_non_finite_values_are_nodata_and_do_not_bleed(tmp_path, res):
    clean = _smooth(100, 130, np.float32, scale=1.0)
    data = clean.copy()
    data[:, 40:43, 50:53] = np.nan
    data[0, 70, 20] = np.inf
    data[2, 10, 100] = -np.inf
    reads = []
    for name, arr in (("clean", clean), ("nan", data)):
        src = open_source(write_raster(tmp_path / f"{name}.tif", arr, res=res), model_bands=3,
                          bands=None, model_gsd=0.25)
        tiles = plan_tiles(src.width, src.height, tile_size=256, overlap=16, factor=src.factor)
        assert len(tiles) == 1
        reads.append(read_tile(src, tiles[0]))
        src.ds.close()
    (ref, ref_mask), (pixels, mask) = reads
    assert ref_mask.all() and np.isfinite(pixels).all()
    assert 0 < (~mask).sum() < 40 and not mask[round(41 * res / 0.25), round(51 * res / 0.25)]
    assert (pixels[:, ~mask] == 0).all()  # invalid pixels hold 0
    # valid pixels hold valid values only, and away from the bad pixels nothing changed
    assert pixels[:, mask].min() >= 0.0 and pixels[:, mask].max() <= 1.0
    from scipy import ndimage

    touched = resample((~np.isfinite(data)).any(0)[None].astype(np.float32), mask.shape)[0] > 0
    far = ~ndimage.binary_dilation(touched, iterations=2)
    assert far.mean() > 0.9
    np.testing.assert_allclose(pixels[:, far], ref[:, far], atol=1e-6)


def test_nodata_values_do_not_bleed_into_resampled_neighbours(tmp_path):
    data = _smooth(100, 130, np.float32, scale=1.0)
    data[:, :, 60:] = -9999.0
    path = write_raster(tmp_path / "nd.tif", data, res=0.3, nodata=-9999.0)
    src = open_source(path, model_bands=3, bands=None, model_gsd=0.25)
    tiles = plan_tiles(src.width, src.height, tile_size=256, overlap=16, factor=src.factor)
    pixels, mask = read_tile(src, tiles[0])
    src.ds.close()
    assert mask[:, :60].all() and not mask[:, 80:].any()
    assert pixels[:, mask].min() >= 0.0  # no -9999 blended into the edge's valid pixels


def _with_colours(path, colours):
    with rasterio.open(path, "r+") as ds:
        ds.colorinterp = colours
    return path


def test_bands_picked_by_colour_interpretation(tmp_path):
    from rasterio.enums import ColorInterp as CI

    from idgbr_geo.errors import InputError
    from idgbr_geo.tiling import BandSelectionWarning

    data = np.arange(4 * 16 * 16, dtype=np.uint8).reshape(4, 16, 16)
    rgb = ["red", "green", "blue"]
    # RGB + an undeclared mask band (a common drone export): bands 1-3, with a warning
    path = _with_colours(write_raster(tmp_path / "rgbx.tif", data),
                         [CI.red, CI.green, CI.blue, CI.undefined])
    with pytest.warns(BandSelectionWarning, match="bands 1,2,3 as red, green, blue"):
        src = open_source(path, model_bands=3, bands=None, model_gsd=0.3, band_names=rgb)
    assert src.bands == [1, 2, 3] and src.warnings
    src.ds.close()
    # blue, green, red, NIR (a satellite product): reordered to the model's red, green, blue
    path = _with_colours(write_raster(tmp_path / "bgrn.tif", data),
                         [CI.blue, CI.green, CI.red, CI.undefined])
    with pytest.warns(BandSelectionWarning, match="bands 3,2,1"):
        src = open_source(path, model_bands=3, bands=None, model_gsd=0.3, band_names=rgb)
    assert src.bands == [3, 2, 1]
    src.ds.close()
    # the user's choice wins, silently
    src = open_source(path, model_bands=3, bands=[1, 2, 3], model_gsd=0.3, band_names=rgb)
    assert src.bands == [1, 2, 3] and not src.warnings
    src.ds.close()
    # a plain RGB file: as before, no warning
    plain = write_raster(tmp_path / "rgb.tif", data[:3])
    src = open_source(plain, model_bands=3, bands=None, model_gsd=0.3, band_names=rgb)
    assert src.bands == [1, 2, 3] and not src.warnings
    src.ds.close()
    # nothing declared (or a colour twice): still the one-line error that asks for bands
    for name, colours in (("none", [CI.undefined] * 4),
                          ("twice", [CI.red, CI.red, CI.blue, CI.green])):
        path = _with_colours(write_raster(tmp_path / f"{name}.tif", data), colours)
        with pytest.raises(InputError, match="choose them with"):
            open_source(path, model_bands=3, bands=None, model_gsd=0.3, band_names=rgb)


def test_a_grey_input_is_told_how_to_run(tmp_path):
    from idgbr_geo.errors import InputError

    grey = write_raster(tmp_path / "grey.tif", np.full((1, 16, 16), 90, np.uint8))
    with pytest.raises(InputError, match=r"e\.g\. 1,1,1 to feed its one band as every colour"):
        open_source(grey, model_bands=3, bands=None, model_gsd=0.3)
    src = open_source(grey, model_bands=3, bands=[1, 1, 1], model_gsd=0.3)
    assert src.bands == [1, 1, 1]
    src.ds.close()

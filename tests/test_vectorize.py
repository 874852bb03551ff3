"""Vectorization: windowed polygonization equals whole-raster, areas, attributes, errors."""

from __future__ import annotations

import json
import os
import re
import sqlite3
from pathlib import Path

import numpy as np
import pyogrio
import pyproj
import pytest
import rasterio
import shapely
from click.testing import CliRunner
from rasterio.features import shapes
from rasterio.transform import from_origin
from scipy import ndimage
from shapely.geometry import shape

from idgbr_geo.cli import main
from idgbr_geo.errors import InputError, OutputError, UserError
from idgbr_geo.vectorize import GeoPackageWriter, vectorize_layers, vectorize_raster

UTM = "EPSG:32631"
GSD = 0.5
TRANSFORM = from_origin(500000.0, 5700000.0, GSD, GSD)
CLASSES = ["background", "building", "road"]


def write_raster(path: Path, arr: np.ndarray, *, crs: str | None = UTM, transform=TRANSFORM,
                 classes: list[str] | None = CLASSES, nodata: float | None = 255,
                 confidence: np.ndarray | None = None) -> Path:
    bands = [arr] if confidence is None else [arr, confidence]
    profile = dict(driver="GTiff", width=arr.shape[1], height=arr.shape[0], count=len(bands),
                   dtype=arr.dtype, transform=transform, nodata=nodata)
    if crs is not None:
        profile["crs"] = crs
    with rasterio.open(path, "w", **profile) as dst:
        for k, band in enumerate(bands, start=1):
            dst.write(band.astype(arr.dtype), k)
        if classes is not None:
            dst.update_tags(IDGBR_CLASSES=json.dumps(classes))
    return path


def blobs(shape_=(157, 143), seed=0) -> np.ndarray:
    """Random smooth class blobs (3 classes) plus a snake spanning many windows."""
    rng = np.random.default_rng(seed)
    arr = ndimage.median_filter(rng.choice([0, 1, 2], size=shape_, p=[0.5, 0.3, 0.2]), 5)
    arr = arr.astype(np.uint8)
    arr[5:8, 3:140] = 1  # long bar across every window column
    arr[5:150, 137:140] = 1  # ... turning down across every window row
    arr[60:63, 20:120] = 2
    return arr


def no_partial_files(folder: Path) -> bool:
    return not any(".partial-" in p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("window", [7, 16, 50])
def test_windowed_equals_whole_raster(tmp_path, window):
    arr = blobs()
    arr[100:110, 0:30] = 255  # nodata
    path = write_raster(tmp_path / "c.tif", arr)
    whole = [(shape(g), v) for g, v in shapes(arr, mask=(arr == 1) | (arr == 2),
                                              transform=TRANSFORM)]
    layers = vectorize_layers(path, window_size=window, simplify=0, min_area=0, fill_holes=0)
    for cid, name in ((1, "buildings"), (2, "roads")):
        ref = [g for g, v in whole if v == cid]
        gdf = layers[name]
        assert len(gdf) == len(ref)
        assert gdf.geometry.area.sum() == pytest.approx(sum(g.area for g in ref), rel=1e-9)
        assert gdf.is_valid.all()
        diff = shapely.symmetric_difference(shapely.union_all(gdf.geometry.values),
                                            shapely.union_all(ref))
        assert diff.area < 1e-6
        assert gdf["area_m2"].to_numpy() == pytest.approx(gdf.geometry.area.to_numpy())


def test_windowed_default_processing_matches_whole(tmp_path):
    """With simplify / min-area / regularize on, the window size changes nothing at all."""
    path = write_raster(tmp_path / "c.tif", blobs(seed=5))
    ref = vectorize_layers(path, window_size=4096, regularize=True)
    for window in (16, 40):
        got = vectorize_layers(path, window_size=window, regularize=True)
        for name in ("buildings", "roads"):
            assert len(got[name]) == len(ref[name]) > 0
            assert got[name].is_valid.all()
            assert shapely.equals_exact(got[name].geometry.values, ref[name].geometry.values,
                                        tolerance=1e-9).all()
            assert got[name]["area_m2"].to_numpy() == pytest.approx(ref[name]["area_m2"])


def test_known_shapes_areas_and_perimeters(tmp_path):
    arr = np.zeros((120, 120), np.uint8)
    arr[10:30, 10:50] = 1  # 20 x 40 px rectangle = 10 m x 20 m
    arr[50:90, 10:30] = 1  # L-shape: 40x20 + 20x20 px
    arr[70:90, 30:50] = 1
    arr[60:65, 100:101] = 1  # 5 px sliver = 1.25 m^2: below the 4 m^2 default
    path = write_raster(tmp_path / "c.tif", arr)
    gdf = vectorize_layers(path)["buildings"].sort_values("area_m2").reset_index(drop=True)
    assert len(gdf) == 2
    assert gdf["area_m2"].tolist() == pytest.approx([200.0, 300.0])
    assert gdf["perimeter_m"].tolist() == pytest.approx([60.0, 80.0])
    assert gdf.loc[1, "geometry"].exterior.coords.__len__() - 1 == 6  # L keeps 6 corners
    assert len(vectorize_layers(path, min_area=0)["buildings"]) == 3


def test_holes_filled_below_area(tmp_path):
    arr = np.zeros((80, 80), np.uint8)
    arr[10:70, 10:70] = 1
    arr[20:40, 20:40] = 0  # 100 m^2 courtyard
    arr[50:52, 50:52] = 0  # 1 m^2 hole
    path = write_raster(tmp_path / "c.tif", arr)

    def holes(**kw):
        return len(vectorize_layers(path, **kw)["buildings"].geometry.iloc[0].interiors)

    assert holes() == 1  # default: holes under the 4 m^2 min area are filled
    assert holes(fill_holes=0) == 2
    assert holes(fill_holes={"building": 500}) == 0


def test_nodata_gives_no_features(tmp_path):
    arr = np.zeros((60, 60), np.uint8)
    arr[10:50, 10:50] = 1
    arr[:, 30:] = 255
    gdf = vectorize_layers(write_raster(tmp_path / "a.tif", arr), simplify=0)["buildings"]
    assert gdf["area_m2"].sum() == pytest.approx(40 * 20 * GSD * GSD)
    empty = vectorize_layers(write_raster(tmp_path / "b.tif", np.full((40, 40), 255, np.uint8)))
    assert set(empty) == {"buildings", "roads"} and all(len(v) == 0 for v in empty.values())


def test_all_background_rasters(tmp_path):
    zeros = np.zeros((30, 30), np.uint8)
    out = tmp_path / "o.gpkg"
    vectorize_raster(write_raster(tmp_path / "a.tif", zeros, classes=None), out)
    assert [tuple(r) for r in pyogrio.list_layers(out)] == [("class_1", "Polygon")]
    assert pyogrio.read_info(out, layer="class_1")["features"] == 0
    with pytest.raises(InputError, match="no foreground class"):
        vectorize_raster(write_raster(tmp_path / "b.tif", zeros, classes=["background"]),
                         tmp_path / "b.gpkg")
    assert not (tmp_path / "b.gpkg").exists()


@pytest.mark.parametrize("window", [2048, 8])
def test_attributes_confidence_probabilities(tmp_path, window):
    arr = np.zeros((50, 50), np.uint8)
    arr[5:25, 5:25] = 1
    arr[30:45, :] = 2
    conf = np.where(arr == 1, 204, 51).astype(np.uint8)
    path = write_raster(tmp_path / "c.tif", arr, confidence=conf)
    probs = tmp_path / "p.tif"
    with rasterio.open(probs, "w", driver="GTiff", width=50, height=50, count=3, dtype="uint8",
                       crs=UTM, transform=TRANSFORM) as dst:
        for k, name in enumerate(["road", "background", "building"], start=1):  # shuffled
            dst.write(np.full((50, 50), 50 * k, np.uint8), k)
            dst.set_band_description(k, name)
    layers = vectorize_layers(path, probabilities=probs, scene="tile_7", window_size=window)
    b, r = layers["buildings"], layers["roads"]
    assert b["mean_confidence"].iloc[0] == pytest.approx(0.8)
    assert r["mean_confidence"].iloc[0] == pytest.approx(0.2)
    assert b["mean_probability"].iloc[0] == pytest.approx(150 / 255)  # by band description
    assert r["mean_probability"].iloc[0] == pytest.approx(50 / 255)
    assert set(b["scene"]) == {"tile_7"} and set(b["class"]) == {"building"}
    no_extra = vectorize_layers(write_raster(tmp_path / "d.tif", arr))["buildings"]
    assert no_extra["mean_confidence"].isna().all() and no_extra["mean_probability"].isna().all()


def test_missing_tags_fall_back_to_class_ids(tmp_path):
    arr = np.zeros((40, 40), np.uint8)
    arr[5:20, 5:20] = 3
    layers = vectorize_layers(write_raster(tmp_path / "c.tif", arr, classes=None, nodata=None))
    assert list(layers) == ["class_3"] and layers["class_3"]["class"].iloc[0] == "class_3"


@pytest.mark.parametrize("crs", ["EPSG:4326", "EPSG:3857"])
def test_true_ground_metres_in_geographic_and_web_mercator(tmp_path, crs):
    lon, lat = 4.9, 52.37
    if crs == "EPSG:4326":
        transform = from_origin(lon, lat, 1e-5, 1e-5)
    else:
        x, y = pyproj.Transformer.from_crs(4326, 3857, always_xy=True).transform(lon, lat)
        transform = from_origin(x, y, 1.0, 1.0)  # ~0.61 m on the ground at 52 deg N
    arr = np.zeros((100, 100), np.uint8)
    arr[20:80, 10:90] = 1
    path = write_raster(tmp_path / "g.tif", arr, crs=crs, transform=transform)
    gdf = vectorize_layers(path, simplify=0)["buildings"]
    geod = pyproj.Geod(ellps="WGS84")
    ll = gdf.to_crs(4326).geometry.iloc[0]
    area, perim = geod.geometry_area_perimeter(ll)
    assert gdf["area_m2"].iloc[0] == pytest.approx(abs(area), rel=2e-3)
    assert gdf["perimeter_m"].iloc[0] == pytest.approx(perim, rel=2e-3)


# ---------------------------------------------------------------------------- GeoPackage
def test_geopackage_layers_index_and_crs(tmp_path):
    arr = blobs(seed=1)
    path = write_raster(tmp_path / "c.tif", arr)
    out = tmp_path / "out.gpkg"
    summary = vectorize_raster(path, out, regularize=True, centerlines=True)
    layers = dict(pyogrio.list_layers(out))
    assert layers["buildings"] == "Polygon" and layers["road_centerlines"] == "LineString"
    assert summary["layers"]["buildings"] == pyogrio.read_info(out, layer="buildings")["features"]
    gdf = pyogrio.read_dataframe(out, layer="buildings")
    assert gdf.crs.to_epsg() == 32631 and gdf.is_valid.all()
    assert set(gdf.columns) >= {"class", "area_m2", "perimeter_m", "mean_confidence", "scene"}
    with sqlite3.connect(out) as con:
        tables = {r[0] for r in con.execute("select name from sqlite_master")}
    assert "rtree_buildings_geom" in tables
    assert no_partial_files(tmp_path)


def test_merge_scenes_into_one_geopackage(tmp_path):
    a = write_raster(tmp_path / "a.tif", blobs(seed=2))
    b = write_raster(tmp_path / "b.tif", blobs(seed=3), crs="EPSG:32632",
                     transform=from_origin(300000.0, 5700000.0, GSD, GSD))
    out = tmp_path / "all.gpkg"
    with GeoPackageWriter(out) as writer:
        na = vectorize_raster(a, writer)["layers"]["buildings"]
        nb = vectorize_raster(b, writer, scene="second")["layers"]["buildings"]
    gdf = pyogrio.read_dataframe(out, layer="buildings")
    assert gdf["scene"].value_counts().to_dict() == {"a": na, "second": nb}
    assert gdf.crs.to_epsg() == 32631  # second scene reprojected into the layer's CRS


def test_failed_merge_leaves_nothing(tmp_path):
    out = tmp_path / "all.gpkg"
    with pytest.raises(InputError), GeoPackageWriter(out) as writer:
        vectorize_raster(write_raster(tmp_path / "a.tif", blobs()), writer)
        vectorize_raster(tmp_path / "missing.tif", writer)
    assert not out.exists() and no_partial_files(tmp_path)
    with pytest.raises(OutputError, match="no layers"), GeoPackageWriter(out):
        pass
    assert not out.exists() and no_partial_files(tmp_path)


# ---------------------------------------------------------------------------- CLI
def test_vector_options_reusable():
    import click

    from idgbr_geo.cli.vectorize import pop_vector_options, vector_options

    seen = {}

    @click.command()
    @vector_options
    def cmd(**kwargs):
        seen.update(pop_vector_options(kwargs))
        seen["rest"] = kwargs

    res = CliRunner().invoke(cmd, ["--min-area", "building=10,road=40", "--fill-holes", "3",
                                   "--regularize"])
    assert res.exit_code == 0, res.output
    assert seen == {"simplify": None, "min_area": {"building": 10.0, "road": 40.0},
                    "fill_holes": 3.0, "regularize": True, "centerlines": False, "rest": {}}


def run_cli(*args: str):
    return CliRunner().invoke(main, ["vectorize", *args])


def test_cli_success(tmp_path):
    path = write_raster(tmp_path / "c.tif", blobs())
    out = tmp_path / "o.gpkg"
    res = run_cli(str(path), str(out), "--min-area", "building=1,road=2", "--regularize",
                  "--centerlines", "--quiet")
    assert res.exit_code == 0, res.output
    assert {"buildings", "roads", "road_centerlines"} <= set(pyogrio.list_layers(out)[:, 0])


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    arr = blobs()
    good = write_raster(tmp / "good.tif", arr)
    flt = write_raster(tmp / "float.tif", arr.astype(np.float32), nodata=None)
    with rasterio.open(tmp / "rgb.tif", "w", driver="GTiff", width=20, height=20, count=3,
                       dtype="uint8", crs=UTM, transform=TRANSFORM) as dst:
        dst.write(np.zeros((3, 20, 20), np.uint8))
    nocrs = write_raster(tmp / "nocrs.tif", arr, crs=None)
    (tmp / "text.tif").write_text("not a raster")
    (tmp / "exists.gpkg").write_text("keep me")
    small = write_raster(tmp / "small.tif", arr[:50, :50])
    return {
        "float": ([str(flt)], "not a class raster"),
        "rgb": ([str(tmp / "rgb.tif")], "3 bands"),
        "nocrs": ([str(nocrs)], "no CRS"),
        # (the message of the shared raster opener; "cannot open" before it)
        "text": ([str(tmp / "text.tif")], r"cannot open|not a readable raster"),
        "missing": ([str(tmp / "missing.tif")], "does not exist"),
        "exists": ([str(good), str(tmp / "exists.gpkg")], "already exists"),
        "folder": ([str(good), str(tmp / "nope" / "o.gpkg")], "does not exist"),
        "suffix": ([str(good), str(tmp / "o.shp")], ".gpkg"),
        "grid": ([str(good), str(tmp / "o.gpkg"), "--probabilities", str(small)], "same grid"),
        "area": ([str(good), str(tmp / "o.gpkg"), "--min-area", "big"], "expected a number"),
    }


@pytest.mark.parametrize("case", ["float", "rgb", "nocrs", "text", "missing", "exists",
                                  "folder", "suffix", "grid", "area"])
def test_cli_bad_input_one_line_no_output(tmp_path, case):
    args, message = _bad_inputs(tmp_path)[case]
    if len(args) == 1:
        args = [*args, str(tmp_path / "o.gpkg")]
    res = run_cli(*args)
    assert res.exit_code != 0
    lines = res.stderr.strip().splitlines()
    assert re.search(message, res.stderr) and "Traceback" not in res.stderr
    if case != "area":  # click's own usage errors print a usage line first
        assert len(lines) == 1
    assert not (tmp_path / "o.gpkg").exists() and no_partial_files(tmp_path)
    if case == "exists":
        assert (tmp_path / "exists.gpkg").read_text() == "keep me"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_cli_unwritable_folder(tmp_path):
    path = write_raster(tmp_path / "c.tif", blobs())
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        res = run_cli(str(path), str(ro / "o.gpkg"))
        assert res.exit_code != 0 and "not writable" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and not any(ro.iterdir())
    finally:
        ro.chmod(0o700)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_cli_unwritable_path_even_as_root(tmp_path):
    res = run_cli(str(write_raster(tmp_path / "c.tif", blobs())), "/proc/o.gpkg", "-q")
    assert res.exit_code != 0 and "cannot write /proc/o.gpkg" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not Path("/proc/o.gpkg").exists()


def test_library_errors_are_user_errors(tmp_path):
    path = write_raster(tmp_path / "c.tif", blobs())
    with pytest.raises(OutputError):
        vectorize_raster(path, tmp_path / "c.tif")  # exists
    with pytest.raises(InputError, match="not a class raster"):
        vectorize_layers(write_raster(tmp_path / "dem.tif",
                                      np.arange(400 * 400, dtype=np.int32).reshape(400, 400)))


# ---------------------------------------------------------------------------- class names
def _foreign_raster(tmp: Path, name: str = "foreign.tif") -> Path:
    """A class raster made by another tool: ids 0/1/2, no IDGBR_CLASSES tag."""
    return write_raster(tmp / name, blobs(seed=4), classes=None)


def test_class_names_name_the_layers_of_untagged_rasters(tmp_path):
    path = _foreign_raster(tmp_path)
    assert set(vectorize_layers(path)) == {"class_1", "class_2"}
    layers = vectorize_layers(path, classes=["background", "building", "road"],
                              centerlines=True)
    assert list(layers) == ["buildings", "roads", "road_centerlines"]
    assert set(layers["buildings"]["class"]) == {"building"}
    assert set(layers["roads"]["class_id"]) == {2}
    assert len(layers["road_centerlines"]) > 0  # names also pick the road class
    # same features as the tagged raster: only the names change
    tagged = vectorize_layers(write_raster(tmp_path / "tagged.tif", blobs(seed=4)))
    for name in ("buildings", "roads"):
        assert shapely.equals_exact(layers[name].geometry.values,
                                    tagged[name].geometry.values, tolerance=0).all()
    # a comma-separated string works too; extra names give empty layers (as tags do)
    more = vectorize_layers(path, classes="background, building ,road,water")
    assert list(more) == ["buildings", "roads", "water"] and len(more["water"]) == 0


def test_class_names_replace_the_tag_and_pick_the_background(tmp_path):
    path = write_raster(tmp_path / "c.tif", blobs(seed=4))  # tagged background,building,road
    layers = vectorize_layers(path, classes=["water", "Building", "bg"])
    assert list(layers) == ["water", "buildings"]  # id 0 is a class now, id 2 background
    assert set(layers["buildings"]["class"]) == {"Building"}
    assert len(layers["water"]) > 0


def test_class_names_in_the_geopackage_and_summary(tmp_path):
    out = tmp_path / "o.gpkg"
    summary = vectorize_raster(_foreign_raster(tmp_path), out,
                               classes=["background", "building", "road"])
    assert set(summary["layers"]) == {"buildings", "roads"}
    assert set(pyogrio.list_layers(out)[:, 0]) == {"buildings", "roads"}


@pytest.mark.parametrize(("names", "message"), [
    (["background", "building"], "class id 2, but 2 class names"),  # does not cover id 2
    (["background", "building", "building"], "must be unique"),
    (["background", "Building", "building "], "must be unique"),  # same layer name
    (["background", "road", "roads"], "must be unique"),  # road -> roads
    (["background", "", "road"], "no letter or digit"),
    (["background", "???", "road"], "no letter or digit"),
    (["background", "gpkg_contents", "road"], "reserved"),
    (["background", "rtree_x", "road"], "reserved"),
    (["background", "road_centerlines", "road"], "reserved"),
    ([], "no class names"),
])
def test_bad_class_names_are_user_errors(tmp_path, names, message):
    out = tmp_path / "o.gpkg"
    with pytest.raises(UserError, match=message):
        vectorize_raster(_foreign_raster(tmp_path), out, classes=names)
    assert not out.exists() and no_partial_files(tmp_path)


def test_class_names_cover_ids_seen_only_in_small_features(tmp_path):
    """An id is checked even when all its features are below the minimum area."""
    arr = np.zeros((40, 40), np.uint8)
    arr[5:20, 5:20] = 1
    arr[30, 30] = 7  # one pixel: dropped by the minimum area, still needs a name
    path = write_raster(tmp_path / "c.tif", arr, classes=None)
    with pytest.raises(InputError, match="class id 7"):
        vectorize_layers(path, classes=["background", "building"])
    nodata = write_raster(tmp_path / "n.tif", np.where(arr == 7, 255, arr).astype(np.uint8),
                          classes=None)
    assert len(vectorize_layers(nodata, classes=["background", "building"])["buildings"]) == 1


def test_cli_classes(tmp_path):
    path = _foreign_raster(tmp_path)
    res = run_cli(str(path), str(tmp_path / "a.gpkg"))
    assert res.exit_code == 0, res.output
    assert "--classes" in res.stderr  # the hint for untagged rasters
    res = run_cli(str(path), str(tmp_path / "b.gpkg"), "--classes", "background,building,road")
    assert res.exit_code == 0, res.output
    assert "--classes" not in res.stderr and "buildings:" in res.stderr
    assert set(pyogrio.list_layers(tmp_path / "b.gpkg")[:, 0]) == {"buildings", "roads"}


@pytest.mark.parametrize(("value", "message"), [
    ("background,building", "class id 2"),
    ("background,building,building", "must be unique"),
    ("background,,road", "no letter or digit"),
])
def test_cli_bad_classes_one_error_line(tmp_path, value, message):
    out = tmp_path / "o.gpkg"
    res = run_cli(str(_foreign_raster(tmp_path)), str(out), "--classes", value)
    assert res.exit_code == 2
    assert message in res.stderr and "Traceback" not in res.stderr
    assert not out.exists() and no_partial_files(tmp_path)

"""`idgbr-geo evaluate` and its file-level library: rasters, vector truth, folders, errors."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from click.testing import CliRunner
from rasterio.transform import from_origin
from synth import assert_same, class_blobs

from idgbr_geo.cli import main
from idgbr_geo.errors import InputError
from idgbr_geo.evaluate import evaluate_folders, evaluate_rasters, evaluate_scene, format_report
from idgbr_geo.metrics import evaluate_arrays

NAMES = ["background", "building"]
CRS = "EPSG:32631"
TRANSFORM = from_origin(500000.0, 5000000.0, 0.5, 0.5)


def write_map(path: Path, data: np.ndarray, *, names: list[str] | None = None,
              transform=TRANSFORM, crs: str = CRS, nodata: int | None = 255) -> Path:
    profile = dict(driver="GTiff", width=data.shape[1], height=data.shape[0], count=1,
                   dtype="uint8", crs=crs, transform=transform, nodata=nodata)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data.astype(np.uint8), 1)
        if names:
            ds.update_tags(IDGBR_CLASSES=json.dumps(names))
    return path


@pytest.fixture
def scene(tmp_path):
    truth = class_blobs((90, 110), 1)
    truth[:8, :20] = 255
    pred, coarse = class_blobs((90, 110), 2), class_blobs((90, 110), 3)
    return dict(
        truth=truth, pred=pred, coarse=coarse,
        truth_path=write_map(tmp_path / "truth.tif", truth),
        pred_path=write_map(tmp_path / "pred.tif", pred, names=NAMES),
        coarse_path=write_map(tmp_path / "coarse.tif", coarse, names=NAMES),
    )


def test_rasters_stream_to_the_array_result(scene):
    expected = evaluate_arrays(scene["pred"], scene["truth"], NAMES, coarse=scene["coarse"])
    for window in (32, 1024):
        got = evaluate_rasters(scene["pred_path"], scene["truth_path"],
                               coarse=scene["coarse_path"], window=window)
        assert_same(expected, got)
    assert got["classes"] == NAMES  # from PRED's IDGBR_CLASSES tag
    assert set(got) >= {"iou", "f1", "boundary_f", "boundary_iou", "wfm", "accuracy",
                        "coarse", "iou_imp"}
    assert set(got["boundary_f"]) == {"1", "2", "3"}
    assert set(got["iou"]) == {"background", "building", "mean"}


def test_missing_tag_falls_back_to_generic_names(tmp_path):
    truth = class_blobs((40, 40), 1, classes=3)
    write_map(tmp_path / "t.tif", truth)
    write_map(tmp_path / "p.tif", truth)
    r = evaluate_scene(tmp_path / "p.tif", tmp_path / "t.tif")
    assert r["classes"] == ["background", "class_1", "class_2"]
    assert r["iou"]["mean"] == pytest.approx(1.0)


def test_truth_nodata_value_of_the_raster_is_ignored(tmp_path):
    truth = class_blobs((40, 40), 1)
    pred = truth.copy()
    truth_nd = truth.copy()
    truth_nd[:10] = 9
    pred[:10] = 1 - pred[:10]  # wrong only where TRUTH is nodata
    write_map(tmp_path / "t.tif", truth_nd, nodata=9)
    write_map(tmp_path / "p.tif", pred, names=NAMES)
    r = evaluate_scene(tmp_path / "p.tif", tmp_path / "t.tif")
    assert r["pixels"] == 30 * 40
    assert r["iou"]["mean"] == pytest.approx(1.0)


def squares_truth(size: int = 40) -> np.ndarray:
    t = np.zeros((size, size), np.uint8)
    t[4:14, 6:20] = 1
    t[20:33, 22:35] = 2
    return t


def squares_gdf(field: str | None = "class", values=("building", "road")) -> gpd.GeoDataFrame:
    x0, y0, px = TRANSFORM.c, TRANSFORM.f, TRANSFORM.a
    boxes = [shapely.box(x0 + 6 * px, y0 - 14 * px, x0 + 20 * px, y0 - 4 * px),
             shapely.box(x0 + 22 * px, y0 - 33 * px, x0 + 35 * px, y0 - 20 * px)]
    data = {field: list(values)} if field else {}
    return gpd.GeoDataFrame(data, geometry=boxes, crs=CRS)


def test_vector_truth_is_rasterized_on_pred_grid(tmp_path):
    names = ["background", "building", "road"]
    truth = squares_truth()
    pred = np.roll(truth, 1, axis=1)
    write_map(tmp_path / "p.tif", pred, names=names)
    write_map(tmp_path / "t.tif", truth)
    squares_gdf().to_file(tmp_path / "t.gpkg", driver="GPKG")
    squares_gdf(values=(1, 2)).to_file(tmp_path / "t.geojson", driver="GeoJSON")
    from_raster = evaluate_scene(tmp_path / "p.tif", tmp_path / "t.tif")
    for vec in ("t.gpkg", "t.geojson"):
        assert_same(from_raster, evaluate_scene(tmp_path / "p.tif", tmp_path / vec,
                                                window=16))


def test_vector_truth_without_class_field_and_in_another_crs(tmp_path):
    truth = (squares_truth() > 0).astype(np.uint8)
    write_map(tmp_path / "p.tif", truth, names=NAMES)
    squares_gdf(field=None, values=()).to_crs("EPSG:4326").to_file(tmp_path / "b.geojson")
    r = evaluate_scene(tmp_path / "p.tif", tmp_path / "b.geojson")
    # every polygon is "building"; reprojection moves edges by far less than a pixel
    assert r["iou"]["building"] > 0.97
    three = ["background", "building", "road"]
    write_map(tmp_path / "p3.tif", truth, names=three)
    with pytest.raises(InputError, match="no attribute 'class'"):
        evaluate_scene(tmp_path / "p3.tif", tmp_path / "b.geojson")


def test_folders_are_matched_by_name_and_pooled(tmp_path):
    for sub in ("pred", "truth", "coarse"):
        (tmp_path / sub).mkdir()
    arrays = {}
    for i, name in enumerate(("a", "b")):
        t, p, c = (class_blobs((50, 60), i + offset) for offset in (0, 10, 20))
        arrays[name] = (t, p)
        write_map(tmp_path / "truth" / f"{name}.tif", t)
        write_map(tmp_path / "pred" / f"{name}.tif", p, names=NAMES)
        write_map(tmp_path / "coarse" / f"{name}.tif", c, names=NAMES)
    write_map(tmp_path / "pred" / "extra.tif", arrays["a"][1], names=NAMES)
    r = evaluate_folders(tmp_path / "pred", tmp_path / "truth", coarse_dir=tmp_path / "coarse")
    assert list(r["scenes"]) == ["a", "b"]
    assert r["unmatched"] == ["extra.tif"]
    for name in arrays:
        single = evaluate_scene(tmp_path / "pred" / f"{name}.tif", tmp_path / "truth" /
                                f"{name}.tif", coarse=tmp_path / "coarse" / f"{name}.tif")
        assert_same(single, r["scenes"][name])
    # pooled IoU = summed intersections over summed unions
    inter = sum(((t == 1) & (p == 1)).sum() for t, p in arrays.values())
    union = sum(((t == 1) | (p == 1)).sum() for t, p in arrays.values())
    assert r["iou"]["building"] == pytest.approx(inter / union)
    assert r["pixels"] == 2 * 50 * 60
    text = format_report(r)
    assert "== a" in text and "== b" in text and "overall (2 scenes, pooled)" in text
    json.dumps(r, allow_nan=False)


def test_cli_json_and_table(scene):
    runner = CliRunner()
    res = runner.invoke(main, ["evaluate", str(scene["pred_path"]), str(scene["truth_path"]),
                               "--coarse", str(scene["coarse_path"]), "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["iou_imp_k"] == 1.0
    assert set(data["coarse"]["wfm"]) == {"background", "building", "mean"}
    expected = evaluate_arrays(scene["pred"], scene["truth"], NAMES, coarse=scene["coarse"])
    assert data["iou"]["mean"] == pytest.approx(expected["iou"]["mean"])
    res = runner.invoke(main, ["evaluate", str(scene["pred_path"]), str(scene["truth_path"]),
                               "--coarse", str(scene["coarse_path"]), "--k", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    for word in ("IoU", "BF@3px", "WFm", "building", "refined", "coarse", "IoU_imp k=2"):
        assert word in res.output


def test_cli_ignore_class_and_json_file(scene, tmp_path):
    out = tmp_path / "report.json"
    res = CliRunner().invoke(main, ["evaluate", str(scene["pred_path"]),
                                    str(scene["truth_path"]), "--ignore-class", "background",
                                    "-o", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["classes"] == ["building"]
    assert set(data["iou"]) == {"building", "mean"}
    res = CliRunner().invoke(main, ["evaluate", str(scene["pred_path"]),
                                    str(scene["truth_path"]), "-o", str(out), "--quiet"])
    assert res.exit_code == 2 and "already exists" in res.output


@pytest.mark.parametrize("case", ["missing", "not_raster", "grid_size", "grid_origin",
                                  "bad_class", "unknown_ignore", "folder_vs_file"])
def test_cli_bad_inputs_one_line_no_output(tmp_path, scene, case):
    pred, truth = str(scene["pred_path"]), str(scene["truth_path"])
    expected = {"missing": "does not exist", "not_raster": "not a readable raster",
                "grid_size": "different grids", "grid_origin": "different grids",
                "bad_class": "class id", "unknown_ignore": "unknown class",
                "folder_vs_file": "folder"}[case]
    extra: list[str] = []
    if case == "missing":
        truth = str(tmp_path / "nope.tif")
    elif case == "not_raster":
        (tmp_path / "text.tif").write_text("hello")
        truth = str(tmp_path / "text.tif")
    elif case == "grid_size":
        truth = str(write_map(tmp_path / "small.tif", scene["truth"][:50]))
    elif case == "grid_origin":
        shifted = from_origin(500010.0, 5000000.0, 0.5, 0.5)
        truth = str(write_map(tmp_path / "moved.tif", scene["truth"], transform=shifted))
    elif case == "bad_class":
        truth = str(write_map(tmp_path / "t7.tif", np.full_like(scene["truth"], 7)))
    elif case == "unknown_ignore":
        extra = ["--ignore-class", "road"]
    elif case == "folder_vs_file":
        truth = str(tmp_path)
    out = tmp_path / "out.json"
    res = CliRunner().invoke(main, ["evaluate", pred, truth, "-o", str(out), "--quiet", *extra])
    assert res.exit_code == 2
    assert expected in res.output
    assert res.output.startswith("Error: ") and res.output.count("\n") == 1
    assert "Traceback" not in res.output
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial*"))

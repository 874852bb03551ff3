"""`idgbr-geo refine` / `batch` from the command line, including every user error."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner
from synth import synthetic_scene, write_raster

from idgbr_geo.cli import main
from idgbr_geo.options import RunOptions
from idgbr_geo.registry import models_dir


def run(*args: str) -> tuple[int, str, str]:
    """Run the real console entry point in a subprocess (stderr separated)."""
    p = subprocess.run([sys.executable, "-c", "from idgbr_geo.cli import main; main()", *args],
                       capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


def test_refine_cli_writes_output_and_summary(tmp_path, toy_model, scene):
    out = tmp_path / "out.tif"
    code, _, err = run("refine", str(scene), str(out), "--model", str(toy_model),
                       "--probabilities", str(tmp_path / "p.tif"), "--confidence", "--seed", "3")
    assert code == 0, err
    assert "windows" in err and "refined" in err and "MP/s" in err
    with rasterio.open(out) as ds:
        assert ds.count == 2
    with rasterio.open(tmp_path / "p.tif") as ds:
        assert ds.count == 2 and ds.descriptions == ("background", "building")


def _assert_clean_error(code: int, err: str, tmp_path: Path, must: str) -> None:
    assert code != 0
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert must.lower() in lines[0].lower(), lines[0]
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".") or p.name == "out.tif"]


def test_missing_input(tmp_path, toy_model):
    code, _, err = run("refine", str(tmp_path / "nope.tif"), str(tmp_path / "out.tif"),
                       "--model", str(toy_model))
    _assert_clean_error(code, err, tmp_path, "does not exist")


def test_not_a_raster(tmp_path, toy_model):
    bad = tmp_path / "notes.tif"
    bad.write_text("this is not a GeoTIFF")
    code, _, err = run("refine", str(bad), str(tmp_path / "out.tif"), "--model", str(toy_model))
    _assert_clean_error(code, err, tmp_path, "not a readable raster")


def test_truncated_tiff(tmp_path, toy_model):
    good = write_raster(tmp_path / "good.tif", synthetic_scene(300, 300), tiled=True,
                        blockxsize=64, blockysize=64, compress="deflate")
    data = good.read_bytes()
    bad = tmp_path / "trunc.tif"
    bad.write_bytes(data[: len(data) // 2])
    code, _, err = run("refine", str(bad), str(tmp_path / "out.tif"), "--model", str(toy_model))
    _assert_clean_error(code, err, tmp_path, "trunc.tif")


@pytest.mark.slow
def test_wrong_band_count(tmp_path, toy_model):
    one = write_raster(tmp_path / "one.tif", synthetic_scene(50, 50, bands=1))
    code, _, err = run("refine", str(one), str(tmp_path / "out.tif"), "--model", str(toy_model))
    _assert_clean_error(code, err, tmp_path, "band")
    code, _, err = run("refine", str(one), str(tmp_path / "out.tif"), "--model", str(toy_model),
                       "--bands", "1,2,3")
    _assert_clean_error(code, err, tmp_path, "--bands")


def test_missing_crs_warns_and_continues(tmp_path, toy_model):
    src = write_raster(tmp_path / "nocrs.tif", synthetic_scene(60, 60), crs=None)
    code, _, err = run("refine", str(src), str(tmp_path / "out.tif"), "--model", str(toy_model))
    assert code == 0, err
    assert "Warning:" in err and "no CRS" in err and "Traceback" not in err
    assert (tmp_path / "out.tif").exists()


@pytest.mark.slow
def test_existing_output_needs_overwrite(tmp_path, toy_model, scene):
    out = tmp_path / "out.tif"
    out.write_bytes(b"precious")
    code, _, err = run("refine", str(scene), str(out), "--model", str(toy_model))
    assert code != 0 and "already exists" in err and "Traceback" not in err
    assert out.read_bytes() == b"precious"
    code, _, err = run("refine", str(scene), str(out), "--model", str(toy_model), "--overwrite")
    assert code == 0, err
    with rasterio.open(out) as ds:
        assert ds.count == 1


def test_output_folder_missing(tmp_path, toy_model, scene):
    code, _, err = run("refine", str(scene), str(tmp_path / "nowhere" / "out.tif"),
                       "--model", str(toy_model))
    assert code != 0 and "does not exist" in err and "Traceback" not in err


def test_window_not_larger_than_twice_overlap(tmp_path, toy_model, scene):
    code, _, err = run("refine", str(scene), str(tmp_path / "out.tif"), "--model", str(toy_model),
                       "--tile-size", "64", "--overlap", "32")
    _assert_clean_error(code, err, tmp_path, "twice the overlap")


def test_model_workers_option(tmp_path, toy_model, scene):
    code, _, err = run("refine", str(scene), str(tmp_path / "a.tif"), "--model", str(toy_model),
                       "--model-workers", "3", "-q")
    assert code == 0, err
    code, _, err = run("refine", str(scene), str(tmp_path / "out.tif"), "--model",
                       str(toy_model), "--model-workers", "0")
    _assert_clean_error(code, err, tmp_path, "--model-workers must be at least 1")


def test_unknown_model(tmp_path, scene):
    code, _, err = run("refine", str(scene), str(tmp_path / "out.tif"), "--model", "nosuchmodel")
    _assert_clean_error(code, err, tmp_path, "unknown model")


@pytest.mark.parametrize("gate", [[0.6], [0.6, "x"], 1.5, True])
def test_card_with_a_bad_gate(tmp_path, scene, gate):
    """A hand-edited card fails with one line when loaded, before any output exists."""
    card = json.loads((models_dir() / "buildings.json").read_text())
    card["sampling"]["gate"] = gate
    folder = tmp_path / "edited"
    folder.mkdir()
    (folder / "buildings.json").write_text(json.dumps(card))
    shutil.copy(models_dir() / card["weights"], folder / card["weights"])
    code, _, err = run("refine", str(scene), str(tmp_path / "out.tif"), "--model",
                       str(folder / "buildings.json"))
    _assert_clean_error(code, err, tmp_path, "sampling 'gate' must be")


def test_failed_run_leaves_no_output(tmp_path, toy_model, monkeypatch):
    """A crash in the middle of writing leaves neither the output nor a temporary file."""
    import idgbr_geo.writing as writing
    from idgbr_geo.engine import refine_raster

    src = write_raster(tmp_path / "in.tif", synthetic_scene(400, 400))
    calls = {"n": 0}
    orig = writing.ResultWriter.write

    def boom(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk on fire")
        return orig(self, *a, **k)

    monkeypatch.setattr(writing.ResultWriter, "write", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        refine_raster(src, tmp_path / "out.tif", model=toy_model, quiet=True,
                      probabilities=tmp_path / "p.tif", options=RunOptions(device="cpu"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif", "model"]


def test_batch_skips_existing_and_survives_failures(tmp_path, toy_model):
    ind, outd = tmp_path / "in", tmp_path / "out"
    ind.mkdir()
    outd.mkdir()
    for i in range(3):
        write_raster(ind / f"s{i}.tif", synthetic_scene(70, 90, seed=i))
    (ind / "broken.tif").write_text("not a raster")
    (outd / "s0.tif").write_bytes(b"existing")
    runner = CliRunner()
    res = runner.invoke(main, ["batch", str(ind), str(outd), "--model", str(toy_model), "-q"])
    assert res.exit_code == 1
    summary = json.loads((outd / "idgbr_batch_summary.json").read_text())
    status = {Path(s["scene"]).name: s["status"] for s in summary["scenes"]}
    assert status == {"broken.tif": "failed", "s0.tif": "skipped", "s1.tif": "done",
                      "s2.tif": "done"}
    err = {Path(s["scene"]).name: s["error"] for s in summary["scenes"]}
    assert "not a readable raster" in err["broken.tif"]
    assert (outd / "s0.tif").read_bytes() == b"existing"
    # batch output equals a single refine of the same scene
    single = tmp_path / "single.tif"
    runner.invoke(main, ["refine", str(ind / "s1.tif"), str(single), "--model", str(toy_model),
                         "-q"])
    with rasterio.open(single) as a, rasterio.open(outd / "s1.tif") as b:
        assert np.array_equal(a.read(), b.read())
    # --overwrite redoes the existing one
    res = runner.invoke(main, ["batch", str(ind), str(outd), "--model", str(toy_model), "-q",
                               "--overwrite", "--pattern", "s*.tif"])
    assert res.exit_code == 0, res.output
    with rasterio.open(outd / "s0.tif") as ds:
        assert ds.count == 1


def test_refine_with_vector_output(tmp_path, toy_model, scene):
    import geopandas as gpd
    import pyogrio

    out, gpkg = tmp_path / "out.tif", tmp_path / "out.gpkg"
    code, _, err = run("refine", str(scene), str(out), "--model", str(toy_model), "--confidence",
                       "--vector", str(gpkg), "--min-area", "0", "--fill-holes", "0",
                       "--simplify", "0")
    assert code == 0, err
    layers = dict(pyogrio.list_layers(gpkg))
    assert "buildings" in layers
    df = gpd.read_file(gpkg, layer="buildings")
    assert len(df) > 0 and df.crs.to_epsg() == 32633
    assert df.geometry.is_valid.all()
    assert (df["scene"] == "scene").all() and df["mean_confidence"].notna().all()
    with rasterio.open(out) as ds:
        built = (ds.read(1) == 1).sum() * 0.3 * 0.3
    assert df["area_m2"].sum() == pytest.approx(built, rel=1e-6)


def test_refine_vector_existing_output_fails_before_work(tmp_path, toy_model, scene):
    gpkg = tmp_path / "out.gpkg"
    gpkg.write_bytes(b"x")
    code, _, err = run("refine", str(scene), str(tmp_path / "out.tif"), "--model", str(toy_model),
                       "--vector", str(gpkg))
    assert code != 0 and "already exists" in err and "Traceback" not in err
    assert not (tmp_path / "out.tif").exists()


def test_batch_vectors_per_scene_and_merged(tmp_path, toy_model):
    import geopandas as gpd

    ind, outd = tmp_path / "in", tmp_path / "out"
    ind.mkdir()
    outd.mkdir()
    for i in range(2):
        write_raster(ind / f"s{i}.tif", synthetic_scene(70, 90, seed=i))
    merged = tmp_path / "all.gpkg"
    res = CliRunner().invoke(main, ["batch", str(ind), str(outd), "--model", str(toy_model), "-q",
                                    "--vector", "--vector-merge", str(merged)])
    assert res.exit_code == 0, res.output
    per = [gpd.read_file(outd / f"s{i}.gpkg", layer="buildings") for i in range(2)]
    assert all(len(df) > 0 for df in per)
    allb = gpd.read_file(merged, layer="buildings")
    assert sorted(set(allb["scene"])) == ["s0", "s1"]
    assert len(allb) == sum(len(df) for df in per)

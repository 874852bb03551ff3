"""In-process `idgbr-geo batch`: any scene error is that scene's failure, changed options redo
the batch's own outputs, a malformed manifest is one clear error, and no output may be a scene."""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path

import pytest
import rasterio
from click.testing import CliRunner
from synth import conv_model, synthetic_scene, write_raster

from idgbr_geo.batch import (
    MANIFEST_NAME,
    SUMMARY_NAME,
    SceneSettings,
    find_scenes,
    options_fingerprint,
    run_batch,
)
from idgbr_geo.cli import main
from idgbr_geo.errors import UserError
from idgbr_geo.options import OutputOptions, RunOptions, VectorOptions


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return conv_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path]:
    """IN with two small scenes, an empty OUT."""
    ind, out = tmp_path / "in", tmp_path / "out"
    ind.mkdir()
    out.mkdir()
    for i, name in enumerate(("a", "b")):
        write_raster(ind / f"{name}.tif", synthetic_scene(48, 56, seed=i))
    return ind, out


def states(out: Path) -> dict[str, str]:
    doc = json.loads((out / MANIFEST_NAME).read_text())
    return {k: e["state"] for k, e in doc["scenes"].items()}


def cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, list(args))
    return res.exit_code, res.stderr


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    return lines[0]


# -- item 3: any exception of one scene is that scene's failure --------------------------------

def test_unexpected_exception_fails_only_its_scene(folders, model, monkeypatch):
    """A bug-class exception (not OSError/ValueError/...) in one scene: the batch goes on,
    the scene is failed with one line, it is not retried, and the re-run works."""
    import idgbr_geo.engine as engine

    ind, out = folders
    real, calls = engine.refine_raster, {"a": 0}

    def boom(input, output, **kw):
        if Path(input).name == "a.tif":
            calls["a"] += 1
            raise ZeroDivisionError("float division by zero\nsecond line")
        return real(input, output, **kw)

    monkeypatch.setattr(engine, "refine_raster", boom)
    res = run_batch(ind, out, model=model, quiet=True, retries=2)
    by = {Path(s.scene).name: s for s in res.scenes}
    assert by["b.tif"].status == "done"
    a = by["a.tif"]
    assert (a.status, a.attempts, a.retryable) == ("failed", 1, False)
    assert a.error == "ZeroDivisionError: float division by zero" and calls["a"] == 1
    assert states(out) == {"a.tif": "failed", "b.tif": "done"}
    assert json.loads((out / SUMMARY_NAME).read_text())["counts"] == {"done": 1, "failed": 1}
    # the same failure on a re-run is reported the same way, never a crash
    res = run_batch(ind, out, model=model, quiet=True)
    assert res.counts() == {"failed": 1, "skipped": 1}
    monkeypatch.setattr(engine, "refine_raster", real)
    assert run_batch(ind, out, model=model, quiet=True).counts() == {"done": 1, "skipped": 1}


def test_interrupt_propagates_and_the_rerun_finishes(folders, model, monkeypatch):
    import idgbr_geo.engine as engine

    ind, out = folders
    real = engine.refine_raster

    def interrupted(input, output, **kw):
        if Path(input).name == "b.tif":
            raise KeyboardInterrupt
        return real(input, output, **kw)

    monkeypatch.setattr(engine, "refine_raster", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_batch(ind, out, model=model, quiet=True)
    assert states(out) == {"a.tif": "done", "b.tif": "running"}
    monkeypatch.setattr(engine, "refine_raster", real)
    res = run_batch(ind, out, model=model, quiet=True)
    assert {Path(s.scene).name: s.status for s in res.scenes} == {"a.tif": "skipped",
                                                                  "b.tif": "done"}


def test_cli_batch_with_a_crashing_scene(folders, model, monkeypatch):
    import idgbr_geo.engine as engine

    ind, out = folders
    real = engine.refine_raster

    def broken(input, output, **kw):
        if Path(input).name == "a.tif":
            raise TypeError("unsupported operand type(s)")
        return real(input, output, **kw)

    monkeypatch.setattr(engine, "refine_raster", broken)
    code, err = cli("batch", str(ind), str(out), "--model", str(model))
    assert code == 1 and "Traceback" not in err, err
    assert "1 done, 1 failed" in err
    assert "a.tif: TypeError: unsupported operand type(s)" in err


# -- item 4: changed options redo the batch's own outputs --------------------------------------

def read(path: Path) -> tuple[bytes, dict[str, str]]:
    with rasterio.open(path) as ds:
        return ds.read().tobytes(), ds.tags()


def test_coarse_only_after_refine_redoes_the_scenes(folders, model):
    ind, out = folders
    base = ["batch", str(ind), str(out), "--model", str(model), "-q"]
    assert cli(*base) == (0, "")
    refined = {n: read(out / f"{n}.tif") for n in ("a", "b")}
    assert all(t["IDGBR_STEPS"] != "0" for _, t in refined.values())
    # an output of ours made with other options is redone, no --overwrite needed
    assert cli(*base, "--coarse-only") == (0, "")
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["counts"] == {"done": 2}
    for n in ("a", "b"):
        pixels, tags = read(out / f"{n}.tif")
        assert tags["IDGBR_STEPS"] == "0"
        assert pixels != refined[n][0], f"{n}: the coarse map equals the refined one"
    # options that do not change an output bytes do not redo anything
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tif")}
    assert cli(*base, "--coarse-only", "--model-workers", "2", "--device", "cpu") == (0, "")
    assert json.loads((out / SUMMARY_NAME).read_text())["counts"] == {"skipped": 2}
    assert stamps == {p.name: p.stat().st_mtime_ns for p in out.glob("*.tif")}


def test_an_output_the_manifest_does_not_know_stays(folders, model):
    """Somebody else's file in OUT is kept (skipped) unless --overwrite."""
    ind, out = folders
    (out / "a.tif").write_bytes(b"not ours")
    res = run_batch(ind, out, model=model, quiet=True)
    assert {Path(s.scene).name: s.status for s in res.scenes} == {"a.tif": "skipped",
                                                                  "b.tif": "done"}
    # other options: b (ours) is redone, a (not ours) still stays
    res = run_batch(ind, out, model=model, quiet=True, options=RunOptions(seed=3))
    assert {Path(s.scene).name: s.status for s in res.scenes} == {"a.tif": "skipped",
                                                                  "b.tif": "done"}
    assert (out / "a.tif").read_bytes() == b"not ours"
    res = run_batch(ind, out, model=model, quiet=True, overwrite=True, options=RunOptions(seed=3))
    assert res.counts() == {"done": 1, "skipped": 1}
    assert read(out / "a.tif")[1]["IDGBR_SEED"] == "3"


def test_a_retry_replaces_what_an_earlier_attempt_wrote(folders, model, monkeypatch):
    """An attempt that wrote its output and then failed transiently (on a cluster: its
    worker died before the result came back, and the scheduler ran the task again) is
    retried, and the retry may replace that output: it did not exist when the batch began."""
    import idgbr_geo.engine as engine

    ind, out = folders
    real, calls = engine.refine_raster, {"a": 0}

    def lost(input, output, **kw):
        summary = real(input, output, **kw)
        if Path(input).name == "a.tif" and calls["a"] == 0:
            calls["a"] += 1
            raise OSError("connection to the worker lost")  # after the output is complete
        return summary

    monkeypatch.setattr(engine, "refine_raster", lost)
    res = run_batch(ind, out, model=model, quiet=True, retries=1)
    by = {Path(s.scene).name: s for s in res.scenes}
    assert (by["a.tif"].status, by["a.tif"].attempts) == ("done", 2), by["a.tif"]
    assert states(out) == {"a.tif": "done", "b.tif": "done"}
    # a file somebody else puts where a scene's output goes is still kept, as before
    (out / "a.tif").unlink()
    (out / "a.tif").write_bytes(b"not ours")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    del manifest["scenes"]["a.tif"]
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert run_batch(ind, out, model=model, quiet=True).counts() == {"skipped": 2}
    assert (out / "a.tif").read_bytes() == b"not ours"
    # and somebody else's polygons where a new output's would go are not replaced either
    (out / "b.tif").unlink()
    (out / "b.gpkg").write_bytes(b"not ours either")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    del manifest["scenes"]["b.tif"]
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    res = run_batch(ind, out, model=model, quiet=True, vector=True)
    b = next(r for r in res.scenes if Path(r.scene).name == "b.tif")
    assert b.status == "failed" and "exists" in b.error
    assert (out / "b.gpkg").read_bytes() == b"not ours either"


def test_ours_after_a_failed_redo_is_still_ours(folders, model, monkeypatch):
    """Refined, then a --coarse-only run whose scene a fails (old output still there): the
    next --coarse-only run redoes a instead of skipping it."""
    import idgbr_geo.engine as engine

    ind, out = folders
    run_batch(ind, out, model=model, quiet=True)
    real = engine.refine_raster

    def fail_a(input, output, **kw):
        if Path(input).name == "a.tif":
            raise OSError("disk hiccup")
        return real(input, output, **kw)

    monkeypatch.setattr(engine, "refine_raster", fail_a)
    res = run_batch(ind, out, model=model, quiet=True, retries=0,
                    options=RunOptions(coarse_only=True))
    assert res.counts() == {"done": 1, "failed": 1}
    monkeypatch.setattr(engine, "refine_raster", real)
    res = run_batch(ind, out, model=model, quiet=True, options=RunOptions(coarse_only=True))
    assert {Path(s.scene).name: s.status for s in res.scenes} == {"a.tif": "done",
                                                                  "b.tif": "skipped"}
    assert read(out / "a.tif")[1]["IDGBR_STEPS"] == "0"


def test_fingerprint_covers_every_option_that_shapes_the_bytes(model):
    """The CLI passes every option (None, False, seed 0); the Python API only those given:
    both mean the same outputs, so the same fingerprint. Every field of the run and output
    options changes it, except the neutral ones; the polygon options only when polygons are
    written. (A new option field fails this test until it is listed here.)"""

    def fp(settings: SceneSettings) -> str:
        return options_fingerprint(str(model), settings)

    base = fp(SceneSettings())
    cli = SceneSettings(
        RunOptions(coarse_only=False, bands=None, tile_size=None, overlap=None, steps=None,
                   batch_size=None, model_workers=None, device="auto", seed=0, gsd=None,
                   value_range=None, precision="auto", gsd_search=True, multiscale=True,
                   estimate_gsd=False),
        OutputOptions(confidence=False, cog=False, probabilities_dtype="uint8",
                      vectors=VectorOptions(simplify=None, regularize=False)))
    assert fp(cli) == base
    assert fp(SceneSettings(RunOptions(model_workers=4, device="cpu"), overwrite=True,
                            tune_process=True)) == base
    assert RunOptions.NEUTRAL == {"device", "model_workers"}
    run = {"coarse_only": True, "bands": [3, 2, 1], "tile_size": 64, "overlap": 8, "steps": 5,
           "batch_size": 2, "seed": 1, "gsd": 0.5, "value_range": (0, 2047),
           "precision": "float32", "gsd_search": False, "multiscale": False,
           "estimate_gsd": True}
    assert set(run) == {f.name for f in fields(RunOptions)} - RunOptions.NEUTRAL
    for key, value in run.items():
        assert fp(SceneSettings(RunOptions(**{key: value}))) != base, key
    out = {"confidence": True, "cog": True, "probabilities_dtype": "float32"}
    assert set(out) | {"vectors"} == {f.name for f in fields(OutputOptions)}
    for key, value in out.items():
        assert fp(SceneSettings(outputs=OutputOptions(**{key: value}))) != base, key
    # polygons: writing them changes it, and then so does every way of shaping them
    shaped = OutputOptions(vectors=VectorOptions(simplify=1.0))
    assert fp(SceneSettings(outputs=shaped)) == base  # no polygons written: no change
    with_vectors = fp(SceneSettings(vector=True))
    assert with_vectors != base
    vec = {"simplify": 1.0, "min_area": 5.0, "fill_holes": {"building": 3.0},
           "regularize": True, "centerlines": True, "spur_length": 5.0}
    assert set(vec) == {f.name for f in fields(VectorOptions)}
    for key, value in vec.items():
        settings = SceneSettings(outputs=OutputOptions(vectors={key: value}), vector=True)
        assert fp(settings) != with_vectors, key


# -- item 11: a malformed manifest is one clear error ------------------------------------------

@pytest.mark.parametrize("doc", [
    '{"scenes": [1, 2]}', '{"scenes": {"a.tif": 3}}', "[]", '"x"', "3", "{not json",
    '{"scenes": {"a.tif": {"state": 5}}}', '{"scenes": {"a.tif": {"state": "done", '
    '"output": 7}}}', '{"scenes": {"a.tif": {"state": "weird"}}}'])
def test_malformed_manifest(folders, model, doc):
    ind, out = folders
    (out / MANIFEST_NAME).write_text(doc)
    with pytest.raises(UserError, match="manifest .* is (unreadable|malformed)"):
        run_batch(ind, out, model=model, quiet=True)
    code, err = cli("batch", str(ind), str(out), "--model", str(model))
    assert code == 2
    assert "delete it" in one_error_line(err)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME]


# -- item 2: no output may be a scene ----------------------------------------------------------

@pytest.mark.parametrize("overwrite", [False, True])
def test_in_dir_is_out_dir(folders, model, overwrite):
    ind, _ = folders
    before = {p.name: p.read_bytes() for p in ind.iterdir()}
    code, err = cli("batch", str(ind), str(ind), "--model", str(model),
                    *(["--overwrite"] if overwrite else []))
    assert code == 2
    assert "is the scene" in one_error_line(err) and "output folder" in err
    assert {p.name: p.read_bytes() for p in ind.iterdir()} == before


def test_outputs_that_are_scenes(tmp_path, model):
    ind = tmp_path / "in"
    ind.mkdir()
    write_raster(ind / "a.tif", synthetic_scene(40, 40))
    out = tmp_path / "out"
    out.mkdir()
    # a hard link of a scene in OUT under the output's name
    os.link(ind / "a.tif", out / "a.tif")
    with pytest.raises(UserError, match="is the scene"):
        run_batch(ind, out, model=model, quiet=True, overwrite=True)
    (out / "a.tif").unlink()
    # OUT a symbolic link to IN
    (tmp_path / "link").symlink_to(ind)
    with pytest.raises(UserError, match="is the scene"):
        run_batch(ind, tmp_path / "link", model=model, quiet=True, overwrite=True)
    # the per-scene GeoPackage or the merged one
    (ind / "p.gpkg").write_bytes(b"a scene, as far as --pattern * is concerned")
    with pytest.raises(UserError, match="GeoPackage .* is the scene"):
        run_batch(ind, ind, model=model, quiet=True, overwrite=True, pattern="*.gpkg",
                  vector=True)
    with pytest.raises(UserError, match="merged GeoPackage .* is the scene"):
        run_batch(ind, out, model=model, quiet=True, overwrite=True, pattern="*",
                  vector_merge=ind / "p.gpkg")
    with pytest.raises(UserError, match="GeoPackage of a.tif and the merged GeoPackage"):
        run_batch(ind, out, model=model, quiet=True, vector=True,
                  vector_merge=out / "a.gpkg")
    # the manifest or the summary
    (ind / MANIFEST_NAME).write_text("{}")
    with pytest.raises(UserError, match="manifest .* is the scene"):
        run_batch(ind, ind, model=model, quiet=True, overwrite=True, pattern="*.json")
    # two scenes with one output
    write_raster(ind / "a.tiff", synthetic_scene(40, 40))
    with pytest.raises(UserError, match="a.tif and .*a.tiff .* same file"):
        run_batch(ind, out, model=model, quiet=True, pattern="a.ti*")
    assert (ind / "p.gpkg").read_bytes().startswith(b"a scene")
    assert sorted(p.name for p in out.iterdir()) == []


def test_the_default_scenes_are_geotiffs_in_any_case(tmp_path, model):
    ind = tmp_path / "in"
    ind.mkdir()
    for name in ("a.tif", "B.TIF", "c.tiff", "d.TIFF"):
        write_raster(ind / name, synthetic_scene(40, 40))
    (ind / "a.tif.aux.xml").write_text("<PAMDataset/>")  # GDAL's side file: not a scene
    (ind / "e.jpg").write_bytes(b"not read: the default takes GeoTIFFs only")
    res = run_batch(ind, tmp_path / "out", model=model, quiet=True)
    assert sorted(Path(s.scene).name for s in res.scenes) == ["B.TIF", "a.tif", "c.tiff",
                                                             "d.TIFF"]
    assert all(s.status == "done" for s in res.scenes)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tif")) == [
        "B.tif", "a.tif", "c.tif", "d.tif"]


def test_a_listed_url_takes_the_same_default():
    import fsspec

    fs = fsspec.filesystem("memory")
    for name in ("a.tif", "B.TIFF", "c.jpg", "a.tif.aux.xml"):
        fs.pipe(f"/idgbr-scenes/{name}", b"x")
    try:
        assert find_scenes("memory://idgbr-scenes") == ["memory:///idgbr-scenes/B.TIFF",
                                                       "memory:///idgbr-scenes/a.tif"]
        assert find_scenes("memory://idgbr-scenes", "*.jpg") == [
            "memory:///idgbr-scenes/c.jpg"]
    finally:
        fs.rm("/idgbr-scenes", recursive=True)


def test_a_folder_without_geotiffs_names_the_pattern_for_its_images(tmp_path, model):
    ind = tmp_path / "jpegs"
    ind.mkdir()
    (ind / "x.JPG").write_bytes(b"")
    (ind / "notes.txt").write_text("")
    with pytest.raises(UserError, match=r"no GeoTIFF \(.tif, .tiff\) in .*jpegs; to take "
                                        r"its .JPG files give pattern '\*.JPG'"):
        run_batch(ind, tmp_path / "out", model=model, quiet=True)
    code, err = cli("batch", str(ind), str(tmp_path / "out"), "-m", str(model))
    assert code == 2 and "give --pattern '*.JPG'" in one_error_line(err)
    code, err = cli("batch", str(ind), str(tmp_path / "out"), "-m", str(model),
                    "--pattern", "*.png")
    assert code == 2 and one_error_line(err).endswith("matches '*.png'")


def test_out_dir_inside_in_dir_is_fine(tmp_path, model):
    write_raster(tmp_path / "a.tif", synthetic_scene(40, 40))
    (tmp_path / "out").mkdir()
    for _ in range(2):  # the second run does not see OUT's a.tif (the pattern is not **)
        res = run_batch(tmp_path, tmp_path / "out", model=model, quiet=True)
    assert [s.status for s in res.scenes] == ["skipped"]


# -- issue 14: OUT is created; what fails every scene fails once, before any scene --------------

def test_batch_creates_the_output_folder(tmp_path, model):
    ind = tmp_path / "in"
    ind.mkdir()
    write_raster(ind / "a.tif", synthetic_scene(40, 40))
    out = tmp_path / "new"
    assert cli("batch", str(ind), str(out), "--model", str(model), "-q") == (0, "")
    assert (out / "a.tif").exists() and states(out) == {"a.tif": "done"}
    # not a whole tree: a mistyped parent is an error, and nothing is made
    code, err = cli("batch", str(ind), str(tmp_path / "typo" / "out"), "--model", str(model))
    assert code == 2 and "typo does not exist" in one_error_line(err)
    assert not (tmp_path / "typo").exists()


def test_a_batch_that_fails_before_any_scene_leaves_no_new_folder(tmp_path, model):
    ind = tmp_path / "in"
    ind.mkdir()
    write_raster(ind / "a.tif", synthetic_scene(40, 40))
    out = tmp_path / "new"
    code, err = cli("batch", str(ind), str(out), "--model", str(model), "--vector-merge",
                    str(out / "all.shp"))
    assert code == 2 and "must end in .gpkg" in one_error_line(err)
    assert not out.exists()


@pytest.mark.parametrize(("options", "message"), [
    (RunOptions(tile_size=40), r"tile_size \(40\) must be larger than twice the overlap"),
    (RunOptions(tile_size=68, overlap=8), "must be multiples of 8 for model"),
])
def test_options_that_fail_every_scene_fail_once_up_front(folders, model, monkeypatch, options,
                                                          message):
    """Valid on their own, wrong for this model's card: one error before any scene starts
    (no scene tried, no manifest), instead of every scene failing alike."""
    import idgbr_geo.engine as engine

    ind, out = folders
    calls = []
    monkeypatch.setattr(engine, "refine_raster", lambda *a, **k: calls.append(a))
    with pytest.raises(UserError, match=message):
        run_batch(ind, out, model=model, quiet=True, options=options)
    assert calls == [] and list(out.iterdir()) == []
    code, err = cli("batch", str(ind), str(out), "--model", str(model),
                    *(["--tile-size", "40"] if options.tile_size == 40 else
                      ["--tile-size", "68", "--overlap", "8"]))
    assert code == 2 and "--tile-size" in one_error_line(err) and list(out.iterdir()) == []


def test_batch_options_must_be_option_objects(folders, model):
    ind, out = folders
    with pytest.raises(TypeError, match="RunOptions"):
        run_batch(ind, out, model=model, options={"seed": 1})  # type: ignore[arg-type]


# -- issue 14 follow-ups: outputs named as listed; warnings found while reading are kept -------

def test_a_symlinked_scene_gives_an_output_named_after_the_link(tmp_path, model):
    """``scenes/a.tif -> ../x/gorinchem.tif`` is the scene a.tif (output a.tif), while the
    check that no output is a scene still compares the real files."""
    (tmp_path / "x").mkdir()
    scenes, out = tmp_path / "scenes", tmp_path / "out"
    scenes.mkdir()
    write_raster(tmp_path / "x" / "gorinchem.tif", synthetic_scene(40, 40))
    (scenes / "a.tif").symlink_to(Path("..") / "x" / "gorinchem.tif")
    res = run_batch(scenes, out, model=model, quiet=True)
    assert res.counts() == {"done": 1}
    assert res.scenes[0].scene == str((scenes / "a.tif").absolute())
    assert sorted(p.name for p in out.glob("*.tif")) == ["a.tif"]
    assert states(out) == {"a.tif": "done"}
    # a link named like its target, into the target's folder: the output is the scene
    (scenes / "gorinchem.tif").symlink_to(Path("..") / "x" / "gorinchem.tif")
    before = (tmp_path / "x" / "gorinchem.tif").read_bytes()
    with pytest.raises(UserError, match="is the scene"):
        run_batch(scenes, tmp_path / "x", model=model, quiet=True, overwrite=True,
                  pattern="gorinchem.tif")
    assert (tmp_path / "x" / "gorinchem.tif").read_bytes() == before


def test_value_range_warning_reaches_the_batch_summary(tmp_path, model):
    """The warning found while reading windows (not when opening the scene) is in the
    scene's result and the summary file, as well as printed."""
    import warnings

    from idgbr_geo.tiling import ValueRangeWarning

    ind, out = tmp_path / "in", tmp_path / "out"
    ind.mkdir()
    write_raster(ind / "v.tif", synthetic_scene(60, 60).astype("float32"))  # 0..255 floats
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        res = run_batch(ind, out, model=model, quiet=True)
    shown = [str(w.message) for w in record if issubclass(w.category, ValueRangeWarning)]
    assert len(shown) == 1 and res.scenes[0].warnings == shown, res.scenes
    doc = json.loads((out / SUMMARY_NAME).read_text())
    assert doc["scenes"][0]["warnings"] == shown

"""An output never replaces an input, nor another output (issue 15, item 2).

Any output of refine, vectorize, preview, evaluate and train that names an input (same path,
a symbolic link or a hard link to it) or another output of the same command is one `Error:`
line and a non-zero exit, with or without --overwrite, before any work: the input keeps its
bytes and no output file appears.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from synth import class_blobs, conv_model, write_raster

from idgbr_geo.cli import main

H, W = 150, 170  # the conftest ``scene`` fixture's size (same grid as write_raster's default)


def cli(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (links as their target's bytes) -> sha256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_refused(res: Result, before: dict[str, str], folder: Path, *words: str) -> None:
    """Exit non-zero with one `Error:` line naming the clash; no file changed or added."""
    assert res.exit_code not in (0, None), res.output
    assert isinstance(res.exception, SystemExit), res.exception  # not a traceback
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert "overwrite" not in lines[0]  # --overwrite would not help
    assert digest(folder) == before


def class_map(path: Path, seed: int = 0, shape: tuple[int, int] = (H, W)) -> Path:
    return write_raster(path, class_blobs(shape, seed))


# ----------------------------------------------------------------------------- refine


@pytest.mark.parametrize("overwrite", [False, True])
def test_refine_output_is_the_input(tmp_path, toy_model, scene, overwrite):
    before = digest(tmp_path)
    res = cli("refine", scene, scene, "--model", toy_model, *(["--overwrite"] * overwrite))
    assert_refused(res, before, tmp_path, "the output", "is the input", "destroyed")


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_refine_output_is_a_link_to_the_input(tmp_path, toy_model, scene, link):
    out = tmp_path / "out.tif"
    if link == "symlink":
        out.symlink_to(scene)
    else:
        os.link(scene, out)
    before = digest(tmp_path)
    res = cli("refine", scene, out, "--model", toy_model, "--overwrite")
    assert_refused(res, before, tmp_path, "is the input")
    assert out.is_symlink() == (link == "symlink")


def test_refine_output_in_another_spelling_of_the_input(tmp_path, toy_model, scene,
                                                         monkeypatch):
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    before = digest(tmp_path)
    res = cli("refine", scene, "../scene.tif", "--model", toy_model, "--overwrite")
    assert_refused(res, before, tmp_path, "is the input")


def test_refine_probabilities_is_the_input(tmp_path, toy_model, scene):
    before = digest(tmp_path)
    res = cli("refine", scene, tmp_path / "out.tif", "--model", toy_model,
              "--probabilities", scene, "--overwrite")
    assert_refused(res, before, tmp_path, "--probabilities file", "is the input")


@pytest.mark.parametrize("link", ["same", "hardlink"])
def test_refine_probabilities_is_the_output(tmp_path, toy_model, scene, link):
    out = class_map(tmp_path / "out.tif")  # an earlier result, replaced with --overwrite
    prob = out
    if link == "hardlink":
        prob = tmp_path / "p.tif"
        os.link(out, prob)
    before = digest(tmp_path)
    res = cli("refine", scene, out, "--model", toy_model, "--probabilities", prob,
              "--overwrite")
    assert_refused(res, before, tmp_path, "the output and the --probabilities file",
                   "same file")


def test_refine_vector_is_the_output(tmp_path, toy_model, scene):
    out = tmp_path / "o.gpkg"
    before = digest(tmp_path)
    res = cli("refine", scene, out, "--model", toy_model, "--vector", out)
    assert_refused(res, before, tmp_path, "the output and the --vector file", "same file")
    assert not out.exists()


def test_refine_vector_is_the_input(tmp_path, toy_model, scene):
    gpkg = tmp_path / "in.gpkg"
    os.link(scene, gpkg)
    before = digest(tmp_path)
    res = cli("refine", scene, tmp_path / "out.tif", "--model", toy_model, "--vector", gpkg,
              "--overwrite")
    assert_refused(res, before, tmp_path, "the --vector file", "is the input")


def test_refine_coarse_is_the_output(tmp_path, toy_model, scene):
    coarse = class_map(tmp_path / "coarse.tif")
    before = digest(tmp_path)
    res = cli("refine", scene, coarse, "--model", toy_model, "--coarse", coarse, "--overwrite")
    assert_refused(res, before, tmp_path, "the output", "is the --coarse map")


def test_refine_distinct_outputs_still_work(tmp_path, toy_model, scene):
    res = cli("refine", scene, tmp_path / "out.tif", "--model", toy_model,
              "--probabilities", tmp_path / "p.tif", "--vector", tmp_path / "o.gpkg",
              "--quiet")
    assert res.exit_code == 0, res.output
    assert all((tmp_path / n).is_file() for n in ("out.tif", "p.tif", "o.gpkg"))


def test_library_refuses_too(tmp_path, toy_model, scene):
    from idgbr_geo.engine import refine_raster
    from idgbr_geo.errors import OutputError

    before = digest(tmp_path)
    with pytest.raises(OutputError, match="is the input"):
        refine_raster(scene, scene, model=toy_model, overwrite=True, quiet=True)
    assert digest(tmp_path) == before


# ----------------------------------------------------------------------------- vectorize


def test_vectorize_output_is_the_class_raster(tmp_path):
    classes = class_map(tmp_path / "classes.gpkg")  # a GeoTIFF, whatever its name
    before = digest(tmp_path)
    res = cli("vectorize", classes, classes, "--overwrite", "--quiet")
    assert_refused(res, before, tmp_path, "the output", "is the class raster")


def test_vectorize_output_is_a_hard_link_to_the_class_raster(tmp_path):
    classes = class_map(tmp_path / "classes.tif")
    out = tmp_path / "out.gpkg"
    os.link(classes, out)
    before = digest(tmp_path)
    res = cli("vectorize", classes, out, "--overwrite", "--quiet")
    assert_refused(res, before, tmp_path, "is the class raster")


def test_vectorize_output_is_the_probabilities(tmp_path):
    classes = class_map(tmp_path / "classes.tif")
    probs = class_map(tmp_path / "probs.gpkg", seed=1)
    before = digest(tmp_path)
    res = cli("vectorize", classes, probs, "--probabilities", probs, "--overwrite", "--quiet")
    assert_refused(res, before, tmp_path, "is the --probabilities raster")


# ----------------------------------------------------------------------------- preview


@pytest.fixture
def maps(tmp_path, scene):
    return dict(image=scene, refined=class_map(tmp_path / "refined.tif", 1),
                coarse=class_map(tmp_path / "coarse.tif", 2),
                truth=class_map(tmp_path / "truth.tif", 3))


@pytest.mark.parametrize("clash", ["image", "refined", "coarse", "truth"])
def test_preview_png_is_an_input(tmp_path, maps, clash):
    before = digest(tmp_path)
    res = cli("preview", maps["image"], maps[clash], "--refined", maps["refined"],
              "--coarse", maps["coarse"], "--truth", maps["truth"], "--overwrite")
    assert_refused(res, before, tmp_path, "the preview")


def test_preview_html_is_an_input(tmp_path, maps):
    link = tmp_path / "report.html"
    link.symlink_to(maps["refined"])
    before = digest(tmp_path)
    res = cli("preview", maps["image"], "--refined", maps["refined"], "--html", link,
              "--overwrite")
    assert_refused(res, before, tmp_path, "the HTML report", "is the --refined map")


def test_preview_png_and_html_in_one_file(tmp_path, maps):
    out = tmp_path / "out.png"
    before = digest(tmp_path)
    res = cli("preview", maps["image"], out, "--refined", maps["refined"], "--html", out)
    assert_refused(res, before, tmp_path, "the preview and the HTML report", "same file")
    assert not out.exists()


def test_preview_folder_report_over_a_scene(tmp_path):
    for sub in ("images", "refined"):
        (tmp_path / sub).mkdir()
    write_raster(tmp_path / "images" / "a.tif", class_blobs((40, 50), 0) * 100)
    class_map(tmp_path / "refined" / "a.tif", 1, (40, 50))
    before = digest(tmp_path)
    res = cli("preview", tmp_path / "images", "--refined", tmp_path / "refined",
              "--html", tmp_path / "refined" / "a.tif", "--overwrite")
    assert_refused(res, before, tmp_path, "the HTML report", "--refined map")


def test_preview_library_folder_report_over_a_scene(tmp_path):
    from idgbr_geo.errors import OutputError
    from idgbr_geo.preview import write_html_report

    for sub in ("images", "refined"):
        (tmp_path / sub).mkdir()
    write_raster(tmp_path / "images" / "a.tif", class_blobs((40, 50), 0) * 100)
    class_map(tmp_path / "refined" / "a.tif", 1, (40, 50))
    hard = tmp_path / "report.html"
    os.link(tmp_path / "images" / "a.tif", hard)
    before = digest(tmp_path)
    with pytest.raises(OutputError, match="is the input"):
        write_html_report(tmp_path / "images", hard, refined=tmp_path / "refined",
                          overwrite=True)
    assert digest(tmp_path) == before


# ----------------------------------------------------------------------------- evaluate


@pytest.mark.parametrize("clash", ["pred", "truth", "coarse"])
def test_evaluate_json_is_an_input(tmp_path, clash):
    paths = {name: class_map(tmp_path / f"{name}.tif", seed)
             for seed, name in enumerate(("pred", "truth", "coarse"))}
    before = digest(tmp_path)
    res = cli("evaluate", paths["pred"], paths["truth"], "--coarse", paths["coarse"],
              "-o", paths[clash], "--overwrite", "--quiet")
    assert_refused(res, before, tmp_path, "the --output file")


def test_evaluate_json_over_a_scene_of_a_folder(tmp_path):
    for sub in ("pred", "truth"):
        (tmp_path / sub).mkdir()
        class_map(tmp_path / sub / "a.tif", len(sub), (40, 50))
    before = digest(tmp_path)
    res = cli("evaluate", tmp_path / "pred", tmp_path / "truth", "-o",
              tmp_path / "truth" / "a.tif", "--overwrite", "--quiet")
    assert_refused(res, before, tmp_path, "the --output file", "truth scene")
    res = cli("evaluate", tmp_path / "pred", tmp_path / "truth", "-o",
              tmp_path / "pred" / "report.json", "--quiet")
    assert res.exit_code == 0, res.output  # a new file beside the scenes is fine


# ----------------------------------------------------------------------------- train


@pytest.mark.parametrize("spec", ["card", "folder"])
def test_train_refiner_export_over_its_coarse_model(tmp_path, spec):
    out = tmp_path / "run"
    card = conv_model(out, name="run")  # a coarse model exported into the run's folder
    before = digest(tmp_path)
    res = CliRunner().invoke(main, [
        "train", "refiner", "--coarse-model", str(card if spec == "card" else out),
        "--out", str(out), "--overwrite", "--quiet"])
    assert_refused(res, before, tmp_path, "the model card", "is the --coarse-model")


def test_train_refiner_checkpoint_over_its_coarse_checkpoint(tmp_path):
    out = tmp_path / "run"
    (out / "refiner").mkdir(parents=True)
    ckpt = out / "refiner" / "checkpoint.pt"
    ckpt.write_bytes(b"a coarse checkpoint from an earlier run")
    before = digest(tmp_path)
    res = CliRunner().invoke(main, [
        "train", "refiner", "--coarse-model", str(ckpt), "--out", str(out), "--overwrite",
        "--quiet"])
    assert_refused(res, before, tmp_path, "the checkpoint", "is the --coarse-model")

"""`idgbr-geo train prepare|coarse|refiner`: chips on disk, model cards, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import shapely
import torch
from click.testing import CliRunner
from synth import synthetic_scene, write_raster

from idgbr_geo.cli import main
from idgbr_geo.registry import load_model

RES = 0.5
ORIGIN = (500000.0, 4000000.0)


def labelled_scenes(folder: Path, n: int = 3, size: int = 96) -> tuple[Path, Path]:
    """n RGB scenes in EPSG:32633 with bright 'buildings' labelled 1."""
    img_dir, lab_dir = folder / "images", folder / "labels"
    img_dir.mkdir(parents=True)
    lab_dir.mkdir()
    for i in range(n):
        img = synthetic_scene(size, size, seed=i)
        label = (img.mean(0) > 120).astype(np.uint8)
        origin = (ORIGIN[0] + 1000 * i, ORIGIN[1])
        write_raster(img_dir / f"s{i}.tif", img, res=RES, origin=origin)
        write_raster(lab_dir / f"s{i}.tif", label, res=RES, origin=origin)
    return img_dir, lab_dir


def run(args: list[str]):
    return CliRunner().invoke(main, ["train", *args], catch_exceptions=False)


def test_prepare_splits_by_scene(tmp_path):
    img, lab = labelled_scenes(tmp_path)
    out = tmp_path / "data"
    r = run(["prepare", "--images", str(img), "--labels", str(lab), "--out", str(out),
             "--classes", "background,building", "--chip-size", "32", "--gsd", "1.0",
             "--val-fraction", "0.3", "--attribution", "synthetic test scenes"])
    assert r.exit_code == 0, r.output
    assert "train.npz: 8 chips from 2 scenes, GSD 1.000 m" in r.stdout
    with np.load(out / "train.npz") as tr, np.load(out / "val.npz") as va:
        assert set(tr.files) == {"images", "labels", "classes", "gsd", "source", "scene"}
        assert tr["images"].shape == (8, 3, 32, 32) and va["images"].shape == (4, 3, 32, 32)
        assert list(tr["classes"]) == ["background", "building"] and float(tr["gsd"]) == 1.0
        assert not set(tr["scene"]) & set(va["scene"])  # whole scenes held out
        assert "synthetic test scenes" in str(tr["source"])
    # existing outputs are not replaced without --overwrite
    again = run(["prepare", "--images", str(img), "--labels", str(lab), "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.stderr


def test_validation_scenes_resampled_to_the_training_gsd(tmp_path):
    img, lab = labelled_scenes(tmp_path / "t", n=1, size=64)  # 0.5 m
    vimg, vlab = tmp_path / "vi", tmp_path / "vl"
    vimg.mkdir()
    vlab.mkdir()
    write_raster(vimg / "v.tif", synthetic_scene(64, 64), res=0.25, origin=ORIGIN)
    write_raster(vlab / "v.tif", np.zeros((64, 64), np.uint8), res=0.25, origin=ORIGIN)
    r = run(["prepare", "--images", str(img), "--labels", str(lab), "--val-images", str(vimg),
             "--val-labels", str(vlab), "--chip-size", "16", "--out", str(tmp_path / "o"),
             "--quiet"])
    assert r.exit_code == 0, r.output
    with np.load(tmp_path / "o" / "train.npz") as tr, np.load(tmp_path / "o" / "val.npz") as va:
        assert float(va["gsd"]) == float(tr["gsd"]) == pytest.approx(0.5, rel=1e-3)
        assert tr["images"].shape[0] == 16 and va["images"].shape[0] == 4  # 32 x 32 px at 0.5 m


def test_nodata_masks_apply_to_validation_scenes_too(tmp_path):
    img, lab = labelled_scenes(tmp_path, n=2, size=32)
    nod = tmp_path / "nodata"
    nod.mkdir()
    for i in range(2):
        mask = np.zeros((32, 32), np.uint8)
        mask[:8] = 1
        write_raster(nod / f"s{i}.tif", mask, res=RES, origin=(ORIGIN[0] + 1000 * i, ORIGIN[1]))
    r = run(["prepare", "--images", str(img / "s0.tif"), "--labels", str(lab),
             "--val-images", str(img / "s1.tif"), "--val-labels", str(lab),
             "--nodata-masks", str(nod), "--chip-size", "32", "--out", str(tmp_path / "o"),
             "--quiet"])
    assert r.exit_code == 0, r.output
    for name in ("train", "val"):
        with np.load(tmp_path / "o" / f"{name}.npz") as z:
            assert np.all(z["labels"][0, :8] == 255) and np.all(z["labels"][0, 8:] != 255)


def test_prepare_image_groups_with_their_own_label_folders(tmp_path):
    img_a, lab_a = labelled_scenes(tmp_path / "a", n=1, size=64)
    img_b, lab_b = labelled_scenes(tmp_path / "b", n=1, size=64)  # same file names as in a
    lab_b.joinpath("s0.tif").unlink()
    write_raster(lab_b / "s0.tif", np.full((64, 64), 255, np.uint8), res=RES, origin=ORIGIN,
                 nodata=255)  # all nodata: its chips carry nothing to learn
    args = ["prepare", "--images", str(img_a), "--images", str(img_b), "--chip-size", "64",
            "--classes", "background,building", "--quiet"]
    r = run([*args, "--labels", str(lab_a), "--labels", str(lab_b), "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    with np.load(tmp_path / "o" / "train.npz") as z:
        assert z["images"].shape[0] == 1  # the all-nodata scene gave no chip
        assert str(lab_a) in str(z["source"]) and str(lab_b) in str(z["source"])
    r = run([*args, "--labels", str(lab_a), "--labels", str(lab_b), "--labels", str(lab_a),
             "--out", str(tmp_path / "p")])
    assert r.exit_code == 2 and "2 image sources but 3 label folders" in r.stderr
    # --min-labelled drops chips with too few labelled pixels
    lab_c = tmp_path / "c"
    lab_c.mkdir()
    half = np.full((64, 64), 255, np.uint8)
    half[:20] = 1
    write_raster(lab_c / "s0.tif", half, res=RES, origin=ORIGIN, nodata=255)
    for share, chips in ((0.25, 1), (0.5, 0)):
        r = run(["prepare", "--images", str(img_a), "--labels", str(lab_c), "--chip-size", "64",
                 "--min-labelled", str(share), "--out", str(tmp_path / f"m{share}"), "--quiet"])
        assert (r.exit_code == 0) == bool(chips), r.output
    assert "no training chips" in r.stderr


def test_prepare_from_vectors_and_torchgeo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative torchgeo root, see test_datasets
    img, _ = labelled_scenes(tmp_path, n=1)
    box = shapely.box(ORIGIN[0] + 10, ORIGIN[1] - 30, ORIGIN[0] + 20, ORIGIN[1] - 10)
    gdf = gpd.GeoDataFrame({"cls": ["building"]}, geometry=[box], crs="EPSG:32633")
    gdf.to_crs(4326).to_file(tmp_path / "b.gpkg")
    r = run(["prepare", "--images", str(img), "--vector-labels", str(tmp_path / "b.gpkg"),
             "--class-field", "cls", "--classes", "background,building", "--chip-size", "96",
             "--out", "vec", "--quiet"])
    assert r.exit_code == 0, r.output
    with np.load(tmp_path / "vec" / "train.npz") as z:
        assert int((z["labels"] == 1).sum()) == pytest.approx(20 * 40, abs=70)
    from test_datasets import fake_inria

    fake_inria(Path("inria"))
    r = run(["prepare", "--torchgeo", "InriaAerialImageLabeling", "--root", "inria",
             "--val-split", "val", "--chip-size", "48", "--classes", "background,building",
             "--out", "tg", "--quiet"])
    assert r.exit_code == 0, r.output
    with np.load(tmp_path / "tg" / "train.npz") as tr, np.load(tmp_path / "tg" / "val.npz") as va:
        assert set(tr["scene"]) == {"austin7", "vienna8"} and set(va["scene"]) == {"austin1"}


@pytest.mark.parametrize("args, message", [
    (["--images", "IMG"], "--labels (or --vector-labels) is required"),
    (["--images", "nowhere/*.tif", "--labels", "LAB"], "no rasters found"),
    (["--images", "nowhere", "--labels", "LAB"], "nowhere does not exist"),
    (["--images", "IMG", "--labels", "LAB", "--torchgeo", "LoveDA"], "either --images"),
    (["--images", "IMG", "--labels", "LAB", "--label-map", "1:2"], "bad --label-map"),
    (["--images", "IMG", "--labels", "LAB", "--classes", "a,b", "--ignore-class", "c"],
     "unknown class 'c'"),
    (["--images", "IMG/s0.tif", "--labels", "LAB", "--val-fraction", "0.5"],
     "at least two scenes"),
    (["--images", "IMG", "--labels", "LAB", "--chip-size", "4"], "at least 8"),
    (["--torchgeo", "NotADataset", "--root", "IMG"], "not a torchgeo dataset"),
])
def test_bad_inputs_give_one_line(tmp_path, args, message):
    img, lab = labelled_scenes(tmp_path, n=1, size=40)
    args = [a.replace("IMG", str(img)).replace("LAB", str(lab)) for a in args]
    r = run(["prepare", *args, "--out", str(tmp_path / "out"), "--quiet"])
    assert r.exit_code == 2
    assert r.stderr.startswith("Error: ") and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert not list(tmp_path.glob("out/*.npz")) and not list(tmp_path.glob("out/.*"))


def test_train_coarse_then_refiner(tmp_path):
    torch.set_num_threads(1)
    img, lab = labelled_scenes(tmp_path, n=2, size=64)
    out = tmp_path / "run"
    small = ["--iterations", "2", "--batch-size", "2", "--crop", "32", "--device", "cpu",
             "--config", '{"widths": [4, 8, 8, 8]}', "--quiet"]
    r = run(["coarse", "--images", str(img), "--labels", str(lab), "--classes",
             "background,building", "--chip-size", "64", "--val-fraction", "0.5",
             "--out", str(out), "--name", "tiny", *small])
    assert r.exit_code == 0, r.output
    card = json.loads((out / "tiny.json").read_text())
    assert card["classes"] == ["background", "building"]
    assert card["gsd"] == pytest.approx(RES / 0.9996, abs=1e-3)
    assert card["segmentor"]["arch"] and not card["refiner"]
    assert len(card["normalization"]["mean"]) == 3
    training = card["training"]
    command = training["commands"][-1]
    assert command.startswith("idgbr-geo train coarse --") and "--val-fraction" in command
    assert training["data"]["train"]["chips"] == 1 and training["data"]["val"]["chips"] == 1
    assert training["segmentor"]["iterations"] == 2 and training["segmentor"]["crop"] == 32
    assert card["segmentor"]["config"] == {"widths": [4, 8, 8, 8], "output_stride": 4}
    assert (out / "coarse" / "log.csv").is_file() and (out / "data" / "val.npz").is_file()
    # a second run must not silently replace the first
    again = run(["coarse", "--data", str(out / "data"), "--out", str(out), "--name", "tiny",
                 *small])
    assert again.exit_code == 2 and "already exists" in again.stderr
    # the refiner learns from the coarse model just exported, and embeds it
    ref_out = tmp_path / "ref"
    r = run(["refiner", "--data", str(out / "data"), "--coarse-model", str(out / "tiny.json"),
             "--out", str(ref_out), *small[:-3], "--config", '{"boundary_weight": 4}',
             "--precision", "bfloat16", "--quiet"])
    assert r.exit_code == 0, r.output
    card = json.loads((ref_out / "ref.json").read_text())
    assert card["segmentor"] and card["refiner"]
    assert card["training"]["refiner"]["boundary_weight"] == 4  # a loss option, on record
    assert "boundary_weight" not in card["refiner"]["config"]  # not an architecture setting
    assert card["training"]["data"]["coarse_model"]["kind"] == "idgbr"
    # the coarse model's provenance comes along: its command, then the refiner's
    assert [c.split()[2] for c in card["training"]["commands"]] == ["coarse", "refiner"]
    assert "--precision bfloat16" in card["training"]["commands"][-1]  # mixed precision
    model = load_model(ref_out / "ref.json", "cpu")
    coarse = load_model(out / "tiny.json", "cpu")
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(model.segmentor.predict(x), coarse.segmentor.predict(x))
    refined = model.refiner.refine(x, model.segmentor.predict(x), steps=1, seed=0,
                                   origins=[(0, 0)])
    assert refined.shape == (1, 2, 32, 32)


def test_train_coarse_from_a_model(tmp_path):
    """--init-model: a new run starts from another model's network and settings."""
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    img, lab = labelled_scenes(tmp_path, n=2, size=64)
    data = ["--images", str(img), "--labels", str(lab), "--classes", "background,building",
            "--chip-size", "64", "--val-fraction", "0.5"]
    small = ["--iterations", "2", "--batch-size", "2", "--crop", "32", "--device", "cpu",
             "--quiet"]
    first = tmp_path / "a"
    r = run(["coarse", *data, "--out", str(first), "--name", "a", *small,
             "--config", '{"widths": [4, 8, 8, 8]}'])
    assert r.exit_code == 0, r.output
    # no --config: the model's network settings; a tiny lr: its weights come through
    second = tmp_path / "b"
    r = run(["coarse", "--data", str(first / "data"), "--out", str(second), "--name", "b",
             *small, "--lr", "1e-12", "--init-model", str(first / "a.json")])
    assert r.exit_code == 0, r.output
    card_a = json.loads((first / "a.json").read_text())
    card_b = json.loads((second / "b.json").read_text())
    assert card_b["segmentor"] == card_a["segmentor"]
    wa, wb = load_file(str(first / "a.safetensors")), load_file(str(second / "b.safetensors"))
    learned = [k for k in wa if "running" not in k and "num_batches" not in k]
    assert learned and all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-6)
                           for k in learned)
    # a network of other settings cannot start from it: one line, no run
    r = run(["coarse", "--data", str(first / "data"), "--out", str(tmp_path / "c"), *small,
             "--init-model", str(first / "a.json"), "--config", '{"widths": [4, 8, 8, 16]}'])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert r.stderr.startswith("Error: the initial weights do not fit the network")
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "c" / "c.json").exists()
    # a model that does not exist: one line before any work (no output folder)
    r = run(["coarse", "--data", str(first / "data"), "--out", str(tmp_path / "d"), *small,
             "--init-model", str(tmp_path / "nosuch.json")])
    assert r.exit_code != 0 and r.stderr.startswith("Error:")
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "d").exists()
    # the model it starts from is an input: no output may replace it
    r = run(["coarse", "--data", str(first / "data"), "--out", str(first), "--name", "a",
             *small, "--overwrite", "--init-model", str(first / "a.json")])
    assert r.exit_code != 0 and "is the --init-model" in r.stderr


def test_refiner_with_torchgeo_checkpoint(tmp_path):
    from test_byo import make_task, save_ckpt

    torch.set_num_threads(1)
    img, lab = labelled_scenes(tmp_path, n=1, size=64)
    task = make_task(model="fcn", num_filters=4, num_classes=2)
    ckpt = save_ckpt(task, tmp_path / "tg.ckpt")
    r = run(["refiner", "--images", str(img), "--labels", str(lab), "--chip-size", "64",
             "--coarse-model", str(ckpt), "--iterations", "1", "--batch-size", "1",
             "--crop", "32", "--device", "cpu",
             "--out", str(tmp_path / "byo"), "--quiet"])
    assert r.exit_code == 0, r.output
    card = json.loads((tmp_path / "byo" / "byo.json").read_text())
    assert card["segmentor"]["arch"] == "torchgeo-segmentation"
    assert card["segmentor"]["config"]["model_normalization"]["std"] == [1.0, 1.0, 1.0]
    model = load_model(tmp_path / "byo" / "byo.json", "cpu")
    # the engine feeds card-normalised input; the torchgeo model sees value/255 as in training
    raw = np.random.default_rng(0).integers(0, 256, (3, 32, 32)).astype(np.uint8)
    x = torch.from_numpy(model.card.normalization.apply(raw, raw.dtype))[None]
    with torch.no_grad():
        expected = torch.softmax(task(torch.from_numpy(raw / 255.0).float()[None]), 1)
    torch.testing.assert_close(model.segmentor.predict(x), expected, atol=1e-5, rtol=1e-4)
    bad = run(["refiner", "--images", str(img), "--labels", str(lab), "--chip-size", "64",
               "--coarse-model", str(ckpt), "--coarse-mean", "0,0", "--out",
               str(tmp_path / "byo2"), "--quiet"])
    assert bad.exit_code == 2 and "one per band" in bad.stderr


@pytest.mark.parametrize("case", ["coarse-model", "resume-coarse", "resume-refiner"])
def test_a_crafted_checkpoint_never_runs_code(tmp_path, case):
    """`--coarse-model evil.pt` or a planted OUT/<stage>/checkpoint.pt with --resume: the
    pickle payload is refused with one line, before it can run."""
    from test_byo import evil_checkpoint

    img, lab = labelled_scenes(tmp_path, n=1, size=64)
    marker, out = tmp_path / "MARKER", tmp_path / "run"
    stage = "coarse" if case == "resume-coarse" else "refiner"
    args = [stage, "--images", str(img), "--labels", str(lab), "--chip-size", "64",
            "--iterations", "1", "--batch-size", "1", "--crop", "32", "--device", "cpu",
            "--out", str(out), "--quiet"]
    if case == "coarse-model":
        args += ["--coarse-model", str(evil_checkpoint(tmp_path / "evil.pt", marker))]
    else:
        (out / stage).mkdir(parents=True)
        evil_checkpoint(out / stage / "checkpoint.pt", marker, kind=stage)
        args.append("--resume")
    r = run(args)
    assert r.exit_code == 2 and not marker.exists()
    assert r.stderr.startswith("Error: ") and "could run code" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output


def test_torchscript_coarse_model_needs_trust_torchscript(tmp_path):
    torch.set_num_threads(1)
    img, lab = labelled_scenes(tmp_path, n=1, size=64)
    script = tmp_path / "net.pt"
    torch.jit.script(torch.nn.Conv2d(3, 2, 1)).save(str(script))
    args = ["refiner", "--images", str(img), "--labels", str(lab), "--chip-size", "64",
            "--coarse-model", str(script), "--iterations", "1", "--batch-size", "1",
            "--crop", "32", "--device", "cpu", "--config", json.dumps(
                {"c1": 4, "c2": 4, "c4": 8, "c8": 8, "ch": 8, "blocks": 1}), "--quiet"]
    r = run([*args, "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and "runs code stored in the file" in r.stderr
    assert "--trust-torchscript" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run([*args, "--out", str(tmp_path / "b"), "--trust-torchscript"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "b" / "b.json").read_text())["training"]["data"][
        "coarse_model"]["kind"] == "torchscript"


@pytest.mark.parametrize(("stage", "config", "message"), [
    ("coarse", '{"widht": [4, 8, 8, 8]}', "--config: unknown coarse setting 'widht'"),
    ("refiner", '{"boundary_wieght": 4}', "--config: unknown refiner setting 'boundary_wieght'"),
    ("refiner", '{"gate": 0.6}', "--config: unknown refiner setting 'gate'"),
    ("coarse", '{"lr": 0.1}', "'lr' has its own option (--lr)"),
    ("coarse", '{"arch": "unet"}', "--config: unknown coarse architecture 'unet'"),
    ("coarse", '{"arch": "lite-fpn", "widths": [4, 8, 8, 8]}',
     "--config: unknown coarse setting 'widths' (known for arch 'lite-fpn'"),
])
def test_unknown_config_keys_are_one_error_before_any_work(tmp_path, stage, config, message):
    img, lab = labelled_scenes(tmp_path, n=1, size=64)
    r = run([stage, "--images", str(img), "--labels", str(lab), "--chip-size", "64",
             "--out", str(tmp_path / "out"), "--config", config, "--quiet"])
    assert r.exit_code == 2 and message in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert not (tmp_path / "out").exists()  # no chips were cut

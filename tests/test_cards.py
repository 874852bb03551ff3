"""Model cards are checked when loaded: every bad field is one clear error naming the card;
version-1 cards are migrated to the current schema and give the same model."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from synth import conv_model

from idgbr_geo.cards import CARD_VERSION, ModelCard, Normalization, migrate_card
from idgbr_geo.cli import main
from idgbr_geo.config import SamplingConfig
from idgbr_geo.errors import UserError
from idgbr_geo.predict import predict_windows
from idgbr_geo.registry import load_model, models_dir

V1_BUILDINGS = Path(__file__).resolve().parent / "data" / "buildings_v1.json"
#: the same release's card as version 2 wrote it (the release before the lite models)
V2_BUILDINGS = Path(__file__).resolve().parent / "data" / "buildings_v2.json"


def _set(key, value):
    def edit(card, folder):
        card[key] = value
    return edit


def _norm(key, value):
    def edit(card, folder):
        card["normalization"][key] = value
    return edit


def _section(section, key, value):
    def edit(card, folder):
        card.setdefault(section, {})[key] = value
    return edit


def _pickle_weights(card, folder):
    """A torch pickle renamed to the card's .safetensors name."""
    torch.save({"segmentor.weight": torch.zeros(1)}, folder / card["weights"])


def _pt_weights(card, folder):
    torch.save(load_file(str(folder / card["weights"])), folder / "toy.pt")
    card["weights"] = "toy.pt"


def _outside(card, folder):
    """The weights moved next to the card's folder, named with '..'."""
    (folder / card["weights"]).rename(folder.parent / "elsewhere.safetensors")
    card["weights"] = "../elsewhere.safetensors"


def _no_gsd_but_without_crs(card, folder):
    card["gsd"], card["gsd_without_crs"] = None, 0.5


def _absolute(card, folder):
    card["weights"] = str((folder / card["weights"]).resolve())


def _missing_tensor(card, folder):
    path = folder / card["weights"]
    tensors = load_file(str(path))
    del tensors["segmentor.weight"]
    save_file(tensors, str(path))


BAD_CARDS = {  # edit of the toy card -> what the one error line must say
    "json list": (lambda card, folder: ["not", "a", "card"], "must be a JSON object"),
    "pickle weights": (_pickle_weights, "not a readable safetensors file"),
    "pt weights": (_pt_weights, "must be a .safetensors file"),
    "weights with ..": (_outside, "must be a file in the card's folder"),
    "absolute weights": (_absolute, "must be a file in the card's folder"),
    "missing tensor": (_missing_tensor, "cannot build the segmentor"),
    "stride 0": (_set("stride_multiple", 0), "'stride_multiple' must be a whole number >= 1"),
    "stride -8": (_set("stride_multiple", -8), "'stride_multiple' must be"),
    "tile 0": (_set("tile_size", 0), "'tile_size' must be a whole number >= 1"),
    "tile 96.5": (_set("tile_size", 96.5), "'tile_size' must be"),
    "overlap -16": (_set("overlap", -16), "'overlap' must be a whole number >= 0"),
    "steps -1": (_section("sampling", "steps", -1), "'steps' must be"),
    "steps 1.5": (_section("sampling", "steps", 1.5), "sampling 'steps' must be a whole"),
    "gate 1.5": (_section("sampling", "gate", 1.5), "'gate' must be a number in 0.0..1.0"),
    "gate per class": (_section("sampling", "gate", [0.5, 0.6, 0.7]), "or a list of 2 (one"),
    "sampling typo": (_section("sampling", "stesp", 2), "unknown setting 'stesp'"),
    "top-level typo": (_set("stpes", 2), "unknown field 'stpes'"),
    "steps at the top": (_set("steps", 2), "unknown field 'steps'"),
    "newer version": (_set("version", CARD_VERSION + 1), "update idgbr-geo"),
    "training typo": (_section("training", "comands", []), "'training' has unknown field"),
    "training setting": (_section("training", "refiner", {"p_coarse": 0.5}),
                         "training refiner unknown setting 'p_coarse'"),
    "training licences": (_section("training", "licences", ["CC-BY"]), "training 'licences'"),
    "bands 0": (_set("bands", 0), "'bands' must be"),
    "bad colour": (_set("colors", ["#000000", "red"]), "colour 'red' is not of the form"),
    "short colour": (_set("colors", ["#000000", "#12345"]), "colour '#12345'"),
    "colour count": (_set("colors", ["#000000"]), "1 colours for 2 classes"),
    "gsd -1": (_set("gsd", -1), "'gsd' must be a positive number"),
    "gsd 0": (_set("gsd", 0), "'gsd' must be a positive number"),
    "gsd inf": (_set("gsd", math.inf), "'gsd' must be a positive number"),
    "gsd nan": (_set("gsd", math.nan), "'gsd' must be a positive number"),
    "gsd text": (_set("gsd", "0.3"), "'gsd' must be a positive number"),
    "gsd_without_crs 0": (_set("gsd_without_crs", 0), "'gsd_without_crs' must be a positive"),
    "gsd_without_crs nan": (_set("gsd_without_crs", math.nan),
                            "'gsd_without_crs' must be a positive"),
    "gsd_without_crs far off": (_set("gsd_without_crs", 30.0), "must be within 8x of the"),
    "gsd_without_crs, no gsd": (_no_gsd_but_without_crs,
                                "'gsd_without_crs' needs the model's 'gsd'"),
    "no classes": (_set("classes", []), "'classes' must be a non-empty list"),
    "classes text": (_set("classes", "background,building"), "'classes' must be"),
    "same classes": (_set("classes", ["a", "a"]), "class names must be unique"),
    "no name": (lambda card, folder: {k: v for k, v in card.items() if k != "name"},
                "no 'name'"),
    "std 0": (_norm("std", [0.2, 0.0, 0.2]), "std must be > 0"),
    "std negative": (_norm("std", [0.2, -0.2, 0.2]), "std must be > 0"),
    "short mean": (_norm("mean", [0.3, 0.3]), "mean must be a list of 3 numbers"),
    "long std": (_norm("std", [0.2] * 4), "std must be a list of 3 numbers"),
    "nan mean": (_norm("mean", [0.3, math.nan, 0.3]), "mean must be a list of 3 numbers"),
    "value range 0": (_norm("value_range", {"uint8": 0}), "value_range must map"),
    "unknown norm field": (_norm("scale", 2), "unknown normalization field"),
    "band names": (_set("band_names", ["r", "g"]), "'band_names' must be a list of 3"),
    "refiner list": (_set("refiner", ["conv-refiner"]), "'refiner' must be a JSON object"),
    "segmentor without arch": (_set("segmentor", {"config": {}}), "'segmentor' has no 'arch'"),
}


def bad_card(tmp_path: Path, case: str) -> Path:
    """The toy model's card (and weights) in their own folder, edited as ``case`` says."""
    card_path = conv_model(tmp_path / "model")
    card = json.loads(card_path.read_text())
    edited = BAD_CARDS[case][0](card, card_path.parent)
    card_path.write_text(json.dumps(card if edited is None else edited))
    return card_path


@pytest.mark.parametrize("case", sorted(BAD_CARDS))
def test_bad_card_fails_to_load_with_one_line(tmp_path, case):
    card = bad_card(tmp_path, case)
    with pytest.raises(UserError) as err:
        load_model(card, "cpu")
    message = str(err.value)
    assert f"model card {card}" in message and BAD_CARDS[case][1] in message, message
    assert "\n" not in message


@pytest.mark.parametrize("case", ["json list", "pickle weights", "weights with ..", "stride 0",
                                  "bad colour", "gsd -1", "std 0", "short mean"])
def test_refine_with_a_bad_card_is_one_error_line(tmp_path, scene, case):
    card = bad_card(tmp_path, case)
    out = tmp_path / "out.tif"
    r = CliRunner().invoke(main, ["refine", str(scene), str(out), "-m", str(card), "--quiet"],
                           catch_exceptions=False)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: model card "), r.stderr
    assert BAD_CARDS[case][1] in lines[0] and "Traceback" not in r.output
    assert not out.exists()


@pytest.mark.parametrize("text", [b"{not json", b"\x80\x02binary", b"[[[[" * 100000])
def test_unreadable_card_text(tmp_path, text):
    path = tmp_path / "card.json"
    path.write_bytes(text)
    with pytest.raises(UserError, match=f"cannot read model card {path}"):
        ModelCard.load(path)


def test_good_cards_still_load(tmp_path):
    """The bundled cards and a card with every optional field left out pass the checks."""
    for path in sorted(models_dir().glob("*.json")):
        assert ModelCard.load(path).classes
    minimal = tmp_path / "m.json"
    minimal.write_text(json.dumps({"name": "m", "classes": ["a", "b"]}))
    card = ModelCard.load(minimal)
    assert card.normalization == Normalization() and card.colors and card.gsd is None


def _previous_weights(folder: Path) -> None:
    """Random weights of the architecture of the previous release's buildings card (its
    trained weights are no longer shipped): what the migration must load alike."""
    from idgbr_geo.config import CoarseConfig, RefinerConfig
    from idgbr_geo.networks import build_coarse_net, build_refiner_net

    card = json.loads(V2_BUILDINGS.read_text())
    torch.manual_seed(0)
    seg = build_coarse_net(CoarseConfig.from_dict(card["segmentor"]["config"], "test"))
    ref = build_refiner_net(RefinerConfig.from_dict(card["refiner"]["config"], "test"))
    save_file({**{f"segmentor.{k}": v for k, v in seg.state_dict().items()},
               **{f"refiner.{k}": v for k, v in ref.state_dict().items()}},
              str(folder / "buildings.safetensors"))


def _v1_model_folder(tmp_path: Path, edit=None) -> Path:
    """The previous release's version-1 buildings card (validation table left out) beside
    weights of its architecture."""
    data = json.loads(V1_BUILDINGS.read_text())
    if edit is not None:
        edit(data)
    folder = tmp_path / "v1"
    folder.mkdir()
    _previous_weights(folder)
    (folder / "buildings.json").write_text(json.dumps(data))
    return folder / "buildings.json"


def _v2_model_folder(tmp_path: Path) -> Path:
    """The same release's version-2 card beside the same weights."""
    folder = tmp_path / "v2"
    folder.mkdir()
    _previous_weights(folder)
    shutil.copy(V2_BUILDINGS, folder / "buildings.json")
    return folder / "buildings.json"


def test_version_1_card_migrates_and_gives_the_same_model(tmp_path):
    v1 = json.loads(V1_BUILDINGS.read_text())
    assert "version" not in v1 and v1["steps"] == 1 and "gate" in v1["refiner"]["config"]
    old = load_model(_v1_model_folder(tmp_path), "cpu")
    new = load_model(_v2_model_folder(tmp_path), "cpu")
    for key in ("classes", "normalization", "gsd", "tile_size", "overlap", "stride_multiple",
                "segmentor", "refiner", "sampling"):
        assert getattr(old.card, key) == getattr(new.card, key), key
    assert old.card.sampling == SamplingConfig(steps=1, gate=(0.6, 0.55))
    # training settings and provenance left the network config for the training record
    assert old.card.training.refiner["p_coarse_x0"] == 0.5
    assert old.card.training.commands == new.card.training.commands
    assert "p_coarse_x0" not in old.card.refiner["config"]
    # the same windows give the same probabilities, bit for bit
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, 128, 128, generator=g)
    a, na = predict_windows(old, image, origins=[(0, 0), (0, 128)])
    b, nb = predict_windows(new, image, origins=[(0, 0), (0, 128)])
    assert na == nb and torch.equal(a, b)


def test_migrated_card_saves_as_the_current_version(tmp_path):
    card = ModelCard.load(_v1_model_folder(tmp_path))
    card.save(tmp_path / "saved.json")
    data = json.loads((tmp_path / "saved.json").read_text())
    assert data["version"] == CARD_VERSION and "steps" not in data
    assert data["sampling"] == {"steps": 1, "gate": [0.6, 0.55]}
    assert migrate_card(data) == data  # a current card is left as it is
    assert ModelCard.load(tmp_path / "saved.json") == card


def test_version_1_defaults_are_kept(tmp_path):
    """What a version-1 card left out meant version 1's defaults (4 steps; the coarse net's
    widths 16, 32, 48, 64), which are not version 2's."""
    def drop(data):
        del data["steps"]
        del data["segmentor"]["config"]["widths"]
    data = json.loads(V1_BUILDINGS.read_text())
    drop(data)
    migrated = migrate_card(data)
    assert migrated["sampling"]["steps"] == 4
    assert migrated["segmentor"]["config"]["widths"] == [16, 32, 48, 64]
    assert SamplingConfig().steps == 1


@pytest.mark.parametrize(("key", "value", "message"), [
    ("start", "coarse", "start='coarse' is a research option"),
    ("band", 4, "band=4 is a research option"),
    ("x0", "hard", "x0='hard' is a research option"),
    ("stpes", 2, "unknown setting 'stpes'"),
])
def test_version_1_card_with_a_research_option_or_a_typo_is_refused(tmp_path, key, value,
                                                                      message):
    """Dropping a research option that is on (or a key no version knew) would silently
    change what the model does: one error line instead."""
    path = _v1_model_folder(tmp_path, lambda d: d["refiner"]["config"].update({key: value}))
    with pytest.raises(UserError, match=f"model card {path}: refiner 'config': {message}"):
        ModelCard.load(path)


def test_version_1_research_options_that_are_off_are_dropped(tmp_path):
    v1 = json.loads(V1_BUILDINGS.read_text())
    assert {"start", "t_start", "band"} <= set(v1["refiner"]["config"])
    card = ModelCard.load(_v1_model_folder(tmp_path))
    assert not {"start", "t_start", "band", "steps", "gate"} & set(card.refiner["config"])


def test_unknown_architecture_config_key_is_refused(tmp_path):
    path = _v1_model_folder(tmp_path)
    data = ModelCard.load(path).to_dict()
    data["refiner"]["config"]["chanels"] = 8
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match="refiner config: unknown setting 'chanels' "
                                        r"\(known: c1, c2"):
        load_model(path, "cpu")


def test_version_1_provenance_of_the_cli_moves_to_training(tmp_path):
    """Cards `idgbr-geo train` wrote before version 2 kept command, data summary, run
    settings and attribution in ``extra``."""
    card_path = conv_model(tmp_path / "model")
    data = json.loads(card_path.read_text())
    v1 = {k: v for k, v in data.items() if k not in ("version", "sampling", "training")}
    v1["steps"] = data["sampling"]["steps"]
    v1["extra"] = {"training": {"command": "idgbr-geo train coarse --out x", "stage": "coarse",
                                "data": {"train": {"chips": 3}}, "seed": 1, "iterations": 9,
                                "batch_size": 2, "lr": 0.01},
                   "attribution": "synthetic scenes", "note": "kept"}
    card_path.write_text(json.dumps(v1))
    card = ModelCard.load(card_path)
    assert card.training.commands == ["idgbr-geo train coarse --out x"]
    assert card.training.data == {"train": {"chips": 3}}
    assert card.training.segmentor == {"seed": 1, "iterations": 9, "batch_size": 2, "lr": 0.01}
    assert card.training.licences == {"data": "synthetic scenes"}
    assert card.extra == {"note": "kept"} and card.sampling.steps == v1["steps"]
    load_model(card_path, "cpu")  # the toy architectures' configs are left as they were


def test_architectures_named_in_the_environment_are_imported(tmp_path, monkeypatch):
    """How processes the caller starts (Dask workers, the CLI) find architectures registered
    outside the package, e.g. the tests' toy models."""
    from idgbr_geo.registry import ARCHITECTURES_ENV

    card_path = conv_model(tmp_path / "model")
    data = json.loads(card_path.read_text())
    data["segmentor"]["arch"] = "plugin-segmentor"
    card_path.write_text(json.dumps(data))
    (tmp_path / "my_plugin.py").write_text(
        "from idgbr_geo.registry import register_architecture\n"
        "from toy_models import ConvSegmentor\n"
        "@register_architecture('plugin-segmentor')\n"
        "def make(card, config, weights, device):\n"
        "    return ConvSegmentor(weights['weight'], weights.get('bias'))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(ARCHITECTURES_ENV, "no_such_plugin")
    with pytest.raises(UserError, match="IDGBR_GEO_ARCHITECTURES names 'no_such_plugin'"):
        load_model(card_path, "cpu")
    monkeypatch.setenv(ARCHITECTURES_ENV, " my_plugin ,")
    assert load_model(card_path, "cpu").segmentor.num_classes == 2

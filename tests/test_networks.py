"""The IDGBR networks behind the Segmentor / Refiner interfaces, and their registry round trip."""

from __future__ import annotations

import inspect

import pytest
import torch

from idgbr_geo import diffusion
from idgbr_geo.cards import ModelCard
from idgbr_geo.config import CoarseConfig, RefinerConfig, SamplingConfig
from idgbr_geo.errors import UserError
from idgbr_geo.interfaces import Model, Refiner, Segmentor
from idgbr_geo.networks import (
    CoarseNet,
    CoarseSegmentor,
    DiffusionRefiner,
    RefinerNet,
    build_coarse_net,
    build_refiner_net,
)
from idgbr_geo.predict import apply_gate, predict_windows
from idgbr_geo.registry import load_model, save_model


@pytest.mark.parametrize("stride", [4, 8, 16])
def test_coarse_net_predicts_full_resolution_probabilities(stride):
    torch.manual_seed(0)
    seg = CoarseSegmentor(CoarseNet(num_classes=3, output_stride=stride))
    probs = seg.predict(torch.randn(2, 3, 64, 96))
    assert probs.shape == (2, 3, 64, 96)
    assert torch.allclose(probs.sum(1), torch.ones(2, 64, 96), atol=1e-5)
    assert isinstance(seg, Segmentor)


def test_blurrier_stride_gives_smoother_maps():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 128, 128)
    fine, coarse = CoarseNet(output_stride=4).eval(), CoarseNet(output_stride=16).eval()
    coarse.load_state_dict(fine.state_dict())
    with torch.no_grad():
        tv = [float((m(x)[:, :, 1:] - m(x)[:, :, :-1]).abs().mean()) for m in (fine, coarse)]
    assert tv[1] < tv[0]


def test_guidance_injection_starts_at_zero():
    """Zero-initialised injection: an untrained denoiser ignores the guidance entirely."""
    torch.manual_seed(0)
    net = RefinerNet(num_classes=2).eval()
    x = torch.randn(1, 2, 16, 16)
    t = torch.full((1,), 0.5)
    with torch.no_grad():
        g = net.guide(torch.randn(1, 3, 64, 64), torch.rand(1, 2, 64, 64))[2]
        a, _ = net.denoiser(x, t, g)
        b, _ = net.denoiser(x, t, torch.randn_like(g) * 10)
        c, _ = net.denoiser(x, t, None)
    assert torch.equal(a, b) and torch.equal(a, c)
    with torch.no_grad():  # once the injection has weights, guidance matters
        net.denoiser.inject[0].weight.fill_(0.1)
        d, _ = net.denoiser(x, t, g)
    assert not torch.allclose(a, d)


def test_no_rough_refiner_ignores_the_coarse_map():
    torch.manual_seed(0)
    net = RefinerNet(num_classes=2, use_coarse=False)
    for p in net.parameters():  # make every path live
        torch.nn.init.normal_(p, std=0.1)
    ref = DiffusionRefiner(net)
    img = torch.randn(1, 3, 64, 64)
    a = ref.refine(img, torch.rand(1, 2, 64, 64), steps=2, seed=0, origins=[(0, 0)])
    b = ref.refine(img, torch.rand(1, 2, 64, 64), steps=2, seed=0, origins=[(0, 0)])
    assert torch.equal(a, b)


def _card(k: int = 2, **over) -> ModelCard:
    return ModelCard(name="tiny", classes=[f"c{i}" for i in range(k)], **over)


@pytest.mark.parametrize("k", [2, 5])
def test_registry_round_trip(tmp_path, k):
    torch.manual_seed(0)
    coarse = build_coarse_net(CoarseConfig(), num_classes=k)
    refiner = build_refiner_net(RefinerConfig(), num_classes=k)
    card = _card(k, segmentor={"arch": "idgbr-coarse", "config": {}},
                 refiner={"arch": "idgbr-refiner", "config": {}})
    tensors = {**{f"segmentor.{n}": v for n, v in coarse.state_dict().items()},
               **{f"refiner.{n}": v for n, v in refiner.state_dict().items()}}
    path = save_model(card, tensors, tmp_path)
    model = load_model(path, "cpu")
    assert isinstance(model.segmentor, Segmentor) and isinstance(model.refiner, Refiner)
    assert model.segmentor.num_classes == k and model.refiner.num_classes == k
    img = torch.randn(2, 3, 64, 64)
    probs = model.segmentor.predict(img)
    with torch.no_grad():
        expected = torch.softmax(coarse.eval()(img), 1)
    assert torch.allclose(probs, expected, atol=1e-5)
    out = model.refiner.refine(img, probs, steps=2, seed=3, origins=[(0, 0), (64, 0)])
    assert out.shape == (2, k, 64, 64)
    assert torch.allclose(out.sum(1), torch.ones(2, 64, 64), atol=1e-5)


def test_mismatched_weights_are_a_user_error(tmp_path):
    coarse = build_coarse_net(CoarseConfig(widths=(8, 16, 24, 32)), num_classes=2)
    card = _card(2, segmentor={"arch": "idgbr-coarse", "config": {}})
    path = save_model(card, {f"segmentor.{n}": v for n, v in coarse.state_dict().items()},
                      tmp_path)
    with pytest.raises(UserError, match="do not match"):
        load_model(path, "cpu")


def test_production_refiner_has_only_the_interface_arguments():
    """The research sampler options (start, t_start, guidance_scale, x0, average, band) and
    the per-call gate are gone from the production refiner and sampler."""
    assert list(inspect.signature(DiffusionRefiner.refine).parameters) == [
        "self", "image", "coarse", "steps", "seed", "origins"]
    assert list(inspect.signature(diffusion.sample).parameters) == [
        "net", "image", "coarse", "steps", "seed", "origins", "oneshot"]


def _gated(net: RefinerNet, image: torch.Tensor, coarse: torch.Tensor, card_gate=0.0,
           gate=None) -> torch.Tensor:
    """The refiner through the engine's inference, with the card's gate (or ``gate``)."""
    card = ModelCard(name="g", classes=[f"c{i}" for i in range(coarse.shape[1])],
                     sampling=SamplingConfig(steps=1, gate=card_gate))
    model = Model(card=card, segmentor=None, refiner=DiffusionRefiner(net))
    probs, refined = predict_windows(model, image, coarse=coarse, origins=[(0, 0)], seed=0,
                                     gate=gate, precision="float32")
    assert refined == 1
    return probs


@pytest.mark.parametrize("k", [2, 3])
def test_gate_lets_only_confident_refinements_overturn_the_coarse_class(k):
    torch.manual_seed(0)
    net = RefinerNet(num_classes=k)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    coarse = torch.softmax(4 * torch.randn(1, k, 48, 48), dim=1)
    image = torch.randn(1, 3, 48, 48)
    free = _gated(net, image, coarse)
    assert torch.equal(free, DiffusionRefiner(net).refine(image, coarse, steps=1, seed=0,
                                                          origins=[(0, 0)]))
    conf, cls = free.max(1)
    changed = cls != coarse.argmax(1)
    gate = round(float(conf[changed].median()), 6)  # half of the changes are weak, half strong
    gated = _gated(net, image, coarse, card_gate=gate)
    weak, strong = changed & (conf < gate), changed & (conf >= gate)
    assert weak.any() and strong.any()  # the test sees both cases
    # weak changes fall back to the coarse probabilities, strong ones and agreements stay
    assert torch.equal(gated.permute(0, 2, 3, 1)[weak], coarse.permute(0, 2, 3, 1)[weak])
    assert torch.equal(gated.permute(0, 2, 3, 1)[~weak], free.permute(0, 2, 3, 1)[~weak])
    # the card's gate is overridden per call
    assert torch.equal(_gated(net, image, coarse, card_gate=gate, gate=0.0), free)
    # per class: turning a pixel into class t needs more than certainty, into others nothing
    t = int(cls[changed].mode().values)
    per = _gated(net, image, coarse, gate=[1.01 if c == t else 0.0 for c in range(k)])
    to_t = changed & (cls == t)
    assert to_t.any() and (changed & (cls != t)).any()
    assert torch.equal(per.permute(0, 2, 3, 1)[to_t], coarse.permute(0, 2, 3, 1)[to_t])
    assert torch.equal(per.permute(0, 2, 3, 1)[~to_t], free.permute(0, 2, 3, 1)[~to_t])
    with pytest.raises(ValueError, match="thresholds for"):
        _gated(net, image, coarse, gate=[0.5])


@pytest.mark.parametrize("gates", [[0.6, 0.55], [0.0, 0.7], [0.5, 0.75]])
def test_two_class_gate_matches_the_arg_max_rule_ties_included(gates):
    """The element-wise two-class path must do what the arg-max rule does, ties included."""
    g = torch.Generator().manual_seed(0)
    p1 = torch.rand(3, 1, 40, 40, generator=g)
    p1[:, :, :5] = 0.5  # exact ties in the refined map
    c1 = torch.rand(3, 1, 40, 40, generator=g)
    c1[:, :, 3:8] = 0.5  # and in the coarse one
    refined, coarse = torch.cat([1 - p1, p1], 1), torch.cat([1 - c1, c1], 1)
    conf, cls = refined.max(dim=1, keepdim=True)
    need = torch.tensor(gates)[cls]
    keep = (cls != coarse.max(dim=1, keepdim=True).indices) & (conf < need)
    want = torch.where(keep, coarse, refined)
    assert torch.equal(apply_gate(refined, coarse, gates), want)
    assert keep.any() and (~keep).any()

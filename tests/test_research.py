"""Research code (release/research): the sampler with its experiment options equals the
production sampler when they are off, and runs through the engine's inference as a refiner."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from synth import refiner_net

from idgbr_geo import diffusion
from idgbr_geo.cards import ModelCard
from idgbr_geo.config import RefinerConfig
from idgbr_geo.interfaces import Model
from idgbr_geo.networks import DiffusionRefiner, RefinerNet
from idgbr_geo.predict import predict_windows

if str(Path(__file__).resolve().parent.parent / "release") not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent.parent / "release"))

from research.sampling import (  # noqa: E402
    ResearchRefiner,
    boundary_band,
    sample,
    timesteps,
)


@pytest.mark.parametrize("oneshot", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
def test_research_sampler_with_its_options_off_is_the_production_sampler(oneshot, steps):
    net = refiner_net(3)
    img, coarse = torch.randn(2, 3, 32, 48), torch.rand(2, 3, 32, 48)
    kw = dict(steps=steps, seed=4, origins=[(0, 0), (32, 48)], oneshot=oneshot)
    assert torch.equal(sample(net, img, coarse, **kw), diffusion.sample(net, img, coarse, **kw))


def test_research_refiner_with_its_options_off_is_the_production_refiner():
    base = DiffusionRefiner(refiner_net())
    img, coarse = torch.randn(1, 3, 32, 32), torch.rand(1, 2, 32, 32)
    kw = dict(steps=2, seed=0, origins=[(0, 0)])
    assert torch.equal(ResearchRefiner(base).refine(img, coarse, **kw),
                       base.refine(img, coarse, **kw))


def test_sampler_options_change_the_result_and_bad_ones_fail():
    net = refiner_net()
    img, coarse = torch.randn(1, 3, 32, 32), torch.rand(1, 2, 32, 32)
    kw = dict(steps=3, seed=0, origins=[(0, 0)])
    base = sample(net, img, coarse, **kw)
    for opt in ({"x0": "hard"}, {"average": True}, {"start": "coarse", "t_start": 0.5},
                {"guidance_scale": 2.0}):
        out = sample(net, img, coarse, **kw, **opt)
        assert out.shape == base.shape and not torch.allclose(out, base)
    with pytest.raises(ValueError):
        sample(net, img, coarse, **kw, x0="fuzzy")
    with pytest.raises(ValueError):
        sample(net, img, coarse, **kw, start="bogus")
    with pytest.raises(ValueError, match="unknown research option"):
        ResearchRefiner(DiffusionRefiner(net), gate=0.5)
    assert timesteps(4, 0.5) == [0.5, 0.375, 0.25, 0.125, 0.0]


def test_boundary_band_limits_refiner_changes_to_coarse_boundaries():
    probs = torch.zeros(1, 2, 64, 64)
    probs[:, 0] = 1
    probs[:, :, 16:48, 16:48] = torch.tensor([0.0, 1.0])[:, None, None]
    band = boundary_band(probs, 4)
    assert band[0, 0, 16, 30] == 1 and band[0, 0, 2, 2] == 0 and band[0, 0, 32, 32] == 0
    torch.manual_seed(0)
    net = RefinerNet(num_classes=2)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    ref = ResearchRefiner(DiffusionRefiner(net), band=4)
    out = ref.refine(torch.randn(1, 3, 64, 64), probs, steps=1, seed=0, origins=[(0, 0)])
    assert torch.equal(out[0, :, 2, 2], probs[0, :, 2, 2])
    assert not torch.equal(out[0, :, 16, 30], probs[0, :, 16, 30])


def test_a_research_refiner_runs_through_the_engines_inference():
    net = refiner_net()
    card = ModelCard(name="r", classes=["a", "b"])
    research = ResearchRefiner(DiffusionRefiner(net, RefinerConfig()), start="coarse",
                               t_start=0.5)
    img, coarse = torch.randn(1, 3, 32, 32), torch.softmax(torch.randn(1, 2, 32, 32), 1)
    probs, n = predict_windows(Model(card=card, segmentor=None, refiner=research), img,
                               coarse=coarse, origins=[(0, 0)], steps=2, precision="float32")
    want = torch.softmax(sample(net, img, coarse, steps=2, seed=0, origins=[(0, 0)],
                                start="coarse", t_start=0.5), 1)
    assert n == 1 and torch.equal(probs, want)


class _Recorder:
    """A segmentor that records its inputs; class 1 is the sigmoid of the first band plus a
    left-to-right ramp (so that a flipped view differs)."""

    num_classes = 2

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def predict(self, image: torch.Tensor) -> torch.Tensor:
        self.seen.append(image)
        p = torch.sigmoid(image[:, :1] + torch.linspace(-2, 2, image.shape[-1]))
        return torch.cat([1 - p, p], 1)


@pytest.mark.parametrize("mode", ["flip", "flip+scale2", "multiscale", "scale1.5"])
def test_tta_averages_all_its_views(mode):
    from research.tta import MODES, TTASegmentor

    from idgbr_geo.views import multiscale_probabilities

    image = torch.randn(1, 3, 64, 96)
    base = _Recorder()
    got = TTASegmentor(base, mode).predict(image)
    assert any(torch.equal(seen, image) for seen in base.seen)
    flip, zooms = MODES[mode]
    scaled = multiscale_probabilities(_Recorder(), image, zooms, confident=math.inf)
    views = 1 + len(zooms) + int(flip)
    assert len(base.seen) == views
    want = scaled
    if flip:
        flipped = _Recorder().predict(image.flip(-1)).flip(-1)
        want = (flipped + (views - 1) * scaled) / views
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, _Recorder().predict(image))


def test_band_probe_takes_the_refiner_only_near_the_coarse_boundary():
    from research.band_probe import banded

    coarse = torch.zeros(1, 2, 9, 9)
    coarse[:, 0, :, :5], coarse[:, 1, :, 5:] = 1.0, 1.0  # class 0 | class 1 at column 5
    refined = torch.full_like(coarse, 0.5)
    out = banded(refined, coarse, 1)
    near = torch.zeros(9, 9, dtype=torch.bool)
    near[:, 4:6] = True
    assert torch.equal(out[0, :, near], refined[0, :, near])
    assert torch.equal(out[0, :, ~near], coarse[0, :, ~near])


def test_scene_errors_tell_a_too_wide_map_from_missed_objects():
    import numpy as np
    from research.scene_errors import counts, describe

    label = np.zeros((20, 20), np.uint8)
    label[5:11, 5:11] = 1
    label[0, :] = 255  # ignored
    wide = np.zeros_like(label)
    wide[4:12, 4:12] = 1  # the square drawn one pixel too wide on every side
    got = counts(wide, label, 1)
    assert got["as is"].tolist() == [36, 64, 36]
    assert got["eroded 1 px"].tolist() == [36, 36, 36]  # thinner by a pixel: exact
    assert got["dilated 1 px"][1] == 100 - 4  # (a cross: the corners stay out)
    assert describe(got["eroded 1 px"]).startswith("IoU 100.0 precision 100.0 recall 100.0")
    label[14:20, 14:20] = 1  # a second object ...
    found = (label == 1).astype(np.uint8)
    found[14:20, 14:20] = 0  # ... missed whole: neither variant gets nearer
    got = counts(found, label, 1)
    iou = {v: c[0] / (c[1] + c[2] - c[0]) for v, c in got.items()}
    assert iou["as is"] == 0.5
    assert iou["eroded 1 px"] < 0.5 and iou["dilated 1 px"] < 0.5


def test_an_ensemble_checkpoint_holds_every_member_under_its_own_names(square_chips,
                                                                        tmp_path, imagenet):
    from research.ensemble import join

    from idgbr_geo.training import train_coarse

    kw = dict(batch_size=2, crop=32, progress=False, device="cpu", iterations=1)
    a, b, wide = (train_coarse(square_chips, tmp_path / name, seed=seed,
                               config={"arch": "lite-fpn", "channels": ch}, **kw)
                  for name, seed, ch in (("a", 0, 8), ("b", 1, 8), ("wide", 0, 16)))
    out = join(a, [b], tmp_path / "ens.pt")
    state, first, other = (torch.load(p, weights_only=True) for p in (out, a, b))
    assert state["config"]["members"] == 2 and "optimizer" not in state
    assert set(state["model"]) == set(first["model"]) | {f"others.0.{k}"
                                                          for k in other["model"]}
    for k, v in other["model"].items():
        assert torch.equal(state["model"][f"others.0.{k}"], v)
    for k, v in first["model"].items():  # the first member keeps its names (its encoder
        assert torch.equal(state["model"][k], v)  # is the one a refiner shares)
    with pytest.raises(SystemExit, match="another network shape"):
        join(a, [wide], tmp_path / "x.pt")
    with pytest.raises(SystemExit, match="not a single lite-fpn"):
        join(a, [out], tmp_path / "x.pt")
    with pytest.raises(SystemExit, match="not a single lite-fpn"):
        join(out, [b], tmp_path / "x.pt")  # (its members would be miscounted)


def test_scale_rules_pool_the_candidates_each_rule_picks():
    from research.scale_rules import RULES, pooled

    def cand(conf, entropy, agree, inter, union):
        return {"conf": conf, "entropy": entropy, "agree": agree, "inter": inter,
                "union": union}

    rows = [{"cands": {"0.25": cand(0.9, 0.3, 0.5, 10, 20), "0.3": cand(0.8, 0.1, 0.9, 30, 40)}},
            {"cands": {"0.25": cand(0.7, 0.2, 0.8, 5, 10), "0.3": cand(0.6, 0.4, 0.7, 0, 10)}}]
    assert [RULES["conf (engine)"](r["cands"]) for r in rows] == ["0.25", "0.25"]
    assert [RULES["entropy"](r["cands"]) for r in rows] == ["0.3", "0.25"]
    assert [RULES["agree"](r["cands"]) for r in rows] == ["0.3", "0.25"]
    assert pooled(rows, ["0.25", "0.25"]) == pytest.approx(100 * 15 / 30)  # pixels, not means
    assert pooled(rows, ["0.3", "0.25"]) == pytest.approx(100 * 35 / 50)


def test_object_sizes_measure_areas_and_centre_line_widths():
    import numpy as np
    from research.gsd_estimates import object_sizes

    mask = np.zeros((60, 60), bool)
    mask[10:20, 10:20] = True  # 10 x 10 px at 0.5 m: 25 m2
    mask[40, 40] = True  # 0.25 m2: below MIN_AREA, noise
    assert object_sizes(mask, 0.5, "buildings") == [25.0]
    road = np.zeros((60, 60), bool)
    road[:, 20:26] = True  # a road 6 px wide, 6 m at 1 m; 5 px would read 6 (within a
    assert np.median(object_sizes(road, 1.0, "roads")) == 6.0  # pixel, as in the labels)
    road[:, 25] = False
    assert np.median(object_sizes(road, 1.0, "roads")) == 6.0


def test_image_shifts_change_pixels_as_named_and_repeat_exactly():
    import numpy as np
    from research.image_shifts import SHIFTS, shift_image

    rng = np.random.default_rng(1)
    img = rng.integers(20, 236, (3, 48, 40)).astype(np.uint8)
    img[:, 10:30, 5:25] = np.array([200, 60, 40])[:, None, None]  # a red roof, for blur and JPEG
    for name in SHIFTS:
        out = shift_image(name, img)
        assert out.shape == img.shape and not np.array_equal(out.astype(int), img.astype(int))
        assert np.array_equal(out, shift_image(name, img)), name
        assert out.dtype == (np.uint16 if name == "uint16" else np.uint8)
    assert np.array_equal(shift_image("grey+cast", img),
                          shift_image("cast", shift_image("grey", img)))
    grey = shift_image("grey", img)
    assert np.array_equal(grey[0], grey[1]) and np.array_equal(grey[1], grey[2])
    assert shift_image("haze0.4", img).min() >= int(0.4 * 0.8 * 255)
    assert shift_image("gamma1.8", img).mean() < img.mean()
    assert np.abs(np.diff(shift_image("blur2", img).astype(int), axis=2)).mean() < \
        np.abs(np.diff(img.astype(int), axis=2)).mean() / 2
    assert shift_image("uint16", img).max() == int(img.max()) * 16 + 8 <= 4095
    c = shift_image("cast", img).astype(float)
    assert c[0].mean() > img[0].mean() and c[2].mean() < img[2].mean()
    luma = np.tensordot([0.299, 0.587, 0.114], shift_image("gamma1.8+autogamma", img), axes=1)
    assert abs(luma.mean() / 255 - 0.42) < 0.03  # a dark scene brought back to the target
    with pytest.raises(ValueError, match="unknown image shift 'fog'"):
        shift_image("grey+fog", img)


def test_small_parts_drops_specks_and_fills_pinholes_but_keeps_larger_ones():
    import numpy as np
    from research.small_parts import drop_small, fill_small, variants

    mask = np.zeros((30, 30), bool)
    mask[2:12, 2:12] = True  # 100 px
    mask[5, 5] = False  # a 1 px hole
    mask[20, 20] = mask[21, 21] = True  # 2 px, joined only diagonally (8-connected)
    mask[25:28, 25:28] = True  # 9 px
    assert drop_small(mask, 3).sum() == 99 + 9  # the diagonal pair goes
    assert drop_small(mask, 10).sum() == 99
    assert fill_small(mask, 2).sum() == mask.sum() + 1
    assert fill_small(mask, 1).sum() == mask.sum()  # the hole is not under 1 px
    got = variants(mask, 0.25, [1.0])  # 1 m2 = 4 px at 0.5 m
    assert got["drop < 1 m2"].sum() == 99 + 9
    assert got["drop+fill < 1 m2"].sum() == 100 + 9
    assert np.array_equal(got["as is"], mask)

"""The working GSD per scene (idgbr_geo.scale): the candidate whose coarse map is most
confident on sample windows, and the engine running exactly as at that GSD."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F  # noqa: N812
from click.testing import CliRunner
from synth import conv_model, synthetic_scene, write_raster

from idgbr_geo.cards import ModelCard
from idgbr_geo.cli import main
from idgbr_geo.engine import refine_raster
from idgbr_geo.errors import UserError
from idgbr_geo.interfaces import Model
from idgbr_geo.options import RunOptions
from idgbr_geo.registry import load_model
from idgbr_geo.scale import choose_working_gsd
from idgbr_geo.tiling import open_source, resampling_factor

CHOICES = [0.2, 0.3, 0.45]


class Sharpness:
    """A segmentor whose confidence follows the image's local gradient: on a smooth scene
    the gradient per model pixel grows with the working GSD, so it is most confident at the
    coarsest; ``invert`` turns that round."""

    num_classes = 2

    def __init__(self, invert: bool = False) -> None:
        self.invert = invert

    def predict(self, image: torch.Tensor) -> torch.Tensor:
        grad = (image[:, :, 1:, 1:] - image[:, :, :-1, :-1]).abs().mean(1, keepdim=True)
        grad = F.pad(grad, (0, 1, 0, 1))
        p = torch.sigmoid(1 - grad if self.invert else grad)  # above 0.5: class 1
        return torch.cat([1 - p, p], 1)


def _smooth_scene(h: int, w: int, seed: int) -> np.ndarray:
    from scipy import ndimage

    r = ndimage.gaussian_filter(np.random.default_rng(seed).random((3, h, w)), (0, 10, 10))
    r = (r - r.min()) / (r.max() - r.min())
    return (r * 255).astype(np.uint8)


def _source(path, card):
    return open_source(path, model_bands=card.bands, bands=None, model_gsd=card.gsd,
                       normalization=card.normalization)


def test_the_most_confident_candidate_wins(tmp_path):
    card = ModelCard(name="s", classes=["a", "b"], gsd=0.3, gsd_choices=CHOICES,
                     tile_size=64, overlap=8)
    path = write_raster(tmp_path / "in.tif", _smooth_scene(150, 170, seed=1), res=0.3)
    for invert, want in ((False, 0.45), (True, 0.2)):
        src = _source(path, card)
        model = Model(card=card, segmentor=Sharpness(invert), refiner=None)
        choice = choose_working_gsd(src, model, CHOICES, tile_size=64, overlap=8)
        assert choice is not None and choice.gsd == want
        assert list(choice.confidence) == CHOICES
        assert max(choice.confidence.values()) == choice.confidence[want]
        assert choice.factor == pytest.approx(want / src.gsd)
        assert src.factor == 1.0  # the probe leaves the source as it was
        assert f"model at {want:g} m" in choice.describe()
        src.ds.close()


class Counting(Sharpness):
    """Sharpness that counts the windows it is shown."""

    def __init__(self) -> None:
        super().__init__()
        self.windows = 0

    def predict(self, image: torch.Tensor) -> torch.Tensor:
        self.windows += len(image)
        return super().predict(image)


def test_a_larger_scene_samples_more_windows_up_to_a_cap(tmp_path):
    from idgbr_geo.scale import MAX_SAMPLES, SAMPLES, sample_count
    from idgbr_geo.tiling import plan_tiles

    assert [sample_count(n) for n in (1, 6, 9, 24, 40, 96, 500)] == [1, 6, 6, 6, 10, 24, 24]
    assert sample_count(10**6) == MAX_SAMPLES and sample_count(SAMPLES) == SAMPLES
    card = ModelCard(name="s", classes=["a", "b"], gsd=0.3, gsd_choices=CHOICES,
                     tile_size=64, overlap=8)
    src = _source(write_raster(tmp_path / "in.tif", _smooth_scene(400, 360, seed=7), res=0.3),
                  card)
    seg = Counting()
    choose_working_gsd(src, Model(card, seg, None), CHOICES, tile_size=64, overlap=8)
    tiles = [len(plan_tiles(src.width, src.height, tile_size=64, overlap=8, factor=g / 0.3,
                            multiple=card.stride_multiple)) for g in CHOICES]
    assert max(tiles) > 4 * SAMPLES  # (a scene large enough to sample more than 6)
    assert seg.windows == sum(sample_count(n) for n in tiles) > len(CHOICES) * SAMPLES
    seg.windows = 0
    choose_working_gsd(src, Model(card, seg, None), CHOICES, tile_size=64, overlap=8,
                       samples=2)
    assert seg.windows == 2 * len(CHOICES)
    src.ds.close()


def test_nothing_to_choose_without_a_gsd_or_a_segmentor(tmp_path):
    card = ModelCard(name="s", classes=["a", "b"], gsd=0.3, gsd_choices=CHOICES)
    data = synthetic_scene(64, 64, seed=2)
    nocrs = write_raster(tmp_path / "nocrs.tif", data, crs=None)
    with pytest.warns(UserWarning):
        src = _source(nocrs, card)
    assert src.gsd is None
    assert choose_working_gsd(src, Model(card, Sharpness(), None), CHOICES,
                              tile_size=64, overlap=8) is None
    src = _source(write_raster(tmp_path / "geo.tif", data, res=0.3), card)
    assert choose_working_gsd(src, Model(card, None, None), CHOICES,
                              tile_size=64, overlap=8) is None
    # candidates beyond the engine's resampling limit (16x) are not tried
    assert resampling_factor(src.gsd, 0.3 * 20) is None
    assert resampling_factor(src.gsd, 0.3) == 1.0
    assert choose_working_gsd(src, Model(card, Sharpness(), None), [0.3, 6.0],
                              tile_size=64, overlap=8) is None


def test_the_engine_runs_as_a_card_of_the_chosen_gsd(tmp_path):
    """Searching and then running is exactly running a card whose GSD is the choice."""
    data = synthetic_scene(160, 200, seed=3)
    src = write_raster(tmp_path / "in.tif", data, res=0.3)
    searching = conv_model(tmp_path / "m", gsd=0.3, gsd_choices=CHOICES)
    summary = refine_raster(src, tmp_path / "a.tif", model=searching, quiet=True,
                            options=RunOptions(device="cpu", precision="float32"))
    assert summary.scale is not None and summary.scale.gsd in CHOICES
    assert "model at" in summary.line()
    chosen = summary.scale.gsd
    fixed = conv_model(tmp_path / "f", gsd=chosen)
    refine_raster(src, tmp_path / "b.tif", model=fixed, quiet=True,
                  options=RunOptions(device="cpu", precision="float32"))
    with rasterio.open(tmp_path / "a.tif") as a, rasterio.open(tmp_path / "b.tif") as b:
        np.testing.assert_array_equal(a.read(), b.read())
        assert a.tags()["IDGBR_WORKING_GSD"] == f"{chosen:g}"


def test_no_search_when_switched_off_or_refining_a_users_map(tmp_path):
    data = synthetic_scene(96, 96, seed=4)
    src = write_raster(tmp_path / "in.tif", data, res=0.3)
    model = load_model(conv_model(tmp_path / "m", gsd=0.3, gsd_choices=CHOICES), "cpu")
    off = refine_raster(src, tmp_path / "off.tif", model=model, quiet=True,
                        options=RunOptions(device="cpu", gsd_search=False))
    assert off.scale is None and "model at" not in off.line()
    with rasterio.open(tmp_path / "off.tif") as ds:
        assert ds.tags()["IDGBR_WORKING_GSD"] == "0.3"
    user = write_raster(tmp_path / "map.tif", (data[0] > 128).astype(np.uint8), res=0.3)
    given = refine_raster(src, tmp_path / "u.tif", model=model, coarse=user, quiet=True,
                          options=RunOptions(device="cpu"))
    assert given.scale is None
    with pytest.raises(UserError, match="gsd_search must be True or False"):
        RunOptions(gsd_search="no")


def test_cli_reports_the_choice_and_can_switch_it_off(tmp_path):
    src = write_raster(tmp_path / "in.tif", synthetic_scene(96, 96, seed=5), res=0.3)
    card = conv_model(tmp_path / "m", gsd=0.3, gsd_choices=CHOICES)
    on = CliRunner().invoke(main, ["refine", str(src), str(tmp_path / "a.tif"), "-m",
                                   str(card)])
    assert on.exit_code == 0, on.output
    assert "model at" in on.output
    off = CliRunner().invoke(main, ["refine", str(src), str(tmp_path / "b.tif"), "-m",
                                    str(card), "--no-gsd-search"])
    assert off.exit_code == 0, off.output
    assert "model at" not in off.output


@pytest.mark.parametrize(("choices", "message"), [
    ([0.3], "two or more"),
    ([0.3, 2.0], "within 4x"),
    ([0.3, "x"], "working GSDs"),
    ("0.3", "must be a list"),
])
def test_cards_check_their_gsd_choices(tmp_path, choices, message):
    data = json.loads(conv_model(tmp_path / "m").read_text())
    data["gsd_choices"] = choices
    with pytest.raises(UserError, match="'gsd_choices' must be a list"):
        ModelCard.from_dict(data)
    del data["gsd"]
    data["gsd_choices"] = [0.3, 0.4]
    with pytest.raises(UserError, match="'gsd_choices' needs the model's 'gsd'"):
        ModelCard.from_dict(data)


def test_fine_choices_only_for_inputs_at_least_as_fine(tmp_path):
    card = ModelCard(name="s", classes=["a", "b"], gsd=0.3, gsd_choices=[0.3, 0.45],
                     fine_gsd_choices=[0.2])
    assert card.working_gsd_choices(0.066) == [0.2, 0.3, 0.45]
    assert card.working_gsd_choices(0.2) == [0.2, 0.3, 0.45]
    assert card.working_gsd_choices(0.25) == [0.3, 0.45]  # (0.2 would upsample it)
    assert card.working_gsd_choices(None) == [0.3, 0.45]
    path = conv_model(tmp_path / "m", gsd=0.3, gsd_choices=[0.3, 0.45])
    data = json.loads(path.read_text())
    data["fine_gsd_choices"] = [0.2]
    path.write_text(json.dumps(data))
    model = load_model(path, "cpu")
    scene = synthetic_scene(160, 160, seed=6)
    tried = {}
    for res in (0.15, 0.3):
        src = write_raster(tmp_path / f"in{res}.tif", scene, res=res)
        summary = refine_raster(src, tmp_path / f"out{res}.tif", model=model, quiet=True,
                                options=RunOptions(device="cpu", precision="float32"))
        assert summary.scale is not None
        tried[res] = list(summary.scale.confidence)
    assert tried == {0.15: [0.2, 0.3, 0.45], 0.3: [0.3, 0.45]}


@pytest.mark.parametrize(("fine", "message"), [
    ([0.3], "finer than every one"),
    ([0.05], "within 4x"),
    (0.2, "must be a list"),
    ([], "must be a list"),
])
def test_cards_check_their_fine_gsd_choices(tmp_path, fine, message):
    data = json.loads(conv_model(tmp_path / "m", gsd_choices=[0.3, 0.45]).read_text())
    data["fine_gsd_choices"] = fine
    with pytest.raises(UserError, match=message):
        ModelCard.from_dict(data)
    data["fine_gsd_choices"] = [0.2]
    assert ModelCard.from_dict(data).fine_gsd_choices == [0.2]
    del data["gsd_choices"]
    with pytest.raises(UserError, match="'fine_gsd_choices' needs 'gsd_choices'"):
        ModelCard.from_dict(data)


# -- the GSD of an input without a CRS, estimated from the width of its roads ---------------

ROAD_CARD = {"class": "road", "width": 6.0}


class Bright:
    """A segmentor that marks the bright pixels (above half the value range) as roads."""

    num_classes = 2

    def predict(self, image: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(20 * (image.mean(1, keepdim=True) - 0.5))
        return torch.cat([1 - p, p], 1)


def _road_grid(size: int, width: int, spacing: int = 80) -> np.ndarray:
    """Dark ground crossed by bright roads ``width`` pixels wide every ``spacing`` pixels."""
    img = np.full((3, size, size), 20, np.uint8)
    for start in range(spacing // 2, size - width, spacing):
        img[:, start:start + width, :] = 230
        img[:, :, start:start + width] = 230
    return img


def _road_card(**kw) -> ModelCard:
    return ModelCard(name="r", classes=["background", "road"], gsd=0.5, gsd_without_crs=0.5,
                     gsd_from_width=ROAD_CARD, tile_size=128, overlap=16, **kw)


@pytest.mark.parametrize(("width", "expected"), [(24, 0.25), (12, 0.5), (6, 1.0)])
def test_the_estimate_makes_the_roads_as_wide_as_in_training(tmp_path, width, expected):
    """Roads 24 px wide are 6 m wide at 0.25 m: the estimate lands there from the card's
    0.5 m (within the one pixel a centre-line width measure adds), in both directions."""
    from idgbr_geo.scale import estimate_gsd

    card = _road_card()
    path = write_raster(tmp_path / "in.tif", _road_grid(480, width), crs=None)
    with pytest.warns(UserWarning, match="estimating it from the image"):
        src = open_source(path, model_bands=3, bands=None, model_gsd=card.gsd,
                          gsd_without_crs=card.gsd_without_crs,
                          normalization=card.normalization, gsd_estimated=True)
    assert src.gsd_assumed and src.gsd == 0.5
    est = estimate_gsd(src, Model(card, Bright(), None), src.gsd, tile_size=128, overlap=16)
    assert est is not None and est.class_name == "road" and est.width == 6.0
    assert est.gsd == pytest.approx(expected, rel=0.15)
    assert src.factor == 1.0 and src.gsd == 0.5  # (estimate_gsd only probes)
    src.ds.close()


def test_the_engine_runs_an_input_without_a_crs_at_the_estimate(tmp_path):
    card = _road_card()
    model = Model(card, Bright(), None)
    nocrs = write_raster(tmp_path / "nocrs.tif", _road_grid(480, 24), crs=None)
    asked = RunOptions(device="cpu", coarse_only=True, estimate_gsd=True)
    with pytest.warns(UserWarning) as record:
        summary = refine_raster(nocrs, tmp_path / "a.tif", model=model, quiet=True,
                                options=asked)
    said = [str(w.message) for w in record]
    assert len(said) == 2 and "estimating it from the image" in said[0]
    assert "GSD estimated at 0.2" in said[1]
    assert summary.gsd_estimate is not None
    assert summary.gsd_estimate.gsd == pytest.approx(0.25, rel=0.15)
    assert "GSD estimated at" in summary.line()
    with rasterio.open(tmp_path / "a.tif") as ds:
        assert ds.shape == (480, 480) and ds.crs is None
        assert ds.read(1).mean() == pytest.approx((_road_grid(480, 24)[0] > 100).mean(),
                                                  abs=0.02)
    # not asked for, a given GSD or a CRS: nothing estimated
    with pytest.warns(UserWarning, match="assuming the model's default for images without a "
                                         "CRS, 0.5 m per pixel"):
        default = refine_raster(nocrs, tmp_path / "d.tif", model=model, quiet=True,
                                options=RunOptions(device="cpu", coarse_only=True))
    plain = r"no CRS: continuing in pixel space \(the output has no CRS either\)$"
    with pytest.warns(UserWarning, match=plain):
        given = refine_raster(nocrs, tmp_path / "b.tif", model=model, quiet=True,
                              options=dataclasses.replace(asked, gsd=0.3))
    geo = write_raster(tmp_path / "geo.tif", _road_grid(480, 24), res=1.0)
    located = refine_raster(geo, tmp_path / "c.tif", model=model, quiet=True, options=asked)
    for summary in (default, given, located):
        assert summary.gsd_estimate is None and "GSD estimated" not in summary.line()


def test_too_few_roads_keep_the_cards_assumption_and_say_so(tmp_path):
    model = Model(_road_card(), Bright(), None)
    dark = write_raster(tmp_path / "dark.tif", np.full((3, 200, 200), 20, np.uint8), crs=None)
    with pytest.warns(UserWarning) as record:
        summary = refine_raster(dark, tmp_path / "a.tif", model=model, quiet=True,
                                options=RunOptions(device="cpu", coarse_only=True,
                                                   estimate_gsd=True))
    assert "too few road pixels to estimate its GSD from: assuming the model's default, " \
           "0.5 m per pixel" in str(record[-1].message)
    assert summary.gsd_estimate is None
    with rasterio.open(tmp_path / "a.tif") as ds:
        assert ds.shape == (200, 200) and not ds.read(1).any()


def test_a_card_without_the_width_cannot_estimate_one_error_line(tmp_path):
    card = conv_model(tmp_path / "m", gsd=0.3)
    src = write_raster(tmp_path / "in.tif", synthetic_scene(64, 64, seed=6), crs=None)
    with pytest.raises(UserError, match="cannot estimate an input's GSD .* no gsd_from_width"):
        refine_raster(src, tmp_path / "o.tif", model=load_model(card, "cpu"), quiet=True,
                      options=RunOptions(device="cpu", estimate_gsd=True))
    assert not (tmp_path / "o.tif").exists()
    out = CliRunner().invoke(main, ["refine", str(src), str(tmp_path / "o.tif"), "-m",
                                    str(card), "--estimate-gsd"])
    assert out.exit_code != 0
    assert out.output.strip().splitlines()[-1].startswith("Error: ")
    assert "--gsd instead of --estimate-gsd" in out.output
    with pytest.raises(UserError, match="estimate_gsd must be True or False"):
        RunOptions(estimate_gsd="yes")


@pytest.mark.parametrize("prior", [
    {"class": "background", "width": 6}, {"class": "lake", "width": 6},
    {"class": "road", "width": 0}, {"class": "road"}, {"class": "road", "width": 6, "x": 1},
    [6.0],
])
def test_cards_check_their_gsd_from_width(tmp_path, prior):
    data = _road_card().to_dict()
    assert ModelCard.from_dict(data).gsd_from_width == ROAD_CARD  # (round trip)
    data["gsd_from_width"] = prior
    with pytest.raises(UserError, match="'gsd_from_width' must be"):
        ModelCard.from_dict(data)
    data["gsd_from_width"], data["gsd"] = ROAD_CARD, None
    data["gsd_without_crs"] = None
    with pytest.raises(UserError, match="'gsd_from_width' needs the model's 'gsd'"):
        ModelCard.from_dict(data)

"""The working GSD per scene (idgbr_geo.scale): the candidate whose coarse map is most
confident on sample windows, and the engine running exactly as at that GSD."""

from __future__ import annotations

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

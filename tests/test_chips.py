"""The chip sampler: per-chip GSD zoom, sampling weights, sensor augmentation, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from idgbr_geo.cards import Normalization
from idgbr_geo.chips import (
    SENSOR_RANGES,
    ChipSampler,
    _turn_hue,
    fit_normalization,
    sample_batches,
)
from idgbr_geo.config import SENSOR_AUGMENTATIONS, TrainingConfig
from idgbr_geo.errors import UserError


def _gradient_chips(n: int = 2, t: int = 64) -> dict:
    """Chips whose red band is the column index: a crop's span of columns shows its zoom."""
    images = np.zeros((n, 3, t, t), np.uint8)
    images[:, 0] = np.arange(t, dtype=np.uint8)[None, None, :]
    return {"images": images, "labels": np.zeros((n, t, t), np.uint8),
            "classes": ["a", "b"], "gsd": np.float64(0.5)}


def test_chip_gsd_zooms_each_chip_to_the_model_gsd():
    data = _gradient_chips()
    data["chip_gsd"] = np.array([0.25, 0.5])  # chip 0 is twice as fine as the model
    data["weight"] = np.array([1.0, 0.0])  # and the only one drawn
    norm = Normalization(mean=[0, 0, 0], std=[1 / 255] * 3)  # raw values back
    s = ChipSampler(data, norm, 16, np.random.default_rng(0), scale=(1.0, 1.0), colour=False)
    img, _, _ = s.sample(8)
    spans = img[:, 0].amax((1, 2)) - img[:, 0].amin((1, 2))
    assert torch.all((spans > 26) & (spans < 34))  # 16 model px = 32 source px
    data["weight"] = np.array([0.0, 1.0])
    s = ChipSampler(data, norm, 16, np.random.default_rng(0), scale=(1.0, 1.0), colour=False)
    spans = (lambda x: x.amax((1, 2)) - x.amin((1, 2)))(s.sample(8)[0][:, 0])
    assert torch.all((spans > 12) & (spans < 18))  # no zoom


@pytest.mark.parametrize(("key", "value", "message"), [
    ("chip_gsd", np.array([0.5]), "'chip_gsd' must hold one pixel size"),
    ("chip_gsd", np.array([0.5, -1.0]), "'chip_gsd' must hold one pixel size"),
    ("weight", np.array([1.0, np.nan]), "'weight' must hold one sampling weight"),
    ("weight", np.array([0.0, 0.0]), "weights are all 0"),
])
def test_bad_chip_gsd_or_weights_are_one_error(key, value, message):
    data = _gradient_chips()
    data["labels"][:] = 1
    data[key] = value
    with pytest.raises(UserError, match=message):
        ChipSampler(data, fit_normalization(data["images"]), 16, np.random.default_rng(0))


def _red_roof_chips(n: int = 4, t: int = 32) -> dict:
    """Uniform red chips (a roof colour): the colour augmentation alone varies them."""
    images = np.zeros((n, 3, t, t), np.uint8)
    images[:, 0], images[:, 1], images[:, 2] = 180, 60, 50
    return {"images": images, "labels": np.ones((n, t, t), np.uint8),
            "classes": ["a", "b"], "gsd": np.float64(0.5)}


def _hues(img: torch.Tensor) -> np.ndarray:
    """Hue angle (degrees) of each chip's mean colour, in the plane normal to grey."""
    r, g, b = img.mean((2, 3)).T.numpy()
    return np.degrees(np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b))


def test_hue_turn_moves_hues_and_keeps_greys():
    red = torch.tensor([0.7, 0.2, 0.2])[:, None, None].expand(3, 4, 4)
    turned = _turn_hue(red, np.deg2rad(30))
    assert _hues(turned[None]) == pytest.approx(30, abs=0.5)
    assert turned.mean(0) == pytest.approx(red.mean(0))
    grey = torch.full((3, 4, 4), 0.4)
    assert torch.allclose(_turn_hue(grey, 1.0), grey, atol=1e-6)


def test_strong_colour_augmentation_spreads_roof_colours_wider_than_mild():
    data = _red_roof_chips()
    norm = Normalization(mean=[0, 0, 0], std=[1, 1, 1])
    mild = ChipSampler(data, norm, 16, np.random.default_rng(0), colour="mild").sample(200)[0]
    strong = ChipSampler(data, norm, 16, np.random.default_rng(0), colour="strong").sample(200)[0]
    assert strong.min() >= 0 and strong.max() <= 1
    assert np.abs(_hues(mild)).max() < 15  # mild jitter keeps a red roof red
    hues = _hues(strong)
    assert (hues > 20).any() and (hues < -20).any()  # turned both ways round the wheel
    grey = (strong.amax(1) - strong.amin(1)).amax((1, 2)) < 1e-6
    assert 5 <= grey.sum() <= 40  # ~10% grey chips


def test_colour_augmentation_setting_is_checked():
    assert TrainingConfig.from_dict({"colour_aug": "strong"}, "c").colour_aug == "strong"
    with pytest.raises(UserError, match="c: 'colour_aug' must be one of mild, strong"):
        TrainingConfig.from_dict({"colour_aug": "wild"}, "c")
    with pytest.raises(UserError, match="colour augmentation"):
        ChipSampler(_red_roof_chips(), Normalization(mean=[0] * 3, std=[1] * 3), 16,
                    np.random.default_rng(0), colour="wild")


def test_sensor_augmentation_keeps_values_in_range_and_changes_images():
    data = _gradient_chips(4)
    norm = Normalization(mean=[0, 0, 0], std=[1, 1, 1])
    plain = ChipSampler(data, norm, 32, np.random.default_rng(0), colour=False).sample(16)[0]
    aug = ChipSampler(data, norm, 32, np.random.default_rng(0), colour=False,
                      sensor=True).sample(16)[0]
    assert aug.min() >= 0 and aug.max() <= 1
    assert not torch.allclose(plain, aug)


def test_wide_sensor_augmentation_reaches_further_than_mild():
    """"wide" adds band gains (another white balance) and darker gammas; mild keeps a grey
    chip's bands together; the setting is checked like the colour one."""
    data = {"images": np.full((4, 3, 32, 32), 128, np.uint8),
            "labels": np.zeros((4, 32, 32), np.uint8), "classes": ["a", "b"],
            "gsd": np.float64(0.5)}
    norm = Normalization(mean=[0, 0, 0], std=[1, 1, 1])
    out = {k: ChipSampler(data, norm, 16, np.random.default_rng(0), colour=False,
                          sensor=k).sample(300)[0] for k in ("mild", "wide")}
    spread = {k: (v.mean((2, 3))[:, 0] - v.mean((2, 3))[:, 2]).abs().max().item()
              for k, v in out.items()}
    assert spread["mild"] < 0.05 < 0.15 < spread["wide"]
    assert out["wide"].mean((1, 2, 3)).min() < out["mild"].mean((1, 2, 3)).min()
    assert out["wide"].min() >= 0 and out["wide"].max() <= 1
    assert tuple(SENSOR_RANGES) == SENSOR_AUGMENTATIONS
    assert TrainingConfig.from_dict({"sensor_aug": "wide"}, "c").sensor_aug == "wide"
    assert TrainingConfig.from_dict({"sensor_aug": True}, "c").sensor_aug is True
    with pytest.raises(UserError, match="c: 'sensor_aug' must be one of mild, wide"):
        TrainingConfig.from_dict({"sensor_aug": "strong"}, "c")
    with pytest.raises(UserError, match="sensor augmentation"):
        ChipSampler(data, norm, 16, np.random.default_rng(0), sensor="strong")


def test_worker_batches_are_reproducible_and_differ_between_workers():
    data = _gradient_chips(4)
    data["labels"][:, 8:40, 8:40] = 1
    norm = Normalization(mean=[0, 0, 0], std=[1, 1, 1])
    kw = dict(scale=(0.8, 1.2), sensor=False, workers=2, seed=3)

    def first(n, **extra):
        it = sample_batches(data, norm, 32, 4, np.random.default_rng(0), **kw, **extra)
        try:
            return [next(it) for _ in range(n)]
        finally:
            it.close()

    a, b = first(4), first(4)
    for (ia, la, pa), (ib, lb, _) in zip(a, b, strict=True):
        assert ia.shape == (4, 3, 32, 32) and la.shape == (4, 32, 32) and pa is None
        assert torch.equal(ia, ib) and torch.equal(la, lb)
    assert not torch.equal(a[0][0], a[1][0])  # two workers, two streams
    resumed = first(1, start=100)  # a resumed run does not repeat its first batches
    assert not torch.equal(resumed[0][0], a[0][0])


def test_without_workers_the_batches_are_the_samplers_own_stream():
    data = _gradient_chips(4)
    data["labels"][:] = 1
    norm = Normalization(mean=[0, 0, 0], std=[1, 1, 1])
    it = sample_batches(data, norm, 32, 4, np.random.default_rng(5), scale=(1, 1),
                        sensor=False)
    img = next(it)[0]
    ref = ChipSampler(data, norm, 32, np.random.default_rng(5), scale=(1, 1)).sample(4)[0]
    assert torch.equal(img, ref)

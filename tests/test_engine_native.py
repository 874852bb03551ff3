"""The engine on inputs finer than the model: results upsampled edge-aware, guided by the
native image (idgbr_geo.upsampling), stitched seamlessly, nodata honoured."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from synth import conv_model, synthetic_scene, write_raster

from idgbr_geo import engine, upsampling
from idgbr_geo.cards import ModelCard, Normalization
from idgbr_geo.config import SamplingConfig
from idgbr_geo.engine import refine_raster
from idgbr_geo.options import OutputOptions, RunOptions
from idgbr_geo.registry import save_model

FLOAT = OutputOptions(probabilities_dtype="float32")


def _read(path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read()


def _fine_scene(h: int, w: int, seed: int = 0, factor: int = 4) -> np.ndarray:
    """A scene at the model's GSD, enlarged ``factor`` x with its own fine detail: block
    edges anywhere on the fine grid (not only on the model grid)."""
    rng = np.random.default_rng(seed)
    img = np.kron(synthetic_scene(h, w, seed=seed), np.ones((1, factor, factor), np.uint8))
    H, W = img.shape[1:]
    for _ in range(H * W // 3000):
        y, x = rng.integers(0, H), rng.integers(0, W)
        hh, ww = rng.integers(6, 40, size=2)
        img[:, y:y + hh, x:x + ww] = rng.integers(150, 250, size=(3, 1, 1))
    return img


@pytest.mark.parametrize("coarse_only", [True, False])
def test_one_window_and_many_windows_agree(tmp_path, coarse_only):
    """The guided upsampling is per window; where windows overlap, the stitching's zero
    margin (a quarter of the overlap) covers its reach, so a scene refined in one window
    and in many agrees away from the window edges (here: everywhere)."""
    one = conv_model(tmp_path / "one", kernel=5, gsd=0.3, tile_size=240, overlap=64)
    many = conv_model(tmp_path / "many", kernel=5, gsd=0.3, tile_size=136, overlap=64)
    data = _fine_scene(200, 230, seed=2)
    data[:, ::48, :] = 250  # stripes: every window holds a boundary, so all are refined
    src = write_raster(tmp_path / "in.tif", data, res=0.075)  # 4x finer than the model
    probs = []
    for name, model in (("one", one), ("many", many)):
        s = refine_raster(src, tmp_path / f"{name}.tif", model=model,
                          probabilities=tmp_path / f"{name}_p.tif", quiet=True, outputs=FLOAT,
                          options=RunOptions(device="cpu", coarse_only=coarse_only, steps=2,
                                             seed=4))
        assert (s.windows == 1) == (name == "one")
        assert s.refined == (0 if coarse_only else s.windows)
        probs.append(_read(tmp_path / f"{name}_p.tif"))
    a, b = probs
    assert a.shape == (2, 800, 920)
    assert np.abs(a - b).max() < 1e-4, np.abs(a - b).max()


def _threshold_model(folder, kernel: int = 1, edge_filter: bool = False) -> Path:
    """A segmentor that thresholds the brightness at ~130 of 255, of each pixel (``kernel``
    1: on the test's two-tone image its coarse map is the truth, on the model grid) or of
    its ``kernel`` x ``kernel`` neighbourhood (the truth's boundaries with the corners
    rounded off and thin parts lost)."""
    x_mid = (130 / 255 - 0.3) / 0.2  # the card's normalisation of 130
    weight = torch.zeros(2, 3, kernel, kernel)
    weight[1] = 3.0 / kernel**2
    card = ModelCard(name="threshold", classes=["background", "building"], bands=3,
                     band_names=["r", "g", "b"],
                     normalization=Normalization(mean=[0.3] * 3, std=[0.2] * 3), gsd=0.3,
                     tile_size=96, overlap=32, sampling=SamplingConfig(steps=2),
                     stride_multiple=8, segmentor={"arch": "conv-segmentor"},
                     edge_filter=edge_filter)
    return save_model(card, {"segmentor.weight": weight,
                             "segmentor.bias": torch.tensor([0.0, -9.0 * x_mid])}, folder)


def _two_tone(seed: int, shape: tuple[int, int], rects: int, sides: tuple[int, int]
              ) -> tuple[np.ndarray, np.ndarray]:
    """A truth of ``rects`` random rectangles (sides in ``sides``) and its image: dark
    ground, bright rectangles, a little noise (uint8, 3 bands)."""
    rng = np.random.default_rng(seed)
    h, w = shape
    truth = np.zeros(shape, np.uint8)
    for _ in range(rects):
        y, x = rng.integers(0, h - 20), rng.integers(0, w - 20)
        hh, ww = rng.integers(*sides, size=2)
        truth[y:y + hh, x:x + ww] = 1
    img = (70 + 120 * truth[None] + rng.normal(0, 6, (3, h, w))).clip(0, 255)
    return truth, img.astype(np.uint8)


def _boundary_error(tmp_path, monkeypatch, guided: bool) -> float:
    """Share of pixels off the true classes when the segmentor's coarse map (the truth, on
    the model grid) is brought back to the input grid, bilinear or guided by the image."""
    truth, img = _two_tone(1, (240, 280), 14, (9, 50))
    src = write_raster(tmp_path / "img.tif", img, res=0.075)
    model = _threshold_model(tmp_path / "m")
    monkeypatch.setattr(engine, "_JOINT_UPSAMPLING", guided)
    out = tmp_path / f"out{int(guided)}.tif"
    refine_raster(src, out, model=model, quiet=True,
                  options=RunOptions(device="cpu", coarse_only=True))
    return float((_read(out)[0] != truth).mean())


def test_boundaries_follow_the_native_image(tmp_path, monkeypatch):
    """(A user's map, given with ``coarse=``, is kept at its own resolution instead:
    test_engine_user_map.py.)"""
    bilinear = _boundary_error(tmp_path, monkeypatch, guided=False)
    guided = _boundary_error(tmp_path, monkeypatch, guided=True)
    assert bilinear > 0.005  # a 4x coarser grid moves the boundaries by a pixel or two
    assert guided < 0.25 * bilinear, (guided, bilinear)


def test_inputs_close_to_the_models_gsd_stay_bilinear(tmp_path, monkeypatch):
    model = conv_model(tmp_path / "m", gsd=0.3, refiner=False)
    src = write_raster(tmp_path / "in.tif", synthetic_scene(120, 130), res=0.25)  # 1.2x
    outs = []
    for guided in (True, False):
        monkeypatch.setattr(engine, "_JOINT_UPSAMPLING", guided)
        p = tmp_path / f"p{int(guided)}.tif"
        refine_raster(src, tmp_path / f"o{int(guided)}.tif", model=model, probabilities=p,
                      quiet=True, outputs=FLOAT, options=RunOptions(device="cpu"))
        outs.append(_read(p))
    assert 1.2 < upsampling.MIN_FACTOR
    np.testing.assert_array_equal(*outs)


def test_a_card_with_edge_filter_redraws_boundaries_on_the_inputs_own_grid(tmp_path):
    """``edge_filter``: an input read at its own resolution (no resampling at all) gets its
    output filtered along the image's edges too; without it the output is the network's."""
    truth, img = _two_tone(5, (200, 220), 12, (4, 40))
    src = write_raster(tmp_path / "img.tif", img, res=0.3)
    errors = {}
    for flag in (False, True):
        out = tmp_path / f"o{int(flag)}.tif"
        s = refine_raster(src, out, model=_threshold_model(tmp_path / f"m{flag}", 9, flag),
                          quiet=True, options=RunOptions(device="cpu", coarse_only=True))
        assert s.windows > 1
        errors[flag] = float((_read(out)[0] != truth).mean())
    assert errors[False] > 0.01  # the blur's rounded corners and lost thin parts
    assert errors[True] < 0.7 * errors[False], errors  # (measured: 0.012 -> 0.006)


def test_nan_speck_in_a_fine_input_stays_a_speck(tmp_path):
    model = conv_model(tmp_path / "m", gsd=0.3)
    clean = _fine_scene(50, 60, seed=3).astype(np.float32) / 255
    speck = clean.copy()
    speck[:, 100:112, 120:132] = np.nan
    kw = dict(model=model, quiet=True, outputs=FLOAT, options=RunOptions(device="cpu"))
    refine_raster(write_raster(tmp_path / "a.tif", clean, res=0.075), tmp_path / "ao.tif",
                  probabilities=tmp_path / "ap.tif", **kw)
    refine_raster(write_raster(tmp_path / "b.tif", speck, res=0.075), tmp_path / "bo.tif",
                  probabilities=tmp_path / "bp.tif", **kw)
    a, b = _read(tmp_path / "ao.tif")[0], _read(tmp_path / "bo.tif")[0]
    pb = _read(tmp_path / "bp.tif")
    assert (b[102:110, 122:130] == 255).all()
    covered = b != 255
    assert np.isfinite(pb[:, covered]).all()
    np.testing.assert_allclose(pb[:, covered].sum(0), 1.0, atol=1e-5)
    # the networks' and the filter's reach around the speck, in model pixels, x 4
    reach = 4 * (3 + 2 * upsampling.RADIUS + 2)
    near = np.zeros(a.shape, bool)
    near[100 - reach:112 + reach, 120 - reach:132 + reach] = True
    np.testing.assert_array_equal(a[~near], b[~near])

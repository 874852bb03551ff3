"""Window inference (idgbr_geo.predict.predict_windows): the one path from windows to class
probabilities that the engine, validation and the benchmarks share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window
from synth import conv_model, synthetic_scene, write_raster

from idgbr_geo.cards import ModelCard
from idgbr_geo.engine import refine_raster
from idgbr_geo.errors import UserError
from idgbr_geo.interfaces import Model
from idgbr_geo.options import OutputOptions, RunOptions
from idgbr_geo.predict import (
    fast_bfloat16,
    has_boundary,
    predict_windows,
    resolve_precision,
)
from idgbr_geo.registry import load_model
from idgbr_geo.views import multiscale_probabilities

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "gorinchem_rgb_025m.tif"


class Spy:
    """A refiner that records what it is given and returns a fixed map."""

    def __init__(self, k: int = 2) -> None:
        self.num_classes, self.calls = k, []

    def refine(self, image, coarse, *, steps, seed, origins):
        self.calls.append((coarse.clone(), list(origins), steps, seed))
        out = torch.zeros_like(coarse)
        out[:, -1] = 1.0
        return out


def _one_window_scene(tmp_path, model, h, w, seed=0):
    """Refine a scene that is one window at the card's GSD (no working-GSD choice, which
    would resample it); return (engine probabilities, image, summary)."""
    data = synthetic_scene(h, w, seed=seed)
    m = model if isinstance(model, Model) else load_model(model, "cpu")
    src = write_raster(tmp_path / "in.tif", data, res=m.card.gsd or 0.25)  # no resampling
    summary = refine_raster(src, tmp_path / "out.tif", model=model, quiet=True,
                            probabilities=tmp_path / "p.tif",
                            options=RunOptions(device="cpu", seed=3, gsd_search=False),
                            outputs=OutputOptions(probabilities_dtype="float32"))
    with rasterio.open(tmp_path / "p.tif") as ds:
        engine = ds.read()
    image = torch.from_numpy(m.card.normalization.apply(data, data.dtype))[None]
    return engine, image, summary, m


def test_equals_refine_raster_on_a_one_window_scene(tmp_path):
    path = conv_model(tmp_path / "m", tile_size=96, overlap=16, gsd=0.25)
    engine, image, summary, m = _one_window_scene(tmp_path, path, 64, 80)
    assert summary.windows == 1 and summary.refined == 1
    probs, n = predict_windows(m, image, origins=[(0, 0)], seed=3)
    assert n == 1
    np.testing.assert_allclose(engine, probs[0].numpy(), rtol=0, atol=1e-6)


def test_equals_refine_raster_with_the_bundled_model(tmp_path):
    """The bundled buildings model (shared-encoder refiner) on one window; its card's
    ``edge_filter`` then filters the window's probabilities along the image's edges (on
    its own grid: the guided filter with a grey guide), and nothing else."""
    from idgbr_geo.upsampling import radius_for, upsample_probabilities

    m = load_model("buildings", "cpu")
    assert m.card.edge_filter
    engine, image, summary, _ = _one_window_scene(tmp_path, m, 128, 160, seed=2)
    assert summary.windows == 1 and summary.refined == 1
    zooms = m.card.coarse_zooms or ()  # (the engine's default: the card's views)
    probs, n = predict_windows(m, image, origins=[(0, 0)], seed=3, zooms=zooms)
    coarse, _ = predict_windows(m, image, origins=[(0, 0)], refine=False, zooms=zooms)
    assert n == 1 and not torch.equal(probs, coarse)
    data = torch.from_numpy(synthetic_scene(128, 160, seed=2))
    filtered = upsample_probabilities(probs[0], data.float() / 255, data, scale=1 / 255,
                                      radius=radius_for(m.card.overlap), colour=False)
    np.testing.assert_allclose(engine, filtered.numpy(), rtol=0, atol=1e-5)
    assert np.abs(engine - probs[0].numpy()).max() > 0.01  # (the filter did something)
    m.card.edge_filter = False
    (tmp_path / "off").mkdir()
    engine, _, _, _ = _one_window_scene(tmp_path / "off", m, 128, 160, seed=2)
    np.testing.assert_allclose(engine, probs[0].numpy(), rtol=0, atol=1e-6)


def test_refine_false_steps_0_or_no_refiner_give_the_coarse_map(tmp_path):
    m = load_model(conv_model(tmp_path / "m"), "cpu")
    image = torch.randn(2, 3, 32, 40)
    coarse = m.segmentor.predict(image)
    for kw in ({"refine": False}, {"steps": 0}):  # (float32: as the direct call runs)
        probs, n = predict_windows(m, image, origins=[(0, 0), (0, 40)], precision="float32",
                                   **kw)
        assert n == 0 and torch.equal(probs, coarse)
    bare = Model(card=m.card, segmentor=m.segmentor, refiner=None)
    probs, n = predict_windows(bare, image, origins=[(0, 0), (0, 40)], precision="float32")
    assert n == 0 and torch.equal(probs, coarse)
    refined, n = predict_windows(m, image, origins=[(0, 0), (0, 40)])
    assert n == 2 and not torch.equal(refined, coarse)


def test_only_windows_whose_coarse_map_has_a_boundary_are_refined(tmp_path):
    card = load_model(conv_model(tmp_path / "m"), "cpu").card
    spy = Spy()
    m = Model(card=card, segmentor=None, refiner=spy)
    coarse = torch.zeros(3, 2, 16, 16)
    coarse[:, 0] = 1.0  # all three windows: class 0 ...
    coarse[1, :, 4:8, 4:8] = torch.tensor([0.0, 1.0])[:, None, None]  # ... but the 2nd
    coarse[2, :, 0, 0] = torch.tensor([0.0, 1.0])  # the 3rd: only in a pixel without data
    valid = torch.ones(3, 16, 16, dtype=torch.bool)
    valid[2, 0, 0] = False
    probs, n = predict_windows(m, torch.zeros(3, 3, 16, 16), coarse=coarse, valid=valid,
                               origins=[(0, 0), (0, 16), (0, 32)], steps=2, seed=5)
    assert n == 1 and len(spy.calls) == 1
    _, origins, steps, seed = spy.calls[0]
    assert origins == [(0, 16)] and (steps, seed) == (2, 5)
    assert torch.equal(probs[[0, 2]], coarse[[0, 2]])  # kept as they were
    assert torch.equal(probs[1], torch.stack([torch.zeros(16, 16), torch.ones(16, 16)]))
    assert has_boundary(coarse, valid).tolist() == [False, True, False]


def test_the_refiner_sees_zeros_outside_the_raster(tmp_path):
    card = load_model(conv_model(tmp_path / "m"), "cpu").card
    spy = Spy()
    m = Model(card=card, segmentor=None, refiner=spy)
    coarse = torch.rand(1, 2, 16, 16)
    inside = torch.zeros(1, 1, 16, 16)
    inside[..., :10, :12] = 1.0  # the window overhangs the raster's edge
    predict_windows(m, torch.zeros(1, 3, 16, 16), coarse=coarse, inside=inside,
                    origins=[(0, 0)])
    seen = spy.calls[0][0]
    assert torch.equal(seen[..., :10, :12], coarse[..., :10, :12])
    assert (seen[..., 10:, :] == 0).all() and (seen[..., :, 12:] == 0).all()


def test_bad_calls(tmp_path):
    m = load_model(conv_model(tmp_path / "m"), "cpu")
    with pytest.raises(ValueError, match="2 origins for 1 windows"):
        predict_windows(m, torch.zeros(1, 3, 16, 16), origins=[(0, 0), (0, 16)])
    from idgbr_geo.errors import UserError

    with pytest.raises(UserError, match="has no segmentor"):
        predict_windows(Model(card=m.card, segmentor=None, refiner=m.refiner),
                        torch.zeros(1, 3, 16, 16), origins=[(0, 0)])


# -- precision ---------------------------------------------------------------------------------
def test_auto_precision_is_bfloat16_only_on_a_cpu_with_bfloat16_instructions(monkeypatch):
    for amx, avx512_bf16 in ((True, False), (False, True)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v,
                            raising=False)
        assert fast_bfloat16("cpu") and resolve_precision("auto", "cpu") == "bfloat16"
    assert resolve_precision("auto", "cuda") == "float32"  # (not measured on a GPU)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert resolve_precision("auto", "cpu") == "float32"
    assert resolve_precision("bfloat16", "cpu") == "bfloat16"  # forced, whatever the CPU
    assert resolve_precision("float32", "cpu") == "float32"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("float16", "cpu")


def test_bfloat16_runs_both_networks_and_stays_close_to_float32():
    """The bundled model on a real-looking window: bfloat16 changes the probabilities a
    little (so it did run), leaves them in float32 and keeps nearly every pixel's class."""
    m = load_model("buildings", "cpu")
    data = synthetic_scene(128, 160, seed=2)
    image = torch.from_numpy(m.card.normalization.apply(data, data.dtype))[None]
    runs = {}
    for precision in ("float32", "bfloat16"):
        for refine in (False, True):
            runs[precision, refine], n = predict_windows(
                m, image, origins=[(0, 0)], seed=3, refine=refine, precision=precision)
            assert n == int(refine) and runs[precision, refine].dtype == torch.float32
    for refine in (False, True):
        a, b = runs["float32", refine], runs["bfloat16", refine]
        assert not torch.equal(a, b)
        assert float((a - b).abs().max()) < 0.25
        agree = float((a.argmax(1) == b.argmax(1)).float().mean())
        assert agree > 0.99, (refine, agree)
    # the refiner ran in bfloat16 too: its output differs from float32 refinement of the
    # same (float32) coarse map
    coarse = runs["float32", False]
    a, _ = predict_windows(m, image, coarse=coarse, origins=[(0, 0)], seed=3,
                           precision="float32")
    b, _ = predict_windows(m, image, coarse=coarse, origins=[(0, 0)], seed=3,
                           precision="bfloat16")
    assert not torch.equal(a, b)


def test_the_engine_tags_the_precision_it_ran(tmp_path):
    path = conv_model(tmp_path / "m", tile_size=96, overlap=16, gsd=0.25)
    src = write_raster(tmp_path / "in.tif", synthetic_scene(64, 80, seed=1), res=0.25)
    for precision in ("auto", "float32", "bfloat16"):
        out = tmp_path / f"{precision}.tif"
        refine_raster(src, out, model=path, quiet=True,
                      options=RunOptions(device="cpu", precision=precision))
        with rasterio.open(out) as ds:
            assert ds.tags()["IDGBR_PRECISION"] == resolve_precision(precision, "cpu")


# -- zoomed views of each window (card coarse_zooms) ------------------------------------------
def test_the_refiner_reuses_the_window_features_after_the_views():
    m = load_model("buildings", "cpu")
    calls = []
    inner = m.segmentor.net.encoder.encoder
    handle = inner.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape))
    try:
        with rasterio.open(EXAMPLE) as ds:  # houses by the river: a boundary to refine
            raw = ds.read(window=Window(850, 300, 128, 128))
        image = torch.from_numpy(m.card.normalization.apply(raw, raw.dtype))[None]
        _, n = predict_windows(m, image, origins=[(0, 0)], precision="float32",
                               zooms=(0.8, 1.25), inside=torch.ones(1, 1, 128, 128))
    finally:
        handle.remove()
    assert n == 1  # refined: its encoder features came from the memo, not a fourth pass
    assert [tuple(s[-2:]) for s in calls] == [(128, 128), (160, 160), (96, 96)]


def test_predict_windows_uses_the_views_for_its_coarse_map_only(tmp_path):
    m = load_model(conv_model(tmp_path / "m"), "cpu")
    image = torch.randn(1, 3, 64, 96)
    kw = dict(origins=[(0, 0)], precision="float32")
    coarse, _ = predict_windows(m, image, refine=False, zooms=(0.8, 1.25), **kw)
    assert torch.equal(coarse, multiscale_probabilities(m.segmentor, image, (0.8, 1.25)))
    refined, n = predict_windows(m, image, zooms=(0.8, 1.25), seed=1, **kw)
    again, _ = predict_windows(m, image, coarse=coarse, seed=1, **kw)
    assert n == 1 and torch.equal(refined, again)  # the refiner refines that averaged map
    # a user's map is never replaced by the segmentor's views
    user = torch.zeros(1, 2, 64, 96)
    user[:, 1] = 1
    given, _ = predict_windows(m, image, coarse=user, refine=False, zooms=(0.8,), **kw)
    assert torch.equal(given, user)


def test_the_engine_runs_the_cards_views_unless_switched_off(tmp_path):
    data = synthetic_scene(80, 96, seed=6)
    src = write_raster(tmp_path / "in.tif", data, res=0.3)
    views = conv_model(tmp_path / "v", coarse_zooms=[0.8, 1.25])
    plain = conv_model(tmp_path / "p")
    kw = dict(quiet=True, outputs=OutputOptions(probabilities_dtype="float32"))
    for name, model, multiscale in (("on", views, True), ("off", views, False),
                                    ("plain", plain, True)):
        refine_raster(src, tmp_path / f"{name}.tif", model=model,
                      probabilities=tmp_path / f"{name}_p.tif", **kw,
                      options=RunOptions(device="cpu", precision="float32",
                                         coarse_only=True, multiscale=multiscale))
    read = {n: rasterio.open(tmp_path / f"{n}_p.tif").read() for n in ("on", "off", "plain")}
    np.testing.assert_array_equal(read["off"], read["plain"])
    assert not np.array_equal(read["on"], read["plain"])
    with rasterio.open(tmp_path / "on.tif") as on, rasterio.open(tmp_path / "off.tif") as off:
        assert on.tags()["IDGBR_COARSE_ZOOMS"] == "0.8,1.25"
        assert off.tags().get("IDGBR_COARSE_ZOOMS", "") == ""  # (GDAL drops empty tags)
    # one window, at the card's GSD: the engine's map is predict_windows' with the views
    m = load_model(views, "cpu")
    image = torch.from_numpy(m.card.normalization.apply(data, data.dtype))[None]
    want, _ = predict_windows(m, image, origins=[(0, 0)], refine=False, precision="float32",
                              zooms=m.card.coarse_zooms)
    np.testing.assert_allclose(read["on"], want[0].numpy(), rtol=0, atol=1e-6)
    with pytest.raises(UserError, match="multiscale must be True or False"):
        RunOptions(multiscale="yes")


@pytest.mark.parametrize("zooms", [[], [1.0], [0.8, 3], [0.4], ["x"], 0.8, [float("nan")]])
def test_cards_check_their_coarse_zooms(tmp_path, zooms):
    import json

    data = json.loads(conv_model(tmp_path / "m").read_text())
    data["coarse_zooms"] = zooms
    with pytest.raises(UserError, match="'coarse_zooms' must be a list of zooms"):
        ModelCard.from_dict(data)
    data["coarse_zooms"] = [0.8, 1.25]
    assert ModelCard.from_dict(data).coarse_zooms == [0.8, 1.25]

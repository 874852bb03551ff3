"""A user's coarse map (``coarse=``) on an input whose GSD is not the model's: the engine
runs on the model grid, but every pixel the refiner leaves alone keeps the user's own class
at the input's resolution (idgbr_geo.input_grid.keep_user_map)."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch
from synth import class_blobs, conv_model, synthetic_scene, write_raster

from idgbr_geo import engine, input_grid
from idgbr_geo.engine import refine_raster
from idgbr_geo.errors import InputError
from idgbr_geo.options import OutputOptions, RunOptions
from idgbr_geo.upsampling import radius_for

FLOAT = OutputOptions(probabilities_dtype="float32")
#: the model's GSD in these tests
GSD = 0.3


def _read(path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read()


def _fine_map(h: int, w: int, k: int = 2, seed: int = 0) -> np.ndarray:
    """A class map with detail finer than the model grid: smooth blobs plus one-pixel lines
    and specks, which a round trip through a 4x coarser grid would lose."""
    m = class_blobs((h, w), seed, classes=k, sigma=6)
    m[7::23, :] = 1
    m[:, 11::31] = k - 1
    rng = np.random.default_rng(seed)
    m[rng.integers(0, h, 60), rng.integers(0, w, 60)] = 0
    return m


def _scene(tmp_path, h: int, w: int, res: float, *, image_nodata: bool = False):
    img = synthetic_scene(h, w, seed=5)
    img[:, ::13, :] = 250  # stripes: every window has edges
    if image_nodata:
        img[:, : h // 5, : w // 4] = 0
    return write_raster(tmp_path / "in.tif", img, res=res, nodata=0 if image_nodata else None)


@pytest.mark.parametrize("how", ["steps=0", "no refiner", "coarse_only"])
@pytest.mark.parametrize("res", [0.075, 0.25, 0.3, 0.6])  # 4x and 1.2x finer, the same, 2x coarser
@pytest.mark.parametrize("edge_filter", [False, True])
def test_the_users_map_passes_through_exactly(tmp_path, how, res, edge_filter):
    """No refinement: the output is the user's map, pixel for pixel, at the input's
    resolution, over many overlapping windows; its nodata stays nodata. A card's
    ``edge_filter`` does not touch it (on the model's own grid either)."""
    h, w = round(90 * GSD / res), round(100 * GSD / res)  # 90 x 100 model pixels
    src = _scene(tmp_path, h, w, res)
    user = _fine_map(h, w)
    user[40:60, 50:90] = 255  # the map's nodata
    cmap = write_raster(tmp_path / "user.tif", user, res=res, nodata=255)
    model = conv_model(tmp_path / "m", gsd=GSD, refiner=how != "no refiner", tile_size=48,
                       overlap=16, edge_filter=edge_filter)
    opts = RunOptions(device="cpu", steps=0 if how == "steps=0" else None,
                      coarse_only=how == "coarse_only")
    s = refine_raster(src, tmp_path / "o.tif", model=model, coarse=cmap, quiet=True,
                      probabilities=tmp_path / "p.tif", outputs=FLOAT, options=opts)
    assert s.windows > 4 and s.refined == 0
    np.testing.assert_array_equal(_read(tmp_path / "o.tif")[0], user)
    p = _read(tmp_path / "p.tif")
    valid = user != 255
    np.testing.assert_array_equal(p[1][valid], (user == 1)[valid])  # one-hot, exactly
    np.testing.assert_array_equal(p[0][valid], (user == 0)[valid])


def test_three_classes_and_a_map_on_another_grid(tmp_path):
    """More than two classes, and a map at half the input's resolution (reprojected onto
    the input's grid with nearest): kept as given, each of its pixels 2 x 2 input pixels."""
    src = _scene(tmp_path, 240, 200, 0.075)
    user = _fine_map(120, 100, k=3, seed=2)
    cmap = write_raster(tmp_path / "user.tif", user, res=0.15)
    model = conv_model(tmp_path / "m", classes=("a", "b", "c"), gsd=GSD, tile_size=48,
                       overlap=16)
    refine_raster(src, tmp_path / "o.tif", model=model, coarse=cmap, quiet=True,
                  options=RunOptions(device="cpu", coarse_only=True))
    np.testing.assert_array_equal(_read(tmp_path / "o.tif")[0],
                                  np.kron(user, np.ones((2, 2), np.uint8)))


def test_image_nodata_is_nodata(tmp_path):
    """The output has data where both the map and the image do (at the input's
    resolution)."""
    h, w = 200, 240
    src = _scene(tmp_path, h, w, 0.075, image_nodata=True)
    user = _fine_map(h, w)
    cmap = write_raster(tmp_path / "user.tif", user, res=0.075)
    model = conv_model(tmp_path / "m", gsd=GSD, tile_size=48, overlap=16)
    refine_raster(src, tmp_path / "o.tif", model=model, coarse=cmap, quiet=True,
                  options=RunOptions(device="cpu", steps=0))
    expected = user.copy()
    expected[: h // 5, : w // 4] = 255
    np.testing.assert_array_equal(_read(tmp_path / "o.tif")[0], expected)


def test_probability_bands_pass_through(tmp_path):
    h, w = 160, 200
    src = _scene(tmp_path, h, w, 0.075)
    rng = np.random.default_rng(3)
    p1 = np.where(_fine_map(h, w) == 1, rng.integers(140, 256, (h, w)),
                  rng.integers(0, 116, (h, w))).astype(np.uint8)
    cmap = write_raster(tmp_path / "user.tif", np.stack([255 - p1, p1]), res=0.075)
    model = conv_model(tmp_path / "m", gsd=GSD, tile_size=48, overlap=16)
    refine_raster(src, tmp_path / "o.tif", model=model, coarse=cmap, quiet=True,
                  probabilities=tmp_path / "p.tif", outputs=FLOAT,
                  options=RunOptions(device="cpu", coarse_only=True))
    np.testing.assert_array_equal(_read(tmp_path / "o.tif")[0], (p1 > 127).astype(np.uint8))
    np.testing.assert_allclose(_read(tmp_path / "p.tif")[1], p1 / 255.0, atol=1e-6)


def test_a_class_outside_the_models_is_refused_even_between_model_pixels(tmp_path):
    src = _scene(tmp_path, 120, 120, 0.075)
    user = np.zeros((120, 120), np.uint8)
    user[1, 1] = 7  # 4x finer: no model pixel's nearest input pixel
    cmap = write_raster(tmp_path / "user.tif", user, res=0.075)
    model = conv_model(tmp_path / "m", gsd=GSD)
    with pytest.raises(InputError, match="class id 7"):
        refine_raster(src, tmp_path / "o.tif", model=model, coarse=cmap, quiet=True,
                      options=RunOptions(device="cpu"))


#: the rectangle the fake refiner below turns to class 1, on the model grid (y0, y1, x0, x1)
RECT = (20, 52, 14, 60)


def _flipping_predict(real):
    """predict_windows without any refinement except class 1 over :data:`RECT` (on the
    model grid, whole-raster coordinates: the same in every window)."""
    def fake(model, image, **kw):
        probs, _ = real(model, image, **{**kw, "refine": False})
        probs = probs.clone()
        y0, y1, x0, x1 = RECT
        for i, (r, c) in enumerate(kw["origins"]):
            ys = slice(max(0, y0 - r), max(0, y1 - r))
            xs = slice(max(0, x0 - c), max(0, x1 - c))
            probs[i, :, ys, xs] = torch.tensor([0.0, 1.0])[:, None, None]
        return probs, len(image)
    return fake


@pytest.mark.parametrize("margin", [0, 1])
def test_only_what_the_refiner_changed_replaces_the_users_map(tmp_path, monkeypatch, margin):
    """A refiner that changes one rectangle (across several windows and their overlaps):
    outside it (widened by CHANGED_MARGIN model pixels) the output is the user's map
    exactly; inside, away from its edge, the refiner's class."""
    monkeypatch.setattr(input_grid, "CHANGED_MARGIN", margin)
    monkeypatch.setattr(engine, "predict_windows", _flipping_predict(engine.predict_windows))
    f = 4  # input pixels per model pixel
    h, w = 80 * f, 90 * f
    src = _scene(tmp_path, h, w, GSD / f)
    user = _fine_map(h, w)
    y0, y1, x0, x1 = RECT
    user[(y0 - 2) * f:(y1 + 2) * f, (x0 - 2) * f:(x1 + 2) * f] = 0  # all of it changes
    cmap = write_raster(tmp_path / "user.tif", user, res=GSD / f)
    model = conv_model(tmp_path / "m", gsd=GSD, tile_size=48, overlap=16)
    s = refine_raster(src, tmp_path / "o.tif", model=model, coarse=cmap, quiet=True,
                      options=RunOptions(device="cpu"))
    assert s.windows > 4
    out = _read(tmp_path / "o.tif")[0]
    y0, y1, x0, x1 = ((v + d) * f for v, d in zip(RECT, (-margin, margin, -margin, margin),
                                                  strict=True))
    outside = np.ones((h, w), bool)
    outside[y0:y1, x0:x1] = False
    np.testing.assert_array_equal(out[outside], user[outside])
    assert (out[~outside] != user[~outside]).any()
    r = (radius_for(16) + 2) * f  # the guided filter's reach
    y0, y1, x0, x1 = (v * f for v in RECT)
    assert (out[y0 + r:y1 - r, x0 + r:x1 - r] == 1).all()


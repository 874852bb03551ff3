"""The raster engine: seamless stitching, GSD, nodata, outputs, determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
import torch
from rasterio.enums import Compression
from synth import conv_model, synthetic_scene, write_raster

from idgbr_geo.engine import refine_raster, uses_refiner
from idgbr_geo.options import OutputOptions, RunOptions
from idgbr_geo.registry import load_model


def whole_image(model_path, data: np.ndarray, valid: np.ndarray | None = None, *,
                refine: bool = False, steps: int = 2, seed: int = 0) -> np.ndarray:
    """Reference: the model run once on the whole (normalised) image, in float32 (the
    stitching is exact there; in bfloat16 a window's rounding depends on its size)."""
    m = load_model(model_path, "cpu")
    x = m.card.normalization.apply(data, data.dtype)
    if valid is not None:
        x[:, ~valid] = 0
    img = torch.from_numpy(x)[None]
    with torch.inference_mode():
        p = m.segmentor.predict(img)
        if refine:
            p = m.refiner.refine(img, p, steps=steps, seed=seed, origins=[(0, 0)])
    return p[0].numpy()


def read_probs(path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read()


@pytest.mark.parametrize("shape", [(150, 170), (64, 64), (203, 97), (40, 300)])
def test_stitched_equals_whole_image_coarse(tmp_path, shape):
    model = conv_model(tmp_path / "m", kernel=9, tile_size=80, overlap=32)
    data = synthetic_scene(*shape, seed=shape[0])
    src = write_raster(tmp_path / "in.tif", data)
    refine_raster(src, tmp_path / "out.tif", model=model, probabilities=tmp_path / "p.tif",
                  quiet=True, options=RunOptions(coarse_only=True, device="cpu",
                                                 precision="float32"),
                  outputs=OutputOptions(probabilities_dtype="float32"))
    got = read_probs(tmp_path / "p.tif")
    ref = whole_image(model, data)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    with rasterio.open(tmp_path / "out.tif") as ds:
        assert (ds.read(1) == ref.argmax(0)).mean() > 0.999  # ties aside


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_stitched_equals_whole_image_with_refiner(tmp_path, workers):
    model = conv_model(tmp_path / "m", kernel=7, tile_size=80, overlap=32)
    data = synthetic_scene(181, 149, seed=3)
    data[:, ::16, :] = 250  # stripes: every window holds a boundary, so all are refined
    src = write_raster(tmp_path / "in.tif", data)
    summary = refine_raster(src, tmp_path / "out.tif", model=model,
                            probabilities=tmp_path / "p.tif", quiet=True,
                            options=RunOptions(steps=2, seed=7, device="cpu",
                                               model_workers=workers, precision="float32"),
                            outputs=OutputOptions(probabilities_dtype="float32"))
    assert summary.refined == summary.windows > 1
    ref = whole_image(model, data, refine=True, steps=2, seed=7)
    np.testing.assert_allclose(read_probs(tmp_path / "p.tif"), ref, atol=1e-5, rtol=0)


def test_same_seed_same_output_bit_for_bit(tmp_path, toy_model, scene):
    outs = []
    for i, seed in enumerate([1, 1, 2]):
        out = tmp_path / f"o{i}.tif"
        refine_raster(scene, out, model=toy_model, probabilities=tmp_path / f"p{i}.tif", quiet=True,
                      options=RunOptions(seed=seed, device="cpu"))
        outs.append(read_probs(tmp_path / f"p{i}.tif"))
    assert np.array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])


def test_output_does_not_depend_on_the_number_of_model_workers(tmp_path):
    """Workers finish windows out of order; the writer stitches them in reading order, so
    the blended sums (and the files) are the same bit for bit."""
    model = conv_model(tmp_path / "m", kernel=7, tile_size=48, overlap=16)
    data = synthetic_scene(230, 190, seed=5)
    data[:, ::12, :] = 250
    src = write_raster(tmp_path / "in.tif", data)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # one network on 2 threads, or three on one thread each
    try:
        outs = []
        for workers in (1, 3):
            p = tmp_path / f"p{workers}.tif"
            s = refine_raster(src, tmp_path / f"o{workers}.tif", model=model, probabilities=p,
                              quiet=True, options=RunOptions(steps=2, seed=3, device="cpu",
                                                             model_workers=workers),
                              outputs=OutputOptions(probabilities_dtype="float32"))
            outs.append((read_probs(p), read_probs(tmp_path / f"o{workers}.tif"), s))
    finally:
        torch.set_num_threads(before)
    (p1, o1, s1), (p3, o3, s3) = outs
    assert s1.windows == s3.windows > 20 and s1.refined == s3.refined
    assert np.array_equal(p1, p3) and np.array_equal(o1, o3)
    assert torch.get_num_threads() == before  # the run gives the caller's setting back


def test_a_failing_model_worker_fails_the_run_without_output(tmp_path, toy_model, scene):
    m = load_model(toy_model, "cpu")
    calls = {"n": 0}
    predict = m.segmentor.predict

    def flaky(image):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom in a worker")
        return predict(image)

    m.segmentor.predict = flaky
    big = write_raster(tmp_path / "big.tif", synthetic_scene(400, 400))
    with pytest.raises(RuntimeError, match="boom in a worker"):
        refine_raster(big, tmp_path / "out.tif", model=m, quiet=True,
                      options=RunOptions(model_workers=2, tile_size=64, overlap=16))
    assert not (tmp_path / "out.tif").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.tif", "model", "scene.tif"]


@pytest.mark.parametrize("where", ["waiting", "between submissions"])
def test_an_interrupt_in_the_calling_thread_unwinds_without_a_hang(tmp_path, toy_model,
                                                                   monkeypatch, where):
    """Ctrl-C or SIGTERM arrive in the main thread, wherever it is. It only waits (the model
    workers run on their own threads), so the interrupt cannot leave a lock held that a
    worker needs (seen as a hung ``refine`` after SIGTERM under load); an interrupt
    between two submissions waits for the worker that began and not for the one that did
    not. Either way: the interrupt, promptly, with no output and every worker done."""
    import threading

    import idgbr_geo.engine as engine

    if where == "waiting":
        def wait(finished, began=None):
            if began is None:  # the run's wait, not the clean-up's
                raise KeyboardInterrupt
            real_wait(finished, began)

        real_wait = engine._wait_for_workers
        monkeypatch.setattr(engine, "_wait_for_workers", wait)
    else:
        real_submit = engine._ModelThreads.submit
        calls = {"n": 0}

        def submit(self, n, task):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
            real_submit(self, n, task)

        monkeypatch.setattr(engine._ModelThreads, "submit", submit)
    big = write_raster(tmp_path / "big.tif", synthetic_scene(400, 400))
    before = threading.active_count()
    done = threading.Event()
    caught: list[BaseException] = []

    def run():
        try:
            refine_raster(big, tmp_path / "out.tif", model=toy_model, quiet=True,
                          options=RunOptions(model_workers=2, tile_size=64, overlap=16))
        except BaseException as exc:  # noqa: BLE001 - the interrupt is the result
            caught.append(exc)
        done.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert done.wait(60), "the run hung after the interrupt"
    t.join()
    assert len(caught) == 1 and isinstance(caught[0], KeyboardInterrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.tif", "model"]
    busy = [th.name for th in threading.enumerate() if th.name.startswith("idgbr-model")]
    assert threading.active_count() - before <= len(busy)  # idle model threads at most


def test_output_is_georeferenced_with_classes_and_colours(tmp_path, toy_model, scene):
    out = tmp_path / "out.tif"
    refine_raster(scene, out, model=toy_model, quiet=True, options=RunOptions(device="cpu"),
                  outputs=OutputOptions(confidence=True))
    with rasterio.open(scene) as a, rasterio.open(out) as b:
        assert b.crs == a.crs and b.transform == a.transform
        assert (b.width, b.height) == (a.width, a.height)
        assert b.count == 2 and b.dtypes == ("uint8", "uint8")
        assert b.nodata == 255
        # DEFLATE (at a cheaper level than GDAL's default): every GeoTIFF reader has it
        assert b.profile["tiled"] and b.compression == Compression.deflate
        assert json.loads(b.tags()["IDGBR_CLASSES"]) == ["background", "building"]
        assert b.colormap(1)[1][:3] != b.colormap(1)[0][:3]
        assert b.descriptions[1] == "confidence"
        conf = b.read(2)
        assert conf.min() >= 127  # max of two probabilities is >= 0.5


def test_cog_output(tmp_path, toy_model):
    src = write_raster(tmp_path / "big.tif", synthetic_scene(700, 650))
    out = tmp_path / "cog.tif"
    refine_raster(src, out, model=toy_model, probabilities=tmp_path / "p.tif", quiet=True,
                  options=RunOptions(device="cpu"), outputs=OutputOptions(cog=True))
    with rasterio.open(out) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert ds.overviews(1)
        assert ds.colormap(1)[1][:3] != (0, 0, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.tif", "cog.tif", "model", "p.tif"]


def test_nodata_is_respected_and_nodata_windows_skipped(tmp_path, toy_model):
    data = synthetic_scene(200, 200)
    data[:, :, 100:] = 0
    src = write_raster(tmp_path / "in.tif", data, nodata=0)
    out = tmp_path / "out.tif"
    s = refine_raster(src, out, model=toy_model, quiet=True, options=RunOptions(device="cpu"))
    assert s.skipped > 0
    with rasterio.open(out) as ds:
        ids = ds.read(1)
    assert (ids[:, 100:] == 255).all()
    assert (ids[:, :90] != 255).all()


def test_internal_mask_is_respected(tmp_path, toy_model):
    path = write_raster(tmp_path / "in.tif", synthetic_scene(100, 120))
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "r+") as ds:
        mask = np.full((100, 120), 255, np.uint8)
        mask[:30] = 0
        ds.write_mask(mask)
    refine_raster(path, tmp_path / "out.tif", model=toy_model, quiet=True,
                  options=RunOptions(device="cpu"))
    with rasterio.open(tmp_path / "out.tif") as ds:
        ids = ds.read(1)
    assert (ids[:30] == 255).all() and (ids[30:] != 255).all()


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_other_dtypes_are_normalised_like_uint8(tmp_path, dtype):
    model = conv_model(tmp_path / "m", refiner=False)
    base = synthetic_scene(90, 90)
    conv = base.astype(np.float64) / 255.0
    data = (conv * 65535).round().astype(np.uint16) if dtype == np.uint16 else conv.astype(dtype)
    for name, arr in (("a", base), ("b", data)):
        refine_raster(write_raster(tmp_path / f"{name}.tif", arr), tmp_path / f"{name}_o.tif",
                      model=model, probabilities=tmp_path / f"{name}_p.tif", quiet=True,
                      options=RunOptions(device="cpu"),
                      outputs=OutputOptions(probabilities_dtype="float32"))
    np.testing.assert_allclose(read_probs(tmp_path / "a_p.tif"), read_probs(tmp_path / "b_p.tif"),
                               atol=1e-4)


def test_band_selection(tmp_path):
    model = conv_model(tmp_path / "m", refiner=False)
    rgb = synthetic_scene(80, 80)
    five = np.concatenate([np.zeros((1, 80, 80), np.uint8), rgb[::-1], rgb[:1]])
    write_raster(tmp_path / "rgb.tif", rgb)
    write_raster(tmp_path / "five.tif", five)
    kw = dict(model=model, quiet=True, outputs=OutputOptions(probabilities_dtype="float32"))
    refine_raster(tmp_path / "rgb.tif", tmp_path / "a.tif", probabilities=tmp_path / "pa.tif",
                  options=RunOptions(device="cpu"), **kw)
    refine_raster(tmp_path / "five.tif", tmp_path / "b.tif", probabilities=tmp_path / "pb.tif",
                  options=RunOptions(device="cpu", bands=[4, 3, 2]), **kw)
    np.testing.assert_array_equal(read_probs(tmp_path / "pa.tif"), read_probs(tmp_path / "pb.tif"))


def test_gsd_resampling_writes_on_input_grid(tmp_path, monkeypatch):
    from idgbr_geo import engine

    # bilinear back onto the input grid: the edge-aware upsampling (test_engine_native.py)
    # also smooths the probabilities within regions of one colour (here: the toy model's
    # one-pixel rings around each block), which this comparison is not about
    monkeypatch.setattr(engine, "_JOINT_UPSAMPLING", False)
    model = conv_model(tmp_path / "m", gsd=0.6, refiner=False)
    low = np.full((3, 60, 70), 60, np.uint8)  # piecewise-constant scene at 0.6 m
    low[:, 10:30, 5:25] = 200
    low[:, 35:55, 30:62] = 140
    data = np.kron(low, np.ones((1, 2, 2), np.uint8))  # the same scene at 0.3 m
    fine = write_raster(tmp_path / "fine.tif", data, res=0.3)
    coarse = write_raster(tmp_path / "coarse.tif", data[:, ::2, ::2], res=0.6)
    kw = dict(model=model, quiet=True, outputs=OutputOptions(probabilities_dtype="float32"))
    run = RunOptions(coarse_only=True, device="cpu")
    refine_raster(fine, tmp_path / "f.tif", probabilities=tmp_path / "fp.tif", options=run, **kw)
    refine_raster(coarse, tmp_path / "c.tif", probabilities=tmp_path / "cp.tif", options=run,
                  **kw)
    with rasterio.open(tmp_path / "f.tif") as f:
        assert (f.width, f.height) == (140, 120) and f.transform.a == pytest.approx(0.3)
    # the resampled run agrees with the native-GSD run, upsampled (interior, away from edges)
    a = read_probs(tmp_path / "fp.tif")[1, 4:-4, 4:-4]
    b = np.kron(read_probs(tmp_path / "cp.tif")[1], np.ones((2, 2)))[4:-4, 4:-4]
    assert np.abs(a - b).mean() < 0.05, np.abs(a - b).mean()
    # --gsd overrides what the file says: claiming 0.6 m means no resampling
    refine_raster(fine, tmp_path / "g.tif", options=RunOptions(coarse_only=True, device="cpu",
                                                               gsd=0.6), **kw)
    with rasterio.open(tmp_path / "g.tif") as g:
        assert g.width == 140


def test_user_coarse_map_is_refined(tmp_path, toy_model, scene):
    with rasterio.open(scene) as ds:
        prof = ds.profile
    coarse = np.zeros((prof["height"], prof["width"]), np.uint8)
    coarse[40:90, 30:120] = 1
    cpath = write_raster(tmp_path / "coarse.tif", coarse)
    out = tmp_path / "out.tif"
    s = refine_raster(scene, out, model=toy_model, coarse=cpath, quiet=True,
                      options=RunOptions(device="cpu"))
    assert s.refined > 0
    # coarse only with a user map reproduces it exactly
    refine_raster(scene, tmp_path / "same.tif", model=toy_model, coarse=cpath, quiet=True,
                  options=RunOptions(coarse_only=True, device="cpu"))
    with rasterio.open(tmp_path / "same.tif") as ds:
        np.testing.assert_array_equal(ds.read(1), coarse)


def test_windows_without_boundary_keep_coarse(tmp_path):
    model = conv_model(tmp_path / "m", kernel=1)  # no border effects on a flat image
    data = np.full((3, 128, 128), 60, np.uint8)
    src = write_raster(tmp_path / "flat.tif", data)
    s = refine_raster(src, tmp_path / "o.tif", model=model, quiet=True,
                      options=RunOptions(device="cpu"))
    assert s.refined == 0 and s.windows > 1


def test_no_crs_warns_and_continues(tmp_path, toy_model):
    src = write_raster(tmp_path / "nocrs.tif", synthetic_scene(70, 70), crs=None)
    with pytest.warns(UserWarning, match="no CRS") as caught:
        s = refine_raster(src, tmp_path / "o.tif", model=toy_model, quiet=True,
                          options=RunOptions(device="cpu"))
    assert s.windows >= 1
    with rasterio.open(tmp_path / "o.tif") as ds:
        assert ds.crs is None and ds.width == 70
    # the message says which GSD was assumed, and how to give the true one
    msg = str(caught[0].message)
    assert msg in s.warnings
    assert "ground sample distance is unknown: assuming the model's 0.3 m per pixel" in msg
    assert "gsd" in msg.split("per pixel")[1]
    # a GSD given: nothing is assumed
    with pytest.warns(UserWarning, match="no CRS") as caught:
        refine_raster(src, tmp_path / "g.tif", model=toy_model, quiet=True,
                      options=RunOptions(device="cpu", gsd=0.3))
    assert "assuming" not in str(caught[0].message)


def test_no_crs_assumes_the_cards_gsd_without_crs(tmp_path, toy_model):
    """A card's ``gsd_without_crs`` is the GSD of an un-georeferenced input: the run equals
    one told that GSD, the output keeps the input's grid, the warning names it."""
    card_path = toy_model
    card = json.loads(card_path.read_text())
    card["gsd_without_crs"] = 0.6
    card_path.write_text(json.dumps(card))
    src = write_raster(tmp_path / "nocrs.tif", synthetic_scene(70, 90), crs=None)
    with pytest.warns(UserWarning, match="no CRS") as caught:
        s = refine_raster(src, tmp_path / "o.tif", model=toy_model, quiet=True,
                          options=RunOptions(device="cpu"))
    msg = str(caught[0].message)
    assert "assuming the model's default for images without a CRS, 0.6 m per pixel" in msg
    assert msg in s.warnings
    with pytest.warns(UserWarning, match="no CRS") as caught:
        refine_raster(src, tmp_path / "g.tif", model=toy_model, quiet=True,
                      options=RunOptions(device="cpu", gsd=0.6))
    assert "assuming" not in str(caught[0].message)
    with pytest.warns(UserWarning, match="no CRS"):
        refine_raster(src, tmp_path / "m.tif", model=toy_model, quiet=True,
                      options=RunOptions(device="cpu", gsd=0.3))
    a, b, c = _classes(tmp_path / "o.tif"), _classes(tmp_path / "g.tif"), _classes(
        tmp_path / "m.tif")
    assert a.shape == (70, 90)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()  # resampled 2x: not the model-GSD run
    # a file with a CRS keeps its own pixel size
    geo = write_raster(tmp_path / "geo.tif", synthetic_scene(70, 90))
    refine_raster(geo, tmp_path / "geo_o.tif", model=toy_model, quiet=True,
                  options=RunOptions(device="cpu"))
    np.testing.assert_array_equal(_classes(tmp_path / "geo_o.tif"), c)


def _classes(path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(1)


@pytest.mark.parametrize("res", [0.25, 0.3])  # at the model's GSD and resampled
def test_nan_speck_without_nodata_tag_stays_a_speck(tmp_path, res):
    model = conv_model(tmp_path / "m", gsd=0.25)
    clean = synthetic_scene(150, 170).astype(np.float32) / 255
    speck = clean.copy()
    speck[:, 70:73, 80:83] = np.nan
    kw = dict(model=model, quiet=True, options=RunOptions(device="cpu"))
    refine_raster(write_raster(tmp_path / "a.tif", clean, res=res), tmp_path / "ao.tif", **kw)
    refine_raster(write_raster(tmp_path / "b.tif", speck, res=res), tmp_path / "bo.tif", **kw)
    a, b = _classes(tmp_path / "ao.tif"), _classes(tmp_path / "bo.tif")
    # the speck is nodata in the output (resampled: its rim may take its neighbours' class)
    assert b[71, 81] == 255 and (b[70:73, 80:83] == 255).sum() >= 5
    near = np.zeros(a.shape, bool)
    near[70 - 8:73 + 8, 80 - 8:83 + 8] = True  # the networks' reach around the speck
    np.testing.assert_array_equal(a[~near], b[~near])
    assert (b[near] != 255).sum() > 0.9 * (near.sum() - 9)


def test_mostly_nan_scene_is_nodata_there(tmp_path, toy_model):
    data = synthetic_scene(120, 140).astype(np.float32) / 255
    data[:, :, 40:] = np.nan
    s = refine_raster(write_raster(tmp_path / "n.tif", data), tmp_path / "o.tif", model=toy_model,
                      quiet=True, options=RunOptions(device="cpu"))
    ids = _classes(tmp_path / "o.tif")
    assert (ids[:, 40:] == 255).all() and (ids[:, :40] != 255).all()
    assert s.skipped > 0


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_all_non_finite_scene_gives_an_all_nodata_output(tmp_path, toy_model, bad):
    """Like a scene that is all nodata: every window skipped, an output of nodata only."""
    data = np.full((3, 90, 100), bad, np.float32)
    s = refine_raster(write_raster(tmp_path / "n.tif", data), tmp_path / "o.tif", model=toy_model,
                      quiet=True, options=RunOptions(device="cpu"))
    assert s.skipped == s.windows > 0
    assert (_classes(tmp_path / "o.tif") == 255).all()


def _value_range_warnings(record) -> list:
    from idgbr_geo.tiling import ValueRangeWarning

    return [w for w in record if issubclass(w.category, ValueRangeWarning)]


@pytest.mark.parametrize("dtype", [np.float32, np.uint32, np.int32])
def test_values_outside_the_cards_range_warn_once(tmp_path, toy_model, dtype):
    """0..255 floats on a card for 0..1 floats, or a type the card declares no range for."""
    data = synthetic_scene(200, 200).astype(dtype)  # several windows
    import warnings

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        s = refine_raster(write_raster(tmp_path / "v.tif", data), tmp_path / "o.tif",
                          model=toy_model, quiet=True, options=RunOptions(device="cpu"))
    found = _value_range_warnings(record)
    assert s.windows > 1 and len(found) == 1, [str(w.message) for w in found]
    assert "v.tif" in str(found[0].message)
    assert s.warnings == [str(found[0].message)]  # found while reading windows, still kept


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_values_that_fit_the_card_do_not_warn(tmp_path, toy_model, dtype):
    base = synthetic_scene(200, 200)
    data = {np.uint8: base, np.uint16: base.astype(np.uint16) * 257,
            np.float32: base.astype(np.float32) / 255}[dtype]
    import warnings

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        refine_raster(write_raster(tmp_path / "v.tif", data), tmp_path / "o.tif", model=toy_model,
                      quiet=True, options=RunOptions(device="cpu"))
    assert not _value_range_warnings(record)


@pytest.mark.parametrize("res", [100.0, 1000.0, 1e300, 1e-300, 0.001])
def test_gsd_far_from_the_models_is_refused(tmp_path, res):
    from idgbr_geo.errors import InputError

    model = conv_model(tmp_path / "m", gsd=0.25, refiner=False)
    src = write_raster(tmp_path / "g.tif", synthetic_scene(60, 60), res=res)
    with pytest.raises(InputError, match=r"g\.tif has .* m pixels but the model works at "
                                         r"0\.25 m.*give the true one with gsd$"):
        refine_raster(src, tmp_path / "o.tif", model=model, quiet=True,
                      options=RunOptions(device="cpu"))
    assert not (tmp_path / "o.tif").exists()
    # with the true pixel size the same file runs
    refine_raster(src, tmp_path / "o.tif", model=model, quiet=True,
                  options=RunOptions(device="cpu", gsd=0.3))
    with pytest.raises(InputError, match="the given GSD is 50 m"):
        refine_raster(src, tmp_path / "p.tif", model=model, quiet=True,
                      options=RunOptions(device="cpu", gsd=50.0))


def test_unusable_pixel_size_in_the_file_is_a_clear_error(tmp_path):
    from idgbr_geo.errors import InputError

    model = conv_model(tmp_path / "m", gsd=0.25, refiner=False)
    src = write_raster(tmp_path / "g.tif", synthetic_scene(40, 40), res=1.7e308)  # sum: inf
    with pytest.raises(InputError, match="no usable pixel size.*give the true one with gsd$"):
        refine_raster(src, tmp_path / "o.tif", model=model, quiet=True,
                      options=RunOptions(device="cpu"))


@pytest.mark.parametrize(("option", "value", "message"), [
    ("tile_size", 0, "tile_size must be at least 1"),
    ("overlap", -16, "overlap must be at least 0"),
    ("steps", -1, "steps must be at least 0"),
    ("batch_size", 0, "batch_size must be at least 1"),
    ("model_workers", 0, "model_workers must be at least 1"),
    ("seed", -1, "seed must be at least 0"),
    ("gsd", 0.0, "gsd must be a finite number"),
    ("gsd", float("nan"), "gsd must be a finite number"),
    ("gsd", float("inf"), "gsd must be a finite number"),
    ("gsd", -1.0, "gsd must be a finite number"),
])
def test_out_of_range_options_are_refused_by_the_library(tmp_path, toy_model, scene, option,
                                                         value, message):
    from idgbr_geo.errors import UserError

    with pytest.raises(UserError, match=message) as info:
        refine_raster(scene, tmp_path / "o.tif", model=toy_model, quiet=True,
                      options=RunOptions(device="cpu", **{option: value}))
    assert "--" not in str(info.value)  # the library speaks of its own arguments
    assert not (tmp_path / "o.tif").exists()


@pytest.mark.parametrize("kind", ["ground control points", "RPCs"])
def test_sensor_georeferenced_input_runs_at_its_gsd_and_keeps_it(tmp_path, kind):
    from synth import write_gcp_raster, write_rpc_raster

    from idgbr_geo.errors import InputError
    from idgbr_geo.tiling import NoCRSWarning
    from idgbr_geo.vectorize import vectorize_raster

    # 0.6 m pixels by the sensor model on a 0.3 m model: resampled, not run at the GSD
    # assumed for inputs without any georeferencing
    model = conv_model(tmp_path / "m", gsd=0.3, refiner=False)
    write = write_gcp_raster if kind == "ground control points" else write_rpc_raster
    src = write(tmp_path / "g.tif", synthetic_scene(64, 80), gsd=0.6)
    with pytest.warns(NoCRSWarning, match=f"by {kind} only: running at their pixel size, "
                                          "0.6 m"):
        refine_raster(src, tmp_path / "o.tif", model=model, quiet=True,
                      options=RunOptions(device="cpu"),
                      outputs=OutputOptions(confidence=True, cog=True))
    with rasterio.open(src) as a, rasterio.open(tmp_path / "o.tif") as b:
        assert (b.width, b.height) == (a.width, a.height) and b.crs is None
        if kind == "RPCs":
            assert b.rpcs is not None and b.rpcs.to_dict() == a.rpcs.to_dict()
        else:
            assert b.gcps[1] == a.gcps[1]
            assert [(p.row, p.col, p.x, p.y) for p in b.gcps[0]] == \
                [(p.row, p.col, p.x, p.y) for p in a.gcps[0]]
    # polygons need a map grid: one clear error that says how to get one
    with pytest.raises(InputError, match=f"by {kind} only.*gdalwarp"):
        vectorize_raster(tmp_path / "o.tif", tmp_path / "o.gpkg")
    assert not (tmp_path / "o.gpkg").exists()


def test_vector_output_of_an_input_without_crs_fails_before_the_run(tmp_path, monkeypatch):
    from idgbr_geo import engine
    from idgbr_geo.errors import InputError
    from idgbr_geo.tiling import NoCRSWarning

    def no_run(*args, **kwargs):
        raise AssertionError("the scene was run although its polygons cannot be placed")

    monkeypatch.setattr(engine, "_run", no_run)
    model = conv_model(tmp_path / "m", refiner=False)
    src = write_raster(tmp_path / "nocrs.tif", synthetic_scene(40, 40), crs=None)
    with pytest.raises(InputError, match="nocrs.tif has no CRS: cannot georeference vector"), \
            pytest.warns(NoCRSWarning):
        refine_raster(src, tmp_path / "o.tif", model=model, vector=tmp_path / "o.gpkg",
                      quiet=True, options=RunOptions(device="cpu"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "nocrs.tif"]


@pytest.mark.parametrize(("refiner", "options", "refines"), [
    (True, RunOptions(), True), (True, RunOptions(steps=0), False),
    (True, RunOptions(coarse_only=True), False), (False, RunOptions(), False)])
def test_uses_refiner_says_when_the_map_is_the_coarse_map(tmp_path, scene, refiner, options,
                                                          refines) -> None:
    m = load_model(conv_model(tmp_path / "m", refiner=refiner), "cpu")
    assert uses_refiner(m, options) is refines
    refine_raster(scene, tmp_path / "a.tif", model=m, options=options)
    refine_raster(scene, tmp_path / "c.tif", model=m, options=RunOptions(coarse_only=True))
    with rasterio.open(tmp_path / "a.tif") as a, rasterio.open(tmp_path / "c.tif") as c:
        assert (a.tags()["IDGBR_STEPS"] != "0") is refines
        if not refines:
            np.testing.assert_array_equal(a.read(), c.read())

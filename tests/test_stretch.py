"""Inputs that do not use the model's value range: the per-band percentile stretch."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner
from synth import conv_model, synthetic_scene, write_raster

from idgbr_geo.cli import main
from idgbr_geo.engine import refine_raster
from idgbr_geo.errors import UserError
from idgbr_geo.options import OutputOptions, RunOptions
from idgbr_geo.stretch import plan_stretch
from idgbr_geo.tiling import ValueRangeWarning


def full_range_scene(h: int = 96, w: int = 96) -> np.ndarray:
    """An 8-bit scene whose 0.1 and 99.9 percentiles are exactly 0 and 255 per band,
    so the stretch of its linear 11-bit copy gives back the 8-bit values exactly."""
    img = synthetic_scene(h, w)
    img[:, :4, :] = 0
    img[:, -4:, :] = 255
    return img


def plan(path, value_range=None):
    with rasterio.open(path) as ds:
        return plan_stretch(ds, list(range(1, ds.count + 1)), 65535.0 if ds.dtypes[0] ==
                            "uint16" else 255.0 if ds.dtypes[0] == "uint8" else 1.0,
                            value_range)


def test_plan_only_for_inputs_that_do_not_use_the_range(tmp_path):
    img = full_range_scene()
    # 8-bit: never; 16-bit over its whole range: no; 11-bit in uint16: yes
    assert plan(write_raster(tmp_path / "u8.tif", img)) == (None, None)
    full = write_raster(tmp_path / "full.tif", img.astype(np.uint16) * 257)
    assert plan(full) == (None, None)
    st, why = plan(write_raster(tmp_path / "u11.tif", img.astype(np.uint16) * 8))
    assert st is not None and "99.9% of its values lie below 2040" in why
    assert st.low == (0.0,) * 3 and st.high == (2040.0,) * 3
    # reflectance scaled to 0..10000 in float32 on a card for 0..1 floats
    st, why = plan(write_raster(tmp_path / "f.tif", img.astype(np.float32) * 10000 / 255))
    assert st is not None and "do not fit" in why
    assert st.apply(np.array([[[0.0, 10000.0, 20000.0]]] * 3, np.float32)).tolist() == \
        [[[0.0, 1.0, 1.0]]] * 3
    # the user's range wins, for every band, even on 8-bit data
    st, why = plan(write_raster(tmp_path / "u8b.tif", img), value_range=(10, 200))
    assert st.low == (10.0,) * 3 and st.high == (200.0,) * 3 and why is None


def test_nodata_is_left_out_of_the_sample(tmp_path):
    img = full_range_scene().astype(np.uint16) * 8
    img[:, :, :48] = 65535  # half the scene nodata, at the top of the range
    st, _ = plan(write_raster(tmp_path / "nd.tif", img, nodata=65535))
    assert st is not None and st.high == (2040.0,) * 3


def test_engine_stretches_an_11_bit_input_to_the_8_bit_result(tmp_path):
    model = conv_model(tmp_path / "m", refiner=False)
    img = full_range_scene()
    kw = dict(model=model, quiet=True, outputs=OutputOptions(probabilities_dtype="float32"),
              options=RunOptions(device="cpu"))
    refine_raster(write_raster(tmp_path / "u8.tif", img), tmp_path / "a.tif",
                  probabilities=tmp_path / "pa.tif", **kw)
    u11 = write_raster(tmp_path / "u11.tif", img.astype(np.uint16) * 8)
    with pytest.warns(ValueRangeWarning, match="stretching each band"):
        summary = refine_raster(u11, tmp_path / "b.tif", probabilities=tmp_path / "pb.tif",
                                **kw)
    assert any("stretching" in w for w in summary.warnings)
    # the same mapping given by hand: no warning, the same output
    refine_raster(u11, tmp_path / "c.tif", probabilities=tmp_path / "pc.tif",
                  **{**kw, "options": RunOptions(device="cpu", value_range=(0, 2040))})
    with rasterio.open(tmp_path / "pa.tif") as a, rasterio.open(tmp_path / "pb.tif") as b, \
            rasterio.open(tmp_path / "pc.tif") as c:
        pa, pb, pc = a.read(), b.read(), c.read()
    np.testing.assert_allclose(pb, pa, atol=1e-4)
    np.testing.assert_array_equal(pb, pc)
    # kept as it is (the old behaviour): the network sees a dark image, another map
    refine_raster(u11, tmp_path / "d.tif", probabilities=tmp_path / "pd.tif",
                  **{**kw, "options": RunOptions(device="cpu", value_range=(0, 65535))})
    with rasterio.open(tmp_path / "pd.tif") as d:
        assert np.abs(d.read() - pa).max() > 0.05


@pytest.mark.parametrize("bad", [(5, 1), (0, float("nan")), (1, 2, 3)])
def test_value_range_is_checked(bad):
    with pytest.raises(UserError, match="value_range must be two finite numbers"):
        RunOptions(value_range=bad)


def test_cli_value_range(tmp_path, toy_model):
    img = write_raster(tmp_path / "in.tif", full_range_scene().astype(np.uint16) * 8)
    runner = CliRunner()
    res = runner.invoke(main, ["refine", str(img), str(tmp_path / "o.tif"), "--model",
                               str(toy_model), "-q", "--value-range", "0,x"])
    assert res.exit_code != 0 and "LOW,HIGH" in res.output
    res = runner.invoke(main, ["refine", str(img), str(tmp_path / "o.tif"), "--model",
                               str(toy_model), "-q", "--value-range", "9,1"])
    assert res.exit_code != 0 and "Error: --value-range must be two finite" in res.output
    assert not (tmp_path / "o.tif").exists()
    res = runner.invoke(main, ["refine", str(img), str(tmp_path / "o.tif"), "--model",
                               str(toy_model), "-q", "--value-range", "0,2040"])
    assert res.exit_code == 0, res.output

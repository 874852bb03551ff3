"""`idgbr-geo preview`: stretch, boundaries, legend, windows, HTML reports and errors."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner
from PIL import Image
from rasterio.transform import from_origin

from idgbr_geo.cards import hex_to_rgb
from idgbr_geo.cli import main
from idgbr_geo.errors import InputError
from idgbr_geo.preview import (
    LINE_COLORS,
    PreviewWindow,
    boundaries,
    render_preview,
    stretch,
    write_html_report,
)

CRS = "EPSG:32631"
TRANSFORM = from_origin(500000.0, 5000000.0, 0.5, 0.5)
NAMES = ["background", "building"]
COLORS = ["#000000", "#e41a1c"]
H, W = 60, 80


def write_image(path: Path, data: np.ndarray, transform=TRANSFORM) -> Path:
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1],
                   count=data.shape[0], dtype=data.dtype.name, crs=CRS, transform=transform)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
    return path


def write_map(path: Path, data: np.ndarray, tags: bool = True, transform=TRANSFORM) -> Path:
    profile = dict(driver="GTiff", width=data.shape[1], height=data.shape[0], count=1,
                   dtype="uint8", crs=CRS, transform=transform, nodata=255)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data.astype(np.uint8), 1)
        if tags:
            ds.update_tags(IDGBR_CLASSES=json.dumps(NAMES), IDGBR_COLORS=json.dumps(COLORS))
    return path


def step(col: int) -> np.ndarray:
    """Class 1 left of column ``col``."""
    a = np.zeros((H, W), np.uint8)
    a[:, :col] = 1
    return a


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    img = (rng.random((4, H, W)) * 3000 + 1000).astype(np.uint16)  # 4-band uint16
    return dict(
        image=write_image(tmp_path / "img.tif", img),
        refined=write_map(tmp_path / "ref.tif", step(30)),
        coarse=write_map(tmp_path / "coarse.tif", step(40)),
        truth=write_map(tmp_path / "truth.tif", step(50), tags=False),
    )


def test_stretch_maps_percentiles_to_full_range():
    band = np.arange(100, dtype=np.float32).reshape(1, 10, 10) * 40 + 7  # any scale
    out = stretch(band, np.ones((10, 10), bool), (0, 100))
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    flat = stretch(np.full((1, 4, 4), 5, np.int16), np.ones((4, 4), bool))
    assert (flat == 0).all()  # constant band: no division by zero
    nan = np.array([[[np.nan, 1.0], [2.0, 3.0]]])
    assert stretch(nan, np.ones((2, 2), bool))[0, 0, 0] == 0


def test_boundaries_are_thin_and_skip_nodata():
    lab = np.array([[0, 0, 1, 1],
                    [0, 0, 1, 1],
                    [255, 255, 1, 1]])
    b = boundaries(lab)
    expected = np.array([[0, 1, 0, 0],
                         [0, 1, 0, 0],
                         [0, 0, 0, 0]], bool)
    assert (b == expected).all()


def test_preview_draws_each_map_in_its_colour(files):
    img = render_preview(files["image"], files["refined"], coarse=files["coarse"],
                         truth=files["truth"], zoom=1)
    assert img.width >= W and img.height > H  # legend strip below the map
    px = np.asarray(img)[:H, :W]
    # boundary of a step at column c is drawn on column c - 1
    for name, col in (("refined", 29), ("coarse", 39), ("truth", 49)):
        assert (px[:, col] == hex_to_rgb(LINE_COLORS[name])).all(), name
    untouched = px[:, 60]
    for color in LINE_COLORS.values():
        assert not (untouched == hex_to_rgb(color)).all(axis=1).any()
    legend = np.asarray(img)[H:]
    assert (legend == hex_to_rgb(COLORS[1])).all(axis=2).any()  # "building" swatch


def test_window_crop_is_full_resolution(files):
    img = render_preview(files["image"], files["refined"], window="20,10,30,20", zoom=1)
    px = np.asarray(img)[:20, :30]
    assert (px[:, 9] == hex_to_rgb(LINE_COLORS["refined"])).all()  # column 29 of the scene
    zoomed = render_preview(files["image"], files["refined"], window="20,10,30,20")
    assert zoomed.width >= 30 * 8  # small crops are enlarged for reading
    with pytest.raises(InputError, match="beyond the image"):
        render_preview(files["image"], files["refined"], window="70,0,20,20")
    with pytest.raises(InputError, match="col_off,row_off,width,height"):
        PreviewWindow.parse("1,2,3")


def test_whole_scene_is_downsampled_to_max_size(tmp_path):
    big_h, big_w = 400, 900
    img = np.random.default_rng(1).random((1, big_h, big_w)).astype(np.float32)
    lab = np.zeros((big_h, big_w), np.uint8)
    lab[:, :450] = 1
    image = write_image(tmp_path / "grey.tif", img)
    refined = write_map(tmp_path / "r.tif", lab, tags=False)
    out = render_preview(image, refined, max_size=300, zoom=1)
    assert out.width == 360 or out.width == 300  # legend may be wider than the map
    px = np.asarray(out)
    assert (px[:133, 149] == hex_to_rgb(LINE_COLORS["refined"])).all()


def test_cli_writes_png_atomically_and_refuses_to_overwrite(files, tmp_path):
    out = tmp_path / "p.png"
    args = ["preview", str(files["image"]), "--refined", str(files["refined"]),
            "--coarse", str(files["coarse"]), "--truth", str(files["truth"]),
            "--bands", "3,2,1", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    with Image.open(out) as im:
        assert im.format == "PNG" and im.height > H
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "already exists" in res.output
    assert CliRunner().invoke(main, [*args, "--overwrite"]).exit_code == 0


@pytest.mark.parametrize("case", ["missing", "not_raster", "other_grid", "bad_window",
                                  "bad_bands", "no_output"])
def test_cli_bad_inputs_one_line_no_file(files, tmp_path, case):
    image, refined = str(files["image"]), str(files["refined"])
    extra: list[str] = []
    out = tmp_path / "out.png"
    if case == "missing":
        image = str(tmp_path / "nope.tif")
    elif case == "not_raster":
        (tmp_path / "junk.tif").write_bytes(b"not a tiff")
        refined = str(tmp_path / "junk.tif")
    elif case == "other_grid":
        refined = str(write_map(tmp_path / "moved.tif", step(30),
                                transform=from_origin(500100.0, 5000000.0, 0.5, 0.5)))
    elif case == "bad_window":
        extra = ["--window", "0,0,500,10"]
    elif case == "bad_bands":
        extra = ["--bands", "7"]
    args = ["preview", image, "--refined", refined, *extra]
    res = CliRunner().invoke(main, args if case == "no_output" else [*args, str(out)])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("Error: ") and res.output.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob(".out.partial*"))


def test_html_report_for_a_folder(tmp_path):
    for sub in ("images", "refined", "coarse", "truth"):
        (tmp_path / sub).mkdir()
    rgb = (np.random.default_rng(2).random((3, H, W)) * 255).astype(np.uint8)
    for i, name in enumerate(("north", "south")):
        write_image(tmp_path / "images" / f"{name}.tif", rgb)
        write_map(tmp_path / "refined" / f"{name}.tif", step(30 + i))
        write_map(tmp_path / "coarse" / f"{name}.tif", step(35))
        write_map(tmp_path / "truth" / f"{name}.tif", step(31), tags=False)
    write_image(tmp_path / "images" / "lonely.tif", rgb)  # no refined map: skipped
    out = tmp_path / "report.html"
    res = CliRunner().invoke(main, [
        "preview", str(tmp_path / "images"), "--refined", str(tmp_path / "refined"),
        "--coarse", str(tmp_path / "coarse"), "--truth", str(tmp_path / "truth"),
        "--html", str(out)])
    assert res.exit_code == 0, res.output
    text = out.read_text()
    assert "<h2>north</h2>" in text and "<h2>south</h2>" in text and "lonely" not in text
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)
    assert len(images) == 2
    with Image.open(io.BytesIO(base64.b64decode(images[0]))) as im:
        assert im.format == "PNG"
    assert text.count("IoU_imp k=1") == 3  # two scenes + the pooled table
    assert "All scenes (pixels pooled)" in text
    assert "src='http" not in text  # self-contained
    # a folder INPUT with OUT.png is refused
    res = CliRunner().invoke(main, ["preview", str(tmp_path / "images"), "--refined",
                                    str(tmp_path / "refined"), str(tmp_path / "x.png")])
    assert res.exit_code == 2 and "--html" in res.output


def test_html_report_single_scene_without_truth(files, tmp_path):
    out = write_html_report(files["image"], tmp_path / "one.html", refined=files["refined"])
    text = out.read_text()
    assert text.count("data:image/png;base64,") == 1 and "<pre>" not in text


def test_vector_truth_is_drawn_on_the_preview_grid(files, tmp_path):
    import geopandas as gpd
    import shapely

    x0, y0, px = TRANSFORM.c, TRANSFORM.f, TRANSFORM.a
    box = shapely.box(x0, y0 - H * px, x0 + 50 * px, y0)  # class 1 on columns 0-49
    gpd.GeoDataFrame({"class": ["building"]}, geometry=[box], crs=CRS).to_file(
        tmp_path / "truth.gpkg", driver="GPKG")
    img = render_preview(files["image"], files["refined"], truth=tmp_path / "truth.gpkg",
                         zoom=1)
    px_ = np.asarray(img)[:H, :W]
    assert (px_[:, 49] == hex_to_rgb(LINE_COLORS["truth"])).all()

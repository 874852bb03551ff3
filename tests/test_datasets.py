"""Training chips from rasters, vector labels and torchgeo datasets: GSD, resampling, ignore."""

from __future__ import annotations

import math
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from synth import write_raster

from idgbr_geo.datasets import (
    IGNORE,
    ChipSet,
    chip_origins,
    chips_from_rasters,
    chips_from_torchgeo,
    chips_from_vectors,
    parse_label_map,
    split_by_scene,
)
from idgbr_geo.errors import InputError, OutputError, UserError

ORIGIN = (500000.0, 4000000.0)  # UTM 33N central meridian: scale factor 0.9996


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(20, 230, (3, h, w)).astype(np.uint8)


def scene_pair(folder: Path, name: str, label: np.ndarray, *, res: float = 0.5,
               crs: str = "EPSG:32633", origin=ORIGIN, image: np.ndarray | None = None,
               image_nodata=None, label_nodata=None) -> tuple[Path, Path]:
    (folder / "img").mkdir(exist_ok=True)
    (folder / "lab").mkdir(exist_ok=True)
    h, w = label.shape
    img = rgb(h, w) if image is None else image
    a = write_raster(folder / "img" / f"{name}.tif", img, crs=crs, res=res, origin=origin,
                     nodata=image_nodata)
    b = write_raster(folder / "lab" / f"{name}.tif", label.astype(np.uint8), crs=crs, res=res,
                     origin=origin, nodata=label_nodata)
    return a, b


def test_chip_origins_cover_the_edges():
    assert chip_origins(100, 64, 64) == [0, 36]
    assert chip_origins(64, 64, 32) == [0]
    assert chip_origins(50, 64, 64) == [0]
    assert chip_origins(160, 64, 48) == [0, 48, 96]


# ----------------------------------------------------------------------------- rasters

def test_rasters_resampled_to_model_gsd(tmp_path):
    label = np.zeros((200, 160), np.uint8)
    label[40:120, 20:100] = 1  # 40 x 40 m building at 0.5 m
    scene_pair(tmp_path, "a", label, image=np.full((3, 200, 160), 77, np.uint8))
    chips = chips_from_rasters(tmp_path / "img", tmp_path / "lab", classes="background,building",
                               gsd=1.0, chip_size=32)
    # 0.5 m -> 1 m: 100 x 80 pixels -> 4 x 3 chips (last ones aligned to the far edge)
    assert chips.images.shape == (12, 3, 32, 32) and chips.images.dtype == np.uint8
    assert chips.labels.shape == (12, 32, 32) and chips.labels.dtype == np.uint8
    assert np.all(chips.images == 77)  # averaging a constant keeps it
    assert chips.gsd == 1.0 and chips.classes == ["background", "building"]
    assert set(chips.scene) == {"a"}
    # the building covers 40 x 40 of the 100 x 80 one-metre pixels: rows 20-59, cols 10-49
    first = chips.labels[0]  # chip at (0, 0)
    assert first[20:32, 10:32].min() == 1 and first[:19].max() == 0 and first[:, :9].max() == 0
    # no resampling when the GSD matches (within 1 %) and native GSD by default
    native = chips_from_rasters(tmp_path / "img", tmp_path / "lab", chip_size=50)
    assert native.gsd == pytest.approx(0.5 / 0.9996, rel=1e-3)
    assert native.classes == ["background", "class_1"]
    assert int((native.labels == 1).sum()) >= 80 * 80  # overlapping edge chips count twice


def test_webmercator_scene_resampled_by_ground_gsd(tmp_path):
    from pyproj import Transformer

    x, y = Transformer.from_crs(4326, 3857, always_xy=True).transform(10.0, 60.0)
    label = np.zeros((256, 256), np.uint8)
    label[:, 128:] = 1
    scene_pair(tmp_path, "m", label, res=1.0, crs="EPSG:3857", origin=(x, y))
    # 1 m map pixels are ~0.5 m on the ground at 60 deg N: 256 px -> ~128 one-metre pixels
    chips = chips_from_rasters(tmp_path / "img", tmp_path / "lab", gsd=1.0, chip_size=64)
    assert len(chips) == 4  # 2 x 2 chips, not 4 x 4 as map units would give
    assert chips.labels[0].max() == 0 and chips.labels[1].min() == 1
    native = chips_from_rasters(tmp_path / "img", tmp_path / "lab", chip_size=64)
    assert native.gsd == pytest.approx(0.5, rel=0.01) and len(native) == 16


def test_geographic_scene_becomes_square_ground_pixels(tmp_path):
    res = 1e-5  # ~0.79 m across and ~1.11 m down at 45 deg
    label = np.zeros((100, 140), np.uint8)
    scene_pair(tmp_path, "g", label, res=res, crs="EPSG:4326", origin=(10.0, 45.0005))
    chips = chips_from_rasters(tmp_path / "img", tmp_path / "lab", gsd=0.5, chip_size=400,
                               classes=["bg", "fg"])
    valid = chips.labels[0] != IGNORE
    rows, cols = np.flatnonzero(valid.any(1)), np.flatnonzero(valid.any(0))
    assert len(cols) == pytest.approx(140 * 0.787 / 0.5, abs=2)
    assert len(rows) == pytest.approx(100 * 1.111 / 0.5, abs=2)


def test_label_raster_on_another_grid_is_warped(tmp_path):
    image = write_raster(tmp_path / "i.tif", rgb(80, 80), res=1.0)
    fine = np.zeros((160, 160), np.uint8)
    fine[40:120, 40:80] = 1  # metres 20-60 down, 20-40 across
    (tmp_path / "l").mkdir()
    write_raster(tmp_path / "l" / "i.tif", fine, res=0.5)
    chips = chips_from_rasters(image, tmp_path / "l", chip_size=80, gsd=1.0)
    expected = np.zeros((80, 80), np.uint8)
    expected[20:60, 20:40] = 1
    np.testing.assert_array_equal(chips.labels[0], expected)


def test_nodata_ignored_classes_and_label_map(tmp_path):
    img = rgb(64, 64)
    img[:, :, :16] = 0  # no imagery on the left quarter
    label = np.ones((64, 64), np.uint8) * 2
    label[:32] = 1
    label[60:] = 9  # the label raster's nodata
    scene_pair(tmp_path, "n", label, image=img, image_nodata=0, label_nodata=9)
    chips = chips_from_rasters(tmp_path / "img", tmp_path / "lab", chip_size=64,
                               classes="background,building,unlabeled",
                               ignore_classes=["unlabeled"])
    lab = chips.labels[0]
    assert np.all(lab[:, :16] == IGNORE)  # image nodata
    assert np.all(lab[60:] == IGNORE)  # label nodata
    assert np.all(lab[32:60, 16:] == IGNORE)  # ignored class 2
    assert np.all(lab[:32, 16:] == 1)
    assert chips.classes == ["background", "building", "unlabeled"]
    mapped = chips_from_rasters(tmp_path / "img", tmp_path / "lab", chip_size=64,
                                classes="background,building", label_map={2: 0})
    assert np.all(mapped.labels[0][32:60, 16:] == 0)


def test_out_of_range_labels_and_empty_chips(tmp_path):
    label = np.zeros((64, 64), np.uint8)
    label[5, 5] = 7
    scene_pair(tmp_path, "x", label)
    with pytest.raises(InputError, match=r"label values \[7\]"):
        chips_from_rasters(tmp_path / "img", tmp_path / "lab", classes="a,b", chip_size=32)
    with pytest.raises(InputError, match="no training chips"):
        chips_from_rasters(tmp_path / "img", tmp_path / "lab", classes="a,b", chip_size=32,
                           label_map={0: 255, 7: 255})
    # chips that are entirely ignored are dropped, the others kept
    kept = chips_from_rasters(tmp_path / "img", tmp_path / "lab", classes="a,b", chip_size=32,
                              label_map={7: 255})
    assert len(kept) == 4 and kept.labels[0][5, 5] == IGNORE


def test_png_without_georeferencing(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    (tmp_path / "nod").mkdir()
    img, lab = rgb(60, 60), np.zeros((60, 60), np.uint8)
    lab[:, 30:] = 1
    nod = np.zeros((60, 60), np.uint8)
    nod[:10] = 1
    for folder, arr, suffix in (("img", img, ".jpg"), ("lab", lab, ".png"), ("nod", nod, ".png")):
        driver = "JPEG" if suffix == ".jpg" else "PNG"
        arr3 = arr if arr.ndim == 3 else arr[None]
        with rasterio.open(tmp_path / folder / f"t{suffix}", "w", driver=driver, width=60,
                           height=60, count=arr3.shape[0], dtype="uint8") as dst:
            dst.write(arr3)
    chips = chips_from_rasters(tmp_path / "img", tmp_path / "lab", source_gsd=1.0, gsd=2.0,
                               chip_size=30, nodata_masks=tmp_path / "nod")
    assert chips.images.shape == (1, 3, 30, 30) and chips.gsd == 2.0
    assert np.all(chips.labels[0][:5] == IGNORE)
    assert np.all(chips.labels[0][5:, :15] == 0) and np.all(chips.labels[0][5:, 15:] == 1)
    with pytest.raises(InputError, match="give source_gsd"):
        chips_from_rasters(tmp_path / "img", tmp_path / "lab", gsd=2.0, chip_size=30)
    nogsd = chips_from_rasters(tmp_path / "img", tmp_path / "lab", chip_size=30)
    assert math.isnan(nogsd.gsd) and len(nogsd) == 4


def test_bad_raster_inputs(tmp_path):
    scene_pair(tmp_path, "a", np.zeros((40, 40), np.uint8))
    with pytest.raises(InputError, match="does not exist"):
        chips_from_rasters(tmp_path / "nope", tmp_path / "lab")
    with pytest.raises(InputError, match="no label raster"):
        chips_from_rasters(tmp_path / "img", tmp_path)  # folder without a matching name
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.tif").write_text("not a raster")
    with pytest.raises(InputError, match="not a readable raster"):
        chips_from_rasters(tmp_path / "img", tmp_path / "bad")
    write_raster(tmp_path / "f.tif", np.zeros((3, 40, 40), np.float32))
    with pytest.raises(InputError, match="float32"):
        chips_from_rasters(tmp_path / "f.tif", [tmp_path / "lab" / "a.tif"])
    with pytest.raises(UserError, match="two distinct"):
        chips_from_rasters(tmp_path / "img", tmp_path / "lab", classes="only")
    with pytest.raises(InputError, match="band 5"):
        chips_from_rasters(tmp_path / "img", tmp_path / "lab", bands=[1, 5])
    with pytest.raises(UserError, match="RAW=CLASS_ID"):
        parse_label_map("255:1")
    assert parse_label_map("255=1,0=255") == {255: 1, 0: 255}


# ----------------------------------------------------------------------------- vectors

def test_vector_labels_reprojected_and_rasterized(tmp_path):
    image = write_raster(tmp_path / "v.tif", rgb(100, 100), res=1.0)
    from pyproj import Transformer

    to_ll = Transformer.from_crs(32633, 4326, always_xy=True)
    x0, y0 = ORIGIN

    def box_ll(c0, r0, c1, r1):  # pixel box -> lon/lat polygon
        xs, ys = to_ll.transform([x0 + c0, x0 + c1], [y0 - r1, y0 - r0])
        return shapely.box(xs[0], ys[0], xs[1], ys[1])

    gdf = gpd.GeoDataFrame({"kind": ["building", "road", "building"]},
                           geometry=[box_ll(10, 10, 30, 40), box_ll(50, 0, 60, 100),
                                     box_ll(70, 70, 90, 90)], crs="EPSG:4326")
    path = tmp_path / "labels.geojson"
    gdf.to_file(path)
    chips = chips_from_vectors(image, path, class_field="kind",
                               classes="background,building,road", chip_size=100)
    lab = chips.labels[0]
    assert chips.classes == ["background", "building", "road"]
    assert np.all(lab[11:39, 11:29] == 1) and np.all(lab[:, 51:59] == 2)
    assert np.all(lab[71:89, 71:89] == 1) and lab[45, 5] == 0
    assert abs(int((lab == 1).sum()) - (20 * 30 + 20 * 20)) <= 60  # edges within a pixel
    # without a class field every feature is class 1; the road class can be ignored
    ones = chips_from_vectors(image, path, chip_size=100)
    assert ones.classes == ["background", "foreground"] and ones.labels[0][20, 55] == 1
    ign = chips_from_vectors(image, path, class_field="kind", chip_size=100,
                             classes="background,building,road", ignore_classes=["road"])
    assert np.all(ign.labels[0][:, 51:59] == IGNORE)
    with pytest.raises(InputError, match="not in the class list: road"):
        chips_from_vectors(image, path, class_field="kind", classes="background,building")
    with pytest.raises(InputError, match="no field 'type'"):
        chips_from_vectors(image, path, class_field="type")
    with pytest.raises(InputError, match="do not exist"):
        chips_from_vectors(image, tmp_path / "missing.gpkg")
    # several files (different CRSs) are stacked
    gdf.iloc[[2]].to_crs(32633).to_file(tmp_path / "more.gpkg")
    gdf.iloc[[0, 1]].to_file(tmp_path / "first.geojson")
    both = chips_from_vectors(image, [tmp_path / "first.geojson", tmp_path / "more.gpkg"],
                              class_field="kind", classes="background,building,road",
                              chip_size=100)
    np.testing.assert_array_equal(both.labels, chips.labels)


# ----------------------------------------------------------------------------- torchgeo

def fake_inria(root: Path) -> Path:
    """The on-disk layout torchgeo's InriaAerialImageLabeling reads (gt is 0/255)."""
    base = root / "AerialImageDataset" / "train"
    for sub in ("images", "gt"):
        (base / sub).mkdir(parents=True)
    for i, name in enumerate(("austin1", "austin7", "vienna8")):
        gt = np.zeros((96, 96), np.uint8)
        gt[20 + i * 10:60, 30:70] = 255
        write_raster(base / "images" / f"{name}.tif", rgb(96, 96, seed=i), res=0.3)
        write_raster(base / "gt" / f"{name}.tif", gt, res=0.3)
    return root


def test_torchgeo_nongeo_dataset(tmp_path, monkeypatch):
    # torchgeo's Inria split regex reads the first letters+digits of the *whole* path, so the
    # digits of pytest's tmp folder name would decide the split: use a relative root
    monkeypatch.chdir(tmp_path)
    root = fake_inria(Path("inria"))
    chips = chips_from_torchgeo("InriaAerialImageLabeling", root, chip_size=32, gsd=0.6,
                                classes="background,building")
    # train split = austin7 + vienna8; 0.3 m -> 0.6 m: 48 x 48 px -> 2 x 2 chips each
    assert chips.images.shape == (8, 3, 32, 32) and chips.images.dtype == np.uint8
    assert set(chips.scene) == {"austin7", "vienna8"} and chips.gsd == 0.6
    assert set(np.unique(chips.labels)) == {0, 1}
    val = chips_from_torchgeo("InriaAerialImageLabeling", root, chip_size=96,
                              dataset_kwargs={"split": "val"})
    assert len(val) == 1 and val.gsd == pytest.approx(0.3, rel=1e-3)  # native GSD from files
    lab = val.labels[0]
    assert lab[20:60, 30:70].min() == 1 and lab.sum() == 40 * 40
    with pytest.raises(InputError, match="does not exist"):
        chips_from_torchgeo("InriaAerialImageLabeling", tmp_path / "nothing")
    with pytest.raises(UserError, match="not a torchgeo dataset"):
        chips_from_torchgeo("NoSuchDataset", root)
    with pytest.raises(UserError, match="takes no 'paths' argument"):
        chips_from_torchgeo("InriaAerialImageLabeling", root, dataset_kwargs={"paths": "x"})
    with pytest.raises(InputError, match="cannot open torchgeo"):
        chips_from_torchgeo("InriaAerialImageLabeling", root, dataset_kwargs={"split": "nope"})


def test_torchgeo_geo_dataset(tmp_path):
    from torchgeo.datasets import RasterDataset

    class Images(RasterDataset):
        filename_glob = "img_*.tif"

    class Masks(RasterDataset):
        filename_glob = "mask_*.tif"
        is_image = False

    for k, x0 in enumerate((ORIGIN[0], ORIGIN[0] + 200)):
        mask = np.zeros((100, 100), np.uint8)
        mask[:, 50:] = 1
        write_raster(tmp_path / f"img_{k}.tif", rgb(100, 100, seed=k), res=1.0,
                     origin=(x0, ORIGIN[1]))
        write_raster(tmp_path / f"mask_{k}.tif", mask, res=1.0, origin=(x0, ORIGIN[1]))
    ds = Images(paths=str(tmp_path)) & Masks(paths=str(tmp_path))
    chips = chips_from_torchgeo(ds, chip_size=25, gsd=2.0, classes="background,building")
    # two 100 m tiles at 2 m: 50 x 50 px each -> 2 x 2 chips of 25 px per tile
    assert chips.images.shape == (8, 3, 25, 25) and chips.gsd == 2.0
    assert set(chips.scene) == {"img_0", "img_1"}
    left = chips.labels[[i for i in range(8) if chips.labels[i].max() == 0]]
    assert len(left) == 4 and np.all(chips.labels[chips.labels.reshape(8, -1).min(1) == 1] == 1)


# ----------------------------------------------------------------------------- chip sets

def test_split_by_scene_and_npz_roundtrip(tmp_path):
    n = 12
    chips = ChipSet(images=np.zeros((n, 3, 8, 8), np.uint8), labels=np.zeros((n, 8, 8), np.uint8),
                    classes=["background", "building"], gsd=0.5, source="test",
                    scene=np.repeat(np.array(["a", "b", "c", "d"]), 3))
    train, val = split_by_scene(chips, 0.25, seed=1)
    assert len(train) + len(val) == n and len(val) == 3
    assert not set(train.scene) & set(val.scene)
    with pytest.raises(UserError):
        split_by_scene(chips, 1.5)
    path = chips.save(tmp_path / "c.npz")
    with np.load(path) as z:
        assert set(z.files) == {"images", "labels", "classes", "gsd", "source", "scene"}
        assert z["classes"].dtype.kind == "U" and float(z["gsd"]) == 0.5
    back = ChipSet.load(path)
    assert back.classes == chips.classes and back.source == "test" and len(back) == n
    with pytest.raises(OutputError, match="already exists"):
        chips.save(path)
    with pytest.raises(OutputError, match="does not exist"):
        chips.save(tmp_path / "missing" / "c.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz"]  # no partial files

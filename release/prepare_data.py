"""Turn /work/shared/data into the compact training arrays of idgbr_geo.training.

Developer script for the bundled models (users go through ``idgbr-geo train``). Every set
draws on all sources of ../shared/data that label its classes (buildings: buildings-oam,
buildings-xdomain and the Dubai building class; roads: roads-massachusetts, roads-extra and
the Dubai road class; land cover: Dubai), split by area / tile exactly as the data README
suggests. Writes, under ``.train/`` (git-ignored, never committed): ``<set>_train.npz``
(512 px chips near each source's native GSD, with ``chip_gsd``, ``chip_source`` and
sampling ``weight`` per chip: the sources are mixed by ``MIX``, not by their sizes),
``<set>_val.npz`` (256 px chips at the model GSD, for validation during training) and
``<set>_val_scenes.npz`` (whole validation scenes at their native resolution with their GSD
and source, refined through the engine by release/validate.py).

    .venv/bin/python release/prepare_data.py [--data /work/shared/data] [--out .train]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import rasterio
import torch
import torch.nn.functional as F
from PIL import Image

#: model GSD per set (metres per pixel the networks see)
GSD = {"buildings": 0.3, "roads": 0.5, "landcover": 1.0}
#: the GSD assumed for sources that do not document one (see README "Scale")
ASSUMED = {"dubai": 1.0, "whu": 0.5}
CLASSES = {
    "buildings": ["background", "building"],
    "roads": ["background", "road"],
    "landcover": ["unlabeled", "building", "land", "road", "vegetation", "water"],
}
#: validation chips per source in <set>_val.npz
VAL_CHIPS = 32
#: share of the training samples drawn from each source (a source's chips share it equally)
MIX = {
    "buildings": {"oam": 0.45, "xdomain": 0.3, "dubai": 0.25},
    "roads": {"massachusetts": 0.35, "deepglobe": 0.25, "roadnet": 0.15, "dubai": 0.25},
    "landcover": {"dubai": 1.0},
}
SOURCE = {
    "buildings": "OpenAerialMap imagery (CC-BY-4.0, HOT fAIr/RAMP chips) + OSM building "
                 "footprints (c) OpenStreetMap contributors, ODbL-1.0; WHU building dataset, "
                 "Inria Aerial Image Labeling (research use only) and SpaceNet 2 (CC BY-SA 4.0) "
                 "sample chips; Dubai land cover building class (Humans in the Loop, CC0-1.0)",
    "roads": "Massachusetts Roads Dataset (Mnih 2013, research use; OSM-derived labels (c) "
             "OpenStreetMap contributors, ODbL-1.0); DeepGlobe Road Extraction 2018 (research/"
             "non-commercial only); RoadNet Ottawa (Liu et al. 2019, non-commercial research "
             "and education only); Dubai land cover road class (Humans in the Loop, CC0-1.0)",
    "landcover": "Humans in the Loop 'Semantic segmentation of aerial imagery' (Dubai, MBRSC "
                 "imagery), CC0-1.0",
}


def resample(image: np.ndarray, label: np.ndarray, factor: float, k: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """Resample (C,H,W) uint8 image (antialiased bilinear) and label (area-vote)."""
    if abs(factor - 1) < 1e-3:
        return image, label
    h, w = label.shape
    size = (max(1, round(h * factor)), max(1, round(w * factor)))
    img = F.interpolate(torch.from_numpy(image).float()[None], size=size, mode="bilinear",
                        antialias=True, align_corners=False)[0]
    lab = torch.from_numpy(label.astype(np.int64))
    onehot = F.one_hot(torch.where(lab == 255, k, lab), k + 1).permute(2, 0, 1).float()[None]
    votes = F.interpolate(onehot, size=size, mode="area")[0]
    out = votes[:k].argmax(0)
    out = torch.where(votes[k] > 0.5, 255, out)
    return img.round().clamp(0, 255).byte().numpy(), out.byte().numpy()


def chips(image: np.ndarray, lab: np.ndarray, t: int = 256, stride: int = 192,
          min_valid: float = 0.1):
    """Cut a scene into t x t chips (padding with label 255), skipping mostly-ignored ones."""
    c, h, w = image.shape
    ph, pw = max(h, t), max(w, t)
    img = np.zeros((c, ph, pw), np.uint8)
    label = np.full((ph, pw), 255, np.uint8)
    img[:, :h, :w] = image
    label[:h, :w] = lab
    rows = sorted({*range(0, ph - t + 1, stride), ph - t})
    cols = sorted({*range(0, pw - t + 1, stride), pw - t})
    for r in rows:
        for q in cols:
            lc = label[r:r + t, q:q + t]
            if (lc != 255).mean() >= min_valid:
                yield img[:, r:r + t, q:q + t], lc


def _tif(path: Path, band: int | None = None) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(band) if band else src.read()[:3]


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _rows(path: Path):
    with open(path) as f:
        yield from csv.DictReader(f)


# Each reader yields (name, source, split, gsd, image (3,H,W) uint8, label (H,W) uint8 with
# 255 = ignore); gsd is NaN where the source does not document it.


def read_oam(root: Path):
    d = root / "buildings-oam"
    for row in _rows(d / "index.csv"):
        split = "val" if row["area"] == "banepa" else "train"
        yield (row["file"], "banepa" if split == "val" else "oam", split,
               float(row["gsd_m"]), _tif(d / row["file"]), _tif(d / row["mask"], 1))


def read_xdomain(root: Path):
    d = root / "buildings-xdomain"
    for row in _rows(d / "index.csv"):
        gsd = float(row["gsd_m"]) if row["gsd_m"] else np.nan
        yield (row["name"], "xdomain", row["suggested_split"], gsd,
               _tif(d / "images" / f"{row['name']}.tif"),
               _tif(d / "masks" / f"{row['name']}.tif", 1))


def read_dubai(root: Path, keep: int | None = None):
    """The Dubai land cover; ``keep``: one class as a binary label (0 'unlabeled' ignored)."""
    d = root / "landcover-dubai"
    for row in _rows(d / "index.csv"):
        img = np.asarray(Image.open(d / row["file"]).convert("RGB")).transpose(2, 0, 1)
        lab = _png(d / row["mask"]).astype(np.uint8)
        if keep is not None:
            lab = np.where(lab == 0, 255, lab == keep).astype(np.uint8)
        yield row["file"], "dubai", row["suggested_split"], np.nan, img, lab


def read_massachusetts(root: Path):
    d = root / "roads-massachusetts"
    for row in _rows(d / "index.csv"):
        img = np.asarray(Image.open(d / row["file"]).convert("RGB")).transpose(2, 0, 1).copy()
        lab = (_png(d / row["mask"]) > 0).astype(np.uint8)
        nod = _png(d / row["nodata_mask"]) == 1
        lab[nod] = 255
        img[:, nod] = 255  # white no-imagery, as in the source PNGs
        yield row["file"], "massachusetts", row["suggested_split"], 1.0, img, lab


def read_roads_extra(root: Path):
    for folder, source in (("massachusetts", "massachusetts"), ("deepglobe", "deepglobe"),
                           ("roadnet-ottawa", "roadnet")):
        d = root / "roads-extra" / folder
        for row in _rows(d / "index.csv"):
            yield (row["name"], source, row["suggested_split"], float(row["gsd_m"]),
                   _tif(d / "images" / f"{row['name']}.tif"),
                   _tif(d / "masks" / f"{row['name']}.tif", 1))


def read_buildings(root: Path):
    yield from read_oam(root)
    yield from read_xdomain(root)
    yield from read_dubai(root, keep=1)


def read_roads(root: Path):
    yield from read_massachusetts(root)
    yield from read_roads_extra(root)
    yield from read_dubai(root, keep=3)


def read_landcover(root: Path):
    # the set's 6 classes as they are coded: 0 'unlabeled' (0.4% of pixels) is a class of
    # its own, as the Dubai set codes it
    yield from read_dubai(root)


READERS = {"buildings": read_buildings, "roads": read_roads, "landcover": read_landcover}


def assumed_gsd(name: str, gsd: float) -> float:
    """The GSD used for training: the documented one, else the assumption for the source."""
    if np.isfinite(gsd):
        return gsd
    return ASSUMED["whu"] if name.startswith("whu") else ASSUMED["dubai"]


def source_weights(sources: np.ndarray, mix: dict[str, float]) -> np.ndarray:
    """Per-chip sampling weights: each source's share of ``mix`` split equally among its
    chips (a source without chips gets nothing)."""
    weight = np.zeros(len(sources))
    for src, share in mix.items():
        sel = sources == src
        if sel.any():
            weight[sel] = share / sel.sum()
    return weight


def prepare(name: str, root: Path, out: Path, tile: int = 512) -> None:
    """Training chips near native resolution (never finer than half the model GSD, so that
    a crop can be zoomed 0.5-2x), validation chips at the model GSD, and the whole
    validation scenes at their *native* resolution with their GSD (NaN: undocumented) and
    source, as a user would bring them."""
    k = len(CLASSES[name])
    model_gsd = GSD[name]
    train: dict[str, list] = {"images": [], "labels": [], "scene": [], "source": [],
                              "chip_gsd": []}
    val: dict[str, list] = {"images": [], "labels": [], "scene": [], "source": []}
    scenes: dict[str, np.ndarray] = {}
    for file, source, split, gsd, img, lab in READERS[name](root):
        g = assumed_gsd(file, gsd)
        if split == "train":
            store = max(g, model_gsd / 2)
            im, lb = resample(img, lab, g / store, k)
            for ci, cl in chips(im, lab=lb, t=tile, stride=tile * 3 // 4):
                train["images"].append(ci)
                train["labels"].append(cl)
                train["scene"].append(file)
                train["source"].append(source)
                train["chip_gsd"].append(store)
            continue
        im, lb = resample(img, lab, g / model_gsd, k)
        for ci, cl in chips(im, lb):
            val["images"].append(ci)
            val["labels"].append(cl)
            val["scene"].append(file)
            val["source"].append(source)
        i = len(scenes) // 5
        scenes.update({f"image_{i}": img, f"label_{i}": lab, f"gsd_{i}": np.float64(gsd),
                       f"source_{i}": np.array(source), f"name_{i}": np.array(file)})
    sources = np.array(train["source"])
    weight = source_weights(sources, MIX[name])
    out.mkdir(parents=True, exist_ok=True)
    common = dict(classes=np.array(CLASSES[name]), gsd=np.float64(model_gsd),
                  source=np.array(SOURCE[name]))
    np.savez_compressed(out / f"{name}_train.npz", images=np.stack(train["images"]),
                        labels=np.stack(train["labels"]), scene=np.array(train["scene"]),
                        chip_source=sources, chip_gsd=np.array(train["chip_gsd"]),
                        weight=weight, **common)
    # validation during training looks at a few dozen chips: keep at most VAL_CHIPS per
    # source, evenly spread (the whole scenes are scored by release/validate.py)
    vsrc = np.array(val["source"])
    keep = np.concatenate([np.flatnonzero(vsrc == s)[np.unique(np.linspace(
        0, (vsrc == s).sum() - 1, VAL_CHIPS).round().astype(int))] for s in np.unique(vsrc)])
    np.savez_compressed(out / f"{name}_val.npz",
                        images=np.stack([val["images"][i] for i in keep]),
                        labels=np.stack([val["labels"][i] for i in keep]),
                        scene=np.array(val["scene"])[keep], **common)
    np.savez_compressed(out / f"{name}_val_scenes.npz", **scenes)
    counts = {s: int((sources == s).sum()) for s in MIX[name]}
    print(name, "train chips", counts, "val chips", len(keep),
          "val scenes", len(scenes) // 5, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data"))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / ".train")
    ap.add_argument("sets", nargs="*", default=list(READERS))
    args = ap.parse_args()
    for name in args.sets:
        prepare(name, args.data, args.out)


if __name__ == "__main__":
    main()

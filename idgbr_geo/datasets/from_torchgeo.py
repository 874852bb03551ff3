"""Chips from a torchgeo dataset already on disk (Inria, LoveDA, SpaceNet, RasterDatasets...).

Non-geo datasets are chipped sample by sample (resampled when their GSD is known); geo
datasets are walked with torchgeo's ``GridGeoSampler`` after setting their resolution to the
target ground GSD in CRS units. Nothing is downloaded.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, UserError
from ..rasters import mean_gsd, open_raster, pixel_ground_size, same_gsd
from .chips import (
    ChipSet,
    LabelRules,
    PathLike,
    _check_chip,
    _Collector,
    _progress,
    chip_origins,
)

# ----------------------------------------------------------------------------- torchgeo

def _torchgeo_dataset(dataset: Any, root: PathLike | None, kwargs: Mapping[str, Any]) -> Any:
    """A torchgeo dataset instance from an instance, a class, or a class name + root."""
    import torchgeo.datasets as tgd

    if isinstance(dataset, str):
        cls = getattr(tgd, dataset, None)
        if not (isinstance(cls, type) and issubclass(cls, (tgd.GeoDataset, tgd.NonGeoDataset))):
            raise UserError(f"{dataset!r} is not a torchgeo dataset class")
        dataset = cls
    if isinstance(dataset, type):
        if root is None:
            raise UserError(f"the torchgeo dataset {dataset.__name__} needs $root",
                            options=["root"])
        if not Path(root).is_dir():
            raise InputError(f"torchgeo root {root} does not exist")
        accepted = set(inspect.signature(dataset.__init__).parameters)
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise UserError(f"torchgeo {dataset.__name__} takes no {unknown[0]!r} argument")
        where = "root" if "root" in accepted else "paths"  # RasterDatasets take paths
        try:
            return dataset(**{where: str(root)}, **kwargs)
        except tgd.DatasetNotFoundError as exc:
            raise InputError(str(exc).splitlines()[0]) from None
        except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
            raise InputError(f"cannot open torchgeo {dataset.__name__} at {root}: "
                             f"{exc or type(exc).__name__}") from None
    return dataset


def _integer_image(image: Any, where: str) -> np.ndarray:
    """torchgeo returns float tensors of raw values; store them back as uint8/uint16."""
    arr = np.asarray(image.detach().cpu().numpy() if hasattr(image, "detach") else image)
    if arr.dtype.kind in "ui" and arr.min() >= 0 and arr.max() <= 65535:
        return arr.astype(np.uint8 if arr.max() <= 255 else np.uint16)
    if not np.all(np.isfinite(arr)) or arr.min() < 0 or np.any(arr != np.round(arr)):
        raise InputError(f"{where}: image values are not raw integers (use the dataset "
                         "without normalising transforms)")
    return arr.astype(np.uint8 if arr.max() <= 255 else np.uint16)


def _sample_file(ds: Any, i: int) -> Path | None:
    """The image file of a non-geo sample, when the dataset lists its files (Inria, LoveDA)."""
    files = getattr(ds, "files", None)
    try:
        entry = files[i] if files is not None else None
    except (IndexError, KeyError, TypeError):
        return None
    path = entry.get("image") if isinstance(entry, dict) else entry
    if not isinstance(path, (str, os.PathLike)) or not Path(path).is_file():
        return None
    return Path(path)


def _sample_gsd(path: Path | None, shape: tuple[int, int]) -> tuple[float, float] | None:
    """Ground GSD of a non-geo sample when its image file is a georeferenced raster."""
    if path is None:
        return None
    with open_raster(path, "image") as src:
        if src.crs is None or (src.height, src.width) != shape:
            return None
        return pixel_ground_size(src.crs, src.transform, src.width, src.height)


def _resize(image: np.ndarray, label: np.ndarray, factor: tuple[float, float]
            ) -> tuple[np.ndarray, np.ndarray]:
    import torch
    import torch.nn.functional as F

    h, w = label.shape
    size = (max(1, round(h / factor[1])), max(1, round(w / factor[0])))
    x = torch.from_numpy(image.astype(np.float32))[None]
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    lim = np.iinfo(image.dtype).max
    img = x[0].round().clamp(0, lim).numpy().astype(image.dtype)
    y = torch.from_numpy(label.astype(np.int16))[None, None].float()
    lab = F.interpolate(y, size=size, mode="nearest-exact")[0, 0].numpy().astype(np.uint8)
    return img, lab


def _chip_arrays(image: np.ndarray, label: np.ndarray, scene: str, out: _Collector,
                 chip: int, stride: int) -> None:
    h, w = label.shape
    for r in chip_origins(h, chip, stride):
        for c in chip_origins(w, chip, stride):
            out.add(image[:, r:r + chip, c:c + chip], label[r:r + chip, c:c + chip], scene, chip)


def _nongeo_chips(ds: Any, rules: LabelRules, gsd: float | None, source_gsd: float | None,
                  out: _Collector, chip: int, stride: int, progress: bool) -> float:
    gsds: list[float] = []
    for i in _progress(range(len(ds)), progress, "chipping"):
        sample = ds[i]
        if "image" not in sample or "mask" not in sample:
            raise InputError(f"torchgeo sample {i} has no 'image' and 'mask' "
                             f"(keys: {', '.join(sample)})")
        image = _integer_image(sample["image"], f"sample {i}")
        raw = np.asarray(sample["mask"]).squeeze()
        path = _sample_file(ds, i)
        g = (source_gsd, source_gsd) if source_gsd else _sample_gsd(path, raw.shape)
        label = rules.apply(raw, None, f"torchgeo sample {i}")
        if gsd is not None:
            if g is None:
                raise InputError(f"torchgeo sample {i} has no georeferencing: give "
                                 "$source_gsd (metres per pixel) to resample it to $gsd",
                                 options=["source_gsd", "gsd"])
            if not (same_gsd(g[0], gsd) and same_gsd(g[1], gsd)):
                image, label = _resize(image, label, (gsd / g[0], gsd / g[1]))
        if g is not None:
            gsds.append(mean_gsd(g))
        _chip_arrays(image, label, path.stem if path else f"sample_{i:05d}", out, chip, stride)
    if gsd is not None:
        return float(gsd)
    return float(np.median(gsds)) if gsds and len(gsds) == len(ds) else math.nan


def _geo_chips(ds: Any, rules: LabelRules, gsd: float | None, out: _Collector, chip: int,
               stride: int, progress: bool) -> float:
    """GeoDatasets (e.g. RasterDataset & mask RasterDataset): set the dataset resolution to
    the target ground GSD in CRS units and walk it with a GridGeoSampler."""
    import contextlib
    import io

    import shapely
    from affine import Affine
    from rasterio.features import geometry_mask
    from torchgeo.samplers import GridGeoSampler

    xres, yres = ds.res
    x, y, _ = ds.bounds
    width, height = (x.stop - x.start) / xres, (y.stop - y.start) / yres
    gx, gy = pixel_ground_size(ds.crs, Affine(xres, 0, x.start, 0, -yres, y.stop), width,
                               height)
    if gsd is not None and not (same_gsd(gx, gsd) and same_gsd(gy, gsd)):
        with contextlib.redirect_stdout(io.StringIO()):  # torchgeo prints the conversion
            ds.res = (xres * gsd / gx, yres * gsd / gy)
    target = float(gsd) if gsd is not None else mean_gsd((gx, gy))
    footprint = shapely.union_all(ds.index.geometry.to_numpy())
    names = [c for c in ds.index.columns if str(c).startswith("filepath")]
    scenes = (ds.index[names[0]].map(lambda f: Path(str(f)).stem).to_numpy() if names
              else np.asarray([f"tile_{i}" for i in range(len(ds.index))]))
    tree = shapely.STRtree(ds.index.geometry.to_numpy())
    for query in _progress(list(GridGeoSampler(ds, size=chip, stride=stride)), progress,
                           "chipping"):
        sample = ds[query]
        if "image" not in sample or "mask" not in sample:
            raise InputError("the torchgeo dataset gives no 'image' and 'mask' "
                             "(combine an image and a mask RasterDataset with &)")
        qx, qy = query[0], query[1]
        image = _integer_image(sample["image"], f"chip at {qx.start:.1f}, {qy.start:.1f}")
        raw = np.asarray(sample["mask"]).squeeze()
        h, w = raw.shape
        t = Affine((qx.stop - qx.start) / w, 0, qx.start, 0, -(qy.stop - qy.start) / h, qy.stop)
        valid = geometry_mask([footprint], out_shape=(h, w), transform=t, invert=True)
        label = rules.apply(raw, valid, "torchgeo chip")
        centre = shapely.Point((qx.start + qx.stop) / 2, (qy.start + qy.stop) / 2)
        hit = tree.query(centre, predicate="intersects")
        _chip_arrays(image, label, str(scenes[hit.min()]) if hit.size else "tile", out, chip,
                     stride)
    return target


def chips_from_torchgeo(
    dataset: Any,
    root: PathLike | None = None,
    *,
    dataset_kwargs: Mapping[str, Any] | None = None,
    classes: Sequence[str] | str | None = None,
    gsd: float | None = None,
    source_gsd: float | None = None,
    chip_size: int = 256,
    stride: int | None = None,
    ignore_classes: Sequence[str | int] = (),
    label_map: Mapping[int, int] | None = None,
    min_labelled: float = 0.0,
    source: str = "",
    progress: bool = False,
) -> ChipSet:
    """Chips from a torchgeo dataset already on disk whose samples hold "image" and "mask".

    ``dataset``: an instance, a class, or a class name of ``torchgeo.datasets`` (opened with
    ``root`` and ``dataset_kwargs``, never downloaded). Non-geo datasets (Inria, LoveDA, ...)
    are chipped sample by sample, resampled when their GSD is known (``source_gsd``, or the
    sample's GeoTIFF); geo datasets are sampled on a grid at the target GSD.
    """
    from torchgeo.datasets import GeoDataset

    stride = _check_chip(chip_size, stride)
    ds = _torchgeo_dataset(dataset, root, dict(dataset_kwargs or {}))
    ds_classes = getattr(ds, "classes", None)
    if classes is None and isinstance(ds_classes, (list, tuple)) and len(ds_classes) >= 2:
        classes = [str(c) for c in ds_classes]
    rules = LabelRules.make(classes, ignore_classes, label_map)
    out = _Collector(min_labelled)
    if gsd is not None and gsd <= 0:
        raise UserError(f"$gsd must be positive, got {gsd}", options=["gsd"])
    if isinstance(ds, GeoDataset):
        target = _geo_chips(ds, rules, gsd, out, chip_size, stride, progress)
    else:
        target = _nongeo_chips(ds, rules, gsd, source_gsd, out, chip_size, stride, progress)
    name = type(ds).__name__
    where = root or getattr(ds, "root", "?")
    return out.result(rules, target, source or f"torchgeo {name} at {where}")



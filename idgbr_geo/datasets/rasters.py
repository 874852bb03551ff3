"""Chips from image rasters with label rasters or vector labels.

Every scene is resampled to one *ground* sample distance (metres on the ground, whatever the
CRS: projected, Web-Mercator or geographic) through a rasterio ``WarpedVRT`` on the image's own
CRS, and cut into chips with a stride. Labels are warped (label rasters, any grid) or
rasterized (vector labels, reprojected to the raster CRS) onto the same chip grid. Image
nodata and pixels outside the label footprint become label 255.
"""

from __future__ import annotations

import glob
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
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
    resolve_classes,
)

IMAGE_SUFFIXES = (".tif", ".tiff", ".jp2", ".img", ".vrt", ".png", ".jpg", ".jpeg")


# ----------------------------------------------------------------------------- finding files

def find_images(spec: PathLike | Sequence[PathLike]) -> list[Path]:
    """A folder (its rasters), a glob pattern, one file, or a list of any of those."""
    if isinstance(spec, (list, tuple)):
        return [p for s in spec for p in find_images(s)]
    text = str(spec)
    p = Path(text)
    if p.is_dir():
        found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
    elif p.is_file():
        found = [p]
    elif glob.has_magic(text):
        found = sorted(Path(q) for q in glob.glob(text) if Path(q).is_file())
    else:
        raise InputError(f"{text} does not exist")
    if not found:
        raise InputError(f"no rasters found in {text}")
    return found


def pair_by_name(images: Sequence[Path], labels: PathLike | Sequence[PathLike],
                 what: str = "label") -> list[Path]:
    """The label raster of each image: a list in the same order, or files in a folder whose
    name (stem; any raster suffix) equals the image's."""
    if isinstance(labels, (list, tuple)):
        out = [Path(q) for q in labels]
        if len(out) != len(images):
            raise InputError(f"{len(images)} images but {len(out)} {what} rasters")
        return out
    folder = Path(labels)
    if not folder.is_dir():
        raise InputError(f"{what} folder {folder} does not exist")
    by_stem = {q.stem: q for q in folder.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES}
    missing = [img.name for img in images if img.stem not in by_stem]
    if missing:
        raise InputError(f"no {what} raster in {folder} for {missing[0]}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return [by_stem[img.stem] for img in images]


def pair_groups(images: Sequence[PathLike], labels: Sequence[PathLike], what: str = "label"
                ) -> tuple[list[Path], list[Path]]:
    """Several image specs (folders/globs) with one label folder each, or one for all."""
    if len(labels) not in (1, len(images)):
        raise InputError(f"{len(images)} image sources but {len(labels)} {what} folders "
                         "(give one for all or one per image source)")
    paths: list[Path] = []
    found: list[Path] = []
    for k, spec in enumerate(images):
        group = find_images(spec)
        paths += group
        found += pair_by_name(group, labels[k if len(labels) > 1 else 0], what)
    return paths, found


# ----------------------------------------------------------------------------- ground GSD

@dataclass
class _Grid:
    """A scene resampled to the target GSD: same CRS and orientation, new pixel size."""

    path: Path
    crs: Any
    src_transform: Any
    transform: Any
    width: int
    height: int
    gsd: tuple[float, float]
    georeferenced: bool
    src_width: int = 0
    src_height: int = 0

    @property
    def downsampled(self) -> bool:
        return self.width < self.src_width or self.height < self.src_height


def _scene_grid(src: Any, path: Path, source_gsd: float | None) -> _Grid:
    from affine import Affine

    if src.crs is None:
        g = source_gsd
        fake = Affine(g or 1.0, 0, 0, 0, -(g or 1.0), 0)
        gsd = (g, g) if g else (math.nan, math.nan)
        return _Grid(path, "EPSG:3395", fake, fake, src.width, src.height, gsd, False,
                     src.width, src.height)
    gsd = pixel_ground_size(src.crs, src.transform, src.width, src.height)
    return _Grid(path, src.crs, src.transform, src.transform, src.width, src.height, gsd, True,
                 src.width, src.height)


def _resample_grid(grid: _Grid, target: float | None) -> _Grid:
    from affine import Affine

    if target is None or not all(math.isfinite(g) for g in grid.gsd):
        return grid
    fx, fy = target / grid.gsd[0], target / grid.gsd[1]
    if same_gsd(grid.gsd[0], target) and same_gsd(grid.gsd[1], target):
        return grid
    width = max(1, round(grid.width / fx))
    height = max(1, round(grid.height / fy))
    t = grid.src_transform @ Affine.scale(grid.width / width, grid.height / height)
    return replace(grid, transform=t, width=width, height=height)


def _pick_target_gsd(grids: list[_Grid], gsd: float | None) -> float:
    known = [mean_gsd(g.gsd) for g in grids if math.isfinite(g.gsd[0])]
    if gsd is not None:
        if gsd <= 0:
            raise UserError(f"$gsd must be positive, got {gsd}", options=["gsd"])
        if len(known) != len(grids):
            nogeo = next(g.path for g in grids if not math.isfinite(g.gsd[0]))
            raise InputError(f"{nogeo} has no georeferencing: give $source_gsd "
                             "(metres per pixel) to resample it to $gsd",
                             options=["source_gsd", "gsd"])
        return float(gsd)
    if known and len(known) != len(grids):
        raise InputError("some images are georeferenced and some are not: give $source_gsd",
                         options=["source_gsd"])
    return float(np.median(known)) if known else math.nan


def _warped(src: Any, grid: _Grid, resampling: Any, add_alpha: bool) -> Any:
    from rasterio.vrt import WarpedVRT

    kwargs: dict[str, Any] = {}
    if not grid.georeferenced:
        kwargs.update(src_crs=grid.crs, src_transform=grid.src_transform)
    return WarpedVRT(src, crs=grid.crs, transform=grid.transform, width=grid.width,
                     height=grid.height, resampling=resampling, add_alpha=add_alpha, **kwargs)


def _image_bands(src: Any, bands: Sequence[int] | None) -> list[int]:
    from rasterio.enums import ColorInterp

    if bands is not None:
        bad = [b for b in bands if not 1 <= b <= src.count]
        if bad:
            raise InputError(f"{src.name} has {src.count} bands; band {bad[0]} does not exist")
        return list(bands)
    return [i for i, ci in enumerate(src.colorinterp, 1) if ci != ColorInterp.alpha] or [1]


def _check_dtype(src: Any, path: Path) -> None:
    if src.dtypes[0] not in ("uint8", "uint16"):
        raise InputError(f"{path}: image dtype {src.dtypes[0]} is not supported for training "
                         "(use uint8 or uint16 imagery)")


LabelReader = Callable[[Any, Any, int, int], tuple[np.ndarray, np.ndarray]]


def _chip_scene(src: Any, grid: _Grid, bands: list[int], label_reader: LabelReader,
                rules: LabelRules, out: _Collector, chip: int, stride: int) -> None:
    """Cut one resampled scene into chips; ``label_reader(window, transform, h, w)`` returns
    (raw labels, label validity) on the chip's grid."""
    from rasterio.enums import ColorInterp, Resampling
    from rasterio.windows import Window
    from rasterio.windows import transform as window_transform

    has_alpha = ColorInterp.alpha in src.colorinterp
    with _warped(src, grid, Resampling.average if grid.downsampled else Resampling.bilinear,
                 add_alpha=not has_alpha) as vrt:
        for r in chip_origins(grid.height, chip, stride):
            for c in chip_origins(grid.width, chip, stride):
                win = Window(c, r, min(chip, grid.width - c), min(chip, grid.height - r))
                image = vrt.read(bands, window=win)
                valid = vrt.dataset_mask(window=win) > 0
                raw, lvalid = label_reader(win, window_transform(win, grid.transform),
                                           int(win.height), int(win.width))
                label = rules.apply(raw, valid & lvalid, f"{grid.path.name}")
                out.add(image, label, grid.path.stem, chip)


def _raster_label_reader(lsrc: Any, grid: _Grid, nodata_src: Any = None) -> tuple[
        LabelReader, list[Any]]:
    """Warp a label raster (any grid/CRS) onto the scene grid; nodata and the footprint's
    outside become invalid. Rasters without CRS must match the image size pixel for pixel."""
    from rasterio.enums import Resampling

    def fit(src: Any) -> _Grid:
        if src.crs is None or not grid.georeferenced:
            if (src.width, src.height) != (grid.src_width, grid.src_height):
                raise InputError(f"{src.name} is {src.width}x{src.height} pixels but its image "
                                 f"is {grid.src_width}x{grid.src_height}; without "
                                 "georeferencing both must match pixel for pixel")
            return replace(grid, georeferenced=False)
        return grid

    res = Resampling.mode if grid.downsampled else Resampling.nearest
    vrts = [_warped(lsrc, fit(lsrc), res, add_alpha=True)]
    if nodata_src is not None:
        vrts.append(_warped(nodata_src, fit(nodata_src), Resampling.nearest, add_alpha=False))

    def read(win: Any, transform: Any, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        raw = vrts[0].read(1, window=win)
        valid = vrts[0].dataset_mask(window=win) > 0
        if len(vrts) > 1:
            valid &= vrts[1].read(1, window=win) == 0
        return raw, valid

    return read, vrts


def _scan(paths: Sequence[Path], gsd: float | None, source_gsd: float | None
          ) -> tuple[list[_Grid], float]:
    grids = []
    for p in paths:
        with open_raster(p, "image") as src:
            _check_dtype(src, p)
            grids.append(_scene_grid(src, p, source_gsd))
    target = _pick_target_gsd(grids, gsd)
    return [_resample_grid(g, None if math.isnan(target) else target) for g in grids], target


def chips_from_rasters(
    images: PathLike | Sequence[PathLike],
    labels: PathLike | Sequence[PathLike],
    *,
    classes: Sequence[str] | str | None = None,
    gsd: float | None = None,
    chip_size: int = 256,
    stride: int | None = None,
    bands: Sequence[int] | None = None,
    ignore_classes: Sequence[str | int] = (),
    label_map: Mapping[int, int] | None = None,
    nodata_masks: PathLike | Sequence[PathLike] | None = None,
    source_gsd: float | None = None,
    min_labelled: float = 0.0,
    source: str = "",
    progress: bool = False,
) -> ChipSet:
    """Chips from image rasters and label rasters (class ids; matched by file name).

    ``gsd``: target ground GSD in metres (None: the median GSD of the scenes).
    ``nodata_masks``: optional rasters (matched by name) whose non-zero pixels are no-data.
    ``source_gsd``: metres per pixel of images without georeferencing (PNG/JPEG).
    """
    stride = _check_chip(chip_size, stride)
    rules = LabelRules.make(classes, ignore_classes, label_map)
    paths = find_images(images)
    lpaths = pair_by_name(paths, labels)
    npaths = pair_by_name(paths, nodata_masks, "nodata mask") if nodata_masks else None
    grids, target = _scan(paths, gsd, source_gsd)
    out = _Collector(min_labelled)
    nbands = 0
    for i, grid in enumerate(_progress(grids, progress, "chipping")):
        with open_raster(grid.path, "image") as src, \
                open_raster(lpaths[i], "label raster") as lsrc:
            band_ids = _image_bands(src, bands)
            if nbands and len(band_ids) != nbands:
                raise InputError(f"{grid.path} has {len(band_ids)} bands, others have {nbands}")
            nbands = len(band_ids)
            nsrc = open_raster(npaths[i], "nodata mask") if npaths else None
            try:
                reader, vrts = _raster_label_reader(lsrc, grid, nsrc)
                try:
                    _chip_scene(src, grid, band_ids, reader, rules, out, chip_size, stride)
                finally:
                    for v in vrts:
                        v.close()
            finally:
                if nsrc is not None:
                    nsrc.close()
    what = source or f"images {images}; labels {labels}"
    return out.result(rules, target, what)


# ----------------------------------------------------------------------------- vector labels

def _read_vector(p: Path, layer: str | None) -> Any:
    import geopandas as gpd

    if not p.is_file():
        raise InputError(f"vector labels {p} do not exist")
    try:
        gdf = gpd.read_file(p, layer=layer) if layer else gpd.read_file(p)
    except Exception as exc:  # pyogrio raises several types for unreadable files
        raise InputError(f"cannot read vector labels {p}: {str(exc).splitlines()[0]}") from None
    if gdf.crs is None:
        raise InputError(f"vector labels {p} have no CRS")
    return gdf


def read_vector_labels(path: PathLike | Sequence[PathLike], *, class_field: str | None,
                       classes: list[str] | None, layer: str | None = None
                       ) -> tuple[Any, list[str]]:
    """Read GeoPackage/GeoJSON file(s); return (GeoDataFrame with a ``_burn`` class-id
    column, classes). Several files are reprojected to the first one's CRS and stacked.

    Without ``class_field`` every feature is class 1. A text field is matched against the
    class names (unknown names are an error); a numeric field holds class ids.
    """
    import pandas as pd

    paths = [Path(q) for q in path] if isinstance(path, (list, tuple)) else [Path(path)]
    frames = [_read_vector(q, layer) for q in paths]
    gdf = frames[0]
    if len(frames) > 1:
        gdf = pd.concat([f.to_crs(gdf.crs) for f in frames], ignore_index=True)
    p = paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1})"
    gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty]
    if class_field is None:
        names = classes or ["background", "foreground"]
        gdf = gdf.assign(_burn=1)
        return gdf, names
    if class_field not in gdf.columns:
        raise InputError(f"{p} has no field {class_field!r} (fields: "
                         f"{', '.join(c for c in gdf.columns if c != 'geometry')})")
    values = gdf[class_field]
    if values.dtype.kind in "iuf":
        if values.isna().any():
            raise InputError(f"{p}: field {class_field!r} has empty values")
        ids = values.astype(int)
        names = classes or ["background"] + [f"class_{i}" for i in range(1, int(ids.max()) + 1)]
    else:
        text = values.astype(str)
        names = classes or ["background"] + sorted(set(text) - {"background"})
        unknown = sorted(set(text) - set(names))
        if unknown:
            raise InputError(f"{p}: field {class_field!r} has values not in the class list: "
                             f"{', '.join(unknown[:5])}")
        ids = text.map(names.index)
    return gdf.assign(_burn=ids.to_numpy()), names


def _vector_label_reader(gdf: Any, grid: _Grid, rules: LabelRules) -> LabelReader:
    """Rasterize the features touching each chip (pixel centres inside, as the OAM masks)."""
    import shapely
    from rasterio.features import rasterize

    local = gdf.to_crs(grid.crs)
    burn = local["_burn"].to_numpy()
    # burn order: class id ascending, ignored classes last so they win overlaps
    order = np.lexsort((burn, np.isin(burn, list(rules.ignore))))
    geoms = local.geometry.to_numpy()[order]
    burn = burn[order]
    tree = shapely.STRtree(geoms)

    def read(win: Any, transform: Any, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        x0, y0 = transform @ (0, 0)
        x1, y1 = transform @ (w, h)
        hits = np.sort(tree.query(shapely.box(min(x0, x1), min(y0, y1), max(x0, x1),
                                              max(y0, y1))))
        raw = np.zeros((h, w), dtype=np.uint8)
        if hits.size:
            raw = rasterize(zip(geoms[hits], burn[hits].tolist(), strict=True), out_shape=(h, w),
                            transform=transform, fill=0, all_touched=False, dtype="uint8")
        return raw, np.ones((h, w), dtype=bool)

    return read


def chips_from_vectors(
    images: PathLike | Sequence[PathLike],
    vector: PathLike | Sequence[PathLike],
    *,
    class_field: str | None = None,
    layer: str | None = None,
    classes: Sequence[str] | str | None = None,
    gsd: float | None = None,
    chip_size: int = 256,
    stride: int | None = None,
    bands: Sequence[int] | None = None,
    ignore_classes: Sequence[str | int] = (),
    min_labelled: float = 0.0,
    source: str = "",
    progress: bool = False,
) -> ChipSet:
    """Chips from georeferenced images with vector labels rasterized onto each image's grid
    (reprojected to the raster CRS; pixels not covered by a feature are class 0)."""
    stride = _check_chip(chip_size, stride)
    gdf, names = read_vector_labels(vector, class_field=class_field,
                                    classes=resolve_classes(classes), layer=layer)
    rules = LabelRules.make(names, ignore_classes)
    paths = find_images(images)
    grids, target = _scan(paths, gsd, None)
    out = _Collector(min_labelled)
    nbands = 0
    for grid in _progress(grids, progress, "chipping"):
        if not grid.georeferenced:
            raise InputError(f"{grid.path} has no CRS: vector labels need georeferenced images")
        with open_raster(grid.path, "image") as src:
            band_ids = _image_bands(src, bands)
            if nbands and len(band_ids) != nbands:
                raise InputError(f"{grid.path} has {len(band_ids)} bands, others have {nbands}")
            nbands = len(band_ids)
            reader = _vector_label_reader(gdf, grid, rules)
            _chip_scene(src, grid, band_ids, reader, rules, out, chip_size, stride)
    return out.result(rules, target, source or f"images {images}; vector labels {vector}")



"""File-level evaluation: class rasters, vector truth and folders of scenes.

:mod:`idgbr_geo.metrics` defines the metrics on arrays; this module opens files, checks
that PRED, TRUTH (and COARSE) share one pixel grid, rasterizes vector truth onto PRED's grid
window by window, matches folders by file name, and formats the report (table or JSON).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, first_line
from .files import read_errors
from .metrics import (
    BF_TOLERANCES,
    BOUNDARY_IOU_WIDTH,
    DEFAULT_K,
    MetricAccumulator,
    default_class_names,
    evaluate_arrays,
    iter_windows,
)
from .rasters import check_same_grid, open_raster

#: suffixes read as vector truth (anything else is opened as a raster)
VECTOR_SUFFIXES = {".gpkg", ".geojson", ".json", ".shp", ".fgb", ".geojsonl", ".geojsons"}
#: suffixes taken as scenes in folder mode
RASTER_SUFFIXES = {".tif", ".tiff", ".vrt", ".img", ".jp2", ".png"}
#: default attribute holding the class (an id or a class name) in vector truth
DEFAULT_CLASS_FIELD = "class"


def open_class_raster(path: str | os.PathLike[str], what: str) -> Any:
    """Open a single-band-or-more class raster, or raise one clear :class:`InputError`."""
    p = Path(path)
    ds = open_raster(p, what)  # (plain PNG masks are fine when both sides are)
    if np.dtype(ds.dtypes[0]).kind == "f" and what != "TRUTH":
        ds.close()
        raise InputError(f"{what} {p} has float pixels; expected class ids (integers)")
    return ds


def is_vector(path: str | os.PathLike[str]) -> bool:
    return Path(path).suffix.lower() in VECTOR_SUFFIXES


def raster_class_names(ds: Any) -> list[str] | None:
    """Class names from the ``IDGBR_CLASSES`` tag, or None when missing or malformed."""
    tag = ds.tags().get("IDGBR_CLASSES")
    if not tag:
        return None
    try:
        names = json.loads(tag)
    except json.JSONDecodeError:
        return None
    if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
        return names
    return None


def _raster_reader(ds: Any, nodata_to: int, what: str = "raster") -> Any:
    """Window reader of band 1 with the dataset's own nodata value mapped to ``nodata_to``;
    a read failure (truncated or corrupt file) is an :class:`InputError` naming ``what``."""
    from rasterio.windows import Window

    nodata = ds.nodata

    def read(r0: int, c0: int, h: int, w: int) -> np.ndarray:
        with read_errors(ds.name, what):
            a = ds.read(1, window=Window(c0, r0, w, h))
        if a.dtype.kind == "f":
            bad = ~np.isfinite(a) | (a == nodata if nodata is not None else False)
            a = np.where(bad, nodata_to, a)
            return a.astype(np.int64)
        a = a.astype(np.int64)
        if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
            a[a == int(nodata)] = nodata_to
        return a

    return read


def _max_class_id(read: Any, shape: tuple[int, int], skip: set[int]) -> int:
    """Largest class id in a map (pre-pass when no class names are known)."""
    top = -1
    for (r0, c0, h, w), _core in iter_windows(shape[0], shape[1], 2048, halo=0):
        a = read(r0, c0, h, w)
        vals = np.unique(a)
        vals = [int(v) for v in vals if int(v) not in skip and v >= 0]
        if vals:
            top = max(top, max(vals))
    return top


class VectorTruth:
    """Vector labels rasterized onto PRED's grid one window at a time.

    The class of each feature is read from ``class_field``: an integer id or a class name.
    When the file has no such attribute and there are exactly two classes, every feature is
    the second class (e.g. building footprints). Pixels under no feature are class 0.
    """

    def __init__(self, path: str | os.PathLike[str], ref: Any, classes: Sequence[str],
                 class_field: str = DEFAULT_CLASS_FIELD) -> None:
        import geopandas as gpd

        p = Path(path)
        if not p.exists():
            raise InputError(f"TRUTH {p} does not exist")
        try:
            gdf = gpd.read_file(p)
        except Exception as exc:  # pyogrio raises several types for unreadable files
            raise InputError(f"TRUTH {p} is not a readable vector file ({first_line(exc)})") \
                from None
        gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty]
        if len(gdf) and gdf.crs is not None and ref.crs is not None:
            gdf = gdf.to_crs(ref.crs)
        elif len(gdf) and (gdf.crs is None) != (ref.crs is None):
            raise InputError(f"TRUTH {p} and PRED must both have a CRS (or both none)")
        if class_field in gdf.columns:
            values = [self._class_id(v, classes, p, class_field) for v in gdf[class_field]]
        elif len(classes) == 2 or len(gdf) == 0:
            values = [1] * len(gdf)
        else:
            fields = ", ".join(c for c in gdf.columns if c != "geometry") or "none"
            raise InputError(f"TRUTH {p} has no attribute {class_field!r} (attributes: "
                             f"{fields}); name the class attribute with $class_field",
                             options=["class_field"])
        self.geoms = np.asarray(gdf.geometry.values)
        self.values = np.asarray(values, np.int64)
        self.tree = gdf.sindex if len(gdf) else None
        self.ref = ref

    @staticmethod
    def _class_id(value: Any, classes: Sequence[str], path: Path, field: str) -> int:
        if isinstance(value, str) and value in classes:
            return list(classes).index(value)
        try:
            cid = int(value)
        except (TypeError, ValueError):
            raise InputError(f"TRUTH {path}: {field}={value!r} is neither a class name "
                             f"({', '.join(classes)}) nor a class id") from None
        if not 0 <= cid < len(classes) and cid != 255:
            raise InputError(f"TRUTH {path}: {field}={cid} but only {len(classes)} classes "
                             f"are known ({', '.join(classes)})")
        return cid

    def __call__(self, r0: int, c0: int, h: int, w: int) -> np.ndarray:
        from rasterio.features import rasterize
        from rasterio.windows import Window, bounds, transform

        out = np.zeros((h, w), np.uint8)
        if self.tree is None:
            return out
        win = Window(c0, r0, w, h)
        import shapely

        hits = self.tree.query(shapely.box(*bounds(win, self.ref.transform)))
        if len(hits) == 0:
            return out
        hits = np.sort(hits)  # burn in file order: later features win
        return rasterize(zip(self.geoms[hits], self.values[hits], strict=True),
                         out_shape=(h, w), transform=transform(win, self.ref.transform),
                         fill=0, dtype="uint8")


# --------------------------------------------------------------------------- streaming

ReadWindow = Callable[[int, int, int, int], np.ndarray]


def evaluate_readers(
    read_pred: ReadWindow,
    read_truth: ReadWindow,
    shape: tuple[int, int],
    classes: Sequence[str],
    *,
    read_coarse: ReadWindow | None = None,
    window: int = 1024,
    ignore_index: int = 255,
    ignore_classes: Sequence[str] = (),
    k: float = DEFAULT_K,
    accumulator: MetricAccumulator | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Stream any window readers ``read(row0, col0, rows, cols) -> 2-D array``.

    Pass ``accumulator`` to pool several scenes into one (folder mode); the result returned
    is then the pooled one so far.
    """
    acc = accumulator or MetricAccumulator(
        classes, ignore_index=ignore_index, ignore_classes=ignore_classes,
        with_coarse=read_coarse is not None)
    wins = list(iter_windows(shape[0], shape[1], window))
    if progress:
        from tqdm import tqdm

        wins = tqdm(wins, desc="evaluate", unit="window", leave=False, disable=None)
    for (r0, c0, h, w), core in wins:
        acc.update(read_pred(r0, c0, h, w), read_truth(r0, c0, h, w),
                   None if read_coarse is None else read_coarse(r0, c0, h, w), core)
    return acc.result(k)


def scene_classes(pred_ds: Any, classes: Sequence[str] | None, reads: Sequence[Any],
                  ignore_index: int, fallback: Sequence[str] | None = None) -> list[str]:
    """Class names: given, else PRED's tag, else ``fallback``, else sized by the largest id."""
    if classes:
        return list(classes)
    names = raster_class_names(pred_ds)
    if names:
        return names
    if fallback:
        return list(fallback)
    shape = (pred_ds.height, pred_ds.width)
    top = max(_max_class_id(r, shape, {255, ignore_index}) for r in reads)
    return default_class_names(max(top + 1, 2))


def score_scene(
    pred: str | os.PathLike[str],
    truth: str | os.PathLike[str],
    *,
    coarse: str | os.PathLike[str] | None = None,
    classes: Sequence[str] | None = None,
    window: int = 1024,
    ignore_index: int = 255,
    ignore_classes: Sequence[str] = (),
    class_field: str = DEFAULT_CLASS_FIELD,
    progress: bool = False,
    fallback_classes: Sequence[str] | None = None,
) -> MetricAccumulator:
    """Stream one scene into a fresh :class:`MetricAccumulator` (for pooling scenes).

    ``fallback_classes`` replaces the search for the largest class id when neither
    ``classes`` nor PRED's tag name the classes (folder mode: the first scene's names).
    """
    with ExitStack() as stack:
        pred_ds = stack.enter_context(open_class_raster(pred, "PRED"))
        read_pred = _raster_reader(pred_ds, 255, "PRED")
        read_coarse = None
        if coarse is not None:
            coarse_ds = stack.enter_context(open_class_raster(coarse, "COARSE"))
            check_same_grid(pred_ds, coarse_ds, "COARSE")
            read_coarse = _raster_reader(coarse_ds, 255, "COARSE")
        truth_ds = None
        if not is_vector(truth):
            truth_ds = stack.enter_context(open_class_raster(truth, "TRUTH"))
            check_same_grid(pred_ds, truth_ds, "TRUTH")
            read_truth: Any = _raster_reader(truth_ds, ignore_index, "TRUTH")
        reads = [read_pred] + ([read_truth] if truth_ds is not None else [])
        reads += [read_coarse] if read_coarse is not None else []
        names = scene_classes(pred_ds, classes, reads, ignore_index, fallback_classes)
        if truth_ds is None:
            read_truth = VectorTruth(truth, pred_ds, names, class_field)
        acc = MetricAccumulator(names, ignore_index=ignore_index,
                                ignore_classes=ignore_classes, with_coarse=coarse is not None)
        evaluate_readers(read_pred, read_truth, (pred_ds.height, pred_ds.width), names,
                         read_coarse=read_coarse, window=window, accumulator=acc,
                         progress=progress)
        return acc


def evaluate_scene(
    pred: str | os.PathLike[str],
    truth: str | os.PathLike[str],
    *,
    coarse: str | os.PathLike[str] | None = None,
    classes: Sequence[str] | None = None,
    window: int = 1024,
    ignore_index: int = 255,
    ignore_classes: Sequence[str] = (),
    k: float = DEFAULT_K,
    class_field: str = DEFAULT_CLASS_FIELD,
    progress: bool = False,
) -> dict[str, Any]:
    """Score class rasters on one grid, streaming in haloed windows (band 1 of each).

    Class names come from ``classes``, else PRED's ``IDGBR_CLASSES`` tag, else
    ``background, class_1, ...`` sized by the largest id found. TRUTH may also be a vector
    file (rasterized onto PRED's grid window by window). The result is the one
    :func:`~idgbr_geo.metrics.evaluate_arrays` gives for the whole arrays.
    """
    return score_scene(pred, truth, coarse=coarse, classes=classes, window=window,
                       ignore_index=ignore_index, ignore_classes=ignore_classes,
                       class_field=class_field, progress=progress).result(k)


#: the public name (``idgbr_geo.evaluate_rasters``)
evaluate_rasters = evaluate_scene


def _scenes(folder: Path, suffixes: set[str], what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise InputError(f"{what} {folder} is not a folder")
    found = {p.stem: p for p in sorted(folder.iterdir())
             if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith(".")}
    return found


def match_folders(pred_dir: str | os.PathLike[str], truth_dir: str | os.PathLike[str],
                  coarse_dir: str | os.PathLike[str] | None = None,
                  ) -> tuple[list[tuple[str, Path, Path, Path | None]], list[str]]:
    """Pair scenes by file stem: ``pred/a.tif`` with ``truth/a.tif`` (or ``a.gpkg`` ...).

    Returns the matched (name, pred, truth, coarse) tuples and the PRED names left unmatched.
    """
    preds = _scenes(Path(pred_dir), RASTER_SUFFIXES, "PRED")
    if not preds:
        raise InputError(f"PRED folder {pred_dir} holds no raster "
                         f"({', '.join(sorted(RASTER_SUFFIXES))})")
    truths = _scenes(Path(truth_dir), RASTER_SUFFIXES | VECTOR_SUFFIXES, "TRUTH")
    coarses = _scenes(Path(coarse_dir), RASTER_SUFFIXES, "COARSE") if coarse_dir else {}
    pairs, missing = [], []
    for name, p in preds.items():
        if name not in truths or (coarse_dir and name not in coarses):
            missing.append(p.name)
            continue
        pairs.append((name, p, truths[name], coarses.get(name)))
    if not pairs:
        raise InputError(f"no scene of PRED folder {pred_dir} has a TRUTH of the same name in "
                         f"{truth_dir}" + (f" and a COARSE in {coarse_dir}" if coarse_dir else ""))
    return pairs, missing


def evaluate_folders(
    pred_dir: str | os.PathLike[str],
    truth_dir: str | os.PathLike[str],
    *,
    coarse_dir: str | os.PathLike[str] | None = None,
    classes: Sequence[str] | None = None,
    window: int = 1024,
    ignore_index: int = 255,
    ignore_classes: Sequence[str] = (),
    k: float = DEFAULT_K,
    class_field: str = DEFAULT_CLASS_FIELD,
    progress: bool = False,
) -> dict[str, Any]:
    """Score every PRED scene that has a TRUTH of the same name; pool counts for the total.

    The top level of the result holds the pooled ("overall") metrics in the single-scene
    shape, plus ``scenes`` {name: metrics} and ``unmatched`` (PRED files without a TRUTH).
    All scenes must share their class names.
    """
    pairs, missing = match_folders(pred_dir, truth_dir, coarse_dir)
    opts = dict(window=window, ignore_index=ignore_index, ignore_classes=ignore_classes,
                class_field=class_field, progress=progress)
    scenes: dict[str, Any] = {}
    pooled: MetricAccumulator | None = None
    for name, pred, truth, coarse in pairs:
        acc = score_scene(pred, truth, coarse=coarse, classes=classes,
                          fallback_classes=pooled.classes if pooled else None, **opts)
        if pooled is None:
            pooled = MetricAccumulator(acc.classes, ignore_index=ignore_index,
                                       ignore_classes=ignore_classes,
                                       with_coarse=coarse is not None)
        elif acc.classes != pooled.classes:
            raise InputError(f"scene {pred.name} has classes {acc.classes}, earlier scenes "
                             f"{pooled.classes}; evaluate them separately")
        scenes[name] = acc.result(k)
        pooled.merge(acc)
    assert pooled is not None
    out = pooled.result(k)
    out["scenes"] = scenes
    out["unmatched"] = missing
    return out


def evaluate_paths(pred: str | os.PathLike[str], truth: str | os.PathLike[str], *,
                   coarse: str | os.PathLike[str] | None = None, **kwargs: Any,
                   ) -> dict[str, Any]:
    """One scene or two (three) folders, decided by what PRED is."""
    if Path(pred).is_dir():
        if not Path(truth).is_dir():
            raise InputError(f"PRED {pred} is a folder, so TRUTH must be one too")
        if coarse is not None and not Path(coarse).is_dir():
            raise InputError(f"PRED {pred} is a folder, so COARSE must be one too")
        return evaluate_folders(pred, truth, coarse_dir=coarse, **kwargs)
    if Path(truth).is_dir():
        raise InputError(f"TRUTH {truth} is a folder but PRED {pred} is a file")
    return evaluate_scene(pred, truth, coarse=coarse, **kwargs)


# --------------------------------------------------------------------------- reports


def to_json(result: dict[str, Any]) -> str:
    """Strict JSON (undefined values are already ``null``; NaN would be a bug)."""
    return json.dumps(result, indent=2, allow_nan=False)


def _fmt(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.4f}" if signed else f"{v:.4f}"


METRIC_ROWS = [
    ("IoU", ("iou",)),
    ("F1", ("f1",)),
    *[(f"BF@{t}px", ("boundary_f", str(t))) for t in BF_TOLERANCES],
    (f"BoundaryIoU d={BOUNDARY_IOU_WIDTH}", ("boundary_iou",)),
    ("WFm 3px band", ("wfm",)),
    ("Accuracy", ("accuracy",)),
]


def _get(res: dict[str, Any], path: Sequence[str]) -> dict[str, float | None]:
    d = res
    for p in path:
        d = d[p]
    return d


def format_table(result: dict[str, Any], title: str | None = None) -> str:
    """A readable table: one row per metric (and map), one column per class plus mean."""
    cols = list(result["classes"]) + ["mean"]
    coarse = result.get("coarse")
    width = max(9, *(len(c) for c in cols)) + 1
    head = f"{'metric':<20}" + (f"{'map':<9}" if coarse else "")
    lines = [title] if title else []
    lines.append(head + "".join(f"{c:>{width}}" for c in cols))
    lines.append("-" * len(lines[-1]))
    for label, path in METRIC_ROWS:
        ref = _get(result, path)
        if coarse is None:
            lines.append(f"{label:<20}" + "".join(f"{_fmt(ref.get(c)):>{width}}" for c in cols))
            continue
        cor = _get(coarse, path)
        diff = {c: (None if ref.get(c) is None or cor.get(c) is None else ref[c] - cor[c])
                for c in cols}
        lines.append(f"{label:<20}{'coarse':<9}"
                     + "".join(f"{_fmt(cor.get(c)):>{width}}" for c in cols))
        lines.append(f"{'':<20}{'refined':<9}"
                     + "".join(f"{_fmt(ref.get(c)):>{width}}" for c in cols))
        lines.append(f"{'':<20}{'change':<9}"
                     + "".join(f"{_fmt(diff[c], True):>{width}}" for c in cols))
    if coarse is not None:
        imp = result["iou_imp"]
        lines.append(f"{'IoU_imp k=' + format(result['iou_imp_k'], 'g'):<29}"
                     + "".join(f"{_fmt(imp.get(c), True):>{width}}" for c in cols))
    pa = f"pixel accuracy {_fmt(result['pixel_accuracy'])}"
    if coarse is not None:
        pa += f" (coarse {_fmt(coarse['pixel_accuracy'])})"
    lines.append(f"{pa}; {result['pixels']:,} valid pixels")
    return "\n".join(lines)


def format_report(result: dict[str, Any]) -> str:
    """Single scene: one table. Folders: one table per scene, then the pooled total."""
    if "scenes" not in result:
        return format_table(result)
    parts = [format_table(res, f"== {name}") for name, res in result["scenes"].items()]
    parts.append(format_table(result, f"== overall ({len(result['scenes'])} scenes, pooled)"))
    if result.get("unmatched"):
        parts.append("not evaluated (no TRUTH/COARSE of the same name): "
                     + ", ".join(result["unmatched"]))
    return "\n\n".join(parts)


__all__ = [
    "VectorTruth", "check_same_grid", "evaluate_arrays", "evaluate_folders", "evaluate_paths",
    "evaluate_rasters", "evaluate_readers", "evaluate_scene", "format_report", "format_table",
    "match_folders", "open_class_raster", "raster_class_names", "score_scene", "to_json",
]

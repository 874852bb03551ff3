"""Segmentation and boundary metrics that stream over scenes larger than memory.

Every metric here is a ratio of pixel counts, so a scene is scored by accumulating counts
window by window (:class:`MetricAccumulator`) and dividing once at the end. Boundary maps
need neighbours, so each window is read with a halo of :data:`HALO` pixels and only its core
is counted: the result is identical to scoring the whole array at once (see the tests).
This module works on arrays only; :mod:`idgbr_geo.evaluate` streams rasters and vector truth
through it (:func:`~idgbr_geo.evaluate.evaluate_rasters`).

Definitions (``c`` is a class, ``V`` the valid pixels: TRUTH != ignore_index):

* ``iou``: TP / (TP + FP + FN); ``f1``: 2TP / (2TP + FP + FN); ``accuracy``: per class
  TP / (TP + FN) (producer's accuracy), its ``mean`` is the mean class accuracy; the overall
  pixel accuracy is the top-level ``pixel_accuracy``.
* Boundary of a class mask: its inner 8-connected boundary (pixels of the mask with a
  neighbour outside it). The scene edge and ignored pixels never make a boundary.
* ``boundary_f`` ("1", "2", "3"): boundary F-score (Csurka et al. 2013; the DAVIS "F"):
  precision = share of predicted boundary pixels within d px (Euclidean) of a true boundary
  pixel, recall = the converse, F = 2PR / (P + R), for d = 1, 2, 3.
* ``boundary_iou``: Boundary IoU (Cheng et al., CVPR 2021) with a **fixed band width of
  d = 3 px** (:data:`BOUNDARY_IOU_WIDTH`) instead of the paper's 2 % of the image diagonal,
  which is meaningless for georeferenced scenes of arbitrary size and would defeat streaming:
  IoU of the inner bands ``G - erode(G, (2d+1) square)`` of truth and prediction (as the
  reference code, which erodes d times by a 3x3 square, but without making the image
  border a contour).
* ``wfm``: the IDGBR paper's boundary weighted F-measure in a 3 px band, as in its
  reference code (``evaluation/edge_generator.py`` + ``wfmeasure.py`` of KeyanHu-git/IDGBR):
  the band of class c is the 3x3 morphological gradient of the mask (pixels whose 3x3
  neighbourhood holds both c and not-c; the reference uses Sobel != 0, which differs only at
  isolated single pixels) dilated by a 3x3 square; then the weighted F-measure of Margolin et
  al. (CVPR 2014, beta = 1, Gaussian sigma 5 truncated at 3 px, distance weight
  ``2 - 0.5 ** (dist / 5)``) between predicted and true band. Two deliberate deviations: the
  distance in that weight is capped at :data:`WFM_DIST_CAP` = 32 px (the weight then differs
  from the uncapped one by < 0.012; needed for exact streaming), and sums are pooled over the
  whole scene (the reference averages per image tile). The reference scores the binary
  band map and reports the lower of its "band" and "off band" scores, in practice the band
  score, which is what is computed here; for a binary map both classes have the same band,
  so both values equal that class-agnostic WFm.
* ``iou_imp`` (with a coarse map): the repair score of the IDGBR paper,
  ``IoU_F - k * (1 - IoU_T)`` where IoU_F is the refined map's IoU restricted to the pixels
  the coarse map got wrong (its "false region") and IoU_T the IoU restricted to the pixels
  it got right ("true region"); default **k = 1**. ``mean`` uses the mean IoUs. (Definition
  as specified for this project; the paper's own text was not available to cross-check.)

Nodata (ignored) TRUTH pixels behave like the outside of the scene: they are not counted,
never make a boundary, and pad the WFm Gaussian with zeros like the scene edge does.

Undefined values (0 / 0, e.g. a class absent from both truth and prediction, or no valid
pixel at all) are ``None`` (``null`` in JSON) and left out of the means; a mean over no
defined value is ``None``. A prediction value outside the class range (e.g. 255 = nodata)
counts as "no class": a miss for the true class, a false positive for none.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from .errors import InputError

#: tolerances (px) of the boundary F-score
BF_TOLERANCES = (1, 2, 3)
#: Boundary IoU band width d (px)
BOUNDARY_IOU_WIDTH = 3
#: IDGBR WFm band: edge_size of the square dilation of the 3x3 gradient (px)
WFM_BAND = 3
#: Margolin et al. weighted F-measure constants
WFM_SIGMA = 5.0
WFM_TRUNCATE_PX = 3
#: cap (px) on the distance used in the WFm false-positive weight (for exact streaming)
WFM_DIST_CAP = 32
#: halo read around each window: covers the WFm chain (2 + 32 + margin) and all others
HALO = 40
#: default repair-score weight k in IoU_imp = IoU_F - k (1 - IoU_T)
DEFAULT_K = 1.0

METRIC_KEYS = ("iou", "f1", "boundary_f", "boundary_iou", "wfm", "accuracy")


def default_class_names(num_classes: int) -> list[str]:
    """Fallback names when a raster carries no ``IDGBR_CLASSES`` tag (0 = background)."""
    return ["background"] + [f"class_{i}" for i in range(1, num_classes)]


# --------------------------------------------------------------------------- morphology


def _erode(mask: np.ndarray, size: int) -> np.ndarray:
    """Square erosion in which pixels beyond the array edge count as inside the mask."""
    return ndimage.minimum_filter(mask.view(np.uint8), size=size, mode="nearest").view(bool)


def _dilate(mask: np.ndarray, size: int) -> np.ndarray:
    return ndimage.maximum_filter(mask.view(np.uint8), size=size, mode="nearest").view(bool)


def _inner_boundary(mask: np.ndarray, valid: np.ndarray, width: int = 1) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` px (Chebyshev) of a valid pixel outside it."""
    return mask & ~_erode(mask | ~valid, 2 * width + 1)


def _wfm_band(mask: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """IDGBR boundary band: 3x3 morphological gradient dilated by a WFM_BAND square."""
    grad = _dilate(mask & valid, 3) & ~_erode(mask | ~valid, 3)
    return _dilate(grad, WFM_BAND) & valid


def _distance_to(mask: np.ndarray, return_indices: bool = False) -> Any:
    """Euclidean distance of every pixel to the nearest pixel of ``mask`` (inf if none)."""
    if not mask.any():
        dist = np.full(mask.shape, np.inf)
        return (dist, None) if return_indices else dist
    return ndimage.distance_transform_edt(~mask, return_indices=return_indices)


# --------------------------------------------------------------------------- accumulation


@dataclass
class _Counts:
    """Pixel counts of one map (refined or coarse) against the truth, per class."""

    k: int
    confusion: np.ndarray = field(init=False)  # (K, K+1): truth x prediction (+ no class)
    bf_pred: np.ndarray = field(init=False)  # (K,) predicted boundary pixels
    bf_pred_hit: np.ndarray = field(init=False)  # (3, K) of those near a true boundary
    bf_true: np.ndarray = field(init=False)
    bf_true_hit: np.ndarray = field(init=False)
    biou_inter: np.ndarray = field(init=False)
    biou_union: np.ndarray = field(init=False)
    wfm_ngt: np.ndarray = field(init=False)  # true band pixels
    wfm_ew_gt: np.ndarray = field(init=False)  # weighted error on the true band
    wfm_ew_bg: np.ndarray = field(init=False)  # weighted error off the true band

    def __post_init__(self) -> None:
        k = self.k
        self.confusion = np.zeros((k, k + 1), np.int64)
        for name in ("bf_pred", "bf_true", "biou_inter", "biou_union", "wfm_ngt"):
            setattr(self, name, np.zeros(k, np.int64))
        self.bf_pred_hit = np.zeros((len(BF_TOLERANCES), k), np.int64)
        self.bf_true_hit = np.zeros((len(BF_TOLERANCES), k), np.int64)
        self.wfm_ew_gt = np.zeros(k, np.float64)
        self.wfm_ew_bg = np.zeros(k, np.float64)


def _truth_maps(mask: np.ndarray, valid: np.ndarray) -> dict[str, Any]:
    """Truth-derived maps of one class in one window, shared by the refined and coarse maps."""
    bnd = _inner_boundary(mask, valid)
    band = _wfm_band(mask, valid)
    band_dist, band_idx = _distance_to(band, return_indices=True)
    return {
        "mask": mask,
        "boundary": bnd,
        "dist_boundary": _distance_to(bnd),
        "biou": _inner_boundary(mask, valid, BOUNDARY_IOU_WIDTH),
        "band": band,
        "band_dist": band_dist,
        "band_idx": band_idx,
    }


def _wfm_terms(
    cand: np.ndarray, gt: dict[str, Any], valid: np.ndarray, core: tuple[slice, slice]
) -> tuple[int, float, float]:
    """Margolin weighted-error sums on the core: (n_gt, sum Ew on gt, sum Ew off gt)."""
    band = gt["band"]
    e = (cand != band) & valid
    n_gt = int(band[core].sum())
    if gt["band_idx"] is None:  # no true band anywhere near: every error has the max weight
        weight = 2.0 - 0.5 ** (WFM_DIST_CAP / WFM_SIGMA)
        return 0, 0.0, float(e[core].sum()) * weight
    ef = e.astype(np.float64)
    idx = gt["band_idx"]
    et = ef[idx[0], idx[1]]  # off the band: error of the nearest band pixel (on it: itself)
    et[~valid] = 0.0  # nodata acts like the outside of the scene (zero padding)
    ea = ndimage.gaussian_filter(
        et, sigma=WFM_SIGMA, truncate=WFM_TRUNCATE_PX / WFM_SIGMA, mode="constant", cval=0.0
    )
    band_c, valid_c, e_c = band[core], valid[core], ef[core]
    ew_gt = np.minimum(e_c, ea[core])[band_c].sum()
    dist = np.minimum(gt["band_dist"][core], WFM_DIST_CAP)
    off = valid_c & ~band_c
    ew_bg = (e_c[off] * (2.0 - 0.5 ** (dist[off] / WFM_SIGMA))).sum()
    return n_gt, float(ew_gt), float(ew_bg)


def _accumulate_class(
    acc: _Counts,
    c: int,
    mask: np.ndarray,
    gt: dict[str, Any],
    valid: np.ndarray,
    core: tuple[slice, slice],
) -> None:
    """Add one window's boundary counts of class ``c`` (predicted ``mask``) to ``acc``."""
    bnd = _inner_boundary(mask, valid)
    bnd_c, gtb_c = bnd[core], gt["boundary"][core]
    acc.bf_pred[c] += int(bnd_c.sum())
    acc.bf_true[c] += int(gtb_c.sum())
    if bnd_c.any() or gtb_c.any():
        dist_pred = _distance_to(bnd)[core]
        dist_true = gt["dist_boundary"][core]
        for i, tol in enumerate(BF_TOLERANCES):
            acc.bf_pred_hit[i, c] += int((bnd_c & (dist_true <= tol)).sum())
            acc.bf_true_hit[i, c] += int((gtb_c & (dist_pred <= tol)).sum())
    biou = _inner_boundary(mask, valid, BOUNDARY_IOU_WIDTH)[core]
    gtbiou = gt["biou"][core]
    acc.biou_inter[c] += int((biou & gtbiou).sum())
    acc.biou_union[c] += int((biou | gtbiou).sum())
    n_gt, ew_gt, ew_bg = _wfm_terms(_wfm_band(mask, valid), gt, valid, core)
    acc.wfm_ngt[c] += n_gt
    acc.wfm_ew_gt[c] += ew_gt
    acc.wfm_ew_bg[c] += ew_bg


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den > 0 else None


def _mean(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def _fscore(p: float | None, r: float | None) -> float | None:
    if p is None and r is None:
        return None
    p, r = p or 0.0, r or 0.0
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


class MetricAccumulator:
    """Streaming accumulator: feed windows with :meth:`update`, read :meth:`result`.

    ``classes`` are the class names (index = class id). ``ignore_classes`` are names whose
    TRUTH pixels are treated like nodata and that are left out of the report.
    """

    def __init__(
        self,
        classes: Sequence[str],
        *,
        ignore_index: int = 255,
        ignore_classes: Sequence[str] = (),
        with_coarse: bool = False,
    ) -> None:
        self.classes = list(classes)
        if not self.classes:
            raise InputError("no classes to evaluate")
        unknown = [n for n in ignore_classes if n not in self.classes]
        if unknown:
            raise InputError(f"unknown class {unknown[0]!r} to ignore (classes: "
                             f"{', '.join(self.classes)})")
        self.ignored_ids = [self.classes.index(n) for n in ignore_classes]
        self.ignore_index = ignore_index
        k = len(self.classes)
        self.refined = _Counts(k)
        self.coarse = _Counts(k) if with_coarse else None
        # refined vs truth on the coarse map's false (F) and true (T) regions
        self.false_region = np.zeros((k, k + 1), np.int64) if with_coarse else None
        self.true_region = np.zeros((k, k + 1), np.int64) if with_coarse else None

    def _labels(self, arr: np.ndarray, what: str, valid: np.ndarray) -> np.ndarray:
        """Class ids as int64 with every out-of-range value mapped to K ("no class")."""
        k = len(self.classes)
        a = np.asarray(arr)
        if a.dtype.kind == "f":
            a = np.where(np.isfinite(a), a, 255)
        a = a.astype(np.int64)
        bad = (a >= k) & (a != 255) & (a != self.ignore_index) | (a < 0)
        if (bad & valid).any():
            value = int(a[bad & valid][0])
            raise InputError(f"{what} holds class id {value} but only {k} classes are known "
                             f"({', '.join(self.classes)})")
        return np.where((a >= k) | (a < 0), k, a)

    def update(
        self,
        pred: np.ndarray,
        truth: np.ndarray,
        coarse: np.ndarray | None = None,
        core: tuple[slice, slice] | None = None,
    ) -> None:
        """Count one window; only ``core`` (default: all) is counted, the rest is halo."""
        core = core or (slice(None), slice(None))
        t = np.asarray(truth).astype(np.int64)
        valid = t != self.ignore_index
        for cid in self.ignored_ids:
            valid &= t != cid
        k = len(self.classes)
        bad = valid & ((t < 0) | (t >= k))
        if bad.any():
            raise InputError(f"TRUTH holds class id {int(t[bad][0])} but only {k} classes are "
                             f"known ({', '.join(self.classes)}); mark nodata with "
                             f"{self.ignore_index}")
        t = np.where(valid, t, 0)
        p = self._labels(pred, "PRED", valid)
        if p.shape != t.shape:
            raise InputError(f"PRED {p.shape} and TRUTH {t.shape} differ in shape")
        maps = [(self.refined, p)]
        if self.coarse is not None:
            if coarse is None:
                raise InputError("a coarse map is needed for every window")
            cm = self._labels(coarse, "COARSE", valid)
            if cm.shape != t.shape:
                raise InputError(f"COARSE {cm.shape} and TRUTH {t.shape} differ in shape")
            maps.append((self.coarse, cm))
        vc = valid[core]
        for acc, m in maps:
            codes = t[core][vc] * (k + 1) + m[core][vc]
            acc.confusion += np.bincount(codes, minlength=k * (k + 1)).reshape(k, k + 1)
        for c in range(k):  # one class at a time bounds memory for many classes
            t_mask = (t == c) & valid
            masks = [(m == c) & valid for _, m in maps]
            if not t_mask.any() and not any(pm.any() for pm in masks):
                continue
            gt = _truth_maps(t_mask, valid)
            for (acc, _), pm in zip(maps, masks, strict=True):
                _accumulate_class(acc, c, pm, gt, valid, core)
        if self.coarse is not None:
            right = (cm[core] == t[core]) & vc
            codes = t[core] * (k + 1) + p[core]
            n = k * (k + 1)
            self.true_region += np.bincount(codes[right], minlength=n).reshape(k, k + 1)
            self.false_region += np.bincount(codes[vc & ~right], minlength=n).reshape(k, k + 1)

    # ------------------------------------------------------------------ results

    def merge(self, other: MetricAccumulator) -> None:
        """Add another accumulator's counts (same classes), e.g. to pool scenes."""
        if other.classes != self.classes or (other.coarse is None) != (self.coarse is None):
            raise InputError(f"cannot pool scenes with classes {other.classes} and "
                             f"{self.classes}")
        pairs = [(self.refined, other.refined)]
        if self.coarse is not None and other.coarse is not None:
            pairs.append((self.coarse, other.coarse))
            self.true_region += other.true_region
            self.false_region += other.false_region
        for mine, theirs in pairs:
            for name in vars(mine):
                if name != "k":
                    setattr(mine, name, getattr(mine, name) + getattr(theirs, name))

    def _keep(self) -> list[int]:
        return [c for c in range(len(self.classes)) if c not in self.ignored_ids]

    @staticmethod
    def _iou(conf: np.ndarray) -> np.ndarray:
        """IoU per class from a (K, K+1) matrix; NaN where undefined."""
        k = conf.shape[0]
        tp = np.diag(conf[:, :k]).astype(np.float64)
        fn = conf.sum(axis=1) - tp
        fp = conf[:, :k].sum(axis=0) - tp
        den = tp + fp + fn
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, tp / np.maximum(den, 1), np.nan)

    def _map_result(self, counts: _Counts) -> dict[str, Any]:
        k, keep, names = len(self.classes), self._keep(), self.classes
        conf = counts.confusion
        tp = np.diag(conf[:, :k]).astype(np.float64)
        fn = conf.sum(axis=1) - tp
        fp = conf[:, :k].sum(axis=0) - tp
        per: dict[str, dict[str, float | None]] = {key: {} for key in METRIC_KEYS}
        bf: dict[str, dict[str, float | None]] = {str(t): {} for t in BF_TOLERANCES}
        for c in keep:
            n = names[c]
            per["iou"][n] = _ratio(tp[c], tp[c] + fp[c] + fn[c])
            per["f1"][n] = _ratio(2 * tp[c], 2 * tp[c] + fp[c] + fn[c])
            per["accuracy"][n] = _ratio(tp[c], tp[c] + fn[c])
            for i, tol in enumerate(BF_TOLERANCES):
                prec = _ratio(counts.bf_pred_hit[i, c], counts.bf_pred[c])
                rec = _ratio(counts.bf_true_hit[i, c], counts.bf_true[c])
                bf[str(tol)][n] = _fscore(prec, rec)
            per["boundary_iou"][n] = _ratio(counts.biou_inter[c], counts.biou_union[c])
            per["wfm"][n] = _wfm_value(counts.wfm_ngt[c], counts.wfm_ew_gt[c],
                                       counts.wfm_ew_bg[c])
        out: dict[str, Any] = {}
        for key in METRIC_KEYS:
            if key == "boundary_f":
                out[key] = {t: {**v, "mean": _mean(list(v.values()))} for t, v in bf.items()}
            else:
                vals = per[key]
                out[key] = {**vals, "mean": _mean(list(vals.values()))}
        total = conf[keep].sum()
        out["pixel_accuracy"] = _ratio(tp[keep].sum(), total)
        out["pixels"] = int(total)
        return out

    def result(self, k: float = DEFAULT_K) -> dict[str, Any]:
        """The metrics as a JSON-ready dict (see the module docstring for definitions)."""
        out = self._map_result(self.refined)
        out["classes"] = [self.classes[c] for c in self._keep()]
        if self.coarse is not None:
            out["coarse"] = self._map_result(self.coarse)
            keep = self._keep()
            iou_f = self._iou(self.false_region)[keep]
            iou_t = self._iou(self.true_region)[keep]
            imp: dict[str, float | None] = {}
            for c, f, t in zip(keep, iou_f, iou_t, strict=True):
                imp[self.classes[c]] = (None if math.isnan(f) or math.isnan(t)
                                        else float(f - k * (1.0 - t)))
            mf = _mean([None if math.isnan(v) else float(v) for v in iou_f])
            mt = _mean([None if math.isnan(v) else float(v) for v in iou_t])
            imp["mean"] = None if mf is None or mt is None else mf - k * (1.0 - mt)
            out["iou_imp"] = imp
            out["iou_imp_k"] = float(k)
        return out


def _wfm_value(n_gt: int, ew_gt: float, ew_bg: float) -> float | None:
    """Margolin weighted F (beta = 1) from pooled sums; None without a true band."""
    if n_gt == 0:
        return None
    tpw = n_gt - ew_gt
    recall = 1.0 - ew_gt / n_gt
    eps = np.spacing(1)
    precision = tpw / (eps + tpw + ew_bg)
    return float(2 * recall * precision / (eps + recall + precision))


# --------------------------------------------------------------------------- windows


def iter_windows(
    height: int, width: int, size: int, halo: int = HALO
) -> Iterator[tuple[tuple[int, int, int, int], tuple[slice, slice]]]:
    """Yield ((row0, col0, rows, cols) of the haloed read, core slices inside it)."""
    size = max(1, int(size))
    for r in range(0, height, size):
        for c in range(0, width, size):
            h, w = min(size, height - r), min(size, width - c)
            r0, c0 = max(0, r - halo), max(0, c - halo)
            r1, c1 = min(height, r + h + halo), min(width, c + w + halo)
            core = (slice(r - r0, r - r0 + h), slice(c - c0, c - c0 + w))
            yield (r0, c0, r1 - r0, c1 - c0), core


def evaluate_arrays(
    pred: np.ndarray,
    truth: np.ndarray,
    classes: Sequence[str] | int,
    *,
    coarse: np.ndarray | None = None,
    ignore_index: int = 255,
    k: float = DEFAULT_K,
    ignore_classes: Sequence[str] = (),
    window: int | None = None,
) -> dict[str, Any]:
    """Score in-memory class maps (2-D arrays of class ids) against the truth.

    ``classes`` is the list of class names (or their number). Returns the ``--json`` shape of
    ``idgbr-geo evaluate``. ``window`` processes the arrays in haloed windows exactly as
    :func:`evaluate_rasters` does (the result is the same; useful to bound memory).
    """
    names = default_class_names(classes) if isinstance(classes, int) else list(classes)
    pred, truth = np.asarray(pred), np.asarray(truth)
    for what, arr in (("PRED", pred), ("TRUTH", truth), ("COARSE", coarse)):
        if arr is not None and np.ndim(arr) != 2:
            raise InputError(f"{what} must be a 2-D array of class ids, got shape "
                             f"{np.shape(arr)}")
    if pred.shape != truth.shape or (coarse is not None and np.shape(coarse) != truth.shape):
        raise InputError(f"PRED {pred.shape}, TRUTH {truth.shape}"
                         + (f" and COARSE {np.shape(coarse)}" if coarse is not None else "")
                         + " differ in shape")
    acc = MetricAccumulator(names, ignore_index=ignore_index, ignore_classes=ignore_classes,
                            with_coarse=coarse is not None)
    height, width = truth.shape
    size = window or max(height, width, 1)
    for (r0, c0, h, w), core in iter_windows(height, width, size):
        sl = (slice(r0, r0 + h), slice(c0, c0 + w))
        acc.update(pred[sl], truth[sl], None if coarse is None else np.asarray(coarse)[sl],
                   core)
    return acc.result(k)

"""Metrics on tiny arrays with hand-computed values, conventions, and exact streaming."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage
from synth import assert_same, class_blobs, flatten

from idgbr_geo.errors import InputError
from idgbr_geo.metrics import MetricAccumulator, evaluate_arrays

NAMES = ["background", "building"]


def half_plane(cols: int, size: int = 10) -> np.ndarray:
    """Class 1 on the first ``cols`` columns of a size x size map."""
    a = np.zeros((size, size), np.uint8)
    a[:, :cols] = 1
    return a


def square(row: int, col: int, side: int = 4, size: int = 12) -> np.ndarray:
    a = np.zeros((size, size), np.uint8)
    a[row:row + side, col:col + side] = 1
    return a


def test_half_plane_shifted_by_one_pixel():
    # truth: building on columns 0-4; prediction: columns 0-5 (one column too wide)
    r = evaluate_arrays(half_plane(6), half_plane(5), NAMES)
    assert r["iou"]["building"] == pytest.approx(50 / 60)
    assert r["iou"]["background"] == pytest.approx(40 / 50)
    assert r["iou"]["mean"] == pytest.approx((50 / 60 + 40 / 50) / 2)
    assert r["f1"]["building"] == pytest.approx(100 / 110)
    assert r["f1"]["background"] == pytest.approx(80 / 90)
    assert r["accuracy"]["building"] == pytest.approx(1.0)
    assert r["accuracy"]["background"] == pytest.approx(0.8)
    assert r["pixel_accuracy"] == pytest.approx(0.9)
    assert r["pixels"] == 100
    # boundaries are one pixel apart: matched at every tolerance >= 1
    for tol in ("1", "2", "3"):
        assert r["boundary_f"][tol]["building"] == pytest.approx(1.0)
        assert r["boundary_f"][tol]["background"] == pytest.approx(1.0)
    # 3 px inner bands: truth cols 2-4, prediction cols 3-5 -> 2 / 4
    assert r["boundary_iou"]["building"] == pytest.approx(0.5)
    assert r["boundary_iou"]["background"] == pytest.approx(0.5)
    # binary map: both classes share one IDGBR band, hence one WFm
    assert 0 < r["wfm"]["building"] < 1
    assert r["wfm"]["building"] == pytest.approx(r["wfm"]["background"])


def test_half_plane_shifted_by_two_pixels():
    r = evaluate_arrays(half_plane(7), half_plane(5), NAMES)
    assert r["boundary_f"]["1"]["building"] == pytest.approx(0.0)
    assert r["boundary_f"]["2"]["building"] == pytest.approx(1.0)
    assert r["boundary_f"]["3"]["building"] == pytest.approx(1.0)
    # truth band cols 2-4, prediction band cols 4-6: 1 / 5
    assert r["boundary_iou"]["building"] == pytest.approx(0.2)
    one = evaluate_arrays(half_plane(6), half_plane(5), NAMES)
    assert r["wfm"]["building"] < one["wfm"]["building"]


def test_square_shifted_by_two_pixels():
    truth, pred = square(3, 3), square(3, 5)
    r = evaluate_arrays(pred, truth, NAMES)
    assert r["iou"]["building"] == pytest.approx(8 / 24)
    assert r["iou"]["background"] == pytest.approx(120 / 136)
    # ring of 12 boundary pixels; distances to the other ring: 0,0,1,2 on the top and
    # bottom rows, 1,1,2,2 on the side columns -> 8 of 12 within 1 px, all within 2 px
    assert r["boundary_f"]["1"]["building"] == pytest.approx(8 / 12)
    assert r["boundary_f"]["2"]["building"] == pytest.approx(1.0)
    # a 4 px square is all band at d = 3: Boundary IoU = IoU
    assert r["boundary_iou"]["building"] == pytest.approx(8 / 24)


def test_perfect_prediction_scores_one_everywhere():
    truth = class_blobs((40, 50), 3, classes=3)
    r = evaluate_arrays(truth, truth, 3)
    for key, value in flatten(r).items():
        if key not in ("pixels", "classes"):
            assert value == pytest.approx(1.0), key


def margolin_wfm(candidate: np.ndarray, gt: np.ndarray) -> float:
    """Straight whole-array port of the weighted F-measure (Margolin et al. 2014)."""
    e = np.abs(candidate.astype(float) - gt.astype(float))
    gt_mask, not_gt = gt.astype(bool), ~gt.astype(bool)
    dist, idx = ndimage.distance_transform_edt(not_gt, return_indices=True)
    et = e.copy()
    et[not_gt] = e[idx[0, not_gt], idx[1, not_gt]]
    ea = ndimage.gaussian_filter(et, 5.0, truncate=3 / 5, mode="constant", cval=0.0)
    m = np.where(gt_mask, np.minimum(e, ea), e)
    b = np.where(gt_mask, 1.0, 2 - np.exp(np.log(0.5) / 5 * dist))
    ew = m * b
    tpw = gt_mask.sum() - ew[gt_mask].sum()
    fpw = ew[not_gt].sum()
    recall = 1 - ew[gt_mask].mean()
    precision = tpw / (tpw + fpw)
    return 2 * recall * precision / (recall + precision)


def idgbr_band(labels: np.ndarray) -> np.ndarray:
    """Reference band: 3x3 gradient of the binary map dilated by a 3x3 square."""
    grad = ndimage.maximum_filter(labels, 3, mode="nearest") != ndimage.minimum_filter(
        labels, 3, mode="nearest")
    return ndimage.binary_dilation(grad, np.ones((3, 3), bool))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wfm_matches_reference_formula(seed):
    # images small enough that every pixel is within the 32 px distance cap of a band
    truth, pred = class_blobs((48, 40), seed), class_blobs((48, 40), seed + 10)
    r = evaluate_arrays(pred, truth, NAMES)
    expected = margolin_wfm(idgbr_band(pred), idgbr_band(truth))
    assert r["wfm"]["building"] == pytest.approx(expected, rel=1e-9)
    assert r["wfm"]["background"] == pytest.approx(expected, rel=1e-9)


def test_empty_class_is_null_and_left_out_of_means():
    truth = pred = half_plane(5)
    r = evaluate_arrays(pred, truth, ["background", "building", "road"])
    for key in ("iou", "f1", "boundary_iou", "wfm", "accuracy"):
        assert r[key]["road"] is None
        assert r[key]["mean"] == pytest.approx(1.0)
    assert r["boundary_f"]["2"]["road"] is None
    json.dumps(r, allow_nan=False)  # strict JSON


def test_class_predicted_but_absent_from_truth():
    truth = np.zeros((10, 10), np.uint8)
    pred = square(3, 3, size=10)
    r = evaluate_arrays(pred, truth, NAMES)
    assert r["iou"]["building"] == 0.0
    assert r["f1"]["building"] == 0.0
    assert r["accuracy"]["building"] is None  # no true pixel of the class
    assert r["boundary_f"]["3"]["building"] == 0.0  # boundary predicted, none true
    assert r["wfm"]["building"] is None  # no true band: undefined like the reference
    assert r["iou"]["background"] == pytest.approx(84 / 100)


def test_all_ignored_truth_gives_nulls_not_errors():
    truth = np.full((20, 20), 255, np.uint8)
    pred = class_blobs((20, 20), 1)
    r = evaluate_arrays(pred, truth, NAMES, coarse=pred)
    assert r["pixels"] == 0
    assert r["pixel_accuracy"] is None
    values = [v for key, v in flatten(r).items()
              if key not in ("pixels", "classes", "iou_imp_k", "coarse.pixels")]
    assert values and all(v is None for v in values)
    json.dumps(r, allow_nan=False)


def test_nodata_in_truth_is_ignored_and_makes_no_boundary():
    truth = half_plane(5, size=20)
    pred = truth.copy()
    truth[5:12, 8:15] = 255  # a hole of nodata across the boundary and inside classes
    pred[5:12, 8:15] = np.random.default_rng(0).integers(0, 2, (7, 7))
    r = evaluate_arrays(pred, truth, NAMES)
    assert r["pixels"] == 400 - 49
    for key, value in flatten(r).items():
        if key not in ("pixels", "classes"):
            assert value == pytest.approx(1.0), key


def test_prediction_nodata_counts_as_a_miss():
    truth = half_plane(5)
    pred = truth.copy()
    pred[0, 0] = 255
    r = evaluate_arrays(pred, truth, NAMES)
    assert r["iou"]["building"] == pytest.approx(49 / 50)
    assert r["iou"]["background"] == pytest.approx(1.0)  # no false positive for anyone
    assert r["pixel_accuracy"] == pytest.approx(0.99)


def test_ignore_class_drops_pixels_and_column():
    truth = half_plane(5)
    truth[:, 8:] = 2  # "clutter" on the last two columns
    pred = half_plane(5)  # predicts background on the clutter
    r = evaluate_arrays(pred, truth, ["background", "building", "clutter"],
                        ignore_classes=["clutter"])
    assert "clutter" not in r["iou"]
    assert r["classes"] == ["background", "building"]
    assert r["pixels"] == 80
    assert r["iou"]["mean"] == pytest.approx(1.0)


def test_repair_score_iou_imp():
    truth = half_plane(5)
    coarse = half_plane(7)  # wrong on columns 5-6 (the false region, 20 px)
    refined = half_plane(6)  # repairs column 6, not column 5
    r = evaluate_arrays(refined, truth, NAMES, coarse=coarse)
    # false region: background IoU 10/20, building 0/10; true region untouched (IoU 1)
    assert r["iou_imp"]["background"] == pytest.approx(0.5)
    assert r["iou_imp"]["building"] == pytest.approx(0.0)
    assert r["iou_imp"]["mean"] == pytest.approx(0.25)
    assert r["iou_imp_k"] == 1.0
    assert r["coarse"]["iou"]["building"] == pytest.approx(50 / 70)
    # damage the true region too: column 0 turned to background, with k = 2
    refined[:, 0] = 0
    r = evaluate_arrays(refined, truth, NAMES, coarse=coarse, k=2.0)
    # true region: building 40/50, background 30/40
    assert r["iou_imp"]["building"] == pytest.approx(0.0 - 2 * (1 - 0.8))
    assert r["iou_imp"]["background"] == pytest.approx(0.5 - 2 * (1 - 0.75))
    assert r["iou_imp"]["mean"] == pytest.approx(0.25 - 2 * (1 - 0.775))


def test_perfect_coarse_map_has_no_false_region():
    truth = half_plane(5)
    r = evaluate_arrays(truth, truth, NAMES, coarse=truth)
    assert r["iou_imp"]["mean"] is None
    assert r["coarse"]["iou"]["mean"] == pytest.approx(1.0)


@pytest.mark.parametrize("window", [16, 37, 64])
def test_windowed_equals_whole(window):
    truth = class_blobs((150, 130), 1, classes=3)
    truth[10:30, 100:125] = 255
    pred, coarse = class_blobs((150, 130), 2, classes=3), class_blobs((150, 130), 3, classes=3)
    pred[0, 0] = 255
    whole = evaluate_arrays(pred, truth, 3, coarse=coarse)
    assert_same(whole, evaluate_arrays(pred, truth, 3, coarse=coarse, window=window))


def test_accumulators_pool_like_one_scene():
    a_t, a_p = class_blobs((40, 30), 1), class_blobs((40, 30), 2)
    b_t, b_p = class_blobs((40, 30), 3), class_blobs((40, 30), 4)
    pooled = MetricAccumulator(NAMES)
    for p, t in ((a_p, a_t), (b_p, b_t)):
        one = MetricAccumulator(NAMES)
        one.update(p, t)
        pooled.merge(one)
    # two scenes side by side, with a nodata gap wider than any metric's reach between
    # them, behave as one scene
    gap = np.full((40, 40), 255, np.uint8)
    joined = evaluate_arrays(np.hstack([a_p, gap, b_p]), np.hstack([a_t, gap, b_t]), NAMES)
    got = flatten(pooled.result())
    for key in ("iou.mean", "f1.building", "boundary_f.2.mean", "boundary_iou.building",
                "accuracy.mean", "wfm.building"):
        assert got[key] == pytest.approx(flatten(joined)[key], rel=1e-9), key


def test_bad_inputs_raise_input_errors():
    t = half_plane(5)
    with pytest.raises(InputError, match="class id 3"):
        evaluate_arrays(t * 3, t, NAMES)
    with pytest.raises(InputError, match="TRUTH holds class id 7"):
        evaluate_arrays(t, t * 7, NAMES)
    with pytest.raises(InputError, match="differ in shape"):
        evaluate_arrays(t[:5], t, NAMES)
    with pytest.raises(InputError, match="2-D"):
        evaluate_arrays(t[None], t[None], NAMES)
    with pytest.raises(InputError, match="unknown class"):
        evaluate_arrays(t, t, NAMES, ignore_classes=["road"])


def test_float_maps_and_nan_do_not_leak_nan():
    truth = half_plane(5).astype(np.float32)
    truth[0, 0] = 255
    pred = half_plane(5).astype(np.float32)
    pred[1, 1] = np.nan
    r = evaluate_arrays(pred, truth, NAMES)
    assert not any(isinstance(v, float) and math.isnan(v) for v in flatten(r).values())
    # 49 valid building pixels, one of them predicted NaN (no class)
    assert r["iou"]["building"] == pytest.approx(48 / 49)

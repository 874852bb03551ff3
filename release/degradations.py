"""Coarse maps made from the truth: controlled, deterministic degradations for validation.

release/validate.py refines these as external coarse maps (``coarse=``) to see which kinds
of error the refiner repairs. Every map is made on the scene's own (native) grid from its
label (H, W) uint8; ignored pixels (255) count as background (0) first. ``gsd`` is the
scene's ground sample distance in metres (the model's when the scene does not say: that is
what the engine assumes too), ``model_gsd`` the model's.

* ``smooth-0.5m``, ``smooth-1m``: the one-hot truth smoothed by a Gaussian of sigma 0.5 m /
  1 m (``sigma / gsd`` native px), then argmax: rounded corners, thin parts lost, like an
  over-smooth segmentor.
* ``stride8``, ``stride16``: the one-hot truth area-averaged over blocks of s x s *model*
  pixels (``s * model_gsd / gsd`` native px), upsampled back bilinearly, then argmax: the
  blocky map of a segmentor with output stride s.
* ``erode1``, ``erode2``, ``dilate1``, ``dilate2``: the foreground shrunk / grown by 1 or 2
  native px (a disk of that radius). Binary: class 1 is eroded / dilated. Several classes:
  the classes get a priority, class 0 lowest, then the others by their pixel count in this
  truth, the rarest highest (buildings and roads before land); ``dilateN`` gives every pixel
  the highest-priority class within N px, ``erodeN`` the lowest, so every boundary moves by
  N px towards the lower- (dilate) or higher-priority (erode) class. For two classes this is
  exactly the binary erosion / dilation of class 1.

Argmax ties go to the lower class id.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

#: name -> (kind, parameter): metres of sigma, output stride, or px of radius
DEGRADATIONS: dict[str, tuple[str, float]] = {
    "smooth-0.5m": ("smooth", 0.5), "smooth-1m": ("smooth", 1.0),
    "stride8": ("stride", 8), "stride16": ("stride", 16),
    "erode1": ("erode", 1), "erode2": ("erode", 2),
    "dilate1": ("dilate", 1), "dilate2": ("dilate", 2),
}


def one_hot(label: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, H, W) float32 one-hot of ``label``; ignored pixels (255) as class 0."""
    lab = np.where(label == 255, 0, label).astype(np.int64)
    out = np.zeros((num_classes, *lab.shape), np.float32)
    np.put_along_axis(out, lab[None], 1.0, axis=0)
    return out


def smooth(label: np.ndarray, num_classes: int, sigma_px: float) -> np.ndarray:
    """Argmax of the one-hot truth smoothed by a Gaussian of ``sigma_px`` px."""
    p = one_hot(label, num_classes)
    for c in range(num_classes):
        p[c] = ndimage.gaussian_filter(p[c], sigma_px, mode="nearest")
    return p.argmax(0).astype(np.uint8)


def stride(label: np.ndarray, num_classes: int, block_px: float) -> np.ndarray:
    """Argmax of the one-hot truth area-averaged over ``block_px`` px blocks (not
    necessarily whole) and upsampled back bilinearly."""
    h, w = label.shape
    p = torch.from_numpy(one_hot(label, num_classes))[None]
    small = (max(1, round(h / block_px)), max(1, round(w / block_px)))
    p = F.adaptive_avg_pool2d(p, small)
    p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
    return p[0].argmax(0).numpy().astype(np.uint8)


def disk(radius: int) -> np.ndarray:
    """Footprint of the pixels within ``radius`` px (Euclidean) of the centre."""
    y, x = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return x * x + y * y <= radius * radius


def priority(label: np.ndarray, num_classes: int) -> np.ndarray:
    """Class ids from lowest to highest priority: 0 first, then the others by decreasing
    pixel count in ``label`` (ties: the higher id first)."""
    lab = np.where(label == 255, 0, label)
    counts = np.bincount(lab.ravel(), minlength=num_classes)
    others = sorted(range(1, num_classes), key=lambda c: (-counts[c], -c))
    return np.array([0, *others], np.int64)


def shift(label: np.ndarray, num_classes: int, radius: int, grow: bool) -> np.ndarray:
    """Dilate (``grow``) or erode the foreground class(es) by ``radius`` px (see the
    module docstring)."""
    order = priority(label, num_classes)
    rank = np.empty(num_classes, np.uint8)
    rank[order] = np.arange(num_classes)
    r = rank[np.where(label == 255, 0, label)]
    filt = ndimage.maximum_filter if grow else ndimage.minimum_filter
    return order[filt(r, footprint=disk(radius), mode="nearest")].astype(np.uint8)


def degrade(label: np.ndarray, name: str, *, num_classes: int, gsd: float | None,
            model_gsd: float) -> np.ndarray:
    """The coarse map ``name`` (see :data:`DEGRADATIONS`) of ``label`` (H, W) uint8, on the
    same grid; ``gsd`` None or NaN: the scene's GSD is taken to be ``model_gsd``."""
    kind, value = DEGRADATIONS[name]
    g = gsd if gsd is not None and math.isfinite(gsd) and gsd > 0 else model_gsd
    if kind == "smooth":
        return smooth(label, num_classes, value / g)
    if kind == "stride":
        return stride(label, num_classes, value * model_gsd / g)
    return shift(label, num_classes, int(value), grow=kind == "dilate")

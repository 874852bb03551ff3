"""A window's class probabilities, made on the model grid, brought back onto its window of
the input grid: bilinear, or edge-aware along the window's own pixels where the input is
finer (:mod:`idgbr_geo.upsampling`), and, for a user's coarse map, the user's own classes
kept wherever the refiner left them alone.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .cards import ModelCard
from .pipeline import WindowItem
from .upsampling import own_grid_colour, upsample_probabilities
from .user_maps import nearest

#: Where a user's coarse map (``coarse=``) is resampled onto the model grid, the model pixels
#: the refiner changed can be widened by this many model pixels before the refined map
#: replaces the user's own there (see :func:`keep_user_map`), so that a boundary the
#: refiner moves is drawn by the edge-aware upsampling on both sides. Measured on Banepa
#: (release/validate.py buildings --limit 2: 2 scenes at 0.066 m, bundled 0.25 m model, 1
#: step; IoU / BF@2 of smooth-0.5m, erode1, stride8 maps refined): margin 0 95.2 / 78.5,
#: 94.2 / 85.3, 89.6 / 56.0; 1: 91.8 / 60.3, 90.7 / 61.9, 87.3 / 45.6; 2: 89.8 / 54.1,
#: 88.4 / 53.9, 85.9 / 41.6 (the maps alone: 98.0 / 89.5, 97.1 / 100, 90.9 / 59.3): every
#: pixel more taken from the refiner loses, so none is.
CHANGED_MARGIN = 0


def to_input_grid(probs: torch.Tensor, valid: np.ndarray | None, h: int, w: int,
                   item: WindowItem | None = None, card: ModelCard | None = None,
                   dtype: str = "uint8", radius: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """A window's probabilities (K, mh, mw) and validity (None: all valid) on the model
    grid, resampled onto its (h, w) input window. (On the model's thread: torch ops in a
    background thread start a second OpenMP team that fights the network's.)

    When the reader kept the window's native pixels (``item.native``: an input finer than
    the model by more than :data:`~idgbr_geo.upsampling.MIN_FACTOR`, or from 1x for a card
    with ``edge_filter``), the upsampling is edge-aware, guided by them
    (:func:`~idgbr_geo.upsampling.upsample_probabilities`; on one grid, the guided filter),
    for the refined and the ``coarse_only`` map alike; else bilinear. The validity is the
    model grid's, upsampled (nearest) either way. ``radius``: the filter's, in model pixels
    (None: :data:`~idgbr_geo.upsampling.RADIUS`)."""
    guided = item is not None and item.native is not None and card is not None
    if probs.shape[1:] == (h, w) and not guided:
        return probs.cpu().numpy(), valid
    if guided:
        p = guided_upsample(probs, item, card, dtype, radius)
    else:
        p = F.interpolate(probs[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    if valid is not None:
        vt = torch.from_numpy(valid[None, None].astype(np.float32))
        valid = F.interpolate(vt, size=(h, w), mode="nearest")[0, 0].numpy() > 0.5
    return p.cpu().numpy(), valid


def guided_upsample(probs: torch.Tensor, item: WindowItem, card: ModelCard, dtype: str,
            radius: int | None) -> torch.Tensor:
    """Edge-aware upsampling of one window's probabilities (K, mh, mw), guided by its native
    pixels scaled to [0, 1] by the card's value range; the low-resolution guide is the
    image the model saw (its normalisation undone)."""
    assert item.native is not None
    dev = probs.device
    norm = card.normalization
    mean = torch.tensor(norm.mean, dtype=torch.float32, device=dev)[:, None, None]
    std = torch.tensor(norm.std, dtype=torch.float32, device=dev)[:, None, None]
    low = torch.from_numpy(item.data).to(dev) * std + mean
    native = item.native
    if native.dtype.kind == "u" and native.dtype != np.uint8:  # (torch < 2.3 lacks them)
        native = native.astype(np.float32)
    return upsample_probabilities(
        probs, low, torch.from_numpy(native).to(dev), scale=1.0 / norm.divisor(dtype),
        valid_low=None if item.full else torch.from_numpy(item.mask).to(dev),
        valid_high=(None if item.native_valid is None
                    else torch.from_numpy(item.native_valid).to(dev)),
        radius=radius, colour=own_grid_colour(native.shape[-1] / probs.shape[-1]))


def class_ids(probs: torch.Tensor) -> torch.Tensor:
    """Class ids (h, w) of probabilities (K, h, w), as the output's (ties: the lower)."""
    if probs.shape[0] == 2:
        return (probs[1] > probs[0]).to(torch.int64)
    return probs.max(0).indices


def keep_user_map(probs: torch.Tensor, item: WindowItem, h: int, w: int, card: ModelCard,
                   dtype: str = "uint8", radius: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """A window's results on its (h, w) input window when a user's coarse map was resampled
    onto the model grid (``item.user``): the user's own map, at its own resolution, wherever
    the refiner left the class of the model grid's coarse map alone, and the refined
    probabilities (``probs`` (K, mh, mw), brought to the input grid by
    :func:`to_input_grid`) only in the model pixels whose class it changed (widened by
    :data:`CHANGED_MARGIN` model pixels, within the valid ones). A window nothing changed
    in (not refined: one class, ``coarse_only``, 0 steps, no refiner) is the user's map
    as it is. Returns (probabilities, validity: the map's and the image's, on the input
    grid; None: all valid).

    Where overlapping windows all keep a pixel, their blend (a weighted mean of one and the
    same one-hot vector) is that class again, so the stitched map keeps it exactly."""
    user = item.user
    assert user is not None and item.coarse is not None
    dev = probs.device
    valid_low = torch.from_numpy(item.mask).to(dev)
    changed = (class_ids(probs) != class_ids(torch.from_numpy(item.coarse).to(dev))) & valid_low
    if not bool(changed.any()):  # (and no upsampling at all)
        return user.fill(np.empty((card.num_classes, h, w), np.float32)), user.valid
    if CHANGED_MARGIN > 0:
        k = 2 * CHANGED_MARGIN + 1
        grown = F.max_pool2d(changed[None, None].float(), k, stride=1, padding=CHANGED_MARGIN)
        changed = (grown[0, 0] > 0) & valid_low
    refined, _ = to_input_grid(probs, None, h, w, item, card, dtype, radius)
    keep = ~nearest(changed.cpu().numpy(), (h, w))
    return user.fill(refined, where=keep), user.valid

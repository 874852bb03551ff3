"""The model's working GSD per scene, chosen by the coarse map's own confidence.

A model trained over a range of zooms still has a scale it reads a given scene best at:
buildings of Nepalese drone mosaics come out better with the model working at 0.25 m,
satellite chips of large-roofed cities at 0.375 m, whatever their true pixel size (the
validation of `buildings`, docs/experiments.md). A card may list such working GSDs
(``gsd_choices``, plus ``fine_gsd_choices`` for an input at least as fine as each:
:meth:`~idgbr_geo.cards.ModelCard.working_gsd_choices`); the engine then runs the coarse
model on a few windows spread over the scene at each of them and works at the one whose map
is most confident (mean max class probability over valid pixels), a rule fixed before it was
scored. It costs a few window passes per candidate, once per scene.

An input without a CRS has no GSD at all. A card with ``gsd_from_width`` has it estimated
first (:func:`estimate_gsd`): roads are about as wide everywhere (the training labels'
median, 6.3 m), so the GSD at which the coarse map's roads come out that wide is the
image's, found by a few rescaling steps from the card's assumption. It runs only when asked
(``RunOptions.estimate_gsd``): on the held-out road scenes written without their CRS it
lands within 1.05x of RoadNet's 0.21 m, 1.1x of DeepGlobe's 0.5 m and 1.24x of
Massachusetts' 1 m (medians), where the 0.5 m assumption is 2.4x off, exact and 2x off;
refined IoU rises on three sources of four and falls 2.2 on DeepGlobe's two scenes
(docs/experiments.md, session 32).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from skimage.morphology import skeletonize

from .interfaces import Model
from .predict import predict_windows
from .tiling import (
    MAX_RESAMPLING,
    NoCRSWarning,
    Source,
    plan_tiles,
    read_tile,
    resampling_factor,
)

#: sample windows per candidate GSD: a quarter of the scene's windows at that GSD, at least
#: SAMPLES (all of a small scene) and at most MAX_SAMPLES (a large scene's choice stays cheap
#: beside its run, and close to what the whole scene would choose)
SAMPLES = 6
MAX_SAMPLES = 24
SAMPLE_SHARE = 0.25
#: :func:`estimate_gsd`: rescaling steps, the most one step rescales by, and the fewest
#: centre-line pixels (model pixels, over the sampled windows) a width is measured on
ESTIMATE_STEPS = 4
MAX_STEP = 2.5
MIN_CENTRELINE = 50


def sample_count(windows: int) -> int:
    """How many of a scene's ``windows`` (at one candidate GSD) the choice samples."""
    return min(windows, max(SAMPLES, min(MAX_SAMPLES, math.ceil(SAMPLE_SHARE * windows))))


@dataclass(frozen=True)
class ScaleChoice:
    """The working GSD chosen for a scene, its input pixels per model pixel, and the mean
    confidence each candidate reached."""

    gsd: float
    factor: float
    confidence: dict[float, float]

    def describe(self) -> str:
        tried = ", ".join(f"{g:g}" for g in self.confidence)
        return f"model at {self.gsd:g} m (the most confident of {tried} m)"


def sample_windows(src: Source, model: Model, factor: float, tile_size: int, overlap: int,
                    precision: str, samples: int | None = None
                    ) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """The coarse probabilities (K, h, w) and validity (h, w) of windows spread over the
    scene (in window order, evenly; default :func:`sample_count`) with the input read at
    ``factor`` input pixels per model pixel; windows without a valid pixel are left out."""
    card = model.card
    # (value checks and their warnings are the real run's)
    probe = dataclasses.replace(src, factor=factor, warnings=[], value_limits=None)
    tiles = plan_tiles(src.width, src.height, tile_size=tile_size, overlap=overlap,
                       factor=factor, multiple=card.stride_multiple)
    n = sample_count(len(tiles)) if samples is None else min(samples, len(tiles))
    for i in sorted({int(i) for i in np.linspace(0, len(tiles) - 1, n)}):
        data, mask = read_tile(probe, tiles[i])
        if not mask.any():
            continue
        x = card.normalization.apply(data, src.dtype)
        x[:, ~mask] = 0.0
        h, w = mask.shape
        th, tw = tiles[i].model_size
        img = np.zeros((1, card.bands, th, tw), np.float32)
        img[0, :, :h, :w] = x
        probs, _ = predict_windows(model, torch.from_numpy(img), origins=[(0, 0)],
                                   refine=False, precision=precision)
        yield probs[0, :, :h, :w], mask


def choose_working_gsd(src: Source, model: Model, choices: Sequence[float], *,
                       tile_size: int, overlap: int, precision: str = "auto",
                       samples: int | None = None) -> ScaleChoice | None:
    """The candidate working GSD whose coarse map of ``samples`` windows spread over the
    scene (in window order, evenly; default :func:`sample_count`) is most confident; ties go
    to the earlier candidate. None when there is nothing to choose: an input without a GSD,
    no segmentor, fewer than two candidates within the resampling limit, or no valid pixel
    sampled."""
    if src.gsd is None or model.segmentor is None:
        return None
    confidence: dict[float, float] = {}
    factors: dict[float, float] = {}
    for gsd in choices:
        factor = resampling_factor(src.gsd, gsd)
        if factor is None:
            continue
        total, count = 0.0, 0
        for probs, mask in sample_windows(src, model, factor, tile_size, overlap, precision,
                                           samples):
            conf = probs.amax(0).numpy()
            total += float(conf[mask].sum())
            count += int(mask.sum())
        if count:
            confidence[gsd], factors[gsd] = total / count, factor
    if len(confidence) < 2:
        return None
    best = max(confidence, key=lambda g: confidence[g])
    return ScaleChoice(gsd=best, factor=factors[best], confidence=confidence)


@dataclass(frozen=True)
class GsdEstimate:
    """The GSD estimated for an input without one (:func:`estimate_gsd`), the class it was
    read from and that class's width in the training labels."""

    gsd: float
    class_name: str
    width: float

    def describe(self) -> str:
        return (f"GSD estimated at {self.gsd:.2g} m per pixel, the scale at which its "
                f"{self.class_name} pixels come out {self.width:g} m wide, as in the model's "
                f"training labels")


def centreline_widths(mask: np.ndarray) -> np.ndarray:
    """Widths (pixels) of the objects of ``mask`` along their centre lines: twice the
    distance to the nearest other pixel at each skeleton pixel."""
    if not mask.any():
        return np.empty(0)
    return 2.0 * ndimage.distance_transform_edt(mask)[skeletonize(mask)]


def estimate_gsd(src: Source, model: Model, start: float, *, tile_size: int, overlap: int,
                 precision: str = "auto") -> GsdEstimate | None:
    """The GSD of an input without one, from the width of the objects of the card's
    ``gsd_from_width`` class: with the input taken to be at ``s`` m (first ``start``), run
    the coarse model on sample windows, measure the class's median width along its centre
    lines in metres, and rescale ``s`` by the card's width / that (at most :data:`MAX_STEP`
    either way, within the resampling limit of the model's GSD); :data:`ESTIMATE_STEPS`
    times. None: no such card field or segmentor, or too little of the class found at the
    start to measure."""
    card = model.card
    prior = card.gsd_from_width
    if prior is None or model.segmentor is None or card.gsd is None:
        return None
    k = card.classes.index(prior["class"])
    width = float(prior["width"])
    low, high = card.gsd / MAX_RESAMPLING * 1.001, card.gsd * MAX_RESAMPLING / 1.001
    s = float(np.clip(start, low, high))
    for step in range(ESTIMATE_STEPS):
        factor = resampling_factor(s, card.gsd)
        assert factor is not None
        widths = [centreline_widths((probs.argmax(0).numpy() == k) & mask)
                  for probs, mask in sample_windows(src, model, factor, tile_size, overlap,
                                                     precision)]
        found = np.concatenate(widths) if widths else np.empty(0)
        if found.size < MIN_CENTRELINE:
            if step == 0:
                return None
            break
        ratio = width / (float(np.median(found)) * card.gsd)
        s = float(np.clip(s * np.clip(ratio, 1 / MAX_STEP, MAX_STEP), low, high))
    return GsdEstimate(gsd=s, class_name=prior["class"], width=width)


def assume_estimated_gsd(src: Source, model: Model, *, tile_size: int, overlap: int,
                         precision: str = "auto") -> GsdEstimate | None:
    """For an input whose GSD is the card's assumption (``src.gsd_assumed``): estimate it
    (:func:`estimate_gsd`, from that assumption) and set ``src`` to run at the estimate, or
    keep the assumption when the image shows too little of the class; a
    :class:`~idgbr_geo.tiling.NoCRSWarning` says which either way."""
    card = model.card
    assert src.gsd is not None and card.gsd is not None and card.gsd_from_width is not None
    estimate = estimate_gsd(src, model, src.gsd, tile_size=tile_size, overlap=overlap,
                            precision=precision)
    if estimate is None:
        msg = (f"{src.path}: too few {card.gsd_from_width['class']} pixels to estimate its "
               f"GSD from: assuming the model's default, {src.gsd:g} m per pixel (give the "
               f"true one with the gsd option)")
    else:
        factor = resampling_factor(estimate.gsd, card.gsd)
        assert factor is not None
        src.gsd, src.factor = estimate.gsd, factor
        msg = f"{src.path}: {estimate.describe()} (give the true one with the gsd option)"
    src.warnings.append(msg)
    warnings.warn(msg, NoCRSWarning, stacklevel=3)
    return estimate

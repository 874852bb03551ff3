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
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .interfaces import Model
from .predict import predict_windows
from .tiling import Source, plan_tiles, read_tile, resampling_factor

#: sample windows per candidate GSD: a quarter of the scene's windows at that GSD, at least
#: SAMPLES (all of a small scene) and at most MAX_SAMPLES (a large scene's choice stays cheap
#: beside its run, and close to what the whole scene would choose)
SAMPLES = 6
MAX_SAMPLES = 24
SAMPLE_SHARE = 0.25


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
    card = model.card
    confidence: dict[float, float] = {}
    factors: dict[float, float] = {}
    for gsd in choices:
        factor = resampling_factor(src.gsd, gsd)
        if factor is None:
            continue
        # (value checks and their warnings are the real run's)
        probe = dataclasses.replace(src, factor=factor, warnings=[], value_limits=None)
        tiles = plan_tiles(src.width, src.height, tile_size=tile_size, overlap=overlap,
                           factor=factor, multiple=card.stride_multiple)
        n = sample_count(len(tiles)) if samples is None else min(samples, len(tiles))
        pick = sorted({int(i) for i in np.linspace(0, len(tiles) - 1, n)})
        total, count = 0.0, 0
        for i in pick:
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
            conf = probs[0, :, :h, :w].amax(0).numpy()
            total += float(conf[mask].sum())
            count += int(mask.sum())
        if count:
            confidence[gsd], factors[gsd] = total / count, factor
    if len(confidence) < 2:
        return None
    best = max(confidence, key=lambda g: confidence[g])
    return ScaleChoice(gsd=best, factor=factors[best], confidence=confidence)

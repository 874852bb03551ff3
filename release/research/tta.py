"""Research: test-time augmentation of the coarse segmentor.

Averages the segmentor's probabilities over views of each window: a horizontal flip
(``flip``), the window seen at twice the model's GSD (``scale2``: downsampled 2x, predicted,
upsampled back; a quarter of the pixels, so ~1/4 of the cost) or both; ``multiscale`` sees
the window at 0.8x and 1.25x the working GSD as well (2.2x the pixels of the window besides
it, around the scale the engine chose); ``ms-finer`` / ``ms-coarser`` add only the 0.8x /
1.25x view (1.56x / 0.64x). A shared-encoder refiner (``encoders.FeatureMemo``, which
keeps the last few batches) still finds the original view's features. Measured by
``release/validate.py --tta MODE``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from idgbr_geo.views import multiscale_probabilities

#: each mode: (a flipped view too?, the zooms of its other views;
#: :func:`idgbr_geo.views.multiscale_probabilities`, the engine's own views)
MODES: dict[str, tuple[bool, tuple[float, ...]]] = {
    "flip": (True, ()),
    "scale2": (False, (2.0,)),
    "flip+scale2": (True, (2.0,)),
    "scale1.5": (False, (1.5,)),
    "multiscale": (False, (0.8, 1.25)),
    "ms-finer": (False, (0.8,)),
    "ms-coarser": (False, (1.25,)),
}


class TTASegmentor:
    """Any segmentor, its probabilities averaged over the views of ``mode``."""

    def __init__(self, base: Any, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown TTA mode {mode!r}; known: {', '.join(MODES)}")
        self.base, self.mode = base, mode

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)

    @torch.no_grad()
    def predict(self, image: torch.Tensor) -> torch.Tensor:
        flip, zooms = MODES[self.mode]
        flipped = self.base.predict(image.flip(-1)).flip(-1).float() if flip else None
        # the original and the zoomed views, every window (no skipping of sure ones: each
        # view carries its weight in the mean below)
        scaled = multiscale_probabilities(self.base, image, zooms, confident=math.inf)
        if flipped is None:
            return scaled
        n = len(zooms) + 1  # (the mean over all views, the flipped one included)
        return (flipped + n * scaled) / (n + 1)

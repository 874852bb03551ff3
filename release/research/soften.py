"""Research: give a confidence-free coarse map (a class raster: one-hot) soft boundaries
before the refiner reads it.

A residual refiner adds a correction to the log of the coarse probabilities, floored at
``idgbr_geo.diffusion`` 's smallest probability (about -6.9 logits): a one-hot map leaves it
a 6.9-logit margin to overcome everywhere, so it changes no pixel of a user's class raster.
Blurring the one-hot map by ``sigma`` model pixels puts probabilities near 0.5 only on a band
around each boundary, where the refiner can then move it. Measured by
``release/validate.py --soften SIGMA`` on the degraded-truth and second-architecture maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from idgbr_geo.degrade import gaussian_blur


class SoftenedRefiner:
    """Any refiner, fed a one-hot window blurred by ``sigma`` model px (soft windows as is)."""

    def __init__(self, base: Any, sigma: float) -> None:
        self.base, self.sigma = base, float(sigma)

    def __getattr__(self, name: str) -> Any:  # num_classes, config, share_encoder, ...
        return getattr(self.base, name)

    @torch.no_grad()
    def refine(self, image: torch.Tensor, coarse: torch.Tensor, *, steps: int, seed: int,
               origins: Sequence[tuple[int, int]]) -> torch.Tensor:
        hard = bool(((coarse == 0) | (coarse == 1)).all())
        if hard and self.sigma > 0:
            soft = gaussian_blur(coarse.float(), self.sigma)
            coarse = soft / soft.sum(1, keepdim=True).clamp_min(1e-6)
        return self.base.refine(image, coarse, steps=steps, seed=seed, origins=origins)

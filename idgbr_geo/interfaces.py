"""The two small interfaces the raster engine runs models through.

A *segmentor* maps a batch of normalised image tiles to per-class probabilities. A
*refiner* maps image tiles plus coarse per-class probabilities (from our segmentor, any
other network, or a user's raster) to refined probabilities. The engine knows nothing
else about the networks, so any coarse map can be refined and any network can be plugged
in (see :func:`idgbr_geo.registry.register_architecture`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from .cards import ModelCard


@runtime_checkable
class Segmentor(Protocol):
    """image (B, bands, H, W) float32, normalised -> probabilities (B, K, H, W)."""

    num_classes: int

    def predict(self, image: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Refiner(Protocol):
    """image (B, bands, H, W) + coarse probabilities (B, K, H, W) -> refined (B, K, H, W).

    ``origins`` are the windows' top-left pixels in whole-raster coordinates; refiners draw
    their diffusion noise with :func:`idgbr_geo.noise.batch_noise` at those origins so that
    the result does not depend on tiling and is reproducible for a ``seed``.
    """

    def refine(
        self,
        image: torch.Tensor,
        coarse: torch.Tensor,
        *,
        steps: int,
        seed: int,
        origins: Sequence[tuple[int, int]],
    ) -> torch.Tensor: ...


@dataclass
class Model:
    """A card with the segmentor and refiner it describes, ready for the engine."""

    card: ModelCard
    segmentor: Segmentor | None
    refiner: Refiner | None
    device: torch.device = torch.device("cpu")

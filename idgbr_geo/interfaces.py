"""The two small interfaces the raster engine runs models through.

A *segmentor* maps a batch of normalised image tiles to per-class probabilities. A
*refiner* maps image tiles plus coarse per-class probabilities (from our segmentor, any
other network, or a user's raster) to refined probabilities. The engine knows nothing
else about the networks, so any coarse map can be refined and any network can be plugged
in. :class:`ConvSegmentor` and :class:`ConvRefiner` are tiny fixed-kernel reference
implementations (translation-equivariant, used by the tests and benchmarks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from .cards import ModelCard
from .noise import batch_noise


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


class ConvSegmentor:
    """Softmax of a fixed convolution: translation-equivariant with a known receptive field."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight = weight.float()
        self.bias = None if bias is None else bias.float()
        self.num_classes = int(weight.shape[0])
        self.receptive_field = int(weight.shape[-1])

    def predict(self, image: torch.Tensor) -> torch.Tensor:
        pad = self.receptive_field // 2
        x = F.pad(image, (pad, pad, pad, pad), mode="constant", value=0.0)
        logits = F.conv2d(x, self.weight.to(image.device),
                          None if self.bias is None else self.bias.to(image.device))
        return torch.softmax(logits, dim=1)


class ConvRefiner:
    """A toy 'refiner': a fixed convolution over [image, coarse] plus position-keyed noise.

    It is not a diffusion model; it exercises the refiner path of the engine (noise at
    window origins, steps, seeds) with an exactly known, translation-equivariant output.
    """

    def __init__(self, weight: torch.Tensor, noise_scale: float = 0.1) -> None:
        self.weight = weight.float()
        self.num_classes = int(weight.shape[0])
        self.receptive_field = int(weight.shape[-1])
        self.noise_scale = noise_scale

    def refine(self, image, coarse, *, steps, seed, origins):  # noqa: D102 - see Refiner
        k = coarse.shape[1]
        pad = self.receptive_field // 2
        x = torch.cat([image, coarse], dim=1)
        x = F.pad(x, (pad, pad, pad, pad), mode="constant", value=0.0)
        logits = F.conv2d(x, self.weight.to(image.device))
        for step in range(steps):
            n = batch_noise(seed, origins, (k, *coarse.shape[-2:]), stream=step,
                            device=image.device)
            logits = logits + self.noise_scale * n
        return torch.softmax(logits, dim=1)

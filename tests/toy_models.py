"""Test-only architectures: tiny fixed-kernel segmentor and refiner (``conv-segmentor``,
``conv-refiner``), translation-equivariant with a known receptive field, so the engine's
tiling, stitching and noise keying can be checked against a whole-image reference.

Importing this module registers them. Processes the tests start (the CLI in a subprocess,
Dask workers) import it through ``$IDGBR_GEO_ARCHITECTURES`` (set in conftest.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from idgbr_geo.noise import batch_noise
from idgbr_geo.registry import register_architecture


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


@register_architecture("conv-segmentor")
def _conv_segmentor(card, config, weights, device):
    return ConvSegmentor(weights["weight"].to(device), weights.get("bias"))


@register_architecture("conv-refiner")
def _conv_refiner(card, config, weights, device):
    return ConvRefiner(weights["weight"].to(device), float(config.get("noise_scale", 0.1)))

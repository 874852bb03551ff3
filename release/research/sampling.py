"""The DDIM sampler with its research options, and a refiner that runs it.

These options were experiments (see the ablation rows of the validation tables): no shipped
card uses them, so the production sampler (:func:`idgbr_geo.diffusion.sample`) and refiner
(:class:`idgbr_geo.networks.DiffusionRefiner`) do not have them. With every option at its
default, :func:`sample` computes exactly what the production sampler does (a test checks it).

* ``start="coarse"``: start from the coarse map noised to ``t_start`` (SDEdit-like) instead
  of pure noise at t = 1;
* ``guidance_scale`` != 1: classifier-free guidance (two denoiser passes per step; only
  meaningful for refiners trained with ``p_uncond`` > 0);
* ``x0="hard"``: feed back the one-hot of each step's arg-max instead of the soft
  probabilities;
* ``average``: decode every step and return the log of the mean of their probabilities;
* ``band`` > 0 (:class:`ResearchRefiner`): use the refiner's output only within that many
  pixels of the coarse map's boundaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from idgbr_geo.diffusion import (
    LATENT_SCALE,
    START_STREAM,
    alpha_bar,
    decode,
    denoise,
    q_sample,
    to_latent,
)
from idgbr_geo.diffusion import sample as production_sample
from idgbr_geo.noise import batch_noise

#: the options and the value that means "as the production refiner"
DEFAULTS: dict[str, Any] = {"start": "noise", "t_start": 1.0, "guidance_scale": 1.0,
                            "x0": "soft", "average": False, "band": 0}


def timesteps(steps: int, t_start: float = 1.0) -> list[float]:
    """Evenly spaced times from t_start down to 0 (steps + 1 values)."""
    return [t_start * (1 - i / steps) for i in range(steps + 1)]


@torch.no_grad()
def sample(net: Any, image: torch.Tensor, coarse: torch.Tensor, *, steps: int, seed: int,
           origins: Sequence[tuple[int, int]], start: str = "noise", t_start: float = 1.0,
           guidance_scale: float = 1.0, oneshot: bool = False, x0: str = "soft",
           average: bool = False) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) sampling -> full-resolution class logits (B, K, H, W),
    with the research options of the module docstring."""
    if oneshot:  # no research option applies: the production path
        return production_sample(net, image, coarse, steps=steps, seed=seed, origins=origins,
                                 oneshot=True)
    b, k, h, w = coarse.shape
    if h % LATENT_SCALE or w % LATENT_SCALE:
        raise ValueError(f"window {h}x{w} is not a multiple of {LATENT_SCALE}")
    g1, g2, g4 = net.guide(image, coarse)
    dev = image.device
    if x0 not in ("soft", "hard"):
        raise ValueError(f"unknown x0 mode {x0!r} (use 'soft' or 'hard')")
    steps = max(1, int(steps))
    noise = batch_noise(seed, origins, (k, h // LATENT_SCALE, w // LATENT_SCALE),
                        stream=START_STREAM, scale=LATENT_SCALE, device=dev)
    if start == "coarse":
        t0 = float(t_start)
        x = q_sample(to_latent(coarse), torch.full((b,), t0, device=dev), noise)
    elif start == "noise":
        t0 = 1.0
        x = noise
    else:
        raise ValueError(f"unknown start {start!r} (use 'noise' or 'coarse')")
    ts = timesteps(steps, t0)
    logits4 = hid = None
    mean_probs = None
    for i in range(steps):
        t = torch.full((b,), ts[i], device=dev)
        logits4, hid = denoise(net, x, t, g4, coarse)
        if guidance_scale != 1.0:
            un4, unh = denoise(net, x, t, torch.zeros_like(g4), coarse)
            logits4 = un4 + guidance_scale * (logits4 - un4)
            hid = unh + guidance_scale * (hid - unh)
        if x0 == "hard":
            x0_hat = 2.0 * F.one_hot(logits4.max(1).indices, k).permute(0, 3, 1, 2).float() - 1.0
        else:
            x0_hat = 2.0 * torch.softmax(logits4, 1) - 1.0
        if average:
            p = torch.softmax(decode(net, hid, logits4, g1, g2, coarse), 1) / steps
            mean_probs = p if mean_probs is None else mean_probs + p
        ab_t = alpha_bar(t)[:, None, None, None]
        eps = (x - ab_t.sqrt() * x0_hat) / (1 - ab_t).sqrt()
        if i + 1 < steps:
            ab_n = alpha_bar(torch.full((b,), ts[i + 1], device=dev))[:, None, None, None]
            x = ab_n.sqrt() * x0_hat + (1 - ab_n).sqrt() * eps
    if mean_probs is not None:
        return torch.log(mean_probs.clamp_min(1e-8))
    return decode(net, hid, logits4, g1, g2, coarse)


def boundary_band(probs: torch.Tensor, radius: int) -> torch.Tensor:
    """Soft mask (B, 1, H, W): 1 within ``radius`` px of a class boundary of the coarse map,
    fading to 0 over another ``radius`` px. The refiner's output is used inside the band and
    the coarse map outside, so the refiner fixes *where* and leaves far-from-boundary
    decisions (the *what*) to the segmentor."""
    k = probs.shape[1]
    hard = F.one_hot(probs.max(1).indices, k).permute(0, 3, 1, 2).float()
    edge = (F.max_pool2d(hard, 3, 1, 1) - (-F.max_pool2d(-hard, 3, 1, 1))).amax(1, keepdim=True)
    near = F.max_pool2d(edge, 2 * radius + 1, 1, radius)
    return F.avg_pool2d(near, 2 * radius + 1, 1, radius, count_include_pad=False)


class ResearchRefiner:
    """A :class:`~idgbr_geo.networks.DiffusionRefiner`'s network run with research options.

    It has the Refiner interface, so the engine's inference
    (:func:`idgbr_geo.predict.predict_windows`, :func:`idgbr_geo.engine.refine_raster`) runs
    it like any refiner: ablations are measured with the code users run."""

    def __init__(self, base: Any, **options: Any) -> None:
        unknown = set(options) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown research option(s) {sorted(unknown)} "
                             f"(known: {', '.join(DEFAULTS)})")
        self.base = base
        self.net, self.device, self.num_classes = base.net, base.device, base.num_classes
        self.options = {**DEFAULTS, **options}

    @torch.no_grad()
    def refine(self, image: torch.Tensor, coarse: torch.Tensor, *, steps: int, seed: int,
               origins: Sequence[tuple[int, int]]) -> torch.Tensor:
        o = self.options
        coarse = coarse.to(self.device).float()
        logits = sample(self.net, image.to(self.device).float(), coarse, steps=steps,
                        seed=seed, origins=origins, start=o["start"], t_start=o["t_start"],
                        guidance_scale=o["guidance_scale"],
                        oneshot=self.base.config.mode == "oneshot", x0=o["x0"],
                        average=bool(o["average"]))
        refined = torch.softmax(logits, dim=1)
        if int(o["band"]) > 0:
            w = boundary_band(coarse, int(o["band"]))
            refined = w * refined + (1 - w) * coarse
        return refined.contiguous()

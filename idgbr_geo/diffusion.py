"""Diffusion over label maps: schedule, training objective and a deterministic sampler.

The diffused variable is a *scaled one-hot* label map at 1/4 resolution (the latent):
each class channel is ``2 * p - 1`` in [-1, 1], where p is the class share of the 4x4
block. The denoiser predicts x0 (class logits) from (x_t, t, guidance); sampling is DDIM
with eta = 0, so the only randomness is the start noise, drawn with
:func:`idgbr_geo.noise.batch_noise` at the windows' raster positions: results are
bit-for-bit reproducible for a seed and identical in window overlaps.

Sampling starts from pure noise at t = 1, as in the paper. Research variants of the
sampler (starting from the noised coarse map, classifier-free guidance, hard x0, trajectory
averaging) live in ``release/research/sampling.py``: no shipped model uses them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .config import RefinerTrainingConfig as _T
from .noise import batch_noise

#: resolution divisor of the latent label map (the denoiser runs at 1/4 resolution)
LATENT_SCALE = 4
#: smallest coarse probability of the residual parameterisation (log -> about -6.9)
RESIDUAL_FLOOR = 1e-3
#: noise stream of the start noise (other streams are free for future stochastic samplers)
START_STREAM = 0


def alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """Cosine schedule (Nichol & Dhariwal): signal fraction at continuous time t in [0, 1]."""
    s = 0.008
    ab = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    return ab.clamp(1e-4, 1.0 - 1e-5)


def to_latent(probs: torch.Tensor) -> torch.Tensor:
    """Per-class probabilities (B, K, H, W) at full resolution -> scaled one-hot at 1/4."""
    return 2.0 * F.avg_pool2d(probs, LATENT_SCALE) - 1.0


def labels_to_probs(labels: torch.Tensor, num_classes: int, ignore_index: int = 255
                    ) -> torch.Tensor:
    """(B, H, W) class ids -> one-hot (B, K, H, W); ignored pixels get a uniform 1/K."""
    valid = labels != ignore_index
    onehot = F.one_hot(torch.where(valid, labels, 0).long(), num_classes).permute(0, 3, 1, 2)
    onehot = onehot.float()
    return torch.where(valid[:, None], onehot, torch.full_like(onehot, 1.0 / num_classes))


def _log_coarse(coarse: torch.Tensor) -> torch.Tensor:
    """Coarse probabilities as logits, clamped so that a confident map is still correctable."""
    return torch.log(coarse.clamp_min(RESIDUAL_FLOOR))


def denoise(net, x: torch.Tensor, t: torch.Tensor, g4: torch.Tensor | None,
            coarse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One denoiser pass -> (x0 logits at 1/4, features).

    With ``net.residual`` the denoiser predicts a *correction* to the coarse map's logits:
    its output is added to log(coarse) at 1/4, so "keep the coarse map" is what an
    untrained correction does, and the refiner has to learn a reason to change a pixel.
    """
    logits4, h = net.denoiser(x, t, g4)
    if getattr(net, "residual", False):
        logits4 = logits4 + _log_coarse(F.avg_pool2d(coarse, LATENT_SCALE))
    return logits4, h


def decode(net, h: torch.Tensor, logits4: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor,
           coarse: torch.Tensor) -> torch.Tensor:
    """Full-resolution decode; residual refiners add the correction to the full-res
    log(coarse) instead of to the upsampled 1/4 estimate (which would blur the coarse map)."""
    logits = net.decoder(h, logits4, g1, g2)
    if getattr(net, "residual", False):
        base4 = _log_coarse(F.avg_pool2d(coarse, LATENT_SCALE))
        logits = logits - F.interpolate(base4, size=logits.shape[-2:], mode="bilinear",
                                        align_corners=False) + _log_coarse(coarse)
    return logits


def near_boundary(labels: torch.Tensor, radius: int, ignore_index: int = 255) -> torch.Tensor:
    """(B, H, W) class ids -> float mask, 1 within ``radius`` px (Chebyshev) of a pixel
    whose 3x3 neighbourhood holds another class. Ignored pixels never make a boundary."""
    lab = labels.float()[:, None]
    valid = (labels != ignore_index)[:, None]
    hi = F.max_pool2d(torch.where(valid, lab, -1.0), 3, 1, 1)
    lo = -F.max_pool2d(torch.where(valid, -lab, -1e9), 3, 1, 1)
    edge = ((hi > lo) & valid).float()  # a valid pixel next to a different valid class
    if radius > 0:
        edge = F.max_pool2d(edge, 2 * radius + 1, 1, radius)
    return edge[:, 0]


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Forward process: x_t = sqrt(ab) x0 + sqrt(1 - ab) noise."""
    ab = alpha_bar(t)[:, None, None, None]
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def training_loss(net, image: torch.Tensor, coarse: torch.Tensor, labels: torch.Tensor, *,
                  ignore_index: int = 255, t_max: float = _T.t_max,
                  p_uncond: float = _T.p_uncond, p_coarse_x0: float = _T.p_coarse_x0,
                  oneshot: bool = False, boundary_weight: float = _T.boundary_weight,
                  boundary_radius: int = _T.boundary_radius
                  ) -> tuple[torch.Tensor, dict[str, float]]:
    """Diffusion objective: x0-prediction with cross-entropy at 1/4 plus full-res decode.
    (Defaults: :class:`~idgbr_geo.config.RefinerTrainingConfig`'s.)

    ``coarse`` (B, K, H, W) is the coarse map the guidance sees (from a coarse model or a
    degradation of the ground truth). ``oneshot`` trains the same networks as a plain
    one-pass refiner (no noise, fixed t) for the ablation.

    ``p_coarse_x0`` is the share of samples whose x_t is made by noising the *coarse* map's
    latent instead of the ground truth's (the target stays the ground truth). Plain
    diffusion training only ever shows the denoiser x_t built from perfect labels, so at
    small t it learns to copy x_t; at sampling time x_t carries its own earlier, imperfect
    estimate and extra steps cannot fix it (exposure bias). Noised coarse maps teach it to
    correct an imperfect x_t at every t, which is what the iterations need (and what the
    research sampler's ``start="coarse"`` starts from).

    ``boundary_weight`` > 0 weights the full-resolution cross-entropy of pixels within
    ``boundary_radius`` px of a true class boundary by ``1 + boundary_weight``: most
    pixels of a crop lie inside regions the coarse map already gets right, so a plain mean
    spends the refiner's capacity on them rather than on *where* boundaries run.
    """
    b, k = coarse.shape[:2]
    g1, g2, g4 = net.guide(image, coarse)
    if p_uncond > 0:
        keep = (torch.rand(b, 1, 1, 1, device=image.device) >= p_uncond).float()
        g4 = g4 * keep
    x0 = to_latent(labels_to_probs(labels, k, ignore_index))
    if oneshot:
        t = torch.ones(b, device=image.device)
        xt = torch.zeros_like(x0)
    else:
        t = torch.rand(b, device=image.device) * t_max
        src = x0
        if p_coarse_x0 > 0:
            use = (torch.rand(b, 1, 1, 1, device=image.device) < p_coarse_x0).float()
            src = use * to_latent(coarse) + (1 - use) * x0
        xt = q_sample(src, t, torch.randn_like(x0))
    logits4, h = denoise(net, xt, t, g4, coarse)
    logits4 = logits4.float()  # the losses in float32, also under bfloat16 autocast
    target4 = (x0 + 1) / 2  # soft class shares of each 4x4 block
    loss4 = -(target4 * F.log_softmax(logits4, 1)).sum(1).mean()
    logits = decode(net, h, logits4, g1, g2, coarse).float()
    valid = labels != ignore_index
    if boundary_weight > 0:
        ce = F.cross_entropy(logits, labels.long(), ignore_index=ignore_index, reduction="none")
        w = (1.0 + boundary_weight * near_boundary(labels, boundary_radius, ignore_index)) * valid
        loss1 = (ce * w).sum() / w.sum().clamp_min(1e-6)
    else:
        loss1 = F.cross_entropy(logits, labels.long(), ignore_index=ignore_index)
    if not torch.isfinite(loss1) or not valid.any():  # a crop with only ignored pixels
        loss1 = logits.sum() * 0
    loss = loss4 + loss1
    return loss, {"loss4": loss4.item(), "loss1": loss1.item()}


def timesteps(steps: int) -> list[float]:
    """Evenly spaced times from 1 down to 0 (steps + 1 values)."""
    return [1 - i / steps for i in range(steps + 1)]


@torch.no_grad()
def sample(net, image: torch.Tensor, coarse: torch.Tensor, *, steps: int, seed: int,
           origins: Sequence[tuple[int, int]], oneshot: bool = False) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) sampling -> full-resolution class logits (B, K, H, W).

    Guidance features are computed once; only the denoiser runs per step, and the
    full-resolution decode runs once at the end. Each step feeds back the soft class
    probabilities of its x0 estimate. ``oneshot`` runs a refiner trained as a one-pass
    refiner (one denoiser pass from zeros at t = 1).
    """
    b, k, h, w = coarse.shape
    if h % LATENT_SCALE or w % LATENT_SCALE:
        raise ValueError(f"window {h}x{w} is not a multiple of {LATENT_SCALE}")
    g1, g2, g4 = net.guide(image, coarse)
    dev = image.device
    if oneshot:
        t = torch.ones(b, device=dev)
        logits4, hid = denoise(net, torch.zeros(b, k, h // LATENT_SCALE, w // LATENT_SCALE,
                                                device=dev), t, g4, coarse)
        return decode(net, hid, logits4, g1, g2, coarse)
    steps = max(1, int(steps))
    x = batch_noise(seed, origins, (k, h // LATENT_SCALE, w // LATENT_SCALE),
                    stream=START_STREAM, scale=LATENT_SCALE, device=dev)
    ts = timesteps(steps)
    logits4 = hid = None
    for i in range(steps):
        t = torch.full((b,), ts[i], device=dev)
        logits4, hid = denoise(net, x, t, g4, coarse)
        x0_hat = 2.0 * torch.softmax(logits4.float(), 1) - 1.0
        ab_t = alpha_bar(t)[:, None, None, None]
        eps = (x - ab_t.sqrt() * x0_hat) / (1 - ab_t).sqrt()
        if i + 1 < steps:
            ab_n = alpha_bar(torch.full((b,), ts[i + 1], device=dev))[:, None, None, None]
            x = ab_n.sqrt() * x0_hat + (1 - ab_n).sqrt() * eps
    return decode(net, hid, logits4, g1, g2, coarse)

"""Random degradations of ground-truth label maps into plausible 'coarse maps'.

The refiner must fix coarse maps from models it has never seen, so besides the maps of
our own coarse model it trains on ground truth damaged the ways real segmentors damage
it: wobbly boundaries (smooth random warps), swollen or shrunken objects
(dilation/erosion), rounded corners and lost thin parts (blur-and-threshold), missed and
hallucinated objects (dropped/added blobs), and the low-resolution softness of
output-stride-8/16 networks (down-up sampling, blur of the probabilities). Torch only, so
it runs batched on the training device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import RefinerTrainingConfig as _T


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with reflect padding."""
    if sigma <= 0:
        return x
    r = max(1, int(math.ceil(2.5 * sigma)))
    r = min(r, x.shape[-1] - 1, x.shape[-2] - 1)
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, device=x.device, dtype=x.dtype) / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def smooth_noise(b: int, h: int, w: int, cell: int, gen: torch.Generator,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Smooth random field (B, 1, H, W) in about [-1, 1] with features ~``cell`` px wide."""
    gh, gw = max(2, h // cell + 2), max(2, w // cell + 2)
    z = torch.rand(b, 1, gh, gw, generator=gen) * 2 - 1
    return F.interpolate(z.to(device), size=(h, w), mode="bicubic", align_corners=False)


def jitter(probs: torch.Tensor, amplitude: float, cell: int, gen: torch.Generator
           ) -> torch.Tensor:
    """Warp by a smooth random displacement field of up to ``amplitude`` pixels."""
    b, _, h, w = probs.shape
    dy = smooth_noise(b, h, w, cell, gen, probs.device)[:, 0] * amplitude * 2 / h
    dx = smooth_noise(b, h, w, cell, gen, probs.device)[:, 0] * amplitude * 2 / w
    ys = torch.linspace(-1, 1, h, device=probs.device)
    xs = torch.linspace(-1, 1, w, device=probs.device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([gx[None] + dx, gy[None] + dy], dim=-1)
    return F.grid_sample(probs, grid, mode="bilinear", padding_mode="border", align_corners=True)


def morph(probs: torch.Tensor, cls: int, radius: int, dilate: bool) -> torch.Tensor:
    """Dilate or erode class ``cls`` by ``radius`` px (max-pool on its one-hot channel)."""
    if radius <= 0:
        return probs
    k = 2 * radius + 1
    ch = probs[:, cls:cls + 1]
    ch = F.max_pool2d(ch, k, 1, radius) if dilate else -F.max_pool2d(-ch, k, 1, radius)
    out = probs.clone()
    out[:, cls:cls + 1] = ch
    return out


def blobs(probs: torch.Tensor, fraction: float, cell: int, gen: torch.Generator
          ) -> torch.Tensor:
    """Overwrite random smooth blobs covering ~``fraction`` of the area with random classes
    (dropping objects when the class is background, adding false ones otherwise)."""
    b, k, h, w = probs.shape
    field = smooth_noise(b, h, w, cell, gen, probs.device)
    thr = torch.quantile(field.flatten(1), 1 - fraction, dim=1)[:, None, None, None]
    mask = (field > thr).float()
    cls = torch.randint(0, k, (b,), generator=gen).to(probs.device)
    fill = F.one_hot(cls, k).float()[:, :, None, None].expand_as(probs)
    return probs * (1 - mask) + fill * mask


def harden(probs: torch.Tensor) -> torch.Tensor:
    """Back to a one-hot map (argmax), e.g. after blurring: rounds corners, kills thin parts."""
    return F.one_hot(probs.max(1).indices, probs.shape[1]).permute(0, 3, 1, 2).float()


def degrade(labels: torch.Tensor, num_classes: int, *, generator: torch.Generator | None = None,
            ignore_index: int = 255, strength: float = 1.0, p_onehot: float = _T.p_onehot
            ) -> torch.Tensor:
    """Ground truth (B, H, W) -> a random plausible coarse probability map (B, K, H, W).

    Each sample gets its own random mix of degradations; ``strength`` scales their size;
    ``p_onehot`` is the share returned as one-hot maps (a class raster of another tool).
    Ignored pixels are first filled with the most frequent class of the sample so that
    they do not leak a fake class into the map.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    b, h, w = labels.shape
    lab = labels.long().clone()
    out = []
    for i in range(b):
        li = lab[i:i + 1]
        valid = li != ignore_index
        if (~valid).any():
            fill = torch.bincount(li[valid], minlength=num_classes).argmax() if valid.any() else 0
            li = torch.where(valid, li, fill)
        p = F.one_hot(li, num_classes).permute(0, 3, 1, 2).float()

        def r() -> float:
            return float(torch.rand((), generator=gen))

        if r() < 0.8:
            p = harden(jitter(p, strength * (1 + 5 * r()), int(8 + 40 * r()), gen))
        if r() < 0.6:
            p = morph(p, int(torch.randint(0, num_classes, (), generator=gen)),
                      int(round(strength * (1 + 3 * r()))), dilate=r() < 0.5)
        if r() < 0.5:
            p = harden(gaussian_blur(p, strength * (1 + 4 * r())))
        if r() < 0.4:
            p = blobs(p, 0.02 + 0.08 * r() * strength, int(16 + 48 * r()), gen)
        if r() < 0.4:  # low output-stride softness
            f = 4 * (1 + int(2 * r()))
            small = F.avg_pool2d(p, f, ceil_mode=True)
            p = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
        # soft, overconfident-or-not probabilities like a network's softmax
        p = gaussian_blur(p, 0.5 + 2.5 * r())
        temp = 0.5 + 2.0 * r()
        p = torch.softmax(torch.log(p.clamp_min(1e-4)) * (4.0 / temp), dim=1)
        if r() < p_onehot:  # a class raster of another tool: refined as a one-hot map
            p = harden(p)
        out.append(p)
    return torch.cat(out, 0)

"""The coarse segmentor's losses: cross-entropy, soft Dice and the optional soft clDice and
Lovász-softmax terms, each on class logits ``(N, k, H, W)`` against labels ``(N, H, W)``
where 255 marks unlabelled pixels (left out)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _masked_probs_and_onehot(logits: torch.Tensor, labels: torch.Tensor, k: int
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities and one-hot labels ``(N, k, H, W)``, both 0 where the label is
    255 (unlabelled), for the soft overlap losses."""
    valid = (labels != 255)[:, None]
    p = torch.softmax(logits, 1) * valid
    onehot = F.one_hot(torch.where(labels != 255, labels, 0), k).permute(0, 3, 1, 2)
    return p, onehot.float() * valid


def soft_dice(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """1 - mean soft Dice over classes present in the batch (helps thin, rare classes)."""
    p, onehot = _masked_probs_and_onehot(logits, labels, k)
    inter = (p * onehot).sum((0, 2, 3))
    denom = p.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    present = onehot.sum((0, 2, 3)) > 0
    if not present.any():
        return logits.sum() * 0
    dice = (2 * inter + 1) / (denom + 1)
    return 1 - dice[present].mean()


def _soft_skeleton(p: torch.Tensor, iterations: int) -> torch.Tensor:
    """Differentiable skeleton of soft maps ``(N, C, H, W)``: what repeated erosion takes
    away only after an opening would not (min/max pooling, Shit et al. 2021)."""
    def erode(x: torch.Tensor) -> torch.Tensor:
        return torch.minimum(-F.max_pool2d(-x, (3, 1), 1, (1, 0)),
                             -F.max_pool2d(-x, (1, 3), 1, (0, 1)))

    def open_(x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(erode(x), 3, 1, 1)

    skel = F.relu(p - open_(p))
    for _ in range(iterations):
        p = erode(p)
        delta = F.relu(p - open_(p))
        skel = skel + F.relu(delta - skel * delta)
    return skel


def soft_cldice(logits: torch.Tensor, labels: torch.Tensor, k: int,
                 iterations: int = 5) -> torch.Tensor:
    """1 - soft clDice of the foreground classes (1..k-1) present in the batch: the harmonic
    mean of how much of the predicted skeleton lies on labelled pixels and how much of the
    labelled skeleton is predicted. Thin structures (roads) keep their connectivity.
    Computed at half resolution (``iterations`` erosions there reach 2x as far): at full
    resolution it cost more than the network's own step."""
    p, y = (t[:, 1:] for t in _masked_probs_and_onehot(logits, labels, k))
    present = y.sum((0, 2, 3)) > 0
    if not present.any():
        return logits.sum() * 0
    p, y = F.avg_pool2d(p, 2, ceil_mode=True), F.avg_pool2d(y, 2, ceil_mode=True)
    sp, sy = _soft_skeleton(p, iterations), _soft_skeleton(y, iterations)
    tprec = ((sp * y).sum((0, 2, 3)) + 1) / (sp.sum((0, 2, 3)) + 1)
    tsens = ((sy * p).sum((0, 2, 3)) + 1) / (sy.sum((0, 2, 3)) + 1)
    cl = 2 * tprec * tsens / (tprec + tsens)
    return 1 - cl[present].mean()


def lovasz_softmax(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """1 - the Lovász extension of the IoU of the foreground classes (1..k-1) present in the
    batch, pooled over all its labelled pixels (Berman et al. 2018): the pixels' errors
    sorted, weighted by how much each adds to the class's Jaccard loss. Unlike soft Dice it
    is tight at the maps' 0.5 threshold, where IoU is scored."""
    valid = labels.flatten() != 255
    p = torch.softmax(logits, 1).permute(0, 2, 3, 1).reshape(-1, k)[valid]
    y = labels.flatten()[valid]
    losses = []
    for c in range(1, k):
        fg = (y == c).float()
        total = fg.sum()
        if total == 0:
            continue
        errors, order = (fg - p[:, c]).abs().sort(descending=True)
        fg_sorted = fg[order]
        inter = total - fg_sorted.cumsum(0)
        union = total + (1 - fg_sorted).cumsum(0)
        jaccard = 1 - inter / union
        grad = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
        losses.append(torch.dot(errors, grad))
    return torch.stack(losses).mean() if losses else logits.sum() * 0


def coarse_loss(logits: torch.Tensor, labels: torch.Tensor, k: int, *,
                cldice: float = 0.0, lovasz: float = 0.0) -> torch.Tensor:
    """The coarse stage's objective: cross-entropy (label 255 ignored; a batch with no
    labelled pixel adds nothing) + 0.5 x soft Dice over ``k`` classes (+ ``cldice`` x
    soft clDice, + ``lovasz`` x Lovász-softmax, of the foreground classes). Computed in
    float32 whatever ``logits`` are."""
    logits = logits.float()
    ce = F.cross_entropy(logits, labels, ignore_index=255)
    ce = ce if torch.isfinite(ce) else logits.sum() * 0
    loss = ce + 0.5 * soft_dice(logits, labels, k)
    if cldice > 0:
        loss = loss + cldice * soft_cldice(logits, labels, k)
    if lovasz > 0:
        loss = loss + lovasz * lovasz_softmax(logits, labels, k)
    return loss

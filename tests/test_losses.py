"""The coarse losses (:mod:`idgbr_geo.losses`) on hand-made maps."""

import pytest
import torch

from idgbr_geo.losses import lovasz_softmax, soft_cldice, soft_dice


def _road_logits(road: torch.Tensor) -> torch.Tensor:
    """Confident two-class logits of a boolean road mask (N, H, W)."""
    x = torch.where(road, 6.0, -6.0)
    return torch.stack([-x, x], 1)


def test_cldice_counts_a_break_in_a_thin_road():
    """Soft clDice is ~0 for a perfect map, clearly higher for the same road cut through
    (a few pixels of area, the whole connection), higher than the soft Dice's rise for the
    cut, and the unlabelled pixels (255) do not count."""
    lab = torch.zeros(1, 64, 64, dtype=torch.long)
    lab[:, :, 28:34] = 1
    road = lab == 1
    cut = road.clone()
    cut[:, 30:36] = False
    perfect, broken = _road_logits(road), _road_logits(cut)
    assert float(soft_cldice(perfect, lab, 2)) < 0.01
    rise_cl = float(soft_cldice(broken, lab, 2) - soft_cldice(perfect, lab, 2))
    rise_dice = float(soft_dice(broken, lab, 2) - soft_dice(perfect, lab, 2))
    assert rise_cl > 0.02 and rise_cl > rise_dice
    ignored = lab.clone()
    ignored[:, 30:36] = 255
    assert float(soft_cldice(broken, ignored, 2)) < 0.01
    nothing = torch.zeros_like(lab)
    assert float(soft_cldice(broken, nothing, 2)) == 0.0  # no road labelled: adds nothing


def test_lovasz_is_one_minus_the_iou_of_hard_maps():
    """On confident maps the Lovász-softmax term is exactly 1 - IoU of the foreground
    classes pooled over the batch (mean over the classes labelled), unlabelled pixels do not
    count, and a batch without foreground adds nothing."""
    gen = torch.Generator().manual_seed(0)
    lab = torch.randint(0, 3, (2, 24, 24), generator=gen)
    pred = torch.randint(0, 3, (2, 24, 24), generator=gen)
    logits = torch.where(pred[:, None] == torch.arange(3)[None, :, None, None], 30.0, -30.0)

    def iou(c: int, keep: torch.Tensor) -> float:
        p, y = (pred == c) & keep, (lab == c) & keep
        return float((p & y).sum()) / float((p | y).sum())

    everything = torch.ones_like(lab, dtype=torch.bool)
    want = 1 - (iou(1, everything) + iou(2, everything)) / 2
    assert float(lovasz_softmax(logits, lab, 3)) == pytest.approx(want, abs=1e-5)
    masked = lab.clone()
    masked[:, :8] = 255
    want = 1 - (iou(1, masked != 255) + iou(2, masked != 255)) / 2
    assert float(lovasz_softmax(logits, masked, 3)) == pytest.approx(want, abs=1e-5)
    assert float(lovasz_softmax(logits, torch.zeros_like(lab), 3)) == 0.0

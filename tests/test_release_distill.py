"""release/research/distill_views.py: a student segmentor learns from its teacher's zoomed
views; with a frozen encoder a refiner sharing that encoder still fits it."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

RELEASE = Path(__file__).resolve().parent.parent / "release"
if str(RELEASE) not in sys.path:
    sys.path.append(str(RELEASE))

from research.distill_views import distill  # noqa: E402

from idgbr_geo.cards import ModelCard  # noqa: E402
from idgbr_geo.checkpoints import build_segmentor_net, export_model  # noqa: E402
from idgbr_geo.config import LiteFpnConfig  # noqa: E402
from idgbr_geo.training import train_coarse  # noqa: E402

LITE = {"arch": "lite-fpn", "variant": "lite0", "channels": 8}


def _start(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(4, 3, 64, 64)).astype(np.uint8)
    npz = tmp_path / "chips.npz"
    np.savez(npz, images=images, labels=(images[:, 0] > 127).astype(np.uint8),
             classes=np.array(["bg", "fg"]), gsd=np.float64(0.5), source=np.array("generated"))
    init = build_segmentor_net(LiteFpnConfig(variant="lite0", channels=8), in_channels=3,
                               num_classes=2).state_dict()  # (no ImageNet download in tests)
    start = train_coarse(npz, tmp_path / "start", iterations=1, batch_size=2, crop=64,
                         progress=False, device="cpu", config=LITE, init_weights=init)
    return npz, start


@pytest.mark.parametrize("freeze", [True, False])
def test_student_learns_from_the_views_and_a_frozen_encoder_stays(tmp_path, freeze):
    npz, start = _start(tmp_path)
    card = ModelCard(name="tiny", classes=["bg", "fg"], gsd=0.5, coarse_zooms=[0.8, 1.25])
    teacher = export_model(start, None, card, tmp_path / "teacher")
    out = distill(str(teacher), start, npz, tmp_path / "student", iterations=2, lr=0.05,
                  batch_size=2, crop=64, checkpoint_every=1,
                  freeze_encoder=freeze, label_weight=0.0 if freeze else 0.5,
                  progress=False)
    a = torch.load(start, weights_only=True)["model"]
    b = torch.load(out, weights_only=True)["model"]
    moved = {k for k in a if a[k].is_floating_point() and not torch.equal(a[k], b[k])}
    assert any(k.startswith(("laterals.", "fuse.", "head.")) for k in moved)
    assert any(k.startswith("encoder.") for k in moved) != freeze
    with open(tmp_path / "student" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(float(r["soft"]) > 0 for r in rows)


def test_a_teacher_without_views_is_refused(tmp_path):
    npz, start = _start(tmp_path)
    teacher = export_model(start, None, ModelCard(name="tiny", classes=["bg", "fg"], gsd=0.5),
                           tmp_path / "teacher")
    with pytest.raises(ValueError, match="coarse_zooms"):
        distill(str(teacher), start, npz, tmp_path / "student", iterations=1, progress=False)

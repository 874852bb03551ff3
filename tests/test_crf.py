"""Dense CRF baseline (research code, release/research/crf.py): snaps an uncertain coarse
map to image edges."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from idgbr_geo.errors import UserError

pytest.importorskip("pydensecrf.densecrf")
if str(Path(__file__).resolve().parent.parent / "release") not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent.parent / "release"))

from research.crf import dense_crf  # noqa: E402


def test_crf_moves_a_blurry_boundary_onto_the_image_edge():
    img = np.full((3, 64, 64), 40, np.uint8)
    img[:, 16:48, 16:48] = 220  # bright square = the object
    p1 = np.full((64, 64), 0.3, np.float32)
    p1[12:52, 12:52] = 0.6  # coarse map: 4 px too large and unsure
    probs = np.stack([1 - p1, p1])
    q = dense_crf(img, probs)
    assert q.shape == (2, 64, 64)
    assert np.allclose(q.sum(0), 1, atol=1e-3)
    truth = np.zeros((64, 64), bool)
    truth[16:48, 16:48] = True
    before = (probs.argmax(0).astype(bool) != truth).sum()
    after = (q.argmax(0).astype(bool) != truth).sum()
    assert after < before / 4


def test_crf_rejects_mismatched_sizes():
    with pytest.raises(UserError, match="differ in size"):
        dense_crf(np.zeros((3, 8, 8), np.uint8), np.full((2, 8, 9), 0.5, np.float32))

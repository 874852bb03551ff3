"""release/research/remix.py: another source mix of the same training chips."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

RELEASE = Path(__file__).resolve().parent.parent / "release"
if str(RELEASE) not in sys.path:
    sys.path.append(str(RELEASE))

from research.remix import remix  # noqa: E402


def test_each_source_gets_its_share_split_equally_among_its_chips() -> None:
    sources = np.array(["oam"] * 2 + ["xdomain"] * 5 + ["dubai"] * 3)
    w = remix(sources, {"oam": 0.3, "xdomain": 0.5, "dubai": 0.2})
    assert w[:2] == pytest.approx([0.15, 0.15])
    assert w[2:7] == pytest.approx([0.1] * 5)
    assert w[7:] == pytest.approx([0.2 / 3] * 3)
    assert w.sum() == pytest.approx(1.0)


def test_a_source_left_out_is_never_drawn_and_an_unknown_one_is_refused() -> None:
    sources = np.array(["a", "a", "b"])
    assert remix(sources, {"a": 1.0}).tolist() == [0.5, 0.5, 0.0]
    with pytest.raises(ValueError, match="'c'"):
        remix(sources, {"a": 0.5, "c": 0.5})

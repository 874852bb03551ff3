"""release/oof_maps.py: how the training areas fall into folds and what the fold runs are
called."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

RELEASE = Path(__file__).resolve().parent.parent / "release"
if str(RELEASE) not in sys.path:
    sys.path.append(str(RELEASE))

from oof_maps import _fold_name, areas_of, folds_of  # noqa: E402


def test_interleaved_folds_split_neighbouring_areas():
    areas = areas_of(np.array(["dg_1", "images/tile1_3", "images/tile2_0", "ma_5", "ottawa_2"]))
    assert areas.tolist() == ["dg", "images/tile1", "images/tile2", "ma", "ottawa"]
    assert folds_of(areas, 2, interleave=True) == [["dg", "images/tile2", "ottawa"],
                                                    ["images/tile1", "ma"]]
    assert folds_of(areas, 2) == [["dg", "images/tile1", "images/tile2"], ["ma", "ottawa"]]
    assert folds_of(areas, None) == [[a] for a in sorted(areas.tolist())]


def test_a_fold_of_many_areas_gets_a_short_distinct_name():
    assert _fold_name(["dg", "images/tile1"]) == "dg+images-tile1"
    many = [f"images/{n}" for n in range(10000000, 10000040)]
    name = _fold_name(many)
    assert len(name) < 60 and name.startswith("images-10000000+39-more-")
    assert _fold_name(many[:-1]) != name and _fold_name(many) == name

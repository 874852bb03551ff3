"""release/gpu_pack.py: packing training arrays for a GPU session and unpacking them."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

RELEASE = Path(__file__).resolve().parent.parent / "release"
if str(RELEASE) not in sys.path:
    sys.path.append(str(RELEASE))

from gpu_pack import pack, unpack  # noqa: E402

from idgbr_geo.chips import load_npz  # noqa: E402


def _arrays(path: Path, images: np.ndarray, sources: list[str], weights: list[float]) -> None:
    n = len(images)
    np.savez(path, images=images, labels=np.full((n, 32, 32), len(path.name) % 3, np.uint8),
             classes=np.array(["a", "b", "c"]), gsd=np.float64(0.5),
             chip_source=np.array(sources), chip_gsd=np.full(n, 0.5),
             weight=np.array(weights))


def test_pack_stores_shared_chips_once_and_unpacks_each_set(tmp_path):
    rng = np.random.default_rng(0)
    smooth = np.linspace(0, 200, 32, dtype=np.float64)
    base = (smooth[None, :, None] + smooth[None, None, :] / 4).astype(np.uint8)
    chips = np.stack([np.repeat(base, 3, 0) + rng.integers(0, 20, (3, 32, 32), np.uint8)
                      for _ in range(6)])
    # set one: chips 0-3 (two of source 'x', two of 'y'); set two: chips 2-5 (2, 3 shared)
    _arrays(tmp_path / "one_train.npz", chips[:4], ["x", "x", "y", "y"], [1, 1, 2, 2])
    _arrays(tmp_path / "two_train.npz", chips[2:], ["y", "y", "z", "z"], [1, 1, 1, 1])
    packed = pack(["one", "two"], tmp_path / "gpu", 95, {"x": 2}, root=tmp_path)
    with np.load(packed) as z:
        assert len(z["jpeg_sizes"]) == 5  # chip 1 dropped (every 2nd of 'x'), 2 and 3 once
    paths = unpack(packed, tmp_path / "out")
    one, two = (load_npz(p) for p in paths)
    assert list(one["chip_source"]) == ["x", "y", "y"] and len(two["images"]) == 4
    # each source keeps its share of the sampling weight: x had 2 of 6, keeps 2 of 6
    assert np.isclose(one["weight"][0] / one["weight"].sum(), 2 / 6)
    # JPEG at quality 95 is close to the chips, not equal
    err = np.abs(one["images"].astype(int) - chips[[0, 2, 3]].astype(int)).mean()
    assert 0 < err < 8  # (noisy chips, 4:2:0 chroma)
    assert np.array_equal(two["images"][:2], one["images"][1:])  # the shared chips
    assert one["classes"] == ["a", "b", "c"] and float(two["gsd"]) == 0.5

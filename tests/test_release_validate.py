"""release/validate.py: checkpoints exported to a card with another card's working settings
(``--settings-from``), so that an ablation runs as the shipped card does."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

RELEASE = Path(__file__).resolve().parent.parent / "release"
if str(RELEASE) not in sys.path:
    sys.path.append(str(RELEASE))

from validate import WORKING_SETTINGS, exported  # noqa: E402

from idgbr_geo.cards import ModelCard  # noqa: E402
from idgbr_geo.config import SamplingConfig  # noqa: E402
from idgbr_geo.training import train_coarse  # noqa: E402


def tiny_checkpoint(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A one-iteration coarse checkpoint of a tiny network, and the chips it saw."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(2, 3, 64, 64)).astype(np.uint8)
    npz = tmp_path / "chips.npz"
    np.savez(npz, images=images, labels=(images[:, 0] > 127).astype(np.uint8),
             classes=np.array(["bg", "fg"]), gsd=np.float64(0.5),
             source=np.array("generated"))
    ckpt = train_coarse(npz, tmp_path / "run", iterations=1, batch_size=2, crop=32,
                        progress=False, device="cpu", config={"widths": [4, 8, 8, 8]})
    return ckpt, images


def test_exported_takes_the_working_settings_of_a_card(tmp_path: Path) -> None:
    ckpt, _ = tiny_checkpoint(tmp_path)
    like = ModelCard(name="shipped", classes=["bg", "fg"], gsd=0.5, gsd_without_crs=0.8,
                     gsd_choices=[0.4, 0.5, 0.6], fine_gsd_choices=[0.3],
                     coarse_zooms=[0.8, 1.25], edge_filter=True)
    plain = exported("plain", ckpt, None, SamplingConfig(steps=0), tmp_path / "a")
    liked = exported("liked", ckpt, None, SamplingConfig(steps=0), tmp_path / "b", like)
    for key in WORKING_SETTINGS:
        assert getattr(liked.card, key) == getattr(like, key)
        assert getattr(plain.card, key) != getattr(like, key)
    assert liked.card.gsd == 0.5 and liked.card.name == "liked"  # the checkpoint's own


def test_a_card_without_a_refiner_makes_each_scene_once(tmp_path: Path, monkeypatch) -> None:
    """Its refined row is its coarse map: scored twice, made once per scene."""
    import validate

    ckpt, images = tiny_checkpoint(tmp_path)
    model = exported("plain", ckpt, None, SamplingConfig(steps=0), tmp_path / "a")
    calls: list[dict] = []
    real = validate.engine

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(validate, "engine", counting)
    scenes = [validate.Scene(images[i], (images[i, 0] > 127).astype(np.uint8), 0.5, "g",
                             f"s{i}") for i in range(2)]
    v = validate.Validator(model, tmp_path)
    v.run_group("g", scenes, ["ours"])
    assert len(calls) == 2 and all(c.get("coarse_only") for c in calls)
    coarse, refined = (r for r in v.rows if r["scenes"] == "g")
    assert coarse["iou"] == refined["iou"] and coarse["bf2"] == refined["bf2"]

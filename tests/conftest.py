"""Shared fixtures (shared by every test module: add fixtures, never remove this file).

Helper functions live in synth.py (import them with ``from synth import ...``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from synth import conv_model, synthetic_scene, write_raster

from idgbr_geo.registry import ARCHITECTURES_ENV

# Processes the tests start (the CLI in a subprocess, Dask workers) register the test-only
# architectures of toy_models.py too: it is importable there and named for the registry.
_TESTS = str(Path(__file__).resolve().parent)
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_TESTS, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
os.environ[ARCHITECTURES_ENV] = "toy_models"


@pytest.fixture
def toy_model(tmp_path: Path) -> Path:
    """A tiny fixed-convolution model (card + safetensors) for engine tests."""
    return conv_model(tmp_path / "model")


@pytest.fixture
def scene(tmp_path: Path) -> Path:
    """A 150 x 170 RGB uint8 GeoTIFF in EPSG:32633 at 0.3 m."""
    return write_raster(tmp_path / "scene.tif", synthetic_scene(150, 170))


@pytest.fixture
def square_chips(tmp_path: Path) -> Path:
    """Four 32 px training chips (npz): a bright square is class 1, the rest class 0."""
    import numpy as np

    rng = np.random.default_rng(0)
    images = rng.integers(0, 60, size=(4, 3, 32, 32)).astype(np.uint8)
    labels = np.zeros((4, 32, 32), np.uint8)
    labels[:, 8:20, 10:24] = 1
    images[:, :, labels[0] == 1] += 150
    path = tmp_path / "chips.npz"
    np.savez(path, images=images, labels=labels, classes=np.array(["bg", "sq"]),
             gsd=np.float64(0.5), source=np.array("generated"))
    return path


@pytest.fixture
def imagenet(monkeypatch) -> list[str]:
    """Random stand-ins for the ImageNet weights (CI lacks the `train` extra); the list
    holds the variants whose weights were asked for."""
    import timm

    from idgbr_geo import encoders

    asked: list[str] = []

    def fake(variant: str):
        asked.append(variant)
        return timm.create_model(encoders.VARIANTS[variant], pretrained=False).state_dict()

    monkeypatch.setattr(encoders, "imagenet_state_dict", fake)
    return asked

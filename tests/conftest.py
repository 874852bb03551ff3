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

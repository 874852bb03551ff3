"""A non-editable install carries the bundled models (package data, not the repository)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_plain_install_ships_and_loads_the_bundled_models(tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--no-compile", "--target", str(target), str(ROOT)],
                   check=True, cwd=tmp_path, capture_output=True)
    shipped = sorted(p.name for p in (target / "idgbr_geo" / "models").iterdir())
    assert {"buildings.json", "buildings.safetensors", "roads.json", "landcover.json"} <= set(
        shipped)
    # run from an unrelated folder with only the installed copy on the path (and the
    # venv's dependencies), so nothing can be found through the repository
    env = {k: v for k, v in os.environ.items() if k != "IDGBR_GEO_MODELS"}
    env["PYTHONPATH"] = str(target)
    code = ("import idgbr_geo, sys; from idgbr_geo.registry import load_model; "
            "m = load_model('buildings', 'cpu'); "
            "assert idgbr_geo.__file__.startswith(sys.argv[1]), idgbr_geo.__file__; "
            "print(m.card.name, m.segmentor is not None, m.refiner is not None)")
    out = subprocess.run([sys.executable, "-c", code, str(target)], check=True, cwd=tmp_path,
                         env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["buildings", "True", "True"]

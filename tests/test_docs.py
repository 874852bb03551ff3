"""The generated documentation matches what it documents."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_model_pages_are_generated_from_the_shipped_cards() -> None:
    """docs/models.md is rewritten by release/model_docs.py; a card change without it fails."""
    run = subprocess.run([sys.executable, str(ROOT / "release" / "model_docs.py"), "--check"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_model_pages_state_the_views_skipping_threshold_the_engine_uses() -> None:
    from idgbr_geo.views import CONFIDENT

    page = (ROOT / "docs" / "models.md").read_text()
    assert f"(every pixel at least {CONFIDENT:g}) keeps that view" in page


def test_readme_keeps_the_two_setup_commands_that_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = ('python3 -m venv .venv && .venv/bin/pip install -q -e ".[dev]" && '
                ".venv/bin/python -m pytest -q")
    assert test_cmd in readme and test_cmd in ci
    assert "idgbr-geo refine examples/gorinchem_rgb_025m.tif" in readme

"""Process-wide tuning is opt-in: the CLI asks for it, a library call never does."""

from __future__ import annotations

import sys

import pytest

from idgbr_geo import refine_raster
from idgbr_geo.options import RunOptions


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_allocator_tuning_respects_the_users_malloc_settings(monkeypatch):
    from idgbr_geo import tuning

    monkeypatch.setenv("IDGBR_NO_MALLOPT", "1")
    assert tuning.tune_allocator() is False
    monkeypatch.delenv("IDGBR_NO_MALLOPT")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert tuning.tune_allocator() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt  # noqa: B018 - glibc present?
    except (OSError, AttributeError):
        pytest.skip("no glibc")
    assert tuning.tune_allocator() is True
    assert tuning.tune_allocator() is True  # once per process, then remembered


def test_a_library_call_changes_no_process_wide_state(tmp_path, toy_model, scene, monkeypatch):
    """Allocator thresholds and thread priorities change only when asked (tune_process, as
    the CLI does), never as a side effect of refine_raster."""
    import os

    from idgbr_geo import tuning

    calls: list[str] = []
    monkeypatch.setattr(tuning, "tune_allocator", lambda: calls.append("mallopt") or True)
    monkeypatch.setattr(os, "setpriority", lambda *a: calls.append("nice"), raising=False)
    monkeypatch.setitem(tuning._TUNED, "priority", False)
    refine_raster(scene, tmp_path / "a.tif", model=toy_model, quiet=True,
                  options=RunOptions(device="cpu"))
    assert calls == []
    tuning.tune_process()  # (the stubs above: nothing of this process really changes)
    refine_raster(scene, tmp_path / "b.tif", model=toy_model, quiet=True,
                  options=RunOptions(device="cpu"))
    assert calls[0] == "mallopt" and calls.count("nice") == 2  # the reader and the writer


def test_the_cli_tunes_the_process(tmp_path, toy_model, scene, monkeypatch):
    from click.testing import CliRunner

    from idgbr_geo import tuning
    from idgbr_geo.cli import main

    calls: list[str] = []
    monkeypatch.setattr(tuning, "tune_process", lambda: calls.append("tuned"))
    res = CliRunner().invoke(main, ["refine", str(scene), str(tmp_path / "o.tif"), "--model",
                                    str(toy_model), "-q"])
    assert res.exit_code == 0, res.output
    assert calls == ["tuned"]

"""The CLI's shared plumbing (idgbr_geo/cli/_common.py): GDAL's own warnings and Python's
are one ``Warning:`` line each, or nothing with --quiet, in every command; library errors
are shown with the command's flags."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import click
import pytest
import rasterio
from click.testing import CliRunner
from synth import class_blobs, synthetic_scene, write_raster

from idgbr_geo.cli._common import flag_names, user_errors
from idgbr_geo.errors import UserError

#: what GDAL says about a TIFF whose directory entries are out of order
UNSORTED = "tags are not sorted in ascending order"


def unsorted_tags(path: Path) -> Path:
    """Swap the last two entries of a (little-endian, classic) TIFF's first directory: the
    file still reads, but GDAL warns about it whenever it reads the directory."""
    data = bytearray(path.read_bytes())
    assert data[:4] == b"II*\x00"
    ifd = struct.unpack_from("<I", data, 4)[0]
    n = struct.unpack_from("<H", data, ifd)[0]
    a, b = ifd + 2 + 12 * (n - 2), ifd + 2 + 12 * (n - 1)
    data[a:a + 12], data[b:b + 12] = data[b:b + 12], data[a:a + 12]
    path.write_bytes(bytes(data))
    return path


def run(*args: object) -> subprocess.CompletedProcess:
    """The real entry point in a subprocess: GDAL writes to the process's stderr itself."""
    return subprocess.run([sys.executable, "-c", "from idgbr_geo.cli import main; main()",
                           *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from synth import conv_model

    d = tmp_path_factory.mktemp("warn")
    scenes = d / "scenes"
    scenes.mkdir()
    image = unsorted_tags(write_raster(scenes / "image.tif", synthetic_scene(60, 70)))
    classes = write_raster(d / "classes.tif", class_blobs((60, 70), 1), nodata=255)
    with rasterio.open(classes, "r+") as ds:
        ds.update_tags(IDGBR_CLASSES=json.dumps(["background", "building"]))
    unsorted_tags(classes)
    return {"model": conv_model(d / "model"), "image": image, "scenes": scenes,
            "classes": classes, "truth": write_raster(d / "truth.tif", class_blobs((60, 70), 2))}


def commands(f: dict[str, Path], out: Path) -> dict[str, list[object]]:
    return {
        "refine": ["refine", f["image"], out / "o.tif", "-m", f["model"]],
        "batch": ["batch", f["scenes"], out / "batch", "-m", f["model"]],
        "vectorize": ["vectorize", f["classes"], out / "o.gpkg"],
        "evaluate": ["evaluate", f["classes"], f["truth"], "-o", out / "e.json"],
        "preview": ["preview", f["image"], out / "o.png", "--refined", f["classes"]],
    }


@pytest.mark.slow
@pytest.mark.parametrize("command", ["refine", "batch", "vectorize", "evaluate", "preview"])
def test_gdal_warnings_are_one_line_or_nothing_when_quiet(files, tmp_path, command):
    for folder in ("a", "q"):
        (tmp_path / folder).mkdir()
    loud = run(*commands(files, tmp_path / "a")[command])
    assert loud.returncode == 0, loud.stderr
    assert "Warning 1:" not in loud.stderr and "Traceback" not in loud.stderr
    # once per damaged file the command reads (preview reads two), however often GDAL says it
    warned = [ln for ln in loud.stderr.splitlines() if UNSORTED in ln]
    assert len(warned) == (2 if command == "preview" else 1), loud.stderr
    assert all(ln.startswith("Warning: ") for ln in warned), loud.stderr
    quiet = run(*commands(files, tmp_path / "q")[command], "--quiet")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""


def test_library_errors_show_the_commands_flags():
    @click.command()
    @click.option("--tile-size", "tile_size", type=int)
    @click.option("--html", "html_out")
    @user_errors
    def cmd(tile_size: int | None, html_out: str | None) -> None:
        raise UserError("$tile_size and $html_out and $probabilities_dtype",
                        options=["tile_size", "html_out", "probabilities_dtype"])

    res = CliRunner().invoke(cmd, [])
    assert res.exit_code == 2
    # an option the command has no flag for keeps its keyword name
    assert res.stderr == "Error: --tile-size and --html and probabilities_dtype\n"


def test_flag_names_outside_a_command_are_the_keywords():
    assert flag_names()("tile_size") == "tile_size"


def test_gdal_warnings_once_per_file_and_message(capsys):
    import logging

    from idgbr_geo.cli._common import _GdalWarnings

    handler = _GdalWarnings(quiet=False)
    for msg in ("CPLE_AppDefined in a.tif: X is bad", "CPLE_AppDefined in X is bad",
                "CPLE_AppDefined:a.tif: X is bad", "CPLE_AppDefined in b.tif: X is bad",
                "CPLE_NotSupported in driver GTiff does not support open option FOO"):
        handler.emit(logging.makeLogRecord({"msg": msg, "levelno": logging.WARNING}))
    handler.emit(logging.makeLogRecord({"msg": "GDAL signalled an error", "levelno": 20}))
    assert capsys.readouterr().err == (
        "Warning: a.tif: X is bad\nWarning: b.tif: X is bad\n"
        "Warning: driver GTiff does not support open option FOO\n")

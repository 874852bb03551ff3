"""Fuzzing: a few hundred damaged GeoTIFFs through refine, vectorize, preview and evaluate.

Each input is a small valid GeoTIFF (image, class map, probabilities) with bytes flipped in
its header or anywhere, or cut short, drawn from a seeded numpy RNG, so every run tests the
same files. Every command must end either in success (exit 0, its outputs complete) or in
exactly one ``Error:`` line with a non-zero exit (after GDAL's ``Warning:`` lines about the
damage, without --quiet): never a traceback, never a stray line on stderr, and never a file
left behind (no output on failure, no hidden temporary ever).
Runs in-process (click's CliRunner) with a tiny fixed-kernel model: ~5 s for 600 cases on 2 cores.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner
from synth import class_blobs, conv_model, synthetic_scene, write_raster

from idgbr_geo.cli import main

#: damaged files per command (8 commands: 600 in all)
CASES = 75
SHAPE = (40, 48)
TILED = dict(tiled=True, blockxsize=16, blockysize=16, compress="deflate")


def _tag(path: Path, classes: list[str]) -> Path:
    with rasterio.open(path, "r+") as ds:
        ds.update_tags(IDGBR_CLASSES=json.dumps(classes),
                       IDGBR_COLORS=json.dumps(["#000000", "#ff0000", "#808080"][:len(classes)]))
    return path


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The undamaged files: images (tiled + compressed, and plain strips), class maps (one
    band; with a confidence band; three classes with roads), probabilities, a truth."""
    d = tmp_path_factory.mktemp("valid")
    ids = class_blobs(SHAPE, 1)
    two = ["background", "building"]
    return {
        "model": conv_model(d / "model"),
        "image": write_raster(d / "image.tif", synthetic_scene(*SHAPE), **TILED),
        "image_strips": write_raster(d / "image_strips.tif", synthetic_scene(*SHAPE, seed=1)),
        "map": _tag(write_raster(d / "map.tif", ids, nodata=255, **TILED), two),
        "map_confidence": _tag(write_raster(d / "map_confidence.tif",
                                            np.stack([ids, (ids * 100 + 50).astype(np.uint8)]),
                                            nodata=255), two),
        "roads": _tag(write_raster(d / "roads.tif", class_blobs(SHAPE, 2, classes=3),
                                   nodata=255), ["background", "building", "road"]),
        "probabilities": write_raster(d / "probabilities.tif",
                                      np.stack([255 - ids * 200, ids * 200]).astype(np.uint8),
                                      **TILED),
        "truth": _tag(write_raster(d / "truth.tif", class_blobs(SHAPE, 3), nodata=255), two),
    }


def damage(src: Path, dst: Path, rng: np.random.Generator) -> Path:
    """A copy of ``src`` cut short, with bytes flipped anywhere, or with its header hit."""
    data = bytearray(src.read_bytes())
    kind = rng.integers(3)
    if kind == 0:
        data = data[:rng.integers(0, len(data))]
    else:
        span = len(data) if kind == 1 else min(len(data), 600)  # 600: header and IFD
        for _ in range(rng.integers(1, 9)):
            data[rng.integers(span)] = rng.integers(256)
    dst.write_bytes(bytes(data))
    return dst


def _args(command: str, bad: Path, out: Path, v: dict[str, Path]) -> tuple[list, list[str]]:
    """Command line with the damaged file ``bad``, and the outputs it writes on success."""
    model = ["-m", v["model"], "-q"]
    table = {
        "refine": (["refine", bad, out / "o.tif", *model, "--confidence", "--probabilities",
                    out / "p.tif"], ["o.tif", "p.tif"]),
        "refine_vector_cog": (["refine", bad, out / "o.tif", *model, "--vector",
                               out / "o.gpkg", "--cog"], ["o.gpkg", "o.tif"]),
        "vectorize": (["vectorize", bad, out / "o.gpkg", "-q"], ["o.gpkg"]),
        "vectorize_extras": (["vectorize", bad, out / "o.gpkg", "-q", "--centerlines",
                              "--regularize", "--window-size", "16"], ["o.gpkg"]),
        "vectorize_probabilities": (["vectorize", v["map"], out / "o.gpkg", "-q",
                                     "--probabilities", bad], ["o.gpkg"]),
        "preview_image": (["preview", bad, out / "o.png", "--refined", v["map"]], ["o.png"]),
        "preview_maps": (["preview", v["image"], out / "o.png", "--refined", bad, "--truth",
                          v["truth"], "--html", out / "r.html"], ["o.png", "r.html"]),
        "evaluate": (["evaluate", bad, v["truth"], "-o", out / "e.json", "--quiet"],
                     ["e.json"]),
        "evaluate_truth": (["evaluate", v["map"], bad, "-o", out / "e.json", "--quiet"],
                           ["e.json"]),
        "evaluate_coarse": (["evaluate", v["map"], v["truth"], "--coarse", bad, "-o",
                             out / "e.json", "--quiet"], ["e.json"]),
    }
    return table[command]


#: command -> the valid files that get damaged for it
SOURCES = {
    "refine": ["image", "image_strips"],
    "refine_vector_cog": ["image", "image_strips"],
    "vectorize": ["map", "map_confidence"],
    "vectorize_extras": ["roads"],
    "vectorize_probabilities": ["probabilities"],
    "preview_image": ["image", "image_strips"],
    "preview_maps": ["map", "map_confidence"],
    "evaluate": ["map", "map_confidence"],
}


def check(res, out: Path, outputs: list[str]) -> str | None:
    """What is wrong with one run (None: it ended cleanly)."""
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        return "traceback:\n" + "".join(traceback.format_exception(*res.exc_info))[-1500:]
    if "Traceback" in res.output:
        return f"traceback printed:\n{res.output[-1500:]}"
    left = sorted(p.name for p in out.iterdir())
    if res.exit_code == 0:
        if left != sorted(outputs):
            return f"exit 0 but the folder holds {left}, expected {sorted(outputs)}"
        return None
    # GDAL's warnings about a damaged file may come first, one "Warning:" line each
    lines = [ln for ln in res.stderr.splitlines()
             if ln.strip() and not ln.startswith("Warning: ")]
    if len(lines) != 1 or not lines[0].startswith("Error: "):
        return f"exit {res.exit_code} without exactly one Error: line:\n{res.stderr[-1500:]}"
    if left:
        return f"failed ({lines[0]}) but left {left}"
    return None


@pytest.mark.parametrize("command", list(SOURCES))
def test_damaged_files_end_in_success_or_one_error_line(command, valid, tmp_path):
    rng = np.random.default_rng([15, list(SOURCES).index(command)])
    runner = CliRunner()
    problems, outcomes = [], {"ok": 0, "error": 0}
    for i in range(CASES):
        case = tmp_path / f"case{i}"
        out = case / "out"
        out.mkdir(parents=True)
        names = SOURCES[command]
        bad = damage(valid[names[rng.integers(len(names))]], case / "bad.tif", rng)
        if command == "evaluate" and i % 3:  # damage TRUTH or COARSE instead of PRED
            command_i = "evaluate_truth" if i % 3 == 1 else "evaluate_coarse"
        else:
            command_i = command
        args, outputs = _args(command_i, bad, out, valid)
        res = runner.invoke(main, [str(a) for a in args])
        problem = check(res, out, outputs)
        if problem:
            problems.append(f"case {i} ({command_i}, {case}): {problem}")
        outcomes["ok" if res.exit_code == 0 else "error"] += 1
    assert not problems, "\n\n".join(problems[:5])
    assert outcomes["error"] > 0  # the damage is real: not every file still reads

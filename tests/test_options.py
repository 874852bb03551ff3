"""Run and output options: the same rules in the library, the option objects and the CLI."""

from __future__ import annotations

import dataclasses
import math

import pytest
from click.testing import CliRunner

from idgbr_geo.cli import main
from idgbr_geo.errors import UserError
from idgbr_geo.options import (
    MAX_SEED,
    MAX_STEPS,
    OutputOptions,
    RunOptions,
    VectorOptions,
    check_engine_options,
    problem,
)

BAD = [
    ("tile_size", 0, "must be at least 1"),
    ("overlap", -16, "must be at least 0"),
    ("steps", -1, "must be at least 0"),
    ("steps", MAX_STEPS + 1, f"must be at most {MAX_STEPS}"),
    ("batch_size", 0, "must be at least 1"),
    ("model_workers", 0, "must be at least 1"),
    ("model_workers", 10**6, "must be at most"),
    ("seed", -1, "must be at least 0"),
    ("seed", MAX_SEED + 1, "must be at most"),
    ("gsd", 0.0, "must be a finite number of metres greater than 0"),
    ("gsd", -1.0, "must be a finite number of metres greater than 0"),
    ("gsd", math.nan, "must be a finite number of metres greater than 0"),
    ("gsd", math.inf, "must be a finite number of metres greater than 0"),
]


@pytest.mark.parametrize(("name", "value", "message"), BAD)
def test_library_refuses_out_of_range_values_by_argument_name(name, value, message):
    with pytest.raises(UserError, match=f"^{name} {message}") as info:
        check_engine_options(**{name: value})
    assert "--" not in str(info.value)


def test_library_accepts_the_edges_and_defaults():
    check_engine_options(tile_size=1, overlap=0, steps=0, batch_size=1, model_workers=1, seed=0,
                         gsd=1e-3)
    check_engine_options(steps=MAX_STEPS, seed=MAX_SEED, gsd=1e6)
    check_engine_options(tile_size=None, overlap=None, steps=None, batch_size=None,
                         model_workers=None, seed=None, gsd=None)
    assert problem("tile_size", 512) is None and problem("gsd", 0.25) is None


def test_library_checks_types_and_the_window_overlap_pair():
    with pytest.raises(UserError, match="tile_size must be an integer"):
        check_engine_options(tile_size=64.5)
    with pytest.raises(UserError, match="gsd must be"):
        check_engine_options(gsd="0.3")
    with pytest.raises(UserError, match=r"tile_size \(64\) must be larger than twice the "
                                        r"overlap \(32\)"):
        check_engine_options(tile_size=64, overlap=32)
    with pytest.raises(TypeError, match="unknown engine option"):
        check_engine_options(tile_sise=64)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@pytest.mark.parametrize("command", ["refine", "batch"])
@pytest.mark.parametrize(("name", "value", "message"), BAD)
def test_cli_refuses_out_of_range_values_in_one_line(tmp_path, command, name, value, message):
    """Refused while parsing, before any model or file is opened: one 'Error:' line."""
    args = [command, str(tmp_path / "in"), str(tmp_path / "out"), _flag(name), str(value)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"Error: {_flag(name)} {message}"), lines
    assert "Traceback" not in result.output and not list(tmp_path.iterdir())


# ------------------------------------------------------------------------- option objects
def test_run_options_check_every_field_in_one_line():
    with pytest.raises(UserError) as info:
        RunOptions(tile_size=0, seed=-1, device="gpu", bands=[0, 2], coarse_only="yes",
                   precision="fp16")
    text = str(info.value)
    assert "\n" not in text and "--" not in text
    for part in ("coarse_only must be True or False", "bands must be band numbers",
                 "precision must be auto, float32, bfloat16",
                 "device must be auto, cpu, cuda or cuda:N", "tile_size must be at least 1",
                 "seed must be at least 0"):
        assert part in text, text
    # the CLI names the same problems by its flags
    flags = info.value.render(lambda name: "--" + name.replace("_", "-"))
    assert "--tile-size must be at least 1" in flags and "--coarse-only must be" in flags


def test_run_options_normalise_and_reject_unknown_fields():
    opts = RunOptions(bands=[3, 2, 1], device="cuda:1")
    assert opts.bands == (3, 2, 1) and opts == RunOptions(bands=(3, 2, 1), device="cuda:1")
    with pytest.raises(TypeError):
        RunOptions(tile_sise=64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.seed = 3  # type: ignore[misc]
    with pytest.raises(UserError, match=r"^tile_size \(64\) must be larger than twice the "
                                        r"overlap \(32\)$"):
        RunOptions(tile_size=64, overlap=32)


def test_output_and_vector_options():
    assert OutputOptions(vectors={"regularize": True}).vectors == VectorOptions(regularize=True)
    assert VectorOptions(min_area={"building": 4}).kwargs()["min_area"] == {"building": 4}
    for kwargs, message in (({"probabilities_dtype": "int8"}, "probabilities_dtype must be"),
                            ({"cog": 1}, "cog must be True or False"),
                            ({"vectors": 3}, "vectors must be VectorOptions")):
        with pytest.raises(UserError, match=message):
            OutputOptions(**kwargs)
    for kwargs, message in (({"simplify": -1.0}, "simplify must be a finite number"),
                            ({"spur_length": math.nan}, "spur_length must be"),
                            ({"min_area": {"building": -4}}, "min_area must be square metres"),
                            ({"fill_holes": "big"}, "fill_holes must be square metres")):
        with pytest.raises(UserError, match=message):
            VectorOptions(**kwargs)


def test_cli_checks_vector_options_with_the_library_rules(tmp_path):
    args = ["refine", str(tmp_path / "in"), str(tmp_path / "out"), "--min-area", "-3"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: --min-area must be square metres of 0 or more")
    assert not list(tmp_path.iterdir())


def test_options_are_part_of_the_public_api():
    import idgbr_geo

    assert idgbr_geo.RunOptions is RunOptions and idgbr_geo.OutputOptions is OutputOptions
    assert idgbr_geo.VectorOptions is VectorOptions

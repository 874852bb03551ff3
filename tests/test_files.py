"""`idgbr_geo.files.same_file` / `check_distinct`: one file under two names is one file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from idgbr_geo.errors import OutputError
from idgbr_geo.files import check_distinct, same_file


@pytest.fixture
def a(tmp_path: Path) -> Path:
    p = tmp_path / "a.tif"
    p.write_bytes(b"input")
    return p


def test_same_path_spelled_differently(tmp_path, a, monkeypatch):
    (tmp_path / "sub").mkdir()
    assert same_file(a, a)
    assert same_file(a, str(a))
    assert same_file(a, tmp_path / "sub" / ".." / "a.tif")
    assert same_file(a, tmp_path / "." / "a.tif")
    monkeypatch.chdir(tmp_path)
    assert same_file("a.tif", a)


def test_symbolic_and_hard_links(tmp_path, a):
    sym = tmp_path / "sym.tif"
    sym.symlink_to(a)
    hard = tmp_path / "hard.tif"
    os.link(a, hard)
    assert same_file(sym, a) and same_file(a, sym)
    assert same_file(hard, a) and same_file(hard, sym)
    (tmp_path / "dir").mkdir()
    (tmp_path / "link_dir").symlink_to(tmp_path / "dir")
    assert same_file(tmp_path / "link_dir" / "new.tif", tmp_path / "dir" / "new.tif")


def test_different_or_missing_files(tmp_path, a):
    b = tmp_path / "b.tif"
    b.write_bytes(b"input")  # same bytes, another file
    assert not same_file(a, b)
    assert not same_file(a, tmp_path / "missing.tif")
    assert not same_file(tmp_path / "missing.tif", a)
    assert not same_file(tmp_path / "x.tif", tmp_path / "y.tif")
    assert same_file(tmp_path / "x.tif", tmp_path / "x.tif")  # neither exists yet


def test_check_distinct_accepts_distinct_files_and_skips_none(tmp_path, a):
    check_distinct({"input": a, "coarse map": None},
                   {"output": tmp_path / "out.tif", "probabilities": None,
                    "vector": tmp_path / "out.gpkg"})
    check_distinct({}, {})
    check_distinct({"input": a}, {})


def test_check_distinct_refuses_an_output_that_is_an_input(tmp_path, a):
    with pytest.raises(OutputError, match="the output .* is the input .*destroyed"):
        check_distinct({"input": a}, {"output": a})
    hard = tmp_path / "hard.tif"
    os.link(a, hard)
    with pytest.raises(OutputError, match="the probabilities .* is the coarse map"):
        check_distinct({"input": tmp_path / "other.tif", "coarse map": a},
                       {"output": tmp_path / "out.tif", "probabilities": hard})


def test_check_distinct_refuses_two_outputs_in_one_file(tmp_path):
    out = tmp_path / "out.tif"
    with pytest.raises(OutputError, match="the output and the vector are the same file"):
        check_distinct({"input": tmp_path / "in.tif"},
                       {"output": out, "probabilities": None, "vector": str(out)})


def test_check_distinct_ignores_urls_among_inputs(tmp_path):
    check_distinct({"input": "https://example.com/a.tif", "s3": "s3://bucket/a.tif"},
                   {"output": tmp_path / "a.tif"})

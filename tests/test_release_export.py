"""release/export_models.py: exporting one model rewrites only its section of the validation
page and keeps the others and *Previous release*."""

from __future__ import annotations

import sys
from pathlib import Path

RELEASE = Path(__file__).resolve().parent.parent / "release"
if str(RELEASE) not in sys.path:
    sys.path.append(str(RELEASE))

from export_models import update_validation_page  # noqa: E402

PAGE = """# Validation of the bundled models

intro

# buildings

old buildings table

# roads

old roads table

# Previous release

kept history
"""


def test_replaces_only_its_section(tmp_path: Path) -> None:
    page = tmp_path / "validation.md"
    page.write_text(PAGE)
    update_validation_page(page, "roads", "# Validation, roads: x\n\nnew roads table\n")
    text = page.read_text()
    assert "new roads table" in text and "old roads table" not in text
    assert "old buildings table" in text and "kept history" in text
    assert text.index("# roads") < text.index("new roads table") < text.index("# Previous")


def test_new_section_goes_before_previous_release(tmp_path: Path) -> None:
    page = tmp_path / "validation.md"
    page.write_text(PAGE)
    update_validation_page(page, "landcover", "# landcover\n\nland table\n")
    text = page.read_text()
    assert text.index("# roads") < text.index("# landcover") < text.index("# Previous release")
    assert "old roads table" in text


def test_missing_page_gets_the_header(tmp_path: Path) -> None:
    page = tmp_path / "validation.md"
    update_validation_page(page, "roads", "# roads\n\nt\n")
    text = page.read_text()
    assert text.startswith("# Validation of the bundled models")
    assert text.rstrip().endswith("t")


def test_the_segmentor_note_is_recorded_as_a_shell_word() -> None:
    import shlex

    from export_models import commands

    note = "a soup of three runs (it's shifted by -0.535; see commands)"
    cmds = commands("buildings", {"buildings": ["train"]}, "c", "r", 1, 0,
                    segmentor_note=note)
    assert cmds[0] == "train"
    words = shlex.split(cmds[-1])
    assert words[words.index("--segmentor-note") + 1] == note
    assert "--segmentor-note" not in commands("buildings", {}, "c", "r", 1, 0)[-1]

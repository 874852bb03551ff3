"""Atomic outputs: nothing that looks complete exists until it is complete.

Every writer in idgbr-geo (rasters, GeoPackages, PNG/HTML reports, JSON) writes to a
temporary file in the destination folder and renames it into place only on success, so an
interrupted, killed or failed run never leaves a half-written file under the final name.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError


def check_output(path: str | os.PathLike[str], overwrite: bool) -> Path:
    """Validate an output path early, before any expensive work starts."""
    out = Path(path)
    if out.exists() and not overwrite:
        raise OutputError(f"{out} already exists (use --overwrite to replace it)")
    if out.exists() and out.is_dir():
        raise OutputError(f"{out} is a directory, not a file")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output folder {parent} is not writable")
    return out


def temporary_path(path: str | os.PathLike[str]) -> Path:
    """A hidden sibling of ``path`` with the same suffix (drivers pick formats by suffix)."""
    out = Path(path)
    return out.with_name(f".{out.stem}.partial-{uuid.uuid4().hex[:8]}{out.suffix}")


@contextmanager
def atomic_output(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write to; rename it to ``path`` when the block succeeds.

    On any exception (including KeyboardInterrupt) the temporary file and its GDAL/SQLite
    side files are removed and the exception propagates.
    """
    out = check_output(path, overwrite)
    tmp = temporary_path(out)
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        for side in (tmp, *tmp.parent.glob(tmp.name + "*")):
            try:
                side.unlink()
            except OSError:
                pass
        raise


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Do two paths name one file? Compares real paths (symbolic links, ``..``) and, when both
    exist, device and inode (hard links, bind mounts, case-insensitive file systems)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def check_distinct(inputs: dict[str, str | os.PathLike[str] | None],
                   outputs: dict[str, str | os.PathLike[str] | None]) -> None:
    """Refuse, with or without overwrite, any output that is an input or another output.

    Keys are what the user calls each file ("input", "coarse map", "output", ...); ``None``
    values are skipped. Runs before any work, so a mix-up never destroys an input.
    """
    outs = [(k, v) for k, v in outputs.items() if v is not None]
    ins = [(k, v) for k, v in inputs.items() if v is not None and "://" not in os.fspath(v)]
    for i, (oname, opath) in enumerate(outs):
        for iname, ipath in ins:
            if same_file(opath, ipath):
                raise OutputError(f"the {oname} {opath} is the {iname} {ipath}: it would be "
                                  "destroyed; give another output path")
        for oname2, opath2 in outs[i + 1:]:
            if same_file(opath, opath2):
                raise OutputError(f"the {oname} and the {oname2} are the same file ({opath})")

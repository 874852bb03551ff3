"""Atomic outputs: nothing that looks complete exists until it is complete.

Every writer in idgbr-geo (rasters, GeoPackages, PNG/HTML reports, JSON) writes to a
temporary file in the destination folder and renames it into place only on success, so an
interrupted, killed or failed run never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError, OutputError, first_line


def check_output(path: str | os.PathLike[str], overwrite: bool) -> Path:
    """Validate an output path early, before any expensive work starts."""
    out = Path(path)
    if out.exists() and not overwrite:
        raise OutputError(f"{out} already exists (pass $overwrite to replace it)",
                          options=["overwrite"])
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
    remove_stale_partials(out)  # left by a killed earlier run
    tmp = temporary_path(out)
    try:
        yield tmp
        with write_errors(out):  # e.g. the folder was made read-only meanwhile
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

    Keys are what the user calls each file ("input", "coarse map", "output", ...), with
    ``$name`` for the option that gave it ("$coarse map": see :class:`UserError`); ``None``
    values are skipped. Runs before any work, so a mix-up never destroys an input.
    """
    outs = [(k, v) for k, v in outputs.items() if v is not None]
    ins = [(k, v) for k, v in inputs.items() if v is not None and "://" not in os.fspath(v)]
    for i, (oname, opath) in enumerate(outs):
        for iname, ipath in ins:
            if same_file(opath, ipath):
                raise OutputError(f"the {oname} {opath} is the {iname} {ipath}: it would be "
                                  "destroyed; give another output path",
                                  options=_options(oname, iname))
        for oname2, opath2 in outs[i + 1:]:
            if same_file(opath, opath2):
                raise OutputError(f"the {oname} and the {oname2} are the same file ({opath})",
                                  options=_options(oname, oname2))


def _options(*names: str) -> list[str]:
    """The ``$option`` names in :func:`check_distinct`'s keys."""
    return [m for name in names for m in re.findall(r"\$(\w+)", name)]


def output_name(path: str | os.PathLike[str]) -> Path:
    """The user's name for an output: a :func:`temporary_path` maps back to its final path
    (so a write error names the file the user asked for, not a hidden temporary)."""
    p = Path(path)
    m = _PARTIAL.fullmatch(p.name)
    return p.with_name(m.group(1) + m.group(2)) if m else p


#: a temporary_path name: "." stem ".partial-" 8 hex digits suffix
_PARTIAL = re.compile(r"\.(.+)\.partial-[0-9a-f]{8}(\.[^.]*|)")


def remove_stale_partials(path: str | os.PathLike[str]) -> int:
    """Remove the temporaries a killed earlier run left for exactly this output (the hidden
    ``.<stem>.partial-<random><suffix>`` siblings and their GDAL/SQLite side files); return
    how many. Other outputs' temporaries (another suffix or stem) are left alone, so one
    run's GeoPackage never sweeps away its own raster's temporary."""
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    own = re.compile(re.escape(f".{out.stem}.partial-") + "[0-9a-f]{8}"
                     + re.escape(out.suffix) + r"(?:[-.].*)?", re.DOTALL)
    n = 0
    for p in parent.glob(glob.escape(f".{out.stem}.partial-") + "*"):
        if own.fullmatch(p.name):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                n += 1
    return n


@contextmanager
def write_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn a failure while writing an output (disk full, folder gone or made read-only,
    GDAL write errors) into one :class:`OutputError` that names the user's output."""
    from rasterio.errors import RasterioError

    try:
        yield
    except (OSError, RasterioError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
        raise OutputError(f"cannot write {output_name(path)}: {reason}") from None


@contextmanager
def read_errors(path: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Turn a GDAL read failure of a user's raster (truncated or corrupt file) into one
    :class:`InputError` line, as ``refine`` reports them."""
    from rasterio.errors import RasterioError

    try:
        yield
    except RasterioError as exc:
        raise InputError(f"failed to read {what} {path}: {first_line(exc)} (truncated or corrupt "
                         "file?)") from None

"""A batch's scenes and their record: jobs, results, the manifest and its fingerprint.

Both runners (:mod:`idgbr_geo.batch.local` in this process, :mod:`idgbr_geo.batch.cluster`
on Dask) refine a scene with :func:`process_scene` and report to a :class:`Tracker`, which
keeps the manifest (``idgbr_manifest.json``: the cumulative state of every scene, rewritten
atomically after every change) and the progress bar up to date.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm import tqdm

from ..errors import UserError
from ..files import atomic_output, same_file
from ..interfaces import Model
from ..options import OutputOptions, RunOptions, changed
from ..registry import resolve_card

SUMMARY_NAME = "idgbr_batch_summary.json"
MANIFEST_NAME = "idgbr_manifest.json"
LOCK_NAME = ".idgbr_batch.lock"
_STATES = {"pending", "running", "done", "failed", "skipped"}

#: what a scene hook gets: the scene (a Path, or the URL string) and its output
AfterHook = Callable[[Any, Path], None]


@dataclass
class SceneResult:
    scene: str
    output: str
    status: str  # "done", "skipped" (output exists or finished earlier) or "failed"
    seconds: float = 0.0
    error: str | None = None
    summary: str | None = None
    attempts: int = 0
    worker: str | None = None  # Dask worker address (None in-process)
    retryable: bool = False  # failed for a reason that may pass on a second try
    cleaned: int = 0  # leftover partial files of an earlier, dead attempt removed first
    warnings: list[str] = field(default_factory=list)  # the run's (RefineSummary.warnings)


@dataclass
class BatchSummary:
    scenes: list[SceneResult] = field(default_factory=list)
    summary_path: str | None = None
    manifest_path: str | None = None
    dashboard: str | None = None

    @property
    def failed(self) -> list[SceneResult]:
        return [s for s in self.scenes if s.status == "failed"]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.scenes:
            out[s.status] = out.get(s.status, 0) + 1
        return out


@dataclass(frozen=True)
class SceneSettings:
    """What every scene of a batch is refined with (sent to Dask workers as one object).

    ``vector``: also write ``<scene>.gpkg`` beside each output. ``tune_process``: each
    process that refines scenes calls :func:`idgbr_geo.tuning.tune_process` first.
    """

    options: RunOptions = field(default_factory=RunOptions)
    outputs: OutputOptions = field(default_factory=OutputOptions)
    vector: bool = False
    overwrite: bool = False
    tune_process: bool = False


@dataclass
class Job:
    """One scene still to do: its manifest key, input and output (strings workers can open).
    ``replace``: the output may be replaced without overwrite: it is this batch's own, made
    with other options, or it did not exist when the batch was planned, so whatever is there
    later is an earlier attempt's (a worker that died before its result came back)."""

    key: str
    scene: str
    output: str
    replace: bool = False

    def settings(self, settings: SceneSettings) -> SceneSettings:
        """The settings for this job (overwrite on when it replaces our own output)."""
        return dataclasses.replace(settings, overwrite=True) if self.replace else settings


def is_url(path: str | os.PathLike[str]) -> bool:
    return "://" in os.fspath(path)


#: the scenes a batch takes when no pattern is given: GeoTIFFs, in any case (``.TIF`` from
#: many sensors, ``.tiff``); not GDAL's ``.tif.aux.xml`` side files
GEOTIFF_SUFFIXES = (".tif", ".tiff")
#: image files GDAL reads that a folder of scenes may hold instead of GeoTIFFs
OTHER_IMAGES = (".jpg", ".jpeg", ".png", ".jp2", ".img", ".vrt")


def _is_geotiff(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in GEOTIFF_SUFFIXES


def find_scenes(in_dir: str | os.PathLike[str], pattern: str | None = None) -> list[str]:
    """Rasters in ``in_dir`` matching the glob ``pattern`` (sorted; not recursive unless
    the pattern says **); None: every GeoTIFF (``.tif`` or ``.tiff``, any case).

    Local scenes are absolute paths as listed, not resolved: a symbolic link
    ``a.tif -> ../x/gorinchem.tif`` is the scene ``a.tif`` and gives the output ``a.tif``
    (checks that an output is not a scene compare the real files).

    ``in_dir`` may be a local folder or any URL an installed fsspec filesystem can list
    (``s3://``, ``gs://``, ``http://`` index pages, ...); the scenes are then URLs that
    rasterio opens through GDAL's virtual file systems.
    """
    if is_url(in_dir):
        import fsspec

        base = os.fspath(in_dir).rstrip("/")
        try:
            fs, root = fsspec.core.url_to_fs(base)
            found = fs.glob(f"{root.rstrip('/')}/{pattern or '*'}")
        except (ImportError, ValueError) as exc:
            raise UserError(f"cannot list {base}: {exc}") from None
        except (OSError, FileNotFoundError) as exc:
            raise UserError(f"input folder {base} cannot be listed ({exc})") from None
        paths = found if isinstance(found, list) else list(found)
        return sorted(p if is_url(p) else fs.unstrip_protocol(p) for p in paths
                      if not str(p).endswith("/") and (pattern or _is_geotiff(str(p))))
    d = Path(in_dir)
    if not d.is_dir():
        raise UserError(f"input folder {d} does not exist")
    return sorted(str(p.absolute()) for p in d.glob(pattern or "*")
                  if p.is_file() and (pattern or _is_geotiff(p.name)))


def no_scenes_message(in_dir: str | os.PathLike[str], pattern: str | None) -> str:
    """Why a batch found nothing, and the pattern that would find the images that are
    there (exports without a CRS often come as JPEG or PNG)."""
    if pattern is not None:
        return f"no file in {os.fspath(in_dir)} matches {pattern!r}"
    msg = f"no GeoTIFF (.tif, .tiff) in {os.fspath(in_dir)}"
    if is_url(in_dir) or not Path(in_dir).is_dir():
        return msg
    others = sorted({p.suffix for p in Path(in_dir).iterdir()
                     if p.is_file() and p.suffix.lower() in OTHER_IMAGES})
    if others:
        msg += f"; to take its {', '.join(others)} files give $pattern '*{others[0]}'"
    return msg



def scene_name(scene: str | os.PathLike[str]) -> str:
    """File name of a local path or a URL."""
    s = os.fspath(scene)
    return PurePosixPath(s.split("?", 1)[0]).name if is_url(s) else Path(s).name


def output_for(scene: str | os.PathLike[str], out_dir: Path, suffix: str = ".tif") -> Path:
    return out_dir / f"{Path(scene_name(scene)).stem}{suffix}"


def clean_partials(output: str | os.PathLike[str]) -> int:
    """Remove temporary files a dead earlier attempt left next to ``output``; return how many.

    They are the hidden ``.<stem>.partial-<random><suffix>`` siblings that
    :func:`idgbr_geo.files.atomic_output` writes (plus GDAL side files).
    """
    out = Path(output)
    n = 0
    for p in out.parent.glob(f".{out.stem}.partial-*"):
        try:
            p.unlink()
            n += 1
        except FileNotFoundError:
            pass
    return n


def is_transient(exc: BaseException) -> bool:
    """May a second try pass? I/O and runtime errors (a network file system hiccup, GPU out of
    memory) may; user errors (a corrupt file) and other exceptions (a bug) fail the same way
    every time, so retrying them only wastes time."""
    return (isinstance(exc, (OSError, RuntimeError, MemoryError))
            and not isinstance(exc, (UserError, NotImplementedError, RecursionError)))


def error_line(exc: BaseException) -> str:
    """One line for the summary: a user error's message, else the type and its first line."""
    text = str(exc).strip()
    msg = text.splitlines()[0] if text else ""
    if isinstance(exc, UserError) and msg:
        return msg
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def process_scene(scene: str | os.PathLike[str], output: str | os.PathLike[str],
                  model: Model | str, settings: SceneSettings, *,
                  after: AfterHook | None = None) -> SceneResult:
    """Refine one scene; any error becomes a failed :class:`SceneResult`, never an exception
    (one bad scene must not stop, or crash every re-run of, the batch). Only Ctrl-C and
    ``SystemExit`` propagate. Transient errors (:func:`is_transient`) are marked ``retryable``.
    """
    from .. import engine  # looked up per call (tests replace engine.refine_raster)

    t0 = time.perf_counter()
    cleaned = 0
    try:
        cleaned = clean_partials(output)
        summ = engine.refine_raster(
            scene, output, model=model, options=settings.options, outputs=settings.outputs,
            vector=Path(output).with_suffix(".gpkg") if settings.vector else None,
            overwrite=settings.overwrite, quiet=True)
        if after is not None:
            after(scene if is_url(scene) else Path(scene), Path(output))
        return SceneResult(str(scene), str(output), "done", time.perf_counter() - t0,
                           summary=summ.line(), cleaned=cleaned,
                           warnings=list(summ.warnings))
    except Exception as exc:  # any scene's own error, a bug included, is that scene's failure
        return SceneResult(str(scene), str(output), "failed", time.perf_counter() - t0,
                           error=error_line(exc), cleaned=cleaned, retryable=is_transient(exc))


def options_fingerprint(model: Any, settings: SceneSettings) -> str:
    """A short hash of everything that shapes an output: a finished scene counts as finished
    only for the same model and options. Covers every field of the run and output options
    except those that never change an output's bytes (:attr:`RunOptions.NEUTRAL`), and the
    polygon options only when polygons are written; fields at their default are left out."""
    opts = changed(settings.options, RunOptions.NEUTRAL)
    opts.update(changed(settings.outputs, () if settings.vector else ("vectors",)))
    if settings.vector:
        opts["vector_per_scene"] = True
    doc = json.dumps({"model": _model_identity(model), "options": opts}, sort_keys=True,
                     default=str)
    return hashlib.sha1(doc.encode()).hexdigest()[:16]


def _model_identity(model: Any) -> Any:
    """Card text plus the weights file's size and time: a retrained model is another model."""
    if isinstance(model, Model):
        return asdict(model.card)  # in-memory weights: the card is all we can compare
    card = resolve_card(model)
    text = card.read_text()
    try:
        name = json.loads(text).get("weights")
        st = (card.parent / name).stat() if name else None
    except (ValueError, AttributeError, OSError):
        st = None
    return [os.fspath(model), text, None if st is None else [st.st_size, st.st_mtime_ns]]


def model_reference(model: str | os.PathLike[str] | Model) -> str:
    """What workers load: a bundled name as is, a card path made absolute (checked here, so a
    wrong name fails before anything is submitted)."""
    if isinstance(model, Model):
        raise UserError("a distributed batch needs a model name or card path that every worker "
                        "can load, not an in-memory Model")
    card = resolve_card(model)
    p = Path(model)
    return str(card.resolve()) if (p.suffix == ".json" or p.exists()) else os.fspath(model)


@contextlib.contextmanager
def batch_lock(out_dir: Path) -> Iterator[None]:
    """One batch per output folder at a time: a second one would redo (and clean up the
    temporary files of) the first one's scenes. The OS drops the lock if we die."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here
        yield
        return
    path = out_dir / LOCK_NAME
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"another idgbr-geo batch is writing to {out_dir} (lock "
                            f"{path.name}); wait for it or give another output folder") from None
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            fcntl.flock(fh, fcntl.LOCK_UN)


class Manifest:
    """Per-scene state of a batch, kept in the output folder and rewritten atomically after
    every change (only ever by the client, never by workers)."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path, self.fingerprint = path, fingerprint
        self.scenes: dict[str, dict[str, Any]] = {}
        if path.exists():
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise UserError(f"manifest {path} is unreadable ({exc}); delete it to start "
                                "the batch afresh") from None
            problem = _manifest_problem(doc)
            if problem:
                raise UserError(f"manifest {path} is malformed ({problem}); delete it to start "
                                "the batch afresh")
            self.scenes = dict(doc.get("scenes", {}))

    def finished(self, key: str, output: str | os.PathLike[str]) -> bool:
        """Done earlier with the same model and options, and the output is still there."""
        e = self.scenes.get(key)
        return (e is not None and e.get("state") == "done"
                and e.get("options") == self.fingerprint and Path(output).exists())

    def ours(self, key: str, output: str | os.PathLike[str]) -> bool:
        """Did this batch write ``output`` (with whatever options)? Then a run with other
        options may replace it without overwrite; a file we did not write is left alone.
        ``written`` outlives later states (a failed or interrupted redo leaves it ours)."""
        e = self.scenes.get(key)
        if e is None:
            return False
        mine = e.get("written") or (e.get("output") if e.get("state") == "done" else None)
        return mine is not None and same_file(mine, output)

    def update(self, key: str, *, save: bool = True, **fields: Any) -> None:
        entry = self.scenes.setdefault(key, {})
        entry.update(fields, options=self.fingerprint,
                     updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        if save:
            self.save()

    def record(self, key: str, res: SceneResult) -> None:
        extra = {"written": res.output} if res.status == "done" else {}
        self.update(key, state=res.status, scene=res.scene, output=res.output,
                    attempts=res.attempts, seconds=round(res.seconds, 3), error=res.error,
                    worker=res.worker, **extra)

    def save(self) -> None:
        doc = {"version": 1, "scenes": self.scenes}
        with atomic_output(self.path, overwrite=True) as tmp:
            tmp.write_text(json.dumps(doc, indent=1) + "\n")


def _manifest_problem(doc: Any) -> str | None:
    """What is wrong with a manifest's JSON (None when nothing): a hand-edited or foreign
    file must be one clear error, not a TypeError deep in the resume logic."""
    if not isinstance(doc, dict):
        return f"a JSON {type(doc).__name__}, not an object"
    scenes = doc.get("scenes", {})
    if not isinstance(scenes, dict):
        return '"scenes" is not an object'
    for key, e in scenes.items():
        if not isinstance(e, dict):
            return f"scene {key!r} is not an object"
        state = e.get("state")
        if not isinstance(state, str) or state not in _STATES:
            return f"scene {key!r} has state {state!r}"
        for name in ("scene", "output", "written", "options", "error", "worker"):
            if e.get(name) is not None and not isinstance(e[name], str):
                return f"scene {key!r}: {name} is not a string"
    return None


class Tracker:
    """Where both runners report: keeps results, the manifest and the scene progress bar."""

    def __init__(self, manifest: Manifest, total: int, quiet: bool) -> None:
        self.manifest = manifest
        self.results: dict[str, SceneResult] = {}
        self.bar = tqdm(total=total, unit="scene", desc="scenes", file=sys.stderr,
                        disable=True if quiet else None)

    def running(self, job: Job, attempt: int, worker: str | None = None) -> None:
        self.manifest.update(job.key, state="running", attempts=attempt, worker=worker)

    def finish(self, job: Job, res: SceneResult) -> None:
        self.results[job.key] = res
        self.manifest.record(job.key, res)
        self.bar.update(1)
        failed = sum(r.status == "failed" for r in self.results.values())
        if failed:
            self.bar.set_postfix(failed=failed, refresh=False)

    def close(self) -> None:
        self.bar.close()


def write_summary(result: BatchSummary, out_dir: Path) -> Path:
    path = out_dir / SUMMARY_NAME
    doc = {"counts": result.counts(), "scenes": [asdict(s) for s in result.scenes]}
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
    return path

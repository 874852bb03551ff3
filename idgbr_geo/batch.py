"""Batch processing: every matching scene of a folder, on this machine or on a Dask cluster.

A failing scene does not stop the batch. Two files in the output folder record what
happened:

* ``idgbr_batch_summary.json``: what this run did (per scene: status, seconds, error);
* ``idgbr_manifest.json``: the cumulative state of every scene (pending, running, done,
  failed, skipped), rewritten atomically after every change, so that re-running the same
  command after a crash or Ctrl-C skips the finished scenes and redoes the others.

Outputs are written atomically by the engine, and leftover ``.partial-*`` files of a run that
died are removed before a scene is redone, so nothing that looks complete is ever half done.
With ``workers=N`` or ``scheduler="tcp://host:port"`` (or a ``client``) the scenes run as one
Dask task each (see :mod:`idgbr_geo.distributed`); otherwise they run one by one in-process.
"""

from __future__ import annotations

import contextlib
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

from .errors import OutputError, UserError
from .files import atomic_output, same_file
from .interfaces import Model
from .registry import load_model, resolve_card

SUMMARY_NAME = "idgbr_batch_summary.json"
MANIFEST_NAME = "idgbr_manifest.json"
LOCK_NAME = ".idgbr_batch.lock"
#: refine options that do not change an output (so they do not invalidate finished scenes)
_NEUTRAL_OPTIONS = {"quiet", "overwrite", "device", "model_workers"}
#: refine_raster's defaults other than None/False: an option left out (Python API) and the
#: same option given with its default (the CLI passes every option) fingerprint alike
_OPTION_DEFAULTS: dict[str, Any] = {"seed": 0, "probabilities_dtype": "uint8"}
_STATES = {"pending", "running", "done", "failed", "skipped"}


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


@dataclass
class Job:
    """One scene still to do: its manifest key, input and output (strings workers can open).
    ``replace``: the output is this batch's own, made with other options, and is replaced."""

    key: str
    scene: str
    output: str
    replace: bool = False

    def kwargs(self, refine_kwargs: dict[str, Any]) -> dict[str, Any]:
        """The refine options for this job (overwrite on when it replaces our own output)."""
        return dict(refine_kwargs, overwrite=True) if self.replace else refine_kwargs


def is_url(path: str | os.PathLike[str]) -> bool:
    return "://" in os.fspath(path)


def find_scenes(in_dir: str | os.PathLike[str], pattern: str = "*.tif") -> list[str]:
    """Matching rasters in ``in_dir`` (sorted; not recursive unless the pattern says **).

    ``in_dir`` may be a local folder or any URL an installed fsspec filesystem can list
    (``s3://``, ``gs://``, ``http://`` index pages, ...); the scenes are then URLs that
    rasterio opens through GDAL's virtual file systems.
    """
    if is_url(in_dir):
        import fsspec

        base = os.fspath(in_dir).rstrip("/")
        try:
            fs, root = fsspec.core.url_to_fs(base)
            found = fs.glob(f"{root.rstrip('/')}/{pattern}")
        except (ImportError, ValueError) as exc:
            raise UserError(f"cannot list {base}: {exc}") from None
        except (OSError, FileNotFoundError) as exc:
            raise UserError(f"input folder {base} cannot be listed ({exc})") from None
        paths = found if isinstance(found, list) else list(found)
        return sorted(p if is_url(p) else fs.unstrip_protocol(p) for p in paths
                      if not str(p).endswith("/"))
    d = Path(in_dir)
    if not d.is_dir():
        raise UserError(f"input folder {d} does not exist")
    return sorted(str(p.resolve()) for p in d.glob(pattern) if p.is_file())


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
                  model: Model | str, *, refine_kwargs: dict[str, Any],
                  after: Callable[[Path, Path], None] | None = None) -> SceneResult:
    """Refine one scene; any error becomes a failed :class:`SceneResult`, never an exception
    (one bad scene must not stop, or crash every re-run of, the batch). Only Ctrl-C and
    ``SystemExit`` propagate. Transient errors (:func:`is_transient`) are marked ``retryable``.
    """
    from .engine import refine_raster

    t0 = time.perf_counter()
    cleaned = 0
    try:
        cleaned = clean_partials(output)
        kwargs = dict(refine_kwargs)
        if kwargs.pop("vector_per_scene", False):
            kwargs["vector"] = Path(output).with_suffix(".gpkg")
        summ = refine_raster(scene, output, model=model, **kwargs)
        if after is not None:
            after(scene if is_url(scene) else Path(scene), Path(output))  # type: ignore[arg-type]
        return SceneResult(str(scene), str(output), "done", time.perf_counter() - t0,
                           summary=summ.line(), cleaned=cleaned)
    except Exception as exc:  # any scene's own error, a bug included, is that scene's failure
        return SceneResult(str(scene), str(output), "failed", time.perf_counter() - t0,
                           error=error_line(exc), cleaned=cleaned, retryable=is_transient(exc))


def options_fingerprint(model: Any, refine_kwargs: dict[str, Any]) -> str:
    """A short hash of everything that shapes an output: a finished scene counts as finished
    only for the same model and options. Options at their default count as left out."""
    opts = {k: v for k, v in sorted(refine_kwargs.items())
            if k not in _NEUTRAL_OPTIONS and v is not None and v is not False
            and not (k in _OPTION_DEFAULTS and v == _OPTION_DEFAULTS[k])}
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
        options may replace it without --overwrite; a file we did not write is left alone.
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


def model_reference(model: str | os.PathLike[str] | Model) -> str:
    """What workers load: a bundled name as is, a card path made absolute (checked here, so a
    wrong name fails before anything is submitted)."""
    if isinstance(model, Model):
        raise UserError("a distributed batch needs a model name or card path that every worker "
                        "can load, not an in-memory Model")
    card = resolve_card(model)
    p = Path(model)
    return str(card.resolve()) if (p.suffix == ".json" or p.exists()) else os.fspath(model)


def run_batch(in_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
              model: str | os.PathLike[str] | Model = "buildings", pattern: str = "*.tif",
              overwrite: bool = False, quiet: bool = False, device: str = "auto",
              after: Callable[[Path, Path], None] | None = None,
              scheduler: str | None = None, workers: int | None = None, retries: int = 2,
              client: Any = None, vector: bool = False,
              vector_merge: str | os.PathLike[str] | None = None,
              vector_options: dict[str, Any] | None = None,
              **refine_kwargs: Any) -> BatchSummary:
    """Refine every scene matching ``pattern`` in ``in_dir`` into ``out_dir``.

    Scenes finished by an earlier run with the same options (per the manifest) are skipped,
    as are existing outputs unless ``overwrite``. ``scheduler`` (an address), ``workers`` (a
    local cluster of N processes) or ``client`` (a ``distributed.Client``) run one Dask task
    per scene; each worker loads the model once, on its own GPU when it has one
    (``device="auto"``). A scene is tried up to ``1 + retries`` times when its worker dies or
    it fails for a transient reason; user errors (a corrupt file) are not retried.

    ``vector`` also writes ``<scene>.gpkg`` polygons beside each output; ``vector_merge``
    writes the polygons of every finished scene into one GeoPackage with a ``scene``
    attribute once the scenes are done (``vector_options`` shape both).
    """
    if vector_merge is not None:
        from .vectorize import check_gpkg_output

        check_gpkg_output(vector_merge, overwrite)
    if scheduler and workers:
        raise UserError("give either --scheduler or --workers, not both")
    if retries < 0:
        raise UserError("--retries must be 0 or more")
    out = Path(out_dir)
    if not out.is_dir():
        raise UserError(f"output folder {out} does not exist")
    if not os.access(out, os.W_OK):
        raise UserError(f"output folder {out} is not writable")
    scenes = find_scenes(in_dir, pattern)
    if not scenes:
        raise UserError(f"no file in {in_dir} matches {pattern!r}")
    check_batch_paths(scenes, out, vector=vector, vector_merge=vector_merge)
    distributed = bool(scheduler or workers or client is not None)
    ref: str | Model = (model if isinstance(model, Model) and not distributed
                        else model_reference(model))
    kwargs = dict(refine_kwargs, overwrite=overwrite, quiet=True)
    if vector:
        kwargs.update(vector_per_scene=True, vector_options=vector_options or {})
    with batch_lock(out):
        result = _run_batch(scenes, out, ref, distributed, kwargs, overwrite=overwrite,
                            quiet=quiet, device=device, after=after, scheduler=scheduler,
                            workers=workers, retries=retries, client=client)
    if vector_merge is not None:
        merge_vectors(result, vector_merge, overwrite=overwrite, quiet=quiet,
                      **(vector_options or {}))
    return result


def _identities(path: str | os.PathLike[str]) -> list[tuple[Any, ...]]:
    """What makes two paths one file, as :func:`idgbr_geo.files.same_file` decides: the real
    path, and device and inode when it exists (hard links, bind mounts)."""
    keys: list[tuple[Any, ...]] = [("path", os.path.realpath(path))]
    try:
        st = os.stat(path)
        keys.append(("inode", st.st_dev, st.st_ino))
    except OSError:
        pass
    return keys


def check_batch_paths(scenes: list[str], out: Path, *, vector: bool = False,
                      vector_merge: str | os.PathLike[str] | None = None) -> None:
    """Refuse, before any work and with or without overwrite, an output that is a scene or
    another output (``batch D D --overwrite`` would replace every scene by its class map).

    The rule of :func:`idgbr_geo.files.check_distinct`, with hashed identities so that it
    stays linear in the number of scenes. URL scenes are never local outputs.
    """
    seen: dict[tuple[Any, ...], tuple[str, str]] = {}
    for scene in scenes:
        if not is_url(scene):
            for k in _identities(scene):
                seen.setdefault(k, ("scene", scene))
    outputs: list[tuple[str, str | os.PathLike[str]]] = []
    for scene in scenes:
        target = output_for(scene, out)
        outputs.append((f"output of {scene_name(scene)}", target))
        if vector:
            outputs.append((f"GeoPackage of {scene_name(scene)}", target.with_suffix(".gpkg")))
    outputs += [("manifest", out / MANIFEST_NAME), ("summary", out / SUMMARY_NAME),
                ("lock file", out / LOCK_NAME)]
    if vector_merge is not None:
        outputs.append(("merged GeoPackage", vector_merge))
    for what, path in outputs:
        keys = _identities(path)
        for k in keys:
            if k not in seen:
                continue
            role, other = seen[k]
            if role == "scene":
                hint = ("give another --vector-merge path" if what == "merged GeoPackage" else
                        "give an output folder other than the input folder, or a --pattern "
                        "that does not match the outputs")
                raise OutputError(f"the {what} {os.fspath(path)} is the scene {other}: it "
                                  f"would be destroyed; {hint}")
            raise OutputError(f"the {role} and the {what} are the same file ({other})")
        for k in keys:
            seen[k] = (what, os.fspath(path))


def merge_vectors(result: BatchSummary, path: str | os.PathLike[str], *, overwrite: bool,
                  quiet: bool, **vector_options: Any) -> Path:
    """Polygons of every scene with an output into one GeoPackage (``scene`` attribute)."""
    from .vectorize import GeoPackageWriter, vectorize_raster

    scenes = [s for s in result.scenes if s.status in ("done", "skipped")
              and Path(s.output).exists()]
    with GeoPackageWriter(path, overwrite) as writer:
        for s in tqdm(scenes, unit="scene", desc="vectorize", disable=True if quiet else None):
            vectorize_raster(s.output, writer, scene=Path(scene_name(s.scene)).stem,
                             **vector_options)
    return Path(path)


def _run_batch(scenes: list[str], out: Path, ref: str | Model, distributed: bool,
               kwargs: dict[str, Any], *, overwrite: bool, quiet: bool, device: str,
               after: Callable[[Path, Path], None] | None, scheduler: str | None,
               workers: int | None, retries: int, client: Any) -> BatchSummary:
    manifest = Manifest(out / MANIFEST_NAME, options_fingerprint(ref, kwargs))
    result = BatchSummary(manifest_path=str(manifest.path))
    done: dict[str, SceneResult] = {}
    jobs: list[Job] = []
    order: list[str] = []
    for scene in scenes:
        target = output_for(scene, out)
        key = scene_name(scene)
        if key in order:
            raise UserError(f"two scenes are named {key}: their outputs would collide")
        order.append(key)
        # an output of ours made with other options is redone (replaced without --overwrite);
        # an existing output this batch did not write is kept unless --overwrite
        ours = manifest.ours(key, target)
        if manifest.finished(key, target) or (target.exists() and not overwrite and not ours):
            done[key] = SceneResult(scene, str(target), "skipped")
            continue
        jobs.append(Job(key, scene, str(target.resolve()), replace=ours and not overwrite))
    with contextlib.ExitStack() as stack:
        cl = None
        if jobs and distributed:  # connect first: a wrong address must not touch OUT_DIR
            from .distributed import dask_client, run_on_cluster

            cl = stack.enter_context(dask_client(scheduler, workers, client=client,
                                                 retries=retries, quiet=quiet))
            result.dashboard = _dashboard(cl, quiet)
        elif jobs and not isinstance(ref, Model):
            ref = load_model(ref, device)
        for key, res in done.items():
            if not manifest.finished(key, res.output):  # an existing output, not ours
                manifest.update(key, save=False, state="skipped", scene=res.scene,
                                output=res.output, error=None)
        for job in jobs:
            manifest.update(job.key, save=False, state="pending", scene=job.scene,
                            output=job.output, error=None)
        manifest.save()
        tracker = Tracker(manifest, len(jobs), quiet)
        stack.callback(tracker.close)
        if cl is not None:
            run_on_cluster(cl, jobs, tracker, model=str(ref), device=device,
                           refine_kwargs=kwargs, retries=retries, after=after)
        elif jobs:
            _run_here(jobs, tracker, ref, kwargs, retries, after)  # type: ignore[arg-type]
    done.update(tracker.results)
    result.scenes = [done[k] for k in order if k in done]
    result.summary_path = str(write_summary(result, out))
    return result


def _dashboard(client: Any, quiet: bool) -> str | None:
    from .distributed import dashboard_address

    link = dashboard_address(client)
    if link and not quiet:
        tqdm.write(f"Dask dashboard: {link}", file=sys.stderr)
    return link


def _run_here(jobs: list[Job], tracker: Tracker, model: Model, kwargs: dict[str, Any],
              retries: int, after: Callable[[Path, Path], None] | None) -> None:
    """The in-process loop: one scene after the other, retrying transient failures."""
    for job in jobs:
        for attempt in range(1, retries + 2):
            tracker.running(job, attempt)
            res = process_scene(job.scene, job.output, model, refine_kwargs=job.kwargs(kwargs),
                                after=after)
            res.attempts = attempt
            if res.status == "done" or not res.retryable:
                break
        tracker.finish(job, res)


def write_summary(result: BatchSummary, out_dir: Path) -> Path:
    path = out_dir / SUMMARY_NAME
    doc = {"counts": result.counts(), "scenes": [asdict(s) for s in result.scenes]}
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
    return path

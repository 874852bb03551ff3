"""Batch processing: every matching scene of a folder, on this machine or on a Dask cluster.

A failing scene does not stop the batch. Two files in the output folder (created when it
does not exist) record what happened:

* ``idgbr_batch_summary.json``: what this run did (per scene: status, seconds, error);
* ``idgbr_manifest.json``: the cumulative state of every scene (pending, running, done,
  failed, skipped), rewritten atomically after every change, so that re-running the same
  command after a crash or Ctrl-C skips the finished scenes and redoes the others.

Outputs are written atomically by the engine, and leftover ``.partial-*`` files of a run that
died are removed before a scene is redone, so nothing that looks complete is ever half done.
With ``workers=N`` or ``scheduler="tcp://host:port"`` (or a ``client``) the scenes run as one
Dask task each (:mod:`idgbr_geo.batch.cluster`); otherwise they run one by one in this
process (:mod:`idgbr_geo.batch.local`). :mod:`idgbr_geo.batch.jobs` holds what both share.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..errors import OutputError, UserError
from ..interfaces import Model
from ..options import OutputOptions, RunOptions
from ..registry import load_model, resolve_card
from .jobs import (
    LOCK_NAME,
    MANIFEST_NAME,
    SUMMARY_NAME,
    AfterHook,
    BatchSummary,
    Job,
    Manifest,
    SceneResult,
    SceneSettings,
    Tracker,
    batch_lock,
    find_scenes,
    is_url,
    model_reference,
    no_scenes_message,
    options_fingerprint,
    output_for,
    process_scene,
    scene_name,
    write_summary,
)
from .local import run_here

__all__ = [
    "LOCK_NAME", "MANIFEST_NAME", "SUMMARY_NAME", "BatchSummary", "Job", "Manifest",
    "SceneResult", "SceneSettings", "Tracker", "batch_lock", "check_batch_paths",
    "find_scenes", "merge_vectors", "model_reference", "options_fingerprint", "output_for",
    "process_scene", "run_batch", "scene_name",
]


def run_batch(in_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
              model: str | os.PathLike[str] | Model = "buildings",
              options: RunOptions | None = None, outputs: OutputOptions | None = None,
              pattern: str | None = None, vector: bool = False,
              vector_merge: str | os.PathLike[str] | None = None,
              overwrite: bool = False, quiet: bool = False, after: AfterHook | None = None,
              scheduler: str | None = None, workers: int | None = None, retries: int = 2,
              client: Any = None, tune_process: bool = False) -> BatchSummary:
    """Refine every scene matching the glob ``pattern`` in ``in_dir`` (None: every
    GeoTIFF, ``.tif`` or ``.tiff`` in any case) into ``out_dir`` (created when missing), each
    as :func:`idgbr_geo.engine.refine_raster` would with ``options`` and
    ``outputs`` (None: the defaults).

    Everything that would fail every scene alike (options, the model, paths) is checked
    once, before any scene starts. Scenes finished by an earlier run with the same options
    (per the manifest) are skipped, as are existing outputs unless ``overwrite``.
    ``scheduler`` (an address), ``workers`` (a local cluster of N processes) or ``client`` (a
    ``distributed.Client``) run one Dask task per scene; each worker loads the model once, on
    its own GPU when it has one (``options.device="auto"``). A scene is tried up to
    ``1 + retries`` times when its worker dies or it fails for a transient reason; user
    errors (a corrupt file) are not retried.

    ``vector`` also writes ``<scene>.gpkg`` polygons beside each output; ``vector_merge``
    writes the polygons of every finished scene into one GeoPackage with a ``scene``
    attribute once the scenes are done (``outputs.vectors`` shapes both). ``after(scene,
    output)`` runs after each finished scene (on the worker that made it).
    ``tune_process``: tune each process that refines scenes for long runs
    (:func:`idgbr_geo.tuning.tune_process`, as the CLI does); off by default.
    """
    options = RunOptions() if options is None else options
    outputs = OutputOptions() if outputs is None else outputs
    if not isinstance(options, RunOptions) or not isinstance(outputs, OutputOptions):
        raise TypeError("options must be RunOptions and outputs OutputOptions")
    if scheduler and workers:
        raise UserError("give either $scheduler or $workers, not both",
                        options=["scheduler", "workers"])
    if retries < 0:
        raise UserError(f"$retries must be 0 or more (got {retries})", options=["retries"])
    distributed = bool(scheduler or workers or client is not None)
    ref: str | Model = (model if isinstance(model, Model) and not distributed
                        else model_reference(model))
    _check_model(ref, options)
    scenes = find_scenes(in_dir, pattern)
    if not scenes:
        raise UserError(no_scenes_message(in_dir, pattern), options=["pattern"])
    out = Path(out_dir)
    check_batch_paths(scenes, out, vector=vector, vector_merge=vector_merge)
    settings = SceneSettings(options, outputs, vector=vector, overwrite=overwrite,
                             tune_process=tune_process)
    with _output_folder(out):
        if vector_merge is not None:
            from ..vectorize import check_gpkg_output

            check_gpkg_output(vector_merge, overwrite)
        with batch_lock(out):
            result = _run_batch(scenes, out, ref, distributed, settings, quiet=quiet,
                                after=after, scheduler=scheduler, workers=workers,
                                retries=retries, client=client)
    if vector_merge is not None:
        merge_vectors(result, vector_merge, overwrite=overwrite, quiet=quiet,
                      **outputs.vectors.kwargs())
    return result


def _check_model(ref: str | Model, options: RunOptions) -> None:
    """What would fail every scene alike on this model (see
    :func:`idgbr_geo.engine.plan_run`), found once from the card alone."""
    from ..cards import ModelCard
    from ..engine import plan_run

    if isinstance(ref, Model):
        plan_run(ref.card, options, coarse=False, segmentor=ref.segmentor is not None)
    else:
        card = ModelCard.load(resolve_card(ref))
        plan_run(card, options, coarse=False, segmentor=bool(card.segmentor))


@contextlib.contextmanager
def _output_folder(out: Path) -> Iterator[None]:
    """``out`` as a writable folder, made when missing (not its parents: a mistyped path
    should not grow a tree); removed again if the batch fails while it is still empty."""
    created = False
    if not out.exists():
        if not out.parent.is_dir():
            raise OutputError(f"output folder {out} cannot be made: {out.parent} does not "
                              "exist")
        try:
            out.mkdir()
        except OSError as exc:
            raise OutputError(f"output folder {out} cannot be made ({exc.strerror})") from None
        created = True
    elif not out.is_dir():
        raise OutputError(f"output folder {out} is a file")
    if not os.access(out, os.W_OK):
        raise OutputError(f"output folder {out} is not writable")
    try:
        yield
    except BaseException:
        if created:
            with contextlib.suppress(OSError):  # (not empty: it holds a record now)
                out.rmdir()
        raise


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
    another output (``batch D D`` with overwrite would replace every scene by its class
    map), and two scenes with one name.

    The rule of :func:`idgbr_geo.files.check_distinct`, with hashed identities so that it
    stays linear in the number of scenes. URL scenes are never local outputs.
    """
    names: set[str] = set()
    for scene in scenes:
        key = scene_name(scene)
        if key in names:
            raise UserError(f"two scenes are named {key}: their outputs would collide")
        names.add(key)
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
                if what == "merged GeoPackage":
                    raise OutputError(f"the {what} {os.fspath(path)} is the scene {other}: it "
                                      "would be destroyed; give another $vector_merge path",
                                      options=["vector_merge"])
                raise OutputError(f"the {what} {os.fspath(path)} is the scene {other}: it "
                                  "would be destroyed; give an output folder other than the "
                                  "input folder, or a $pattern that does not match the "
                                  "outputs", options=["pattern"])
            raise OutputError(f"the {role} and the {what} are the same file ({other})")
        for k in keys:
            seen[k] = (what, os.fspath(path))


def merge_vectors(result: BatchSummary, path: str | os.PathLike[str], *, overwrite: bool,
                  quiet: bool, **vector_options: Any) -> Path:
    """Polygons of every scene with an output into one GeoPackage (``scene`` attribute)."""
    from ..vectorize import GeoPackageWriter, vectorize_raster

    scenes = [s for s in result.scenes if s.status in ("done", "skipped")
              and Path(s.output).exists()]
    with GeoPackageWriter(path, overwrite) as writer:
        for s in tqdm(scenes, unit="scene", desc="vectorize", disable=True if quiet else None):
            vectorize_raster(s.output, writer, scene=Path(scene_name(s.scene)).stem,
                             **vector_options)
    return Path(path)


def _run_batch(scenes: list[str], out: Path, ref: str | Model, distributed: bool,
               settings: SceneSettings, *, quiet: bool, after: AfterHook | None,
               scheduler: str | None, workers: int | None, retries: int,
               client: Any) -> BatchSummary:
    manifest = Manifest(out / MANIFEST_NAME, options_fingerprint(ref, settings))
    result = BatchSummary(manifest_path=str(manifest.path))
    done: dict[str, SceneResult] = {}
    jobs: list[Job] = []
    order: list[str] = []
    for scene in scenes:
        target = output_for(scene, out)
        key = scene_name(scene)
        order.append(key)
        # an output of ours made with other options is redone (replaced without overwrite);
        # an existing output this batch did not write is kept unless overwrite; one that
        # does not exist yet (nor its polygons) may be replaced by a retry (an earlier
        # attempt wrote it)
        ours = manifest.ours(key, target)
        exists = target.exists()
        if manifest.finished(key, target) or (exists and not settings.overwrite and not ours):
            done[key] = SceneResult(scene, str(target), "skipped")
            continue
        fresh = not exists and not (settings.vector and target.with_suffix(".gpkg").exists())
        jobs.append(Job(key, scene, str(target.resolve()),
                        replace=(ours or fresh) and not settings.overwrite))
    with contextlib.ExitStack() as stack:
        cl = None
        if jobs and distributed:  # connect first: a wrong address must not touch OUT_DIR
            from .cluster import dask_client

            cl = stack.enter_context(dask_client(scheduler, workers, client=client,
                                                 retries=retries, quiet=quiet))
            result.dashboard = _dashboard(cl, quiet)
        elif jobs:
            if settings.tune_process:
                from ..tuning import tune_process

                tune_process()
            if not isinstance(ref, Model):
                ref = load_model(ref, settings.options.device)
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
            from .cluster import run_on_cluster

            run_on_cluster(cl, jobs, tracker, model=str(ref), settings=settings,
                           retries=retries, after=after)
        elif jobs:
            run_here(jobs, tracker, ref, settings, retries, after)  # type: ignore[arg-type]
    done.update(tracker.results)
    result.scenes = [done[k] for k in order if k in done]
    result.summary_path = str(write_summary(result, out))
    return result


def _dashboard(client: Any, quiet: bool) -> str | None:
    from .cluster import dashboard_address

    link = dashboard_address(client)
    if link and not quiet:
        tqdm.write(f"Dask dashboard: {link}", file=sys.stderr)
    return link

"""The Dask runner: one task per scene of a batch, on a local or an existing cluster.

* :func:`dask_client` connects to ``tcp://host:port`` (any Dask deployment: dask-scheduler +
  dask-worker, Kubernetes, SLURM through dask-jobqueue, ...) or starts a ``LocalCluster`` of
  N single-threaded worker processes on this machine.
* :func:`refine_task` runs on a worker: it loads the model once per worker process
  (:func:`worker_model`, on the worker's own GPU when it has one and ``device="auto"``),
  removes leftovers of a dead earlier attempt and refines the scene with atomic output.
* :func:`run_on_cluster` runs on the client: it submits the tasks, keeps the manifest and the
  progress bar up to date, and retries scenes whose worker died or that failed for a
  transient reason, up to ``retries`` times. User errors (a corrupt file) and other
  deterministic errors are not retried (:func:`idgbr_geo.batch.jobs.is_transient`).

Every worker must have idgbr-geo installed and see the inputs, the output folder and the
model card (or have the bundled model) under the same paths as the client.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import queue
import re
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import UserError
from ..interfaces import Model
from ..registry import load_model
from .jobs import (
    AfterHook,
    Job,
    SceneResult,
    SceneSettings,
    Tracker,
    error_line,
    is_transient,
    process_scene,
)

#: structured-event topic on which workers say "scene X started here"
TOPIC = "idgbr-geo-batch"

_MODELS: dict[tuple[str, str], Model] = {}
_MODEL_LOCK = threading.Lock()
_LOADS = {"count": 0}


def worker_model(model: str, device: str = "auto") -> Model:
    """The model for this worker process, loaded on first use and kept (one load per worker
    and model; ``device="auto"`` picks this worker's GPU when it has one)."""
    key = (model, device)
    with _MODEL_LOCK:
        if key not in _MODELS:
            if len(_MODELS) >= 2:  # a long-lived worker serving many batches: keep it bounded
                _MODELS.pop(next(iter(_MODELS)))
            _MODELS[key] = load_model(model, device)
            _LOADS["count"] += 1
        return _MODELS[key]


def preload_model(model: str, device: str = "auto") -> str:
    """Load the model into this worker's cache now (``client.run(preload_model, ref)`` warms
    every worker); return the device it landed on."""
    from .. import engine  # noqa: F401 - the first scene should not pay for the import either

    return str(worker_model(model, device).device)


def model_loads() -> int:
    """How many times this process loaded a model (``client.run(model_loads)`` in tests)."""
    return _LOADS["count"]


def _worker_address() -> str | None:
    try:
        from distributed import get_worker

        return get_worker().address
    except ValueError:  # not running on a worker
        return None


def refine_task(run_id: str, job: Job, model: str, settings: SceneSettings,
                after: AfterHook | None = None) -> SceneResult:
    """One scene on a worker. Never raises for the scene's own errors (loading the model
    included): they come back as a failed :class:`SceneResult`, ``retryable`` only when
    transient."""
    address = _worker_address()
    if address is not None:
        from distributed import get_worker

        get_worker().log_event(TOPIC, {"run": run_id, "key": job.key, "worker": address,
                                       "pid": os.getpid()})
    try:
        if settings.tune_process:
            from ..tuning import tune_process

            tune_process()
        m = worker_model(model, settings.options.device)
    except Exception as exc:  # e.g. a card the worker cannot read: the scene's failure
        return SceneResult(job.scene, job.output, "failed", error=error_line(exc),
                           worker=address, retryable=is_transient(exc))
    res = process_scene(job.scene, job.output, m, job.settings(settings), after=after)
    res.worker = address
    return res


@contextmanager
def dask_client(scheduler: str | None = None, workers: int | None = None, *,
                client: Any = None, threads_per_worker: int = 1,
                dashboard_address: str | None = ":8787", retries: int = 2,
                quiet: bool = False) -> Iterator[Any]:
    """A ``distributed.Client``: the one given, one connected to ``scheduler``, or one on a new
    ``LocalCluster`` of ``workers`` processes (closed again on exit; a given client is not).

    The local cluster's scheduler lets a task outlive ``retries`` dead workers (its
    ``allowed-failures``), like :func:`run_on_cluster` does for other failures. Connecting
    gives up after Dask's ``distributed.comm.timeouts.connect`` (30 s unless configured, e.g.
    ``DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT=5s``).
    """
    import dask
    from distributed import Client, LocalCluster

    if client is not None:
        yield client
        return
    if scheduler and workers:
        raise UserError("give either $scheduler or $workers, not both",
                        options=["scheduler", "workers"])
    if scheduler:
        try:
            cl = Client(scheduler)
        except (OSError, TimeoutError, ValueError) as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"cannot reach the Dask scheduler at {scheduler} ({msg})") from None
        try:
            if not quiet and not cl.scheduler_info().get("workers"):
                from tqdm import tqdm

                tqdm.write(f"Dask scheduler {scheduler} has no workers yet: scenes wait for "
                           "workers to join")
            yield cl
        finally:
            cl.close()
        return
    if not workers or workers < 1:
        raise UserError("$workers must be 1 or more", options=["workers"])
    # Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which makes glibc mmap
    # and unmap every large array: 2.4x slower scenes here (benchmarks/batch.py). Unset it.
    with dask.config.set({"distributed.scheduler.allowed-failures": retries,
                          "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        cluster = LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker,
                               processes=True, host="127.0.0.1",
                               dashboard_address=dashboard_address,
                               silence_logs=logging.ERROR if quiet else logging.WARNING)
    try:
        with Client(cluster) as cl:
            yield cl
    finally:
        _close_workers_first(cluster)
        cluster.close()


def _close_workers_first(cluster: Any) -> None:
    """Stop a local cluster's workers (through their nannies) while its scheduler still runs:
    a worker whose heartbeat finds the scheduler gone logs a traceback on the terminal."""
    import asyncio

    async def close_all() -> None:
        await asyncio.gather(*(w.close() for w in list(cluster.workers.values())),
                             return_exceptions=True)

    try:
        cluster.sync(close_all)
    except (OSError, TimeoutError, RuntimeError):  # going anyway: close() cleans up
        pass


def dashboard_address(client: Any) -> str | None:
    """The dashboard link when the scheduler serves one, else None."""
    try:
        services = client.scheduler_info().get("services", {})
    except (OSError, AttributeError):
        return None
    if "dashboard" not in services:
        return None
    link = client.dashboard_link
    if importlib.util.find_spec("bokeh") is None:
        link += " (the dashboard needs bokeh>=3.1 where the scheduler runs)"
    return link


def _task_key(run_id: str, job: Job, attempt: int) -> str:
    return f"idgbr-refine-{re.sub(r'[^A-Za-z0-9_.]', '_', job.key)}-{run_id[:8]}-{attempt}"


def run_on_cluster(client: Any, jobs: list[Job], tracker: Tracker, *, model: str,
                   settings: SceneSettings, retries: int = 2,
                   after: AfterHook | None = None) -> None:
    """Submit one task per job and follow them to the end, reporting to ``tracker``.

    A scene is attempted at most ``1 + retries`` times, counting each start on a worker
    (including the scheduler's own re-runs after a worker died) and each submission. A task
    that raised a deterministic error (not :func:`~idgbr_geo.batch.jobs.is_transient`, e.g. a
    result or argument that cannot be unpickled) fails at once: it would fail again.
    """
    from distributed.scheduler import KilledWorker

    run_id = uuid.uuid4().hex
    inbox: queue.Queue = queue.Queue()
    by_key = {j.key: j for j in jobs}
    submits: dict[str, int] = {}
    starts: dict[str, int] = {}
    live: dict[str, Any] = {}  # job key -> its current future
    budget = 1 + retries

    def submit(job: Job) -> None:
        submits[job.key] = submits.get(job.key, 0) + 1
        fut = client.submit(refine_task, run_id, job, model, settings, after,
                            key=_task_key(run_id, job, submits[job.key]), pure=False)
        live[job.key] = fut
        fut.add_done_callback(lambda f, k=job.key: inbox.put(("done", k, f)))

    def attempts(key: str) -> int:
        return max(starts.get(key, 0), submits.get(key, 0))

    def fail(job: Job, error: str) -> None:
        live.pop(job.key, None)
        tracker.finish(job, SceneResult(job.scene, job.output, "failed", error=error,
                                        attempts=attempts(job.key)))

    def retry_or_fail(job: Job, error: str) -> None:
        if attempts(job.key) < budget:
            submit(job)
        else:
            fail(job, f"{error} (after {attempts(job.key)} attempts)")

    client.subscribe_topic(TOPIC, lambda event: inbox.put(("start", event[1])))
    try:
        for job in jobs:
            submit(job)
        while live:
            try:
                kind, *rest = inbox.get(timeout=1.0)
            except queue.Empty:
                continue
            if kind == "start":
                msg = rest[0]
                key = msg.get("key") if isinstance(msg, dict) else None
                if msg.get("run") != run_id or key not in live:
                    continue
                starts[key] = starts.get(key, 0) + 1
                tracker.running(by_key[key], attempts(key), msg.get("worker"))
                if starts[key] > budget:  # the scheduler keeps re-running a worker killer
                    live[key].cancel()
                    fail(by_key[key], "its worker died on every attempt")
                continue
            key, fut = rest
            if live.get(key) is not fut:
                continue  # a superseded or cancelled attempt
            job = by_key[key]
            if fut.status == "finished":
                try:
                    res: SceneResult = fut.result()
                except Exception as exc:  # noqa: BLE001 - e.g. a result that cannot unpickle
                    if is_transient(exc):
                        retry_or_fail(job, error_line(exc))
                    else:
                        fail(job, error_line(exc))
                    continue
                res.attempts = attempts(key)
                if res.status == "failed" and res.retryable and res.attempts < budget:
                    submit(job)
                    continue
                live.pop(key)
                tracker.finish(job, res)
            elif fut.status == "error":
                exc = fut.exception()
                if isinstance(exc, KilledWorker):
                    retry_or_fail(job, "its worker died while processing it (KilledWorker)")
                elif is_transient(exc):
                    retry_or_fail(job, error_line(exc))
                else:
                    fail(job, error_line(exc))
            else:  # cancelled by someone else (a cluster restart, a lost scheduler)
                retry_or_fail(job, f"task {fut.status}")
    finally:
        for fut in live.values():
            fut.cancel()
        try:
            client.unsubscribe_topic(TOPIC)
        except (OSError, KeyError, ValueError):
            pass

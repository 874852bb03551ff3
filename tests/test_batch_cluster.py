"""`idgbr-geo batch` on a real Dask LocalCluster (2 worker processes on loopback): a killed
worker, a corrupt scene, resume from the manifest, URL inputs, and outputs that equal the
single-process engine's bit for bit."""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import rasterio
from synth import conv_model, synthetic_scene, write_raster
from worker_faults import KillWorkerOnce

from idgbr_geo.batch import MANIFEST_NAME, batch_lock, run_batch
from idgbr_geo.batch import cluster as dist
from idgbr_geo.engine import refine_raster
from idgbr_geo.errors import UserError
from idgbr_geo.options import RunOptions

SHAPES = {"s0": (120, 150), "s1": (96, 200), "s2": (140, 110), "s3-kill-worker": (260, 230)}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return conv_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def marker(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hook") / "killed-once"


@pytest.fixture(scope="module")
def client(marker):
    """A LocalCluster of 2 single-threaded worker processes, with a plugin that kills the
    worker running the first ``*kill-worker*`` scene mid-way (worker_faults.KillWorkerOnce)."""
    with dist.dask_client(workers=2, dashboard_address=None, retries=2, quiet=True) as cl:
        cl.register_plugin(KillWorkerOnce(marker))
        yield cl


@pytest.fixture(scope="module")
def scenes(tmp_path_factory, model) -> tuple[Path, Path]:
    """Input folder (4 good scenes and a corrupt one) and single-process reference outputs."""
    ind, ref = tmp_path_factory.mktemp("in"), tmp_path_factory.mktemp("ref")
    for i, (name, (h, w)) in enumerate(SHAPES.items()):
        write_raster(ind / f"{name}.tif", synthetic_scene(h, w, seed=i))
        refine_raster(ind / f"{name}.tif", ref / f"{name}.tif", model=model, quiet=True,
                      options=RunOptions(device="cpu"))
    (ind / "broken.tif").write_bytes(b"II*\x00 this is not a GeoTIFF")
    return ind, ref


def assert_same_raster(a: Path, b: Path) -> None:
    with rasterio.open(a) as x, rasterio.open(b) as y:
        assert np.array_equal(x.read(), y.read()), f"{a.name} differs from the reference"
        assert x.crs == y.crs and x.transform == y.transform and x.tags() == y.tags()


def partials(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".partial-" in p.name]


def manifest(folder: Path) -> dict[str, dict]:
    return json.loads((folder / MANIFEST_NAME).read_text())["scenes"]


@pytest.mark.slow
def test_killed_worker_corrupt_scene_resume(tmp_path, client, scenes, model, marker):
    ind, ref = scenes
    out = tmp_path / "out"
    out.mkdir()
    res = run_batch(ind, out, model=model, client=client, retries=2, quiet=True)

    by = {Path(s.scene).name: s for s in res.scenes}
    assert {k: s.status for k, s in by.items()} == {
        "broken.tif": "failed", "s0.tif": "done", "s1.tif": "done", "s2.tif": "done",
        "s3-kill-worker.tif": "done"}
    # the corrupt scene: its own error, recorded, not retried
    assert "not a readable raster" in by["broken.tif"].error
    assert by["broken.tif"].attempts == 1 and not by["broken.tif"].retryable
    # the worker running this scene died after writing part of its output; a second attempt
    # removed the leftover partial file and finished it
    assert marker.exists()
    kill = by["s3-kill-worker.tif"]
    assert kill.attempts == 2 and kill.cleaned >= 1, kill
    # (a scene that finished on the killed worker before its result was gathered is run
    # again by the scheduler: a second attempt, which may replace the output it wrote)
    assert all(s.attempts in (1, 2) for n, s in by.items() if n != "s3-kill-worker.tif")
    assert all(re.fullmatch(r"tcp://127\.0\.0\.1:\d+", s.worker) for s in res.scenes)
    for name in SHAPES:
        assert_same_raster(out / f"{name}.tif", ref / f"{name}.tif")
    assert partials(out) == [] and not (out / "broken.tif").exists()
    # each worker process loaded the model at most once (the killed one was replaced)
    assert all(n <= 1 for n in client.run(dist.model_loads).values())
    man = manifest(out)
    assert {k: e["state"] for k, e in man.items()} == {k: s.status for k, s in by.items()}
    assert man["s3-kill-worker.tif"]["attempts"] == 2
    assert "not a readable raster" in man["broken.tif"]["error"]

    # a crash mid-way through s1 in an earlier run: manifest says running, a partial is left
    (out / "s1.tif").unlink()
    (out / ".s1.partial-deadbeef.tif").write_bytes(b"half")
    doc = json.loads((out / MANIFEST_NAME).read_text())
    doc["scenes"]["s1.tif"]["state"] = "running"
    (out / MANIFEST_NAME).write_text(json.dumps(doc))
    stamps = {n: (out / f"{n}.tif").stat().st_mtime_ns for n in ("s0", "s2", "s3-kill-worker")}
    # re-running the same command (even with --overwrite) redoes only the unfinished scenes
    res = run_batch(ind, out, model=model, client=client, quiet=True, overwrite=True)
    by = {Path(s.scene).name: s for s in res.scenes}
    assert {k: s.status for k, s in by.items()} == {
        "broken.tif": "failed", "s0.tif": "skipped", "s1.tif": "done",
        "s2.tif": "skipped", "s3-kill-worker.tif": "skipped"}
    assert by["s1.tif"].cleaned == 1 and partials(out) == []
    assert_same_raster(out / "s1.tif", ref / "s1.tif")
    assert stamps == {n: (out / f"{n}.tif").stat().st_mtime_ns for n in stamps}
    assert manifest(out)["s1.tif"]["state"] == "done"

    # other options invalidate finished scenes: outputs this batch wrote are redone with the
    # new seed, no --overwrite needed (they are ours; tests/test_batch.py has the rest)
    res = run_batch(ind, out, model=model, client=client, quiet=True, pattern="s[01].tif",
                    options=RunOptions(seed=1))
    assert res.counts() == {"done": 2}
    with rasterio.open(out / "s0.tif") as ds:
        assert ds.tags()["IDGBR_SEED"] == "1"


def test_deterministic_errors_not_retried_on_dask(tmp_path, client, scenes, model):
    """Any exception of a scene (here a bug in the ``after`` hook, on the worker) is that
    scene's failure, once: it would fail the same way on every retry."""
    ind, _ = scenes

    def after(scene: Path, output: Path) -> None:
        if output.name == "s0.tif":
            raise TypeError("a bug in the hook\nmore")

    res = run_batch(ind, tmp_path, model=model, client=client, quiet=True, retries=2,
                    pattern="s[02].tif", after=after)
    by = {Path(s.scene).name: s for s in res.scenes}
    assert by["s2.tif"].status == "done"
    s0 = by["s0.tif"]
    assert (s0.status, s0.attempts, s0.retryable) == ("failed", 1, False), s0
    assert s0.error == "TypeError: a bug in the hook"
    assert manifest(tmp_path)["s0.tif"]["state"] == "failed"


def test_task_error_not_retried(tmp_path, client, scenes, model, monkeypatch):
    """A task that raises a deterministic error itself (not as a failed SceneResult): the
    scene fails after one submission; a transient one is retried."""
    from idgbr_geo.batch import Job, Manifest, SceneSettings, Tracker

    ind, _ = scenes

    def raising(run_id, job, *args):  # pickled by value: the workers run this one
        raise (TypeError("a bug") if job.key == "bug" else OSError("a network hiccup"))

    monkeypatch.setattr(dist, "refine_task", raising)
    tracker = Tracker(Manifest(tmp_path / MANIFEST_NAME, "x"), 2, quiet=True)
    jobs = [Job(k, str(ind / "s0.tif"), str(tmp_path / f"{k}.tif")) for k in ("bug", "io")]
    dist.run_on_cluster(client, jobs, tracker, model=str(model), settings=SceneSettings(),
                        retries=2)
    bug, io = tracker.results["bug"], tracker.results["io"]
    assert (bug.status, bug.attempts, bug.error) == ("failed", 1, "TypeError: a bug"), bug
    assert (io.status, io.attempts) == ("failed", 3), io
    assert io.error == "OSError: a network hiccup (after 3 attempts)"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_scenes_from_an_http_server(tmp_path, client, scenes, model):
    """IN_DIR given as a URL: the client lists it with fsspec, workers read it with GDAL."""
    ind, ref = scenes
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(ind)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        res = run_batch(url, tmp_path, model=model, client=client, quiet=True,
                        pattern="s[02].tif")
    finally:
        server.shutdown()
        server.server_close()
    assert res.counts() == {"done": 2}, res.scenes
    assert all(s.scene.startswith("http://127.0.0.1:") for s in res.scenes)
    for name in ("s0", "s2"):
        assert_same_raster(tmp_path / f"{name}.tif", ref / f"{name}.tif")


def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-c", "from idgbr_geo.cli import main; main()", *args],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, **(env or {})})
    return p.returncode, p.stderr


@pytest.mark.slow
def test_cli_local_cluster(tmp_path, model):
    ind, out = tmp_path / "in", tmp_path / "out"
    ind.mkdir()
    out.mkdir()
    for i in range(2):
        write_raster(ind / f"s{i}.tif", synthetic_scene(80, 90, seed=i))
    (ind / "broken.tif").write_text("not a raster")
    code, err = run_cli("batch", str(ind), str(out), "--model", str(model), "--workers", "2")
    assert code == 1, err
    assert re.search(r"Dask dashboard: http://127\.0\.0\.1:\d+/status", err), err
    assert "2 done, 1 failed" in err and "Traceback" not in err
    assert re.search(r"Failed: .*broken\.tif: .*not a readable raster", err)
    assert (out / "s0.tif").exists() and (out / "s1.tif").exists()
    states = {k: e["state"] for k, e in manifest(out).items()}
    assert states == {"s0.tif": "done", "s1.tif": "done", "broken.tif": "failed"}


def test_cli_cluster_errors(tmp_path, model):
    import dask
    from click.testing import CliRunner

    from idgbr_geo.cli import main

    ind, out = tmp_path / "in", tmp_path / "out"
    ind.mkdir()
    out.mkdir()
    write_raster(ind / "a.tif", synthetic_scene(40, 40))
    for extra, must in ((["--scheduler", "tcp://127.0.0.1:9", "--workers", "2"], "not both"),
                        (["--scheduler", "tcp://127.0.0.1:9"], "cannot reach the dask scheduler")):
        with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
            res = CliRunner().invoke(main, ["batch", str(ind), str(out), "--model", str(model),
                                            *extra])
        assert res.exit_code == 2, res.output
        lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and must in lines[0].lower(), res.stderr
    assert sorted(p.name for p in out.iterdir()) == []


def test_one_batch_per_output_folder(tmp_path, model):
    """A second batch into the same folder would redo the first one's scenes: refused."""
    write_raster(tmp_path / "a.tif", synthetic_scene(40, 40))
    out = tmp_path / "out"
    out.mkdir()
    with batch_lock(out):
        with pytest.raises(UserError, match="another idgbr-geo batch is writing"):
            run_batch(tmp_path, out, model=model, quiet=True)
    assert run_batch(tmp_path, out, model=model, quiet=True).counts() == {"done": 1}
    assert sorted(p.name for p in out.iterdir()) == [
        "a.tif", "idgbr_batch_summary.json", "idgbr_manifest.json"]


def test_transient_errors_retried_user_errors_not(tmp_path, model, monkeypatch):
    """In-process too: an OSError (a network file system hiccup) is retried, a user error is
    recorded once; --retries 0 gives up at once."""
    import idgbr_geo.engine as engine

    ind, out = tmp_path / "in", tmp_path / "out"
    ind.mkdir()
    out.mkdir()
    for name in ("flaky", "fine"):
        write_raster(ind / f"{name}.tif", synthetic_scene(50, 60))
    (ind / "junk.tif").write_text("junk")
    real, calls = engine.refine_raster, {"n": 0}

    def flaky(input, output, **kw):
        if "flaky" in str(input) and calls["n"] == 0:
            calls["n"] += 1
            Path(output).with_name(".flaky.partial-0000.tif").write_bytes(b"half")
            raise OSError("stale NFS file handle")
        return real(input, output, **kw)

    monkeypatch.setattr(engine, "refine_raster", flaky)
    res = run_batch(ind, out, model=model, quiet=True, retries=1)
    by = {Path(s.scene).stem: s for s in res.scenes}
    assert (by["flaky"].status, by["flaky"].attempts, by["flaky"].cleaned) == ("done", 2, 1)
    assert (by["junk"].status, by["junk"].attempts) == ("failed", 1)
    assert by["fine"].attempts == 1 and partials(out) == []
    calls["n"] = 0
    (out / "flaky.tif").unlink()
    res = run_batch(ind, out, model=model, quiet=True, retries=0, pattern="flaky.tif")
    assert res.scenes[0].status == "failed" and "stale NFS" in res.scenes[0].error
    assert manifest(out)["flaky.tif"]["state"] == "failed"


def test_local_cluster_closes_its_workers_before_its_scheduler(monkeypatch):
    """A worker that outlives the scheduler logs a heartbeat traceback on the user's terminal
    (seen once in CI under load): `dask_client` stops the workers while the scheduler runs."""
    seen: list[int] = []
    real = dist._close_workers_first

    def spy(cluster):
        real(cluster)
        assert cluster.scheduler.status.name == "running"
        seen.append(len(cluster.scheduler.workers))

    monkeypatch.setattr(dist, "_close_workers_first", spy)
    with dist.dask_client(workers=2, dashboard_address=None, quiet=True) as cl:
        assert len(cl.scheduler_info()["workers"]) == 2
    assert seen == [0]

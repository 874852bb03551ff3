"""Batch throughput in-process and on a local Dask cluster of 1..N workers.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/batch.py --scenes 8 --size 1024

Generates ``--scenes`` synthetic georeferenced RGB scenes of ``--size``² pixels in a temporary
folder and refines them with ``--model`` (default: the bundled ``buildings`` model when
``idgbr_geo/models/buildings.json`` exists, else the same architecture with random weights,
which costs the same compute per window; ``--model toy`` is a single fixed convolution). Each
Dask row starts a LocalCluster (single-threaded worker processes), warms it up on two small
scenes (imports and the per-worker model load), then times the batch alone; cluster start-up and
warm-up are reported separately, with the CPU seconds the batch used (this process, or the sum
over the workers) and so how many cores it actually got on a shared machine. Prints a markdown
table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import psutil  # noqa: E402
import torch  # noqa: E402

TESTS = str(Path(__file__).resolve().parent.parent / "tests")
sys.path.insert(0, TESTS)
# the toy model's architectures live in tests/toy_models.py: Dask workers import them too
os.environ["PYTHONPATH"] = os.pathsep.join(
    [TESTS, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
os.environ.setdefault("IDGBR_GEO_ARCHITECTURES", "toy_models")

from synth import conv_model, synthetic_scene, write_raster  # noqa: E402

from idgbr_geo.batch import model_reference, run_batch  # noqa: E402
from idgbr_geo.batch.cluster import dask_client, preload_model  # noqa: E402
from idgbr_geo.options import RunOptions  # noqa: E402
from idgbr_geo.registry import bundled_models  # noqa: E402


def make_scenes(folder: Path, n: int, size: int) -> float:
    """Write ``n`` scenes; return their total megapixels."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_raster(folder / f"scene{i:03d}.tif", synthetic_scene(size, size, seed=i),
                     tiled=True, blockxsize=256, blockysize=256, compress="deflate")
    return n * size * size / 1e6


def random_idgbr_model(folder: Path, bands: int = 3) -> str:
    """The bundled models' architecture (idgbr-coarse + idgbr-refiner) with random weights:
    the same compute per window as a trained model, no training needed."""
    from idgbr_geo.cards import ModelCard, Normalization
    from idgbr_geo.config import CoarseConfig, RefinerConfig, SamplingConfig
    from idgbr_geo.networks import build_coarse_net, build_refiner_net
    from idgbr_geo.registry import save_model

    torch.manual_seed(0)
    shape = {"in_channels": bands, "num_classes": 2}
    coarse = build_coarse_net(CoarseConfig(), **shape)
    with torch.no_grad():  # loud random head: the coarse map has boundaries to refine
        coarse.head.weight.mul_(50.0)
        if coarse.head.bias is not None:
            coarse.head.bias.zero_()
    tensors = {f"segmentor.{k}": v for k, v in coarse.state_dict().items()}
    tensors |= {f"refiner.{k}": v
                for k, v in build_refiner_net(RefinerConfig(), **shape).state_dict().items()}
    card = ModelCard(name="random-idgbr", classes=["background", "building"], bands=bands,
                     band_names=[f"b{i}" for i in range(bands)],
                     normalization=Normalization(mean=[0.3] * bands, std=[0.2] * bands),
                     gsd=0.3, tile_size=512, overlap=64, sampling=SamplingConfig(steps=4),
                     stride_multiple=32,
                     segmentor={"arch": "idgbr-coarse", "config": {}},
                     refiner={"arch": "idgbr-refiner", "config": {}})
    return str(save_model(card, tensors, folder))


def pick_model(choice: str | None, folder: Path) -> str:
    if choice not in (None, "random-idgbr", "toy"):
        return choice  # a bundled name or a card path
    if choice is None and "buildings" in bundled_models():
        return "buildings"
    if choice != "toy":
        try:
            return random_idgbr_model(folder)
        except ImportError as exc:
            print(f"random-idgbr model unavailable ({exc}); using the toy model",
                  file=sys.stderr)
    return str(conv_model(folder))


def cpu_seconds(client=None) -> float:
    """CPU time (user + system, all threads) of this process, or of all workers of ``client``."""
    if client is None:
        t = psutil.Process().cpu_times()
        return t.user + t.system
    return sum(client.run(cpu_seconds).values())


def timed_batch(ind: Path, out: Path, model: str, options: RunOptions,
                client=None) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one batch."""
    out.mkdir(parents=True)
    c0, t0 = cpu_seconds(client), time.perf_counter()
    # tune_process: each process that refines is tuned as `idgbr-geo batch` tunes it
    res = run_batch(ind, out, model=model, client=client, quiet=True, options=options,
                    tune_process=True)
    dt = time.perf_counter() - t0
    if res.failed:
        raise SystemExit(f"benchmark scene failed: {res.failed[0].error}")
    return dt, cpu_seconds(client) - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=8)
    ap.add_argument("--size", type=int, default=1024, help="scene width = height in pixels")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--model", help="model name or card path, 'random-idgbr' (the bundled "
                    "architecture, random weights) or 'toy' (one conv) [buildings if bundled, "
                    "else random-idgbr]")
    ap.add_argument("--steps", type=int, help="diffusion steps [card]")
    ap.add_argument("--no-inprocess", action="store_true", help="skip the in-process row")
    args = ap.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="idgbr-batch-bench-") as tmp:
        root = Path(tmp)
        model = pick_model(args.model, root / "model")
        mp = make_scenes(root / "in", args.scenes, args.size)
        make_scenes(root / "warm", 2, 256)
        options = RunOptions(device="cpu", steps=args.steps)
        rows: list[tuple[str, int, float, float, tuple[float, float]]] = []
        if not args.no_inprocess:
            rows.append(("in-process", 1, 0.0, 0.0,
                         timed_batch(root / "in", root / "out-here", model, options)))
        for n in [int(v) for v in args.workers.split(",") if v.strip()]:
            t0 = time.perf_counter()
            with dask_client(workers=n, dashboard_address=None, quiet=True) as client:
                client.wait_for_workers(n)
                start = time.perf_counter() - t0
                # warm every worker (imports + the per-worker model load), then GDAL & co.
                t1 = time.perf_counter()
                ref = model_reference(model)
                client.run(preload_model, ref, "cpu")
                timed_batch(root / "warm", root / f"warm-{n}", model, options, client)
                warm = time.perf_counter() - t1
                wall = timed_batch(root / "in", root / f"out-{n}", model, options, client)
            rows.append(("dask LocalCluster", n, start, warm, wall))

    base = next((r[4][0] for r in rows if r[0] != "in-process" and r[1] == 1), rows[0][4][0])
    print(f"\n{args.scenes} scenes of {args.size}x{args.size} px ({mp:.1f} MP), model "
          f"{Path(model).stem}, torch threads per process: 1, CPU cores: {os.cpu_count()}\n")
    print("| mode | workers | cluster start s | warm-up s | batch s | scenes/s | MP/s "
          "| speed-up vs 1 worker | CPU s | cores used |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode, n, start, warm, (wall, cpu) in rows:
        print(f"| {mode} | {n} | {start:.1f} | {warm:.1f} | {wall:.1f} | "
              f"{args.scenes / wall:.2f} | {mp / wall:.2f} | {base / wall:.2f}x | {cpu:.1f} | "
              f"{cpu / wall:.2f} |")
    print(f"\nLoad average while running (1/5/15 min): {os.getloadavg()}")


if __name__ == "__main__":
    main()

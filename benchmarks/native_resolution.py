"""Refinement at the input's resolution: edge-aware (guided) vs bilinear upsampling.

    OMP_NUM_THREADS=1 python benchmarks/native_resolution.py [--data DIR] [--scenes 8]
        [--extra 8] [--radius 4,6] [--eps 1e-4,1e-3] [--guide grey,colour] [--coarse-only]

Refines Banepa drone scenes of the buildings-oam set (the validation area: 1024 px mosaics at
0.066 m and ``banepa-extra/`` 512 px tiles at 0.132 m, 3.8x and 1.9x finer than the bundled
0.25 m ``buildings`` model) through :func:`idgbr_geo.engine.refine_raster`, once with the
engine's bilinear upsampling of each window's probabilities (``engine._JOINT_UPSAMPLING =
False``) and once per guided-filter setting (:mod:`idgbr_geo.upsampling`: ``RADIUS`` in model
pixels, capped by :func:`~idgbr_geo.upsampling.radius_for` as the engine does: shown
``r=8->7``; ``EPS``; grey or colour guide), and scores the class rasters against the masks in
native pixels with :class:`idgbr_geo.metrics.MetricAccumulator` (pooled over the scenes of
each subset): IoU of the building class and boundary F at 2 px. Seconds are the mean
``refine_raster`` wall time per scene (model loaded once, warmed up). Without ``--radius``,
``--eps`` or ``--guide`` the module's defaults are measured.

Measured with the bundled model (8 mosaics + 48 tiles, one thread, refined; mosaics | tiles):

    upsampling                   IoU    BF@2  s/scene |  IoU    BF@2  s/scene
    bilinear                    0.3987 0.1105  0.124  | 0.4694 0.2199  0.075
    guided r=4 eps=1e-3 grey    0.4011 0.1491  0.129  | 0.4700 0.2963  0.084
    guided r=6 eps=1e-3 grey    0.3994 0.1499  0.126  | 0.4689 0.3072  0.081
    guided r=4 eps=1e-3 colour  0.4033 0.1491  0.148  | 0.4706 0.2976  0.101
    guided r=6 eps=1e-3 colour  0.4044 0.1527  0.156  | 0.4704 0.3122  0.100

and the coarse map alone (``--coarse-only``): bilinear 0.3831 0.0832 | 0.4498 0.1594, guided
r=6 colour 0.3856 0.1327 | 0.4474 0.2420, grey 0.3807 0.1311 | 0.4436 0.2413.

The data are read where they lie (``--data``, default ``$IDGBR_BUILDINGS_OAM`` or
/work/shared/data/buildings-oam) and never copied; nothing is written outside a temporary
folder. Without the folder the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio

DEFAULT_DATA = os.environ.get("IDGBR_BUILDINGS_OAM", "/work/shared/data/buildings-oam")


def scenes(data: Path, mosaics: int, extra: int) -> list[tuple[str, Path, Path]]:
    """(subset, image, mask) of the first ``mosaics`` 0.066 m mosaics and ``extra`` 0.132 m
    tiles of Banepa, in index order."""
    out: list[tuple[str, Path, Path]] = []
    counts = {"mosaic": 0, "extra": 0}
    with open(data / "index.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row["area"] != "banepa":
                continue
            subset = "extra" if row["file"].startswith("banepa-extra/") else "mosaic"
            if counts[subset] >= (extra if subset == "extra" else mosaics):
                continue
            counts[subset] += 1
            out.append((subset, data / row["file"], data / row["mask"]))
    return out


def run(config: dict, items, model, tmp: Path, coarse_only: bool) -> dict:
    """Refine every scene with one upsampling setting; pooled metrics per subset."""
    from idgbr_geo import engine, upsampling
    from idgbr_geo.metrics import MetricAccumulator
    from idgbr_geo.options import RunOptions

    engine._JOINT_UPSAMPLING = config["guided"]
    upsampling.RADIUS = config.get("radius", upsampling.RADIUS)
    upsampling.EPS = config.get("eps", upsampling.EPS)
    upsampling.COLOUR = config.get("colour", upsampling.COLOUR)
    accs: dict[str, MetricAccumulator] = {}
    secs: dict[str, list[float]] = {}
    opts = RunOptions(device="cpu", coarse_only=coarse_only)
    for subset, image, mask in items:
        out = tmp / "out.tif"
        t = time.perf_counter()
        engine.refine_raster(image, out, model=model, options=opts, overwrite=True, quiet=True)
        secs.setdefault(subset, []).append(time.perf_counter() - t)
        with rasterio.open(out) as p, rasterio.open(mask) as m:
            pred, truth = p.read(1), m.read(1)
        acc = accs.setdefault(subset, MetricAccumulator(["background", "building"]))
        acc.update(pred, truth)
    res = {}
    for subset, acc in accs.items():
        r = acc.result()
        res[subset] = (r["iou"]["building"], r["boundary_f"]["2"]["building"],
                       float(np.mean(secs[subset])))
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--scenes", type=int, default=8, help="0.066 m mosaics (at most 8)")
    ap.add_argument("--extra", type=int, default=8, help="0.132 m tiles (at most 48)")
    ap.add_argument("--radius", help="radii in model pixels, comma-separated")
    ap.add_argument("--eps", help="eps values, comma-separated")
    ap.add_argument("--guide", help="grey, colour or grey,colour")
    ap.add_argument("--coarse-only", action="store_true", help="score the coarse map")
    args = ap.parse_args(argv)
    data = Path(args.data)
    if not (data / "index.csv").is_file():
        print(f"no buildings-oam data at {data}: nothing to measure (give --data)")
        return 0
    import torch

    from idgbr_geo.registry import load_model

    items = scenes(data, args.scenes, args.extra)
    model = load_model("buildings", "cpu")
    configs: list[dict] = [{"name": "bilinear", "guided": False}]
    from idgbr_geo import upsampling

    radii = [int(v) for v in args.radius.split(",")] if args.radius else [upsampling.RADIUS]
    epss = [float(v) for v in args.eps.split(",")] if args.eps else [upsampling.EPS]
    guides = (args.guide.split(",") if args.guide
              else ["colour" if upsampling.COLOUR else "grey"])
    if not set(guides) <= {"grey", "colour"}:
        ap.error("--guide: grey and/or colour")
    for colour in (g == "colour" for g in guides):
        for r in radii:
            upsampling.RADIUS = r
            used = upsampling.radius_for(model.card.overlap)  # the engine caps it
            shown = f"{r}" if used == r else f"{r}->{used}"
            for e in epss:
                configs.append({"name": f"guided r={shown} eps={e:g} "
                                        f"{'colour' if colour else 'grey'}",
                                "guided": True, "radius": r, "eps": e, "colour": colour})
    n = {s: sum(1 for it in items if it[0] == s) for s in ("mosaic", "extra")}
    print(f"{n['mosaic']} mosaics (0.066 m, 3.8x) + {n['extra']} tiles (0.132 m, 1.9x); "
          f"model buildings (0.25 m); {'coarse only' if args.coarse_only else 'refined'}; "
          f"torch threads {torch.get_num_threads()}")
    subsets = [s for s in ("mosaic", "extra") if n[s]]
    head = f"{'upsampling':<34}" + "".join(
        f"| {s + ' IoU':>11} {'BF@2':>7} {'s/scene':>8} " for s in subsets)
    print(head)
    print("-" * len(head))
    with tempfile.TemporaryDirectory() as tmp:
        run(configs[0], items[:1], model, Path(tmp), args.coarse_only)  # warm-up
        for cfg in configs:
            res = run(cfg, items, model, Path(tmp), args.coarse_only)
            print(f"{cfg['name']:<34}" + "".join(
                f"| {res[s][0]:>11.4f} {res[s][1]:>7.4f} {res[s][2]:>8.3f} " for s in subsets),
                flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

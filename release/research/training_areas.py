"""Research: does a card choice hold on the drone mosaics of the training towns too?

A choice seen on one held-out town (Banepa) may be that town's. The OAM training towns
(Zanzibar, Nairobi: native 0.074 m mosaics, georeferenced in EPSG:3857) are other drone
imagery the same rule can be tried on. Every card sees them equally (the models learned from
chips of them, downsampled to 0.15 m), so absolute scores are optimistic, but a difference
between two cards of the same weights is still a difference of the rule. Each mosaic runs
through ``refine_raster`` coarse-only with each ``--model`` card as it lies (no copy: the
files are read where they are), scored against its mask with
:func:`idgbr_geo.evaluate.score_scene`, pooled per town; the working GSD picked is counted
too.

    OMP_NUM_THREADS=1 .venv/bin/python release/research/training_areas.py \
        --model .train/s13/card-no-fine/buildings.json --model buildings --threads 1
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import torch

from idgbr_geo.engine import refine_raster
from idgbr_geo.evaluate import score_scene
from idgbr_geo.metrics import MetricAccumulator
from idgbr_geo.options import RunOptions
from idgbr_geo.registry import load_model

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "buildings-oam"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True,
                    help="bundled model name or card path (repeat to compare)")
    ap.add_argument("--areas", default="zanzibar,nairobi")
    ap.add_argument("--limit", type=int, default=None, help="at most N mosaics per area")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", default="bfloat16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    areas = args.areas.split(",")
    with open(DATA / "index.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["area"] in areas
                and r["subset"] == "z21-mosaic"]
    per_area: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        if args.limit is None or len(per_area[r["area"]]) < args.limit:
            per_area[r["area"]].append(r)
    print("| card | area | mosaics | coarse IoU | BF@2 | working GSD picked |")
    print("|---|---|---|---|---|---|")
    for spec in args.model:
        model = load_model(spec, "cpu")
        for area, chosen in per_area.items():
            acc = MetricAccumulator(model.card.classes)
            picked: Counter[str] = Counter()
            with tempfile.TemporaryDirectory() as tmp:
                for r in chosen:
                    out = Path(tmp) / "map.tif"
                    s = refine_raster(DATA / r["file"], out, model=model, quiet=True,
                                      overwrite=True,
                                      options=RunOptions(coarse_only=True, device="cpu",
                                                         model_workers=1,
                                                         precision=args.precision))
                    picked[f"{s.scale.gsd:g}" if s.scale else "-"] += 1
                    acc.merge(score_scene(out, DATA / r["mask"],
                                          classes=model.card.classes))
            res = acc.result()
            iou = res["iou"][model.card.classes[1]] * 100
            bf2 = res["boundary_f"]["2"][model.card.classes[1]] * 100
            picks = ", ".join(f"{g} m: {n}" for g, n in sorted(picked.items()))
            print(f"| {spec} | {area} | {len(chosen)} | {iou:.1f} | {bf2:.1f} | {picks} |",
                  flush=True)


if __name__ == "__main__":
    main()

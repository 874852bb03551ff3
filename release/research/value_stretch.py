"""Research: which percentile stretch for inputs that do not use the model's value range?

The engine stretches each band of such an input (16-bit integers holding 11-14-bit values,
scaled reflectance) from a low to a high percentile onto the card's range
(:mod:`idgbr_geo.stretch`). A stretch can only approximate the 8-bit product the models
learned from, so the right percentiles are those that change such a product least. Each
held-out 8-bit scene is written as 12-bit data in uint16 (a linear rescale, so the stretch
triggers) and run coarse-only through ``refine_raster`` with each candidate pair; IoU
against the labels, beside the 8-bit scene as it is and the 12-bit data unstretched.

    OMP_NUM_THREADS=1 .venv/bin/python release/research/value_stretch.py buildings \
        --groups banepa,xdomain,dubai --limit 20
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from validate import engine, load_scenes, write_raster  # noqa: E402

from idgbr_geo import stretch  # noqa: E402
from idgbr_geo.metrics import MetricAccumulator  # noqa: E402
from idgbr_geo.registry import load_model  # noqa: E402

CANDIDATES = ((0.0, 100.0), (0.1, 99.9), (0.5, 99.5), (1.0, 99.0), (2.0, 98.0))


def _iou(acc: MetricAccumulator, classes: list[str]) -> float:
    """Foreground IoU in %, or the mean over classes 1.. for several classes."""
    iou = acc.result()["iou"]
    return 100 * float(np.mean([iou[c] for c in classes[1:]]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("set")
    ap.add_argument("--groups", default="banepa,xdomain,dubai")
    ap.add_argument("--limit", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    model = load_model(args.set, "cpu")
    classes = list(model.card.classes)
    groups = set(args.groups.split(","))
    scenes = {g: s for g, s in load_scenes(args.set, args.limit).items() if g in groups}
    runs = ["8-bit as is", "12-bit, no stretch", *(f"12-bit, {lo:g}-{hi:g}%"
                                                   for lo, hi in CANDIDATES)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for group, items in scenes.items():
            acc = {r: MetricAccumulator(classes) for r in runs}
            for s in items:
                u8 = write_raster(work / "u8.tif", s.image, s.gsd)
                u16 = write_raster(work / "u16.tif", (s.image.astype(np.float32) * 4095 / 255)
                                   .round().astype(np.uint16), s.gsd)
                pred, _ = engine(u8, work / "o.tif", model, coarse_only=True)
                acc[runs[0]].update(pred, s.label)
                pred, _ = engine(u16, work / "o.tif", model, coarse_only=True,
                                 value_range=(0, 65535))
                acc[runs[1]].update(pred, s.label)
                for name, (lo, hi) in zip(runs[2:], CANDIDATES, strict=True):
                    stretch.LOW_PERCENTILE, stretch.HIGH_PERCENTILE = lo, hi
                    pred, _ = engine(u16, work / "o.tif", model, coarse_only=True)
                    acc[name].update(pred, s.label)
            cells = ", ".join(f"{r} {_iou(a, classes):.1f}" for r, a in acc.items())
            print(f"{group} ({len(items)} scenes): IoU {cells}", flush=True)


if __name__ == "__main__":
    main()

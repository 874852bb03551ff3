"""Research: pick the model's working GSD per scene by its own confidence?

The buildings model run at another working GSD than its card's 0.3 m (``validate.py
--model-gsd``) moves the validation sets in opposite directions: at 0.25 m Banepa's drone
scenes gain and buildings-xdomain loses, at 0.375 m the reverse. A per-scene choice would
help both if the model could tell which scale suits a scene. The rule tried, fixed before
any run: run the coarse model at each candidate GSD and keep the one whose map has the
highest mean confidence (max class probability, over the valid pixels). Scored against
every fixed GSD and against the oracle (per scene the GSD of the best IoU), coarse-only,
through ``refine_raster`` (``--confidence`` band), with the card's own per-scene choice
(``gsd_choices``, which the fixed GSDs switch off) as the last column:

    OMP_NUM_THREADS=1 .venv/bin/python release/research/scale_selection.py buildings \
        --gsds 0.25,0.3,0.375
    OMP_NUM_THREADS=1 .venv/bin/python release/research/scale_selection.py roads \
        --gsds 0.42,0.5,0.625
    .venv/bin/python release/research/scale_selection.py buildings --groups xdomain \
        --gsds 0.25,0.3,0.375,0.45,0.5,0.6 --per-scene --threads 2   # session 26
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import rasterio
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from validate import load_scenes, write_raster  # noqa: E402

from idgbr_geo.engine import refine_raster  # noqa: E402
from idgbr_geo.metrics import MetricAccumulator  # noqa: E402
from idgbr_geo.options import OutputOptions, RunOptions  # noqa: E402
from idgbr_geo.registry import load_model  # noqa: E402


def run(path: Path, out: Path, model, gsd: float | None,
        card_gsd: float) -> tuple[np.ndarray, float]:
    """The coarse class map of ``path`` with the model working at ``gsd`` m (None: as its
    card runs it, the per-scene choice included), and its mean confidence (0..1) over the
    pixels the engine wrote."""
    model.card.gsd = card_gsd if gsd is None else gsd
    refine_raster(path, out, model=model, overwrite=True, quiet=True,
                  options=RunOptions(coarse_only=True, device="cpu", seed=0,
                                     gsd_search=gsd is None),
                  outputs=OutputOptions(confidence=True))
    with rasterio.open(out) as ds:
        cls, conf = ds.read(1), ds.read(2).astype(np.float64) / 255.0
        valid = ds.read_masks(1) > 0
    return cls, float(conf[valid].mean()) if valid.any() else 0.0


def scene_iou(pred: np.ndarray, label: np.ndarray) -> float:
    ok = label != 255
    p, t = (pred == 1) & ok, (label == 1) & ok
    union = (p | t).sum()
    return float((p & t).sum() / union) if union else 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("set", choices=["buildings", "roads"])
    ap.add_argument("--model", default=None)
    ap.add_argument("--gsds", default="0.25,0.3,0.375")
    ap.add_argument("--groups", default=None, help="[all of the set's]")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--per-scene", action="store_true",
                    help="also each scene's IoU at every GSD and as the card runs it")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    model = load_model(args.model or args.set, "cpu")
    card_gsd = model.card.gsd
    classes, cls = list(model.card.classes), model.card.classes[1]
    gsds = [float(g) for g in args.gsds.split(",")]
    scenes = load_scenes(args.set, args.limit)
    groups = args.groups.split(",") if args.groups else list(scenes)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for group in groups:
            keys = [*(f"{g:g} m" for g in gsds), "selected", "oracle", "card"]
            acc = {k: MetricAccumulator(classes) for k in keys}
            picks: list[float] = []
            for s in scenes.get(group, []):
                path = write_raster(work / "in.tif", s.image, s.gsd)
                runs = {g: run(path, work / "out.tif", model, g, card_gsd) for g in gsds}
                card_map, _ = run(path, work / "out.tif", model, None, card_gsd)
                acc["card"].update(card_map, s.label)
                if args.per_scene:
                    ious = " ".join(f"{g:g} m {100 * scene_iou(runs[g][0], s.label):.1f}"
                                    for g in gsds)
                    print(f"  {s.name}: {ious}, card "
                          f"{100 * scene_iou(card_map, s.label):.1f}", flush=True)
                for g, (pred, _) in runs.items():
                    acc[f"{g:g} m"].update(pred, s.label)
                best = max(gsds, key=lambda g: runs[g][1])
                picks.append(best)
                acc["selected"].update(runs[best][0], s.label)
                oracle = max(gsds, key=lambda g: scene_iou(runs[g][0], s.label))
                acc["oracle"].update(runs[oracle][0], s.label)
            counts = ", ".join(f"{g:g} m: {picks.count(g)}" for g in gsds)
            scores = ", ".join(f"{k} {100 * a.result()['iou'][cls]:.1f}"
                               for k, a in acc.items())
            print(f"{group} ({len(picks)} scenes; picked {counts}): IoU {scores}", flush=True)


if __name__ == "__main__":
    main()

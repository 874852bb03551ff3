"""Pick refiner options (gate, steps) WITHOUT looking at the validation split.

Scores coarse vs refined on chips of the *training* areas (``.train/<set>_train.npz``;
every ``--every``-th training scene), so that sampler options are chosen on data from the
training side of the area split only, and the validation split is used once, for the
reported table (release/validate.py). Like the validation, every map comes from the
engine users run: each chip is refined by :func:`idgbr_geo.engine.refine_raster`
(release/validate.py's ``Engine``). A variant is a JSON object of ``steps``, ``gate`` and
research sampler options (:mod:`research.sampling`).

    OMP_NUM_THREADS=1 .venv/bin/python release/select_options.py buildings \
        --variants '[{"gate": 0}, {"gate": 0.55}, {"gate": 0.6}, {"gate": 0.65}]'

The refiner's ``gate`` (keep the coarse class unless the refiner gives its own at least that
probability) is chosen with one rule, fixed before the validation run: the smallest gate of
0.55 / 0.6 / 0.65 / 0.7 / 0.8 whose IoU_imp >= 0 and ΔIoU >= 0 here; if none reaches
IoU_imp >= 0, the smallest with ΔIoU >= 0 (landcover 0.65, roads 0.55 for the shipped
4000-iteration refiner, 0.6 for the 1500-iteration one). Per-class gates (one threshold per
class a pixel would turn into, each of the same five values) follow the same rule with
"smallest" meaning the smallest mean threshold, ties going to the larger IoU_imp: for two
classes this picked buildings [0.6, 0.55] (turning a pixel into background needs 0.6, into
a building 0.55) over the single 0.6, and left roads at 0.55 (no variant reaches
IoU_imp >= 0 there; [0.55, 0.55] is the smallest); landcover's six classes were not searched.

``--thresholds 0.4,0.6`` (binary models) adds rows for the coarse and each refined map with
the positive class wherever its probability exceeds each threshold, to see whether a boundary
gain is more than a shift of the decision threshold (Δ columns: against the plain coarse map).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from validate import ROOT, Validator, card_from_checkpoint  # noqa: I001  (release/ is on sys.path when run)

from idgbr_geo.config import SamplingConfig


def main() -> None:
    from idgbr_geo.checkpoints import refiner_from_checkpoint, segmentor_from_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("set")
    ap.add_argument("--variants", default='[{"gate": 0}]',
                    help="JSON list of variants: steps, gate and research sampler options")
    ap.add_argument("--refiner-tag", default="refiner")
    ap.add_argument("--coarse-tag", default="coarse")
    ap.add_argument("--steps", type=int, default=SamplingConfig().steps)
    ap.add_argument("--every", type=int, default=4, help="use every N-th training scene")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--thresholds", default=None,
                    help="binary models: also score coarse and refined maps with the positive "
                         "class at p > each of these comma-separated thresholds")
    args = ap.parse_args()
    thresholds = [float(t) for t in args.thresholds.split(",")] if args.thresholds else []
    torch.set_num_threads(args.threads)
    runs = ROOT / "runs"

    def ckpt(tag: str) -> Path:
        return runs / f"{args.set}-{tag}" / "checkpoint.pt"

    card = card_from_checkpoint(args.set, ckpt(args.coarse_tag), SamplingConfig(steps=args.steps))
    classes = card.classes
    if thresholds and len(classes) != 2:
        raise SystemExit("--thresholds is for binary models")
    with np.load(ROOT / f"{args.set}_train.npz") as z:
        scenes = z["scene"]
        keep = sorted(set(scenes.tolist()))[:: args.every]
        idx = np.flatnonzero(np.isin(scenes, keep))
        images, labels = z["images"], z["labels"]  # read each array once
    chips = [(images[i], labels[i]) for i in idx]
    print(f"selection: {len(chips)} training chips from {len(keep)} training scenes")
    with tempfile.TemporaryDirectory(prefix="idgbr-select-") as tmp:
        v = Validator(args.set, chips, card, Path(tmp))
        seg = segmentor_from_checkpoint(ckpt(args.coarse_tag), "cpu")
        cm = v.coarse_maps(seg)
        v.add("selection", "coarse", cm, None, classes, 0.0)
        for th in thresholds:
            v.add("selection", f"coarse at p > {th}", at_threshold(cm, th), cm, classes, 0.0)
        for tag in args.refiner_tag.split(","):
            ref = refiner_from_checkpoint(ckpt(tag), "cpu")
            for kw in json.loads(args.variants):
                t = time.time()
                maps = v.refine_maps(seg, ref, **kw)
                v.add("selection", f"{tag} {json.dumps(kw)}", maps, cm, classes,
                      time.time() - t)
                for th in thresholds:
                    v.add("selection", f"{tag} {json.dumps(kw)} at p > {th}",
                          at_threshold(maps, th), cm, classes, 0.0)


def at_threshold(maps: list[torch.Tensor], th: float) -> list[torch.Tensor]:
    """Binary maps whose arg-max is "positive class where p > th" (th 0.5: the usual map)."""
    return [torch.stack([torch.full_like(m[1], th), m[1]]) for m in maps]


if __name__ == "__main__":
    main()

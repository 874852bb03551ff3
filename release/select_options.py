"""Pick refiner sampling options (gate, steps) WITHOUT looking at the validation split.

Scores coarse vs refined on chips of the *training* areas (``.train/<set>_train.npz``), so
that sampler options are chosen on data from the training side of the area split only, and
the validation split is used once, for the reported table (release/validate.py). Per chip
source: every ``--every``-th training scene (sorted scene names), each chip cropped to its
labelled extent (smaller chips are stored padded), chips less than 30% labelled skipped,
at most ``--limit`` chips evenly spread over the rest. Like the validation,
every map comes from the engine users run (release/validate.py's ``Validator``): each chip is
written as a GeoTIFF with a CRS at its own pixel size (``chip_gsd``), so the engine resamples
it to the model's GSD as it does for users, and the class rasters are scored on that grid.

The model: the checkpoints ``.train/runs/<set>-<tag>/checkpoint.pt`` of ``--coarse-tag`` and
of each of ``--refiner-tag`` (comma-separated), exported to a temporary card like
release/validate.py's tag mode. A variant (``--variants``, a JSON list) is an object of
``steps`` and/or ``gate`` (the card's ``sampling``; unset: the defaults, 1 step, gate 0). Rows
per chip source and pooled: the model's own coarse map (once), then each refiner tag with
each variant: IoU, BF@2, IoU_imp, ΔIoU, ΔBF@2 in % (release/validate.py's columns).

Selection rule (fixed before the validation run), on the pooled rows: among all variants
(of all refiner tags), the one with the smallest gate (per-class gates: the smallest mean
threshold) whose IoU_imp >= 0 and ΔIoU >= 0, ties going to the larger IoU_imp; if no variant
qualifies, the one with the largest ΔIoU + ΔBF@2 / 5 (and the output says so).

    OMP_NUM_THREADS=1 .venv/bin/python release/select_options.py buildings \
        --variants '[{"gate": 0}, {"gate": 0.55}, {"gate": 0.6}, {"gate": [0.6, 0.55]}]'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rasterio.errors import NotGeoreferencedWarning
from validate import COARSE, POOLED, ROOT, Scene, Validator, exported, gate_label  # noqa: I001 (release/ on sys.path)

from idgbr_geo.config import SamplingConfig
from idgbr_geo.interfaces import Model
from idgbr_geo.tiling import NoCRSWarning

#: chips with less than this share of labelled (not ignore) pixels are skipped
MIN_LABELLED = 0.3


class Selector(Validator):
    """A :class:`Validator` whose refined rows are the variants (on the model's own map)."""

    def __init__(self, variants: list[tuple[str, Model, dict[str, Any]]], workdir: Path
                 ) -> None:
        super().__init__(variants[0][1], workdir)
        self.variants = variants

    def methods(self, source: str) -> list[tuple[str, Model, dict[str, Any]]]:
        return self.variants


def with_sampling(model: Model, sampling: SamplingConfig) -> Model:
    """The same networks under a card with other sampling options."""
    return dataclasses.replace(model, card=dataclasses.replace(model.card, sampling=sampling))


def extent(label: np.ndarray) -> tuple[slice, slice]:
    """The bounding box of a chip's labelled pixels: chips smaller than 512 px (e.g. the
    256 px Inria ones) are stored padded (image 0, label 255); only their real part is run."""
    rows, cols = np.flatnonzero((label != 255).any(1)), np.flatnonzero((label != 255).any(0))
    if not len(rows):
        return slice(None), slice(None)  # nothing labelled: skipped
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def load_chips(name: str, every: int, limit: int) -> dict[str, list[Scene]]:
    """The selection chips by source (see the module docstring)."""
    out: dict[str, list[Scene]] = {}
    with np.load(ROOT / f"{name}_train.npz") as z:
        scene, source, gsd = z["scene"].astype(str), z["chip_source"].astype(str), z["chip_gsd"]
        labels = z["labels"]
        picked: dict[str, list[int]] = {}
        for src in sorted(set(source.tolist())):
            keep = sorted(set(scene[source == src].tolist()))[::every]
            idx = [int(i) for i in np.flatnonzero((source == src) & np.isin(scene, keep))
                   if (labels[i][extent(labels[i])] != 255).mean() >= MIN_LABELLED]
            if len(idx) > limit:
                idx = [idx[j] for j in np.linspace(0, len(idx) - 1, limit).round().astype(int)]
            print(f"{src}: {len(keep)} of {len(set(scene[source == src].tolist()))} training "
                  f"scenes, {len(idx)} chip(s)", flush=True)
            if idx:
                picked[src] = idx
        images = z["images"]  # read once
        for src, idx in picked.items():
            for i in idx:
                g, box = float(gsd[i]), extent(labels[i])
                out.setdefault(src, []).append(Scene(
                    images[i][:, box[0], box[1]].copy(), labels[i][box].copy(),
                    g if math.isfinite(g) and g > 0 else None, src, f"{scene[i]}#{i}"))
    return out


def choose(rows: list[dict[str, Any]], gates: dict[str, list[float]]) -> tuple[str, bool]:
    """The selection rule on the pooled rows: (method label, whether a variant qualified)."""
    pooled = [r for r in rows if r["scenes"] == POOLED and r["method"] != COARSE]
    ok = [r for r in pooled if r["iou_imp"] is not None and r["d_iou"] is not None
          and r["iou_imp"] >= 0 and r["d_iou"] >= 0]
    if ok:
        best = min(ok, key=lambda r: (float(np.mean(gates[r["method"]])), -r["iou_imp"]))
        return best["method"], True
    scored = [r for r in pooled if r["d_iou"] is not None and r["d_bf2"] is not None]
    if not scored:
        raise SystemExit("no variant could be scored (no labelled foreground?)")
    best = max(scored, key=lambda r: r["d_iou"] + r["d_bf2"] / 5)
    return best["method"], False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("set", choices=["buildings", "roads", "landcover"])
    ap.add_argument("--variants", type=json.loads, default=[{"gate": 0}],
                    help='JSON list of objects of "steps" and/or "gate" (a number or one per '
                         'class), e.g. \'[{"gate": 0}, {"gate": 0.55}, {"gate": [0.6, 0.55]}]\'')
    ap.add_argument("--coarse-tag", default="lite",
                    help="segmentor: .train/runs/<set>-<tag>/checkpoint.pt")
    ap.add_argument("--refiner-tag", default="refiner",
                    help="refiner(s): comma-separated tags of .train/runs/<set>-<tag>")
    ap.add_argument("--every", type=int, default=4,
                    help="every N-th training scene per source")
    ap.add_argument("--limit", type=int, default=12, help="at most N chips per source")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if not isinstance(args.variants, list) or not args.variants:
        ap.error("--variants must be a non-empty JSON list")
    default = SamplingConfig()
    samplings = []
    for kw in args.variants:
        problem = SamplingConfig.problem(kw)
        if problem:
            ap.error(f"variant {json.dumps(kw)}: {problem}")
        samplings.append(SamplingConfig(**{"steps": default.steps, "gate": default.gate, **kw}))
    if args.every < 1 or args.limit < 1:
        ap.error("--every and --limit must be at least 1")

    def ckpt(tag: str) -> Path:
        return ROOT / "runs" / f"{args.set}-{tag}" / "checkpoint.pt"

    tags = [t.strip() for t in args.refiner_tag.split(",") if t.strip()]
    missing = [str(ckpt(t)) for t in [args.coarse_tag, *tags] if not ckpt(t).is_file()]
    if missing:
        ap.error(f"no checkpoint {', '.join(missing)}")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=NoCRSWarning)
    warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)
    chips = load_chips(args.set, args.every, args.limit)
    if not chips:
        raise SystemExit("no selection chips")
    with tempfile.TemporaryDirectory(prefix="idgbr-select-") as tmp:
        work = Path(tmp)
        variants: list[tuple[str, Model, dict[str, Any]]] = []
        about: dict[str, str] = {}  # label -> refiner tag and the variant as JSON
        gates: dict[str, list[float]] = {}  # label -> one threshold per class
        for tag in tags:
            model = exported(f"{args.set}-{args.coarse_tag}-{tag}", ckpt(args.coarse_tag),
                             ckpt(tag), default, work / f"model-{tag}")
            k = len(model.card.classes)
            for kw, s in zip(args.variants, samplings, strict=True):
                try:
                    thresholds = s.thresholds(k)
                except ValueError as exc:
                    ap.error(f"variant {json.dumps(kw)}: {exc}")
                label = f"{tag}: {s.steps} step(s), gate {gate_label(s.gate)}"
                if label in gates:
                    continue  # the same variant twice
                gates[label] = thresholds
                about[label] = f"refiner tag {tag!r}, variant " + json.dumps(
                    {"steps": s.steps, "gate": list(s.gate) if isinstance(s.gate, tuple)
                     else s.gate})
                variants.append((label, with_sampling(model, s), {}))
        print(f"model {args.set}: coarse '{args.coarse_tag}', refiner(s) {', '.join(tags)}; "
              f"{len(variants)} variant(s); classes {variants[0][1].card.classes}", flush=True)
        v = Selector(variants, work)
        for group, scenes in chips.items():
            v.run_group(group, scenes, ["ours"])
        v.pooled()
    label, qualified = choose(v.rows, gates)
    print()
    if qualified:
        print("chosen (smallest gate with pooled IoU_imp >= 0 and ΔIoU >= 0): ", end="")
    else:
        print("no variant has pooled IoU_imp >= 0 and ΔIoU >= 0; chosen by the largest "
              "pooled ΔIoU + ΔBF@2/5: ", end="")
    print(f"{label}  ({about[label]})")


if __name__ == "__main__":
    main()

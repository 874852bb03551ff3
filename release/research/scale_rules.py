"""Research: which rule should pick a scene's working GSD among the card's candidates?

The engine (``idgbr_geo/scale.py``) keeps the candidate whose coarse map of a few sampled
windows is most confident (mean max class probability). Session 31 saw it flip on one chip
(WHU Wuhan, no CRS) for a new buildings soup: the finest candidate picked, 15 points under the
best. This script records, per scene and candidate, the whole-scene coarse map's
intersection and union with the truth (so that any rule can be scored pooled, as
``validate.py`` does) and several statistics a rule could use, so that rules are compared on
every held-out scene of a set and several models, not on the chip that raised the question:

- ``conf``: the engine's own number (sampled windows, mean max class probability);
- ``entropy``: mean entropy of the sampled windows' class probabilities (lower: surer);
- ``fg``: share of sampled valid pixels marked as the set's class;
- ``agree``: mean IoU of the candidate's whole-scene map of the class with the other
  candidates' maps (a scale the answer is stable around).

    .venv/bin/python release/research/scale_rules.py buildings --model CARD --json OUT.json
    .venv/bin/python release/research/scale_rules.py --score OUT.json [OUT2.json ...]
"""

from __future__ import annotations

import argparse
import json
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
from idgbr_geo.options import RunOptions  # noqa: E402
from idgbr_geo.registry import load_model  # noqa: E402
from idgbr_geo.scale import sample_windows  # noqa: E402
from idgbr_geo.tiling import open_source, resampling_factor  # noqa: E402


def sampled_stats(path: Path, model, gsd: float) -> dict[str, float] | None:
    """The engine's sampling of ``choose_working_gsd`` at one candidate, with more numbers."""
    card = model.card
    src = open_source(path, model_bands=card.bands, bands=None, model_gsd=card.gsd,
                      gsd_without_crs=card.gsd_without_crs, normalization=card.normalization,
                      band_names=card.band_names)
    try:
        factor = resampling_factor(src.gsd, gsd)
        if factor is None:
            return None
        conf = ent = fg = 0.0
        count = 0
        for probs, mask in sample_windows(src, model, factor, card.tile_size, card.overlap,
                                          "auto"):
            p = probs.numpy().astype(np.float64)[:, mask]
            conf += float(p.max(0).sum())
            ent += float(-(p * np.log(np.clip(p, 1e-8, 1))).sum())
            fg += float((p.argmax(0) == 1).sum())
            count += int(mask.sum())
        return ({"conf": conf / count, "entropy": ent / count, "fg": fg / count}
                if count else None)
    finally:
        src.ds.close()


def coarse_map(path: Path, out: Path, model, gsd: float) -> np.ndarray:
    model.card.gsd = gsd
    refine_raster(path, out, model=model, overwrite=True, quiet=True,
                  options=RunOptions(coarse_only=True, device="cpu", seed=0,
                                     gsd_search=False))
    with rasterio.open(out) as ds:
        return ds.read(1)


def collect(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    model = load_model(args.model or args.set, "cpu")
    card_gsd = model.card.gsd
    scenes = load_scenes(args.set, args.limit)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for group, items in scenes.items():
            for s in items:
                path = write_raster(work / "in.tif", s.image, s.gsd)
                model.card.gsd = card_gsd
                with rasterio.open(path) as ds:
                    has_crs = ds.crs is not None
                given = s.gsd if has_crs else model.card.gsd_without_crs
                cands = model.card.working_gsd_choices(given)
                stats = {g: sampled_stats(path, model, g) for g in cands}
                cands = [g for g in cands if stats[g] is not None]
                maps = {g: coarse_map(path, work / "out.tif", model, g) == 1 for g in cands}
                ok = s.label != 255
                truth = (s.label == 1) & ok
                per = {}
                for g in cands:
                    p = maps[g] & ok
                    others = [h for h in cands if h != g]
                    agree = np.mean([(p & maps[h]).sum() / max(1, (p | (maps[h] & ok)).sum())
                                     for h in others]) if others else 1.0
                    per[f"{g:g}"] = {**stats[g], "agree": float(agree),
                                     "inter": int((p & truth).sum()),
                                     "union": int((p | truth).sum())}
                rows.append({"group": group, "name": s.name, "gsd": s.gsd, "cands": per})
                best = max(per, key=lambda k: per[k]["conf"])
                print(f"{group} {s.name}: " + ", ".join(
                    f"{k} iou {100 * v['inter'] / max(1, v['union']):.1f} conf {v['conf']:.3f} "
                    f"agree {v['agree']:.2f}" for k, v in per.items()) + f" [conf picks {best}]",
                    flush=True)
    model.card.gsd = card_gsd
    Path(args.json).write_text(json.dumps({"set": args.set, "model": args.model,
                                           "scenes": rows}, indent=1) + "\n")


RULES = {
    "conf (engine)": lambda c: max(c, key=lambda k: c[k]["conf"]),
    "entropy": lambda c: min(c, key=lambda k: c[k]["entropy"]),
    "agree": lambda c: max(c, key=lambda k: c[k]["agree"]),
    "conf x agree": lambda c: max(c, key=lambda k: c[k]["conf"] * c[k]["agree"]),
}


def pooled(rows: list[dict], picks: list[str]) -> float:
    """IoU (%) of the scenes' maps at the picked candidates, pooled over their pixels."""
    pairs = list(zip(rows, picks, strict=True))
    inter = sum(r["cands"][k]["inter"] for r, k in pairs)
    return 100 * inter / max(1, sum(r["cands"][k]["union"] for r, k in pairs))


def score(paths: list[str]) -> None:
    for p in paths:
        data = json.loads(Path(p).read_text())
        print(f"\n{p} ({data['set']}, {data['model']})")
        groups: dict[str, list] = {}
        for r in data["scenes"]:
            groups.setdefault(r["group"], []).append(r)
        groups["pooled"] = data["scenes"]
        for g, rows in groups.items():
            res = {name: pooled(rows, [rule(r["cands"]) for r in rows])
                   for name, rule in RULES.items()}
            res["oracle"] = pooled(rows, [max(r["cands"], key=lambda k, c=r["cands"]:
                                              c[k]["inter"] / max(1, c[k]["union"]))
                                          for r in rows])
            for k in sorted({k for r in rows for k in r["cands"]}, key=float):
                if all(k in r["cands"] for r in rows):
                    res[f"fixed {k}"] = pooled(rows, [k] * len(rows))
            print(f"  {g} ({len(rows)}): " + ", ".join(f"{k} {v:.1f}" for k, v in res.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("set", nargs="?", choices=["buildings", "roads"])
    ap.add_argument("--model", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--score", nargs="+", default=None)
    args = ap.parse_args()
    if args.score:
        score(args.score)
    else:
        collect(args)


if __name__ == "__main__":
    main()

"""How far the engine's GSD estimate strays when the assumption is right (research).

    OMP_NUM_THREADS=2 .venv/bin/python release/research/gsd_deadband.py roads [--per-source 40]

``--estimate-gsd`` (:func:`idgbr_geo.scale.estimate_gsd`) measures an input's road widths and
rescales the assumed GSD; on inputs at the assumed GSD its answer is noise around it. This
writes 2 x 2 mosaics of training chips of one scene (1024 px, stored at the scene's own
GSD, ``chip_gsd``) without a CRS, estimates each from the card's assumption, and prints the
quantiles of |ln(estimate / true GSD)| per source and pooled: the estimator's own spread,
from training data only, to set how far an estimate must move before the engine uses it.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

from idgbr_geo.registry import load_model
from idgbr_geo.scale import estimate_gsd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gsd_estimates import open_without_crs  # noqa: E402

ROOT = Path(__file__).resolve().parents[2] / ".train"


def mosaics(data: dict, source: str, count: int, rng: np.random.Generator
            ) -> list[tuple[str, np.ndarray, float]]:
    """Up to ``count`` (scene, (3, 1024, 1024) image, GSD) of four chips of one scene each
    (drawn with repeats from a scene of fewer chips: RoadNet keeps one chip per scene)."""
    idx = np.flatnonzero(data["chip_source"] == source)
    by_scene: dict[str, list[int]] = {}
    for i in idx:
        by_scene.setdefault(str(data["scene"][i]), []).append(int(i))
    scenes = list(by_scene)
    out = []
    for j in range(count):
        scene = scenes[j] if j < len(scenes) else scenes[rng.integers(len(scenes))]
        chips = by_scene[scene]
        pick = rng.choice(chips, 4, replace=len(chips) < 4)
        im = [data["images"][i] for i in pick]
        top, bottom = np.concatenate(im[:2], 2), np.concatenate(im[2:], 2)
        out.append((scene, np.concatenate([top, bottom], 1), float(data["chip_gsd"][pick[0]])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("set", choices=("roads",))
    ap.add_argument("--per-source", type=int, default=40)
    ap.add_argument("--sources", default="massachusetts,deepglobe,roadnet")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    m = load_model(args.set, "cpu")
    z = np.load(ROOT / f"{args.set}_train.npz")
    data = {k: z[k] for k in ("images", "scene", "chip_source", "chip_gsd")}
    start = m.card.gsd_without_crs or m.card.gsd
    rng = np.random.default_rng(args.seed)
    errors: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tif = Path(tmp) / "mosaic.tif"
        for source in args.sources.split(","):
            for scene, img, true in mosaics(data, source, args.per_source, rng):
                src = open_without_crs(tif, img, m.card)
                try:
                    est = estimate_gsd(src, m, start, tile_size=m.card.tile_size,
                                       overlap=m.card.overlap)
                finally:
                    src.ds.close()
                gsd = start if est is None else est.gsd
                err = abs(math.log(gsd / true))
                errors.setdefault(source, []).append(err)
                print(f"  {source} {scene}: estimate {gsd:.3g} (true {true:g}), "
                      f"|ln| {err:.3f}{' (none)' if est is None else ''}", flush=True)
    print(f"model {m.card.name}, assumption {start:g} m")
    print("| source | mosaics | median | 80th | 90th pct of abs ln(estimate / true) |")
    print("|---|---|---|---|---|")
    allv = [e for v in errors.values() for e in v]
    for name, v in [*errors.items(), ("pooled", allv)]:
        q = np.quantile(v, [0.5, 0.8, 0.9])
        print(f"| {name} | {len(v)} | {q[0]:.3f} ({math.exp(q[0]):.2f}x) | "
              f"{q[1]:.3f} ({math.exp(q[1]):.2f}x) | {q[2]:.3f} ({math.exp(q[2]):.2f}x) |")


if __name__ == "__main__":
    main()

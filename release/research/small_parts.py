"""Research: would the class raster score higher without its smallest parts?

The vector output drops features and fills holes below a minimum area; the class raster
keeps every pixel the models mark. Per held-out group, the foreground IoU and BF@2 of a
card's maps through ``refine_raster`` (as ``validate.py`` runs them) after dropping
8-connected parts and filling holes smaller than each area in ``--areas`` (m^2 on the
ground; scenes without a GSD at the GSD the engine assumes for them), and after a
closing by a disc of radius 1-2 px (roads: gaps bridged). Maps are cached in ``--cache``
so that variants cost no network time.

    .venv/bin/python release/research/small_parts.py roads --threads 2
    .venv/bin/python release/research/small_parts.py buildings --threads 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from degradations import disk  # noqa: E402
from validate import engine, load_scenes, summarise, write_raster  # noqa: E402

from idgbr_geo.metrics import MetricAccumulator  # noqa: E402
from idgbr_geo.registry import load_model  # noqa: E402

EIGHT = np.ones((3, 3), bool)


def drop_small(mask: np.ndarray, min_px: float, structure: np.ndarray | None = EIGHT
               ) -> np.ndarray:
    """``mask`` without its connected parts (8-connected by default) under ``min_px``
    pixels."""
    lab, n = ndimage.label(mask, structure)
    if n == 0:
        return mask
    keep = np.bincount(lab.ravel()) >= min_px
    keep[0] = False
    return keep[lab]


def fill_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    """``mask`` with its 4-connected holes (background touching the border counts as one)
    under ``min_px`` pixels filled."""
    return ~drop_small(~mask, min_px, None)


def variants(mask: np.ndarray, px_m2: float, areas: list[float]) -> dict[str, np.ndarray]:
    out = {"as is": mask}
    for a in areas:
        out[f"drop < {a:g} m2"] = drop_small(mask, a / px_m2)
        out[f"drop+fill < {a:g} m2"] = fill_small(out[f"drop < {a:g} m2"], a / px_m2)
    for r in (1, 2):
        out[f"closing r{r}"] = ndimage.binary_closing(mask, disk(r), border_value=0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("set", choices=["buildings", "roads"])
    ap.add_argument("--model", default=None, help="[the bundled model of the set]")
    ap.add_argument("--groups", default=None, help="[all of the set's]")
    ap.add_argument("--limit", type=int, default=None, help="at most N scenes per group")
    ap.add_argument("--areas", default="5,10,20,40,80,160")
    ap.add_argument("--cache", type=Path, default=None, help="[.train/small_parts_SET.npz]")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    areas = [float(a) for a in args.areas.split(",")]
    model = load_model(args.model or args.set, "cpu")
    cache = args.cache or Path(__file__).resolve().parents[2] / ".train" / \
        f"small_parts_{args.set}.npz"
    maps = dict(np.load(cache)) if cache.exists() else {}
    scenes = load_scenes(args.set, args.limit)
    groups = args.groups.split(",") if args.groups else list(scenes)
    classes = list(model.card.classes)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for group in groups:
            acc: dict[str, MetricAccumulator] = {}
            fresh = False
            for s in scenes.get(group, []):
                key = f"{group}/{s.name}"
                if key not in maps:
                    path = write_raster(work / "in.tif", s.image, s.gsd)
                    maps[key], _ = engine(path, work / "out.tif", model)
                    fresh = True
                # without a CRS the engine assumes the card's GSD for such inputs
                gsd = s.gsd or model.card.gsd_without_crs or model.card.gsd
                for v, m in variants(maps[key] == 1, gsd * gsd, areas).items():
                    acc.setdefault(v, MetricAccumulator(classes)).update(
                        m.astype(np.uint8), s.label)
            if fresh:  # once per group: every map is compressed again on each write
                np.savez_compressed(cache, **maps)
            n = len(scenes.get(group, []))
            for v, a in acc.items():
                r = summarise(a.result(), classes)
                print(f"{group} ({n}) {v:>20}: IoU {r['iou']:.2f} BF@2 {r['bf2']:.2f}",
                      flush=True)


if __name__ == "__main__":
    main()

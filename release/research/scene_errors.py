"""Research: what kind of error holds a held-out set down?

Per scene and pooled over a group, the class's IoU, precision and recall of a card's maps
through ``refine_raster`` (as ``validate.py`` runs them), and the IoU the same maps would
have eroded or dilated by one pixel: if either is higher, the model draws the class too
wide or too narrow for that set's labels; if both are lower, the losses are whole objects
missed or marked, not their width.

    .venv/bin/python release/research/scene_errors.py roads --limit 16 --threads 2
    .venv/bin/python release/research/scene_errors.py buildings --groups xdomain --threads 2
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
from validate import engine, load_scenes, write_raster  # noqa: E402

from idgbr_geo.registry import load_model  # noqa: E402

#: the maps scored besides the map as it is: one pixel thinner, one pixel wider
VARIANTS = ("as is", "eroded 1 px", "dilated 1 px")


def counts(pred: np.ndarray, label: np.ndarray, cls: int) -> dict[str, np.ndarray]:
    """Per variant of the map ``pred`` (class ids): true positives, predicted and labelled
    pixels of class ``cls`` over the labelled pixels (label 255: ignored)."""
    ok = label != 255
    truth = (label == cls) & ok
    mask = pred == cls
    maps = (mask, ndimage.binary_erosion(mask), ndimage.binary_dilation(mask))
    return {v: np.array([(truth & m).sum(), (m & ok).sum(), truth.sum()], np.float64)
            for v, m in zip(VARIANTS, maps, strict=True)}


def describe(c: np.ndarray) -> str:
    """IoU, precision, recall (%) and predicted per labelled pixel of counts ``c``."""
    tp, pred, truth = c
    union = pred + truth - tp
    return (f"IoU {100 * tp / max(union, 1):.1f} precision {100 * tp / max(pred, 1):.1f} "
            f"recall {100 * tp / max(truth, 1):.1f} predicted/labelled "
            f"{pred / max(truth, 1):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("set", choices=["buildings", "roads"])
    ap.add_argument("--model", default=None, help="[the bundled model of the set]")
    ap.add_argument("--groups", default=None, help="[all of the set's]")
    ap.add_argument("--limit", type=int, default=None, help="at most N scenes per group")
    ap.add_argument("--coarse-only", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    model = load_model(args.model or args.set, "cpu")
    scenes = load_scenes(args.set, args.limit)
    groups = args.groups.split(",") if args.groups else list(scenes)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for group in groups:
            pooled = {v: np.zeros(3) for v in VARIANTS}
            for s in scenes.get(group, []):
                path = write_raster(work / "in.tif", s.image, s.gsd)
                pred, _ = engine(path, work / "out.tif", model, coarse_only=args.coarse_only)
                one = counts(pred, s.label, 1)
                for v in VARIANTS:
                    pooled[v] += one[v]
                print(f"  {s.name}: {describe(one['as is'])}", flush=True)
            for v in VARIANTS:
                print(f"{group} ({len(scenes.get(group, []))} scenes), {v}: "
                      f"{describe(pooled[v])}", flush=True)


if __name__ == "__main__":
    main()

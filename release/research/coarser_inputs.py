"""Research: satellite-like inputs coarser than the model, resampled up or fed as they are?

The engine resamples every input to the model's GSD. For inputs much coarser than the
model (0.5-1 m satellite tiles into the 0.3 m buildings model) a user report said native
pixels did better than resampling. This simulates such inputs from held-out scenes with a
known GSD: each image is area-downsampled to ``--target`` m (the label by majority of the
source pixels), written georeferenced at that GSD, and run through ``refine_raster``
coarse-only (a) at the file's GSD (the engine upsamples to the model's) and (b) told
``--gsd`` = the model's (native pixels, no resampling), scored on the coarse grid; the
same scenes at their own GSD for comparison.

    OMP_NUM_THREADS=1 .venv/bin/python release/research/coarser_inputs.py buildings \
        --targets 0.5,0.75 --groups xdomain,banepa --limit 8
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from validate import engine, load_scenes, write_raster  # noqa: E402

from idgbr_geo.metrics import MetricAccumulator  # noqa: E402
from idgbr_geo.registry import load_model  # noqa: E402


def downsample(image: np.ndarray, label: np.ndarray, factor: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """Image (3, H, W) uint8 area-averaged by ``factor`` (> 1); label by majority, pixels
    with any ignore (255) source pixel ignored."""
    h, w = image.shape[1:]
    size = (max(8, round(h / factor)), max(8, round(w / factor)))
    img = F.interpolate(torch.from_numpy(image).float()[None], size=size, mode="area")[0]
    lab = torch.from_numpy(label.astype(np.float32))
    ign = F.interpolate((lab == 255).float()[None, None], size=size, mode="area")[0, 0] > 0
    fg = F.interpolate((lab == 1).float()[None, None], size=size,
                       mode="area")[0, 0] >= 0.5
    out = fg.numpy().astype(np.uint8)
    out[ign.numpy()] = 255
    return img.round().clamp(0, 255).byte().numpy(), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("set")
    ap.add_argument("--model", default=None)
    ap.add_argument("--targets", default="0.5,0.75")
    ap.add_argument("--groups", default="xdomain,banepa")
    ap.add_argument("--limit", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    model = load_model(args.model or args.set, "cpu")
    mgsd = model.card.gsd
    classes = list(model.card.classes)
    targets = [float(t) for t in args.targets.split(",")]
    groups = set(args.groups.split(","))
    scenes = {g: s for g, s in load_scenes(args.set, args.limit).items() if g in groups}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for group, items in scenes.items():
            orig = MetricAccumulator(classes)
            known = [s for s in items if s.gsd is not None]
            for s in known:
                path = write_raster(work / "orig.tif", s.image, s.gsd)
                pred, _ = engine(path, work / "orig_out.tif", model, coarse_only=True)
                orig.update(pred, s.label)
            print(f"{group} at its own GSD ({len(known)} scenes): IoU "
                  f"{100 * orig.result()['iou'][classes[1]]:.1f}", flush=True)
            for target in targets:
                acc = {m: MetricAccumulator(classes) for m in ("resampled", "native")}
                n = 0
                for s in items:
                    if s.gsd is None or s.gsd >= target:
                        continue
                    img, lab = downsample(s.image, s.label, target / s.gsd)
                    path = write_raster(work / "in.tif", img, target)
                    for mode, opts in (("resampled", {}), ("native", {"gsd": mgsd})):
                        pred, _ = engine(path, work / f"{mode}.tif", model, coarse_only=True,
                                         **opts)
                        acc[mode].update(pred, lab)
                    n += 1
                res = {m: 100 * a.result()["iou"][classes[1]] for m, a in acc.items()}
                print(f"{group} at {target:g} m ({n} scenes): IoU resampled to {mgsd:g} m "
                      f"{res['resampled']:.1f}, native pixels {res['native']:.1f}", flush=True)


if __name__ == "__main__":
    main()

"""Research: satellite-like inputs coarser than the model, resampled up or fed as they are?

The engine resamples every input to the model's GSD. For inputs much coarser than the
model (0.5-1 m satellite tiles into the 0.3 m buildings model) a user report said native
pixels did better than resampling. This simulates such inputs from held-out scenes with a
known GSD: each image is area-downsampled to ``--target`` m (the label by majority of the
source pixels), written georeferenced at that GSD, and run through ``refine_raster``
coarse-only (a) at the file's GSD (the engine upsamples to the model's) and (b) told
``--gsd`` = the model's (native pixels, no resampling), scored on the coarse grid; the
same scenes at their own GSD for comparison.

With ``--refine`` the second run is instead the full refine at the file's GSD, so each row
says whether the refiner helps or hurts on inputs coarser than the model (IoU and BF@2 on
the coarse grid, coarse-only -> refined, and the engine seconds of each).

    OMP_NUM_THREADS=1 .venv/bin/python release/research/coarser_inputs.py buildings \
        --targets 0.5,0.75 --groups xdomain,banepa --limit 8
    OMP_NUM_THREADS=1 .venv/bin/python release/research/coarser_inputs.py buildings \
        --targets 0.5,0.75 --groups xdomain,banepa --limit 100 --refine
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


def _setup(args: argparse.Namespace):
    """The model, its classes, the target GSDs and the chosen groups' scenes."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    model = load_model(args.model or args.set, "cpu")
    groups = set(args.groups.split(","))
    scenes = {g: s for g, s in load_scenes(args.set, args.limit).items() if g in groups}
    return (model, list(model.card.classes), [float(t) for t in args.targets.split(",")],
            scenes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("set")
    ap.add_argument("--model", default=None)
    ap.add_argument("--targets", default="0.5,0.75")
    ap.add_argument("--groups", default="xdomain,banepa")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--refine", action="store_true",
                    help="compare coarse-only with the full refine (instead of native pixels)")
    args = ap.parse_args()
    if args.refine:
        refine_rows(args)
        return
    model, classes, targets, scenes = _setup(args)
    mgsd = model.card.gsd
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


def _score(acc: MetricAccumulator, cls: str) -> str:
    r = acc.result()
    return f"IoU {100 * r['iou'][cls]:.1f}, BF@2 {100 * r['boundary_f']['2'][cls]:.1f}"


def refine_rows(args: argparse.Namespace) -> None:
    """Coarse-only against the full refine, at each scene's own GSD and downsampled to each
    target GSD (the engine resampling to the model's)."""
    model, classes, targets, scenes = _setup(args)
    cls = classes[1]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for group, items in scenes.items():
            for target in [None, *targets]:
                acc = {m: MetricAccumulator(classes) for m in ("coarse", "refined")}
                secs = {"coarse": 0.0, "refined": 0.0}
                n = 0
                for s in items:
                    if s.gsd is None or (target is not None and s.gsd >= target):
                        continue
                    img, lab = ((s.image, s.label) if target is None
                                else downsample(s.image, s.label, target / s.gsd))
                    path = write_raster(work / "in.tif", img, target or s.gsd)
                    for mode in ("coarse", "refined"):
                        pred, sec = engine(path, work / f"{mode}.tif", model,
                                           coarse_only=mode == "coarse")
                        acc[mode].update(pred, lab)
                        secs[mode] += sec
                    n += 1
                where = "its own GSD" if target is None else f"{target:g} m"
                print(f"{group} at {where} ({n} scenes): coarse {_score(acc['coarse'], cls)} "
                      f"({secs['coarse']:.0f} s) -> refined {_score(acc['refined'], cls)} "
                      f"({secs['refined']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()

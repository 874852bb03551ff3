"""Research probe: the guided filter on the engine's output, on the input's own grid.

    OMP_NUM_THREADS=1 .venv/bin/python release/research/edge_filter.py buildings \
        --groups xdomain,dubai,banepa --limit 8 [--model CARD] [--radii 1,2,3,4] \
        [--eps 1e-3,1e-2]

For each held-out scene (``release/validate.py``'s scenes, at most ``--limit`` per source)
the bundled model's coarse and refined probabilities are written by
:func:`idgbr_geo.engine.refine_raster` itself (bfloat16, seed 0); each is then filtered
with He et al.'s guided filter (:func:`idgbr_geo.upsampling.guided_filter`, colour guide:
the scene's RGB scaled to [0, 1]) at every radius (input pixels) and eps, and scored with
:class:`idgbr_geo.metrics.MetricAccumulator` against the truth: IoU and BF@2 of the
foreground (the mean over classes 1.. for several classes). It asks whether class
boundaries follow the image's edges closely enough for a filter to move them there; the
engine's own version (card ``edge_filter``) runs per window on the working grid.

``--user-maps``: the same filter on one-hot coarse maps made from the truth
(``release/degradations.py``: smoothed, blocky, eroded, dilated), as a user's ``--coarse``
map would be, no network run; colour and grey guides. Does the filter improve a user's map?
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import rasterio
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from degradations import degrade  # noqa: E402
from validate import load_scenes, write_raster  # noqa: E402

from idgbr_geo.engine import refine_raster  # noqa: E402
from idgbr_geo.metrics import MetricAccumulator  # noqa: E402
from idgbr_geo.options import OutputOptions, RunOptions  # noqa: E402
from idgbr_geo.upsampling import guided_filter  # noqa: E402


def numbers(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("set", choices=["buildings", "roads", "landcover"])
    ap.add_argument("--model", default=None, help="bundled name or card (default: the set)")
    ap.add_argument("--groups", required=True, help="comma-separated scene sources")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--radii", type=numbers, default=[1, 2, 3, 4])
    ap.add_argument("--eps", type=numbers, default=[1e-3, 1e-2])
    ap.add_argument("--user-maps", action="store_true",
                    help="filter one-hot degraded-truth maps instead of the engine's output")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.user_maps:
        user_maps(args)
        return
    configs = [(int(r), e) for r in args.radii for e in args.eps]
    scenes = load_scenes(args.set, args.limit)
    work = Path(tempfile.mkdtemp())
    for group in args.groups.split(","):
        accs: dict[tuple[str, str], MetricAccumulator] = {}
        k = 2
        for s in scenes[group]:
            path = write_raster(work / "scene.tif", s.image, s.gsd)
            for mode in ("coarse", "refined"):
                refine_raster(path, work / "out.tif", model=args.model or args.set,
                              probabilities=work / "p.tif",
                              options=RunOptions(seed=0, device="cpu", precision="bfloat16",
                                                 coarse_only=mode == "coarse"),
                              outputs=OutputOptions(probabilities_dtype="float32"),
                              overwrite=True, quiet=True)
                with rasterio.open(work / "p.tif") as ds:
                    prob = torch.from_numpy(ds.read().astype(np.float32))
                with rasterio.open(work / "out.tif") as ds:
                    maps = {"as written": ds.read(1)}
                k = prob.shape[0]
                guide = torch.from_numpy(s.image.astype(np.float32) / 255.0)
                for r, e in configs:
                    q = guided_filter(guide, prob, r, e)
                    maps[f"r {r}, eps {e:g}"] = q.argmax(0).numpy().astype(np.uint8)
                for key, pred in maps.items():
                    acc = accs.setdefault((mode, key),
                                          MetricAccumulator([f"c{j}" for j in range(k)]))
                    acc.update(pred, s.label)
        print(f"\n{group}: {len(scenes[group])} scene(s)\n| map | filter | IoU | BF@2 |\n"
              "|---|---|---|---|")
        for (mode, key), acc in accs.items():
            res = acc.result()
            iou = np.mean([res["iou"][f"c{j}"] or 0.0 for j in range(1, k)])
            bf = np.mean([res["boundary_f"]["2"][f"c{j}"] or 0.0 for j in range(1, k)])
            print(f"| {mode} | {key} | {100 * iou:.1f} | {100 * bf:.1f} |", flush=True)


#: the degraded-truth maps of --user-maps (release/degradations.py)
USER_MAPS = ("smooth-0.5m", "smooth-1m", "stride8", "stride16", "erode1", "erode2", "dilate1",
             "dilate2")


def user_maps(args: argparse.Namespace) -> None:
    """Two-class sets only: the foreground of each degraded map, filtered and thresholded."""
    model_gsd = {"buildings": 0.3, "roads": 0.5}[args.set]
    scenes = load_scenes(args.set, args.limit)
    for group in args.groups.split(","):
        accs: dict[tuple[str, str], MetricAccumulator] = {}
        for s in scenes[group]:
            rgb = torch.from_numpy(s.image.astype(np.float32) / 255.0)
            guides = {"colour": rgb, "grey": rgb.mean(0, keepdim=True)}
            for name in USER_MAPS:
                cm = degrade(s.label, name, num_classes=2, gsd=s.gsd, model_gsd=model_gsd)
                cm = np.where(cm == 255, 0, cm)
                fg = torch.from_numpy((cm == 1).astype(np.float32))[None]
                maps = {"as given": cm}
                for guide, g in guides.items():
                    for r in args.radii:
                        for e in args.eps:
                            q = guided_filter(g, fg, int(r), e)[0]
                            maps[f"{guide}, r {int(r)}, eps {e:g}"] = (q > 0.5).numpy().astype(
                                np.uint8)
                for key, pred in maps.items():
                    acc = accs.setdefault((name, key), MetricAccumulator(["bg", "fg"]))
                    acc.update(pred, s.label)
        print(f"\n{group}: {len(scenes[group])} scene(s)\n| coarse map | filter | IoU | BF@2 |\n"
              "|---|---|---|---|")
        for (name, key), acc in accs.items():
            res = acc.result()
            print(f"| {name} | {key} | {100 * res['iou']['fg']:.1f} | "
                  f"{100 * (res['boundary_f']['2']['fg'] or 0.0):.1f} |", flush=True)


if __name__ == "__main__":
    main()

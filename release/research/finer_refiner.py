"""Research: does the refiner place boundaries better on a grid finer than the coarse model's?

For drone inputs the engine runs both networks at the working GSD W and brings the result
to the input's grid with the edge-aware upsampling (``idgbr_geo.upsampling``). Here, per
held-out drone scene (Banepa), the whole scene as one window: the coarse model with the
card's views at W; the refiner (a) at W as the engine runs it and (b) at W / ``--fine`` on
the image resampled there (never finer than the scene's own GSD), reading the coarse
probabilities upsampled bilinearly. Each map goes to the native grid bilinearly and with
the edge-aware upsampling (radius :data:`~idgbr_geo.upsampling.RADIUS` model pixels, and
``--fine`` times that on the finer grid, the same ground reach), and is scored there.

    .venv/bin/python release/research/finer_refiner.py --gsd 0.25 --fine 2 --threads 2
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from validate import load_scenes  # noqa: E402

from idgbr_geo.metrics import MetricAccumulator  # noqa: E402
from idgbr_geo.predict import predict_windows  # noqa: E402
from idgbr_geo.registry import load_model  # noqa: E402
from idgbr_geo.upsampling import RADIUS, own_grid_colour, upsample_probabilities  # noqa: E402


def on_grid(image: np.ndarray, gsd: float, target: float, norm, multiple: int = 32
            ) -> tuple[torch.Tensor, tuple[int, int]]:
    """``image`` (bands, H, W) uint8 at ``gsd`` m normalised and resampled to ``target`` m,
    zero-padded to a ``multiple``; and its size before the padding."""
    h, w = image.shape[1:]
    size = (max(multiple, round(h * gsd / target)), max(multiple, round(w * gsd / target)))
    x = torch.from_numpy(norm.apply(image, "uint8"))[None]
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    ph, pw = (math.ceil(s / multiple) * multiple for s in size)
    return F.pad(x, (0, pw - size[1], 0, ph - size[0])), size


def to_native(probs: torch.Tensor, x: torch.Tensor, size: tuple[int, int],
              image: np.ndarray, norm, radius: int | None) -> np.ndarray:
    """Class ids on ``image``'s grid of a window's probabilities (1, K, h, w) made on the
    image ``x`` (normalised, padded): bilinear (``radius`` None) or edge-aware."""
    p = probs[0, :, : size[0], : size[1]].float()
    if radius is None:
        q = F.interpolate(p[None], size=image.shape[1:], mode="bilinear",
                          align_corners=False)[0]
    else:
        mean = torch.tensor(norm.mean)[:, None, None]
        std = torch.tensor(norm.std)[:, None, None]
        low = x[0, :, : size[0], : size[1]] * std + mean
        q = upsample_probabilities(p, low, torch.from_numpy(image), scale=1 / 255.0,
                                   radius=radius,
                                   colour=own_grid_colour(image.shape[-1] / size[1]))
    return q.argmax(0).numpy().astype(np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="buildings")
    ap.add_argument("--model", default="buildings")
    ap.add_argument("--group", default="banepa")
    ap.add_argument("--gsd", type=float, default=0.25, help="the working GSD W [0.25]")
    ap.add_argument("--fine", type=float, default=2.0, help="the refiner at W / FINE [2]")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    m = load_model(args.model, "cpu")
    card, norm = m.card, m.card.normalization
    runs = ("coarse at W", "refined at W", "refined at W/fine")
    acc = {(r, u): MetricAccumulator(list(card.classes)) for r in runs
           for u in ("bilinear", "edge-aware")}
    scenes = load_scenes(args.set, args.limit)
    with torch.inference_mode():
        for s in scenes[args.group]:
            x, size = on_grid(s.image, s.gsd, args.gsd, norm, card.stride_multiple)
            coarse, _ = predict_windows(m, x, origins=[(0, 0)], refine=False,
                                        zooms=card.coarse_zooms, precision=args.precision)
            refined, _ = predict_windows(m, x, coarse=coarse, origins=[(0, 0)],
                                         precision=args.precision)
            fine = max(args.gsd / args.fine, s.gsd)
            xf, sizef = on_grid(s.image, s.gsd, fine, norm, card.stride_multiple)
            cf = F.interpolate(coarse[:, :, : size[0], : size[1]], size=sizef,
                               mode="bilinear", align_corners=False)
            cf = F.pad(cf, (0, xf.shape[-1] - sizef[1], 0, xf.shape[-2] - sizef[0]))
            refined_f, _ = predict_windows(m, xf, coarse=cf, origins=[(0, 0)],
                                           precision=args.precision)
            reach = round(RADIUS * args.gsd / fine)
            for run, p, xx, sz, r in ((runs[0], coarse, x, size, RADIUS),
                                      (runs[1], refined, x, size, RADIUS),
                                      (runs[2], refined_f, xf, sizef, reach)):
                acc[(run, "bilinear")].update(to_native(p, xx, sz, s.image, norm, None),
                                              s.label)
                acc[(run, "edge-aware")].update(to_native(p, xx, sz, s.image, norm, r),
                                                s.label)
    cls = card.classes[1]
    for (run, up), a in acc.items():
        r = a.result()
        print(f"{run:18s} {up:10s} IoU {100 * r['iou'][cls]:.1f} "
              f"BF@2 {100 * r['boundary_f']['2'][cls]:.1f}")


if __name__ == "__main__":
    main()

"""Out-of-fold coarse maps for refiner training (developer script).

    OMP_NUM_THREADS=1 .venv/bin/python release/oof_maps.py buildings [--iterations 2500]
        [--config JSON] [--crop 128] [--lr 2e-3] [--batch-size 8] [--folds N [--interleave]]
        [--jobs 2]

A coarse model is nearly perfect on its own training chips, so a refiner that learns from
those maps learns to trust them; on new scenes the coarse maps are far worse. This script
trains one coarse model per area of ``.train/<set>_train.npz`` (or per group of areas, with
``--folds``; the area is the scene name's first ``_`` part) on the chips of the *other*
areas, lets it map the chips of the area it never saw, and writes
``.train/<set>_train_oof.npz``: the same chips plus ``coarse`` maps (uint8 probabilities
x 255) that carry the errors of a model on unseen imagery.
``train_models.py refiner <set> --arrays <set>_train_oof --no-coarse`` then learns from them
(and from degraded ground truth, as always).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from idgbr_geo.cards import ModelCard, Normalization
from idgbr_geo.checkpoints import segmentor_from_checkpoint
from idgbr_geo.chips import load_npz
from idgbr_geo.interfaces import Model
from idgbr_geo.predict import predict_windows
from idgbr_geo.registry import load_checkpoint
from idgbr_geo.training import train_coarse

ROOT = Path(__file__).resolve().parent.parent / ".train"


def areas_of(scenes: np.ndarray) -> np.ndarray:
    return np.array([str(s).split("_")[0] for s in scenes])


def folds_of(areas: np.ndarray, n: int | None, interleave: bool = False) -> list[list[str]]:
    """The areas, one fold each, or in ``n`` groups: neighbours in sorted order, or with
    ``interleave`` every n-th name (so that areas of one source, e.g. the two drone towns,
    fall in different folds and each fold model still sees that source)."""
    names = sorted(set(areas.tolist()))
    if n is None:
        return [[a] for a in names]
    if interleave:
        return [names[i::n] for i in range(n) if names[i::n]]
    return [list(g) for g in np.array_split(np.array(names), n) if len(g)]


def _save_arrays(path: Path, data: dict) -> None:
    """Write training arrays as ``load_npz`` read them (its class list back to an array)."""
    np.savez(path, **{k: np.array(v) if k == "classes" else v for k, v in data.items()})


def _fold_name(fold: list[str]) -> str:
    """The fold's areas joined; a long list (e.g. dozens of tiles) as its first area, its
    size and a digest, to stay within file-name limits."""
    name = "+".join(a.replace("/", "-") for a in fold)
    if len(name) <= 80:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{fold[0].replace('/', '-')}+{len(fold) - 1}-more-{digest}"


def _train_fold(args: argparse.Namespace, fold: list[str]) -> Path:
    """Train the coarse model that never sees the areas of ``fold``; returns its checkpoint."""
    data = load_npz(ROOT / f"{args.set}_train.npz")
    keep = ~np.isin(areas_of(data["scene"]), fold)
    subset = ROOT / f"{args.set}_train_without-{_fold_name(fold)}.npz"
    n = len(keep)  # every per-chip array (sampling weights, per-chip GSD, ...) is cut too
    _save_arrays(subset, {k: v[keep] if k != "classes" and np.ndim(v) and len(v) == n else v
                          for k, v in data.items()})
    return train_coarse(subset, ROOT / "runs" / f"{args.set}-oof-{_fold_name(fold)}",
                        iterations=args.iterations, batch_size=args.batch_size,
                        crop=args.crop, lr=args.lr, seed=0, device="auto",
                        resume=args.resume, config=json.loads(args.config), progress=True)


@torch.no_grad()
def _predict(ckpt: Path, images: np.ndarray, batch: int = 8) -> np.ndarray:
    """The fold model's probabilities (uint8 x 255) for whole chips (one window each), in
    its normalisation, through the engine's window inference."""
    seg = segmentor_from_checkpoint(ckpt, "cpu")
    state = load_checkpoint(ckpt)
    bands = int(state["config"]["in_channels"])
    card = ModelCard(name=ckpt.parent.name, classes=list(state["classes"]), bands=bands,
                     band_names=[f"band_{b + 1}" for b in range(bands)],
                     normalization=Normalization(**state["normalization"]))
    model = Model(card=card, segmentor=seg, refiner=None)
    norm = model.card.normalization
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(norm.apply(images[i:i + batch], images.dtype))
        probs, _ = predict_windows(model, x, origins=[(0, 0)] * len(x), refine=False)
        out.append(np.rint(probs.numpy() * 255).astype(np.uint8))
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("set")
    ap.add_argument("--iterations", type=int, default=2500)
    ap.add_argument("--config", default='{"output_stride": 16, "widths": [16, 24, 32, 48]}',
                    help="coarse model config of the fold models [the second coarse model's]")
    ap.add_argument("--folds", type=int, default=None, help="groups of areas [one per area]")
    ap.add_argument("--interleave", action="store_true",
                    help="with --folds: every n-th area of the sorted names per fold")
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=2, help="fold models trained side by side")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--fold", default=None, help=argparse.SUPPRESS)  # a child: comma list
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.fold is not None:
        print(_train_fold(args, args.fold.split(",")))
        return
    data = load_npz(ROOT / f"{args.set}_train.npz")
    areas = areas_of(data["scene"])
    todo = folds_of(areas, args.folds, args.interleave)
    if len(todo) < 2:
        raise SystemExit("out-of-fold maps need at least two folds")
    base = [sys.executable, __file__, args.set, "--iterations", str(args.iterations),
            "--config", args.config, "--crop", str(args.crop), "--lr", str(args.lr),
            "--batch-size", str(args.batch_size)] + (["--resume"] if args.resume else [])
    running: list[subprocess.Popen] = []
    for fold in todo:  # fold models in child processes, --jobs at a time
        if len(running) >= args.jobs:
            running.pop(0).wait()
        running.append(subprocess.Popen(base + ["--fold", ",".join(fold)]))
    for p in running:
        p.wait()
    coarse = np.zeros((len(areas), len(data["classes"]), *data["images"].shape[2:]), np.uint8)
    for fold in todo:
        sel = np.flatnonzero(np.isin(areas, fold))
        ckpt = ROOT / "runs" / f"{args.set}-oof-{_fold_name(fold)}" / "checkpoint.pt"
        coarse[sel] = _predict(ckpt, data["images"][sel])
        print(f"{', '.join(fold)}: {len(sel)} chips mapped by the model trained without them",
              file=sys.stderr)
    out = ROOT / f"{args.set}_train_oof.npz"
    _save_arrays(out, {**data, "coarse": coarse})
    print(out)


if __name__ == "__main__":
    main()

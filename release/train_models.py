"""Train the bundled models' networks (developer script; the exact commands go in the cards).

    OMP_NUM_THREADS=1 .venv/bin/python release/train_models.py coarse buildings
    OMP_NUM_THREADS=1 .venv/bin/python release/train_models.py refiner buildings
    ... [--tag NAME] [--iterations N] [--seed N] [--config JSON] [--coarse-run NAME] [--arrays NAME]

Reads ``.train/<set>_train.npz`` (release/prepare_data.py; ``--arrays`` names another
file in .train, e.g. ``<set>_train_oof`` from release/oof_maps.py), writes
``.train/runs/<set>-<tag>/`` (checkpoint.pt, log.csv).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from idgbr_geo.checkpoints import model_stage, segmentor_from_checkpoint
from idgbr_geo.config import TrainingConfig
from idgbr_geo.options import PRECISIONS
from idgbr_geo.training import train_coarse, train_refiner

ROOT = Path(__file__).resolve().parent.parent / ".train"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", choices=["coarse", "refiner"])
    ap.add_argument("set")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--iterations", type=int, default=4000,
                    help="[4000, the bundled coarse models' length]")
    ap.add_argument("--batch-size", type=int, default=TrainingConfig.batch_size)
    ap.add_argument("--crop", type=int, default=TrainingConfig.crop)
    ap.add_argument("--seed", type=int, default=TrainingConfig.seed,
                    help="seed of the crops, augmentation and initialisation (a repeat run)")
    ap.add_argument("--lr", type=float, default=TrainingConfig.lr)
    ap.add_argument("--config", default="{}",
                    help="JSON: network and training settings (idgbr_geo.config.split_config)")
    ap.add_argument("--coarse-run", default="coarse", help="tag of the coarse run to learn from")
    ap.add_argument("--no-coarse", action="store_true",
                    help="no coarse model: degradations (and the arrays' stored maps) only")
    ap.add_argument("--arrays", default=None, help="training arrays in .train [<set>_train]")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--workers", type=int, default=0,
                    help="processes making the training batches ahead (a GPU run) [0]")
    ap.add_argument("--precision", default="float32", choices=PRECISIONS,
                    help="bfloat16: mixed-precision training (AVX-512 BF16 / AMX CPUs) [float32]")
    ap.add_argument("--init-model", default=None,
                    help="start a new run from this model's network (a bundled model name or "
                         "a card path): its segmentor for coarse, its refiner for refiner")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tag = args.tag or args.stage
    out = ROOT / "runs" / f"{args.set}-{tag}"
    common = dict(iterations=args.iterations, batch_size=args.batch_size, crop=args.crop,
                  lr=args.lr, seed=args.seed, device="auto", resume=args.resume,
                  config=json.loads(args.config), progress=True, workers=args.workers,
                  precision=args.precision)
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True  # fixed crop size: pick the fastest kernels
    if args.init_model:
        common["init_weights"] = model_stage(args.init_model, args.stage)[1]
    train = ROOT / f"{args.arrays or args.set + '_train'}.npz"
    if args.stage == "coarse":
        path = train_coarse(train, out, val_npz=ROOT / f"{args.set}_val.npz", **common)
    else:
        coarse = None
        if not args.no_coarse:
            coarse = segmentor_from_checkpoint(
                ROOT / "runs" / f"{args.set}-{args.coarse_run}" / "checkpoint.pt", "auto")
        path = train_refiner(train, out, coarse=coarse, val_npz=ROOT / f"{args.set}_val.npz",
                             **common)
    print(path)


if __name__ == "__main__":
    main()

"""Train a set's coarse model, then its refiner, within a wall-clock budget (a lent GPU).

A GPU session is short and the machine's speed is not known beforehand. For each stage this
times a short throwaway run (same data, settings and workers), sets the stage's iterations
to fill its share of the budget, and trains it with the same library calls as
release/train_models.py, printing the equivalent train_models.py command with the
iteration count it chose. The weights-only checkpoints (the averaged weights; optimiser
state dropped, so a file stays under the 16 MB a GPU session may return) and the logs go to
``--out``; copy them to ``.train/runs/<set>-<tag>/checkpoint.pt`` to validate and export.

    python release/train_timed.py buildings --seconds 420 --coarse-share 0.7 --workers 6 \\
        --batch-size 16 --init-card .train/gpu/init/buildings.json --out $OUT \\
        --coarse-config JSON --refiner-config JSON
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
from pathlib import Path

import torch

from idgbr_geo.checkpoints import model_stage, segmentor_from_checkpoint, weights_only
from idgbr_geo.registry import load_checkpoint
from idgbr_geo.training import train_coarse, train_refiner

ROOT = Path(__file__).resolve().parent.parent / ".train"
#: iterations of the throwaway run that times a stage (the rate is read from its second half)
PROBE = 60


def _rate(fn, out: Path, **kw) -> float:
    """Iterations per second of ``fn`` (train_coarse / train_refiner) on this machine."""
    fn(out=out, iterations=PROBE, checkpoint_every=PROBE // 2, **kw)
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    shutil.rmtree(out)
    return (PROBE // 2) / max(float(rows[1]["seconds"]) - float(rows[0]["seconds"]), 1e-3)


def _slim(ckpt: Path, dst: Path) -> None:
    """The checkpoint without what only resuming needs (optimiser, raw weights, RNG)."""
    torch.save(weights_only(load_checkpoint(ckpt)), dst)


def _stage(kind: str, fn, args: argparse.Namespace, budget_end: float, say, *, tag: str,
           extra: str, **kw) -> Path:
    """Probe ``fn``'s speed, train ``kind`` for the iterations that end near ``budget_end``
    (90% of the measured rate), write its slim checkpoint to ``--out``; the run folder."""
    runs = ROOT / "runs"
    train = ROOT / f"{args.set}_train.npz"
    t0 = time.time()
    rate = _rate(lambda out, **k: fn(train, out, **k), runs / f"probe-{kind}" / args.set, **kw)
    iters = max(100, int(rate * (budget_end - time.time()) * 0.9) // 50 * 50)
    say(f"{kind}: {rate:.2f} it/s (probe {time.time() - t0:.0f} s) -> {iters} iterations")
    say(f"command: python release/train_models.py {kind} {args.set} {extra}--tag {tag} "
        f"--iterations {iters} --crop {args.crop} --batch-size {args.batch_size} "
        f"--lr {kw['lr']} --workers {args.workers} --init-model {args.init_card} "
        f"--config '{json.dumps(kw['config'])}'")
    out = runs / f"{args.set}-{tag}"
    t0 = time.time()
    ckpt = fn(train, out, iterations=iters, checkpoint_every=500 if kind == "coarse" else 250,
              **kw)
    say(f"{kind} done in {time.time() - t0:.0f} s")
    _slim(ckpt, args.out / f"{args.set}-{kind}.pt")
    with open(out / "log.csv") as f:
        say(f"{kind} log:\n" + f.read())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("set")
    ap.add_argument("--seconds", type=float, required=True, help="budget of both stages")
    ap.add_argument("--coarse-share", type=float, default=0.7)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--coarse-lr", type=float, default=1e-3)
    ap.add_argument("--refiner-lr", type=float, default=1e-3)
    ap.add_argument("--coarse-config", default="{}")
    ap.add_argument("--refiner-config", default="{}")
    ap.add_argument("--init-card", default=None, help="start both stages from this model")
    ap.add_argument("--workers", type=int, default=6)
    ap.add_argument("--no-refiner", action="store_true",
                    help="the coarse model only, in the whole budget")
    ap.add_argument("--tag", default="gpu")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    t_start = time.time()
    t_end = t_start + args.seconds
    torch.backends.cudnn.benchmark = True
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / f"{args.set}-{args.tag}.txt", "a") as log:

        def say(text: str) -> None:
            print(f"[{args.set}] {text}", flush=True)
            log.write(text + "\n")
            log.flush()

        say(f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
        common = dict(batch_size=args.batch_size, crop=args.crop, seed=0, device="auto",
                      progress=False, workers=args.workers)
        init = model_stage(args.init_card, "coarse")[1] if args.init_card else None
        share = 1.0 if args.no_refiner else args.coarse_share
        coarse_dir = _stage("coarse", train_coarse, args, t_start + share * args.seconds, say,
                            tag=args.tag, extra="", lr=args.coarse_lr,
                            config=json.loads(args.coarse_config), init_weights=init, **common)
        if args.no_refiner:
            return
        coarse = segmentor_from_checkpoint(coarse_dir / "checkpoint.pt", "auto")
        init = model_stage(args.init_card, "refiner")[1] if args.init_card else None
        _stage("refiner", train_refiner, args, t_end - 10, say, tag=f"{args.tag}-refiner",
               extra=f"--coarse-run {args.tag} ", lr=args.refiner_lr,
               config=json.loads(args.refiner_config), init_weights=init, coarse=coarse,
               **common)


if __name__ == "__main__":
    main()

"""Uniform weight soup of refiner runs that share a start (session 23).

A refiner's run-to-run spread is about 1 IoU per held-out set (session 22); averaging the
weights of runs fine-tuned from one refiner with other seeds should keep what they share
and drop some of each run's luck. The first checkpoint gives every field but the weights:

    .venv/bin/python release/research/refiner_soup.py OUT.pt RUN1.pt RUN2.pt [RUN3.pt ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from idgbr_geo.checkpoints import weights_only  # noqa: E402
from idgbr_geo.registry import load_checkpoint  # noqa: E402
from research.weight_soup import same_network, uniform_mean  # noqa: E402


def refiner_soup(out: Path, runs: list[Path]) -> Path:
    """Write ``runs``' first checkpoint with the mean of all their weights to ``out``."""
    states = [load_checkpoint(p) for p in runs]
    if any(s.get("kind") != "refiner" for s in states):
        raise SystemExit("every checkpoint must be a refiner run's")
    if not same_network([s["model"] for s in states]):
        raise SystemExit("the runs have different networks")
    state = states[0]
    state["model"] = uniform_mean([s["model"] for s in states])
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(weights_only(state), out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("runs", type=Path, nargs="+")
    args = ap.parse_args()
    if len(args.runs) < 2:
        raise SystemExit("give at least two refiner checkpoints")
    print(refiner_soup(args.out, args.runs))


if __name__ == "__main__":
    main()

"""Join ``lite-fpn`` coarse checkpoints into one output ensemble (their logits averaged).

A weight soup averages only networks that share a start and a seed: session 28's long roads
member (seed 2) needed a large calibration shift in the soup and cost RoadNet 3.6 IoU. An
output ensemble averages what the networks say instead, so members that trained apart (other
seeds, other data orders) can be combined; each costs one more network pass per window. The
first checkpoint stays the first member (its weights keep their names, so a refiner trained
on it still shares its encoder); the others go under ``others.<i>.``. Each member should be
calibrated on its own first (``weight_soup.py --calibrate``).

No shipped card is an ensemble (session 31: against the shipped soups the two-member
ensembles lost on most sets, ``docs/experiments.md``), so the package does not run one: apply
``output_ensemble.patch`` first (``git apply release/research/output_ensemble.patch``: the
``lite-fpn`` setting ``members`` and its tests), then this script's checkpoints export, load
and validate like any coarse checkpoint.

    .venv/bin/python release/research/ensemble.py roads \
        .train/runs/roads-s29-soup4-long0/checkpoint.pt \
        .train/runs/roads-s28-long-cal/checkpoint.pt \
        --out .train/runs/roads-s31-ensemble/checkpoint.pt [--card .train/s31/card-ens]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from weight_soup import coarse_card  # noqa: E402

from idgbr_geo.checkpoints import weights_only  # noqa: E402
from idgbr_geo.registry import load_checkpoint  # noqa: E402


def _single(path: Path) -> dict:
    """A checkpoint of one lite-fpn network (not an ensemble already), or SystemExit."""
    state = load_checkpoint(path)
    if state.get("arch") != "lite-fpn" or state["config"].get("members", 1) != 1:
        raise SystemExit(f"{path} is not a single lite-fpn coarse checkpoint")
    return state


def join(first: Path, others: list[Path], out: Path) -> Path:
    """Write the ensemble of ``first`` and ``others`` (single networks of one shape)."""
    state = _single(first)
    names = set(state["model"])
    model = dict(state["model"])
    for i, path in enumerate(others):
        other = _single(path)
        if {**other["config"], "members": 1} != {**state["config"], "members": 1}:
            raise SystemExit(f"{path} has another network shape than {first}")
        if set(other["model"]) != names:
            raise SystemExit(f"{path} has other weights than {first}")
        model.update({f"others.{i}.{k}": v for k, v in other["model"].items()})
    state["config"] = {**state["config"], "members": len(others) + 1}
    state["model"] = model
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(weights_only(state), out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="bundled model name or card (for --card's settings)")
    ap.add_argument("first", type=Path, help="coarse checkpoint: the first member")
    ap.add_argument("others", type=Path, nargs="+", help="coarse checkpoints: more members")
    ap.add_argument("--out", type=Path, required=True, help="the ensemble's checkpoint")
    ap.add_argument("--card", type=Path, help="also write a coarse-only card of it here")
    args = ap.parse_args()
    print(join(args.first, args.others, args.out))
    if args.card is not None:
        print(coarse_card(args.model, args.out, args.card))


if __name__ == "__main__":
    main()

"""Write a copy of a set's training arrays with another source mix (sampling weights only).

The bundled mixes (``prepare_data.MIX``) decide how often each source's chips are drawn; a
soup member trained on another mix sees the same chips in other proportions, so it learns
apart from the others while starting from the same weights (session 22).

    .venv/bin/python release/research/remix.py buildings sat --mix oam=0.3,xdomain=0.5,dubai=0.2

writes ``.train/buildings_train_sat.npz`` (for ``train_models.py --arrays buildings_train_sat``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from prepare_data import source_weights  # noqa: E402

ROOT = Path(__file__).resolve().parents[2] / ".train"


def remix(sources: np.ndarray, mix: dict[str, float]) -> np.ndarray:
    """Per-chip weights (:func:`prepare_data.source_weights`); a source of ``mix`` without
    chips is a typing error here, not a source to leave out."""
    unknown = set(mix) - set(np.unique(sources).tolist())
    if unknown:
        raise ValueError(f"no chips of source(s) {sorted(unknown)}")
    return source_weights(sources, mix)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("set")
    ap.add_argument("tag", help="the copy is .train/<set>_train_<tag>.npz")
    ap.add_argument("--mix", required=True, help="source=share,... (shares are normalised)")
    args = ap.parse_args()
    mix = {k: float(v) for k, v in (p.split("=") for p in args.mix.split(","))}
    total = sum(mix.values())
    mix = {k: v / total for k, v in mix.items()}
    data = dict(np.load(ROOT / f"{args.set}_train.npz"))
    data["weight"] = remix(data["chip_source"], mix)
    out = ROOT / f"{args.set}_train_{args.tag}.npz"
    np.savez(out, **data)  # uncompressed: written and read once or twice
    print(out, {s: round(float(data["weight"][data["chip_source"] == s].sum()), 3)
                for s in mix})


if __name__ == "__main__":
    main()

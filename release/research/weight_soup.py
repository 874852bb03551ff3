"""Average a coarse training checkpoint's weights with a model's segmentor (a weight "soup").

WiSE-FT (Wortsman et al., CVPR 2022): interpolating between the weights a network started
from and those it was fine-tuned to keeps much of the starting network's robustness under
distribution shift while keeping most of the fine-tuning's gain. Here: the bundled segmentor
(the start) and a longer GPU run that began from it. Writes a coarse checkpoint with
``alpha`` x the run's weights + (1 - alpha) x the model's (integer buffers: the run's).

    .venv/bin/python release/research/weight_soup.py roads .train/runs/roads-gpu/checkpoint.pt \
        .train/runs/roads-soup/checkpoint.pt [--alpha 0.5] [--card .train/s11/card-roads-soup]

``--card`` also writes a coarse-only card of the soup there (no refiner, 0 sampling steps, the
model's working-GSD fields), for ``release/validate.py <set> --model <folder>/<set>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from validate import card_from_checkpoint  # noqa: E402

from idgbr_geo.cards import SamplingConfig  # noqa: E402
from idgbr_geo.checkpoints import export_model, model_stage, weights_only  # noqa: E402
from idgbr_geo.registry import load_checkpoint, read_model  # noqa: E402


def soup(model: str, run: Path, out: Path, alpha: float) -> Path:
    state = load_checkpoint(run)
    start = model_stage(model, "coarse")[1]
    mine = state["model"]
    if set(mine) != set(start) or any(v.shape != start[k].shape for k, v in mine.items()):
        raise SystemExit("the run and the model's segmentor have different networks")
    state["model"] = {k: (alpha * v + (1 - alpha) * start[k].to(v.dtype))
                      if v.is_floating_point() else v for k, v in mine.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(weights_only(state), out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="bundled model name or card")
    ap.add_argument("run", type=Path, help="coarse checkpoint of a run that started from it")
    ap.add_argument("out", type=Path)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--card", type=Path, help="also write a coarse-only card of the soup here")
    args = ap.parse_args()
    print(soup(args.model, args.run, args.out, args.alpha))
    if args.card is not None:
        print(coarse_card(args.model, args.out, args.card))


def coarse_card(model: str, checkpoint: Path, folder: Path) -> Path:
    """A coarse-only card of ``checkpoint`` that resamples inputs as ``model``'s card does."""
    bundled = read_model(model)[0]
    card = card_from_checkpoint(bundled.name, checkpoint, SamplingConfig(steps=0))
    card = dataclasses.replace(card, gsd_choices=bundled.gsd_choices,
                               gsd_without_crs=bundled.gsd_without_crs)
    return export_model(checkpoint, None, card, folder)


if __name__ == "__main__":
    main()

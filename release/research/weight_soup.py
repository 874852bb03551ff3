"""Average a coarse training checkpoint's weights with a model's segmentor (a weight "soup").

WiSE-FT (Wortsman et al., CVPR 2022): interpolating between the weights a network started
from and those it was fine-tuned to keeps much of the starting network's robustness under
distribution shift while keeping most of the fine-tuning's gain. Here: the bundled segmentor
(the start) and a longer GPU run that began from it. Writes a coarse checkpoint with
``alpha`` x the run's weights + (1 - alpha) x the model's (integer buffers: the run's).

    .venv/bin/python release/research/weight_soup.py roads .train/runs/roads-gpu/checkpoint.pt \
        .train/runs/roads-soup/checkpoint.pt [--alpha 0.5]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from idgbr_geo.checkpoints import model_stage, weights_only
from idgbr_geo.registry import load_checkpoint


def soup(model: str, run: Path, out: Path, alpha: float) -> Path:
    state = load_checkpoint(run)
    start = model_stage(model, "coarse")[1]
    mine = state["model"]
    if set(mine) != set(start):
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
    args = ap.parse_args()
    print(soup(args.model, args.run, args.out, args.alpha))


if __name__ == "__main__":
    main()

"""Probe: the refiner's changes kept only near the coarse map's class boundaries (session 23).

A pixel takes the refiner's probabilities only if the coarse map has more than one class
within ``RADIUS`` model pixels of it (a hard band); everywhere else it keeps the coarse
probabilities. Inference only, through ``release/validate.py`` and so the engine's own
``predict_windows``, which this script patches (the gate hook) before running it:

    .venv/bin/python release/research/band_probe.py RADIUS buildings --model CARD ...
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import idgbr_geo.predict as predict  # noqa: E402


def banded(refined: torch.Tensor, coarse: torch.Tensor, radius: int) -> torch.Tensor:
    """``refined`` where ``coarse`` has two classes within ``radius`` px, else ``coarse``."""
    onehot = F.one_hot(coarse.argmax(1), coarse.shape[1]).permute(0, 3, 1, 2).float()
    present = F.max_pool2d(onehot, 2 * radius + 1, stride=1, padding=radius).sum(1, keepdim=True)
    return torch.where(present > 1.5, refined, coarse)


def main() -> None:
    radius = int(sys.argv.pop(1))

    def gate(refined: torch.Tensor, coarse: torch.Tensor, _: Sequence[float]) -> torch.Tensor:
        return banded(refined, coarse, radius)

    # a gate above 0 makes predict_windows call apply_gate, which now applies the band
    predict.gate_thresholds = lambda _gate, k: [1e-9] * k
    predict.apply_gate = gate
    import validate

    validate.main()


if __name__ == "__main__":
    main()

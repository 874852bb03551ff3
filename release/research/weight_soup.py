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
``--also CKPT...`` makes the uniform soup of the model's segmentor, the run and those
checkpoints (``alpha`` unused); ``--update-bn N`` then re-estimates the batch-norm statistics
on N training batches of ``.train/<set>_train.npz`` (SWA's ``update_bn``: averaged statistics
need not fit averaged weights); ``--calibrate N`` shifts a two-class soup's foreground logit
(the head's bias) so that the share of pixels it marks on N batches of plain training crops
(no colour or sensor augmentation) equals the labels' share there: a soup of runs that
trained apart is biased towards one class (session 19).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.swa_utils import update_bn as update_bn_stats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from validate import card_from_checkpoint, with_settings  # noqa: E402

from idgbr_geo.cards import Normalization, SamplingConfig  # noqa: E402
from idgbr_geo.checkpoints import (  # noqa: E402
    build_segmentor_net,
    checkpoint_settings,
    export_model,
    model_stage,
    weights_only,
)
from idgbr_geo.chips import load_npz, sample_batches  # noqa: E402
from idgbr_geo.registry import load_checkpoint, read_model  # noqa: E402


def same_network(states: list[dict[str, torch.Tensor]]) -> bool:
    """Whether state dicts have the same keys and shapes (weights that can be averaged)."""
    first = states[0]
    return all(set(s) == set(first) and all(v.shape == s[k].shape for k, v in first.items())
               for s in states[1:])


def uniform_mean(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The plain mean of state dicts with the same keys, in the first one's dtypes (summed in
    list order, so a recorded soup command gives the same bits); integer buffers (the norms'
    batch counters) are the first one's."""
    first, n = states[0], len(states)
    return {k: (sum((s[k].to(v.dtype) for s in states[1:]), v) / n)
            if v.is_floating_point() else v for k, v in first.items()}


def soup(model: str, run: Path, out: Path, alpha: float, also: tuple[Path, ...] = ()) -> Path:
    """``alpha`` x the run's weights + (1 - alpha) x the model's; with ``also``, the plain
    mean of the model's, the run's and theirs."""
    state = load_checkpoint(run)
    start = model_stage(model, "coarse")[1]
    mine = state["model"]
    others = [load_checkpoint(p)["model"] for p in also]
    if not same_network([mine, start, *others]):
        raise SystemExit("the run and the model's segmentor have different networks")
    if others:
        state["model"] = uniform_mean([mine, start, *others])
    else:
        state["model"] = {k: (alpha * v + (1 - alpha) * start[k].to(v.dtype))
                          if v.is_floating_point() else v for k, v in mine.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(weights_only(state), out)
    return out


def _network(checkpoint: Path) -> tuple[dict, torch.nn.Module, Any]:
    """A coarse checkpoint's state, its network in eval mode and its training settings."""
    state = load_checkpoint(checkpoint)
    arch, tc, cin, k = checkpoint_settings(state, "coarse", checkpoint)
    net = build_segmentor_net(arch, in_channels=cin, num_classes=k)
    net.load_state_dict(state["model"])
    return state, net.eval(), tc


@torch.no_grad()
def update_bn(checkpoint: Path, npz: Path, batches: int, seed: int = 0) -> Path:
    """Replace the checkpoint's batch-norm statistics by their mean over ``batches``
    training batches (its own crop, batch size, scales and sensor augmentation)."""
    state, net, tc = _network(checkpoint)
    stream = sample_batches(load_npz(npz), Normalization(**state["normalization"]), tc.crop,
                            tc.batch_size, np.random.default_rng(seed), scale=tc.scale,
                            sensor=tc.sensor_aug)
    update_bn_stats((next(stream)[0] for _ in range(batches)), net)
    state["model"] = {k: v.detach().clone() for k, v in net.state_dict().items()}
    torch.save(weights_only(state), checkpoint)
    return checkpoint


@torch.no_grad()
def calibrate(checkpoint: Path, npz: Path, batches: int, seed: int = 123) -> float:
    """Shift the foreground logit of a two-class checkpoint so that it marks as many pixels
    of ``batches`` plain training crops as their labels do; returns the shift."""
    state, net, tc = _network(checkpoint)
    if getattr(getattr(net, "head", None), "out_channels", None) != 2:
        raise SystemExit("--calibrate needs a two-class network with a 'head' layer")
    stream = sample_batches(load_npz(npz), Normalization(**state["normalization"]), tc.crop,
                            tc.batch_size, np.random.default_rng(seed), scale=tc.scale,
                            sensor=False, colour=False)
    margins, labels = [], []
    for _ in range(batches):
        img, lab, _ = next(stream)
        logits = torch.nn.functional.interpolate(net(img), size=img.shape[-2:],
                                                 mode="bilinear", align_corners=False)
        keep = lab != 255
        margins.append((logits[:, 1] - logits[:, 0])[keep])
        labels.append(lab[keep])
    margin = torch.cat(margins)
    share = torch.cat(labels).float().mean()
    lo, hi = -10.0, 10.0  # the marked share grows with the shift: bisect
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if ((margin + mid) > 0).float().mean() > share else (mid, hi)
    shift = round((lo + hi) / 2, 3)  # a number the card can quote
    state["model"]["head.bias"] = state["model"]["head.bias"] + torch.tensor([0.0, shift])
    torch.save(weights_only(state), checkpoint)
    return shift


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="bundled model name or card")
    ap.add_argument("run", type=Path, help="coarse checkpoint of a run that started from it")
    ap.add_argument("out", type=Path)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--also", type=Path, nargs="+", default=(),
                    help="more checkpoints: the uniform soup of all")
    ap.add_argument("--update-bn", type=int, default=0, metavar="N",
                    help="re-estimate the norms' statistics on N training batches")
    ap.add_argument("--calibrate", type=int, default=0, metavar="N",
                    help="match the labels' foreground share on N plain training batches")
    ap.add_argument("--card", type=Path, help="also write a coarse-only card of the soup here")
    args = ap.parse_args()
    print(soup(args.model, args.run, args.out, args.alpha, tuple(args.also)))
    npz = Path(f".train/{read_model(args.model)[0].name}_train.npz")
    if args.update_bn:
        print(update_bn(args.out, npz, args.update_bn))
    if args.calibrate:
        print(f"foreground logit shifted by {calibrate(args.out, npz, args.calibrate):+.3f}")
    if args.card is not None:
        print(coarse_card(args.model, args.out, args.card))


def coarse_card(model: str, checkpoint: Path, folder: Path) -> Path:
    """A coarse-only card of ``checkpoint`` that runs as ``model``'s card does (its working
    GSDs, views and edge filter)."""
    bundled = read_model(model)[0]
    card = card_from_checkpoint(bundled.name, checkpoint, SamplingConfig(steps=0))
    return export_model(checkpoint, None, with_settings(card, bundled), folder)


if __name__ == "__main__":
    main()

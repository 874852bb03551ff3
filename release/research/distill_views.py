"""Teach a segmentor's single view what its zoomed views add (self-distillation).

The bundled segmentors average each unsure window over views at 0.8x and 1.25x zoom
(``coarse_zooms``): +1.2 pooled coarse IoU for buildings (session 11) at 3.4x the coarse
model's time. Test-time augmentation can be distilled into the network (the teacher's
averaged probabilities as soft targets on the training crops, as in knowledge
distillation, Hinton et al. 2015): the student then reads one view at the teacher's quality,
or close to it, at a third of the cost. The student starts from the teacher's own weights
and learns from the soft targets on the same augmented training crops the segmentor saw
(``--label-weight`` mixes in the labels' cross-entropy + soft Dice).

    OMP_NUM_THREADS=2 .venv/bin/python release/research/distill_views.py buildings \
        --init .train/runs/buildings-s19-soup3cal/checkpoint.pt --tag s25-distill \
        --iterations 800 --lr 2e-4 --threads 2 [--resume]

Writes ``.train/runs/<set>-<tag>/`` like ``train_models.py coarse`` (a coarse checkpoint a
refiner run, ``weight_soup.py`` and ``validate.py --coarse-tag`` read).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812

from idgbr_geo.cards import Normalization
from idgbr_geo.checkpoints import build_segmentor_net, checkpoint_settings
from idgbr_geo.chips import load_npz
from idgbr_geo.config import TrainingConfig, split_config
from idgbr_geo.losses import coarse_loss
from idgbr_geo.registry import load_checkpoint, load_model
from idgbr_geo.training import _fit, _load_init, _Run, _validate_coarse
from idgbr_geo.views import multiscale_probabilities

ROOT = Path(__file__).resolve().parents[2] / ".train"


def distill(teacher: str, init: Path, train_npz: Path, out_dir: Path, *,
            val_npz: Path | None = None, iterations: int = 800, lr: float = 2e-4,
            batch_size: int = 8, crop: int = 256, seed: int = 0, label_weight: float = 0.0,
            config: dict | None = None, freeze_encoder: bool = False,
            checkpoint_every: int = 250, resume: bool = False,
            progress: bool = True) -> Path:
    """Train a student from the coarse checkpoint ``init`` on the averaged probabilities of
    ``teacher``'s segmentor over its card's ``coarse_zooms`` (cross-entropy to those soft
    targets, + ``label_weight`` x the labels' loss); return the checkpoint path.
    ``freeze_encoder``: only the decoder learns and every norm keeps its running statistics
    (a lite-fpn student)."""
    model = load_model(teacher, device="cpu")
    zooms = list(model.card.coarse_zooms or [])
    if not zooms:
        raise ValueError(f"{teacher}: no coarse_zooms, nothing to distil")
    segmentor = model.segmentor
    state = load_checkpoint(init)
    arch = checkpoint_settings(state, "coarse", init)[0]
    _, extra = split_config("coarse", config or {}, "config")
    training = TrainingConfig.from_dict(
        {"iterations": iterations, "batch_size": batch_size, "lr": lr, "seed": seed,
         "crop": crop, "checkpoint_every": checkpoint_every, **extra}, "training settings")
    run = _Run("coarse", out_dir, train_npz, device="cpu", resume=resume,
               normalization=Normalization(**state["normalization"]), arch=arch,
               training=training)
    k = len(run.classes)
    net = build_segmentor_net(run.arch, **run.shape, pretrained=False)
    if run.state is None:
        _load_init(net, state["model"])
    if freeze_encoder:
        net.encoder.requires_grad_(False)

    def step(img: torch.Tensor, lab: torch.Tensor, _pre: torch.Tensor | None
             ) -> tuple[torch.Tensor, dict[str, float]]:
        target = multiscale_probabilities(segmentor, img, zooms)
        if freeze_encoder:
            net.eval()  # (after the loop's net.train()): running statistics, gradients kept
        logits = net(img)
        soft = -(target * F.log_softmax(logits, 1)).sum(1).mean()
        loss, parts = soft, {"soft": soft.item()}
        if label_weight > 0:
            loss = loss + label_weight * coarse_loss(logits, lab, k)
        return loss, parts

    val = None if val_npz is None else load_npz(val_npz)
    return _fit(run, net, step, progress=progress,
                validate=None if val is None else
                (lambda: _validate_coarse(net, val, run.norm, k, run.device)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("set")
    ap.add_argument("--teacher", default=None, help="bundled model or card [the set's]")
    ap.add_argument("--init", required=True, help="coarse checkpoint the student starts from")
    ap.add_argument("--tag", required=True)
    ap.add_argument("--iterations", type=int, default=800)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label-weight", type=float, default=0.0)
    ap.add_argument("--config", default='{"scale": [0.5, 2.0], "sensor_aug": true, '
                    '"ema": 0.998, "colour_aug": "strong"}',
                    help="JSON training settings [the shipped members' augmentation]")
    ap.add_argument("--freeze-encoder", action="store_true",
                    help="train the decoder only, every norm on its running statistics: the "
                         "encoder stays the teacher's, so a refiner sharing it still fits")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(distill(args.teacher or args.set, Path(args.init), ROOT / f"{args.set}_train.npz",
                  ROOT / "runs" / f"{args.set}-{args.tag}",
                  val_npz=ROOT / f"{args.set}_val.npz", iterations=args.iterations,
                  lr=args.lr, batch_size=args.batch_size, crop=args.crop, seed=args.seed,
                  label_weight=args.label_weight, config=json.loads(args.config),
                  freeze_encoder=args.freeze_encoder, resume=args.resume))


if __name__ == "__main__":
    main()

"""Research: the coarse model's batch-norm statistics re-estimated on each scene.

Covariate-shift adaptation at test time (AdaBN, Li et al. 2016; with a prior, Schneider et
al. 2020): a scene from another sensor shifts the encoder's activations, and the norms'
stored means and variances, estimated on the training chips, no longer centre them. Per
scene, the engine runs once with every norm accumulating its batch statistics over all the
windows it sees (the zoomed views included), then again, coarse only, with the norms' statistics
``(1 - alpha) * source + alpha * scene``. Nothing is trained; the shipped engine path makes
both maps (:func:`idgbr_geo.engine.refine_raster`, via ``release/validate.py``'s scenes and
scorer).

    .venv/bin/python release/research/bn_adapt.py buildings --alphas 0,0.5,1 [--limit N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from validate import engine, load_scenes, summarise, write_raster  # noqa: E402

from idgbr_geo.config import LiteFpnConfig  # noqa: E402
from idgbr_geo.interfaces import Model  # noqa: E402
from idgbr_geo.lite_fpn import build_lite_fpn  # noqa: E402
from idgbr_geo.metrics import MetricAccumulator  # noqa: E402
from idgbr_geo.registry import load_model  # noqa: E402


class AdaptiveSegmentor:
    """A ``lite-fpn`` segmentor with its norms unfolded, whose statistics can be collected
    on a scene (:meth:`collect`) and mixed with the source's (:meth:`adapt`)."""

    def __init__(self, name: str) -> None:
        shipped = load_model(name, "cpu")
        card = shipped.card
        net = build_lite_fpn(LiteFpnConfig.from_dict(card.segmentor["config"], "card"),
                             in_channels=card.bands, num_classes=card.num_classes)
        state = {k.replace("encoder.encoder.", "encoder."): v
                 for k, v in shipped.segmentor.trained_state.items()}
        net.load_state_dict(state)
        self.net = net.eval().to(memory_format=torch.channels_last)
        self.card = card
        self.num_classes = card.num_classes
        self.norms = [m for m in self.net.modules() if isinstance(m, nn.BatchNorm2d)]
        self.source = [(m.running_mean.clone(), m.running_var.clone()) for m in self.norms]

    @torch.no_grad()
    def predict(self, image: torch.Tensor) -> torch.Tensor:
        x = image.float().contiguous(memory_format=torch.channels_last)
        return torch.softmax(self.net(x).float(), dim=1).contiguous()

    def collect(self) -> None:
        """From now on every norm normalises by its batch's statistics and accumulates
        them (a plain average over the batches)."""
        for m in self.norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()

    def adapt(self, alpha: float) -> None:
        """Back to eval mode, with ``(1 - alpha) * source + alpha * collected``."""
        for m, (mean, var) in zip(self.norms, self.source, strict=True):
            if alpha <= 0 or int(m.num_batches_tracked) == 0:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
            else:
                m.running_mean.mul_(alpha).add_((1 - alpha) * mean)
                m.running_var.mul_(alpha).add_((1 - alpha) * var)
            m.momentum = 0.1
            m.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("set", choices=["buildings", "roads", "landcover"])
    ap.add_argument("--alphas", default="0,0.5,1")
    ap.add_argument("--limit", type=int, default=None, help="at most N scenes per source")
    ap.add_argument("--groups", default=None, help="comma-separated sources (default all)")
    ap.add_argument("--precision", default="bfloat16")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    alphas = [float(a) for a in args.alphas.split(",")]
    seg = AdaptiveSegmentor(args.set)
    model = Model(card=seg.card, segmentor=seg, refiner=None)
    classes = list(seg.card.classes)
    scenes = load_scenes(args.set, args.limit)
    groups = args.groups.split(",") if args.groups else list(scenes)
    out: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for group in groups:
            acc = {a: MetricAccumulator(classes) for a in alphas}
            for i, s in enumerate(scenes[group]):
                path = write_raster(work / f"scene_{i}.tif", s.image, s.gsd)
                seg.collect()
                engine(path, work / "collect.tif", model, coarse_only=True,
                       precision=args.precision)
                collected = [(m.running_mean.clone(), m.running_var.clone(),
                              m.num_batches_tracked.clone()) for m in seg.norms]
                for a in alphas:
                    for m, (mean, var, n) in zip(seg.norms, collected, strict=True):
                        m.running_mean.copy_(mean)
                        m.running_var.copy_(var)
                        m.num_batches_tracked.copy_(n)
                    seg.adapt(a)
                    pred, _ = engine(path, work / "map.tif", model, coarse_only=True,
                                     precision=args.precision)
                    acc[a].update(pred, s.label)
                path.unlink()
            for a in alphas:
                row = summarise(acc[a].result(), classes)
                out.setdefault(group, {})[f"alpha {a:g}"] = row
                print(f"{group}: {len(scenes[group])} scene(s), alpha {a:g}: coarse IoU "
                      f"{row['iou']:.1f}, BF@2 {row['bf2']:.1f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Validation tables for the bundled models: coarse vs refined vs dense CRF, plus ablations.

Runs sliding windows (512 px, overlap 64, blended with :mod:`idgbr_geo.stitching` weights)
over the whole validation scenes of ``.train/<set>_val_scenes.npz`` (written by
benchmarks/prepare_data.py; split by area as /work/shared/data/README.md suggests) at the
model GSD, and scores every map with :func:`idgbr_geo.metrics` pooled over all scenes.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/validate.py buildings --ablations \
        --json .train/val-buildings.json --md .train/val-buildings.md

Networks come from the training runs in ``.train/runs/<set>-<tag>/checkpoint.pt`` (tags:
``coarse``, ``coarse2`` = the second, blurrier coarse model, ``refiner``, and for the
ablations ``refiner-norough`` and ``refiner-oneshot``) or, with ``--model``, from an
exported model card.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from idgbr_geo.cards import Normalization
from idgbr_geo.metrics import MetricAccumulator
from idgbr_geo.stitching import window_weights

ROOT = Path(__file__).resolve().parent.parent / ".train"
TILE, OVERLAP, MULT = 512, 64, 16


def load_scenes(name: str, limit: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    with np.load(ROOT / f"{name}_val_scenes.npz") as z:
        n = len([k for k in z.files if k.startswith("image_")])
        idx = range(n) if limit is None else range(min(n, limit))
        return [(z[f"image_{i}"], z[f"label_{i}"]) for i in idx]


def _starts(size: int) -> list[int]:
    if size <= TILE:
        return [0]
    step = TILE - OVERLAP
    s = list(range(0, size - TILE + 1, step))
    if s[-1] != size - TILE:
        s.append(size - TILE)
    return s


def sliding(fn: Callable[[torch.Tensor, torch.Tensor | None, tuple[int, int]], torch.Tensor],
            image: torch.Tensor, k: int, extra: torch.Tensor | None = None) -> torch.Tensor:
    """Run ``fn(image_window, extra_window, origin) -> (1, K, h, w)`` over overlapping windows
    of a (C, H, W) scene padded to a multiple of 16; blend; return (K, H, W)."""
    _, h, w = image.shape
    ph, pw = -(-h // MULT) * MULT, -(-w // MULT) * MULT
    img = torch.nn.functional.pad(image[None], (0, pw - w, 0, ph - h), mode="reflect")[0]
    ext = None
    if extra is not None:
        ext = torch.nn.functional.pad(extra[None], (0, pw - w, 0, ph - h), mode="replicate")[0]
    acc = torch.zeros(k, ph, pw)
    wsum = torch.zeros(ph, pw)
    for r in _starts(ph):
        for c in _starts(pw):
            th, tw = min(TILE, ph), min(TILE, pw)
            sl = (slice(r, r + th), slice(c, c + tw))
            out = fn(img[:, sl[0], sl[1]][None], None if ext is None else
                     ext[:, sl[0], sl[1]][None], (r, c))[0].float().cpu()
            wt = torch.tensor(window_weights(r, c, th, tw, ph, pw, OVERLAP))
            acc[:, sl[0], sl[1]] += out * wt
            wsum[sl] += wt
    return (acc / wsum.clamp_min(1e-6))[:, :h, :w]


def score(preds: list[np.ndarray], truths: list[np.ndarray], coarse: list[np.ndarray] | None,
          classes: list[str]) -> dict[str, Any]:
    acc = MetricAccumulator(classes, with_coarse=coarse is not None)
    for i, (p, t) in enumerate(zip(preds, truths, strict=True)):
        acc.update(p, t, None if coarse is None else coarse[i])
    return acc.result()


def summarise(res: dict[str, Any], key: str) -> dict[str, float | None]:
    """The table's numbers for one class (or 'mean'), in percent."""
    def g(d: dict[str, Any], m: str, sub: str | None = None) -> float | None:
        v = d.get(m, {})
        v = v.get(sub) if sub else v
        v = v.get(key) if isinstance(v, dict) else None
        return None if v is None else 100.0 * v

    out = {"iou": g(res, "iou"), "bf2": g(res, "boundary_f", "2"),
           "biou": g(res, "boundary_iou"), "miou": g(res, "iou") if key == "mean" else
           100.0 * res["iou"]["mean"]}
    if "coarse" in res:
        out["iou_imp"] = g(res, "iou_imp")
        c = res["coarse"]
        out["d_iou"] = out["iou"] - g(c, "iou")
        out["d_bf2"] = out["bf2"] - g(c, "boundary_f", "2")
    return out


class Blurred:
    """A deliberately blurrier coarse model: another model's probabilities at 1/``factor``."""

    def __init__(self, seg: Any, factor: int) -> None:
        self.seg, self.factor, self.num_classes = seg, factor, seg.num_classes

    def predict(self, image: torch.Tensor) -> torch.Tensor:
        p = torch.nn.functional.avg_pool2d(self.seg.predict(image), self.factor)
        return torch.nn.functional.interpolate(p, size=image.shape[-2:], mode="bilinear",
                                               align_corners=False)


class Validator:
    def __init__(self, name: str, limit: int | None, steps: int, start: str, t_start: float,
                 device: str = "cpu", x0: str = "soft", band: int = 0,
                 gate: float | list[float] = 0.0
                 ) -> None:
        from idgbr_geo.training import load_npz  # noqa: F401  (keeps import errors early)

        self.name = name
        self.scenes = load_scenes(name, limit)
        self.truths = [lab for _, lab in self.scenes]
        self.steps, self.start, self.t_start, self.x0 = steps, start, t_start, x0
        self.band = band
        self.gate = gate
        self.device = device
        self.rows: list[dict[str, Any]] = []

    def images(self, norm: Normalization) -> list[torch.Tensor]:
        return [torch.from_numpy(norm.apply(img, img.dtype)) for img, _ in self.scenes]

    def coarse_maps(self, seg: Any, norm: Normalization) -> list[torch.Tensor]:
        k = seg.num_classes
        return [sliding(lambda x, _e, _o: seg.predict(x), im, k) for im in self.images(norm)]

    def refine_maps(self, ref: Any, norm: Normalization, coarse: list[torch.Tensor],
                    **kw: Any) -> list[torch.Tensor]:
        k = ref.num_classes
        steps = kw.pop("steps", self.steps)
        kw.setdefault("start", self.start)
        kw.setdefault("t_start", self.t_start)
        kw.setdefault("x0", self.x0)
        kw.setdefault("band", getattr(self, "band", 0))
        kw.setdefault("gate", getattr(self, "gate", 0.0))
        return [sliding(lambda x, e, o: ref.refine(x, e, steps=steps, seed=0, origins=[o], **kw),
                        im, k, cm) for im, cm in zip(self.images(norm), coarse, strict=True)]

    def crf_maps(self, coarse: list[torch.Tensor], **kw: Any) -> list[torch.Tensor]:
        from idgbr_geo.crf import dense_crf

        return [torch.from_numpy(dense_crf(img, cm.numpy(), **kw))
                for (img, _), cm in zip(self.scenes, coarse, strict=True)]

    def add(self, source: str, method: str, maps: list[torch.Tensor],
            coarse: list[torch.Tensor] | None, classes: list[str], seconds: float) -> None:
        preds = [m.argmax(0).numpy().astype(np.uint8) for m in maps]
        cm = None if coarse is None else [c.argmax(0).numpy().astype(np.uint8) for c in coarse]
        res = score(preds, self.truths, cm, classes)
        key = classes[1] if len(classes) == 2 else "mean"
        row = {"coarse": source, "method": method, "class": key, "seconds": round(seconds, 1),
               **summarise(res, key)}
        self.rows.append({**row, "raw": res})
        print(format_row(row), flush=True)


COLS = [("coarse", "coarse map"), ("method", "method"), ("iou", "IoU"), ("miou", "mIoU"),
        ("bf2", "BF@2px"), ("biou", "boundary IoU"), ("iou_imp", "IoU_imp"),
        ("d_iou", "ΔIoU"), ("d_bf2", "ΔBF@2")]


def gate_label(gate: float | list[float]) -> str:
    """0.6, or per class: [0.55, 0.7]."""
    return (f"[{', '.join(format(g, 'g') for g in gate)}]" if isinstance(gate, list)
            else format(gate, "g"))


def format_row(row: dict[str, Any]) -> str:
    cells = []
    for key, _ in COLS:
        v = row.get(key)
        cells.append("" if v is None else f"{v:+.1f}" if key.startswith("d_") else
                     f"{v:.1f}" if isinstance(v, float) else str(v))
    return "| " + " | ".join(cells) + " |"


def markdown(rows: list[dict[str, Any]], title: str) -> str:
    head = "| " + " | ".join(h for _, h in COLS) + " |"
    sep = "|" + "|".join("---" for _ in COLS) + "|"
    return "\n".join([title, "", head, sep, *[format_row(r) for r in rows]]) + "\n"


def main() -> None:
    from idgbr_geo.training import refiner_from_checkpoint, segmentor_from_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("set")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--start", default="noise", choices=["noise", "coarse"])
    ap.add_argument("--t-start", type=float, default=1.0)
    ap.add_argument("--x0", default="soft", choices=["soft", "hard"])
    ap.add_argument("--only", default=None, help="comma list of extra refine variants as JSON")
    ap.add_argument("--band", type=int, default=0,
                    help="keep the coarse map farther than this many px from its boundaries")
    ap.add_argument("--gate", type=json.loads, default=0.0,
                    help="keep the coarse class unless the refiner gives its own at least this "
                         "(a number, or a JSON list: one per class the pixel would turn into)")
    ap.add_argument("--limit", type=int, default=None, help="first N scenes only")
    ap.add_argument("--ablations", action="store_true")
    ap.add_argument("--refiner-tag", default="refiner")
    ap.add_argument("--coarse-tag", default="coarse")
    ap.add_argument("--norough-tag", default="refiner-norough")
    ap.add_argument("--oneshot-tag", default="refiner-oneshot")
    ap.add_argument("--steps-ablation", action="store_true", help="only the steps ablation")
    ap.add_argument("--no-crf", action="store_true")
    ap.add_argument("--crf", default="{}", help="JSON keyword arguments of dense_crf")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = ROOT / "runs"

    def ckpt(tag: str) -> Path:
        return runs / f"{args.set}-{tag}" / "checkpoint.pt"

    state = torch.load(ckpt(args.coarse_tag), map_location="cpu", weights_only=False)
    norm = Normalization(**state["normalization"])
    classes = list(state["classes"])
    v = Validator(args.set, args.limit, args.steps, args.start, args.t_start, x0=args.x0,
                  band=args.band, gate=args.gate)
    seg = segmentor_from_checkpoint(ckpt(args.coarse_tag), "cpu")
    ref = refiner_from_checkpoint(ckpt(args.refiner_tag), "cpu")
    sources = {"coarse": seg}
    if ckpt("coarse2").is_file():
        sources["coarse2"] = segmentor_from_checkpoint(ckpt("coarse2"), "cpu")
    else:
        sources["coarse2"] = Blurred(seg, 8)
    def describe(tag: str) -> str:
        st = torch.load(ckpt(tag), map_location="cpu", weights_only=False)
        return f"FPN, output stride {st['config'].get('output_stride', 4)}"

    label = {"coarse": f"shipped coarse ({describe(args.coarse_tag)})",
             "coarse2": f"second coarse ({describe('coarse2')}, trained separately)"
             if ckpt("coarse2").is_file() else
             "second coarse (shipped one blurred: probs pooled 8x, upsampled)"}
    default = f"IDGBR refiner ({args.steps} steps, start={args.start}, x0={args.x0}" + (
        f", band {args.band} px" if args.band else "") + (
        f", gate {gate_label(args.gate)}" if args.gate else "") + ")"
    if args.only:  # quick comparison of sampler settings on our coarse maps only
        cm = v.coarse_maps(seg, norm)
        v.add(label["coarse"], "coarse (no refinement)", cm, None, classes, 0.0)
        for kw in json.loads(args.only):
            t = time.time()
            v.add(label["coarse"], json.dumps(kw), v.refine_maps(ref, norm, cm, **kw), cm,
                  classes, time.time() - t)
        sources = {}
    for src, model in sources.items():
        t = time.time()
        cm = v.coarse_maps(model, norm)
        v.add(label[src], "coarse (no refinement)", cm, None, classes, time.time() - t)
        t = time.time()
        v.add(label[src], default, v.refine_maps(ref, norm, cm), cm, classes, time.time() - t)
        if args.gate:
            t = time.time()
            v.add(label[src], "refiner without the gate", v.refine_maps(ref, norm, cm, gate=0.0),
                  cm, classes, time.time() - t)
        if not args.no_crf:
            t = time.time()
            v.add(label[src], "dense CRF", v.crf_maps(cm, **json.loads(args.crf)), cm, classes,
                  time.time() - t)
        if src == "coarse" and (args.ablations or args.steps_ablation):
            for steps in sorted({1, 2, 4, 2 * args.steps} - {args.steps}):
                t = time.time()
                v.add(label[src], f"refiner, {steps} step(s)",
                      v.refine_maps(ref, norm, cm, steps=steps), cm, classes, time.time() - t)
            if not args.ablations:
                continue
            other = "coarse" if args.start == "noise" else "noise"
            t = time.time()
            v.add(label[src], f"refiner, start={other}" + (" t=0.5" if other == "coarse" else ""),
                  v.refine_maps(ref, norm, cm, start=other, t_start=0.5), cm, classes,
                  time.time() - t)
            for tag, what in ((args.norough_tag, "no coarse map (image-only guidance)"),
                              (args.oneshot_tag, "one-shot refiner, same size")):
                if ckpt(tag).is_file():
                    r2 = refiner_from_checkpoint(ckpt(tag), "cpu")
                    t = time.time()
                    v.add(label[src], what, v.refine_maps(r2, norm, cm), cm, classes,
                          time.time() - t)
    title = (f"Validation, {args.set}: {len(v.scenes)} held-out scenes, class "
             f"'{v.rows[0]['class']}' (IoU, BF, boundary IoU, IoU_imp in %; mIoU over classes)")
    md = markdown(v.rows, title)
    print(md)
    if args.md:
        args.md.write_text(md)
    if args.json:
        args.json.write_text(json.dumps({"set": args.set, "steps": args.steps,
                                         "start": args.start, "t_start": args.t_start,
                                         "band": args.band, "gate": args.gate,
                                         "rows": v.rows}, indent=1))


if __name__ == "__main__":
    main()

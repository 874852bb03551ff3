"""Validation tables for the bundled models: coarse vs refined vs dense CRF, plus ablations.

Every map comes from the code ``idgbr-geo refine`` runs: each held-out scene of
``.train/<set>_val_scenes.npz`` (written by release/prepare_data.py; split by area as
/work/shared/data/README.md suggests) is written as a GeoTIFF at the model GSD and refined with
:func:`idgbr_geo.engine.refine_raster`, which writes float32 probabilities
(``OutputOptions(probabilities_dtype="float32")``) that are read back: the engine's 512 px
windows with overlap 64 and zero padding at the scene's edges, its rule of refining only
windows whose coarse map holds a boundary, its stitching and its gate. The maps are scored with
:mod:`idgbr_geo.metrics`, pooled over all scenes.

    OMP_NUM_THREADS=2 .venv/bin/python release/validate.py buildings --ablations \
        --json .train/val-buildings.json --md .train/val-buildings.md

Networks come from the training runs in ``.train/runs/<set>-<tag>/checkpoint.pt`` (tags:
``coarse``, ``coarse2`` = the second, blurrier coarse model, ``refiner``, and for the
ablations ``refiner-norough`` and ``refiner-oneshot``). Ablations swap what the engine runs:
another refiner, the card's sampling (steps, gate), or a research sampler option through
:class:`research.sampling.ResearchRefiner`; the dense CRF baseline (:mod:`research.crf`)
post-processes the engine's stitched coarse maps.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.transform import from_origin
from research.sampling import DEFAULTS as RESEARCH_DEFAULTS  # noqa: I001  (release/ is on sys.path)
from research.sampling import ResearchRefiner

from idgbr_geo.cards import ModelCard, Normalization
from idgbr_geo.config import SamplingConfig
from idgbr_geo.engine import refine_raster
from idgbr_geo.interfaces import Model, Refiner, Segmentor
from idgbr_geo.metrics import MetricAccumulator
from idgbr_geo.options import OutputOptions, RunOptions
from idgbr_geo.registry import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent / ".train"
#: the bundled cards' tiling
TILE, OVERLAP, MULT = 512, 64, 16


def load_scenes(name: str, limit: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    with np.load(ROOT / f"{name}_val_scenes.npz") as z:
        n = len([k for k in z.files if k.startswith("image_")])
        idx = range(n) if limit is None else range(min(n, limit))
        return [(z[f"image_{i}"], z[f"label_{i}"]) for i in idx]


def card_from_checkpoint(name: str, path: Path, sampling: SamplingConfig) -> ModelCard:
    """The card the engine runs the checkpoints with: the bundled cards' tiling, the
    checkpoint's classes, bands, normalisation and GSD, and ``sampling``."""
    state = load_checkpoint(path)
    gsd = float(state.get("gsd", float("nan")))
    bands = int(state["config"]["in_channels"])
    return ModelCard(name=name, classes=list(state["classes"]), bands=bands,
                     band_names=[f"band_{i + 1}" for i in range(bands)],
                     normalization=Normalization(**state["normalization"]),
                     gsd=gsd if np.isfinite(gsd) and gsd > 0 else None, tile_size=TILE,
                     overlap=OVERLAP, stride_multiple=MULT, sampling=sampling)


class Engine:
    """Scenes (uint8 images) as GeoTIFFs in ``workdir``, refined by :func:`refine_raster`;
    per scene the stitched float32 probabilities (K, H, W) come back."""

    def __init__(self, scenes: list[tuple[np.ndarray, np.ndarray]], gsd: float | None,
                 workdir: Path) -> None:
        self.workdir = workdir
        self.paths: list[Path] = []
        res = gsd or 1.0
        for i, (img, _) in enumerate(scenes):
            path = workdir / f"scene_{i:05d}.tif"
            with rasterio.open(path, "w", driver="GTiff", width=img.shape[2],
                               height=img.shape[1], count=img.shape[0], dtype=img.dtype,
                               crs="EPSG:32633", transform=from_origin(500000, 4000000, res, res),
                               tiled=True, blockxsize=256, blockysize=256) as dst:
                dst.write(img)
            self.paths.append(path)

    def maps(self, model: Model, *, coarse_only: bool = False) -> list[torch.Tensor]:
        out = []
        classes, probs = self.workdir / "classes.tif", self.workdir / "probabilities.tif"
        for path in self.paths:
            refine_raster(path, classes, model=model, probabilities=probs,
                          options=RunOptions(coarse_only=coarse_only, seed=0),
                          outputs=OutputOptions(probabilities_dtype="float32"),
                          overwrite=True, quiet=True)
            with rasterio.open(probs) as ds:
                out.append(torch.from_numpy(ds.read()))
        return out


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
    """Maps of scenes (or chips) through the engine, and the table rows scoring them."""

    def __init__(self, name: str, scenes: list[tuple[np.ndarray, np.ndarray]],
                 card: ModelCard, workdir: Path) -> None:
        self.name, self.scenes, self.card = name, scenes, card
        self.truths = [lab for _, lab in scenes]
        self.engine = Engine(scenes, card.gsd, workdir)
        self.rows: list[dict[str, Any]] = []

    def model(self, segmentor: Segmentor, refiner: Refiner | None = None, *,
              steps: int | None = None, gate: Any = None) -> Model:
        """The engine's model: ``segmentor`` and ``refiner`` with the card's sampling, or
        the ``steps`` / ``gate`` given."""
        s = self.card.sampling
        sampling = SamplingConfig(steps=s.steps if steps is None else steps,
                                  gate=s.gate if gate is None else gate)
        return Model(card=replace(self.card, sampling=sampling), segmentor=segmentor,
                     refiner=refiner)

    def coarse_maps(self, seg: Segmentor) -> list[torch.Tensor]:
        return self.engine.maps(self.model(seg), coarse_only=True)

    def refine_maps(self, seg: Segmentor, ref: Any, **kw: Any) -> list[torch.Tensor]:
        """Refined maps; ``steps`` and ``gate`` set the sampling, the other keywords are
        research sampler options (:class:`ResearchRefiner`)."""
        steps, gate = kw.pop("steps", None), kw.pop("gate", None)
        if any(v != RESEARCH_DEFAULTS.get(k) for k, v in kw.items()):
            ref = ResearchRefiner(ref, **kw)
        return self.engine.maps(self.model(seg, ref, steps=steps, gate=gate))

    def crf_maps(self, coarse: list[torch.Tensor], **kw: Any) -> list[torch.Tensor]:
        from research.crf import dense_crf

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


def gate_label(gate: float | list[float] | tuple[float, ...]) -> str:
    """0.6, or per class: [0.55, 0.7]."""
    return (f"[{', '.join(format(g, 'g') for g in gate)}]" if isinstance(gate, list | tuple)
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
    from idgbr_geo.checkpoints import refiner_from_checkpoint, segmentor_from_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("set")
    ap.add_argument("--steps", type=int, default=SamplingConfig().steps)
    ap.add_argument("--start", default=RESEARCH_DEFAULTS["start"], choices=["noise", "coarse"])
    ap.add_argument("--t-start", type=float, default=RESEARCH_DEFAULTS["t_start"])
    ap.add_argument("--x0", default=RESEARCH_DEFAULTS["x0"], choices=["soft", "hard"])
    ap.add_argument("--only", default=None,
                    help="JSON list of refine variants (steps, gate and research options), "
                         "on our coarse maps only")
    ap.add_argument("--band", type=int, default=RESEARCH_DEFAULTS["band"],
                    help="keep the coarse map farther than this many px from its boundaries")
    ap.add_argument("--gate", type=json.loads, default=SamplingConfig().gate,
                    help="keep the coarse class unless the refiner gives its own at least this "
                         "(a number, or a JSON list: one per class the pixel would turn into)")
    ap.add_argument("--limit", type=int, default=None, help="first N scenes only")
    ap.add_argument("--model", default=None,
                    help="score a bundled model or card as shipped (its own coarse segmentor, "
                         "refiner and sampling) instead of the training checkpoints")
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
    if args.model:
        shipped(args)
        return
    runs = ROOT / "runs"

    def ckpt(tag: str) -> Path:
        return runs / f"{args.set}-{tag}" / "checkpoint.pt"

    card = card_from_checkpoint(args.set, ckpt(args.coarse_tag),
                                SamplingConfig(steps=args.steps, gate=args.gate))
    classes = card.classes
    with tempfile.TemporaryDirectory(prefix="idgbr-validate-") as tmp:
        v = Validator(args.set, load_scenes(args.set, args.limit), card, Path(tmp))
        rows(args, v, ckpt, classes, segmentor_from_checkpoint, refiner_from_checkpoint)
    report(args, v, f"Validation, {args.set}",
           {"steps": args.steps, "start": args.start, "t_start": args.t_start,
            "band": args.band, "gate": args.gate})


def report(args: argparse.Namespace, v: Validator, heading: str, meta: dict[str, Any]) -> None:
    """Print the table and write it to ``--md`` / ``--json`` (with ``meta``)."""
    title = (f"{heading}: {len(v.scenes)} held-out scenes, class '{v.rows[0]['class']}' "
             "(IoU, BF, boundary IoU, IoU_imp in %; mIoU over classes)")
    md = markdown(v.rows, title)
    print(md)
    if args.md:
        args.md.write_text(md)
    if args.json:
        args.json.write_text(json.dumps({"set": args.set, **meta, "rows": v.rows}, indent=1))


def shipped(args: argparse.Namespace) -> None:
    """The shipped model through the engine: its coarse map, the refined map, and the same
    for a blurrier coarse map (its probabilities pooled 8x) standing in for another model."""
    from idgbr_geo.registry import load_model

    m = load_model(args.model, "cpu")
    card = replace(m.card, tile_size=TILE, overlap=OVERLAP)
    classes = card.classes
    with tempfile.TemporaryDirectory(prefix="idgbr-validate-") as tmp:
        v = Validator(args.set, load_scenes(args.set, args.limit), card, Path(tmp))
        s = card.sampling
        method = f"refiner as shipped ({s.steps} step(s), gate {gate_label(s.gate)})"
        for label, seg in ((f"shipped coarse ({args.model})", m.segmentor),
                           ("shipped coarse blurred (probabilities pooled 8x)",
                            Blurred(m.segmentor, 8))):
            t = time.time()
            cm = v.coarse_maps(seg)
            v.add(label, "coarse (no refinement)", cm, None, classes, time.time() - t)
            t = time.time()
            v.add(label, method, v.refine_maps(seg, m.refiner), cm, classes, time.time() - t)
    report(args, v, f"Validation of the shipped `{args.model}` model through the engine, "
           f"{args.set}", {"model": args.model})


def rows(args: argparse.Namespace, v: Validator, ckpt: Any, classes: list[str],
         segmentor_from_checkpoint: Any, refiner_from_checkpoint: Any) -> None:
    """The table's rows, in order."""
    seg = segmentor_from_checkpoint(ckpt(args.coarse_tag), "cpu")
    ref = refiner_from_checkpoint(ckpt(args.refiner_tag), "cpu")
    sources: dict[str, Any] = {"coarse": seg}
    if ckpt("coarse2").is_file():
        sources["coarse2"] = segmentor_from_checkpoint(ckpt("coarse2"), "cpu")
    else:
        sources["coarse2"] = Blurred(seg, 8)

    def describe(tag: str) -> str:
        st = load_checkpoint(ckpt(tag))
        return f"FPN, output stride {st['config'].get('output_stride', 4)}"

    label = {"coarse": f"shipped coarse ({describe(args.coarse_tag)})",
             "coarse2": f"second coarse ({describe('coarse2')}, trained separately)"
             if ckpt("coarse2").is_file() else
             "second coarse (shipped one blurred: probs pooled 8x, upsampled)"}
    research = {"start": args.start, "t_start": args.t_start, "x0": args.x0, "band": args.band}
    default = f"IDGBR refiner ({args.steps} steps, start={args.start}, x0={args.x0}" + (
        f", band {args.band} px" if args.band else "") + (
        f", gate {gate_label(args.gate)}" if args.gate else "") + ")"
    if args.only:  # quick comparison of sampler settings on our coarse maps only
        cm = v.coarse_maps(seg)
        v.add(label["coarse"], "coarse (no refinement)", cm, None, classes, 0.0)
        for kw in json.loads(args.only):
            t = time.time()
            v.add(label["coarse"], json.dumps(kw), v.refine_maps(seg, ref, **{**research, **kw}),
                  cm, classes, time.time() - t)
        return
    for src, model in sources.items():
        t = time.time()
        cm = v.coarse_maps(model)
        v.add(label[src], "coarse (no refinement)", cm, None, classes, time.time() - t)
        t = time.time()
        v.add(label[src], default, v.refine_maps(model, ref, **research), cm, classes,
              time.time() - t)
        if args.gate:
            t = time.time()
            v.add(label[src], "refiner without the gate",
                  v.refine_maps(model, ref, **research, gate=0.0), cm, classes, time.time() - t)
        if not args.no_crf:
            t = time.time()
            v.add(label[src], "dense CRF", v.crf_maps(cm, **json.loads(args.crf)), cm, classes,
                  time.time() - t)
        if src == "coarse" and (args.ablations or args.steps_ablation):
            for steps in sorted({1, 2, 4, 2 * args.steps} - {args.steps}):
                t = time.time()
                v.add(label[src], f"refiner, {steps} step(s)",
                      v.refine_maps(model, ref, **research, steps=steps), cm, classes,
                      time.time() - t)
            if not args.ablations:
                continue
            other = "coarse" if args.start == "noise" else "noise"
            t = time.time()
            v.add(label[src], f"refiner, start={other}" + (" t=0.5" if other == "coarse" else ""),
                  v.refine_maps(model, ref, **{**research, "start": other, "t_start": 0.5}),
                  cm, classes, time.time() - t)
            for tag, what in ((args.norough_tag, "no coarse map (image-only guidance)"),
                              (args.oneshot_tag, "one-shot refiner, same size")):
                if ckpt(tag).is_file():
                    r2 = refiner_from_checkpoint(ckpt(tag), "cpu")
                    t = time.time()
                    v.add(label[src], what, v.refine_maps(model, r2, **research), cm, classes,
                          time.time() - t)


if __name__ == "__main__":
    main()

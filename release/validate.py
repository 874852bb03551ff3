"""Per-source validation of a model through the engine: coarse vs refined for several coarse maps.

Every map comes from the code ``idgbr-geo refine`` runs, :func:`idgbr_geo.engine.refine_raster`,
on the model as :func:`idgbr_geo.registry.load_model` loads it. Each held-out scene of
``.train/<set>_val_scenes.npz`` (written by release/prepare_data.py) is written as a GeoTIFF
at its *native* resolution: with a CRS (EPSG:32633) and its pixel size when its GSD is known,
without any CRS or transform when it is not (a user's un-georeferenced export: the engine then
assumes the card's ``gsd_without_crs``, else its GSD). The class rasters the engine writes are
scored on that native grid against the native label with
:class:`idgbr_geo.metrics.MetricAccumulator`, pooled per scene source (banepa, xdomain, dubai,
massachusetts, ...) and over all sources.

Coarse maps (``--sources``), each scored as it is and refined by the model under test:

* ``ours``: the model's own segmentor (``RunOptions(coarse_only=True)``) vs the default run;
* ``second-arch``: the coarse-only class raster of ``--second-model`` (another architecture
  and GSD), refined through ``coarse=``;
* truth degradations (:mod:`degradations`: ``smooth-0.5m``, ``smooth-1m``, ``stride8``,
  ``stride16``, ``erode1``, ``erode2``, ``dilate1``, ``dilate2``), written as class rasters on
  the scene's grid and refined through ``coarse=``.

``--ablations`` adds, on ``ours`` only, steps 1, 2, 4 (those not the card's) and a one-shot
refiner (``.train/runs/<set>-<oneshot-tag>/checkpoint.pt``, with ``--coarse-tag``).
``--passthrough`` adds, on the external maps, a 0-step run: what the engine's resampling of a
map to the model grid and back alone does to it (nothing when the scene is at the model GSD).
``--image-shift NAME`` changes every scene's pixels first, as another camera or pipeline
would deliver them (:mod:`research.image_shifts`), labels unchanged.

Rows: IoU, BF@2 (boundary F-score, 2 px) and IoU_imp in %, for the foreground class (binary)
or the mean over classes 1..K-1 (class 0 left out); ΔIoU, ΔBF@2 = refined minus coarse;
seconds of engine time summed over the scenes. They are printed as each finishes; ``--md`` /
``--json`` get all tables (the JSON with the metrics' full results).

The model is a bundled name or card (``--model``), or the training checkpoints
``.train/runs/<set>-<tag>/checkpoint.pt`` of ``--coarse-tag`` and ``--refiner-tag``, exported to
a temporary card (tiles 512, overlap 64, stride multiple 32, sampling from ``--steps`` /
``--gate``) with :func:`idgbr_geo.checkpoints.export_model` and loaded like a shipped one;
``--settings-from CARD`` gives that card CARD's working settings (GSD choices, zoomed views,
edge filter, GSD without a CRS), so that an ablation runs as the shipped card does.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python release/validate.py buildings \
        --model buildings --second-model .train/old-models/roads.json --limit 2 --threads 1
    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python release/validate.py roads --model roads \
        --limit 1 --sources ours,stride8,erode1 --passthrough --threads 1
    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python release/validate.py landcover \
        --model landcover --limit 1 --ablations --threads 1 --md .train/val-landcover.md
    OMP_NUM_THREADS=2 .venv/bin/python release/validate.py buildings --coarse-tag coarse \
        --refiner-tag refiner --second-model .train/old-models/buildings.json --ablations \
        --json .train/val-buildings.json --md .train/val-buildings.md --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from degradations import DEGRADATIONS, degrade  # noqa: I001  (release/ is on sys.path)
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import from_origin
from research.image_shifts import SHIFTS, shift_image

from idgbr_geo.cards import ModelCard, Normalization
from idgbr_geo.checkpoints import export_model
from idgbr_geo.config import SamplingConfig
from idgbr_geo.engine import refine_raster, uses_refiner
from idgbr_geo.interfaces import Model
from idgbr_geo.metrics import MetricAccumulator
from idgbr_geo.options import RunOptions
from idgbr_geo.predict import resolve_precision
from idgbr_geo.registry import load_checkpoint, load_model, read_model
from idgbr_geo.tiling import NoCRSWarning

ROOT = Path(__file__).resolve().parent.parent / ".train"
#: the tiling of the cards exported from checkpoints
TILE, OVERLAP, MULT = 512, 64, 32
#: the CRS of scenes with a known GSD (origin on the central meridian)
CRS = "EPSG:32633"
SOURCES = ("ours", "second-arch", *DEGRADATIONS)
COARSE = "coarse (no refinement)"
POOLED = "all sources (pooled)"
#: the --passthrough row: the external map through the engine's grids, no refiner
PASSTHROUGH = "engine, 0 steps (resampling only)"


@dataclass
class Scene:
    image: np.ndarray  # (3, H, W) uint8
    label: np.ndarray  # (H, W) uint8, 255 = ignore
    gsd: float | None  # metres; None: undocumented
    source: str
    name: str


def load_scenes(name: str, limit: int | None = None) -> dict[str, list[Scene]]:
    """The held-out scenes by source, at most ``limit`` per source, evenly spread over the
    source's scenes in file order (so that a limited run still spans its sub-areas)."""
    out: dict[str, list[Scene]] = {}
    with np.load(ROOT / f"{name}_val_scenes.npz") as z:
        n = len([k for k in z.files if k.startswith("image_")])
        by_source: dict[str, list[int]] = {}
        for i in range(n):
            by_source.setdefault(str(z[f"source_{i}"]), []).append(i)
        for src, idx in by_source.items():
            if limit is not None and len(idx) > limit:
                idx = [idx[j] for j in np.linspace(0, len(idx) - 1, limit).round().astype(int)]
            for i in idx:
                gsd = float(z[f"gsd_{i}"])
                out.setdefault(src, []).append(Scene(
                    z[f"image_{i}"], z[f"label_{i}"],
                    gsd if math.isfinite(gsd) and gsd > 0 else None, src, str(z[f"name_{i}"])))
    return out


def card_from_checkpoint(name: str, path: Path, sampling: SamplingConfig) -> ModelCard:
    """The card the checkpoints are exported with: TILE/OVERLAP/MULT tiling, the
    checkpoint's classes, bands, normalisation and GSD, and ``sampling``."""
    state = load_checkpoint(path)
    gsd = float(state.get("gsd", float("nan")))
    bands = int(state["config"]["in_channels"])
    return ModelCard(name=name, classes=list(state["classes"]), bands=bands,
                     band_names=[f"band_{i + 1}" for i in range(bands)],
                     normalization=Normalization(**state["normalization"]),
                     gsd=gsd if np.isfinite(gsd) and gsd > 0 else None, tile_size=TILE,
                     overlap=OVERLAP, stride_multiple=MULT, sampling=sampling)


#: a card's working settings (not its networks) that ``--settings-from`` carries over
WORKING_SETTINGS = ("gsd_without_crs", "gsd_choices", "fine_gsd_choices", "coarse_zooms",
                    "edge_filter")


def with_settings(card: ModelCard, like: ModelCard) -> ModelCard:
    """``card`` with ``like``'s working settings, so that checkpoints are compared as a
    shipped card would run them."""
    return dataclasses.replace(card, **{k: getattr(like, k) for k in WORKING_SETTINGS})


def exported(name: str, coarse: Path, refiner: Path, sampling: SamplingConfig,
             folder: Path, like: ModelCard | None = None) -> Model:
    """The checkpoints exported to a card in ``folder`` and loaded as a shipped model
    (with ``like``'s working settings, :func:`with_settings`)."""
    card = card_from_checkpoint(name, coarse, sampling)
    if like is not None:
        card = with_settings(card, like)
    return load_model(export_model(coarse, refiner, card, folder), "cpu")


def write_raster(path: Path, data: np.ndarray, gsd: float | None) -> Path:
    """(C, H, W) as a tiled GeoTIFF: georeferenced at ``gsd`` m, or with no CRS at all."""
    geo = {} if gsd is None else {"crs": CRS,
                                   "transform": from_origin(500000, 4000000, gsd, gsd)}
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1],
                       count=data.shape[0], dtype=data.dtype, tiled=True, blockxsize=256,
                       blockysize=256, **geo) as dst:
        dst.write(data)
    return path


#: RunOptions of every run: the networks' arithmetic (``--precision``; the engine's
#: default: auto), whether the coarse model reads its card's zoomed views
#: (``--no-multiscale``, as ``refine --no-multiscale``) and whether the card's working GSD
#: is chosen per scene (off with ``--model-gsd``, as ``refine --no-gsd-search``)
RUN_SETTINGS: dict[str, Any] = {"precision": "auto", "multiscale": True, "gsd_search": True}


def engine(scene: Path, out: Path, model: Model, coarse: Path | None = None,
           **options: Any) -> tuple[np.ndarray, float]:
    """The class raster :func:`refine_raster` writes for ``scene``, and the seconds it took."""
    t = time.perf_counter()
    refine_raster(scene, out, model=model, coarse=coarse,
                  options=RunOptions(seed=0, device="cpu", **{**RUN_SETTINGS, **options}),
                  overwrite=True, quiet=True)
    with rasterio.open(out) as ds:
        return ds.read(1), time.perf_counter() - t


def pick(d: dict[str, Any], classes: list[str]) -> float | None:
    """Binary: the foreground class's value; several classes: the mean over classes
    1..K-1 (class 0 left out); None where undefined."""
    if len(classes) == 2:
        return d.get(classes[1])
    vals = [d.get(c) for c in classes[1:] if d.get(c) is not None]
    return float(np.mean(vals)) if vals else None


def summarise(res: dict[str, Any], classes: list[str]) -> dict[str, float | None]:
    """The table's numbers, in percent (see :func:`pick`)."""
    def g(d: dict[str, Any], m: str, sub: str | None = None) -> float | None:
        v = d.get(m, {})
        v = v.get(sub, {}) if sub else v
        v = pick(v, classes)
        return None if v is None else 100.0 * v

    out = {"iou": g(res, "iou"), "bf2": g(res, "boundary_f", "2")}
    if "coarse" in res:
        c = res["coarse"]
        ci, cb = g(c, "iou"), g(c, "boundary_f", "2")
        out["iou_imp"] = g(res, "iou_imp")
        out["d_iou"] = None if out["iou"] is None or ci is None else out["iou"] - ci
        out["d_bf2"] = None if out["bf2"] is None or cb is None else out["bf2"] - cb
    return out


COLS = [("coarse", "coarse map"), ("method", "method"), ("iou", "IoU"), ("bf2", "BF@2"),
        ("iou_imp", "IoU_imp"), ("d_iou", "ΔIoU"), ("d_bf2", "ΔBF@2"), ("seconds", "s")]


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


def table_head() -> str:
    return "\n".join(["| " + " | ".join(h for _, h in COLS) + " |",
                      "|" + "|".join("---" for _ in COLS) + "|"])


def markdown(rows: list[dict[str, Any]], title: str) -> str:
    return "\n".join([title, "", table_head(), *[format_row(r) for r in rows]]) + "\n"


class Validator:
    """Runs the scenes of one source through the engine and pools their scores per
    (scene source, coarse map, method), and over all sources."""

    def __init__(self, model: Model, workdir: Path, *, second: Model | None = None,
                 oneshot: tuple[str, Model] | None = None, ablations: bool = False,
                 passthrough: bool = False, assume_gsd: float | None = None) -> None:
        self.model, self.second, self.oneshot = model, second, oneshot
        self.assume_gsd = assume_gsd
        self.workdir, self.ablations, self.passthrough = workdir, ablations, passthrough
        self.classes = list(model.card.classes)
        self.acc: dict[tuple[str, str, str], MetricAccumulator] = {}
        self.seconds: dict[tuple[str, str, str], float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.rows: list[dict[str, Any]] = []

    def methods(self, source: str) -> list[tuple[str, Model, dict[str, Any]]]:
        """(label, model, RunOptions fields) of the refined rows of a coarse-map source."""
        s = self.model.card.sampling
        out = [(f"refined ({s.steps} step(s), gate {gate_label(s.gate)})", self.model, {})]
        if source != "ours" and self.passthrough:
            out.append((PASSTHROUGH, self.model, {"steps": 0}))
        if source != "ours" or not self.ablations:
            return out
        out += [(f"refined, {n} step(s)", self.model, {"steps": n})
                for n in sorted({1, 2, 4} - {s.steps})]
        if self.oneshot is not None:
            tag, m = self.oneshot
            out.append((f"one-shot refiner ({tag}), {s.steps} step(s)", m, {}))
        return out

    def given_gsd(self, scene: Scene) -> dict[str, Any]:
        """``gsd`` for a scene without one when ``--assume-gsd`` is set (what a user's
        ``--gsd`` does), else nothing (the engine assumes the card's GSD for inputs
        without a CRS)."""
        return {"gsd": self.assume_gsd} if scene.gsd is None and self.assume_gsd else {}

    def coarse_map(self, source: str, scene: Scene, path: Path, out: Path
                   ) -> tuple[np.ndarray, float]:
        """A scene's coarse map ``source`` as a class raster at ``out``, and its seconds."""
        if source == "ours":
            return engine(path, out, self.model, coarse_only=True, **self.given_gsd(scene))
        if source == "second-arch":
            assert self.second is not None
            return engine(path, out, self.second, coarse_only=True, **self.given_gsd(scene))
        t = time.perf_counter()
        gsd = self.model.card.gsd or scene.gsd or 1.0
        cm = degrade(scene.label, source, num_classes=len(self.classes), gsd=scene.gsd,
                     model_gsd=gsd)
        write_raster(out, cm[None], scene.gsd)
        return cm, time.perf_counter() - t

    def score(self, group: str, source: str, method: str, pred: np.ndarray, truth: np.ndarray,
              coarse: np.ndarray, seconds: float) -> None:
        """Score one scene's refined map (and its coarse map) once; pool the counts into its
        source's and the all-source accumulators."""
        one = MetricAccumulator(self.classes, with_coarse=True)
        one.update(pred, truth, coarse)
        for g in (group, POOLED):
            key = (g, source, method)
            if key not in self.acc:
                self.acc[key] = MetricAccumulator(self.classes, with_coarse=True)
            self.acc[key].merge(one)
            self.seconds[key] += seconds

    def emit(self, group: str, source: str, method: str) -> None:
        """Finish a row: score it, print it, keep it. The coarse row is the coarse part of
        the first refined row's counts (the same map, so scored once)."""
        key = (group, source, method)
        if method == COARSE:
            res = self.acc[(group, source, self.methods(source)[0][0])].result()["coarse"]
        else:
            res = self.acc[key].result()
        row = {"scenes": group, "n": self.counts[group], "coarse": source, "method": method,
               "seconds": round(self.seconds[key], 1), **summarise(res, self.classes)}
        self.rows.append({**row, "raw": res})
        print(format_row(row), flush=True)

    def run_group(self, group: str, scenes: list[Scene], sources: list[str]) -> None:
        """All rows of one scene source."""
        self.counts[group] = len(scenes)
        self.counts[POOLED] += len(scenes)
        gsds = sorted({f"{s.gsd:g} m" if s.gsd else "unknown" for s in scenes})
        print(f"\n{group}: {len(scenes)} scene(s), GSD {', '.join(gsds)}\n{table_head()}",
              flush=True)
        paths = [write_raster(self.workdir / f"scene_{i}.tif", s.image, s.gsd)
                 for i, s in enumerate(scenes)]
        for source in sources:
            maps, coarse_secs = [], []
            for i, (s, p) in enumerate(zip(scenes, paths, strict=True)):
                cm, secs = self.coarse_map(source, s, p, self.workdir / f"coarse_{i}.tif")
                for g in (group, POOLED):
                    self.seconds[(g, source, COARSE)] += secs
                maps.append(cm)
                coarse_secs.append(secs)
            for j, (method, model, opts) in enumerate(self.methods(source)):
                # without a refiner run, refine_raster writes our coarse map for this row
                # too: scored, not made twice
                same = source == "ours" and not uses_refiner(model, RunOptions(**opts))
                for i, (s, p) in enumerate(zip(scenes, paths, strict=True)):
                    given = None if source == "ours" else self.workdir / f"coarse_{i}.tif"
                    if same:
                        pred, secs = maps[i], coarse_secs[i]
                    else:
                        pred, secs = engine(p, self.workdir / "refined.tif", model, given,
                                            **opts, **self.given_gsd(s))
                    self.score(group, source, method, pred, s.label, maps[i], secs)
                if j == 0:
                    self.emit(group, source, COARSE)
                self.emit(group, source, method)
        for p in paths:
            p.unlink()

    def pooled(self) -> None:
        print(f"\n{POOLED}: {self.counts[POOLED]} scene(s)\n{table_head()}", flush=True)
        for g, source, method in list(self.seconds):
            if g == POOLED:
                self.emit(POOLED, source, method)


def describe(m: Model) -> str:
    c = m.card
    archs = "/".join(str((sec or {}).get("arch", "-")) for sec in (c.segmentor, c.refiner))
    gsd = f"{c.gsd:g} m" if c.gsd else "no GSD"
    return (f"`{c.name}` ({archs}, {gsd}, tiles {c.tile_size}/{c.overlap}, steps "
            f"{c.sampling.steps}, gate {gate_label(c.sampling.gate)})")


def report(args: argparse.Namespace, v: Validator, meta: dict[str, Any]) -> None:
    """Print the tables and write them to ``--md`` / ``--json`` (with ``meta``)."""
    classes = v.classes
    what = (f"class '{classes[1]}'" if len(classes) == 2 else
            f"mean over classes 1..{len(classes) - 1} ({', '.join(classes[1:])}; class 0 "
            f"'{classes[0]}' left out)")
    parts = [f"# Validation, {args.set}: {meta['model']}", "",
             f"IoU, BF@2 (boundary F-score, 2 px) and IoU_imp in %, {what}; Δ = refined minus "
             "coarse; s = seconds of engine time (coarse rows: making the coarse map) summed "
             "over the scenes; scored on each scene's native grid; scenes without a GSD run "
             "without a CRS (the engine assumes the card's GSD for such inputs). "
             f"second-arch: {meta.get('second_model') or '-'}.", ""]
    groups = list(dict.fromkeys(r["scenes"] for r in v.rows))
    for g in groups:
        rows = [r for r in v.rows if r["scenes"] == g]
        parts.append(markdown(rows, f"## {g}: {rows[0]['n']} scene(s)"))
    md = "\n".join(parts)
    print("\n" + md)
    if args.md:
        args.md.write_text(md)
    if args.json:
        args.json.write_text(json.dumps({"set": args.set, **meta, "rows": v.rows}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("set", choices=["buildings", "roads", "landcover"])
    ap.add_argument("--model", default=None, help="bundled model name or card path")
    ap.add_argument("--coarse-tag", default=None,
                    help="with --refiner-tag: .train/runs/<set>-<tag>/checkpoint.pt")
    ap.add_argument("--refiner-tag", default=None)
    ap.add_argument("--oneshot-tag", default="refiner-oneshot",
                    help="one-shot refiner run for --ablations (with --coarse-tag)")
    ap.add_argument("--second-model", default=None,
                    help="card of another model whose coarse maps are refined (second-arch)")
    ap.add_argument("--sources", default=None,
                    help=f"comma-separated coarse maps (default: all available): "
                         f"{', '.join(SOURCES)}")
    ap.add_argument("--steps", type=int, default=None,
                    help="sampling steps (default: the card's; exported cards: 1)")
    ap.add_argument("--gate", type=json.loads, default=None,
                    help="the gate: a number or a JSON list, one per class (default: the "
                         "card's; exported cards: 0)")
    ap.add_argument("--ablations", action="store_true",
                    help="on 'ours': steps 1, 2, 4 and the one-shot refiner")
    ap.add_argument("--passthrough", action="store_true",
                    help="on external coarse maps also a 0-step run: what the engine's "
                         "resampling to the model grid and back alone does to them")
    ap.add_argument("--soften", type=float, default=0.0,
                    help="research: blur one-hot coarse maps by SIGMA model px before the "
                         "refiner (research/soften.py)")
    ap.add_argument("--tta", default=None,
                    help="research: average the segmentor over views (research/tta.py: "
                         "flip, scale2, flip+scale2, scale1.5, multiscale, ms-finer, ms-coarser)")
    ap.add_argument("--assume-gsd", type=float, default=None,
                    help="run scenes without a GSD with this --gsd (default: none, the engine "
                         "assumes the card's)")
    ap.add_argument("--estimate-gsd", action="store_true",
                    help="estimate the GSD of scenes without a CRS from the image (the "
                         "engine's --estimate-gsd; the card needs gsd_from_width)")
    ap.add_argument("--no-crs", action="store_true",
                    help="write every scene without a CRS, as an un-georeferenced export "
                         "(the engine then assumes the card's GSD, or --assume-gsd's)")
    ap.add_argument("--model-gsd", type=float, default=None,
                    help="research: run the model at this GSD instead of its card's (the "
                         "engine resamples every input to it; the card's per-scene "
                         "choice of GSD is off)")
    ap.add_argument("--settings-from", default=None, metavar="CARD",
                    help="with --coarse-tag: this card's (or bundled model's) working settings "
                         f"({', '.join(WORKING_SETTINGS)}); default: none of them")
    ap.add_argument("--limit", type=int, default=None, help="at most N scenes per source")
    ap.add_argument("--groups", default=None,
                    help="comma-separated scene sources to run (default: all), e.g. dubai")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="the networks' arithmetic (the engine's --precision)")
    ap.add_argument("--image-shift", default=None, metavar="NAME",
                    help="research: each scene's pixels as another camera or pipeline would "
                         "deliver them (research/image_shifts.py: jpeg40, blur2, haze0.4, "
                         "gamma1.8, cast, noise0.05, grey, uint16, autogamma; joined by +: "
                         "one after the other)")
    ap.add_argument("--no-multiscale", action="store_true",
                    help="the coarse model reads one view per window, without the card's "
                         "zoomed views (the engine's --no-multiscale)")
    args = ap.parse_args()
    if (args.model is None) == (args.coarse_tag is None or args.refiner_tag is None):
        ap.error("give --model, or --coarse-tag and --refiner-tag")
    if args.image_shift is not None and not set(args.image_shift.split("+")) <= set(SHIFTS):
        ap.error(f"unknown --image-shift {args.image_shift!r}; known: {', '.join(SHIFTS)}")
    if args.settings_from is not None and args.model is not None:
        ap.error("--settings-from is for --coarse-tag / --refiner-tag (a card has its own)")
    sources = (list(SOURCES) if args.sources is None else
               [s.strip() for s in args.sources.split(",") if s.strip()])
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        ap.error(f"unknown source(s) {unknown}; known: {', '.join(SOURCES)}")
    if args.second_model is None:
        if args.sources is not None and "second-arch" in sources:
            ap.error("second-arch needs --second-model")
        sources = [s for s in sources if s != "second-arch"]
    torch.set_num_threads(args.threads)
    RUN_SETTINGS.update(precision=args.precision, multiscale=not args.no_multiscale,
                        estimate_gsd=args.estimate_gsd,
                        gsd_search=not args.model_gsd)
    warnings.filterwarnings("ignore", category=NoCRSWarning)
    warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)

    def ckpt(tag: str) -> Path:
        return ROOT / "runs" / f"{args.set}-{tag}" / "checkpoint.pt"

    with tempfile.TemporaryDirectory(prefix="idgbr-validate-") as tmp:
        work = Path(tmp)
        default = SamplingConfig()
        sampling = SamplingConfig(steps=default.steps if args.steps is None else args.steps,
                                  gate=default.gate if args.gate is None else args.gate)
        oneshot = None
        if args.model:
            model = load_model(args.model, "cpu")
            if args.steps is not None or args.gate is not None:
                s = model.card.sampling
                model.card.sampling = SamplingConfig(
                    steps=s.steps if args.steps is None else args.steps,
                    gate=s.gate if args.gate is None else args.gate)
        else:
            like = None if args.settings_from is None else read_model(args.settings_from)[0]
            model = exported(f"{args.set}-{args.coarse_tag}-{args.refiner_tag}",
                             ckpt(args.coarse_tag), ckpt(args.refiner_tag), sampling,
                             work / "model", like)
            if args.ablations and ckpt(args.oneshot_tag).is_file():
                oneshot = (args.oneshot_tag, exported(
                    f"{args.set}-{args.coarse_tag}-{args.oneshot_tag}", ckpt(args.coarse_tag),
                    ckpt(args.oneshot_tag), sampling, work / "oneshot", like))
        if args.model_gsd:  # that GSD alone (RUN_SETTINGS: no per-scene choice)
            model.card.gsd = args.model_gsd
        if args.soften > 0:
            from research.soften import SoftenedRefiner

            model.refiner = SoftenedRefiner(model.refiner, args.soften)
        if args.tta:
            from research.tta import TTASegmentor

            model.segmentor = TTASegmentor(model.segmentor, args.tta)
        if args.ablations and oneshot is None:
            print(f"(no one-shot ablation: needs --coarse-tag and {ckpt(args.oneshot_tag)})")
        second = None
        if "second-arch" in sources:
            second = load_model(args.second_model, "cpu")
            if len(second.card.classes) != len(model.card.classes):
                ap.error(f"--second-model has classes {second.card.classes}, the model "
                         f"{model.card.classes}")
        v = Validator(model, work, second=second, oneshot=oneshot, ablations=args.ablations,
                      passthrough=args.passthrough, assume_gsd=args.assume_gsd)
        print(f"model {describe(model)}" + (f"; second-arch {describe(second)}" if second
                                              else ""), flush=True)
        groups = None if args.groups is None else set(args.groups.split(","))
        for group, scenes in load_scenes(args.set, args.limit).items():
            if groups is not None and group not in groups:
                continue
            if args.no_crs:  # as a user's un-georeferenced export of the same imagery
                scenes = [dataclasses.replace(s, gsd=None) for s in scenes]
            if args.image_shift:
                scenes = [dataclasses.replace(s, image=shift_image(args.image_shift, s.image))
                          for s in scenes]
            v.run_group(group, scenes, sources)
        v.pooled()
    report(args, v, {"model": describe(model), "sources": sources, "limit": args.limit,
                     "second_model": describe(second) if second else None,
                     "ablations": args.ablations, "passthrough": args.passthrough,
                     "soften": args.soften, "tta": args.tta, "assume_gsd": args.assume_gsd,
                     "no_crs": args.no_crs, "model_gsd": args.model_gsd,
                     "image_shift": args.image_shift,
                     "precision": resolve_precision(args.precision, "cpu"),
                     "multiscale": not args.no_multiscale})


if __name__ == "__main__":
    main()

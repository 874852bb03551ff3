"""Export the trained networks into idgbr_geo/models/<name>.json + .safetensors with a full card.

    .venv/bin/python release/export_models.py buildings roads landcover

Reads the training runs ``.train/runs/<set>-coarse`` and ``-refiner`` and the validation
results ``.train/val-<set>.json`` / ``.md`` (release/validate.py), and writes the card in
the current schema (classes, colours, bands, normalisation, GSD, tiling; the architecture
and each stage's training settings from the checkpoints; ``sampling``: the steps and gate
the validation used; ``training``: data, licences and the exact commands; the validation
table in ``extra``) and ``docs/validation.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from research.sampling import DEFAULTS as RESEARCH_DEFAULTS  # noqa: I001  (release/ is on sys.path)

from idgbr_geo.cards import ModelCard, TrainingRecord
from idgbr_geo.checkpoints import export_model
from idgbr_geo.config import SamplingConfig

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


GATE_NOTE = ("The refiner rows use the card's default gate: a pixel keeps its coarse class "
             "unless the refiner gives its own, different class at least that probability "
             "(a list: one threshold per class the pixel would turn into). "
             "The gate was chosen once, before this table was made, on chips of every 4th "
             "training scene (release/select_options.py; rule in its docstring); the row "
             "'refiner without the gate' shows what it trades: fewer damaged pixels "
             "(IoU_imp up) for less boundary gain. The ablation rows (steps, start, no coarse "
             "map, one-shot) use the same gate.")

NOTES = {
    "buildings": "The refiner learned from the maps of the output-stride-16 coarse model "
                 "(second row group) and from degraded ground truth, never from the shipped "
                 "stride-4 model's maps. The stride-4 model is shipped although the stride-16 "
                 "one scores higher on Banepa (IoU 53.1 vs 44.6) because the stride-16 one "
                 "marks water, trees and roads as buildings on the bundled 0.25 m Dutch example "
                 "(42% of its pixels). Dense CRF with the defaults of research.crf.dense_crf "
                 "(sxy_gaussian 3, compat 3, sxy_bilateral 40, srgb 13, compat_bilateral 5, "
                 "5 iterations). The ablation refiners (no coarse map, one-shot) have the same "
                 "size and the same 1200 training iterations on the same data. " + GATE_NOTE,
    "roads": "Dense CRF with sxy_bilateral 10, compat_bilateral 3, sxy_gaussian 1, "
             "compat_gaussian 1 (the defaults erase 1 m roads: IoU 10.9). The shipped refiner "
             "was trained 4000 iterations; it was preferred to a 1500-iteration one on the "
             "selection split (training scenes), where it had better ΔIoU, ΔBF@2 and IoU_imp "
             "at every gate. The ablation refiners (no coarse map, one-shot) have the same "
             "size and the same 4000 training iterations on the same data. The second coarse "
             "map is the shipped model's "
             "probabilities pooled 8x and upsampled (deliberately blurrier). " + GATE_NOTE,
    "landcover": "Metrics are means over all 6 classes ('unlabeled', 0.4% of the pixels, "
                 "included; its IoU pulls the means down). Dense CRF with the defaults of "
                 "research.crf.dense_crf. The shipped refiner was trained with the "
                 "boundary-weighted loss (boundary_weight 4: pixels within 2 px of a true "
                 "class boundary count 5x in the full-resolution loss); it was preferred to "
                 "the plain-loss one on the selection split (training scenes), where at each "
                 "one's rule gate (0.7 vs 0.65) it had the same IoU_imp (+0.1) and ΔIoU "
                 "(+0.1) and a better ΔBF@2 (+0.3 vs -0.1). The ablation refiners (no coarse "
                 "map, one-shot) have the same size, the same loss and the same 1500 "
                 "training iterations on the same data. " + GATE_NOTE,
}


def _gate(gate: float | list[float]) -> float | list[float]:
    """A gate as the card stores it: one threshold, or one per class."""
    return [float(g) for g in gate] if isinstance(gate, list) else float(gate)


def commands(name: str, log: dict, refiner_tag: str = "refiner") -> list[str]:
    tag = "" if refiner_tag == "refiner" else f" --refiner-tag {refiner_tag}"
    return [
        f".venv/bin/python release/prepare_data.py {name}",
        *log.get(name, []),
        f".venv/bin/python release/export_models.py {name}{tag}",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sets", nargs="+")
    ap.add_argument("--out", type=Path, default=REPO / "idgbr_geo" / "models")
    ap.add_argument("--refiner-tag", default="refiner", help="training run of the refiner")
    args = ap.parse_args()
    log = json.loads((REPO / "release" / "training_commands.json").read_text())
    for name in args.sets:
        val_json = TRAIN / f"val-{name}.json"
        val = json.loads(val_json.read_text()) if val_json.is_file() else None
        from idgbr_geo.training import load_npz  # classes/gsd of the arrays

        meta = load_npz(TRAIN / f"{name}_val.npz")
        steps = int(val["steps"]) if val else SamplingConfig().steps
        gate = _gate(val.get("gate", 0.0)) if val else SamplingConfig().gate
        if val:  # a card can only carry what the production refiner runs
            research = {k: val[k] for k in ("start", "t_start", "band")
                        if k in val and val[k] != RESEARCH_DEFAULTS[k]}
            if research:
                raise SystemExit(f"{val_json} was made with research sampler options "
                                 f"{research}: the production refiner cannot ship them")
        data = dict(DATA[name])
        licences = {k: data.pop(k) for k in ("imagery", "labels")}
        card = ModelCard(
            name=name, classes=meta["classes"], colors=COLORS[name], bands=3,
            gsd=float(meta["gsd"]), tile_size=512, overlap=64, stride_multiple=16,
            sampling=SamplingConfig(steps=steps, gate=gate),
            training=TrainingRecord(data={**data, "source": str(meta["source"])},
                                    licences=licences,
                                    commands=commands(name, log, args.refiner_tag)),
        )
        if val:
            card.extra["validation"] = {
                "split": "held-out areas (see training_data.dataset)",
                "refiner_defaults": {"steps": steps, "start": val["start"],
                                     "t_start": val["t_start"], "band": int(val.get("band", 0)),
                                     "gate": _gate(val.get("gate", 0.0))},
                "table_markdown": (TRAIN / f"val-{name}.md").read_text(),
                "notes": NOTES[name],
                "rows": [{k: v for k, v in r.items() if k != "raw"} for r in val["rows"]],
            }
        path = export_model(TRAIN / "runs" / f"{name}-coarse" / "checkpoint.pt",
                            TRAIN / "runs" / f"{name}-{args.refiner_tag}" / "checkpoint.pt", card,
                            args.out)
        print(path, (args.out / f"{name}.safetensors").stat().st_size // 1024, "KiB")
    parts = ["# Validation of the bundled models\n",
             "Generated by `release/validate.py`: whole held-out scenes at the model "
             "GSD through the engine (`refine_raster`: 512 px windows, overlap 64, only "
             "windows whose coarse map holds a boundary refined); metrics from "
             "`idgbr_geo.metrics`, pooled over all scenes. Δ = refined minus coarse.\n"]
    for name in ("buildings", "roads", "landcover"):
        md = TRAIN / f"val-{name}.md"
        if md.is_file():
            parts.append(f"## {name}\n\n" + md.read_text() + "\n" + NOTES[name] + "\n")
    (REPO / "docs" / "validation.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()

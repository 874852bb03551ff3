"""Generate docs/models.md from the model cards (idgbr_geo/models/*.json).

    .venv/bin/python release/model_docs.py            # rewrite docs/models.md
    .venv/bin/python release/model_docs.py --check    # exit 1 if docs/models.md is stale

One section per card: classes and colours, bands and normalisation, GSD, window and sampling
defaults, architecture, weights, training data with attribution and licences, the exact
training commands and the validation table when the card has one. The hand-written notes on
how the models were chosen live in docs/model_notes.md, not here.

The cards are read as plain JSON, defensively, so that this runs on every schema the project
has had: the version-1 "flat" card (``steps`` at the top; ``gate`` and training settings mixed
into ``refiner.config``; provenance in ``extra.training_data`` / ``extra.training_commands``)
and the sectioned one (``version``; ``sampling``; ``training`` with ``data``, ``licences``,
``commands`` and per-stage settings; the architecture at the top or under ``architecture``).
Unknown fields are listed, not dropped, so a schema change shows up in the diff.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "idgbr_geo" / "models"
OUT = REPO / "docs" / "models.md"

#: keys of a version-1 ``refiner.config`` that are sampling defaults, not architecture
V1_SAMPLING = ("steps", "gate", "start", "t_start", "band", "guidance_scale", "x0", "average")
#: keys of a version-1 network config that are training settings, not architecture
V1_TRAINING = ("t_max", "p_uncond", "p_model", "p_coarse_x0", "coarse_perturb",
               "boundary_weight", "boundary_radius", "ema", "lr", "iterations", "batch_size")
#: card fields this generator knows (anything else is listed under "other fields")
KNOWN = {"version", "name", "classes", "colors", "bands", "band_names", "normalization", "gsd",
         "gsd_without_crs", "gsd_from_width", "gsd_choices", "fine_gsd_choices", "coarse_zooms",
         "edge_filter", "tile_size", "overlap", "stride_multiple", "weights", "segmentor",
         "refiner", "architecture",
         "sampling", "training", "steps", "extra", "training_data", "training_commands",
         "validation", "licences", "description"}
#: words in a licence text that make a model unfit for commercial use
RESTRICTED = ("research use", "research only", "non-commercial", "noncommercial",
              "research and education")


# ------------------------------------------------------------------------------ reading
def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def normalise(card: dict[str, Any]) -> dict[str, Any]:
    """The parts of a card of any schema version in one shape (missing parts empty)."""
    extra = _dict(card.get("extra"))
    arch = _dict(card.get("architecture"))
    sections = {}
    for key, alias in (("segmentor", "coarse"), ("refiner", "refiner")):
        sec = _dict(arch.get(key)) or _dict(arch.get(alias)) or _dict(card.get(key))
        sections[key] = {"arch": sec.get("arch"), "config": dict(_dict(sec.get("config")))}
    training = _dict(card.get("training"))
    stage_training = {k: dict(_dict(training.get(k))) for k in ("segmentor", "refiner")}
    sampling = dict(_dict(card.get("sampling")))
    for key in ("segmentor", "refiner"):  # version 1: sampling/training keys in the config
        cfg = sections[key]["config"]
        for k in list(cfg):
            if k in V1_SAMPLING and key == "refiner":
                sampling.setdefault(k, cfg.pop(k))
            elif k in V1_TRAINING:
                stage_training[key].setdefault(k, cfg.pop(k))
    if "steps" in card:
        sampling.setdefault("steps", card["steps"])
    data = dict(_dict(training.get("data")) or _dict(extra.get("training_data"))
                or _dict(card.get("training_data")))
    licences = dict(_dict(training.get("licences")) or _dict(card.get("licences")))
    for k in ("imagery", "labels"):  # version 1 kept the licences in the training data
        if k in data and k not in licences and isinstance(data[k], str):
            licences[k] = data.pop(k)
    if not licences and isinstance(extra.get("attribution"), str):
        licences["data"] = extra["attribution"]
    commands = (_list(training.get("commands")) or _list(extra.get("training_commands"))
                or _list(card.get("training_commands")))
    validation = _dict(extra.get("validation")) or _dict(card.get("validation"))
    other_extra = {k: v for k, v in extra.items()
                   if k not in ("validation", "training_data", "training_commands",
                                "attribution")}
    other_training = {k: v for k, v in training.items()
                      if k not in ("data", "licences", "commands", "segmentor", "refiner")}
    return {
        "version": card.get("version", 1),
        "name": card.get("name", "?"),
        "description": card.get("description"),
        "classes": [str(c) for c in _list(card.get("classes"))],
        "colors": [str(c) for c in _list(card.get("colors"))],
        "bands": card.get("bands"),
        "band_names": [str(b) for b in _list(card.get("band_names"))],
        "normalization": _dict(card.get("normalization")),
        "gsd": card.get("gsd"),
        "gsd_without_crs": card.get("gsd_without_crs"),
        "gsd_from_width": _dict(card.get("gsd_from_width")),
        "gsd_choices": card.get("gsd_choices"),
        "fine_gsd_choices": card.get("fine_gsd_choices"),
        "coarse_zooms": card.get("coarse_zooms"),
        "edge_filter": card.get("edge_filter") is True,
        "tile_size": card.get("tile_size"),
        "overlap": card.get("overlap"),
        "stride_multiple": card.get("stride_multiple"),
        "weights": card.get("weights"),
        "sections": sections,
        "sampling": sampling,
        "stage_training": stage_training,
        "data": data,
        "licences": licences,
        "commands": [str(c) for c in commands],
        "validation": validation,
        "other": {**{k: v for k, v in card.items() if k not in KNOWN},
                  **{f"extra.{k}": v for k, v in other_extra.items()},
                  **{f"training.{k}": v for k, v in other_training.items()}},
    }


def weight_stats(path: Path) -> dict[str, Any] | None:
    """File size and parameter counts per top-level prefix, from the safetensors header
    (no torch needed)."""
    try:
        with path.open("rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
    except (OSError, ValueError, struct.error):
        return None
    counts: dict[str, int] = {}
    for key, info in header.items():
        if key == "__metadata__" or not isinstance(info, dict):
            continue
        if key.endswith("num_batches_tracked"):
            continue
        prefix = key.split(".")[0]
        counts[prefix] = counts.get(prefix, 0) + math.prod(info.get("shape", []))
    return {"bytes": path.stat().st_size, "params": counts}


# ----------------------------------------------------------------------------- rendering
def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _kv(cfg: dict[str, Any]) -> str:
    return ", ".join(f"`{k}` {_fmt(v)}" for k, v in cfg.items()) or "(defaults)"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _arch_summary(key: str, sec: dict[str, Any]) -> str:
    arch, cfg = sec.get("arch"), sec.get("config", {})
    if arch is None:
        return "none (the card has no such stage)"
    if arch == "idgbr-coarse":
        widths = cfg.get("widths")
        desc = "compact FPN segmentor"
        if widths:
            desc += f", widths {'/'.join(str(w) for w in widths)}"
        if "output_stride" in cfg:
            desc += f", output stride {cfg['output_stride']}"
        return f"`{arch}`: {desc}"
    if arch == "idgbr-refiner":
        mode = cfg.get("mode", "diffusion")
        kind = {"diffusion": "guidance network + DDIM denoiser at 1/4 resolution + "
                             "full-resolution decoder",
                "oneshot": "one-shot refiner (same networks, no diffusion)"}.get(mode, mode)
        if cfg.get("use_coarse") is False:
            kind += ", image-only guidance (no coarse map)"
        return f"`{arch}`: {kind}"
    return f"`{arch}` (a registered architecture)"


def _gate_text(gate: Any, classes: list[str]) -> str:
    if isinstance(gate, list) and len(gate) == len(classes):
        per = ", ".join(f"{c} {_fmt(g)}" for c, g in zip(classes, gate, strict=True))
        return f"{_fmt(gate)} (to turn a pixel into: {per})"
    if gate in (None, 0, 0.0):
        return "none (every refined pixel is kept)"
    return _fmt(gate)


def restricted(licences: dict[str, Any], data: dict[str, Any]) -> bool:
    text = " ".join(str(v) for v in [*licences.values(), *data.values()]).lower()
    return any(word in text for word in RESTRICTED)


def render_card(card: dict[str, Any], card_path: Path) -> str:
    c = normalise(card)
    name, classes = c["name"], c["classes"]
    lines = [f"## {name}", ""]
    if c["description"]:
        lines += [str(c["description"]), ""]
    if restricted(c["licences"], c["data"]):
        lines += ["> **Research use only.** Part of this model's training data may be used for "
                  "research only (see *Training data and licences*): do not use these weights "
                  "commercially.", ""]
    colors = c["colors"] + [""] * (len(classes) - len(c["colors"]))
    cls = ", ".join(f"{k} `{n}`" + (f" ({col})" if col else "")
                    for k, (n, col) in enumerate(zip(classes, colors, strict=False)))
    norm = c["normalization"]
    vr = _dict(norm.get("value_range"))
    norm_text = ("`value / value_range[dtype]`"
                 + (f" ({', '.join(f'{k} {_fmt(v)}' for k, v in vr.items())})" if vr else "")
                 + (f", then per band mean {_fmt([round(x, 4) for x in norm['mean']])} and std "
                    f"{_fmt([round(x, 4) for x in norm['std']])}"
                    if _list(norm.get("mean")) and _list(norm.get("std")) else ""))
    rows = [
        ("card", f"`idgbr_geo/models/{card_path.name}` (schema version {c['version']}); "
                 f"use with `--model {name}` or `--model PATH/{card_path.name}`"),
        ("classes (id `name`)", cls or "?"),
        ("input bands", f"{c['bands']}" + (f": {', '.join(c['band_names'])}"
                                           if c["band_names"] else "")),
        ("normalisation", norm_text),
        ("ground sample distance", f"{_fmt(c['gsd'])} m" if c["gsd"] is not None
         else "not declared (no resampling)"),
        ("working GSD", "per scene, of " + ", ".join(_fmt(g) for g in c["gsd_choices"])
         + " m" + (" (and " + ", ".join(_fmt(g) for g in c["fine_gsd_choices"])
                   + " m for an input at least that fine)"
                   if isinstance(c["fine_gsd_choices"], list) and c["fine_gsd_choices"]
                   else "")
         + ", the one its coarse map is most confident at on sample windows "
           "(`--no-gsd-search`: always the GSD above)"
         if isinstance(c["gsd_choices"], list) and c["gsd_choices"] else "the GSD above"),
        ("coarse views", "each window also at " + ", ".join(
            f"{_fmt(z)}x" for z in c["coarse_zooms"])
         # (0.9: idgbr_geo.views.CONFIDENT)
         + " zoom, the coarse probabilities averaged; a window its own view is sure of "
           "(every pixel at least 0.9) keeps that view (`--no-multiscale`: one view)"
         if isinstance(c["coarse_zooms"], list) and c["coarse_zooms"] else "one per window"),
        ("edge-aware output", "redrawn along the image's edges (guided filter) where the "
         "input is more than 1.25x finer than the working grid"
         + (", and on the input's own grid (card `edge_filter`)" if c["edge_filter"] else "")),
        ("input without a CRS", f"assumed {_fmt(c['gsd_without_crs'] or c['gsd'])} m per pixel "
                                "unless `--gsd` is given"
         + (f"; with `--estimate-gsd`, estimated from the image instead: the GSD at which its "
            f"{c['gsd_from_width'].get('class')} pixels come out "
            f"{_fmt(c['gsd_from_width'].get('width'))} m wide (their median in the training "
            "labels; the assumption stays where too little of the class shows)"
            if c["gsd_from_width"] else "")
         + (" (the working GSD is then chosen as for any input)"
            if c["gsd_without_crs"] and c["gsd_choices"] else "") if c["gsd"] is not None
         else "run as it is"),
        ("window", f"{c['tile_size']} px, overlap {c['overlap']} px, window origins on "
                   f"multiples of {c['stride_multiple']} px"),
        ("sampling defaults", f"{c['sampling'].get('steps', '?')} diffusion step(s); gate "
                              f"{_gate_text(c['sampling'].get('gate'), classes)}"
         + "".join(f"; {k} {_fmt(v)}" for k, v in c["sampling"].items()
                   if k not in ("steps", "gate"))),
    ]
    weights = c["weights"]
    if weights:
        stats = weight_stats(card_path.parent / weights)
        text = f"`{weights}`"
        if stats:
            params = ", ".join(f"{k} {v:,}" for k, v in stats["params"].items())
            text += f" ({stats['bytes'] / 1e6:.1f} MB; parameters: {params})"
        rows.append(("weights", text))
    lines += ["| | |", "|---|---|"]
    lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in rows]
    lines.append("")

    lines += ["### Architecture", ""]
    for key, label in (("segmentor", "Coarse segmentor"), ("refiner", "Refiner")):
        sec = c["sections"][key]
        lines.append(f"- **{label}**: {_arch_summary(key, sec)}.")
        if sec.get("config"):
            lines.append(f"  Config: {_kv(sec['config'])}.")
    lines.append("")

    lines += ["### Training data and licences", ""]
    for k, v in c["data"].items():
        lines.append(f"- **{k.replace('_', ' ')}**: {_fmt(v)}")
    for k, v in c["licences"].items():
        lines.append(f"- **licence, {k}**: {_fmt(v)}")
    if not c["data"] and not c["licences"]:
        lines.append("- (the card records no training data)")
    lines.append("")
    settings = {k: v for k, v in c["stage_training"].items() if v}
    if settings:
        lines += ["Training settings recorded in the card:", ""]
        for k, v in settings.items():
            lines.append(f"- {k}: {_kv(v)}")
        lines.append("")
    if c["commands"]:
        lines += ["Exact commands that made (and validated) the weights, in order:", "",
                  "```bash", *c["commands"], "```", ""]

    val = c["validation"]
    if val:
        lines += ["### Validation", ""]
        if val.get("split"):
            lines += [f"Split: {val['split']}.", ""]
        if val.get("refiner_defaults"):
            lines += [f"Refiner settings of the table: {_kv(_dict(val['refiner_defaults']))}.",
                      ""]
        table = val.get("table_markdown")
        if isinstance(table, str) and table.strip():
            lines += [table.strip(), ""]
        elif _list(val.get("rows")):
            lines += [_rows_table(val["rows"]), ""]
        if val.get("notes"):
            lines += [str(val["notes"]).strip(), ""]
    if c["other"]:
        lines += ["### Other card fields", ""]
        lines += [f"- `{k}`: {_cell(_fmt(v))[:300]}" for k, v in c["other"].items()]
        lines.append("")
    return "\n".join(lines)


def _rows_table(rows: list[Any]) -> str:
    rows = [r for r in rows if isinstance(r, dict)]
    keys = [k for k in ("coarse", "method", "class", "iou", "miou", "bf2", "biou", "iou_imp",
                        "d_iou", "d_bf2") if any(k in r for r in rows)]
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        out.append("| " + " | ".join(_cell(f"{r[k]:.1f}" if isinstance(r.get(k), float)
                                          else r.get(k, "")) for k in keys) + " |")
    return "\n".join(out)


def summary_table(cards: list[tuple[Path, dict[str, Any]]]) -> str:
    out = ["| model | classes | GSD | bands | steps, gate | window / overlap | training data "
           "licences |", "|---|---|---|---|---|---|---|"]
    for _path, card in cards:
        c = normalise(card)
        lic = "; ".join(f"{k}: {v}" for k, v in c["licences"].items()) or "-"
        if restricted(c["licences"], c["data"]):
            lic = "**research use only** — " + lic
        gate = c["sampling"].get("gate")
        out.append("| " + " | ".join(_cell(x) for x in (
            f"[`{c['name']}`](#{c['name'].lower()})", ", ".join(c["classes"]),
            f"{_fmt(c['gsd'])} m" if c["gsd"] is not None else "-", c["bands"],
            f"{c['sampling'].get('steps', '?')}, {_fmt(gate) if gate is not None else '-'}",
            f"{c['tile_size']} / {c['overlap']}", lic)) + " |")
    return "\n".join(out)


def render(models: Path) -> str:
    cards = []
    for path in sorted(models.glob("*.json")):
        try:
            cards.append((path, json.loads(path.read_text())))
        except (OSError, ValueError) as exc:
            raise SystemExit(f"cannot read {path}: {exc}") from None
    if not cards:
        raise SystemExit(f"no model cards (*.json) in {models}")
    head = [
        "# Bundled models",
        "",
        "<!-- Generated by release/model_docs.py from idgbr_geo/models/*.json: do not edit "
        "by hand; rerun `.venv/bin/python release/model_docs.py` after changing a card. -->",
        "",
        "Generated from the model cards shipped in `idgbr_geo/models/`. How the models were "
        "chosen, what the numbers mean and what is weak: [model notes](model_notes.md); full "
        "validation tables: [validation](validation.md); speed: "
        "[performance](performance.md).",
        "",
        summary_table(cards),
        "",
    ]
    body = [render_card(card, path) for path, card in cards]
    return "\n".join(head) + "\n" + "\n".join(body).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=MODELS, help="folder of model cards")
    ap.add_argument("--out", type=Path, default=OUT, help="Markdown file to write")
    ap.add_argument("--check", action="store_true",
                    help="do not write; exit 1 if --out differs from what would be written")
    args = ap.parse_args(argv)
    text = render(args.models)
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is out of date: run release/model_docs.py", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

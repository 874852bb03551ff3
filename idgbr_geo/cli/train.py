"""`idgbr-geo train prepare|coarse|refiner`: training data in, model card + weights out.

A thin layer over :mod:`idgbr_geo.datasets` (GeoTIFFs / vectors / torchgeo -> .npz chips),
:mod:`idgbr_geo.training` (the torch-only loops) and :mod:`idgbr_geo.byo` (user coarse
models). Layout of ``--out DIR``: ``data/train.npz`` (+ ``val.npz``), ``coarse/`` or
``refiner/`` (checkpoint.pt, log.csv) and the exported ``<name>.json`` + ``<name>.safetensors``.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..config import RefinerTrainingConfig
from ..config import TrainingConfig as _T
from ..errors import OutputError, UserError
from ..files import check_distinct
from ..options import PRECISIONS
from ._common import user_errors


def _ints(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if not value:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter("give 1-based band numbers separated by commas") from None


def _floats(ctx: click.Context, param: click.Parameter, value: str | None
            ) -> list[float] | None:
    if not value:
        return None
    try:
        return [float(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter("give numbers separated by commas, e.g. 0.4,0.4,0.4") from None


def data_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Where the training chips come from and how they are cut."""
    opts = [
        click.option("--images", multiple=True,
                     help="Image GeoTIFFs: a folder, a glob pattern or one file. Repeatable."),
        click.option("--labels", multiple=True,
                     help="Folder of label rasters (class ids) named as the images: one for "
                          "all --images or one per --images."),
        click.option("--vector-labels", multiple=True, type=click.Path(dir_okay=False),
                     help="GeoPackage/GeoJSON of labels, rasterized onto each image grid. "
                          "Repeatable."),
        click.option("--class-field", help="Vector attribute holding the class (name or id); "
                                           "without it every feature is class 1."),
        click.option("--layer", help="Layer of a multi-layer GeoPackage."),
        click.option("--torchgeo", "torchgeo_name",
                     help="A torchgeo dataset class on disk, e.g. InriaAerialImageLabeling."),
        click.option("--root", type=click.Path(file_okay=False), help="torchgeo dataset root."),
        click.option("--split", help="torchgeo split for training [the dataset's default]."),
        click.option("--val-split", help="torchgeo split for validation, e.g. val."),
        click.option("--data", "data_path", type=click.Path(exists=True),
                     help="Use chips prepared by `train prepare` (a folder or a .npz)."),
        click.option("--classes", help="Class names in id order, e.g. background,building."),
        click.option("--ignore-class", "ignore_classes", multiple=True,
                     help="Class (name or id) left out of the loss (label 255). Repeatable."),
        click.option("--label-map", help="Remap raw label values, e.g. 255=1 or 0=255,1=0."),
        click.option("--nodata-masks", type=click.Path(file_okay=False),
                     help="Folder of rasters, named as the images, non-zero = no imagery."),
        click.option("--gsd", type=float, help="Model GSD in metres [median of the scenes]."),
        click.option("--source-gsd", type=float,
                     help="GSD in metres of images without georeferencing (PNG/JPEG)."),
        click.option("--bands", callback=_ints, help="Image bands, e.g. 1,2,3 [non-alpha]."),
        click.option("--chip-size", type=int, default=256, show_default=True),
        click.option("--stride", type=int, help="Chip stride in pixels [chip size]."),
        click.option("--val-images", multiple=True,
                     help="Validation images (folder, glob or file). Repeatable."),
        click.option("--val-labels", multiple=True,
                     help="Validation label folder(s) (with --val-images and --labels)."),
        click.option("--val-nodata-masks", type=click.Path(file_okay=False),
                     help="Nodata masks of the validation images [--nodata-masks]."),
        click.option("--min-labelled", type=float, default=0.0, show_default=True,
                     help="Drop chips with a smaller share of labelled (non-ignored) pixels."),
        click.option("--val-fraction", type=float,
                     help="Hold out this share of the chips as whole scenes for validation."),
        click.option("--attribution", default="", help="Data source / licence for the card."),
        click.option("--seed", type=int, default=_T.seed, show_default=True),
        click.option("--quiet", "-q", is_flag=True, help="No progress bars or warnings."),
        click.option("--overwrite", is_flag=True, help="Replace existing outputs in --out."),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def training_options(func: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
                     help="Output folder (data, checkpoints, log, exported model)."),
        click.option("--name", help="Model name (card <name>.json) [the --out folder name]."),
        click.option("--iterations", type=int, default=_T.iterations, show_default=True),
        click.option("--batch-size", type=int, default=_T.batch_size, show_default=True),
        click.option("--lr", type=float, default=_T.lr, show_default=True),
        click.option("--crop", type=int, default=_T.crop, show_default=True,
                     help="Training crop size in pixels (random crops of the chips)."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                     show_default=True),
        click.option("--resume", is_flag=True, help="Continue from --out's checkpoint."),
        click.option("--precision", type=click.Choice(list(PRECISIONS)), default="float32",
                     show_default=True,
                     help="bfloat16: mixed precision (the convolutions in bfloat16, weights "
                          "and losses in float32), ~1.2x faster on CPUs with AVX-512 BF16 or "
                          "AMX; auto: bfloat16 on such CPUs."),
        click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Processes that make the augmented training batches ahead (keeps "
                          "a GPU busy); 0: in the training process, the reproducible stream."),
        click.option("--config", "config_text",
                     help="Network and training settings, JSON text or a .json file, e.g. "
                          "'{\"widths\": [16, 32, 64, 96]}' or '{\"arch\": \"lite-fpn\"}' "
                          "(coarse) or '{\"mode\": "
                          "\"oneshot\", \"boundary_weight\": 4}' (refiner); an unknown key "
                          "is an error."),
        click.option("--checkpoint-every", type=int, default=_T.checkpoint_every,
                     show_default=True),
        click.option("--init-model", metavar="NAME|CARD",
                     help="Start from this model's network instead of from scratch or "
                          "ImageNet (fine-tuning, e.g. a bundled model on your own chips): "
                          "its segmentor for coarse, its refiner for refiner; its network "
                          "settings unless --config changes them. Same bands and classes."),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


# ----------------------------------------------------------------------------- data


def _source_text(opts: dict[str, Any], chips_source: str) -> str:
    return "; ".join(t for t in (chips_source, opts.get("attribution") or "") if t)


def build_chips(opts: dict[str, Any], *, val: bool = False) -> Any:
    """The ChipSet described by the data options (or the validation one when ``val``)."""
    from .. import datasets as ds

    label_map = ds.parse_label_map(opts.get("label_map"))
    common = dict(classes=opts.get("classes"), gsd=opts.get("gsd"),
                  chip_size=opts["chip_size"], stride=opts.get("stride"),
                  ignore_classes=list(opts.get("ignore_classes") or ()),
                  min_labelled=opts.get("min_labelled") or 0.0, progress=not opts.get("quiet"))
    sources = [bool(opts.get("torchgeo_name")), bool(opts.get("images"))]
    if sum(sources) != 1:
        raise UserError("give either --images (with --labels or --vector-labels) or --torchgeo")
    if opts.get("torchgeo_name"):
        split = opts.get("val_split") if val else opts.get("split")
        kwargs = {"split": split} if split else {}
        return ds.chips_from_torchgeo(opts["torchgeo_name"], opts.get("root"),
                                      dataset_kwargs=kwargs, source_gsd=opts.get("source_gsd"),
                                      label_map=label_map, **common)
    images = list(opts["val_images"] if val else opts["images"])
    if opts.get("vector_labels"):
        if opts.get("labels"):
            raise UserError("give --labels or --vector-labels, not both")
        vectors = list(opts["vector_labels"])
        return ds.chips_from_vectors(images, vectors, class_field=opts.get("class_field"),
                                     layer=opts.get("layer"), bands=opts.get("bands"),
                                     source=f"images {', '.join(images)}; vector labels "
                                            f"{', '.join(vectors)}", **common)
    labels = list(opts["val_labels"] if val else opts.get("labels") or ())
    if not labels:
        raise UserError("--labels (or --vector-labels) is required with --images"
                        if not val else "--val-images needs --val-labels")
    paths, lpaths = ds.pair_groups(images, labels)
    return ds.chips_from_rasters(paths, lpaths, bands=opts.get("bands"), label_map=label_map,
                                 nodata_masks=(opts.get("val_nodata_masks") if val else None)
                                 or opts.get("nodata_masks"),
                                 source_gsd=opts.get("source_gsd"),
                                 source=f"images {', '.join(images)}; labels {', '.join(labels)}",
                                 **common)


def prepare_data(opts: dict[str, Any], folder: Path) -> tuple[Path, Path | None]:
    """Write ``folder/train.npz`` and, when validation is asked for, ``folder/val.npz``."""
    from .. import datasets as ds

    overwrite = bool(opts.get("overwrite"))
    train_path, val_path = folder / "train.npz", folder / "val.npz"
    for p in (train_path, val_path):
        if p.exists() and not overwrite:
            raise OutputError(f"{p} already exists (use --overwrite to replace it)")
    has_val_source = opts.get("val_images") or opts.get("val_split")
    if has_val_source and opts.get("val_fraction"):
        raise UserError("give --val-images/--val-split or --val-fraction, not both")
    if opts.get("val_images") and opts.get("torchgeo_name"):
        raise UserError("--val-images cannot be combined with --torchgeo (use --val-split)")
    chips = build_chips(opts)
    val = None
    if has_val_source:
        # validation chips at the training GSD, whatever the validation scenes' own GSD
        same_gsd = chips.gsd if math.isfinite(chips.gsd) else opts.get("gsd")
        val = build_chips({**opts, "gsd": same_gsd}, val=True)
        if val.classes != chips.classes:
            raise UserError(f"validation classes {val.classes} differ from {chips.classes}")
    elif opts.get("val_fraction"):
        chips, val = ds.split_by_scene(chips, opts["val_fraction"], seed=opts.get("seed", 0))
    chips.source = _source_text(opts, chips.source)
    folder.mkdir(parents=True, exist_ok=True)
    chips.save(train_path, overwrite=overwrite)
    if val is not None:
        val.source = _source_text(opts, val.source)
        val.save(val_path, overwrite=overwrite)
    elif val_path.exists():
        val_path.unlink()  # a stale validation set from an earlier run must not be used
    return train_path, val_path if val is not None else None


def _data_paths(opts: dict[str, Any], out: Path, resume: bool) -> tuple[Path, Path | None]:
    """Prepared chips (--data), the ones of a run being resumed, or new ones in out/data."""
    given = opts.get("data_path")
    if given:
        p = Path(given)
        if p.is_dir():
            train, val = p / "train.npz", p / "val.npz"
            if not train.is_file():
                raise UserError(f"{p} holds no train.npz (write it with `train prepare`)")
            return train, val if val.is_file() else None
        return p, None
    folder = out / "data"
    if resume and (folder / "train.npz").is_file():
        val = folder / "val.npz"
        return folder / "train.npz", val if val.is_file() else None
    return prepare_data(opts, folder)


def _summary(path: Path) -> tuple[dict[str, Any], Any]:
    """What the card records about a chip file, and the chips themselves."""
    from ..datasets import ChipSet

    chips = ChipSet.load(path)
    scenes = sorted(set(chips.scene.tolist()))
    info = {"file": path.name, "chips": len(chips), "chip_size": int(chips.images.shape[-1]),
            "scenes": len(scenes), "gsd": chips.gsd, "source": chips.source,
            "class_fractions": chips.class_fractions()}
    if len(scenes) <= 100:
        info["scene_names"] = scenes
    return info, chips


# ----------------------------------------------------------------------------- training


def _command_line(ctx: click.Context) -> str:
    """The exact command line when run as ``idgbr-geo``; else rebuilt from the options."""
    if Path(sys.argv[0]).name.startswith("idgbr-geo"):
        return shlex.join(["idgbr-geo", *sys.argv[1:]])
    parts = ["idgbr-geo", *ctx.command_path.split()[1:]]
    for key, value in sorted(ctx.params.items()):
        param = next(p for p in ctx.command.params if p.name == key)
        if value in (None, False, (), "") or value == param.default:
            continue
        flag = param.opts[0]
        if value is True:
            parts.append(flag)
        else:
            for v in value if isinstance(value, tuple) else (value,):
                v = ",".join(map(str, v)) if isinstance(v, list) else v
                parts += [flag, str(v)]
    return shlex.join(parts)


def _config(text: str | None, stage: str) -> dict[str, Any] | None:
    """``--config``: JSON text or a .json file of the stage's network and training settings
    (:func:`idgbr_geo.config.split_config`), checked before any work: an unknown key is one
    error line, not a setting silently left at its default."""
    from ..config import split_config

    if not text:
        return None
    try:
        raw = Path(text).read_text() if text.endswith(".json") else text
        cfg = json.loads(raw)
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"--config is neither JSON nor a readable .json file: {exc}") from None
    if not isinstance(cfg, dict):
        raise UserError("--config must be a JSON object")
    split_config(stage, cfg, "--config")
    return cfg


def _init(opts: dict[str, Any], stage: str, config: dict[str, Any] | None
          ) -> tuple[dict[str, Any] | None, Any]:
    """``--init-model``: the settings to train with (the model's network settings, then
    ``--config``'s) and the weights to start from (None without the option)."""
    if not opts.get("init_model"):
        return config, None
    from ..checkpoints import model_stage

    base, weights = model_stage(opts["init_model"], stage)
    return {**base, **(config or {})}, weights


def _card_files(label: str, spec: str) -> dict[str, str | os.PathLike[str] | None]:
    """A model option's card and weights file (when ``spec`` names a card)."""
    from ..registry import resolve_card

    files: dict[str, str | os.PathLike[str] | None] = {label: spec}
    try:
        card = resolve_card(spec)  # a card (or a bundled name, or a model folder)
    except UserError:
        return files  # not a card: a checkpoint, or an error reported when loading it
    if card.suffix.lower() == ".json":
        files[f"{label} card"] = card
        try:
            weights = json.loads(card.read_text()).get("weights")
        except (OSError, ValueError, AttributeError):
            weights = None
        if isinstance(weights, str) and weights:
            files[f"{label} weights"] = card.parent / weights
    return files


def _input_files(opts: dict[str, Any]) -> dict[str, str | os.PathLike[str] | None]:
    """Files a training run reads that an output path could name by mistake."""
    files: dict[str, str | os.PathLike[str] | None] = {}
    data = opts.get("data_path")
    if data:
        p = Path(data)
        files.update({"--data chips": p / "train.npz", "--data validation chips": p / "val.npz"}
                     if p.is_dir() else {"--data chips": p})
    config = opts.get("config_text")
    if config and config.endswith(".json"):
        files["--config file"] = config
    for option in ("coarse_model", "init_model"):
        if opts.get(option):
            files.update(_card_files("--" + option.replace("_", "-"), opts[option]))
    return files


def _check_not_inputs(opts: dict[str, Any], out: Path, name: str, stage: str) -> None:
    """Refuse, with or without --overwrite, an output of the run that is one of its inputs
    (e.g. ``--coarse-model OUT/<name>.json``: exporting would replace the coarse model
    before its weights are embedded)."""
    outputs: dict[str, str | os.PathLike[str] | None] = {
        "model card": out / f"{name}.json", "model weights": out / f"{name}.safetensors",
        "checkpoint": out / stage / "checkpoint.pt", "training log": out / stage / "log.csv"}
    if not opts.get("data_path"):
        outputs.update({"training chips": out / "data" / "train.npz",
                        "validation chips": out / "data" / "val.npz"})
    check_distinct(_input_files(opts), outputs)


def _prepare_run(opts: dict[str, Any], stage: str) -> tuple[Path, str, Path, Path | None]:
    """Check the outputs before any expensive work; prepare (or reuse) the chips."""
    out = Path(opts["out_dir"])
    name = opts.get("name") or out.resolve().name
    if not name or "/" in name:
        raise UserError(f"bad model name {name!r}")
    card_path = out / f"{name}.json"
    _check_not_inputs(opts, out, name, stage)
    if card_path.exists() and not (opts["overwrite"] or opts["resume"]):
        raise OutputError(f"{card_path} already exists (use --overwrite or --resume)")
    ckpt = out / stage / "checkpoint.pt"
    if ckpt.exists() and not (opts["overwrite"] or opts["resume"]):
        raise OutputError(f"{ckpt} exists from an earlier run (use --resume to continue it "
                          "or --overwrite to start again)")
    if opts["iterations"] < 1 or opts["batch_size"] < 1 or opts["lr"] <= 0:
        raise UserError("--iterations and --batch-size must be >= 1 and --lr > 0")
    out.mkdir(parents=True, exist_ok=True)
    train, val = _data_paths(opts, out, opts["resume"])
    return out, name, train, val


def _card(name: str, chips: Any, info: dict[str, Any], command: str, stage: str,
          opts: dict[str, Any], base: Any = None) -> Any:
    from ..cards import ModelCard

    bands = int(chips.images.shape[1])
    card = ModelCard(name=name, classes=list(chips.classes), bands=bands,
                     band_names=["red", "green", "blue"] if bands == 3
                     else [f"band_{i + 1}" for i in range(bands)],
                     gsd=None if math.isnan(chips.gsd) else round(float(chips.gsd), 4))
    if base is not None:  # keep the coarse model's engine defaults and its provenance
        for key in ("colors", "band_names", "tile_size", "overlap", "sampling",
                    "stride_multiple"):
            setattr(card, key, getattr(base, key))
        card.training.commands = list(base.training.commands)
    # (each stage's training settings come from its checkpoint: export_model)
    card.training.commands.append(command)
    card.training.data = dict(info)
    card.training.licences = {"data": info["train"]["source"]}
    return card


@click.group()
def train() -> None:
    """Train models: prepare chips, train the coarse segmentor, train the refiner."""


@train.command()
@data_options
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for train.npz (and val.npz).")
@user_errors
def prepare(**opts: Any) -> None:
    """Only cut the training chips: write OUT/train.npz (and OUT/val.npz)."""
    if opts.get("data_path"):
        raise UserError("--data is for the training commands, not prepare")
    train_path, val_path = prepare_data(opts, Path(opts["out_dir"]))
    for p in (train_path, val_path):
        if p is not None and not opts["quiet"]:
            info, _ = _summary(p)
            fr = ", ".join(f"{k} {v:.3f}" for k, v in info["class_fractions"].items())
            gsd = "unknown" if math.isnan(info["gsd"]) else f"{info['gsd']:.3f} m"
            click.echo(f"{p}: {info['chips']} chips from {info['scenes']} scenes, "
                       f"GSD {gsd}, classes: {fr}")


@train.command()
@data_options
@training_options
@click.pass_context
@user_errors
def coarse(ctx: click.Context, **opts: Any) -> None:
    """Train the coarse segmentor and export a model card with it."""
    from ..checkpoints import export_model
    from ..training import train_coarse

    config, init = _init(opts, "coarse", _config(opts["config_text"], "coarse"))  # first
    out, name, train_path, val_path = _prepare_run(opts, "coarse")
    info_train, chips = _summary(train_path)
    info = {"train": info_train, "val": _summary(val_path)[0] if val_path else None}
    ckpt = train_coarse(train_path, out / "coarse", val_npz=val_path,
                        iterations=opts["iterations"], batch_size=opts["batch_size"],
                        lr=opts["lr"], seed=opts["seed"], device=opts["device"],
                        resume=opts["resume"], config=config,
                        progress=not opts["quiet"], crop=opts["crop"],
                        checkpoint_every=opts["checkpoint_every"], init_weights=init,
                        workers=opts["workers"], precision=opts["precision"])
    card = _card(name, chips, info, _command_line(ctx), "coarse", opts)
    path = export_model(ckpt, None, card, out)
    if not opts["quiet"]:
        click.echo(f"coarse model written: {path}")


@train.command()
@data_options
@training_options
@click.option("--coarse-model",
              help="Coarse stage whose maps the refiner learns from: a model name or card, a "
                   "`train coarse` checkpoint.pt, a torchgeo .ckpt or a TorchScript file "
                   "(needs --trust-torchscript). Checkpoints are read without running code "
                   "from them. Without it only degraded ground truth is used.")
@click.option("--trust-torchscript", is_flag=True,
              help="Allow a TorchScript --coarse-model. Loading TorchScript runs the code "
                   "stored in the file: use it only for files from a source you trust.")
@click.option("--coarse-mean", callback=_floats,
              help="Per-band mean the torchgeo/TorchScript model was trained with, in units of "
                   "value/255 (uint8) [0: torchgeo's default input is value/255].")
@click.option("--coarse-std", callback=_floats,
              help="Per-band std the torchgeo/TorchScript model was trained with, in the same "
                   "units [1].")
@click.option("--degradation/--no-degradation", default=RefinerTrainingConfig.degradation,
              show_default=True,
              help="Also learn from random degradations of the ground truth.")
@click.pass_context
@user_errors
def refiner(ctx: click.Context, **opts: Any) -> None:
    """Train the diffusion boundary refiner and export a model card (coarse stage included
    when it can be embedded)."""
    from safetensors.torch import load_file

    from .. import byo
    from ..cards import Normalization
    from ..checkpoints import drop_shared_encoder, export_model
    from ..chips import fit_normalization
    from ..registry import save_model, shares_encoder
    from ..training import train_refiner

    config, init = _init(opts, "refiner", _config(opts["config_text"], "refiner"))  # first
    out, name, train_path, val_path = _prepare_run(opts, "refiner")
    info_train, chips = _summary(train_path)
    info = {"train": info_train, "val": _summary(val_path)[0] if val_path else None}
    norm, stage, model_norm = None, None, None
    if opts["coarse_model"]:
        norm = fit_normalization(chips.images)
        n = chips.images.shape[1]
        mean, std = opts["coarse_mean"] or [0.0] * n, opts["coarse_std"] or [1.0] * n
        if len(mean) != n or len(std) != n:
            raise UserError(f"--coarse-mean/--coarse-std need {n} values (one per band)")
        model_norm = Normalization(mean=mean, std=std)  # used by torchgeo/TorchScript models
        stage = byo.load_coarse(opts["coarse_model"], opts["device"], card_normalization=norm,
                                model_normalization=model_norm,
                                trust_torchscript=opts["trust_torchscript"])
        norm = stage.normalization or norm
        if stage.segmentor.num_classes != len(chips.classes):
            raise UserError(f"the coarse model predicts {stage.segmentor.num_classes} classes, "
                            f"the training data has {len(chips.classes)}")
    ckpt = train_refiner(train_path, out / "refiner", coarse=stage.segmentor if stage else None,
                         val_npz=val_path, iterations=opts["iterations"],
                         batch_size=opts["batch_size"], lr=opts["lr"], seed=opts["seed"],
                         device=opts["device"], resume=opts["resume"],
                         config=config, progress=not opts["quiet"],
                         degradation=opts["degradation"], crop=opts["crop"],
                         normalization=norm, checkpoint_every=opts["checkpoint_every"],
                         init_weights=init, workers=opts["workers"],
                         precision=opts["precision"])
    card = _card(name, chips, info, _command_line(ctx), "refiner", opts,
                 base=stage.card if stage else None)
    if stage is not None:
        card.training.data["coarse_model"] = {"kind": stage.kind, "path": str(stage.path)}
    coarse_ckpt = stage.path if stage and stage.kind == "idgbr-checkpoint" else None
    path = export_model(coarse_ckpt, ckpt, card, out)
    if stage is not None and stage.kind in ("idgbr", "torchgeo"):
        # embed the coarse stage so the exported model runs end to end
        if stage.kind == "idgbr":
            section = stage.card.segmentor
            weights = load_file(str(stage.path.parent / stage.card.weights))
            extra = {k: v for k, v in weights.items() if k.startswith("segmentor.")}
        else:
            section, state = byo.segmentor_section(stage.path, model_normalization=model_norm)
            extra = {f"segmentor.{k}": v for k, v in state.items()}
        card.segmentor = section
        tensors = {**load_file(str(out / card.weights)), **extra}
        if shares_encoder(card.refiner):
            drop_shared_encoder(tensors, ckpt)
        path = save_model(card, tensors, out)
    if not opts["quiet"]:
        click.echo(f"refiner model written: {path}")
        if stage is not None and stage.kind == "torchscript":
            click.echo("note: a TorchScript coarse model cannot be embedded in the card; "
                       "refine with coarse maps from it (idgbr-geo refine --coarse).", err=True)

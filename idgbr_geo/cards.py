"""Model cards: the JSON that travels with every set of weights.

The card is the contract between a trained model and the raster engine: which classes it
predicts (names and colours), which bands it reads, how raw pixel values are normalised,
at which ground sample distance (GSD) it was trained, and the defaults for tiling and
sampling. The engine reads only the card and the segmentor/refiner interfaces, never the
network code.

A card (``version`` 2) keeps apart what the weights fix (``segmentor`` / ``refiner``:
architecture), how the engine runs them (tiling fields and ``sampling``: steps, gate) and
where they came from (``training``: data, licences, exact commands, each stage's training
settings); ``extra`` holds free-form notes (e.g. validation tables). Version-1 cards (no
``version``: steps at the top, gate and training settings mixed into ``refiner.config``)
are migrated when loaded (:func:`migrate_card`) and behave exactly as before.

Cards are often edited by hand or come from elsewhere, so :meth:`ModelCard.load` checks every
field (:func:`validate_card`): a bad card is one clear error naming the card and the field,
not a traceback (or a silent division by zero) somewhere inside a run.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from .config import (
    CoarseConfig,
    LiteFpnConfig,
    LiteRefinerConfig,
    RefinerConfig,
    RefinerTrainingConfig,
    SamplingConfig,
    TrainingConfig,
    _Settings,
    is_zoom,
    split_legacy,
)
from .errors import UserError

#: the card schema this version writes (and the newest it reads)
CARD_VERSION = 2

#: Divisor that maps each raw dtype kind onto [0, 1] before mean/std normalisation.
DEFAULT_VALUE_RANGE = {"uint8": 255.0, "uint16": 65535.0, "int16": 32767.0, "float": 1.0}

DEFAULT_COLORS = [
    "#000000", "#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#ffff33", "#a65628",
]


#: class ids are written as uint8 and 255 is the nodata value
MAX_CLASSES = 255
_HEX_COLOR = re.compile(r"#[0-9a-fA-F]{6}")

#: the built-in architectures whose ``config`` is checked against a typed config
ARCH_CONFIGS: dict[str, type[CoarseConfig] | type[RefinerConfig]] = {
    "idgbr-coarse": CoarseConfig, "idgbr-refiner": RefinerConfig}
#: architectures whose card ``config`` is checked too (but that version 1 never had)
CHECKED_CONFIGS: dict[str, type[_Settings]] = {
    **ARCH_CONFIGS, "lite-fpn": LiteFpnConfig, "lite-idgbr": LiteRefinerConfig}
#: training settings recorded per stage (card ``training.segmentor`` / ``training.refiner``)
STAGE_TRAINING: dict[str, type[TrainingConfig]] = {
    "segmentor": TrainingConfig, "refiner": RefinerTrainingConfig}
#: what version 1 built when an ``idgbr-coarse`` config left out the widths
V1_COARSE_WIDTHS = [16, 32, 48, 64]
#: the version-1 default of the sampling steps (version 2: :class:`SamplingConfig`)
V1_STEPS = 4


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    """A finite JSON number (bools are ints to Python, not numbers to a card)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_working_gsd(g: Any, gsd: float) -> bool:
    """A working GSD in metres a card may list: within 4x of the model's ``gsd``."""
    return _is_number(g) and 1 / 4 <= g / gsd <= 4


def _numbers(v: Any, n: int) -> bool:
    return isinstance(v, list) and len(v) == n and all(_is_number(x) for x in v)


def card_version(data: Any) -> Any:
    """The schema version of a card's raw data (absent: 1)."""
    return data.get("version", 1) if isinstance(data, dict) else None


def card_problem(data: Any) -> str | None:
    """The first problem of a card's raw JSON data (None when it is usable).

    Checked so a bad card fails when loaded: e.g. ``std: 0`` would divide by zero in every
    window, ``stride_multiple: 0`` would hang the tiling, a bad colour would crash the writer,
    a misspelt setting would silently fall back to its default. A version-1 card is checked,
    migrated (:func:`migrate_card`) and then checked as a current one.
    """
    if not isinstance(data, dict):
        return f"must be a JSON object, not a JSON {type(data).__name__}"
    version = card_version(data)
    if not _is_int(version) or not 1 <= version:
        return f"'version' must be a whole number >= 1, not {version!r}"
    if version > CARD_VERSION:
        return (f"card version {version} is newer than this idgbr-geo reads (up to "
                f"{CARD_VERSION}): update idgbr-geo")
    problem = _common_problem(data)
    if problem:
        return problem
    if version == 1:
        v = data.get("steps", V1_STEPS)
        if not _is_int(v) or v < 0:
            return f"'steps' must be a whole number >= 0, not {v!r}"
        try:
            data = migrate_card(data)
        except UserError as exc:
            return str(exc)
    return _current_problem(data)


def _common_problem(data: dict[str, Any]) -> str | None:
    """Checks of the fields every version has."""
    for key in ("name", "classes"):
        if key not in data:
            return f"no {key!r}"
    if not isinstance(data["name"], str) or not data["name"].strip():
        return "'name' must be a non-empty string"
    classes = data["classes"]
    if (not isinstance(classes, list) or not classes
            or not all(isinstance(c, str) and c for c in classes)):
        return "'classes' must be a non-empty list of class names"
    if len(set(classes)) != len(classes):
        return f"class names must be unique: {classes}"
    if len(classes) > MAX_CLASSES:
        return f"{len(classes)} classes, at most {MAX_CLASSES} are supported"
    colors = data.get("colors", [])
    if not isinstance(colors, list):
        return "'colors' must be a list of '#rrggbb' colours"
    if colors and len(colors) != len(classes):
        return f"{len(colors)} colours for {len(classes)} classes"
    for c in colors:
        if not isinstance(c, str) or not _HEX_COLOR.fullmatch(c):
            return f"colour {c!r} is not of the form '#rrggbb'"
    bands = data.get("bands", 3)
    if not _is_int(bands) or bands < 1:
        return f"'bands' must be a whole number >= 1, not {bands!r}"
    names = data.get("band_names")
    if names is not None and (not isinstance(names, list) or len(names) != bands
                              or not all(isinstance(b, str) for b in names)):
        return f"'band_names' must be a list of {bands} names"
    problem = _normalization_problem(data.get("normalization", {}), bands)
    if problem:
        return problem
    for key in ("gsd", "gsd_without_crs"):
        gsd = data.get(key)
        if gsd is not None and not (_is_number(gsd) and math.isfinite(gsd) and gsd > 0):
            return f"{key!r} must be a positive number of metres (or null), not {gsd!r}"
    assumed = data.get("gsd_without_crs")
    if assumed is not None:
        if data.get("gsd") is None:
            return "'gsd_without_crs' needs the model's 'gsd'"
        if not 1 / 8 <= assumed / data["gsd"] <= 8:
            return (f"'gsd_without_crs' {assumed:g} m must be within 8x of the model's 'gsd' "
                    f"{data['gsd']:g} m")
    choices = data.get("gsd_choices")
    if choices is not None:
        if data.get("gsd") is None:
            return "'gsd_choices' needs the model's 'gsd'"
        if not (isinstance(choices, list) and len(choices) >= 2
                and all(_is_working_gsd(g, data["gsd"]) for g in choices)):
            return ("'gsd_choices' must be a list of two or more working GSDs in metres, "
                    f"within 4x of the model's 'gsd' (or null), not {choices!r}")
    fine = data.get("fine_gsd_choices")
    if fine is not None:
        if choices is None:
            return "'fine_gsd_choices' needs 'gsd_choices'"
        if not (isinstance(fine, list) and fine and all(
                _is_working_gsd(g, data["gsd"]) and g < min(choices) for g in fine)):
            return ("'fine_gsd_choices' must be a list of working GSDs in metres finer than "
                    f"every one of 'gsd_choices', within 4x of the model's 'gsd' (or null), "
                    f"not {fine!r}")
    problem = _gsd_from_width_problem(data.get("gsd_from_width"), data)
    if problem:
        return problem
    zooms = data.get("coarse_zooms")
    if zooms is not None and not (isinstance(zooms, list) and zooms
                                  and all(is_zoom(z) for z in zooms)):
        return ("'coarse_zooms' must be a list of zooms between 0.5 and 2 other than 1 "
                f"(or null), not {zooms!r}")
    if not isinstance(data.get("edge_filter", False), bool):
        return f"'edge_filter' must be true or false, not {data['edge_filter']!r}"
    for key, low in (("tile_size", 1), ("overlap", 0), ("stride_multiple", 1)):
        v = data.get(key, 0 if low == 0 else 1)
        if not _is_int(v) or v < low:
            return f"{key!r} must be a whole number >= {low}, not {v!r}"
    weights = data.get("weights")
    if weights is not None and not isinstance(weights, str):
        return f"'weights' must be a file name, not {weights!r}"
    for key in ("segmentor", "refiner"):
        section = data.get(key, {})
        if not isinstance(section, dict):
            return f"{key!r} must be a JSON object"
        if section and not isinstance(section.get("arch"), str):
            return f"{key!r} has no 'arch' name"
        if not isinstance(section.get("config", {}), dict):
            return f"{key!r} 'config' must be a JSON object"
    if not isinstance(data.get("extra", {}), dict):
        return "'extra' must be a JSON object"
    return None


def _gsd_from_width_problem(prior: Any, data: dict[str, Any]) -> str | None:
    if prior is None:
        return None
    classes = data.get("classes") or []
    if not (isinstance(prior, dict) and set(prior) == {"class", "width"}
            and prior["class"] in classes[1:] and _is_number(prior["width"])
            and prior["width"] > 0):
        return ("'gsd_from_width' must be {\"class\": one of the classes after the first, "
                f"\"width\": metres > 0}} (or null), not {prior!r}")
    if data.get("gsd") is None:
        return "'gsd_from_width' needs the model's 'gsd'"
    return None


def _current_problem(data: dict[str, Any]) -> str | None:
    """Checks of what only a current (version 2) card has, or has in another form."""
    known = {f.name for f in fields(ModelCard)} | {"version"}
    unknown = [k for k in data if k not in known]
    if unknown:
        return (f"unknown field{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(repr(k) for k in unknown)} (free-form notes go in 'extra')")
    for key in ("segmentor", "refiner"):
        section = data.get(key, {})
        odd = [k for k in section if k not in ("arch", "config")]
        if odd:
            return f"{key!r} has unknown field {odd[0]!r} (it holds 'arch' and 'config')"
        typed = CHECKED_CONFIGS.get(section.get("arch", ""))
        problem = typed.problem(section.get("config", {})) if typed else None
        if problem:
            return f"{key} config: {problem}"
    sampling = data.get("sampling", {})
    problem = SamplingConfig.problem(sampling)
    if problem:
        return f"sampling {problem}"
    gate, k = sampling.get("gate"), len(data["classes"])
    if isinstance(gate, list) and len(gate) != k:
        return (f"sampling 'gate' must be one probability or a list of {k} (one per class), "
                f"not {gate!r}")
    return _training_problem(data.get("training", {}))


def _training_problem(training: Any) -> str | None:
    if not isinstance(training, dict):
        return "'training' must be a JSON object"
    allowed = [f.name for f in fields(TrainingRecord)]
    odd = [k for k in training if k not in allowed]
    if odd:
        return f"'training' has unknown field {odd[0]!r} (known: {', '.join(allowed)})"
    if not isinstance(training.get("data", {}), dict):
        return "training 'data' must be a JSON object"
    licences = training.get("licences", {})
    if not isinstance(licences, dict) or not all(isinstance(v, str) for v in licences.values()):
        return "training 'licences' must map what (e.g. 'imagery') to its licence text"
    commands = training.get("commands", [])
    if not isinstance(commands, list) or not all(isinstance(c, str) for c in commands):
        return "training 'commands' must be a list of command lines"
    for stage, cls in STAGE_TRAINING.items():
        problem = cls.problem(training.get(stage, {}))
        if problem:
            return f"training {stage} {problem}"
    return None


def _normalization_problem(norm: Any, bands: int) -> str | None:
    if not isinstance(norm, dict):
        return "'normalization' must be a JSON object"
    unknown = set(norm) - {"mean", "std", "value_range"}
    if unknown:
        return f"unknown normalization field(s) {sorted(unknown)}"
    default = Normalization()
    mean, std = norm.get("mean", default.mean), norm.get("std", default.std)
    for key, values in (("mean", mean), ("std", std)):
        if not _numbers(values, bands):
            return f"normalization {key} must be a list of {bands} numbers (one per band)"
    if any(v <= 0 for v in std):
        return f"normalization std must be > 0 for every band, not {std}"
    vr = norm.get("value_range", {})
    if not isinstance(vr, dict) or not all(isinstance(k, str) and _is_number(v) and v > 0
                                           for k, v in vr.items()):
        return "normalization value_range must map dtype names to positive numbers"
    return None


def validate_card(data: Any, where: str | Path) -> None:
    """Raise one UserError naming the card (``where``) and its first problem, if any."""
    problem = card_problem(data)
    if problem:
        raise UserError(f"model card {where}: {problem}")


def migrate_card(data: dict[str, Any]) -> dict[str, Any]:
    """A card's raw data in the current schema (a copy; current cards come back as they are).

    Version 1 -> 2: the top-level ``steps`` (default 4 in version 1) and ``refiner.config``'s
    ``gate`` go to ``sampling``; training settings mixed into the ``idgbr-*`` network configs
    go to ``training.segmentor`` / ``training.refiner``; research sampler options are dropped
    when they are off and refused otherwise; architecture defaults of version 1 are written
    out; ``extra``'s training data, commands and attribution go to ``training``; top-level
    fields version 1 did not know go to ``extra`` (where version 1 put them)."""
    data = copy.deepcopy(data)
    if card_version(data) != 1:
        return data
    known = {f.name for f in fields(ModelCard)}
    out: dict[str, Any] = {"version": CARD_VERSION}
    extra = dict(data.get("extra", {}))
    for key, value in data.items():
        if key in known and key not in ("extra", "sampling", "training"):
            out[key] = value
        elif key not in ("version", "steps", "extra"):
            extra[key] = value
    sampling: dict[str, Any] = {"steps": data.get("steps", V1_STEPS)}
    training: dict[str, Any] = {}
    for key, stage in (("segmentor", "coarse"), ("refiner", "refiner")):
        section = data.get(key) or {}
        if section.get("arch") not in ARCH_CONFIGS:
            continue
        arch, train, samp = split_legacy(stage, section.get("config", {}), f"{key} 'config'")
        if stage == "coarse":
            arch.setdefault("widths", V1_COARSE_WIDTHS)
        out[key] = {"arch": section["arch"],
                    "config": ARCH_CONFIGS[section["arch"]](**arch).to_dict()}
        if train:
            training[key] = train
        if "gate" in samp:  # (its "steps" was never read: the top-level one was)
            sampling["gate"] = samp["gate"]
    _migrate_provenance(extra, training)
    out.update(sampling=sampling, training=training, extra=extra)
    return out


def _migrate_provenance(extra: dict[str, Any], training: dict[str, Any]) -> None:
    """Version 1 kept provenance in ``extra``: the bundled cards' ``training_data`` and
    ``training_commands``, the CLI's ``training`` and ``attribution``. Moved to ``training``
    when they have the shape those writers gave them; anything else stays in ``extra``."""
    if isinstance(extra.get("training_data"), dict):
        training["data"] = extra.pop("training_data")
    commands = extra.get("training_commands")
    if isinstance(commands, list) and all(isinstance(c, str) for c in commands):
        training["commands"] = extra.pop("training_commands")
    cli = extra.get("training")
    if (isinstance(cli, dict) and cli.get("stage") in ("coarse", "refiner")
            and isinstance(cli.get("command"), str)):
        extra.pop("training")
        stage = "segmentor" if cli["stage"] == "coarse" else "refiner"
        run = {k: cli[k] for k in ("seed", "iterations", "batch_size", "lr") if k in cli}
        if STAGE_TRAINING[stage].problem({**training.get(stage, {}), **run}) is None:
            training[stage] = {**training.get(stage, {}), **run}
        training.setdefault("commands", []).append(cli["command"])
        data = {k: v for k, v in cli.items()
                if k not in ("command", "stage", "seed", "iterations", "batch_size", "lr")}
        if isinstance(data.get("data"), dict):  # (the CLI nested the chips' summary)
            data.update(data.pop("data"))
        training["data"] = {**training.get("data", {}), **data}
    if isinstance(extra.get("attribution"), str):
        training["licences"] = {"data": extra.pop("attribution")}


@dataclass
class Normalization:
    """Raw value -> network input: ``(value / value_range[dtype] - mean) / std`` per band."""

    mean: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    std: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    value_range: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_VALUE_RANGE))

    def divisor(self, dtype: np.dtype | str) -> float:
        """The divisor for a raster dtype (float rasters are assumed already in [0, 1])."""
        dt = np.dtype(dtype)
        if dt.kind == "f":
            return float(self.value_range.get("float", 1.0))
        return float(self.value_range.get(dt.name, np.iinfo(dt).max))

    def apply(self, data: np.ndarray, dtype: np.dtype | str) -> np.ndarray:
        """Normalise a (bands, H, W) array of raw values of the source's ``dtype`` (the
        array itself may already be float after resampling) to float32 network input."""
        std = np.asarray(self.std, np.float64)
        scale = (1.0 / (self.divisor(dtype) * std)).astype(np.float32)[:, None, None]
        offset = (-np.asarray(self.mean, np.float64) / std).astype(np.float32)[:, None, None]
        out = np.multiply(data, scale, dtype=np.float32)  # two passes: it runs per window
        out += offset
        return out


@dataclass
class TrainingRecord:
    """Where a model's weights came from (card ``training``): documentation, not settings
    the engine reads, but checked so that it stays machine-readable."""

    #: the data: dataset, splits, chips, GSD notes, the coarse model the refiner learned from
    data: dict[str, Any] = field(default_factory=dict)
    #: what -> licence, e.g. {"imagery": "CC-BY-4.0 ...", "labels": "ODbL-1.0 ..."}
    licences: dict[str, str] = field(default_factory=dict)
    #: the exact commands that made the weights, in order
    commands: list[str] = field(default_factory=list)
    #: each stage's training settings (:class:`TrainingConfig`, as far as known)
    segmentor: dict[str, Any] = field(default_factory=dict)
    refiner: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelCard:
    """Everything the engine must know about a model, stored as JSON beside its weights."""

    name: str
    classes: list[str]
    colors: list[str] = field(default_factory=list)
    bands: int = 3
    band_names: list[str] = field(default_factory=lambda: ["red", "green", "blue"])
    normalization: Normalization = field(default_factory=Normalization)
    gsd: float | None = None
    #: the pixel size assumed for an input without a CRS (its GSD unknown; most such files
    #: are satellite exports) when none is given; None: the model's ``gsd``
    gsd_without_crs: float | None = None
    #: for an input without a CRS and no given GSD: estimate its GSD from the image instead
    #: of assuming ``gsd_without_crs`` (which the estimate starts from), as the one at which
    #: the coarse map's objects of a class are as wide as that class in the training labels
    #: (``{"class": "road", "width": 6.3}``: median metres; :func:`idgbr_geo.scale.estimate_gsd`);
    #: None: no estimate
    gsd_from_width: dict[str, Any] | None = None
    #: working GSDs the engine may run the model at instead of ``gsd``, chosen per scene by
    #: the coarse map's confidence on sample windows (:mod:`idgbr_geo.scale`); None: ``gsd``
    gsd_choices: list[float] | None = None
    #: finer working GSDs, added to ``gsd_choices`` only for an input at least as fine as
    #: each (working there downsamples it, never upsamples: a drone scene may be read finer,
    #: a satellite scene is not blown up further); None: none
    fine_gsd_choices: list[float] | None = None
    #: zooms at which the coarse model also sees each window, its probabilities averaged
    #: with the window's own (0.8: a finer working GSD, 1.25: a coarser one; costs each
    #: view's pixels; :func:`idgbr_geo.views.multiscale_probabilities`); None: one view
    coarse_zooms: list[float] | None = None
    #: the classes' boundaries are edges of the image (roof outlines, shores), not drawn by
    #: convention (a road buffered around its centre line): the output is redrawn along the
    #: image's edges also where the input is read at about its own resolution, not only
    #: where it is finer than the working grid (:data:`idgbr_geo.upsampling.MIN_FACTOR`)
    edge_filter: bool = False
    tile_size: int = 512
    overlap: int = 64
    #: multiple that window origins must respect (e.g. a refiner working at 1/4 resolution)
    stride_multiple: int = 8
    weights: str | None = None
    #: architecture sections: {"arch": name, "config": {...}}
    segmentor: dict[str, Any] = field(default_factory=dict)
    refiner: dict[str, Any] = field(default_factory=dict)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    training: TrainingRecord = field(default_factory=TrainingRecord)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.normalization, dict):
            self.normalization = Normalization(**self.normalization)
        if isinstance(self.sampling, dict):
            self.sampling = SamplingConfig.from_dict(self.sampling,
                                                     f"model card {self.name!r}: sampling")
        if isinstance(self.training, dict):
            self.training = TrainingRecord(**self.training)
        if not self.colors:
            n = len(DEFAULT_COLORS)
            self.colors = [DEFAULT_COLORS[i % n] for i in range(len(self.classes))]
        if len(self.colors) != len(self.classes):
            raise UserError(f"model card {self.name!r}: {len(self.colors)} colours for "
                            f"{len(self.classes)} classes")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def working_gsd_choices(self, input_gsd: float | None) -> list[float]:
        """The working GSDs the engine chooses from for an input of ``input_gsd`` metres
        (None: unknown): each of ``fine_gsd_choices`` the input is at least as fine as
        (finest first), then ``gsd_choices`` as listed (ties go to the earlier one)."""
        fine = [g for g in self.fine_gsd_choices or ()
                if input_gsd is not None and input_gsd <= g]
        return sorted(fine) + list(self.gsd_choices or ())

    def to_dict(self) -> dict[str, Any]:
        """The card's JSON data, in the current schema."""
        out: dict[str, Any] = {"version": CARD_VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = (value.to_dict() if isinstance(value, SamplingConfig)
                           else asdict(value) if isinstance(value, (Normalization,
                                                                    TrainingRecord))
                           else copy.deepcopy(value))
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str | Path | None = None) -> ModelCard:
        """A card from its JSON data (any version), checked first (:func:`validate_card`)
        and migrated to the current schema; ``where`` names it in errors (the card's path)."""
        name = data.get("name") if isinstance(data, dict) else None
        validate_card(data, where if where is not None else repr(name))
        data = migrate_card(data)
        data.pop("version", None)
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError, RecursionError) as exc:  # (not text, not JSON)
            raise UserError(f"cannot read model card {path}: {exc}") from None
        return cls.from_dict(data, path)


def hex_to_rgb(color: str) -> tuple[int, int, int]:
    """'#rrggbb' -> (r, g, b)."""
    c = color.lstrip("#")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)

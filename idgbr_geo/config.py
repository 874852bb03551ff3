"""Typed settings of the networks, the sampler and training: one default per setting, here.

Cards and ``train --config`` are JSON, often written by hand or by an older version. A key
that is not a setting (a typo, a knob that no longer exists) is one :class:`UserError` line
naming it instead of being silently ignored, and every setting has exactly one default, so
the card, the engine, training and its validation cannot disagree about it.

* :class:`CoarseConfig`, :class:`RefinerConfig`: the networks' architecture (card
  ``segmentor.config`` / ``refiner.config`` of the ``idgbr-*`` architectures);
  :class:`LiteFpnConfig` that of the ``lite-fpn`` segmentor;
* :class:`SamplingConfig`: how the refiner is run (card ``sampling``: steps, gate);
* :class:`TrainingConfig`, :class:`RefinerTrainingConfig`: how a stage was trained (kept
  in checkpoints and, as provenance, in the card's ``training`` section).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Self

from .errors import UserError


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    """A finite JSON number (bools are ints to Python, not numbers to a card)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_zoom(v: Any) -> bool:
    """A zoom of the coarse model's view of a window (card and refiner-training
    ``coarse_zooms``): a number in 0.5..2 other than 1 (1 is the window itself)."""
    return _is_number(v) and 0.5 <= v <= 2 and v != 1


def _bounds(lo: float, hi: float | None) -> str:
    return f">= {lo}" if hi is None else f"in {lo}..{hi}"


class _Settings:
    """JSON in and out for the frozen dataclasses below; ``__post_init__`` checks values
    (raising ValueError with the message) and normalises them (lists -> tuples, ints ->
    floats) so that equal settings compare equal."""

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]  # type: ignore[arg-type]

    @classmethod
    def problem(cls, data: Any) -> str | None:
        """What is wrong with ``data`` as (part of) these settings, or None."""
        if not isinstance(data, Mapping):
            return f"must be a JSON object, not {type(data).__name__}"
        known = cls.keys()
        unknown = [k for k in data if k not in known]
        if unknown:
            return (f"unknown setting{'s' if len(unknown) > 1 else ''} "
                    f"{', '.join(repr(k) for k in unknown)} (known: {', '.join(known)})")
        try:
            cls(**data)
        except (ValueError, TypeError) as exc:
            return str(exc)
        return None

    @classmethod
    def from_dict(cls, data: Any, what: str) -> Self:
        """Settings from JSON data; one UserError line (starting with ``what``) for unknown
        keys and bad values. Missing keys take the defaults."""
        problem = cls.problem(data)
        if problem:
            raise UserError(f"{what}: {problem}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in ((f, getattr(self, f)) for f in self.keys())}

    def _int(self, name: str, lo: int, hi: int | None = None) -> None:
        v = getattr(self, name)
        if not _is_int(v) or v < lo or (hi is not None and v > hi):
            raise ValueError(f"{name!r} must be a whole number {_bounds(lo, hi)}, not {v!r}")

    def _float(self, name: str, lo: float, hi: float | None = None) -> None:
        v = getattr(self, name)
        if not _is_number(v) or v < lo or (hi is not None and v > hi):
            raise ValueError(f"{name!r} must be a number {_bounds(lo, hi)}, not {v!r}")
        object.__setattr__(self, name, float(v))

    def _bool(self, name: str) -> None:
        if not isinstance(getattr(self, name), bool):
            raise ValueError(f"{name!r} must be true or false, not {getattr(self, name)!r}")

    def _choice(self, name: str, options: tuple[str, ...]) -> None:
        if getattr(self, name) not in options:
            raise ValueError(f"{name!r} must be one of {', '.join(options)}, "
                             f"not {getattr(self, name)!r}")


# ------------------------------------------------------------------------ architecture


@dataclass(frozen=True)
class CoarseConfig(_Settings):
    """Architecture of the coarse segmentor (:class:`idgbr_geo.networks.CoarseNet`)."""

    #: channels at 1/2, 1/4, 1/8 and 1/16 resolution
    widths: tuple[int, ...] = (16, 32, 64, 96)
    #: resolution of the prediction before upsampling: 4, or 8/16 for a blurrier model
    output_stride: int = 4

    def __post_init__(self) -> None:
        w = self.widths
        if (not isinstance(w, (list, tuple)) or len(w) != 4
                or not all(_is_int(v) and v >= 1 for v in w)):
            raise ValueError(f"'widths' must be 4 whole numbers >= 1, not {w!r}")
        object.__setattr__(self, "widths", tuple(w))
        if self.output_stride not in (4, 8, 16) or not _is_int(self.output_stride):
            raise ValueError(f"'output_stride' must be 4, 8 or 16, not {self.output_stride!r}")


#: EfficientNet-Lite sizes of :class:`LiteFpnConfig` (timm ``efficientnet_lite0..2``)
LITE_VARIANTS = ("lite0", "lite1", "lite2")


@dataclass(frozen=True)
class LiteFpnConfig(_Settings):
    """Architecture of the ``lite-fpn`` coarse segmentor (:class:`idgbr_geo.lite_fpn.LiteFpnNet`):
    an EfficientNet-Lite encoder (ImageNet-pretrained when trained) with an FPN decoder. The
    bands and classes are the card's, as for :class:`CoarseConfig`."""

    variant: str = "lite0"
    #: FPN channels (laterals, fusion convolution)
    channels: int = 64

    def __post_init__(self) -> None:
        self._choice("variant", LITE_VARIANTS)
        self._int("channels", 1)


#: refiner modes: iterative denoising, or the same networks trained as a one-pass refiner
REFINER_MODES = ("diffusion", "oneshot")


@dataclass(frozen=True)
class RefinerConfig(_Settings):
    """Architecture of the refiner (:class:`idgbr_geo.networks.RefinerNet`) and the way it
    was trained to be run (``mode``), which the weights fix."""

    c1: int = 8
    c2: int = 16
    c4: int = 32
    c8: int = 48
    ch: int = 32
    blocks: int = 2
    #: the guidance network reads the coarse map (False: the image-only ablation)
    use_coarse: bool = True
    #: the denoiser predicts a correction of the coarse map's logits
    residual: bool = False
    mode: str = "diffusion"

    def __post_init__(self) -> None:
        for name in ("c1", "c2", "c4", "c8", "ch", "blocks"):
            self._int(name, 1)
        self._bool("use_coarse")
        self._bool("residual")
        self._choice("mode", REFINER_MODES)


@dataclass(frozen=True)
class LiteRefinerConfig(_Settings):
    """Architecture of the ``lite-idgbr`` refiner (:class:`idgbr_geo.lite_refiner.LiteRefinerNet`):
    its guidance network reads the multi-scale features of a pretrained EfficientNet-Lite
    encoder together with the coarse map, as IDGBR's reads DINOv2's. The encoder is the
    coarse model's, frozen, unless training fine-tunes it
    (:class:`RefinerTrainingConfig` ``encoder_lr``).

    ``encoder = "segmentor"``: the encoder is the model's ``lite-fpn`` segmentor's (same
    variant; its weights are stored once, with the segmentor), so the engine runs it once
    per window for both stages; ``"own"``: the refiner stores its own copy."""

    variant: str = "lite0"
    encoder: str = "segmentor"
    c1: int = 8
    c2: int = 16
    c4: int = 48
    ch: int = 48
    blocks: int = 2
    #: the denoiser predicts a correction of the coarse map's logits
    residual: bool = True
    mode: str = "diffusion"

    def __post_init__(self) -> None:
        self._choice("variant", LITE_VARIANTS)
        self._choice("encoder", ("segmentor", "own"))
        for name in ("c1", "c2", "c4", "ch", "blocks"):
            self._int(name, 1)
        self._bool("residual")
        self._choice("mode", REFINER_MODES)


# ---------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class SamplingConfig(_Settings):
    """How the engine runs the refiner by default (card ``sampling``)."""

    #: diffusion sampling steps (0: no refinement)
    steps: int = 1
    #: keep a pixel's coarse class unless the refiner gives its own, different class at
    #: least this probability (0: off); a list: one threshold per class the pixel would
    #: turn into
    gate: float | tuple[float, ...] = 0.0

    def __post_init__(self) -> None:
        self._int("steps", 0)
        g = self.gate
        if isinstance(g, (list, tuple)):
            if not g or not all(_is_number(v) and 0 <= v <= 1 for v in g):
                raise ValueError(f"'gate' must be a probability (0..1) or a list of them, "
                                 f"not {g!r}")
            object.__setattr__(self, "gate", tuple(float(v) for v in g))
        else:
            self._float("gate", 0.0, 1.0)

    def thresholds(self, num_classes: int) -> list[float]:
        """The gate as one threshold per class (ValueError if a list has another length)."""
        return gate_thresholds(self.gate, num_classes)


def gate_thresholds(gate: Any, num_classes: int) -> list[float]:
    """A gate (one number, or one per class) as one threshold per class; ValueError for
    anything else. (A threshold above 1 never lets the refiner give a pixel that class.)"""
    per_class = isinstance(gate, (list, tuple))
    values = list(gate) if per_class else [gate]
    if (len(values) != (num_classes if per_class else 1)
            or not all(_is_number(v) for v in values)):
        raise ValueError(f"gate must be a probability or a list of thresholds for "
                         f"{num_classes} classes (one per class), not {gate!r}")
    return [float(v) for v in values] * (1 if per_class else num_classes)


# ---------------------------------------------------------------------------- training


#: the training-time colour augmentations (:mod:`idgbr_geo.chips`)
COLOUR_AUGMENTATIONS = ("mild", "strong")
#: the sensor augmentations besides true / false (:data:`idgbr_geo.chips.SENSOR_RANGES`)
SENSOR_AUGMENTATIONS = ("mild", "wide")


@dataclass(frozen=True)
class TrainingConfig(_Settings):
    """How a stage is trained (the coarse segmentor's settings; the refiner has more)."""

    iterations: int = 3000
    batch_size: int = 8
    lr: float = 2e-3
    #: training crop size in pixels
    crop: int = 128
    seed: int = 0
    checkpoint_every: int = 250
    #: decay of an exponential moving average of the weights (0: none)
    ema: float = 0.0
    #: random zoom of the training crops relative to the model GSD (min, max): users' scenes
    #: come at other GSDs, and inputs without a CRS at an unknown one
    scale: tuple[float, float] = (0.7, 1.4)
    #: sensor augmentation on top of colour jitter: blur, haze, noise, gamma, JPEG; true or
    #: "mild" (the bundled models'), "wide" (stronger, with band gains: :mod:`idgbr_geo.chips`)
    sensor_aug: bool | str = False
    #: colour jitter: "mild" (the bundled models until session 17) or "strong" (hue turns,
    #: grey chips, wider saturation, contrast and band gains: :mod:`idgbr_geo.chips`)
    colour_aug: str = "mild"
    #: weight of the soft clDice term (Shit et al. 2021) in the coarse loss: it scores the
    #: overlap of the maps' soft skeletons, so a break in a thin road costs as much as a
    #: missing road (0: cross-entropy + soft Dice only)
    cldice: float = 0.0
    #: weight of the Lovász-softmax term (Berman et al. 2018) in the coarse loss: a convex
    #: surrogate of the thresholded maps' IoU over the batch, the number the models are
    #: judged by, which soft Dice only approximates (0: none)
    lovasz: float = 0.0

    def __post_init__(self) -> None:
        for name in ("iterations", "batch_size", "crop", "checkpoint_every"):
            self._int(name, 1)
        self._int("seed", 0)
        self._float("lr", 0.0)
        if self.lr <= 0:
            raise ValueError(f"'lr' must be a number > 0, not {self.lr!r}")
        self._float("ema", 0.0, 1.0)
        self._float("cldice", 0.0)
        self._float("lovasz", 0.0)
        sc = self.scale
        if (not isinstance(sc, (list, tuple)) or len(sc) != 2
                or not all(_is_number(v) and v > 0 for v in sc) or sc[0] > sc[1]):
            raise ValueError(f"'scale' must be [min, max] with 0 < min <= max, not {sc!r}")
        object.__setattr__(self, "scale", (float(sc[0]), float(sc[1])))
        if not isinstance(self.sensor_aug, bool):
            self._choice("sensor_aug", SENSOR_AUGMENTATIONS)
        self._choice("colour_aug", COLOUR_AUGMENTATIONS)


#: the coarse loss's optional terms, no settings of the refiner
_COARSE_LOSS_TERMS = ("cldice", "lovasz")


@dataclass(frozen=True)
class RefinerTrainingConfig(TrainingConfig):
    """How the refiner is trained (see :func:`idgbr_geo.diffusion.training_loss`)."""

    #: largest diffusion time of the training samples
    t_max: float = 1.0
    #: share of samples without guidance (classifier-free guidance training)
    p_uncond: float = 0.0
    #: share of samples whose coarse map comes from the coarse model (else: degraded truth)
    p_model: float = 0.5
    #: share of samples whose x_t is the noised coarse map instead of the noised truth
    p_coarse_x0: float = 0.5
    #: share of the degraded-truth maps given as one-hot class rasters (a user's map)
    p_onehot: float = 0.25
    #: corrupt the coarse model's input by this much (0: clean image)
    coarse_perturb: float = 0.0
    #: extra loss weight of pixels near a true class boundary (0: plain mean)
    boundary_weight: float = 0.0
    boundary_radius: int = 2
    #: also learn from random degradations of the ground truth
    degradation: bool = True
    #: the coarse model's maps averaged over these zoomed views too, as a card's
    #: ``coarse_zooms`` makes them at inference (empty: one view)
    coarse_zooms: tuple[float, ...] = ()
    #: learning rate of a ``lite-idgbr`` refiner's encoder (at the schedule's peak; it
    #: follows the same warm-up and decay): 0 keeps the encoder frozen as the coarse model
    #: trained it; above 0 fine-tunes it (its norms' statistics stay), which needs the
    #: refiner's own copy (``encoder: "own"``)
    encoder_lr: float = 0.0

    @classmethod
    def keys(cls) -> list[str]:
        """The coarse settings less ``cldice`` and ``lovasz``, terms of the coarse loss only:
        unknown here, and not written into the refiner's checkpoints and cards."""
        return [k for k in super().keys() if k not in _COARSE_LOSS_TERMS]

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in _COARSE_LOSS_TERMS:
            if getattr(self, name):
                raise ValueError(f"'{name}' is a setting of the coarse stage, not of the "
                                 "refiner")
        zooms = self.coarse_zooms
        if not isinstance(zooms, (list, tuple)) or not all(is_zoom(z) for z in zooms):
            raise ValueError("'coarse_zooms' must be a list of zooms between 0.5 and 2 other "
                             f"than 1, not {zooms!r}")
        object.__setattr__(self, "coarse_zooms", tuple(float(z) for z in zooms))
        for name in ("t_max", "p_uncond", "p_model", "p_coarse_x0", "p_onehot"):
            self._float(name, 0.0, 1.0)
        self._float("coarse_perturb", 0.0)
        self._float("encoder_lr", 0.0)
        self._float("boundary_weight", 0.0)
        self._int("boundary_radius", 0)
        self._bool("degradation")


#: the coarse architectures ``train coarse`` builds (``--config`` key ``arch``) -> their
#: settings; the first is the default
COARSE_ARCHS: dict[str, type[CoarseConfig] | type[LiteFpnConfig]] = {
    "idgbr-coarse": CoarseConfig, "lite-fpn": LiteFpnConfig}
DEFAULT_COARSE_ARCH = next(iter(COARSE_ARCHS))
#: the refiner architectures ``train refiner`` builds -> their settings; the first is the
#: default
REFINER_ARCHS: dict[str, type[RefinerConfig] | type[LiteRefinerConfig]] = {
    "idgbr-refiner": RefinerConfig, "lite-idgbr": LiteRefinerConfig}
REFINER_ARCH = next(iter(REFINER_ARCHS))

#: a network's settings (coarse or refiner)
ArchConfig = CoarseConfig | LiteFpnConfig | RefinerConfig | LiteRefinerConfig


def arch_name(config: ArchConfig) -> str:
    """The card architecture name of network settings."""
    archs = {**COARSE_ARCHS, **REFINER_ARCHS}
    return next(name for name, cls in archs.items() if type(config) is cls)


#: training settings that are arguments of their own (not given in the flat config);
#: a resumed run takes them from the call, the others from its checkpoint
RUN_KEYS = ("iterations", "batch_size", "lr", "crop", "seed", "checkpoint_every", "degradation")


def split_config(stage: str, data: Mapping[str, Any] | None, what: str = "config"
                 ) -> tuple[ArchConfig, dict[str, Any]]:
    """A flat ``train --config`` object -> (architecture, training overrides) of ``stage``
    ("coarse" or "refiner"). The coarse stage's ``arch`` (one of :data:`COARSE_ARCHS`,
    default ``idgbr-coarse``) chooses which architecture's settings the other keys are.
    Unknown keys (those of another architecture included), and run settings that have their
    own option (named as ``$name``, see :class:`UserError`), are one UserError line."""
    data = dict(data or {})
    archs: Mapping[str, type[ArchConfig]] = COARSE_ARCHS if stage == "coarse" else REFINER_ARCHS
    name = data.pop("arch", next(iter(archs)))
    if not isinstance(name, str) or name not in archs:
        raise UserError(f"{what}: unknown {stage} architecture {name!r} "
                        f"(known: {', '.join(archs)})")
    arch_cls, known_for = archs[name], f" for arch {name!r}"
    train_cls = TrainingConfig if stage == "coarse" else RefinerTrainingConfig
    train_keys = [k for k in train_cls.keys() if k not in RUN_KEYS]
    run = [k for k in data if k in RUN_KEYS]
    if run:
        raise UserError(f"{what}: {run[0]!r} has its own option (${run[0]}), not a {what} key",
                        options=[run[0]])
    unknown = [k for k in data if k not in arch_cls.keys() and k not in train_keys]
    if unknown:
        known = ["arch"] + arch_cls.keys() + train_keys
        raise UserError(f"{what}: unknown {stage} setting{'s' if len(unknown) > 1 else ''} "
                        f"{', '.join(repr(k) for k in unknown)} (known{known_for}: "
                        f"{', '.join(known)})")
    arch = arch_cls.from_dict({k: v for k, v in data.items() if k in arch_cls.keys()}, what)
    training = {k: v for k, v in data.items() if k in train_keys}
    problem = train_cls.problem(training)
    if problem:
        raise UserError(f"{what}: {problem}")
    return arch, training


# ------------------------------------------------------------------ older versions' keys

#: sampler options of version-1 cards and checkpoints that were research experiments (now
#: in release/research), with the value that meant "off"
RESEARCH_DEFAULTS: dict[str, Any] = {"start": "noise", "t_start": 1.0, "band": 0, "x0": "soft",
                                     "guidance_scale": 1.0, "average": False}
#: keys a version-1 network config carried that the card or the data determine
DERIVED_KEYS = ("in_channels", "num_classes")


def split_legacy(stage: str, config: Mapping[str, Any], what: str
                 ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A version-1 flat network config (architecture, training and sampler keys mixed) ->
    (architecture, training, sampling) dicts. A research option set to anything but its
    "off" value, or a key no version knew, is one UserError line: dropping it would change
    what the model does."""
    arch_keys = (CoarseConfig if stage == "coarse" else RefinerConfig).keys()
    train_keys = (TrainingConfig if stage == "coarse" else RefinerTrainingConfig).keys()
    arch: dict[str, Any] = {}
    training: dict[str, Any] = {}
    sampling: dict[str, Any] = {}
    for key, value in config.items():
        if key in arch_keys:
            arch[key] = value
        elif key in train_keys:
            training[key] = value
        elif stage == "refiner" and key in SamplingConfig.keys():
            sampling[key] = value
        elif stage == "refiner" and key in RESEARCH_DEFAULTS:
            if value != RESEARCH_DEFAULTS[key]:
                raise UserError(f"{what}: {key}={value!r} is a research option the refiner "
                                f"no longer has (see release/research; {key}="
                                f"{RESEARCH_DEFAULTS[key]!r} is the refiner's behaviour)")
        elif key not in DERIVED_KEYS:
            raise UserError(f"{what}: unknown setting {key!r}")
    return arch, training, sampling

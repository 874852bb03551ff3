"""Run and output options: typed, validated once, shared by the library, the CLI and batch.

:class:`RunOptions` say how a scene is run (windows, sampler, hardware), :class:`OutputOptions`
what is written besides the class band and how, :class:`VectorOptions` how polygons are
shaped. They are frozen dataclasses that check their values when made, so a bad value is one
:class:`UserError` before any work starts (a batch checks them once, not once per scene).
Messages name the keyword argument (``tile_size must be at least 1``); the CLI shows the same
error with its flag (``--tile-size must be at least 1``, see :class:`UserError`).

    refine_raster("in.tif", "out.tif", options=RunOptions(steps=2, seed=1),
                  outputs=OutputOptions(confidence=True))
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import UserError
from .stretch import check_value_range

#: Most diffusion steps: the sampler's schedule is continuous, so past a few dozen steps
#: more only cost time (the bundled cards use 1); 1000 still lets anyone experiment while
#: a typo such as 10000 is refused instead of running for days.
MAX_STEPS = 1000
#: Most model workers: each is a thread with its own network activations, and more
#: workers than cores only add memory (a million would start a million threads).
MAX_MODEL_WORKERS = 64
#: Largest seed: the diffusion noise hashes ``seed mod 2**64``, so a larger (or negative)
#: seed would silently give another seed's output.
MAX_SEED = 2**64 - 1
#: the networks' arithmetic: ``auto`` is bfloat16 on a CPU with AMX tiles or AVX-512 BF16,
#: else float32 (:func:`idgbr_geo.predict.resolve_precision`)
PRECISIONS = ("auto", "float32", "bfloat16")
#: data types of a probabilities raster: 0..255 (the CLI's), or unquantised
PROBABILITY_DTYPES = ("uint8", "float32")

#: integer options -> (lowest, highest or None) allowed value
INT_RANGES: dict[str, tuple[int, int | None]] = {
    "tile_size": (1, None),
    "overlap": (0, None),
    "steps": (0, MAX_STEPS),
    "batch_size": (1, None),
    "model_workers": (1, MAX_MODEL_WORKERS),
    "seed": (0, MAX_SEED),
}


def problem(name: str, value: Any) -> str | None:
    """What is wrong with one engine option's value ("must be at least 1"), or None if it is
    fine (None itself stands for the default and is always fine)."""
    if value is None:
        return None
    if name == "gsd":
        return None if _positive(value) else "must be a finite number of metres greater than 0"
    lo, hi = INT_RANGES[name]
    if not _integer(value):
        return "must be an integer"
    if value < lo:
        return f"must be at least {lo}"
    if hi is not None and value > hi:
        return f"must be at most {hi}"
    return None


#: a problem found: the options its message names (as ``$name``), and the message
Problem = tuple[tuple[str, ...], str]


def engine_problems(**values: Any) -> list[Problem]:
    """(options, what is wrong) for every out-of-range engine option (``tile_size``,
    ``overlap``, ``steps``, ``batch_size``, ``model_workers``, ``seed``, ``gsd``; None =
    default, not checked), and the window/overlap pair."""
    found: list[Problem] = []
    for name, value in values.items():
        if name != "gsd" and name not in INT_RANGES:
            raise TypeError(f"unknown engine option {name!r}")
        msg = problem(name, value)
        if msg is not None:
            found.append(((name,), f"${name} {msg} (got {value!r})"))
    tile, overlap = values.get("tile_size"), values.get("overlap")
    if (tile is not None and overlap is not None and not found
            and tile <= 2 * overlap):
        found.append((("tile_size", "overlap"),
                      f"$tile_size ({tile}) must be larger than twice the overlap ({overlap})"))
    return found


def check_engine_options(**values: Any) -> None:
    """Raise one :class:`UserError` for the out-of-range options among ``values`` (see
    :func:`engine_problems`), before any work starts: out-of-range values otherwise hang,
    exhaust memory or end in a traceback deep in the run."""
    raise_problems(engine_problems(**values))


def raise_problems(found: Iterable[Problem]) -> None:
    """One :class:`UserError` line for all problems found (their messages joined)."""
    found = list(found)
    if found:
        names = {n for names, _ in found for n in names}
        raise UserError("; ".join(msg for _, msg in found), options=sorted(names))


@dataclass(frozen=True)
class RunOptions:
    """How a scene is run. ``None`` means the model card's value (windows, steps) or the
    machine's (batch size: 1 on a CPU, 8 on a GPU; model workers: 2 on a multi-core CPU).

    ``coarse_only``: write the coarse map, no refinement. ``bands``: the 1-based input bands
    the model reads (default: the non-alpha bands, if their count fits). ``tile_size``,
    ``overlap``: window and overlap in model pixels. ``steps``: diffusion steps (0..1000).
    ``batch_size``: windows per forward pass. ``model_workers``: networks running side by
    side. ``device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``. ``seed``: diffusion noise
    seed (same seed and options, same output). ``gsd``: the input's ground sample distance
    in metres, overriding what the file says. ``value_range``: raw (low, high) mapped onto
    the model's value range, every band alike (default: the values as they are, or, for a
    non-8-bit input that does not use the model's range, a per-band percentile stretch,
    :mod:`idgbr_geo.stretch`). ``precision``: the networks' arithmetic, ``float32``,
    ``bfloat16`` or ``auto`` (bfloat16 on a CPU with AMX tiles or AVX-512 BF16, where it is
    1.6-2x faster per window, else float32; :mod:`idgbr_geo.predict`). ``gsd_search``: let
    the model work at the card's ``gsd_choices`` GSD its coarse map is most confident at
    for this scene
    (:mod:`idgbr_geo.scale`; False: always the card's ``gsd``). ``multiscale``: average the
    coarse model over the card's ``coarse_zooms`` views of each window (False: one view,
    faster). ``estimate_gsd``: for an input without a CRS and no ``gsd``, estimate its GSD
    from the image (a card with ``gsd_from_width``: the bundled ``roads``;
    :func:`idgbr_geo.scale.estimate_gsd`) instead of assuming the card's
    ``gsd_without_crs``; off by default (docs/experiments.md, session 32).
    """

    coarse_only: bool = False
    bands: tuple[int, ...] | None = None
    tile_size: int | None = None
    overlap: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    model_workers: int | None = None
    device: str = "auto"
    seed: int = 0
    gsd: float | None = None
    value_range: tuple[float, float] | None = None
    precision: str = "auto"
    gsd_search: bool = True
    multiscale: bool = True
    estimate_gsd: bool = False

    #: fields that never change an output's bytes (so a batch's finished scenes stay done)
    NEUTRAL: ClassVar[frozenset[str]] = frozenset({"device", "model_workers"})

    def __post_init__(self) -> None:
        for name in ("bands", "value_range"):
            value = getattr(self, name)
            if isinstance(value, Sequence) and not isinstance(value, str):
                object.__setattr__(self, name, tuple(value))
        found = _flag_problems(self, ("coarse_only", "gsd_search", "multiscale",
                                      "estimate_gsd"))
        if self.value_range is not None:
            bad = check_value_range(self.value_range)
            if bad:
                found.append((("value_range",), f"$value_range {bad}"))
        if self.bands is not None and not (
                isinstance(self.bands, tuple) and self.bands
                and all(_integer(b) and b >= 1 for b in self.bands)):
            found.append((("bands",), "$bands must be band numbers from 1, e.g. (1, 2, 3) (got "
                                   f"{self.bands!r})"))
        if not (isinstance(self.device, str)
                and re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device)):
            found.append((("device",), f"$device must be auto, cpu, cuda or cuda:N (got "
                                    f"{self.device!r})"))
        if self.precision not in PRECISIONS:
            found.append((("precision",), f"$precision must be {', '.join(PRECISIONS)} (got "
                                       f"{self.precision!r})"))
        found += engine_problems(**{f: getattr(self, f) for f in (
            "tile_size", "overlap", "steps", "batch_size", "model_workers", "seed", "gsd")})
        raise_problems(found)


@dataclass(frozen=True)
class VectorOptions:
    """How polygons are shaped (see :func:`idgbr_geo.vectorize.vectorize_layers`).

    ``simplify``: tolerance in map units (default one pixel, 0 = off). ``min_area`` /
    ``fill_holes``: m^2, one number or ``{class: m2}``; smaller features are dropped, smaller
    holes filled. ``regularize``: rectilinear building footprints. ``centerlines``: also a
    road centerline layer, spurs under ``spur_length`` metres pruned.
    """

    simplify: float | None = None
    min_area: float | Mapping[str, float] | None = None
    fill_holes: float | Mapping[str, float] | None = None
    regularize: bool = False
    centerlines: bool = False
    spur_length: float | None = None

    def __post_init__(self) -> None:
        found = _flag_problems(self, ("regularize", "centerlines"))
        for name in ("simplify", "spur_length"):
            value = getattr(self, name)
            if value is not None and not _non_negative(value):
                found.append(((name,), f"${name} must be a finite number of 0 or more (got "
                                    f"{value!r})"))
        for name in ("min_area", "fill_holes"):
            value = getattr(self, name)
            ok = (value is None or _non_negative(value) or (
                isinstance(value, Mapping) and all(
                    isinstance(k, str) and _non_negative(v) for k, v in value.items())))
            if not ok:
                found.append(((name,), f"${name} must be square metres of 0 or more, or "
                                    f"{{class: square metres}} (got {value!r})"))
        raise_problems(found)

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`idgbr_geo.vectorize.vectorize_raster`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class OutputOptions:
    """What is written besides the class band, and how.

    ``confidence``: a confidence band (max probability, 0..255) in the class raster.
    ``cog``: Cloud-Optimized GeoTIFFs with overviews. ``probabilities_dtype``: ``uint8``
    (0..255) or ``float32`` (unquantised) for a probabilities raster. ``vectors``: how
    polygons are shaped when a GeoPackage is written (a dict of :class:`VectorOptions`
    fields is accepted too).
    """

    confidence: bool = False
    cog: bool = False
    probabilities_dtype: str = "uint8"
    vectors: VectorOptions = field(default_factory=VectorOptions)

    def __post_init__(self) -> None:
        if isinstance(self.vectors, Mapping):
            object.__setattr__(self, "vectors", VectorOptions(**self.vectors))
        found = _flag_problems(self, ("confidence", "cog"))
        if self.probabilities_dtype not in PROBABILITY_DTYPES:
            found.append((("probabilities_dtype",), "$probabilities_dtype must be "
                          f"{' or '.join(PROBABILITY_DTYPES)} (got {self.probabilities_dtype!r})"))
        if not isinstance(self.vectors, VectorOptions):
            found.append((("vectors",), f"$vectors must be VectorOptions (got {self.vectors!r})"))
        raise_problems(found)


def changed(options: Any, skip: Iterable[str] = ()) -> dict[str, Any]:
    """The fields of an options object that differ from their defaults (nested options
    as dicts of their own changed fields), leaving out ``skip``."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if f.name in skip:
            continue
        if dataclasses.is_dataclass(value):
            sub = changed(value)
            if sub:
                out[f.name] = sub
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING \
            else f.default
        if value != default:
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value))


def _positive(value: Any) -> bool:
    return _number(value) and value > 0


def _non_negative(value: Any) -> bool:
    return _number(value) and value >= 0


def _flag_problems(options: Any, names: Sequence[str]) -> list[Problem]:
    return [((n,), f"${n} must be True or False (got {getattr(options, n)!r})") for n in names
            if not isinstance(getattr(options, n), bool)]

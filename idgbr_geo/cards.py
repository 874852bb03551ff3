"""Model cards: the JSON that travels with every set of weights.

The card is the contract between a trained model and the raster engine: which classes it
predicts (names and colours), which bands it reads, how raw pixel values are normalised,
at which ground sample distance (GSD) it was trained, and the defaults for tiling and
sampling. The engine reads only the card and the segmentor/refiner interfaces, never the
network code.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError

#: Divisor that maps each raw dtype kind onto [0, 1] before mean/std normalisation.
DEFAULT_VALUE_RANGE = {"uint8": 255.0, "uint16": 65535.0, "int16": 32767.0, "float": 1.0}

DEFAULT_COLORS = [
    "#000000", "#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#ffff33", "#a65628",
]


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
class ModelCard:
    """Everything the engine must know about a model, stored as JSON beside its weights."""

    name: str
    classes: list[str]
    colors: list[str] = field(default_factory=list)
    bands: int = 3
    band_names: list[str] = field(default_factory=lambda: ["red", "green", "blue"])
    normalization: Normalization = field(default_factory=Normalization)
    gsd: float | None = None
    tile_size: int = 512
    overlap: int = 64
    steps: int = 4
    #: multiple that window origins must respect (e.g. a refiner working at 1/4 resolution)
    stride_multiple: int = 8
    weights: str | None = None
    segmentor: dict[str, Any] = field(default_factory=dict)
    refiner: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.normalization, dict):
            self.normalization = Normalization(**self.normalization)
        if not self.colors:
            n = len(DEFAULT_COLORS)
            self.colors = [DEFAULT_COLORS[i % n] for i in range(len(self.classes))]
        if len(self.colors) != len(self.classes):
            raise UserError(f"model card {self.name!r}: {len(self.colors)} colours for "
                            f"{len(self.classes)} classes")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        known = set(cls.__dataclass_fields__)
        extra = {k: v for k, v in data.items() if k not in known}
        card = cls(**{k: v for k, v in data.items() if k in known})
        card.extra.update(extra)
        return card

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read model card {path}: {exc}") from None
        return cls.from_dict(data)


def hex_to_rgb(color: str) -> tuple[int, int, int]:
    """'#rrggbb' -> (r, g, b)."""
    c = color.lstrip("#")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)

"""Chip arrays (.npz) and the label rules shared by every data source.

The .npz keys are fixed by the training contract: ``images`` (N, bands, T, T) uint8/uint16,
``labels`` (N, T, T) uint8 with 255 = ignore, ``classes`` (str array), ``gsd`` (float,
metres; NaN when unknown), ``source`` (provenance), ``scene`` (N,) str.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, UserError
from ..files import atomic_output

IGNORE = 255
PathLike = str | os.PathLike[str]


@dataclass
class ChipSet:
    """Chips plus the metadata the model card needs (classes, GSD, provenance)."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    gsd: float
    source: str
    scene: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=str))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, keep: np.ndarray) -> ChipSet:
        """The chips selected by a boolean mask or index array."""
        return replace(self, images=self.images[keep], labels=self.labels[keep],
                       scene=self.scene[keep])

    def class_fractions(self) -> dict[str, float]:
        """Share of each class among the labelled (non-ignored) pixels."""
        counts = np.bincount(self.labels.ravel(), minlength=256)[: len(self.classes)]
        total = max(int(counts.sum()), 1)
        return {name: float(c) / total for name, c in zip(self.classes, counts, strict=True)}

    def save(self, path: PathLike, overwrite: bool = False) -> Path:
        """Write the chips as a compressed .npz, atomically (no half-written file on failure)."""
        with atomic_output(path, overwrite) as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(
                fh, images=self.images, labels=self.labels,
                classes=np.asarray(self.classes, dtype=str), gsd=np.float64(self.gsd),
                source=np.asarray(self.source), scene=np.asarray(self.scene, dtype=str))
        return Path(path)

    @classmethod
    def load(cls, path: PathLike) -> ChipSet:
        try:
            with np.load(path, allow_pickle=False) as z:
                n = z["images"].shape[0]
                scene = z["scene"] if "scene" in z else np.full(n, "", dtype=str)
                return cls(images=z["images"], labels=z["labels"],
                           classes=[str(c) for c in z["classes"]], gsd=float(z["gsd"]),
                           source=str(z["source"]), scene=scene)
        except (OSError, KeyError, ValueError) as exc:
            raise InputError(f"cannot read training chips {path}: {exc}") from None


# ----------------------------------------------------------------------------- labels

def resolve_classes(classes: Sequence[str] | str | None) -> list[str] | None:
    if classes is None:
        return None
    names = [c.strip() for c in classes.split(",")] if isinstance(classes, str) else list(classes)
    if len(names) < 2 or any(not n for n in names) or len(set(names)) != len(names):
        raise UserError(f"need at least two distinct, non-empty class names, got {names}")
    if len(names) > 255:
        raise UserError("at most 255 classes are supported (255 means 'ignore')")
    return names


def _class_id(token: str | int, classes: list[str] | None) -> int:
    if isinstance(token, int) or str(token).strip().isdigit():
        return int(token)
    if classes and token in classes:
        return classes.index(token)
    raise UserError(f"unknown class {token!r} (classes: {', '.join(classes or [])})")


@dataclass
class LabelRules:
    """How raw label values become training labels."""

    classes: list[str] | None
    ignore: frozenset[int] = frozenset()
    mapping: Mapping[int, int] = field(default_factory=dict)

    @classmethod
    def make(cls, classes: Sequence[str] | str | None, ignore_classes: Sequence[str | int] = (),
             label_map: Mapping[int, int] | None = None) -> LabelRules:
        names = resolve_classes(classes)
        ignore = frozenset(_class_id(t, names) for t in ignore_classes)
        return cls(names, ignore, dict(label_map or {}))

    def apply(self, raw: np.ndarray, valid: np.ndarray | None, where: str) -> np.ndarray:
        """Raw values -> uint8 class ids with 255 for ignored / invalid pixels."""
        out = raw.astype(np.int64, copy=True)
        for src, dst in self.mapping.items():
            out[raw == src] = dst
        bad = (out < 0) | ((out > 254) & (out != IGNORE))
        if self.classes is not None:
            bad |= (out >= len(self.classes)) & (out != IGNORE)
        if valid is not None:
            bad &= valid
        if bad.any():
            vals = sorted({int(v) for v in np.unique(out[bad])})[:5]
            k = f"{len(self.classes)} classes" if self.classes else "class ids 0..254"
            raise InputError(f"{where}: label values {vals} are outside the {k} "
                             "(map them with $label_map or list them in $classes)",
                             options=["label_map", "classes"])
        if self.ignore:
            out[np.isin(out, list(self.ignore))] = IGNORE
        if valid is not None:
            out[~valid] = IGNORE
        return out.astype(np.uint8)

    def final_classes(self, labels: np.ndarray) -> list[str]:
        if self.classes is not None:
            return self.classes
        present = labels[labels != IGNORE]
        k = max(int(present.max()) + 1 if present.size else 2, 2)
        return ["background"] + [f"class_{i}" for i in range(1, k)]


# ----------------------------------------------------------------------------- chipping

def chip_origins(size: int, chip: int, stride: int) -> list[int]:
    """Chip starts covering ``size`` pixels; the last chip is aligned to the far edge."""
    if size <= chip:
        return [0]
    starts = list(range(0, size - chip + 1, stride))
    if starts[-1] != size - chip:
        starts.append(size - chip)
    return starts


def _pad(arr: np.ndarray, chip: int, value: int) -> np.ndarray:
    h, w = arr.shape[-2:]
    if h == chip and w == chip:
        return arr
    pad = [(0, 0)] * (arr.ndim - 2) + [(0, chip - h), (0, chip - w)]
    return np.pad(arr, pad, constant_values=value)


class _Collector:
    """Accumulates chips; drops chips with too few labelled pixels."""

    def __init__(self, min_labelled: float) -> None:
        self.images: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.scenes: list[str] = []
        self.min_labelled = min_labelled

    def add(self, image: np.ndarray, label: np.ndarray, scene: str, chip: int) -> None:
        labelled = float((label != IGNORE).mean())
        if labelled == 0.0 or labelled < self.min_labelled:
            return
        self.images.append(_pad(image, chip, 0))
        self.labels.append(_pad(label, chip, IGNORE))
        self.scenes.append(scene)

    def result(self, rules: LabelRules, gsd: float, source: str) -> ChipSet:
        if not self.images:
            raise InputError("no training chips: every chip was nodata or ignored")
        labels = np.stack(self.labels)
        return ChipSet(images=np.stack(self.images), labels=labels,
                       classes=rules.final_classes(labels), gsd=gsd, source=source,
                       scene=np.asarray(self.scenes, dtype=str))


def _progress(items: Sequence[Any], progress: bool, desc: str) -> Iterator[Any]:
    from tqdm.auto import tqdm

    yield from tqdm(items, desc=desc, unit="scene", disable=not progress)


def _check_chip(chip_size: int, stride: int | None) -> int:
    if chip_size < 8:
        raise UserError(f"$chip_size must be at least 8, got {chip_size}",
                        options=["chip_size"])
    stride = stride or chip_size
    if stride < 1:
        raise UserError(f"$stride must be positive, got {stride}", options=["stride"])
    return stride


# ----------------------------------------------------------------------------- splits

def split_by_scene(chips: ChipSet, val_fraction: float, seed: int = 0) -> tuple[ChipSet, ChipSet]:
    """Hold out whole scenes (never random chips: neighbouring chips share objects)."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"$val_fraction must be between 0 and 1, got {val_fraction}",
                        options=["val_fraction"])
    scenes, counts = np.unique(chips.scene, return_counts=True)
    if len(scenes) < 2:
        raise InputError("$val_fraction needs at least two scenes (images) to hold one out",
                         options=["val_fraction"])
    order = np.random.default_rng(seed).permutation(len(scenes))
    target = val_fraction * len(chips)
    val: list[str] = []
    total = 0
    for i in order:
        if total >= target or len(val) == len(scenes) - 1:
            break
        val.append(str(scenes[i]))
        total += int(counts[i])
    is_val = np.isin(chips.scene, val)
    return chips.subset(~is_val), chips.subset(is_val)


def parse_label_map(text: str | None) -> dict[int, int]:
    """'255=1,0=255' -> {255: 1, 0: 255} (raw label value = class id, 255 = ignore)."""
    if not text:
        return {}
    out: dict[int, int] = {}
    for part in text.split(","):
        try:
            k, v = part.split("=")
            out[int(k)] = int(v)
        except ValueError:
            raise UserError(f"bad $label_map entry {part!r} (expected RAW=CLASS_ID)",
                            options=["label_map"]) from None
    return out

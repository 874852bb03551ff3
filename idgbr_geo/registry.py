"""Find, load and save models: a JSON card plus one safetensors file of weights.

A model is named either by a bundled name (``buildings``, ``roads``, ``landcover``: cards
in the repository's ``models/`` folder, or in ``$IDGBR_GEO_MODELS``) or by the path of a card.
The card says which architecture builds the segmentor and the refiner; architectures
register a factory here, so the engine and CLI never import network code directly.
Nothing is ever downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .cards import ModelCard
from .errors import UserError
from .interfaces import ConvRefiner, ConvSegmentor, Model

#: factory(card, config, weights-with-prefix-stripped, device) -> Segmentor or Refiner
Factory = Callable[[ModelCard, dict[str, Any], dict[str, torch.Tensor], torch.device], Any]
_ARCHITECTURES: dict[str, Factory] = {}


def register_architecture(name: str) -> Callable[[Factory], Factory]:
    """Register a factory that builds a segmentor or refiner from a card section."""

    def deco(factory: Factory) -> Factory:
        _ARCHITECTURES[name] = factory
        return factory

    return deco


def models_dir() -> Path:
    """Where bundled models live: ``$IDGBR_GEO_MODELS`` or the repository's ``models/``."""
    env = os.environ.get("IDGBR_GEO_MODELS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "models"


def bundled_models() -> list[str]:
    d = models_dir()
    return sorted(p.stem for p in d.glob("*.json")) if d.is_dir() else []


def resolve_card(name_or_path: str | os.PathLike[str]) -> Path:
    """Bundled name or card path -> card path (one clear error if neither)."""
    p = Path(name_or_path)
    if p.suffix == ".json" or p.exists():
        if p.is_dir():
            cards = sorted(p.glob("*.json"))
            if len(cards) != 1:
                raise UserError(f"model folder {p} must hold exactly one .json card")
            return cards[0]
        if not p.is_file():
            raise UserError(f"model card {p} does not exist")
        return p
    card = models_dir() / f"{name_or_path}.json"
    if not card.is_file():
        known = ", ".join(bundled_models()) or "none installed"
        raise UserError(f"unknown model {str(name_or_path)!r} (bundled models: {known})")
    return card


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise UserError(f"unknown device {device!r} (use auto, cpu or cuda)")
    return torch.device(device)


def _build(card: ModelCard, section: dict[str, Any], prefix: str,
           weights: dict[str, torch.Tensor], device: torch.device) -> Any:
    if not section:
        return None
    arch = section.get("arch")
    if arch not in _ARCHITECTURES:
        _import_builtin_architectures()
    if arch not in _ARCHITECTURES:
        raise UserError(f"model {card.name!r}: unknown architecture {arch!r}")
    sub = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    return _ARCHITECTURES[arch](card, section.get("config", {}), sub, device)


def _import_builtin_architectures() -> None:
    """Import the modules whose import registers the built-in network architectures."""
    import importlib

    for mod in ("idgbr_geo.networks", "idgbr_geo.byo"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise


def load_model(name_or_path: str | os.PathLike[str] = "buildings",
               device: str | torch.device = "auto") -> Model:
    """Load a bundled or user model (card + safetensors) onto a device."""
    card_path = resolve_card(name_or_path)
    card = ModelCard.load(card_path)
    dev = resolve_device(device)
    weights: dict[str, torch.Tensor] = {}
    if card.weights:
        wpath = card_path.parent / card.weights
        if not wpath.is_file():
            raise UserError(f"weights {wpath} named by card {card_path} do not exist")
        weights = load_file(str(wpath))
    seg = _build(card, card.segmentor, "segmentor.", weights, dev)
    ref = _build(card, card.refiner, "refiner.", weights, dev)
    return Model(card=card, segmentor=seg, refiner=ref, device=dev)


def save_model(card: ModelCard, tensors: dict[str, torch.Tensor], folder: str | os.PathLike[str]
               ) -> Path:
    """Write ``<name>.safetensors`` and ``<name>.json`` into ``folder``; return the card path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    card.weights = f"{card.name}.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
              str(folder / card.weights))
    os.chmod(folder / card.weights, 0o644)  # safetensors writes 0600; models are shared files
    path = folder / f"{card.name}.json"
    card.save(path)
    return path


@register_architecture("conv-segmentor")
def _conv_segmentor(card, config, weights, device):
    return ConvSegmentor(weights["weight"].to(device), weights.get("bias"))


@register_architecture("conv-refiner")
def _conv_refiner(card, config, weights, device):
    return ConvRefiner(weights["weight"].to(device), float(config.get("noise_scale", 0.1)))

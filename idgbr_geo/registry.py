"""Find, load and save models: a JSON card plus one safetensors file of weights.

A model is named either by a bundled name (``buildings``, ``roads``, ``landcover``: cards
shipped inside the package as ``idgbr_geo/models/``, or in ``$IDGBR_GEO_MODELS``) or by the path of
a card.
The card says which architecture builds the segmentor and the refiner; architectures
register a factory here, so the engine and CLI never import network code directly (modules
named in ``$IDGBR_GEO_ARCHITECTURES`` are imported to register more, e.g. on Dask workers).
Nothing is ever downloaded, and nothing is loaded in a way that can run code from a file:
weights are safetensors (beside the card, in its folder) and torch checkpoints are read with
``weights_only=True`` (:func:`load_checkpoint`).
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Callable
from importlib import resources
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .cards import ModelCard
from .errors import UserError, first_line
from .interfaces import Model

#: factory(card, config, weights-with-prefix-stripped, device) -> Segmentor or Refiner
Factory = Callable[[ModelCard, dict[str, Any], dict[str, torch.Tensor], torch.device], Any]
_ARCHITECTURES: dict[str, Factory] = {}
#: comma-separated modules whose import registers more architectures, imported when a card
#: names an architecture not registered yet: how processes this one starts (Dask workers,
#: the CLI in a subprocess) find architectures registered outside the package
ARCHITECTURES_ENV = "IDGBR_GEO_ARCHITECTURES"


def register_architecture(name: str) -> Callable[[Factory], Factory]:
    """Register a factory that builds a segmentor or refiner from a card section."""

    def deco(factory: Factory) -> Factory:
        _ARCHITECTURES[name] = factory
        return factory

    return deco


def models_dir() -> Path:
    """Where bundled models live: ``$IDGBR_GEO_MODELS``, else the package data folder
    ``idgbr_geo/models`` (installed with the package, editable or not)."""
    env = os.environ.get("IDGBR_GEO_MODELS")
    if env:
        return Path(env)
    return Path(str(resources.files("idgbr_geo") / "models"))


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
        raise UserError(f"$device {device} was asked for but no CUDA GPU is available",
                        options=["device"])
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise UserError(f"unknown $device {device!r} (use auto, cpu or cuda)",
                        options=["device"])
    return torch.device(device)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A torch checkpoint's contents (a dict), read with ``weights_only=True``.

    A ``.pt``/``.ckpt`` file is a pickle, and a crafted one runs code when unpickled: only
    tensors and plain values are accepted. Anything else (a foreign or malicious file) is one
    UserError line, never a fallback to unsafe loading.
    """
    try:
        with warnings.catch_warnings():  # (torch warns about the pickle protocol of junk)
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))  # (torch words it several ways)
        if found:
            raise UserError(f"{path} is not loaded: it holds Python objects ({found.group(1)}) "
                            "besides tensors and plain values, and unpickling them could run "
                            "code from the file") from None
        raise UserError(f"cannot read checkpoint {path}: not a torch checkpoint of tensors "
                        "and plain values") from None
    except Exception as exc:  # missing, truncated or corrupt files fail in many types
        raise UserError(f"cannot read checkpoint {path}: {first_line(exc)}") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a checkpoint (a dict of tensors and values)")
    return state


def weights_path(card: ModelCard, card_path: Path) -> Path:
    """The card's safetensors file: a relative path inside the card's folder, so a card
    cannot make the tool read (or a model folder depend on) a file elsewhere."""
    name = str(card.weights)
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if (PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute()
            or PureWindowsPath(name).drive or ".." in parts):
        raise UserError(f"model card {card_path}: weights {name!r} must be a file in the "
                        "card's folder (no absolute path, no '..')")
    if not name.endswith(".safetensors"):
        raise UserError(f"model card {card_path}: weights {name!r} must be a .safetensors "
                        "file (other formats can run code when loaded)")
    return card_path.parent / name


def _build(card: ModelCard, section: dict[str, Any], prefix: str,
           weights: dict[str, torch.Tensor], device: torch.device, where: Any = None) -> Any:
    if not section:
        return None
    where = where or f"model {card.name!r}"
    arch = section.get("arch")
    if arch not in _ARCHITECTURES:
        _import_builtin_architectures()
    if arch not in _ARCHITECTURES:
        _import_named_architectures()
    if arch not in _ARCHITECTURES:
        raise UserError(f"{where}: unknown architecture {arch!r}")
    sub = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    try:
        return _ARCHITECTURES[arch](card, section.get("config", {}), sub, device)
    except (KeyError, ValueError, TypeError, RuntimeError, AttributeError, IndexError) as exc:
        # weights or config that do not fit the architecture (missing tensor, wrong shape)
        what = prefix.rstrip(".")
        raise UserError(f"{where}: cannot build the {what} ({arch}) from the card and "
                        f"weights: {type(exc).__name__}: {first_line(exc)}") from None


def _import_builtin_architectures() -> None:
    """Import the modules whose import registers the built-in network architectures."""
    import importlib

    for mod in ("idgbr_geo.networks", "idgbr_geo.lite_fpn", "idgbr_geo.lite_refiner",
                "idgbr_geo.byo"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise


def _import_named_architectures() -> None:
    """Import the modules named in ``$IDGBR_GEO_ARCHITECTURES`` (only when a card names an
    architecture that neither the package nor the caller registered)."""
    import importlib

    for mod in filter(None, (m.strip() for m in os.environ.get(ARCHITECTURES_ENV, "").split(","))):
        try:
            importlib.import_module(mod)
        except ImportError as exc:
            raise UserError(f"${ARCHITECTURES_ENV} names {mod!r}, which cannot be imported: "
                            f"{first_line(exc)}") from None


def read_model(name_or_path: str | os.PathLike[str]
               ) -> tuple[ModelCard, Path, dict[str, torch.Tensor]]:
    """A model's card, the card's path and all its tensors (on the CPU, as stored), each
    problem one UserError line; nothing is built."""
    card_path = resolve_card(name_or_path)
    card = ModelCard.load(card_path)
    weights: dict[str, torch.Tensor] = {}
    if card.weights:
        wpath = weights_path(card, card_path)
        if not wpath.is_file():
            raise UserError(f"weights {wpath} named by card {card_path} do not exist")
        try:
            weights = load_file(str(wpath))
        except Exception as exc:  # SafetensorError, OSError, ... for a file of another kind
            raise UserError(f"model card {card_path}: weights {wpath.name} are not a readable "
                            f"safetensors file ({first_line(exc)})") from None
    return card, card_path, weights


def load_model(name_or_path: str | os.PathLike[str] = "buildings",
               device: str | torch.device = "auto") -> Model:
    """Load a bundled or user model (card + safetensors) onto a device."""
    card, card_path, weights = read_model(name_or_path)
    dev = resolve_device(device)
    where = f"model card {card_path}"
    seg = _build(card, card.segmentor, "segmentor.", weights, dev, where)
    ref_weights = weights
    if shares_encoder(card.refiner):
        # the refiner reads the segmentor's encoder, stored once with the segmentor
        ref_weights = {**weights, **{"refiner." + k[len("segmentor."):]: v
                                     for k, v in weights.items()
                                     if k.startswith(SHARED_ENCODER)}}
    ref = _build(card, card.refiner, "refiner.", ref_weights, dev, where)
    if shares_encoder(card.refiner) and seg is not None:
        ref.share_encoder(seg)  # one encoder pass per window for both stages
    return Model(card=card, segmentor=seg, refiner=ref, device=dev)


#: weight prefix of the encoder a refiner may share with the segmentor
SHARED_ENCODER = "segmentor.encoder."


def shares_encoder(section: dict[str, Any] | None) -> bool:
    """Does this refiner section read the segmentor's encoder (``config.encoder`` =
    ``"segmentor"``, see :class:`idgbr_geo.config.LiteRefinerConfig`)?"""
    config = (section or {}).get("config")
    return isinstance(config, dict) and config.get("encoder") == "segmentor"


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

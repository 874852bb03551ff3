"""Training checkpoints: writing and reading them, the networks they hold, and export.

A checkpoint of :mod:`idgbr_geo.training` records its architecture (``arch``: one of
:data:`~idgbr_geo.config.COARSE_ARCHS` for the coarse stage, ``idgbr-refiner``), the
network settings (``config``, with the data's ``in_channels`` / ``num_classes``) and the
training settings (``training``) apart. :func:`segmentor_from_checkpoint` and
:func:`refiner_from_checkpoint` rebuild the networks (e.g. to validate them or to train a
refiner on a coarse model's maps) and :func:`export_model` writes them as a model card +
safetensors file that :func:`~idgbr_geo.registry.load_model` loads.

Checkpoints hold only tensors and plain values and are read with ``torch.load(
weights_only=True)`` (:func:`~idgbr_geo.registry.load_checkpoint`): a ``.pt`` file is a
pickle, and a crafted one would otherwise run code when loaded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from .cards import ModelCard, Normalization
from .config import (
    COARSE_ARCHS,
    DERIVED_KEYS,
    REFINER_ARCHS,
    RESEARCH_DEFAULTS,
    ArchConfig,
    CoarseConfig,
    LiteFpnConfig,
    LiteRefinerConfig,
    RefinerConfig,
    RefinerTrainingConfig,
    SamplingConfig,
    TrainingConfig,
    split_legacy,
)
from .errors import UserError, first_line
from .lite_fpn import build_lite_fpn
from .lite_refiner import ENCODER_PREFIX, LiteRefiner, build_lite_refiner
from .networks import CoarseSegmentor, DiffusionRefiner, build_coarse_net, build_refiner_net
from .registry import (
    load_checkpoint,
    read_model,
    resolve_device,
    save_model,
    shares_encoder,
)

#: what a checkpoint of the wrong shape raises when its contents are used
BAD_STATE = (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError)


def _plain(obj: Any) -> Any:
    """``obj`` with numpy scalars/arrays and paths turned into plain Python values, so the
    checkpoint loads under ``weights_only=True`` (tensors are kept as they are)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_plain(v) for v in obj]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def write_checkpoint(path: Path, values: Mapping[str, Any],
                     tensors: Mapping[str, Any]) -> None:
    """Replace ``path`` atomically by a checkpoint of ``values`` (made plain: numpy values and
    paths become Python ones) and ``tensors`` (state dicts, RNG states: kept as they are)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({**_plain(dict(values)), **tensors}, tmp)
    os.replace(tmp, path)


#: what only resuming a run needs (the training loop's own weights and moving average,
#: optimiser state, torch's RNG); ``model`` holds the weights to use
RESUME_ONLY = ("optimizer", "trained_model", "ema", "torch_rng")


def weights_only(state: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's contents without :data:`RESUME_ONLY`: a few times smaller, still
    loadable and exportable, no longer resumable."""
    return {k: v for k, v in state.items() if k not in RESUME_ONLY}


def build_segmentor_net(config: CoarseConfig | LiteFpnConfig, *, in_channels: int,
                        num_classes: int, pretrained: bool = False) -> nn.Module:
    """The coarse network ``config`` describes (its type chooses the architecture);
    ``pretrained``: start a ``lite-fpn`` encoder from its ImageNet weights (the ``train``
    extra; a UserError without it). ``idgbr-coarse`` has no pretrained weights."""
    if isinstance(config, LiteFpnConfig):
        return build_lite_fpn(config, in_channels=in_channels, num_classes=num_classes,
                              pretrained=pretrained)
    return build_coarse_net(config, in_channels=in_channels, num_classes=num_classes)


def checkpoint_settings(state: Mapping[str, Any], kind: str, where: Any
                        ) -> tuple[ArchConfig, TrainingConfig, int, int]:
    """A checkpoint's (architecture, training settings, in_channels, num_classes); the
    type of the architecture settings tells which coarse architecture it is.

    Older checkpoints kept everything in one flat ``config`` (the training validation's
    sampler options included; they never shaped the weights and are dropped); they are all
    ``idgbr-coarse`` / ``idgbr-refiner``."""
    stage = "coarse" if kind == "coarse" else "refiner"
    archs: Mapping[str, type[ArchConfig]] = COARSE_ARCHS if stage == "coarse" else REFINER_ARCHS
    name = state.get("arch", next(iter(archs)))
    if not isinstance(name, str) or name not in archs:
        raise UserError(f"{where}: unknown {stage} architecture {name!r} "
                        f"(known: {', '.join(archs)})")
    arch_cls = archs[name]
    train_cls = TrainingConfig if stage == "coarse" else RefinerTrainingConfig
    cfg = dict(state["config"])
    what = f"{where} settings"
    if "training" in state:
        arch = arch_cls.from_dict({k: v for k, v in cfg.items() if k not in DERIVED_KEYS},
                                  what)
        training = train_cls.from_dict(dict(state["training"]), what)
    else:
        old = {k: v for k, v in cfg.items()
               if k not in RESEARCH_DEFAULTS and k not in SamplingConfig.keys()}
        a, t, _ = split_legacy(stage, old, what)
        arch, training = arch_cls.from_dict(a, what), train_cls.from_dict(t, what)
    return arch, training, int(cfg["in_channels"]), int(cfg["num_classes"])


def segmentor_from_checkpoint(path: str | Path, device: str = "auto", *,
                              state: dict[str, Any] | None = None) -> CoarseSegmentor:
    """A Segmentor from a coarse training checkpoint of any coarse architecture (e.g. to
    train a refiner on its maps); ``state``: its contents when already read with
    :func:`load_checkpoint`."""
    state = load_checkpoint(path) if state is None else state
    if state.get("kind") != "coarse":
        raise UserError(f"{path} is not a coarse-model checkpoint")
    try:
        settings, _, bands, k = checkpoint_settings(state, "coarse", path)
        net = build_segmentor_net(cast(CoarseConfig | LiteFpnConfig, settings),
                                  in_channels=bands, num_classes=k)
        net.load_state_dict(state["model"])
    except BAD_STATE as exc:
        raise UserError(f"{path}: bad coarse-model checkpoint: {first_line(exc)}") from None
    return CoarseSegmentor(net, resolve_device(device))


def refiner_from_checkpoint(path: str | Path, device: str = "auto") -> DiffusionRefiner:
    """A Refiner from a refiner training checkpoint (for validation before export)."""
    state = load_checkpoint(path)
    if state.get("kind") != "refiner":
        raise UserError(f"{path} is not a refiner checkpoint")
    try:
        settings, _, bands, k = checkpoint_settings(state, "refiner", path)
        if isinstance(settings, LiteRefinerConfig):
            lite = build_lite_refiner(settings, in_channels=bands, num_classes=k)
            lite.load_state_dict(state["model"])
            return LiteRefiner(lite, settings, resolve_device(device))
        arch = cast(RefinerConfig, settings)
        net = build_refiner_net(arch, in_channels=bands, num_classes=k)
        net.load_state_dict(state["model"])
    except BAD_STATE as exc:
        raise UserError(f"{path}: bad refiner checkpoint: {first_line(exc)}") from None
    return DiffusionRefiner(net, arch, resolve_device(device))


def model_stage(name_or_path: str | os.PathLike[str], stage: str
                ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One stage of a model (card + safetensors) to start a training run from: the stage's
    settings as ``--config`` takes them (``arch`` and the network settings) and its weights
    without their prefix, in float32 (fp16 storage is for shipping, not for training).
    ``stage``: ``"coarse"`` (the segmentor) or ``"refiner"``."""
    card, _, tensors = read_model(name_or_path)
    section = card.segmentor if stage == "coarse" else card.refiner
    what = "coarse segmentor" if stage == "coarse" else "refiner"
    if not section or not tensors:
        raise UserError(f"model {card.name!r} has no {what} to start from")
    prefix = "segmentor." if stage == "coarse" else "refiner."
    weights = {k[len(prefix):]: v.float() if v.is_floating_point() else v
               for k, v in tensors.items() if k.startswith(prefix)}
    return {"arch": section.get("arch"), **section.get("config", {})}, weights


def drop_shared_encoder(tensors: dict[str, torch.Tensor], where: Any) -> None:
    """A refiner that reads the segmentor's encoder is stored without its copy, which must
    be the segmentor's exactly (it was trained on that coarse model). Without segmentor
    tensors (yet) the copy is kept."""
    if not any(k.startswith("segmentor.") for k in tensors):
        return
    own = {k[len("refiner."):]: tensors.pop(k) for k in list(tensors)
           if k.startswith("refiner." + ENCODER_PREFIX)}
    for k, v in own.items():
        seg = tensors.get("segmentor." + k)
        if seg is None or seg.shape != v.shape or not torch.equal(seg, v):
            raise UserError(f"{where}: the refiner's encoder is not the coarse model's "
                            f"({k} differs): train the refiner on this coarse model")


def export_model(coarse_ckpt: str | Path | None, refiner_ckpt: str | Path | None,
                 card: ModelCard, folder: str | Path) -> Path:
    """Write ``card`` + one safetensors file with both networks into ``folder``.

    Fills the card's segmentor/refiner sections (architecture: the checkpoint's), its
    training settings (``training.segmentor`` / ``training.refiner``), classes and
    normalisation from the checkpoints (the networks were trained with that normalisation).
    The sampling defaults are the card's own: a checkpoint does not choose how it is run.
    """
    tensors: dict[str, torch.Tensor] = {}
    for prefix, path, archs in (("segmentor.", coarse_ckpt, tuple(COARSE_ARCHS)),
                                ("refiner.", refiner_ckpt, tuple(REFINER_ARCHS))):
        if path is None:
            continue
        state = load_checkpoint(path)
        arch = state.get("arch")
        if arch not in archs:
            raise UserError(f"{path} is not a {' or '.join(archs)} checkpoint")
        if list(state["classes"]) != list(card.classes):
            raise UserError(f"{path} was trained for classes {state['classes']}, the card "
                            f"says {card.classes}")
        try:
            settings, training, _, _ = checkpoint_settings(state, state["kind"], path)
        except BAD_STATE as exc:
            raise UserError(f"{path}: bad checkpoint: {first_line(exc)}") from None
        section = {"arch": arch, "config": settings.to_dict()}
        if prefix == "segmentor.":
            card.segmentor = section
            card.training.segmentor = training.to_dict()
        else:
            card.refiner = section
            card.training.refiner = training.to_dict()
        card.normalization = Normalization(**state["normalization"])
        tensors.update({prefix + k: v for k, v in state["model"].items()})
    if shares_encoder(card.refiner):
        drop_shared_encoder(tensors, refiner_ckpt)
    if not tensors:
        raise UserError("export_model needs at least one checkpoint")
    return save_model(card, tensors, folder)

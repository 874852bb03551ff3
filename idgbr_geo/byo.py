"""Bring your own coarse stage: torchgeo checkpoints and TorchScript modules as segmentors.

The refiner is meant to sharpen coarse maps from models it has never seen, so users can plug
in the segmentor they already have: a torchgeo ``SemanticSegmentationTask`` checkpoint
(``.ckpt``, as written by Lightning) or a TorchScript module. Both are wrapped into the
:class:`~idgbr_geo.interfaces.Segmentor` interface: normalised image in, per-class
probabilities out (softmax, or sigmoid for one-channel binary models -> two classes).
Nothing is downloaded: torchgeo tasks are rebuilt from their saved hyper-parameters with
``weights=None`` and then given the checkpoint's state dict.

A model trained with another input normalisation than the idgbr-geo card's can be given its
own :class:`~idgbr_geo.cards.Normalization`; inputs are converted from one to the other.

No file is unpickled with code: checkpoints are read with ``torch.load(weights_only=True)``.
TorchScript is different: a TorchScript file *is* a program (its ``code/`` folder is compiled
and run), so it is loaded only when the caller says it trusts the file
(``trust_torchscript=True``, ``--trust-torchscript`` on the command line).
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .cards import ModelCard, Normalization
from .errors import InputError, UserError
from .interfaces import Segmentor
from .registry import load_checkpoint, register_architecture, resolve_device

TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript", ".jit")
CHECKPOINT_SUFFIXES = (".ckpt",)


def renormalizer(card: Normalization, model: Normalization
                 ) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A function mapping card-normalised input to the model's normalisation (None if equal).

    Both normalisations divide raw values by the same value range first, so only the
    per-band mean/std differ: x_model = (x_card * std_card + mean_card - mean_model) / std_model.
    """
    if list(card.mean) == list(model.mean) and list(card.std) == list(model.std):
        return None
    scale = torch.tensor(card.std, dtype=torch.float32) / torch.tensor(model.std)
    shift = (torch.tensor(card.mean, dtype=torch.float32) - torch.tensor(model.mean)) \
        / torch.tensor(model.std)

    def apply(x: torch.Tensor) -> torch.Tensor:
        return x * scale.to(x.device)[:, None, None] + shift.to(x.device)[:, None, None]

    return apply


class TorchSegmentor:
    """Any torch module mapping (B, bands, H, W) to logits, as a probability Segmentor.

    Inputs are padded (reflect) to ``pad_multiple`` so encoder-decoders whose strides need
    e.g. multiples of 32 accept the engine's windows, and the output is cropped back.
    """

    def __init__(self, module: torch.nn.Module, device: torch.device, *, bands: int = 3,
                 num_classes: int | None = None, pad_multiple: int = 32,
                 input_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 name: str = "model") -> None:
        self.module = module.to(device).eval()
        self.device = device
        self.bands = bands
        self.pad_multiple = max(1, pad_multiple)
        self.input_transform = input_transform
        self.name = name
        self.num_classes = num_classes or self._probe()

    def _logits(self, image: torch.Tensor) -> torch.Tensor:
        x = image.to(self.device, torch.float32)
        if self.input_transform is not None:
            x = self.input_transform(x)
        h, w = x.shape[-2:]
        ph, pw = -h % self.pad_multiple, -w % self.pad_multiple
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        out = self.module(x)
        if isinstance(out, dict):  # torchvision segmentation models return {"out": ...}
            out = out["out"]
        if not isinstance(out, torch.Tensor) or out.ndim != 4:
            raise InputError(f"{self.name} does not return a (batch, classes, H, W) tensor")
        if out.shape[-2:] != x.shape[-2:]:
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return out[..., :h, :w]

    def _probe(self) -> int:
        size = max(64, self.pad_multiple)
        with torch.inference_mode():
            try:
                out = self._logits(torch.zeros(1, self.bands, size, size, device=self.device))
            except (RuntimeError, ValueError, TypeError) as exc:
                raise InputError(f"{self.name} does not run on a {self.bands}-band image: "
                                 f"{str(exc).splitlines()[0]}") from None
        return 2 if out.shape[1] == 1 else int(out.shape[1])

    def predict(self, image: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            logits = self._logits(image)
            if logits.shape[1] == 1:  # binary model: sigmoid -> background/foreground
                p = torch.sigmoid(logits)
                return torch.cat([1.0 - p, p], dim=1)
            return torch.softmax(logits, dim=1)


def task_from_checkpoint(ckpt: dict[str, Any], name: str = "checkpoint") -> torch.nn.Module:
    """Rebuild a torchgeo ``SemanticSegmentationTask`` from a Lightning checkpoint dict."""
    from torchgeo.trainers import SemanticSegmentationTask

    hparams = dict(ckpt.get("hyper_parameters") or {})
    state = ckpt.get("state_dict")
    if not hparams or not isinstance(state, dict):
        raise InputError(f"{name} is not a Lightning checkpoint (no hyper_parameters/state_dict)")
    if hparams.get("task", "multiclass") == "multilabel":
        raise InputError(f"{name}: multilabel segmentation tasks are not supported "
                         "(classes must be mutually exclusive)")
    accepted = set(inspect.signature(SemanticSegmentationTask.__init__).parameters) - {"self"}
    if "model" not in hparams or not set(hparams) & {"num_classes", "num_labels"}:
        raise InputError(f"{name} is not a torchgeo SemanticSegmentationTask checkpoint")
    kwargs = {k: v for k, v in hparams.items() if k in accepted}
    kwargs["weights"] = None  # never download: the state dict below holds the weights
    try:
        task = SemanticSegmentationTask(**kwargs)
        task.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"cannot rebuild the torchgeo task from {name}: "
                         f"{str(exc).splitlines()[0]}") from None
    return task


def _read_checkpoint(p: Path) -> dict[str, Any]:
    """:func:`~idgbr_geo.registry.load_checkpoint` (``weights_only``: a crafted pickle is
    refused, never run), its errors as InputError like the rest of this module's."""
    try:
        return load_checkpoint(p)
    except UserError as exc:
        raise InputError(str(exc)) from None


def _in_channels(module: torch.nn.Module, default: int) -> int:
    """Input bands of a module, guessed from its first 4-D (convolution) weight."""
    for p in module.parameters():
        if p.ndim == 4:
            return int(p.shape[1])
    return default


def _untrusted_torchscript(p: Path) -> InputError:
    return InputError(f"{p} is a TorchScript module, and loading TorchScript runs code stored "
                      "in the file: it is loaded only when asked for explicitly "
                      "($trust_torchscript), for files you trust", options=["trust_torchscript"])


def load_coarse_model(path: str | os.PathLike[str], device: str | torch.device = "cpu", *,
                      bands: int | None = None, card_normalization: Normalization | None = None,
                      model_normalization: Normalization | None = None,
                      pad_multiple: int = 32, trust_torchscript: bool = False) -> Segmentor:
    """A torchgeo ``.ckpt`` or a TorchScript module as a probability Segmentor.

    ``bands``: input bands (read from the checkpoint's ``in_channels`` when omitted; 3 for
    TorchScript). ``card_normalization`` / ``model_normalization``: the normalisation the
    engine applies and the one the model was trained with; inputs are converted between them.
    ``trust_torchscript``: loading a TorchScript module runs the code stored in the file, so
    it is refused (one InputError) unless this is True; ``.ckpt`` files are read with
    ``weights_only=True`` and need no trust.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"coarse model {p} does not exist")
    dev = resolve_device(device)
    transform = (renormalizer(card_normalization, model_normalization)
                 if card_normalization is not None and model_normalization is not None else None)
    if p.suffix.lower() in CHECKPOINT_SUFFIXES:
        ckpt = _read_checkpoint(p)
        task = task_from_checkpoint(ckpt, p.name)
        in_channels = int(ckpt["hyper_parameters"].get("in_channels", 3))
        return TorchSegmentor(task, dev, bands=bands or in_channels, pad_multiple=pad_multiple,
                              input_transform=transform, name=p.name)
    if not trust_torchscript:
        if _is_torchscript(p):
            raise _untrusted_torchscript(p)
        kinds = ", ".join(CHECKPOINT_SUFFIXES + TORCHSCRIPT_SUFFIXES)
        raise InputError(f"{p} is neither a TorchScript module nor a torchgeo checkpoint "
                         f"({kinds})")
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated upstream, still common
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(p), map_location=dev)
    except (RuntimeError, ValueError) as exc:
        kinds = ", ".join(CHECKPOINT_SUFFIXES + TORCHSCRIPT_SUFFIXES)
        raise InputError(f"{p} is neither a TorchScript module nor a torchgeo checkpoint "
                         f"({kinds}): {str(exc).splitlines()[0]}") from None
    return TorchSegmentor(module, dev, bands=bands or _in_channels(module, 3),
                          pad_multiple=pad_multiple, input_transform=transform, name=p.name)


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives hold a ``code/`` folder; ``torch.save`` archives do not."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n or n.startswith("code/") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


@dataclass
class CoarseStage:
    """A coarse segmentor plus what exporting a model around it needs to know.

    ``kind``: "idgbr" (a model card), "idgbr-checkpoint" (``train coarse`` checkpoint),
    "torchgeo" or "torchscript". ``normalization``: the input normalisation the segmentor
    expects from the engine (None: whatever the refiner is trained with).
    """

    segmentor: Segmentor
    kind: str
    path: Path
    card: ModelCard | None = None
    normalization: Normalization | None = None


def load_coarse(spec: str | os.PathLike[str], device: str | torch.device = "cpu", *,
                card_normalization: Normalization | None = None,
                model_normalization: Normalization | None = None,
                trust_torchscript: bool = False) -> CoarseStage:
    """``--coarse-model``: a torchgeo checkpoint, a TorchScript file, a ``train coarse``
    checkpoint, or an idgbr-geo model (bundled name or card path).

    Checkpoints are read with ``weights_only=True`` (a crafted pickle is one UserError, its
    code never runs); a TorchScript file runs its own code, so it needs
    ``trust_torchscript=True`` (see :func:`load_coarse_model`).
    """
    from .registry import load_model, resolve_card

    p = Path(spec)
    suffix = p.suffix.lower()
    if suffix in TORCHSCRIPT_SUFFIXES and p.is_file() and not _is_torchscript(p):
        from .checkpoints import segmentor_from_checkpoint

        state = _read_checkpoint(p)
        if state.get("kind") != "coarse":
            raise InputError(f"{p} is neither TorchScript nor a `train coarse` checkpoint")
        seg = segmentor_from_checkpoint(p, device, state=state)
        try:
            norm = Normalization(**state["normalization"])
        except (KeyError, TypeError) as exc:
            raise InputError(f"{p}: bad coarse-model checkpoint (normalization: {exc})") from None
        return CoarseStage(seg, "idgbr-checkpoint", p, normalization=norm)
    if suffix in CHECKPOINT_SUFFIXES + TORCHSCRIPT_SUFFIXES:
        seg = load_coarse_model(p, device, card_normalization=card_normalization,
                                model_normalization=model_normalization,
                                trust_torchscript=trust_torchscript)
        kind = "torchgeo" if suffix in CHECKPOINT_SUFFIXES else "torchscript"
        return CoarseStage(seg, kind, p)
    model = load_model(spec, device)
    if model.segmentor is None:
        raise InputError(f"model {spec} has no coarse segmentor")
    return CoarseStage(model.segmentor, "idgbr", resolve_card(spec), model.card,
                       model.card.normalization)


def segmentor_section(path: str | os.PathLike[str], *,
                      model_normalization: Normalization | None = None
                      ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A model-card ``segmentor`` section + tensors that embed a torchgeo checkpoint, so the
    exported model runs the user's coarse stage without the original .ckpt file."""
    p = Path(path)
    ckpt = _read_checkpoint(p)
    task = task_from_checkpoint(ckpt, p.name)
    hp = {k: v for k, v in ckpt["hyper_parameters"].items()
          if isinstance(v, (str, int, float, bool, type(None)))}
    config: dict[str, Any] = {"hyper_parameters": hp, "source": p.name}
    if model_normalization is not None:
        config["model_normalization"] = {"mean": list(model_normalization.mean),
                                         "std": list(model_normalization.std)}
    return {"arch": "torchgeo-segmentation", "config": config}, task.state_dict()


@register_architecture("torchgeo-segmentation")
def _torchgeo_segmentor(card, config, weights, device):
    task = task_from_checkpoint({"hyper_parameters": config["hyper_parameters"],
                                 "state_dict": weights}, card.name)
    norm = config.get("model_normalization")
    transform = renormalizer(card.normalization, Normalization(**norm)) if norm else None
    return TorchSegmentor(task, device, bands=card.bands, input_transform=transform,
                          name=card.name)

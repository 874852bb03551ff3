"""Cost of the bundled models: seconds per 512x512 window, coarse model vs refiner.

    .venv/bin/python benchmarks/models.py [buildings roads landcover] [--threads 2] [--repeat 10]
                                          [--default-allocator] [--refiner-checkpoint PATH]

Times ``segmentor.predict`` and ``refiner.refine`` at the card's default steps (and at 1
and 2x steps) on one 1x3x512x512 window, on CPU with ``--threads`` threads and on a CUDA
GPU when one is available; prints a markdown table (milliseconds). These are the networks
alone: the gate and the refine-only-where-a-boundary-is rule of the engine's inference
(:func:`idgbr_geo.predict.predict_windows`) and everything around it are timed by
benchmarks/engine.py. The refiner's guidance
network runs once per window, the denoiser once per step, the decoder once.

A refiner that shares the segmentor's encoder (``lite-idgbr``) is timed as the engine runs
it: after the segmentor on the same window, so the encoder counts once (in the coarse
column); the "refiner alone" row is ``refine --coarse``, where the encoder runs for the
refiner. A refiner with its own encoder (``encoder: "own"``) runs it for every window, and
is timed so. A card with ``coarse_zooms`` gets a row for the coarse model with its zoomed views
of the window too (:func:`idgbr_geo.views.multiscale_probabilities`, the engine's default;
timed with every view, as for a window the coarse model is unsure of), against which the
refiner's share is counted there.

The networks run with the allocator settings the engine uses (``tuning.tune_allocator``):
with glibc's defaults every window's multi-MB feature maps are unmapped and faulted in again,
which costs the refiner (several 4-16 MB maps at full resolution) ~10 ms per window, far
more than the coarse model; ``--default-allocator`` shows that case.

``--refiner-checkpoint`` also times a refiner training checkpoint (e.g. a wider experimental
one) at 1 step on the same window, next to each model's coarse network.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time

import torch

from idgbr_geo.cards import ModelCard
from idgbr_geo.encoders import FeatureMemo
from idgbr_geo.predict import resolve_precision
from idgbr_geo.registry import bundled_models, load_model, resolve_card, resolve_device
from idgbr_geo.tuning import tune_allocator
from idgbr_geo.views import multiscale_probabilities


def seconds(fn, repeat: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench(name: str, device: str, repeat: int, size: int = 512,
          extra: str | None = None, precision: str = "float32") -> dict[str, float]:
    """Milliseconds per window of each network, in ``precision`` as
    :func:`idgbr_geo.predict.predict_windows` runs them."""
    dev = resolve_device(device)
    cast = (torch.autocast(dev.type, dtype=torch.bfloat16)
            if resolve_precision(precision, dev) == "bfloat16" else contextlib.nullcontext())
    with cast:
        return _bench(name, device, repeat, size, extra)


def _bench(name: str, device: str, repeat: int, size: int, extra: str | None
           ) -> dict[str, float]:
    m = load_model(name, device)
    dev = m.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    img = torch.randn(1, m.card.bands, size, size, generator=g).to(dev)
    memo = getattr(getattr(m.segmentor, "net", None), "encoder", None)
    forget = memo.forget if isinstance(memo, FeatureMemo) else (lambda: None)

    def coarse() -> None:
        forget()  # each window is new to the encoder
        m.segmentor.predict(img)

    out = {"coarse": seconds(coarse, repeat, sync)}
    if m.card.coarse_zooms:  # the card's zoomed views too, as the engine runs it by default
        def views() -> None:
            forget()
            # every view (a window the own view is sure of skips them: its coarse cost)
            multiscale_probabilities(m.segmentor, img, m.card.coarse_zooms, confident=math.inf)

        out["views"] = seconds(views, repeat, sync)
    probs = m.segmentor.predict(img)  # (a shared encoder now holds this window's features)
    steps = m.card.sampling.steps
    own = getattr(m.refiner.net, "encoder", None)
    # a refiner's own encoder (not the segmentor's) runs for every window: not remembered
    own_forget = (own.forget if isinstance(own, FeatureMemo) and own is not memo
                  else (lambda: None))

    def refine(s: int) -> None:
        own_forget()
        m.refiner.refine(img, probs, steps=s, seed=0, origins=[(0, 0)])

    for s in sorted({1, steps, 2 * steps}):
        out[f"refine_{s}"] = seconds(lambda s=s: refine(s), repeat, sync)
    if isinstance(own, FeatureMemo) and own is memo:
        def alone() -> None:  # refine --coarse: the encoder runs for the refiner
            m.refiner.net.encoder.forget()
            m.refiner.refine(img, probs, steps=steps, seed=0, origins=[(0, 0)])

        out["alone"] = seconds(alone, repeat, sync)
        m.segmentor.predict(img)
    if extra:
        from idgbr_geo.checkpoints import refiner_from_checkpoint

        ref = refiner_from_checkpoint(extra, str(dev))
        out["extra"] = seconds(lambda: ref.refine(img, probs, steps=1, seed=0, origins=[(0, 0)]),
                               repeat, sync)
    out["steps"] = steps
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="the networks' arithmetic [the engine's default]")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--default-allocator", action="store_true",
                    help="keep glibc's allocator defaults (the engine tunes them)")
    ap.add_argument("--refiner-checkpoint", default=None,
                    help="also time this refiner checkpoint (checkpoints.refiner_from_checkpoint)")
    args = ap.parse_args()
    if not args.default_allocator:
        tune_allocator()
    torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print("| model | device | coarse ms/window | refiner 1 step | refiner default "
          "(steps) | refiner 2x steps | refiner/coarse | coarse+refiner MP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models or bundled_models():
        for dev in devices:
            r = bench(name, dev, args.repeat, extra=args.refiner_checkpoint,
                      precision=args.precision)
            s = int(r["steps"])
            d = r[f"refine_{s}"]
            label = (f"cpu ({args.threads} threads)" if dev == "cpu"
                     else torch.cuda.get_device_name())
            label += f", {resolve_precision(args.precision, dev)}"
            mp = 512 * 512 / 1e6 / (r["coarse"] + d)
            ms = {k: 1000 * v for k, v in r.items() if k != "steps"}
            print(f"| {name} | {label} | {ms['coarse']:.1f} | {ms['refine_1']:.1f} | "
                  f"{ms[f'refine_{s}']:.1f} ({s}) | {ms[f'refine_{2 * s}']:.1f} | "
                  f"{d / r['coarse']:.2f}x | {mp:.2f} |")
            if "views" in r:
                card = ModelCard.load(resolve_card(name))
                zooms = ", ".join(f"{z:g}x" for z in card.coarse_zooms or ())
                print(f"| {name}, coarse with its zoomed views ({zooms}; `--no-multiscale`: "
                      f"the row above) | {label} | {ms['views']:.1f} | {ms['refine_1']:.1f} | "
                      f"{ms[f'refine_{s}']:.1f} ({s}) | | {d / r['views']:.2f}x | "
                      f"{512 * 512 / 1e6 / (r['views'] + d):.2f} |")
            if "alone" in r:
                print(f"| {name}, refiner alone (`--coarse`: encoder not shared) | {label} | "
                      f"| | {ms['alone']:.1f} ({s}) | | {r['alone'] / r['coarse']:.2f}x | |")
            if "extra" in r:
                print(f"| {name}, refiner {args.refiner_checkpoint} | {label} | "
                      f"{ms['coarse']:.1f} | {ms['extra']:.1f} | | | "
                      f"{r['extra'] / r['coarse']:.2f}x | |")


if __name__ == "__main__":
    main()

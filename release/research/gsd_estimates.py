"""Estimating the pixel size of inputs without a CRS from the image (research; the ``size``
way became the engine's ``--estimate-gsd``).

    OMP_NUM_THREADS=1 .venv/bin/python release/research/gsd_estimates.py buildings \
        [--method head|confidence|size|engine] [--per-source 240] [--seed 0] [--own-set]

Scenes without a CRS run at the card's assumed GSD unless ``--gsd`` is given. Ways to
estimate it instead, scored on every validation scene of all sets (``.train/<set>_val_scenes.npz``,
each written as a GeoTIFF without a CRS and read through :func:`idgbr_geo.tiling.open_source`,
3 x 3 windows of up to 512 px spread over the scene):

* ``head``: a ridge regression of log2 GSD on pooled statistics (mean, std per channel) of the
  bundled model's encoder features at strides 4-32, fitted on crops of the training chips of
  every source with a known GSD (Dubai left out), each downsampled by a random factor of 1-4
  (area) and colour-jittered, the same number per source; the ridge strength by
  leave-one-source-out error (printed); the scene's estimate is the median over its windows.
* ``confidence``: the candidate GSD (0.5, 1, 2, 4 x the model's) at which the segmentor is
  most confident (mean max probability), each window resampled to the model grid.
* ``size`` (session 32): the GSD at which the segmentor's objects have the training labels'
  typical size (buildings: median area; roads: median width along the centre lines), by a
  few rescaling steps from the card's assumption (:func:`size_estimate`).
* ``engine``: the engine's own estimate, :func:`idgbr_geo.scale.estimate_gsd` (``size`` for
  roads on the engine's sample windows, the card's ``gsd_from_width``).

Per source: the median estimate, the known GSD, and the median |log2| error of the estimate
and of assuming the model's GSD (what the engine does).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import rasterio
import torch
import torch.nn.functional as F

from idgbr_geo.registry import load_model
from idgbr_geo.scale import centreline_widths, estimate_gsd
from idgbr_geo.tiling import Source, open_source

ROOT = Path(__file__).resolve().parents[2] / ".train"
SETS = ("buildings", "roads", "landcover")
CANDIDATES = (0.5, 1.0, 2.0, 4.0)  # x the model's GSD
WINDOW, GRID = 512, 3


def window_grid(width: int, height: int) -> list[rasterio.windows.Window]:
    """Up to GRID x GRID windows of WINDOW px, evenly spread, distinct."""
    w, h = min(WINDOW, width), min(WINDOW, height)
    cols = sorted({round(i * (width - w) / (GRID - 1)) for i in range(GRID)})
    rows = sorted({round(i * (height - h) / (GRID - 1)) for i in range(GRID)})
    return [rasterio.windows.Window(c, r, w, h) for r in rows for c in cols]


def pooled_features(encoder, x: torch.Tensor) -> np.ndarray:
    """Mean and std over the pixels of every encoder stage (B, 2 x channels)."""
    with torch.no_grad():
        feats = [f.float().flatten(2) for f in encoder(x)]
    return torch.cat([t for f in feats for t in (f.mean(2), f.std(2))], 1).numpy()


#: downsampling factors drawn log-uniformly from this range
FACTORS = (1.0, 4.0)
#: crop size fed to the encoder (the engine estimates on windows of up to 512 px)
OUT = (192, 384)
LAMBDAS = (0.1, 1.0, 10.0, 100.0, 1000.0)


def known_chips() -> dict[str, list[tuple[np.ndarray, float]]]:
    """source -> [(chip (3, H, W) uint8, GSD)] over all sets, chips of known GSD only (each
    chip once: the Dubai chips appear in several sets and are skipped anyway)."""
    out: dict[str, list[tuple[np.ndarray, float]]] = {}
    for name in SETS:
        path = ROOT / f"{name}_train.npz"
        if not path.exists():
            continue
        z = np.load(path)
        if "chip_source" not in z.files:
            continue
        for img, src, gsd in zip(z["images"], z["chip_source"], z["chip_gsd"], strict=True):
            if str(src) == "dubai":
                continue
            out.setdefault(str(src), []).append((img, float(gsd)))
    return out


def sample(chip: np.ndarray, gsd: float, rng: np.random.Generator) -> tuple[torch.Tensor, float]:
    """A random crop of ``chip`` downsampled by a random factor, colour-jittered (float 0-255),
    and its pixel size."""
    f = math.exp(rng.uniform(*np.log(FACTORS)))
    out = int(rng.integers(OUT[0], OUT[1] + 1))
    size = min(chip.shape[1], chip.shape[2], round(out * f))
    out = max(64, round(size / f))
    f = size / out
    y = int(rng.integers(0, chip.shape[1] - size + 1))
    x = int(rng.integers(0, chip.shape[2] - size + 1))
    t = torch.from_numpy(chip[:, y:y + size, x:x + size].astype(np.float32))[None]
    if size != out:
        t = F.interpolate(t, size=(out, out), mode="area")
    gain = torch.from_numpy(rng.uniform(0.8, 1.2, 3).astype(np.float32))[None, :, None, None]
    gamma = float(rng.uniform(0.8, 1.25))
    t = (255.0 * ((t * gain).clamp(0, 255) / 255.0) ** gamma).round().to(torch.uint8)
    if rng.random() < 0.5:
        t = t.flip(-1)
    return t, gsd * f


def ridge(x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, float, np.ndarray,
                                                              np.ndarray]:
    """(weights, bias, mean, scale) of a ridge fit on standardised features."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    ym = y.mean()
    w = np.linalg.solve(z.T @ z + lam * np.eye(z.shape[1]), z.T @ (y - ym))
    return w, float(ym), mu, sd


def predict(fit: tuple[np.ndarray, float, np.ndarray, np.ndarray], x: np.ndarray) -> np.ndarray:
    w, b, mu, sd = fit
    return ((x - mu) / sd) @ w + b


def fit_head(m, per_source: int, seed: int):
    """The ridge head on the model's encoder, chosen by leave-one-source-out error."""
    rng = np.random.default_rng(seed)
    feats, targets, sources = [], [], []
    for source, chips in sorted(known_chips().items()):
        for _ in range(per_source):
            chip, gsd = chips[int(rng.integers(len(chips)))]
            t, g = sample(chip, gsd, rng)
            x = torch.from_numpy(m.card.normalization.apply(t[0].numpy(), "uint8"))[None]
            feats.append(pooled_features(m.segmentor.net.encoder, x)[0])
            targets.append(math.log2(g))
            sources.append(source)
    x, y, s = np.stack(feats).astype(np.float64), np.array(targets), np.array(sources)
    best = None
    for lam in LAMBDAS:
        errs = {str(src): float(np.median(np.abs(
            predict(ridge(x[s != src], y[s != src], lam), x[s == src]) - y[s == src])))
            for src in np.unique(s)}
        score = float(np.mean(list(errs.values())))
        print(f"lambda {lam:g}: leave-one-source-out median |log2 error| {score:.2f} ("
              + ", ".join(f"{k} {v:.2f}" for k, v in errs.items()) + ")", flush=True)
        if best is None or score < best[0]:
            best = (score, lam)
    assert best is not None
    return ridge(x, y, best[1])


def windows(src, m):
    """The scene's :func:`window_grid` windows, normalised for the model (1, bands, h, w)."""
    for win in window_grid(src.width, src.height):
        yield torch.from_numpy(m.card.normalization.apply(src.ds.read(src.bands, window=win),
                                                          src.dtype))[None]


def head_estimate(src, m, fit) -> float:
    logs = [float(predict(fit, pooled_features(m.segmentor.net.encoder, x))[0])
            for x in windows(src, m)]
    return 2.0 ** float(np.median(logs))


def confidence_estimate(src, m) -> float:
    scores = np.zeros(len(CANDIDATES))
    for x in windows(src, m):
        for j, c in enumerate(CANDIDATES):
            h, w = (max(32, round(n / c / 32) * 32) for n in x.shape[-2:])
            y = F.interpolate(x, size=(h, w), mode="area" if c < 1 else "bilinear")
            scores[j] += float(m.segmentor.predict(y).max(1).values.mean())
    return m.card.gsd * CANDIDATES[int(np.argmax(scores))]


#: ``size``: the typical object of the training labels of known GSD (``typical_size``):
#: buildings 118 m2 (drone 111, xdomain 121 by source), roads 6.3 m wide (Massachusetts 6.3,
#: DeepGlobe 4.5, RoadNet 6.0)
SIZE_ITERATIONS = 4
MIN_AREA = 4.0  # m2: smaller components (and label blobs) are noise, not buildings
MAX_STEP = 2.5  # the most one iteration rescales the GSD by
MAX_SIDE = 1024  # model pixels: an upsampled window is cropped around its centre


def typical_size(name: str) -> float:
    """The median building area (m2) or road width (m) in the training labels of known GSD."""
    z = np.load(ROOT / f"{name}_train.npz")
    vals: list[float] = []
    for lab, src, g in zip(z["labels"], z["chip_source"], z["chip_gsd"], strict=True):
        if str(src) == "dubai" or not (math.isfinite(g) and g > 0):
            continue
        vals += object_sizes(lab == 1, float(g), name)
    return float(np.median(vals))


def object_sizes(mask: np.ndarray, gsd: float, name: str) -> list[float]:
    """Building areas (m2) of the components of at least MIN_AREA, or road widths (m) at
    skeleton pixels (none for fewer than 100 road pixels)."""
    import scipy.ndimage as ndi

    if name == "buildings":
        lab, n = ndi.label(mask)
        if n == 0:
            return []
        area = np.bincount(lab.ravel())[1:] * gsd * gsd
        return area[area >= MIN_AREA].tolist()
    if mask.sum() < 100:
        return []
    return (centreline_widths(mask) * gsd).tolist()


def size_estimate(src, m, name: str, typical: float, start: float) -> float:
    """Fixed point of "the model's objects have the training labels' typical size": from
    ``start`` (the card's GSD for inputs without a CRS), run the segmentor with the input
    assumed at GSD ``s``, measure the median object size in metres, and rescale ``s`` by
    typical / measured (square root for areas; at most MAX_STEP either way); SIZE_ITERATIONS
    times, clamped to 0.03-3 m. No object found: ``s`` stays."""
    s = start
    wins = list(windows(src, m))
    for _ in range(SIZE_ITERATIONS):
        sizes: list[float] = []
        f = s / m.card.gsd  # model pixels per input pixel
        for x in wins:
            if f > 1:  # (the centre, at most MAX_SIDE model pixels)
                side = [min(n, int(MAX_SIDE / f)) for n in x.shape[-2:]]
                y0, x0 = ((n - c) // 2 for n, c in zip(x.shape[-2:], side, strict=True))
                x = x[..., y0:y0 + side[0], x0:x0 + side[1]]
            h, w = (max(32, round(n * f / 32) * 32) for n in x.shape[-2:])
            y = F.interpolate(x, size=(h, w), mode="area" if f < 1 else "bilinear")
            with torch.no_grad():
                p = m.segmentor.predict(y)[0]
            sizes += object_sizes((p.argmax(0) == 1).numpy(), m.card.gsd, name)
        if not sizes:
            break
        ratio = typical / float(np.median(sizes))
        step = math.sqrt(ratio) if name == "buildings" else ratio
        s = float(np.clip(s * np.clip(step, 1 / MAX_STEP, MAX_STEP), 0.03, 3.0))
    return s


def open_without_crs(tif: Path, img: np.ndarray, card) -> Source:
    """``img`` (bands, H, W) written to ``tif`` as an export without a CRS and opened as the
    engine opens an input (the card's bands and GSD; its no-CRS warning silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(tif, "w", driver="GTiff", width=img.shape[2], height=img.shape[1],
                           count=img.shape[0], dtype=img.dtype) as dst:
            dst.write(img)
        return open_source(tif, model_bands=card.bands, bands=None, model_gsd=card.gsd)


def engine_estimate(src, m) -> float:
    """The engine's own estimate (:func:`idgbr_geo.scale.estimate_gsd`, from the card's
    ``gsd_without_crs``, on the engine's sample windows); the assumption where it has none."""
    start = m.card.gsd_without_crs or m.card.gsd
    est = estimate_gsd(src, m, start, tile_size=m.card.tile_size, overlap=m.card.overlap)
    return start if est is None else est.gsd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("set", choices=SETS)
    ap.add_argument("--method", choices=("head", "confidence", "size", "engine"), default="head")
    ap.add_argument("--per-source", type=int, default=240)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--own-set", action="store_true",
                    help="only the scenes of the model's own set (each printed)")
    args = ap.parse_args()
    m = load_model(args.set, "cpu")
    fit = fit_head(m, args.per_source, args.seed) if args.method == "head" else None
    typical = typical_size(args.set) if args.method == "size" else 0.0
    if args.method == "size":
        if args.set not in ("buildings", "roads"):
            ap.error("--method size: buildings or roads")
        print(f"typical size in the training labels: {typical:.3g}", flush=True)
    rows: dict[str, list[tuple[float, float | None]]] = defaultdict(list)
    seen: set[str] = set()
    with tempfile.TemporaryDirectory() as tmp:
        for name in (args.set,) if args.own_set else SETS:
            path = ROOT / f"{name}_val_scenes.npz"
            if not path.exists():
                continue
            z = np.load(path)
            for i in range(len([k for k in z.files if k.startswith("image_")])):
                scene = str(z[f"name_{i}"])
                if scene in seen:  # (Dubai tile 7 is in every set)
                    continue
                seen.add(scene)
                img, gsd = z[f"image_{i}"], float(z[f"gsd_{i}"])
                src = open_without_crs(Path(tmp) / "scene.tif", img, m.card)
                try:
                    if args.method == "engine":  # what --estimate-gsd does (the card's width)
                        est = engine_estimate(src, m)
                    elif args.method == "size":
                        est = size_estimate(src, m, args.set, typical,
                                            m.card.gsd_without_crs or m.card.gsd)
                    else:
                        est = (head_estimate(src, m, fit) if fit is not None
                               else confidence_estimate(src, m))
                finally:
                    src.ds.close()
                known = gsd if math.isfinite(gsd) and gsd > 0 else None
                if args.own_set:
                    print(f"  {z[f'source_{i}']} {scene}: estimate {est:.3g}, known {known}",
                          flush=True)
                rows[str(z[f"source_{i}"])].append((est, known))
    print(f"model {m.card.name} ({m.card.gsd:g} m), method {args.method}")
    print("| source | scenes | known GSD (median) | estimate (median, range) | "
          "median abs log2 error: estimate | : model GSD |")
    print("|---|---|---|---|---|---|")
    for source, vals in rows.items():
        est = np.array([e for e, _ in vals])
        span = f"{np.median(est):.3g} ({est.min():.3g}-{est.max():.3g})"
        if all(k is not None for _, k in vals):
            k = np.array([k for _, k in vals], float)
            e1 = np.median(np.abs(np.log2(est / k)))
            e0 = np.median(np.abs(np.log2(m.card.gsd / k)))
            print(f"| {source} | {len(vals)} | {np.median(k):.3g} | {span} | {e1:.2f} | "
                  f"{e0:.2f} |")
        else:
            print(f"| {source} | {len(vals)} | unknown | {span} | | |")


if __name__ == "__main__":
    main()

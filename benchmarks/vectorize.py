"""Benchmark: vectorize a 16k x 16k class raster (polygonize + simplify + regularize).

Generates (once, cached) a tiled, DEFLATE-compressed uint8 GeoTIFF with a realistic suburban
building density (one parcel every 48 px at 0.3 m = 14.4 m, ~85 % built, rectangles and
L-shapes rotated per neighbourhood, some touching window edges) plus a road grid, written
window by window. Each configuration then runs ``vectorize_raster`` in a fresh child process,
so its peak RSS (``resource.getrusage(RUSAGE_CHILDREN)``) is the vectorizer's alone.
Prints a markdown table. Targets (2-core machine): < 60 s and < 2 GB peak RSS.

    nice -n 10 .venv/bin/python benchmarks/vectorize.py            # 16384 x 16384
    .venv/bin/python benchmarks/vectorize.py --size 4096 --work /tmp/vbench
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

GSD = 0.3
PARCEL = 48
ROAD_PITCH, ROAD_WIDTH = 480, 24
CLASSES = ["background", "building", "road"]

CONFIGS = {
    "polygonize + simplify": {},
    "polygonize + simplify + regularize": {"regularize": True},
    "... + regularize + road centerlines": {"regularize": True, "centerlines": True},
}


def buildings(size: int, seed: int = 0) -> list:
    """Building polygons (pixel coordinates) on a global parcel grid, vectorized generation."""
    import shapely
    from shapely import affinity

    rng = np.random.default_rng(seed)
    n = size // PARCEL
    jj, ii = np.meshgrid(np.arange(n), np.arange(n))
    cx = (jj.ravel() + 0.5) * PARCEL + rng.uniform(-4, 4, n * n)
    cy = (ii.ravel() + 0.5) * PARCEL + rng.uniform(-4, 4, n * n)
    on_road = ((cx % ROAD_PITCH) < ROAD_WIDTH + 30) | ((cy % ROAD_PITCH) < ROAD_WIDTH + 30)
    keep = (rng.random(n * n) < 0.85) & ~on_road
    w, h = rng.uniform(14, 36, n * n), rng.uniform(12, 30, n * n)
    # orientation shared per neighbourhood (block of 8 x 8 parcels), jittered per building
    block = (ii.ravel() // 8) * 1000 + jj.ravel() // 8
    angle = np.random.default_rng(seed + 1).uniform(-45, 45, block.max() + 1)[block]
    angle += rng.normal(0, 2, n * n)
    ell = rng.random(n * n) < 0.3
    out = []
    for k in np.nonzero(keep)[0]:
        g = shapely.box(cx[k] - w[k] / 2, cy[k] - h[k] / 2, cx[k] + w[k] / 2, cy[k] + h[k] / 2)
        if ell[k]:
            g = g.difference(shapely.box(cx[k], cy[k], cx[k] + w[k], cy[k] + h[k]))
        out.append(affinity.rotate(g, angle[k], origin=(cx[k], cy[k])))
    return out


def generate(path: Path, size: int) -> int:
    """Write the class raster in 2048 x 2048 windows; returns the building count."""
    import rasterio
    import shapely
    from rasterio.features import rasterize
    from rasterio.transform import from_origin
    from rasterio.windows import Window
    from rasterio.windows import transform as window_transform

    polys = np.array(buildings(size), dtype=object)
    tree = shapely.STRtree(polys)
    profile = dict(driver="GTiff", width=size, height=size, count=1, dtype="uint8",
                   crs="EPSG:32631", transform=from_origin(500000, 5700000, GSD, GSD),
                   nodata=255, tiled=True, blockxsize=512, blockysize=512, compress="deflate")
    step = 2048
    tmp = path.with_suffix(".partial.tif")
    with rasterio.open(tmp, "w", **profile) as dst:
        dst.update_tags(IDGBR_CLASSES=json.dumps(CLASSES))
        for r in range(0, size, step):
            for c in range(0, size, step):
                win = Window(c, r, min(step, size - c), min(step, size - r))
                rows = np.arange(r, r + win.height)[:, None]
                cols = np.arange(c, c + win.width)[None, :]
                arr = np.where(((rows % ROAD_PITCH) < ROAD_WIDTH)
                               | ((cols % ROAD_PITCH) < ROAD_WIDTH), 2, 0).astype(np.uint8)
                hit = tree.query(shapely.box(c, r, c + win.width, r + win.height))
                if hit.size:
                    tr = window_transform(win, profile["transform"])
                    # pixel -> map coordinates for rasterize
                    geoms = shapely.transform(polys[hit], lambda xy: np.column_stack(
                        [500000 + xy[:, 0] * GSD, 5700000 - xy[:, 1] * GSD]))
                    rasterize(((g, 1) for g in geoms), out=arr, transform=tr)
                dst.write(arr, 1, window=win)
    os.replace(tmp, path)
    return len(polys)


def child(raster: str, out: str, options: str) -> None:
    """Run one configuration (in its own process) and print a JSON result line."""
    from idgbr_geo.vectorize import vectorize_raster

    def cpu() -> float:
        use = resource.getrusage(resource.RUSAGE_SELF)
        return use.ru_utime + use.ru_stime

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # after imports
    t0, c0 = time.perf_counter(), cpu()
    summary = vectorize_raster(raster, out, overwrite=True, **json.loads(options))
    wall, cpu_s = time.perf_counter() - t0, cpu() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB -> MB on Linux
    print(json.dumps({"wall_s": wall, "cpu_s": cpu_s, "peak_mb": peak, "import_mb": base,
                      "layers": summary["layers"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=16384)
    parser.add_argument("--work", type=Path, default=Path("/tmp/idgbr_vector_bench"))
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    raster = args.work / f"classes_{args.size}.tif"
    if not raster.exists():
        t0 = time.perf_counter()
        n = generate(raster, args.size)
        print(f"generated {raster} ({n} buildings) in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
    rows = []
    for name in args.configs:
        out = args.work / "out.gpkg"
        env = dict(os.environ, OMP_NUM_THREADS="1")
        res = subprocess.run([sys.executable, __file__, "--child", str(raster), str(out),
                              json.dumps(CONFIGS[name])], capture_output=True, text=True,
                             env=env, check=False)
        if res.returncode:
            sys.exit(f"{name} failed:\n{res.stderr}")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append((name, r))
        print(f"{name}: {r}", file=sys.stderr)
    load = os.getloadavg()[0]
    print(f"\n| {args.size} x {args.size} class raster, 0.3 m | wall (s) | CPU (s) | "
          "peak RSS (MB) | of which imports (MB) | buildings | road polygons | centerlines |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows:
        layers = r["layers"]
        print(f"| {name} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_mb']:.0f} | "
              f"{r['import_mb']:.0f} | "
              f"{layers.get('buildings', 0)} | {layers.get('roads', 0)} | "
              f"{layers.get('road_centerlines', '-')} |")
    print(f"\n{os.cpu_count()} CPUs, load average {load:.1f} at the end (wall times include "
          "waiting for a core when the machine is shared; CPU time does not).")


if __name__ == "__main__":
    main()

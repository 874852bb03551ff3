"""`idgbr-geo refine` and `idgbr-geo batch`: thin wrappers over the engine and batch API.

Both build the library's option objects (:mod:`idgbr_geo.options`) from their flags, so a
value out of range is the library's own one-line error, before any model or file is opened.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from ..options import OutputOptions, RunOptions, VectorOptions
from ._common import user_errors
from .vectorize import pop_vector_options, vector_options

#: flags that fill :class:`~idgbr_geo.options.RunOptions` and ``OutputOptions``
RUN_KEYS = ("coarse_only", "bands", "tile_size", "overlap", "steps", "batch_size",
            "model_workers", "device", "seed", "gsd", "value_range", "precision", "gsd_search",
            "multiscale", "estimate_gsd")
OUTPUT_KEYS = ("confidence", "cog")


def _bands(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if not value:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter("give 1-based band numbers separated by commas, e.g. 1,2,3"
                                 ) from None


def _value_range(ctx: click.Context, param: click.Parameter, value: str | None
                 ) -> tuple[float, float] | None:
    if not value:
        return None
    try:
        low, high = (float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter("give two numbers LOW,HIGH, e.g. 0,2047") from None
    return low, high


def engine_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by refine and batch."""
    opts = [
        click.option("--model", "-m", default="buildings", show_default=True,
                     help="Bundled model name (buildings, roads, landcover) or a model card path."),
        click.option("--coarse-only", is_flag=True, help="Skip refinement: write the coarse map."),
        click.option("--bands", callback=_bands, help="Input bands to use, e.g. 1,2,3."),
        click.option("--tile-size", type=int, help="Window size in model pixels [card]."),
        click.option("--overlap", type=int, help="Window overlap in model pixels [card]."),
        click.option("--steps", type=int, help="Diffusion sampling steps, 0..1000 [card]."),
        click.option("--batch-size", type=int,
                     help="Windows per forward pass [1 on CPU, 8 on a GPU]."),
        click.option("--model-workers", type=int,
                     help="Networks running side by side on the CPU threads [2 on a "
                          "multi-core CPU, 1 on a GPU]."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                     show_default=True),
        click.option("--precision", type=click.Choice(["auto", "float32", "bfloat16"]),
                     default="auto", show_default=True,
                     help="The networks' arithmetic [auto: bfloat16 on a CPU with AMX tiles "
                          "or AVX-512 BF16, 1.6-2x faster per window; else float32]."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Diffusion noise seed, 0..2^64-1 (same seed, same output, bit for "
                          "bit)."),
        click.option("--gsd", type=float,
                     help="Input ground sample distance in metres (overrides the file)."),
        click.option("--estimate-gsd", is_flag=True,
                     help="For an input without a CRS and no --gsd: estimate its GSD from the "
                          "image (roads: from the width of its roads) instead of assuming the "
                          "model's default."),
        click.option("--gsd-search/--no-gsd-search", default=True, show_default=True,
                     help="Let the model work at the GSD, of those its card lists, that its "
                          "coarse map is most confident at for this scene (a few sample "
                          "windows); --no-gsd-search: always the card's GSD."),
        click.option("--multiscale/--no-multiscale", default=True, show_default=True,
                     help="Average the coarse model over the zoomed views of each window "
                          "that its card lists (buildings, roads: 0.8x); "
                          "--no-multiscale: one view, faster."),
        click.option("--value-range", callback=_value_range, metavar="LOW,HIGH",
                     help="Raw input values mapped onto the model's range, e.g. 0,2047 for "
                          "11-bit data [the values as they are; a non-8-bit input that does "
                          "not use the model's range: each band stretched by percentiles]."),
        click.option("--confidence", is_flag=True, help="Add a confidence band (max probability)."),
        click.option("--cog", is_flag=True, help="Write Cloud-Optimized GeoTIFFs."),
        click.option("--overwrite", is_flag=True, help="Replace existing outputs."),
        click.option("--quiet", "-q", is_flag=True,
                     help="No progress bar, summary or warnings."),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def option_objects(kwargs: dict[str, Any]) -> tuple[RunOptions, OutputOptions]:
    """Take the engine and vector flags out of a command's kwargs as option objects:
    checked here, once, with the library's own rules."""
    vectors = VectorOptions(**pop_vector_options(kwargs))
    run = RunOptions(**{k: kwargs.pop(k) for k in RUN_KEYS})
    return run, OutputOptions(**{k: kwargs.pop(k) for k in OUTPUT_KEYS}, vectors=vectors)


@click.command()
@click.argument("input", type=click.Path(dir_okay=False, path_type=str))
@click.argument("output", type=click.Path(dir_okay=False, path_type=str))
@click.option("--coarse", type=click.Path(path_type=str),
              help="Refine this coarse class raster (any model's) instead of running ours.")
@click.option("--probabilities", type=click.Path(dir_okay=False, path_type=str),
              help="Also write per-class probabilities (uint8 0..255) to this GeoTIFF.")
@engine_options
@click.option("--vector", type=click.Path(dir_okay=False, path_type=str),
              help="Also write the refined map as polygons to this GeoPackage (.gpkg).")
@vector_options
@user_errors
def refine(input: str, output: str, quiet: bool, **kwargs: Any) -> None:
    """Refine INPUT (a GeoTIFF of any size) into a georeferenced class raster OUTPUT."""
    run, outputs = option_objects(kwargs)
    from ..engine import refine_raster
    from ..tuning import tune_process

    tune_process()  # a command is the whole process: tune it for a long run
    summary = refine_raster(input, output, options=run, outputs=outputs, quiet=quiet, **kwargs)
    if not quiet:
        click.echo(summary.line(), err=True)


@click.command()
@click.argument("in_dir", type=click.Path(file_okay=False, path_type=str))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=str))
@click.option("--pattern", metavar="GLOB",
              help="Glob for input scenes, e.g. '*.jpg'  [default: GeoTIFFs: *.tif, *.tiff, "
                   "any case]")
@click.option("--scheduler", metavar="tcp://HOST:PORT",
              help="Run one task per scene on this existing Dask cluster.")
@click.option("--workers", type=click.IntRange(min=1),
              help="Start a local Dask cluster of N worker processes (1 thread each).")
@click.option("--retries", type=click.IntRange(min=0), default=2, show_default=True,
              help="Extra tries for a scene whose worker died or that hit a transient error.")
@engine_options
@click.option("--vector", is_flag=True,
              help="Also write OUT_DIR/<scene>.gpkg polygons for every scene.")
@click.option("--vector-merge", type=click.Path(dir_okay=False, path_type=str),
              help="Write the polygons of all scenes into this one GeoPackage (scene attribute).")
@vector_options
@user_errors
def batch(in_dir: str, out_dir: str, quiet: bool, **kwargs: Any) -> None:
    """Refine every raster in IN_DIR matching --pattern into OUT_DIR (same options as refine;
    OUT_DIR is created when it does not exist).

    IN_DIR may also be a URL that fsspec can list (s3://, http://...). Scenes run in this
    process, or one Dask task each with --workers N or --scheduler. A manifest in OUT_DIR
    records each scene's state: re-running the command skips finished scenes and redoes the
    rest. Existing outputs are skipped unless --overwrite. A failing scene does not stop the
    batch; a JSON summary is written to OUT_DIR and the exit code is 1 if any scene failed.
    """
    run, outputs = option_objects(kwargs)
    from ..batch import run_batch

    result = run_batch(in_dir, out_dir, options=run, outputs=outputs, quiet=quiet,
                       tune_process=True, **kwargs)
    counts = ", ".join(f"{v} {k}" for k, v in sorted(result.counts().items()))
    if not quiet:
        click.echo(f"{len(result.scenes)} scenes: {counts}; summary: {result.summary_path}; "
                   f"manifest: {result.manifest_path}", err=True)
    for s in result.failed:
        click.echo(f"Failed: {s.scene}: {s.error}", err=True)
    if result.failed:
        raise SystemExit(1)

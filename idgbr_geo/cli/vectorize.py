"""`idgbr-geo vectorize`: class raster -> GeoPackage; plus reusable vector options.

``vector_options`` adds the shaping options (--simplify, --min-area, --fill-holes,
--regularize, --centerlines) to any command (``refine`` and ``batch`` use it with --vector);
``pop_vector_options(kwargs)`` takes them back out as keyword arguments for
:func:`idgbr_geo.vectorize.vectorize_raster`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import click

from ._common import user_errors

VECTOR_KEYS = ("simplify", "min_area", "fill_holes", "regularize", "centerlines")


def parse_area(ctx: click.Context | None, param: Any, value: str | None) -> Any:
    """'12.5' -> 12.5 for every class; 'building=10,road=40' -> per class dict."""
    if value is None:
        return None
    try:
        if "=" not in value:
            return float(value)
        out = {}
        for item in value.split(","):
            key, _, num = item.partition("=")
            out[key.strip()] = float(num)
        return out
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected a number or CLASS=NUMBER,... "
                                 "(square metres)") from None


def parse_classes(ctx: click.Context | None, param: Any, value: str | None) -> list[str] | None:
    """'background, building' -> ['background', 'building'] (checked: see check_class_names)."""
    if value is None:
        return None
    from ..errors import UserError
    from ..vectorize import check_class_names

    try:
        return check_class_names(value)
    except UserError as exc:
        raise click.BadParameter(str(exc)) from None


def vector_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Click options shared by every command that writes vector layers."""
    options = [
        click.option("--simplify", type=click.FloatRange(min=0), default=None,
                     help="Simplification tolerance in map units (default: one pixel; 0 = off)."),
        click.option("--min-area", callback=parse_area, metavar="M2|CLASS=M2,...",
                     help="Drop features below this area in m^2 (default: building 4, road 20, "
                          "others 9 pixels)."),
        click.option("--fill-holes", callback=parse_area, metavar="M2|CLASS=M2,...",
                     help="Fill holes below this area in m^2 (default: the class's min area)."),
        click.option("--regularize", is_flag=True,
                     help="Rectilinear building footprints aligned to each building."),
        click.option("--centerlines", is_flag=True,
                     help="Also write a road_centerlines layer (LineStrings with length_m)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def pop_vector_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove the ``vector_options`` values from a command's kwargs and return them."""
    return {key: kwargs.pop(key) for key in VECTOR_KEYS if key in kwargs}


@click.command()
@click.argument("class_raster", type=click.Path(dir_okay=False))
@click.argument("out_gpkg", type=click.Path(dir_okay=False))
@click.option("--probabilities", type=click.Path(dir_okay=False), default=None,
              help="Probabilities raster (one band per class) for a mean_probability attribute.")
@vector_options
@click.option("--window-size", type=click.IntRange(min=16), default=2048, show_default=True,
              help="Polygonize in windows of this many pixels (bounds memory).")
@click.option("--classes", callback=parse_classes, metavar="NAME,NAME,...",
              help="Class names by class id, e.g. background,building (for class rasters from "
                   "other tools; replaces the raster's own names). Ids named background give "
                   "no layer.")
@click.option("--scene", default=None, help="Value of the scene attribute (default: file stem).")
@click.option("--overwrite", is_flag=True, help="Replace OUT_GPKG if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
@user_errors
def vectorize(class_raster: str, out_gpkg: str, probabilities: str | None, window_size: int,
              classes: list[str] | None, scene: str | None, overwrite: bool, quiet: bool,
              **kwargs: Any) -> None:
    """Vectorize CLASS_RASTER (an `idgbr-geo refine` output, or any raster whose band 1 holds
    integer class ids) into OUT_GPKG: one layer per class with class, area_m2, perimeter_m,
    mean confidence/probability and scene.

    Layers are named after the classes in the raster's IDGBR_CLASSES tag (written by refine);
    a raster without it gives layers class_1, class_2, ... unless --classes names its ids."""
    from ..vectorize import vectorize_raster

    summary = vectorize_raster(class_raster, out_gpkg, probabilities=probabilities,
                               window_size=window_size, scene=scene, classes=classes,
                               overwrite=overwrite, progress=not quiet,
                               **pop_vector_options(kwargs))
    if not quiet:
        counts = ", ".join(f"{k}: {v}" for k, v in summary["layers"].items())
        click.echo(f"wrote {summary['output']} ({counts})", err=True)
        if classes is None and any(re.fullmatch(r"class_\d+", k) for k in summary["layers"]):
            click.echo("note: the raster does not name its classes (layers class_1, ...); "
                       "name them with --classes, e.g. --classes background,building", err=True)

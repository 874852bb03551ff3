"""`idgbr-geo evaluate` and `idgbr-geo preview`: measure and look at what refinement did."""

from __future__ import annotations

import contextlib
import os

import click

from ._common import user_errors


def check_not_inputs(inputs: dict[str, str | os.PathLike[str] | None],
                     outputs: dict[str, str | os.PathLike[str] | None]) -> None:
    """Refuse, with or without --overwrite, an output that is an input, a file in an input
    folder (a scene) or another output."""
    from ..files import check_distinct

    check_distinct(inputs, outputs)
    for name, path in inputs.items():
        if path and os.path.isdir(path):
            with os.scandir(path) as entries:
                for entry in entries:
                    if entry.is_file():
                        check_distinct({f"{name} scene": entry.path}, outputs)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("pred", type=click.Path(path_type=str))
@click.argument("truth", type=click.Path(path_type=str))
@click.option("--coarse", type=click.Path(path_type=str), default=None,
              help="Coarse class raster (or folder) on the same grid: report it side by side "
                   "and the repair score IoU_imp.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object instead of the table.")
@click.option("--k", "k", type=float, default=1.0, show_default=True,
              help="Weight k in IoU_imp = IoU(false region) - k * (1 - IoU(true region)).")
@click.option("--ignore-class", "ignore_classes", multiple=True, metavar="NAME",
              help="Treat TRUTH pixels of this class like nodata and leave the class out "
                   "of the report (repeatable).")
@click.option("--class-field", default="class", show_default=True,
              help="Attribute of vector TRUTH holding the class (id or name).")
@click.option("--window", type=click.IntRange(64, 16384), default=1024, show_default=True,
              help="Window size in pixels for streaming.")
@click.option("-o", "--output", type=click.Path(path_type=str), default=None,
              help="Also write the JSON report to this file.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or warnings.")
@user_errors
def evaluate(pred: str, truth: str, coarse: str | None, as_json: bool, k: float,
             ignore_classes: tuple[str, ...], class_field: str, window: int,
             output: str | None, overwrite: bool, quiet: bool) -> None:
    """Score class map PRED against TRUTH: IoU, F1, boundary F (1/2/3 px), Boundary IoU
    (3 px band), the IDGBR boundary weighted F-measure (3 px band) and pixel accuracy,
    per class and mean.

    PRED and TRUTH are class rasters on the same grid (band 1 = class ids; 255 or the
    raster's nodata in TRUTH is ignored), or TRUTH is a GeoPackage/GeoJSON whose features
    carry a class attribute (--class-field; with two classes and no such attribute every
    feature is the second class). Class names come from PRED's IDGBR_CLASSES tag.

    With folders, PRED/, TRUTH/ (and --coarse COARSE/) scenes are matched by file name
    without suffix (pred/a.tif <-> truth/a.tif or truth/a.gpkg): one table per scene, then
    the total with all pixels pooled. Undefined values (class absent from truth and
    prediction) show as "-" and are null in JSON.

    The JSON object also holds pixel_accuracy (overall), pixels (valid pixels), classes,
    with --coarse iou_imp_k, and for folders scenes {name: ...} and unmatched. Exact
    definitions: python -m pydoc idgbr_geo.metrics
    """
    from ..evaluate import evaluate_paths, format_report, to_json
    from ..files import atomic_output, check_output, write_errors

    check_not_inputs({"prediction": pred, "truth": truth, "--coarse map": coarse},
                     {"--output file": output})
    if output:
        check_output(output, overwrite)
    result = evaluate_paths(pred, truth, coarse=coarse, ignore_classes=ignore_classes, k=k,
                            class_field=class_field, window=window, progress=not quiet)
    text = to_json(result)
    if output:
        with atomic_output(output, overwrite) as tmp, write_errors(output):
            tmp.write_text(text + "\n")
    click.echo(text if as_json else format_report(result))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=str))
@click.argument("output", metavar="[OUT.png]", required=False, type=click.Path(path_type=str))
@click.option("--refined", required=True, type=click.Path(path_type=str),
              help="Refined class raster (or folder of them) on INPUT's grid.")
@click.option("--coarse", type=click.Path(path_type=str), default=None,
              help="Coarse class raster (or folder): its boundaries in red.")
@click.option("--truth", type=click.Path(path_type=str), default=None,
              help="Truth class raster or GeoPackage/GeoJSON (or folder): boundaries in cyan; "
                   "in --html reports it also adds the evaluate table.")
@click.option("--window", default=None, metavar="COL,ROW,WIDTH,HEIGHT",
              help="Crop in INPUT pixels, shown at full resolution (downsampled only if "
                   "larger than --max-size). Default: the whole scene, downsampled.")
@click.option("--max-size", type=click.IntRange(64, 20000), default=1600, show_default=True,
              help="Longest side of the preview image in pixels.")
@click.option("--bands", default=None, metavar="R,G,B",
              help="Image bands to show (1-based): three for colour, one for grey. Default: "
                   "the RGB bands, else 1,2,3, else band 1.")
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.3, show_default=True,
              help="Opacity of the refined classes' tint (0: boundaries only).")
@click.option("--class-field", default="class", show_default=True,
              help="Attribute of vector truth holding the class (id or name).")
@click.option("--html", "html_out", type=click.Path(path_type=str), default=None,
              metavar="OUT.html",
              help="Write a self-contained HTML report (previews + evaluate tables).")
@click.option("--k", "k", type=float, default=1.0, show_default=True,
              help="Weight k of IoU_imp in the --html report's tables.")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
@click.option("--quiet", "-q", is_flag=True, help="No warnings or 'wrote' lines.")
@user_errors
def preview(input_path: str, output: str | None, refined: str, coarse: str | None,
            truth: str | None, window: str | None, max_size: int, bands: str | None,
            alpha: float, class_field: str, html_out: str | None, k: float,
            overwrite: bool, quiet: bool) -> None:
    """Draw INPUT (contrast-stretched) with the coarse (red), refined (yellow) and truth
    (cyan) class boundaries and a legend, into OUT.png.

    Folder report: when INPUT is a folder, --refined (and --coarse, --truth) are folders
    too, scenes are matched by file name without suffix (images/a.tif <-> refined/a.tif
    <-> truth/a.tif or truth/a.gpkg), and --html OUT.html is required; OUT.png is not
    used. Example:

    \b
        idgbr-geo preview images/ --refined refined/ --coarse coarse/ \\
            --truth truth/ --html report.html

    With a single INPUT file, --html writes a one-scene report (with or without OUT.png).
    """
    from ..errors import UserError
    from ..files import atomic_output, check_output, write_errors
    from ..preview import PreviewWindow, render_preview, write_html_report

    band_list = None
    if bands:
        try:
            band_list = [int(b) for b in bands.split(",")]
        except ValueError:
            raise UserError(f"--bands must be comma-separated band numbers, got {bands!r}") \
                from None
    win = PreviewWindow.parse(window) if window else None
    folder = os.path.isdir(input_path)
    if folder and output:
        raise UserError("INPUT is a folder: write a report with --html OUT.html "
                        "instead of OUT.png")
    if not output and not html_out:
        raise UserError("give OUT.png, --html OUT.html, or both")
    check_not_inputs({"input": input_path, "--refined map": refined, "--coarse map": coarse,
                      "--truth": truth}, {"preview": output, "HTML report": html_out})
    for path in (output, html_out):
        if path:
            check_output(path, overwrite)
    opts = dict(window=win, bands=band_list, alpha=alpha, class_field=class_field)
    with contextlib.ExitStack() as stack:
        if output:
            img = render_preview(input_path, refined, coarse=coarse, truth=truth,
                                 max_size=max_size, **opts)
            tmp = stack.enter_context(atomic_output(output, overwrite))
            with write_errors(output):
                img.save(tmp, format="PNG", optimize=False)
        if html_out:
            write_html_report(input_path, html_out, refined=refined, coarse=coarse, truth=truth,
                              max_size=max_size, overwrite=overwrite, k=k, **opts)
        # the PNG is renamed into place only now: a failed report leaves neither file
    for path in (output, html_out):
        if path and not quiet:
            click.echo(f"wrote {path}")

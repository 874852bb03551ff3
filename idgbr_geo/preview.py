"""PNG previews and small HTML reports: see at a glance what refinement did.

A preview is the image (percentile contrast stretch, any band count and dtype) with the
class maps' boundaries drawn on top: coarse, refined and truth in different colours, refined
classes lightly tinted, and a legend. The whole scene is read already downsampled (rasterio
``out_shape``), so memory never exceeds the preview size; a ``window`` crop is shown at full
resolution (downsampled only if larger than ``max_size``).
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import os
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .cards import DEFAULT_COLORS, hex_to_rgb
from .errors import InputError
from .evaluate import (
    DEFAULT_CLASS_FIELD,
    RASTER_SUFFIXES,
    VECTOR_SUFFIXES,
    VectorTruth,
    format_table,
    is_vector,
    open_class_raster,
    raster_class_names,
    score_scene,
)
from .files import atomic_output, check_distinct, check_output, read_errors, write_errors
from .metrics import DEFAULT_K, MetricAccumulator, default_class_names
from .rasters import check_same_grid, open_raster

#: boundary line colours (drawn truth first, then coarse, refined on top)
LINE_COLORS = {"truth": "#00e5ff", "coarse": "#ff2d55", "refined": "#ffd60a"}
#: percentile stretch of the image
STRETCH_PERCENTILES = (2.0, 98.0)
DEFAULT_MAX_SIZE = 1600
#: previews smaller than this (px) are enlarged by an integer factor, at most MAX_ZOOM
MIN_SIDE = 512
MAX_ZOOM = 8


@dataclass(frozen=True)
class PreviewWindow:
    """A crop in pixels of the input: column/row offset, width, height."""

    col_off: int
    row_off: int
    width: int
    height: int

    @classmethod
    def parse(cls, text: str) -> PreviewWindow:
        try:
            parts = [int(v) for v in text.split(",")]
        except ValueError:
            parts = []
        if len(parts) != 4 or parts[0] < 0 or parts[1] < 0 or parts[2] < 1 or parts[3] < 1:
            raise InputError(f"$window must be col_off,row_off,width,height (>= 0, sizes "
                             f">= 1), got {text!r}", options=["window"])
        return cls(*parts)


def _font(size: int = 14) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def stretch(data: np.ndarray, valid: np.ndarray,
            percentiles: tuple[float, float] = STRETCH_PERCENTILES) -> np.ndarray:
    """Per-band percentile stretch of (bands, H, W) to uint8; invalid pixels become 0."""
    out = np.zeros(data.shape, np.uint8)
    for i, band in enumerate(data.astype(np.float64)):
        ok = valid & np.isfinite(band)
        if not ok.any():
            continue
        lo, hi = np.percentile(band[ok], percentiles)
        if hi <= lo:
            hi = lo + 1.0
        scaled = np.clip((band - lo) / (hi - lo), 0, 1) * 255
        out[i] = np.where(ok, np.nan_to_num(scaled), 0).astype(np.uint8)
    return out


def _display_bands(ds: Any, bands: Sequence[int] | None) -> list[int]:
    if bands:
        bad = [b for b in bands if not 1 <= b <= ds.count]
        if bad:
            raise InputError(f"band {bad[0]} does not exist (the image has {ds.count})")
        if len(bands) not in (1, 3):
            raise InputError("$bands takes 1 (grey) or 3 (red,green,blue) band numbers",
                             options=["bands"])
        return list(bands)
    from rasterio.enums import ColorInterp

    ci = list(ds.colorinterp)
    rgb = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
    if all(c in ci for c in rgb):
        return [ci.index(c) + 1 for c in rgb]
    return [1, 2, 3] if ds.count >= 3 else [1]


def boundaries(labels: np.ndarray, nodata: int = 255) -> np.ndarray:
    """Thin (1 px) class boundaries of a label map; edges with nodata are not drawn."""
    b = np.zeros(labels.shape, bool)
    ok = labels != nodata
    right = (labels[:, :-1] != labels[:, 1:]) & ok[:, :-1] & ok[:, 1:]
    down = (labels[:-1] != labels[1:]) & ok[:-1] & ok[1:]
    b[:, :-1] |= right
    b[:-1, :] |= down
    return b


class _Grid:
    """The preview grid: a window of the input read at (height, width) pixels."""

    def __init__(self, ds: Any, window: PreviewWindow | None, max_size: int) -> None:
        from rasterio.windows import Window
        from rasterio.windows import transform as win_transform

        if window is None:
            self.win = Window(0, 0, ds.width, ds.height)
        else:
            if (window.col_off + window.width > ds.width
                    or window.row_off + window.height > ds.height):
                raise InputError(f"$window {window.col_off},{window.row_off},{window.width},"
                                 f"{window.height} extends beyond the image "
                                 f"({ds.width}x{ds.height})", options=["window"])
            self.win = Window(window.col_off, window.row_off, window.width, window.height)
        scale = max(1.0, max(self.win.width, self.win.height) / max(1, max_size))
        self.width = max(1, round(self.win.width / scale))
        self.height = max(1, round(self.win.height / scale))
        self.scale = self.win.width / self.width
        from affine import Affine

        self.transform = win_transform(self.win, ds.transform) @ Affine.scale(
            self.win.width / self.width, self.win.height / self.height)
        self.crs = ds.crs

    def read_labels(self, ds: Any, what: str) -> np.ndarray:
        from rasterio.enums import Resampling

        with read_errors(ds.name, what):
            a = ds.read(1, window=self.win, out_shape=(self.height, self.width),
                        resampling=Resampling.nearest)
        a = a.astype(np.int64)
        if ds.nodata is not None and np.isfinite(ds.nodata):
            a[a == int(ds.nodata)] = 255
        return a


def _read_truth(path: str | os.PathLike[str], grid: _Grid, ref: Any, names: Sequence[str],
                class_field: str) -> np.ndarray:
    if is_vector(path):
        # VectorTruth rasterizes onto its reference's grid: give it the preview grid
        target = SimpleNamespace(crs=grid.crs, transform=grid.transform)
        return VectorTruth(path, target, names, class_field)(0, 0, grid.height, grid.width)
    with open_class_raster(path, "TRUTH") as ds:
        check_same_grid(ref, ds, "TRUTH")
        return grid.read_labels(ds, "TRUTH")


def render_preview(
    image: str | os.PathLike[str],
    refined: str | os.PathLike[str],
    *,
    coarse: str | os.PathLike[str] | None = None,
    truth: str | os.PathLike[str] | None = None,
    window: PreviewWindow | str | None = None,
    max_size: int = DEFAULT_MAX_SIZE,
    bands: Sequence[int] | None = None,
    alpha: float = 0.3,
    class_field: str = DEFAULT_CLASS_FIELD,
    title: str | None = None,
    zoom: int | None = None,
) -> Image.Image:
    """The preview as a Pillow image (image + boundaries + legend).

    ``zoom`` enlarges the drawn map by an integer factor (default: enough to bring small
    crops to about :data:`MIN_SIDE` px, at most :data:`MAX_ZOOM`).
    """
    from rasterio.enums import Resampling

    if isinstance(window, str):
        window = PreviewWindow.parse(window)
    with ExitStack() as stack:
        img_ds = stack.enter_context(_open_image(image))
        ref_ds = stack.enter_context(open_class_raster(refined, "REFINED"))
        _same_grid(img_ds, ref_ds, "REFINED")
        grid = _Grid(img_ds, window, max_size)
        idx = _display_bands(img_ds, bands)
        with read_errors(img_ds.name, "INPUT"):
            data = img_ds.read(idx, window=grid.win,
                               out_shape=(len(idx), grid.height, grid.width),
                               resampling=Resampling.average if grid.scale > 1 else
                               Resampling.nearest)
            valid = img_ds.dataset_mask(window=grid.win,
                                        out_shape=(grid.height, grid.width)) > 0
        rgb = stretch(data, valid)
        rgb = np.repeat(rgb, 3, axis=0) if rgb.shape[0] == 1 else rgb
        canvas = np.moveaxis(rgb, 0, -1).astype(np.float64)

        names = raster_class_names(ref_ds)
        labels = grid.read_labels(ref_ds, "REFINED")
        if names is None:
            top = int(labels[labels != 255].max(initial=0))
            names = default_class_names(max(top + 1, 2))
        colors = _class_colors(ref_ds, len(names))
        if alpha > 0:
            for c, color in enumerate(colors):
                if color.lower() == "#000000" or names[c] == "background":
                    continue
                m = labels == c
                canvas[m] = (1 - alpha) * canvas[m] + alpha * np.array(hex_to_rgb(color))
        layers: list[tuple[str, np.ndarray]] = []
        if truth is not None:
            layers.append(("truth", _read_truth(truth, grid, ref_ds, names, class_field)))
        if coarse is not None:
            with open_class_raster(coarse, "COARSE") as cds:
                _same_grid(img_ds, cds, "COARSE")
                layers.append(("coarse", grid.read_labels(cds, "COARSE")))
        layers.append(("refined", labels))
        out = canvas.astype(np.uint8)
        for name, lab in layers:
            out[boundaries(lab)] = hex_to_rgb(LINE_COLORS[name])
        # small crops are enlarged by an integer factor (nearest: every pixel stays visible)
        if zoom is None:
            zoom = max(1, min(MAX_ZOOM, MIN_SIDE // max(out.shape[:2])))
        if zoom > 1:
            out = np.repeat(np.repeat(out, zoom, axis=0), zoom, axis=1)
        if title is None:
            where = ("whole scene" if window is None else
                     f"window {window.col_off},{window.row_off},{window.width},{window.height}")
            scale = f"1:{grid.scale:.3g}" if zoom == 1 else f"{zoom}x"
            title = f"{Path(image).name}  ({where}, {scale})"
        shown = [(n, c) for n, c in zip(names, colors, strict=True)
                 if alpha > 0 and c.lower() != "#000000" and n != "background"]
        return _with_legend(Image.fromarray(out, "RGB"), title,
                            [name for name, _ in layers], shown)


def _open_image(path: str | os.PathLike[str]) -> Any:
    """:func:`~idgbr_geo.rasters.open_raster`, with a hint for folders (a report)."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"INPUT {p} is a folder, not a raster (folders of scenes make an "
                         "HTML report)")
    return open_raster(p, "INPUT")


def _same_grid(img_ds: Any, ds: Any, what: str) -> None:
    """Class maps must lie on the image's grid (the engine writes them so)."""
    check_same_grid(img_ds, ds, what, ref_what="INPUT")


def _class_colors(ds: Any, n: int) -> list[str]:
    import json

    tag = ds.tags().get("IDGBR_COLORS")
    try:
        colors = json.loads(tag) if tag else None
    except json.JSONDecodeError:
        colors = None
    if isinstance(colors, list) and len(colors) >= n and all(
            isinstance(c, str) and c.startswith("#") and len(c) == 7 for c in colors):
        return colors[:n]
    return [DEFAULT_COLORS[i % len(DEFAULT_COLORS)] for i in range(n)]


def _with_legend(img: Image.Image, title: str, lines: Sequence[str],
                 classes: Sequence[tuple[str, str]]) -> Image.Image:
    """Append a legend strip (title, line colours, tinted classes) below the preview."""
    font, small = _font(15), _font(13)
    entries: list[tuple[str, str, str]] = [("line", LINE_COLORS[n], n) for n in lines]
    entries += [("fill", c, n) for n, c in classes]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widths = [28 + int(probe.textlength(label, font=small)) + 18 for _, _, label in entries]
    width = max(img.width, 360, int(probe.textlength(title, font=font)) + 20)
    rows, x = 1, 10
    for w in widths:
        if x + w > width - 10:
            rows, x = rows + 1, 10
        x += w
    legend_h = 30 + 24 * rows
    out = Image.new("RGB", (width, img.height + legend_h), (24, 24, 24))
    out.paste(img, (0, 0))
    draw = ImageDraw.Draw(out)
    y0 = img.height + 6
    draw.text((10, y0), title, fill=(235, 235, 235), font=font)
    x, y = 10, y0 + 24
    for (kind, color, label), w in zip(entries, widths, strict=True):
        if x + w > width - 10:
            x, y = 10, y + 24
        rgb = hex_to_rgb(color)
        if kind == "line":
            draw.line([(x, y + 8), (x + 20, y + 8)], fill=rgb, width=3)
        else:
            draw.rectangle([x + 2, y + 1, x + 18, y + 15], fill=rgb, outline=(200, 200, 200))
        draw.text((x + 28, y), label, fill=(235, 235, 235), font=small)
        x += w
    return out


def _check_not_input(output: str | os.PathLike[str], what: str,
                     scenes: Sequence[dict[str, Any]]) -> None:
    """Refuse, with or without overwrite, an output that is one of the files it shows."""
    opts = {"image": "input", "refined": "$refined map", "coarse": "$coarse map",
            "truth": "$truth"}
    for s in scenes:
        check_distinct({label: s.get(key) for key, label in opts.items()}, {what: output})


def write_preview(image: str | os.PathLike[str], output: str | os.PathLike[str], *,
                  refined: str | os.PathLike[str], overwrite: bool = False,
                  **kwargs: Any) -> Path:
    """Render :func:`render_preview` and save it as PNG atomically."""
    _check_not_input(output, "preview", [{"image": image, "refined": refined,
                                          "coarse": kwargs.get("coarse"),
                                          "truth": kwargs.get("truth")}])
    check_output(output, overwrite)
    img = render_preview(image, refined, **kwargs)
    with atomic_output(output, overwrite) as tmp, write_errors(output):
        img.save(tmp, format="PNG", optimize=False)
    return Path(output)


class _TextOut:
    """A text file whose write failures (disk full, ...) are one :class:`OutputError`
    naming the user's output; only the writes are covered, not the work between them."""

    def __init__(self, path: Path, name: str | os.PathLike[str]) -> None:
        self.name = name
        with write_errors(name):
            self.f = open(path, "w", encoding="utf-8")  # closed in __exit__

    def write(self, text: str) -> None:
        with write_errors(self.name):
            self.f.write(text)

    def __enter__(self) -> _TextOut:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:  # the first error is the one to tell
            with contextlib.suppress(OSError):
                self.f.close()
            return
        with write_errors(self.name):
            self.f.close()


def _png_base64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _stems(folder: Path, suffixes: set[str], what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise InputError(f"{what} {folder} is not a folder (INPUT is a folder)",
                         options=[what[1:]] if what.startswith("$") else [])
    return {p.stem: p for p in sorted(folder.iterdir())
            if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith(".")}


def match_scenes(images: str | os.PathLike[str], refined: str | os.PathLike[str],
                 coarse: str | os.PathLike[str] | None = None,
                 truth: str | os.PathLike[str] | None = None,
                 ) -> list[dict[str, Path | None]]:
    """Scenes of a folder report, matched by file name without suffix.

    A single INPUT file gives one scene with the given REFINED/COARSE/TRUTH files.
    """
    if not Path(images).is_dir():
        return [{"name": Path(images).stem, "image": Path(images), "refined": Path(refined),
                 "coarse": Path(coarse) if coarse else None,
                 "truth": Path(truth) if truth else None}]
    imgs = _stems(Path(images), RASTER_SUFFIXES, "INPUT")
    refs = _stems(Path(refined), RASTER_SUFFIXES, "$refined")
    coarses = _stems(Path(coarse), RASTER_SUFFIXES, "$coarse") if coarse else {}
    truths = _stems(Path(truth), RASTER_SUFFIXES | VECTOR_SUFFIXES, "$truth") if truth else {}
    scenes = [{"name": n, "image": p, "refined": refs[n], "coarse": coarses.get(n),
               "truth": truths.get(n)} for n, p in imgs.items() if n in refs]
    if not scenes:
        raise InputError(f"no image in {images} has a refined map of the same name in "
                         f"{refined}")
    return scenes


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;background:#fafafa;color:#222}
img{max-width:100%;border:1px solid #ccc}pre{background:#fff;border:1px solid #ddd;
padding:.8em;overflow-x:auto;font-size:13px}section{margin-bottom:3em}"""


def write_html_report(
    images: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    refined: str | os.PathLike[str],
    coarse: str | os.PathLike[str] | None = None,
    truth: str | os.PathLike[str] | None = None,
    max_size: int = 1024,
    overwrite: bool = False,
    k: float = DEFAULT_K,
    class_field: str = DEFAULT_CLASS_FIELD,
    **kwargs: Any,
) -> Path:
    """A self-contained HTML report: per scene a preview (base64 PNG) and, when a truth
    is given, the evaluate table; then the pooled table over all scenes."""
    _check_not_input(output, "HTML report", [{"image": images, "refined": refined,
                                              "coarse": coarse, "truth": truth}])
    check_output(output, overwrite)
    scenes = match_scenes(images, refined, coarse, truth)
    _check_not_input(output, "HTML report", scenes)  # the files of a folder report
    pooled: MetricAccumulator | None = None
    with atomic_output(output, overwrite) as tmp, _TextOut(tmp, output) as f:
        f.write("<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
                f"<title>idgbr-geo report</title><style>{_CSS}</style></head><body>\n"
                f"<h1>idgbr-geo report: {html.escape(str(images))}</h1>\n"
                f"<p>{len(scenes)} scene(s). Lines: "
                + ", ".join(f"<b style='color:{c}'>{n}</b>" for n, c in LINE_COLORS.items())
                + ".</p>\n")
        for s in scenes:
            img = render_preview(s["image"], s["refined"], coarse=s["coarse"],
                                 truth=s["truth"], max_size=max_size,
                                 class_field=class_field, **kwargs)
            f.write(f"<section><h2>{html.escape(str(s['name']))}</h2>\n"
                    f"<img alt='{html.escape(str(s['name']))}' "
                    f"src='data:image/png;base64,{_png_base64(img)}'>\n")
            if s["truth"] is not None:
                acc = score_scene(s["refined"], s["truth"], coarse=s["coarse"],
                                  class_field=class_field,
                                  fallback_classes=pooled.classes if pooled else None)
                f.write(f"<pre>{html.escape(format_table(acc.result(k)))}</pre>\n")
                if pooled is None:
                    pooled = MetricAccumulator(acc.classes, with_coarse=acc.coarse is not None)
                if acc.classes == pooled.classes and (acc.coarse is None) == (
                        pooled.coarse is None):
                    pooled.merge(acc)
            f.write("</section>\n")
        if pooled is not None and len(scenes) > 1:
            f.write("<section><h2>All scenes (pixels pooled)</h2>\n"
                    f"<pre>{html.escape(format_table(pooled.result(k)))}</pre></section>\n")
        f.write("<p>Metrics: IoU, F1, boundary F at 1/2/3 px, Boundary IoU (3 px band), "
                "IDGBR boundary weighted F-measure (3 px band), class accuracy; IoU_imp = "
                f"IoU(coarse false region) - k(1 - IoU(coarse true region)), k = {k:g}."
                "</p>\n</body></html>\n")
    return Path(output)


__all__ = [
    "PreviewWindow", "boundaries", "match_scenes", "render_preview", "stretch",
    "write_html_report", "write_preview",
]

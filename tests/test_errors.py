"""One error path for every command: corrupt inputs, failed writes, SIGTERM, and the CLI's
last resort all end in one ``Error:`` line (or a clean interrupt), never a traceback, and
leave no output and no temporary file behind."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import click
import numpy as np
import pytest
import rasterio
from click.testing import CliRunner
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from synth import class_blobs, synthetic_scene, write_raster

from idgbr_geo.cli import main
from idgbr_geo.cli._common import Terminated, user_errors
from idgbr_geo.errors import InputError, OutputError, UserError
from idgbr_geo.files import atomic_output, output_name, remove_stale_partials, temporary_path

CLASSES = ["background", "building"]


def class_raster(path: Path, seed: int = 0, shape: tuple[int, int] = (64, 80)) -> Path:
    """A tiled, compressed class raster with the tags refine writes."""
    write_raster(path, class_blobs(shape, seed), nodata=255, tiled=True, blockxsize=16,
                 blockysize=16, compress="deflate")
    with rasterio.open(path, "r+") as ds:
        ds.update_tags(IDGBR_CLASSES=json.dumps(CLASSES),
                       IDGBR_COLORS=json.dumps(["#000000", "#ff0000"]))
    return path


def corrupt_blocks(path: Path) -> Path:
    """Garble the compressed data of the first block of every band: the file still opens
    (header and index intact) but reading fails, as with a damaged download."""
    with rasterio.open(path) as ds:
        offsets = [int(ds.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=b)) for b in ds.indexes]
    data = bytearray(path.read_bytes())
    for off in offsets:
        data[off:off + 12] = b"\xff" * 12
    path.write_bytes(bytes(data))
    return path


def assert_one_error(res, must: str, folder: Path, code: int | None = 2) -> None:
    """Exit non-zero with exactly one ``Error:`` line (and nothing else on stderr), no
    traceback, and nothing left in ``folder``."""
    assert res.exit_code != 0 and (code is None or res.exit_code == code), res.output
    assert isinstance(res.exception, SystemExit), res.exception  # not a traceback
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    assert must.lower() in lines[0].lower(), lines[0]
    assert not list(folder.iterdir()), list(folder.iterdir())


def probabilities(f: SimpleNamespace) -> Path:
    """A uint8 probabilities raster for ``f.refined`` (one band per class)."""
    with rasterio.open(f.refined) as ds:
        ids = ds.read(1)
    p = np.stack([255 - ids * 200, ids * 200]).astype(np.uint8)
    return write_raster(f.out.parent / "prob.tif", p, tiled=True, blockxsize=16,
                        blockysize=16, compress="deflate")


@pytest.fixture
def files(tmp_path: Path) -> SimpleNamespace:
    """An image, a refined map, a truth map (same grid) and an empty output folder."""
    out = tmp_path / "out"
    out.mkdir()
    return SimpleNamespace(
        image=write_raster(tmp_path / "img.tif", synthetic_scene(64, 80), tiled=True,
                           blockxsize=16, blockysize=16, compress="deflate"),
        refined=class_raster(tmp_path / "ref.tif", 1),
        truth=class_raster(tmp_path / "truth.tif", 2),
        out=out)


# ------------------------------------------------------------------- corrupt inputs (item 7)
@pytest.mark.parametrize("case", ["vectorize", "evaluate_pred", "evaluate_truth",
                                  "evaluate_coarse", "preview_image", "preview_refined",
                                  "preview_truth", "vectorize_probabilities"])
def test_corrupt_raster_is_one_error_line(files, case):
    """A raster that opens but whose pixels cannot be read (truncated, damaged) is one
    line naming the file in every command, as in refine; no output is left."""
    f, o = files, files.out
    bad = corrupt_blocks(class_raster(f.out.parent / "bad.tif", 3))
    args = {
        "vectorize": ["vectorize", bad, o / "v.gpkg", "-q"],
        "vectorize_probabilities": ["vectorize", f.refined, o / "v.gpkg", "-q",
                                    "--probabilities", corrupt_blocks(probabilities(f))],
        "evaluate_pred": ["evaluate", bad, f.truth, "-o", o / "e.json", "--quiet"],
        "evaluate_truth": ["evaluate", f.refined, bad, "-o", o / "e.json", "--quiet"],
        "evaluate_coarse": ["evaluate", f.refined, f.truth, "--coarse", bad, "-o",
                            o / "e.json", "--quiet"],
        "preview_image": ["preview", corrupt_blocks(f.image), o / "p.png", "--refined",
                          f.refined, "--html", o / "r.html"],
        "preview_refined": ["preview", f.image, o / "p.png", "--refined", bad],
        "preview_truth": ["preview", f.image, o / "p.png", "--refined", f.refined,
                          "--truth", bad, "--html", o / "r.html"],
    }[case]
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert_one_error(res, "failed to read", o)
    assert any(f"{name}.tif:" in res.stderr for name in ("bad", "img", "prob"))


def test_corrupt_raster_is_an_input_error_in_the_library(files):
    from idgbr_geo.evaluate import evaluate_scene
    from idgbr_geo.preview import render_preview
    from idgbr_geo.vectorize import vectorize_layers

    bad = corrupt_blocks(class_raster(files.out.parent / "bad.tif", 3))
    with pytest.raises(InputError, match="failed to read class raster"):
        vectorize_layers(bad)
    with pytest.raises(InputError, match="failed to read PRED"):
        evaluate_scene(bad, files.truth)
    with pytest.raises(InputError, match="failed to read REFINED"):
        render_preview(files.image, bad)


def test_absurd_georeferencing_is_one_error_line(tmp_path):
    """A transform whose centre lies far outside the CRS's world (a corrupt GeoTIFF tag)
    has no ground size: one line, not a numpy warning and a division by NaN."""
    path = write_raster(tmp_path / "c.tif", class_blobs((40, 48), 0), origin=(500000.0, 1e54))
    out = tmp_path / "out"
    out.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = CliRunner().invoke(main, ["vectorize", str(path), str(out / "v.gpkg"), "-q"])
    assert_one_error(res, "georeferencing", out)


def test_vector_errors_of_refine_name_the_input_not_a_temporary(tmp_path, toy_model):
    """refine --vector checks before the run that its polygons can be placed: the message
    names the input that lacks a CRS, never the hidden temporary raster."""
    img = write_raster(tmp_path / "nocrs.tif", synthetic_scene(40, 48), crs=None)
    out = tmp_path / "out"
    out.mkdir()
    res = CliRunner().invoke(main, ["refine", str(img), str(out / "o.tif"), "-m",
                                    str(toy_model), "-q", "--vector", str(out / "o.gpkg")])
    assert_one_error(res, "nocrs.tif has no CRS", out)
    assert ".partial" not in res.stderr


# -------------------------------------------------------------------- write errors (item 8)
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _gdal_write_failed(*args, **kwargs):
    try:
        raise OSError(errno.ENOSPC, "TIFFAppendToStrip:Write error at scanline 0")
    except OSError as exc:
        raise RasterioIOError("Write failed. See previous exception for details.") from exc


@pytest.mark.parametrize("failure", [_enospc, _gdal_write_failed])
@pytest.mark.parametrize("probabilities", [False, True])
def test_refine_write_failure_is_one_error_line(files, toy_model, monkeypatch, failure,
                                                probabilities):
    """Disk full while GDAL writes a strip: one line naming the output (not its hidden
    temporary), exit non-zero, and neither the outputs nor a temporary are left."""
    monkeypatch.setattr(rasterio.io.DatasetWriter, "write", failure)
    o = files.out
    args = ["refine", str(files.image), str(o / "o.tif"), "-m", str(toy_model), "-q"]
    if probabilities:
        args += ["--probabilities", str(o / "p.tif")]
    res = CliRunner().invoke(main, args)
    assert_one_error(res, f"cannot write {o / 'o.tif'}", o)
    assert ".partial" not in res.stderr


def test_refine_cannot_create_the_output(files, toy_model, monkeypatch):
    """The folder became unwritable after the checks (GDAL cannot create the file)."""
    real_open = rasterio.open

    def refuse_writes(path, mode="r", *args, **kwargs):
        if mode == "w":
            raise RasterioIOError(f"Attempt to create new tiff file `{path}' failed: "
                                  "Permission denied")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(rasterio, "open", refuse_writes)
    res = CliRunner().invoke(main, ["refine", str(files.image), str(files.out / "o.tif"),
                                    "-m", str(toy_model), "-q"])
    assert_one_error(res, "cannot write", files.out)


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file size limits")
@pytest.mark.parametrize("short_by", [300, 4000, None])
def test_refine_on_a_full_disk_in_a_real_process(tmp_path, toy_model, short_by):
    """A real write failure from the OS (a file size limit, like a full disk), also one
    GDAL only meets when it closes the file (the last blocks, the block index): GDAL then
    reports nothing to Python, and the old code renamed a truncated GeoTIFF into place
    and exited 0. Now: non-zero exit, one ``Error:`` line, nothing left."""
    img = write_raster(tmp_path / "img.tif", synthetic_scene(600, 700, seed=1))
    ok = tmp_path / "ok"
    ok.mkdir()
    res = CliRunner().invoke(main, ["refine", str(img), str(ok / "o.tif"), "-m",
                                    str(toy_model), "-q"])
    assert res.exit_code == 0, res.output
    limit = 3000 if short_by is None else (ok / "o.tif").stat().st_size - short_by
    out = tmp_path / "out"
    out.mkdir()
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
            "from idgbr_geo.cli import main; main()")
    p = subprocess.run([sys.executable, "-c", code, "refine", str(img), str(out / "o.tif"),
                        "-m", str(toy_model), "-q"], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode != 0, p.stderr
    assert "Traceback" not in p.stderr
    ours = [ln for ln in p.stderr.splitlines() if ln.startswith(("Error", "Warning"))]
    assert len(ours) == 1 and ours[0].startswith(f"Error: cannot write {out / 'o.tif'}"), \
        p.stderr  # (libtiff itself may print "_tiffWriteProc: File too large." first)
    assert not list(out.iterdir())


def test_preview_png_write_failure(files, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image.Image, "save", _enospc)
    res = CliRunner().invoke(main, ["preview", str(files.image), str(files.out / "p.png"),
                                    "--refined", str(files.refined)])
    assert_one_error(res, f"cannot write {files.out / 'p.png'}: No space left", files.out)


def test_html_report_write_failure(files, monkeypatch):
    import idgbr_geo.preview as preview

    class Full:
        def __init__(self, *args, **kwargs):
            self.f = open(*args, **kwargs)  # noqa: SIM115

        def write(self, text):
            _enospc()

        def close(self):
            self.f.close()

    monkeypatch.setattr(preview, "open", Full, raising=False)
    res = CliRunner().invoke(main, ["preview", str(files.image), "--refined",
                                    str(files.refined), "--html", str(files.out / "r.html")])
    assert_one_error(res, f"cannot write {files.out / 'r.html'}", files.out)


def test_evaluate_json_write_failure(files, monkeypatch):
    monkeypatch.setattr(Path, "write_text", _enospc)
    res = CliRunner().invoke(main, ["evaluate", str(files.refined), str(files.truth), "-o",
                                    str(files.out / "e.json"), "--quiet"])
    assert_one_error(res, f"cannot write {files.out / 'e.json'}", files.out)


def test_folder_made_read_only_before_the_rename(files, monkeypatch):
    """The final rename fails (folder made read-only during the run): one line."""
    import idgbr_geo.files as files_mod

    def refuse(src, dst):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dst))

    monkeypatch.setattr(files_mod.os, "replace", refuse)
    res = CliRunner().invoke(main, ["evaluate", str(files.refined), str(files.truth), "-o",
                                    str(files.out / "e.json"), "--quiet"])
    assert_one_error(res, f"cannot write {files.out / 'e.json'}: Permission denied",
                     files.out)


def test_failed_report_leaves_no_png(files, monkeypatch):
    """preview OUT.png --html OUT.html: when the report fails, the PNG is not left either."""
    import idgbr_geo.preview as preview

    def fail(*args, **kwargs):
        raise InputError("TRUTH is broken")

    monkeypatch.setattr(preview, "score_scene", fail)
    res = CliRunner().invoke(main, ["preview", str(files.image), str(files.out / "p.png"),
                                    "--refined", str(files.refined), "--truth",
                                    str(files.truth), "--html", str(files.out / "r.html")])
    assert_one_error(res, "TRUTH is broken", files.out)


def test_output_name_maps_temporaries_back():
    out = Path("/data/scene.v2.tif")
    assert output_name(temporary_path(out)) == out
    assert output_name(temporary_path(Path("noext"))) == Path("noext")
    assert output_name(out) == out


# ------------------------------------------------------------ SIGTERM and stale partials (11)
@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_sigterm_cleans_up_like_ctrl_c(tmp_path, toy_model):
    """SIGTERM during a refine: exit 143 with one line, and no temporary file is left."""
    img = write_raster(tmp_path / "big.tif", synthetic_scene(3000, 3000, seed=4))
    out = tmp_path / "out"
    out.mkdir()
    p = subprocess.Popen([sys.executable, "-c", "from idgbr_geo.cli import main; main()",
                          "refine", str(img), str(out / "o.tif"), "-m", str(toy_model), "-q",
                          "--probabilities", str(out / "p.tif")],
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob(".o.partial-*")) and time.monotonic() < deadline:
            assert p.poll() is None, p.stderr.read() if p.stderr else ""
            time.sleep(0.02)
        time.sleep(0.3)  # well inside the run
        p.send_signal(signal.SIGTERM)
        err = p.communicate(timeout=120)[1]
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143, err
    assert err.strip() == "Terminated.", err
    assert not list(out.iterdir())


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signal handlers live in the main thread")
def test_terminated_is_reported_like_an_interrupt():
    """The handler is installed only while a command runs, and restored after it."""

    @click.command()
    @user_errors
    def cmd() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends

    before = signal.getsignal(signal.SIGTERM)
    res = CliRunner().invoke(cmd, [])
    assert res.exit_code == 143 and res.stderr.strip() == "Terminated."
    assert signal.getsignal(signal.SIGTERM) == before  # restored after the command


def test_stale_partials_of_the_same_output_are_swept(tmp_path):
    """A killed run's temporaries of this output go; other outputs' stay."""
    stale = [".o.partial-0123abcd.json", ".o.partial-0123abcd.json-journal",
             ".o.partial-89abcdef.json.aux.xml"]
    keep = [".o.partial-0123abcd.gpkg", ".other.partial-0123abcd.json", "o.partial.json",
            ".o.partial-nothex00.json"]
    for name in stale + keep:
        (tmp_path / name).write_text("x")
    with atomic_output(tmp_path / "o.json") as tmp:
        tmp.write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep + ["o.json"])
    assert remove_stale_partials(tmp_path / "o.json") == 0


def test_refine_sweeps_a_killed_runs_partials(files, toy_model):
    stale = files.out / ".o.partial-deadbeef.tif"
    stale.write_bytes(b"II*\x00 half a GeoTIFF")
    (files.out / ".o.partial-deadbeef.tif.aux.xml").write_text("<x/>")
    res = CliRunner().invoke(main, ["refine", str(files.image), str(files.out / "o.tif"),
                                    "-m", str(toy_model), "-q"])
    assert res.exit_code == 0, res.output
    assert [p.name for p in files.out.iterdir()] == ["o.tif"]


# ------------------------------------------------------------------- the CLI's last resort
def _command(exc: BaseException | None = None, warn: Warning | None = None):
    @click.command()
    @user_errors
    def cmd() -> None:
        if warn is not None:
            warnings.warn(warn, stacklevel=1)
        if exc is not None:
            raise exc

    return cmd


@pytest.mark.parametrize(("exc", "code", "line"), [
    (UserError("bad option"), 2, "Error: bad option"),
    (OutputError("o.tif already exists"), 2, "Error: o.tif already exists"),
    (OSError(errno.ENOSPC, "No space left on device", "o.tif"), 1,
     "Error: [Errno 28] No space left on device: 'o.tif'"),
    (RasterioIOError("x.tif: TIFFReadDirectory: failed"), 1,
     "Error: x.tif: TIFFReadDirectory: failed"),
    (ValueError("boom\nsecond line"), 1,
     "Error: internal error (ValueError: boom); please report it (IDGBR_DEBUG=1 shows the "
     "traceback)"),
    (MemoryError(), 1, "Error: out of memory"),
    (KeyboardInterrupt(), 130, "Interrupted."),
    (Terminated(), 143, "Terminated."),
])
def test_every_exception_is_one_line(exc, code, line, monkeypatch):
    monkeypatch.delenv("IDGBR_DEBUG", raising=False)
    res = CliRunner().invoke(_command(exc), [])
    assert res.exit_code == code and isinstance(res.exception, SystemExit)
    assert res.stderr.splitlines() == [line]


def test_debug_shows_internal_errors(monkeypatch):
    monkeypatch.setenv("IDGBR_DEBUG", "1")
    res = CliRunner().invoke(_command(ValueError("boom")), [])
    assert isinstance(res.exception, ValueError)


def test_click_errors_pass_through():
    res = CliRunner().invoke(_command(click.BadParameter("nope")), [])
    assert res.exit_code == 2 and "Invalid value: nope" in res.stderr
    assert "internal error" not in res.stderr


def test_warnings_are_one_line():
    res = CliRunner().invoke(_command(warn=UserWarning("odd value range")), [])
    assert res.exit_code == 0 and res.stderr == "Warning: odd value range\n"
    res = CliRunner().invoke(_command(warn=NotGeoreferencedWarning("no transform")), [])
    assert res.exit_code == 0 and res.stderr == ""


def test_rasterio_message_decoding_failures_are_not_printed():
    """rasterio's Cython error callback cannot decode a GDAL message holding a corrupt
    file's non-UTF-8 bytes and prints it through sys.excepthook and sys.unraisablehook."""
    err = UnicodeDecodeError("utf-8", b"\xdf", 0, 1, "invalid continuation byte")

    @click.command()
    @user_errors
    def cmd() -> None:
        sys.excepthook(UnicodeDecodeError, err, None)
        sys.unraisablehook(SimpleNamespace(exc_type=UnicodeDecodeError, exc_value=err,
                                           exc_traceback=None, err_msg=None,
                                           object="rasterio._env.log_error"))
        raise InputError("in.tif is not a readable raster")

    res = CliRunner().invoke(cmd, [])
    assert res.stderr == "Error: in.tif is not a readable raster\n"


def test_user_errors_name_keyword_arguments_and_render_flags():
    """The library never names a CLI flag: ``str()`` shows the keyword argument, the CLI
    renders the same error with its flag; longer names are never eaten by shorter ones."""
    import pickle

    err = OutputError("o.tif already exists (pass $overwrite to replace it; $tile_size, $tile)",
                      options=["tile", "overwrite", "tile_size"])
    assert str(err) == "o.tif already exists (pass overwrite to replace it; tile_size, tile)"
    flags = err.render(lambda name: "--" + name.replace("_", "-"))
    assert flags == "o.tif already exists (pass --overwrite to replace it; --tile-size, --tile)"
    back = pickle.loads(pickle.dumps(err))  # (sent back from Dask workers)
    assert isinstance(back, OutputError) and back.render(str.upper).startswith("o.tif")
    assert "OVERWRITE" in back.render(str.upper)
    # a message without options is shown as it is, "$" and all
    assert str(UserError("costs $5")) == "costs $5"


def test_library_error_messages_never_name_a_cli_flag():
    """Every message of a UserError raised outside idgbr_geo/cli names options as ``$name``
    (rendered per caller), never as ``--flag``."""
    import ast
    import re

    root = Path(__file__).resolve().parent.parent / "idgbr_geo"
    #: owned elsewhere and still to be converted (issue 14): keep this list empty
    known: set[str] = set()
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] == "cli" or str(rel) in known:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", "").endswith("Error")
                    and node.args):
                continue
            texts = [n.value for n in ast.walk(node.args[0])
                     if isinstance(n, ast.Constant) and isinstance(n.value, str)]
            if any(re.search(r"(^|[\s(])--[a-z]", t) for t in texts):
                found.append(f"{rel}:{node.lineno}")
    assert not found, found


def test_device_and_config_errors_name_the_option_as_each_caller_spells_it():
    """The library says ``device`` / ``lr``; the CLI renders the same error with its flag."""
    import torch

    from idgbr_geo.config import split_config
    from idgbr_geo.registry import resolve_device

    flags = {"device": "--device", "lr": "--lr"}.__getitem__
    with pytest.raises(UserError) as info:
        split_config("coarse", {"lr": 0.1})
    assert str(info.value) == "config: 'lr' has its own option (lr), not a config key"
    assert "(--lr)" in info.value.render(flags)
    with pytest.raises(UserError) as info:
        resolve_device("tpu")
    assert str(info.value).startswith("unknown device 'tpu'")
    assert info.value.render(flags).startswith("unknown --device 'tpu'")
    if not torch.cuda.is_available():
        with pytest.raises(UserError) as info:
            resolve_device("cuda")
        assert info.value.render(flags).startswith("--device cuda was asked for but no CUDA")

"""Shared CLI plumbing: every failure becomes one ``Error: ...`` line on stderr, never a
traceback, and SIGTERM cleans up like Ctrl-C. Warnings (Python's and GDAL's) are one
``Warning: ...`` line each, or nothing with ``--quiet``.

Library errors name options as keyword arguments; here they name this command's flags
(:meth:`idgbr_geo.errors.UserError.render`).

Exit codes: 2 for a user error (bad input, option or output path), 1 for an I/O failure
(a file that cannot be read or written) or an internal error, 130 for Ctrl-C, 143 for
SIGTERM. An unexpected exception is a bug: it is reported on one line as an internal error
with its type, and ``IDGBR_DEBUG=1`` shows its traceback.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import click

from ..errors import UserError, first_line

F = TypeVar("F", bound=Callable[..., Any])


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: it unwinds like Ctrl-C, so every ``finally`` and
    :func:`idgbr_geo.files.atomic_output` removes its temporary files."""


def _raise_terminated(signum: int, frame: Any) -> None:
    # a second SIGTERM kills at once (the next run sweeps what is left)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While a command runs, SIGTERM raises :class:`Terminated` (main thread only: Python
    delivers signals there, and a command run from another thread keeps the default)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _show_warning(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
    click.echo(f"Warning: {message}", err=True)


@contextlib.contextmanager
def _one_line_warnings(quiet: bool) -> Iterator[None]:
    """Warnings as one ``Warning: ...`` line each instead of Python's two-line form with a
    source line, none at all when ``quiet``. Left out: rasterio's "not georeferenced" one
    (commands that need a CRS say so in their error) and deprecation warnings (meant for
    developers, not users)."""
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("default")  # whatever the caller's filters (a test's "error")
        for category in (NotGeoreferencedWarning, DeprecationWarning,
                         PendingDeprecationWarning):
            warnings.filterwarnings("ignore", category=category)
        if quiet:
            warnings.simplefilter("ignore")
        warnings.showwarning = _show_warning
        yield


#: rasterio's prefix of a GDAL message ("CPLE_AppDefined in a.tif: ", "CPLE_NotSupported:")
_GDAL_PREFIX = re.compile(r"^CPLE_\w+(?: in |:)\s*")


class _GdalWarnings(logging.Handler):
    """GDAL's warnings, as rasterio logs them, as one ``Warning: ...`` line each: the same
    message once, however often GDAL repeats it, and not again in rasterio's second form
    without the file name."""

    def __init__(self, quiet: bool) -> None:
        super().__init__(logging.WARNING)
        self.quiet = quiet
        self.seen: set[str] = set()
        self.cores: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno != logging.WARNING or self.quiet:
            return
        lines = _GDAL_PREFIX.sub("", record.getMessage().strip()).splitlines()
        if not lines:
            return
        text = lines[0]
        core = re.sub(r"^[^:\s]+\.\w+: ", "", text)  # without a leading "file.tif: "
        if text in self.seen or (core == text and core in self.cores):
            return
        self.seen.add(text)
        self.cores.add(core)
        click.echo(f"Warning: {text}", err=True)


@contextlib.contextmanager
def _gdal_messages(quiet: bool) -> Iterator[None]:
    """Run the command in a rasterio Env, so that GDAL's messages go to Python logging
    (outside one, GDAL prints ``Warning 1: ...`` straight to stderr), and show its
    warnings through :class:`_GdalWarnings`."""
    import rasterio

    logger = logging.getLogger("rasterio")
    handler = _GdalWarnings(quiet)
    logger.addHandler(handler)
    try:
        with rasterio.Env():
            yield
    finally:
        logger.removeHandler(handler)


def flag_names() -> Callable[[str], str]:
    """Keyword argument -> this command's flag (``tile_size`` -> ``--tile-size``); a name
    the command has no flag for stays as it is."""
    ctx = click.get_current_context(silent=True)
    flags: dict[str, str] = {}
    for param in ctx.command.params if ctx is not None else ():
        longs = [o for o in param.opts if o.startswith("--")]
        if isinstance(param, click.Option) and param.name and longs:
            flags[param.name] = longs[0]
    return lambda name: flags.get(name, name)


@contextlib.contextmanager
def _no_gdal_message_tracebacks() -> Iterator[None]:
    """Drop rasterio's failures to decode a GDAL message (a corrupt file's tag bytes in it
    are not UTF-8): its Cython error callback prints them through ``sys.excepthook`` and
    ``sys.unraisablehook`` as a stray traceback, while the open or read itself fails or
    succeeds on its own terms."""
    previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

    def unraisable(u: Any) -> None:
        if not (isinstance(u.exc_value, UnicodeDecodeError) and "rasterio" in repr(u.object)):
            previous_unraisable(u)

    def excepthook(kind: Any, value: Any, tb: Any) -> None:
        if not isinstance(value, UnicodeDecodeError):
            previous_except(kind, value, tb)

    sys.unraisablehook, sys.excepthook = unraisable, excepthook
    try:
        yield
    finally:
        sys.unraisablehook, sys.excepthook = previous_unraisable, previous_except


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def user_errors(func: F) -> F:
    """Decorate a click command so that nothing it raises shows a traceback.

    :class:`UserError` is the normal path (exit 2), its options named by this command's
    flags. As a last resort, a rasterio or OS error
    that escaped the library's own checks (a file that cannot be read or written) is one
    ``Error:`` line with exit 1, and any other exception one ``Error: internal error
    (Type: message)`` line with exit 1, so it is still seen and can be reported;
    ``IDGBR_DEBUG=1`` re-raises it with its traceback. Click's own exceptions pass through.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from rasterio.errors import RasterioError

        quiet = bool(kwargs.get("quiet"))
        try:
            with _sigterm_as_interrupt(), _one_line_warnings(quiet), _gdal_messages(quiet), \
                    _no_gdal_message_tracebacks():
                return func(*args, **kwargs)
        except UserError as exc:
            _fail(exc.render(flag_names()), 2)
        except Terminated:
            click.echo("Terminated.", err=True)
            sys.exit(128 + signal.SIGTERM)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)
        except (click.exceptions.ClickException, click.exceptions.Exit,
                click.exceptions.Abort):
            raise
        except Exception as exc:
            if os.environ.get("IDGBR_DEBUG"):
                raise
            if isinstance(exc, (RasterioError, OSError)):
                _fail(first_line(exc), 1)
            if isinstance(exc, MemoryError):
                _fail("out of memory", 1)
            _fail(f"internal error ({type(exc).__name__}: {first_line(exc)}); please "
                  "report it (IDGBR_DEBUG=1 shows the traceback)", 1)

    return wrapper  # type: ignore[return-value]

"""User-facing errors.

Anything a user can cause (bad path, wrong band count, existing output, ...) is raised as
:class:`UserError`; the CLI turns it into one line on stderr and a non-zero exit instead of a
traceback. Library callers can catch it like any other exception.

The library never names a command-line flag: a message that tells how to fix the problem
names the call's option as ``$name`` and lists it in ``options``. ``str(error)`` shows the
keyword argument (``pass overwrite to replace it``); the CLI renders the same error with its
own flag (``pass --overwrite to replace it``) through :meth:`UserError.render`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


class UserError(Exception):
    """An error caused by the user's input or options, reported as one clear line."""

    def __init__(self, message: str, *, options: Iterable[str] = ()) -> None:
        self.template = message
        self.options = tuple(options)
        super().__init__(self.render())

    def render(self, name: Callable[[str], str] | None = None) -> str:
        """The message with each ``$option`` spelt by ``name`` (default: as the keyword
        argument). Longest names first, so ``$tile`` never eats into ``$tile_size``."""
        text = self.template
        for opt in sorted(self.options, key=len, reverse=True):
            text = text.replace(f"${opt}", name(opt) if name is not None else opt)
        return text


class InputError(UserError):
    """The input raster (or vector) cannot be used."""


class OutputError(UserError):
    """The output cannot be written (exists, folder missing, not writable)."""


class IdgbrWarning(UserWarning):
    """Something the user should know while the run goes on (no CRS, values outside the
    model card's range, ...): the base of every warning idgbr-geo issues, so that a caller
    can filter them, and the tests can make them errors unless expected."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an error, for one-line messages. Prefers GDAL's own cause over
    rasterio's "see previous exception" wrapper text; the exception type when it is empty."""
    while exc.__cause__ is not None and "previous exception" in str(exc):
        exc = exc.__cause__
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__

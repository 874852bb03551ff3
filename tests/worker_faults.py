"""Test-only fault injection on Dask workers: a worker plugin that kills its worker process
once, part-way through a scene, as an out-of-memory kill or a lost machine would.

Workers unpickle the plugin by importing this module (tests/ is on their ``PYTHONPATH``, see
conftest.py); the scheduler installs it again on the workers that replace a killed one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

#: exit status of a worker killed on purpose
KILL_EXIT_CODE = 75


def claim(marker: str) -> bool:
    """Create ``marker``; False if it exists already (the kill happened, on any worker)."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


class KillWorkerOnce(WorkerPlugin):
    """The first scene whose file name contains ``token`` creates ``marker`` and kills its
    worker (``os._exit``) right after the first strip of its output has been written, so a
    partial output is left behind; later attempts (marker present) run normally."""

    name = "idgbr-test-kill-worker-once"

    def __init__(self, marker: str | os.PathLike[str], token: str = "kill-worker") -> None:
        self.marker, self.token = os.fspath(marker), token

    def setup(self, worker: Any) -> None:
        from idgbr_geo import engine, writing

        real = engine.refine_raster  # process_scene looks it up per call
        marker, token = self.marker, self.token

        def refine_raster(input: Any, output: Any, **kwargs: Any) -> Any:
            if token in Path(os.fspath(input)).name and claim(marker):
                write = writing.ResultWriter.write

                def write_then_die(self: Any, *args: Any, **kw: Any) -> None:
                    write(self, *args, **kw)
                    os._exit(KILL_EXIT_CODE)

                writing.ResultWriter.write = write_then_die  # type: ignore[method-assign]
            return real(input, output, **kwargs)

        engine.refine_raster = refine_raster  # type: ignore[assignment]

"""Process-wide tuning for long runs, opt-in: the CLI asks for it, a library call does not.

Both settings change the whole process (glibc's allocator, thread scheduling priorities),
so :func:`idgbr_geo.engine.refine_raster` never applies them by itself; call
:func:`tune_process` first (``refine`` and ``batch`` do; ``run_batch(tune_process=True)``
does it on every worker).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading

#: nice increment of the reader and writer threads (Linux, per thread)
BACKGROUND_NICE = 10

#: what :func:`tune_process` and :func:`tune_allocator` changed in this process
_TUNED = {"allocator": False, "priority": False}
#: glibc mallopt parameters and the values the engine sets (bytes)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MALLOC_MMAP_THRESHOLD = 32 * 2**20
MALLOC_TRIM_THRESHOLD = 256 * 2**20


def tune_allocator() -> bool:
    """Keep freed window-sized buffers in the process (glibc only; once per process).

    Every window allocates the same few-MB buffers (network activations, tile arrays).
    With glibc's defaults they are mmapped and unmapped, or trimmed off the heap, over and
    over until its thresholds have adapted, so their pages are faulted in again and again:
    measured 390k page faults (~0.6 CPU-s, 7 % of the run) in a process's first 67 MP scene,
    10k once adapted. Fixing the thresholds (mmap 32 MB, trim 256 MB) gives every run the
    adapted behaviour. Skipped when the user set glibc's own ``MALLOC_*``/``GLIBC_TUNABLES``
    environment, or ``IDGBR_NO_MALLOPT``. Process-wide: called by :func:`tune_process`,
    never by :func:`idgbr_geo.engine.refine_raster` itself."""
    if (not sys.platform.startswith("linux") or "IDGBR_NO_MALLOPT" in os.environ
            or "GLIBC_TUNABLES" in os.environ
            or any(k.startswith("MALLOC_") for k in os.environ)):
        return False
    if _TUNED["allocator"]:
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = (libc.mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD) == 1
              and libc.mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD) == 1)
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    _TUNED["allocator"] = ok
    return ok


def tune_process() -> None:
    """Tune this whole process for long runs, as the CLI does before ``refine`` and
    ``batch``: glibc's allocator thresholds (:func:`tune_allocator`) and a lower scheduling
    priority for the engine's reader and writer threads (:func:`background_priority`).
    Both change process-wide state, so a library call does neither unless asked."""
    tune_allocator()
    _TUNED["priority"] = True


def background_priority() -> None:
    """Give the calling (reader/writer) thread a lower scheduling priority than the model's
    threads, once :func:`tune_process` asked for it. On a machine whose cores the network
    already fills, reading and writing then run in the network's idle moments instead of
    stalling its parallel sections."""
    if not _TUNED["priority"]:
        return
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not allowed
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)

"""Torch ops run on one thread where their last bits would depend on how many run them.

The engine promises the same output for any number of model workers (each worker's
networks get ``threads // workers`` threads), so every op on its path must give the same
numbers on one thread as on several. Most do (convolutions through oneDNN, element-wise
ops, the resizing the networks do); a few split their work at thread boundaries that
move with the thread count and round differently there: a reduction over a whole plane
(the guided filter's centring means) and PyTorch's bilinear enlargement of a float32 image
(a zoomed view). Those run inside :func:`one_thread`; each takes a few milliseconds of a
~100 ms window.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the enclosed torch ops on one thread, then give the caller's setting back (a
    model worker's thread count is its own: per thread under OpenMP)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)

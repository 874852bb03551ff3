"""The raster engine: stream a scene of any size through segmentor and refiner.

Reading (a background thread), the models (model workers: the calling thread and, on a
multi-core CPU, a second one; torch releases the GIL) and blending + writing (a background
thread) overlap, so I/O hides behind the network. Outputs are written atomically: nothing
appears under the output name unless the whole run succeeded.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from tqdm import tqdm

from .cards import ModelCard
from .files import atomic_output, check_distinct, check_output, temporary_path
from .input_grid import keep_user_map, to_input_grid
from .interfaces import Model
from .options import OutputOptions, RunOptions, raise_problems
from .pipeline import DONE, StripWriter, WindowItem, batches, read_windows
from .predict import predict_windows, resolve_precision
from .registry import load_model
from .scale import GsdEstimate, ScaleChoice, assume_estimated_gsd, choose_working_gsd
from .stitching import RowStitcher
from .tiling import (
    Source,
    Tile,
    clip,
    open_coarse,
    open_source,
    plan_tiles,
)
from .upsampling import MIN_FACTOR, radius_for
from .writing import BLOCK, ResultWriter, to_cog

#: GDAL block cache during a run (MB), unless GDAL_CACHEMAX is set in the environment
GDAL_CACHE_MB = 32
#: Edge-aware upsampling of the results onto an input finer than the model's GSD by more
#: than :data:`idgbr_geo.upsampling.MIN_FACTOR`, and from 1x for a card with
#: ``edge_filter`` (False: bilinear). Not an option: a switch for
#: benchmarks/native_resolution.py, which measures what it gains.
_JOINT_UPSAMPLING = True
#: Most bytes of native window pixels (kept for the edge-aware upsampling) waiting in the
#: reader's queue: fewer windows wait when they are large (a 16x finer float32 input holds
#: 0.8 GB per 512 px window); at least two, so that reading still overlaps the network.
NATIVE_QUEUE_MB = 256


@dataclass
class RefineSummary:
    """What a run did; ``line()`` is the one-line summary the CLI prints."""

    output: str
    windows: int = 0
    skipped: int = 0
    refined: int = 0
    seconds: float = 0.0
    megapixels: float = 0.0
    warnings: list[str] = field(default_factory=list)
    #: the GSD estimated for an input without a CRS (card ``gsd_from_width``), or None
    gsd_estimate: GsdEstimate | None = None
    #: the working GSD chosen for the scene (card ``gsd_choices``), or None
    scale: ScaleChoice | None = None

    @property
    def mp_per_s(self) -> float:
        return self.megapixels / self.seconds if self.seconds > 0 else float("nan")

    def line(self) -> str:
        return (f"{self.output}: {self.windows} windows, {self.skipped} skipped (nodata), "
                f"{self.refined} refined, {self.megapixels:.2f} MP in {self.seconds:.1f} s "
                f"({self.mp_per_s:.2f} MP/s)"
                + (f"; {self.gsd_estimate.describe()}" if self.gsd_estimate else "")
                + (f"; {self.scale.describe()}" if self.scale else ""))


def default_batch_size(device: torch.device) -> int:
    """Windows per forward pass when none is asked for. On a CPU one window at a time is
    fastest (measured, 2 threads: coarse net ~9 ms/window at batch 1, 2 or 4, refiner 25-37
    ms/window at 1 vs 37-42 at 4: a batch's activations fall out of the caches); a GPU
    wants batches."""
    return 8 if device.type == "cuda" else 1


def default_workers(device: torch.device) -> int:
    """Model workers when none are asked for: two on a multi-core CPU, each with half of
    torch's threads, else one. Two single-threaded networks on 2 cores run ~5-10% faster
    than one network on 2 threads, and, with no thread barriers to wait at, reading and
    writing no longer stall a parallel section when they take a core for a moment."""
    if device.type == "cuda" or torch.get_num_threads() < 2:
        return 1
    return 2


@dataclass(frozen=True)
class RunPlan:
    """The card's values for the options left at None."""

    tile_size: int
    overlap: int
    steps: int
    #: the coarse model's extra views of each window (card ``coarse_zooms``), or none
    zooms: tuple[float, ...] = ()


def plan_run(card: ModelCard, options: RunOptions, *, coarse: bool, segmentor: bool
             ) -> RunPlan:
    """Fill ``options`` left at None from the card and check them against it: what would
    fail every scene alike (a window not larger than twice the overlap, sizes off the
    model's stride, no segmentor and no coarse map, a GSD estimate the card cannot make) is
    one :class:`UserError` before any file is opened (:func:`idgbr_geo.batch.run_batch`
    checks it once for all scenes)."""
    tile = card.tile_size if options.tile_size is None else options.tile_size
    overlap = card.overlap if options.overlap is None else options.overlap
    steps = card.sampling.steps if options.steps is None else options.steps
    found: list[tuple[tuple[str, ...], str]] = []
    if tile <= 2 * overlap:
        found.append((("tile_size", "overlap"), f"$tile_size ({tile}) must be larger than "
                                                f"twice the overlap ({overlap})"))
    elif tile % card.stride_multiple or overlap % card.stride_multiple:
        found.append((("tile_size", "overlap"),
                      f"$tile_size ({tile}) and $overlap ({overlap}) must be multiples of "
                      f"{card.stride_multiple} for model {card.name!r}"))
    if not coarse and not segmentor:
        found.append((("coarse",), f"model {card.name!r} has no segmentor: give a coarse "
                                   "map ($coarse)"))
    if options.estimate_gsd and not coarse and card.gsd_from_width is None:
        found.append((("estimate_gsd", "gsd"),
                      f"model {card.name!r} cannot estimate an input's GSD (its card has no "
                      "gsd_from_width): give the GSD with $gsd instead of $estimate_gsd"))
    raise_problems(found)
    zooms = tuple(card.coarse_zooms or ()) if options.multiscale and not coarse else ()
    return RunPlan(tile, overlap, steps, zooms)


def uses_refiner(model: Model, options: RunOptions) -> bool:
    """Whether :func:`refine_raster` runs ``model``'s refiner with ``options``; when not,
    the map it writes is the coarse map (ours, or the given one on the input's grid)."""
    steps = model.card.sampling.steps if options.steps is None else options.steps
    return not options.coarse_only and model.refiner is not None and steps > 0


def refine_raster(
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | Model = "buildings",
    coarse: str | os.PathLike[str] | None = None,
    probabilities: str | os.PathLike[str] | None = None,
    vector: str | os.PathLike[str] | None = None,
    options: RunOptions | None = None,
    outputs: OutputOptions | None = None,
    overwrite: bool = False,
    quiet: bool = False,
) -> RefineSummary:
    """Refine a scene: coarse segmentation (or a user's coarse map), diffusion refinement of
    windows that hold a boundary, seamless stitching, georeferenced class raster output.

    ``model``: a bundled name, a card path or a loaded :class:`~idgbr_geo.interfaces.Model`.
    ``coarse``: refine this class raster (any model's) instead of running the segmentor.
    ``probabilities``: also write per-class probabilities to this GeoTIFF. ``vector``: also
    write the refined map as polygons to this GeoPackage
    (:func:`idgbr_geo.vectorize.vectorize_raster`), before the raster outputs are renamed
    into place: a failed vectorization leaves no output at all. ``options``
    (:class:`~idgbr_geo.options.RunOptions`) say how the scene is run, ``outputs``
    (:class:`~idgbr_geo.options.OutputOptions`) what is written and how; None: defaults.

    The output is on the input's grid. An input finer than the model's GSD (by more than
    :data:`~idgbr_geo.upsampling.MIN_FACTOR`) is run on the model's grid, window by window,
    and each window's probabilities are brought back onto the input's pixels edge-aware,
    guided by the window's own native image (:mod:`idgbr_geo.upsampling`), so boundaries
    follow the input's edges at its resolution; for a model whose card sets
    ``edge_filter`` an input read at (about) its own resolution is filtered along its edges
    too; this holds for the segmentor's ``coarse_only`` maps too.

    A user's coarse map (``coarse``) is never replaced by its resampled copy: whenever the
    input's GSD is not the model's, each window of the map is read at the input's
    resolution as well, and a pixel keeps the user's own class (or probabilities) unless
    the refiner changed the class of its model pixel (the refined class differs from the
    model-grid copy of the map's). Only in those model pixels (widened by
    :data:`~idgbr_geo.input_grid.CHANGED_MARGIN`, 0 by default) do the refined
    probabilities, brought to the input grid as above, replace it. So with 0 steps, a model
    without a refiner, or ``coarse_only``, and in every window the refiner leaves alone, the
    output is the user's map exactly, at its own resolution; the output has data where both
    the map and the input do. Overlapping windows are blended as always; where all of them
    keep a pixel, the blend is the user's class again.

    A call changes no process-wide state: for long runs the CLI also calls
    :func:`idgbr_geo.tuning.tune_process` first.
    """
    start = time.perf_counter()
    options = RunOptions() if options is None else options
    outputs = OutputOptions() if outputs is None else outputs
    if not isinstance(options, RunOptions) or not isinstance(outputs, OutputOptions):
        raise TypeError("options must be RunOptions and outputs OutputOptions")
    # an output that is an input (or another output) is refused even with overwrite
    check_distinct({"input": input, "$coarse map": coarse},
                   {"output": output, "$probabilities file": probabilities,
                    "$vector file": vector})
    out_path = check_output(output, overwrite)
    prob_path = check_output(probabilities, overwrite) if probabilities else None
    if vector is not None:
        from .vectorize import check_gpkg_output

        check_gpkg_output(vector, overwrite)
    m = model if isinstance(model, Model) else load_model(model, options.device)
    card = m.card
    plan = plan_run(card, options, coarse=coarse is not None,
                    segmentor=m.segmentor is not None)
    steps, seed, cog = plan.steps, options.seed, outputs.cog
    batch_size = (default_batch_size(m.device) if options.batch_size is None
                  else options.batch_size)
    workers = (default_workers(m.device) if options.model_workers is None
               else options.model_workers)
    use_refiner = uses_refiner(m, options)
    precision = resolve_precision(options.precision, m.device)
    estimating = options.estimate_gsd and coarse is None
    with contextlib.ExitStack() as stack:
        # each block is read and written once: GDAL's default cache (5% of RAM) would only
        # keep the decompressed scene around and make memory grow with the scene; in an
        # Env, GDAL's messages go to Python logging instead of straight to stderr
        cache = {} if "GDAL_CACHEMAX" in os.environ else {"GDAL_CACHEMAX": GDAL_CACHE_MB * 2**20}
        stack.enter_context(rasterio.Env(**cache))  # (bytes)
        src = open_source(input, model_bands=card.bands, bands=options.bands,
                          model_gsd=card.gsd, gsd=options.gsd,
                          gsd_without_crs=card.gsd_without_crs,
                          normalization=card.normalization, band_names=card.band_names,
                          value_range=options.value_range,
                          gsd_estimated=estimating)
        stack.callback(src.ds.close)
        if vector is not None:  # fail before the run, not after it
            from .polygonize import check_map_grid

            check_map_grid(src.ds, Path(input).name)
        coarse_ds = None
        if coarse is not None:
            coarse_ds = open_coarse(coarse, src.ds)
            stack.callback(coarse_ds.close)
        estimate = None
        if estimating and src.gsd_assumed:
            estimate = assume_estimated_gsd(src, m, tile_size=plan.tile_size,
                                            overlap=plan.overlap, precision=precision)
        scale = None
        if options.gsd_search and coarse is None and card.gsd_choices:
            scale = choose_working_gsd(src, m, card.working_gsd_choices(src.gsd),
                                       tile_size=plan.tile_size,
                                       overlap=plan.overlap, precision=precision)
            if scale is not None:
                src.factor = scale.factor
        tiles = plan_tiles(src.width, src.height, tile_size=plan.tile_size, overlap=plan.overlap,
                           factor=src.factor, multiple=card.stride_multiple)
        summary = RefineSummary(output=str(out_path), windows=len(tiles),
                                megapixels=src.width * src.height / 1e6,
                                warnings=src.warnings,  # (one list: reading adds more)
                                gsd_estimate=estimate, scale=scale)
        main_tmp = stack.enter_context(atomic_output(out_path, overwrite))
        prob_tmp = stack.enter_context(atomic_output(prob_path, overwrite)) if prob_path else None
        write_main = temporary_path(out_path) if cog else main_tmp
        write_prob = (temporary_path(prob_path) if cog and prob_tmp else prob_tmp)
        try:
            _run(src, m, tiles, coarse_ds, summary, write_main, write_prob,
                 use_refiner=use_refiner, steps=steps, seed=seed, batch_size=batch_size,
                 workers=workers, overlap=plan.overlap, confidence=outputs.confidence,
                 quiet=quiet, prob_dtype=outputs.probabilities_dtype, precision=precision,
                 zooms=plan.zooms,
                 tags={"IDGBR_MODEL": card.name, "IDGBR_STEPS": steps if use_refiner else 0,
                       "IDGBR_SEED": seed, "IDGBR_PRECISION": precision,
                       "IDGBR_WORKING_GSD": f"{scale.gsd:g}" if scale else card.gsd or "",
                       "IDGBR_COARSE_ZOOMS": ",".join(f"{z:g}" for z in plan.zooms)})
            if cog:
                to_cog(write_main, main_tmp, categorical=True)
                if write_prob is not None:
                    to_cog(write_prob, prob_tmp, categorical=False)
            if vector is not None:
                from .vectorize import vectorize_raster

                vectorize_raster(main_tmp, vector, probabilities=prob_tmp, overwrite=overwrite,
                                 scene=Path(input).stem, progress=not quiet,
                                 **outputs.vectors.kwargs())
        finally:
            if cog:
                for p in (write_main, write_prob):
                    if p is not None and Path(p).exists():
                        Path(p).unlink()
    summary.seconds = time.perf_counter() - start
    return summary


def _run(src: Source, m: Model, tiles: Sequence[Tile], coarse_ds: Any, summary: RefineSummary,
         out_path: Path, prob_path: Path | None, *, use_refiner: bool, steps: int, seed: int,
         batch_size: int, workers: int, overlap: int, confidence: bool, quiet: bool,
         prob_dtype: str, precision: str, tags: dict[str, Any],
         zooms: Sequence[float] = ()) -> None:
    card = m.card
    k = card.num_classes
    writer_out = ResultWriter(out_path, src.ds, card.classes, card.colors,
                              confidence=confidence, probabilities=prob_path,
                              prob_dtype=prob_dtype, tags=tags)
    tile_rows_in = math.ceil(max(t.window.height for t in tiles))
    # two classes from a softmax (or a user's class ids) sum to one: blend class 1 only
    binary = k == 2 and (coarse_ds is None or coarse_ds.count == 1)
    stitcher = RowStitcher(src.width, src.height, k, capacity=tile_rows_in + BLOCK,
                           block=BLOCK, flush=writer_out.write, binary=binary)
    writer = StripWriter(stitcher, src, overlap * src.factor)
    writer.start()
    # (a user's map on the model's own grid stays as it is: see keep_user_map)
    own_grid = card.edge_filter and (src.factor > 1.0 if coarse_ds is not None
                                     else src.factor >= 1.0)
    native = _JOINT_UPSAMPLING and (src.factor > MIN_FACTOR or own_grid)
    radius = radius_for(overlap)
    depth = max(4, 2 * batch_size * workers)
    # bytes per input pixel each window holds on the input grid while it waits
    per_pixel = len(src.bands) * np.dtype(src.dtype).itemsize if native else 0
    if coarse_ds is not None and src.factor != 1.0:  # a user's map, as given, and a mask
        per_pixel += sum(np.dtype(d).itemsize for d in coarse_ds.dtypes) + 2
    if per_pixel:
        window_bytes = (max(int(t.window.height) for t in tiles)
                        * max(int(t.window.width) for t in tiles) * per_pixel)
        depth = max(2, min(depth, NATIVE_QUEUE_MB * 2**20 // max(1, window_bytes)))
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    reader = threading.Thread(target=read_windows, args=(src, tiles, coarse_ds, card, q, stop,
                                                         native), daemon=True)
    reader.start()
    bar = tqdm(total=len(tiles), unit="win", disable=True if quiet else None,
               desc=Path(src.path).name, leave=False)
    threads = torch.get_num_threads()
    per_worker = max(1, threads // workers)
    numbered = enumerate(batches(q, batch_size))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work(began: threading.Event, finished: threading.Event) -> None:
        """One model worker: take the next batch, run the networks, hand over the result."""
        began.set()  # before it looks at ``stop``: see _wait_for_workers
        torch.set_num_threads(per_worker)
        try:
            with torch.inference_mode():
                while not stop.is_set():
                    with lock:  # the batch generator is not thread-safe
                        got = next(numbered, None)
                    if got is None:
                        return
                    seq, batch = got
                    results, skipped, refined = _process(batch, m, src, use_refiner=use_refiner,
                                                         steps=steps, seed=seed, radius=radius,
                                                         precision=precision, zooms=zooms)
                    writer.put((seq, results))
                    with lock:
                        summary.skipped += skipped
                        summary.refined += refined
                        bar.update(len(batch))
        except BaseException as exc:
            with lock:
                errors.append(exc)
            stop.set()
        finally:
            finished.set()

    # The model workers run on their own threads, and this thread only waits for them: a Ctrl-C or
    # SIGTERM (raised here, in the main thread) then never lands inside a queue's or lock's
    # own Python code, where it could leave a lock held that a worker waits on forever.
    began = [threading.Event() for _ in range(workers)]
    finished = [threading.Event() for _ in range(workers)]
    pool = _model_threads()
    try:
        for b, f in zip(began, finished, strict=True):
            pool.submit(workers, functools.partial(work, b, f))
        _wait_for_workers(finished)
        if errors:
            raise errors[0]
        writer.put(DONE)
        writer.join()
        if writer.error is not None:
            raise writer.error
    except BaseException:
        stop.set()
        raise
    finally:
        _wait_for_workers(finished, began)  # stop is set, or they are done
        bar.close()
        while reader.is_alive():  # drain so the reader can finish and release the file
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass
        writer.abort()  # a no-op after a finished run (the thread has ended)
        writer_out.close()


def _wait_for_workers(finished: Sequence[threading.Event],
                      began: Sequence[threading.Event] | None = None) -> None:
    """Sleep until every worker (with ``began``: every one that began) has finished,
    touching no lock (``is_set`` reads a flag), so that an interrupt raised meanwhile cannot
    leave one held. A worker that had not begun by then (an interrupt between two
    submissions) sees ``stop``, set before this wait, and returns at once without touching
    the writer."""
    while any(not f.is_set() and (began is None or began[i].is_set())
              for i, f in enumerate(finished)):
        time.sleep(0.01)


class _ModelThreads:
    """Daemon threads that run the model workers, kept between runs: a fresh thread's
    first forward passes are ~50% slower (its allocator arena and the networks' per-thread
    buffers start cold), which a batch of small scenes would pay scene after scene. Not a
    ``ThreadPoolExecutor``: an interrupt that lands while it starts a thread can leave that
    thread unregistered, and its non-daemon thread then blocks the interpreter's exit. One
    set per calling thread, so that runs in concurrent threads do not queue behind each
    other; they end with it."""

    def __init__(self) -> None:
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.count = 0

    def submit(self, n: int, task: Callable[[], None]) -> None:
        """Run ``task`` on one of at least ``n`` threads."""
        while self.count < n:
            threading.Thread(target=_serve, args=(self.tasks,), daemon=True,
                             name=f"idgbr-model-{self.count}").start()
            self.count += 1
        self.tasks.put(task)

    def __del__(self) -> None:
        for _ in range(self.count):
            self.tasks.put(None)


def _serve(tasks: queue.SimpleQueue) -> None:
    while (task := tasks.get()) is not None:
        task()


_THREADS = threading.local()


def _model_threads() -> _ModelThreads:
    if not hasattr(_THREADS, "pool"):
        _THREADS.pool = _ModelThreads()
    return _THREADS.pool


def _process(batch: list[WindowItem], m: Model, src: Source, *, use_refiner: bool, steps: int,
             seed: int, precision: str, radius: int | None = None,
             zooms: Sequence[float] = ()
             ) -> tuple[list[tuple[Tile, np.ndarray | None, np.ndarray | None]], int, int]:
    """Run one batch of same-shape windows through the models (:func:`predict_windows`).
    Returns per window (tile, probabilities on the input grid or None when skipped,
    validity), and the numbers of windows skipped and refined."""
    card = m.card
    live = [it for it in batch if it.any]
    skipped, refined_n = len(batch) - len(live), 0
    results: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
    if live:
        th, tw = live[0].tile.model_size
        if len(live) == 1 and live[0].data.shape[1:] == (th, tw):
            img = live[0].data[None]  # no copy
        else:
            img = np.empty((len(live), card.bands, th, tw), np.float32)
            for i, it in enumerate(live):
                mh, mw = it.data.shape[1:]
                img[i, :, :mh, :mw] = it.data
                img[i, :, mh:] = 0.0  # past the raster's edge (or a rounding pixel)
                img[i, :, :mh, mw:] = 0.0
        coarse = None
        if live[0].coarse is not None:
            cp = np.zeros((len(live), card.num_classes, th, tw), np.float32)
            for i, it in enumerate(live):
                cp[i, :, : it.mask.shape[0], : it.mask.shape[1]] = it.coarse
            coarse = torch.from_numpy(cp)
        valid = inside = None
        if use_refiner:
            va = np.zeros((len(live), th, tw), bool)
            ins = np.zeros((len(live), 1, th, tw), np.float32)  # 0 where a window overhangs
            for i, it in enumerate(live):
                mh, mw = it.mask.shape
                va[i, :mh, :mw] = it.mask
                ins[i, :, :mh, :mw] = 1.0
            valid, inside = torch.from_numpy(va), torch.from_numpy(ins)
        probs, refined_n = predict_windows(
            m, torch.from_numpy(img), coarse=coarse, valid=valid, inside=inside,
            origins=[it.tile.origin for it in live], steps=steps, seed=seed,
            refine=use_refiner, precision=precision, zooms=zooms)
        for i, it in enumerate(live):  # the part inside the raster, on the input grid
            mh, mw = it.mask.shape
            win = clip(it.tile.window, src.width, src.height)
            if it.user is not None:
                results[it.tile.index] = keep_user_map(probs[i, :, :mh, :mw], it,
                                                        int(win.height), int(win.width),
                                                        card, src.dtype, radius)
                continue
            results[it.tile.index] = to_input_grid(probs[i, :, :mh, :mw],
                                                    None if it.full else it.mask,
                                                    int(win.height), int(win.width),
                                                    it, card, src.dtype, radius)
    out = [(it.tile, *results.get(it.tile.index, (None, None))) for it in batch]
    return out, skipped, refined_n

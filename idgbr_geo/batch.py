"""Batch processing: every matching scene of a folder, one at a time on this machine.

A failing scene does not stop the batch; the run writes a JSON summary (per scene: status,
seconds, error) into the output folder and reports failure through its return value.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .errors import UserError
from .files import atomic_output
from .interfaces import Model
from .registry import load_model

SUMMARY_NAME = "idgbr_batch_summary.json"


@dataclass
class SceneResult:
    scene: str
    output: str
    status: str  # "done", "skipped" (output exists) or "failed"
    seconds: float = 0.0
    error: str | None = None
    summary: str | None = None


@dataclass
class BatchSummary:
    scenes: list[SceneResult] = field(default_factory=list)
    summary_path: str | None = None

    @property
    def failed(self) -> list[SceneResult]:
        return [s for s in self.scenes if s.status == "failed"]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.scenes:
            out[s.status] = out.get(s.status, 0) + 1
        return out


def find_scenes(in_dir: str | os.PathLike[str], pattern: str = "*.tif") -> list[Path]:
    """Matching rasters in ``in_dir`` (sorted; not recursive unless the pattern says **)."""
    d = Path(in_dir)
    if not d.is_dir():
        raise UserError(f"input folder {d} does not exist")
    return sorted(p for p in d.glob(pattern) if p.is_file())


def output_for(scene: Path, out_dir: Path, suffix: str = ".tif") -> Path:
    return out_dir / f"{scene.stem}{suffix}"


def process_scene(scene: Path, output: Path, model: Model | str, *,
                  refine_kwargs: dict[str, Any],
                  after: Callable[[Path, Path], None] | None = None) -> SceneResult:
    """Refine one scene; any error becomes a failed :class:`SceneResult`, never an exception."""
    from .engine import refine_raster

    t0 = time.perf_counter()
    try:
        summ = refine_raster(scene, output, model=model, **refine_kwargs)
        if after is not None:
            after(scene, output)
        return SceneResult(str(scene), str(output), "done", time.perf_counter() - t0,
                           summary=summ.line())
    except (UserError, OSError, RuntimeError, ValueError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return SceneResult(str(scene), str(output), "failed", time.perf_counter() - t0,
                           error=msg)


def run_batch(in_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
              model: str | os.PathLike[str] | Model = "buildings", pattern: str = "*.tif",
              overwrite: bool = False, quiet: bool = False, device: str = "auto",
              after: Callable[[Path, Path], None] | None = None,
              **refine_kwargs: Any) -> BatchSummary:
    """Refine every scene matching ``pattern`` in ``in_dir`` into ``out_dir``."""
    out = Path(out_dir)
    if not out.is_dir():
        raise UserError(f"output folder {out} does not exist")
    scenes = find_scenes(in_dir, pattern)
    if not scenes:
        raise UserError(f"no file in {in_dir} matches {pattern!r}")
    m = model if isinstance(model, Model) else load_model(model, device)
    kwargs = dict(refine_kwargs, overwrite=overwrite, quiet=True)
    result = BatchSummary()
    for scene in tqdm(scenes, unit="scene", disable=True if quiet else None, desc="scenes"):
        target = output_for(scene, out)
        if target.exists() and not overwrite:
            result.scenes.append(SceneResult(str(scene), str(target), "skipped"))
            continue
        result.scenes.append(process_scene(scene, target, m, refine_kwargs=kwargs, after=after))
    result.summary_path = str(write_summary(result, out))
    return result


def write_summary(result: BatchSummary, out_dir: Path) -> Path:
    path = out_dir / SUMMARY_NAME
    doc = {"counts": result.counts(), "scenes": [asdict(s) for s in result.scenes]}
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
    return path

"""idgbr-geo: IDGBR diffusion boundary refinement for large georeferenced rasters.

The public API is imported lazily, so commands that need no network (vectorize, evaluate,
preview) do not pay torch's import time and memory.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ModelCard": "cards", "Normalization": "cards",
    "UserError": "errors", "InputError": "errors", "OutputError": "errors",
    "RunOptions": "options", "OutputOptions": "options", "VectorOptions": "options",
    "Model": "interfaces", "Segmentor": "interfaces", "Refiner": "interfaces",
    "load_model": "registry", "save_model": "registry", "register_architecture": "registry",
    "refine_raster": "engine", "RefineSummary": "engine", "predict_windows": "predict",
    "run_batch": "batch",
    "vectorize_raster": "vectorize",
    "evaluate_arrays": "metrics", "evaluate_rasters": "evaluate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

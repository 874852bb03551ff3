"""Research: test-time augmentation of the coarse segmentor.

Averages the segmentor's probabilities over views of each window: a horizontal flip
(``flip``), the window seen at twice the model's GSD (``scale2``: downsampled 2x, predicted,
upsampled back; a quarter of the pixels, so ~1/4 of the cost) or both; ``multiscale`` sees
the window at 0.8x and 1.25x the working GSD as well (2.2x the pixels of the window besides
it, around the scale the engine chose); ``ms-finer`` / ``ms-coarser`` add only the 0.8x /
1.25x view (1.56x / 0.64x). The original view is
predicted last, so a shared-encoder refiner (``encoders.FeatureMemo``) still finds its
features. Measured by ``release/validate.py --tta MODE``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

MODES = ("flip", "scale2", "flip+scale2", "scale1.5", "multiscale", "ms-finer",
         "ms-coarser")


class TTASegmentor:
    """Any segmentor, its probabilities averaged over the views of ``mode``."""

    def __init__(self, base: Any, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown TTA mode {mode!r}; known: {', '.join(MODES)}")
        self.base, self.mode = base, mode

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)

    def _zoomed(self, image: torch.Tensor, factor: float) -> torch.Tensor:
        h, w = image.shape[-2:]
        size = (max(32, round(h / factor / 32) * 32), max(32, round(w / factor / 32) * 32))
        small = F.interpolate(image, size=size, mode="bilinear", align_corners=False,
                              antialias=True)
        p = self.base.predict(small)
        return F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)

    @torch.no_grad()
    def predict(self, image: torch.Tensor) -> torch.Tensor:
        views = []
        if "flip" in self.mode:
            views.append(self.base.predict(image.flip(-1)).flip(-1))
        if "scale2" in self.mode:
            views.append(self._zoomed(image, 2.0))
        if "scale1.5" in self.mode:
            views.append(self._zoomed(image, 1.5))
        if self.mode in ("multiscale", "ms-finer"):
            views.append(self._zoomed(image, 0.8))
        if self.mode in ("multiscale", "ms-coarser"):
            views.append(self._zoomed(image, 1.25))
        views.append(self.base.predict(image))  # last: the memo keeps the original's features
        return torch.stack(views).mean(0)

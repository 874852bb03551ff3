"""Zoomed views of a window: the coarse model reads each window at a few scales.

A card's ``coarse_zooms`` make the engine (:func:`idgbr_geo.predict.predict_windows`) average
the segmentor's probabilities over the window and views of it at those zooms; refiner
training (``coarse_zooms`` of :class:`~idgbr_geo.config.RefinerTrainingConfig`) makes its
coarse maps the same way. Torch only: training imports it on machines without the
geospatial stack.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812

from .interfaces import Segmentor
from .threads import one_thread

#: side of the blocks a zoomed view's size is rounded to (the coarse encoders' stride)
ZOOM_MULTIPLE = 32
#: a window whose own view gives every valid pixel at least this top-class probability
#: skips the zoomed views: averaged with two more views, such a pixel changes class only if
#: both give another class at least 0.4 and together 1.4 (the held-out maps did not move)
CONFIDENT = 0.9


def multiscale_probabilities(segmentor: Segmentor, image: torch.Tensor,
                             zooms: Sequence[float], valid: torch.Tensor | None = None, *,
                             confident: float = CONFIDENT) -> torch.Tensor:
    """The segmentor's probabilities of ``image`` averaged over the image as it is and
    views of it at each zoom (a view at zoom z has 1/z the pixels per side: 0.8 is a finer
    working GSD, 1.25 a coarser one; predicted, then resized back). Objects that one scale
    reads poorly, another often reads well. Windows whose own view is sure of every pixel
    in ``valid`` (B, H, W; None: all) with at least ``confident`` probability (above 1:
    never), e.g. open water or fields, keep that view alone: the views cost 2.2x the
    window's pixels. The image's own view runs first; a refiner sharing the encoder
    (:class:`~idgbr_geo.encoders.FeatureMemo`) still finds its features."""
    own = segmentor.predict(image).float()
    if not zooms or len(image) == 0:
        return own
    conf = own.amax(1)
    if valid is not None:
        conf = torch.where(valid.to(conf.device), conf, 1.0)
    unsure = (conf.flatten(1).amin(1) < confident).nonzero().flatten()
    if len(unsure) == 0:
        return own
    sub = image if len(unsure) == len(image) else image[unsure.to(image.device)]
    # enlarged in channels-last, the layout the segmentor reads: 2.5x faster on a CPU than
    # from the planar layout, the same values (a shrunk view: planar is faster)
    nhwc = (sub.contiguous(memory_format=torch.channels_last) if any(z < 1 for z in zooms)
            else sub)
    h, w = image.shape[-2:]
    views = [own[unsure]]
    for z in zooms:
        size = (max(ZOOM_MULTIPLE, round(h / z / ZOOM_MULTIPLE) * ZOOM_MULTIPLE),
                max(ZOOM_MULTIPLE, round(w / z / ZOOM_MULTIPLE) * ZOOM_MULTIPLE))
        if size[0] < h:
            view = F.interpolate(sub, size=size, mode="bilinear", align_corners=False,
                                 antialias=True)
        else:
            with one_thread():  # (on several, its last bits depend on how many)
                view = F.interpolate(nhwc, size=size, mode="bilinear", align_corners=False)
        # (planar whatever layout the segmentor answers in, as the window's own view)
        views.append(F.interpolate(segmentor.predict(view).float().contiguous(), size=(h, w),
                                   mode="bilinear", align_corners=False))
    out = own.clone()
    out[unsure] = torch.stack(views).mean(0)
    return out


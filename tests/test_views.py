"""Zoomed views of a window (idgbr_geo.views): averaged with the window's own view, skipped
for windows the own view is sure of."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812

from idgbr_geo.views import multiscale_probabilities


class SizeSpy:
    """A segmentor that records the sizes it is given; class 1's probability is the mean of
    the first band, so a view's answer shows its zoom's blur."""

    num_classes = 2

    def __init__(self) -> None:
        self.sizes: list[tuple[int, int]] = []

    def predict(self, image: torch.Tensor) -> torch.Tensor:
        self.sizes.append(tuple(image.shape[-2:]))
        self.batch = len(image)
        p = torch.sigmoid(image[:, :1])
        return torch.cat([1 - p, p], 1)


def test_zoomed_views_are_averaged_with_the_window_itself():
    seg = SizeSpy()
    image = torch.randn(2, 3, 96, 160)
    assert torch.equal(multiscale_probabilities(seg, image, ()), seg.predict(image))
    seg.sizes.clear()
    got = multiscale_probabilities(seg, image, (0.8, 1.25))
    # the window first; 0.8: 1.25x the pixels per side, 1.25: 0.8x, rounded to blocks of 32
    assert seg.sizes == [(96, 160), (128, 192), (64, 128)]
    views = [F.interpolate(seg.predict(F.interpolate(image, size=s, mode="bilinear",
                                                     align_corners=False,
                                                     antialias=s[0] < 96)),
                           size=(96, 160), mode="bilinear", align_corners=False)
             for s in ((128, 192), (64, 128))]
    want = torch.stack([seg.predict(image), *views]).mean(0)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, seg.predict(image))  # the views do change the map
    torch.testing.assert_close(got.sum(1), torch.ones(2, 96, 160))


def test_windows_sure_of_every_valid_pixel_skip_the_views():
    seg = SizeSpy()
    image = torch.randn(3, 3, 64, 96)
    image[0, 0] = 4.0  # sure everywhere (p = 0.98)
    image[1, 0] = -4.0
    image[1, 0, :8, :8] = 0.0  # unsure (p = 0.5) only where there is no data
    valid = torch.ones(3, 64, 96, dtype=torch.bool)
    valid[1, :8, :8] = False
    own = seg.predict(image)
    seg.sizes.clear()
    got = multiscale_probabilities(seg, image, (0.8, 1.25), valid)
    # one call per view, for window 2 only
    assert seg.sizes == [(64, 96), (64, 128), (64, 64)] and seg.batch == 1
    torch.testing.assert_close(got[:2], own[:2])
    full = multiscale_probabilities(seg, image[2:], (0.8, 1.25), confident=math.inf)
    torch.testing.assert_close(got[2:], full)
    # without the valid mask window 1's unsure corner counts: it gets the views too
    seg.sizes.clear()
    multiscale_probabilities(seg, image, (0.8, 1.25))
    assert seg.sizes == [(64, 96), (64, 128), (64, 64)] and seg.batch == 2


def test_the_bundled_model_views_equal_planar_ones_exactly():
    """The enlarged view is made in channels-last (faster on a CPU): the same values as
    from the planar image, so the same map from a segmentor that reads them alike."""
    from pathlib import Path

    import rasterio

    from idgbr_geo.registry import load_model

    m = load_model("buildings", "cpu")
    example = Path(__file__).resolve().parent.parent / "examples" / "gorinchem_rgb_025m.tif"
    with rasterio.open(example) as ds:
        raw = ds.read(window=rasterio.windows.Window(850, 300, 128, 96))
    image = torch.from_numpy(m.card.normalization.apply(raw, raw.dtype))[None]
    seg = m.segmentor
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = multiscale_probabilities(seg, image, (0.8, 1.25), confident=math.inf)
        views = [seg.predict(image)]
        for size in ((128, 160), (64, 96)):
            view = F.interpolate(image, size=size, mode="bilinear", align_corners=False,
                                 antialias=size[0] < 96)
            views.append(F.interpolate(seg.predict(view).float(), size=(96, 128),
                                       mode="bilinear", align_corners=False))
    assert torch.equal(got, torch.stack(views).mean(0))

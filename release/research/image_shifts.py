"""Research: the held-out scenes as other cameras and pipelines would deliver them.

Users bring imagery from sensors and processing chains the training areas never saw. Each
shift below changes a scene's pixels (not its labels) before ``release/validate.py
--image-shift NAME`` writes it for the engine, so that a model's drop under the shift is
measured through the same inference path as its validation tables. The strengths sit at or
beyond the edge of what the training's sensor and colour augmentation draws
(:mod:`idgbr_geo.chips`: gamma exp(+-0.4), haze 0.1-0.4, blur sigma 0.4-1.5 px, noise
0.01-0.04, JPEG quality 30-90, band gains 0.8-1.2), so a model that only learned the
augmentation's range shows it.

Every shift is deterministic (fixed noise seed), works on (3, H, W) uint8 scenes and returns
uint8, except ``uint16``, which returns the 12-bit values a satellite product stores
(the engine's own value handling then decides what the networks read).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from idgbr_geo.chips import jpeg as jpeg_unit

#: RGB -> luma (BT.601)
LUMA = np.asarray([0.299, 0.587, 0.114], np.float32)


def _unit(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float32) / 255.0


def _u8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


def _luma(x: np.ndarray) -> np.ndarray:
    return np.tensordot(LUMA, x, axes=1)


def jpeg(img: np.ndarray, quality: int = 40) -> np.ndarray:
    """A JPEG round trip (the training augmentation's codec, Pillow's defaults)."""
    return _u8(jpeg_unit(torch.from_numpy(_unit(img)), quality).numpy())


def blur(img: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    """A softer lens or a resampled product: Gaussian blur of ``sigma`` pixels."""
    return _u8(gaussian_filter(_unit(img), sigma=(0, sigma, sigma)))


def haze(img: np.ndarray, amount: float = 0.4, level: float = 0.8) -> np.ndarray:
    """Atmospheric haze: the image blended towards a bright grey."""
    return _u8(_unit(img) * (1 - amount) + amount * level)


def dark(img: np.ndarray, gamma: float = 1.8) -> np.ndarray:
    """An under-exposed or linear-ish product: gamma 1.8 (training draws 0.67-1.49)."""
    return _u8(_unit(img) ** gamma)


def cast(img: np.ndarray, gains: tuple[float, float, float] = (1.25, 1.0, 0.75)
         ) -> np.ndarray:
    """Another white balance: band gains beyond the training's 0.8-1.2."""
    return _u8(_unit(img) * np.asarray(gains, np.float32)[:, None, None])


def noise(img: np.ndarray, sigma: float = 0.05, seed: int = 0) -> np.ndarray:
    """Sensor noise: Gaussian, ``sigma`` of the value range (training draws up to 0.04)."""
    rng = np.random.default_rng(seed)
    return _u8(_unit(img) + rng.normal(0, sigma, img.shape).astype(np.float32))


def grey(img: np.ndarray) -> np.ndarray:
    """A panchromatic product delivered as RGB: BT.601 luma in all three bands."""
    return _u8(np.repeat(_luma(_unit(img))[None], 3, axis=0))


def uint16(img: np.ndarray) -> np.ndarray:
    """The same picture as 12-bit values in uint16, as many satellite products store it."""
    return img.astype(np.uint16) * 16 + 8


def autogamma(img: np.ndarray, target: float = 0.42, limits: tuple[float, float] = (0.5, 2.0)
              ) -> np.ndarray:
    """Not a shift but a probe of a fix: the one gamma (within ``limits``) that brings the
    scene's mean luma to ``target`` (the median chip's of the buildings and roads training
    arrays: 0.43 and 0.41), applied to every band."""
    x = _unit(img)
    luma = float(_luma(x).mean())
    g = float(np.clip(np.log(target) / np.log(min(max(luma, 1e-3), 0.999)), *limits))
    return _u8(x ** g)


SHIFTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "jpeg40": jpeg, "blur2": blur, "haze0.4": haze, "gamma1.8": dark,
    "cast": cast, "noise0.05": noise, "grey": grey, "uint16": uint16,
    "autogamma": autogamma,
}


def shift_image(name: str, img: np.ndarray) -> np.ndarray:
    """``img`` (3, H, W) uint8 under the shift ``name`` (a key of :data:`SHIFTS`, or several
    joined by ``+``, applied left to right: ``gamma1.8+autogamma``)."""
    for part in name.split("+"):
        if part not in SHIFTS:
            raise ValueError(f"unknown image shift {part!r}; known: {', '.join(SHIFTS)}")
        img = SHIFTS[part](img)
    return img

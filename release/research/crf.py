"""Dense CRF post-processing: the classic baseline the diffusion refiner is compared with.

Fully connected CRF with Gaussian edge potentials (Krähenbühl & Koltun 2011) through
``pydensecrf2`` (not a dependency of the package: ``pip install pydensecrf2``; research code,
used by ``release/validate.py`` only): unaries are the
coarse map's -log probabilities, pairwise terms a smoothness kernel and an appearance
(bilateral) kernel on the RGB image. Distances are in pixels, so the defaults suit
~0.25-1 m imagery; scale ``sxy_bilateral`` with the object size in pixels.
"""

from __future__ import annotations

import numpy as np

from idgbr_geo.errors import UserError


def dense_crf(image: np.ndarray, probs: np.ndarray, *, iterations: int = 5,
              sxy_gaussian: float = 3.0, compat_gaussian: float = 3.0,
              sxy_bilateral: float = 40.0, srgb: float = 13.0,
              compat_bilateral: float = 5.0) -> np.ndarray:
    """Refine per-class probabilities (K, H, W) with a dense CRF on an RGB uint8 image.

    ``image`` is (3, H, W) or (H, W, 3) uint8. Returns the CRF's marginals (K, H, W) float32.
    """
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as exc:
        raise UserError(f"dense CRF needs pydensecrf2 (pip install pydensecrf2): {exc}") from None
    k, h, w = probs.shape
    rgb = image if image.shape[-1] == 3 else np.moveaxis(image, 0, -1)
    if rgb.shape[:2] != (h, w):
        raise UserError(f"image {rgb.shape[:2]} and probabilities {(h, w)} differ in size")
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    p = np.clip(probs.astype(np.float32), 1e-5, 1.0)
    p = p / p.sum(0, keepdims=True)
    crf = dcrf.DenseCRF2D(w, h, k)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(p)))
    crf.addPairwiseGaussian(sxy=sxy_gaussian, compat=compat_gaussian)
    crf.addPairwiseBilateral(sxy=sxy_bilateral, srgb=srgb, rgbim=rgb, compat=compat_bilateral)
    q = crf.inference(iterations)
    return np.asarray(q, dtype=np.float32).reshape(k, h, w)

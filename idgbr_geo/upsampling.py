"""Edge-aware joint upsampling of class probabilities onto a finer input grid.

When the input is finer than the model's GSD, the engine runs the networks on a window
resampled to the model grid and must bring the window's probabilities back onto the
input's pixels. A plain bilinear upsampling leaves the boundaries at the model's
resolution: blurred and blocky at the input's (a 0.07 m drone image on a 0.25 m model is
upsampled ~4x). Here the upsampled probabilities follow the edges of the window's own
native-resolution image instead, with the guided filter (He, Sun and Tang, "Guided Image
Filtering", TPAMI 2013) in its fast form for joint upsampling (Wu, Zheng, Zhang and Huang,
"Fast End-to-End Trainable Guided Filter", CVPR 2018; He and Sun, "Fast Guided Filter",
2015): the filter's local linear model ``q = A . I + b`` (A, b: per class and guide band) is
fitted between the low-resolution guide (the model-grid image the networks saw) and the
model's probabilities on the model grid, A and b are upsampled bilinearly, and applied to
the native image ``I``. Where the probabilities are flat (inside a building, on open
ground) A is ~0 and the result is the bilinear upsampling; across a boundary the
probability ramp is redrawn along the image's own edge.

It is model-independent: it sees only probabilities and the input's pixels, scaled to
[0, 1] by the card's value range (not the card's mean/std, so ``EPS`` means the same for
every model). The result is a valid probability vector per pixel (clamped at 0 and
renormalised to sum 1). Nodata pixels are left out of the fit (weighted box means) and get
the bilinear upsampling.

The default constants were chosen on the Banepa drone scenes (0.066 m and 0.132 m on the
bundled 0.25 m ``buildings`` model) with ``benchmarks/native_resolution.py``; see
:data:`RADIUS` and :data:`EPS`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .threads import one_thread

#: Joint upsampling is used when the input is finer than the model by more than this factor
#: (input pixels per model pixel). Closer to 1 a bilinear upsampling loses little, except
#: for a model whose card sets ``edge_filter`` (its classes' boundaries are the image's
#: edges): from 1 (the one grid) to this factor its output is filtered along the image's
#: edges as well, with a grey guide (see :data:`COLOUR`).
MIN_FACTOR = 1.25
#: Filter radius in model pixels (the fast filter's low-resolution grid): the window is
#: (2r+1)^2 model pixels, r x factor input pixels, so it scales with the factor (6 model
#: px = 23 input px at 0.066 m on 0.25 m, 11 at 0.132 m). Measured on Banepa (8 mosaics at
#: 3.8x / 48 tiles at 1.9x, bundled buildings model, benchmarks/native_resolution.py),
#: boundary F at 2 px (bilinear: 0.111 / 0.220), colour guide, eps 1e-3: r=3 0.146 / 0.287,
#: r=4 0.149 / 0.298, r=5 0.151 / 0.306, r=6 0.153 / 0.312; building IoU 0.399 / 0.469
#: bilinear, 0.402..0.404 / 0.470..0.471 guided. r=8 gains little more (0.154 on the
#: mosaics) and its reach, 2r + 2 = 18 model px, passes the 16 px zero margin of the
#: cards' 64 px overlap (see :func:`radius_for`).
RADIUS = 6
#: Regularisation of the local linear model, in (value / value range)^2 units: edges whose
#: contrast in the guide is well below sqrt(EPS) are ignored, stronger ones are followed.
#: Measured at r = 6 (colour guide; boundary F at 2 px, mosaics / tiles): 1e-4 0.151 /
#: 0.312, 3e-4 0.151 / 0.313, 1e-3 0.153 / 0.312, 3e-3 0.156 / 0.309, 1e-2 0.153 / 0.299;
#: building IoU falls slowly with eps (mosaics 0.405 at 1e-4, 0.404 at 1e-3, 0.402 at 1e-2).
EPS = 1e-3
#: Guide: all bands (a C x C solve per model pixel; up to :data:`MAX_COLOUR_BANDS` bands)
#: or their mean (grey). Measured at r = 6, eps 1e-3: colour 0.404 / 0.470 IoU and 0.153 /
#: 0.312 boundary F, grey 0.399 / 0.469 and 0.150 / 0.307: colour is better on both sets.
#: Time per scene, one thread, the bundled (small) model: bilinear 0.124 / 0.075 s, grey
#: 0.126 / 0.081 s, colour 0.156 / 0.100 s (~0.03 s more per input megapixel). On one grid
#: (factor 1 to :data:`MIN_FACTOR`, a card's ``edge_filter``) the fit runs at the input's
#: resolution, where colour's per-pixel solve costs 5x grey (one 512 px window, two
#: classes, one thread: 61 against 12 ms) and measured no better: the buildings-xdomain
#: chips (0.3 m, bundled ``buildings``, 2026-12-05) BF@2 coarse 43.8 colour, 44.4 grey
#: (bilinear 42.3). There the guide is grey (:func:`own_grid_colour`).
COLOUR = True
#: more bands than this are guided by their mean (the per-pixel solve grows as C^3)
MAX_COLOUR_BANDS = 4
#: sums of probabilities closer to 1 than this count as one (a softmax's): two classes are
#: then filtered as one (class 0 = 1 - class 1), half the work for the same result
_SUMS_TO_ONE = 1e-4


def own_grid_colour(factor: float) -> bool | None:
    """The guide for an input ``factor`` times finer than the working grid: grey (False)
    up to :data:`MIN_FACTOR`, where the fit runs at about the input's own resolution; else
    the default (None: :data:`COLOUR`)."""
    return False if factor <= MIN_FACTOR else None


def radius_for(overlap: int) -> int:
    """:data:`RADIUS`, or less where windows overlap by fewer than ``overlap`` model
    pixels: the filter's reach (2r + 2 model pixels: two box means and the bilinear step)
    stays inside the stitching's zero margin (a quarter of the overlap,
    :func:`idgbr_geo.stitching.taper`), so that it adds no seams. At least 1."""
    return max(1, min(RADIUS, (overlap // 4 - 2) // 2))


def box_mean(x: torch.Tensor, radius: int, weight: torch.Tensor | None = None
             ) -> torch.Tensor:
    """Mean of (..., H, W) ``x`` over the (2r+1)^2 window around each pixel, clipped at the
    borders (the mean over the pixels inside, as He et al.'s reference code divides by the
    window's pixel count). ``weight`` (H, W): a weighted mean (0 = left out); 0 where a
    window has no weight at all.

    Running sums (cumulative sums along each axis, differenced), as in the paper: O(1) per
    pixel whatever the radius, and measured 2x faster than a separable ``avg_pool2d`` at
    r = 2..6 on a 512 px grid. Each plane's mean is taken out first, so that the running
    sums stay small (a random walk instead of a ramp up to ~H x W): float32 then keeps the
    digits that ``E[I^2] - E[I]^2`` needs on faint edges (variances ~1e-4), as exact as
    the direct sums (< 3e-7 from float64 on [0, 1] data)."""
    if radius <= 0:
        return x.clone() if weight is None else x * (weight > 0)
    if weight is not None:
        num = box_mean(x * weight, radius)
        den = box_mean(weight, radius)
        return torch.where(den > 1e-6, num / den.clamp_min(1e-6), torch.zeros_like(num))
    h, w = x.shape[-2:]
    with one_thread():  # (split between threads, the sum's last bits move)
        m = x.mean((-2, -1), keepdim=True)
    s = _window_sums(_window_sums(x - m, radius, -1), radius, -2)
    count = (_counts(h, radius, x)[:, None] * _counts(w, radius, x)[None])
    return s.div_(count).add_(m)


def _window_sums(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """Sums over [i - r, i + r] (clipped) along ``dim`` (negative) for every i."""
    n = x.shape[dim]
    c = torch.cumsum(x, dim)
    lead = list(x.shape)
    lead[dim] = r + 1
    tail = list(x.shape)
    tail[dim] = r
    # padded[j] = c[clamp(j - r - 1, -1, n - 1)], c[-1] = 0
    padded = torch.cat([c.new_zeros(lead), c, c.narrow(dim, n - 1, 1).expand(tail)], dim)
    return padded.narrow(dim, 2 * r + 1, n) - padded.narrow(dim, 0, n)


def _counts(n: int, r: int, like: torch.Tensor) -> torch.Tensor:
    i = torch.arange(n, device=like.device)
    return ((i + r + 1).clamp(max=n) - (i - r).clamp(min=0)).to(like.dtype)


def guided_coefficients(guide: torch.Tensor, src: torch.Tensor, radius: int, eps: float,
                        weight: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The guided filter's averaged linear coefficients: ``A`` (K, C, H, W) and ``b``
    (K, H, W) such that the filtered ``src`` (K, H, W) is ``sum_c A[:, c] * guide[c] + b``
    for a ``guide`` (C, H, W). ``weight`` (H, W; 0 = nodata) leaves pixels out of the fit;
    windows without any weight do not contribute to the averaging."""
    c = guide.shape[0]
    mean_i = box_mean(guide, radius, weight)
    mean_p = box_mean(src, radius, weight)
    cov_ip = box_mean(guide[None] * src[:, None], radius, weight) - mean_p[:, None] * mean_i
    if c == 1:
        var_i = box_mean(guide * guide, radius, weight) - mean_i * mean_i
        a = cov_ip / (var_i + eps)  # (K, 1, H, W)
    else:
        iu = torch.triu_indices(c, c, device=guide.device)
        cov = (box_mean(guide[iu[0]] * guide[iu[1]], radius, weight)
               - mean_i[iu[0]] * mean_i[iu[1]])
        cov[iu[0] == iu[1]] += eps
        a = _solve_symmetric(c, cov, cov_ip)
    b = mean_p - (a * mean_i[None]).sum(1)
    has = None if weight is None else (box_mean(weight, radius) > 1e-6).to(guide.dtype)
    return box_mean(a, radius, has), box_mean(b, radius, has)


def _solve_symmetric(c: int, upper: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Per pixel, solve S x = rhs[k] for a symmetric positive definite (C, C) ``S`` given by
    its upper triangle (``triu_indices`` order, planes (C(C+1)/2, H, W)); ``rhs``
    (K, C, H, W). Three bands (RGB) in closed form (the adjugate: ~4x faster than a batched
    ``torch.linalg.solve`` of one 3 x 3 system per pixel), others by ``linalg.solve``."""
    if c == 3:
        s00, s01, s02, s11, s12, s22 = upper
        i00 = s11 * s22 - s12 * s12
        i01 = s02 * s12 - s01 * s22
        i02 = s01 * s12 - s02 * s11
        i11 = s00 * s22 - s02 * s02
        i12 = s01 * s02 - s00 * s12
        i22 = s00 * s11 - s01 * s01
        det = s00 * i00 + s01 * i01 + s02 * i02
        r0, r1, r2 = rhs[:, 0], rhs[:, 1], rhs[:, 2]
        return torch.stack([i00 * r0 + i01 * r1 + i02 * r2,
                            i01 * r0 + i11 * r1 + i12 * r2,
                            i02 * r0 + i12 * r1 + i22 * r2], 1) / det
    iu = torch.triu_indices(c, c, device=upper.device)
    full = upper.new_empty((c, c, *upper.shape[1:]))
    full[iu[0], iu[1]] = upper
    full[iu[1], iu[0]] = upper
    x = torch.linalg.solve(full.permute(2, 3, 0, 1), rhs.permute(2, 3, 1, 0))  # (H, W, C, K)
    return x.permute(3, 2, 0, 1)


def apply_coefficients(a: torch.Tensor, b: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
    """``sum_c a[:, c] * guide[c] + b`` for coefficients on ``guide``'s grid (K, C, H, W)."""
    out = b.clone()
    for c in range(guide.shape[0]):
        out.addcmul_(a[:, c], guide[c][None])
    return out


def guided_filter(guide: torch.Tensor, src: torch.Tensor, radius: int, eps: float,
                  weight: torch.Tensor | None = None) -> torch.Tensor:
    """He et al.'s guided filter of ``src`` (K, H, W) with ``guide`` (C, H, W), both on one
    grid (the plain, not the fast, filter)."""
    a, b = guided_coefficients(guide, src, radius, eps, weight)
    return apply_coefficients(a, b, guide)


def fast_guided_upsample(src_low: torch.Tensor, guide_low: torch.Tensor,
                         pixels: torch.Tensor, radius: int, eps: float, *,
                         scale: float = 1.0, colour: bool = False,
                         weight_low: torch.Tensor | None = None,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """The fast guided filter as joint upsampling: coefficients fitted on the low grid
    (``src_low`` (K, h, w), ``guide_low`` (C, h, w): the bands or their mean, see
    :func:`guide_planes`), upsampled bilinearly (pixel centres aligned, as
    :func:`torch.nn.functional.interpolate` with ``align_corners=False``) onto the grid of
    ``pixels`` (bands, H, W; any dtype, times ``scale`` = the guide's scale) and applied
    there: to each band with its own coefficient (``colour``) or to their mean. Returns
    (K, H, W), in ``out`` if given.

    The high-resolution guide is never formed: the scale and the mean over the bands go
    into the coefficients, and the pixels (uint8, say) are promoted as they are multiplied,
    one band at a time, so the work there is K + 1 upsampled planes and a multiply-add per
    band and class."""
    a, b = guided_coefficients(guide_low, src_low, radius, eps, weight_low)
    size = tuple(pixels.shape[-2:])
    bands = pixels.shape[0]
    out = _up(b, size, out)
    shared = None if colour else _up(a[:, 0], size)
    for c in range(bands):
        coef = _up(a[:, c], size) if colour else shared
        for k in range(out.shape[0]):
            out[k].addcmul_(coef[k], pixels[c], value=scale if colour else scale / bands)
    return out


def _up(x: torch.Tensor, size: tuple[int, ...], out: torch.Tensor | None = None
        ) -> torch.Tensor:
    y = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
    if out is None:
        return y
    out.copy_(y)
    return out


def guide_planes(pixels: torch.Tensor, colour: bool) -> torch.Tensor:
    """The guide from (bands, H, W) pixels scaled to [0, 1]: all bands, or their mean."""
    return pixels if colour and pixels.shape[0] > 1 else pixels.mean(0, keepdim=True)


def upsample_probabilities(probs: torch.Tensor, guide_low: torch.Tensor,
                           pixels: torch.Tensor, *, scale: float = 1.0,
                           valid_low: torch.Tensor | None = None,
                           valid_high: torch.Tensor | None = None, radius: int | None = None,
                           eps: float | None = None, colour: bool | None = None
                           ) -> torch.Tensor:
    """Class probabilities (K, h, w) on the model grid -> (K, H, W) on the finer input grid,
    edge-aware (:func:`fast_guided_upsample`).

    ``guide_low`` (bands, h, w) is the image the model saw, scaled to [0, 1] (value / the
    card's value range), and ``pixels`` (bands, H, W) the same window's native pixels, raw
    (any dtype): ``pixels * scale`` is on ``guide_low``'s scale. ``valid_low`` /
    ``valid_high`` (bool; None: all valid): nodata on either grid; the fit leaves invalid
    model pixels out, and invalid native pixels (whose values may be anything, NaN
    included) get the bilinear upsampling. ``radius``, ``eps``, ``colour``: None =
    :data:`RADIUS`, :data:`EPS`, :data:`COLOUR`.

    Every pixel of the result is a probability vector: clamped at 0 and renormalised to sum
    1. Two classes that already sum to one (a softmax's) are filtered as one; the filter is
    linear, so the pair still sums to one.
    """
    radius = RADIUS if radius is None else radius
    eps = EPS if eps is None else eps
    colour = (COLOUR if colour is None else colour) and 1 < pixels.shape[0] <= MAX_COLOUR_BANDS
    size = tuple(pixels.shape[-2:])
    probs = probs.float()
    g_low = guide_planes(guide_low.float(), colour)
    w_low = None if valid_low is None else valid_low.to(g_low.dtype)
    k = probs.shape[0]
    pair = k == 2 and bool(((probs.sum(0) - 1).abs() <= _SUMS_TO_ONE).all())
    if pair:
        q = probs.new_empty((2, *size))
        fast_guided_upsample(probs[1:], g_low, pixels, radius, eps, scale=scale,
                             colour=colour, weight_low=w_low, out=q[1:])
        q[1].clamp_(0.0, 1.0)
        q[0].copy_(q[1]).neg_().add_(1.0)
    else:
        q = fast_guided_upsample(probs, g_low, pixels, radius, eps, scale=scale,
                                 colour=colour, weight_low=w_low)
        q.clamp_(min=0.0)
        q /= q.sum(0, keepdim=True).clamp_min(1e-12)  # >= 1 before clamping: never 0
    if valid_high is not None and not bool(valid_high.all()):
        q = torch.where(valid_high, q, _up(probs, size))
    return q

"""Training chips: the compact ``.npz`` arrays the training loops read, and their sampler.

An array file holds ``images`` (N, bands, T, T) uint8/uint16, ``labels`` (N, T, T) uint8
with 255 = ignore, ``classes``, ``gsd``, ``source``; optionally ``coarse`` (N, K, T, T)
uint8, probabilities x 255 of coarse maps made beforehand (e.g. by a coarse model that never
saw the chip's area), ``chip_gsd`` and ``weight`` (see :class:`ChipSampler`). Made by
:mod:`idgbr_geo.datasets` or ``release/prepare_data.py``; read here with numpy and torch only,
so training runs on any machine with torch. Augmentation is what users' scenes differ by:
random scale (``scale``, log-uniform), flips/rot90, colour jitter and, with ``sensor``,
gamma, haze, blur, noise and JPEG.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .cards import Normalization
from .config import COLOUR_AUGMENTATIONS, SENSOR_AUGMENTATIONS
from .errors import UserError

#: ImageNet statistics of 8-bit RGB on [0, 1]: the input scaling of pretrained encoders
IMAGENET = Normalization(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


def load_npz(path: str | Path) -> dict[str, Any]:
    """Read a training array file (fails with one clear line if it is not one)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read training arrays {path}: {exc}") from None
    for key in ("images", "labels", "classes"):
        if key not in data:
            raise UserError(f"{path} is not a training array file (no {key!r})")
    im, lb = data["images"], data["labels"]
    if im.ndim != 4 or lb.ndim != 3 or im.shape[0] != lb.shape[0] or im.shape[2:] != lb.shape[1:]:
        raise UserError(f"{path}: images {im.shape} and labels {lb.shape} do not match")
    data["classes"] = [str(c) for c in data["classes"]]
    return data


def fit_normalization(images: np.ndarray) -> Normalization:
    """Per-band mean/std of the training chips (deterministic: same data -> same numbers)."""
    norm = Normalization()
    div = norm.divisor(images.dtype)
    sub = images[:: max(1, len(images) // 256)].astype(np.float64) / div
    return Normalization(mean=[float(v) for v in sub.mean(axis=(0, 2, 3))],
                         std=[float(max(v, 1e-3)) for v in sub.std(axis=(0, 2, 3))],
                         value_range=norm.value_range)


class ChipSampler:
    """Random augmented crops from the chip arrays, as normalised torch batches.

    Optional arrays of the npz widen what one file can hold: ``chip_gsd`` (N,) the ground
    pixel size of each chip (chips of several sources kept near their native resolution;
    each crop is then cut so that it lands at the model ``gsd`` times the random ``scale``)
    and ``weight`` (N,) sampling weights (to balance sources of very different sizes)."""

    def __init__(self, data: dict[str, Any], norm: Normalization, crop: int,
                 rng: np.random.Generator, scale: tuple[float, float] = (0.7, 1.4),
                 colour: bool | str = True, sensor: bool | str = False) -> None:
        self.images, self.labels = data["images"], data["labels"]
        n = len(self.images)
        self.coarse = data.get("coarse")
        if self.coarse is not None and (self.coarse.ndim != 4 or self.coarse.shape[0] != n
                                        or self.coarse.shape[2:] != self.images.shape[2:]):
            raise UserError(f"coarse maps {self.coarse.shape} do not match the images "
                            f"{self.images.shape}")
        self.zoom = np.ones(n)
        if "chip_gsd" in data:
            chip_gsd = np.asarray(data["chip_gsd"], np.float64)
            model_gsd = float(data.get("gsd", np.nan))
            if (chip_gsd.shape != (n,) or not np.isfinite(chip_gsd).all()
                    or (chip_gsd <= 0).any() or not model_gsd > 0):
                raise UserError("'chip_gsd' must hold one pixel size > 0 per chip, with the "
                                "model 'gsd' given")
            self.zoom = model_gsd / chip_gsd  # source pixels per model pixel
        self.div = norm.divisor(self.images.dtype)
        self.mean = torch.tensor(norm.mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(norm.std, dtype=torch.float32)[:, None, None]
        self.crop, self.rng, self.scale = crop, rng, scale
        if colour not in COLOUR_AUGMENTATIONS and not isinstance(colour, bool):
            raise UserError(f"colour augmentation must be one of {COLOUR_AUGMENTATIONS}, "
                            f"not {colour!r}")
        #: False (none), True or "mild" (:meth:`_jitter`), "strong" (:meth:`_strong_colour`)
        self.colour = "mild" if colour is True else colour
        if sensor not in SENSOR_AUGMENTATIONS and not isinstance(sensor, bool):
            raise UserError(f"sensor augmentation must be one of {SENSOR_AUGMENTATIONS}, "
                            f"not {sensor!r}")
        #: False (none), True or "mild", "wide" (:data:`SENSOR_RANGES`)
        self.sensor = "mild" if sensor is True else sensor
        valid = (self.labels != 255).reshape(n, -1).mean(1)
        self.candidates = np.flatnonzero(valid > 0.05)
        if len(self.candidates) == 0:
            raise UserError("the training arrays hold no labelled pixels")
        self.p = None
        if "weight" in data:
            w = np.asarray(data["weight"], np.float64)
            if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any():
                raise UserError("'weight' must hold one sampling weight >= 0 per chip")
            w = w[self.candidates]
            if w.sum() <= 0:
                raise UserError("the training arrays' weights are all 0")
            self.p = w / w.sum()

    def sample(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Images, labels and the stored coarse maps (probabilities; None without them) of
        ``batch`` random crops, all augmented alike."""
        imgs, labs, pres = [], [], []
        t = self.images.shape[-1]
        lo, hi = np.log(self.scale[0]), np.log(self.scale[1])
        for i in self.rng.choice(self.candidates, size=batch, p=self.p):
            s = float(np.exp(self.rng.uniform(lo, hi))) / self.zoom[i]
            src = int(min(t, max(8, round(self.crop / s))))
            r, c = self.rng.integers(0, t - src + 1, size=2)
            img = torch.from_numpy(self.images[i, :, r:r + src, c:c + src].astype(np.float32))
            lab = torch.from_numpy(self.labels[i, r:r + src, c:c + src].astype(np.int64))
            pre = (None if self.coarse is None else
                   torch.from_numpy(self.coarse[i, :, r:r + src, c:c + src].astype(np.float32)))
            if src != self.crop:
                img, pre = (None if x is None else
                            F.interpolate(x[None], size=(self.crop, self.crop), mode="bilinear",
                                          antialias=src > self.crop, align_corners=False)[0]
                            for x in (img, pre))
                lab = F.interpolate(lab[None, None].float(), size=(self.crop, self.crop),
                                    mode="nearest")[0, 0].long()
            k = int(self.rng.integers(4))
            img, lab = torch.rot90(img, k, (1, 2)), torch.rot90(lab, k, (0, 1))
            flip = self.rng.random() < 0.5
            if flip:
                img, lab = img.flip(2), lab.flip(1)
            if pre is not None:
                pre = torch.rot90(pre, k, (1, 2))
                pres.append((pre.flip(2) if flip else pre) / 255.0)
            img = img / self.div
            if self.colour == "strong":
                img = self._strong_colour(img)
            elif self.colour:
                img = self._jitter(img)
            if self.sensor:
                img = self._sensor(img)
            imgs.append((img - self.mean) / self.std)
            labs.append(lab)
        return torch.stack(imgs), torch.stack(labs), torch.stack(pres) if pres else None

    def _sensor(self, img: torch.Tensor) -> torch.Tensor:
        """What other cameras and pipelines do to [0, 1] values: gamma, haze, blur, noise,
        JPEG compression and ("wide") band gains, each at random and of random strength
        (:data:`SENSOR_RANGES`)."""
        from .degrade import gaussian_blur

        rng, r = self.rng, SENSOR_RANGES[self.sensor]
        if rng.random() < r["gamma"][0]:
            g = r["gamma"][1]
            img = img.clamp(0, 1) ** float(np.exp(rng.uniform(-g, g)))
        if rng.random() < r["haze"][0]:
            a = float(rng.uniform(*r["haze"][1]))
            img = img * (1 - a) + a * float(rng.uniform(0.6, 0.9))
        if rng.random() < r["blur"][0]:
            img = gaussian_blur(img[None], float(rng.uniform(*r["blur"][1])))[0]
        if rng.random() < r["noise"][0]:
            img = img + torch.from_numpy(rng.normal(0, rng.uniform(*r["noise"][1]), img.shape)
                                         ).float()
        if rng.random() < r["jpeg"][0] and img.shape[0] in (1, 3):
            img = jpeg(img, int(rng.integers(*r["jpeg"][1])))
        if "gains" in r and rng.random() < r["gains"][0]:
            lo, hi = r["gains"][1]
            img = img * torch.from_numpy(rng.uniform(lo, hi, (img.shape[0], 1, 1))).float()
        return img.clamp(0, 1)

    def _jitter(self, img: torch.Tensor) -> torch.Tensor:
        """Brightness, contrast, saturation and per-band gain jitter on [0, 1] values."""
        rng = self.rng
        gray = img.mean(0, keepdim=True)
        img = gray + (img - gray) * rng.uniform(0.7, 1.3)  # saturation
        img = (img - img.mean()) * rng.uniform(0.75, 1.25) + img.mean()  # contrast
        gains = torch.from_numpy(rng.uniform(0.92, 1.08, size=(img.shape[0], 1, 1)))
        img = img * gains.float() + rng.uniform(-0.1, 0.1)  # brightness / white balance
        return img.clamp(0, 1)

    def _strong_colour(self, img: torch.Tensor) -> torch.Tensor:
        """Wider colour shifts than :meth:`_jitter`, for models that must not learn one
        region's roof or road colours: the hue of an RGB chip turned by up to 40 degrees
        (half the time), 10% of chips grey, saturation 0.4-1.6x, contrast 0.6-1.4x, per-band
        gains 0.8-1.2 (colour chips) and brightness +-0.15."""
        rng = self.rng
        grey = img.shape[0] == 3 and rng.random() < 0.1
        if grey:  # (and no band gains below: a grey camera's bands are one)
            img = (img * _LUMA[:, None, None]).sum(0, keepdim=True).expand_as(img).clone()
        elif img.shape[0] == 3 and rng.random() < 0.5:
            img = _turn_hue(img, float(np.deg2rad(rng.uniform(-40, 40))))
        mean = img.mean(0, keepdim=True)
        img = mean + (img - mean) * float(np.exp(rng.uniform(np.log(0.4), np.log(1.6))))
        img = (img - img.mean()) * rng.uniform(0.6, 1.4) + img.mean()
        if not grey:
            img = img * torch.from_numpy(rng.uniform(0.8, 1.2, (img.shape[0], 1, 1))).float()
        img = img + rng.uniform(-0.15, 0.15)
        return img.clamp(0, 1)


#: RGB -> luma (BT.601): the grey a colour chip becomes
_LUMA = torch.tensor([0.299, 0.587, 0.114])

#: the sensor augmentation's draws, per kind: (probability, range). "mild": the bundled
#: models' (gamma exp(+-0.4), haze 0.1-0.4, blur sigma 0.4-1.5 px, noise sigma 0.01-0.04,
#: JPEG quality 30-89); "wide" reaches past where the held-out scenes under other cameras'
#: pixels lost most (docs/experiments.md, session 34) and adds per-band gains
SENSOR_RANGES: dict[str, dict[str, tuple[float, Any]]] = {
    "mild": {"gamma": (0.3, 0.4), "haze": (0.2, (0.1, 0.4)), "blur": (0.3, (0.4, 1.5)),
             "noise": (0.2, (0.01, 0.04)), "jpeg": (0.3, (30, 90))},
    "wide": {"gamma": (0.4, 0.7), "haze": (0.3, (0.1, 0.5)), "blur": (0.4, (0.4, 2.5)),
             "noise": (0.3, (0.01, 0.07)), "jpeg": (0.4, (20, 90)),
             "gains": (0.3, (0.7, 1.3))},
}


def _turn_hue(img: torch.Tensor, angle: float) -> torch.Tensor:
    """(3, H, W) RGB turned by ``angle`` radians about the grey axis (Rodrigues' rotation
    about (1, 1, 1)/sqrt(3)): hues move round the colour wheel (red roofs towards orange
    or magenta), greys and each pixel's band mean stay."""
    c, s = np.cos(angle), np.sin(angle)
    k = 1 / np.sqrt(3)
    rot = (c * np.eye(3) + s * np.array([[0, -k, k], [k, 0, -k], [-k, k, 0]])
           + (1 - c) * k * k * np.ones((3, 3)))
    return torch.einsum("ij,jhw->ihw", torch.from_numpy(rot).float(), img)


class _SamplerStream(torch.utils.data.IterableDataset):
    """Endless augmented batches from a :class:`ChipSampler` in a worker process, each
    worker with its own random stream (``seed``, ``start`` and its id)."""

    def __init__(self, data: dict[str, Any], norm: Normalization, crop: int, batch: int,
                 seed: int, start: int, scale: tuple[float, float], sensor: bool | str,
                 colour: bool | str = True) -> None:
        self.args = (data, norm, crop)
        self.batch, self.seed, self.start = batch, seed, start
        self.scale, self.sensor, self.colour = scale, sensor, colour

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        info = torch.utils.data.get_worker_info()
        torch.set_num_threads(1)  # one core per worker; the workers are the parallelism
        rng = np.random.default_rng([self.seed, self.start, 0 if info is None else info.id])
        sampler = ChipSampler(*self.args, rng, scale=self.scale, sensor=self.sensor,
                              colour=self.colour)
        while True:
            yield sampler.sample(self.batch)


def sample_batches(data: dict[str, Any], norm: Normalization, crop: int, batch: int,
                   rng: np.random.Generator, *, scale: tuple[float, float], sensor: bool | str,
                   colour: bool | str = True, workers: int = 0, seed: int = 0, start: int = 0
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Endless training batches: drawn with ``rng`` in this process (``workers`` 0, the
    reproducible stream of earlier runs), or made ahead by ``workers`` processes, each
    seeded from ``seed``, ``start`` (the iteration a resumed run starts at) and its id, so
    that a GPU is not kept waiting by the augmentation."""
    if workers <= 0:
        sampler = ChipSampler(data, norm, crop, rng, scale=scale, sensor=sensor, colour=colour)
        while True:
            yield sampler.sample(batch)
    stream = _SamplerStream(data, norm, crop, batch, seed, start, scale, sensor, colour)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                         prefetch_factor=4, persistent_workers=False)
    yield from loader


def jpeg(img: torch.Tensor, quality: int) -> torch.Tensor:
    """(1 or 3, H, W) values in [0, 1] through a JPEG encode/decode at ``quality``."""
    import io

    from PIL import Image

    u8 = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(u8[..., 0] if u8.shape[2] == 1 else u8).save(buf, "JPEG", quality=quality)
    out = np.asarray(Image.open(buf), dtype=np.float32) / 255
    return torch.from_numpy(out.reshape(u8.shape)).permute(2, 0, 1).contiguous()


def val_batches(val: dict[str, Any], norm: Normalization, limit: int = 48
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised batches of 8 of up to ``limit`` chips spread evenly over the array."""
    n = len(val["images"])
    idx = np.linspace(0, n - 1, min(n, limit)).round().astype(int)
    mean = torch.tensor(norm.mean)[:, None, None]
    std = torch.tensor(norm.std)[:, None, None]
    div = norm.divisor(val["images"].dtype)
    for j in range(0, len(idx), 8):
        sel = idx[j:j + 8]
        img = (torch.from_numpy(val["images"][sel].astype(np.float32)) / div - mean) / std
        yield img, torch.from_numpy(val["labels"][sel].astype(np.int64))

"""Training loops for the coarse segmentor and the diffusion refiner (torch + numpy only).

They read the compact ``.npz`` chip arrays of :mod:`idgbr_geo.datasets` (``images``
(N, bands, T, T) uint8/uint16, ``labels`` (N, T, T) uint8 with 255 = ignore, ``classes``,
``gsd``, ``source``; optionally ``coarse`` (N, K, T, T) uint8, probabilities x 255 of coarse
maps made beforehand, e.g. by a coarse model that never saw the chip's area) and import
nothing from the geospatial stack, so training runs on any machine with torch, including a
GPU box. Augmentation: random scale (0.7-1.4x, since the scenes users refine come from
other sensors and GSDs), flips/rot90 and colour jitter. Every ``checkpoint_every``
iterations the full training state goes to ``out_dir/checkpoint.pt`` (resumable with
``resume=True``) and a row to ``out_dir/log.csv``. Seeds fix the run. Settings are typed
(:mod:`idgbr_geo.config`): the architecture (:class:`CoarseConfig`, :class:`RefinerConfig`) and
the training settings (:class:`TrainingConfig`, :class:`RefinerTrainingConfig`) are stored
apart in the checkpoint (:mod:`idgbr_geo.checkpoints` reads it and exports the model) and,
by :func:`~idgbr_geo.checkpoints.export_model`, in the card.
"""

from __future__ import annotations

import contextlib
import csv
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .cards import Normalization
from .checkpoints import BAD_STATE, build_segmentor_net, checkpoint_settings, write_checkpoint
from .config import (
    RUN_KEYS,
    ArchConfig,
    CoarseConfig,
    LiteFpnConfig,
    LiteRefinerConfig,
    RefinerConfig,
    RefinerTrainingConfig,
    SamplingConfig,
    TrainingConfig,
    arch_name,
    split_config,
)
from .degrade import degrade
from .diffusion import training_loss
from .errors import UserError, first_line
from .lite_refiner import build_lite_refiner, encoder_state
from .networks import build_refiner_net
from .registry import load_checkpoint, resolve_device

#: the defaults of the training functions' keyword arguments
_T = TrainingConfig
#: ImageNet statistics of 8-bit RGB on [0, 1]: the input scaling of pretrained encoders
IMAGENET = Normalization(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


# --------------------------------------------------------------------------- data


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
                 colour: bool = True, sensor: bool = False) -> None:
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
        self.colour, self.sensor = colour, sensor
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
            if self.colour:
                img = self._jitter(img)
            if self.sensor:
                img = self._sensor(img)
            imgs.append((img - self.mean) / self.std)
            labs.append(lab)
        return torch.stack(imgs), torch.stack(labs), torch.stack(pres) if pres else None

    def _sensor(self, img: torch.Tensor) -> torch.Tensor:
        """What other cameras and pipelines do to [0, 1] values: gamma, haze, blur, noise and
        JPEG compression, each at random and of random strength."""
        from .degrade import gaussian_blur

        rng = self.rng
        if rng.random() < 0.3:
            img = img.clamp(0, 1) ** float(np.exp(rng.uniform(-0.4, 0.4)))
        if rng.random() < 0.2:
            a = float(rng.uniform(0.1, 0.4))
            img = img * (1 - a) + a * float(rng.uniform(0.6, 0.9))
        if rng.random() < 0.3:
            img = gaussian_blur(img[None], float(rng.uniform(0.4, 1.5)))[0]
        if rng.random() < 0.2:
            img = img + torch.from_numpy(rng.normal(0, rng.uniform(0.01, 0.04), img.shape)
                                         ).float()
        if rng.random() < 0.3 and img.shape[0] in (1, 3):
            img = _jpeg(img, int(rng.integers(30, 90)))
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


# ------------------------------------------------------------------------ helpers


def _jpeg(img: torch.Tensor, quality: int) -> torch.Tensor:
    """(1 or 3, H, W) values in [0, 1] through a JPEG encode/decode at ``quality``."""
    import io

    from PIL import Image

    u8 = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(u8[..., 0] if u8.shape[2] == 1 else u8).save(buf, "JPEG", quality=quality)
    out = np.asarray(Image.open(buf), dtype=np.float32) / 255
    return torch.from_numpy(out.reshape(u8.shape)).permute(2, 0, 1).contiguous()


def _soft_dice(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """1 - mean soft Dice over classes present in the batch (helps thin, rare classes)."""
    valid = (labels != 255)
    p = torch.softmax(logits, 1) * valid[:, None]
    onehot = F.one_hot(torch.where(valid, labels, 0), k).permute(0, 3, 1, 2).float()
    onehot = onehot * valid[:, None]
    inter = (p * onehot).sum((0, 2, 3))
    denom = p.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    present = onehot.sum((0, 2, 3)) > 0
    if not present.any():
        return logits.sum() * 0
    dice = (2 * inter + 1) / (denom + 1)
    return 1 - dice[present].mean()


def _lr_at(it: int, iterations: int, lr: float, warmup: int = 100) -> float:
    if it < warmup:
        return lr * (it + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (it - warmup) / max(1, iterations - warmup)))


def _miou(pred: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    valid = labels != 255
    ious = []
    for c in range(k):
        p, t = (pred == c) & valid, (labels == c) & valid
        union = (p | t).sum().item()
        if (t.sum().item()) > 0:
            ious.append((p & t).sum().item() / union)
    return float(np.mean(ious)) if ious else float("nan")


def _val_batches(val: dict[str, Any], norm: Normalization, limit: int = 48):
    n = len(val["images"])
    idx = np.linspace(0, n - 1, min(n, limit)).round().astype(int)
    mean = torch.tensor(norm.mean)[:, None, None]
    std = torch.tensor(norm.std)[:, None, None]
    div = norm.divisor(val["images"].dtype)
    for j in range(0, len(idx), 8):
        sel = idx[j:j + 8]
        img = (torch.from_numpy(val["images"][sel].astype(np.float32)) / div - mean) / std
        yield img, torch.from_numpy(val["labels"][sel].astype(np.int64))


class _Run:
    """Shared bookkeeping: device, seeds, resume, checkpoints, CSV log, progress bar."""

    def __init__(self, kind: str, out_dir: str | Path, train_npz: str | Path, *,
                 device: str, resume: bool, normalization: Normalization | None,
                 arch: ArchConfig, training: TrainingConfig) -> None:
        self.kind = kind
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt = self.out / "checkpoint.pt"
        self.log = self.out / "log.csv"
        self.device = resolve_device(device)
        self.data = load_npz(train_npz)
        self.classes = self.data["classes"]
        self.norm = normalization or fit_normalization(self.data["images"])
        torch.manual_seed(training.seed)
        self.rng = np.random.default_rng(training.seed)
        self.arch, self.training = arch, training
        self.in_channels, self.num_classes = int(self.data["images"].shape[1]), len(self.classes)
        self.start = 0
        self.state: dict[str, Any] | None = None
        if resume and self.ckpt.is_file():
            self.state = load_checkpoint(self.ckpt)
            if self.state.get("kind") != kind:
                raise UserError(f"{self.ckpt} is a {self.state.get('kind')} checkpoint, "
                                f"not {kind}")
            try:
                # the network and its objective come from the checkpoint, the run's length
                # and pace (iterations, batch size, lr, ...) from this call
                self.arch, saved, _, _ = checkpoint_settings(self.state, kind, self.ckpt)
                self.training = replace(saved, **{k: getattr(training, k) for k in RUN_KEYS
                                                  if k in training.keys()})
                self.norm = Normalization(**self.state["normalization"])
                self.start = int(self.state["iteration"])
                self.rng.bit_generator.state = self.state["numpy_rng"]
                torch.set_rng_state(self.state["torch_rng"])
            except BAD_STATE as exc:
                raise UserError(f"{self.ckpt} cannot be resumed: {first_line(exc)}") from None
        elif self.log.exists():
            self.log.unlink()

    @property
    def shape(self) -> dict[str, int]:
        """The network's input channels and classes (the data's)."""
        return {"in_channels": self.in_channels, "num_classes": self.num_classes}

    def restore(self, net: torch.nn.Module, opt: torch.optim.Optimizer,
                ema: AveragedModel | None = None) -> None:
        if self.state is None:
            return
        try:
            net.load_state_dict(self.state.get("trained_model", self.state["model"]))
            opt.load_state_dict(self.state["optimizer"])
            if ema is not None:  # (the config, "ema" included, came from the checkpoint)
                ema.load_state_dict(self.state["ema"])
        except BAD_STATE as exc:
            raise UserError(f"{self.ckpt} cannot be resumed: {first_line(exc)}") from None

    def save(self, net: torch.nn.Module, opt: torch.optim.Optimizer, it: int,
             ema: AveragedModel | None = None) -> None:
        """``model`` holds the weights to use: the moving average when there is one (the
        optimiser's own weights are kept as ``trained_model`` to resume from)."""
        extra = {} if ema is None else {"trained_model": net.state_dict(),
                                        "ema": ema.state_dict()}
        write_checkpoint(self.ckpt, {
            "kind": self.kind, "arch": arch_name(self.arch),
            "config": {**self.shape, **self.arch.to_dict()}, "training": self.training.to_dict(),
            "normalization": asdict(self.norm), "classes": list(self.classes),
            "gsd": float(self.data.get("gsd", np.nan)),
            "source": str(self.data.get("source", "")), "iteration": int(it),
            "numpy_rng": self.rng.bit_generator.state,
        }, {"model": (net if ema is None else ema.module).state_dict(),
            "optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(), **extra})

    def write_log(self, row: dict[str, Any]) -> None:
        new = not self.log.exists()
        with open(self.log, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)

    def progress(self, iterations: int, enabled: bool):
        from tqdm.auto import tqdm

        return tqdm(range(self.start, iterations), initial=self.start, total=iterations,
                    desc=f"train {self.kind}", disable=not enabled)


# -------------------------------------------------------------------------- coarse


def train_coarse(
    train_npz: str | Path,
    out_dir: str | Path,
    *,
    val_npz: str | Path | None = None,
    iterations: int = _T.iterations,
    batch_size: int = _T.batch_size,
    lr: float = _T.lr,
    seed: int = _T.seed,
    device: str = "auto",
    resume: bool = False,
    config: Mapping[str, Any] | None = None,
    progress: bool = True,
    crop: int = _T.crop,
    normalization: Normalization | None = None,
    checkpoint_every: int = _T.checkpoint_every,
) -> Path:
    """Train the coarse segmentor (cross-entropy + soft Dice); return the checkpoint path.

    ``config``: the architecture ``arch`` (``idgbr-coarse``, the default, or ``lite-fpn``),
    its settings (:class:`CoarseConfig`: ``widths``, ``output_stride``; :class:`LiteFpnConfig`:
    ``variant``, ``channels``) and ``ema`` (:class:`TrainingConfig`), in one flat object as
    ``train coarse --config`` takes them; an unknown key (another architecture's included)
    is a UserError. A new ``lite-fpn`` run starts its encoder from ImageNet weights (the
    ``train`` extra; a UserError without it), a resumed one from its checkpoint.
    """
    arch, extra = split_config("coarse", config, "config")
    training = TrainingConfig.from_dict(
        {"iterations": iterations, "batch_size": batch_size, "lr": lr, "seed": seed,
         "crop": crop, "checkpoint_every": checkpoint_every, **extra}, "training settings")
    if normalization is None and isinstance(arch, LiteFpnConfig):
        normalization = IMAGENET  # what the pretrained encoder's first layer expects
    run = _Run("coarse", out_dir, train_npz, device=device, resume=resume,
               normalization=normalization, arch=arch, training=training)
    k = len(run.classes)
    # a new lite-fpn run starts from ImageNet weights; a resumed one has its own
    net = build_segmentor_net(cast(CoarseConfig | LiteFpnConfig, run.arch), **run.shape,
                              pretrained=run.state is None).to(run.device)

    def step(img: torch.Tensor, lab: torch.Tensor, _pre: torch.Tensor | None
             ) -> tuple[torch.Tensor, dict[str, float]]:
        logits = net(img)
        ce = F.cross_entropy(logits, lab, ignore_index=255)
        ce = ce if torch.isfinite(ce) else logits.sum() * 0
        return ce + 0.5 * _soft_dice(logits, lab, k), {}

    val = load_npz(val_npz) if val_npz else None
    return _fit(run, net, step, progress=progress,
                validate=None if val is None else
                (lambda: _validate_coarse(net, val, run.norm, k, run.device)))


def _fit(run: _Run, net: torch.nn.Module,
         step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None],
                        tuple[torch.Tensor, dict[str, float]]],
         *, progress: bool,
         validate: Callable[[], dict[str, float]] | None) -> Path:
    """The loop both stages share: AdamW with the warm-up/cosine schedule, gradient clipping,
    and every ``checkpoint_every`` iterations a CSV row (mean loss, ``step``'s extra parts,
    optional validation) and a resumable checkpoint.

    ``ema`` > 0 keeps an exponential moving average of the weights (and batch-norm
    statistics) with that decay, as diffusion models are usually trained: the averaged
    weights are validated and exported, smoothing out the last noisy optimiser steps."""
    tc = run.training
    iterations, batch_size, lr = tc.iterations, tc.batch_size, tc.lr
    checkpoint_every = tc.checkpoint_every
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    decay = tc.ema
    ema = (AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
           if decay > 0 else None)
    run.restore(net, opt, ema)
    sampler = ChipSampler(run.data, run.norm, tc.crop, run.rng, scale=tc.scale,
                          sensor=tc.sensor_aug)
    t0, acc = time.time(), []
    for it in run.progress(iterations, progress):
        net.train()
        for g in opt.param_groups:
            g["lr"] = _lr_at(it, iterations, lr)
        img, lab, pre = sampler.sample(batch_size)
        loss, parts = step(img.to(run.device), lab.to(run.device),
                           None if pre is None else pre.to(run.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if ema is not None:
            ema.update_parameters(net)
        acc.append(loss.item())
        if (it + 1) % checkpoint_every == 0 or it + 1 == iterations:
            row = {"iteration": it + 1, "loss": float(np.mean(acc)), **parts,
                   "lr": opt.param_groups[0]["lr"], "seconds": round(time.time() - t0, 1)}
            if validate is not None:
                with _averaged_weights(net, ema):
                    row.update(validate())
            run.write_log(row)
            run.save(net, opt, it + 1, ema)
            acc = []
    return run.ckpt


@contextlib.contextmanager
def _averaged_weights(net: torch.nn.Module, ema: AveragedModel | None) -> Iterator[None]:
    """Within the block ``net`` carries the averaged weights (validation closures hold
    ``net``); the optimiser's own weights come back afterwards."""
    if ema is None:
        yield
        return
    own = {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(ema.module.state_dict())
    try:
        yield
    finally:
        net.load_state_dict(own)


@torch.no_grad()
def _validate_coarse(net, val, norm, k, device) -> dict[str, float]:
    net.eval()
    losses, preds, labs = [], [], []
    for img, lab in _val_batches(val, norm):
        logits = net(img.to(device))
        losses.append(float(F.cross_entropy(logits, lab.to(device), ignore_index=255)))
        preds.append(logits.argmax(1).cpu())
        labs.append(lab)
    return {"val_loss": float(np.nanmean(losses)),
            "val_miou": _miou(torch.cat(preds), torch.cat(labs), k)}


# ------------------------------------------------------------------------- refiner


def train_refiner(
    train_npz: str | Path,
    out_dir: str | Path,
    *,
    coarse: Any = None,
    val_npz: str | Path | None = None,
    iterations: int = _T.iterations,
    batch_size: int = _T.batch_size,
    lr: float = _T.lr,
    seed: int = _T.seed,
    device: str = "auto",
    resume: bool = False,
    config: Mapping[str, Any] | None = None,
    progress: bool = True,
    degradation: bool = RefinerTrainingConfig.degradation,
    crop: int = _T.crop,
    normalization: Normalization | None = None,
    checkpoint_every: int = _T.checkpoint_every,
) -> Path:
    """Train the guidance network + denoiser; return the checkpoint path.

    Each sample's coarse map comes from ``coarse`` (any Segmentor, fed the same normalised
    crops - so it must use the same normalisation) with probability ``p_model``, otherwise
    from a random degradation of the ground truth (:func:`idgbr_geo.degrade`). Training
    arrays that carry ``coarse`` maps use those (cropped and augmented with the image) in
    place of running ``coarse``: maps made by a model that never saw the chip's area carry
    the errors it makes on new scenes, which its maps of its own training chips do not.
    ``config``: :class:`RefinerConfig` and :class:`RefinerTrainingConfig` settings in one flat
    object, as ``train refiner --config`` takes them (an unknown key is a UserError);
    ``use_coarse=False`` trains the image-only ('no rough') ablation and ``mode="oneshot"``
    the non-iterative one.
    """
    arch, extra = split_config("refiner", config, "config")
    training = RefinerTrainingConfig.from_dict(
        {"iterations": iterations, "batch_size": batch_size, "lr": lr, "seed": seed,
         "crop": crop, "checkpoint_every": checkpoint_every, "degradation": degradation,
         **extra}, "training settings")
    if normalization is None and isinstance(arch, LiteRefinerConfig):
        normalization = IMAGENET  # the lite-fpn coarse model's, whose encoder it reads
    run = _Run("refiner", out_dir, train_npz, device=device, resume=resume,
               normalization=normalization, arch=arch, training=training)
    tc = cast(RefinerTrainingConfig, run.training)
    oneshot = cast(RefinerConfig | LiteRefinerConfig, run.arch).mode == "oneshot"
    k = len(run.classes)
    stored = run.data.get("coarse")
    if coarse is None and stored is None and not tc.degradation:
        raise UserError("the refiner needs coarse maps: give a coarse model, coarse maps in "
                        "the training arrays, or keep degradation")
    if stored is not None and stored.shape[1] != k:
        raise UserError(f"the training arrays' coarse maps have {stored.shape[1]} classes, "
                        f"their labels {k}")
    if coarse is not None and int(getattr(coarse, "num_classes", k)) != k:
        raise UserError(f"the coarse model predicts {coarse.num_classes} classes, the training "
                        f"arrays have {k}")
    if isinstance(run.arch, LiteRefinerConfig):
        net: torch.nn.Module = build_lite_refiner(run.arch, **run.shape)
        if run.state is None:  # a new run reads the coarse model's (frozen) encoder
            if coarse is None:
                raise UserError(f"a {arch_name(run.arch)} refiner is trained on a lite-fpn "
                                "coarse model's encoder: give the coarse model")
            net.encoder.load_state_dict(encoder_state(coarse, run.arch.variant))
        net = net.to(run.device)
    else:
        net = build_refiner_net(cast(RefinerConfig, run.arch), **run.shape).to(run.device)
    gen = torch.Generator().manual_seed(seed + run.start)
    p_model = tc.p_model if coarse is not None or stored is not None else 0.0
    if not tc.degradation:
        p_model = 1.0

    def step(img: torch.Tensor, lab: torch.Tensor, pre: torch.Tensor | None
             ) -> tuple[torch.Tensor, dict[str, float]]:
        probs = _coarse_maps(img, lab, k, coarse, p_model, gen, run.rng,
                             perturb=tc.coarse_perturb, stored=pre)
        return training_loss(net, img, probs, lab, t_max=tc.t_max, p_uncond=tc.p_uncond,
                             p_coarse_x0=tc.p_coarse_x0, oneshot=oneshot,
                             boundary_weight=tc.boundary_weight,
                             boundary_radius=tc.boundary_radius)

    val = load_npz(val_npz) if val_npz else None
    return _fit(run, net, step, progress=progress,
                validate=None if val is None else
                (lambda: _validate_refiner(net, val, run.norm, k, run.device, coarse,
                                           oneshot)))


@torch.no_grad()
def _validate_refiner(net, val, norm, k, device, coarse, oneshot: bool) -> dict[str, float]:
    """mIoU of the coarse maps (coarse model, else fixed degradations) and of their
    refinement (the default sampling steps, :class:`SamplingConfig`)."""
    from .diffusion import sample

    net.eval()
    gen = torch.Generator().manual_seed(1)
    cs, rs, labs = [], [], []
    for img, lab in _val_batches(val, norm, limit=24):
        img = img.to(device)
        probs = (coarse.predict(img).float() if coarse is not None
                 else degrade(lab, k, generator=gen).to(device))
        logits = sample(net, img, probs, steps=SamplingConfig().steps, seed=0,
                        origins=[(0, 0)] * len(img), oneshot=oneshot)
        cs.append(probs.argmax(1).cpu())
        rs.append(logits.argmax(1).cpu())
        labs.append(lab)
    lab = torch.cat(labs)
    return {"val_miou_coarse": _miou(torch.cat(cs), lab, k),
            "val_miou_refined": _miou(torch.cat(rs), lab, k)}


@torch.no_grad()
def _coarse_maps(img: torch.Tensor, lab: torch.Tensor, k: int, coarse: Any, p_model: float,
                 gen: torch.Generator, rng: np.random.Generator, perturb: float = 0.0,
                 stored: torch.Tensor | None = None) -> torch.Tensor:
    """Per sample: the coarse model's map, or the ``stored`` one where the training arrays
    carry maps (prob p_model), or a degraded ground truth.

    On its own training chips the coarse model is nearly perfect, unlike on new scenes;
    ``perturb`` > 0 feeds it a corrupted copy of the image (noise, blur, colour shift; the
    refiner still sees the clean one) so that its maps carry the uncertain, partly wrong
    semantics it produces on unseen imagery.
    """
    use_model = rng.random(len(img)) < p_model
    out = torch.empty(len(img), k, *img.shape[-2:], device=img.device)
    if use_model.any():
        sel = torch.from_numpy(np.flatnonzero(use_model)).to(img.device)
        if stored is not None:
            out[sel] = stored[sel].to(img.device).float()
        else:
            x = img[sel]
            if perturb > 0:
                from .degrade import gaussian_blur

                n = len(x)
                x = gaussian_blur(x, float(rng.uniform(0, 2.0 * perturb)))
                shift = torch.from_numpy(rng.normal(0, 0.4 * perturb, (n, x.shape[1], 1, 1)))
                sigma = torch.from_numpy(rng.uniform(0, 0.6 * perturb, (n, 1, 1, 1)))
                noise = torch.randn(x.shape, generator=gen).to(x.device)
                x = x + shift.float().to(x.device) + sigma.float().to(x.device) * noise
            out[sel] = coarse.predict(x).to(img.device).float()
    if (~use_model).any():
        sel = torch.from_numpy(np.flatnonzero(~use_model)).to(img.device)
        out[sel] = degrade(lab[sel].cpu(), k, generator=gen).to(img.device)
    return out

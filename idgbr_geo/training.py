"""Training loops for the coarse segmentor and the diffusion refiner (torch + numpy only).

They read the chip arrays of :mod:`idgbr_geo.chips` (sampled and augmented there) and
import nothing from the geospatial stack, so training runs on any machine with torch,
including a GPU box. Every ``checkpoint_every``
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
from .chips import IMAGENET, fit_normalization, load_npz, sample_batches, val_batches
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
from .losses import coarse_loss
from .networks import build_refiner_net
from .predict import resolve_precision
from .registry import load_checkpoint, resolve_device
from .views import multiscale_probabilities

#: the defaults of the training functions' keyword arguments
_T = TrainingConfig


# ------------------------------------------------------------------------ helpers


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
    init_weights: Mapping[str, torch.Tensor] | None = None,
    workers: int = 0,
    precision: str = "float32",
) -> Path:
    """Train the coarse segmentor (cross-entropy + soft Dice); return the checkpoint path.

    ``config``: the architecture ``arch`` (``idgbr-coarse``, the default, or ``lite-fpn``),
    its settings (:class:`CoarseConfig`: ``widths``, ``output_stride``; :class:`LiteFpnConfig`:
    ``variant``, ``channels``) and ``ema`` (:class:`TrainingConfig`), in one flat object as
    ``train coarse --config`` takes them; an unknown key (another architecture's included)
    is a UserError. A new ``lite-fpn`` run starts its encoder from ImageNet weights (the
    ``train`` extra; a UserError without it), a resumed one from its checkpoint.
    ``init_weights`` (a state dict of the same architecture, e.g. a bundled model's
    ``segmentor.*`` tensors without the prefix) starts a new run from a trained network:
    fine-tuning, or a longer run whose checkpoint is gone. ``workers`` > 0 makes the
    augmented batches in that many processes, so that a GPU is not kept waiting.
    ``precision``: ``float32``, ``bfloat16`` (mixed precision: the networks' convolutions in
    bfloat16, weights, optimiser and losses in float32) or ``auto`` (bfloat16 where the CPU
    runs it natively, see :func:`~idgbr_geo.predict.fast_bfloat16`).
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
                              pretrained=run.state is None and init_weights is None)
    if run.state is None and init_weights is not None:
        _load_init(net, init_weights)
    net = net.to(run.device)

    def step(img: torch.Tensor, lab: torch.Tensor, _pre: torch.Tensor | None
             ) -> tuple[torch.Tensor, dict[str, float]]:
        return coarse_loss(net(img), lab, k, cldice=run.training.cldice,
                           lovasz=run.training.lovasz), {}

    val = load_npz(val_npz) if val_npz else None
    return _fit(run, net, step, progress=progress, workers=workers, precision=precision,
                validate=None if val is None else
                (lambda: _validate_coarse(net, val, run.norm, k, run.device)))


def _load_init(net: torch.nn.Module, weights: Mapping[str, torch.Tensor],
               allow_missing: str | None = None) -> None:
    """Load a trained network's weights to start from; keys under ``allow_missing`` may be
    absent (a shared encoder stored with the segmentor), nothing else."""
    try:
        missing, unexpected = net.load_state_dict(dict(weights), strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        raise UserError("the initial weights do not fit the network (they need the same "
                        f"architecture, bands and classes): {first_line(exc)}") from None
    missing = [k for k in missing if not (allow_missing and k.startswith(allow_missing))]
    if missing or unexpected:
        raise UserError("the initial weights do not fit the network (they need the same "
                        f"architecture, bands and classes): {len(missing)} missing "
                        f"(e.g. {missing[:1]}), {len(unexpected)} unexpected "
                        f"(e.g. {unexpected[:1]})")


def _fit(run: _Run, net: torch.nn.Module,
         step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None],
                        tuple[torch.Tensor, dict[str, float]]],
         *, progress: bool,
         validate: Callable[[], dict[str, float]] | None, workers: int = 0,
         peaks: Mapping[torch.nn.Module, float] | None = None,
         precision: str = "float32") -> Path:
    """The loop both stages share: AdamW with the warm-up/cosine schedule, gradient clipping,
    and every ``checkpoint_every`` iterations a CSV row (mean loss, ``step``'s extra parts,
    optional validation) and a resumable checkpoint. ``peaks``: submodules of ``net`` whose
    parameters peak at another learning rate than the run's.

    ``ema`` > 0 keeps an exponential moving average of the weights (and batch-norm
    statistics) with that decay, as diffusion models are usually trained: the averaged
    weights are validated and exported, smoothing out the last noisy optimiser steps.
    ``workers`` > 0 makes the batches in that many processes (:func:`sample_batches`).
    ``precision`` ``bfloat16`` runs ``step`` under autocast (~1.2x faster per iteration on a
    2-core AVX-512 BF16 CPU); validation stays in float32."""
    tc = run.training
    if workers < 0:
        raise UserError(f"workers must be >= 0, not {workers}")
    try:
        bf16 = resolve_precision(precision, run.device) == "bfloat16"
    except ValueError as exc:
        raise UserError(str(exc)) from None
    autocast = (torch.autocast(run.device.type, dtype=torch.bfloat16) if bf16
                else contextlib.nullcontext())
    iterations, batch_size, lr = tc.iterations, tc.batch_size, tc.lr
    checkpoint_every = tc.checkpoint_every
    groups: list[dict[str, Any]] = [
        {"params": list(m.parameters()), "peak": peak} for m, peak in (peaks or {}).items()]
    apart = {id(q) for g in groups for q in g["params"]}
    groups.insert(0, {"params": [q for q in net.parameters() if id(q) not in apart],
                      "peak": lr})
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=1e-4)
    decay = tc.ema
    ema = (AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
           if decay > 0 else None)
    run.restore(net, opt, ema)
    batches = sample_batches(run.data, run.norm, tc.crop, batch_size, run.rng, scale=tc.scale,
                             sensor=tc.sensor_aug, colour=tc.colour_aug, workers=workers,
                             seed=tc.seed, start=run.start)
    t0, acc = time.time(), []
    with contextlib.closing(batches):  # stops the workers, also on an exception
        for it in run.progress(iterations, progress):
            net.train()
            for g in opt.param_groups:
                g["lr"] = _lr_at(it, iterations, g.get("peak", lr))
            img, lab, pre = next(batches)
            with autocast:
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
    for img, lab in val_batches(val, norm):
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
    init_weights: Mapping[str, torch.Tensor] | None = None,
    workers: int = 0,
    precision: str = "float32",
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
    the non-iterative one. ``init_weights`` starts a new run from a trained refiner of the
    same architecture (a lite refiner's encoder comes from ``coarse`` all the same).
    ``workers``: as in :func:`train_coarse` (the coarse maps and degradations are made in
    this process, on the training device). ``precision``: as in :func:`train_coarse` (the
    coarse maps and degradations stay float32: they are the refiner's data).
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
    peaks: dict[torch.nn.Module, float] = {}
    if isinstance(run.arch, LiteRefinerConfig):
        net: torch.nn.Module = build_lite_refiner(run.arch, **run.shape)
        if run.state is None and init_weights is not None:
            _load_init(net, init_weights, allow_missing="encoder.")
        if run.state is None:  # a new run reads the coarse model's (frozen) encoder
            if coarse is None:
                raise UserError(f"a {arch_name(run.arch)} refiner is trained on a lite-fpn "
                                "coarse model's encoder: give the coarse model")
            net.encoder.load_state_dict(encoder_state(coarse, run.arch.variant))
        if tc.encoder_lr > 0:
            if run.arch.encoder != "own":
                raise UserError("a fine-tuned encoder (encoder_lr > 0) is the refiner's own: "
                                "set encoder to \"own\"")
            net.train_encoder()
            peaks = {net.encoder: tc.encoder_lr}  # a fine-tuned encoder: its own, lower rate
        net = net.to(run.device)
    else:
        net = build_refiner_net(cast(RefinerConfig, run.arch), **run.shape)
        if run.state is None and init_weights is not None:
            _load_init(net, init_weights)
        net = net.to(run.device)
    gen = torch.Generator().manual_seed(seed + run.start)
    p_model = tc.p_model if coarse is not None or stored is not None else 0.0
    if not tc.degradation:
        p_model = 1.0

    def step(img: torch.Tensor, lab: torch.Tensor, pre: torch.Tensor | None
             ) -> tuple[torch.Tensor, dict[str, float]]:
        # the coarse maps are the refiner's data: made in float32 under any precision
        # (bfloat16 grouped convolutions of the degradations are slow on a CPU)
        with torch.autocast(run.device.type, enabled=False):
            probs = _coarse_maps(img, lab, k, coarse, p_model, gen, run.rng,
                                 perturb=tc.coarse_perturb, stored=pre, p_onehot=tc.p_onehot,
                                 zooms=tc.coarse_zooms)
        return training_loss(net, img, probs, lab, t_max=tc.t_max, p_uncond=tc.p_uncond,
                             p_coarse_x0=tc.p_coarse_x0, oneshot=oneshot,
                             boundary_weight=tc.boundary_weight,
                             boundary_radius=tc.boundary_radius)

    val = load_npz(val_npz) if val_npz else None
    return _fit(run, net, step, progress=progress, workers=workers, peaks=peaks,
                precision=precision,
                validate=None if val is None else
                (lambda: _validate_refiner(net, val, run.norm, k, run.device, coarse,
                                           oneshot, tc.coarse_zooms)))


@torch.no_grad()
def _validate_refiner(net, val, norm, k, device, coarse, oneshot: bool,
                      zooms: tuple[float, ...] = ()) -> dict[str, float]:
    """mIoU of the coarse maps (coarse model over ``zooms`` views, else fixed
    degradations) and of their refinement (the default sampling steps,
    :class:`SamplingConfig`)."""
    from .diffusion import sample

    net.eval()
    gen = torch.Generator().manual_seed(1)
    cs, rs, labs = [], [], []
    for img, lab in val_batches(val, norm, limit=24):
        img = img.to(device)
        probs = (multiscale_probabilities(coarse, img, zooms, confident=math.inf)
                 if coarse is not None
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
                 stored: torch.Tensor | None = None,
                 p_onehot: float = RefinerTrainingConfig.p_onehot,
                 zooms: tuple[float, ...] = ()) -> torch.Tensor:
    """Per sample: the coarse model's map, or the ``stored`` one where the training arrays
    carry maps (prob p_model), or a degraded ground truth (one-hot with prob ``p_onehot``).

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
            # every view of every crop (a mean over a fixed number of views)
            out[sel] = multiscale_probabilities(coarse, x, zooms, confident=math.inf).to(
                img.device)
    if (~use_model).any():
        sel = torch.from_numpy(np.flatnonzero(~use_model)).to(img.device)
        # (on the training device: torch only, and on a GPU the CPU would bound the run)
        out[sel] = degrade(lab[sel].to(img.device), k, generator=gen, p_onehot=p_onehot)
    return out

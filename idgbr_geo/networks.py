"""The IDGBR networks: coarse segmentor, conditional guidance network and denoiser.

All three are deliberately tiny because they must run on a 2-core CPU at a fraction of a
second per 512x512 window: full-resolution layers are 8 channels and one convolution
thick, and most of the work happens at 1/4 resolution or lower.

* :class:`CoarseNet` is the discriminative stage: an FPN-style encoder-decoder that
  predicts at output stride 4 (or 8/16 for a deliberately blurrier variant) and upsamples
  its logits bilinearly, so - like real segmentors - it gets the *what* right and blurs the
  *where*.
* :class:`RefinerNet` holds the guidance network (reads image + coarse probabilities once
  per window and returns features at 1/1, 1/2 and 1/4), the denoiser (runs once per
  diffusion step on a scaled one-hot label map at 1/4 resolution, conditioned through
  zero-initialised 1x1 injections and a timestep embedding) and a learned
  full-resolution decode that also sees the thin full-resolution guidance features.

The factories registered at the bottom wrap them behind the Segmentor / Refiner
interfaces of :mod:`idgbr_geo.interfaces`, so ``load_model("buildings")`` works.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import CoarseConfig, RefinerConfig
from .packing import pack_convolutions
from .registry import register_architecture


def conv_bn(cin: int, cout: int, stride: int = 1, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ResBlock(nn.Module):
    """Two 3x3 convolutions with a residual; optional FiLM from a timestep embedding."""

    def __init__(self, ch: int, emb: int = 0) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(ch, ch, 3, 1, 1, bias=False)
        self.n1 = nn.BatchNorm2d(ch)
        self.c2 = nn.Conv2d(ch, ch, 3, 1, 1, bias=False)
        self.n2 = nn.BatchNorm2d(ch)
        self.film = nn.Linear(emb, 2 * ch) if emb else None
        if self.film is not None:
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = F.relu(self.n1(self.c1(x)))
        if self.film is not None and emb is not None:
            scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        h = self.n2(self.c2(h))
        return F.relu(x + h)


def zero_conv(cin: int, cout: int) -> nn.Conv2d:
    """1x1 convolution initialised to zero: the guidance enters as a residual that starts
    at nothing, so training starts from an unconditioned denoiser and learns how much to
    listen (the 'zero-initialised residual injection' of ControlNet/IDGBR)."""
    conv = nn.Conv2d(cin, cout, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


# ------------------------------------------------------------------------------ coarse


class CoarseNet(nn.Module):
    """Compact FPN segmentor: encoder to 1/16, decoder back to ``output_stride``."""

    def __init__(self, in_channels: int = 3, num_classes: int = 2,
                 widths: Sequence[int] = CoarseConfig.widths,
                 output_stride: int = CoarseConfig.output_stride) -> None:
        super().__init__()
        w0, w1, w2, w3 = widths
        self.output_stride = output_stride
        self.stem = nn.Sequential(conv_bn(in_channels, w0, 2), conv_bn(w0, w1, 2))  # 1/4
        self.enc4 = ResBlock(w1)
        self.down8 = conv_bn(w1, w2, 2)
        self.enc8 = ResBlock(w2)
        self.down16 = conv_bn(w2, w3, 2)
        self.enc16 = nn.Sequential(ResBlock(w3), ResBlock(w3))
        self.lat16 = nn.Conv2d(w3, w1, 1)
        self.lat8 = nn.Conv2d(w2, w1, 1)
        self.lat4 = nn.Conv2d(w1, w1, 1)
        self.fuse = conv_bn(w1, w1)
        self.head = nn.Conv2d(w1, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        f4 = self.enc4(self.stem(x))
        f8 = self.enc8(self.down8(f4))
        f16 = self.enc16(self.down16(f8))
        p = self.lat16(f16)
        if self.output_stride <= 8:
            p = F.interpolate(p, size=f8.shape[-2:], mode="bilinear", align_corners=False)
            p = p + self.lat8(f8)
        if self.output_stride <= 4:
            p = F.interpolate(p, size=f4.shape[-2:], mode="bilinear", align_corners=False)
            p = p + self.lat4(f4)
        return upsample_logits(self.head(self.fuse(p)), size)


def upsample_logits(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear upsampling of a few-channel map (class logits) in the contiguous layout: for
    2 channels it is ~3x faster than in channels-last (measured, 2 threads: 0.37 vs 1.24 ms
    from 128x128 to 512x512), and the values are the same."""
    return F.interpolate(x.contiguous(), size=tuple(size), mode="bilinear",
                         align_corners=False)


# ----------------------------------------------------------------------------- refiner


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of continuous times t in [0, 1] -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * 1000.0 * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class GuidanceNet(nn.Module):
    """Reads [image, coarse probabilities] once per window -> features at 1/1, 1/2, 1/4."""

    def __init__(self, in_channels: int, c1: int = 8, c2: int = 16, c4: int = 32,
                 c8: int = 48) -> None:
        super().__init__()
        self.at1 = conv_bn(in_channels, c1)
        self.at2 = nn.Sequential(conv_bn(c1, c2, 2), conv_bn(c2, c2))
        self.at4 = nn.Sequential(conv_bn(c2, c4, 2), ResBlock(c4))
        self.at8 = nn.Sequential(conv_bn(c4, c8, 2), ResBlock(c8))
        self.up8 = nn.Conv2d(c8, c4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g1 = self.at1(x)
        g2 = self.at2(g1)
        g4 = self.at4(g2)
        g8 = self.at8(g4)
        g4 = g4 + F.interpolate(self.up8(g8), size=g4.shape[-2:], mode="bilinear",
                                align_corners=False)
        return g1, g2, g4


class Denoiser(nn.Module):
    """One diffusion step at 1/4 resolution: (x_t, t, guidance) -> x0 logits + features."""

    def __init__(self, num_classes: int, ch: int = 32, c4: int = 32, emb: int = 64,
                 blocks: int = 2) -> None:
        super().__init__()
        self.emb_dim = emb
        self.temb = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.inp = nn.Conv2d(num_classes, ch, 3, 1, 1)
        self.inject = nn.ModuleList([zero_conv(c4, ch) for _ in range(blocks + 1)])
        self.blocks = nn.ModuleList([ResBlock(ch, emb) for _ in range(blocks)])
        self.down = conv_bn(ch, ch, 2)
        self.mid = ResBlock(ch, emb)
        self.up = nn.Conv2d(ch, ch, 1)
        self.out = nn.Conv2d(ch, num_classes, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, g4: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.temb(timestep_embedding(t, self.emb_dim))
        h = self.inp(x)
        if g4 is not None:
            h = h + self.inject[0](g4)
        for i, blk in enumerate(self.blocks):
            h = blk(h, emb)
            if g4 is not None:
                h = h + self.inject[i + 1](g4)
        m = self.mid(self.down(h), emb)
        h = h + self.up(F.interpolate(m, size=h.shape[-2:], mode="bilinear",
                                      align_corners=False))
        return self.out(h), h


class Decoder(nn.Module):
    """Learned full-resolution decode of the last denoiser state, run once per window."""

    def __init__(self, num_classes: int, ch: int = 32, c1: int = 8, c2: int = 16) -> None:
        super().__init__()
        self.red = nn.Conv2d(ch + num_classes, c2, 1)
        self.at2 = conv_bn(2 * c2, c2)
        self.red1 = nn.Conv2d(c2, c1, 1)
        self.at1 = conv_bn(2 * c1, c1)
        self.out = nn.Conv2d(c1, num_classes, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor, logits4: torch.Tensor, g1: torch.Tensor,
                g2: torch.Tensor) -> torch.Tensor:
        x = self.red(torch.cat([h, logits4], 1))
        x = F.interpolate(x, size=g2.shape[-2:], mode="bilinear", align_corners=False)
        x = self.at2(torch.cat([x, g2], 1))
        x = F.interpolate(self.red1(x), size=g1.shape[-2:], mode="bilinear",
                          align_corners=False)
        x = self.at1(torch.cat([x, g1], 1))
        return self.out(x).add_(upsample_logits(logits4, g1.shape[-2:]))


class RefinerNet(nn.Module):
    """Guidance network + denoiser + decoder. ``use_coarse=False`` is the 'no rough' case."""

    def __init__(self, in_channels: int = 3, num_classes: int = 2,
                 use_coarse: bool = RefinerConfig.use_coarse, c1: int = RefinerConfig.c1,
                 c2: int = RefinerConfig.c2, c4: int = RefinerConfig.c4,
                 c8: int = RefinerConfig.c8, ch: int = RefinerConfig.ch,
                 blocks: int = RefinerConfig.blocks,
                 residual: bool = RefinerConfig.residual) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.use_coarse = use_coarse
        #: predict a correction to the coarse logits (see idgbr_geo.diffusion.denoise)
        self.residual = bool(residual) and use_coarse
        gin = in_channels + (num_classes if use_coarse else 0)
        self.guidance = GuidanceNet(gin, c1, c2, c4, c8)
        self.denoiser = Denoiser(num_classes, ch, c4, blocks=blocks)
        self.decoder = Decoder(num_classes, ch, c1, c2)
        if self.residual:  # the correction starts at nothing: "keep the coarse map"
            nn.init.zeros_(self.denoiser.out.weight)
            nn.init.zeros_(self.denoiser.out.bias)

    def guide(self, image: torch.Tensor, coarse: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.cat([image, coarse], 1) if self.use_coarse else image
        return self.guidance(x)


# ------------------------------------------------------------------ interface wrappers


def fuse_batchnorm(net: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm that follows a convolution into that convolution
    (in place; for inference only): one pass over each feature map less.

    Three places hold such pairs: ``nn.Sequential`` (our ``conv_bn``), :class:`ResBlock`, and
    the timm EfficientNet encoder, whose blocks keep each convolution and its norm as named
    attributes (``conv_stem``/``bn1``, ``conv_pw``/``bn1``, ``conv_dw``/``bn2``, ...). There
    a norm fuses with the convolution registered just before it (the order their
    ``forward`` applies them in); a timm norm that also applies an activation
    (``BatchNormAct2d``) leaves that activation in its place. Folding the encoder's too took
    the bundled ``buildings`` coarse network from 37.2 to 32.1 ms per 512 px window (2
    threads, bfloat16, ``benchmarks/models.py``)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    net.eval()
    for mod in net.modules():
        if isinstance(mod, nn.Sequential):
            keys = list(mod._modules)
            for a, b in zip(keys, keys[1:], strict=False):
                conv, bn = mod._modules[a], mod._modules[b]
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    mod._modules[a] = fuse_conv_bn_eval(conv, bn)
                    mod._modules[b] = _after_norm(bn)
        elif isinstance(mod, ResBlock):
            for c, n in (("c1", "n1"), ("c2", "n2")):
                if isinstance(getattr(mod, n), nn.BatchNorm2d):
                    setattr(mod, c, fuse_conv_bn_eval(getattr(mod, c), getattr(mod, n)))
                    setattr(mod, n, nn.Identity())
        elif type(mod).__module__.startswith("timm."):
            conv_name = None
            for name, child in list(mod._modules.items()):
                if isinstance(child, nn.Conv2d) and name.startswith("conv"):
                    conv_name = name
                elif (isinstance(child, nn.BatchNorm2d) and name.startswith("bn")
                      and conv_name is not None):
                    setattr(mod, conv_name, fuse_conv_bn_eval(getattr(mod, conv_name), child))
                    setattr(mod, name, _after_norm(child))
                    conv_name = None
    return net


def _after_norm(bn: nn.BatchNorm2d) -> nn.Module:
    """What stays of a folded norm: nothing, or the dropout and activation that timm's
    ``BatchNormAct2d`` applies after normalising."""
    act, drop = getattr(bn, "act", None), getattr(bn, "drop", None)
    if act is None and drop is None:
        return nn.Identity()
    return nn.Sequential(drop or nn.Identity(), act or nn.Identity())


def _for_inference(net: nn.Module, device: torch.device) -> nn.Module:
    """``net`` with its norms folded, in channels-last layout, and on a CPU with its
    convolutions prepacked for oneDNN (:mod:`idgbr_geo.packing`: faster, and the same
    numbers for any number of threads)."""
    net = fuse_batchnorm(net).to(memory_format=torch.channels_last)
    return pack_convolutions(net) if device.type == "cpu" else net


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    """Channels-last layout: oneDNN runs our thin convolutions faster in it on CPU
    (measured, 2 threads: coarse net 10.5 -> 9 ms, refiner 45 -> 35 ms per 512 px window)."""
    return x.contiguous(memory_format=torch.channels_last)


class CoarseSegmentor:
    """Segmentor interface around :class:`CoarseNet` or another net whose last layer is a
    1x1 convolution ``head`` (e.g. ``lite-fpn``): eval mode, no grad, softmax."""

    def __init__(self, net: nn.Module, device: torch.device | str = "cpu") -> None:
        net = net.to(device)
        #: the weights as trained, before the norms were folded (:func:`fuse_batchnorm`):
        #: what a refiner trained on this model's encoder starts from (no copy: the tensors
        #: the folding replaces are kept, the rest shared)
        self.trained_state = {k: v.detach() for k, v in net.state_dict().items()}
        self.num_classes = int(net.head.out_channels)
        self.device = torch.device(device)
        self.net = _for_inference(net, self.device)

    @torch.no_grad()
    def predict(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.net(_nhwc(image.to(self.device).float()))
        return torch.softmax(logits.float(), dim=1).contiguous()


class DiffusionRefiner:
    """Refiner interface around :class:`RefinerNet` and the DDIM sampler.

    Only what the shipped models use: the sampler's research options live in
    ``release/research``, and the gate is applied by :func:`idgbr_geo.predict.predict_windows`
    (it works for any refiner)."""

    def __init__(self, net: RefinerNet, config: RefinerConfig | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.net = _for_inference(net.to(device), self.device)
        self.num_classes = net.num_classes
        self.config = config or RefinerConfig()

    @torch.no_grad()
    def refine(self, image: torch.Tensor, coarse: torch.Tensor, *, steps: int, seed: int,
               origins: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Refined probabilities (B, K, H, W), contiguous (the layout the gate and the
        stitching run fastest in)."""
        from .diffusion import sample

        # image and coarse map go in as they are (contiguous): the guidance network
        # concatenates them and its first convolution takes the result to channels-last
        # once (0.45 vs 1.0 ms for converting both and concatenating in channels-last)
        logits = sample(self.net, image.to(self.device).float(), coarse.to(self.device).float(),
                        steps=steps, seed=seed, origins=origins,
                        oneshot=self.config.mode == "oneshot")
        return torch.softmax(logits.float(), dim=1).contiguous()


def build_coarse_net(config: CoarseConfig, *, in_channels: int = 3,
                     num_classes: int = 2) -> CoarseNet:
    """The network ``config`` describes, for ``in_channels`` bands and ``num_classes``."""
    return CoarseNet(in_channels, num_classes, widths=config.widths,
                     output_stride=config.output_stride)


def build_refiner_net(config: RefinerConfig, *, in_channels: int = 3,
                      num_classes: int = 2) -> RefinerNet:
    """The network ``config`` describes, for ``in_channels`` bands and ``num_classes``."""
    return RefinerNet(in_channels, num_classes, use_coarse=config.use_coarse, c1=config.c1,
                      c2=config.c2, c4=config.c4, c8=config.c8, ch=config.ch,
                      blocks=config.blocks, residual=config.residual)


def _load(net: nn.Module, weights: dict[str, torch.Tensor], what: str) -> None:
    from .errors import UserError

    try:
        net.load_state_dict({k: v.float() if v.is_floating_point() else v
                             for k, v in weights.items()})
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"weights do not match the {what} architecture: {first}") from None


@register_architecture("idgbr-coarse")
def _coarse_factory(card, config, weights, device):
    cfg = CoarseConfig.from_dict(config, f"model {card.name!r}: segmentor config")
    net = build_coarse_net(cfg, in_channels=card.bands, num_classes=card.num_classes)
    _load(net, weights, "idgbr-coarse")
    return CoarseSegmentor(net, device)


@register_architecture("idgbr-refiner")
def _refiner_factory(card, config, weights, device):
    cfg = RefinerConfig.from_dict(config, f"model {card.name!r}: refiner config")
    net = build_refiner_net(cfg, in_channels=card.bands, num_classes=card.num_classes)
    _load(net, weights, "idgbr-refiner")
    return DiffusionRefiner(net, cfg, device)

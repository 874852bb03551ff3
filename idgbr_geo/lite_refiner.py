"""The ``lite-idgbr`` refiner: IDGBR's guidance on a pretrained encoder's features.

IDGBR conditions its denoiser on a pretrained image encoder (DINOv2) plus the coarse map.
The light equivalent here: the guidance network reads the multi-scale features of the
EfficientNet-Lite encoder of the model's ``lite-fpn`` segmentor (strides 4-32, frozen: the
refiner is trained after the segmentor, on its encoder) together with the coarse map and a
thin full-resolution path over image + coarse map (for *where* boundaries run). The
denoiser and the full-resolution decode are :mod:`idgbr_geo.networks`' and the sampler is
:func:`idgbr_geo.diffusion.sample`, unchanged.

With ``encoder = "segmentor"`` (the bundled models) the refiner and the segmentor hold one
:class:`~idgbr_geo.encoders.FeatureMemo`, so the encoder runs once per window for both
stages; with ``refine --coarse`` (a user's coarse map) it runs for the refiner alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LiteRefinerConfig
from .encoders import FeatureMemo, lite_encoder
from .networks import Decoder, Denoiser, DiffusionRefiner, ResBlock, _load, conv_bn
from .registry import register_architecture

ARCH = "lite-idgbr"
#: weight prefix of the shared encoder (the ``lite-fpn`` segmentor's ``encoder``)
ENCODER_PREFIX = "encoder."


class FeatureGuidance(nn.Module):
    """[image, coarse] at 1/1 and 1/2 (thin) + encoder features at 1/4..1/32 -> g1, g2, g4."""

    def __init__(self, in_channels: int, widths: list[int], c1: int, c2: int, c4: int
                 ) -> None:
        super().__init__()
        self.at1 = conv_bn(in_channels, c1)
        self.at2 = nn.Sequential(conv_bn(c1, c2, 2), conv_bn(c2, c2))
        self.down = conv_bn(c2, c4, 2)
        self.laterals = nn.ModuleList(nn.Conv2d(w, c4, 1) for w in widths)
        self.mix = nn.Sequential(conv_bn(c4, c4), ResBlock(c4))

    def forward(self, x: torch.Tensor, feats: list[torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g1 = self.at1(x)
        g2 = self.at2(g1)
        g4 = self.down(g2)
        size = g4.shape[-2:]
        for lat, f in zip(self.laterals, feats, strict=True):
            f = lat(f)
            g4 = g4 + (f if f.shape[-2:] == size else
                       F.interpolate(f, size=size, mode="bilinear", align_corners=False))
        return g1, g2, self.mix(g4)


class LiteRefinerNet(nn.Module):
    """Frozen encoder + feature guidance + denoiser + decoder (see the module docstring).

    The interface :func:`idgbr_geo.diffusion.sample` and ``training_loss`` use: ``guide``,
    ``denoiser``, ``decoder``, ``residual``, ``num_classes``."""

    def __init__(self, in_channels: int = 3, num_classes: int = 2,
                 config: LiteRefinerConfig | None = None) -> None:
        super().__init__()
        cfg = config or LiteRefinerConfig()
        self.num_classes = num_classes
        self.use_coarse = True
        self.residual = cfg.residual
        self.encoder: nn.Module = lite_encoder(cfg.variant, in_channels=in_channels)
        self.encoder.requires_grad_(False)
        #: fine-tune the encoder in training (:meth:`train_encoder`); frozen by default
        self.encoder_trained = False
        widths = list(lite_encoder_widths(self.encoder))
        self.guidance = FeatureGuidance(in_channels + num_classes, widths, cfg.c1, cfg.c2,
                                        cfg.c4)
        self.denoiser = Denoiser(num_classes, cfg.ch, cfg.c4, blocks=cfg.blocks)
        self.decoder = Decoder(num_classes, cfg.ch, cfg.c1, cfg.c2)
        if self.residual:  # the correction starts at nothing: "keep the coarse map"
            nn.init.zeros_(self.denoiser.out.weight)
            nn.init.zeros_(self.denoiser.out.bias)

    def train(self, mode: bool = True) -> LiteRefinerNet:
        super().train(mode)
        self.encoder.eval()  # its batch-norm statistics stay the segmentor's, trained or not
        return self

    def train_encoder(self) -> None:
        """Let training fine-tune the encoder too (its weights, not its norms' statistics)."""
        self.encoder.requires_grad_(True)
        self.encoder_trained = True

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def guide(self, image: torch.Tensor, coarse: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.set_grad_enabled(self.encoder_trained and torch.is_grad_enabled()):
            feats = list(self.encoder(image))
        if not self.encoder_trained:
            feats = [f.detach() for f in feats]
        return self.guidance(torch.cat([image, coarse], 1), feats)


def lite_encoder_widths(encoder: nn.Module) -> list[int]:
    inner = encoder.encoder if isinstance(encoder, FeatureMemo) else encoder
    return list(inner.feature_info.channels())


def build_lite_refiner(config: LiteRefinerConfig, *, in_channels: int = 3,
                       num_classes: int = 2) -> LiteRefinerNet:
    """The network ``config`` describes (encoder weights still to be loaded)."""
    return LiteRefinerNet(in_channels, num_classes, config)


class LiteRefiner(DiffusionRefiner):
    """Refiner interface around :class:`LiteRefinerNet`, with its encoder in a
    :class:`FeatureMemo` that :meth:`share_encoder` can make the segmentor's."""

    def __init__(self, net: LiteRefinerNet, config: LiteRefinerConfig,
                 device: torch.device | str = "cpu") -> None:
        net.encoder = FeatureMemo(net.encoder)
        super().__init__(net, config, device)  # type: ignore[arg-type]

    def share_encoder(self, segmentor: object) -> bool:
        """Use the segmentor's encoder memo (the same weights: the card stores them once)
        so that the encoder runs once per window; False if the segmentor has none."""
        memo = getattr(getattr(segmentor, "net", None), "encoder", None)
        if not isinstance(memo, FeatureMemo):
            return False
        self.net.encoder = memo
        return True


@register_architecture(ARCH)
def _lite_refiner_factory(card, config, weights, device):
    cfg = LiteRefinerConfig.from_dict(config, f"model {card.name!r}: refiner config")
    net = build_lite_refiner(cfg, in_channels=card.bands, num_classes=card.num_classes)
    _load(net, weights, ARCH)
    return LiteRefiner(net, cfg, device)


def encoder_state(segmentor: object, variant: str) -> dict[str, torch.Tensor]:
    """The encoder weights of a ``lite-fpn`` segmentor (e.g. the coarse model a refiner is
    trained on), as trained (not folded for inference), checked to be of ``variant``; a
    UserError for any other segmentor."""
    from .errors import UserError

    enc = getattr(getattr(segmentor, "net", None), "encoder", None)
    prefix = "encoder."
    if isinstance(enc, FeatureMemo):
        enc, prefix = enc.encoder, "encoder.encoder."
    if enc is None or not hasattr(enc, "feature_info"):
        raise UserError(f"a {ARCH} refiner reads the encoder of a lite-fpn coarse model; "
                        "the coarse model given has none")
    trained = getattr(segmentor, "trained_state", None)
    state = (enc.state_dict() if trained is None else
             {k[len(prefix):]: v for k, v in trained.items() if k.startswith(prefix)})
    ref = lite_encoder(variant).state_dict()
    if list(state) != list(ref) or any(state[k].shape != ref[k].shape for k in ref):
        raise UserError(f"the coarse model's encoder is not EfficientNet-Lite {variant}")
    return {k: v.detach().clone() for k, v in state.items()}

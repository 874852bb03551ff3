"""The ``lite-fpn`` coarse segmentor: EfficientNet-Lite encoder + FPN decoder.

A stronger coarse stage than :class:`idgbr_geo.networks.CoarseNet` for scenes unlike the
training data: the encoder starts from ImageNet weights (:mod:`idgbr_geo.encoders`, at
training time only). Registered as an architecture when imported (the registry imports this
module), behind the same Segmentor interface (softmax probabilities) as ``idgbr-coarse``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LiteFpnConfig
from .encoders import FeatureMemo, lite_encoder
from .networks import CoarseSegmentor, _load, conv_bn, upsample_logits
from .registry import register_architecture

ARCH = "lite-fpn"


class LiteFpnNet(nn.Module):
    """Encoder features at strides 4-32 -> 1x1 laterals to ``channels``, top-down sum,
    3x3 conv+BN+ReLU, 1x1 head at stride 4, logits upsampled to the input size."""

    def __init__(self, in_channels: int = 3, num_classes: int = 2,
                 variant: str = LiteFpnConfig.variant, channels: int = LiteFpnConfig.channels,
                 pretrained: bool = False) -> None:
        super().__init__()
        self.encoder = lite_encoder(variant, pretrained, in_channels=in_channels)
        widths = self.encoder.feature_info.channels()
        self.laterals = nn.ModuleList(nn.Conv2d(w, channels, 1) for w in widths)
        self.fuse = conv_bn(channels, channels)
        self.head = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        feats = self.encoder(x)
        p = self.laterals[-1](feats[-1])
        for lat, f in zip(self.laterals[-2::-1], feats[-2::-1], strict=True):
            p = F.interpolate(p, size=f.shape[-2:], mode="bilinear", align_corners=False)
            p = p + lat(f)
        return upsample_logits(self.head(self.fuse(p)), size)


def build_lite_fpn(config: LiteFpnConfig, *, in_channels: int = 3, num_classes: int = 2,
                   pretrained: bool = False) -> LiteFpnNet:
    """The network ``config`` describes; ``pretrained``: ImageNet encoder (training only)."""
    return LiteFpnNet(in_channels, num_classes, variant=config.variant,
                      channels=config.channels, pretrained=pretrained)


@register_architecture(ARCH)
def _lite_fpn_factory(card, config, weights, device):
    cfg = LiteFpnConfig.from_dict(config, f"model {card.name!r}: segmentor config")
    net = build_lite_fpn(cfg, in_channels=card.bands, num_classes=card.num_classes)
    _load(net, weights, ARCH)
    net.encoder = FeatureMemo(net.encoder)  # a lite-idgbr refiner may share it
    return CoarseSegmentor(net, device)

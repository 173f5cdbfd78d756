"""DeepLabv3+ (stage 3): a backbone at output stride 16, ASPP and the decoder (docs/model.md, "DeepLabv3+").

``deeplab_v3_plus(arch)(x)`` -> logits (B, num_classes, H, W) at the input size. The head follows the
original's ``core/deeplab_utils.py`` and ``DeepLabv3_Plus`` (design.md §9), module for module:

* ``aspp``: four branches on the last stage's features (a 1x1 conv, three 3x3 convs with dilation 6, 12,
  18: the backbone runs at output stride 16, the only one the original uses), each conv -> norm -> ReLU;
  an image-pooling branch (global average pool, 1x1 conv, norm, ReLU, bilinear upsampling with
  align_corners True); concatenated (5 x 256) -> 1x1 conv -> norm -> ReLU -> dropout 0.5.
* ``decoder``: the first stage's features (stride 4) -> 1x1 conv to 48 -> norm -> ReLU; the ASPP output
  upsampled to them (align_corners True) and concatenated (304) -> 3x3 conv -> norm -> ReLU -> dropout
  0.5 -> 3x3 conv -> norm -> ReLU -> dropout 0.1 -> 1x1 conv with bias to the classes.
* the logits upsampled to the input size (bilinear, align_corners True).

Convs have no bias except the last. Every head conv gets kaiming normal (fan_in) and every head norm
weight 1, bias 0, as the original. Two departures, both for backbones the original could not run: the
ASPP input and the decoder's low-level input are sized from the backbone's real channels (the original
hard-codes 2048 and 256, which breaks resnet18/34 and reduced widths), and the head widths are
parameters (256 and 48 by default; smaller only for CPU runs). Output stride 32 is refused: the rates are
for stride 16. ``python -m puzzlecam.convert --kind deeplab`` maps the original's checkpoints onto these
modules (docs/convert.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from puzzlecam.errors import ConfigError

from ..config import ModelConfig, SegmentationConfig
from .affinity import stage_channels
from .classifier import build_backbone
from .norm import BatchNorm2d, SyncBatchNorm2d
from .pretrained import load_pretrained
from .resnet import Backbone

GROUPS_PER_NORM = 4  # GroupNorm(4, C), the original's group_norm
ASPP_DILATIONS = (6, 12, 18)  # the original's at output stride 16 (deeplab_utils.ASPP)
HEAD_NORMS = ("group", "batch", "sync")


def head_norm_layer(kind: str, channels: int) -> nn.Module:
    """The norm of the ASPP and the decoder: GroupNorm(4, C), BatchNorm (this rank's batch) or BatchNorm whose
    batch statistics span every rank (puzzlecam's SyncBatchNorm2d, which also runs on CPU with gloo)."""
    if kind == "group":
        return nn.GroupNorm(GROUPS_PER_NORM, channels)
    if kind == "batch":
        return BatchNorm2d(channels)
    if kind == "sync":
        return SyncBatchNorm2d(channels)
    raise ConfigError(f"segmentation.head_norm must be one of {', '.join(HEAD_NORMS)}, got {kind!r}")


def conv_norm_relu(cin: int, cout: int, kernel: int, norm: str, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel - 1) // 2
    conv = nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, bias=False)
    return nn.Sequential(conv, head_norm_layer(norm, cout), nn.ReLU(inplace=True))


def _check_head_width(key: str, value: int, head_norm: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"segmentation.{key} must be a positive int, got {value!r}")
    if head_norm == "group" and value % GROUPS_PER_NORM:
        raise ConfigError(
            f"segmentation.{key} must be a multiple of {GROUPS_PER_NORM} with head_norm group "
            f"(GroupNorm({GROUPS_PER_NORM}, C) splits the channels into {GROUPS_PER_NORM} groups), got {value}"
        )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: (B, cin, h, w) -> (B, channels, h, w); see the module doc."""

    def __init__(self, cin: int, channels: int, dilations: tuple[int, int, int], norm: str):
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_norm_relu(cin, channels, 1, norm)] + [conv_norm_relu(cin, channels, 3, norm, d) for d in dilations]
        )
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), *conv_norm_relu(cin, channels, 1, norm))
        self.project = conv_norm_relu(5 * channels, channels, 1, norm)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        pooled = self.image_pool(x)
        outs.append(F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=True))
        return self.dropout(self.project(torch.cat(outs, dim=1)))


class Decoder(nn.Module):
    """(ASPP output at stride 16, low-level features at stride 4) -> logits at stride 4; see the module doc."""

    def __init__(self, low_level_in: int, channels: int, low_level_channels: int, num_classes: int, norm: str):
        super().__init__()
        self.low_level = conv_norm_relu(low_level_in, low_level_channels, 1, norm)
        self.classifier = nn.Sequential(
            *conv_norm_relu(channels + low_level_channels, channels, 3, norm),
            nn.Dropout(0.5),
            *conv_norm_relu(channels, channels, 3, norm),
            nn.Dropout(0.1),
            nn.Conv2d(channels, num_classes, 1, bias=True),
        )

    def forward(self, x: torch.Tensor, low_level: torch.Tensor) -> torch.Tensor:
        low_level = self.low_level(low_level)
        x = F.interpolate(x, size=low_level.shape[-2:], mode="bilinear", align_corners=True)
        return self.classifier(torch.cat([x, low_level], dim=1))


class DeepLabV3Plus(nn.Module):
    """forward(x (B, 3, H, W)) -> logits (B, num_classes, H, W); see the module doc. ``backbone`` is the
    pretrained part (lr x1/x2 groups), ``aspp`` and ``decoder`` the new head (x10/x20)."""

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int = 21,
        head_norm: str = "group",
        head_channels: int = 256,
        low_level_channels: int = 48,
    ):
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
            raise ConfigError(
                f"model.num_classes must be an int >= 2 for DeepLabv3+ (it counts the background), got {num_classes!r}"
            )
        if backbone.output_stride != 16:
            raise ConfigError(
                f"model.output_stride must be 16 for DeepLabv3+ (its ASPP rates 6/12/18 are for stride 16), "
                f"got {backbone.output_stride}"
            )
        for key, value in (("head_channels", head_channels), ("low_level_channels", low_level_channels)):
            _check_head_width(key, value, head_norm)
        self.backbone = backbone
        self.num_classes = num_classes
        channels = stage_channels(backbone)  # stem, then the four stages
        self.aspp = ASPP(channels[-1], head_channels, ASPP_DILATIONS, head_norm)
        self.decoder = Decoder(channels[1], head_channels, low_level_channels, num_classes, head_norm)
        self.reset_head()

    def reset_head(self) -> None:
        """The original's initialization of the head: kaiming normal (fan_in) convs; norms weight 1, bias 0
        (the last conv's bias keeps torch's default, as there)."""
        for m in (*self.aspp.modules(), *self.decoder.modules()):
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def head_parameters(self) -> list[nn.Parameter]:
        return [*self.aspp.parameters(), *self.decoder.parameters()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"DeepLabV3Plus expects images of shape (B, 3, H, W), got {tuple(x.shape)}")
        # Not backbone.stage_features(x): only the first stage's output is needed later, and without autograd
        # the other stages' outputs are then freed as soon as the next stage has read them.
        first, *rest = self.backbone.stages()
        low_level = first(self.backbone.stem(x))
        deep = low_level
        for stage in rest:
            deep = stage(deep)
        logits = self.decoder(self.aspp(deep), low_level)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)


def deeplab_v3_plus(
    arch: str,
    num_classes: int = 21,
    norm: str = "frozen",
    head_norm: str = "group",
    *,
    width: int = 64,
    output_stride: int = 16,
    head_channels: int = 256,
    low_level_channels: int = 48,
    pretrained: str | None = None,
) -> DeepLabV3Plus:
    """DeepLabv3+ on ``arch`` (any ResNet / ResNeSt of ``model.arch``), its backbone's norms of kind ``norm``
    (the recipe's "frozen": ImageNet statistics), the head's of kind ``head_norm`` (group | batch | sync);
    ``pretrained`` (a torchvision / ResNeSt / puzzlecam-export file) loaded strictly into the backbone."""
    backbone = build_backbone(arch, width=width, output_stride=output_stride, norm=norm)
    if pretrained:
        load_pretrained(backbone, pretrained)
    return DeepLabV3Plus(backbone, num_classes, head_norm, head_channels, low_level_channels)


def build_deeplab(model: ModelConfig, seg: SegmentationConfig) -> DeepLabV3Plus:
    """The DeepLabv3+ of a config's ``model`` and ``segmentation`` sections."""
    return deeplab_v3_plus(
        model.arch,
        model.num_classes,
        model.norm,
        seg.head_norm,
        width=model.width,
        output_stride=model.output_stride,
        head_channels=seg.head_channels,
        low_level_channels=seg.low_level_channels,
        pretrained=model.pretrained,
    )

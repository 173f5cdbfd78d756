"""The backbone registry (every ``model.arch``) and the Puzzle-CAM classifier: a backbone and a bias-free
1x1 conv to C class maps (docs/model.md)."""

from __future__ import annotations

import torch
import torch.nn as nn

from puzzlecam.errors import ConfigError

from ..config import ModelConfig
from ..puzzle import gap
from .pretrained import load_pretrained
from .resnest import RESNEST_ARCHS, ResNeSt
from .resnet import RESNET_ARCHS, Backbone, ResNet

# model.arch -> its backbone class
ARCHS: dict[str, type[Backbone]] = {**dict.fromkeys(RESNET_ARCHS, ResNet), **dict.fromkeys(RESNEST_ARCHS, ResNeSt)}


def build_backbone(arch: str, width: int = 64, output_stride: int = 16, norm: str = "train") -> Backbone:
    """The backbone of ``arch`` (a ResNet or a ResNeSt) with random weights; see :class:`Backbone`."""
    if arch not in ARCHS:
        raise ConfigError(f"model.arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    return ARCHS[arch](arch, width=width, output_stride=output_stride, norm=norm)


class Classifier(nn.Module):
    """forward(x (B,3,H,W)) -> (logits (B,C) fp32, cams (B,C,h,w)); logits = GAP(cams).

    ``h, w = ceil(H/s), ceil(W/s)`` with s the output stride (16: 512x512 -> 32x32).
    """

    def __init__(self, backbone: Backbone, num_classes: int = 20):
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ConfigError(f"model.num_classes must be a positive int, got {num_classes!r}")
        self.backbone = backbone
        self.classifier = nn.Conv2d(backbone.out_channels, num_classes, kernel_size=1, bias=False)
        self.num_classes = num_classes
        # As the reference code: kaiming normal with torch's defaults (fan_in, gain sqrt(2)).
        nn.init.kaiming_normal_(self.classifier.weight)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"Classifier expects images of shape (B, 3, H, W), got {tuple(x.shape)}")
        cams = self.classifier(self.backbone(x))
        return gap(cams), cams


def build_model(cfg: ModelConfig) -> Classifier:
    """Build the classifier of ``cfg`` and load ``cfg.pretrained`` (if set) into its backbone."""
    backbone = build_backbone(cfg.arch, width=cfg.width, output_stride=cfg.output_stride, norm=cfg.norm)
    if cfg.pretrained:
        load_pretrained(backbone, cfg.pretrained)
    return Classifier(backbone, cfg.num_classes)


# name -> (lr multiplier, uses weight decay); docs/model.md, "Parameter groups".
GROUPS = {
    "pretrained_weights": (1.0, True),
    "pretrained_bias": (2.0, False),
    "new_weights": (10.0, True),
    "new_bias": (20.0, False),
}


def _group_name(param_name: str, pretrained: bool) -> str:
    # The original code's rule (get_parameter_groups): by the substring "weight" in the parameter's name,
    # so norm weights go with the conv weights (x1, weight decay) and only biases get x2 without decay.
    is_weight = "weight" in param_name
    if pretrained:
        return "pretrained_weights" if is_weight else "pretrained_bias"
    return "new_weights" if is_weight else "new_bias"


def param_groups(model: Classifier, lr: float, weight_decay: float, keep_empty: bool = True) -> list[dict]:
    """The four optimizer groups of the original code, each parameter in exactly one.

    Backbone ("pretrained") parameters whose name contains "weight" (conv AND norm weights): lr x1 with
    weight decay; every other backbone parameter (biases, norm biases): lr x2 without; new (classifier)
    weights: lr x10 with; new biases: lr x20 without. Each dict has params, lr, weight_decay, name and
    lr_scale (the multiplier, for schedulers). The bias-free classifier leaves ``new_bias`` empty;
    ``keep_empty=False`` drops empty groups.
    """
    pretrained_ids = {id(p) for p in model.backbone.parameters()}
    buckets: dict[str, list[nn.Parameter]] = {name: [] for name in GROUPS}
    for name, p in model.named_parameters():  # shared parameters are listed once
        buckets[_group_name(name, id(p) in pretrained_ids)].append(p)
    groups = []
    for name, (scale, decays) in GROUPS.items():
        if not buckets[name] and not keep_empty:
            continue
        groups.append(
            {
                "params": buckets[name],
                "lr": lr * scale,
                "weight_decay": weight_decay if decays else 0.0,
                "name": name,
                "lr_scale": scale,
            }
        )
    return groups

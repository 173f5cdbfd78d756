"""The Puzzle-CAM classifier: a ResNet backbone and a bias-free 1x1 conv to C class maps."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..puzzle import gap
from .pretrained import load_pretrained
from .resnet import ResNet


class Classifier(nn.Module):
    """forward(x (B,3,H,W)) -> (logits (B,C) fp32, cams (B,C,h,w)); logits = GAP(cams).

    ``h, w = ceil(H/s), ceil(W/s)`` with s the output stride (16: 512x512 -> 32x32).
    """

    def __init__(self, backbone: ResNet, num_classes: int = 20):
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"model.num_classes must be a positive int, got {num_classes!r}")
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
    backbone = ResNet(cfg.arch, width=cfg.width, output_stride=cfg.output_stride, norm=cfg.norm)
    if cfg.pretrained:
        load_pretrained(backbone, cfg.pretrained)
    return Classifier(backbone, cfg.num_classes)


# name -> (lr multiplier, uses weight decay); design.md §3.
GROUPS = {
    "pretrained_weights": (1.0, True),
    "pretrained_bias_norm": (2.0, False),
    "new_weights": (10.0, True),
    "new_bias": (20.0, False),
}


_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm)


def _group_name(module: nn.Module, pname: str, pretrained: bool) -> str:
    if pretrained:
        is_norm = isinstance(module, _NORMS)
        return "pretrained_bias_norm" if is_norm or pname == "bias" else "pretrained_weights"
    return "new_bias" if pname == "bias" else "new_weights"


def param_groups(model: Classifier, lr: float, weight_decay: float, keep_empty: bool = True) -> list[dict]:
    """The four optimizer groups of design.md §3, each parameter in exactly one.

    Backbone ("pretrained") conv weights: lr x1 with weight decay; backbone biases and all norm
    parameters: lr x2 without; new (classifier) weights: lr x10 with; new biases: lr x20 without.
    Each dict has params, lr, weight_decay, name and lr_scale (the multiplier, for schedulers).
    The bias-free classifier leaves ``new_bias`` empty; ``keep_empty=False`` drops empty groups.
    """
    backbone = model.backbone
    pretrained_ids = {id(p) for p in backbone.parameters()}
    buckets: dict[str, list[nn.Parameter]] = {name: [] for name in GROUPS}
    seen: set[int] = set()
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # shared parameters count once
                continue
            seen.add(id(p))
            buckets[_group_name(module, pname, id(p) in pretrained_ids)].append(p)
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

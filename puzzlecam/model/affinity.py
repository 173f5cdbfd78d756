"""AffinityNet (stage 2): a frozen ImageNet backbone and a trained edge head at stride 4 (docs/model.md,
"AffinityNet").

``AffinityNet(backbone)(x)`` -> edge logits (B, 1, ceil(H/4), ceil(W/4)). The head reads the five stage
outputs of ``backbone.stage_features`` (strides 4, 4, 8, 16, output stride): each goes through a 1x1 conv
to 32 channels without bias and GroupNorm(4, 32), is upsampled bilinearly (align_corners False) to
stride 4 and cropped to the second stage's size, then ReLU; the 160 concatenated channels go through a
1x1 conv with bias to one logit. The backbone never trains: its parameters do not require gradients,
it stays in eval mode (``train()`` does not switch it) and the head sees its outputs without a graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .classifier import build_backbone
from .pretrained import load_pretrained
from .resnet import Backbone

EDGE_CHANNELS = 32  # per stage, as the original
EDGE_GROUPS = 4  # GroupNorm(4, 32)
EDGE_STRIDE = 4  # the stride of the edge map (the stem's and the first stage's)


def stage_channels(backbone: Backbone) -> list[int]:
    """Channels of ``backbone.stage_features``' five maps, read from the modules (the stem's last norm,
    then each stage's last block's last norm: bn3 of a bottleneck, bn2 of a basic block)."""
    channels = [backbone.bn1.num_features]
    for stage in backbone.stages():
        last = stage[-1]
        channels.append((last.bn3 if hasattr(last, "bn3") else last.bn2).num_features)
    return channels


class AffinityNet(nn.Module):
    """forward(x (B, 3, H, W)) -> edge logits (B, 1, ceil(H/4), ceil(W/4)); see the module doc.

    ``edge_layers`` holds the head in the original's order and indices (five Sequential(conv, GroupNorm)
    branches, then the final conv), so an original checkpoint's ``edge_layers.*`` keys name the same
    tensors; the upsampling and ReLU have no parameters. The head keeps torch's default initialization,
    as the original (which calls no initializer on it).
    """

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone
        channels = stage_channels(backbone)
        branches = [
            nn.Sequential(nn.Conv2d(c, EDGE_CHANNELS, 1, bias=False), nn.GroupNorm(EDGE_GROUPS, EDGE_CHANNELS))
            for c in channels
        ]
        self.edge_layers = nn.ModuleList([*branches, nn.Conv2d(len(channels) * EDGE_CHANNELS, 1, 1, bias=True)])
        # Each branch's upsampling factor to stride 4: x1, x1, x2, x4 and x4 at output stride 16 (the
        # original's), x8 for the last stage at output stride 32.
        self.scales = (1, 1, 2, 4, backbone.output_stride // EDGE_STRIDE)
        backbone.requires_grad_(False)
        backbone.eval()

    def train(self, mode: bool = True) -> AffinityNet:
        super().train(mode)
        self.backbone.eval()  # ImageNet statistics always: the backbone is frozen
        return self

    def head_parameters(self) -> list[nn.Parameter]:
        """The parameters that train (the edge head's)."""
        return list(self.edge_layers.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"AffinityNet expects images of shape (B, 3, H, W), got {tuple(x.shape)}")
        with torch.no_grad():  # frozen: no graph through the backbone (the original detaches each output)
            features = [f.detach() for f in self.backbone.stage_features(x)]
        h, w = features[1].shape[-2:]
        edges = []
        for feature, branch, scale in zip(features, self.edge_layers, self.scales, strict=False):
            e = branch(feature)
            if scale > 1:
                e = F.interpolate(e, scale_factor=scale, mode="bilinear", align_corners=False)[..., :h, :w]
            edges.append(F.relu(e))
        return self.edge_layers[-1](torch.cat(edges, dim=1))


def build_affinity_net(cfg: ModelConfig) -> AffinityNet:
    """The AffinityNet of ``cfg`` (arch, width, output_stride; ``cfg.pretrained`` loaded into its backbone
    when set). The backbone's norms are always the frozen kind: it normalizes with its running statistics
    whatever ``model.norm`` says."""
    backbone = build_backbone(cfg.arch, width=cfg.width, output_stride=cfg.output_stride, norm="frozen")
    if cfg.pretrained:
        load_pretrained(backbone, cfg.pretrained)
    return AffinityNet(backbone)

"""ResNeSt-50/101/200/269 backbones with the parameter names and shapes of the ResNeSt release.

The architecture of the release (Zhang et al., "ResNeSt: Split-Attention Networks") as the Puzzle-CAM
reference code builds it (docs/model.md, "ResNeSt"): radix 2, cardinality 1, bottleneck width 64.

* Deep stem ``conv1``: 3x3 convs 3 -> s (stride 2) -> s -> 2s with norm + ReLU between (``conv1.{0,1,3,4,6}``),
  then ``bn1``, ReLU, 3x3 max pool (stride 2). s = 32 for resnest50, 64 for the others.
* Blocks: ``conv1`` 1x1 -> ``bn1`` -> ReLU -> ``conv2`` (:class:`SplitAttention`) -> avd pool ->
  ``conv3`` 1x1 -> ``bn3``; plus the residual, then ReLU. The first block of layers 2-4 has the avd
  pool, a 3x3 average pool with the block's stride (padding 1, zeros counted); the 3x3 conv itself
  never strides.
* ``downsample`` on each layer's first block: average pool (kernel = stride, ceil mode, padding not
  counted; none at stride 1) -> ``downsample.1`` 1x1 conv -> ``downsample.2`` norm.
* Output stride 16 (the reference's build): ``layer4`` stride 1, its first block dilation 1 and the
  others dilation 2; its first block keeps the avd pool at stride 1 (a 3x3 blur, no weights). Output
  stride 32: ``layer4`` stride 2, no dilation.
* ``width`` scales every channel count (64 = the release; it must be even for the 2-group conv); the
  stem width and the attention's floor of 32 channels scale with it.
* Every norm, the attention's ``bn1`` (on a pooled (B, C, 1, 1) input) included, is ``norm``'s class.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from puzzlecam.errors import ConfigError

from .resnet import Backbone, conv1x1, conv3x3

# arch -> (blocks per stage, stem width at model.width 64)
RESNEST_ARCHS: dict[str, tuple[tuple[int, int, int, int], int]] = {
    "resnest50": ((3, 4, 6, 3), 32),
    "resnest101": ((3, 4, 23, 3), 64),
    "resnest200": ((3, 24, 36, 3), 64),
    "resnest269": ((3, 30, 48, 8), 64),
}
RADIX = 2
EXPANSION = 4


class SplitAttention(nn.Module):
    """The split-attention 3x3 conv of the release (``SplAtConv2d``, radix 2, cardinality 1).

    ``conv`` (3x3, ``channels`` -> RADIX x ``channels``, RADIX groups) -> ``bn0`` -> ReLU gives RADIX
    splits of ``channels``; their sum is averaged over space -> ``fc1`` (1x1, bias) -> ``bn1`` -> ReLU ->
    ``fc2`` (1x1, bias) -> a softmax over the splits per channel; the output is the weighted sum of the
    splits (B, channels, H, W).
    """

    def __init__(self, channels: int, inter_channels: int, dilation: int, norm: type[nn.Module]):
        super().__init__()
        self.conv = nn.Conv2d(
            channels,
            channels * RADIX,
            kernel_size=3,
            padding=dilation,
            dilation=dilation,
            groups=RADIX,
            bias=False,
        )
        self.bn0 = norm(channels * RADIX)
        self.relu = nn.ReLU(inplace=True)
        self.fc1 = nn.Conv2d(channels, inter_channels, kernel_size=1)
        self.bn1 = norm(inter_channels)
        self.fc2 = nn.Conv2d(inter_channels, channels * RADIX, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        splits = self.relu(self.bn0(self.conv(x))).unflatten(1, (RADIX, -1))  # (B, RADIX, C, H, W)
        pooled = splits.sum(1).mean((2, 3), keepdim=True)
        logits = self.fc2(self.relu(self.bn1(self.fc1(pooled))))
        attention = logits.unflatten(1, (RADIX, -1)).softmax(dim=1)  # split r of channel c: index r*C + c
        return (attention * splits).sum(1)


class ResNeStBottleneck(nn.Module):
    expansion = EXPANSION

    def __init__(
        self,
        cin: int,
        planes: int,
        inter_channels: int,
        dilation: int,
        avd_stride: int | None,
        downsample: nn.Module | None,
        norm: type[nn.Module],
    ):
        super().__init__()
        self.conv1 = conv1x1(cin, planes)
        self.bn1 = norm(planes)
        self.conv2 = SplitAttention(planes, inter_channels, dilation, norm)
        # count_include_pad stays True here, as in the release (only the downsample pool excludes padding).
        self.avd = nn.Identity() if avd_stride is None else nn.AvgPool2d(3, avd_stride, padding=1)
        self.conv3 = conv1x1(planes, planes * EXPANSION)
        self.bn3 = norm(planes * EXPANSION)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.avd(self.conv2(out))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNeSt(Backbone):
    """ResNeSt backbone (the release's layout); see :class:`~puzzlecam.model.resnet.Backbone` for the outputs."""

    def __init__(self, arch: str = "resnest101", width: int = 64, output_stride: int = 16, norm: str = "train"):
        super().__init__(arch, RESNEST_ARCHS, width, output_stride, norm)
        if width % RADIX:
            raise ConfigError(
                f"model.width must be even for {arch} (its split-attention convs have 2 groups), got {width}"
            )
        blocks, stem_width = RESNEST_ARCHS[arch]
        stem = stem_width * width // 64
        norm_cls = self.norm_cls

        self.conv1 = nn.Sequential(
            conv3x3(3, stem, stride=2),
            norm_cls(stem),
            nn.ReLU(inplace=True),
            conv3x3(stem, stem),
            norm_cls(stem),
            nn.ReLU(inplace=True),
            conv3x3(stem, stem * 2),
        )
        self.bn1 = norm_cls(stem * 2)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        strides = (1, 2, 2, 1 if output_stride == 16 else 2)
        cin = stem * 2
        for i, (n, stride) in enumerate(zip(blocks, strides, strict=True)):
            planes = width * 2**i
            cout = planes * EXPANSION
            # The release's max(in * radix // 4, 32); the floor scales with the width (never binding at 64).
            inter = max(planes * RADIX // 4, 32 * width // 64)
            # Output stride 16: layer4 runs at stride 1 and dilates every block after its first by 2.
            later_dilation = 2 if i == 3 and stride == 1 else 1
            downsample = None
            if stride != 1 or cin != cout:
                pool = (
                    nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
                    if stride > 1
                    else nn.Identity()
                )
                downsample = nn.Sequential(pool, conv1x1(cin, cout), norm_cls(cout))
            avd_stride = stride if i > 0 else None  # layer1 has no avd pool
            layers = [ResNeStBottleneck(cin, planes, inter, 1, avd_stride, downsample, norm_cls)]
            layers += [
                ResNeStBottleneck(cout, planes, inter, later_dilation, None, None, norm_cls) for _ in range(n - 1)
            ]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
            cin = cout
        self.out_channels = cin
        self.reset_parameters()

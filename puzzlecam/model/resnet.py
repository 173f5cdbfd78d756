"""ResNet-18/34/50/101 backbones with torchvision's v1.5 parameter names and shapes.

Layout (torchvision ``resnet.py``): ``conv1`` (7x7, stride 2) / ``bn1`` / relu / maxpool (3x3, stride
2), then ``layer1``..``layer4`` of BasicBlocks (18, 34) or Bottlenecks (50, 101). Each block has
``conv1``/``bn1``/``conv2``/``bn2`` (+ ``conv3``/``bn3`` for Bottleneck) and, on the first block of a
stage that changes shape, ``downsample.0`` (1x1 conv) / ``downsample.1`` (norm). The stride sits on
the 3x3 conv (v1.5). There is no ``avgpool``/``fc``: the backbone returns the last feature map.
:class:`Backbone` is the part every backbone family shares (this one and ResNeSt, ``resnest.py``):
the stem (``conv1``, ``bn1``, relu, maxpool), ``layer1``..``layer4``, ``stage_features`` and the
initialization (docs/model.md).

Differences from torchvision, all options:

* ``output_stride=16`` gives ``layer4`` stride 1 (no dilation, as in the Puzzle-CAM reference
  code, whose ResNet uses strides (2, 2, 2, 1) and dilation 1 everywhere); 32 keeps stride 2.
* ``width`` scales every channel count (64 = torchvision); smaller widths give cheap CPU models.
* ``norm`` picks :class:`~puzzlecam.model.norm.BatchNorm2d`, ``FrozenStatsBatchNorm2d`` or ``SyncBatchNorm2d``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from puzzlecam.errors import ConfigError

from .norm import norm_layer

# arch -> (block type, blocks per stage)
RESNET_ARCHS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, downsample: nn.Module | None, norm: type[nn.Module]):
        super().__init__()
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn1 = norm(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, downsample: nn.Module | None, norm: type[nn.Module]):
        super().__init__()
        self.conv1 = conv1x1(cin, planes)
        self.bn1 = norm(planes)
        self.conv2 = conv3x3(planes, planes, stride)  # v1.5: the stride is on the 3x3 conv
        self.bn2 = norm(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = norm(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class Backbone(nn.Module):
    """A stem (``conv1``, ``bn1``, ``relu``, ``maxpool``) and four stages ``layer1``..``layer4``.

    ``forward(x)`` -> the last stage's features (B, out_channels, ceil(H/s), ceil(W/s)), s = output_stride;
    ``stage_features(x)`` -> [stem, layer1, layer2, layer3, layer4] outputs, at strides 4, 4, 8, 16, s
    (docs/model.md, "Backbones"). Subclasses build the modules (with ``self.norm_cls``, the class
    of ``norm``) after calling ``__init__`` and set ``out_channels``.
    """

    def __init__(self, arch: str, archs: dict, width: int, output_stride: int, norm: str):
        super().__init__()
        if arch not in archs:
            raise ConfigError(f"model.arch must be one of {', '.join(archs)}, got {arch!r}")
        if not isinstance(width, int) or isinstance(width, bool) or width < 1:
            raise ConfigError(f"model.width must be a positive int (64 = the published widths), got {width!r}")
        if output_stride not in (16, 32):
            raise ConfigError(f"model.output_stride must be 16 or 32, got {output_stride!r}")
        self.norm_cls = norm_layer(norm)
        self.arch, self.width, self.output_stride, self.norm = arch, width, output_stride, norm

    def reset_parameters(self) -> None:
        # torchvision's (and the ResNeSt release's) initialization; only matters without a pretrained file.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def stages(self) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
        return self.layer1, self.layer2, self.layer3, self.layer4

    def stage_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = [self.stem(x)]
        for stage in self.stages():
            features.append(stage(features[-1]))
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Not stage_features(x)[-1]: without autograd each stage's input is freed as soon as it is used.
        x = self.stem(x)
        for stage in self.stages():
            x = stage(x)
        return x


class ResNet(Backbone):
    """ResNet backbone (torchvision layout); see :class:`Backbone` for the outputs."""

    def __init__(self, arch: str = "resnet50", width: int = 64, output_stride: int = 16, norm: str = "train"):
        super().__init__(arch, RESNET_ARCHS, width, output_stride, norm)
        kind, blocks = RESNET_ARCHS[arch]
        block = BasicBlock if kind == "basic" else Bottleneck
        norm_cls = self.norm_cls

        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_cls(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        strides = (1, 2, 2, 1 if output_stride == 16 else 2)
        cin = width
        for i, (n, stride) in enumerate(zip(blocks, strides, strict=True)):
            planes = width * 2**i
            cout = planes * block.expansion
            downsample = None
            if stride != 1 or cin != cout:
                downsample = nn.Sequential(conv1x1(cin, cout, stride), norm_cls(cout))
            layers = [block(cin, planes, stride, downsample, norm_cls)]
            layers += [block(cout, planes, 1, None, norm_cls) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
            cin = cout
        self.out_channels = cin
        self.reset_parameters()

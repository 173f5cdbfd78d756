"""ResNet-18/34/50/101 backbones with torchvision's v1.5 parameter names and shapes.

Layout (torchvision ``resnet.py``): ``conv1`` (7x7, stride 2) / ``bn1`` / relu / maxpool (3x3, stride
2), then ``layer1``..``layer4`` of BasicBlocks (18, 34) or Bottlenecks (50, 101). Each block has
``conv1``/``bn1``/``conv2``/``bn2`` (+ ``conv3``/``bn3`` for Bottleneck) and, on the first block of a
stage that changes shape, ``downsample.0`` (1x1 conv) / ``downsample.1`` (norm). The stride sits on
the 3x3 conv (v1.5). There is no ``avgpool``/``fc``: the backbone returns the last feature map.

Differences from torchvision, all options:

* ``output_stride=16`` gives ``layer4`` stride 1 (no dilation, as in the Puzzle-CAM reference
  code, whose ResNet uses strides (2, 2, 2, 1) and dilation 1 everywhere); 32 keeps stride 2.
* ``width`` scales every channel count (64 = torchvision); smaller widths give cheap CPU models.
* ``norm`` picks :class:`~puzzlecam.model.norm.BatchNorm2d`, ``FrozenStatsBatchNorm2d`` or ``SyncBatchNorm2d``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .norm import norm_layer

# arch -> (block type, blocks per stage)
ARCHS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
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


class ResNet(nn.Module):
    """ResNet backbone: (B, 3, H, W) -> features (B, out_channels, ceil(H/s), ceil(W/s)), s = output_stride."""

    def __init__(self, arch: str = "resnet50", width: int = 64, output_stride: int = 16, norm: str = "train"):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"model.arch must be one of {', '.join(ARCHS)}, got {arch!r}")
        if not isinstance(width, int) or isinstance(width, bool) or width < 1:
            raise ValueError(f"model.width must be a positive int (64 = torchvision), got {width!r}")
        if output_stride not in (16, 32):
            raise ValueError(f"model.output_stride must be 16 or 32, got {output_stride!r}")
        kind, blocks = ARCHS[arch]
        block = BasicBlock if kind == "basic" else Bottleneck
        norm_cls = norm_layer(norm)
        self.arch, self.width, self.output_stride, self.norm = arch, width, output_stride, norm

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

    def reset_parameters(self) -> None:
        # torchvision's initialization (only matters when no pretrained file is loaded).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

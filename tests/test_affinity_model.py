"""AffinityNet (puzzlecam.model.affinity): edge map shapes for both backbone families at odd sizes, the
head against a direct computation of the original's order, the first conv sized from the real stage
channels, the frozen backbone (eval mode, no gradients, unchanged by a training step), pretrained loading."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from puzzlecam.config import ModelConfig
from puzzlecam.model import AffinityNet, build_affinity_net, build_backbone, stage_channels


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnest50", "resnest101"])
@pytest.mark.parametrize("size", [(32, 32), (37, 45), (61, 29)])
def test_edge_map_is_stride_4_for_any_size(arch, size):
    torch.manual_seed(0)
    backbone = build_backbone(arch, width=8)
    net = AffinityNet(backbone)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        channels = [f.shape[1] for f in backbone.stage_features(x)]
        edge = net(x)
    assert stage_channels(backbone) == channels
    assert net.edge_layers[0][0].in_channels == channels[0]  # resnest101's stem has 2x the width, resnest50 not
    assert edge.shape == (2, 1, math.ceil(size[0] / 4), math.ceil(size[1] / 4))
    assert torch.isfinite(edge).all()


def test_output_stride_32_upsamples_the_last_stage_x8():
    net = AffinityNet(build_backbone("resnet18", width=8, output_stride=32))
    assert net.scales == (1, 1, 2, 4, 8)
    with torch.no_grad():
        assert net(torch.randn(1, 3, 70, 50)).shape == (1, 1, 18, 13)


def test_head_is_the_originals_order():
    """conv -> GroupNorm -> bilinear upsampling (align_corners False) -> crop to stage 2 -> ReLU, concat, conv."""
    torch.manual_seed(1)
    net = AffinityNet(build_backbone("resnet50", width=8)).eval()
    for p in net.edge_layers.parameters():  # GroupNorm's defaults (1, 0) would hide a wrong order
        torch.nn.init.normal_(p)
    x = torch.randn(2, 3, 45, 38)
    with torch.no_grad():
        features = net.backbone.stage_features(x)
        h, w = features[1].shape[-2:]
        parts = []
        for i, (f, factor) in enumerate(zip(features, (1, 1, 2, 4, 4), strict=True)):
            conv, gn = net.edge_layers[i]
            y = F.group_norm(F.conv2d(f, conv.weight), 4, gn.weight, gn.bias)
            up = torch.nn.Upsample(scale_factor=factor, mode="bilinear", align_corners=False)(y)
            parts.append(F.relu(up[..., :h, :w]))
        last = net.edge_layers[5]
        expected = F.conv2d(torch.cat(parts, 1), last.weight, last.bias)
        torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)


def test_original_key_layout_of_the_head():
    net = AffinityNet(build_backbone("resnet50", width=8))
    head = {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.startswith("backbone.")}
    assert head == {
        "edge_layers.0.0.weight": (32, 8, 1, 1),
        "edge_layers.0.1.weight": (32,),
        "edge_layers.0.1.bias": (32,),
        "edge_layers.1.0.weight": (32, 32, 1, 1),
        "edge_layers.1.1.weight": (32,),
        "edge_layers.1.1.bias": (32,),
        "edge_layers.2.0.weight": (32, 64, 1, 1),
        "edge_layers.2.1.weight": (32,),
        "edge_layers.2.1.bias": (32,),
        "edge_layers.3.0.weight": (32, 128, 1, 1),
        "edge_layers.3.1.weight": (32,),
        "edge_layers.3.1.bias": (32,),
        "edge_layers.4.0.weight": (32, 256, 1, 1),
        "edge_layers.4.1.weight": (32,),
        "edge_layers.4.1.bias": (32,),
        "edge_layers.5.weight": (1, 160, 1, 1),
        "edge_layers.5.bias": (1,),
    }


@pytest.mark.parametrize("norm", ["train", "sync"])
def test_frozen_backbone_is_unchanged_by_a_training_step(norm):
    torch.manual_seed(2)
    net = build_affinity_net(ModelConfig(arch="resnest50", width=8, norm=norm))
    net.train()
    assert net.training and not net.backbone.training
    assert all(not m.training for m in net.backbone.modules())
    assert not any(p.requires_grad for p in net.backbone.parameters())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    head = net.head_parameters()
    assert {id(p) for p in head} == {id(p) for p in net.parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(head, lr=0.5, momentum=0.9)
    edge = net(torch.randn(1, 3, 40, 40))  # one image: batch statistics would fail on split attention
    assert edge.requires_grad
    torch.sigmoid(edge).mean().backward()
    optimizer.step()
    assert all(p.grad is None for p in net.backbone.parameters())
    after = net.state_dict()
    for k, v in before.items():
        if k.startswith("backbone."):  # weights and running statistics (a train-mode BN would update them)
            assert torch.equal(after[k], v), k
    changed = [k for k in before if k.startswith("edge_layers.") and not torch.equal(after[k], before[k])]
    assert len(changed) == len([k for k in before if k.startswith("edge_layers.")])


def test_pretrained_file_loads_into_the_backbone(tmp_path):
    source = build_backbone("resnet18", width=8)
    torch.nn.init.normal_(source.conv1.weight)
    path = tmp_path / "imagenet.pth"
    torch.save(source.state_dict(), path)
    net = build_affinity_net(ModelConfig(arch="resnet18", width=8, pretrained=str(path)))
    for k, v in source.state_dict().items():
        assert torch.equal(net.backbone.state_dict()[k], v), k

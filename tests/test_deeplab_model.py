"""DeepLabv3+ (puzzlecam.model.deeplab; design.md §9, docs/model.md "DeepLabv3+"): output shapes for every
arch, the forward against a functional re-statement of the architecture, the head's module order, init and
parameter groups, the head norms (sync on two gloo ranks against batch norm on the whole batch), refusals
and pretrained loading. Widths are tiny (backbone width 8, head 16 / 8) so that every arch runs in a blink."""

import json
import math
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from puzzlecam.config import ModelConfig, SegmentationConfig
from puzzlecam.errors import ConfigError
from puzzlecam.model import (
    ARCHS,
    BatchNorm2d,
    DeepLabV3Plus,
    SyncBatchNorm2d,
    build_backbone,
    build_deeplab,
    deeplab_v3_plus,
    param_groups,
)
from puzzlecam.utils.net import free_port

NUM_CLASSES = 5
SMALL_HEAD = dict(width=8, head_channels=16, low_level_channels=8)


def small_deeplab(arch: str = "resnet18", head_norm: str = "group", seed: int = 0, **kwargs) -> DeepLabV3Plus:
    torch.manual_seed(seed)
    return deeplab_v3_plus(arch, NUM_CLASSES, "frozen", head_norm, **{**SMALL_HEAD, **kwargs})


def randomize(model: nn.Module) -> nn.Module:
    """Every parameter and norm statistic moved off its initial value, so that each one matters."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
    return model


def head_modules(model: DeepLabV3Plus) -> list[nn.Module]:
    return [*model.aspp.modules(), *model.decoder.modules()]


# ---------------------------------------------------------------------------------------------
# Shapes


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_at_the_input_size_for_every_arch(arch):
    model = small_deeplab(arch).eval()
    with torch.no_grad():
        for size in ((33, 47), (17, 20)):
            assert model(torch.randn(2, 3, *size)).shape == (2, NUM_CLASSES, *size)


@pytest.mark.parametrize("head_norm", ["group", "batch", "sync"])
def test_every_head_norm_trains_and_evaluates(head_norm):
    model = small_deeplab("resnet50", head_norm)
    norms = [m for m in head_modules(model) if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d))]
    kind = {"group": nn.GroupNorm, "batch": BatchNorm2d, "sync": SyncBatchNorm2d}[head_norm]
    assert len(norms) == 9 and all(type(m) is kind for m in norms)
    assert all(m.num_groups == 4 for m in norms if isinstance(m, nn.GroupNorm))
    logits = model.train()(torch.randn(2, 3, 35, 29))
    assert logits.shape == (2, NUM_CLASSES, 35, 29)
    logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head_parameters())
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 35, 29)).shape == (1, NUM_CLASSES, 35, 29)


def test_alone_sync_head_norm_is_batch_norm():
    # No process group: "sync" computes this process's batch statistics, exactly as "batch".
    assert not dist.is_initialized()
    x = torch.randn(3, 3, 33, 40)
    outputs = []
    for head_norm in ("sync", "batch"):
        model = small_deeplab(head_norm=head_norm).train()
        _no_dropout(model)
        logits = model(x)
        logits.square().mean().backward()
        outputs.append([logits, *(p.grad for p in model.parameters()), *model.buffers()])
    assert all(torch.equal(a, b) for a, b in zip(*outputs, strict=True))


# ---------------------------------------------------------------------------------------------
# The forward against design.md §9, re-stated with torch.nn.functional


def reference_logits(model: DeepLabV3Plus, x: torch.Tensor, head_norm: str) -> torch.Tensor:
    """DeepLabv3+ in eval mode written out from the model's weights (dropout is the identity in eval)."""
    w = dict(model.named_parameters())
    buffers = dict(model.named_buffers())

    def norm(y, name):
        if head_norm == "group":
            return F.group_norm(y, 4, w[name + ".weight"], w[name + ".bias"], eps=1e-5)
        mean, var = buffers[name + ".running_mean"], buffers[name + ".running_var"]
        return F.batch_norm(y, mean, var, w[name + ".weight"], w[name + ".bias"], training=False, eps=1e-5)

    def conv_norm_relu(y, conv, norm_name, dilation=1):
        kernel = w[conv + ".weight"].shape[-1]
        y = F.conv2d(y, w[conv + ".weight"], padding=dilation * (kernel // 2), dilation=dilation)
        return F.relu(norm(y, norm_name))

    features = model.backbone.stage_features(x)
    low_level, deep = features[1], features[4]  # layer1 at stride 4, layer4 at stride 16
    assert low_level.shape[-1] == math.ceil(x.shape[-1] / 4) and deep.shape[-1] == math.ceil(x.shape[-1] / 16)
    # ASPP: 1x1, then 3x3 with dilation 6, 12, 18; the image-pooling branch; concat -> 1x1 -> norm -> ReLU.
    branches = [
        conv_norm_relu(deep, f"aspp.branches.{i}.0", f"aspp.branches.{i}.1", rate)
        for i, rate in enumerate((1, 6, 12, 18))
    ]
    pooled = conv_norm_relu(deep.mean((2, 3), keepdim=True), "aspp.image_pool.1", "aspp.image_pool.2")
    branches.append(F.interpolate(pooled, size=deep.shape[-2:], mode="bilinear", align_corners=True))
    aspp = conv_norm_relu(torch.cat(branches, 1), "aspp.project.0", "aspp.project.1")
    # Decoder: low-level 1x1 -> 48 (here 8); ASPP upsampled to stride 4; 3x3, 3x3, 1x1 with bias.
    low = conv_norm_relu(low_level, "decoder.low_level.0", "decoder.low_level.1")
    y = torch.cat([F.interpolate(aspp, size=low.shape[-2:], mode="bilinear", align_corners=True), low], 1)
    y = conv_norm_relu(y, "decoder.classifier.0", "decoder.classifier.1")
    y = conv_norm_relu(y, "decoder.classifier.4", "decoder.classifier.5")
    y = F.conv2d(y, w["decoder.classifier.8.weight"], w["decoder.classifier.8.bias"])
    return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=True)


@pytest.mark.parametrize(("arch", "head_norm"), [("resnet18", "group"), ("resnest50", "group"), ("resnet50", "batch")])
def test_forward_equals_the_functional_restatement(arch, head_norm):
    model = randomize(small_deeplab(arch, head_norm)).eval()
    # Stride-16 maps of 21 x 20: larger than the rates 6 and 12 and than 18 on one side, so that each dilated
    # conv's outer taps reach into the map (on a map no larger than the rate they all fall into the padding).
    x = torch.randn(2, 3, 330, 305)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_logits(model, x, head_norm), rtol=1e-5, atol=1e-5)


def test_head_is_the_originals_order():
    model = small_deeplab()
    convs = [m for m in model.aspp.modules() if isinstance(m, nn.Conv2d)]
    # aspp1..4, the pooled branch, the projection: as deeplab_utils.ASPP registers them.
    assert [(c.kernel_size, c.dilation, c.padding) for c in convs] == [
        ((1, 1), (1, 1), (0, 0)),
        ((3, 3), (6, 6), (6, 6)),
        ((3, 3), (12, 12), (12, 12)),
        ((3, 3), (18, 18), (18, 18)),
        ((1, 1), (1, 1), (0, 0)),
        ((1, 1), (1, 1), (0, 0)),
    ]
    assert [type(m) for m in model.aspp.image_pool] == [nn.AdaptiveAvgPool2d, nn.Conv2d, nn.GroupNorm, nn.ReLU]
    assert model.aspp.project[0].in_channels == 5 * 16 and model.aspp.dropout.p == 0.5
    assert convs[0].in_channels == model.backbone.out_channels == 64
    assert model.decoder.low_level[0].in_channels == 8  # resnet18 at width 8: layer1 has 8 channels
    layers = list(model.decoder.classifier)
    assert [type(m) for m in layers] == [nn.Conv2d, nn.GroupNorm, nn.ReLU, nn.Dropout] * 2 + [nn.Conv2d]
    assert (layers[0].in_channels, layers[0].kernel_size, layers[4].kernel_size) == (16 + 8, (3, 3), (3, 3))
    assert (layers[3].p, layers[7].p) == (0.5, 0.1)
    assert (layers[8].out_channels, layers[8].kernel_size) == (NUM_CLASSES, (1, 1))


# ---------------------------------------------------------------------------------------------
# Initialization and parameter groups


def test_head_initialization_is_the_originals():
    torch.manual_seed(0)
    model = deeplab_v3_plus("resnet18", 21, width=8)  # the original's head widths 256 / 48
    convs = [m for m in head_modules(model) if isinstance(m, nn.Conv2d)]
    last = model.decoder.classifier[-1]
    assert convs[-1] is last and last.bias is not None
    assert all(c.bias is None for c in convs[:-1])
    for m in head_modules(model):
        if isinstance(m, nn.GroupNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
    for conv in convs:  # kaiming normal, fan_in, gain sqrt(2)
        fan_in = conv.weight[0].numel()
        if conv.weight.numel() >= 20000:
            std = conv.weight.std().item()
            assert abs(std - math.sqrt(2 / fan_in)) < 0.05 * math.sqrt(2 / fan_in), (conv, std)
    # The last conv's bias keeps torch's default, uniform within 1/sqrt(fan_in), as the original.
    bound = 1 / math.sqrt(last.weight[0].numel())
    assert last.bias.abs().max() <= bound and last.bias.abs().sum() > 0
    batch = deeplab_v3_plus("resnet18", 21, head_norm="batch", width=8, head_channels=8, low_level_channels=4)
    for m in head_modules(batch):
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))


def test_parameter_groups_backbone_x1_x2_and_head_x10_x20():
    model = small_deeplab("resnest50")
    groups = {g["name"]: g for g in param_groups(model, lr=0.01, weight_decay=4e-5)}
    names = {id(p): n for n, p in model.named_parameters()}
    listed = [id(p) for g in groups.values() for p in g["params"]]
    assert len(listed) == len(set(listed)) and set(listed) == set(names)  # each parameter exactly once
    backbone = {id(p) for p in model.backbone.parameters()}
    for group, g in groups.items():
        for p in g["params"]:
            name = names[id(p)]
            pretrained = id(p) in backbone
            assert name.startswith("backbone." if pretrained else ("aspp.", "decoder."))
            want = ("pretrained_" if pretrained else "new_") + ("weights" if "weight" in name else "bias")
            assert group == want, name
    assert (groups["new_weights"]["lr_scale"], groups["new_bias"]["lr_scale"]) == (10.0, 20.0)
    head_biases = [names[id(p)] for p in groups["new_bias"]["params"]]
    assert "decoder.classifier.8.bias" in head_biases and "aspp.project.1.bias" in head_biases
    assert not any(".0.bias" in n or "image_pool.1.bias" in n for n in head_biases)  # convs have none


# ---------------------------------------------------------------------------------------------
# Configs, refusals, pretrained weights


def test_build_deeplab_from_the_config_sections():
    model = build_deeplab(
        ModelConfig(arch="resnet34", width=8, num_classes=3, norm="frozen"),
        SegmentationConfig(head_norm="batch", head_channels=12, low_level_channels=4),
    )
    assert model.num_classes == 3 and model.backbone.norm == "frozen"
    assert model.aspp.project[0].out_channels == 12 and model.decoder.low_level[0].out_channels == 4
    assert isinstance(model.aspp.project[1], BatchNorm2d)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(output_stride=32), "model.output_stride must be 16 for DeepLabv3+"),
        (dict(num_classes=1), "model.num_classes must be an int >= 2"),
        (dict(num_classes=True), "model.num_classes must be an int >= 2"),
        (dict(head_norm="layer"), "segmentation.head_norm must be one of group, batch, sync, got 'layer'"),
        (dict(head_channels=0), "segmentation.head_channels must be a positive int"),
        (dict(low_level_channels=6), "segmentation.low_level_channels must be a multiple of 4 with head_norm group"),
    ],
)
def test_refused_settings(kwargs, message):
    num_classes, head_norm = kwargs.pop("num_classes", NUM_CLASSES), kwargs.pop("head_norm", "group")
    with pytest.raises(ConfigError, match=message):
        deeplab_v3_plus("resnet18", num_classes, "frozen", head_norm, **{**SMALL_HEAD, **kwargs})


def test_batch_head_norm_takes_any_width():
    model = small_deeplab(head_norm="batch", head_channels=6, low_level_channels=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, NUM_CLASSES, 32, 32)


def test_pretrained_file_loads_into_the_backbone(tmp_path):
    source = randomize(build_backbone("resnet50", width=8))  # torchvision's names, as an ImageNet file
    path = tmp_path / "imagenet.pth"
    torch.save(source.state_dict(), path)
    model = deeplab_v3_plus("resnet50", 21, pretrained=str(path), **SMALL_HEAD)
    loaded = model.backbone.state_dict()
    assert loaded.keys() == source.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items())


# ---------------------------------------------------------------------------------------------
# head_norm "sync" on two gloo ranks against "batch" on the whole batch in one process

WORLD = 2


def _no_dropout(model: nn.Module) -> None:
    # Dropout masks differ between a split and a whole batch; the norms are what is compared.
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def _sync_step(rank: int) -> None:
    x = torch.randn(2 * WORLD, 3, 37, 30, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mine = slice(2 * rank, 2 * rank + 2)
    sync = small_deeplab(head_norm="sync").double().train()
    batch = small_deeplab(head_norm="batch").double().train()
    for model in (sync, batch):
        _no_dropout(model)
    logits = sync(x[mine])
    logits.square().mean().backward()
    want = batch(x)
    want.square().mean().backward()
    tol = dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(logits, want[mine], **tol)
    for (name, p), q in zip(sync.named_parameters(), batch.parameters(), strict=True):
        grad = p.grad.clone()
        dist.all_reduce(grad)  # each rank's mean loss: the whole batch's is their mean
        torch.testing.assert_close(grad / WORLD, q.grad, **tol, msg=lambda m, name=name: f"grad {name}: {m}")
    for (name, b), c in zip(sync.named_buffers(), batch.buffers(), strict=True):
        torch.testing.assert_close(b, c, **tol, msg=lambda m, name=name: f"buffer {name}: {m}")


def _sync_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    failure = None
    try:
        _sync_step(rank)
    except Exception as e:  # reported by the test; the peer fails its collective's timeout
        failure = f"{type(e).__name__}: {e}"
    finally:
        Path(out_dir, f"{rank}.json").write_text(json.dumps(failure))
        dist.destroy_process_group()


def test_sync_head_norm_on_two_ranks_equals_batch_norm_on_the_whole_batch(tmp_path):
    mp.start_processes(_sync_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn")
    for rank in range(WORLD):
        failure = json.loads((tmp_path / f"{rank}.json").read_text())
        assert failure is None, f"rank {rank}: {failure}"

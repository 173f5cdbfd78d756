"""ResNeSt backbones (docs/model.md, "ResNeSt"): the release's key layout per depth, the output-stride-16
construction, the split-attention block and a bottleneck against direct computations, norms, pretrained
files and the stem trap, the batch-1 guard."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_model import random_state_dict, read_layout

from puzzlecam.config import ModelConfig, load_config
from puzzlecam.errors import ConfigError
from puzzlecam.model import (
    RESNEST_ARCHS,
    BatchNorm2d,
    FrozenStatsBatchNorm2d,
    PretrainedMismatchError,
    ResNeSt,
    SplitAttention,
    SyncBatchNorm2d,
    build_model,
    load_pretrained,
    param_groups,
)
from puzzlecam.tasks import build_task

DATA = Path(__file__).parent / "data"

# The published architecture (the ResNeSt release and the paper): parameters with the 1000-way
# fc, state-dict entries and BatchNorm layers of each depth; the stem width (resnest50 32, the others 64).
PUBLISHED = {
    "resnest50": (27_483_240, 476, 71, 32),
    "resnest101": (48_275_016, 935, 139, 64),
    "resnest200": (70_201_544, 1826, 271, 64),
    "resnest269": (110_929_480, 2447, 363, 64),
}
STATS = ("running_mean", "running_var", "num_batches_tracked")


def randomize_norms(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial statistics and affine parameters, so that an eval-mode check sees every term."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)


# ---------------------------------------------------------------------------------------------
# Layout


@pytest.mark.parametrize("arch", list(RESNEST_ARCHS))
def test_layout_equals_the_release(arch):
    # The expected file lists the release's state dict; its counts are the published ones, so the file is
    # checked before it checks us. A meta-device build is enough for names and shapes.
    n_params, n_entries, n_norms, stem = PUBLISHED[arch]
    release = read_layout(DATA / f"{arch}_keys.txt")
    assert len(release) == n_entries
    assert sum(1 for k in release if k.endswith(".running_mean")) == n_norms
    params = [k for k in release if not k.endswith(STATS)]
    assert sum(math.prod(release[k]) for k in params) == n_params
    assert release["conv1.0.weight"] == (stem, 3, 3, 3) and release["bn1.weight"] == (2 * stem,)

    with torch.device("meta"):
        backbone = ResNeSt(arch)
    ours = {k: tuple(v.shape) for k, v in backbone.state_dict().items()}
    # Same names in the same order (fc is the classification head we leave out), same shapes.
    assert list(ours) == [k for k in release if not k.startswith("fc.")]
    assert {k: s for k, s in ours.items() if s != release[k]} == {}
    assert backbone.out_channels == 2048
    assert sum(isinstance(m, nn.BatchNorm2d) for m in backbone.modules()) == n_norms


def test_width_scales_channels_and_keeps_names():
    with torch.device("meta"):
        full, thin = ResNeSt("resnest50"), ResNeSt("resnest50", width=16)
        deep = ResNeSt("resnest101", width=16)
    assert list(full.state_dict()) == list(thin.state_dict())
    assert thin.out_channels == 512
    assert thin.conv1[0].weight.shape == (8, 3, 3, 3) and deep.conv1[0].weight.shape == (16, 3, 3, 3)
    # inter channels: max(planes * 2 // 4, 32 * width / 64): 8 in layer1, 64 in layer4 at width 16.
    assert thin.layer1[0].conv2.fc1.weight.shape == (8, 16, 1, 1)
    assert thin.layer4[0].conv2.fc1.weight.shape == (64, 128, 1, 1)
    with pytest.raises(ConfigError, match="model.width must be even"):
        ResNeSt("resnest50", width=9)
    with pytest.raises(ValueError, match="model.arch must be one of resnest50"):
        ResNeSt("resnet50")


# ---------------------------------------------------------------------------------------------
# Output stride: the reference's construction


@pytest.mark.parametrize("output_stride", [16, 32])
def test_full_width_stage_sizes(output_stride):
    with torch.device("meta"):
        backbone = ResNeSt("resnest101", output_stride=output_stride).eval()
        feats = backbone.stage_features(torch.empty(1, 3, 512, 512))
    last = 32 if output_stride == 16 else 16
    assert [tuple(f.shape[1:]) for f in feats] == [
        (128, 128, 128),
        (256, 128, 128),
        (512, 64, 64),
        (1024, 32, 32),
        (2048, last, last),
    ]


@pytest.mark.parametrize("output_stride", [16, 32])
def test_layer_construction(output_stride):
    with torch.device("meta"):
        b = ResNeSt("resnest50", output_stride=output_stride)
    last = 1 if output_stride == 16 else 2
    # The 3x3 conv never strides; the stride sits on the avd pool (after it) and the downsample pool.
    assert all(m.conv2.conv.stride == (1, 1) for layer in b.stages() for m in layer)
    assert isinstance(b.layer1[0].avd, nn.Identity) and isinstance(b.layer1[0].downsample[0], nn.Identity)
    for layer, stride in [(b.layer2, 2), (b.layer3, 2), (b.layer4, last)]:
        avd = layer[0].avd  # kept at stride 1 too (layer4 at output stride 16): a 3x3 blur
        assert (avd.kernel_size, avd.stride, avd.padding, avd.count_include_pad) == (3, stride, 1, True)
        assert all(isinstance(m.avd, nn.Identity) for m in layer[1:])
        pool = layer[0].downsample[0]
        if stride == 1:
            assert isinstance(pool, nn.Identity)
        else:
            assert (pool.kernel_size, pool.stride, pool.ceil_mode, pool.count_include_pad) == (2, 2, True, False)
    dilations = [m.conv2.conv.dilation[0] for m in b.layer4]
    paddings = [m.conv2.conv.padding[0] for m in b.layer4]
    assert dilations == paddings == ([1, 2, 2] if output_stride == 16 else [1, 1, 1])
    assert all(m.conv2.conv.dilation == (1, 1) for layer in b.stages()[:3] for m in layer)


# ---------------------------------------------------------------------------------------------
# The split-attention block and a bottleneck, against direct computations


def test_split_attention_equals_direct_computation():
    torch.manual_seed(0)
    channels, inter, dilation = 4, 3, 2
    block = SplitAttention(channels, inter, dilation, BatchNorm2d).train()
    randomize_norms(block)
    for conv in (block.conv, block.fc1, block.fc2):
        nn.init.normal_(conv.weight)
    nn.init.normal_(block.fc1.bias)
    nn.init.normal_(block.fc2.bias)
    x = torch.randn(3, channels, 5, 7)
    out = block(x)

    def batch_norm(v, bn):  # training mode: the batch's mean and biased variance per channel
        dims = [d for d in range(v.dim()) if d != 1]
        mean, var = v.mean(dims, keepdim=True), v.var(dims, correction=0, keepdim=True)
        shape = [1, -1] + [1] * (v.dim() - 2)
        return (v - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(shape) + bn.bias.view(shape)

    half, w = channels // 2, block.conv.weight
    # Two groups: input channels [0, C/2) make split 0 (outputs [0, C)), [C/2, C) make split 1.
    conv = torch.cat(
        [
            F.conv2d(x[:, g * half : (g + 1) * half], w[g * channels : (g + 1) * channels], padding=2, dilation=2)
            for g in (0, 1)
        ],
        dim=1,
    )
    u = torch.relu(batch_norm(conv, block.bn0))
    split0, split1 = u[:, :channels], u[:, channels:]
    s = (split0 + split1).mean((2, 3))  # (B, C)
    z = s @ block.fc1.weight[:, :, 0, 0].T + block.fc1.bias
    z = torch.relu(batch_norm(z, block.bn1))  # over the batch: one value per image and channel
    a = z @ block.fc2.weight[:, :, 0, 0].T + block.fc2.bias  # (B, 2C): split 0's logits, then split 1's
    a0, a1 = a[:, :channels], a[:, channels:]
    att0 = torch.exp(a0) / (torch.exp(a0) + torch.exp(a1))
    want = att0[:, :, None, None] * split0 + (1 - att0)[:, :, None, None] * split1
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("output_stride", "layer", "avd_stride", "pool_stride"),
    [(16, "layer2", 2, 2), (16, "layer4", 1, 1), (32, "layer4", 2, 2)],
)
def test_first_bottleneck_equals_direct_computation(output_stride, layer, avd_stride, pool_stride):
    torch.manual_seed(0)
    backbone = ResNeSt("resnest50", width=8, output_stride=output_stride).eval()
    randomize_norms(backbone)
    block = getattr(backbone, layer)[0]
    x = torch.randn(2, block.conv1.in_channels, 7, 9)  # odd sizes: ceil mode and the padded border matter

    def bn(v, m):
        return F.batch_norm(v, m.running_mean, m.running_var, m.weight, m.bias, training=False, eps=m.eps)

    with torch.no_grad():
        out = torch.relu(bn(F.conv2d(x, block.conv1.weight), block.bn1))
        out = block.conv2(out)  # checked on its own above
        # avd: a 3x3 average pool with the block's stride, zero padding counted, after the attention conv.
        out = F.avg_pool2d(out, 3, avd_stride, padding=1, count_include_pad=True)
        out = bn(F.conv2d(out, block.conv3.weight), block.bn3)
        identity = x
        if pool_stride > 1:
            identity = F.avg_pool2d(x, pool_stride, pool_stride, ceil_mode=True, count_include_pad=False)
        identity = bn(F.conv2d(identity, block.downsample[1].weight), block.downsample[2])
        want = torch.relu(out + identity)
        got = block(x)
    assert got.shape == (2, block.bn3.num_features, math.ceil(7 / avd_stride), math.ceil(9 / avd_stride))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Normalization


@pytest.mark.parametrize("norm", ["train", "frozen", "sync"])
def test_norm_reaches_every_norm_and_frozen_statistics_stay(norm):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnest50", width=8, norm=norm, num_classes=3)).train()
    cls = {"train": BatchNorm2d, "frozen": FrozenStatsBatchNorm2d, "sync": SyncBatchNorm2d}[norm]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == PUBLISHED["resnest50"][2] and all(type(m) is cls for m in norms)
    attention_bn = model.backbone.layer3[0].conv2.bn1
    stats = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(STATS)}
    affine = attention_bn.weight.detach().clone()

    opt = torch.optim.SGD(param_groups(model, lr=0.1, weight_decay=1e-4), momentum=0.9)
    logits, _ = model(torch.randn(2, 3, 48, 48))
    F.multilabel_soft_margin_loss(logits, torch.tensor([[1.0, 0, 1], [0, 1, 0]])).backward()
    opt.step()

    after = model.state_dict()
    changed = [k for k in stats if not torch.equal(stats[k], after[k])]
    assert changed == ([] if norm == "frozen" else list(stats))
    assert not torch.equal(attention_bn.weight, affine)  # the affine parameters train in every mode


def test_batch_of_one_fails_with_batch_statistics_only():
    # Why the guard exists: the attention's bn1 sees (1, C, 1, 1) and torch refuses to train on it.
    model = build_model(ModelConfig(arch="resnest50", width=8, norm="train")).train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        model(torch.randn(1, 3, 32, 32))
    frozen = build_model(ModelConfig(arch="resnest50", width=8, norm="frozen")).train()
    frozen(torch.randn(1, 3, 32, 32))[0].sum().backward()


@pytest.mark.parametrize(
    ("arch", "norm", "micro_batch", "world_size", "refused"),
    [
        ("resnest101", "train", 1, 1, True),
        ("resnest50", "train", 1, 4, True),
        ("resnest50", "sync", 1, 1, True),
        ("resnest50", "sync", 1, 2, False),
        ("resnest50", "frozen", 1, 1, False),
        ("resnest50", "train", 2, 1, False),
        ("resnet50", "train", 1, 1, False),
    ],
)
def test_batch_of_one_guard(monkeypatch, arch, norm, micro_batch, world_size, refused):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    cfg = load_config(
        None,
        [
            f"model.arch={arch}",
            f"model.norm={norm}",
            f"train.micro_batch_size={micro_batch}",
            "train.grad_accum_steps=1",
        ],
    )
    if not refused:
        build_task(cfg)
        return
    with pytest.raises(ConfigError) as err:
        build_task(cfg)
    msg = str(err.value)
    assert f"model.arch={arch} with model.norm={norm}" in msg and "train.micro_batch_size=1" in msg
    assert "model.norm=frozen" in msg and "model.norm=sync with more than one process" in msg
    assert "train.micro_batch_size of 2 or more" in msg


def test_channels_last_and_half_precision():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnest50", width=8, num_classes=4)).eval()
    randomize_norms(model)
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        ref = model(x)[1]
        last = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))[1]
        half = model.to(torch.bfloat16)(x.to(torch.bfloat16))[1]
    torch.testing.assert_close(last, ref, rtol=1e-4, atol=1e-4)  # another summation order
    # Relative error of the whole map: 50 layers of bf16 rounding (8 mantissa bits).
    assert ((half.float() - ref).norm() / ref.norm()).item() < 0.03
    bn = model.backbone.layer2[0].conv2.bn1
    assert bn.weight.dtype == torch.bfloat16 and bn.running_var.dtype == torch.float32


def test_attention_biases_are_pretrained_biases():
    # The original's rule by name: fc1/fc2 biases of the attention go with the other backbone biases (x2, no decay).
    model = build_model(ModelConfig(arch="resnest50", width=8))
    names = {id(p): n for n, p in model.named_parameters()}
    group_of = {names[id(p)]: g["name"] for g in param_groups(model, 0.1, 1e-4) for p in g["params"]}
    assert group_of["backbone.layer1.0.conv2.fc1.bias"] == "pretrained_bias"
    assert group_of["backbone.layer1.0.conv2.fc2.weight"] == "pretrained_weights"
    assert group_of["backbone.conv1.1.weight"] == "pretrained_weights"


# ---------------------------------------------------------------------------------------------
# Pretrained files


@pytest.fixture(scope="module")
def release50(tmp_path_factory) -> tuple[dict[str, torch.Tensor], Path]:
    """A file with the resnest50 release layout (fc included) and random values."""
    state = random_state_dict(read_layout(DATA / "resnest50_keys.txt"))
    path = tmp_path_factory.mktemp("weights") / "resnest50-528c19ca.pth"
    torch.save(state, path)
    return state, path


def test_release_file_loads_strictly_with_or_without_counters(release50, tmp_path):
    state, path = release50
    model = build_model(ModelConfig(arch="resnest50", pretrained=str(path)))
    loaded = model.backbone.state_dict()
    assert set(loaded) == {k for k in state if not k.startswith("fc.")}
    assert all(torch.equal(v, state[k]) for k, v in loaded.items())

    old = tmp_path / "no_counters.pth"
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, old)
    backbone = ResNeSt("resnest50")
    load_pretrained(backbone, old)
    assert torch.equal(backbone.layer4[2].conv2.bn1.running_var, state["layer4.2.conv2.bn1.running_var"])


def test_stem_trap_is_named(release50, tmp_path):
    _, path = release50
    with torch.device("meta"):
        deeper = ResNeSt("resnest101")
    with pytest.raises(PretrainedMismatchError) as err:
        load_pretrained(deeper, path)
    msg = str(err.value)
    assert str(path) in msg and "missing keys (" in msg
    assert "conv1.0.weight: file (32, 3, 3, 3) vs model (64, 3, 3, 3)" in msg
    assert "note: the file's stem (conv1.0.weight) has 32 output channels, that of a resnest50 file" in msg
    assert "resnest101's has 64" in msg

    # The other way round: a 64-wide stem (a resnest101/200/269 file) against resnest50.
    wide = tmp_path / "stem64.pth"
    torch.save({"conv1.0.weight": torch.zeros(64, 3, 3, 3)}, wide)
    with torch.device("meta"):
        shallow = ResNeSt("resnest50")
    with pytest.raises(PretrainedMismatchError, match="that of a resnest101 / resnest200 / resnest269 file"):
        load_pretrained(shallow, wide)
    # A reduced width gets the width note instead.
    with pytest.raises(PretrainedMismatchError, match="model.width=64") as err:
        load_pretrained(ResNeSt("resnest50", width=8), path)
    assert "stem (conv1.0.weight)" not in str(err.value)

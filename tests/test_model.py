"""Model tests: shapes and strides of every stage of every arch, torchvision key layout, strict pretrained
loading, frozen normalization, fp32 statistics under reduced precision, optimizer parameter groups.
ResNeSt's own checks are in test_resnest.py."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from puzzlecam.config import ModelConfig
from puzzlecam.errors import UsageError
from puzzlecam.model import (
    ARCHS,
    RESNET_ARCHS,
    BatchNorm2d,
    Classifier,
    FrozenStatsBatchNorm2d,
    PretrainedMismatchError,
    ResNet,
    build_backbone,
    build_model,
    load_pretrained,
    param_groups,
)

KEYS_FILE = Path(__file__).parent / "data" / "resnet50_keys.txt"

# Published parameter counts of torchvision's models (num_params in the torchvision docs),
# which include the 1000-way fc layer.
TORCHVISION_NUM_PARAMS = {"resnet18": 11689512, "resnet34": 21797672, "resnet50": 25557032, "resnet101": 44549160}


def read_layout(path: Path) -> dict[str, tuple[int, ...]]:
    layout = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, shape = line.split()
        layout[name] = () if shape == "-" else tuple(int(s) for s in shape.split(","))
    return layout


def random_state_dict(layout: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in layout.items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.randint(0, 1000, shape, generator=g)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=g) + 0.5
        else:
            state[name] = torch.randn(shape, generator=g)
    return state


@pytest.fixture(scope="module")
def tv_layout() -> dict[str, tuple[int, ...]]:
    return read_layout(KEYS_FILE)


@pytest.fixture(scope="module")
def tv_state(tv_layout) -> dict[str, torch.Tensor]:
    return random_state_dict(tv_layout)


@pytest.fixture(scope="module")
def tv_file(tv_state, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "resnet50-imagenet.pth"
    torch.save(tv_state, path)
    return path


# ---------------------------------------------------------------------------------------------
# Architecture


def published_stage_channels(arch: str, width: int) -> list[int]:
    """Channels of the stem and layer1..4 outputs by the published architectures, scaled by width / 64."""
    if arch in ("resnet18", "resnet34"):
        return [width, width, 2 * width, 4 * width, 8 * width]
    stem = width  # torchvision's 7x7 stem; ResNeSt's deep stem ends at twice its stem width (32 or 64)
    if arch.startswith("resnest"):
        stem = 2 * (32 if arch == "resnest50" else 64) * width // 64
    return [stem, 4 * width, 8 * width, 16 * width, 32 * width]


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("output_stride", [16, 32])
def test_stage_and_output_shapes(arch, output_stride):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, width=8, output_stride=output_stride, num_classes=5))
    model.eval()
    channels = published_stage_channels(arch, 8)
    for h, w in [(64, 80), (70, 90)]:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            features = model.backbone.stage_features(x)
            logits, cams = model(x)
            last = model.backbone(x)
        strides = [4, 4, 8, 16, output_stride]
        assert [tuple(f.shape) for f in features] == [
            (2, c, math.ceil(h / s), math.ceil(w / s)) for c, s in zip(channels, strides, strict=True)
        ]
        assert torch.equal(last, features[-1])
        assert cams.shape == (2, 5, math.ceil(h / output_stride), math.ceil(w / output_stride))
        assert logits.shape == (2, 5) and logits.dtype == torch.float32
        torch.testing.assert_close(logits, cams.mean(dim=(2, 3)))
    assert model.num_classes == 5
    assert model.backbone.out_channels == channels[-1]
    assert model.classifier.weight.shape == (5, channels[-1], 1, 1)
    assert model.classifier.bias is None


def test_full_width_512_gives_32x32_maps():
    with torch.device("meta"):
        model = build_model(ModelConfig(arch="resnet50"))
        logits, cams = model(torch.empty(1, 3, 512, 512))
    assert cams.shape == (1, 20, 32, 32) and logits.shape == (1, 20)


@pytest.mark.parametrize("arch", list(RESNET_ARCHS))
def test_parameter_count_matches_torchvision(arch):
    with torch.device("meta"):
        backbone = ResNet(arch)
    fc = backbone.out_channels * 1000 + 1000
    assert sum(p.numel() for p in backbone.parameters()) + fc == TORCHVISION_NUM_PARAMS[arch]


def test_width_scales_channels():
    with torch.device("meta"):
        full, thin = ResNet("resnet50", width=64), ResNet("resnet50", width=16)
    assert full.out_channels == 2048 and thin.out_channels == 512
    assert thin.conv1.weight.shape == (16, 3, 7, 7)
    assert thin.layer4[0].conv2.weight.shape == (128, 128, 3, 3)
    assert list(full.state_dict()) == list(thin.state_dict())


def test_resnet50_layout_equals_torchvision(tv_layout):
    # The expected file holds torchvision's full state dict; its parameters add up to the
    # published count, so the file itself is checked before it checks us.
    params = [n for n in tv_layout if not n.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert sum(math.prod(tv_layout[n]) for n in params) == TORCHVISION_NUM_PARAMS["resnet50"]
    with torch.device("meta"):
        backbone = ResNet("resnet50")
    ours = {k: tuple(v.shape) for k, v in backbone.state_dict().items()}
    expected = {k: v for k, v in tv_layout.items() if not k.startswith("fc.")}
    assert sorted(set(ours) - set(expected)) == []
    assert sorted(set(expected) - set(ours)) == []
    assert {k: s for k, s in ours.items() if s != expected[k]} == {}


def test_stride_on_3x3_conv_and_last_stage_stride():
    b16 = ResNet("resnet50", width=8, output_stride=16)
    b32 = ResNet("resnet50", width=8, output_stride=32)
    for backbone, last in [(b16, 1), (b32, 2)]:
        strides = [backbone.layer2[0].conv2.stride, backbone.layer3[0].conv2.stride, backbone.layer4[0].conv2.stride]
        assert strides == [(2, 2), (2, 2), (last, last)]
        assert backbone.layer2[0].conv1.stride == (1, 1)  # v1.5: not on the 1x1
        assert backbone.layer4[0].downsample[0].stride == (last, last)
        assert all(m.dilation == (1, 1) for m in backbone.modules() if isinstance(m, nn.Conv2d))


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="model.arch"):
        ResNet("resnet152")
    with pytest.raises(ValueError, match="model.arch must be one of resnet18, .*, resnest50, .*resnest269, got"):
        build_backbone("resnet152")
    with pytest.raises(ValueError, match="model.width"):
        ResNet("resnet18", width=0)
    with pytest.raises(ValueError, match="model.output_stride"):
        ResNet("resnet18", output_stride=8)
    with pytest.raises(ValueError, match="model.norm"):
        ResNet("resnet18", norm="group")
    model = build_model(ModelConfig(arch="resnet18", width=8))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 4, 32, 32))


def test_classifier_initialization_matches_reference():
    # Reference: kaiming_normal_ with torch defaults -> std sqrt(2 / fan_in); no bias.
    torch.manual_seed(0)
    with torch.device("meta"):
        backbone = ResNet("resnet50")
    model = Classifier(backbone.to_empty(device="cpu"), num_classes=20)
    std = model.classifier.weight.std().item()
    assert abs(std - math.sqrt(2 / 2048)) / math.sqrt(2 / 2048) < 0.05


# ---------------------------------------------------------------------------------------------
# Pretrained weights


def test_pretrained_file_loads_strictly(tv_state, tv_file):
    model = build_model(ModelConfig(arch="resnet50", pretrained=str(tv_file)))
    loaded = model.backbone.state_dict()
    assert set(loaded) == {k for k in tv_state if not k.startswith("fc.")}
    for k, v in loaded.items():
        assert torch.equal(v, tv_state[k]), k


def test_pretrained_safetensors_and_old_files_without_counters(tv_state, tmp_path):
    from safetensors.torch import save_file

    old = {k: v for k, v in tv_state.items() if not k.endswith("num_batches_tracked")}
    st_path = tmp_path / "resnet50.safetensors"
    save_file(old, str(st_path))
    backbone = ResNet("resnet50")
    load_pretrained(backbone, st_path)
    assert torch.equal(backbone.layer3[5].bn2.running_var, tv_state["layer3.5.bn2.running_var"])
    assert torch.equal(backbone.conv1.weight, tv_state["conv1.weight"])


def test_a_puzzlecam_export_initializes_a_backbone_at_any_width(tmp_path):
    """A stage-1 run's model.safetensors (backbone.* + classifier.weight) starts another network's backbone
    (the CPU demo's AffinityNet); another width or arch is refused naming the export."""
    from safetensors.torch import save_file

    from puzzlecam.model.affinity import build_affinity_net

    trained = build_model(ModelConfig(arch="resnet18", width=8))
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p))
    export = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(export))
    net = build_affinity_net(ModelConfig(arch="resnet18", width=8, pretrained=str(export)))
    for k, v in trained.backbone.state_dict().items():
        assert torch.equal(net.backbone.state_dict()[k], v), k
    with pytest.raises(PretrainedMismatchError, match="puzzlecam export: its backbone.* keys must fit"):
        build_model(ModelConfig(arch="resnet18", width=16, pretrained=str(export)))
    # convert --to-torchvision: the same backbone as a torchvision-layout .pth (what an ImageNet file is).
    from puzzlecam import convert

    pth = tmp_path / "tv" / "resnet18_w8.pth"
    assert convert.main(["--to-torchvision", str(export), str(pth)]) == 0
    tv = torch.load(pth, weights_only=True)
    assert set(tv) == set(trained.backbone.state_dict()) and "conv1.weight" in tv
    fresh = build_model(ModelConfig(arch="resnet18", width=8, pretrained=str(pth)))
    for k, v in trained.backbone.state_dict().items():
        assert torch.equal(fresh.backbone.state_dict()[k], v), k
    assert convert.main(["--to-torchvision", str(export), str(pth)]) == 2  # exists: --overwrite
    assert convert.main(["--to-torchvision", str(pth), str(tmp_path / "again.pth")]) == 2  # not an export


def test_wrong_file_lists_keys_and_shapes(tv_state, tmp_path):
    bad = dict(tv_state)
    del bad["layer2.1.conv2.weight"]
    bad["layer9.0.conv1.weight"] = torch.zeros(1)
    bad["layer4.2.bn3.bias"] = torch.zeros(7)
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(PretrainedMismatchError) as err:
        build_model(ModelConfig(arch="resnet50", pretrained=str(path)))
    msg = str(err.value)
    assert str(path) in msg
    assert "missing keys (1)" in msg and "layer2.1.conv2.weight" in msg
    assert "unexpected keys (1)" in msg and "layer9.0.conv1.weight" in msg
    assert "shape mismatches (1)" in msg and "layer4.2.bn3.bias: file (7,) vs model (2048,)" in msg
    assert "fc." not in msg


def test_wrong_architecture_or_width_is_rejected(tv_file):
    with pytest.raises(PretrainedMismatchError, match="missing keys") as err:
        build_model(ModelConfig(arch="resnet101", pretrained=str(tv_file)))
    assert str(tv_file) in str(err.value)
    with pytest.raises(PretrainedMismatchError, match="model.width=64") as err:
        build_model(ModelConfig(arch="resnet50", width=16, pretrained=str(tv_file)))
    assert "shape mismatches (" in str(err.value)


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(UsageError, match=r"model.pretrained: .*nope.pth does not exist \(nothing is downloaded\)"):
        build_model(ModelConfig(arch="resnet18", width=8, pretrained=str(tmp_path / "nope.pth")))
    nested = tmp_path / "nested.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}}, nested)
    with pytest.raises(ValueError, match="flat state dict") as err:
        load_pretrained(ResNet("resnet18", width=8), nested)
    assert str(nested) in str(err.value)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read") as err:
        load_pretrained(ResNet("resnet18", width=8), junk)
    assert str(junk) in str(err.value)
    # A pickle that would run code is refused by the weights-only unpickler, in one line; it never runs.
    marker = tmp_path / "ran"
    payload = tmp_path / "payload.pth"
    torch.save({"conv1.weight": _RunsCode(str(marker))}, payload)
    with pytest.raises(ValueError, match=r"payload.pth cannot be read as a torch state dict \(") as err:
        load_pretrained(ResNet("resnet18", width=8), payload)
    assert "\n" not in str(err.value) and not marker.exists()


class _RunsCode:
    """Unpickling this creates a file: the test's stand-in for a hostile payload."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# ---------------------------------------------------------------------------------------------
# Normalization


def _stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def _train_step(model: nn.Module) -> None:
    opt = torch.optim.SGD(param_groups(model, lr=0.1, weight_decay=1e-4), momentum=0.9)
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 2, (4, 3)).float()
    logits, _ = model(x)
    nn.functional.multilabel_soft_margin_loss(logits, y).backward()
    opt.step()


@pytest.mark.parametrize("norm", ["train", "frozen"])
def test_frozen_norm_keeps_statistics_and_train_norm_updates_them(norm):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet18", width=8, norm=norm, num_classes=3))
    model.train()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(isinstance(m, FrozenStatsBatchNorm2d if norm == "frozen" else BatchNorm2d) for m in norms)
    before_stats = _stats(model)
    before_affine = model.backbone.bn1.weight.detach().clone()
    _train_step(model)
    after = _stats(model)
    changed = [k for k in before_stats if not torch.equal(before_stats[k], after[k])]
    if norm == "frozen":
        assert changed == []
    else:
        assert len(changed) == len(before_stats)  # every mean, var and counter moved
    # Affine parameters train in both modes (as the reference code's FixedBatchNorm).
    assert not torch.equal(model.backbone.bn1.weight, before_affine)


def test_frozen_norm_in_train_mode_equals_eval_mode():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet18", width=8, norm="frozen"))
    for m in model.modules():  # non-trivial statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        train_out = model.train()(x)[1]
        eval_out = model.eval()(x)[1]
    torch.testing.assert_close(train_out, eval_out)


def _cpu_conv_supports(dtype: torch.dtype) -> bool:
    try:  # older torch CPU builds lack half-precision convolutions
        nn.functional.conv2d(torch.ones(1, 1, 3, 3, dtype=dtype), torch.ones(1, 1, 3, 3, dtype=dtype))
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norm_statistics_stay_fp32_in_half_models(dtype):
    if not _cpu_conv_supports(dtype):
        pytest.skip(f"this torch has no CPU {dtype} convolution")
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet50", width=8, num_classes=4)).to(dtype)
    bn = model.backbone.layer1[0].bn1
    assert bn.weight.dtype == dtype and model.classifier.weight.dtype == dtype
    assert bn.running_mean.dtype == torch.float32 and bn.running_var.dtype == torch.float32
    before = bn.running_mean.clone()
    logits, cams = model.train()(torch.randn(2, 3, 64, 64, dtype=dtype))
    assert cams.dtype == dtype and logits.dtype == torch.float32
    assert bn.running_mean.dtype == torch.float32 and not torch.equal(before, bn.running_mean)
    logits.sum().backward()
    assert bn.weight.grad is not None and bn.weight.grad.dtype == dtype
    model.float()
    assert bn.weight.dtype == torch.float32


def test_half_model_matches_fp32_model():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet18", width=8)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)[1]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model(x)[1]
        half = model.to(torch.bfloat16)(x.to(torch.bfloat16))[1]
    torch.testing.assert_close(auto.float(), ref, atol=0.1, rtol=0.05)
    torch.testing.assert_close(half.float(), ref, atol=0.1, rtol=0.05)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_model_on_cuda(dtype):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet50", width=16)).cuda()
    x = torch.randn(2, 3, 128, 128, device="cuda")
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # a true fp32 reference
    try:
        with torch.no_grad():
            ref = model.eval()(x)[1]
            half_model = model.to(dtype).to(memory_format=torch.channels_last)
            out = half_model(x.to(dtype).contiguous(memory_format=torch.channels_last))[1]
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert half_model.backbone.bn1.running_var.dtype == torch.float32
    # Relative error of the whole map: 50 layers of half-precision rounding (bf16 has 8 mantissa bits).
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < (5e-2 if dtype == torch.bfloat16 else 1e-2), rel
    half_model.train()(x.to(dtype))[0].sum().backward()


# ---------------------------------------------------------------------------------------------
# Optimizer groups


def test_param_groups_cover_every_parameter_once():
    model = build_model(ModelConfig(arch="resnet50", width=8, num_classes=20))
    groups = param_groups(model, lr=0.1, weight_decay=1e-4)
    by_name = {g["name"]: g for g in groups}
    assert [g["name"] for g in groups] == ["pretrained_weights", "pretrained_bias", "new_weights", "new_bias"]
    expected = {
        "pretrained_weights": (0.1, 1e-4, 1.0),
        "pretrained_bias": (0.2, 0.0, 2.0),
        "new_weights": (1.0, 1e-4, 10.0),
        "new_bias": (2.0, 0.0, 20.0),
    }
    for name, (lr, wd, scale) in expected.items():
        g = by_name[name]
        assert g["lr"] == pytest.approx(lr) and g["weight_decay"] == wd and g["lr_scale"] == scale
        assert set(g) == {"params", "lr", "weight_decay", "name", "lr_scale"}

    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}

    names = {id(p): n for n, p in model.named_parameters()}
    group_of = {names[id(p)]: g["name"] for g in groups for p in g["params"]}
    # The original code's rule: "weight" in the name -> x1 with decay, norm weights included.
    assert group_of["backbone.conv1.weight"] == "pretrained_weights"
    assert group_of["backbone.layer4.0.downsample.0.weight"] == "pretrained_weights"
    assert group_of["backbone.bn1.weight"] == "pretrained_weights"
    assert group_of["backbone.layer4.0.downsample.1.weight"] == "pretrained_weights"
    assert group_of["backbone.bn1.bias"] == "pretrained_bias"
    assert group_of["backbone.layer3.1.bn2.bias"] == "pretrained_bias"
    assert group_of["classifier.weight"] == "new_weights"
    assert by_name["new_bias"]["params"] == []  # the classifier has no bias
    # Conv and norm weights of the backbone are the decayed pretrained weights; norm biases are the rest.
    n_convs = sum(1 for m in model.backbone.modules() if isinstance(m, nn.Conv2d))
    n_norms = sum(1 for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    assert len(by_name["pretrained_weights"]["params"]) == n_convs + n_norms
    assert len(by_name["pretrained_bias"]["params"]) == n_norms

    compact = param_groups(model, lr=0.1, weight_decay=1e-4, keep_empty=False)
    assert [g["name"] for g in compact] == ["pretrained_weights", "pretrained_bias", "new_weights"]


def test_param_groups_put_a_new_bias_in_the_x20_group():
    model = build_model(ModelConfig(arch="resnet18", width=8, num_classes=3))
    model.classifier.bias = nn.Parameter(torch.zeros(3))
    groups = {g["name"]: g for g in param_groups(model, lr=1.0, weight_decay=1e-4)}
    assert [id(p) for p in groups["new_bias"]["params"]] == [id(model.classifier.bias)]
    assert groups["new_bias"]["lr"] == 20.0 and groups["new_bias"]["weight_decay"] == 0.0


def test_param_groups_drive_an_optimizer_step():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet18", width=8, num_classes=3))
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train_step(model)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, params_before[n])]
    assert "classifier.weight" in moved and "backbone.conv1.weight" in moved


def test_classifier_state_dict_names():
    model = build_model(ModelConfig(arch="resnet18", width=8))
    keys = list(model.state_dict())
    assert keys[0] == "backbone.conv1.weight" and keys[-1] == "classifier.weight"

"""``python -m puzzlecam.convert``: the original code's checkpoints (docs/convert.md) as ours.

The original-layout files are made the way the original code makes them: our classifier's modules registered
as its ``Backbone`` registers its network (``model`` and the ``stage1..stage5`` Sequentials over the same
modules, then ``classifier``), saved with ``torch.save(module.state_dict())``. Every arch that
``puzzlecam.model`` builds when the tests run is converted.
"""

from __future__ import annotations

import zipfile

import pytest
import torch
import torch.nn as nn
import yaml
from safetensors.torch import load_file

from puzzlecam.config import ModelConfig, SegmentationConfig
from puzzlecam.convert import detect_model, known_archs, main
from puzzlecam.errors import UsageError
from puzzlecam.infer import load_classifier
from puzzlecam.model import Classifier, build_model

ARCHS = known_archs()


class OriginalLayout(nn.Module):
    """How the original's Classifier registers its modules (core/networks.py: Backbone, Classifier)."""

    def __init__(self, model: Classifier):
        super().__init__()
        add_original_stages(self, model.backbone)
        self.classifier = model.classifier


def add_original_stages(module: nn.Module, body: nn.Module) -> None:
    """The original's Backbone: ``model`` (the torchvision net) and ``stage1..5`` sharing its modules."""
    module.model = body
    module.stage1 = nn.Sequential(body.conv1, body.bn1, nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
    for i in range(1, 5):
        module.add_module(f"stage{i + 1}", nn.Sequential(getattr(body, f"layer{i}")))


def random_classifier(arch: str, width: int, num_classes: int = 20, seed: int = 0) -> Classifier:
    """A classifier with random weights and random BatchNorm statistics (so that every tensor matters)."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(arch=arch, width=width, num_classes=num_classes))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(1234)
    return model.eval()


def save_original(model: Classifier, path, prefix: str = "", extra: dict | None = None) -> dict:
    state = {prefix + k: v for k, v in OriginalLayout(model).state_dict().items()}
    state.update(extra or {})
    torch.save(state, path)
    return state


def convert(capsys, src, dst, *flags: str) -> tuple[int, str]:
    rc = main(["--kind", "classifier", str(src), str(dst), *flags])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(("arch", "width"), [(a, 16) for a in ARCHS] + [("resnet18", 64)])
def test_round_trip_loads_strictly_with_equal_logits(tmp_path, capsys, arch, width):
    model = random_classifier(arch, width)
    src = tmp_path / "orig.pth"
    original = save_original(model, src)
    own = model.state_dict()
    # The original's file: every backbone tensor twice (model.* and stage1..5.*), the classifier once.
    assert len(original) == 2 * (len(own) - 1) + 1
    dst = tmp_path / "out" / "model.safetensors"

    rc, err = convert(capsys, src, dst)

    assert rc == 0, err
    cfg = yaml.safe_load((dst.parent / "config.yaml").read_text())["model"]
    assert cfg == {"arch": arch, "width": width, "output_stride": 16, "num_classes": 20}
    loaded, _ = load_classifier(dst)  # what puzzlecam.infer --weights DST does: config.yaml beside it, strict
    converted = loaded.state_dict()
    assert converted.keys() == own.keys() and all(torch.equal(converted[k], own[k]) for k in own)
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        (logits, cams), (ref_logits, ref_cams) = loaded(x), model(x)
    assert torch.equal(logits, ref_logits) and torch.equal(cams, ref_cams)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_known_arch_is_detected_at_width_64(arch):
    with torch.device("meta"):  # the names and shapes only: no weights allocated
        model = build_model(ModelConfig(arch=arch, width=64, num_classes=21))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert detect_model(shapes, src="x.pth") == ModelConfig(arch=arch, width=64, output_stride=16, num_classes=21)


def test_data_parallel_prefix_and_existing_outputs(tmp_path, capsys):
    model = random_classifier("resnet18", 8, num_classes=3)
    src = tmp_path / "orig.pth"
    save_original(model, src, prefix="module.")  # saved through nn.DataParallel
    dst = tmp_path / "model.safetensors"
    assert convert(capsys, src, dst)[0] == 0
    before = load_file(dst), (tmp_path / "config.yaml").read_text()

    rc, err = convert(capsys, src, dst)
    assert rc == 2 and f"{dst} exists: pass --overwrite" in err
    (tmp_path / "model.safetensors").unlink()  # a config.yaml from another conversion is kept too
    rc, err = convert(capsys, src, dst)
    assert rc == 2 and f"{tmp_path / 'config.yaml'} exists: pass --overwrite" in err and not dst.exists()
    assert convert(capsys, src, dst, "--overwrite")[0] == 0
    after = load_file(dst), (tmp_path / "config.yaml").read_text()
    assert after[1] == before[1] and all(torch.equal(after[0][k], v) for k, v in before[0].items())


def _refused(capsys, tmp_path, src, *expected: str, kind: str = "classifier") -> str:
    out = tmp_path / "out"
    rc = main(["--kind", kind, str(src), str(out / "model.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("error: "), err  # one line
    for text in expected:
        assert text in err, err
    assert not out.exists()  # nothing written, not even the directory
    return err


def test_refuses_the_wrong_kind(tmp_path, capsys):
    model = random_classifier("resnet18", 8)
    src = tmp_path / "affinity.pth"
    edge = nn.Conv2d(160, 1, 1)
    # AffinityNet's layout: fc_edge* with edge_layers.* aliases and its path-index buffers.
    save_original(
        model,
        src,
        extra={
            "fc_edge6.weight": edge.weight,
            "edge_layers.5.weight": edge.weight,
            "path_indices_0": torch.zeros(3, 4, dtype=torch.int64),
        },
    )
    _refused(capsys, tmp_path, src, "an AffinityNet checkpoint", "fc_edge6.weight", "--kind affinity")
    _refused(capsys, tmp_path, src, "an AffinityNet checkpoint", "--kind affinity", kind="deeplab")
    classifier = tmp_path / "classifier.pth"
    save_original(model, classifier)
    _refused(capsys, tmp_path, classifier, "a classifier checkpoint", "--kind classifier", kind="affinity")


class OriginalAffinityLayout(nn.Module):
    """How the original's AffinityNet registers its modules (core/networks.py: Backbone, AffinityNet): ``model``,
    ``stage1..5``, ``fc_edge1..6``, then ModuleLists ``backbone`` (the stages) and ``edge_layers`` (the
    fc_edge modules), and its path-index buffers."""

    def __init__(self, net):
        super().__init__()
        add_original_stages(self, net.backbone)
        for i, layer in enumerate(net.edge_layers):
            self.add_module(f"fc_edge{i + 1}", layer)
        self.backbone = nn.ModuleList([getattr(self, f"stage{i}") for i in range(1, 6)])
        self.edge_layers = nn.ModuleList([getattr(self, f"fc_edge{i}") for i in range(1, 7)])
        self.register_buffer("path_indices_0", torch.arange(12).view(3, 4))


@pytest.mark.parametrize(("arch", "width"), [("resnet18", 8), ("resnet50", 8), ("resnest50", 8)])
def test_affinity_round_trip_gives_the_same_edges(tmp_path, capsys, arch, width):
    from puzzlecam.model.affinity import build_affinity_net
    from puzzlecam.rw import load_affinity_net

    torch.manual_seed(1)
    net = build_affinity_net(ModelConfig(arch=arch, width=width))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    src, dst = tmp_path / "aff.pth", tmp_path / "converted" / "model.safetensors"
    original = OriginalAffinityLayout(net).state_dict()
    torch.save(original, src)
    assert main(["--kind", "affinity", str(src), str(dst)]) == 0, capsys.readouterr().err
    assert f"(affinity: {arch}, width {width}, {len(net.state_dict())} tensors)" in capsys.readouterr().out
    config = yaml.safe_load((dst.parent / "config.yaml").read_text())
    assert config["task"] == "affinity" and config["model"]["arch"] == arch
    loaded, _ = load_affinity_net(dst)  # strict: every key and shape of our AffinityNet
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net.eval()(x), rtol=0, atol=0)
    # An edge_layers alias that differs from its fc_edge twin is refused.
    original["edge_layers.5.bias"] = original["edge_layers.5.bias"] + 1
    torch.save(original, src)
    _refused(capsys, tmp_path, src, "fc_edge6.bias and edge_layers.5.bias must hold the same tensor", kind="affinity")


class OriginalDeepLabLayout(nn.Module):
    """How the original's DeepLabv3_Plus registers its modules (core/networks.py: Backbone, DeepLabv3_Plus;
    core/deeplab_utils.py: ASPP of ASPPModule aspp1..4 (atrous_conv, bn), global_avg_pool, conv1, bn1; Decoder
    of conv1, bn1, classifier), around our network's modules."""

    def __init__(self, net):
        super().__init__()
        add_original_stages(self, net.backbone)
        self.aspp = nn.Module()
        for i, branch in enumerate(net.aspp.branches):
            module = nn.Module()
            module.atrous_conv, module.bn = branch[0], branch[1]
            self.aspp.add_module(f"aspp{i + 1}", module)
        self.aspp.global_avg_pool = net.aspp.image_pool
        self.aspp.conv1, self.aspp.bn1 = net.aspp.project[0], net.aspp.project[1]
        self.decoder = nn.Module()
        self.decoder.conv1, self.decoder.bn1 = net.decoder.low_level[0], net.decoder.low_level[1]
        self.decoder.classifier = net.decoder.classifier


def random_deeplab(arch: str, head_norm: str = "group", head_channels: int = 256, low_level_channels: int = 48):
    """A DeepLabv3+ (backbone width 8, 21 classes) with every parameter and norm statistic moved off its init."""
    from puzzlecam.model import deeplab_v3_plus

    torch.manual_seed(2)
    net = deeplab_v3_plus(
        arch, 21, "frozen", head_norm, width=8, head_channels=head_channels, low_level_channels=low_level_channels
    )
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.mark.parametrize(
    ("arch", "head_norm", "head_channels", "low_level_channels"),
    [("resnet18", "group", 256, 48), ("resnet50", "batch", 16, 8), ("resnest50", "group", 16, 8)],
)
def test_deeplab_round_trip_gives_the_same_logits(tmp_path, capsys, arch, head_norm, head_channels, low_level_channels):
    from puzzlecam.config import load_config
    from puzzlecam.model import build_deeplab

    net = random_deeplab(arch, head_norm, head_channels, low_level_channels)
    src, dst = tmp_path / "DeepLabv3+@deeplab.pth", tmp_path / "converted" / "model.safetensors"
    original = OriginalDeepLabLayout(net).state_dict()
    assert "aspp.aspp4.atrous_conv.weight" in original and "decoder.classifier.8.bias" in original
    assert len(original) == len(net.state_dict()) + len(net.backbone.state_dict())  # the backbone twice
    torch.save(original, src)

    assert main(["--kind", "deeplab", str(src), str(dst)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"(deeplab: {arch}, width 8, 21 classes, head_norm {head_norm}, {len(net.state_dict())} tensors)" in out
    config = yaml.safe_load((dst.parent / "config.yaml").read_text())
    assert config["task"] == "segmentation"
    assert config["model"] == {"arch": arch, "width": 8, "output_stride": 16, "num_classes": 21, "norm": "frozen"}
    assert config["segmentation"] == {
        "head_norm": head_norm,
        "head_channels": head_channels,
        "low_level_channels": low_level_channels,
    }
    cfg = load_config(dst.parent / "config.yaml")
    loaded = build_deeplab(cfg.model, cfg.segmentation)
    loaded.load_state_dict(load_file(dst), strict=True)
    x = torch.randn(2, 3, 50, 37)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), net(x), rtol=0, atol=0)


def test_every_known_arch_is_detected_as_a_deeplab_at_width_64():
    from puzzlecam.convert import detect_head
    from puzzlecam.model import build_deeplab

    for arch in ARCHS:
        with torch.device("meta"):
            model = build_deeplab(ModelConfig(arch=arch, width=64, num_classes=21), SegmentationConfig())
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert detect_model(shapes, src="x.pth", kind="deeplab") == ModelConfig(
            arch=arch, width=64, output_stride=16, num_classes=21
        )
        assert detect_head(shapes) == (SegmentationConfig(), 21)


def test_deeplab_refusals_name_the_right_kind(tmp_path, capsys):
    net = random_deeplab("resnet18", head_channels=16, low_level_channels=8)
    deeplab = tmp_path / "deeplab.pth"
    torch.save(OriginalDeepLabLayout(net).state_dict(), deeplab)
    for kind in ("classifier", "affinity"):
        _refused(capsys, tmp_path, deeplab, "is a DeepLabv3+ checkpoint", "aspp.aspp1.", "--kind deeplab", kind=kind)
    classifier = tmp_path / "classifier.pth"
    save_original(random_classifier("resnet18", 8), classifier)
    _refused(
        capsys,
        tmp_path,
        classifier,
        "is a classifier checkpoint",
        "not a DeepLabv3+",
        "--kind classifier",
        kind="deeplab",
    )
    imagenet = tmp_path / "resnet18.pth"  # an ImageNet file is not a trained network
    torch.save(net.backbone.state_dict(), imagenet)
    _refused(
        capsys,
        tmp_path,
        imagenet,
        "has no aspp.aspp1.atrous_conv.weight",
        "saves model.*, stage1..5.*, aspp.*",
        kind="deeplab",
    )
    state = OriginalDeepLabLayout(net).state_dict()
    del state["decoder.bn1.weight"], state["decoder.bn1.bias"]  # a head that is not the original's
    pruned = tmp_path / "pruned.pth"
    torch.save(state, pruned)
    _refused(
        capsys,
        tmp_path,
        pruned,
        "with a DeepLabv3+ whose ASPP reads 64 channels",
        "closest: resnet18 at width 8",
        "2 missing (decoder.low_level.1.weight, decoder.low_level.1.bias)",
        kind="deeplab",
    )


def test_refuses_aliases_that_differ(tmp_path, capsys):
    model = random_classifier("resnet18", 8)
    src = tmp_path / "edited.pth"
    state = OriginalLayout(model).state_dict()
    state["stage3.0.1.conv1.weight"] = state["stage3.0.1.conv1.weight"].clone()
    state["stage3.0.1.conv1.weight"][0, 0, 0, 0] += 0.5
    torch.save(state, src)
    _refused(
        capsys,
        tmp_path,
        src,
        "model.layer2.1.conv1.weight and stage3.0.1.conv1.weight must hold the same tensor",
        "largest difference 0.5",
    )


def test_refuses_files_that_are_not_state_dicts(tmp_path, capsys):
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    _refused(capsys, tmp_path, listed, "holds a list, not a state dict")
    nested = tmp_path / "nested.pth"
    torch.save({"epoch": 3, "state_dict": {"conv1.weight": torch.zeros(1)}}, nested)
    _refused(capsys, tmp_path, nested, "entries that are not tensors ('epoch': int, 'state_dict': dict)")
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    _refused(capsys, tmp_path, text, f"{text} is not a torch checkpoint file")
    archive = tmp_path / "experiments.zip"  # the original's download, not one of its checkpoints
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("experiments/models/ResNet50@Puzzle.pth", b"")
    _refused(capsys, tmp_path, archive, "is a zip archive, not a torch checkpoint (it holds experiments/models/")
    _refused(capsys, tmp_path, tmp_path / "missing.pth", "missing.pth: no such file")
    # A pickle that would run code is refused by the weights-only unpickler; it never runs.
    marker = tmp_path / "ran"
    payload = tmp_path / "payload.pth"
    torch.save({"model.conv1.weight": _RunsCode(str(marker))}, payload)
    _refused(capsys, tmp_path, payload, f"{payload}: refusing to load it")
    assert not marker.exists()


def test_refuses_what_fits_no_model(tmp_path, capsys):
    model = random_classifier("resnet18", 8)
    torchvision_file = tmp_path / "resnet18.pth"  # an ImageNet file is not a trained classifier
    torch.save(model.backbone.state_dict(), torchvision_file)
    _refused(capsys, tmp_path, torchvision_file, "has no classifier.weight")
    pruned = tmp_path / "pruned.pth"
    state = OriginalLayout(model).state_dict()
    for key in [k for k in state if ".layer4.1." in k or k.startswith("stage5.0.1.")]:
        del state[key]
    torch.save(state, pruned)
    err = _refused(capsys, tmp_path, pruned, "fits none of the archs puzzlecam.model builds", "closest: resnet18")
    assert "12 missing (backbone.layer4.1.conv1.weight" in err
    diverged = tmp_path / "nan.pth"
    state = OriginalLayout(model).state_dict()
    state["classifier.weight"] = torch.full_like(state["classifier.weight"], float("nan"))
    torch.save(state, diverged)
    _refused(capsys, tmp_path, diverged, "1 tensor(s) hold NaN or Inf (classifier.weight)")


def test_refuses_bad_destinations(tmp_path, capsys):
    src = tmp_path / "orig.pth"
    save_original(random_classifier("resnet18", 8), src)
    rc, err = convert(capsys, src, tmp_path / "model.pth")
    assert rc == 2 and "must end in .safetensors" in err
    (tmp_path / "file").write_text("")
    rc, err = convert(capsys, src, tmp_path / "file" / "model.safetensors")
    assert rc == 2 and "is not a directory" in err


def test_full_disk_leaves_no_output(tmp_path, small_disk, capsys):
    src = tmp_path / "orig.pth"
    save_original(random_classifier("resnet18", 8), src)
    elsewhere = tmp_path / "elsewhere" / "model.safetensors"
    assert convert(capsys, src, elsewhere)[0] == 0
    page = 4096
    dst = small_disk.path / "converted" / "model.safetensors"
    # Room for the weights (whole pages) but not for config.yaml: the new weights are removed again.
    small_disk.fill(leave_bytes=-(-elsewhere.stat().st_size // page) * page)
    rc, err = convert(capsys, src, dst)
    assert rc == 1 and err.count("\n") == 1 and err.startswith("error: no space left on tmpfs"), err
    assert str(dst.parent / "config.yaml") in err
    assert sorted(p.name for p in small_disk.path.iterdir()) == [".filler"]  # no file, temporary or directory
    (small_disk.path / ".filler").unlink()  # fill() counts the free space before it rewrites its filler
    small_disk.fill()
    rc, err = convert(capsys, src, dst)
    assert rc == 1 and f"while writing {dst}" in err
    assert sorted(p.name for p in small_disk.path.iterdir()) == [".filler"]


def test_detect_model_names_the_classifier_shape_when_nothing_fits():
    with pytest.raises(
        UsageError, match="fits none of the archs .* with a classifier of 7 input channels and 20 classes$"
    ):
        detect_model({"classifier.weight": (20, 7, 1, 1)}, src="x.pth")


class _RunsCode:
    """Unpickling this creates a file: the test's stand-in for a hostile payload."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))

"""task: segmentation (stage 3, DeepLabv3+) through the one Trainer.

Fast: the task's parameter groups and checks, the fp32 pixel cross entropy and its normalization, the loader's
label map from ``seg.png`` (the same geometry as ``label.png``), bad label maps named with their shard and id,
shards without the label maps the config asks for, the loss going down on the synthetic masks, the evaluation
(every image of a 5-image shard counted, over one and two ranks; its mIoU against a direct computation), the
shipped configs. Slow (real launchers, gloo on 127.0.0.1): two processes with half the micro-batch give the
losses, evaluations and weights of one process, and both write the best and the last weights.
"""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_train_support import (
    ROOT,
    finished_run,
    max_param_diff,
    metrics,
    summary,
    tiny_overrides,
    tiny_shards,
    two_process_run,
    weights,
)

from puzzlecam.config import load_config, validate_for_run
from puzzlecam.data import train_loader
from puzzlecam.errors import ConfigError
from puzzlecam.evaluate import miou
from puzzlecam.precision import deepspeed_config
from puzzlecam.tasks import TASKS, StepModule, build_task
from puzzlecam.tasks.segmentation import pixel_cross_entropy
from puzzlecam.train import evaluate_network
from puzzlecam.utils.labelmap import encode_label_png

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return tiny_shards(tmp_path_factory.mktemp("data"))


def tiny_shard(shards: Path) -> Path:
    return next(shards.glob("trainval-*.tar"))


def segmentation_config(*overrides: str):
    return load_config(
        None,
        [
            "task=segmentation",
            "model.arch=resnet18",
            "model.width=8",
            "model.norm=frozen",
            "model.num_classes=21",
            "segmentation.head_channels=8",
            "segmentation.low_level_channels=8",
            "data.crop_size=32",
            "data.min_long_side=32",
            "data.max_long_side=48",
            "data.num_workers=0",
            "train.global_batch_size=4",
            "train.micro_batch_size=4",
            "train.ops_backend=reference",
            *overrides,
        ],
    )


def rewrite_shard(source: Path, target: Path, change=None, keep: int | None = None) -> list[str]:
    """``source``'s samples (the first ``keep``) into ``target``; ``change(key, ext, data)`` -> new bytes, or
    None to drop the member. Returns the sample keys in order."""
    keys: list[str] = []
    with tarfile.open(source) as src, tarfile.open(target, "w", format=tarfile.USTAR_FORMAT) as out:
        for info in src.getmembers():
            key, ext = info.name.split(".", 1)
            if key not in keys:
                if keep is not None and len(keys) == keep:
                    break
                keys.append(key)
            data = src.extractfile(info).read()
            data = change(key, ext, data) if change else data
            if data is None:
                continue
            member = tarfile.TarInfo(info.name)
            member.size = len(data)
            out.addfile(member, io.BytesIO(data))
    return keys


# ---------------------------------------------------------------------------------------------
# The task


def test_registered_with_the_four_groups_and_the_network_exported():
    assert TASKS["segmentation"] == "puzzlecam.tasks.segmentation:SegmentationTask"
    cfg = segmentation_config("optim.lr=0.01", "optim.weight_decay=4e-5")
    task = build_task(cfg)
    network = task.build_network()
    assert task.exported(network) is network and task.label_member == "label.png"
    groups = {g["name"]: g for g in task.param_groups(network)}
    scales = {name: (g["lr_scale"], g["lr"], g["weight_decay"]) for name, g in groups.items()}
    assert scales == {
        "pretrained_weights": (1, 0.01, 4e-5),
        "pretrained_bias": (2, 0.02, 0.0),
        "new_weights": (10, pytest.approx(0.1), 4e-5),
        "new_bias": (20, pytest.approx(0.2), 0.0),
    }
    backbone = {id(p) for p in network.backbone.parameters()}
    head = {id(p) for p in network.head_parameters()}
    for name, group in groups.items():
        assert {id(p) for p in group["params"]} <= (backbone if name.startswith("pretrained") else head)
    assert sum(len(g["params"]) for g in groups.values()) == len(list(network.parameters()))
    # The head's dropout: the original's, or off (segmentation.dropout=false) for the process-count comparison.
    rates = [m.p for m in network.modules() if isinstance(m, torch.nn.Dropout)]
    assert rates == [0.5, 0.5, 0.1]
    off = build_task(segmentation_config("segmentation.dropout=false")).build_network()
    assert [m.p for m in off.modules() if isinstance(m, torch.nn.Dropout)] == [0.0, 0.0, 0.0]
    assert build_task(segmentation_config("segmentation.labels=mask")).label_member == "seg.png"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.num_classes=20"], r"model.num_classes=20 but .* hold VOC samples: .* Set model.num_classes=21"),
        (
            ["segmentation.head_norm=batch", "train.micro_batch_size=1", "train.global_batch_size=1"],
            r"segmentation.head_norm=batch cannot train on train.micro_batch_size=1 .* segmentation.head_norm=group",
        ),
        (
            ["model.arch=resnest50", "model.norm=train", "train.micro_batch_size=1", "train.global_batch_size=1"],
            r"model.arch=resnest50 with model.norm=train cannot train on train.micro_batch_size=1",
        ),
    ],
)
def test_settings_it_cannot_train_are_refused_naming_the_keys(shards, overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_task(segmentation_config(f"data.train_shards={shards}/trainval-*.tar", *overrides))


def test_the_loss_is_fp32_cross_entropy_over_labelled_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 21, 6, 5).bfloat16()
    label = torch.randint(0, 21, (2, 6, 5))
    label[0, :2] = 255
    label[1, :, 3:] = 255
    loss = pixel_cross_entropy(logits, label)
    assert loss.dtype == torch.float32
    expected = F.cross_entropy(logits.float(), label, ignore_index=255)  # the original's CrossEntropyLoss
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    nothing = pixel_cross_entropy(logits.float().requires_grad_(), torch.full((2, 6, 5), 255))
    assert nothing.item() == 0.0  # no labelled pixel: no loss, no NaN


def test_the_loss_goes_down_on_the_ground_truth_masks(shards):
    cfg = segmentation_config(f"data.train_shards={shards}/trainval-*.tar", "segmentation.labels=mask")
    task = build_task(cfg)
    torch.manual_seed(0)
    network = task.build_network()
    step = StepModule(task, network, torch.float32, False)
    optimizer = torch.optim.SGD(task.param_groups(network), lr=0.01, momentum=0.9)
    batches = iter(task.train_loader(0, 1))
    losses = []
    for _ in range(6):
        batch = next(batches)
        assert set(batch["label"].unique().tolist()) <= set(range(21)) | {255}
        total = task.losses(step, batch, {}, CPU).total
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(total.item())
    assert all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < 0.6 * np.mean(losses[:2]), losses


# ---------------------------------------------------------------------------------------------
# Data: which map, bad maps, missing maps


def test_seg_png_gets_the_geometry_label_png_gets(shards, tmp_path):
    """Shards whose label.png is a copy of seg.png: the loader gives the same batches from either member."""
    (tmp_path / "both").mkdir()
    both = tmp_path / "both" / "trainval-000000.tar"

    def add_label(key, ext, data):
        return data

    keys = rewrite_shard(tiny_shard(shards), both, add_label)
    with tarfile.open(both, "a", format=tarfile.USTAR_FORMAT) as tar:
        source = tarfile.open(tiny_shard(shards))
        for key in keys:
            data = source.extractfile(f"{key}.seg.png").read()
            info = tarfile.TarInfo(f"{key}.label.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    options = {"batch_size": 4, "crop_size": 40, "seed": 3, "min_long_side": 24, "max_long_side": 64}
    from_label = next(iter(train_loader(str(both), label_member="label.png", **options)))
    from_mask = next(iter(train_loader(str(both), label_member="seg.png", **options)))
    plain = next(iter(train_loader(str(tiny_shard(shards)), label_member="seg.png", **options)))
    for batch in (from_mask, plain):
        assert torch.equal(batch["label"], from_label["label"]) and torch.equal(batch["image"], from_label["image"])
    assert (from_label["label"] == 255).any() and (from_label["label"] < 21).any()  # padding and classes
    with pytest.raises(ValueError, match="label_member must be one of"):
        train_loader(str(both), label_member="jpg", **options)


def label_png(size: tuple[int, int], value: int) -> bytes:
    return encode_label_png(np.full(size, value, dtype=np.uint8))


@pytest.mark.parametrize(
    ("member", "value", "shrink", "expected"),
    [
        ("seg.png", 30, 0, "seg.png: mask holds values [30]; expected 0..20 or 255"),
        ("seg.png", 1, 8, "seg.png ({h_}, {w}) does not match image ({h}, {w})"),
        ("label.png", 21, 0, "label.png: mask holds values [21]; expected 0..20 or 255"),
        ("label.png", 0, 3, "label.png ({h_}, {w}) does not match image ({h}, {w})"),
    ],
)
def test_a_bad_label_map_is_named_with_its_shard_and_sample(
    shards, tmp_path, caplog, monkeypatch, member, value, shrink, expected
):
    """A label map with values outside 0..20 and 255, or of another size than its image, is a corrupt sample:
    skipped (counted against data.max_corrupt_fraction), the warning naming the shard, the sample and the
    expectation. (label-shards refuses such maps before writing; the loader checks what it reads.)"""
    target = tmp_path / "trainval-000000.tar"
    sizes: dict[str, tuple[int, int]] = {}

    def change(key, ext, data):
        if ext == "jpg":
            sizes[key] = Image.open(io.BytesIO(data)).size[::-1]
        return data

    keys = rewrite_shard(tiny_shard(shards), target, change)
    bad_key = keys[0]
    h, w = sizes[bad_key]
    bad = label_png((h - shrink, w), value)
    if member == "seg.png":
        rewrite_shard(
            tiny_shard(shards), target, lambda key, ext, data: bad if (key, ext) == (bad_key, member) else data
        )
    else:  # labelled shards: a label.png per sample
        with tarfile.open(target, "a", format=tarfile.USTAR_FORMAT) as tar:
            for key in keys:
                data = bad if key == bad_key else label_png(sizes[key], 0)
                info = tarfile.TarInfo(f"{key}.label.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    monkeypatch.setattr("puzzlecam.data.loader._warned", set())  # a process warns once per (shard, sample)
    loader = train_loader(str(target), batch_size=23, crop_size=32, seed=0, label_member=member)
    with caplog.at_level(logging.WARNING):
        batch = next(iter(loader))
    assert loader.skipped == 1 and len(batch["id"]) == 23 and bad_key not in batch["id"]
    (line,) = [r.getMessage() for r in caplog.records if bad_key in r.getMessage()]
    assert line == f"skipping corrupt sample '{bad_key}' in {target}: " + expected.format(h=h, w=w, h_=h - shrink)


def test_shards_without_the_asked_label_maps_are_refused_saying_how_to_make_them(shards, tmp_path):
    cfg = segmentation_config(f"data.train_shards={shards}/trainval-*.tar")  # labels: label, no label.png
    with pytest.raises(ConfigError) as err:
        build_task(cfg).train_loader(0, 1)
    message = str(err.value)
    assert "segmentation.labels=label" in message and f"data.train_shards={shards}/trainval-*.tar" in message
    assert "python -m puzzlecam.labels --cams RW_DIR --threshold 0.35 --crf --crf-iters 1" in message
    assert "python -m puzzlecam.data label-shards" in message and "segmentation.labels=mask" in message

    unmasked = tmp_path / "trainval-000000.tar"
    rewrite_shard(tiny_shard(shards), unmasked, lambda key, ext, data: None if ext == "seg.png" else data)
    cfg = segmentation_config(f"data.train_shards={unmasked}", "segmentation.labels=mask")
    with pytest.raises(ConfigError, match=r"segmentation.labels=mask .* no sample of data.train_shards=.* has one"):
        build_task(cfg).train_loader(0, 1)


# ---------------------------------------------------------------------------------------------
# Evaluation


class ColourNet(torch.nn.Module):
    """Logits from the normalized colour: a fixed, cheap 'segmentation network' with a non-trivial score."""

    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Conv2d(3, 21, 1)
        torch.nn.init.normal_(self.mix.weight, generator=torch.Generator().manual_seed(0))
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, x):
        self.calls.append((self.training, torch.is_grad_enabled()))
        return self.mix(x)


def test_the_evaluation_counts_every_image_over_one_and_two_ranks(shards, tmp_path):
    five = tmp_path / "val-000000.tar"
    rewrite_shard(tiny_shard(shards), five, keep=5)
    cfg = segmentation_config(f"data.eval_shards={five}", "train.eval_every=1", f"data.train_shards={five}")
    net = ColourNet()
    expected = torch.zeros(21, 21, dtype=torch.long)
    with tarfile.open(five) as tar:
        for info in (i for i in tar.getmembers() if i.name.endswith(".jpg")):
            image = np.array(Image.open(tar.extractfile(info)).convert("RGB"))
            mask = np.array(Image.open(tar.extractfile(info.name.replace(".jpg", ".seg.png"))))
            x = (
                torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
                - torch.tensor([0.485, 0.456, 0.406])[:, None, None]
            ) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
            with torch.no_grad():
                pred = net(x).argmax(1)[0].flatten()
            gt = torch.from_numpy(mask.astype(np.int64)).flatten()
            keep = gt != 255
            expected += torch.bincount(gt[keep] * 21 + pred[keep], minlength=21 * 21).reshape(21, 21)
    net.calls.clear()
    result = evaluate_network(build_task(cfg), net, CPU, torch.float32, False, rank=0, world_size=1)
    assert result.score == "eval_miou" and net.calls and all(c == (False, False) for c in net.calls)
    assert result.metrics == {"eval_miou": pytest.approx(miou(expected)[0]), "eval_images": 5, "eval_skipped": 0}
    assert 0 < result.metrics["eval_miou"] < 1
    assert sorted(result.images) == [f"segmentation/{i}" for i in range(4)]
    assert all(im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3 for im in result.images.values())
    # Two ranks' shares (3 + 2 images; in one process the all-reduce adds nothing): every image once.
    shares = [evaluate_network(build_task(cfg), net, CPU, torch.float32, False, rank=r, world_size=2) for r in (0, 1)]
    assert [s.metrics["eval_images"] for s in shares] == [3, 2]
    assert shares[1].images == {}


@pytest.mark.parametrize("name", ["voc_resnet50_deeplab", "voc_resnest101_deeplab", "demo_deeplab_cpu"])
def test_shipped_segmentation_configs(name):
    cfg = load_config(ROOT / "launch" / "configs" / f"{name}.yaml")
    validate_for_run(cfg, 1, cuda_available=True)
    build_task(cfg)
    assert cfg.task == "segmentation" and cfg.model.num_classes == 21 and cfg.model.norm == "frozen"
    assert cfg.segmentation.head_norm == "group" and cfg.segmentation.dropout and cfg.train.eval_every > 0
    assert deepspeed_config(cfg)["train_batch_size"] == cfg.train.global_batch_size
    if name.startswith("voc"):  # the original's train_segmentation.py
        o, t, d = cfg.optim, cfg.train, cfg.data
        assert (t.global_batch_size, t.epochs, t.eval_every) == (32, 50, 330)
        assert (o.lr, o.nesterov, o.weight_decay, o.poly_power, o.grad_clip) == (0.007, True, 4e-5, 0.9, 0.0)
        assert o.momentum == 4e-5  # the original's slot mistake, stated in the file
        assert (d.crop_size, d.min_long_side, d.max_long_side, d.hflip) == (512, 256, 1024, True)
        assert cfg.model.pretrained and cfg.model.output_stride == 16 and cfg.segmentation.labels == "label"
        assert (cfg.segmentation.head_channels, cfg.segmentation.low_level_channels) == (256, 48)
        four = load_config(ROOT / "launch" / "configs" / f"{name}.yaml", ["train.grad_accum_steps=1"])
        validate_for_run(four, 4, cuda_available=True)


# ---------------------------------------------------------------------------------------------
# Real runs


def segmentation_overrides(shards: Path, **extra) -> list[str]:
    """4 steps of global batch 4 on the tiny shards' masks, evaluated every 2 steps on the first 5 images."""
    settings = {
        "task": "segmentation",
        "model.num_classes": 21,
        "segmentation.labels": "mask",
        "segmentation.head_channels": 8,
        "segmentation.low_level_channels": 8,
        "segmentation.dropout": "false",
        "optim.lr": 0.01,
        "data.eval_shards": f"{shards.parent}/five/val-*.tar",
        "train.eval_every": 2,
        **extra,
    }
    return tiny_overrides(shards, **settings)


@pytest.fixture(scope="module")
def five(shards) -> Path:
    (shards.parent / "five").mkdir(exist_ok=True)
    rewrite_shard(tiny_shard(shards), shards.parent / "five" / "val-000000.tar", keep=5)
    return shards


@pytest.mark.slow
def test_two_processes_give_the_one_process_losses_evaluations_and_weights(five, tmp_path):
    pytest.importorskip("deepspeed")
    single = finished_run(tmp_path / "single", segmentation_overrides(five))
    run = tmp_path / "ds"
    ours = two_process_run(run, segmentation_overrides(five, **{"train.micro_batch_size": 2}), tmp_path / "ds.log")
    ref = metrics(single)
    assert [r["step"] for r in ours] == [r["step"] for r in ref] == [1, 2, 3, 4]
    for a, b in zip(ours, ref, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a, b)
    evaluations = [(r["step"], r["eval_images"], r["eval_miou"]) for r in ref if "eval_miou" in r]
    assert [e[:2] for e in evaluations] == [(2, 5), (4, 5)]
    assert [(r["step"], r["eval_images"], r["eval_miou"]) for r in ours if "eval_miou" in r] == [
        (step, images, pytest.approx(value, abs=1e-6)) for step, images, value in evaluations
    ]
    assert max_param_diff(weights(run), weights(single)) < 1e-5
    for r in (run, single):  # the last weights and the best (selected on data.eval_shards) beside them
        assert (r / "model.safetensors").is_file() and (r / "model_best.safetensors").is_file()
        assert summary(r)["best_evaluation"]["eval_images"] == 5

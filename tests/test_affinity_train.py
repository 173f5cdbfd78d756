"""task: affinity (stage 2) through the one Trainer.

Fast: the label map's nearest resizing against PIL's (the original's), the task's single parameter group,
config checks and the shipped configs. Slow (real launchers, gloo on 127.0.0.1): on tiny labelled shards
(``data label-shards`` with the synthetic masks as label maps), two processes with half the micro-batch
give the losses and weights of one process (the loss normalizes by pair counts summed over the ranks);
the run exports an AffinityNet that ``puzzlecam.rw`` loads; a SIGKILLed run resumes to the same result.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train_support import (
    PYTHON,
    ROOT,
    finished_run,
    max_param_diff,
    metrics,
    python_launch,
    run_all,
    tiny_overrides,
    tiny_shards,
    two_process_run,
    weights,
)

from puzzlecam import checkpoint as ckpt
from puzzlecam.config import load_config, validate_for_run
from puzzlecam.errors import ConfigError
from puzzlecam.model import build_affinity_net
from puzzlecam.precision import deepspeed_config
from puzzlecam.rw import load_affinity_net
from puzzlecam.tasks import TASKS, StepModule, build_task
from puzzlecam.tasks.affinity import label_at
from puzzlecam.utils.distributed import seed_everything

LOSS_KEYS = ("loss", "loss_bg", "loss_fg", "loss_neg")


@pytest.mark.parametrize(("size", "small"), [((512, 512), (128, 128)), ((50, 37), (13, 10)), ((96, 96), (24, 24))])
def test_label_resize_is_pils_nearest(size, small):
    """The original resizes the augmented label map with PIL's NEAREST to the edge map's size."""
    rng = np.random.default_rng(0)
    label = rng.choice(np.array([0, 3, 7, 255], dtype=np.uint8), size=size)
    expected = np.asarray(Image.fromarray(label).resize(small[::-1], Image.NEAREST))
    got = label_at(torch.from_numpy(label).long()[None], small)[0]
    assert got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), expected)


def affinity_config(*overrides: str):
    return load_config(None, ["task=affinity", "model.arch=resnet18", "model.width=8", "data.crop_size=96", *overrides])


def test_only_the_edge_head_is_optimized():
    assert "affinity" in TASKS
    task = build_task(affinity_config("optim.lr=0.05", "optim.weight_decay=0.001"))
    network = task.build_network()
    assert task.exported(network) is network
    (group,) = task.param_groups(network)
    assert group["lr"] == 0.05 and group["weight_decay"] == 0.001 and group["lr_scale"] == 1.0
    head = {id(p) for p in network.edge_layers.parameters()}
    assert {id(p) for p in group["params"]} == head == {id(p) for p in network.parameters() if p.requires_grad}
    assert task.evaluate is None


def test_unlabelled_batches_are_refused_naming_label_shards():
    cfg = affinity_config("train.ops_backend=reference")
    task = build_task(cfg)
    network = task.build_network()
    step = StepModule(task, network, torch.float32, False)
    batch = {
        "image": torch.zeros(2, 96, 96, 3, dtype=torch.uint8),
        "valid": torch.tensor([[96, 96], [96, 96]]),
        "labels": torch.zeros(2, 20),
    }
    with pytest.raises(ConfigError, match="label-shards"):
        task.losses(step, batch, {}, torch.device("cpu"))
    batch["label"] = torch.full((2, 96, 96), 255, dtype=torch.int64)
    batch["label"][:, 20:70, 10:60] = 0
    batch["label"][0, 30:50, 30:50] = 4
    losses = task.losses(step, batch, {}, torch.device("cpu"))
    assert losses._fields == ("total", "bg", "fg", "neg")
    assert all(torch.isfinite(v) and v > 0 for v in losses)
    losses.total.backward()
    assert all(p.grad is not None for p in network.edge_layers.parameters())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.crop_size=72"], r"'data.crop_size' \(72\) gives a 18x18 edge map .* 'affinity.radius' \(10\)"),
        (["affinity.radius=1"], r"'affinity.radius' must be at least 2"),
    ],
)
def test_config_checks_name_the_keys(overrides, message):
    with pytest.raises(ConfigError, match=message):
        affinity_config(*overrides)
    # A crop that is no multiple of the puzzle's pieces is fine here: nothing is tiled.
    assert affinity_config("data.crop_size=97").data.crop_size == 97


@pytest.mark.parametrize("name", ["voc_resnet50_affinity", "voc_resnest101_affinity", "demo_affinity_cpu"])
def test_shipped_affinity_configs(name):
    cfg = load_config(ROOT / "launch" / "configs" / f"{name}.yaml")
    validate_for_run(cfg, 1, cuda_available=True)
    assert cfg.task == "affinity" and cfg.affinity.radius == 10 and cfg.train.eval_every == 0
    assert deepspeed_config(cfg)["train_batch_size"] == cfg.train.global_batch_size
    if name.startswith("voc"):  # the original's train_affinitynet.py
        assert (cfg.train.global_batch_size, cfg.train.epochs, cfg.train.grad_accum_steps) == (32, 3, 1)
        assert (cfg.optim.lr, cfg.optim.nesterov, cfg.optim.weight_decay, cfg.optim.poly_power) == (
            0.1,
            True,
            1e-4,
            0.9,
        )
        assert cfg.optim.momentum == 1e-4  # the original's slot mistake, stated in the file
        assert (cfg.data.crop_size, cfg.data.min_long_side, cfg.data.max_long_side) == (512, 320, 640)
        assert cfg.model.pretrained and cfg.model.output_stride == 16
        four = load_config(ROOT / "launch" / "configs" / f"{name}.yaml", ["train.micro_batch_size=8"])
        validate_for_run(four, 4, cuda_available=True)


# ---------------------------------------------------------------------------------------------
# Real runs


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """The tiny shards with their synthetic ground-truth masks (0, classes, a 255 border) as label maps."""
    shards = tiny_shards(tmp_path_factory.mktemp("data"))
    out = shards.parent / "labelled"
    cmd = [PYTHON, "-m", "puzzlecam.data", "label-shards", "--shards", str(shards)]
    cmd += ["--labels", str(shards.parent / "voc" / "SegmentationClass"), "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120, cwd=ROOT)
    return out


def affinity_overrides(shards: Path, **extra) -> list[str]:
    """4 steps of global batch 4, width-8 ResNet-18, 48 px crops (12x12 edge maps), radius 5."""
    settings = {
        "task": "affinity",
        "affinity.radius": 5,
        "data.crop_size": 48,
        "data.min_long_side": 40,
        "data.max_long_side": 48,
        **extra,
    }
    return tiny_overrides(shards, **settings)


@pytest.fixture(scope="module")
def single(labelled, tmp_path_factory) -> Path:
    return finished_run(tmp_path_factory.mktemp("single") / "run", affinity_overrides(labelled))


@pytest.mark.slow
def test_two_processes_give_the_one_process_losses_and_weights(labelled, single, tmp_path):
    pytest.importorskip("deepspeed")
    run = tmp_path / "ds"
    ours = two_process_run(run, affinity_overrides(labelled, **{"train.micro_batch_size": 2}), tmp_path / "ds.log")
    ref = metrics(single)
    assert [r["step"] for r in ours] == [r["step"] for r in ref] == [1, 2, 3, 4]
    for a, b in zip(ours, ref, strict=True):
        for key in LOSS_KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a, b)
    assert all(r["loss_bg"] > 0 and r["loss_fg"] > 0 and r["loss_neg"] > 0 for r in ref)  # every term has pairs
    assert max_param_diff(weights(run), weights(single), params_only=False) < 1e-5


@pytest.mark.slow
def test_export_is_an_affinity_net_and_a_killed_run_resumes_to_the_same_weights(labelled, single, tmp_path):
    # The export: AffinityNet's state dict, the config with task: affinity, the backbone untouched.
    model, cfg = load_affinity_net(single / "model.safetensors")
    assert cfg.task == "affinity" and cfg.affinity.radius == 5
    exported = weights(single)
    seed_everything(cfg.train.seed, 0)  # the Trainer's initialization, rebuilt
    initial = build_affinity_net(cfg.model).state_dict()
    assert exported.keys() == initial.keys()
    for k, v in initial.items():  # the frozen backbone (weights and statistics) unchanged; every head tensor trained
        assert torch.equal(exported[k], v) == k.startswith("backbone."), k
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 40, 44)).shape == (1, 1, 10, 11)

    # Killed after step 3 (the step-2 checkpoint is the newest), resumed: the uninterrupted run's result.
    over = affinity_overrides(labelled)
    run = tmp_path / "killed"
    (rc,) = run_all(
        [python_launch(run, over, tmp_path / "k1.log", env={"PUZZLECAM_FAULT_KILL": "step=3"})], expect_ok=False
    )
    assert rc == -9
    assert ckpt.latest_complete(run / "checkpoints").name == "step00000002"
    resumed = python_launch(run, over, tmp_path / "k2.log")
    run_all([resumed])
    assert "resumed from" in resumed.output()
    for a, b in zip(metrics(run), metrics(single), strict=True):
        assert all(a[k] == b[k] for k in LOSS_KEYS), (a, b)
    assert max_param_diff(weights(run), exported, params_only=False) == 0.0

"""In-training evaluation, best weights, TensorBoard, progress lines, summary, --dry-run and DeepSpeed's
log lines (docs/training.md). The evaluation math is checked against the original loop written out with
puzzlecam.evaluate's confusion; the runs are real (tiny shards with masks, real DeepSpeed, 1 and 2
processes, a SIGKILL and a resume).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_train_support import (
    DEMO_CONFIG,
    deepspeed_launch,
    metrics,
    python_launch,
    run_all,
    summary,
    tensorboard_events,
    tiny_overrides,
    tiny_shards,
)
from torch import nn

from puzzlecam import checkpoint as ckpt
from puzzlecam.config import load_config
from puzzlecam.data import eval_loader
from puzzlecam.evaluate import confusion_from_labels, miou, parse_thresholds
from puzzlecam.metrics import Eta, describe_evaluation, duration
from puzzlecam.model import build_model
from puzzlecam.tasks import build_task
from puzzlecam.tasks.classification import EVAL_THRESHOLDS, cam_grid_sweep
from puzzlecam.train import evaluate_network
from puzzlecam.train import main as train_main
from puzzlecam.utils.files import atomic_write_bytes

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
THRESHOLDS = parse_thresholds(EVAL_THRESHOLDS)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return tiny_shards(tmp_path_factory.mktemp("data"))


def eval_overrides(shards: Path, **extra) -> list[str]:
    return tiny_overrides(shards, **{"data.eval_shards": f"{shards}/trainval-*.tar", "train.eval_every": 2, **extra})


# ---------------------------------------------------------------------------------------------
# The math, against the original loop written out


def original_confusions(raw: np.ndarray, keys: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The original loop: make_cam of every class times the label vector, the mask resized to the CAM grid
    by nearest neighbour (source index floor(i * H / h), as cv2.INTER_NEAREST), per threshold the argmax over
    [t, cams] (np.argmax: the first maximum), scored with puzzlecam.evaluate.confusion_from_labels."""
    relu = np.maximum(raw, 0)
    cams = np.maximum(relu - 1e-5, 0) / (relu.max(axis=(1, 2), keepdims=True) + 1e-5)
    labelled = np.zeros(raw.shape[0])
    labelled[keys] = 1
    cams = cams * labelled[:, None, None]
    h, w = raw.shape[1:]
    rows = np.floor(np.arange(h) * mask.shape[0] / h).astype(int)
    cols = np.floor(np.arange(w) * mask.shape[1] / w).astype(int)
    gt = mask[rows][:, cols]
    out = []
    for t in THRESHOLDS:
        pred = np.argmax(np.concatenate([np.full((1, h, w), t), cams]), axis=0)
        conf, _ = confusion_from_labels(torch.from_numpy(pred), torch.from_numpy(gt.astype(np.int64)))
        out.append(conf.numpy())
    return np.stack(out)


def hand_made_image(seed: int):
    """Raw class maps (20, 5, 6) on a grid of quarters (ties between classes and with thresholds), two or
    three labelled classes, and a 20 x 23 mask with those classes, one unlabelled class and ignored pixels."""
    rng = np.random.default_rng(seed)
    keys = np.sort(rng.choice(20, size=int(rng.integers(2, 4)), replace=False))
    raw = (rng.integers(-2, 5, size=(20, 5, 6)) / 4).astype(np.float32)
    raw[keys[1], 0, :3] = raw[keys[0], 0, :3] = 1.0  # equal maxima: the first labelled class wins
    mask = rng.choice(np.concatenate([[0, 255, int(rng.integers(1, 21))], keys + 1]), size=(20, 23)).astype(np.uint8)
    return raw, keys, mask


def test_cam_grid_sweep_equals_the_original_loop_on_hand_made_cams():
    total_got = total_expected = 0
    for seed in range(6):
        raw, keys, mask = hand_made_image(seed)
        got = cam_grid_sweep(torch.from_numpy(raw), torch.from_numpy(keys), torch.from_numpy(mask), THRESHOLDS)
        expected = original_confusions(raw, keys, mask)
        np.testing.assert_array_equal(got.numpy(), expected, err_msg=f"image {seed}")
        total_got, total_expected = total_got + got, total_expected + expected
    means, _ = miou(total_got)
    expected_means = [miou(torch.from_numpy(c))[0] for c in total_expected]
    assert means.tolist() == pytest.approx(expected_means, nan_ok=True)
    assert THRESHOLDS == [0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45]  # the original's np.arange(0.10, 0.50, 0.05)


class PatternNet(nn.Module):
    """Class maps that depend on the image and the class (a stand-in for a trained classifier), recording
    the mode and gradient state it is called in."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, x):
        self.calls.append((self.training, torch.is_grad_enabled()))
        small = nn.functional.adaptive_avg_pool2d(x, (x.shape[2] // 8 + 1, x.shape[3] // 8 + 1))
        channel = torch.arange(20, dtype=x.dtype).view(1, 20, 1, 1)
        cams = self.scale * torch.sin(small.sum(1, keepdim=True) * (channel + 1) / 3)
        return cams.mean((2, 3)), cams


def test_the_task_evaluation_scores_every_masked_image_as_the_original(shards):
    cfg = load_config(DEMO_CONFIG, eval_overrides(shards))
    task = build_task(cfg)
    net = PatternNet()
    result = evaluate_network(task, net, torch.device("cpu"), torch.float32, False, rank=0, world_size=1)
    assert net.training and net.calls and all(call == (False, False) for call in net.calls)  # eval mode, no grad

    expected, count = np.zeros((len(THRESHOLDS), 21, 21), dtype=np.int64), 0
    for batch in eval_loader(cfg.data.eval_shards, rank=0, world_size=1):
        x = (
            batch["image"].permute(0, 3, 1, 2).float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        ) / (torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        with torch.no_grad():
            raw = PatternNet()(x)[1][0].numpy()
        keys = batch["labels"][0].nonzero().flatten().numpy()
        expected += original_confusions(raw, keys, batch["mask"][0].numpy())
        count += 1
    means = [miou(torch.from_numpy(c))[0] for c in expected]
    best = int(np.nanargmax(means))
    assert result.score == "eval_miou"
    assert result.metrics == {
        "eval_miou": pytest.approx(means[best]),
        "eval_threshold": THRESHOLDS[best],
        "eval_images": count,
        "eval_skipped": 0,
    }
    assert count == 24 and 0 < result.metrics["eval_miou"] < 1
    assert sorted(result.images) == ["cam/0", "cam/1", "cam/2", "cam/3"]
    assert all(im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3 for im in result.images.values())
    # Another rank's share: the same sums come from the all-reduce; only rank 0 draws figures.
    other = evaluate_network(task, net, torch.device("cpu"), torch.float32, False, rank=1, world_size=1)
    assert other.images == {} and other.metrics == result.metrics


def test_progress_words():
    assert duration(3725.4) == "1:02:05" and duration(None) == "-:--:--"
    eta = Eta(step=10, total_steps=20)
    assert eta.seconds(10) is None and eta.seconds(15) >= 0
    line = describe_evaluation(
        {"step": 4, "eval_miou": 0.4567, "eval_threshold": 0.25, "eval_images": 24, "eval_best_miou": 0.5},
        "eval_miou",
        {"step": 2, "eval_miou": 0.5},
    )
    assert line == "evaluation at step 4: miou 45.67% threshold 0.25 images 24; best 50.00% at step 2"


# ---------------------------------------------------------------------------------------------
# --dry-run


def test_dry_run_prints_the_numbers_and_writes_nothing(shards, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert train_main(["--config", DEMO_CONFIG, "--run-dir", str(run), "--dry-run", *eval_overrides(shards)]) == 0
    out = capsys.readouterr().out
    config_text, numbers = out.split("world size:", 1)
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(config_text)
    assert load_config(resolved).to_dict() == load_config(DEMO_CONFIG, eval_overrides(shards)).to_dict()
    lines = ("world size:" + numbers).splitlines()
    assert lines[:4] == [
        "world size: 1",
        "micro-batches per rank per epoch: 6 of 4 images",
        "steps per epoch: 6",
        "total steps: 4 (train.max_steps)",
    ]
    assert "evaluation: every 2 steps and at the last, 24 samples of data.eval_shards" in lines
    assert "resume: no (a fresh run)" in lines
    assert not run.exists()
    # Under a launcher (its environment): the world size of the launch, every epoch's steps from it.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    over = eval_overrides(shards, **{"train.micro_batch_size": 2, "train.max_steps": 0, "train.epochs": 3})
    assert train_main(["--config", DEMO_CONFIG, "--run-dir", str(run), "--dry-run", *over]) == 0
    out = capsys.readouterr().out
    assert "world size: 2\n" in out and "steps per epoch: 6\n" in out and "total steps: 18 (3 train.epochs)" in out
    # The checks of a run are made: a global batch that does not add up is exit 2, as a run's.
    assert train_main(["--config", DEMO_CONFIG, "--run-dir", str(run), "--dry-run", *eval_overrides(shards)]) == 2
    assert "world size (2) = 8" in capsys.readouterr().err and not run.exists()


# ---------------------------------------------------------------------------------------------
# Real runs


def evaluate_weights(cfg, state: dict[str, torch.Tensor]) -> float:
    """The evaluation's mIoU of ``state`` in this process, alone (world size 1, one thread as the runs)."""
    model = build_model(cfg.model)
    model.load_state_dict(state)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return evaluate_network(build_task(cfg), model, torch.device("cpu"), torch.float32, False, 0, 1).metrics[
            "eval_miou"
        ]
    finally:
        torch.set_num_threads(threads)


def checkpoint_weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    """The classifier's weights in the checkpoint of ``step`` (DeepSpeed's module state)."""
    module = ckpt.safe_load(run / "checkpoints" / ckpt.tag_for(step) / ckpt.MODEL_STATES)["module"]
    return {k.removeprefix("classifier."): v for k, v in module.items()}


def same_safetensors(a: Path, b: Path) -> bool:
    """The same tensors and header metadata (its order in the file varies)."""
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        if fa.metadata() != fb.metadata() or set(fa.keys()) != set(fb.keys()):
            return False
        return all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())


def best_of(records: list[dict]) -> dict:
    """The first record with the highest eval_miou (a later equal one is no improvement)."""
    evaluated = [r for r in records if "eval_miou" in r]
    return max(evaluated, key=lambda r: (r["eval_miou"], -r["step"]))


@pytest.mark.slow
@needs_deepspeed
def test_evaluation_best_weights_tensorboard_and_progress_with_one_and_two_processes(shards, tmp_path):
    over = eval_overrides(shards)
    one, two = tmp_path / "one", tmp_path / "two"
    launches = [
        python_launch(one, over, tmp_path / "one.log"),
        deepspeed_launch(two, [*over, "train.micro_batch_size=2"], tmp_path / "two.log"),
    ]
    run_all(launches)
    cfg = load_config(one / "config.yaml")
    logged = {}
    for run, launch in zip((one, two), launches, strict=True):
        records = metrics(run)
        evaluated = [r for r in records if "eval_miou" in r]
        assert [r["step"] for r in evaluated] == [2, 4], run.name  # every train.eval_every steps and the last
        running_best = 0.0
        for r in evaluated:
            running_best = max(running_best, r["eval_miou"])
            assert r["eval_threshold"] in THRESHOLDS and r["eval_images"] == 24 and r["eval_skipped"] == 0
            assert r["eval_best_miou"] == running_best
        # Sharded and all-reduced: the logged mIoU is that of the whole evaluation set, alone in this process.
        for r in evaluated:
            assert evaluate_weights(cfg, checkpoint_weights(run, r["step"])) == r["eval_miou"], (run.name, r["step"])
        logged[run.name] = [r["eval_miou"] for r in evaluated]

        # model_best.safetensors: the weights of the best evaluation's step, beside model.safetensors.
        best = best_of(records)
        result = summary(run)
        assert result["best_evaluation"] == {
            "step": best["step"],
            "score": "eval_miou",
            **{k: best[k] for k in ("eval_miou", "eval_threshold", "eval_images", "eval_skipped")},
        }
        with safe_open(str(run / "model_best.safetensors"), "pt") as f:
            header = f.metadata()
        assert header["step"] == str(best["step"]) and float(header["eval_miou"]) == best["eval_miou"]
        best_weights = load_file(str(run / "model_best.safetensors"))
        at_step = checkpoint_weights(run, best["step"])  # fp32 run: the same dtypes
        assert best_weights.keys() == at_step.keys() and all(torch.equal(best_weights[k], at_step[k]) for k in at_step)
        assert (run / "model.safetensors").is_file()

        # summary.json: wall time, mean images/s, final losses, the best evaluation.
        assert result["wall_time_s"] > 0 and result["images_per_s"] > 0
        assert result["final_losses"] == {
            k: records[-1][k] for k in ("loss", "loss_cls", "loss_pcls", "loss_re", "loss_conf")
        }

        # TensorBoard: every record's numbers as scalars, CAM overlays at each evaluation.
        scalars, images = tensorboard_events(run)
        assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
        assert [s for s, _ in scalars["eval/miou"]] == [2, 4]
        assert [v for _, v in scalars["eval/miou"]] == pytest.approx([r["eval_miou"] for r in evaluated])
        assert [v for _, v in scalars["eval/best_miou"]] == pytest.approx([r["eval_best_miou"] for r in evaluated])
        assert images == ["cam/0", "cam/1", "cam/2", "cam/3"]

        # Progress lines off a terminal: step N/M, images/s and an ETA; an evaluation's line.
        output = launch.output()
        progress = re.findall(r"^step (\d+)/4 loss .* [\d.]+ img/s eta \d+:\d\d:\d\d ", output, re.MULTILINE)
        assert progress == ["1", "2", "3", "4"], output[-3000:]
        assert re.search(r"^evaluation at step 4: miou [\d.]+% threshold 0\.\d\d ", output, re.MULTILINE)

        # DeepSpeed's own lines: in deepspeed.log, not on the console.
        ds_log = (run / "deepspeed.log").read_text()
        assert "Setting accelerator to CPU" in ds_log and "DeepSpeedEngine configuration" in ds_log
        assert "DeepSpeedEngine configuration" not in output and "DeepSpeed info: version" not in output
    assert "[launch.py" in launches[1].output()  # the launcher's own lines: printed before the workers start
    assert "\n[rank 1] [" in (two / "deepspeed.log").read_text()  # every rank appends, ranks > 0 marked
    # The same evaluation set scored by one process and by two (whose weights match within rounding).
    assert logged["two"] == pytest.approx(logged["one"], abs=1e-3)


@pytest.mark.slow
@needs_deepspeed
def test_a_resume_keeps_the_best_evaluation_and_its_weights(shards, tmp_path):
    # Evaluations at every step, checkpoints at steps 2 and 4; B and C are SIGKILLed after step 3, whose
    # evaluation (a lost step: trained again) may have replaced model_best.safetensors.
    over = eval_overrides(shards, **{"train.eval_every": 1, "train.keep_last": 3})
    full, b, c = tmp_path / "full", tmp_path / "B", tmp_path / "C"
    kill = {"PUZZLECAM_FAULT_KILL": "step=3"}
    launches = [
        python_launch(full, over, tmp_path / "full.log"),
        python_launch(b, over, tmp_path / "B1.log", env=kill),
        python_launch(c, over, tmp_path / "C1.log", env=kill),
    ]
    assert run_all(launches, expect_ok=False) == [0, -9, -9], [launch.output()[-3000:] for launch in launches]
    for run in (b, c):  # replaced as the trainer replaces it (a new file; the checkpoint keeps a link to the old)
        atomic_write_bytes(run / "model_best.safetensors", b"weights of an evaluation after the checkpoint")
    resumed = [
        python_launch(b, ["--log-level", "debug", *over], tmp_path / "B2.log"),
        # C goes on without evaluations: its best is the checkpoint's, and so are its best weights.
        python_launch(c, [*over, "train.eval_every=0"], tmp_path / "C2.log"),
    ]
    run_all(resumed)

    reference = metrics(full)
    keys = ("step", "eval_miou", "eval_threshold", "eval_best_miou")
    assert [tuple(r.get(k) for k in keys) for r in metrics(b)] == [tuple(r.get(k) for k in keys) for r in reference]
    assert summary(b)["best_evaluation"] == summary(full)["best_evaluation"]
    assert same_safetensors(b / "model_best.safetensors", full / "model_best.safetensors")
    # --log-level debug: DeepSpeed's lines on the console too.
    assert "DeepSpeedEngine configuration" in resumed[0].output()

    before = best_of([r for r in reference if r["step"] <= 2])
    assert summary(c)["best_evaluation"]["step"] == before["step"]
    assert summary(c)["best_evaluation"]["eval_miou"] == before["eval_miou"]
    assert same_safetensors(
        c / "model_best.safetensors", full / "checkpoints" / "step00000002" / "model_best.safetensors"
    )
    assert [r["step"] for r in metrics(c) if "eval_miou" in r] == [1, 2]
    scalars, _ = tensorboard_events(c)
    assert [s for s, _ in scalars["eval/miou"]] == [1, 2]  # step 3's evaluation was lost with its step
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    # --resume none moves the best weights and the events aside with the rest of the old run.
    again = python_launch(
        c, ["--resume", "none", *tiny_overrides(shards, **{"train.max_steps": 1})], tmp_path / "C3.log"
    )
    run_all([again])
    (aside,) = c.glob("checkpoints.replaced-*")
    assert (aside / "model_best.safetensors").is_file() and (aside / "tensorboard").is_dir()
    assert (aside / "deepspeed.log").is_file()
    assert not (c / "model_best.safetensors").exists() and sorted(p.name for p in (c / "tensorboard").iterdir())

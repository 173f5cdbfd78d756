"""Training under faults and bad input (docs/training.md, "Failures"): a diverged run exports nothing,
a full disk during a checkpoint save is one line and leaves the previous checkpoint usable, too many
corrupt samples stop the run naming the worst shards, and input problems are one ``error:`` line.

Real runs of ``launch/train.py`` (CPU, fp32, real DeepSpeed, real shards, a real full tmpfs) are
marked slow.
"""

from __future__ import annotations

import importlib.util
import io
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from test_train_support import (
    DEMO_CONFIG,
    error_lines,
    finished_run,
    metrics,
    python_launch,
    run_all,
    run_files,
    tiny_overrides,
    tiny_shards,
    torchrun_launch,
)

from puzzlecam import checkpoint as ckpt
from puzzlecam.data import train_loader
from puzzlecam.train import main as train_main

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return tiny_shards(tmp_path_factory.mktemp("data"))


def split_shards(shards: Path, out: Path, corrupt: int = 0, keep: int = 24) -> Path:
    """The tiny set's first ``keep`` samples as two shards ``part-00000{0,1}.tar`` (12 + the rest), with
    the JPEGs of the first ``corrupt`` samples of part 0 cut short (undecodable)."""
    with tarfile.open(shards / "trainval-000000.tar") as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.isreg()]
    keys = list(dict.fromkeys(name.split(".", 1)[0] for name, _ in members))[:keep]
    out.mkdir(parents=True)
    for part, chunk in enumerate((keys[:12], keys[12:])):
        with tarfile.open(out / f"part-{part:06d}.tar", "w") as tf:
            for name, data in members:
                key = name.split(".", 1)[0]
                if key not in chunk:
                    continue
                if name.endswith(".jpg") and part == 0 and chunk.index(key) < corrupt:
                    data = data[:300]
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return out


@pytest.mark.slow
@needs_deepspeed
def test_a_diverged_run_exports_no_weights(shards, tmp_path):
    # lr 1e9: the first steps are finite (checkpointed every step), then the losses turn NaN and so do
    # the BatchNorm running statistics (the forward pass updates them); too few bad steps in a row to stop.
    run = tmp_path / "diverged"
    over = tiny_overrides(
        shards,
        **{"optim.lr": "1.0e+9", "model.norm": "train", "train.ckpt_every": 1, "train.max_bad_steps": 5},
    )
    launch = python_launch(run, over, tmp_path / "diverged.log")
    (rc,) = run_all([launch], expect_ok=False)
    out = launch.output()
    assert rc == 1, out[-4000:]
    last = ckpt.latest_complete(run / "checkpoints")
    (line,) = error_lines(out)
    assert "non-finite" in line and "running_var" in line and str(last) in line and "Traceback" not in out
    assert not (run / "model.safetensors").exists()
    assert ckpt.step_of(last.name) < 4 and not (run / "checkpoints" / "step00000004").exists()
    state = ckpt.safe_load(last / "mp_rank_00_model_states.pt")["module"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("processes", [1, 2])
def test_a_full_disk_during_a_checkpoint_save(shards, small_disk, tmp_path, processes):
    # 2 MiB: the step-2 checkpoint (~1.5 MB) fits, the step-4 one does not.
    run = small_disk.path / "run"
    over = tiny_overrides(shards, **{"train.micro_batch_size": 4 // processes})

    def launch_in(run_dir: Path, log: Path):
        return python_launch(run_dir, over, log) if processes == 1 else torchrun_launch(run_dir, over, log)

    launch = launch_in(run, tmp_path / "full.log")
    (rc,) = run_all([launch], expect_ok=False)
    out = launch.output()
    assert rc == 1, out[-4000:]
    (line,) = error_lines(out)
    assert line.startswith("error: no space left on tmpfs") and str(run / "checkpoints" / "step00000004") in line
    assert "step00000002" in line
    if processes == 1:
        assert "Traceback" not in out
    # The half-written checkpoint is gone; the previous one is complete and resumes elsewhere.
    assert [p.name for p in (run / "checkpoints").iterdir() if p.is_dir()] == ["step00000002"]
    moved = shutil.copytree(run, tmp_path / "moved")
    resumed = launch_in(moved, tmp_path / "resumed.log")
    run_all([resumed])
    assert "step00000002" in resumed.output() and [r["step"] for r in metrics(moved)] == [1, 2, 3, 4]


@pytest.mark.slow
@needs_deepspeed
def test_too_many_corrupt_samples_stop_the_run(shards, tmp_path):
    # 3 of 24 samples (all in part 0) are corrupt: 12.5%. Two processes (each sees half the epoch);
    # a bound of 10% allows 2 per epoch, 20% allows all 3.
    data = split_shards(shards, tmp_path / "data", corrupt=3)
    over = {"data.train_shards": f"{data}/part-*.tar", "train.micro_batch_size": 2, "train.max_steps": 6}
    strict = torchrun_launch(
        tmp_path / "strict", tiny_overrides(shards, **over, **{"data.max_corrupt_fraction": 0.1}), tmp_path / "s.log"
    )
    lenient = torchrun_launch(
        tmp_path / "lenient", tiny_overrides(shards, **over, **{"data.max_corrupt_fraction": 0.2}), tmp_path / "l.log"
    )
    rc = run_all([strict, lenient], expect_ok=False)
    assert rc == [1, 0], [strict.output()[-3000:], lenient.output()[-3000:]]
    (line,) = error_lines(strict.output())
    assert "3 corrupt samples" in line and "data.max_corrupt_fraction=0.1" in line
    assert f"{data}/part-000000.tar (3)" in line and "part-000001" not in line
    assert not (tmp_path / "strict" / "model.safetensors").exists()
    assert metrics(tmp_path / "lenient")[-1]["skipped_samples"] > 0


def test_the_loader_counts_corrupt_samples_per_shard(shards, tmp_path):
    data = split_shards(shards, tmp_path / "data", corrupt=3)
    loader = train_loader(f"{data}/part-*.tar", batch_size=4, crop_size=32, seed=0, min_long_side=32, max_long_side=48)
    assert [p.name for p in loader.shard_paths] == ["part-000000.tar", "part-000001.tar"]
    batches = list(loader)  # one epoch: every sample drawn once
    assert len(batches) == 6 and loader.skipped == 3
    assert loader.epoch_corrupt == [3, 0]
    state = loader.state_dict()
    again = train_loader(f"{data}/part-*.tar", batch_size=4, crop_size=32, seed=0, min_long_side=32, max_long_side=48)
    again.load_state_dict(state)
    assert again.epoch_corrupt == [3, 0]
    next(iter(again))  # the next epoch starts its own count
    assert again.epoch == 1 and sum(again.epoch_corrupt) <= 3 and again.skipped >= 3


def test_model_num_classes_must_match_the_data(shards, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["--config", DEMO_CONFIG, "--run-dir", str(run), f"data.train_shards={shards}/trainval-*.tar"]
    assert train_main([*argv, "model.num_classes=10"]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "model.num_classes=10" in line and "hold VOC samples" in line and "Set model.num_classes=20" in line
    assert not run.exists()


@pytest.mark.slow
@needs_deepspeed
def test_input_problems_are_one_error_line(shards, tmp_path):
    finished = finished_run(tmp_path / "finished", tiny_overrides(shards))
    before = run_files(finished)
    fewer = split_shards(shards, tmp_path / "fewer", keep=20)
    launches = [
        python_launch(
            tmp_path / "nothing",
            tiny_overrides(shards, **{"data.train_shards": f"{tmp_path}/none-*.tar"}),
            tmp_path / "nothing.log",
        ),
        # The checkpoint's data position does not fit other data (the shard paths themselves may move).
        python_launch(
            finished,
            tiny_overrides(shards, **{"data.train_shards": f"{fewer}/part-*.tar", "train.max_steps": 6}),
            tmp_path / "fewer.log",
        ),
    ]
    assert run_all(launches, expect_ok=False) == [2, 2], [launch.output()[-3000:] for launch in launches]
    lines = [error_lines(launch.output()) for launch in launches]
    assert len(lines[0]) == 1 and "matches no file" in lines[0][0]
    assert len(lines[1]) == 1 and "data.train_shards" in lines[1][0] and "num_samples" in lines[1][0]
    assert all("Traceback" not in launch.output() for launch in launches)
    assert run_files(finished) == before

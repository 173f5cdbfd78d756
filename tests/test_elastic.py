"""Elastic resume (docs/training.md, "Elastic resume"): a checkpoint written on N processes resumes on M.

Real launches (``python``, ``torchrun``; gloo, CPU, fp32, real DeepSpeed at ZeRO stage 0, real shards)
through tests/test_elastic_recorder.py, which records the ids of every batch each rank trains on. 24
samples and a global batch of 4: an epoch is 6 steps. The first launch stops at its step-2 checkpoint
(slots 0..7 of epoch 0 used), the second resumes it on the other world size and trains to step 8
(into epoch 1).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_elastic_recorder import RECORD_DIR
from test_train_support import (
    DEMO_CONFIG,
    PYTHON,
    ROOT,
    TORCHRUN,
    Launch,
    free_port,
    max_param_diff,
    metrics,
    run_all,
    summary,
    tiny_overrides,
    tiny_shards,
    weights,
)

from puzzlecam.train import main as train_main

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow
RECORDER = str(ROOT / "tests" / "test_elastic_recorder.py")
# Frozen norms and the same global batches: the resumed runs compute what the uninterrupted one does, in
# another reduction order (2 x micro-batch 2 against 1 x micro-batch 4).
TOL = 1e-5


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return tiny_shards(tmp_path_factory.mktemp("data"))


def recorded_launch(run: Path, nprocs: int, overrides: list[str], where: Path) -> Launch:
    """``nprocs`` processes training into ``run``, recording their batches under ``where``."""
    where.mkdir(parents=True)
    args = [RECORDER, "--config", DEMO_CONFIG, "--run-dir", str(run), *overrides]
    if nprocs > 1:
        endpoint = f"127.0.0.1:{free_port()}"
        args = [TORCHRUN, "--nproc-per-node", str(nprocs), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, *args]
    else:
        args = [PYTHON, *args]
    return Launch(args, where.parent / f"{where.name}.log", env={RECORD_DIR: str(where)})


def recorded(where: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(where.glob("rank*.jsonl")) for line in path.read_text().splitlines()]


def layout(shards: Path, nprocs: int, max_steps: int) -> list[str]:
    return tiny_overrides(shards, **{"train.micro_batch_size": 4 // nprocs, "train.max_steps": max_steps})


def test_an_interrupted_epoch_finished_on_another_world_size_sees_each_sample_once(shards, tmp_path, capsys):
    # The reference resumes on its own world size; the schedules of all three change alike at step 2.
    scenarios = {"two_then_one": (2, 1), "one_then_two": (1, 2), "reference": (1, 1)}
    first = [
        recorded_launch(tmp_path / name, before, layout(shards, before, 2), tmp_path / f"{name}_first")
        for name, (before, _) in scenarios.items()
    ]
    run_all(first)
    # --dry-run (one process here) says what the launch will do.
    assert (
        train_main(
            ["--config", DEMO_CONFIG, "--run-dir", str(tmp_path / "two_then_one"), "--dry-run", *layout(shards, 1, 8)]
        )
        == 0
    )
    assert "step 2; written by 2 processes: an elastic resume)" in capsys.readouterr().out
    second = [
        recorded_launch(tmp_path / name, after, layout(shards, after, 8), tmp_path / f"{name}_second")
        for name, (_, after) in scenarios.items()
    ]
    run_all(second)

    reference = tmp_path / "reference"
    for (name, (before, after)), launch in zip(scenarios.items(), second, strict=True):
        run = tmp_path / name
        assert "resumed from" in launch.output() and "step00000002" in launch.output()
        first_part, second_part = recorded(tmp_path / f"{name}_first"), recorded(tmp_path / f"{name}_second")
        assert {b["world_size"] for b in first_part} == {before} and {b["world_size"] for b in second_part} == {after}
        # Epoch 0: 8 samples before the interruption, 16 after: each of the 24 samples once.
        seen = [i for b in first_part + second_part if b["epoch"] == 0 for i in b["ids"]]
        assert len(seen) == 24 and len(set(seen)) == 24, name
        # Epoch 1 starts afresh on the new world size: 2 steps of 4 distinct samples.
        later = [i for b in second_part if b["epoch"] == 1 for i in b["ids"]]
        assert len(later) == 8 and len(set(later)) == 8
        assert summary(run)["world_size"] == after and summary(run)["steps"] == 8
        if name == "reference":
            continue
        (resume,) = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
        assert resume["allowed"]["world_size"] == [before, after]
        assert resume["allowed"]["train.micro_batch_size"] == [4 // before, 4 // after]
        # Weights and momentum came through: the run matches the reference within fp32 rounding.
        assert max_param_diff(weights(run), weights(reference)) < TOL
        for ours, ref in zip(metrics(run), metrics(reference), strict=True):
            assert ours["step"] == ref["step"] and ours["loss"] == pytest.approx(ref["loss"], rel=TOL, abs=1e-6)

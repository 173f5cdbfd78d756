"""Multi-process training on CPU: gloo on 127.0.0.1 under the real launchers.

Every multi-process run must (a) end with identical parameters on all ranks (summary.json holds
each rank's parameter digest) and (b) match a one-process run with the same global batch (4) within
fp32 tolerance. (b) needs BatchNorm to compute the same thing however the batch is split, so these
runs use ``model.norm=frozen`` (running statistics, never batch statistics); with train-mode
BatchNorm each rank would normalize its micro-batch with its own statistics. The loader gives
global slot ``rank + i * world`` to rank ``rank``, so the global batch of every step holds the same
samples with the same augmentation for any world size.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_train_support import (
    DEEPSPEED,
    TORCHRUN,
    Launch,
    deepspeed_launch,
    finished_run,
    free_port,
    max_param_diff,
    metrics,
    run_all,
    summary,
    tiny_overrides,
    tiny_shards,
    torchrun_launch,
    train_args,
    weights,
)

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow
TOL = 1e-5  # fp32, different reduction order (2 x micro-batch 2 vs 1 x micro-batch 4)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return tiny_shards(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def single(shards, tmp_path_factory) -> Path:
    """The one-process reference run: micro-batch 4 = global batch 4."""
    return finished_run(tmp_path_factory.mktemp("single") / "run", tiny_overrides(shards))


def two_rank_overrides(shards: Path) -> list[str]:
    return tiny_overrides(shards, **{"train.micro_batch_size": 2})


def check_against_single(run: Path, single: Path, world_size: int = 2) -> None:
    s = summary(run)
    assert s["world_size"] == world_size and s["steps"] == 4
    digests = s["param_digest_per_rank"]
    assert len(digests) == world_size and len(set(digests)) == 1, f"ranks differ: {digests}"
    assert max_param_diff(weights(run), weights(single)) < TOL
    for ours, ref in zip(metrics(run), metrics(single), strict=True):
        assert ours["step"] == ref["step"]
        for key in ("loss", "loss_cls", "loss_pcls", "loss_re"):
            assert ours[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), (key, ours, ref)


def test_two_processes_under_deepspeed_and_torchrun(shards, single, tmp_path):
    ds_run, tr_run = tmp_path / "ds", tmp_path / "tr"
    over = two_rank_overrides(shards)
    run_all([deepspeed_launch(ds_run, over, tmp_path / "ds.log"), torchrun_launch(tr_run, over, tmp_path / "tr.log")])
    check_against_single(ds_run, single)
    check_against_single(tr_run, single)


def test_two_nodes_under_torchrun_and_deepspeed_no_ssh(shards, single, tmp_path):
    over = two_rank_overrides(shards)
    tr_run, ds_run = tmp_path / "tr_nodes", tmp_path / "ds_nodes"
    # torchrun: two launchers (one per "node"), static rendezvous on 127.0.0.1.
    port = free_port()
    torchrun_nodes = [
        Launch(
            [
                TORCHRUN,
                "--nnodes",
                "2",
                "--node-rank",
                str(r),
                "--nproc-per-node",
                "1",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                *train_args(tr_run, over),
            ],
            tmp_path / f"tr{r}.log",
        )
        for r in (0, 1)
    ]
    # deepspeed: a two-host hostfile, each launcher started by hand for its node (no ssh).
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = free_port()
    deepspeed_nodes = [
        Launch(
            [
                DEEPSPEED,
                "--hostfile",
                str(hostfile),
                "--no_ssh",
                "--node_rank",
                str(r),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                *train_args(ds_run, over),
            ],
            tmp_path / f"ds{r}.log",
        )
        for r in (0, 1)
    ]
    run_all(torchrun_nodes + deepspeed_nodes)
    check_against_single(tr_run, single)
    check_against_single(ds_run, single)


def test_torchrun_restarts_a_killed_rank_from_the_last_checkpoint(shards, single, tmp_path):
    # Rank 1 is SIGKILLed after step 3; torchrun (--max-restarts 1) restarts both workers, which
    # resume from the step-2 checkpoint and finish. Result: as if nothing had happened.
    run = tmp_path / "restart"
    launch = torchrun_launch(
        run,
        two_rank_overrides(shards),
        tmp_path / "restart.log",
        extra=["--max-restarts", "1"],
        env={"PUZZLECAM_FAULT_KILL": "step=3,rank=1"},
    )
    run_all([launch])
    assert (run / ".fault_fired_rank1").read_text() == "3"
    assert "resumed from" in launch.output()
    assert summary(run)["resumed_from"].endswith("step00000002")
    check_against_single(run, single)

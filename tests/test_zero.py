"""DeepSpeed ZeRO stages 1 and 2 (``train.zero_stage``; docs/training.md, "ZeRO"): the DeepSpeed dict,
what a resume of a ZeRO checkpoint accepts, and real 2-process runs on gloo (CPU, real DeepSpeed, real
shards): ZeRO-2 and ZeRO-1 equal stage 0 within fp32 rounding with clipping engaged (in fp32 and bf16
autocast), a SIGKILLed ZeRO-2 run resumes exactly, a non-finite step is skipped through DeepSpeed's
overflow check, and a resume on another world size (or to or from stage 0) is refused with one line.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
from test_train_support import (
    DEMO_CONFIG,
    deepspeed_launch,
    error_lines,
    max_param_diff,
    metrics,
    python_launch,
    run_all,
    run_files,
    summary,
    tiny_overrides,
    tiny_shards,
    torchrun_launch,
    weights,
)

from puzzlecam.checkpoint import safe_load
from puzzlecam.config import load_config
from puzzlecam.errors import ConfigError, UsageError
from puzzlecam.precision import DEEPSPEED_DEFAULT_BUCKET, deepspeed_config, size_zero_buckets
from puzzlecam.resume import check_resume

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
# fp32 on 2 ranks: ZeRO-2 reduces the gradients in buckets into partitions, stage 0 all-reduces them whole;
# the sums differ in rounding order only (observed: ~1e-7 on the weights after 4 steps).
TOL = 1e-5
CLIP = 0.5  # below the gradients' norms of these steps (about 1.5-3.6): every step is clipped


def test_zero_stage_builds_the_deepspeed_dict(tmp_path):
    cfg = load_config(DEMO_CONFIG, ["train.zero_stage=2", "optim.grad_clip=3.0"])
    ds = deepspeed_config(cfg)
    # ZeRO partitions the gradients: DeepSpeed's optimizer clips them (stage 0 leaves it to the Trainer).
    assert ds["zero_optimization"] == {"stage": 2} and ds["gradient_clipping"] == 3.0
    stage0 = deepspeed_config(load_config(DEMO_CONFIG, ["optim.grad_clip=3.0"]))
    assert stage0["zero_optimization"] == {"stage": 0} and stage0["gradient_clipping"] == 0.0
    # A user JSON may tune ZeRO (bucket sizes), not choose its stage.
    extra = tmp_path / "zero.json"
    extra.write_text('{"zero_optimization": {"stage": 2, "reduce_bucket_size": 1000000}}')
    merged = deepspeed_config(load_config(DEMO_CONFIG, ["train.zero_stage=2", f"train.deepspeed_config={extra}"]))
    assert merged["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000000}
    with pytest.raises(ConfigError, match=r"zero_optimization.stage=2 but train.zero_stage=1"):
        deepspeed_config(load_config(DEMO_CONFIG, ["train.zero_stage=1", f"train.deepspeed_config={extra}"]))
    with pytest.raises(
        ConfigError, match=r"train.zero_stage' must be 0, 1 or 2 \(ZeRO stage 3 is not supported\), got 3"
    ):
        load_config(DEMO_CONFIG, ["train.zero_stage=3"])
    with pytest.raises(ConfigError, match="train.precision=fp16 with train.zero_stage=1 is not supported"):
        deepspeed_config(load_config(DEMO_CONFIG, ["train.zero_stage=1", "train.precision=fp16"]))


def test_zero_buckets_are_sized_to_the_model_unless_the_user_json_sets_them(tmp_path):
    ds = deepspeed_config(load_config(DEMO_CONFIG, ["train.zero_stage=1"]))
    # DeepSpeed allocates each gradient bucket whole: its default (5e8 elements) costs 2 GB per rank in fp32
    # (4 ZeRO runs on 2 ranks exhausted a 24 GiB test machine); a bucket holding the model reduces the same.
    assert size_zero_buckets(ds, 1001)["zero_optimization"] == {
        "stage": 1,
        "reduce_bucket_size": 1002,  # even: DeepSpeed's alignment
        "allgather_bucket_size": 1002,
    }
    assert size_zero_buckets(ds, 10**10)["zero_optimization"]["reduce_bucket_size"] == DEEPSPEED_DEFAULT_BUCKET
    assert ds["zero_optimization"] == {"stage": 1}  # not changed in place
    stage0 = deepspeed_config(load_config(DEMO_CONFIG, []))
    assert size_zero_buckets(stage0, 1001) == stage0
    extra = tmp_path / "zero.json"
    extra.write_text('{"zero_optimization": {"reduce_bucket_size": 7000}}')
    user = deepspeed_config(load_config(DEMO_CONFIG, ["train.zero_stage=2", f"train.deepspeed_config={extra}"]))
    assert size_zero_buckets(user, 1001)["zero_optimization"] == {
        "stage": 2,
        "reduce_bucket_size": 7000,
        "allgather_bucket_size": 1002,
    }


def test_a_zero_checkpoint_resumes_on_its_world_size_and_between_stages_1_and_2(tmp_path):
    def client(world_size, **train):
        return {
            "step": 4,
            "world_size": world_size,
            "config": load_config(DEMO_CONFIG, [f"train.{k}={v}" for k, v in train.items()]).to_dict(),
        }

    tag = tmp_path / "step00000004"
    now = load_config(DEMO_CONFIG, ["train.zero_stage=1"])
    check = check_resume(client(2, zero_stage=2), now, 2, tag, force=False)
    assert [str(c) for c in check.allowed] == ["train.zero_stage (checkpoint 2, now 1)"]
    for saved, current, message in (
        (client(2, zero_stage=2), now, "written by 2 processes under ZeRO stage 2, this run has 1"),
        (client(2, zero_stage=2), load_config(DEMO_CONFIG), "train.zero_stage=2, this run has 0"),
        (client(2), now, "train.zero_stage=0, this run has 1"),
    ):
        for force in (False, True):  # not even --resume-force: the state cannot be loaded
            with pytest.raises(UsageError, match=message):
                check_resume(saved, current, 1, tag, force=force)
    # Stage 0 resumes on any world size, reported as a change.
    check = check_resume(client(2), load_config(DEMO_CONFIG, ["train.micro_batch_size=32"]), 1, tag, force=False)
    assert [str(c) for c in check.allowed] == [
        "world_size (checkpoint 2, now 1)",
        "train.micro_batch_size (checkpoint 16, now 32)",
    ]


# ---------------------------------------------------------------------------------------------
# Real runs


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return tiny_shards(tmp_path_factory.mktemp("data"))


def zero_overrides(shards: Path, **extra) -> list[str]:
    """2 ranks x micro-batch 1 x accumulation 2 = the global batch 4, every step clipped."""
    settings = {
        "train.micro_batch_size": 1,
        "train.grad_accum_steps": 2,
        "optim.grad_clip": CLIP,
        "train.zero_stage": 2,
    }
    return tiny_overrides(shards, **{**settings, **extra})


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory) -> dict[str, Path]:
    """The 2-process runs, launched together: ZeRO-2, ZeRO-1 and stage 0, ZeRO-2 and stage 0 in bf16 (4
    steps); ZeRO-2 with rank 1 SIGKILLed
    after step 3 and restarted by torchrun (resuming from step 2); ZeRO-2 with a huge learning rate (every
    step after the first non-finite)."""
    base = tmp_path_factory.mktemp("zero")
    over = {
        "zero2": zero_overrides(shards),
        "zero1": zero_overrides(shards, **{"train.zero_stage": 1}),
        "stage0": zero_overrides(shards, **{"train.zero_stage": 0}),
        "zero2_bf16": zero_overrides(shards, **{"train.precision": "bf16"}),
        "stage0_bf16": zero_overrides(shards, **{"train.zero_stage": 0, "train.precision": "bf16"}),
        "killed": zero_overrides(shards),
        "diverging": zero_overrides(
            shards,
            **{"optim.lr": "1.0e+30", "optim.grad_clip": 0.0, "train.ckpt_every": 1, "train.max_bad_steps": 5},
        ),
    }
    launches = {
        name: deepspeed_launch(base / name, over[name], base / f"{name}.log")
        for name in ("zero2", "zero1", "stage0", "zero2_bf16", "stage0_bf16", "diverging")
    }
    launches["killed"] = torchrun_launch(
        base / "killed",
        over["killed"],
        base / "killed.log",
        extra=["--max-restarts", "1"],
        env={"PUZZLECAM_FAULT_KILL": "step=3,rank=1"},
    )
    run_all(list(launches.values()), timeout=420)
    assert "resumed from" in launches["killed"].output()
    return {name: base / name for name in launches}


@pytest.mark.slow
@needs_deepspeed
# bf16 autocast: the gradients are reduced in fp32 under ZeRO too (puzzlecam/precision.py), so ZeRO-2
# matches stage 0 as closely as in fp32 (DeepSpeed's default, bf16 reduction of the convolutions'
# gradients, left ~3e-2 between them after 4 steps).
@pytest.mark.parametrize(("zero", "stage0"), [("zero2", "stage0"), ("zero1", "stage0"), ("zero2_bf16", "stage0_bf16")])
def test_zero_equals_stage0_with_deepspeeds_clipping(runs, zero, stage0):
    zero, stage0 = runs[zero], runs[stage0]
    tag = zero / "checkpoints" / "step00000004"
    assert sorted(p.name for p in tag.glob("zero_pp_rank_*")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    digests = summary(zero)["param_digest_per_rank"]
    assert len(digests) == 2 and len(set(digests)) == 1
    # torch's deprecation warning for DeepSpeed's all-gather (every step, every rank) is kept off the console.
    assert "FutureWarning" not in (zero.parent / f"{zero.name}.log").read_text()
    assert max_param_diff(weights(zero), weights(stage0)) < TOL
    for ours, ref in zip(metrics(zero), metrics(stage0), strict=True):
        assert ours["step"] == ref["step"] and ref["grad_norm"] > CLIP  # clipped, by DeepSpeed and by the Trainer
        for key in ("loss", "loss_cls", "loss_pcls", "loss_re", "grad_norm"):
            assert ours[key] == pytest.approx(ref[key], rel=TOL, abs=1e-6), (key, ours, ref)


@pytest.mark.slow
@needs_deepspeed
def test_a_sigkilled_zero2_run_resumes_exactly(runs):
    killed, zero = runs["killed"], runs["zero2"]
    assert (killed / ".fault_fired_rank1").read_text() == "3"
    assert summary(killed)["resumed_from"].endswith("step00000002")
    assert max_param_diff(weights(killed), weights(zero), params_only=False) == 0.0
    assert [{k: r[k] for k in ("step", "loss", "grad_norm", "lr")} for r in metrics(killed)] == [
        {k: r[k] for k in ("step", "loss", "grad_norm", "lr")} for r in metrics(zero)
    ]


@pytest.mark.slow
@needs_deepspeed
def test_zero_skips_a_non_finite_step_on_every_rank(runs):
    run = runs["diverging"]
    records = metrics(run)
    assert records[0]["loss"] is not None and [r["loss"] for r in records[1:]] == [None, None, None]
    assert [r["skipped_steps"] for r in records] == [0, 1, 2, 3]
    # The skipped steps changed nothing: the exported weights (step 4) are those of the step-1 checkpoint.
    step1 = safe_load(run / "checkpoints" / "step00000001" / "mp_rank_00_model_states.pt")["module"]
    final = weights(run)
    assert max((step1[f"classifier.{k}"] - v).abs().max().item() for k, v in final.items()) == 0.0


@pytest.mark.slow
@needs_deepspeed
def test_a_zero_checkpoint_on_another_world_size_or_stage_is_refused_cleanly(runs, shards, tmp_path):
    cases = {
        # DeepSpeed 0.19 loads ZeRO partitions only on the world size that wrote them.
        "one_process": (zero_overrides(shards, **{"train.micro_batch_size": 2}), "under ZeRO stage 2, this run has 1"),
        "stage0": (
            zero_overrides(shards, **{"train.micro_batch_size": 2, "train.zero_stage": 0}),
            "train.zero_stage=2, this run has 0",
        ),
    }
    copies = {name: tmp_path / name for name in cases}
    for copy in copies.values():
        shutil.copytree(runs["zero2"], copy)
    before = run_files(runs["zero2"])
    launches = {
        name: python_launch(copies[name], [*over, "train.max_steps=6"], tmp_path / f"{name}.log")
        for name, (over, _) in cases.items()
    }
    codes = run_all(list(launches.values()), expect_ok=False)
    for (name, (_, message)), launch, rc in zip(cases.items(), launches.values(), codes, strict=True):
        out = launch.output()
        assert rc == 2, out[-3000:]
        (line,) = error_lines(out)
        assert message in line and "Traceback" not in out
        assert run_files(copies[name]) == before

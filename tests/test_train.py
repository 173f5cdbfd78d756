"""Trainer tests: exact resume after SIGKILL, run-directory contents, baseline mode, bad-loss
handling, config/launch errors, checkpoint bookkeeping (CPU, fp32, real DeepSpeed, real shards).

The tests that launch training processes are marked slow (`make test-fast` leaves them out).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from test_train_support import (
    DEMO_CONFIG,
    ROOT,
    max_param_diff,
    metrics,
    python_launch,
    run_all,
    summary,
    tiny_overrides,
    tiny_shards,
    weights,
)

from puzzlecam import checkpoint as ckpt
from puzzlecam.config import load_config, validate_for_run
from puzzlecam.errors import ConfigError, UsageError
from puzzlecam.metrics import MetricsLog, read_jsonl, show_step
from puzzlecam.precision import autocast_dtype, deepspeed_config
from puzzlecam.train import main as train_main
from puzzlecam.utils.files import is_temporary
from puzzlecam.utils.log import setup_logging
from puzzlecam.utils.progress import ProgressBar

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
LOSS_KEYS = ("step", "loss", "loss_cls", "loss_pcls", "loss_re", "loss_conf", "alpha", "lr")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return tiny_shards(tmp_path_factory.mktemp("data"))


@pytest.mark.slow
@needs_deepspeed
def test_sigkill_then_resume_equals_uninterrupted_run(shards, tmp_path):
    # 6 steps, micro-batch 2 x accumulation 2, checkpoints every 2 steps; run B is SIGKILLed
    # right after step 3 (the checkpoint of step 2 is the newest) and resumed with --resume auto.
    over = tiny_overrides(
        shards,
        **{
            "train.max_steps": 6,
            "train.micro_batch_size": 2,
            "train.grad_accum_steps": 2,
            "model.norm": "train",
            "puzzle.conf_weight": 0.5,  # the original's optional entropy term goes through the whole trainer
        },
    )
    # Run C dies in the middle of the step-4 save (files written, no COMPLETE): the step-2
    # checkpoint must stay usable.
    a, b, c = tmp_path / "A", tmp_path / "B", tmp_path / "C"
    full = python_launch(a, over, tmp_path / "A.log")
    killed = python_launch(b, over, tmp_path / "B1.log", env={"PUZZLECAM_FAULT_KILL": "step=3"})
    killed_saving = python_launch(c, over, tmp_path / "C1.log", env={"PUZZLECAM_FAULT_KILL": "step=4,phase=save"})
    rc_full, rc_killed, rc_saving = run_all([full, killed, killed_saving], expect_ok=False)
    assert rc_full == 0, full.output()[-4000:]
    for launch, rc in ((killed, rc_killed), (killed_saving, rc_saving)):
        assert rc == -9, f"expected SIGKILL, got {rc}\n{launch.output()[-4000:]}"
    for run in (b, c):
        assert ckpt.latest_complete(run / "checkpoints").name == "step00000002"
        assert not (run / "model.safetensors").exists()
    assert (c / "checkpoints" / "step00000004").is_dir() and not ckpt.is_complete(c / "checkpoints" / "step00000004")

    resumed = [python_launch(run, over, tmp_path / f"{run.name}2.log") for run in (b, c)]
    run_all(resumed)
    for launch in resumed:
        assert "resumed from" in launch.output() and "step00000002" in launch.output()

    ma, wa = metrics(a), weights(a)
    for run in (b, c):
        mb = metrics(run)
        assert [r["step"] for r in ma] == [1, 2, 3, 4, 5, 6] == [r["step"] for r in mb]
        for ra, rb in zip(ma, mb, strict=True):
            for key in LOSS_KEYS:
                assert ra[key] == rb[key], (run.name, key, ra, rb)
        assert max_param_diff(wa, weights(run), params_only=False) == 0.0
    assert [p.name for p in ckpt.complete_tags(c / "checkpoints")] == ["step00000004", "step00000006"]

    # The run directory: resolved config, metrics (JSONL + Parquet), pruned checkpoints, weights.
    cfg = load_config(a / "config.yaml")
    assert cfg.train.max_steps == 6 and cfg.data.train_shards.startswith(str(shards))
    assert all(isinstance(ma[0][k], (int, float)) for k in LOSS_KEYS)
    assert ma[0]["alpha"] == 0.0 and ma[-1]["alpha"] == cfg.puzzle.alpha_max
    assert cfg.puzzle.conf_weight == 0.5 and all(r["loss_conf"] > 0 for r in ma)
    assert ma[0]["lr"] == pytest.approx(cfg.optim.lr) and ma[-1]["lr"] < ma[0]["lr"]
    import pyarrow.parquet as pq

    assert pq.read_table(a / "metrics.parquet").column("loss").to_pylist() == [r["loss"] for r in ma]
    assert [p.name for p in ckpt.complete_tags(a / "checkpoints")] == ["step00000004", "step00000006"]
    from puzzlecam.model import build_model

    model = build_model(cfg.model)
    model.load_state_dict(wa, strict=True)
    assert all(v.dtype == torch.float32 for v in wa.values() if v.is_floating_point())
    assert summary(a)["steps"] == 6 and summary(b)["resumed_from"].endswith("step00000002")


@pytest.mark.slow
@needs_deepspeed
def test_baseline_mode_bad_losses_and_setup_errors(shards, tmp_path):
    base, bad, mismatch = tmp_path / "base", tmp_path / "bad", tmp_path / "mismatch"
    launches = [
        python_launch(
            base, tiny_overrides(shards, **{"train.mode": "baseline", "train.max_steps": 2}), tmp_path / "base.log"
        ),
        # A huge learning rate makes every loss after the first step non-finite.
        python_launch(
            bad,
            tiny_overrides(
                shards,
                **{
                    "optim.lr": "1.0e+30",
                    "optim.grad_clip": 0.0,
                    "train.max_steps": 10,
                    "train.ckpt_every": 1,
                    "train.max_bad_steps": 3,
                },
            ),
            tmp_path / "bad.log",
        ),
        python_launch(mismatch, tiny_overrides(shards, **{"train.global_batch_size": 6}), tmp_path / "mismatch.log"),
    ]
    rc = run_all(launches, expect_ok=False)
    assert rc[0] == 0, launches[0].output()[-4000:]
    for r in metrics(base):
        assert r["loss"] == r["loss_cls"] and r["loss_pcls"] == 0.0 and r["loss_re"] == 0.0 and r["alpha"] == 0.0
    # --resume none in a used run dir: a fresh run; the old checkpoints are moved aside, not resumed.
    again = python_launch(
        base,
        ["--resume", "none", *tiny_overrides(shards, **{"train.mode": "baseline", "train.max_steps": 1})],
        tmp_path / "again.log",
    )
    run_all([again])
    assert [p.name for p in ckpt.complete_tags(base / "checkpoints")] == ["step00000001"]
    (aside,) = base.glob("checkpoints.replaced-*")
    assert [p.name for p in ckpt.complete_tags(aside)] == ["step00000002"]
    assert [r["step"] for r in metrics(base)] == [1] and summary(base)["resumed_from"] is None

    assert rc[1] == 1, launches[1].output()[-4000:]
    out = launches[1].output()
    assert "3 optimizer steps in a row had a NaN/Inf loss" in out and "step00000001" in out
    records = metrics(bad)
    assert records[0]["loss"] is not None and [r["loss"] for r in records[1:]] == [None, None, None]
    assert records[-1]["skipped_steps"] == 3
    assert [p.name for p in ckpt.complete_tags(bad / "checkpoints")] == ["step00000001"]

    assert rc[2] == 2  # a config that contradicts itself: bad usage
    assert "train.global_batch_size=6" in launches[2].output() and "world size (1) = 4" in launches[2].output()


def test_cli_rejects_bad_override_and_resume_path(tmp_path, capsys):
    assert train_main(["--config", DEMO_CONFIG, "train.mode=both"]) == 2
    err = capsys.readouterr().err
    assert "train.mode" in err and "'puzzle'" in err
    # A --resume path without a checkpoint: exit 2 naming the flag, before any process group starts.
    missing = tmp_path / "nope"
    assert train_main(["--config", DEMO_CONFIG, "--run-dir", str(tmp_path / "run"), "--resume", str(missing)]) == 2
    assert f"error: --resume {missing}: no such checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_precision_builds_the_deepspeed_dict_and_a_user_json_merges_over_it(tmp_path):
    cfg = load_config(
        DEMO_CONFIG,
        ["train.global_batch_size=8", "train.micro_batch_size=2", "train.grad_accum_steps=2", "optim.grad_clip=3.0"],
    )
    ds = deepspeed_config(cfg)
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.0  # the Trainer clips
    assert "torch_autocast" not in ds and autocast_dtype(cfg) == torch.float32
    bf16 = load_config(DEMO_CONFIG, ["train.precision=bf16"])
    assert deepspeed_config(bf16)["torch_autocast"] == {
        "enabled": True,
        "dtype": "bfloat16",
        "lower_precision_safe_modules": [],  # gradients reduced in fp32, under ZeRO too
    }
    assert autocast_dtype(bf16) == torch.bfloat16
    # A user JSON adds what the run config does not decide, and may repeat what it does.
    extra = tmp_path / "extra.json"
    extra.write_text('{"communication_data_type": "fp32", "train_batch_size": 8, "zero_optimization": {"stage": 0}}')
    merged = deepspeed_config(load_config(DEMO_CONFIG, [*cfg_overrides(cfg), f"train.deepspeed_config={extra}"]))
    assert merged["communication_data_type"] == "fp32" and merged["train_batch_size"] == 8
    cases = {
        '{"optimizer": {"type": "Adam"}}': "remove 'optimizer'",
        '{"bf16": {"enabled": true}}': r"remove 'bf16' \(set train.precision",
        '{"torch_autocast": {"enabled": true}}': r"remove 'torch_autocast' \(set train.precision",
        '{"train_batch_size": 16}': "'train_batch_size' is 16",
        '{"zero_optimization": {"stage": 2}}': "stage=2",
        "{not json": "not valid JSON",
        # Malformed JSON shapes are config errors too, not tracebacks.
        "[1, 2]": "a JSON object",
        '{"zero_optimization": 2}': "'zero_optimization' must be",
    }
    for text, message in cases.items():
        path = tmp_path / "ds.json"
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            deepspeed_config(load_config(DEMO_CONFIG, [*cfg_overrides(cfg), f"train.deepspeed_config={path}"]))
    with pytest.raises(ConfigError, match="does not exist"):
        deepspeed_config(load_config(DEMO_CONFIG, [f"train.deepspeed_config={tmp_path / 'missing.json'}"]))


def cfg_overrides(cfg) -> list[str]:
    t = cfg.train
    return [f"train.{k}={getattr(t, k)}" for k in ("global_batch_size", "micro_batch_size", "grad_accum_steps")]


def test_the_run_checks_the_global_batch_and_fp16():
    cfg = load_config(
        DEMO_CONFIG, ["train.global_batch_size=8", "train.micro_batch_size=2", "train.grad_accum_steps=2"]
    )
    validate_for_run(cfg, 2, cuda_available=False)
    with pytest.raises(ConfigError, match=r"x world size \(3\) = 12"):
        validate_for_run(cfg, 3, cuda_available=False)
    with pytest.raises(ConfigError, match="train.precision=fp16 needs a CUDA GPU"):
        validate_for_run(load_config(DEMO_CONFIG, ["train.precision=fp16"]), 1, cuda_available=False)


def test_old_configs_naming_the_shipped_deepspeed_jsons_read_as_precision(tmp_path):
    old = tmp_path / "config.yaml"
    old.write_text("train:\n  deepspeed_config: launch/configs/ds_bf16.json\n")
    cfg = load_config(old)
    assert cfg.train.precision == "bf16" and cfg.train.deepspeed_config == ""


def test_checkpoint_bookkeeping(tmp_path):
    d = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        (d / ckpt.tag_for(step)).mkdir(parents=True)
        if step != 8:  # step 8: a save that died half way
            ckpt.mark_complete(d / ckpt.tag_for(step), step)
    assert ckpt.resolve_resume("auto", d).name == "step00000006"
    assert ckpt.resolve_resume("none", d) is None
    assert ckpt.resolve_resume(str(tmp_path), d).name == "step00000006"
    with pytest.raises(UsageError, match="--resume .*incomplete"):
        ckpt.resolve_resume(str(d / "step00000008"), d)
    with pytest.raises(UsageError, match="--resume .*no such"):
        ckpt.resolve_resume(str(tmp_path / "nope"), d)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="--resume .*no complete checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "empty"), d)
    ckpt.prune(d, keep_last=2)
    # The newest incomplete tag may be a save in progress: kept; older ones go.
    assert sorted(p.name for p in d.iterdir()) == ["step00000004", "step00000006", "step00000008"]
    with pytest.raises(UsageError, match="trainer_rank001.pt is missing.*different world size"):
        ckpt.load_trainer_state(d / "step00000006", rank=1)
    # Trainer state and COMPLETE are written atomically: no temporaries left beside them.
    ckpt.save_trainer_state(d / "step00000006", 0, {"step": 6, "rng": torch.arange(3)})
    assert ckpt.load_trainer_state(d / "step00000006", 0)["step"] == 6
    assert (d / "step00000006" / ckpt.COMPLETE).read_text() == "6\n"
    assert not [p for p in d.rglob("*") if is_temporary(p)]


def test_metrics_log_truncates_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in range(1, 6):
        log.write({"step": step, "loss": float(step) if step != 3 else float("nan")})
    log.close()
    with open(path, "a") as f:
        f.write('{"step": 6, "lo')  # torn last line of a crash
    log = MetricsLog(path, resume_step=4)
    log.write({"step": 5, "loss": 50.0})
    log.close()
    rows = read_jsonl(path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[2]["loss"] is None and rows[4]["loss"] == 50.0
    assert json.loads(path.read_text().splitlines()[0]) == {"step": 1, "loss": 1.0}
    import pyarrow.parquet as pq

    assert pq.read_table(log.export_parquet()).column("step").to_pylist() == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "metrics.parquet"]


def test_step_record_is_logged_where_no_bar_is_drawn(capsys):
    # Off a terminal (logs, CI) the bar is not drawn: a logged step's record is one log line.
    setup_logging("info", rank=0)
    record = {
        "step": 7,
        "loss": 0.5,
        "loss_cls": 0.25,
        "loss_pcls": 0.125,
        "loss_re": 0.125,
        "loss_conf": 0.0,
        "alpha": 1.0,
        "lr": 0.01,
        "grad_norm": 2.0,
        "images_per_s": 12.0,
        "data_wait_pct": 3.0,
        "skipped_samples": 0,
        "skipped_steps": 1,
    }
    with ProgressBar("train", 10, enabled=False, info=True) as bar:
        assert not bar.live
        show_step(bar, 6, None, 10, 30.0)
        show_step(bar, 7, record, 10, 3725.4)
    lines = capsys.readouterr().err.splitlines()
    # As the terminal's bar: the step out of the total, images/s and the time left.
    assert lines == [
        "step 7/10 loss 0.5000 cls 0.2500 pcls 0.1250 re 0.1250 conf 0.0000 alpha 1.000 lr 1.00e-02 gnorm 2 "
        "12.0 img/s eta 1:02:05 data-wait 3% skipped 0 bad-steps 1"
    ]
    # Another task's terms (stage 2: bg, fg, neg; no alpha), in the record's order.
    affinity = {k: v for k, v in record.items() if not k.startswith(("loss_", "alpha"))}
    affinity.update(loss_bg=0.5, loss_fg=0.25, loss_neg=0.125)
    with ProgressBar("train", 10, enabled=False, info=True) as bar:
        show_step(bar, 7, affinity, 10, 5.0)
    assert capsys.readouterr().err.splitlines() == [
        "step 7/10 loss 0.5000 bg 0.5000 fg 0.2500 neg 0.1250 lr 1.00e-02 gnorm 2 "
        "12.0 img/s eta 0:00:05 data-wait 3% skipped 0 bad-steps 1"
    ]


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_gpu_mixed_precision_run(shards, tmp_path, precision):
    # One process on the GPU: autocast precision from train.precision, fp32 weights and norms,
    # channels_last, fused ops; the exported weights are fp32 and the losses finite. The evaluation runs
    # under the same autocast, its sums all-reduced on the device.
    run = tmp_path / "gpu"
    over = tiny_overrides(
        shards,
        **{
            "train.precision": precision,
            "train.channels_last": True,
            "model.norm": "train",
            "data.crop_size": 64,
            "data.max_long_side": 64,
            "data.eval_shards": f"{shards}/trainval-*.tar",
            "train.eval_every": 2,
        },
    )
    run_all([python_launch(run, over, tmp_path / "gpu.log")])
    assert all(r["loss"] is not None and r["loss"] > 0 for r in metrics(run))
    assert [r["step"] for r in metrics(run) if "eval_miou" in r] == [2, 4] and (
        run / "model_best.safetensors"
    ).is_file()
    assert all(v.dtype == torch.float32 for v in weights(run).values() if v.is_floating_point())


@pytest.mark.parametrize(
    "name",
    [
        "voc_resnet50_puzzle",
        "voc_resnet50_baseline",
        "demo_cpu",
        "coco_resnet50_puzzle",
        "coco_resnet50_affinity",
        "coco_resnet50_deeplab",
    ],
)
def test_shipped_configs_are_consistent(name):
    cfg = load_config(ROOT / "launch" / "configs" / f"{name}.yaml")
    validate_for_run(cfg, 1, cuda_available=True)
    assert deepspeed_config(cfg)["train_batch_size"] == cfg.train.global_batch_size
    if name.startswith("coco"):  # the VOC recipe with COCO's classes and another length (each header says why)
        voc = load_config(ROOT / "launch" / "configs" / f"{name.replace('coco', 'voc')}.yaml")
        assert cfg.task == voc.task and cfg.optim == voc.optim and cfg.puzzle == voc.puzzle
        assert cfg.train.global_batch_size == voc.train.global_batch_size
        assert (
            cfg.model.num_classes
            == {"classification": 80, "affinity": voc.model.num_classes, "segmentation": 81}[cfg.task]
        )
        assert "coco" in cfg.data.train_shards and cfg.train.epochs < voc.train.epochs
    if name.startswith("voc"):
        assert cfg.train.global_batch_size == 32 and cfg.train.epochs == 15 and cfg.optim.lr == 0.1
        assert cfg.train.mode == name.rsplit("_", 1)[1]
        # The 4-GPU command line in the config's header gives the same global batch.
        four = load_config(
            ROOT / "launch" / "configs" / f"{name}.yaml", ["train.micro_batch_size=8", "train.grad_accum_steps=1"]
        )
        validate_for_run(four, 4, cuda_available=True)
        assert deepspeed_config(four)["train_batch_size"] == 32

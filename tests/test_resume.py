"""What a resume reads and compares (docs/training.md, "Checkpoints and resume"): no checkpoint file can
run code, a config that changes the run's meaning is refused (naming each key with both values),
allowed changes are reported, ``--resume-force`` is recorded, and a refused resume changes nothing in
the run directory. ``--resume none`` moves the whole old run aside.

Real runs of ``launch/train.py`` (CPU, fp32, real DeepSpeed, real shards) are marked slow.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections import OrderedDict
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
    summary,
    tiny_overrides,
    tiny_shards,
)

from puzzlecam import checkpoint as ckpt
from puzzlecam.config import load_config
from puzzlecam.errors import UsageError
from puzzlecam.resume import compare_configs
from puzzlecam.tasks.classification import alpha_for
from puzzlecam.train import poly_lr_factor

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")


class _Payload:
    """Unpickling this creates ``marker``: what a checkpoint planted with code would do when read."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return tiny_shards(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def finished(shards, tmp_path_factory) -> Path:
    """A finished 4-step run (checkpoints of steps 2 and 4); tests work on copies of it."""
    return finished_run(tmp_path_factory.mktemp("finished") / "run", tiny_overrides(shards))


def copy_run(run: Path, where: Path) -> Path:
    shutil.copytree(run, where)
    return where


def plant_payload(path: Path, marker: Path) -> None:
    """Add a pickled payload to one of a run's own checkpoint files (trusted here: we wrote it)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    state["note"] = _Payload(marker)
    torch.save(state, path)


@pytest.mark.slow
@needs_deepspeed
def test_a_pickled_payload_in_a_checkpoint_never_runs(finished, shards, tmp_path):
    # DeepSpeed's model-state file and the trainer's own state file, each planted in its own copy.
    cases = []
    for name in ("mp_rank_00_model_states.pt", "trainer_rank000.pt"):
        run = copy_run(finished, tmp_path / name.split(".")[0])
        planted = run / "checkpoints" / "step00000004" / name
        marker = tmp_path / f"{name}.ran"
        plant_payload(planted, marker)
        cases.append((run, planted, marker, run_files(run)))
    over = tiny_overrides(shards, **{"train.max_steps": 6})
    launches = [python_launch(run, over, tmp_path / f"{run.name}.log") for run, *_ in cases]
    codes = run_all(launches, expect_ok=False)
    for (run, planted, marker, before), launch, rc in zip(cases, launches, codes, strict=True):
        out = launch.output()
        assert not marker.exists(), f"the payload in {planted.name} ran"
        assert rc == 2, out[-4000:]
        (line,) = error_lines(out)
        assert str(planted) in line and "Traceback" not in out
        assert run_files(run) == before


def test_checkpoint_files_load_only_plain_data(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "state.pt"
    torch.save({"step": 3, "weights": torch.ones(2), "note": _Payload(marker)}, path)
    with pytest.raises(UsageError, match=f"{path}.*refusing") as info:
        ckpt.safe_load(path)
    assert "\n" not in str(info.value) and not marker.exists()
    with pytest.raises(UsageError, match=f"{path}.*refusing"):
        ckpt.check_files(tmp_path)
    (tmp_path / "torn.pt").write_bytes(b"PK\x03\x04 not a whole file")
    path.unlink()
    with pytest.raises(UsageError, match="torn.pt"):
        ckpt.check_files(tmp_path)


@needs_deepspeed
def test_deepspeed_zero_optimizer_states_load_safely(tmp_path):
    # What DeepSpeed's ZeRO 1/2 optimizer files hold besides tensors and plain values: they load with
    # the safe loader (the allow-list), anything else does not.
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    state = {
        "optimizer_state_dict": {
            "loss_scaler": LossScaler(1.0),
            "zero_stage": ZeroStageEnum.gradients,
            "param_slice_mappings": [OrderedDict(w=fragment_address(numel=4, start=0))],
            "single_partition_of_fp32_groups": [torch.zeros(4)],
        }
    }
    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save(state, path)
    ckpt.check_files(tmp_path)
    loaded = ckpt.safe_load(path)["optimizer_state_dict"]
    assert loaded["loss_scaler"].cur_scale == 1.0 and loaded["zero_stage"] == ZeroStageEnum.gradients
    assert loaded["param_slice_mappings"][0]["w"] == fragment_address(numel=4, start=0)


@pytest.mark.slow
@needs_deepspeed
def test_a_refused_resume_changes_nothing(finished, shards, tmp_path):
    width = copy_run(finished, tmp_path / "width")
    meaning = copy_run(finished, tmp_path / "meaning")
    before = run_files(finished)
    launches = [
        python_launch(width, tiny_overrides(shards, **{"model.width": 16}), tmp_path / "width.log"),
        python_launch(
            meaning,
            tiny_overrides(
                shards, **{"train.mode": "baseline", "optim.lr": 0.05, "data.crop_size": 48, "train.max_steps": 6}
            ),
            tmp_path / "meaning.log",
        ),
    ]
    assert run_all(launches, expect_ok=False) == [2, 2], [launch.output()[-3000:] for launch in launches]
    (line,) = error_lines(launches[0].output())
    assert "model.width (checkpoint 8, now 16)" in line and "--resume-force" in line
    (line,) = error_lines(launches[1].output())
    for change in ("train.mode (checkpoint 'puzzle', now 'baseline')", "optim.lr (checkpoint 0.1, now 0.05)"):
        assert change in line
    assert "data.crop_size (checkpoint 32, now 48)" in line and "train.max_steps" not in line
    for run in (width, meaning):
        assert run_files(run) == before


@pytest.mark.slow
@needs_deepspeed
def test_allowed_changes_are_reported_and_forced_ones_recorded(finished, shards, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    extend = python_launch(
        run,
        tiny_overrides(shards, **{"train.max_steps": 6, "train.log_every": 2, "data.num_workers": 1}),
        tmp_path / "extend.log",
    )
    run_all([extend])
    out = extend.output()
    assert "resumed from" in out and "step00000004" in out
    assert "train.max_steps (checkpoint 4, now 6)" in out and "data.num_workers (checkpoint 0, now 1)" in out
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 6]

    forced = python_launch(
        run,
        ["--resume-force", *tiny_overrides(shards, **{"train.max_steps": 8, "optim.lr": 0.05})],
        tmp_path / "forced.log",
    )
    run_all([forced])
    assert "--resume-force" in forced.output() and "optim.lr (checkpoint 0.1, now 0.05)" in forced.output()
    first, second = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert first["from"].endswith("step00000004") and first["step"] == 4 and first["forced"] == {}
    assert first["allowed"]["train.max_steps"] == [4, 6] and first["allowed"]["data.num_workers"] == [0, 1]
    assert second["from"].endswith("step00000006") and second["forced"] == {"optim.lr": [0.1, 0.05]}
    assert summary(run)["resumes"] == [first, second]
    assert load_config(run / "config.yaml").optim.lr == 0.05


@pytest.mark.slow
@needs_deepspeed
def test_a_finished_run_extended_continues_from_its_last_checkpoint(finished, shards, tmp_path):
    # The finished run: 4 steps (train.max_steps), weights exported. --resume auto with 2 epochs of 6 steps
    # continues from its step-4 checkpoint to step 12; the schedules follow the new total.
    run = copy_run(finished, tmp_path / "run")
    longer = tiny_overrides(shards, **{"train.max_steps": 0, "train.epochs": 2})
    extend = python_launch(run, longer, tmp_path / "extend.log")
    run_all([extend])
    assert "resumed from" in extend.output() and "step00000004" in extend.output()
    records = metrics(run)
    assert [r["step"] for r in records] == list(range(1, 13)) and records[:4] == metrics(finished)
    cfg = load_config(run / "config.yaml")
    assert records[4]["lr"] == pytest.approx(cfg.optim.lr * poly_lr_factor(4, 12, cfg.optim.poly_power))
    assert records[4]["alpha"] == pytest.approx(alpha_for(4, 12, cfg)) and records[3]["alpha"] == alpha_for(3, 4, cfg)
    from safetensors import safe_open

    with safe_open(run / "model.safetensors", "pt") as f:
        assert f.metadata()["step"] == "12"
    assert summary(run)["steps"] == 12
    (resume,) = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert resume["step"] == 4 and resume["allowed"]["train.max_steps"] == [4, 0]

    # Fewer steps than the newest checkpoint's: refused, nothing changed.
    before = run_files(run)
    shorter = python_launch(run, tiny_overrides(shards, **{"train.max_steps": 10}), tmp_path / "shorter.log")
    assert run_all([shorter], expect_ok=False) == [2]
    (line,) = error_lines(shorter.output())
    assert "give 10 steps" in line and "step00000012 is at step 12" in line
    assert run_files(run) == before


@pytest.mark.slow
@needs_deepspeed
def test_resume_none_moves_the_old_run_aside(finished, shards, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    before = run_files(run)
    fresh = python_launch(
        run,
        ["--resume", "none", *tiny_overrides(shards, **{"train.max_steps": 2, "model.width": 16})],
        tmp_path / "fresh.log",
    )
    run_all([fresh])
    (aside,) = run.glob("checkpoints.replaced-*")
    assert [p.name for p in ckpt.complete_tags(aside)] == ["step00000002", "step00000004"]
    # The old weights with the config that describes them, its metrics and summary: together, unchanged.
    for name in ("config.yaml", "model.safetensors", "metrics.jsonl", "metrics.parquet", "summary.json"):
        assert (aside / name).read_bytes() == before[name], name
    assert summary(run)["steps"] == 2 and load_config(run / "config.yaml").model.width == 16
    assert [r["step"] for r in metrics(run)] == [1, 2]


def test_resume_compares_the_keys_that_change_the_run():
    saved = load_config(DEMO_CONFIG, ["train.max_steps=4"]).to_dict()
    now = load_config(
        DEMO_CONFIG,
        [
            "train.max_steps=6",
            "train.log_every=1",
            "data.num_workers=3",
            "data.train_shards=moved/train-*.tar",
            "optim.lr=0.05",
            "train.mode=baseline",
            "data.crop_size=64",
        ],
    )
    check = compare_configs(saved, now, saved_world_size=1, world_size=1)
    assert [str(c) for c in check.refused] == [
        "data.crop_size (checkpoint 96, now 64)",
        "optim.lr (checkpoint 0.1, now 0.05)",
        "train.mode (checkpoint 'puzzle', now 'baseline')",
    ]
    assert [c.key for c in check.allowed] == [
        "data.train_shards",
        "data.num_workers",
        "train.max_steps",
        "train.log_every",
    ]
    # The batch layout may change with the world size when the global batch stays; not otherwise.
    layout = ["train.micro_batch_size=8", "train.grad_accum_steps=2"]
    check = compare_configs(saved, load_config(DEMO_CONFIG, ["train.max_steps=4", *layout]), 1, 1)
    assert [c.key for c in check.refused] == ["train.micro_batch_size", "train.grad_accum_steps"]
    check = compare_configs(saved, load_config(DEMO_CONFIG, ["train.max_steps=4", "train.micro_batch_size=8"]), 1, 2)
    assert not check.refused and [c.key for c in check.allowed] == ["train.micro_batch_size"]
    assert not compare_configs(saved, load_config(DEMO_CONFIG, ["train.max_steps=4"]), 1, 1).allowed
    # A key the checkpoint's config predates counts as its default.
    older = {k: v for k, v in saved.items()}
    older["data"] = {k: v for k, v in saved["data"].items() if k != "max_corrupt_fraction"}
    assert not compare_configs(older, load_config(DEMO_CONFIG, ["train.max_steps=4"]), 1, 1).refused


def test_a_checkpoint_written_before_a_rename_compares_by_meaning():
    # Checkpoints of earlier versions hold puzzle.masking (now puzzle.re_reduction) and train.epoch_size (gone).
    now = load_config(DEMO_CONFIG, ["puzzle.re_reduction=none"])
    saved = now.to_dict()
    del saved["puzzle"]["re_reduction"]
    saved["puzzle"]["masking"] = False
    saved["train"]["epoch_size"] = 10
    check = compare_configs(saved, now, saved_world_size=1, world_size=1)
    assert check.refused == [] and check.allowed == []
    saved["puzzle"]["masking"] = True
    assert [str(c) for c in compare_configs(saved, now, 1, 1).refused] == [
        "puzzle.re_reduction (checkpoint 'masking', now 'none')"
    ]

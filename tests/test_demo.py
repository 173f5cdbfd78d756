"""Guard of the main job: `make demo`'s pipeline at a tiny size, through the real deepspeed launcher.

synthetic data -> shards -> baseline and Puzzle-CAM training (2 CPU processes) -> multi-scale CAMs ->
threshold-sweep evaluation -> overlays -> the comparison table; then a rerun reuses every stage, and
changed options rerun the stages they reach. The pipeline run is slow (`make test-fast` leaves it
out); the flag checks and the stage record's rules are quick.
"""

import json
import re
import subprocess
import sys

import pytest
import yaml

from puzzlecam import demo
from puzzlecam.errors import StageError
from puzzlecam.stages import Stage, Stages

STAGES = [
    "synth",
    "shard_train",
    "shard_val",
    *(f"{stage}_{mode}" for mode in demo.MODES for stage in ("train", "infer", "eval", "viz")),
    # stage 2 on the Puzzle-CAM run
    *("infer_train_puzzle", "affinity_labels", "label_shards", "train_affinity", "rw", "eval_rw", "viz_rw"),
]


def _said(text: str) -> dict[str, str]:
    """Stage -> "ran" | "reused", from the demo's "ran: STAGE ..." / "reused: STAGE ..." lines."""
    return {m[2]: m[1] for m in re.finditer(r"^(ran|reused): (\w+)", text, re.MULTILINE)}


def _table_row(text: str, mode: str) -> list[str]:
    (line,) = [line for line in text.splitlines() if re.match(rf"^[│|]\s*{re.escape(mode)}\s*[│|]", line)]
    return [cell.strip() for cell in re.split(r"[│|]", line) if cell.strip()]


@pytest.mark.slow
def test_demo_pipeline_tiny(tmp_path, capsys):
    out = tmp_path / "demo"
    args = [
        "--out",
        str(out),
        "--num-images",
        "24",
        "--size",
        "64",
        "--pictures",
        "2",
        "--set",
        "train.max_steps=2",
        "--set",
        "data.crop_size=64",
        "--set",
        "infer.scales=[1.0, 0.5]",
        "--affinity-set",
        "train.max_steps=2",
    ]
    assert demo.main(args) == 0
    text = capsys.readouterr().out
    assert "Puzzle-CAM - baseline" in text and "random walk - Puzzle-CAM" in text
    affinity = out / "runs" / "affinity"
    rw_summary = json.loads((affinity / "rw_eval" / "summary.json").read_text())
    assert rw_summary["thresholds"][0] == 0.05 and rw_summary["thresholds"][-1] == 0.5  # the rw sweep
    assert _table_row(text, "random walk")[2:4] == [
        f"{rw_summary['best_threshold']:.2f}",
        f"{100 * rw_summary['best_miou']:.1f}",
    ]
    # The AffinityNet's frozen backbone is the Puzzle-CAM classifier's (no ImageNet file in the demo).
    assert yaml.safe_load((affinity / "config.yaml").read_text())["model"]["pretrained"].endswith(
        "runs/puzzle/model.safetensors"
    )
    assert (affinity / "viz" / "grid.png").is_file() and any((out / "shards_affinity").glob("train-*.tar"))
    for mode in demo.MODES:
        run = out / "runs" / mode
        summary = json.loads((run / "eval" / "summary.json").read_text())
        assert summary["num_images"] == len(
            (out / "voc" / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
        )
        assert 0.0 <= summary["best_miou"] <= 1.0
        assert (run / "model.safetensors").is_file() and (run / "viz" / "grid.png").is_file()
        assert f"train.mode={mode}" in (out / "logs" / f"train_{mode}.log").read_text()
        ranks = json.loads((run / "summary.json").read_text())["world_size"]
        assert ranks == 2
    assert _said(text) == dict.fromkeys(STAGES, "ran")
    # A rerun reuses every stage and says so: no stage header is printed again, the table is.
    stamp = (out / "runs" / "puzzle" / "model.safetensors").stat().st_mtime_ns
    assert demo.main(args) == 0
    text = capsys.readouterr().out
    assert "$ " not in text and "Puzzle-CAM - baseline" in text
    assert _said(text) == dict.fromkeys(STAGES, "reused")
    assert (out / "runs" / "puzzle" / "model.safetensors").stat().st_mtime_ns == stamp
    # Another picture count reaches only the overlays.
    assert demo.main([*args, "--pictures", "1"]) == 0
    said = _said(capsys.readouterr().out)
    assert said == {s: "ran" if s.startswith("viz_") else "reused" for s in STAGES}
    # Another seed and image count: the data and everything after it run again, and the table is the new run's.
    assert demo.main([*args, "--seed", "3", "--num-images", "28"]) == 0
    text = capsys.readouterr().out
    assert _said(text) == dict.fromkeys(STAGES, "ran")
    assert (out / "runs" / "puzzle" / "model.safetensors").stat().st_mtime_ns != stamp
    val_ids = (out / "voc" / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    assert len(val_ids) == 7
    for mode in demo.MODES:
        run = out / "runs" / mode
        assert yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"] == 3
        summary = json.loads((run / "eval" / "summary.json").read_text())
        assert summary["num_images"] == 7
        assert _table_row(text, mode)[1:4] == [
            "7",
            f"{summary['best_threshold']:.2f}",
            f"{100 * summary['best_miou']:.1f}",
        ]


def _append(path, text: str) -> list[str]:
    """A stage command that appends ``text`` to ``path`` (and fails when $FAIL is set, after appending)."""
    code = (
        f"import os, sys; f = open({str(path)!r}, 'a'); f.write({text!r}); f.close(); sys.exit(bool(os.getenv('FAIL')))"
    )
    return [sys.executable, "-c", code]


def test_a_stage_is_reused_only_with_the_same_settings_and_inputs(tmp_path, capsys):
    data, result = tmp_path / "data.txt", tmp_path / "result.txt"

    def pipeline(data_text: str, result_text: str, env=None) -> dict[str, str]:
        stages = Stages(tmp_path)  # each invocation reads the record afresh
        stages.run(Stage("data", "make data", _append(data, data_text), outputs=[data], complete=data.exists))
        stages.run(
            Stage(
                "result",
                "use it",
                _append(result, result_text),
                inputs=["data"],
                outputs=[result],
                complete=result.exists,
                env=env,
            )
        )
        return _said(capsys.readouterr().out)

    assert pipeline("x", "y") == {"data": "ran", "result": "ran"}
    assert pipeline("x", "y") == {"data": "reused", "result": "reused"}
    assert (data.read_text(), result.read_text()) == ("x", "y")
    # New data settings: the data stage and the one using it run again from scratch (old output removed first).
    assert pipeline("z", "y") == {"data": "ran", "result": "ran"}
    assert (data.read_text(), result.read_text()) == ("z", "y")
    assert pipeline("z", "w") == {"data": "reused", "result": "ran"}
    assert result.read_text() == "w"
    # A stage that failed with unchanged settings resumes on its output (training resumes from its checkpoint).
    with pytest.raises(StageError, match="stage 'use it' failed with exit code 1"):
        pipeline("z", "v", env={"FAIL": "1"})
    capsys.readouterr()
    assert pipeline("z", "v") == {"data": "reused", "result": "ran"}
    assert result.read_text() == "vv"
    # An output with no record of its settings (an older demo, a damaged record) is not trusted.
    (tmp_path / "stages.json").write_text("{not json")
    assert pipeline("z", "v") == {"data": "ran", "result": "ran"}
    assert (data.read_text(), result.read_text()) == ("z", "v")


def test_demo_help_and_bad_procs(tmp_path, capsys):
    help_text = subprocess.run(
        [sys.executable, "-m", "puzzlecam.demo", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in ("--out", "--num-images", "--launcher", "--procs", "--set", "--fresh"):
        assert flag in help_text
    # 8 images per step cannot be split over 3 processes: a usage error naming --procs before anything runs.
    rc = demo.main(
        [
            "--out",
            str(tmp_path / "d"),
            "--num-images",
            "8",
            "--size",
            "48",
            "--procs",
            "3",
            "--set",
            "train.global_batch_size=8",
        ]
    )
    assert rc == 2
    assert "--procs 3" in capsys.readouterr().err and not (tmp_path / "d").exists()
    assert demo.main(["--out", str(tmp_path / "d"), "--procs", "0"]) == 2
    assert "--procs must be at least 1" in capsys.readouterr().err

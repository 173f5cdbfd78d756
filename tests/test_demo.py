"""Guard of the main job: `make demo` at a tiny size, through the real deepspeed launcher.

synthetic data -> shards -> the pipeline for Puzzle-CAM (classifier, CAMs, AffinityNet, random walk,
DeepLabv3+, each evaluated; 2 CPU processes) and stage 1 for the baseline -> overlays -> the table; then a
rerun reuses every stage, and a changed option reruns the stages it reaches. The run is slow (`make
test-fast` leaves it out); the flag checks are quick.
"""

import json
import re
import subprocess
import sys

import pytest
import torch
import yaml

from puzzlecam import demo
from tests.test_pipeline import STAGES as PIPELINE
from tests.test_stages import _said

# The test's run: the whole pipeline for Puzzle-CAM, stage 1 for the baseline (--baseline-until cams).
STAGES = [
    "synth",
    "shard_train",
    "shard_val",
    *("pretrain/synth", "pretrain/shard", "pretrain/train", "pretrain/export"),
    *(f"baseline/{k}" for k in PIPELINE[: PIPELINE.index("eval_cams") + 1]),
    "baseline/viz",
    *(f"puzzle/{k}" for k in PIPELINE),
    "puzzle/viz",
]


def _table_row(text: str, mode: str) -> list[str]:
    (line,) = [line for line in text.splitlines() if re.match(rf"^[│|]\s*{re.escape(mode)}\s*[│|]", line)]
    return [cell.strip() for cell in re.split(r"[│|]", line) if cell.strip()]


@pytest.mark.slow
def test_demo_pipeline_tiny(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["--out", str(out), "--num-images", "24", "--size", "64", "--pictures", "2", "--baseline-until", "cams"]
    args += ["--pretrain-images", "16"]  # the default --pretrain on a tiny pretraining set (15 steps)
    args += ["--set", "train.max_steps=2", "--set", "data.crop_size=64", "--set", "infer.scales=[1.0, 0.5]"]
    args += ["--affinity-set", "train.max_steps=2", "--segmentation-set", "train.max_steps=2"]
    assert demo.main(args) == 0
    text = capsys.readouterr().out
    assert _said(text) == dict.fromkeys(STAGES, "ran")
    assert "CAM: Puzzle-CAM - baseline" in text and "puzzle: CAM " in text and " -> DeepLabv3+ " in text
    val_ids = (out / "voc" / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    puzzle = out / "runs" / "puzzle"
    cells = _table_row(text, "puzzle")
    for column, summary in enumerate(["classifier/cam_eval", "affinity/rw_eval", "segmentation/seg_eval"], start=1):
        s = json.loads((puzzle / summary / "summary.json").read_text())
        assert s["num_images"] == len(val_ids) and 0.0 <= s.get("best_miou", s.get("miou")) <= 1.0
        assert cells[column].startswith(f"{100 * s.get('best_miou', s.get('miou')):.1f}")
    assert _table_row(text, "baseline")[2:4] == ["-", "-"]  # the baseline stopped after stage 1
    rw = json.loads((puzzle / "affinity" / "rw_eval" / "summary.json").read_text())
    assert rw["thresholds"][0] == 0.05 and rw["thresholds"][-1] == 0.5  # the random walk's sweep
    # Every stage starts from the pretrained backbone, a torchvision-format file (the recipe's ImageNet file).
    backbone = out / "pretrain" / "backbone.pth"
    assert "conv1.weight" in torch.load(backbone, weights_only=True)
    for stage in ("classifier", "affinity", "segmentation"):
        config = yaml.safe_load((puzzle / stage / "config.yaml").read_text())
        assert config["model"]["pretrained"] == str(backbone)
    assert (puzzle / "viz" / "grid.png").is_file() and any((puzzle / "segmentation" / "seg_eval_png").glob("*.png"))
    for mode in demo.MODES:
        run = out / "runs" / mode / "classifier"
        assert f"train.mode={mode}" in (out / "logs" / mode / "train_classifier.log").read_text()
        assert json.loads((run / "summary.json").read_text())["world_size"] == 2
    # A rerun reuses every stage and says so: no stage header is printed again, the table is.
    stamp = (puzzle / "classifier" / "model.safetensors").stat().st_mtime_ns
    assert demo.main(args) == 0
    text = capsys.readouterr().out
    assert "$ " not in text and "CAM: Puzzle-CAM - baseline" in text
    assert _said(text) == dict.fromkeys(STAGES, "reused")
    assert (puzzle / "classifier" / "model.safetensors").stat().st_mtime_ns == stamp
    # Another picture count reaches only the overlays.
    assert demo.main([*args, "--pictures", "1"]) == 0
    said = _said(capsys.readouterr().out)
    assert said == {s: "ran" if s.endswith("/viz") else "reused" for s in STAGES}


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

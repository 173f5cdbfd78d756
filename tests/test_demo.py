"""Guard of the main job: `make demo`'s pipeline at a tiny size, through the real deepspeed launcher.

synthetic data -> shards -> baseline and Puzzle-CAM training (2 CPU processes) -> multi-scale CAMs ->
threshold-sweep evaluation -> overlays -> the comparison table; then a rerun reuses every stage.
The pipeline run is slow (`make test-fast` leaves it out); the flag checks are quick.
"""

import json
import subprocess
import sys

import pytest

from puzzlecam import demo


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
    ]
    assert demo.main(args) == 0
    text = capsys.readouterr().out
    assert "Puzzle-CAM - baseline" in text
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
    # A rerun reuses every stage: no stage header is printed again, the table is.
    stamp = (out / "runs" / "puzzle" / "model.safetensors").stat().st_mtime_ns
    assert demo.main(args) == 0
    text = capsys.readouterr().out
    assert "$ " not in text and "Puzzle-CAM - baseline" in text
    assert (out / "runs" / "puzzle" / "model.safetensors").stat().st_mtime_ns == stamp


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

"""`python -m puzzlecam.bench train` runs its three modes on the same step and reports figures."""

import json

import pytest
import torch

from puzzlecam.bench.train import main


def _run(tmp_path, *extra):
    out = tmp_path / "bench.json"
    rc = main(
        [
            "--steps",
            "1",
            "--warmup",
            "1",
            "--width",
            "8",
            "--image-size",
            "64",
            "--batch-size",
            "2",
            "--json",
            str(out),
            *extra,
        ]
    )
    assert rc == 0
    return json.loads(out.read_text())


def test_bench_train_cpu_reports_every_mode(tmp_path):
    res = _run(tmp_path, "--device", "cpu")
    modes = {r["mode"]: r for r in res["results"]}
    assert set(modes) == {"reference", "plain", "fast"}
    assert [modes[m]["ops_backend"] for m in ("reference", "plain", "fast")] == ["reference", "reference", "auto"]
    assert not any(r["compile"] or r["cuda_graphs"] for r in modes.values())  # CPU default: eager
    for r in modes.values():
        assert r["images_per_s"] > 0 and r["step_ms"] > 0 and torch.isfinite(torch.tensor(r["final_loss"]))
        assert r["mfu"] is None and r["tflops"] > 0  # no known peak on CPU; the FLOPs are counted
    # The step's FLOPs: two passes (images and tiles) of a width-8 ResNet-18 at 64 px, forward and backward.
    assert 0.05 < res["step_gflop"] < 5


def test_bench_train_rejects_bad_arguments(capsys):
    assert main(["--modes", "slow"]) == 2
    assert main(["--image-size", "100", "--device", "cpu"]) == 2
    assert main(["--device", "tpu"]) == 2
    err = capsys.readouterr().err
    assert "error: --modes" in err and "error: --image-size" in err and "error: --device 'tpu'" in err


def test_bench_train_refuses_a_model_it_cannot_build_before_timing(capsys):
    assert main(["--device", "cpu", "--arch", "resnet7"]) == 2
    assert main(["--device", "cpu", "--width", "0"]) == 2
    assert main(["--device", "cpu", "--batch-size", "0"]) == 2
    assert main(["--device", "cpu", "--image-size", "0"]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # refused before the first step
    assert "error: --arch 'resnet7': model.arch must be one of resnet18" in err
    assert "error: --width 0: " in err and "error: --batch-size must be at least 1, got 0" in err
    assert "error: --image-size must be a positive multiple of 32" in err
    assert "Traceback" not in err


def test_bench_train_resnest101_on_cpu(tmp_path, capsys):
    res = _run(tmp_path, "--device", "cpu", "--arch", "resnest101")
    assert res["arch"] == "resnest101" and res["width"] == 8 and res["params"] > 0
    assert {r["mode"] for r in res["results"]} == {"reference", "plain", "fast"}
    assert all(r["peak_mib"] > 0 for r in res["results"])
    # One image per step: split attention's batch norm on a pooled (1, C, 1, 1) input cannot train.
    assert main(["--device", "cpu", "--arch", "resnest101", "--width", "8", "--batch-size", "1"]) == 2
    assert "error: --batch-size 1: resnest101 cannot train on it (" in capsys.readouterr().err


@pytest.mark.gpu
def test_bench_train_gpu_fast_mode_is_bf16_channels_last(tmp_path):
    res = _run(tmp_path, "--device", "cuda", "--arch", "resnet50")
    by = {r["mode"]: r for r in res["results"]}
    fast, plain = by["fast"], by["plain"]
    assert fast["dtype"] == "bfloat16" and fast["channels_last"] and fast["peak_mib"] > 0
    assert fast["compile"] and fast["cuda_graphs"] and plain["compile"] and not plain["cuda_graphs"]
    assert plain["ops_backend"] == "reference" and fast["ops_backend"] == "auto"
    assert 0 < fast["mfu"] < 1 and 0 < by["reference"]["mfu"] < 1  # an H100 / H200 / A100 has a known peak


def test_bench_train_segmentation_step_on_cpu(tmp_path, capsys):
    res = _run(tmp_path, "--device", "cpu", "--task", "segmentation", "--head-channels", "8")
    assert res["task"] == "segmentation" and res["head_channels"] == 8 and res["params"] > 0
    assert {r["mode"] for r in res["results"]} == {"reference", "plain", "fast"}
    for r in res["results"]:
        assert r["images_per_s"] > 0 and 0 < r["final_loss"] < 10  # cross entropy of 21 classes: ~log 21 at first
    assert "DeepLabv3+ (head 8) train step: resnet18 width 8" in capsys.readouterr().out
    assert main(["--device", "cpu", "--task", "segmentation", "--head-channels", "30"]) == 2
    assert "error: --head-channels 30: segmentation.head_channels must be a multiple of 4" in capsys.readouterr().err

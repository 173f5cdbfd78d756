"""`python -m puzzlecam.bench train` runs both modes on the same step and reports figures."""

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


def test_bench_train_cpu_reports_both_modes(tmp_path):
    res = _run(tmp_path, "--device", "cpu")
    modes = {r["mode"]: r for r in res["results"]}
    assert set(modes) == {"reference", "fast"}
    assert modes["reference"]["ops_backend"] == "reference" and modes["fast"]["ops_backend"] == "auto"
    for r in modes.values():
        assert r["images_per_s"] > 0 and r["step_ms"] > 0 and torch.isfinite(torch.tensor(r["final_loss"]))


def test_bench_train_rejects_bad_arguments(capsys):
    assert main(["--modes", "slow"]) == 2
    assert main(["--image-size", "100", "--device", "cpu"]) == 2
    assert main(["--device", "tpu"]) == 2
    err = capsys.readouterr().err
    assert "error: --modes" in err and "error: --image-size" in err and "error: --device 'tpu'" in err


@pytest.mark.gpu
def test_bench_train_gpu_fast_mode_is_bf16_channels_last(tmp_path):
    res = _run(tmp_path, "--device", "cuda", "--arch", "resnet50")
    fast = next(r for r in res["results"] if r["mode"] == "fast")
    assert fast["dtype"] == "bfloat16" and fast["channels_last"] and fast["peak_mib"] > 0

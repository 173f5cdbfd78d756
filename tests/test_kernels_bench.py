"""`python -m puzzlecam.bench kernels` runs on CPU, checks every backend and writes its JSON; the
`python -m puzzlecam.bench` dispatcher hands a subcommand its own flags."""

from __future__ import annotations

import json

import pytest
import torch

from puzzlecam.bench import kernels as bench
from puzzlecam.bench.__main__ import main as bench_main


def test_bench_kernels_cpu_smoke(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    rc = bench.main(
        [
            "--device",
            "cpu",
            "--ops",
            "re_loss_cam,merge,multiscale_cam",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--no-compile",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    payload = json.loads(out.read_text())
    assert payload["device_type"] == "cpu" and payload["versions"]["torch"] and payload["date"]
    assert payload["copy_bandwidth_gbps"] > 0
    rows = {(r["op"], r["backend"]): r for r in payload["results"]}
    assert {op for op, _ in rows} == {"re_loss_cam", "merge", "multiscale_cam"}
    for (op, backend), r in rows.items():
        assert r["check"] == "ok", (op, backend, r["note"])
        assert r["fwd_ms"] > 0 and r["gbps"] > 0
        assert (r["fwd_bwd_ms"] is not None) == (op != "multiscale_cam")
        if backend == "eager":
            assert r["speedup"] == 1.0
    assert "benchmarking the CPU backends only" in capsys.readouterr().err


def test_bench_kernels_rejects_unknown_op(capsys):
    assert bench.main(["--ops", "softmax"]) == 2
    assert "error: --ops: unknown op 'softmax'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert bench.main(["--device", "cuda"]) == 2
        assert "error: --device cuda: CUDA is not available" in capsys.readouterr().err


def test_bench_dispatch(capsys):
    with pytest.raises(SystemExit) as exc:
        bench_main(["kernels", "--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    assert "python -m puzzlecam.bench kernels" in help_text and "--ops" in help_text and "--log-level" in help_text
    assert bench_main([]) == 0 and "kernels" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        bench_main(["softmax"])
    assert exc.value.code == 2
    assert bench_main(["kernels", "--shapes", "huge"]) == 2
    assert "error: --shapes: unknown shape 'huge'" in capsys.readouterr().err

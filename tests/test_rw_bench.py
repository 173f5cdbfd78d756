"""`python -m puzzlecam.bench rw` at tiny sizes: every backend checked against the dense walk (or the float64
reference above --dense-max-pixels, with the dense cost extrapolated) and the loss against the reference."""

from __future__ import annotations

import json

import pytest

from puzzlecam import ops
from puzzlecam.bench import rw as bench
from puzzlecam.bench.__main__ import main as bench_main

TINY = ["--device", "cpu", "--sizes", "8x9,12x13", "--dense-max-pixels", "100", "--classes", "2", "--exp-times", "4"]
TINY += ["--loss-batch", "2", "--loss-size", "24", "--repeats", "1", "--warmup", "0"]


def test_bench_rw_tiny_checks_every_backend(tmp_path):
    out = tmp_path / "rw.json"
    assert bench.main([*TINY, "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["device_type"] == "cpu" and payload["versions"]["torch"] and payload["date"]
    assert payload["settings"]["exp_times"] == 4 and payload["settings"]["dense_max_pixels"] == 100
    rows = {(r["part"], r["size"], r["backend"]): r for r in payload["results"]}
    walk_backends = set(bench._backends("random_walk", "cpu"))
    assert "reference" in walk_backends
    assert {k for k in rows if k[0] == "walk"} == {
        ("walk", size, b) for size in ("8x9", "12x13") for b in walk_backends | {"dense"}
    }
    # 8x9 = 72 pixels: the dense method ran and is the oracle; 12x13 = 156 > 100: extrapolated from 8x9.
    dense, far = rows["walk", "8x9", "dense"], rows["walk", "12x13", "dense"]
    assert dense["check"] == "oracle" and not dense["extrapolated"] and dense["ms"] > 0
    assert far["check"] == "extrapolated" and far["extrapolated"] and "from 8x9" in far["note"]
    assert far["ms"] == pytest.approx(dense["ms"] * (156 / 72) ** 3)
    for (part, size, backend), r in rows.items():
        if backend == "dense":
            continue
        assert r["check"] == "ok", (part, size, backend, r["note"])
        assert r["max_rel_error"] <= (bench.WALK_TOLERANCE if part == "walk" else bench.LOSS_TOLERANCE)
        assert r["ms"] > 0 and r["peak_mib"] is not None and r["speedup"] > 0
        if part == "walk":
            assert r["against"] == ("dense" if size == "8x9" else "reference fp64")
    loss_backends = {b for b in ops.available_backends("affinity_sums", "cpu") if b != "triton"}
    assert {k for k in rows if k[0] == "loss"} == {("loss", "2x24x24", b) for b in loss_backends}
    assert rows["loss", "2x24x24", "reference"]["speedup"] == 1.0


def test_bench_rw_extrapolates_from_a_calibration_size(tmp_path):
    out = tmp_path / "rw.json"
    argv = ["--device", "cpu", "--parts", "walk", "--sizes", "12x13", "--dense-max-pixels", "64"]
    assert bench.main([*argv, "--exp-times", "2", "--repeats", "1", "--warmup", "0", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    sizes = [(r["size"], r["backend"], r["check"]) for r in rows if r["backend"] == "dense"]
    assert sizes == [("8x8", "dense", "oracle"), ("12x13", "dense", "extrapolated")]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--parts", "walk,rw"], "--parts: expected a comma-separated subset of walk,loss"),
        (["--sizes", "48"], "--sizes: expected HxW sizes like 94x125, got '48'"),
        (["--loss-size", "10"], "--loss-size must be at least 19, got 10"),
        (["--exp-times", "20"], "--exp-times must be in 0..16, got 20"),
    ],
)
def test_bench_rw_bad_flags(argv, message, capsys):
    assert bench.main(["--device", "cpu", *argv]) == 2
    assert message in capsys.readouterr().err


def test_bench_rw_dispatch_and_help(capsys):
    with pytest.raises(SystemExit) as exc:
        bench_main(["rw", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "python -m puzzlecam.bench rw" in text
    for flag in ("--sizes", "--dense-max-pixels", "--loss-batch", "--loss-size", "--parts", "--json"):
        assert flag in text

"""`python -m puzzlecam.bench segment` at a tiny size: every mode checked against the one-forward-per-pass
reference, the figures in its JSON; bad flags are usage errors naming the flag."""

from __future__ import annotations

import json

from puzzlecam.bench.__main__ import main as bench_main

TINY = ["--device", "cpu", "--arch", "resnet18", "--width", "8", "--head-channels", "8", "--low-level-channels", "4"]
TINY += ["--size", "24x31", "--scales", "0.75,1.0", "--images", "1", "--repeats", "1", "--warmup", "0"]


def test_bench_segment_tiny_checks_every_mode(tmp_path):
    out = tmp_path / "segment.json"
    modes = "batched,reference,channels_last,bf16"
    assert bench_main(["segment", *TINY, "--modes", modes, "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["device_type"] == "cpu" and payload["versions"]["torch"] and payload["date"]
    assert payload["settings"]["size"] == [24, 31] and payload["settings"]["scales"] == [0.75, 1.0]
    rows = {r["mode"]: r for r in payload["results"]}
    assert list(rows) == ["reference", "batched", "channels_last", "bf16"]  # the reference first
    assert rows["reference"]["passes_per_forward"] == 1 and rows["batched"]["passes_per_forward"] == 2
    for mode, r in rows.items():
        assert r["check"] == "ok" and r["images_per_s"] > 0 and r["peak_mib"] is not None, mode
        if mode != "reference":
            assert r["speedup"] > 0 and r["same_label"] >= 0.95
    assert rows["batched"]["max_prob_diff"] < 1e-4 and rows["batched"]["same_label"] >= 0.999


def test_bench_segment_bad_flags(capsys):
    for flag, value in [("--modes", "fast"), ("--size", "8x8"), ("--images", "0"), ("--scales", "0")]:
        assert bench_main(["segment", *TINY, flag, value]) == 2
        assert flag in capsys.readouterr().err

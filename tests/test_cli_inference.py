"""The inference-side commands (infer, evaluate, labels, viz, bench eval) as commands.

A bad flag value exits 2 with a message naming the flag, before any work; status messages go to
stderr through logging (``--log-level``), reports to stdout.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from puzzlecam import evaluate, infer, labels, viz
from puzzlecam.bench import eval as bench_eval
from puzzlecam.camstore import write_cam

COMMANDS = {"infer": infer, "evaluate": evaluate, "labels": labels, "viz": viz, "bench eval": bench_eval}


def _bad_values(tmp_path):
    """(command, argv, flag the message must name); each argv is otherwise complete."""
    cams = tmp_path / "cams"
    cams.mkdir()
    infer_base = [
        "--weights",
        str(tmp_path / "model.safetensors"),
        "--shards",
        "none.tar",
        "--out",
        str(tmp_path / "o"),
    ]
    labels_base = ["--cams", str(cams), "--threshold", "0.5", "--out", str(tmp_path / "labels")]
    viz_base = ["--cams", str(cams), "--shards", "none.tar", "--out", str(tmp_path / "viz")]
    return [
        ("infer", infer_base + ["--device", "tpu"], "--device"),
        ("infer", infer_base + ["--device", "mps"], "--device"),
        ("infer", infer_base + ["--batch-size", "0"], "--batch-size"),
        ("infer", infer_base + ["--num-workers", "-1"], "--num-workers"),
        ("infer", infer_base, "--weights"),
        ("evaluate", ["--shards", "none.tar"], "--cams"),
        ("evaluate", ["--cams", str(cams), "--shards", "none.tar", "--thresholds", "0.5:0.1:0.1"], "--thresholds"),
        ("evaluate", ["--cams", str(cams), "--shards", "none.tar", "--num-workers", "-1"], "--num-workers"),
        ("evaluate", ["--mode", "labels", "--shards", "none.tar"], "--labels"),
        ("labels", labels_base + ["--jobs", "0"], "--jobs"),
        ("labels", labels_base + ["--bg-threshold", "0.6"], "--bg-threshold"),
        ("labels", labels_base + ["--crf-gt-prob", "1.5"], "--crf-gt-prob"),
        ("labels", ["--cams", str(tmp_path / "absent"), "--threshold", "0.5", "--out", str(tmp_path / "l")], "--cams"),
        ("viz", viz_base + ["--n", "0"], "--n"),
        ("viz", viz_base + ["--height", "0"], "--height"),
        ("viz", viz_base + ["--summary", str(tmp_path / "absent.json")], "--summary"),
        ("bench eval", ["--images", "0"], "--images"),
        ("bench eval", ["--repeats", "0"], "--repeats"),
        ("bench eval", ["--threads", "-1"], "--threads"),
    ]


def test_bad_flag_values_exit_2_naming_the_flag(tmp_path, capsys):
    for command, argv, flag in _bad_values(tmp_path):
        assert COMMANDS[command].main(argv) == 2, (command, argv)
        captured = capsys.readouterr()
        assert captured.err.startswith("error: ") and flag in captured.err, (command, argv, captured.err)
    assert not (tmp_path / "o").exists()  # refused before any work


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        viz.main(["--cams", "c", "--shards", "s", "--out", "o", "--n", "many"])
    assert info.value.code == 2 and "--n" in capsys.readouterr().err


def test_status_messages_are_logged_and_follow_log_level(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PUZZLECAM_LOG_LEVEL", raising=False)  # the default level, info
    cams = tmp_path / "cams"
    write_cam(cams, "a", [0], np.zeros((1, 2, 2)), np.full((1, 5, 5), 0.9))
    write_cam(cams, "b", [], np.zeros((0, 2, 2)), np.zeros((0, 5, 5)))
    args = ["--cams", str(cams), "--threshold", "0.5", "--out", str(tmp_path / "labels")]
    assert labels.main(args) == 0
    captured = capsys.readouterr()
    assert "wrote 2 label maps" in captured.err and captured.out == ""
    assert labels.main(args + ["--log-level", "warning"]) == 0
    assert capsys.readouterr().err == ""


def test_bench_eval_checks_and_writes_json(tmp_path, capsys):
    out = tmp_path / "figures" / "eval.json"
    argv = ["--images", "2", "--height", "9", "--width", "7", "--repeats", "1", "--thresholds", "0.2,0.6"]
    assert bench_eval.main(argv + ["--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert "speedup" in captured.out and f"wrote {out}" in captured.err
    text = out.read_text()
    figures = json.loads(text)
    assert text.endswith("\n") and figures["identical_confusions"] is True and figures["thresholds"] == 2
    assert [p.name for p in out.parent.iterdir()] == ["eval.json"]  # no temporary file left


def test_bad_inputs_are_one_line_and_leave_no_out(tmp_path, capsys):
    """Shards that match nothing, a file in the way of --out or --cams: one error line, exit 2, no --out made."""
    from test_infer import make_tiny_model

    weights = make_tiny_model(tmp_path / "run")
    cams = tmp_path / "cams"
    write_cam(cams, "a", [0], np.zeros((1, 2, 2)), np.full((1, 5, 5), 0.9))
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    nothing = str(tmp_path / "none-*.tar")
    out = tmp_path / "out" / "sub"

    def argv(command: str, out=out, shards=nothing, cams=cams) -> list[str]:
        return {
            "infer": ["--weights", str(weights), "--shards", shards, "--device", "cpu", "--num-workers", "0"],
            "evaluate": ["--cams", str(cams), "--shards", shards],
            "labels": ["--cams", str(cams), "--threshold", "0.5", "--shards", shards],
            "viz": ["--cams", str(cams), "--shards", shards],
        }[command] + ["--out", str(out)]

    cases = []
    for command in ("infer", "evaluate", "labels", "viz"):
        cases += [
            (command, argv(command), "matches no file"),
            (command, argv(command, out=a_file), f"--out {a_file} is not a directory"),
            (command, argv(command, out=a_file / "sub"), f"--out {a_file / 'sub'}: {a_file} is not a directory"),
        ]
        if command != "infer":
            cases.append((command, argv(command, cams=a_file), f"--cams {a_file}"))
    for command, args, words in cases:
        assert COMMANDS[command].main(args) == 2, (command, args)
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and words in err, (command, args, err)
        assert not (tmp_path / "out").exists(), (command, args)
    assert a_file.read_text() == "not a directory"


@pytest.mark.slow
def test_info_lines_reach_stderr_under_python_m(tmp_path):
    from test_infer import run_module

    cams = tmp_path / "cams"
    write_cam(cams, "a", [0], np.zeros((1, 2, 2)), np.full((1, 5, 5), 0.9))
    done = run_module("puzzlecam.labels", "--cams", str(cams), "--threshold", "0.5", "--out", str(tmp_path / "l"))
    assert done.returncode == 0 and f"wrote 1 label maps to {tmp_path / 'l'}" in done.stderr, done.stderr

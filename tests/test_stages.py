"""puzzlecam.stages: the record that decides whether a stage of the pipeline or the demo runs again."""

import re
import sys

import pytest

from puzzlecam.errors import StageError, UsageError
from puzzlecam.stages import Stage, Stages


def _said(text: str) -> dict[str, str]:
    """Stage -> "ran" | "reused" | "adopted", from the "ran: STAGE ..." lines of a pipeline or the demo."""
    return {m[2]: m[1] for m in re.finditer(r"^(ran|reused|adopted): ([\w/]+)", text, re.MULTILINE)}


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


def test_a_stage_made_by_hand_can_be_adopted(tmp_path, capsys):
    made = tmp_path / "made.txt"
    stage = Stage("made", "make it", _append(made, "pipeline"), outputs=[made], complete=made.exists)
    with pytest.raises(UsageError, match="--adopt made: its output is not there"):
        Stages(tmp_path).adopt(stage)
    made.write_text("by hand")  # e.g. the stage's command run on a cluster
    Stages(tmp_path).adopt(stage)
    assert Stages(tmp_path).run(stage) is None  # reused, not run: the hand-made output stays
    assert made.read_text() == "by hand" and _said(capsys.readouterr().out) == {"made": "reused"}

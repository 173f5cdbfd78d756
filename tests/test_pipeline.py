"""python -m puzzlecam.pipeline: the stages in order, their commands, the config's checks (docs/pipeline.md)."""

from __future__ import annotations

import json
import shlex

import pytest
import yaml

from puzzlecam import pipeline
from puzzlecam.errors import ConfigError, UsageError
from puzzlecam.stages import REPO
from tests.test_stages import _said

STAGES = [
    "train_classifier",
    "cams_eval",
    "eval_cams",
    "cams_train",
    "affinity_labels",
    "affinity_shards",
    "train_affinity",
    "rw_eval",
    "eval_rw",
    "rw_train",
    "pseudo_labels",
    "pseudo_shards",
    "train_segmentation",
    "segment_eval",
    "eval_segmentation",
]


def _commands(text: str) -> dict[str, list[str]]:
    """stage -> its printed command (argv) from --print-only output."""
    lines = text.splitlines()
    out = {}
    for i, line in enumerate(lines):
        if line.startswith("# ") and ":" in line:
            out[line[2:].split(":", 1)[0]] = shlex.split(lines[i + 1])
    return out


@pytest.mark.parametrize(
    "name", ["pipeline_voc_resnet50.yaml", "pipeline_voc_resnest101.yaml", "pipeline_coco_resnet50.yaml"]
)
def test_print_only_lists_every_stage_with_its_command(name, tmp_path, capsys):
    config = REPO / "launch" / "configs" / name
    assert pipeline.main(["--config", str(config), "--out", str(tmp_path / "run"), "--print-only"]) == 0
    commands = _commands(capsys.readouterr().out)
    assert list(commands) == STAGES
    pc = yaml.safe_load(config.read_text())
    train = commands["train_classifier"]
    assert "deepspeed" in train[0] and train[train.index("--num_gpus") + 1] == str(pc["procs"])
    assert f"model.arch={pc['model']['arch']}" in train and f"data.train_shards={pc['data']['train']}" in train
    # Stages 2 and 3 start from the ImageNet file, as the method, and read the shards the stages before write.
    affinity = commands["train_affinity"]
    assert f"model.pretrained={pc['model']['pretrained']}" in affinity
    assert f"data.train_shards={tmp_path / 'run' / 'shards_affinity' / '*.tar'}" in affinity
    seg = commands["train_segmentation"]
    assert f"data.eval_shards={pc['data']['seg_eval']}" in seg and "segmentation.labels=label" in seg
    assert seg[-len(pc["configs"]["segmentation_set"]) :] == pc["configs"]["segmentation_set"]  # the last word
    assert commands["pseudo_labels"][commands["pseudo_labels"].index("--threshold") + 1] == "0.35"
    # Inference runs distributed (torchrun, one process per GPU); evaluation reads the masked split.
    assert "torchrun" in commands["rw_train"][0] and "puzzlecam.rw" in commands["rw_train"]
    assert commands["eval_segmentation"][-4:] == [
        "--shards",
        pc["data"]["seg_eval"],
        "--out",
        commands["eval_segmentation"][-1],
    ]
    assert not (tmp_path / "run" / "stages.json").exists()  # nothing ran


def test_every_shipped_pipeline_config_loads_with_its_stage_configs(tmp_path):
    files = sorted((REPO / "launch" / "configs").glob("pipeline_*.yaml"))
    assert len(files) >= 3
    for f in files:
        pc = pipeline.load_pipeline_config(f)
        assert len(pipeline.Pipeline(pc, tmp_path / f.stem, print_only=True).run()) == 0  # each stage config loads


def _write(tmp_path, **changes) -> str:
    data = yaml.safe_load((REPO / "launch" / "configs" / "pipeline_voc_resnet50.yaml").read_text())
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        if value is None:
            node.pop(leaf)
        else:
            node[leaf] = value
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"data__train": ""}, r"'data.train' is empty: give a shard pattern"),
        ({"configs__affinity": ""}, r"'configs.affinity' is empty"),
        ({"procs": 0}, r"'procs' must be at least 1"),
        ({"launcher": "mpirun"}, r"'launcher' must be one of 'deepspeed', 'torchrun', 'python'"),
        ({"model__pretrained": None}, r"'model.later_stages_from' is 'pretrained' but 'model.pretrained' is not set"),
        ({"data__shards": "x"}, r"unknown config key 'data.shards'"),
        ({"random_walk__exp_times": "eight"}, r"'random_walk.exp_times' must be int"),
    ],
)
def test_bad_pipeline_configs_name_the_key(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        pipeline.load_pipeline_config(_write(tmp_path, **changes))


def test_a_bad_stage_config_fails_before_anything_runs(tmp_path):
    config = _write(tmp_path, configs__segmentation_set=["segmentation.head_norm=layer"])
    with pytest.raises(ConfigError, match="'segmentation.head_norm' must be one of"):
        pipeline.Pipeline(pipeline.load_pipeline_config(config), tmp_path / "run").run()
    assert not (tmp_path / "run").exists()


def test_rerun_names_a_stage(tmp_path, capsys):
    config = _write(tmp_path)
    with pytest.raises(
        UsageError, match=r"--rerun 'train': not a stage of this pipeline; the stages: train_classifier"
    ):
        pipeline.Pipeline(pipeline.load_pipeline_config(config), tmp_path / "run").run(rerun="train")


def test_until_stops_after_a_stage(tmp_path, capsys):
    config = _write(tmp_path)
    argv = ["--config", config, "--out", str(tmp_path / "run"), "--print-only", "--until", "eval_rw"]
    assert pipeline.main(argv) == 0
    assert list(_commands(capsys.readouterr().out)) == STAGES[: STAGES.index("eval_rw") + 1]
    assert pipeline.main([*argv[:-1], "eval"]) == 2
    assert "until 'eval': not a stage of this pipeline" in capsys.readouterr().err


@pytest.mark.slow
def test_the_pipeline_runs_end_to_end_and_resumes(tmp_path, capsys):
    """Every stage on a tiny synthetic set (one process, a few steps per training): summary.json holds each
    stage with the mIoU of the three evaluations; a rerun reuses everything; --rerun runs a stage and those after."""
    from test_infer import make_synth_shards

    shards = make_synth_shards(tmp_path / "data", num_images=12, size=64, unlabeled=0, shard_size=6)
    config = yaml.safe_load((REPO / "launch" / "configs" / "pipeline_demo_cpu.yaml").read_text())
    config.update(launcher="python", procs=1)
    config["data"] = {"train": str(shards), "cam_eval": str(shards), "seg_eval": str(shards)}
    steps = ["train.max_steps=2", "train.global_batch_size=4", "train.micro_batch_size=4", "train.log_every=1"]
    config["configs"] = {
        **config["configs"],
        "classifier_set": [*steps, "data.crop_size=64", "infer.scales=[1.0]"],
        "affinity_set": steps,
        "segmentation_set": [*steps, "train.eval_every=0"],
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    assert pipeline.main(["--config", str(path), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert _said(text) == dict.fromkeys(STAGES, "ran")
    rows = {row["stage"]: row for row in json.loads((out / "summary.json").read_text())["stages"]}
    assert list(rows) == STAGES
    for key in ("eval_cams", "eval_rw", "eval_segmentation"):
        assert 0.0 <= rows[key]["miou"] <= 1.0 and rows[key]["images"] == 12
    assert rows["eval_rw"]["threshold"] <= 0.5  # the random walk's sweep (0.05..0.50)
    assert (out / "segmentation" / "seg_eval_png" / "segment.json").is_file()
    assert yaml.safe_load((out / "affinity" / "config.yaml").read_text())["model"]["pretrained"] == str(
        out / "classifier" / "model.safetensors"
    )  # later_stages_from: classifier
    assert pipeline.main(["--config", str(path), "--out", str(out)]) == 0
    assert _said(capsys.readouterr().out) == dict.fromkeys(STAGES, "reused")
    assert pipeline.main(["--config", str(path), "--out", str(out), "--rerun", "segment_eval"]) == 0
    said = _said(capsys.readouterr().out)
    assert said == {k: "ran" if k in ("segment_eval", "eval_segmentation") else "reused" for k in STAGES}

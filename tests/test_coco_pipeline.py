"""MS COCO through stage 1 on a synthetic COCO-format set: conversion, training with 80 classes (and the refusal
of a 20-class model, naming the value), multi-scale CAMs and the 81-label sweep (slow: a DeepSpeed launch)."""

from __future__ import annotations

import json

import pytest
from test_train_support import python_launch, run_all, tiny_overrides

from puzzlecam import evaluate, infer
from puzzlecam.camstore import store_num_classes

pytestmark = pytest.mark.slow


def test_coco_stage_one_end_to_end(tmp_path, capsys):
    pytest.importorskip("pycocotools")
    from puzzlecam.data.coco import shard_coco
    from puzzlecam.data.synth_coco import synthesize_coco

    synthesize_coco(tmp_path / "coco", num_images=24, size=64, seed=5, val_fraction=0.25)
    shards = tmp_path / "shards"
    for split in ("train2014", "val2014"):
        shard_coco(tmp_path / "coco" / split, tmp_path / f"coco/annotations/instances_{split}.json", out=shards)
    train = {"data.train_shards": f"{shards}/train2014-*.tar", "train.max_steps": 2}
    wrong, right = tmp_path / "wrong", tmp_path / "run"
    launches = [
        python_launch(wrong, tiny_overrides(shards, **train), tmp_path / "wrong.log"),
        python_launch(right, tiny_overrides(shards, **train, **{"model.num_classes": 80}), tmp_path / "run.log"),
    ]
    codes = run_all(launches, expect_ok=False)
    assert codes[0] == 2 and "hold COCO samples" in launches[0].output(), launches[0].output()[-3000:]
    assert "Set model.num_classes=80" in launches[0].output()
    assert codes[1] == 0, launches[1].output()[-4000:]

    cams = tmp_path / "cams"
    val = f"{shards}/val2014-*.tar"
    assert infer.main(["--weights", str(right / "model.safetensors"), "--shards", val, "--out", str(cams)]) == 0
    assert store_num_classes(cams) == 80
    out = tmp_path / "eval"
    assert evaluate.main(["--cams", str(cams), "--shards", val, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "coco" and len(summary["per_class_iou"]) == 81
    assert "toothbrush" in capsys.readouterr().out  # the report names COCO's classes

"""puzzlecam.datasets: the class lists in one place, the dataset shards name, and model.num_classes following it."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from puzzlecam import NUM_CLASSES, VOC_CLASSES, datasets
from puzzlecam.config import load_config
from puzzlecam.errors import ConfigError
from puzzlecam.tasks import build_task


def tiny_tar(path, meta: dict) -> None:
    """A shard with one sample's json (enough for the dataset check, which reads nothing else)."""
    with tarfile.open(path, "w") as tar:
        data = json.dumps(meta).encode()
        info = tarfile.TarInfo("img1.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def test_class_lists():
    assert datasets.VOC.num_classes == NUM_CLASSES == 20 and datasets.VOC.classes == VOC_CLASSES
    assert datasets.COCO.num_classes == 80 and datasets.COCO.num_labels == 81
    for d in datasets.DATASETS.values():
        assert len(set(d.classes)) == d.num_classes and d.label_names[0] == "background"
        assert d.palette().shape == (256, 3)
    assert datasets.COCO.classes[0] == "person" and datasets.COCO.classes[-1] == "toothbrush"
    with pytest.raises(ConfigError, match="unknown dataset 'imagenet': puzzlecam knows voc, coco"):
        datasets.get("imagenet")


def test_the_dataset_shards_name(tmp_path):
    tiny_tar(tmp_path / "coco-000000.tar", {"id": "a", "labels": [0], "dataset": "coco"})
    tiny_tar(tmp_path / "voc-000000.tar", {"id": "a", "labels": [0]})
    tiny_tar(tmp_path / "bad-000000.tar", {"id": "a", "labels": [0], "dataset": "imagenet"})
    assert datasets.of_shards(str(tmp_path / "coco-*.tar")) is datasets.COCO
    assert datasets.of_shards(str(tmp_path / "voc-*.tar")) is datasets.VOC  # no key: shards written before it
    with pytest.raises(ConfigError, match=r"bad-000000.tar: img1.json: json names dataset 'imagenet'"):
        datasets.of_shards(str(tmp_path / "bad-*.tar"))
    assert datasets.of_shards(f"pipe:cat {tmp_path}/none-{{000000..000001}}.tar") is None  # unreadable: the loader says
    assert datasets.of_shards(str(tmp_path / "missing-*.tar")) is None  # the loader says what is missing


@pytest.mark.parametrize("task,good", [("classification", 80), ("segmentation", 81)])
def test_model_num_classes_follows_the_shards(tmp_path, task, good):
    tiny_tar(tmp_path / "train-000000.tar", {"id": "a", "labels": [3], "dataset": "coco"})
    shards = f"data.train_shards={tmp_path}/train-*.tar"
    extra = ["model.norm=frozen"] if task == "segmentation" else []
    with pytest.raises(ConfigError, match=rf"hold COCO samples: .* Set model.num_classes={good}"):
        build_task(load_config(None, [f"task={task}", shards, "model.num_classes=21", *extra]))
    build_task(load_config(None, [f"task={task}", shards, f"model.num_classes={good}", *extra]))

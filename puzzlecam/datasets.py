"""The datasets puzzlecam trains on, in one place: their class lists (in label order) and label-map palettes.

Label conventions (design.md §5, §11): image labels are class indices 0..C-1 in the order below; label maps
and masks hold 0 for the background, 1..C for the classes and 255 (ignored). PASCAL VOC 2012 has C = 20 in
its canonical order; MS COCO 2014 has C = 80, its categories in the order of their ids (1..90 with gaps ->
0..79). Both colour label maps with the VOC palette (bit-interleaved RGB, 256 entries:
puzzlecam.utils.labelmap.voc_colormap), which is defined for every value a map can hold.

A shard sample's ``json`` names its dataset (``"dataset": "coco"``); shards written before the key existed
are VOC's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from puzzlecam.errors import ConfigError


@dataclass(frozen=True)
class Dataset:
    name: str
    classes: tuple[str, ...]  # foreground classes, in label order (image label c = map value c + 1)

    @property
    def num_classes(self) -> int:
        """Foreground classes C: the classifier's outputs, the length of an image's label vector."""
        return len(self.classes)

    @property
    def num_labels(self) -> int:
        """C + 1: the background and the classes, the values a label map holds besides 255."""
        return len(self.classes) + 1

    @property
    def label_names(self) -> tuple[str, ...]:
        """Names of the label-map values 0..C: "background" then the classes."""
        return ("background", *self.classes)

    def palette(self) -> np.ndarray:
        """(256, 3) uint8 RGB colour of every label-map value (the VOC palette for every dataset)."""
        from puzzlecam.utils.labelmap import voc_colormap

        return voc_colormap()


VOC = Dataset(
    "voc",
    (
        "aeroplane",
        "bicycle",
        "bird",
        "boat",
        "bottle",
        "bus",
        "car",
        "cat",
        "chair",
        "cow",
        "diningtable",
        "dog",
        "horse",
        "motorbike",
        "person",
        "pottedplant",
        "sheep",
        "sofa",
        "train",
        "tvmonitor",
    ),
)

# COCO 2014's 80 categories in the order of their ids (instances_*.json "categories"; ids 1..90 with gaps).
COCO = Dataset(
    "coco",
    (
        "person",
        "bicycle",
        "car",
        "motorcycle",
        "airplane",
        "bus",
        "train",
        "truck",
        "boat",
        "traffic light",
        "fire hydrant",
        "stop sign",
        "parking meter",
        "bench",
        "bird",
        "cat",
        "dog",
        "horse",
        "sheep",
        "cow",
        "elephant",
        "bear",
        "zebra",
        "giraffe",
        "backpack",
        "umbrella",
        "handbag",
        "tie",
        "suitcase",
        "frisbee",
        "skis",
        "snowboard",
        "sports ball",
        "kite",
        "baseball bat",
        "baseball glove",
        "skateboard",
        "surfboard",
        "tennis racket",
        "bottle",
        "wine glass",
        "cup",
        "fork",
        "knife",
        "spoon",
        "bowl",
        "banana",
        "apple",
        "sandwich",
        "orange",
        "broccoli",
        "carrot",
        "hot dog",
        "pizza",
        "donut",
        "cake",
        "chair",
        "couch",
        "potted plant",
        "bed",
        "dining table",
        "toilet",
        "tv",
        "laptop",
        "mouse",
        "remote",
        "keyboard",
        "cell phone",
        "microwave",
        "oven",
        "toaster",
        "sink",
        "refrigerator",
        "book",
        "clock",
        "vase",
        "scissors",
        "teddy bear",
        "hair drier",
        "toothbrush",
    ),
)

DATASETS = {d.name: d for d in (VOC, COCO)}
DEFAULT = VOC  # shards without a "dataset" key in their json


def get(name: str) -> Dataset:
    """The dataset called ``name`` (a ConfigError naming the known ones otherwise)."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}: puzzlecam knows {', '.join(DATASETS)}")
    return DATASETS[name]


def with_classes(num_classes: int) -> Dataset | None:
    """The dataset of ``num_classes`` foreground classes (what a CAM store or a network records), or None."""
    return next((d for d in DATASETS.values() if d.num_classes == num_classes), None)


def named_in(meta: dict) -> Dataset:
    """The dataset a sample's json names (VOC where it names none); a ValueError for an unknown name."""
    name = meta.get("dataset", DEFAULT.name)
    if name not in DATASETS:
        raise ValueError(f"json names dataset {name!r}; puzzlecam knows {', '.join(DATASETS)}")
    return DATASETS[name]


def of_shards(shards) -> Dataset | None:
    """The dataset of shards (a pattern, directory, list or URLs as data.train_shards takes): the one the first
    sample's json of the first shard names (for URLs: the first sample streamed). None when no shard or json is
    found (the loader then says what is wrong); a ConfigError for an unknown dataset name."""
    import json
    import tarfile

    from puzzlecam.data.shards import resolve_shards

    if isinstance(shards, str) and ("://" in shards or shards.startswith("pipe:")):
        from puzzlecam.data.remote import _peek, expand

        try:
            meta = json.loads(_peek(expand(shards)[0]).members["json"])
        except Exception:  # unreachable, no json: the loader reports it with the full story
            return None
        try:
            return named_in(meta if isinstance(meta, dict) else {})
        except ValueError as e:
            raise ConfigError(f"{shards}: {e}") from None
    try:
        paths = resolve_shards(shards)
    except Exception:  # the loader reports missing shards with the full story
        return None
    for path in paths[:1]:
        try:
            with tarfile.open(path) as tar:
                for member in tar:
                    if member.isfile() and member.name.endswith(".json"):
                        meta = json.loads(tar.extractfile(member).read())
                        try:
                            return named_in(meta if isinstance(meta, dict) else {})
                        except ValueError as e:
                            raise ConfigError(f"{path}: {member.name}: {e}") from None
        except (OSError, tarfile.TarError, json.JSONDecodeError):
            return None
    return None

"""Data: VOC/SBD -> tar shards (``python -m puzzlecam.data shard``), a synthetic VOC-format set
(``python -m puzzlecam.data synth``), and the training / evaluation loaders (docs/data.md)."""

from puzzlecam.data.loader import EvalLoader, TrainLoader, eval_loader, train_loader
from puzzlecam.errors import ShardError

# ImageNet statistics (RGB, 0..1 scale), defined once with the reference math: normalization happens
# on the device (ops.prepare_inputs).
from puzzlecam.puzzle import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "EvalLoader", "ShardError", "TrainLoader", "eval_loader", "train_loader"]

"""Data: VOC/SBD -> tar shards (``python -m puzzlecam.data shard``), a synthetic VOC-format set
(``python -m puzzlecam.data synth``), and the training / evaluation loaders (contracts.md)."""

from puzzlecam.data.loader import EvalLoader, TrainLoader, eval_loader, train_loader
from puzzlecam.data.shards import ShardError

# ImageNet statistics (RGB, 0..1 scale): normalization happens on the device (ops.prepare_inputs).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = ["train_loader", "eval_loader", "TrainLoader", "EvalLoader", "ShardError", "IMAGENET_MEAN", "IMAGENET_STD"]

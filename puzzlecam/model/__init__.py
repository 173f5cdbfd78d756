"""Models: torchvision-layout ResNet backbones and the Puzzle-CAM classifier (docs/model.md)."""

from .classifier import GROUPS, Classifier, build_model, param_groups
from .norm import BatchNorm2d, FrozenStatsBatchNorm2d, SyncBatchNorm2d, norm_layer
from .pretrained import PretrainedMismatchError, load_pretrained, read_state_dict
from .resnet import ARCHS, BasicBlock, Bottleneck, ResNet

__all__ = [
    "ARCHS",
    "GROUPS",
    "BasicBlock",
    "BatchNorm2d",
    "Bottleneck",
    "Classifier",
    "FrozenStatsBatchNorm2d",
    "PretrainedMismatchError",
    "ResNet",
    "SyncBatchNorm2d",
    "build_model",
    "load_pretrained",
    "norm_layer",
    "param_groups",
    "read_state_dict",
]

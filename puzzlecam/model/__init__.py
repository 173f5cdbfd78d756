"""Models: ResNet (torchvision layout) and ResNeSt (release layout) backbones, the Puzzle-CAM classifier,
AffinityNet, DeepLabv3+ (docs/model.md)."""

from .affinity import AffinityNet, build_affinity_net, stage_channels
from .classifier import ARCHS, GROUPS, Classifier, build_backbone, build_model, param_groups
from .deeplab import DeepLabV3Plus, build_deeplab, deeplab_v3_plus
from .norm import BatchNorm2d, FrozenStatsBatchNorm2d, SyncBatchNorm2d, norm_layer
from .pretrained import PretrainedMismatchError, load_pretrained, read_state_dict
from .resnest import RESNEST_ARCHS, ResNeSt, ResNeStBottleneck, SplitAttention
from .resnet import RESNET_ARCHS, Backbone, BasicBlock, Bottleneck, ResNet

__all__ = [
    "ARCHS",
    "AffinityNet",
    "GROUPS",
    "RESNEST_ARCHS",
    "RESNET_ARCHS",
    "Backbone",
    "BasicBlock",
    "BatchNorm2d",
    "Bottleneck",
    "Classifier",
    "DeepLabV3Plus",
    "FrozenStatsBatchNorm2d",
    "PretrainedMismatchError",
    "ResNeSt",
    "ResNeStBottleneck",
    "ResNet",
    "SplitAttention",
    "SyncBatchNorm2d",
    "build_affinity_net",
    "build_backbone",
    "build_deeplab",
    "build_model",
    "deeplab_v3_plus",
    "load_pretrained",
    "norm_layer",
    "param_groups",
    "read_state_dict",
    "stage_channels",
]

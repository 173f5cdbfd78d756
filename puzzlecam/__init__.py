"""puzzlecam: a distributed trainer for Puzzle-CAM (weakly supervised semantic segmentation)."""

__version__ = "0.1.0"

from puzzlecam.datasets import VOC as _VOC

# PASCAL VOC's classes (puzzlecam.datasets holds every dataset's): the default dataset.
VOC_CLASSES = _VOC.classes
NUM_CLASSES = _VOC.num_classes

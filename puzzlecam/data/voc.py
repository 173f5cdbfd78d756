"""PASCAL VOC 2012 / SBD on disk: id lists, image labels from the Annotations XML, masks.

Layouts (docs/data.md)::

    VOCdevkit/VOC2012/{JPEGImages, Annotations, SegmentationClass, ImageSets/Segmentation/*.txt}
    benchmark_RELEASE/dataset/{img, cls/*.mat, train.txt, val.txt}
    SegmentationClassAug/*.png   (single-channel PNGs of raw class indices)

Masks are arrays of class indices (0 background, 1..20 classes, 255 void), read without any colour
conversion: a palette PNG's pixel values are its indices (:mod:`puzzlecam.utils.labelmap`).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from puzzlecam import VOC_CLASSES
from puzzlecam.errors import DataError
from puzzlecam.utils.labelmap import IGNORE_INDEX, decode_label_png

CLASS_INDEX = {name: i for i, name in enumerate(VOC_CLASSES)}


def check_mask_values(mask: np.ndarray, num_labels: int = len(VOC_CLASSES) + 1) -> None:
    """A ValueError unless every value is a label 0..num_labels-1 (VOC: 0..20, COCO: 0..80) or the ignore index."""
    bad = mask[(mask >= num_labels) & (mask != IGNORE_INDEX)]
    if bad.size:
        raise ValueError(
            f"mask holds values {np.unique(bad).tolist()[:8]}; expected 0..{num_labels - 1} or {IGNORE_INDEX}"
        )


def parse_annotation(data: bytes) -> list[int]:
    """Sorted class indices of every object in a VOC Annotations XML (difficult ones included).

    Only ``annotation/object/name`` counts; ``object/part/name`` (head, hand, foot) does not, and
    names outside the 20 classes are ignored.
    """
    root = ET.fromstring(data)
    labels = set()
    for obj in root.findall("object"):
        name = obj.findtext("name")
        if name is not None and name.strip() in CLASS_INDEX:
            labels.add(CLASS_INDEX[name.strip()])
    return sorted(labels)


def read_sbd_mat(path: Path) -> np.ndarray:
    """``GTcls.Segmentation`` of an SBD ``cls/*.mat`` file as (H, W) uint8 (scipy.io: no pickle)."""
    import scipy.io

    mat = scipy.io.loadmat(str(path), squeeze_me=True, struct_as_record=False)
    if "GTcls" not in mat:
        raise ValueError(f"no 'GTcls' struct (keys: {sorted(k for k in mat if not k.startswith('__'))})")
    seg = np.asarray(mat["GTcls"].Segmentation)
    if seg.ndim != 2:
        raise ValueError(f"GTcls.Segmentation has shape {seg.shape}; expected (H, W)")
    return seg.astype(np.uint8)


def read_id_list(path: Path) -> list[str]:
    """Image ids from a list file: one per line; the first token's base name without extension.

    Handles plain id lists (``2007_000032``) and the SegmentationClassAug list format
    (``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png``).
    """
    ids = []
    for line in Path(path).read_text().splitlines():
        tok = line.strip().split()
        if tok:
            ids.append(Path(tok[0]).stem if ("/" in tok[0] or "." in tok[0]) else tok[0])
    return ids


class VocSources:
    """Where each image's JPEG, XML and mask live, for VOC plus optional SBD and SegmentationClassAug."""

    def __init__(self, voc_root: str | Path, sbd_root: str | Path | None = None, aug_masks: str | Path | None = None):
        self.voc = Path(voc_root)
        self.sbd = Path(sbd_root) if sbd_root else None
        self.aug = Path(aug_masks) if aug_masks else None
        if not (self.voc / "JPEGImages").is_dir():
            raise DataError(f"--voc-root {self.voc}: no JPEGImages folder (expected VOCdevkit/VOC2012)")
        if self.sbd is not None and not (self.sbd / "cls").is_dir():
            raise DataError(f"--sbd-root {self.sbd}: no cls folder (expected benchmark_RELEASE/dataset)")
        if self.aug is not None and not self.aug.is_dir():
            raise DataError(f"--aug-masks {self.aug}: not a folder")

    def split_ids(self, split: str) -> list[str]:
        """Ids of a named split; train_aug = VOC train + SBD train + SBD val - VOC val."""
        seg_lists = self.voc / "ImageSets" / "Segmentation"
        if split == "train_aug":
            if self.sbd is None:
                raise DataError("--split train_aug needs --sbd-root (SBD's train.txt and val.txt), or pass --list")
            ids = set(self._list(seg_lists / "train.txt")) | set(self._list(self.sbd / "train.txt"))
            ids |= set(self._list(self.sbd / "val.txt"))
            return sorted(ids - set(self._list(seg_lists / "val.txt")))
        return sorted(set(self._list(seg_lists / f"{split}.txt")))

    @staticmethod
    def _list(path: Path) -> list[str]:
        if not path.is_file():
            raise DataError(f"id list {path} does not exist")
        return read_id_list(path)

    def jpeg_path(self, image_id: str) -> Path:
        p = self.voc / "JPEGImages" / f"{image_id}.jpg"
        if not p.is_file() and self.sbd is not None and (self.sbd / "img" / f"{image_id}.jpg").is_file():
            return self.sbd / "img" / f"{image_id}.jpg"
        return p

    def xml_path(self, image_id: str) -> Path:
        return self.voc / "Annotations" / f"{image_id}.xml"

    def mask_path(self, image_id: str) -> Path | None:
        """VOC SegmentationClass first, then SegmentationClassAug, then SBD; None when none exists."""
        candidates = [self.voc / "SegmentationClass" / f"{image_id}.png"]
        if self.aug is not None:
            candidates.append(self.aug / f"{image_id}.png")
        if self.sbd is not None:
            candidates.append(self.sbd / "cls" / f"{image_id}.mat")
        for p in candidates:
            if p.is_file():
                return p
        return None


def read_mask(path: Path) -> np.ndarray:
    if path.suffix == ".mat":
        return read_sbd_mat(path)
    return decode_label_png(path.read_bytes())

"""The CAM store: one ``{id}.npz`` per image plus ``index.parquet`` (docs/inference.md, "The CAM store").

Each ``{id}.npz`` is written by ``numpy.savez`` (no pickle) and holds three plain arrays:

* ``keys``   int64 (K,): the image's labelled classes as *channel indices* 0..19 (class index - 1;
  the evaluation's class indices are 1..20 with 0 = background);
* ``cam``    float16 (K, (H-1)//4+1, (W-1)//4+1): the stride-4 normalized CAMs;
* ``hr_cam`` float16 (K, H, W): the full-resolution normalized CAMs.

An image without labelled classes has K = 0: ``keys`` is empty and ``cam``/``hr_cam`` have zero
channels but keep their spatial size, so (H, W) is always known from ``hr_cam``.

Files are written atomically (:mod:`puzzlecam.utils.files`: a temporary ``.{id}.npz.tmp-{pid}``
renamed into place), so a file named ``{id}.npz`` is complete; readers still verify it
(``read_cam``) and raise :class:`CamStoreError` naming the id.
``index.parquet`` (id, height, width, keys, num_keys) is rebuilt from the npz files present.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from puzzlecam.errors import CamStoreError
from puzzlecam.utils.files import atomic_write

INDEX_NAME = "index.parquet"
CAM_SUFFIX = ".npz"
ARRAY_NAMES = ("keys", "cam", "hr_cam")


@dataclass
class CamRecord:
    id: str
    keys: np.ndarray  # int64 (K,), channel indices 0..C-1
    cam: np.ndarray  # float16 (K, h4, w4)
    hr_cam: np.ndarray  # float16 (K, H, W)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.hr_cam.shape[1]), int(self.hr_cam.shape[2])


def check_id(image_id: str) -> str:
    """Ids become file names: reject anything that could escape the store directory."""
    if not image_id or "/" in image_id or "\\" in image_id or image_id in (".", "..") or "\0" in image_id:
        raise CamStoreError(f"image id {image_id!r} cannot be used as a CAM file name")
    return image_id


def cam_path(directory: str | Path, image_id: str) -> Path:
    return Path(directory) / f"{check_id(image_id)}{CAM_SUFFIX}"


def write_cam(directory: str | Path, image_id: str, keys, cam, hr_cam) -> Path:
    """Write one image's CAMs atomically as float16 (keys as int64). Returns the file's path."""
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    cam = np.asarray(cam, dtype=np.float16)
    hr_cam = np.asarray(hr_cam, dtype=np.float16)
    if cam.ndim != 3 or hr_cam.ndim != 3 or cam.shape[0] != len(keys) or hr_cam.shape[0] != len(keys):
        raise CamStoreError(
            f"{image_id}: cam {cam.shape} and hr_cam {hr_cam.shape} must be (K, h, w) with K = {len(keys)} keys"
        )
    path = cam_path(directory, image_id)
    atomic_write(path, lambda f: np.savez(f, keys=keys, cam=cam, hr_cam=hr_cam))
    return path


def read_cam(directory: str | Path, image_id: str) -> CamRecord:
    """Load and validate ``{id}.npz``; any problem is a :class:`CamStoreError` naming the id."""
    path = cam_path(directory, image_id)
    if not path.is_file():
        raise CamStoreError(f"{image_id}: no CAM file {path}")
    if not zipfile.is_zipfile(path):
        raise CamStoreError(f"{image_id}: CAM file {path} is not an npz (zip) archive (truncated or overwritten?)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [n for n in ARRAY_NAMES if n not in z.files]
            if missing:
                raise CamStoreError(f"{image_id}: CAM file {path} lacks arrays {missing} (has {z.files})")
            keys, cam, hr_cam = (z[n] for n in ARRAY_NAMES)  # reading checks each member's CRC
    except CamStoreError:
        raise
    except Exception as e:  # truncated zip, bad CRC, pickled object arrays, ...
        raise CamStoreError(f"{image_id}: cannot read CAM file {path}: {type(e).__name__}: {e}") from None
    if keys.ndim != 1 or not np.issubdtype(keys.dtype, np.integer):
        raise CamStoreError(f"{image_id}: 'keys' in {path} must be a 1-D int array, got {keys.dtype} {keys.shape}")
    k = len(keys)
    if cam.ndim != 3 or hr_cam.ndim != 3 or cam.shape[0] != k or hr_cam.shape[0] != k:
        raise CamStoreError(
            f"{image_id}: {path} has cam {cam.shape} and hr_cam {hr_cam.shape}; expected (K, h, w) with K = {k}"
        )
    return CamRecord(image_id, keys.astype(np.int64), cam, hr_cam)


def is_complete(directory: str | Path, image_id: str) -> bool:
    """True when ``{id}.npz`` exists and loads completely (a rerun skips only such images)."""
    try:
        read_cam(directory, image_id)
        return True
    except CamStoreError:
        return False


def list_ids(directory: str | Path) -> list[str]:
    """Ids of the ``{id}.npz`` files in ``directory``, sorted.

    Dot files are not listed: temporary files (``.{id}.npz.tmp-{pid}``) and anything hidden.
    """
    d = Path(directory)
    if not d.is_dir():
        raise CamStoreError(f"CAM directory {d} does not exist")
    return sorted(
        p.name[: -len(CAM_SUFFIX)] for p in d.iterdir() if p.name.endswith(CAM_SUFFIX) and not p.name.startswith(".")
    )


def _header(z: zipfile.ZipFile, name: str) -> tuple[tuple[int, ...], np.dtype]:
    with z.open(name + ".npy") as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return shape, dtype


def write_index(directory: str | Path) -> Path:
    """Rebuild ``index.parquet`` from the npz files present (reads keys and array headers only)."""
    d = Path(directory)
    ids, heights, widths, keys_col = [], [], [], []
    for image_id in list_ids(d):
        path = cam_path(d, image_id)
        try:
            with zipfile.ZipFile(path) as z:
                shape, _ = _header(z, "hr_cam")
            with np.load(path, allow_pickle=False) as npz:
                keys = npz["keys"]
        except Exception as e:
            raise CamStoreError(f"{image_id}: cannot read CAM file {path}: {type(e).__name__}: {e}") from None
        if len(shape) != 3:
            raise CamStoreError(f"{image_id}: hr_cam in {path} has shape {shape}, expected (K, H, W)")
        ids.append(image_id)
        heights.append(int(shape[1]))
        widths.append(int(shape[2]))
        keys_col.append([int(k) for k in keys.reshape(-1)])
    table = pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "height": pa.array(heights, pa.int32()),
            "width": pa.array(widths, pa.int32()),
            "keys": pa.array(keys_col, pa.list_(pa.int32())),
            "num_keys": pa.array([len(k) for k in keys_col], pa.int32()),
        }
    )
    out = d / INDEX_NAME
    atomic_write(out, lambda f: pq.write_table(table, f))
    return out


def read_index(directory: str | Path) -> pa.Table:
    path = Path(directory) / INDEX_NAME
    if not path.is_file():
        raise CamStoreError(f"no {INDEX_NAME} in {directory} (run puzzlecam.infer to completion first)")
    return pq.read_table(path)

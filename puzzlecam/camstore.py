"""The CAM store: one npz file per image plus ``index.parquet`` (docs/inference.md, "The CAM store").

Each file is written by ``numpy.savez`` (no pickle) and holds three plain arrays:

* ``keys``   int64 (K,): the image's labelled classes as *channel indices* 0..19 (class index - 1;
  the evaluation's class indices are 1..20 with 0 = background);
* ``cam``    float16 (K, (H-1)//4+1, (W-1)//4+1): the stride-4 normalized CAMs;
* ``hr_cam`` float16 (K, H, W): the full-resolution normalized CAMs.

An image without labelled classes has K = 0: ``keys`` is empty and ``cam``/``hr_cam`` have zero
channels but keep their spatial size, so (H, W) is always known from ``hr_cam``.

File names (:func:`file_name`): an id that is a safe file name is stored as ``{id}.npz``; any other
id (a slash, ``..``, a leading dot or ``%``, a control character, more than :data:`MAX_NAME_BYTES`
bytes) as ``%`` + its percent-encoding (``a/b`` -> ``%a%2Fb.npz``), or, where that is too long,
as ``%=`` + its SHA-256, with the id kept in the file as a fourth array ``id`` (its UTF-8 bytes).
``index.parquet`` records each id's file name; label PNGs follow the same rule.

Files are written atomically (:mod:`puzzlecam.utils.files`: a temporary ``.{name}.tmp-{pid}``
renamed into place), so a file with its final name is complete. Readers still verify it
(:func:`read_cam`): the npy headers are checked against the stated bounds before any array is
loaded (a few MB of zip can declare gigabytes), then keys and values; any problem is a
:class:`CamStoreError` naming the id and the file.
``index.parquet`` (id, file, height, width, keys, num_keys) is rebuilt from the files present.

A random-walk store (``puzzlecam.rw``) has the same layout: ``cam`` is the stride-4 walk and ``hr_cam``
the full-size map divided by its single global max; ``rw.json`` beside the files marks it
(:func:`is_rw_store`), where a CAM store has ``infer.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch.distributed as dist

from puzzlecam.datasets import DEFAULT
from puzzlecam.errors import CamStoreError
from puzzlecam.puzzle import strided_size
from puzzlecam.utils.distributed import barrier, sum_across_ranks
from puzzlecam.utils.files import atomic_write, atomic_write_json
from puzzlecam.utils.limits import image_size_problem

log = logging.getLogger(__name__)

INDEX_NAME = "index.parquet"
CAM_SUFFIX = ".npz"
ARRAY_NAMES = ("keys", "cam", "hr_cam")
ID_ARRAY = "id"  # only in files named by a digest: the id the name cannot hold
CAM_STRIDE = 4
RW_META_NAME = "rw.json"  # the settings of a random-walk store (puzzlecam.rw)
CAM_META_NAME = "infer.json"  # the settings of a CAM store (puzzlecam.infer)

# The longest file name stem: with a suffix, the temporary mark and a pid the name stays under
# the 255 bytes file systems allow.
MAX_NAME_BYTES = 200
ESCAPE_MARK = "%"  # percent-encoded id; a plain id never starts with it
DIGEST_MARK = "%="  # SHA-256 of the id; percent-encoding never yields "=" (it is quoted as %3D)
MAX_ID_BYTES = 1 << 16  # the longest id a store keeps
_UNSAFE = re.compile(r"[/\\\x00-\x1f\x7f]")
# index.parquet may not unpack to more than this per row (an id and its file name, 20 keys, 3 numbers).
_MAX_INDEX_BYTES_PER_ROW = 2 * MAX_ID_BYTES


# ---------------------------------------------------------------------------------------------
# Ids and file names


def _id_bytes(image_id: str) -> bytes:
    return image_id.encode("utf-8", "surrogatepass")  # ids read from tar headers may hold surrogates


def is_plain_id(image_id: str) -> bool:
    """True when ``image_id`` is its own file name stem (every VOC id is)."""
    if not image_id or image_id[0] in ".%" or _UNSAFE.search(image_id):
        return False
    try:
        return len(image_id.encode("utf-8")) <= MAX_NAME_BYTES
    except UnicodeEncodeError:
        return False


def file_stem(image_id: str) -> str:
    """The file name stem of ``image_id``: the id itself, its ``%`` escape or its ``%=`` digest."""
    if is_plain_id(image_id):
        return image_id
    escaped = ESCAPE_MARK + quote(image_id, safe="", errors="surrogatepass")
    if len(escaped) <= MAX_NAME_BYTES:
        return escaped
    return DIGEST_MARK + hashlib.sha256(_id_bytes(image_id)).hexdigest()


def file_name(image_id: str, suffix: str = CAM_SUFFIX) -> str:
    """``image_id``'s file name with ``suffix`` (``.npz`` for CAMs, ``.png`` for label maps)."""
    return file_stem(image_id) + suffix


def shown_id(image_id: str) -> str:
    """``image_id`` for a message: as it is when plain, else quoted so that one line stays one line."""
    return image_id if is_plain_id(image_id) else ascii(image_id)


def cam_path(directory: str | Path, image_id: str) -> Path:
    return Path(directory) / file_name(image_id)


def _id_of_stem(stem: str) -> str | None:
    """The id of an escaped or plain stem; None for a digest (the id is in the file) or a foreign name."""
    if stem.startswith(DIGEST_MARK):
        return None
    if not stem.startswith(ESCAPE_MARK):
        return stem if is_plain_id(stem) else None
    try:
        image_id = unquote(stem[len(ESCAPE_MARK) :], errors="surrogatepass")
    except UnicodeDecodeError:
        return None
    return image_id if file_stem(image_id) == stem else None


# ---------------------------------------------------------------------------------------------
# Writing


def write_cam(directory: str | Path, image_id: str, keys, cam, hr_cam) -> Path:
    """Write one image's CAMs atomically as float16 (keys as int64). Returns the file's path."""
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    cam = np.asarray(cam, dtype=np.float16)
    hr_cam = np.asarray(hr_cam, dtype=np.float16)
    if cam.ndim != 3 or hr_cam.ndim != 3 or cam.shape[0] != len(keys) or hr_cam.shape[0] != len(keys):
        raise CamStoreError(
            f"{shown_id(image_id)}: cam {cam.shape} and hr_cam {hr_cam.shape} must be (K, h, w) "
            f"with K = {len(keys)} keys"
        )
    if len(_id_bytes(image_id)) > MAX_ID_BYTES:
        raise CamStoreError(f"image id {shown_id(image_id)[:80]}... is longer than {MAX_ID_BYTES} bytes")
    path = cam_path(directory, image_id)
    arrays = dict(keys=keys, cam=cam, hr_cam=hr_cam)
    if path.name.startswith(DIGEST_MARK):
        arrays[ID_ARRAY] = np.frombuffer(_id_bytes(image_id), dtype=np.uint8)
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return path


# ---------------------------------------------------------------------------------------------
# Reading: headers first, then the arrays


@dataclass
class CamRecord:
    id: str
    keys: np.ndarray  # int64 (K,), channel indices 0..C-1
    cam: np.ndarray  # float16 (K, h4, w4)
    hr_cam: np.ndarray  # float16 (K, H, W)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.hr_cam.shape[1]), int(self.hr_cam.shape[2])


def _header(z: zipfile.ZipFile, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype that member ``{name}.npy`` declares (its data is not read)."""
    with z.open(name + ".npy") as f:
        major, _ = np.lib.format.read_magic(f)
        if major not in (1, 2):
            raise ValueError(f"{name}.npy is npy format version {major}; expected 1 or 2")
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return shape, dtype


def _read_array(z: zipfile.ZipFile, name: str) -> np.ndarray:
    with z.open(name + ".npy") as f:  # reading the whole member checks its CRC
        return np.lib.format.read_array(f, allow_pickle=False)


def _check_headers(
    where: str,
    declared: dict[str, tuple[tuple[int, ...], np.dtype]],
    size: tuple[int, int] | None,
    size_of: str,
    num_classes: int,
) -> None:
    """Refuse (naming ``where``) declared shapes and dtypes that are not what puzzlecam.infer writes."""
    (keys_shape, keys_dtype), (cam_shape, cam_dtype), (hr_shape, hr_dtype) = (declared[n] for n in ARRAY_NAMES)
    if len(keys_shape) != 1 or keys_dtype.kind not in "iu":
        raise CamStoreError(f"{where}: 'keys' must be a 1-D integer array, got {keys_dtype} {keys_shape}")
    k = keys_shape[0]
    if k > num_classes:
        raise CamStoreError(f"{where} holds {k} keys; an image has at most {num_classes} classes")
    if len(cam_shape) != 3 or len(hr_shape) != 3 or cam_shape[0] != k or hr_shape[0] != k:
        raise CamStoreError(f"{where} has cam {cam_shape} and hr_cam {hr_shape}; expected (K, h, w) with K = {k}")
    if cam_dtype != np.float16 or hr_dtype != np.float16:
        raise CamStoreError(
            f"{where}: cam and hr_cam must be float16 (as puzzlecam.infer writes them), got {cam_dtype} and {hr_dtype}"
        )
    height, width = hr_shape[1:]
    problem = image_size_problem(height, width)
    if problem is not None:
        raise CamStoreError(f"{where}: hr_cam refused before loading: {problem}")
    if size is not None and (height, width) != tuple(size):
        raise CamStoreError(
            f"{where} holds hr_cam of {height}x{width} but {size_of} is {size[0]}x{size[1]} "
            "(CAMs from another data set or resolution?)"
        )
    if tuple(cam_shape[1:]) != strided_size((height, width), CAM_STRIDE):
        raise CamStoreError(
            f"{where} has cam of {cam_shape[1]}x{cam_shape[2]}; the stride-{CAM_STRIDE} size of "
            f"{height}x{width} is {'x'.join(map(str, strided_size((height, width), CAM_STRIDE)))}"
        )
    if ID_ARRAY in declared:
        id_shape, id_dtype = declared[ID_ARRAY]
        if len(id_shape) != 1 or id_dtype != np.uint8 or id_shape[0] > MAX_ID_BYTES:
            raise CamStoreError(f"{where}: 'id' must be at most {MAX_ID_BYTES} uint8 bytes, got {id_dtype} {id_shape}")


def _check_values(where: str, arrays: dict[str, np.ndarray], num_classes: int) -> None:
    keys = arrays.get("keys", np.zeros(0, np.int64))
    bad = keys[(keys < 0) | (keys >= num_classes)]
    if bad.size:
        raise CamStoreError(f"{where}: keys {bad.tolist()} outside the channel indices 0..{num_classes - 1}")
    for name in ("cam", "hr_cam"):
        if name in arrays and not np.isfinite(arrays[name]).all():
            raise CamStoreError(f"{where}: {name} holds NaN or infinite values")


def _load(
    path: Path,
    label: str,
    names: tuple[str, ...],
    *,
    num_classes: int,
    size: tuple[int, int] | None = None,
    size_of: str = "the image",
) -> tuple[dict[str, tuple[tuple[int, ...], np.dtype]], dict[str, np.ndarray]]:
    """The declared (shape, dtype) of every array and the loaded arrays ``names`` of a CAM file; nothing
    is loaded before every header passed the checks."""
    if not path.is_file():
        raise CamStoreError(f"{label}: no CAM file {path}")
    if not zipfile.is_zipfile(path):
        raise CamStoreError(f"{label}: CAM file {path} is not an npz (zip) archive (truncated or overwritten?)")
    where = f"{label}: CAM file {path}"
    try:
        with zipfile.ZipFile(path) as z:
            members = [n[: -len(".npy")] for n in z.namelist() if n.endswith(".npy")]
            missing = [n for n in ARRAY_NAMES if n not in members]
            if missing:
                raise CamStoreError(f"{where} lacks arrays {missing} (has {members})")
            declared = {n: _header(z, n) for n in (*ARRAY_NAMES, ID_ARRAY) if n in members}
            pickled = [n for n, (_, dtype) in declared.items() if dtype.hasobject]
            if pickled:
                raise CamStoreError(f"{label}: cannot read CAM file {path}: {pickled} hold Python objects (refused)")
            _check_headers(where, declared, size, size_of, num_classes)
            arrays = {n: _read_array(z, n) for n in names if n in declared}
    except CamStoreError:
        raise
    except Exception as e:  # truncated zip, bad CRC, a malformed header, ...
        raise CamStoreError(f"{label}: cannot read CAM file {path}: {type(e).__name__}: {e}") from None
    _check_values(where, arrays, num_classes)
    return declared, arrays


def _stored_id(arrays: dict[str, np.ndarray], where: str) -> str:
    if ID_ARRAY not in arrays:
        raise CamStoreError(f"{where} is named by a digest but holds no 'id' array")
    try:
        return arrays[ID_ARRAY].tobytes().decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise CamStoreError(f"{where}: its 'id' array is not UTF-8") from None


def read_cam(
    directory: str | Path,
    image_id: str,
    *,
    size: tuple[int, int] | None = None,
    size_of: str = "the image",
    num_classes: int | None = None,
) -> CamRecord:
    """Load and validate the CAMs of ``image_id``; any problem is a :class:`CamStoreError` naming the id and file.

    Before any array is loaded, the declared shapes and dtypes are checked: K at most ``num_classes``,
    float16 maps, hr_cam (K, H, W) within the pixel bound (:mod:`puzzlecam.utils.limits`) and equal to
    ``size`` when given (the image size recorded for the id, described as ``size_of`` in the message),
    cam at the stride-4 size of (H, W). Then keys must be channel indices 0..num_classes-1 and the maps finite.
    ``num_classes`` defaults to the store's (:func:`store_num_classes`).
    """
    path = cam_path(directory, image_id)
    label = shown_id(image_id)
    names = (*ARRAY_NAMES, ID_ARRAY)
    num_classes = store_num_classes(directory) if num_classes is None else num_classes
    _, arrays = _load(path, label, names, size=size, size_of=size_of, num_classes=num_classes)
    if path.name.startswith(DIGEST_MARK) and _stored_id(arrays, f"{label}: CAM file {path}") != image_id:
        raise CamStoreError(f"{label}: CAM file {path} holds the CAMs of another id")
    return CamRecord(image_id, arrays["keys"].astype(np.int64), arrays["cam"], arrays["hr_cam"])


def is_complete(directory: str | Path, image_id: str, size: tuple[int, int] | None = None) -> bool:
    """True when the CAM file of ``image_id`` exists and loads completely (a rerun skips only such images)."""
    try:
        read_cam(directory, image_id, size=size)
        return True
    except CamStoreError:
        return False


def _ids_and_paths(directory: Path, num_classes: int | None = None) -> Iterator[tuple[str, Path]]:
    """(id, path) of every CAM file; names this store does not write are skipped with a warning."""
    for path in directory.iterdir():
        name = path.name
        if not name.endswith(CAM_SUFFIX) or name.startswith("."):  # temporaries and hidden files
            continue
        stem = name[: -len(CAM_SUFFIX)]
        if stem.startswith(DIGEST_MARK):
            where = f"CAM file {path}"
            classes = store_num_classes(directory) if num_classes is None else num_classes
            image_id = _stored_id(_load(path, where, (ID_ARRAY,), num_classes=classes)[1], where)
            if file_stem(image_id) != stem:
                raise CamStoreError(f"{where} holds the CAMs of {shown_id(image_id)}, whose file name differs")
        else:
            image_id = _id_of_stem(stem)
        if image_id is None:
            log.warning("%s is not a CAM file name puzzlecam.infer writes; it is left out", path)
            continue
        yield image_id, path


def list_ids(directory: str | Path) -> list[str]:
    """Ids of the CAM files in ``directory``, sorted (dot files, such as temporaries, are not listed)."""
    d = Path(directory)
    if not d.is_dir():
        raise CamStoreError(f"CAM directory {d} does not exist")
    return sorted(image_id for image_id, _ in _ids_and_paths(d))


# ---------------------------------------------------------------------------------------------
# index.parquet


def _text(image_id: str) -> str | None:
    """``image_id`` if it is valid Unicode text (Parquet strings must be), else None."""
    try:
        image_id.encode("utf-8")
        return image_id
    except UnicodeEncodeError:
        return None


def write_index(directory: str | Path, num_classes: int | None = None) -> Path:
    """Rebuild ``index.parquet`` from the CAM files present (checks every header, loads only the keys).

    ``id`` is null for an id that is not valid Unicode (undecodable bytes in a tar header); ``file``
    still names its CAM file. Keys are checked against ``num_classes`` (default: the store's settings file's).
    """
    d = Path(directory)
    rows = []
    num_classes = store_num_classes(d) if num_classes is None else num_classes
    for image_id, path in sorted(_ids_and_paths(d, num_classes)):
        declared, arrays = _load(path, shown_id(image_id), ("keys",), num_classes=num_classes)
        _, height, width = declared["hr_cam"][0]
        rows.append((_text(image_id), path.name, height, width, [int(k) for k in arrays["keys"]]))
    table = pa.table(
        {
            "id": pa.array([r[0] for r in rows], pa.string()),
            "file": pa.array([r[1] for r in rows], pa.string()),
            "height": pa.array([r[2] for r in rows], pa.int32()),
            "width": pa.array([r[3] for r in rows], pa.int32()),
            "keys": pa.array([r[4] for r in rows], pa.list_(pa.int32())),
            "num_keys": pa.array([len(r[4]) for r in rows], pa.int32()),
        }
    )
    out = d / INDEX_NAME
    atomic_write(out, lambda f: pq.write_table(table, f))
    return out


def read_index(directory: str | Path) -> pa.Table:
    """``index.parquet`` of a store, after checking that it does not unpack to more than its store can need."""
    d = Path(directory)
    path = d / INDEX_NAME
    if not path.is_file():
        raise CamStoreError(f"no {INDEX_NAME} in {d} (run puzzlecam.infer or puzzlecam.rw to completion first)")
    try:
        meta = pq.read_metadata(path)
        files = sum(1 for p in d.iterdir() if p.name.endswith(CAM_SUFFIX) and not p.name.startswith("."))
        unpacked = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        if meta.num_rows > files or unpacked > (meta.num_rows + 1) * _MAX_INDEX_BYTES_PER_ROW:
            raise CamStoreError(
                f"{path} declares {meta.num_rows} rows of {unpacked:,} bytes for {files} CAM files in {d} "
                "(stale or not written by puzzlecam.infer or puzzlecam.rw: rerun it to completion)"
            )
        return pq.read_table(path)
    except CamStoreError:
        raise
    except Exception as e:
        raise CamStoreError(f"cannot read {path}: {type(e).__name__}: {e}") from None


def is_rw_store(directory: str | Path) -> bool:
    """True when ``directory`` holds random-walk maps of puzzlecam.rw (its ``rw.json``), not CAMs."""
    return (Path(directory) / RW_META_NAME).is_file()


def recorded_sizes(directory: str | Path) -> dict[str, tuple[int, int]]:
    """(height, width) of every id that ``index.parquet`` records; empty when the store has none."""
    if not (Path(directory) / INDEX_NAME).is_file():
        return {}
    table = read_index(directory)
    columns = (table[name].to_pylist() for name in ("id", "height", "width"))
    return {image_id: (h, w) for image_id, h, w in zip(*columns, strict=True) if image_id is not None}


# ---------------------------------------------------------------------------------------------
# A store's settings file (infer.json, rw.json) and the end of a run


def store_num_classes(directory: str | Path) -> int:
    """The classes of the network whose CAMs ``directory`` holds, as its settings file (infer.json, rw.json)
    records them; a store written before they were recorded is VOC's (20)."""
    for name in (CAM_META_NAME, RW_META_NAME):
        path = Path(directory, name)
        try:
            value = json.loads(path.read_text()).get("num_classes")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return DEFAULT.num_classes


def changed_settings(directory: str | Path, meta_name: str, meta: dict, keys: tuple[str, ...]) -> list[str]:
    """The ``keys`` whose values in ``directory/meta_name`` (an earlier run's settings) differ from ``meta``;
    none when there is no such file or it is unreadable (the run rewrites it at its end)."""
    path = Path(directory) / meta_name
    if not path.is_file():
        return []
    try:
        old = json.loads(path.read_text())
    except (ValueError, OSError):
        return []
    return [k for k in keys if not isinstance(old, dict) or old.get(k) != meta[k]]


def finish_run(directory: str | Path, counts: dict[str, int], on_rank0) -> dict[str, int]:
    """The end of a run that writes ``directory`` on every rank (a collective): ``counts`` are summed over the
    ranks, and after a barrier (every rank's files are written) rank 0 calls ``on_rank0(totals)`` (an index,
    the settings file, ...); the others wait for it. Returns the totals on every rank."""
    totals = dict(zip(counts, sum_across_ranks(list(counts.values())), strict=True))
    barrier()
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(directory).mkdir(parents=True, exist_ok=True)  # no image written: the settings still say so
        on_rank0(totals)
    barrier()
    return totals


def finish_store(directory: str | Path, meta_name: str, meta: dict, counts: dict[str, int], what: str) -> None:
    """The end of a store-writing run, on every rank (a collective): ``counts`` (written, skipped_complete,
    no_labels, corrupt_samples) are summed over the ranks; rank 0 rebuilds ``index.parquet`` from the files
    present, writes ``meta`` with the totals as ``meta_name`` and logs one line about ``what``."""
    d = Path(directory)

    def index_and_meta(totals: dict[str, int]) -> None:
        index = write_index(d, meta.get("num_classes"))
        atomic_write_json(d / meta_name, {**meta, **totals})
        log.info(
            "%s: %d written (%d without labelled classes), %d already complete, %d corrupt samples skipped, "
            "%d process(es); index %s",
            what,
            totals["written"],
            totals["no_labels"],
            totals["skipped_complete"],
            totals["corrupt_samples"],
            dist.get_world_size() if dist.is_initialized() else 1,
            index,
        )

    finish_run(d, counts, index_and_meta)


# ---------------------------------------------------------------------------------------------
# The commands' output directory

"""Image ids that are not safe file names: stored under an escaped name, recorded in the index (docs/inference.md).

Training accepts any webdataset key; inference, evaluation, pseudo-labels and overlays keep going
with the same ids: every reader maps an id to its file name through puzzlecam.camstore.
"""

from __future__ import annotations

import json
import logging
import shutil
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_infer import make_synth_shards, make_tiny_model

from puzzlecam import evaluate, infer, labels, viz
from puzzlecam.camstore import (
    MAX_NAME_BYTES,
    CamStoreError,
    cam_path,
    file_name,
    file_stem,
    list_ids,
    read_cam,
    read_index,
    recorded_sizes,
    write_cam,
    write_index,
)
from puzzlecam.data.shards import ShardWriter

PLAIN_IDS = ["2007_000032", "with space", "ünïcode", "a%b", "a.b.c", "x" * MAX_NAME_BYTES]
UNSAFE_IDS = [
    "a/b",
    "..",
    ".",
    ".hidden",
    "",
    "a\x00b",
    "line\nbreak",
    "back\\slash",
    "%41",
    "%=x",
    "x" * (MAX_NAME_BYTES + 1),
    "é/ü" * 100,  # too long even escaped: a digest name
    "\udcff",  # an undecodable byte of a tar header
]


def test_plain_ids_keep_their_names_and_others_are_escaped_reversibly(tmp_path):
    for image_id in PLAIN_IDS:
        assert file_stem(image_id) == image_id
    stems = [file_stem(image_id) for image_id in PLAIN_IDS + UNSAFE_IDS]
    assert len(set(stems)) == len(stems)
    for stem in stems:
        assert stem and not stem.startswith(".") and "/" not in stem and "\x00" not in stem
        assert len(stem.encode("utf-8", "surrogateescape")) <= MAX_NAME_BYTES
    assert file_name("a/b") == "%a%2Fb.npz" and file_name("..", ".png") == "%...png"
    hr = np.full((1, 5, 7), 0.5)
    for i, image_id in enumerate(PLAIN_IDS + UNSAFE_IDS):
        write_cam(tmp_path, image_id, [i % 20], np.zeros((1, 2, 2)), hr)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(stem + ".npz" for stem in stems)
    assert list_ids(tmp_path) == sorted(PLAIN_IDS + UNSAFE_IDS)
    for i, image_id in enumerate(PLAIN_IDS + UNSAFE_IDS):
        assert read_cam(tmp_path, image_id, size=(5, 7)).keys.tolist() == [i % 20]
    write_index(tmp_path)
    rows = read_index(tmp_path).to_pylist()
    files = {row["file"]: row["id"] for row in rows}
    for image_id in PLAIN_IDS + UNSAFE_IDS:
        recorded = files[file_name(image_id)]
        assert recorded == (None if image_id == "\udcff" else image_id)  # Parquet strings must be Unicode
    assert recorded_sizes(tmp_path)["a/b"] == (5, 7)


def test_foreign_and_swapped_files(tmp_path, caplog):
    hr = np.full((1, 5, 7), 0.5)
    long_a, long_b = "é/ü" * 100, "ü/é" * 100
    write_cam(tmp_path, long_a, [1], np.zeros((1, 2, 2)), hr)
    shutil.copy(cam_path(tmp_path, long_a), cam_path(tmp_path, long_b))  # a digest name holding another id
    with pytest.raises(CamStoreError, match="another id"):
        read_cam(tmp_path, long_b)
    cam_path(tmp_path, long_b).unlink()
    (tmp_path / "%zz.npz").write_bytes(b"not ours")  # not a name this store writes
    (tmp_path / ("y" * 230 + ".npz")).write_bytes(b"nor this")
    with caplog.at_level(logging.WARNING, logger="puzzlecam"):
        assert list_ids(tmp_path) == [long_a]
    assert "%zz.npz is not a CAM file name" in caplog.text


# ---------------------------------------------------------------------------------------------
# The whole chain on real shards whose keys are not file names


ODD_IDS = ["a/b", "../up", ".hidden/x", "", "L" * 150 + "/" + "m" * 90, "plain"]


@pytest.fixture(scope="module")
def odd_shards(tmp_path_factory):
    """Shards holding the synthetic samples under ODD_IDS (the keys training accepts)."""
    root = tmp_path_factory.mktemp("odd_ids")
    synth = make_synth_shards(root, num_images=len(ODD_IDS), unlabeled=0, shard_size=len(ODD_IDS))
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(synth / "trainval-000000.tar") as tar:
        for info in tar:
            key, _, ext = info.name.partition(".")
            members.setdefault(key, {})[ext] = tar.extractfile(info).read()
    (root / "odd").mkdir()
    writer = ShardWriter(root / "odd", "odd", shard_size=4)
    for odd_id, sample in zip(ODD_IDS, members.values(), strict=True):
        writer.add(odd_id, sample)
    writer.commit()
    return root / "odd", make_tiny_model(root / "run")


def test_infer_evaluate_labels_viz_keep_going_with_odd_ids(odd_shards, tmp_path):
    shards, weights = odd_shards
    cams = tmp_path / "cams"
    base = ["--weights", str(weights), "--shards", str(shards), "--num-workers", "0", "--device", "cpu"]
    assert infer.main(base + ["--out", str(cams), "--scales", "1.0"]) == 0
    assert list_ids(cams) == sorted(ODD_IDS)
    assert json.loads((cams / "infer.json").read_text())["written"] == len(ODD_IDS)
    index = {row["id"]: row["file"] for row in pq.read_table(cams / "index.parquet").to_pylist()}
    assert index == {image_id: file_name(image_id) for image_id in ODD_IDS}
    assert index["plain"] == "plain.npz" and index["a/b"] == "%a%2Fb.npz"
    assert all((cams / name).is_file() for name in index.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cams"]  # nothing escaped the store

    out = tmp_path / "eval"
    assert evaluate.main(["--cams", str(cams), "--shards", str(shards), "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["num_images"] == len(ODD_IDS)
    for extra in ([], ["--shards", str(shards)]):
        found = tmp_path / f"labels{len(extra)}"
        assert labels.main(["--cams", str(cams), "--threshold", "0.3", "--out", str(found), *extra]) == 0
        assert sorted(p.name for p in found.iterdir()) == sorted(file_name(i, ".png") for i in ODD_IDS)
    assert evaluate.main(["--mode", "labels", "--labels", str(tmp_path / "labels0"), "--shards", str(shards)]) == 0
    overlays = tmp_path / "viz"
    assert viz.main(["--cams", str(cams), "--shards", str(shards), "--out", str(overlays)]) == 0
    expected = sorted([file_name(i, ".png") for i in ODD_IDS] + ["grid.png"])
    assert sorted(p.name for p in overlays.iterdir()) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cams", "eval", "labels0", "labels2", "viz"]

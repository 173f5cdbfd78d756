"""The CAM store: round trip, empty images, bad files named by id, index.parquet."""

from __future__ import annotations

import numpy as np
import pytest

from puzzlecam.camstore import CamStoreError, is_complete, list_ids, read_cam, read_index, write_cam, write_index
from puzzlecam.utils.files import remove_stale_temporaries, temporary_path


def _random_cam(rng, k, h, w):
    return rng.random((k, (h - 1) // 4 + 1, (w - 1) // 4 + 1)), rng.random((k, h, w))


def test_round_trip_float16_and_empty(tmp_path):
    rng = np.random.default_rng(0)
    cam, hr = _random_cam(rng, 2, 21, 30)
    write_cam(tmp_path, "2007_000032", [4, 14], cam, hr)
    write_cam(tmp_path, "empty", [], np.zeros((0, 6, 8)), np.zeros((0, 21, 30)))
    rec = read_cam(tmp_path, "2007_000032")
    assert rec.keys.dtype == np.int64 and rec.keys.tolist() == [4, 14]
    assert rec.cam.dtype == np.float16 and rec.hr_cam.dtype == np.float16 and rec.size == (21, 30)
    np.testing.assert_array_equal(rec.hr_cam, hr.astype(np.float16))
    with np.load(tmp_path / "2007_000032.npz", allow_pickle=False) as z:  # plain arrays, no pickle
        assert sorted(z.files) == ["cam", "hr_cam", "keys"]
    empty = read_cam(tmp_path, "empty")
    assert empty.keys.shape == (0,) and empty.hr_cam.shape == (0, 21, 30) and empty.size == (21, 30)
    assert list_ids(tmp_path) == ["2007_000032", "empty"]
    write_index(tmp_path)
    rows = read_index(tmp_path).to_pylist()
    assert rows == [
        {"id": "2007_000032", "file": "2007_000032.npz", "height": 21, "width": 30, "keys": [4, 14], "num_keys": 2},
        {"id": "empty", "file": "empty.npz", "height": 21, "width": 30, "keys": [], "num_keys": 0},
    ]


def test_bad_files_are_errors_naming_the_id(tmp_path):
    rng = np.random.default_rng(1)
    cam, hr = _random_cam(rng, 1, 9, 9)
    path = write_cam(tmp_path, "truncated", [3], cam, hr)
    path.write_bytes(path.read_bytes()[:-40])
    corrupt = write_cam(tmp_path, "corrupt", [3], cam, hr)
    data = bytearray(corrupt.read_bytes())
    data[300:310] = bytes(10)  # inside hr_cam's data: the zip CRC check fails on reading
    corrupt.write_bytes(bytes(data))
    (tmp_path / "garbage.npz").write_bytes(b"\x00" * 64)
    np.savez(tmp_path / "lacking.npz", keys=np.array([1]), cam=cam)
    np.savez(tmp_path / "shapes.npz", keys=np.array([1, 2]), cam=cam, hr_cam=hr)
    np.savez(tmp_path / "pickled.npz", keys=np.array([object()], dtype=object), cam=cam, hr_cam=hr)
    for image_id, words in [
        ("truncated", "not an npz"),
        ("corrupt", "cannot read"),
        ("garbage", "not an npz"),
        ("lacking", "lacks arrays"),
        ("shapes", "expected (K, h, w)"),
        ("pickled", "cannot read"),
        ("absent", "no CAM file"),
    ]:
        with pytest.raises(CamStoreError, match=image_id) as info:
            read_cam(tmp_path, image_id)
        assert words in str(info.value)
        assert not is_complete(tmp_path, image_id)


def test_inconsistent_writes(tmp_path):
    with pytest.raises(CamStoreError, match="K = 2"):
        write_cam(tmp_path, "x", [1, 2], np.zeros((1, 2, 2)), np.zeros((1, 5, 5)))
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_temporary_files_are_not_cams(tmp_path):
    rng = np.random.default_rng(2)
    write_cam(tmp_path, "kept", [1], *_random_cam(rng, 1, 5, 5))
    stale = temporary_path(tmp_path / "dead.npz")  # a writer killed mid-file
    stale.write_bytes(b"half")
    assert list_ids(tmp_path) == ["kept"]
    write_index(tmp_path)
    assert [r["id"] for r in read_index(tmp_path).to_pylist()] == ["kept"]
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.parquet", "kept.npz"]

"""What a CAM store and a label map may make a reader allocate, and what their values may be (docs/inference.md).

Every reader checks the arrays' declared shapes and dtypes (npy headers, PNG IHDR) against the image
size recorded for the id and the pixel bound before it loads anything, and refuses keys outside the
classes and NaN maps; each refusal is one error line naming the file.
"""

from __future__ import annotations

import io
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from test_evaluate import samples, write_noisy_cams
from test_infer import REPO, make_synth_shards

from puzzlecam import labels, viz
from puzzlecam.camstore import CamStoreError, read_cam, write_cam, write_index
from puzzlecam.utils.labelmap import decode_label_png, encode_label_png
from puzzlecam.utils.limits import MAX_IMAGE_PIXELS_ENV

HUGE = (1, 30000, 30000)  # the forged hr_cam: 1.8 GB of float16 declared by a few MB of file
HUGE_BYTES = int(np.prod(HUGE)) * 2


def _npy_header(shape: tuple[int, ...], descr: str) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def forge_cam(path: Path, hr_shape: tuple[int, ...], *, keys=(0,), deflated_data: bool = False) -> Path:
    """An npz like puzzlecam.infer's whose ``hr_cam`` header declares ``hr_shape``.

    Without ``deflated_data`` the member is the bare header (a tiny file); with it, the declared
    zeros follow, deflated (the issue's 1.7 MB file that unpacks to gigabytes).
    """
    keys = np.asarray(keys, dtype=np.int64)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        z.writestr("keys.npy", _npy(keys))
        z.writestr("cam.npy", _npy(np.zeros((len(keys), 12, 12), np.float16)))
        with z.open("hr_cam.npy", "w") as f:
            f.write(_npy_header(hr_shape, "<f2"))
            left = int(np.prod(hr_shape)) * 2 if deflated_data else 0
            zeros = bytes(64 << 20)
            while left:
                f.write(zeros[: min(left, len(zeros))])
                left -= min(left, len(zeros))
    return path


# ---------------------------------------------------------------------------------------------
# read_cam: the headers are checked before anything is loaded


def test_forged_header_is_refused_before_loading(tmp_path):
    path = forge_cam(tmp_path / "big.npz", HUGE)
    with pytest.raises(CamStoreError, match="30000x30000") as info:
        read_cam(tmp_path, "big")
    assert str(path) in str(info.value) and "exceeds the bound" in str(info.value)
    with pytest.raises(CamStoreError, match="30000x30000"):
        write_index(tmp_path)
    assert not (tmp_path / "index.parquet").exists()


def test_declared_shapes_and_dtypes_are_checked(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    hr = rng.random((1, 21, 30))
    cam = rng.random((1, 6, 8))
    write_cam(tmp_path, "good", [3], cam, hr)
    assert read_cam(tmp_path, "good", size=(21, 30)).size == (21, 30)
    cases = {
        "many_keys": (dict(keys=np.arange(5_000_000)), "5000000 keys"),
        "float_keys": (dict(keys=np.array([1.0])), "'keys'"),
        "float32": (dict(cam=cam.astype(np.float32), hr_cam=hr.astype(np.float32)), "float16"),
        "stride": (dict(cam=np.zeros((1, 5, 8), np.float16)), "stride-4"),
    }
    for image_id, (arrays, words) in cases.items():
        base = dict(keys=np.array([3]), cam=cam.astype(np.float16), hr_cam=hr.astype(np.float16))
        np.savez(tmp_path / f"{image_id}.npz", **{**base, **arrays})
        with pytest.raises(CamStoreError, match=image_id) as info:
            read_cam(tmp_path, image_id)
        assert words in str(info.value) and str(tmp_path / f"{image_id}.npz") in str(info.value)
    with pytest.raises(CamStoreError, match="but the image is 20x30"):
        read_cam(tmp_path, "good", size=(20, 30))
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "600")  # 21 x 30 = 630 pixels
    with pytest.raises(CamStoreError, match=f"exceeds the bound of 600 .*{MAX_IMAGE_PIXELS_ENV}"):
        read_cam(tmp_path, "good")


@pytest.mark.parametrize("keys", [[25], [-3], [4, 25]])
def test_keys_outside_the_classes_are_refused(tmp_path, keys):
    # A store without settings is VOC's (keys 0..19); one whose infer.json records 80 classes (COCO) takes 0..79.
    write_cam(tmp_path, "x", keys, np.zeros((len(keys), 2, 2)), np.zeros((len(keys), 5, 5)))
    with pytest.raises(CamStoreError, match=r"keys .* outside the channel indices 0\.\.19"):
        read_cam(tmp_path, "x")
    coco = tmp_path / "coco"
    coco.mkdir()
    (coco / "infer.json").write_text(json.dumps({"num_classes": 80}))
    write_cam(coco, "x", keys, np.zeros((len(keys), 2, 2)), np.zeros((len(keys), 5, 5)))
    if -3 in keys:
        with pytest.raises(CamStoreError, match=r"outside the channel indices 0\.\.79"):
            read_cam(coco, "x")
    else:
        assert read_cam(coco, "x").keys.tolist() == keys
    with pytest.raises(CamStoreError, match=r"outside the channel indices 0\.\.9"):
        read_cam(coco, "x", num_classes=10)


def test_nan_maps_are_refused(tmp_path):
    hr = np.full((1, 5, 5), 0.5)
    hr[0, 2, 3] = np.nan
    write_cam(tmp_path, "x", [1], np.zeros((1, 2, 2)), hr)
    with pytest.raises(CamStoreError, match="NaN"):
        read_cam(tmp_path, "x")


# ---------------------------------------------------------------------------------------------
# The commands: labels and viz refuse what evaluate refuses, one line each


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_synth_shards(tmp_path_factory.mktemp("limits"), num_images=4, unlabeled=0)


def _one_error_line(stderr: str, *names: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for name in names:
        assert name in lines[0], stderr


def _spoil(cams: Path, image_id: str, keys, hr_value=None) -> None:
    hr = read_cam(cams, image_id).hr_cam.astype(np.float32)[:1].repeat(len(keys), 0)
    if hr_value is not None:
        hr[:, 0, 0] = hr_value
    write_cam(cams, image_id, keys, np.zeros((len(keys),) + tuple(-(-s // 4) for s in hr.shape[1:])), hr)


@pytest.mark.parametrize("spoil", [dict(keys=[25]), dict(keys=[4, -3]), dict(keys=[4], hr_value=np.nan)])
def test_labels_and_viz_refuse_bad_keys_and_nan(shards, tmp_path, capsys, spoil):
    cams = tmp_path / "cams"
    cams.mkdir()
    write_noisy_cams(cams, shards)
    image_id = samples(shards)[0][0]
    _spoil(cams, image_id, **spoil)
    assert labels.main(["--cams", str(cams), "--threshold", "0.3", "--out", str(tmp_path / "labels")]) == 2
    _one_error_line(capsys.readouterr().err, image_id, str(cams / f"{image_id}.npz"))
    assert not (tmp_path / "labels" / f"{image_id}.png").exists()
    assert viz.main(["--cams", str(cams), "--shards", str(shards), "--out", str(tmp_path / "viz")]) == 2
    _one_error_line(capsys.readouterr().err, image_id, str(cams / f"{image_id}.npz"))


def test_labels_checks_the_size_recorded_in_the_index(shards, tmp_path, capsys):
    cams = tmp_path / "cams"
    cams.mkdir()
    write_noisy_cams(cams, shards)
    write_index(cams)
    image_id = samples(shards)[1][0]
    record = read_cam(cams, image_id)
    h, w = record.size
    write_cam(cams, image_id, record.keys, np.zeros((len(record.keys), h // 4 + 1, (w - 1) // 4 + 1)),
              np.zeros((len(record.keys), h + 1, w)))  # fmt: skip
    assert labels.main(["--cams", str(cams), "--threshold", "0.3", "--out", str(tmp_path / "labels")]) == 2
    _one_error_line(capsys.readouterr().err, image_id, f"{h + 1}x{w}", "index.parquet", f"{h}x{w}")


# ---------------------------------------------------------------------------------------------
# Label-map PNGs: the IHDR's size is checked before decoding


def _png_declaring(height: int, width: int) -> bytes:
    """A real 1x1 palette PNG whose IHDR is rewritten to declare ``height x width`` (CRC fixed)."""
    data = bytearray(encode_label_png(np.zeros((1, 1), np.uint8)))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_label_png_above_the_bound_is_refused_before_decoding(monkeypatch):
    with pytest.raises(ValueError, match="30000x30000 .* exceeds the bound"):
        decode_label_png(_png_declaring(30000, 30000))
    real = encode_label_png(np.zeros((21, 30), np.uint8))
    assert decode_label_png(real).shape == (21, 30)
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "600")
    with pytest.raises(ValueError, match="21x30 .* exceeds the bound of 600"):
        decode_label_png(real)


def test_evaluate_checks_a_label_maps_size_before_decoding(shards, tmp_path, capsys):
    from puzzlecam import evaluate

    found = tmp_path / "labels"
    found.mkdir()
    ids = []
    for image_id, _, mask in samples(shards):
        (found / f"{image_id}.png").write_bytes(encode_label_png(mask))
        ids.append(image_id)
    (found / f"{ids[2]}.png").write_bytes(_png_declaring(9000, 9000))  # under the bound; not the mask's size
    assert evaluate.main(["--mode", "labels", "--labels", str(found), "--shards", str(shards)]) == 2
    _one_error_line(capsys.readouterr().err, str(found / f"{ids[2]}.png"), "9000x9000", "but the mask is")


# ---------------------------------------------------------------------------------------------
# The case end to end: a few MB that unpack to 1.8 GB, in a process whose memory is measured


AS_LIMIT = 4 << 30  # room for the declared array, so that an unchecked reader shows in its peak RSS


# Runs a module as __main__ and writes the peak RSS of this process image (VmHWM, KiB) to the file named by
# $PEAK_FILE at exit. (A fork's ru_maxrss would include pytest's own RSS at fork time: the child's pre-exec
# image is the parent's.)
_PEAK_WRAPPER = """
import atexit, os, runpy, sys
def report():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            open(os.environ["PEAK_FILE"], "w").write(line.split()[1])
atexit.register(report)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def _run_measured(*args: str, env: dict | None = None) -> tuple[int, str, int]:
    """(exit status, stderr, peak RSS in bytes) of ``python -m ARGS`` under an address-space limit."""

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))

    with tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp, "peak_kib")
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PEAK_FILE": str(peak_file), **(env or {})}
        proc = subprocess.run(
            [sys.executable, "-c", _PEAK_WRAPPER, *args],
            cwd=REPO,
            env=full_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=limit,
        )
        peak_kib = int(peak_file.read_text())
    return proc.returncode, proc.stderr.decode(), peak_kib * 1024


@pytest.mark.slow
def test_forged_cam_is_refused_without_growing_memory(shards, tmp_path):
    cams = tmp_path / "cams"
    cams.mkdir()
    write_noisy_cams(cams, shards)
    image_id = samples(shards)[0][0]
    forged = forge_cam(cams / f"{image_id}.npz", HUGE, deflated_data=True)
    assert forged.stat().st_size < 20 << 20
    commands = {
        "evaluate": ["puzzlecam.evaluate", "--cams", str(cams), "--shards", str(shards)],
        "labels": ["puzzlecam.labels", "--cams", str(cams), "--threshold", "0.3", "--out", str(tmp_path / "l")],
        "viz": ["puzzlecam.viz", "--cams", str(cams), "--shards", str(shards), "--out", str(tmp_path / "v")],
    }
    for name, argv in commands.items():
        code, stderr, peak = _run_measured(*argv)
        assert code == 2, (name, stderr)
        _one_error_line(stderr, str(forged), "30000x30000")
        assert peak < HUGE_BYTES // 2, (name, peak)

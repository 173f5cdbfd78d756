"""CAM stores, label maps and overlays on a full or read-only disk (a real 2 MiB tmpfs, docs/inference.md).

Each failure is one `error:` line naming the disk and the path, exit 1, no traceback; no temporary
file is left, and an --out that the failed run created and left empty is removed again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_infer import make_synth_shards, make_tiny_model

from puzzlecam import infer, labels, viz
from puzzlecam.camstore import write_cam

FILLER = ".filler"  # the file SmallDisk.fill writes


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("store_disk")
    return make_synth_shards(root, num_images=4), make_tiny_model(root / "run")


def _files(root: Path) -> dict[str, int]:
    """Every file and directory under ``root`` (temporaries included), with its size."""
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.name != FILLER}


def _one_error_line(stderr: str, starts: str, path: Path) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"error: {starts} tmpfs (mounted at "), stderr
    assert str(path) in lines[0] and "Traceback" not in stderr


def test_infer_on_a_full_disk_and_when_only_the_index_does_not_fit(inputs, small_disk, capsys):
    shards, weights = inputs
    cams = small_disk.path / "cams"
    argv = ["--weights", str(weights), "--shards", str(shards), "--out", str(cams), "--num-workers", "0"]
    argv += ["--scales", "1.0", "--device", "cpu"]
    small_disk.fill()
    assert infer.main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no space left on tmpfs (mounted at "), captured.err
    assert str(cams) in lines[0] and lines[0].endswith(".npz")
    assert _files(small_disk.path) == {}  # no temporary, no empty --out

    (small_disk.path / FILLER).unlink()
    assert infer.main(argv) == 0
    capsys.readouterr()
    (cams / "index.parquet").unlink()
    before = _files(small_disk.path)
    small_disk.fill()
    assert infer.main(argv) == 1  # every image is complete: only the index is written, and it does not fit
    _one_error_line(capsys.readouterr().err, "no space left on", cams / "index.parquet")
    assert _files(small_disk.path) == before


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_labels_on_a_read_only_disk(tmp_path, small_disk, capsys, jobs):
    cams = tmp_path / "cams"
    write_cam(cams, "a", [0], np.zeros((1, 2, 2)), np.full((1, 5, 5), 0.9))
    write_cam(cams, "b", [3], np.zeros((1, 2, 2)), np.full((1, 5, 5), 0.2))
    out = small_disk.path / "labels"
    small_disk.make_read_only()
    assert labels.main(["--cams", str(cams), "--threshold", "0.5", "--out", str(out), "--jobs", jobs]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: read-only file system tmpfs (mounted at "), err
    assert str(out) in lines[0]
    assert _files(small_disk.path) == {}


def test_viz_and_labels_on_a_full_disk(inputs, tmp_path, small_disk, capsys):
    from test_evaluate import write_noisy_cams

    shards, _ = inputs
    cams = tmp_path / "cams"
    cams.mkdir()
    write_noisy_cams(cams, shards)
    small_disk.fill()
    overlays = small_disk.path / "viz"
    assert viz.main(["--cams", str(cams), "--shards", str(shards), "--out", str(overlays)]) == 1
    _one_error_line(capsys.readouterr().err, "no space left on", overlays)
    found = small_disk.path / "labels"
    assert labels.main(["--cams", str(cams), "--threshold", "0.3", "--out", str(found)]) == 1
    _one_error_line(capsys.readouterr().err, "no space left on", found)
    assert _files(small_disk.path) == {}  # no temporary, no empty --out

"""`python -m puzzlecam.data shard` / `synth` on a full or read-only disk (a real 2 MiB tmpfs, docs/data.md).

Each failure is one `error:` line naming the disk and the path, exit 1, no traceback; nothing temporary or
partial is left and the earlier complete output of the same directory is untouched.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from puzzlecam.data.__main__ import main as data_main
from puzzlecam.data.shard import shard_dataset
from puzzlecam.data.synth import synthesize

FILLER = ".filler"  # the file SmallDisk.fill writes


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    out = tmp_path_factory.mktemp("disk") / "voc"
    synthesize(out, num_images=8, size=64, seed=0, val_fraction=0.5)
    return out


def _contents(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (temporaries included) by relative path, with its bytes."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != FILLER
    }


def _data(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "puzzlecam.data", *argv], capture_output=True, text=True, timeout=120)


def _one_error_line(stderr: str, starts: str, path: Path) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"error: {starts} tmpfs (mounted at "), stderr
    assert str(path) in lines[0] and "Traceback" not in stderr


@pytest.mark.slow
def test_shard_on_a_full_disk_then_a_read_only_one(voc, small_disk):
    shards = small_disk.path / "shards"
    shard = ["shard", "--voc-root", str(voc), "--out", str(shards)]
    assert _data(*shard, "--split", "val").returncode == 0
    before = _contents(small_disk.path)
    small_disk.fill()
    full = _data(*shard, "--split", "train")
    assert full.returncode == 1 and full.stdout == ""
    _one_error_line(full.stderr, "no space left on", shards / "train-000000.tar")
    assert _contents(small_disk.path) == before  # the val output is untouched, no temporary is left
    small_disk.make_read_only()
    read_only = _data(*shard, "--split", "val", "--overwrite")
    assert read_only.returncode == 1
    _one_error_line(read_only.stderr, "read-only file system", shards / "val-000000.tar")
    assert _contents(small_disk.path) == before


def test_shard_when_the_shards_fit_but_the_manifest_does_not(voc, small_disk, tmp_path, capsys):
    # The same shards written elsewhere say how much room they take; leave exactly that much (whole pages).
    elsewhere = shard_dataset(voc, out=tmp_path / "elsewhere", split="train")
    page = 4096
    room = sum(-(-p.stat().st_size // page) * page for p in elsewhere.shards)
    shards = small_disk.path / "shards"
    assert data_main(["shard", "--voc-root", str(voc), "--split", "val", "--out", str(shards)]) == 0
    capsys.readouterr()
    before = _contents(small_disk.path)
    small_disk.fill(leave_bytes=room)
    assert data_main(["shard", "--voc-root", str(voc), "--split", "train", "--out", str(shards)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    _one_error_line(captured.err, "no space left on", shards / "manifest.parquet")
    # No train shard was renamed into place without its manifest rows.
    assert _contents(small_disk.path) == before


@pytest.mark.slow
def test_synth_on_a_full_disk_then_a_read_only_one(small_disk):
    out = small_disk.path / "voc"
    synth = ["synth", "--out", str(out), "--size", "64"]
    assert _data(*synth, "--num-images", "2").returncode == 0
    before = _contents(small_disk.path)
    small_disk.fill(leave_bytes=16 << 10)
    full = _data(*synth, "--num-images", "40", "--overwrite")
    assert full.returncode == 1 and full.stdout == ""
    _one_error_line(full.stderr, "no space left on", out)
    assert _contents(small_disk.path) == before
    assert sorted(p.name for p in small_disk.path.iterdir()) == [FILLER, "voc"]
    small_disk.make_read_only()
    read_only = _data(*synth, "--num-images", "2", "--overwrite")
    assert read_only.returncode == 1
    _one_error_line(read_only.stderr, "read-only file system", out)
    assert _contents(small_disk.path) == before


def test_synth_in_process_on_a_full_disk(small_disk, capsys):
    out = small_disk.path / "voc"
    small_disk.fill(leave_bytes=16 << 10)
    assert data_main(["synth", "--out", str(out), "--size", "64", "--num-images", "40"]) == 1
    captured = capsys.readouterr()
    _one_error_line(captured.err, "no space left on", out)
    assert sorted(p.name for p in small_disk.path.iterdir()) == [FILLER]

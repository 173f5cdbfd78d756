"""`python -m puzzlecam.data` as a command: library errors, exit codes, report and log streams, atomic output."""

import subprocess
import sys
import tarfile

import pytest

from puzzlecam.data.__main__ import main as data_main
from puzzlecam.data.shard import LISTED_PROBLEMS, ShardResult, shard_dataset
from puzzlecam.data.shards import ShardWriter
from puzzlecam.data.synth import SynthResult, synthesize
from puzzlecam.errors import DataError, UsageError
from puzzlecam.utils.files import is_temporary


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "voc"
    result = synthesize(out, num_images=6, size=32, seed=0, classes=["cat", "dog"], val_fraction=0.5)
    assert isinstance(result, SynthResult) and result.out == out
    assert result.splits["val"] == ["synth_000003", "synth_000004", "synth_000005"]
    assert result.classes == [7, 11]
    return out


def test_shard_dataset_returns_what_it_wrote(voc, tmp_path):
    result = shard_dataset(voc, out=tmp_path, split="trainval", shard_size=4)
    assert isinstance(result, ShardResult) and result.split == "trainval" and not result.skipped
    assert [p.name for p in result.shards] == ["trainval-000000.tar", "trainval-000001.tar"]
    assert [r["id"] for r in result.rows] == [f"synth_{i:06d}" for i in range(6)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.parquet", *[p.name for p in result.shards]]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"split": "train", "shard_size": 0}, UsageError, "--shard-size must be >= 1, got 0"),
        ({"split": "train", "on_error": "ignore"}, UsageError, "--on-error"),
        ({"split": "bogus"}, UsageError, "--split 'bogus' is not one of"),
        ({}, UsageError, "--split NAME or --list FILE"),
        ({"split": "train_aug"}, DataError, "--sbd-root"),
    ],
)
def test_shard_dataset_bad_usage_names_the_flag(voc, tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        shard_dataset(voc, out=tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_list_files_empty_missing_or_badly_named(voc, tmp_path):
    with pytest.raises(DataError, match="--list .*gone.txt: no such file"):
        shard_dataset(voc, out=tmp_path, list_file=tmp_path / "gone.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(DataError, match="holds no image ids"):
        shard_dataset(voc, out=tmp_path, list_file=empty)
    dashed = tmp_path / "my-list.txt"
    dashed.write_text("synth_000000\n")
    with pytest.raises(UsageError, match="pass --split NAME"):
        shard_dataset(voc, out=tmp_path, list_file=dashed)
    assert [r["id"] for r in shard_dataset(voc, out=tmp_path, list_file=dashed, split="mine").rows] == ["synth_000000"]


def test_missing_inputs_are_listed_first_twenty_and_a_count(tmp_path):
    voc = tmp_path / "voc"
    synthesize(voc, num_images=LISTED_PROBLEMS + 5, size=32, seed=1)
    for jpeg in (voc / "JPEGImages").glob("*.jpg"):
        jpeg.unlink()
    with pytest.raises(DataError) as caught:
        shard_dataset(voc, out=tmp_path / "out", split="trainval")
    lines = str(caught.value).splitlines()
    assert lines[0].startswith(f"{LISTED_PROBLEMS + 5} missing input file(s); nothing was written")
    assert len(lines) == 1 + LISTED_PROBLEMS + 1 and lines[-1] == "  ... and 5 more"
    assert lines[1] == f"  synth_000000: JPEG missing ({voc / 'JPEGImages' / 'synth_000000.jpg'})"
    # Skipping every image leaves nothing to write: an error too, and no file.
    with pytest.raises(DataError, match="no image of split 'trainval' could be read"):
        shard_dataset(voc, out=tmp_path / "out", split="trainval", on_error="skip")
    assert not list((tmp_path / "out").iterdir())


def test_synthesize_bad_arguments_and_overwrite(voc, tmp_path):
    for kwargs, match in (
        ({"num_images": 0}, "--num-images must be >= 1"),
        ({"size": 16}, "--size must be >= 32"),
        ({"val_fraction": 1.0}, r"--val-fraction must be in \[0, 1\)"),
        ({"classes": ["cat", "unicorn"]}, r"--classes: unknown class\(es\) \['unicorn'\]"),
        ({"classes": []}, "--classes: give at least one class"),
    ):
        with pytest.raises(UsageError, match=match):
            synthesize(tmp_path / "s", **{"num_images": 2, "size": 32, "seed": 0, **kwargs})
    assert not list(tmp_path.iterdir())
    with pytest.raises(UsageError, match="exists; pass --overwrite"):
        synthesize(voc, num_images=2, size=32, seed=0)
    out = tmp_path / "s"
    synthesize(out, num_images=2, size=32, seed=0)
    synthesize(out, num_images=3, size=32, seed=0, overwrite=True)
    assert len(list((out / "JPEGImages").iterdir())) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # the temporary folder was renamed, none is left


def test_shard_writer_commits_or_leaves_nothing(tmp_path):
    def fill(writer):
        for i in range(3):
            writer.add(f"k{i}", {"json": b"{}", "jpg": b"x" * (i + 1)})

    aborted = ShardWriter(tmp_path, "s", 2)
    fill(aborted)
    assert all(is_temporary(tmp) for tmp, _ in aborted.written)
    aborted.abort()
    assert not list(tmp_path.iterdir())
    committed = ShardWriter(tmp_path, "s", 2)
    fill(committed)
    assert [p.name for p in committed.commit()] == ["s-000000.tar", "s-000001.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s-000000.tar", "s-000001.tar"]
    with tarfile.open(tmp_path / "s-000001.tar") as tf:
        assert tf.getnames() == ["k2.jpg", "k2.json"]


def test_report_on_stdout_warnings_on_stderr_and_log_level(voc, tmp_path, capsys):
    broken = tmp_path / "voc"
    synthesize(broken, num_images=3, size=32, seed=0)
    (broken / "JPEGImages" / "synth_000001.jpg").write_bytes(b"not a jpeg")
    base = ["shard", "--voc-root", str(broken), "--split", "trainval", "--on-error", "skip", "--overwrite"]
    assert data_main([*base, "--out", str(tmp_path / "s")]) == 0
    captured = capsys.readouterr()
    assert "trainval: wrote 2 images in 1 shard(s)" in captured.out and "skipped: 1" in captured.out
    assert captured.err.startswith("warning: skipping synth_000001: unreadable")
    assert "warning: skipped 1 image(s)" in captured.err and "warning:" not in captured.out
    # --log-level works after the subcommand and before it.
    out = ["--out", str(tmp_path / "s")]
    for argv in ([*base, *out, "--log-level", "error"], ["--log-level", "error", *base, *out]):
        assert data_main(argv) == 0
        captured = capsys.readouterr()
        assert "wrote 2 images" in captured.out and captured.err == ""
    assert data_main(["synth", "--out", str(tmp_path / "v2"), "--num-images", "4", "--size", "32"]) == 0
    assert "wrote 4 images (3 train, 1 val) of 8 classes" in capsys.readouterr().out


def test_command_exit_codes_in_a_subprocess(voc, tmp_path):
    def data(*argv):
        return subprocess.run(
            [sys.executable, "-m", "puzzlecam.data", *argv], capture_output=True, text=True, timeout=120
        )

    bad = data("shard", "--voc-root", str(tmp_path / "none"), "--split", "val", "--out", str(tmp_path / "o"))
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == f"error: --voc-root {tmp_path / 'none'}: no JPEGImages folder (expected VOCdevkit/VOC2012)\n"
    usage = data("shard", "--voc-root", str(voc), "--split", "nosuch", "--out", str(tmp_path / "o"))
    assert usage.returncode == 2 and "invalid choice" in usage.stderr  # argparse's own check
    good = data("shard", "--voc-root", str(voc), "--split", "val", "--out", str(tmp_path / "o"))
    assert good.returncode == 0 and "val: wrote 3 images" in good.stdout and good.stderr == ""


def test_synth_layout_changes_the_scenes_and_the_default_keeps_them(tmp_path):
    import numpy as np
    from PIL import Image

    from puzzlecam.data.synth import DEFAULT_LAYOUT, parse_layout

    assert parse_layout("1-3:0.3-0.6") == DEFAULT_LAYOUT
    for bad in ("1-3", "0-3:0.3-0.6", "3-1:0.3-0.6", "1-3:0.05-0.6", "a-b:c-d"):
        with pytest.raises(UsageError, match="--layout"):
            parse_layout(bad)
    default, same, other = tmp_path / "d", tmp_path / "s", tmp_path / "o"
    synthesize(default, num_images=6, size=64, seed=5)
    synthesize(same, num_images=6, size=64, seed=5, layout=parse_layout("1-3:0.3-0.6"))
    synthesize(other, num_images=6, size=64, seed=5, layout=parse_layout("4-4:0.15-0.2"))

    def objects(root):
        return [(root / "Annotations" / f"synth_{i:06d}.xml").read_text().count("<object>") for i in range(6)]

    def masks(root):
        return [np.array(Image.open(root / "SegmentationClass" / f"synth_{i:06d}.png")) for i in range(6)]

    assert all(np.array_equal(a, b) for a, b in zip(masks(default), masks(same), strict=True))
    assert all(1 <= n <= 3 for n in objects(default))
    # Four small objects (a few may not fit): more objects, each a small part of the image.
    assert sum(objects(other)) > sum(objects(default))
    assert np.mean([(m > 0).mean() for m in masks(other)]) < np.mean([(m > 0).mean() for m in masks(default)])

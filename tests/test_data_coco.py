"""`python -m puzzlecam.data shard --coco-images` and `synth --format coco`: labels and masks against pycocotools
itself, crowd and annotation order, images without annotations, workers, bad input, the command line."""

import copy
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

pytest.importorskip("pycocotools", reason="pycocotools is not installed (pip install pycocotools)")
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO as CocoApi

from puzzlecam.data.__main__ import build_parser
from puzzlecam.data.__main__ import main as data_main
from puzzlecam.data.coco import CATEGORY_IDS, rle_string_counts, shard_coco
from puzzlecam.data.synth import synthesize
from puzzlecam.data.synth_coco import synthesize_coco
from puzzlecam.datasets import COCO
from puzzlecam.errors import DataError, RunError, UsageError
from puzzlecam.utils.files import is_temporary
from puzzlecam.utils.labelmap import decode_label_png

SPLIT = "train2014"
# pycocotools 2.0.x decoding under numpy 2 warns on every call; the warning is about pycocotools, not us.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn.t accept a copy:DeprecationWarning")


def _paths(root, split=SPLIT):
    return root / split, root / "annotations" / f"instances_{split}.json"


def _read_tars(out, split=SPLIT):
    """{key: {ext: bytes}} of every shard of the split, and the keys in shard order."""
    samples, order = {}, []
    for tar in sorted(out.glob(f"{split}-*.tar")):
        with tarfile.open(tar) as tf:
            for member in tf.getmembers():
                key, _, ext = member.name.partition(".")
                if key not in samples:
                    order.append(key)
                samples.setdefault(key, {})[ext] = tf.extractfile(member).read()
    return samples, order


def _expected(ann_file):
    """What design.md §11 says each image must become, computed with pycocotools' own COCO API:
    {key: (labels, mask)} for the images with annotations, and the keys of the others."""
    api = CocoApi(str(ann_file))
    label_of = {cat_id: k for k, cat_id in enumerate(sorted(api.getCatIds()))}
    expected, empty = {}, []
    for img_id, img in api.imgs.items():
        key = img["file_name"].rsplit(".", 1)[0]
        anns = api.loadAnns(api.getAnnIds(imgIds=[img_id], iscrowd=None))  # file order
        if not anns:
            empty.append(key)
            continue
        mask = np.zeros((img["height"], img["width"]), np.uint8)
        crowd = np.zeros(mask.shape, bool)
        for ann in anns:
            m = api.annToMask(ann).astype(bool)
            mask[m] = label_of[ann["category_id"]] + 1
            if ann["iscrowd"]:
                crowd |= m
        mask[crowd] = 255
        expected[key] = (sorted({label_of[a["category_id"]] for a in anns}), mask)
    return expected, sorted(empty)


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco") / "set"
    result = synthesize_coco(root, num_images=40, size=64, seed=3, val_fraction=0.25)
    assert [len(result.splits[s]) for s in ("train2014", "val2014")] == [30, 10]
    return root


@pytest.fixture(scope="module")
def sharded(coco_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("coco_shards")
    result = shard_coco(*_paths(coco_set), out=out, shard_size=7)
    return out, result


def _edited(coco_set, tmp_path, edit):
    """A copy of the synthetic set whose train2014 annotation file ``edit(data)`` has changed."""
    root = tmp_path / "edited"
    shutil.copytree(coco_set, root)
    images, ann_file = _paths(root)
    data = json.loads(ann_file.read_text())
    edit(data)
    ann_file.write_text(json.dumps(data))
    return root, images, ann_file


def test_synthetic_set_has_every_kind_of_annotation(coco_set):
    data = json.loads(_paths(coco_set)[1].read_text())
    assert [c["id"] for c in data["categories"]] == list(CATEGORY_IDS)
    assert [c["name"] for c in data["categories"]] == list(COCO.classes)
    assert max(CATEGORY_IDS) == 90 and len(CATEGORY_IDS) == 80
    kinds = set()
    for ann in data["annotations"]:
        segm = ann["segmentation"]
        kind = "polygons" if isinstance(segm, list) and len(segm) > 1 else "polygon"
        if isinstance(segm, dict):
            kind = "rle" if isinstance(segm["counts"], list) else "rle_compressed"
        kinds.add((kind, ann["iscrowd"]))
    assert {("polygon", 0), ("polygons", 0), ("rle", 0), ("rle_compressed", 0), ("rle", 1), ("rle_compressed", 1)} <= (
        kinds
    )
    # Annotations are neither grouped by image nor in id order: the converter must follow the file's order.
    assert [a["id"] for a in data["annotations"]] != sorted(a["id"] for a in data["annotations"])
    image_ids = [a["image_id"] for a in data["annotations"]]
    assert image_ids != sorted(image_ids)


def test_synthetic_set_is_deterministic(tmp_path):
    a = synthesize_coco(tmp_path / "a", num_images=6, size=48, seed=1)
    synthesize_coco(tmp_path / "b", num_images=6, size=48, seed=1)
    synthesize_coco(tmp_path / "c", num_images=6, size=48, seed=2)
    files = sorted(p.relative_to(a.out) for p in a.out.rglob("*") if p.is_file())
    assert len(files) == 6 + 2
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert any((tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes() for f in files)
    assert not [p for p in tmp_path.iterdir() if is_temporary(p)]


def test_labels_and_masks_are_pycocotools_own(coco_set, sharded):
    out, result = sharded
    images, ann_file = _paths(coco_set)
    expected, empty = _expected(ann_file)
    samples, order = _read_tars(out)
    assert order == sorted(expected) and [r["id"] for r in result.rows] == order  # every image, in id order
    crowd_pixels = covered = 0
    for key, (labels, mask) in expected.items():
        sample = samples[key]
        assert sorted(sample) == ["jpg", "json", "seg.png"]
        assert sample["jpg"] == (images / f"{key}.jpg").read_bytes()  # the original bytes
        meta = json.loads(sample["json"])
        assert meta == {"dataset": "coco", "id": key, "labels": labels, "height": mask.shape[0], "width": mask.shape[1]}
        assert list(meta) == sorted(meta)
        got = decode_label_png(sample["seg.png"])
        np.testing.assert_array_equal(got, mask, err_msg=key)
        with Image.open(io.BytesIO(sample["seg.png"])) as png:
            assert png.mode == "P"
        crowd_pixels += int((got == 255).sum())
        covered += len(set(np.unique(got).tolist()) - {0, 255}) < len(labels)
    assert crowd_pixels > 0  # crowd regions are 255
    assert covered > 0  # some annotation is hidden entirely (or by a crowd): labels still name it
    assert result.without_annotations == empty and len(empty) == 3  # images 4, 14, 24 of train2014
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert rows == result.rows
    assert all(r["split"] == SPLIT and r["has_mask"] for r in rows)
    assert [r["labels"] for r in rows] == [expected[k][0] for k in order]
    assert [p.name for p in result.shards] == [f"{SPLIT}-{i:06d}.tar" for i in range(4)]  # 27 images, 7 a shard


def test_later_annotation_covers_earlier_and_crowd_is_ignored(tmp_path):
    """A hand-made file: two overlapping squares (the later one wins), a crowd RLE over both, a polygon after it."""
    root = tmp_path / "hand"
    (root / "imgs").mkdir(parents=True)
    Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(root / "imgs" / "a.jpg", quality=90)
    Image.fromarray(np.full((10, 10, 3), 60, np.uint8)).save(root / "imgs" / "b.jpg", quality=90)
    crowd = np.zeros((20, 30), np.uint8)
    crowd[0:4, 0:30] = 1
    rle = mask_utils.encode(np.asfortranarray(crowd))
    crowd_rle = {"size": rle["size"], "counts": rle["counts"].decode()}

    def square(x0, y0, x1, y1):
        return [[x0, y0, x1, y0, x1, y1, x0, y1]]

    data = {
        "images": [
            {"id": 7, "file_name": "a.jpg", "height": 20, "width": 30},
            {"id": 8, "file_name": "b.jpg", "height": 10, "width": 10},
        ],
        "categories": [{"id": i, "name": n} for i, n in zip(CATEGORY_IDS, COCO.classes, strict=True)][::-1],
        "annotations": [
            {"id": 3, "image_id": 7, "category_id": 90, "segmentation": square(2, 2, 20, 18), "iscrowd": 0},
            {"id": 1, "image_id": 7, "category_id": 1, "segmentation": square(10, 2, 28, 18), "iscrowd": 0},
            {
                "id": 2,
                "image_id": 7,
                "category_id": 13,
                "iscrowd": 1,
                "segmentation": crowd_rle,
            },
            {"id": 4, "image_id": 7, "category_id": 2, "segmentation": square(0, 0, 4, 4)},  # no iscrowd: 0
        ],
    }
    (root / "instances_x.json").write_text(json.dumps(data))
    result = shard_coco(root / "imgs", root / "instances_x.json", out=tmp_path / "out")
    assert result.split == "x" and result.without_annotations == ["b"]
    samples, _ = _read_tars(tmp_path / "out", "x")
    mask = decode_label_png(samples["a"]["seg.png"])
    assert json.loads(samples["a"]["json"])["labels"] == [0, 1, 11, 79]  # person, bicycle, stop sign, toothbrush
    assert (mask[:4] == 255).all()  # the crowd, over everything painted before or after it
    assert mask[10, 5] == 80 and mask[10, 15] == 1 and mask[10, 25] == 1  # toothbrush, then person over it
    assert mask[10, 29] == 0 and mask[19, 15] == 0
    assert CocoApi(str(root / "instances_x.json")).annToMask(data["annotations"][1])[10, 15] == 1


def test_workers_give_byte_identical_shards(coco_set, sharded, tmp_path):
    out1, result1 = sharded
    out2 = tmp_path / "w2"
    result2 = shard_coco(*_paths(coco_set), out=out2, shard_size=7, workers=2)
    names = sorted(p.name for p in out1.iterdir())
    assert names == sorted(p.name for p in out2.iterdir())
    for name in names:
        assert (out1 / name).read_bytes() == (out2 / name).read_bytes(), name
    assert result2.rows == result1.rows and result2.without_annotations == result1.without_annotations


def test_reruns_overwrite_and_split_names(coco_set, sharded, tmp_path):
    out = tmp_path / "o"
    images, ann_file = _paths(coco_set)
    template = str(ann_file).replace("train2014", "{split}")
    first = shard_coco(images, template, split=SPLIT, out=out, shard_size=4)
    assert len(first.shards) == 7
    with pytest.raises(UsageError, match="already holds output for split 'train2014'.*--overwrite"):
        shard_coco(images, ann_file, out=out)
    again = shard_coco(images, ann_file, out=out, overwrite=True)  # split from the file name; one shard now
    assert again.split == SPLIT and [p.name for p in again.shards] == [f"{SPLIT}-000000.tar"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.parquet", f"{SPLIT}-000000.tar"]
    # Another split into the same directory keeps this one's manifest rows.
    val = shard_coco(*_paths(coco_set, "val2014"), out=out)
    assert val.split == "val2014" and len(val.rows) == 9
    splits = pq.read_table(out / "manifest.parquet").column("split").to_pylist()
    assert splits.count(SPLIT) == 27 and splits.count("val2014") == 9
    with pytest.raises(UsageError, match="holds \\{split\\}: pass --split"):
        shard_coco(images, template, out=tmp_path / "p")
    with pytest.raises(UsageError, match="split name 'a-b'"):
        shard_coco(images, ann_file, split="a-b", out=tmp_path / "p")
    for kwargs, match in (({"workers": 0}, "--workers must be >= 1"), ({"shard_size": 0}, "--shard-size")):
        with pytest.raises(UsageError, match=match):
            shard_coco(images, ann_file, out=tmp_path / "p", **kwargs)


def _first(data, pred):
    return next(a for a in data["annotations"] if pred(a))


def _key(data, image_id):
    return next(i["file_name"][:-4] for i in data["images"] if i["id"] == image_id)


def _polygon(a):
    return isinstance(a["segmentation"], list)


def _bad_category(data):
    ann = _first(data, lambda a: True)
    ann["category_id"] = 12  # one of COCO's gaps
    return f"{_key(data, ann['image_id'])}: annotation {ann['id']}: category_id 12 is not one of the categories"


def _outside(data):
    ann = _first(data, _polygon)
    image = next(i for i in data["images"] if i["id"] == ann["image_id"])
    ann["segmentation"][0][2] = image["width"] + 3.5
    return (
        f"{_key(data, ann['image_id'])}: annotation {ann['id']}: polygon 0 has the point ({image['width'] + 3.5}, "
        f"{ann['segmentation'][0][3]}) outside the image [0, {image['width']}] x [0, {image['height']}]"
    )


def _unknown_image(data):
    per_image = {}
    for a in data["annotations"]:
        per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
    ann = _first(data, lambda a: per_image[a["image_id"]] > 1)  # its image keeps an annotation
    ann["image_id"] = 999999
    return f"annotation {ann['id']}: its image_id 999999 is not one of the images"


def _rle_size(data):
    ann = _first(data, lambda a: isinstance(a["segmentation"], dict))
    ann["segmentation"]["size"][1] += 1
    return f"{_key(data, ann['image_id'])}: annotation {ann['id']}: RLE size"


def _short_polygon(data):
    ann = _first(data, _polygon)
    ann["segmentation"][0] = ann["segmentation"][0][:4]
    return f"{_key(data, ann['image_id'])}: annotation {ann['id']}: polygon 0 has 4 coordinates"


def _bad_counts(data):
    ann = _first(data, lambda a: isinstance(a["segmentation"], dict) and isinstance(a["segmentation"]["counts"], str))
    ann["segmentation"]["counts"] += "1"  # one more run
    return f"{_key(data, ann['image_id'])}: annotation {ann['id']}: RLE runs cover"


def _size_mismatch(data):
    image = data["images"][0]
    image["width"] += 1
    return f"{image['file_name'][:-4]}: the JPEG is {image['width'] - 1}x{image['height']} but the annotations say"


BAD_EDITS = [_bad_category, _outside, _unknown_image, _rle_size, _short_polygon, _bad_counts, _size_mismatch]


@pytest.mark.parametrize("edit", BAD_EDITS, ids=lambda f: f.__name__.strip("_"))
def test_bad_annotations_are_named_or_skipped(coco_set, sharded, tmp_path, edit):
    said = []
    root, images, ann_file = _edited(coco_set, tmp_path, lambda data: said.append(edit(data)))
    out = tmp_path / "out"
    with pytest.raises(DataError, match="nothing was written") as caught:
        shard_coco(images, ann_file, out=out)
    assert said[0] in str(caught.value)
    assert not out.exists() or not list(out.iterdir())
    result = shard_coco(images, ann_file, out=out, on_error="skip")
    assert [str(p) for p in result.skipped if said[0] in str(p)]
    full = sharded[1].rows
    lost = 0 if edit is _unknown_image else 1  # an annotation of no image leaves every image in
    assert result.skipped_images == lost and len(result.rows) == len(full) - lost
    assert sorted(p.name for p in out.iterdir()) == ["manifest.parquet", *[p.name for p in result.shards]]


def test_polygons_outside_are_clipped_as_pycocotools_does_when_asked(coco_set, tmp_path):
    said = []
    root, images, ann_file = _edited(coco_set, tmp_path, lambda data: said.append(_outside(data)))
    result = shard_coco(images, ann_file, out=tmp_path / "out", clip_outside=True)
    expected, _ = _expected(ann_file)
    key = said[0].split(":")[0]
    samples, _ = _read_tars(tmp_path / "out")
    np.testing.assert_array_equal(decode_label_png(samples[key]["seg.png"]), expected[key][1])
    assert not result.skipped


def test_missing_and_broken_image_files(coco_set, sharded, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(coco_set, root)
    images, ann_file = _paths(root)
    keys = [r["id"] for r in sharded[1].rows]
    (images / f"{keys[0]}.jpg").unlink()
    (images / f"{keys[1]}.jpg").write_bytes((images / f"{keys[1]}.jpg").read_bytes()[:200])  # truncated
    with pytest.raises(DataError) as caught:
        shard_coco(images, ann_file, out=tmp_path / "out")
    assert f"{keys[0]}: image file missing ({images / keys[0]}.jpg)" in str(caught.value)
    result = shard_coco(images, ann_file, out=tmp_path / "out", on_error="skip", workers=2)
    assert result.skipped_images == 2 and len(result.rows) == len(keys) - 2
    assert [str(p) for p in result.skipped][1].startswith(f"{keys[1]}: unreadable: ")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"images": [], "annotations": [', "malformed JSON: Expecting value at line 1 column 32"),
        ("[1, 2]", "expected a JSON object, got a list"),
        ('{"images": [], "annotations": []}', "'categories' is missing"),
        ('{"images": [], "annotations": [], "categories": []}', "its 0 categories in id order are not COCO's 80"),
    ],
)
def test_unusable_annotation_files_name_the_file(tmp_path, text, match):
    (tmp_path / "imgs").mkdir()
    path = tmp_path / "instances_x.json"
    path.write_text(text)
    with pytest.raises(DataError, match=f"--coco-annotations {path}: .*{match}"):
        shard_coco(tmp_path / "imgs", path, out=tmp_path / "out")
    with pytest.raises(DataError, match="no such file"):
        shard_coco(tmp_path / "imgs", tmp_path / "gone.json", out=tmp_path / "out")
    with pytest.raises(DataError, match="--coco-images .*: not a folder"):
        shard_coco(tmp_path / "nope", path, out=tmp_path / "out")


def test_wrong_categories_and_duplicate_images(coco_set, tmp_path):
    def rename(data):
        data["categories"][5]["name"] = "tram"

    root, images, ann_file = _edited(coco_set, tmp_path, rename)
    with pytest.raises(DataError, match="label 5: 'tram' \\(expected 'bus'\\)"):
        shard_coco(images, ann_file, out=tmp_path / "out")

    def duplicate(data):
        data["images"].append(dict(data["images"][0], id=123456))  # same file name, another id
        data["images"].append(dict(data["images"][1], file_name="other.jpg"))  # same id, another file

    root, images, ann_file = _edited(coco_set, tmp_path / "d", duplicate)
    with pytest.raises(DataError) as caught:
        shard_coco(images, ann_file, out=tmp_path / "out")
    message = str(caught.value)
    assert f"have the same id '{json.loads(ann_file.read_text())['images'][0]['file_name'][:-4]}'" in message
    assert "other: image id" in message and "is listed twice" in message


def test_rle_string_counts_read_pycocotools_strings():
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = (rng.random((13, 17)) < rng.uniform(0.1, 0.9)).astype(np.uint8)
        rle = mask_utils.encode(np.asfortranarray(m))
        runs = rle_string_counts(rle["counts"].decode())
        flat = m.ravel(order="F")
        assert sum(runs) == flat.size
        decoded = np.concatenate([np.full(n, k % 2, np.uint8) for k, n in enumerate(runs)])
        np.testing.assert_array_equal(decoded, flat)


def test_command_line_report_and_exit_codes(coco_set, tmp_path, capsys):
    images, ann_file = _paths(coco_set)
    base = ["shard", "--coco-images", str(images), "--coco-annotations", str(ann_file)]
    assert data_main([*base, "--out", str(tmp_path / "o"), "--workers", "2", "--shard-size", "10"]) == 0
    captured = capsys.readouterr()
    assert f"{SPLIT}: wrote 27 images in 3 shard(s)" in captured.out
    assert "images: 27   without annotations (left out): 3   skipped: 0" in captured.out
    assert "toothbrush" in captured.out and captured.err == ""
    # Bad input: exit 2, "error:" on stderr naming the file, nothing on stdout.
    assert (
        data_main(
            ["shard", "--coco-images", str(images), "--coco-annotations", str(tmp_path / "x.json")]
            + ["--out", str(tmp_path / "p")]
        )
        == 2
    )
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"error: --coco-annotations {tmp_path / 'x.json'}: no such file\n"
    # Usage errors are argparse's: exit 2 with the usage line.
    for argv in (
        [*base],  # no --out
        ["shard", "--coco-images", str(images), "--out", "o"],
        ["shard", "--coco-images", str(images), "--voc-root", "v", "--coco-annotations", "a", "--out", "o"],
        [*base, "--out", "o", "--list", "ids.txt"],
        [*base, "--out", "o", "--sbd-root", "s"],
        ["shard", "--voc-root", "v", "--out", "o", "--clip-outside"],
        ["shard", "--coco-annotations", "a", "--voc-root", "v", "--out", "o"],
        [*base, "--out", "o", "--workers", "two"],
        ["synth", "--format", "coco", "--out", "o", "--num-images", "2", "--layout", "1-2:0.3-0.5"],
        ["synth", "--format", "yaml", "--out", "o", "--num-images", "2"],
    ):
        with pytest.raises(SystemExit) as caught:
            data_main(argv)
        assert caught.value.code == 2, argv
        assert "usage:" in capsys.readouterr().err
    assert data_main([*base, "--out", str(tmp_path / "o"), "--workers", "0", "--overwrite"]) == 2
    assert capsys.readouterr().err == "error: --workers must be >= 1, got 0\n"


def test_help_documents_every_flag(capsys):
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in ("shard", "synth"):
        with pytest.raises(SystemExit) as caught:
            data_main([name, "--help"])
        assert caught.value.code == 0
        text = capsys.readouterr().out
        flags = [s for a in subparsers.choices[name]._actions for s in a.option_strings if s.startswith("--")]
        new = {"shard": {"--coco-images", "--coco-annotations", "--workers", "--clip-outside"}, "synth": {"--format"}}
        assert new[name] <= set(flags)
        for flag in flags:
            assert flag in text, (name, flag)
        for action in subparsers.choices[name]._actions:
            assert action.help, (name, action.option_strings)


def test_synth_command_formats(tmp_path, capsys):
    assert (
        data_main(
            [
                "synth",
                "--format",
                "coco",
                "--out",
                str(tmp_path / "c"),
                "--num-images",
                "12",
                "--size",
                "40",
                "--classes",
                "person,traffic light",
            ]
        )
        == 0
    )
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "wrote 12 images (9 train2014, 3 val2014; 1 without annotations) of 2 COCO classes" in out
    data = json.loads((tmp_path / "c" / "annotations" / "instances_val2014.json").read_text())
    assert {a["category_id"] for a in data["annotations"]} <= {1, 10} and len(data["categories"]) == 80
    assert [i["file_name"] for i in data["images"]][0] == "COCO_val2014_000000000010.jpg"
    assert (
        data_main(
            ["synth", "--format", "coco", "--out", str(tmp_path / "d"), "--num-images", "2", "--classes", "cat,plane"]
        )
        == 2
    )
    assert "unknown COCO class(es) ['plane']" in capsys.readouterr().err
    # The VOC default is unchanged: the command writes what synthesize() writes.
    assert data_main(["synth", "--out", str(tmp_path / "v"), "--num-images", "3", "--size", "40", "--seed", "4"]) == 0
    synthesize(tmp_path / "w", num_images=3, size=40, seed=4)
    files = sorted(p.relative_to(tmp_path / "v") for p in (tmp_path / "v").rglob("*") if p.is_file())
    assert files and all((tmp_path / "v" / f).read_bytes() == (tmp_path / "w" / f).read_bytes() for f in files)


def _shard_in_a_subprocess(*args):
    command = [sys.executable, "-m", "puzzlecam.data", "shard", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_command_in_a_subprocess(coco_set, tmp_path):
    images, ann_file = _paths(coco_set, "val2014")
    run = _shard_in_a_subprocess(
        "--coco-images", images, "--coco-annotations", ann_file, "--out", tmp_path / "o", "--workers", 2
    )
    assert run.returncode == 0 and "val2014: wrote 9 images in 1 shard(s)" in run.stdout and run.stderr == ""
    data = json.loads(ann_file.read_text())
    bad = copy.deepcopy(data)
    bad["annotations"][0]["category_id"] = 91
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    run = _shard_in_a_subprocess(
        "--coco-images",
        images,
        "--coco-annotations",
        tmp_path / "bad.json",
        "--split",
        "val2014",
        "--out",
        tmp_path / "b",
    )
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith(f"error: 1 bad annotation(s) or missing image file(s) in {tmp_path / 'bad.json'}")
    assert f"annotation {bad['annotations'][0]['id']}: category_id 91 is not one of the categories" in run.stderr


def _die(image, clip_outside):
    os._exit(3)


def test_a_worker_that_dies_is_an_error_not_a_hang(coco_set, tmp_path, monkeypatch):
    import puzzlecam.data.coco as coco

    monkeypatch.setattr(coco, "convert_image", _die)  # a module-level function: the pool pickles it by name
    with pytest.raises(RunError, match="a --workers process died"):
        shard_coco(*_paths(coco_set), out=tmp_path / "o", workers=2)
    assert not list((tmp_path / "o").iterdir())

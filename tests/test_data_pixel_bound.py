"""Images whose header declares more pixels than the bound (utils.limits) are refused before decoding:
a corrupt sample in the loaders, a bad input file in `data shard` (docs/data.md)."""

import io
import json
import logging
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from puzzlecam.data import eval_loader, train_loader
from puzzlecam.data.__main__ import main as data_main
from puzzlecam.data.shards import ShardWriter
from puzzlecam.data.synth import synthesize
from puzzlecam.utils.labelmap import encode_label_png
from puzzlecam.utils.limits import MAX_IMAGE_PIXELS_ENV

# 10000 x 10000 = 100 M pixels: above PIL's 89 M warning level, below the 179 M where PIL itself refuses.
HUGE = 10000


def _jpeg(height: int, width: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def declaring(data: bytes, height: int, width: int) -> bytes:
    """``data`` (a JPEG or PNG) with a header that declares ``height x width``; the pixel data stay as they are."""
    if data.startswith(b"\x89PNG"):
        ihdr = data.index(b"IHDR")
        body = b"IHDR" + struct.pack(">II", width, height) + data[ihdr + 12 : ihdr + 17]
        return data[:ihdr] + body + struct.pack(">I", zlib.crc32(body)) + data[ihdr + 21 :]
    sof = data.index(b"\xff\xc0")  # baseline frame header: marker, length, precision, height, width
    return data[: sof + 5] + struct.pack(">HH", height, width) + data[sof + 9 :]


def test_the_forged_headers_declare_the_size():
    assert Image.open(io.BytesIO(declaring(_jpeg(16, 24), HUGE, 7))).size == (7, HUGE)
    assert Image.open(io.BytesIO(declaring(encode_label_png(np.zeros((16, 24), np.uint8)), 5, HUGE))).size == (HUGE, 5)


@pytest.fixture
def shard_with_huge_samples(tmp_path):
    """good0, good1: 16x24 images with masks; hugejpg: a JPEG declaring 10000x10000; hugemask: a good image whose
    mask declares 10000x10000."""
    jpg, mask = _jpeg(16, 24), encode_label_png(np.ones((16, 24), np.uint8))
    writer = ShardWriter(tmp_path, "bomb", 10)
    for key, members in (
        ("good0", {"jpg": jpg, "seg.png": mask}),
        ("hugejpg", {"jpg": declaring(jpg, HUGE, HUGE), "seg.png": mask}),
        ("hugemask", {"jpg": jpg, "seg.png": declaring(mask, HUGE, HUGE)}),
        ("good1", {"jpg": jpg, "seg.png": mask}),
    ):
        writer.add(key, {**members, "json": json.dumps({"id": key, "labels": [0]}).encode()})
    return writer.commit()[0]


def test_loaders_skip_and_count_images_above_the_bound(shard_with_huge_samples, caplog):
    caplog.set_level(logging.WARNING, logger="puzzlecam.data.loader")
    ev = eval_loader(str(shard_with_huge_samples))
    assert [b["id"][0] for b in ev] == ["good0", "good1"] and ev.skipped == 2
    logged = {r.getMessage() for r in caplog.records}
    for key, member in (("hugejpg", "jpg"), ("hugemask", "seg.png")):
        (line,) = [m for m in logged if f"'{key}'" in m]
        assert str(shard_with_huge_samples) in line
        assert f"{member} refused before decoding: its size {HUGE}x{HUGE} = 100,000,000 pixels exceeds" in line
    # Training decodes no mask: only hugejpg is corrupt there, and its slot goes to a good sample.
    loader = train_loader(
        str(shard_with_huge_samples), batch_size=2, seed=0, crop_size=16, min_long_side=16, max_long_side=24
    )
    ids = [i for b in loader for i in b["id"]]
    assert len(ids) == 4 and "hugejpg" not in ids and loader.skipped == 1


def test_the_bound_is_configurable(shard_with_huge_samples, monkeypatch):
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, str(16 * 24 - 1))
    ev = eval_loader(str(shard_with_huge_samples))
    assert list(ev) == [] and ev.skipped == 4


@pytest.fixture
def voc(tmp_path):
    out = tmp_path / "voc"
    synthesize(out, num_images=3, size=32, seed=0, val_fraction=0.0)
    return out


def test_shard_refuses_source_images_and_masks_above_the_bound(voc, tmp_path, capsys):
    jpeg = voc / "JPEGImages" / "synth_000001.jpg"
    jpeg.write_bytes(declaring(jpeg.read_bytes(), HUGE, HUGE))
    mask = voc / "SegmentationClass" / "synth_000002.png"
    mask.write_bytes(declaring(mask.read_bytes(), HUGE, HUGE))
    shard = ["shard", "--voc-root", str(voc), "--split", "train", "--out", str(tmp_path / "shards")]
    assert data_main(shard) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 2 bad input file(s); nothing was written")
    refused = f"refused before decoding: its size {HUGE}x{HUGE} = 100,000,000 pixels exceeds the bound of 89,478,485"
    assert f"synth_000001: {refused}" in err and str(jpeg) in err
    assert f"synth_000002: {refused}" in err and str(mask) in err
    assert "Warning" not in err  # PIL's own decompression-bomb warning is not shown besides
    assert not (tmp_path / "shards").exists() or not list((tmp_path / "shards").iterdir())
    assert data_main([*shard, "--on-error", "skip"]) == 0
    assert "wrote 1 images" in capsys.readouterr().out


def test_shard_bound_is_configurable(voc, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "100")
    assert data_main(["shard", "--voc-root", str(voc), "--split", "train", "--out", str(tmp_path / "s")]) == 2
    assert "error: 3 bad input file(s)" in capsys.readouterr().err
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "lots")
    assert data_main(["shard", "--voc-root", str(voc), "--split", "train", "--out", str(tmp_path / "s")]) == 2
    assert f"${MAX_IMAGE_PIXELS_ENV}='lots': expected a positive number of pixels" in capsys.readouterr().err

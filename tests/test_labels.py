"""Pseudo-labels: the evaluation's argmax rule, uncertain pixels, palette PNGs, CRF, errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image
from test_evaluate import samples, write_noisy_cams
from test_infer import make_synth_shards

from puzzlecam import labels as labels_cli
from puzzlecam.camstore import CamRecord, list_ids, read_cam, write_cam
from puzzlecam.evaluate import confusion_from_labels, confusion_sweep
from puzzlecam.labels import make_label_map, predict_labels
from puzzlecam.utils.labelmap import VOC_PALETTE, encode_label_png


def test_predict_labels_ties_go_to_background_and_first_key():
    hr = np.array([[[0.25, 0.5, 0.5, 0.0]], [[0.0, 0.5, 0.25, 0.75]]], dtype=np.float16)
    keys = np.array([2, 8])  # channel indices: classes 3 and 9
    assert predict_labels(hr, keys, 0.25).tolist() == [[0, 3, 3, 9]]
    assert predict_labels(np.zeros((0, 2, 3), np.float16), np.zeros(0, np.int64), 0.1).tolist() == [[0] * 3] * 2


def test_bg_threshold_marks_uncertain_pixels():
    hr = np.array([[[0.05, 0.2, 0.6]]], dtype=np.float16)
    rec = CamRecord("x", np.array([14]), hr, hr)
    assert make_label_map(rec, 0.5).tolist() == [[0, 0, 15]]
    assert make_label_map(rec, 0.5, bg_threshold=0.1).tolist() == [[0, 255, 15]]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("labels")
    shards = make_synth_shards(root)
    cams = root / "cams"
    cams.mkdir()
    write_noisy_cams(cams, shards)
    return shards, cams


def test_cli_writes_palette_pngs_consistent_with_evaluation(store, tmp_path):
    shards, cams = store
    out = tmp_path / "labels"
    assert labels_cli.main(["--cams", str(cams), "--threshold", "0.4", "--out", str(out)]) == 0
    ids = list_ids(cams)
    assert sorted(p.stem for p in out.glob("*.png")) == ids
    masks = {image_id: mask for image_id, _, mask in samples(shards)}
    for image_id in ids:
        with Image.open(out / f"{image_id}.png") as im:
            assert im.mode == "P" and im.getpalette()[: len(VOC_PALETTE)] == VOC_PALETTE
            pred = np.array(im)
        rec = read_cam(cams, image_id)
        assert (out / f"{image_id}.png").read_bytes() == encode_label_png(predict_labels(rec.hr_cam, rec.keys, 0.4))
        # The label map scored as labels equals the CAM sweep at the same threshold.
        from_labels, undecided = confusion_from_labels(torch.from_numpy(pred), torch.from_numpy(masks[image_id]))
        swept = confusion_sweep(
            torch.from_numpy(rec.hr_cam), torch.from_numpy(rec.keys) + 1, torch.from_numpy(masks[image_id]), [0.4]
        )[0]
        assert torch.equal(from_labels, swept) and int(undecided.sum()) == 0


def test_crf(store, tmp_path):
    pytest.importorskip("pydensecrf.densecrf")
    shards, cams = store
    out = tmp_path / "labels"
    assert (
        labels_cli.main(
            [
                "--cams",
                str(cams),
                "--threshold",
                "0.5",
                "--bg-threshold",
                "0.3",
                "--crf",
                "--shards",
                str(shards),
                "--out",
                str(out),
                "--crf-iters",
                "3",
                "--jobs",
                "2",
            ]
        )
        == 0
    )
    plain = tmp_path / "plain"
    assert (
        labels_cli.main(["--cams", str(cams), "--threshold", "0.5", "--bg-threshold", "0.3", "--out", str(plain)]) == 0
    )
    changed = 0
    for image_id in list_ids(cams):
        rec = read_cam(cams, image_id)
        crf = np.array(Image.open(out / f"{image_id}.png"))
        assert crf.shape == rec.size
        assert set(np.unique(crf)) <= {0, 255, *(rec.keys + 1).tolist()}
        changed += int((crf != np.array(Image.open(plain / f"{image_id}.png"))).sum())
    assert changed > 0  # the CRF did something


def test_errors(store, tmp_path, monkeypatch, capsys):
    shards, cams = store
    assert labels_cli.main(["--cams", str(cams), "--threshold", "0.5", "--crf", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "--shards" in err or "pip install .[crf]" in err
    assert (
        labels_cli.main(
            ["--cams", str(cams), "--threshold", "0.3", "--bg-threshold", "0.5", "--out", str(tmp_path / "b")]
        )
        == 2
    )
    assert "must be below" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "pydensecrf", None)  # as if the extra were not installed
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    assert (
        labels_cli.main(
            ["--cams", str(cams), "--threshold", "0.5", "--crf", "--shards", str(shards), "--out", str(tmp_path / "c")]
        )
        == 2
    )
    assert "pip install .[crf]" in capsys.readouterr().err
    monkeypatch.undo()
    broken = tmp_path / "broken"
    broken.mkdir()
    write_cam(broken, "fine", [1], np.zeros((1, 2, 2)), np.zeros((1, 5, 5)))
    (broken / "bad_one.npz").write_bytes(b"nope")
    assert labels_cli.main(["--cams", str(broken), "--threshold", "0.5", "--out", str(tmp_path / "d")]) == 2
    assert "bad_one" in capsys.readouterr().err

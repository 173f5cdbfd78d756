"""Evaluation: the one-pass sweep against a per-threshold argmax, mIoU, the CLI, bad input."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from test_infer import make_synth_shards

from puzzlecam import evaluate
from puzzlecam.camstore import write_cam
from puzzlecam.data import eval_loader
from puzzlecam.evaluate import EvaluationError, confusion_from_labels, confusion_sweep, miou, parse_thresholds
from puzzlecam.utils.labelmap import IGNORE_INDEX


def argmax_confusions(cams: np.ndarray, keys: np.ndarray, gt: np.ndarray, thresholds) -> np.ndarray:
    """The reference evaluation, written out: per threshold, argmax over [t, cams] (first max wins)."""
    out = np.zeros((len(thresholds), 21, 21), dtype=np.int64)
    for i, t in enumerate(thresholds):
        scores = np.concatenate([np.full((1,) + gt.shape, t, dtype=np.float64), cams.astype(np.float64)])
        pred = np.concatenate([[0], keys])[np.argmax(scores, axis=0)]
        for g, p in zip(gt.ravel(), pred.ravel(), strict=True):
            if g != IGNORE_INDEX:
                out[i, g, p] += 1
    return out


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_sweep_matches_per_threshold_argmax(dtype):
    rng = np.random.default_rng(7)
    # Scores on a 1/8 grid and thresholds on the same grid: many ties exactly at the threshold and
    # between classes. Unsorted thresholds with a duplicate; some classes absent from keys and gt.
    thresholds = [0.5, 0.125, 0.25, 0.75, 0.05, 0.25, 0.0, 1.0]
    for trial in range(60):
        h, w = rng.integers(1, 14, size=2)
        k = int(rng.integers(0, 5))
        keys = rng.choice(np.arange(1, 21), size=k, replace=False)
        cams = (rng.integers(0, 9, size=(k, h, w)) / 8).astype(dtype)
        gt = rng.choice(np.concatenate([[0, IGNORE_INDEX], keys, rng.integers(1, 21, 2)]), size=(h, w)).astype(np.uint8)
        got = confusion_sweep(torch.from_numpy(cams), torch.from_numpy(keys), torch.from_numpy(gt), thresholds)
        assert got.dtype == torch.int64 and got.shape == (len(thresholds), 21, 21)
        np.testing.assert_array_equal(
            got.numpy(), argmax_confusions(cams, keys, gt, thresholds), err_msg=f"trial {trial}"
        )


def test_ties_by_hand():
    cams = torch.tensor([[[0.25, 0.5, 0.5, 0.0]], [[0.0, 0.5, 0.25, 0.75]]])  # (K=2, 1, 4)
    keys = torch.tensor([3, 9])
    gt = torch.tensor([[3, 9, 3, IGNORE_INDEX]])
    conf = confusion_sweep(cams, keys, gt, [0.25])[0]
    # pixel 0: 0.25 == t -> background; pixel 1: 0.5 tie between classes -> first key (3);
    # pixel 2: class 3 at 0.5 > 0.25; pixel 3: ignored.
    expected = torch.zeros(21, 21, dtype=torch.long)
    expected[3, 0] = 1
    expected[9, 3] = 1
    expected[3, 3] = 1
    assert torch.equal(conf, expected)


def test_no_keys_is_all_background():
    gt = torch.tensor([[0, 5], [IGNORE_INDEX, 5]])
    conf = confusion_sweep(torch.zeros(0, 2, 2), torch.zeros(0, dtype=torch.long), gt, [0.1, 0.2])
    assert conf[:, 0, 0].tolist() == [1, 1] and conf[:, 5, 0].tolist() == [2, 2] and int(conf.sum()) == 6


def test_miou_by_hand():
    conf = torch.zeros(21, 21, dtype=torch.long)
    conf[0, 0], conf[0, 1], conf[1, 1] = 3, 1, 2  # bg: 3/(4+3-3); class 1: 2/(2+3-2); others absent
    m, per_class = miou(conf)
    assert per_class[0] == pytest.approx(0.75) and per_class[1] == pytest.approx(2 / 3)
    assert all(math.isnan(v) for v in per_class[2:].tolist())
    assert m == pytest.approx((0.75 + 2 / 3) / 2)
    conf[2, 0] = 5  # class 2 in the ground truth, never predicted: IoU 0 (counts in the mean)
    m, per_class = miou(conf)
    assert per_class[2] == 0 and per_class[0] == pytest.approx(3 / 9) and m == pytest.approx((3 / 9 + 2 / 3 + 0) / 3)
    stacked, per_t = miou(torch.stack([conf, conf]))
    assert stacked.shape == (2,) and per_t.shape == (2, 21)
    undecided = torch.zeros(21, dtype=torch.long)
    undecided[1] = 2  # two class-1 pixels the label map left at 255: misses for class 1
    assert miou(conf, undecided)[1][1] == pytest.approx(2 / (4 + 3 - 2))


def test_parse_thresholds():
    values = parse_thresholds("0.05:0.80:0.05")
    assert len(values) == 16 and values[0] == 0.05 and values[-1] == 0.8 and values[2] == 0.15
    assert parse_thresholds("0.3, 0.1") == [0.1, 0.3]
    for bad in ("0.5:0.1:0.1", "a,b", "0.1:0.2:0", ""):
        with pytest.raises(EvaluationError):
            parse_thresholds(bad)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(EvaluationError, match="cams must be"):
        confusion_sweep(torch.zeros(1, 3, 4), torch.tensor([2]), torch.zeros(4, 3, dtype=torch.long), [0.1])
    with pytest.raises(EvaluationError, match="keys must be class indices 1..20"):
        confusion_sweep(torch.zeros(1, 2, 2), torch.tensor([0]), torch.zeros(2, 2, dtype=torch.long), [0.1])
    with pytest.raises(EvaluationError, match=r"values \[30\]"):
        confusion_sweep(torch.zeros(1, 2, 2), torch.tensor([1]), torch.tensor([[0, 30], [1, 255]]), [0.1])
    with pytest.raises(EvaluationError, match="nan"):
        confusion_sweep(
            torch.full((1, 2, 2), float("nan")), torch.tensor([1]), torch.zeros(2, 2, dtype=torch.long), [0.1]
        )
    with pytest.raises(EvaluationError, match="label map shape"):
        confusion_from_labels(torch.zeros(2, 3), torch.zeros(3, 2))


# ---------------------------------------------------------------------------------------------
# The CLI on real shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_synth_shards(tmp_path_factory.mktemp("eval"))


def samples(shards):
    return [
        (b["id"][0], b["labels"][0].nonzero().flatten().numpy(), b["mask"][0].numpy())
        for b in eval_loader(str(shards), rank=0, world_size=1)
    ]


def write_noisy_cams(out, shards, seed=0):
    """CAMs that are the masks plus noise: realistic, and every threshold gives a different matrix."""
    rng = np.random.default_rng(seed)
    expected = np.zeros((4, 21, 21), dtype=np.int64)
    thresholds = [0.2, 0.4, 0.6, 0.8]
    for image_id, keys, mask in samples(shards):
        hr = (
            np.stack([(mask == k + 1) * 0.6 + rng.random(mask.shape) * 0.5 for k in keys])
            if len(keys)
            else np.zeros((0,) + mask.shape)
        )
        hr = (hr / np.maximum(hr.max(axis=(1, 2), keepdims=True), 1e-5)).astype(np.float16)
        write_cam(out, image_id, keys, hr[:, ::4, ::4], hr)
        expected += argmax_confusions(hr, keys + 1, mask, thresholds)
    return expected, thresholds


def test_cli_scores_every_image(shards, tmp_path, capsys):
    cams = tmp_path / "cams"
    cams.mkdir()
    expected, thresholds = write_noisy_cams(cams, shards)
    out = tmp_path / "eval"
    assert (
        evaluate.main(["--cams", str(cams), "--shards", str(shards), "--thresholds", "0.2:0.8:0.2", "--out", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "mIoU per threshold" in printed and "aeroplane" in printed
    summary = json.loads((out / "summary.json").read_text())
    means, per_class = miou(torch.from_numpy(expected))
    best = int(torch.nan_to_num(means, nan=-1).argmax())
    assert summary["num_images"] == len(samples(shards))
    assert summary["thresholds"] == thresholds and summary["best_threshold"] == thresholds[best]
    assert summary["best_miou"] == pytest.approx(float(means[best]))
    assert summary["per_class_iou"]["background"] == pytest.approx(float(per_class[best, 0]))
    table = pq.read_table(out / "eval.parquet").to_pylist()
    assert len(table) == len(thresholds) * 21
    row = next(r for r in table if r["threshold"] == 0.4 and r["class_name"] == "background")
    assert (
        row["tp"] == expected[1, 0, 0]
        and row["gt_pixels"] == expected[1, 0].sum()
        and row["pred_pixels"] == expected[1, :, 0].sum()
    )


def test_cli_errors_name_the_images(shards, tmp_path, capsys):
    cams = tmp_path / "cams"
    cams.mkdir()
    write_noisy_cams(cams, shards)
    ids = [s[0] for s in samples(shards)]
    args = ["--cams", str(cams), "--shards", str(shards)]

    (cams / f"{ids[2]}.npz").unlink()
    (cams / f"{ids[5]}.npz").unlink()
    assert evaluate.main(args) == 2
    err = capsys.readouterr().err
    assert "2 images with a mask have no CAM" in err and ids[2] in err and ids[5] in err

    write_noisy_cams(cams, shards)
    (cams / f"{ids[3]}.npz").write_bytes(b"PK\x03\x04 broken")
    assert evaluate.main(args) == 2
    assert ids[3] in capsys.readouterr().err

    write_noisy_cams(cams, shards)
    keys, mask = samples(shards)[4][1:]
    write_cam(cams, ids[4], keys, np.zeros((len(keys), 2, 2)), np.zeros((len(keys), mask.shape[0] + 1, mask.shape[1])))
    assert evaluate.main(args) == 2
    err = capsys.readouterr().err
    assert ids[4] in err and "but the mask is" in err


def _png(labels: np.ndarray) -> bytes:
    """An index ("L") PNG, not a palette one: --mode labels reads both."""
    buf = io.BytesIO()
    Image.fromarray(labels.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_confusion_from_labels_equals_the_pixel_loop():
    """The one-histogram confusion against a pixel-by-pixel count, for uint8 and int64 maps; values that are
    neither a class nor 255 are refused, naming them (also outside 0..255)."""
    rng = np.random.default_rng(5)
    gt = rng.integers(0, 21, (13, 17)).astype(np.uint8)
    pred = rng.integers(0, 21, (13, 17)).astype(np.uint8)
    gt[rng.random(gt.shape) < 0.2] = IGNORE_INDEX
    pred[rng.random(pred.shape) < 0.2] = IGNORE_INDEX
    want_conf, want_undecided = np.zeros((21, 21), np.int64), np.zeros(21, np.int64)
    for g, p in zip(gt.ravel(), pred.ravel(), strict=True):
        if g == IGNORE_INDEX:
            continue
        if p == IGNORE_INDEX:
            want_undecided[g] += 1
        else:
            want_conf[g, p] += 1
    for dtype in (torch.uint8, torch.int64):
        conf, undecided = confusion_from_labels(torch.from_numpy(pred).to(dtype), torch.from_numpy(gt).to(dtype))
        assert conf.dtype == undecided.dtype == torch.long
        np.testing.assert_array_equal(conf.numpy(), want_conf)
        np.testing.assert_array_equal(undecided.numpy(), want_undecided)
    for bad in (30, 300, -1):
        wrong = torch.from_numpy(pred).long()
        wrong[0, 0] = bad
        with pytest.raises(EvaluationError, match=rf"label map holds values \[{bad}\]"):
            confusion_from_labels(wrong, torch.from_numpy(gt))
        with pytest.raises(EvaluationError, match=rf"ground truth holds values \[{bad}\]"):
            confusion_from_labels(torch.from_numpy(pred), wrong)


def test_labels_mode(shards, tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    rng = np.random.default_rng(2)
    conf = torch.zeros(21, 21, dtype=torch.long)
    undecided = torch.zeros(21, dtype=torch.long)
    for image_id, _, mask in samples(shards):
        pred = mask.copy()
        pred[rng.random(mask.shape) < 0.2] = 0
        pred[rng.random(mask.shape) < 0.1] = IGNORE_INDEX
        (labels / f"{image_id}.png").write_bytes(_png(pred))
        c, u = confusion_from_labels(torch.from_numpy(pred), torch.from_numpy(mask))
        conf += c
        undecided += u
    out = tmp_path / "eval"
    assert evaluate.main(["--mode", "labels", "--labels", str(labels), "--shards", str(shards), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_miou"] == pytest.approx(miou(conf, undecided)[0])
    assert 0 < summary["undecided_fraction"] < 0.2
    assert len(pq.read_table(out / "eval.parquet")) == 21


def test_default_sweep_of_a_random_walk_store(shards, tmp_path):
    """rw.json beside the maps (a puzzlecam.rw store) makes the default sweep 0.05..0.50; else 0.05..0.80."""
    cams = tmp_path / "cams"
    cams.mkdir()
    write_noisy_cams(cams, shards)
    for marker, expected in [
        (None, parse_thresholds("0.05:0.80:0.05")),
        ("rw.json", parse_thresholds("0.05:0.5:0.05")),
    ]:
        if marker:
            (cams / marker).write_text("{}\n")
        out = tmp_path / f"eval_{marker}"
        assert evaluate.main(["--cams", str(cams), "--shards", str(shards), "--out", str(out)]) == 0
        assert json.loads((out / "summary.json").read_text())["thresholds"] == expected
    assert len(expected) == 10 and expected[-1] == 0.5
    out = tmp_path / "explicit"  # --thresholds still wins
    assert (
        evaluate.main(["--cams", str(cams), "--shards", str(shards), "--thresholds", "0.3,0.6", "--out", str(out)]) == 0
    )
    assert json.loads((out / "summary.json").read_text())["thresholds"] == [0.3, 0.6]


def test_coco_sweep_scores_81_labels_by_name():
    """COCO masks hold 0..80: the sweep, the table and the summary follow the dataset's 81 labels."""
    from puzzlecam.datasets import COCO

    g = torch.Generator().manual_seed(0)
    keys = torch.tensor([3, 80])
    cams = torch.rand(2, 12, 16, generator=g)
    mask = torch.zeros(12, 16, dtype=torch.uint8)
    mask[:6] = 80
    mask[6:, :4] = 3
    mask[0, 0] = 255
    conf = confusion_sweep(cams, keys, mask, [0.2, 0.5], COCO.num_labels)
    assert conf.shape == (2, 81, 81) and int(conf[0].sum()) == 12 * 16 - 1
    summary = evaluate.summarize(conf, [0.2, 0.5], 1, dataset=COCO)
    assert summary["dataset"] == "coco" and len(summary["per_class_iou"]) == 81
    assert list(summary["per_class_iou"])[-1] == "toothbrush" and summary["per_class_iou"]["cat"] is None
    table = evaluate.results_table(conf, [0.2, 0.5], dataset=COCO)
    assert table.num_rows == 2 * 81 and table.column("class_name")[80].as_py() == "toothbrush"

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
from puzzlecam.camstore import RW_META_NAME, CamRecord, list_ids, read_cam, write_cam
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


def affinity_labels_direct(image, cams, keys, fg_th, bg_th, crf_iters=None):
    """The original make_affinity_labels.py, written out: argmax over the padded float32 maps (the original
    stores float32), optionally the label CRF of its crf_inference_label, then the combination."""
    keys = np.pad(np.asarray(keys) + 1, (1, 0))  # the original's keys: 0 = background first

    def confident(threshold):
        padded = np.pad(cams.astype(np.float32), ((1, 0), (0, 0), (0, 0)), constant_values=threshold)
        local = np.argmax(padded, axis=0)
        if crf_iters is not None:
            import pydensecrf.densecrf as dcrf
            from pydensecrf.utils import unary_from_labels

            h, w = local.shape
            crf = dcrf.DenseCRF2D(w, h, keys.shape[0])
            crf.setUnaryEnergy(unary_from_labels(local, keys.shape[0], gt_prob=0.7, zero_unsure=False))
            crf.addPairwiseGaussian(sxy=3, compat=3)
            crf.addPairwiseBilateral(sxy=50, srgb=5, rgbim=np.ascontiguousarray(np.copy(image)), compat=10)
            local = np.argmax(np.array(crf.inference(crf_iters)).reshape((keys.shape[0], h, w)), axis=0)
        return keys[local]

    fg, bg = confident(fg_th), confident(bg_th)
    label = fg.copy()
    label[fg == 0] = 255
    label[fg + bg == 0] = 0
    return label.astype(np.uint8)


def random_cams(rng, num_keys, size):
    """float16 maps on a coarse grid of values (0.05 steps): ties between classes and with thresholds happen."""
    return (rng.integers(0, 21, size=(num_keys, *size)) / 20).astype(np.float16)


@pytest.mark.parametrize("fg_th, bg_th", [(0.40, 0.10), (0.5, 0.25), (0.35, 0.05)])
def test_affinity_labels_match_the_original_rule(fg_th, bg_th):
    rng = np.random.default_rng(int(fg_th * 100))
    seen = set()
    for num_keys in (0, 1, 3):
        hr = random_cams(rng, num_keys, (9, 11))
        keys = np.sort(rng.choice(20, size=num_keys, replace=False))
        got = make_label_map(CamRecord("x", keys, hr[:, ::4, ::4], hr), fg_th, bg_threshold=bg_th)
        want = affinity_labels_direct(None, hr, keys, fg_th, bg_th)
        assert np.array_equal(got, want)
        seen |= set(np.unique(got).tolist())
    assert {0, 255} < seen  # background, the ignored band and classes all occur: the test can fail


def test_affinity_labels_with_crf_match_the_original():
    pytest.importorskip("pydensecrf.densecrf")
    rng = np.random.default_rng(5)
    h, w = 24, 30
    # Blocks of colour with CAMs that roughly follow them: the CRF moves labels to the colour edges.
    image = np.zeros((h, w, 3), np.uint8)
    image[:, 12:] = (200, 40, 40)
    image[14:, :] = (30, 160, 60)
    hr = np.stack(
        [
            (image[..., 0] > 100) * 0.5 + rng.random((h, w)) * 0.45,
            (image[..., 1] > 100) * 0.5 + rng.random((h, w)) * 0.45,
        ]
    ).astype(np.float16)
    keys = np.array([3, 11])
    rec = CamRecord("x", keys, hr[:, ::4, ::4], hr)
    got = make_label_map(rec, 0.40, bg_threshold=0.10, image=image, crf_iters=10)
    assert np.array_equal(got, affinity_labels_direct(image, hr, keys, 0.40, 0.10, crf_iters=10))
    assert not np.array_equal(got, make_label_map(rec, 0.40, bg_threshold=0.10))  # the CRF did something


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


def labels_of(out):
    return {p.stem: p.read_bytes() for p in sorted(out.glob("*.png"))}


def test_affinity_flag_is_the_readme_values(store, tmp_path, capsys):
    shards, cams = store
    crf = ["--shards", str(shards)] if _has_crf() else ["--no-crf"]
    flags = ["--cams", str(cams), *crf]
    explicit = ["--threshold", "0.4", "--bg-threshold", "0.1"] + (["--crf"] if _has_crf() else [])
    assert labels_cli.main([*flags, "--affinity", "--out", str(tmp_path / "preset")]) == 0
    assert labels_cli.main([*flags, *explicit, "--out", str(tmp_path / "explicit")]) == 0
    preset = labels_of(tmp_path / "preset")
    assert sorted(preset) == list_ids(cams) and preset == labels_of(tmp_path / "explicit")
    assert any(255 in np.array(Image.open(tmp_path / "preset" / f"{i}.png")) for i in preset)
    # Each value of the preset can be overridden.
    assert labels_cli.main([*flags, "--affinity", "--bg-threshold", "0.3", "--out", str(tmp_path / "b")]) == 0
    for image_id in list_ids(cams):
        rec = read_cam(cams, image_id)
        if not _has_crf():
            assert (tmp_path / "b" / f"{image_id}.png").read_bytes() == encode_label_png(
                make_label_map(rec, 0.4, bg_threshold=0.3)
            )
    # --affinity turns the CRF on: without --shards that is an error naming both flags.
    assert labels_cli.main(["--cams", str(cams), "--affinity", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "--affinity" in err and ("--shards" in err or "pip install .[crf]" in err)
    assert labels_cli.main(["--cams", str(cams), "--out", str(tmp_path / "d")]) == 2
    assert "--threshold" in capsys.readouterr().err
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def _has_crf() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def test_pseudo_labels_from_a_random_walk_store(store, tmp_path):
    """A random-walk store (rw.json beside the files, maps in hr_cam) is labelled by the same command."""
    shards, cams = store
    rw = tmp_path / "rw"
    rw.mkdir()
    for image_id in list_ids(cams):
        rec = read_cam(cams, image_id)
        scaled = (rec.hr_cam.astype(np.float32) * 0.5).astype(np.float16)  # globally normalized: smaller values
        write_cam(rw, image_id, rec.keys, scaled[:, ::4, ::4], scaled)
    (rw / RW_META_NAME).write_text('{"beta": 10, "exp_times": 8}')
    crf = ["--crf", "--crf-iters", "1", "--shards", str(shards)] if _has_crf() else []
    out = tmp_path / "labels"
    assert labels_cli.main(["--cams", str(rw), "--threshold", "0.35", *crf, "--out", str(out)]) == 0
    assert sorted(labels_of(out)) == list_ids(cams)
    for image_id in list_ids(cams):
        rec = read_cam(rw, image_id)
        label = np.array(Image.open(out / f"{image_id}.png"))
        assert label.shape == rec.size and set(np.unique(label)) <= {0, *(rec.keys + 1).tolist()}
        if not crf:
            assert np.array_equal(label, predict_labels(rec.hr_cam, rec.keys, 0.35))

"""Overlays: the numpy jet map, per-image rows and the grid written from real shards."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_evaluate import samples, write_noisy_cams
from test_infer import make_synth_shards

from puzzlecam import viz
from puzzlecam.camstore import read_cam
from puzzlecam.utils.labelmap import voc_colormap


def test_jet():
    c = viz.jet(np.array([-1.0, 0.0, 0.5, 1.0, 2.0]))
    assert c.dtype == np.uint8 and c.shape == (5, 3)
    assert c[0].tolist() == c[1].tolist() and c[3].tolist() == c[4].tolist()  # clipped
    assert c[1, 2] > 100 and c[1, 0] == 0  # low: blue
    assert c[3, 0] > 100 and c[3, 2] == 0  # high: red
    assert c[2, 1] == 255  # middle: green


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_synth_shards(tmp_path_factory.mktemp("viz"), num_images=4, unlabeled=0)


def test_cli_rows_and_grid(shards, tmp_path):
    cams = tmp_path / "cams"
    cams.mkdir()
    write_noisy_cams(cams, shards)
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"best_threshold": 0.35}))
    out = tmp_path / "viz"
    height = 40
    assert (
        viz.main(
            [
                "--cams",
                str(cams),
                "--shards",
                str(shards),
                "--out",
                str(out),
                "--n",
                "3",
                "--height",
                str(height),
                "--summary",
                str(summary),
            ]
        )
        == 0
    )
    first = samples(shards)[:3]
    assert sorted(p.name for p in out.glob("*.png")) == sorted([f"{i}.png" for i, _, _ in first] + ["grid.png"])
    widths = []
    for image_id, keys, mask in first:
        rec = read_cam(cams, image_id)
        h, w = rec.size
        panels = 3 + len(keys)  # image, one per class, pseudo-label, ground truth
        expected_width = panels * round(w * height / h) + viz.GAP * (panels - 1)
        row = np.array(Image.open(out / f"{image_id}.png").convert("RGB"))
        assert row.shape == (height + viz.CAPTION_H, expected_width, 3)
        widths.append(expected_width)
        # The last panel is the ground truth in exact VOC colours (nearest-neighbour resize).
        gt_panel = row[viz.CAPTION_H :, -round(w * height / h) :].reshape(-1, 3)
        shown = {tuple(c) for c in np.unique(gt_panel, axis=0).tolist()}
        assert len(shown) >= 2 and shown <= {tuple(c) for c in voc_colormap()[np.unique(mask)].tolist()}
    grid = Image.open(out / "grid.png")
    assert grid.size == (max(widths), 3 * (height + viz.CAPTION_H) + 2 * viz.GAP)


def test_cli_errors(shards, tmp_path, capsys):
    empty = tmp_path / "cams"
    empty.mkdir()
    assert viz.main(["--cams", str(empty), "--shards", str(shards), "--out", str(tmp_path / "v")]) == 2
    assert "has a CAM" in capsys.readouterr().err
    assert (
        viz.main(
            [
                "--cams",
                str(empty),
                "--shards",
                str(shards),
                "--out",
                str(tmp_path / "v"),
                "--summary",
                str(tmp_path / "none.json"),
            ]
        )
        == 2
    )
    assert "best_threshold" in capsys.readouterr().err


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_heat_overlay_blends(value):
    image = np.full((2, 2, 3), 100, np.uint8)
    out = viz.heat_overlay(image, np.full((2, 2), value), alpha=0.5)
    np.testing.assert_array_equal(
        out, np.round(0.5 * 100 + 0.5 * viz.jet(np.full((2, 2), value)).astype(float)).astype(np.uint8)
    )


def test_random_walk_and_segmentation_panels(shards, tmp_path, capsys):
    from puzzlecam.utils.labelmap import encode_label_png

    cams = tmp_path / "cams"
    cams.mkdir()
    write_noisy_cams(cams, shards)
    seg = tmp_path / "seg"
    seg.mkdir()
    first = samples(shards)[:2]
    for image_id, _, mask in first:
        # A "prediction" that differs from the mask: everything of class 7 (cat), so its panel is all one colour.
        (seg / f"{image_id}.png").write_bytes(encode_label_png(np.full_like(mask, 7)))
    out, height = tmp_path / "viz", 40
    argv = ["--cams", str(cams), "--shards", str(shards), "--out", str(out), "--n", "2", "--height", str(height)]
    # The CAM store stands in for a random-walk store: the same layout.
    assert viz.main([*argv, "--rw", str(cams), "--rw-threshold", "0.3", "--segmentation", str(seg)]) == 0
    for image_id, keys, _ in first:
        h, w = read_cam(cams, image_id).size
        width = round(w * height / h)
        panels = 5 + len(keys)  # image, one per class, CAM labels, random-walk labels, DeepLabv3+, ground truth
        row = np.array(Image.open(out / f"{image_id}.png").convert("RGB"))
        assert row.shape[1] == panels * width + viz.GAP * (panels - 1)
        # The DeepLabv3+ panel (second to last) shows the written map in exact VOC colours.
        start = row.shape[1] - 2 * width - viz.GAP
        shown = np.unique(row[viz.CAPTION_H :, start : start + width].reshape(-1, 3), axis=0)
        assert shown.tolist() == [voc_colormap()[7].tolist()]
    (seg / f"{first[1][0]}.png").unlink()
    assert viz.main([*argv, "--segmentation", str(seg)]) == 2
    assert f"--segmentation: no readable label map for {first[1][0]}" in capsys.readouterr().err

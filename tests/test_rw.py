"""python -m puzzlecam.rw: the random-walk store against a direct computation, resume, settings, two ranks, bad input.

Real synthetic shards (images of 36..48 px, not multiples of 16), a CAM store written by
puzzlecam.infer from a tiny random classifier, and a width-8 AffinityNet with random weights saved as
an affinity run exports it (model.safetensors + config.yaml with task: affinity).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_infer import make_synth_shards, make_tiny_model, manifest_ids, save_trained, torchrun_writes_each_image_once

from puzzlecam import evaluate, infer, labels, rw
from puzzlecam.affinity import random_walk_reference
from puzzlecam.camstore import read_cam, read_index, write_cam
from puzzlecam.config import Config, ModelConfig
from puzzlecam.data import IMAGENET_MEAN, IMAGENET_STD, eval_loader

BETA, EXP_TIMES, RADIUS = 10.0, 8, 5


def make_affinity_net(root: Path, width: int = 8, seed: int = 0) -> Path:
    """A random width-8 ResNet-18 AffinityNet saved as model.safetensors + config.yaml (task: affinity)."""
    from puzzlecam.model.affinity import build_affinity_net

    cfg = Config(task="affinity", model=ModelConfig(arch="resnet18", width=width))
    torch.manual_seed(seed)
    return save_trained(root, cfg, build_affinity_net(cfg.model))


def rw_args(weights: Path, cams: Path, shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--weights",
        str(weights),
        "--cams",
        str(cams),
        "--shards",
        str(shards),
        "--out",
        str(out),
        "--num-workers",
        "0",
        "--device",
        "cpu",
        *extra,
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rw")
    shards = make_synth_shards(root, num_images=6)
    classifier = make_tiny_model(root / "classifier")
    cams = root / "cams"
    assert (
        infer.main(
            [
                "--weights",
                str(classifier),
                "--shards",
                str(shards),
                "--out",
                str(cams),
                "--scales",
                "1.0",
                "--num-workers",
                "0",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    weights = make_affinity_net(root / "affinity")
    out = root / "rw"
    assert rw.main(rw_args(weights, cams, shards, out)) == 0
    return root, shards, classifier, cams, weights, out


def direct_rw(model, image_u8: torch.Tensor, cam: np.ndarray, pad_to: int = 16):
    """The definition written out, one pass per image: edge of the image and of its flip (each padded
    with zeros to a multiple of ``pad_to``, cropped to the stride-4 size), the reference walk, x4
    bilinear upsampling, crop, division by the global max."""
    h, w = image_u8.shape[:2]
    sh, sw = (h - 1) // 4 + 1, (w - 1) // 4 + 1
    x = image_u8.permute(2, 0, 1)[None].float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    ph, pw = -(-h // pad_to) * pad_to, -(-w // pad_to) * pad_to
    with torch.no_grad():
        logits = model(F.pad(x, (0, pw - w, 0, ph - h)))[0, 0, :sh, :sw]
        flipped = model(F.pad(x.flip(-1), (0, pw - w, 0, ph - h)))[0, 0, :sh, :sw].flip(-1)
    edge = torch.sigmoid((logits + flipped) / 2)
    walk = random_walk_reference(torch.from_numpy(cam).float(), edge, beta=BETA, exp_times=EXP_TIMES, radius=RADIUS)
    up = F.interpolate(walk[None], size=(4 * sh, 4 * sw), mode="bilinear", align_corners=False)[0, :, :h, :w]
    return walk, up / up.max()


def test_maps_equal_direct_computation(setup):
    root, shards, _, cams, weights, out = setup
    ids = manifest_ids(shards)
    assert sorted(r["id"] for r in read_index(out).to_pylist()) == ids
    model, _ = rw.load_affinity_net(weights)
    sizes, empty = [], 0
    for batch in eval_loader(str(shards), rank=0, world_size=1):
        image_id, image = batch["id"][0], batch["image"][0]
        sizes.append(tuple(image.shape[:2]))
        source, rec = read_cam(cams, image_id), read_cam(out, image_id, size=sizes[-1])
        assert rec.keys.tolist() == source.keys.tolist()
        assert rec.cam.shape == source.cam.shape and rec.hr_cam.shape == source.hr_cam.shape
        if len(rec.keys) == 0:
            empty += 1
            continue
        walk, final = direct_rw(model, image, source.cam)
        np.testing.assert_allclose(rec.cam.astype(np.float32), walk.numpy(), atol=1e-3, rtol=2e-3)
        np.testing.assert_allclose(rec.hr_cam.astype(np.float32), final.numpy(), atol=2e-3, rtol=0)
        assert rec.hr_cam.max() == 1.0
    assert empty == 1 and any(h % 16 or w % 16 for h, w in sizes)  # any size: no image is a multiple of 16
    meta = json.loads((out / "rw.json").read_text())
    assert (meta["beta"], meta["exp_times"], meta["radius"], meta["cams"]) == (BETA, EXP_TIMES, RADIUS, str(cams))
    assert meta["written"] == len(ids) and meta["skipped_complete"] == 0 and meta["no_labels"] == 1
    assert len(meta["weights_sha256"]) == 64


def test_pad_size_pads_to_at_least_that(setup, tmp_path):
    root, shards, _, cams, weights, _ = setup
    out = tmp_path / "rw"
    assert rw.main(rw_args(weights, cams, shards, out, "--pad-size", "64")) == 0
    model, _ = rw.load_affinity_net(weights)
    batch = next(b for b in eval_loader(str(shards), rank=0, world_size=1) if b["labels"].sum() > 0)
    _, final = direct_rw(model, batch["image"][0], read_cam(cams, batch["id"][0]).cam, pad_to=64)
    rec = read_cam(out, batch["id"][0])
    np.testing.assert_allclose(rec.hr_cam.astype(np.float32), final.numpy(), atol=2e-3, rtol=0)


def test_rw_store_is_evaluated_and_labelled_like_a_cam_store(setup, tmp_path):
    root, shards, _, _, _, out = setup
    assert evaluate.main(["--cams", str(out), "--shards", str(shards), "--out", str(tmp_path / "eval")]) == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["thresholds"][-1] == 0.5 and len(summary["thresholds"]) == 10  # the rw sweep
    assert labels.main(["--cams", str(out), "--threshold", "0.35", "--out", str(tmp_path / "labels")]) == 0
    assert len(list((tmp_path / "labels").glob("*.png"))) == len(manifest_ids(shards))


def test_rerun_skips_complete_and_redoes_missing_or_partial(setup, tmp_path):
    root, shards, _, cams, weights, first = setup
    out = tmp_path / "rw"
    shutil.copytree(first, out)
    ids = manifest_ids(shards)
    (out / f"{ids[1]}.npz").unlink()
    partial = out / f"{ids[2]}.npz"
    partial.write_bytes(partial.read_bytes()[:100])
    stale = out / f".{ids[3]}.npz.tmp-999"  # a writer killed mid-file
    stale.write_bytes(b"half")
    kept = out / f"{ids[4]}.npz"
    kept_stamp = kept.stat().st_mtime_ns
    assert rw.main(rw_args(weights, cams, shards, out)) == 0
    meta = json.loads((out / "rw.json").read_text())
    assert (meta["written"], meta["skipped_complete"]) == (2, len(ids) - 2)
    assert kept.stat().st_mtime_ns == kept_stamp and not stale.exists()
    for image_id in ids:
        np.testing.assert_array_equal(read_cam(out, image_id).hr_cam, read_cam(first, image_id).hr_cam)


def test_other_settings_refused_unless_overwrite(setup, tmp_path, capsys):
    root, shards, _, cams, weights, first = setup
    out = tmp_path / "rw"
    shutil.copytree(first, out)
    assert rw.main(rw_args(weights, cams, shards, out, "--beta", "5")) == 2
    assert "other beta" in capsys.readouterr().err
    assert rw.main(rw_args(weights, cams, shards, out, "--beta", "5", "--overwrite")) == 0
    meta = json.loads((out / "rw.json").read_text())
    assert meta["beta"] == 5 and meta["written"] == len(manifest_ids(shards))


def test_bad_input_is_one_line_naming_it(setup, tmp_path, capsys):
    root, shards, classifier, cams, weights, first = setup
    ids = manifest_ids(shards)

    def refused(args, *words):
        assert rw.main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and all(w in err for w in words), err

    lacking = tmp_path / "lacking"
    shutil.copytree(cams, lacking)
    for image_id in ids[2:4]:
        (lacking / f"{image_id}.npz").unlink()
    refused(rw_args(weights, lacking, shards, tmp_path / "o1"), "no CAM for 2 image(s)", ids[2], ids[3])
    done = sorted(p.stem for p in (tmp_path / "o1").glob("*.npz"))
    assert done == ids[:2] + ids[4:]  # the others are complete: a rerun with the CAMs skips them

    resized = tmp_path / "resized"
    shutil.copytree(cams, resized)
    rec = read_cam(cams, ids[3])
    h, w = rec.size
    write_cam(
        resized,
        ids[3],
        rec.keys,
        np.zeros((len(rec.keys), h // 4 + 2, w // 4 + 1)),
        np.zeros((len(rec.keys), h + 5, w)),
    )
    refused(rw_args(weights, resized, shards, tmp_path / "o2"), ids[3], f"{h + 5}x{w}", f"image is {h}x{w}")

    refused(rw_args(classifier, cams, shards, tmp_path / "o3"), str(classifier), "task 'classification'")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(classifier, mixed / "model.safetensors")  # a classifier's weights beside an affinity config
    shutil.copy(weights.parent / "config.yaml", mixed / "config.yaml")
    refused(rw_args(mixed / "model.safetensors", cams, shards, tmp_path / "o4"), "does not fit the AffinityNet")
    wide = make_affinity_net(tmp_path / "wide", width=16)
    shutil.copy(weights.parent / "config.yaml", wide.parent / "config.yaml")  # width-16 weights, width-8 config
    refused(rw_args(wide, cams, shards, tmp_path / "o4"), "does not fit the AffinityNet", "size mismatch")

    refused(rw_args(weights, cams, shards, cams), f"--out {cams} is --cams")
    store = tmp_path / "store"
    shutil.copytree(cams, store)
    refused(rw_args(weights, cams, shards, store), "infer.json")

    for flag, value in [
        ("--beta", "0"),
        ("--exp-times", "-1"),
        ("--exp-times", "17"),
        ("--radius", "1"),
        ("--backend", "triton"),
        ("--pad-size", "-1"),
        ("--num-workers", "-1"),
    ]:
        refused(rw_args(weights, cams, shards, tmp_path / "o5", flag, value), flag)
    refused(rw_args(weights, tmp_path / "absent", shards, tmp_path / "o5"), "--cams")
    assert not any((tmp_path / f"o{i}").exists() for i in range(3, 6))  # refused before any file


@pytest.mark.slow
def test_two_torchrun_ranks_write_each_image_once(setup, tmp_path):
    root, shards, _, cams, weights, first = setup
    out = tmp_path / "rw"
    torchrun_writes_each_image_once("puzzlecam.rw", rw_args(weights, cams, shards, out), out, "rw.json", shards, first)


@pytest.mark.gpu
def test_cuda_matches_cpu(setup, tmp_path):
    root, shards, _, cams, weights, first = setup
    out = tmp_path / "rw"
    assert rw.main(rw_args(weights, cams, shards, out)[:-2] + ["--device", "cuda"]) == 0
    for image_id in manifest_ids(shards):
        np.testing.assert_allclose(
            read_cam(out, image_id).hr_cam.astype(np.float32),
            read_cam(first, image_id).hr_cam.astype(np.float32),
            atol=5e-3,
        )

"""CAM inference: reference semantics, the CAM store, resume, settings checks, two torchrun ranks.

Real synthetic shards (``python -m puzzlecam.data synth`` + ``shard``) and a tiny random ResNet
saved as a trainer would (model.safetensors + config.yaml). Helpers here are shared with the
evaluate / labels / viz tests.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from puzzlecam import infer
from puzzlecam.camstore import read_cam, read_index
from puzzlecam.config import Config, ModelConfig, save_config
from puzzlecam.data import IMAGENET_MEAN, IMAGENET_STD, eval_loader
from puzzlecam.model import build_model
from puzzlecam.puzzle import multiscale_cam

REPO = Path(__file__).resolve().parents[1]
SCALES = (1.0, 0.5, 1.5)


def run_module(*args: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def make_synth_shards(root: Path, num_images: int = 8, size: int = 48, unlabeled: int = 1, shard_size: int = 3) -> Path:
    """Synthetic VOC set -> shards; the first ``unlabeled`` images lose their objects (no labels)."""
    voc = root / "voc"
    r = run_module(
        "puzzlecam.data",
        "synth",
        "--out",
        str(voc),
        "--num-images",
        str(num_images),
        "--size",
        str(size),
        "--seed",
        "3",
    )
    assert r.returncode == 0, r.stderr
    for i in range(unlabeled):
        xml = voc / "Annotations" / f"synth_{i:06d}.xml"
        xml.write_text(re.sub(r"\s*<object>.*?</object>", "", xml.read_text(), flags=re.S))
    r = run_module(
        "puzzlecam.data",
        "shard",
        "--voc-root",
        str(voc),
        "--split",
        "trainval",
        "--out",
        str(root / "shards"),
        "--shard-size",
        str(shard_size),
    )
    assert r.returncode == 0, r.stderr
    return root / "shards"


def save_trained(root: Path, cfg: Config, model: torch.nn.Module) -> Path:
    """``model`` saved as a run exports it: root/model.safetensors (its state dict) + root/config.yaml."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "model.safetensors"))
    save_config(cfg, root / "config.yaml")
    return root / "model.safetensors"


def make_tiny_model(root: Path, width: int = 8, seed: int = 0) -> Path:
    """A random reduced-width ResNet-18 classifier saved as model.safetensors + config.yaml."""
    cfg = Config(model=ModelConfig(arch="resnet18", width=width))
    torch.manual_seed(seed)
    return save_trained(root, cfg, build_model(cfg.model))


def manifest_ids(shards: Path) -> list[str]:
    return sorted(pq.read_table(shards / "manifest.parquet")["id"].to_pylist())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    shards = make_synth_shards(root)
    weights = make_tiny_model(root / "run")
    out = root / "cams"
    code = infer.main(
        [
            "--weights",
            str(weights),
            "--shards",
            str(shards),
            "--out",
            str(out),
            "--scales",
            ",".join(map(str, SCALES)),
            "--batch-size",
            "3",
            "--num-workers",
            "0",
            "--device",
            "cpu",
        ]
    )  # compared with a CPU reference below; test_cuda_matches_cpu covers CUDA
    assert code == 0
    return root, shards, weights, out


def reference_cams(model, image_u8: torch.Tensor, keys: torch.Tensor, scales, flip: bool = True):
    """Straightforward per-scale, per-pass forward (batch of 1 each) and the reference fusion."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    h, w = image_u8.shape[:2]
    x = image_u8.permute(2, 0, 1)[None].float() / 255
    maps, flipped = [], []
    for s in scales:
        size = (round(h * s), round(w * s))
        xs = (
            x
            if size == (h, w)
            else F.interpolate(x, size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        )
        xs = (xs - mean) / std
        with torch.no_grad():
            maps.append(model(xs)[1][0])
            flipped.append(model(xs.flip(-1))[1][0])
    return multiscale_cam(maps, flipped if flip else None, keys, (h, w))


def test_every_image_written_with_reference_values(setup):
    root, shards, weights, out = setup
    ids = manifest_ids(shards)
    index = read_index(out).to_pylist()
    assert sorted(r["id"] for r in index) == ids
    model, _ = infer.load_classifier(weights)
    by_id = {r["id"]: r for r in index}
    unlabeled = 0
    for batch in eval_loader(str(shards), rank=0, world_size=1):
        image_id = batch["id"][0]
        rec = read_cam(out, image_id)
        h, w = batch["image"].shape[1:3]
        keys = batch["labels"][0].nonzero().flatten()
        assert rec.keys.tolist() == keys.tolist()
        assert rec.cam.dtype == np.float16 and rec.hr_cam.dtype == np.float16
        assert rec.hr_cam.shape == (len(keys), h, w)
        assert rec.cam.shape == (len(keys), (h - 1) // 4 + 1, (w - 1) // 4 + 1)
        assert by_id[image_id]["keys"] == keys.tolist() and (by_id[image_id]["height"], by_id[image_id]["width"]) == (
            h,
            w,
        )
        if len(keys) == 0:
            unlabeled += 1
            continue
        cam, hr = reference_cams(model, batch["image"][0], keys, SCALES)
        np.testing.assert_allclose(rec.cam.astype(np.float32), cam.numpy(), atol=2e-3, rtol=0)
        np.testing.assert_allclose(rec.hr_cam.astype(np.float32), hr.numpy(), atol=2e-3, rtol=0)
        assert rec.hr_cam.max() <= 1.0
    assert unlabeled == 1
    meta = json.loads((out / "infer.json").read_text())
    assert meta["written"] == len(ids) and meta["skipped_complete"] == 0 and meta["no_labels"] == 1


def test_no_flip_single_scale_matches_reference(setup, tmp_path):
    root, shards, weights, _ = setup
    out = tmp_path / "cams"
    assert (
        infer.main(
            [
                "--weights",
                str(weights),
                "--shards",
                str(shards),
                "--out",
                str(out),
                "--scales",
                "1.0",
                "--no-flip",
                "--num-workers",
                "0",
            ]
        )
        == 0
    )
    model, _ = infer.load_classifier(weights)
    batch = next(b for b in eval_loader(str(shards), rank=0, world_size=1) if b["labels"].sum() > 0)
    keys = batch["labels"][0].nonzero().flatten()
    cam, hr = reference_cams(model, batch["image"][0], keys, (1.0,), flip=False)
    rec = read_cam(out, batch["id"][0])
    np.testing.assert_allclose(rec.hr_cam.astype(np.float32), hr.numpy(), atol=2e-3, rtol=0)


def test_rerun_skips_complete_and_redoes_missing_or_partial(setup, tmp_path):
    root, shards, weights, first = setup
    out = tmp_path / "cams"
    args = [
        "--weights",
        str(weights),
        "--shards",
        str(shards),
        "--out",
        str(out),
        "--scales",
        ",".join(map(str, SCALES)),
        "--num-workers",
        "0",
        "--device",
        "cpu",
    ]  # bit-equal to the first (CPU) run below
    assert infer.main(args) == 0
    ids = manifest_ids(shards)
    (out / f"{ids[1]}.npz").unlink()
    partial = out / f"{ids[2]}.npz"
    partial.write_bytes(partial.read_bytes()[:100])  # a crash mid-write of a non-atomic writer
    stale = out / f".{ids[3]}.npz.tmp-999"  # the temporary name of puzzlecam.utils.files, by a dead process
    stale.write_bytes(b"half")
    kept = out / f"{ids[4]}.npz"
    kept_stamp = kept.stat().st_mtime_ns
    assert infer.main(args) == 0
    meta = json.loads((out / "infer.json").read_text())
    assert (meta["written"], meta["skipped_complete"]) == (2, len(ids) - 2)
    assert kept.stat().st_mtime_ns == kept_stamp
    assert not stale.exists()
    for image_id in ids:  # all complete again and equal to the first run's values
        np.testing.assert_array_equal(read_cam(out, image_id).hr_cam, read_cam(first, image_id).hr_cam)


def test_other_settings_refused_unless_overwrite(setup, tmp_path, capsys):
    root, shards, weights, _ = setup
    out = tmp_path / "cams"
    base = ["--weights", str(weights), "--shards", str(shards), "--out", str(out), "--num-workers", "0"]
    assert infer.main(base + ["--scales", "1.0"]) == 0
    assert infer.main(base + ["--scales", "1.0,0.5"]) == 2
    assert "other scales" in capsys.readouterr().err
    assert infer.main(base + ["--scales", "1.0,0.5", "--overwrite"]) == 0
    meta = json.loads((out / "infer.json").read_text())
    assert meta["scales"] == [1.0, 0.5] and meta["written"] == len(manifest_ids(shards))
    # A random-walk store (puzzlecam.rw's rw.json) never receives CAMs, even with --overwrite.
    rw_store = tmp_path / "rw"
    rw_store.mkdir()
    (rw_store / "rw.json").write_text("{}")
    assert infer.main(base[:-4] + ["--out", str(rw_store), "--num-workers", "0", "--overwrite"]) == 2
    assert "is a random-walk store" in capsys.readouterr().err
    assert sorted(p.name for p in rw_store.iterdir()) == ["rw.json"]


def test_weights_config_mismatch_and_missing_config(setup, tmp_path, capsys):
    root, shards, weights, _ = setup
    other = tmp_path / "run"
    make_tiny_model(other, width=16)
    (other / "model.safetensors").write_bytes(weights.read_bytes())  # width-8 weights, width-16 config
    assert (
        infer.main(
            ["--weights", str(other / "model.safetensors"), "--shards", str(shards), "--out", str(tmp_path / "o")]
        )
        == 2
    )
    assert "does not fit the classifier" in capsys.readouterr().err
    lonely = tmp_path / "lonely" / "model.safetensors"
    lonely.parent.mkdir()
    lonely.write_bytes(weights.read_bytes())
    assert infer.main(["--weights", str(lonely), "--shards", str(shards), "--out", str(tmp_path / "o2")]) == 2
    assert "--config" in capsys.readouterr().err
    bad = tmp_path / "bad" / "model.safetensors"
    bad.parent.mkdir()
    bad.write_bytes(b"not safetensors")
    assert (
        infer.main(
            [
                "--weights",
                str(bad),
                "--config",
                str(weights.parent / "config.yaml"),
                "--shards",
                str(shards),
                "--out",
                str(tmp_path / "o3"),
            ]
        )
        == 2
    )
    assert "not a readable safetensors file" in capsys.readouterr().err


def torchrun_writes_each_image_once(
    module: str, args: list[str], out: Path, meta_name: str, shards, first, same_outputs=None
) -> None:
    """``python -m module args`` on 2 torchrun ranks writes each image of ``shards`` once into ``out`` (the counts
    of ``meta_name`` summed over the ranks), with the outputs of the one-process run ``first``: compared by
    ``same_outputs(out, first, ids)`` (default: CAM stores with the same index and maps)."""
    from puzzlecam.utils.net import free_port

    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    r = subprocess.run(
        [*cmd, "-m", module, *args],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    ids = manifest_ids(shards)
    meta = json.loads((out / meta_name).read_text())
    # Counts are summed over both ranks: an image done by both ranks would push this past len(ids).
    assert meta["written"] == len(ids) and meta["skipped_complete"] == 0
    (same_outputs or same_cam_stores)(out, first, ids)


def same_cam_stores(out: Path, first: Path, ids: list[str]) -> None:
    assert sorted(r["id"] for r in read_index(out).to_pylist()) == ids
    for image_id in ids:
        np.testing.assert_allclose(
            read_cam(out, image_id).hr_cam.astype(np.float32),
            read_cam(first, image_id).hr_cam.astype(np.float32),
            atol=2e-3,
        )


def test_two_torchrun_ranks_write_each_image_once(setup, tmp_path):
    root, shards, weights, first = setup
    out = tmp_path / "cams"
    args = [
        "--weights",
        str(weights),
        "--shards",
        str(shards),
        "--out",
        str(out),
        "--scales",
        ",".join(map(str, SCALES)),
    ]
    args += ["--num-workers", "0", "--device", "cpu"]
    torchrun_writes_each_image_once("puzzlecam.infer", args, out, "infer.json", shards, first)


@pytest.mark.gpu
def test_cuda_matches_cpu(setup, tmp_path):
    root, shards, weights, first = setup
    out = tmp_path / "cams"
    assert (
        infer.main(
            [
                "--weights",
                str(weights),
                "--shards",
                str(shards),
                "--out",
                str(out),
                "--scales",
                ",".join(map(str, SCALES)),
                "--device",
                "cuda",
                "--num-workers",
                "0",
            ]
        )
        == 0
    )
    for image_id in manifest_ids(shards):
        np.testing.assert_allclose(
            read_cam(out, image_id).hr_cam.astype(np.float32),
            read_cam(first, image_id).hr_cam.astype(np.float32),
            atol=5e-3,
        )


def test_end_to_end_chain(setup, tmp_path):
    """infer -> evaluate -> labels at the best threshold -> evaluate the labels -> viz."""
    from puzzlecam import evaluate, labels, viz

    root, shards, weights, cams = setup
    assert (
        evaluate.main(
            [
                "--cams",
                str(cams),
                "--shards",
                str(shards),
                "--thresholds",
                "0.1:0.7:0.1",
                "--out",
                str(tmp_path / "eval"),
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["num_images"] == len(manifest_ids(shards))
    best = summary["best_threshold"]
    assert labels.main(["--cams", str(cams), "--threshold", str(best), "--out", str(tmp_path / "labels")]) == 0
    assert (
        evaluate.main(
            [
                "--mode",
                "labels",
                "--labels",
                str(tmp_path / "labels"),
                "--shards",
                str(shards),
                "--out",
                str(tmp_path / "eval_labels"),
            ]
        )
        == 0
    )
    scored = json.loads((tmp_path / "eval_labels" / "summary.json").read_text())
    assert scored["best_miou"] == pytest.approx(summary["best_miou"], abs=1e-12)
    assert (
        viz.main(
            [
                "--cams",
                str(cams),
                "--shards",
                str(shards),
                "--out",
                str(tmp_path / "viz"),
                "--n",
                "2",
                "--summary",
                str(tmp_path / "eval" / "summary.json"),
            ]
        )
        == 0
    )
    assert (tmp_path / "viz" / "grid.png").is_file()

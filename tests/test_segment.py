"""python -m puzzlecam.segment: label maps against the definition written out, resume, settings, submission, CRF,
two ranks, bad input.

Real synthetic shards (images of 36..48 px, not multiples of 16) and a tiny DeepLabv3+ (width-8 ResNet-18, head
width 16) with random weights saved as a segmentation run exports it (model.safetensors + config.yaml with
task: segmentation).
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_infer import (
    make_synth_shards,
    make_tiny_model,
    manifest_ids,
    run_module,
    save_trained,
    torchrun_writes_each_image_once,
)

from puzzlecam import evaluate, segment
from puzzlecam.config import Config, ModelConfig, SegmentationConfig
from puzzlecam.data import IMAGENET_MEAN, IMAGENET_STD, eval_loader
from puzzlecam.utils.labelmap import VOC_PALETTE, decode_label_png

SCALES = (0.5, 1.0, 1.5)
NUM_CLASSES = 21


def make_deeplab(root: Path, width: int = 8, seed: int = 0) -> Path:
    """A random tiny DeepLabv3+ saved as model.safetensors + config.yaml (task: segmentation)."""
    from puzzlecam.model.deeplab import build_deeplab

    cfg = Config(
        task="segmentation",
        model=ModelConfig(arch="resnet18", width=width, num_classes=NUM_CLASSES, norm="frozen"),
        segmentation=SegmentationConfig(head_channels=16, low_level_channels=8),
    )
    torch.manual_seed(seed)
    model = build_deeplab(cfg.model, cfg.segmentation)
    for m in model.modules():  # random running statistics: the frozen norms then do something
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return save_trained(root, cfg, model)


def seg_args(weights: Path, shards: Path, out: Path, *extra: str) -> list[str]:
    """puzzlecam.segment's arguments: one process on the CPU, the test's scales."""
    flags = {"--weights": weights, "--shards": shards, "--out": out, "--scales": ",".join(map(str, SCALES))}
    return [str(v) for pair in flags.items() for v in pair] + ["--num-workers", "0", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("segment")
    shards = make_synth_shards(root, num_images=5, unlabeled=0)
    weights = make_deeplab(root / "seg")
    out = root / "labels"
    assert segment.main(seg_args(weights, shards, out)) == 0
    return root, shards, weights, out


def images(shards: Path):
    for batch in eval_loader(str(shards), rank=0, world_size=1):
        yield batch["id"][0], batch["image"][0]


def direct_probabilities(model, image_u8: torch.Tensor, scales, flip: bool = True) -> torch.Tensor:
    """The definition written out: per scale and per pass (the image, its flip) one forward of a batch of 1,
    the logits resized to (H, W), the flipped ones flipped back, all summed, then the softmax."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    h, w = image_u8.shape[:2]
    total = torch.zeros(NUM_CLASSES, h, w)
    for s in scales:
        x = image_u8.permute(2, 0, 1)[None].float() / 255
        size = (round(h * s), round(w * s))
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        x = (x - mean) / std
        for flipped in (False, True) if flip else (False,):
            with torch.no_grad():
                logits = model(x.flip(-1) if flipped else x)
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)[0]
            total += logits.flip(-1) if flipped else logits
    return torch.softmax(total, dim=0)


def assert_labels_match(labels: np.ndarray, probs: torch.Tensor) -> None:
    """``labels`` is the argmax of ``probs`` wherever the best class leads clearly (batching may reorder sums)."""
    top2 = probs.topk(2, dim=0).values
    clear = (top2[0] - top2[1] > 1e-5).numpy()
    want = probs.argmax(0).numpy()
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(labels[clear], want[clear])


def read_png(path: Path) -> np.ndarray:
    return decode_label_png(path.read_bytes())


def test_labels_and_probabilities_equal_the_definition(setup):
    root, shards, weights, out = setup
    model, _ = segment.load_segmenter(weights)
    sizes = set()
    for image_id, image in images(shards):
        h, w = image.shape[:2]
        sizes.add((h, w))
        want = direct_probabilities(model, image, SCALES)
        got = segment.segment_probabilities(model, image, SCALES)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        path = out / f"{image_id}.png"
        with Image.open(path) as png:
            assert png.mode == "P" and png.getpalette()[: 3 * NUM_CLASSES] == VOC_PALETTE[: 3 * NUM_CLASSES]
        labels = read_png(path)
        assert labels.shape == (h, w)
        assert_labels_match(labels, want)
        assert len(np.unique(labels)) > 1  # not a constant map: the test can tell classes apart
    assert len(sizes) > 1 and any(h % 16 or w % 16 for h, w in sizes)  # images of any size
    meta = json.loads((out / "segment.json").read_text())
    assert meta["scales"] == list(SCALES) and meta["flip"] and meta["crf_iters"] == 0 and meta["layout"] == "flat"
    assert (meta["written"], meta["skipped_complete"]) == (len(manifest_ids(shards)), 0)
    assert len(meta["weights_sha256"]) == 64


def test_no_flip_and_the_reference_passes(setup):
    root, shards, weights, _ = setup
    model, _ = segment.load_segmenter(weights)
    image_id, image = next(images(shards))
    want = direct_probabilities(model, image, (1.0, 2.0), flip=False)
    torch.testing.assert_close(segment.segment_probabilities(model, image, (1.0, 2.0), flip=False), want)
    # One forward per scale and flip (the benchmark's reference) gives the batched pair's logits.
    paired = segment.segment_logits(model, image, SCALES)
    single = segment.segment_logits(model, image, SCALES, pair_per_forward=False)
    torch.testing.assert_close(paired, single, atol=1e-4, rtol=1e-4)


def test_evaluate_scores_the_label_maps(setup, tmp_path):
    root, shards, _, out = setup
    args = ["--mode", "labels", "--labels", str(out), "--shards", str(shards), "--out", str(tmp_path)]
    assert evaluate.main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_images"] == len(manifest_ids(shards)) and summary["undecided_fraction"] == 0.0


def test_rerun_skips_complete_and_redoes_missing_or_partial(setup, tmp_path):
    root, shards, weights, first = setup
    out = tmp_path / "labels"
    shutil.copytree(first, out)
    ids = manifest_ids(shards)
    (out / f"{ids[1]}.png").unlink()
    partial = out / f"{ids[2]}.png"
    partial.write_bytes(partial.read_bytes()[:60])
    stale = out / f".{ids[3]}.png.tmp-999"  # a writer killed mid-file
    stale.write_bytes(b"half")
    kept = out / f"{ids[4]}.png"
    kept_stamp = kept.stat().st_mtime_ns
    assert segment.main(seg_args(weights, shards, out)) == 0
    meta = json.loads((out / "segment.json").read_text())
    assert (meta["written"], meta["skipped_complete"]) == (2, len(ids) - 2)
    assert kept.stat().st_mtime_ns == kept_stamp and not stale.exists()
    for image_id in ids:
        assert (out / f"{image_id}.png").read_bytes() == (first / f"{image_id}.png").read_bytes()


def test_other_settings_refused_unless_overwrite(setup, tmp_path, capsys):
    root, shards, weights, first = setup
    out = tmp_path / "labels"
    shutil.copytree(first, out)
    assert segment.main(seg_args(weights, shards, out, "--no-flip")) == 2
    assert "other flip" in capsys.readouterr().err
    assert segment.main(seg_args(weights, shards, out, "--no-flip", "--overwrite")) == 0
    meta = json.loads((out / "segment.json").read_text())
    assert meta["flip"] is False and meta["written"] == len(manifest_ids(shards))


def unmasked_shards(root: Path) -> Path:
    """Shards of a 'test' split: synthetic images whose masks were removed before sharding."""
    voc = root / "voc"
    assert run_module("puzzlecam.data", "synth", "--out", str(voc), "--num-images", "3", "--size", "40").returncode == 0
    shutil.rmtree(voc / "SegmentationClass")
    ids = sorted(p.stem for p in (voc / "JPEGImages").glob("*.jpg"))
    (root / "test.txt").write_text("\n".join(ids) + "\n")
    r = run_module(
        "puzzlecam.data",
        "shard",
        "--voc-root",
        str(voc),
        "--split",
        "test",
        "--list",
        str(root / "test.txt"),
        "--out",
        str(root / "shards"),
    )
    assert r.returncode == 0, r.stderr
    return root / "shards"


def test_submission_layout_and_deterministic_archive(setup, tmp_path):
    root, _, weights, _ = setup
    shards = unmasked_shards(tmp_path / "test")
    ids = manifest_ids(shards)
    out = tmp_path / "submission"
    assert segment.main(seg_args(weights, shards, out, "--submission")) == 0
    pngs = out / segment.SUBMISSION_DIR
    assert pngs.as_posix().endswith("results/VOC2012/Segmentation/comp6_test_cls")
    assert sorted(p.stem for p in pngs.glob("*.png")) == ids
    model, _ = segment.load_segmenter(weights)
    for image_id, image in images(shards):
        assert_labels_match(read_png(pngs / f"{image_id}.png"), direct_probabilities(model, image, SCALES))
    archive = out / segment.SUBMISSION_ARCHIVE
    first_bytes = archive.read_bytes()
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        files = {m.name: tar.extractfile(m).read() for m in members if m.isfile()}
    prefix = "results/VOC2012/Segmentation/comp6_test_cls"
    assert names[:4] == ["results", "results/VOC2012", "results/VOC2012/Segmentation", prefix]
    assert names[4:] == [f"{prefix}/{i}.png" for i in ids]  # sorted
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in members)
    assert all(files[f"{prefix}/{i}.png"] == (pngs / f"{i}.png").read_bytes() for i in ids)
    with Image.open(io.BytesIO(files[names[4]])) as png:
        assert png.mode == "P"
    # A rerun (every image skipped) packs the same bytes.
    assert segment.main(seg_args(weights, shards, out, "--submission")) == 0
    assert archive.read_bytes() == first_bytes
    assert json.loads((out / "segment.json").read_text())["skipped_complete"] == len(ids)


def direct_crf(image: np.ndarray, probs: np.ndarray, iters: int) -> np.ndarray:
    """The original's crf_inference on the softmax, written out."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    c, h, w = probs.shape
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=80, srgb=13, rgbim=np.ascontiguousarray(np.copy(image)), compat=10)
    return np.argmax(np.array(crf.inference(iters)).reshape((c, h, w)), axis=0)


def test_crf_refines_the_softmax(setup, tmp_path):
    pytest.importorskip("pydensecrf.densecrf")
    root, shards, weights, _ = setup
    out = tmp_path / "crf"
    assert segment.main(seg_args(weights, shards, out, "--crf")) == 0
    assert json.loads((out / "segment.json").read_text())["crf_iters"] == 10
    model, _ = segment.load_segmenter(weights)
    for image_id, image in images(shards):
        probs = segment.segment_probabilities(model, image, SCALES).numpy()
        np.testing.assert_array_equal(read_png(out / f"{image_id}.png"), direct_crf(image.numpy(), probs, 10))


def test_crf_without_the_package_names_the_fix(setup, tmp_path, monkeypatch, capsys):
    root, shards, weights, _ = setup
    monkeypatch.setitem(sys.modules, "pydensecrf", None)  # as if the extra were not installed
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    assert segment.main(seg_args(weights, shards, tmp_path / "o", "--crf")) == 2
    err = capsys.readouterr().err
    assert "--crf" in err and "pip install .[crf]" in err and not (tmp_path / "o").exists()


def test_bad_input_is_one_line_naming_it(setup, tmp_path, capsys):
    root, shards, weights, first = setup

    def refused(args, *words):
        assert segment.main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and all(w in err for w in words), err

    classifier = make_tiny_model(tmp_path / "classifier")
    refused(seg_args(classifier, shards, tmp_path / "o"), str(classifier), "task 'classification'", "segmentation")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(classifier, mixed / "model.safetensors")  # a classifier's weights beside a segmentation config
    shutil.copy(weights.parent / "config.yaml", mixed / "config.yaml")
    refused(seg_args(mixed / "model.safetensors", shards, tmp_path / "o"), "does not fit the DeepLabv3+ network")
    refused(seg_args(tmp_path / "absent.safetensors", shards, tmp_path / "o"), "--weights", "no such file")
    refused(seg_args(weights, tmp_path / "none-*.tar", tmp_path / "o"), "none-*.tar")
    for scales in ("0.5,x", "-1", ","):
        refused(seg_args(weights, shards, tmp_path / "o") + ["--scales", scales], "--scales", repr(scales))
    refused(seg_args(weights, shards, tmp_path / "o", "--crf-iters", "0"), "--crf-iters")
    refused(seg_args(weights, shards, tmp_path / "o", "--num-workers", "-1"), "--num-workers")
    store = tmp_path / "store"
    store.mkdir()
    (store / "infer.json").write_text("{}")
    refused(seg_args(weights, shards, store), f"--out {store}", "infer.json")
    assert not (tmp_path / "o").exists()  # refused before any file


@pytest.mark.slow
def test_two_torchrun_ranks_write_each_image_once(setup, tmp_path):
    root, shards, weights, first = setup
    out = tmp_path / "labels"

    def same_label_maps(out: Path, first: Path, ids: list[str]) -> None:
        assert sorted(p.stem for p in out.glob("*.png")) == ids
        assert all((out / f"{i}.png").read_bytes() == (first / f"{i}.png").read_bytes() for i in ids)

    args = seg_args(weights, shards, out)
    torchrun_writes_each_image_once("puzzlecam.segment", args, out, "segment.json", shards, first, same_label_maps)


@pytest.mark.gpu
def test_cuda_matches_cpu(setup, tmp_path):
    root, shards, weights, first = setup
    out = tmp_path / "labels"
    assert segment.main(seg_args(weights, shards, out)[:-2] + ["--device", "cuda"]) == 0
    model, _ = segment.load_segmenter(weights)
    for image_id, image in images(shards):
        assert_labels_match(read_png(out / f"{image_id}.png"), direct_probabilities(model, image, SCALES))

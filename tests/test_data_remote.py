"""Remote shards (puzzlecam.data.remote): real tar shards served by a loopback HTTP server and read through
``pipe:cat``; 2 ranks simulated in-process; equal batch counts with uneven shards, corrupt samples, exact and
shard-granular resume, workers; the trainer over HTTP with a SIGKILL and a resume (slow)."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from puzzlecam.data import ShardError, eval_loader, remote, train_loader
from puzzlecam.data.__main__ import main as data_main
from puzzlecam.data.remote import RemoteTrainLoader, expand, manifest_url, serve_directory, shard_name, unit_order
from puzzlecam.data.shards import ShardWriter, is_url

SMALL = dict(crop_size=40, min_long_side=32, max_long_side=56)
PATTERN = "trainval-{000000..000004}.tar"  # 30 samples: 7, 7, 7, 7, 2


def _shard_keys(i: int) -> set[str]:
    return {f"synth_{k:06d}" for k in range(7 * i, min(7 * i + 7, 30))}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("remote")
    voc = root / "voc"
    assert data_main(["synth", "--out", str(voc), "--num-images", "30", "--size", "48", "--seed", "5"]) == 0
    out = root / "shards"
    args = ["shard", "--voc-root", str(voc), "--split", "trainval", "--out", str(out), "--shard-size", "7"]
    assert data_main(args) == 0
    return out


@pytest.fixture(scope="module")
def http(shards) -> str:
    """Base URL of a loopback HTTP server over the shards' parent folder (the test's other shard sets are
    written beside ``shards``)."""
    if shutil.which("curl") is None:
        pytest.skip("webdataset reads http:// URLs with curl, which this machine lacks")
    with serve_directory(shards.parent) as base:
        yield base


def _loader(url, **kw) -> RemoteTrainLoader:
    options = dict(batch_size=4, seed=0, shuffle_buffer=5, **SMALL)
    options.update(kw)
    loader = train_loader(url, **options)
    assert isinstance(loader, RemoteTrainLoader)
    return loader


def _take(loader, n=None) -> list[dict]:
    out = []
    for batch in loader:
        out.append(batch)
        if n is not None and len(out) == n:
            break
    return out


def _same(a: list[dict], b: list[dict]) -> None:
    assert [x["id"] for x in a] == [y["id"] for y in b]
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in ("image", "valid", "labels", "label"):
            assert k not in x or torch.equal(x[k], y[k]), k


# ---------------------------------------------------------------------------------------------
# URLs


def test_urls_expand_and_name_their_manifest():
    assert is_url("http://h/a.tar") and is_url("pipe:cat a.tar") and is_url("s3://b/a.tar")
    assert not is_url("data/a.tar") and not is_url("C://x") and not is_url("/abs/train-{0..1}.tar")
    assert expand("http://h/t-{000000..000002}.tar") == [f"http://h/t-00000{i}.tar" for i in range(3)]
    assert expand(["pipe:cat /d/a.tar::pipe:cat /d/b.tar", "pipe:cat /d/a.tar"]) == [
        "pipe:cat /d/a.tar",
        "pipe:cat /d/b.tar",
    ]
    assert shard_name("pipe:curl -s http://h/x/train-000003.tar") == "train-000003.tar"
    assert manifest_url("http://h/x/train-000003.tar") == "http://h/x/manifest.parquet"
    assert manifest_url("pipe:cat '/d d/train-000001.tar' | tee /dev/null") == (
        "pipe:cat '/d d/manifest.parquet' | tee /dev/null"
    )
    with pytest.raises(ShardError, match="webdataset opens"):
        expand("nosuch://h/a.tar")
    with pytest.raises(ShardError, match="mix URLs and local paths"):
        train_loader(["http://h/a.tar", "/d/a.tar"], batch_size=1, seed=0, **SMALL)
    with pytest.raises(ShardError, match="mix URLs and local paths"):
        eval_loader(["http://h/a.tar", "/d/a.tar"])


def test_streaming_needs_a_shuffle_window_and_a_count(shards, http, tmp_path):
    with pytest.raises(ValueError, match="shuffle_buffer"):
        _loader(f"{http}/shards/{PATTERN}", shuffle_buffer=0)
    bare = shards.parent / "bare"
    bare.mkdir(exist_ok=True)
    for tar in shards.glob("*.tar"):
        shutil.copy(tar, bare / tar.name)
    with pytest.raises(ShardError, match="manifest.parquet"):
        _loader(f"{http}/bare/{PATTERN}")
    loader = _loader(f"{http}/bare/{PATTERN}", samples_per_epoch=12)
    assert len(loader) == 3 and len(_take(loader)) == 3
    with pytest.raises(ShardError, match="trainval-000009.tar"):  # a missing first shard: at construction
        _loader(f"{http}/shards/trainval-000009.tar", samples_per_epoch=8)


# ---------------------------------------------------------------------------------------------
# Batches


def test_two_ranks_get_equal_batch_counts_from_uneven_shards(shards, http):
    url = f"{http}/shards/{PATTERN}"
    for epoch in range(2):
        loaders = [_loader(url, rank=r, world_size=2) for r in range(2)]
        for loader in loaders:
            loader.set_epoch(epoch)
        got = [_take(loader) for loader in loaders]
        assert [len(loader) for loader in loaders] == [3, 3] == [len(g) for g in got]  # 30 // (2 * 4)
        ids = [[i for b in g for i in b["id"]] for g in got]
        assert all(len(b["id"]) == 4 and b["image"].shape == (4, 40, 40, 3) for g in got for b in g)
        assert all(len(set(i)) == 12 for i in ids)  # no sample twice on a rank
        assert all(b["labels"].shape == (4, 20) for g in got for b in g)
    # Very uneven: 7 + 2 samples on 2 ranks of 2 streams each (the shards are cut into parts); every rank and
    # stream still gives its batches: 9 // (2 * 2) = 2 each.
    few = [f"{http}/shards/trainval-000000.tar", f"{http}/shards/trainval-000004.tar"]
    loaders = [_loader(few, batch_size=2, streams=2, rank=r, world_size=2) for r in range(2)]
    assert loaders[0].units == 4 and [len(_take(loader)) for loader in loaders] == [2, 2]
    assert [len(_take(loader)) for loader in loaders] == [2, 2]  # the next epoch too


def test_pipe_cat_http_and_workers_give_the_same_batches(shards, http):
    by_http = _take(_loader(f"{http}/shards/{PATTERN}", streams=2))
    by_pipe = _take(_loader(f"pipe:cat {shards}/{PATTERN}", streams=2))
    by_workers = _take(_loader(f"{http}/shards/{PATTERN}", num_workers=2))
    assert len(by_http) == 7
    _same(by_http, by_pipe)
    _same(by_http, by_workers)
    assert by_http[0]["valid"].dtype == torch.int64 and by_http[0]["image"].dtype == torch.uint8
    ids = [i for b in by_http for i in b["id"]]
    assert len(ids) == 28 and set(ids) <= set().union(*(_shard_keys(i) for i in range(5)))


def test_masks_become_labels_and_the_dataset_sets_the_label_length(shards, http, tmp_path):
    loader = _loader(f"{http}/shards/{PATTERN}", label_member="seg.png")
    assert loader.with_labels and loader.num_classes == 20
    batch = _take(loader, 1)[0]
    assert batch["label"].shape == (4, 40, 40) and batch["label"].dtype == torch.int64
    assert not _loader(f"{http}/shards/{PATTERN}").with_labels  # no label.png

    # COCO samples (their json names the dataset): 80 entries per label vector, local and remote alike.
    coco = shards.parent / "coco"
    coco.mkdir(exist_ok=True)
    writer = ShardWriter(coco, "coco", 3)
    for i in range(6):
        jpg = io.BytesIO()
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(jpg, format="JPEG")
        meta = {"id": f"c{i}", "labels": [79 - i], "height": 20, "width": 30, "dataset": "coco"}
        writer.add(f"c{i}", {"jpg": jpg.getvalue(), "json": json.dumps(meta).encode()})
    writer.commit()
    remote_coco = _loader(f"{http}/coco/coco-{{000000..000001}}.tar", batch_size=2, samples_per_epoch=6)
    local_coco = train_loader(str(coco), batch_size=2, seed=0, **SMALL)
    assert remote_coco.num_classes == local_coco.num_classes == eval_loader(str(coco)).num_classes == 80
    for batch in _take(remote_coco) + _take(local_coco):
        assert batch["labels"].shape == (2, 80)
        for row, key in zip(batch["labels"], batch["id"], strict=True):
            assert row.nonzero().flatten().tolist() == [79 - int(key[1:])]
    # Read as 20-class (VOC) labels, every sample is corrupt: a dataset mismatch, never silently wrong labels.
    with pytest.raises(ShardError, match="no decodable sample"):
        _take(train_loader(str(coco), batch_size=2, seed=0, num_classes=20, **SMALL))
    # The trainer's task refuses a VOC-sized classifier on remote COCO shards.
    from puzzlecam.config import load_config
    from puzzlecam.errors import ConfigError
    from puzzlecam.tasks import build_task

    overrides = [
        f"data.train_shards={http}/coco/coco-{{000000..000001}}.tar",
        "data.shuffle_buffer=4",
        "data.samples_per_epoch=6",
        "data.num_workers=0",
        "data.crop_size=32",
        "train.micro_batch_size=2",
        "train.global_batch_size=2",
        "train.grad_accum_steps=1",
    ]
    # Refused before training: the task streams the first sample to learn the dataset.
    with pytest.raises(ConfigError, match="hold COCO samples: .* Set model.num_classes=80"):
        build_task(load_config(None, overrides))
    assert len(build_task(load_config(None, [*overrides, "model.num_classes=80"])).train_loader(0, 1)) == 3


# ---------------------------------------------------------------------------------------------
# Corrupt samples


class _Boom:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/puzzlecam-remote-unpickled"),))


def test_corrupt_samples_are_skipped_counted_and_never_unpickled(shards, http):
    flag = Path("/tmp/puzzlecam-remote-unpickled")
    flag.unlink(missing_ok=True)
    bad_dir = shards.parent / "corrupt"
    bad_dir.mkdir(exist_ok=True)
    shutil.copy(shards / "manifest.parquet", bad_dir)
    # The corrupt sample's shard: not the first unit of epoch 0, so that the epoch reads it exactly once.
    first = int(unit_order(0, 0, 5)[0])
    bad_shard = (first + 1) % 4
    bad_key = f"synth_{7 * bad_shard + 3:06d}"
    for i in range(5):
        name = f"trainval-{i:06d}.tar"
        with tarfile.open(shards / name) as src, tarfile.open(bad_dir / name, "w", format=tarfile.USTAR_FORMAT) as out:
            for info in src.getmembers():
                data = src.extractfile(info).read()
                if info.name == f"{bad_key}.jpg":
                    data = data[:40]  # a cut-off JPEG
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))
                if info.name.endswith(".json"):
                    extra = tarfile.TarInfo(info.name.replace(".json", ".pyd"))
                    payload = pickle.dumps(_Boom())
                    extra.size = len(payload)
                    out.addfile(extra, io.BytesIO(payload))
    # 30 samples, one corrupt: 6 batches of 5 take the 29 good ones and one more of the next lap.
    loader = _loader(f"{http}/corrupt/{PATTERN}", batch_size=5)
    got = _take(loader)
    assert len(got) == 6 and all(len(b["id"]) == 5 for b in got)
    assert bad_key not in {i for b in got for i in b["id"]}
    assert loader.skipped == 1 and loader.epoch_corrupt == [int(i == bad_shard) for i in range(5)]
    assert not flag.exists()
    # Members over the size bound are refused from their header: here every jpg, so nothing decodes and the
    # loader says so instead of looping.
    small = _loader(f"{http}/corrupt/{PATTERN}", batch_size=5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(remote, "MAX_MEMBER_BYTES", 100)
        with pytest.raises(ShardError, match="no decodable sample"):
            _take(small)


def test_a_truncated_shard_and_a_missing_one(shards, http):
    cut = shards.parent / "cut"
    cut.mkdir(exist_ok=True)
    shutil.copy(shards / "manifest.parquet", cut)
    for tar in shards.glob("*.tar"):
        shutil.copy(tar, cut / tar.name)
    # Cut in the middle of the third sample's JPEG: two samples, a corrupt one, then nothing.
    with tarfile.open(shards / "trainval-000001.tar") as tar:
        jpg = [info for info in tar.getmembers() if info.name.endswith(".jpg")][2]
    data = (shards / "trainval-000001.tar").read_bytes()
    (cut / "trainval-000001.tar").write_bytes(data[: jpg.offset_data + jpg.size // 2])
    loader = _loader(f"{http}/cut/{PATTERN}")
    got = _take(loader)
    assert len(got) == 7 and all(len(b["id"]) == 4 for b in got)  # the stream goes on with its next shards
    assert loader.epoch_corrupt[1] >= 1 and loader.skipped == sum(loader.epoch_corrupt) == loader.epoch_corrupt[1]
    # A shard that is not there fails the loader when it is read, naming it (curl's HTTP error; cat's exit).
    (cut / "trainval-000003.tar").unlink()
    for url in (f"{http}/cut/{PATTERN}", f"pipe:cat {cut}/{PATTERN}"):
        with pytest.raises(ShardError, match="trainval-000003.tar"):
            _take(_loader(url, streams=2))


# ---------------------------------------------------------------------------------------------
# Resume


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact_on_the_same_layout(shards, http, workers):
    url = f"{http}/shards/{PATTERN}"
    whole = _loader(url, num_workers=workers, streams=2)
    reference = _take(whole) + _take(whole)  # two epochs
    for cut in (3, 6):
        first = _loader(url, num_workers=workers, streams=2)
        _take(first, cut)
        state = first.state_dict()
        assert state["batches_done"] == cut
        resumed = _loader(url, num_workers=workers, streams=2)
        resumed.load_state_dict(state)
        _same(_take(resumed) + _take(resumed), reference[cut:])
    # From another host, or through pipe:cat: the same shards by name, the same batches.
    moved = _loader(f"pipe:cat {shards}/{PATTERN}", streams=2)
    moved.load_state_dict(state)
    _same(_take(moved), reference[6:7])


def test_resume_on_another_layout_continues_at_shard_granularity(shards, http):
    url = f"{http}/shards/{PATTERN}"
    # Streams 2 -> 1 on one rank: the units the streams had finished are not read again this epoch.
    first = _loader(url, streams=2)
    used = {i for b in _take(first, 4) for i in b["id"]}
    state = first.state_dict()
    order = unit_order(0, 0, 5)
    finished = [int(order[(s + 2 * t) % 5]) for s, (j, _) in enumerate(state["positions"]) for t in range(j)]
    assert finished  # the batches above finished some shard
    resumed = _loader(url, streams=1)
    resumed.load_state_dict(state)
    assert len(resumed) == 7 and resumed.quota == (30 - 16) // 4 == 3
    rest = _take(resumed)
    assert len(rest) == 3 and resumed.epoch == 1
    again = {i for b in rest for i in b["id"]}
    assert not again & set().union(*(_shard_keys(i) for i in finished))
    assert again - used  # the rest of the epoch: samples not trained on yet

    # 2 ranks -> 1 (an elastic resume): every old rank's finished units leave the epoch.
    olds = [_loader(url, rank=r, world_size=2) for r in range(2)]
    for loader in olds:
        _take(loader, 2)
    states = [loader.state_dict() for loader in olds]
    single = _loader(url)
    single.load_elastic_state(states)
    assert single.quota == (30 - 16) // 4 and single.plan.global_skip
    assert len(_take(single)) == 3 and single.epoch == 1 and len(_take(single)) == 7
    with pytest.raises(ValueError, match="seed"):
        _loader(url, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="local shards"):
        _loader(url).load_state_dict({**state, "kind": None})


# ---------------------------------------------------------------------------------------------
# The trainer over HTTP (slow)


@pytest.mark.slow
def test_training_over_http_resumes_after_sigkill(tmp_path):
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("needs deepspeed")
    from test_train_support import metrics, python_launch, run_all, tiny_overrides, tiny_shards

    if shutil.which("curl") is None:
        pytest.skip("webdataset reads http:// URLs with curl, which this machine lacks")
    local = tiny_shards(tmp_path / "data")  # 24 images in one shard, with its manifest
    with serve_directory(local) as base:
        over = tiny_overrides(
            local,
            **{
                "data.train_shards": f"{base}/trainval-{{000000..000000}}.tar",
                "data.shuffle_buffer": 8,
                "train.max_steps": 6,
                "train.micro_batch_size": 2,
                "train.grad_accum_steps": 2,
            },
        )
        a, b = tmp_path / "A", tmp_path / "B"
        full = python_launch(a, over, tmp_path / "A.log")
        killed = python_launch(b, over, tmp_path / "B1.log", env={"PUZZLECAM_FAULT_KILL": "step=3"})
        rc_full, rc_killed = run_all([full, killed], expect_ok=False)
        assert rc_full == 0, full.output()[-4000:]
        assert rc_killed == -9, killed.output()[-4000:]
        resumed = python_launch(b, over, tmp_path / "B2.log")
        run_all([resumed])
        assert "resumed from" in resumed.output()
    ma, mb = metrics(a), metrics(b)
    assert [r["step"] for r in ma] == [1, 2, 3, 4, 5, 6] == [r["step"] for r in mb]
    for ra, rb in zip(ma, mb, strict=True):
        assert ra["loss"] == rb["loss"], (ra, rb)


def test_the_trainers_loader_takes_samples_per_epoch_from_the_config(shards, http):
    """data.samples_per_epoch reaches the remote loader through Task.train_loader (shards served without a manifest)."""
    from puzzlecam.config import load_config
    from puzzlecam.tasks import build_task

    bare = shards.parent / "bare"
    bare.mkdir(exist_ok=True)
    for tar in shards.glob("*.tar"):
        shutil.copy(tar, bare / tar.name)
    cfg = load_config(
        None,
        [
            f"data.train_shards={http}/bare/{PATTERN}",
            "data.shuffle_buffer=4",
            "data.samples_per_epoch=12",
            "data.num_workers=0",
            "data.crop_size=32",
            "train.micro_batch_size=2",
            "train.global_batch_size=2",
            "train.grad_accum_steps=1",
        ],
    )
    assert len(build_task(cfg).train_loader(0, 1)) == 12 // 2


# ---------------------------------------------------------------------------------------------
# Evaluation and inference over URLs


def test_eval_loader_streams_every_image_once(shards, http, tmp_path):
    """Full images over HTTP and pipe:cat as the local eval loader gives them, 2 ranks (and 2 workers) covering
    every sample once, the length from the manifest, and the evaluation command on a URL."""
    local = {b["id"][0]: b for b in eval_loader(str(shards / PATTERN))}
    for url in (f"{http}/shards/{PATTERN}", f"pipe:cat {shards}/{PATTERN}"):
        loader = eval_loader(url)
        assert len(loader) == loader.num_samples == len(local) and loader.num_classes == 20
        got = {b["id"][0]: b for b in loader}
        assert got.keys() == local.keys()
        for key, batch in got.items():
            for name in ("image", "valid", "labels", "mask", "has_mask"):
                assert torch.equal(batch[name], local[key][name]), (key, name)
    ranks = [
        [b["id"][0] for b in eval_loader(f"{http}/shards/{PATTERN}", rank=r, world_size=2, num_workers=2)]
        for r in (0, 1)
    ]
    assert sorted(ranks[0] + ranks[1]) == sorted(local) and not set(ranks[0]) & set(ranks[1])
    from puzzlecam import evaluate

    labels = tmp_path / "labels"
    labels.mkdir()
    from puzzlecam.utils.labelmap import encode_label_png

    masked = [k for k, b in local.items() if bool(b["has_mask"][0])]
    for key in masked:
        (labels / f"{key}.png").write_bytes(encode_label_png(local[key]["mask"][0].numpy()))
    assert evaluate.main(["--mode", "labels", "--labels", str(labels), "--shards", f"{http}/shards/{PATTERN}"]) == 0

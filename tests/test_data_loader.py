"""Synthetic set end to end (synth -> shard -> load), distributed splitting, resume, corrupt and hostile shards."""

import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from puzzlecam import NUM_CLASSES
from puzzlecam.data import ShardError, eval_loader, train_loader
from puzzlecam.data.__main__ import main as data_main
from puzzlecam.data.shards import ShardWriter
from puzzlecam.data.synth import make_scene
from puzzlecam.utils.labelmap import encode_label_png
from puzzlecam.utils.net import free_port

SMALL = dict(crop_size=48, min_long_side=40, max_long_side=72)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    assert data_main(["synth", "--out", str(root / "voc"), "--num-images", "30", "--size", "64", "--seed", "3"]) == 0
    assert (
        data_main(
            [
                "shard",
                "--voc-root",
                str(root / "voc"),
                "--split",
                "trainval",
                "--out",
                str(root / "shards"),
                "--shard-size",
                "7",
            ]
        )
        == 0
    )
    return root


def _batches(loader, n=None):
    out = []
    for i, b in enumerate(loader):
        out.append(b)
        if n is not None and i + 1 == n:
            break
    return out


def _same(a, b):
    assert a["id"] == b["id"] and a.keys() == b.keys()
    for k in ("image", "valid", "labels", "label"):
        assert k not in a or torch.equal(a[k], b[k]), k


def test_synth_deterministic_and_consistent(synth, tmp_path):
    assert (
        data_main(["synth", "--out", str(tmp_path / "again"), "--num-images", "30", "--size", "64", "--seed", "3"]) == 0
    )
    for sub in (
        "JPEGImages/synth_000007.jpg",
        "SegmentationClass/synth_000007.png",
        "Annotations/synth_000007.xml",
        "ImageSets/Segmentation/val.txt",
    ):
        assert (tmp_path / "again" / sub).read_bytes() == (synth / "voc" / sub).read_bytes()
    for i in range(30):
        mask = np.array(Image.open(synth / "voc" / "SegmentationClass" / f"synth_{i:06d}.png"))
        assert Image.open(synth / "voc" / "SegmentationClass" / f"synth_{i:06d}.png").mode == "P"
        values = set(np.unique(mask).tolist())
        assert 255 in values and values <= set(range(NUM_CLASSES + 1)) | {255}
        # Every labelled class has pixels, every mask class is labelled.
        rgb, m2, objects = make_scene(3, i, 64, sorted({0, 2, 3, 6, 7, 11, 14, 18}))
        np.testing.assert_array_equal(m2, mask)
        assert {c + 1 for c, _ in objects} == values - {0, 255}
    # A different seed gives a different set.
    rgb_other, _, _ = make_scene(4, 0, 64, [0, 1])
    assert not np.array_equal(rgb_other, make_scene(3, 0, 64, [0, 1])[0])


def test_train_batches_layout_and_augmentation(synth):
    shards = str(synth / "shards" / "trainval-{000000..000004}.tar")
    loader = train_loader(shards, batch_size=4, seed=1, **SMALL)
    assert len(loader) == 30 // 4
    batches = _batches(loader)
    assert len(batches) == 7 and loader.epoch == 1 and loader.skipped == 0
    b = batches[0]
    assert b["image"].dtype == torch.uint8 and b["image"].shape == (4, 48, 48, 3)
    assert b["valid"].dtype == torch.int64 and b["labels"].dtype == torch.float32 and b["labels"].shape == (4, 20)
    assert (b["labels"].sum(1) >= 1).all()
    for batch in batches:  # outside the valid region the canvas is zero
        for img, (vh, vw) in zip(batch["image"], batch["valid"].tolist(), strict=True):
            assert 1 <= vh <= 48 and 1 <= vw <= 48
            assert img[vh:].sum() == 0 and img[:, vw:].sum() == 0
    ids = [i for batch in batches for i in batch["id"]]
    assert len(set(ids)) == 28  # a permutation: no repeats within an epoch
    # Epoch 1 has another order.
    assert [i for batch in _batches(loader) for i in batch["id"]] != ids

    # Without randomness left (fixed long side, no flip, crop >= image), the canvas is exactly the
    # bicubic resize of the decoded JPEG at the top-left.
    exact = train_loader(shards, batch_size=2, seed=0, crop_size=80, min_long_side=70, max_long_side=70, hflip=False)
    batch = next(iter(exact))
    for img, (vh, vw), image_id in zip(batch["image"], batch["valid"].tolist(), batch["id"], strict=True):
        src = Image.open(synth / "voc" / "JPEGImages" / f"{image_id}.jpg").convert("RGB")
        w, h = src.size
        expected = np.asarray(src.resize((round(w * 70 / max(w, h)), round(h * 70 / max(w, h))), Image.BICUBIC))
        assert (vh, vw) == expected.shape[:2] and max(vh, vw) == 70
        np.testing.assert_array_equal(img[:vh, :vw].numpy(), expected)


def test_workers_do_not_change_batches_and_resume_is_exact(synth):
    shards = str(synth / "shards" / "*.tar")
    ref = train_loader(shards, batch_size=3, seed=5, num_workers=0, **SMALL)
    full = _batches(ref) + _batches(ref)  # two epochs
    par = train_loader(shards, batch_size=3, seed=5, num_workers=2, **SMALL)
    for a, b in zip(full, _batches(par) + _batches(par), strict=True):
        _same(a, b)
    # Stop after 4 batches of epoch 1, resume in a new loader (other worker count): same remaining batches.
    run = train_loader(shards, batch_size=3, seed=5, num_workers=2, **SMALL)
    _batches(run)
    _batches(run, 4)
    state = run.state_dict()
    assert (state["epoch"], state["batches_done"]) == (1, 4)
    # Iterating the same loader again (persistent workers, prefetched batches dropped) continues at batch 4.
    _same(next(iter(run)), full[len(ref) + 4])
    resumed = train_loader(shards, batch_size=3, seed=5, num_workers=0, **SMALL)
    resumed.load_state_dict(state)
    rest = _batches(resumed)
    assert len(rest) == len(ref) - 4 and resumed.epoch == 2
    for a, b in zip(full[len(ref) + 4 :], rest, strict=True):
        _same(a, b)
    # A checkpoint taken at the very end of an epoch resumes at the next epoch.
    end = train_loader(shards, batch_size=3, seed=5, **SMALL)
    end.load_state_dict({**state, "epoch": 0, "batches_done": len(ref)})
    _same(next(iter(end)), full[len(ref)])
    # Mismatched runs are refused.
    other = train_loader(shards, batch_size=2, seed=5, **SMALL)
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(state)


def _stripes(x, y):
    """The label of source pixel (x, y): stripes 3 px wide that repeat only after 63 px along x."""
    return (x // 3 + 5 * (y // 3)) % 21


def _write_ramp_shards(out):
    """Images whose colour is their pixel position (R = 4x, G = 4y) with label maps of :func:`_stripes`; one
    more sample has no label.png. Returns {id: (height, width)} of the labelled ones."""
    out.mkdir()
    writer = ShardWriter(out, "ramp", 3)
    sizes = {}
    for i in range(7):
        h, w = 30 + 2 * i, 44 - i
        y, x = np.mgrid[:h, :w]
        jpg = io.BytesIO()
        Image.fromarray(np.stack([4 * x, 4 * y, np.full_like(x, 128)], -1).astype(np.uint8)).save(
            jpg, format="JPEG", quality=95
        )
        members = {"jpg": jpg.getvalue(), "json": b'{"labels": [2]}'}
        if i != 6:
            members["label.png"] = encode_label_png(_stripes(x, y).astype(np.uint8))
            sizes[f"ramp_{i}"] = (h, w)
        writer.add(f"ramp_{i}", members)
    writer.commit()
    return sizes


def test_labels_get_the_image_geometry_and_255_padding(tmp_path):
    sizes = _write_ramp_shards(tmp_path / "ramp")
    loader = train_loader(tmp_path / "ramp", batch_size=2, seed=0, crop_size=40, min_long_side=28, max_long_side=64)
    flipped = unflipped = padded = 0
    for batch in _batches(loader) + _batches(loader) + _batches(loader):
        assert batch["label"].dtype == torch.int64 and batch["label"].shape == (2, 40, 40)
        assert "ramp_6" not in batch["id"]  # no label.png: skipped as a corrupt sample
        for image, label, (vh, vw), image_id in zip(
            batch["image"].numpy(), batch["label"].numpy(), batch["valid"].tolist(), batch["id"], strict=True
        ):
            assert (label[vh:] == 255).all() and (label[:, vw:] == 255).all()
            assert not image[vh:].any() and not image[:, vw:].any()
            padded += vh < 40 or vw < 40
            # The image's colour says which source pixel each canvas pixel shows; the label must be that
            # pixel's (within 3 px: bicubic and nearest round differently, JPEG adds a little noise).
            h, w = sizes[image_id]
            sx = np.rint(image[:vh, :vw, 0] / 4).astype(int)
            sy = np.rint(image[:vh, :vw, 1] / 4).astype(int)
            near = np.zeros((vh, vw), dtype=bool)
            for dy in range(-3, 4):
                for dx in range(-3, 4):
                    near |= _stripes(np.clip(sx + dx, 0, w - 1), np.clip(sy + dy, 0, h - 1)) == label[:vh, :vw]
            assert near.all(), image_id
            if vw > 8:
                flipped += sx[:, 0].mean() > sx[:, -1].mean()
                unflipped += sx[:, 0].mean() < sx[:, -1].mean()
    assert flipped and unflipped and padded  # every case was met: flips both ways, padding
    assert loader.skipped == 3  # ramp_6, once per epoch


def test_labelled_shards_give_stage_one_batches_plus_labels_deterministically(synth, tmp_path):
    """label-shards output: the same images, valid and labels as its input shards (the draws do not depend on
    the label), plus the label; the same for any worker count and after a resume."""
    out = tmp_path / "labelled"
    masks = synth / "voc" / "SegmentationClass"  # the masks as label maps: files {id}.png
    argv = ["label-shards", "--shards", str(synth / "shards"), "--labels", str(masks), "--out", str(out)]
    assert data_main(argv) == 0
    plain = _batches(train_loader(synth / "shards", batch_size=4, seed=2, **SMALL))
    labelled = train_loader(out, batch_size=4, seed=2, num_workers=2, **SMALL)
    batches = _batches(labelled)
    assert len(batches) == len(plain)
    for a, b in zip(plain, batches, strict=True):
        assert "label" not in a and b["label"].shape == (4, 48, 48)
        _same(a, {k: v for k, v in b.items() if k != "label"})
        # A mask's 255 band and its classes survive nearest resizing; the padding is 255.
        for label, labels in zip(b["label"], b["labels"], strict=True):
            classes = set(label.unique().tolist()) - {0, 255}
            assert classes <= {c + 1 for c in labels.nonzero().flatten().tolist()}
    resumed = train_loader(out, batch_size=4, seed=2, **SMALL)
    first = train_loader(out, batch_size=4, seed=2, **SMALL)
    _batches(first, 3)
    resumed.load_state_dict(first.state_dict())
    for a, b in zip(batches[3:], _batches(resumed), strict=True):
        _same(a, b)


def test_rank_split_even_with_fewer_shards_than_readers(synth, tmp_path):
    one = tmp_path / "one.tar"  # a single shard read by 4 ranks x 2 workers
    one.write_bytes((synth / "shards" / "trainval-000000.tar").read_bytes())
    lens, seen = set(), []
    for rank in range(4):
        loader = train_loader(str(one), batch_size=1, seed=0, num_workers=2, rank=rank, world_size=4, **SMALL)
        lens.add(len(loader))
        seen += [i for b in _batches(loader) for i in b["id"]]
    # 7 samples, padded by wrap-around to 8: every rank has 2 batches; every sample is seen.
    assert lens == {2} and len(seen) == 8 and len(set(seen)) == 7
    with pytest.raises(ShardError, match="batch_size"):
        train_loader(str(one), batch_size=3, seed=0, rank=0, world_size=4, **SMALL)


def _ranks(shards, world_size, batch_size):
    return [
        train_loader(shards, batch_size=batch_size, seed=5, rank=r, world_size=world_size, **SMALL)
        for r in range(world_size)
    ]


def test_an_elastic_resume_continues_the_epoch_at_its_global_position(synth):
    shards = str(synth / "shards" / "*.tar")  # 30 samples
    whole = _ranks(shards, 1, 6)[0]
    epoch0 = _batches(whole)  # slots 0..29 of epoch 0, one rank
    everything = sorted(i for b in epoch0 for i in b["id"])
    assert len(set(everything)) == 30
    # 2 ranks x 3 take 2 batches (slots 0..11); then 1 rank x 6, or 3 ranks x 2, finish the epoch: each
    # sample once. The slot -> sample -> augmentation map does not depend on the layout.
    for later in ((1, 6), (3, 2)):
        first = _ranks(shards, 2, 3)
        seen = [i for loader in first for b in _batches(loader, 2) for i in b["id"]]
        states = [loader.state_dict() for loader in first]
        assert [s["position"] for s in states] == [12, 12]
        rest = _ranks(shards, *later)
        for loader in rest:
            loader.load_elastic_state(states)
            assert (loader.epoch, loader.position) == (0, 12)
        batches = [_batches(loader) for loader in rest]
        seen += [i for per_rank in batches for b in per_rank for i in b["id"]]
        assert sorted(seen) == everything, later
        assert all(loader.epoch == 1 and loader.position == 0 for loader in rest)
        if later == (1, 6):
            for a, b in zip(batches[0], epoch0[2:], strict=True):
                _same(a, b)
    # 1 rank x 6 took 1 batch; 4 ranks x 2 continue at slot 6: 24 slots left, 3 batches each, no padding.
    # 4 ranks x 2 after 1 batch (slot 8): 22 slots left, padded by wrap-around to 24 as an epoch's end is:
    # the epoch's first two samples come again (slots 30 and 31 hold samples 0 and 1 of the order).
    for (world, batch), expected_extra in (((1, 6), 0), ((4, 2), 2)):
        first = _ranks(shards, world, batch)
        seen = [i for loader in first for b in _batches(loader, 1) for i in b["id"]]
        rest = _ranks(shards, 4, 2)
        for loader in rest:
            loader.load_elastic_state([loader.state_dict() for loader in first])
        seen += [i for loader in rest for b in _batches(loader) for i in b["id"]]
        assert set(seen) == set(everything) and len(seen) == 30 + expected_extra
        if expected_extra:
            order = [i for b in epoch0 for i in b["id"]]
            assert sorted(seen) == sorted(order + order[:2])

    # A state at the end of its epoch goes on with the next one; the corrupt-sample counts of the old
    # ranks go to rank 0 (the others start at 0); a different seed or a disagreement is refused.
    first = _ranks(shards, 2, 3)
    for loader in first:
        _batches(loader, len(loader))
    states = [{**loader.state_dict(), "skipped": 2, "epoch_corrupt": [1] * len(loader.shard_paths)} for loader in first]
    rank0, rank1 = _ranks(shards, 2, 3)[0], _ranks(shards, 3, 2)[1]
    for loader in (rank0, rank1):
        loader.load_elastic_state(states)
        assert (loader.epoch, loader.position) == (1, 0)
    assert (rank0.skipped, rank0.epoch_corrupt) == (4, [2] * len(rank0.shard_paths))
    assert (rank1.skipped, rank1.epoch_corrupt) == (0, [0] * len(rank1.shard_paths))
    with pytest.raises(ValueError, match="seed"):
        train_loader(shards, batch_size=6, seed=6, **SMALL).load_elastic_state(states)
    with pytest.raises(ValueError, match="disagree on the data position"):
        rank0.load_elastic_state([states[0], {**states[1], "batches_done": 1}])


def test_missing_shards_are_clear_errors(synth, tmp_path):
    with pytest.raises(ShardError, match="matches no file"):
        train_loader(str(tmp_path / "nothing-*.tar"), batch_size=1, seed=0, **SMALL)
    with pytest.raises(ShardError, match="does not exist"):
        eval_loader(str(synth / "shards" / "trainval-{000000..000009}.tar"))
    with pytest.raises(ShardError, match="does not exist"):
        eval_loader([str(synth / "shards" / "trainval-000000.tar"), str(tmp_path / "gone.tar")])
    with pytest.raises(ShardError, match=r"'x/\{0\.\.' is not a valid brace pattern"):
        eval_loader("x/{0..")
    (tmp_path / "junk.tar").write_bytes(b"not a tar file at all" * 100)
    with pytest.raises(ShardError, match="junk.tar"):
        eval_loader(str(tmp_path / "junk.tar"))


class _Exploit:
    """Unpickling this would create MARKER; no loader may ever do it."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _add(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_corrupt_and_hostile_shards_are_skipped_and_never_unpickled(synth, tmp_path):
    marker = tmp_path / "PWNED"
    _Exploit.marker = str(marker)
    payload = pickle.dumps(_Exploit())
    good = sorted((synth / "voc" / "JPEGImages").glob("*.jpg"))[:4]
    path = tmp_path / "bad-000000.tar"
    with tarfile.open(path, "w") as tf:
        for i, jpg in enumerate(good):
            key = f"good{i}"
            _add(tf, f"{key}.jpg", jpg.read_bytes())
            _add(tf, f"{key}.json", json.dumps({"id": key, "labels": [i]}).encode())
            for ext in ("pyd", "pth", "pickle", "json.pickle"):
                _add(tf, f"{key}.{ext}", payload)
        _add(tf, "badjpeg.jpg", good[0].read_bytes()[:300])
        _add(tf, "badjpeg.json", b'{"labels": [1]}')
        _add(tf, "nojson.jpg", good[1].read_bytes())
        _add(tf, "range.jpg", good[2].read_bytes())
        _add(tf, "range.json", b'{"labels": [20]}')
        _add(tf, "badjson.jpg", good[2].read_bytes())
        _add(tf, "badjson.json", b"{not json")
        _add(tf, "badmask.jpg", good[3].read_bytes())
        _add(tf, "badmask.json", b'{"labels": [2]}')
        _add(tf, "badmask.seg.png", b"\x89PNG\r\n\x1a\n garbage")
        _add(tf, "../../escape.jpg", good[0].read_bytes())  # never used as a path
        _add(tf, "tail.json", b'{"labels": [3]}')
        _add(tf, "tail.jpg", good[0].read_bytes())
    data = path.read_bytes()
    cut = data.rfind(b"tail.jpg")  # truncate inside the last member's data
    path.write_bytes(data[: cut + 512 + 100])

    ev = eval_loader(str(path))
    got = [b["id"][0] for b in ev]
    assert sorted(got) == ["good0", "good1", "good2", "good3"]
    # badjpeg, nojson, range, badjson, badmask, ../../escape (no json), tail (truncated jpg member dropped).
    assert ev.skipped == 7
    loader = train_loader(str(path), batch_size=4, seed=0, num_workers=2, **SMALL)
    for _ in range(2):
        for b in loader:
            # Training never decodes masks, so badmask (good jpg + json) is a usable training sample.
            assert b["image"].shape[0] == 4 and set(b["id"]) <= {f"good{i}" for i in range(4)} | {"badmask"}
            assert b["labels"].sum() == 4
    # 11 keys indexed in tar order, 6 of them corrupt for training (indices 4-7, 9, 10); `skipped`
    # counts the corrupt ones among the 8 slots (2 batches of 4) of each epoch's order.
    from puzzlecam.data.loader import epoch_order

    assert len(loader) == 11 // 4
    expected = sum(int(np.isin(epoch_order(np.zeros(11, int), 0, e, 0)[:8], [4, 5, 6, 7, 9, 10]).sum()) for e in (0, 1))
    assert loader.skipped == expected > 0
    assert not marker.exists()


def _dist_worker(rank, world, port, shards, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        train = train_loader(shards, batch_size=2, seed=7, num_workers=1, **SMALL)  # rank/world from dist
        steps = 0
        train_ids = []
        for b in train:
            steps += 1
            train_ids += b["id"]
            dist.all_reduce(torch.ones(1))  # a collective per step: unequal counts would hang here
        ev = eval_loader(shards)
        eval_ids = [b["id"][0] for b in ev]
        dist.barrier()
        Path(out_dir, f"{rank}.json").write_text(
            json.dumps({"steps": steps, "len": len(train), "train": train_ids, "eval": eval_ids})
        )
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_disjoint_and_equal(synth, tmp_path):
    shards = str(synth / "shards" / "trainval-{000000..000004}.tar")  # 30 samples, 5 uneven shards
    mp.start_processes(
        _dist_worker, args=(2, free_port(), shards, str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2))
    assert r0["steps"] == r1["steps"] == r0["len"] == 15 // 2
    assert not set(r0["train"]) & set(r1["train"])
    assert not set(r0["eval"]) & set(r1["eval"])
    assert sorted(r0["eval"] + r1["eval"]) == [f"synth_{i:06d}" for i in range(30)]


def test_windowed_shuffle_order_is_a_seeded_permutation():
    from puzzlecam.data.loader import epoch_order

    shard_of = np.repeat(np.arange(5), [7, 7, 7, 7, 2])
    full = epoch_order(shard_of, seed=1, epoch=0, shuffle_buffer=0)
    windowed = epoch_order(shard_of, seed=1, epoch=0, shuffle_buffer=7)
    for order in (full, windowed):
        assert sorted(order.tolist()) == list(range(30))
    np.testing.assert_array_equal(windowed, epoch_order(shard_of, seed=1, epoch=0, shuffle_buffer=7))
    assert not np.array_equal(windowed, epoch_order(shard_of, seed=1, epoch=1, shuffle_buffer=7))
    # Shards are read one after another, shuffled only inside windows: each shard's samples lie in
    # at most two consecutive windows of 7 (a full permutation scatters them).
    window_of = np.empty(30, dtype=int)
    window_of[windowed] = np.arange(30) // 7
    for s in range(5):
        w = sorted(set(window_of[shard_of == s].tolist()))
        assert len(w) <= 2 and w == list(range(w[0], w[-1] + 1))
    assert not np.all(np.diff(shard_of[full]) >= 0)


def test_bench_data_reports_every_pipeline(tmp_path, capsys):
    from puzzlecam.bench.data import main as bench_main

    out = tmp_path / "bench.json"
    rc = bench_main(
        [
            "--num-images",
            "8",
            "--image-size",
            "64",
            "--workers",
            "0",
            "--batch-size",
            "2",
            "--crop-size",
            "32",
            "--min-long-side",
            "32",
            "--max-long-side",
            "48",
            "--batches",
            "1",
            "--repeats",
            "1",
            "--warmup",
            "1",
            "--json",
            str(out),
        ]
    )
    rows = json.loads(out.read_text())
    assert rc == 0 and [r["workers"] for r in rows] == [0]
    assert rows[0]["shards_images_per_s"] > 0 and rows[0]["folder_images_per_s"] > 0
    assert rows[0]["http_images_per_s"] > 0  # the same shards streamed from a loopback HTTP server
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]  # written atomically, no temporary left
    # Bad flag values name the flag and exit 2.
    capsys.readouterr()
    assert bench_main(["--workers", "0,x"]) == 2
    assert bench_main(["--batch-size", "0"]) == 2
    assert capsys.readouterr().err == (
        "error: --workers must be comma-separated integers, got '0,x'\nerror: --batch-size must be >= 1, got 0\n"
    )

"""Stage 2's reference math (docs/affinity.md) against definitions written out here, pixel by pixel.

Directions and paths against the rule, pair masks and loss terms against per-pair loops, the loss's
gradient (gradcheck), the sparse random walk against the dense hw x hw definition and a per-pixel
one-step walk, the data-parallel normalization in a real 2-process gloo group, and bad input.
"""

import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from puzzlecam.affinity import (
    AffinityLosses,
    affinity_loss,
    affinity_sums_reference,
    direction_paths,
    pair_masks,
    path_directions,
    random_walk_dense,
    random_walk_reference,
)
from puzzlecam.utils.net import free_port

# The original's PathIndex(5).search_dst, printed from core/aff_utils.py: grouped by path length.
ORIGINAL_RADIUS5_ORDER = [
    (0, 1), (1, 0), (0, 2), (2, 0), (0, 3), (1, -1), (1, 1), (3, 0), (0, 4), (4, 0), (1, -2), (1, 2),
    (2, -1), (2, 1), (2, -2), (2, 2), (1, -3), (1, 3), (2, -3), (2, 3), (3, -2), (3, -1), (3, 1), (3, 2),
    (1, -4), (1, 4), (3, -3), (3, 3), (4, -1), (4, 1), (2, -4), (2, 4), (4, -2), (4, 2),
]  # fmt: skip


def _definition(radius):
    """{direction: set of path points} from the rule, and the directions in search order."""
    dirs = [(0, x) for x in range(1, radius)]
    for y in range(1, radius):
        for x in range(-radius + 1, radius):
            if x * x + y * y < radius * radius:
                dirs.append((y, x))
    paths = {}
    for dy, dx in dirs:
        paths[(dy, dx)] = {
            (y, x)
            for y in range(min(0, dy), max(0, dy) + 1)
            for x in range(min(0, dx), max(0, dx) + 1)
            if (dy * x - dx * y) ** 2 / (dy * dy + dx * dx) < 1
        }
    return dirs, paths


@pytest.mark.parametrize("radius, count", [(5, 34), (10, 152)])
def test_directions_and_paths_follow_the_definition(radius, count):
    search_order, paths = _definition(radius)
    got = path_directions(radius)
    assert len(got) == count
    # Stable grouping by path length, shortest first (the original's order).
    assert got == sorted(search_order, key=lambda d: len(paths[d]))
    for d, path in zip(got, direction_paths(radius), strict=True):
        assert set(path) == paths[d] and len(path) == len(paths[d])
        assert path[0] == d and (0, 0) in path  # destination first: it decides max's ties as the original's
    if radius == 5:
        assert got == ORIGINAL_RADIUS5_ORDER


def _sources(h, w, radius):
    floor = radius - 1
    return [(y, x) for y in range(h - floor) for x in range(floor, w - floor)]


def _direct_pairs(edge, seg, radius):
    """Per image, per (direction, source): (affinity by an explicit max over the path, label from, label to)."""
    out = []
    for b in range(edge.shape[0]):
        pairs = []
        for (dy, dx), path in zip(path_directions(radius), direction_paths(radius), strict=True):
            for y, x in _sources(edge.shape[2], edge.shape[3], radius):
                peak = edge[b, 0, y, x]
                for py, px in path:
                    peak = torch.maximum(peak, edge[b, 0, y + py, x + px])
                pairs.append((1 - peak, int(seg[b, y, x]), int(seg[b, y + dy, x + dx])))
        out.append(pairs)
    return out


def _labels(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    seg = torch.randint(0, 4, shape, generator=gen)
    seg[torch.rand(shape, generator=gen) < 0.15] = 255
    seg[torch.rand(shape, generator=gen) < 0.05] = 80  # a COCO class: valid (only >= 255 is ignored)
    seg[torch.rand(shape, generator=gen) < 0.05] = 300  # invalid too (>= 255)
    return seg


def test_pair_masks_match_a_per_pixel_loop():
    radius, seg = 3, _labels((2, 7, 9), 0)
    bg, fg, neg = pair_masks(seg, radius)
    edge = torch.zeros(2, 1, 7, 9)
    for b, pairs in enumerate(_direct_pairs(edge, seg, radius)):
        want = {"bg": [], "fg": [], "neg": []}
        for _, a, c in pairs:
            valid = a < 255 and c < 255
            want["bg"].append(valid and a == c == 0)
            want["fg"].append(valid and a == c and a > 0)
            want["neg"].append(valid and a != c)
        for name, mask in (("bg", bg), ("fg", fg), ("neg", neg)):
            assert mask[b].reshape(-1).tolist() == want[name], name
    assert bg.sum() and fg.sum() and neg.sum()  # every kind occurs in this map


def _direct_sums(edge, seg, radius):
    sums = [edge.new_zeros(()) for _ in range(3)]
    counts = [0, 0, 0]
    for pairs in _direct_pairs(edge, seg, radius):
        for aff, a, c in pairs:
            if a >= 255 or c >= 255:
                continue
            kind = 2 if a != c else (0 if a == 0 else 1)
            term = -torch.log(aff + 1e-5) if kind < 2 else -torch.log(1 + 1e-5 - aff)
            sums[kind] = sums[kind] + term
            counts[kind] += 1
    return torch.stack(sums), torch.tensor(counts, dtype=torch.float64)


def _edge(shape, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype)  # distinct values: no ties


@pytest.mark.parametrize("radius, size", [(3, (6, 9)), (4, (7, 10))])
def test_loss_sums_and_gradient_match_direct_implementation(radius, size):
    seg = _labels((2, *size), 1)
    edge = _edge((2, 1, *size), 2).requires_grad_(True)
    sums, counts = affinity_sums_reference(edge, seg, radius)
    want_sums, want_counts = _direct_sums(edge, seg, radius)
    torch.testing.assert_close(sums, want_sums, rtol=1e-12, atol=1e-12)
    assert counts.dtype == torch.float32 and counts.tolist() == want_counts.tolist()
    (grad,) = torch.autograd.grad(sums @ torch.tensor([0.3, -1.1, 0.7], dtype=torch.float64), edge)
    (want_grad,) = torch.autograd.grad(want_sums @ torch.tensor([0.3, -1.1, 0.7], dtype=torch.float64), edge)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)

    losses = affinity_loss(edge, seg, radius, backend="reference")
    bg, fg, neg = (want_sums / (want_counts + 1e-5)).unbind()
    torch.testing.assert_close(torch.stack(list(losses)), torch.stack([((bg + fg) / 2 + neg) / 2, bg, fg, neg]))


def test_loss_fp32_sums_and_gradcheck():
    seg = _labels((2, 6, 9), 3)
    edge = _edge((2, 1, 6, 9), 4)
    sums32, counts32 = affinity_sums_reference(edge.float(), seg, 3)
    assert sums32.dtype == counts32.dtype == torch.float32
    torch.testing.assert_close(sums32.double(), affinity_sums_reference(edge, seg, 3)[0], rtol=1e-5, atol=1e-5)
    # Edges kept away from 0 and 1, where -log's derivative is steep for finite differences.
    edge = (0.05 + 0.9 * edge).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: tuple(affinity_loss(e, seg, 3, backend="reference")), (edge,))


def test_loss_fp32_at_the_training_radius():
    seg = _labels((1, 12, 21), 5)
    edge = _edge((1, 1, 12, 21), 6)
    sums, counts = affinity_sums_reference(edge.float(), seg)  # radius 10: 3 x 3 sources x 152 directions
    want_sums, want_counts = _direct_sums(edge, seg, 10)
    torch.testing.assert_close(sums.double(), want_sums, rtol=1e-5, atol=1e-4)
    assert counts.tolist() == want_counts.tolist() and counts.sum() > 0
    assert isinstance(affinity_loss(edge.float(), seg, backend="reference"), AffinityLosses)


# ---------------------------------------------------------------------------------------------
# Data parallelism: each rank's terms are W * local sum / global count


WORLD = 2


def _loss_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        seg = _labels((4, 12, 21), 7)[rank::WORLD]
        edge = _edge((4, 1, 12, 21), 8)[rank::WORLD].requires_grad_(True)
        losses = affinity_loss(edge, seg, backend="reference")
        (grad,) = torch.autograd.grad(losses.total, edge)
        torch.save({"losses": torch.stack(list(losses)).detach(), "grad": grad}, Path(out_dir) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_loss_is_the_one_process_loss(tmp_path):
    mp.start_processes(_loss_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]
    seg, edge = _labels((4, 12, 21), 7), _edge((4, 1, 12, 21), 8).requires_grad_(True)
    losses = affinity_loss(edge, seg, backend="reference")
    (grad,) = torch.autograd.grad(losses.total, edge)
    # The mean over ranks of each value is the one-process value ...
    torch.testing.assert_close(sum(r["losses"] for r in ranks) / WORLD, torch.stack(list(losses)).detach())
    # ... and averaging the ranks' gradients (DeepSpeed) gives the one-process gradient of their images.
    for rank, r in enumerate(ranks):
        torch.testing.assert_close(r["grad"] / WORLD, grad[rank::WORLD])


# ---------------------------------------------------------------------------------------------
# The random walk


def _walk_inputs(k, h, w, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    cams = torch.rand(k, h, w, generator=gen, dtype=torch.float64)
    edge = torch.rand(h, w, generator=gen, dtype=torch.float64) ** 3  # mostly low edges: affinities > 0
    edge[h // 2] = 1.0  # a full edge row: nothing crosses it
    return cams.to(dtype), edge.to(dtype)


@pytest.mark.parametrize("exp_times", [0, 1, 3, 8])
def test_sparse_walk_equals_the_dense_definition(exp_times):
    cams, edge = _walk_inputs(3, 12, 17, exp_times)
    got = random_walk_reference(cams, edge, exp_times=exp_times)
    assert got.shape == (3, 12, 17) and got.dtype == torch.float32
    exact = random_walk_dense(cams.double(), edge.double(), exp_times=exp_times)
    torch.testing.assert_close(random_walk_reference(cams.double(), edge.double(), exp_times=exp_times), exact)
    scale = exact.abs().max().item()
    for walk in (got, random_walk_dense(cams, edge, exp_times=exp_times)):
        assert (walk.double() - exact).abs().max().item() <= 1e-4 * scale


def test_walk_other_beta_and_radius_equal_dense():
    cams, edge = _walk_inputs(2, 9, 11, 9, torch.float64)
    got = random_walk_reference(cams, edge, beta=3.5, exp_times=4, radius=3)
    torch.testing.assert_close(got, random_walk_dense(cams, edge, beta=3.5, exp_times=4, radius=3))


def _one_step_by_pixels(cams, edge, beta, radius):
    """x T for x = cams * (1 - edge), with A built pixel by pixel from the definition."""
    k, h, w = cams.shape
    n = h * w
    a = torch.eye(n, dtype=torch.float64)
    for (dy, dx), path in zip(path_directions(radius), direction_paths(radius), strict=True):
        for y in range(h):
            for x in range(w):
                if 0 <= y + dy < h and 0 <= x + dx < w:
                    aff = 1 - max(float(edge[y + py, x + px]) for py, px in path)
                    a[y * w + x, (y + dy) * w + x + dx] = a[(y + dy) * w + x + dx, y * w + x] = aff
    t = a**beta / (a**beta).sum(0, keepdim=True)
    return ((cams * (1 - edge)).reshape(k, n).double() @ t).reshape(k, h, w)


def test_one_step_matches_a_pixel_by_pixel_matrix():
    cams, edge = _walk_inputs(2, 5, 7, 10, torch.float64)
    got = random_walk_reference(cams, edge, beta=10, exp_times=0, radius=3)
    torch.testing.assert_close(got, _one_step_by_pixels(cams, edge, 10, 3))


def test_edge_damps_cams_and_outside_neighbours_have_no_affinity():
    h, w, radius = 6, 8, 3
    cams = torch.zeros(1, h, w, dtype=torch.float64)
    cams[0, 0, 0] = 1.0
    edge = torch.zeros(h, w, dtype=torch.float64)
    got = random_walk_reference(cams, edge, exp_times=0, radius=radius)[0]
    # All affinities are 1: T[i, j] = 1 / (1 + number of j's neighbours inside the image).
    offsets = path_directions(radius) + [(-dy, -dx) for dy, dx in path_directions(radius)]
    for y in range(h):
        for x in range(w):
            inside = sum(0 <= y + oy < h and 0 <= x + ox < w for oy, ox in offsets)
            want = 1 / (1 + inside) if (y, x) == (0, 0) or (-y, -x) in offsets else 0.0
            assert got[y, x].item() == pytest.approx(want, rel=1e-12), (y, x)
    # A damped source: x = cams * (1 - edge); every path from it crosses it, so its affinities are 0.75.
    edge[0, 0] = 0.25
    damped = random_walk_reference(cams, edge, exp_times=0, radius=radius)[0]
    inside = sum(0 <= oy and 0 <= ox for oy, ox in offsets)
    assert damped[0, 0].item() == pytest.approx(0.75 / (1 + inside * 0.75**10), rel=1e-12)
    edge[0, 0] = 1.0  # a source on a full edge contributes nothing
    assert random_walk_reference(cams, edge, exp_times=3, radius=radius).abs().max().item() == 0.0


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "cams_shape, edge_shape, words",
    [
        ((3, 12, 17), (12, 16), ["(12, 16)", "(3, 12, 17)"]),
        ((3, 12, 17), (1, 12, 17), ["(1, 12, 17)", "(h, w)"]),
        ((12, 17), (12, 17), ["(12, 17)", "(K, h, w)"]),
    ],
)
def test_walk_shape_mismatch_names_the_shapes(cams_shape, edge_shape, words):
    for walk in (random_walk_reference, random_walk_dense):
        with pytest.raises(ValueError) as err:
            walk(torch.rand(cams_shape), torch.rand(edge_shape))
        assert all(word in str(err.value) for word in words), str(err.value)


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan")])
def test_walk_edge_outside_unit_interval_is_refused(bad):
    edge = torch.rand(12, 17)
    edge[3, 4] = bad
    with pytest.raises(ValueError, match=r"edge \(12, 17\) must lie in \[0, 1\]"):
        random_walk_reference(torch.rand(3, 12, 17), edge)


def test_walk_bad_settings_are_refused():
    cams, edge = torch.rand(3, 12, 17), torch.rand(12, 17)
    with pytest.raises(ValueError, match="exp_times"):
        random_walk_reference(cams, edge, exp_times=-1)
    with pytest.raises(ValueError, match="beta"):
        random_walk_reference(cams, edge, beta=0)
    with pytest.raises(ValueError, match="radius"):
        random_walk_reference(cams, edge, radius=1)


def test_loss_bad_shapes_are_refused_naming_them():
    edge = torch.rand(2, 1, 24, 30)
    with pytest.raises(ValueError, match=r"seg \(2, 12, 15\).*\(2, 24, 30\)"):
        affinity_sums_reference(edge, torch.zeros(2, 12, 15, dtype=torch.long))
    with pytest.raises(ValueError, match=r"edge must be a floating \(B, 1, H, W\) tensor, got \(2, 2, 24, 30\)"):
        affinity_sums_reference(torch.rand(2, 2, 24, 30), torch.zeros(2, 24, 30, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        affinity_loss(edge, torch.zeros(2, 24, 30), backend="reference")
    with pytest.raises(ValueError, match=r"too small for radius 10.*H >= 10 and W >= 19"):
        affinity_sums_reference(torch.rand(1, 1, 9, 30), torch.zeros(1, 9, 30, dtype=torch.long))

"""The reference Puzzle-CAM math (puzzlecam.puzzle): the oracle of every kernel.

The loss values below are worked out by hand on a 1 x 2 x 2 x 2 example, not by calling the code.
"""

import math
import zlib

import pytest
import torch

from puzzlecam import puzzle
from puzzlecam.puzzle import PuzzleSpec

EPS = 1e-5


@pytest.mark.parametrize("n", [2, 3])
def test_tile_merge_inverse_random_non_square(n):
    for _ in range(5):
        b, c = torch.randint(1, 5, (2,)).tolist()
        th, tw = torch.randint(1, 7, (2,)).tolist()
        if th == tw:
            tw += 1
        x = torch.randn(b, c, th * n, tw * n)
        t = puzzle.tile(x, n)
        assert t.shape == (n * n * b, c, th, tw)
        assert torch.equal(puzzle.merge(t, n), x)
        t2 = torch.randn_like(t)
        assert torch.equal(puzzle.tile(puzzle.merge(t2, n), n), t2)


def test_tile_is_piece_major():
    n, b, c, th, tw = 3, 2, 2, 2, 5
    x = torch.randn(b, c, n * th, n * tw)
    t = puzzle.tile(x, n)
    for i in range(n):
        for j in range(n):
            p = i * n + j
            for bi in range(b):
                want = x[bi, :, i * th : (i + 1) * th, j * tw : (j + 1) * tw]
                assert torch.equal(t[p * b + bi], want)


def test_tile_rejects_indivisible_sizes():
    with pytest.raises(ValueError, match=r"divisible by n=2.*\(1, 3, 5, 8\)"):
        puzzle.tile(torch.zeros(1, 3, 5, 8), 2)
    with pytest.raises(ValueError, match="divisible by n=3"):
        puzzle.tile(torch.zeros(1, 3, 6, 8), 3)


def test_merge_rejects_bad_tile_batch():
    with pytest.raises(ValueError, match=r"tile batch 6 .*multiple of n\*n=4"):
        puzzle.merge(torch.zeros(6, 2, 3, 3), 2)


# Hand-worked example: A (1, 2, 2, 2); tiles all 1 for class 0 and 0 for class 1, so the merged map
# M is [[1, 1], [1, 1]] and [[0, 0], [0, 0]].
A0 = [[1.0, 2.0], [3.0, 4.0]]
A1 = [[0.0, -1.0], [2.0, 0.0]]


def _example():
    cam = torch.tensor([[A0, A1]])
    tiles = torch.zeros(4, 2, 1, 1)
    tiles[:, 0] = 1.0
    labels = torch.tensor([[1.0, 0.0]])
    return cam, tiles, labels


def _sig(v):
    return 1.0 / (1.0 + math.exp(-v))


# level "feature": |A - M| class 0 = 0,1,2,3 (sum 6), class 1 = 0,1,2,0 (sum 3); squares 14 and 5.
# level "cam": make_cam(A) class 0 = (a - eps)/(4 + eps), class 1 = [0, 0, (2-eps)/(2+eps), 0];
# make_cam(M) class 0 = (1 - eps)/(1 + eps) everywhere, class 1 = 0.
def _cam_level_sums(kind):
    """(sum of class 0's errors, sum of class 1's errors) at level cam."""
    m0 = (1 - EPS) / (1 + EPS)
    d0 = [abs((a - EPS) / (4 + EPS) - m0) for a in (1.0, 2.0, 3.0, 4.0)]
    d1 = [0.0, 0.0, (2 - EPS) / (2 + EPS), 0.0]
    p = 1 if kind == "l1" else 2
    return sum(d**p for d in d0), sum(d**p for d in d1)


SUMS = {("feature", "l1"): (6.0, 3.0), ("feature", "l2"): (14.0, 5.0)}
SUMS.update({("cam", kind): _cam_level_sums(kind) for kind in ("l1", "l2")})
# The label is (1, 0) and B = 1: masking divides class 0's sum by all 8 elements, selection by class 0's 4,
# none divides both classes' sums by 8.
EXPECTED_RE = {}
for (level, kind), (s0, s1) in SUMS.items():
    EXPECTED_RE[(level, kind, "masking")] = s0 / 8
    EXPECTED_RE[(level, kind, "selection")] = s0 / 4
    EXPECTED_RE[(level, kind, "none")] = (s0 + s1) / 8


def test_cam_level_sums_are_close_to_the_rounded_hand_values():
    # Sanity of the formulas above: with eps -> 0 the differences are 0.75, 0.5, 0.25, 0 (+1).
    assert _cam_level_sums("l1") == pytest.approx((1.5, 1.0), abs=1e-4)
    assert _cam_level_sums("l2") == pytest.approx((0.875, 1.0), abs=1e-4)


@pytest.mark.parametrize("level,kind,reduction", sorted(EXPECTED_RE))
def test_reconstruction_loss_hand_example(level, kind, reduction):
    cam, tiles, labels = _example()
    re, merged_logits = puzzle.reconstruction_loss(
        cam, tiles, labels, PuzzleSpec(n=2, level=level, kind=kind, reduction=reduction)
    )
    assert re.dtype == torch.float32 and re.dim() == 0
    assert re.item() == pytest.approx(EXPECTED_RE[(level, kind, reduction)], rel=1e-6, abs=1e-7)
    assert torch.allclose(merged_logits, torch.tensor([[1.0, 0.0]]))


@pytest.mark.parametrize("level,kind,reduction", sorted(EXPECTED_RE))
def test_puzzle_losses_hand_example(level, kind, reduction):
    cam, tiles, labels = _example()
    losses = puzzle.puzzle_losses(cam, tiles, labels, PuzzleSpec(n=2, level=level, kind=kind, reduction=reduction))
    # GAP(A) = (2.5, 0.25); GAP(M) = (1, 0); label (1, 0); MLSM averages over the C=2 classes.
    want_cls = -(math.log(_sig(2.5)) + math.log(1 - _sig(0.25))) / 2
    want_pcls = -(math.log(_sig(1.0)) + math.log(1 - _sig(0.0))) / 2
    assert losses.cls.item() == pytest.approx(want_cls, rel=1e-6)
    assert losses.pcls.item() == pytest.approx(want_pcls, rel=1e-6)
    assert losses.re.item() == pytest.approx(EXPECTED_RE[(level, kind, reduction)], rel=1e-6, abs=1e-7)
    assert losses.conf.item() == 0.0  # not asked for


def test_selection_averages_per_image_and_counts_an_unlabelled_image_as_zero():
    # Two images; the first is the hand example (label (1, 0)), the second has no label at all and
    # a large error everywhere: selection = (6/4 + 0) / 2 at level feature, l1.
    cam, tiles, labels = _example()
    cam2 = torch.cat([cam, torch.full_like(cam, 9.0)])
    tiles2 = torch.zeros(8, 2, 1, 1)
    tiles2[0::2] = tiles  # piece-major: piece p of image b at index p*B + b
    labels2 = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    re, _ = puzzle.reconstruction_loss(cam2, tiles2, labels2, PuzzleSpec(reduction="selection"))
    assert re.item() == pytest.approx((6 / 4 + 0) / 2, rel=1e-6)
    # Two labelled classes: the mean over both maps of the image.
    re_both, _ = puzzle.reconstruction_loss(cam, tiles, torch.tensor([[1.0, 1.0]]), PuzzleSpec(reduction="selection"))
    assert re_both.item() == pytest.approx((6 + 3) / 8, rel=1e-6)


def test_shannon_entropy_loss_hand_example():
    # The tiles' logits GAP(tiles) are (1, 0) for each of the 4 tiles: v = (sigmoid(1), 1/2).
    cam, tiles, labels = _example()
    v1 = _sig(1.0)
    want = -(v1 * math.log(v1 + EPS) + 0.5 * math.log(0.5 + EPS))
    losses = puzzle.puzzle_losses(cam, tiles, labels, PuzzleSpec(with_conf=True))
    assert losses.conf.item() == pytest.approx(want, rel=1e-6)
    rows = torch.tensor([[0.0, 100.0], [-100.0, 2.0]])  # rows are averaged; sigmoid(100) = 1, sigmoid(-100) = 0
    row0 = -(0.5 * math.log(0.5 + EPS) + 1.0 * math.log(1.0 + EPS))
    row1 = -(_sig(2.0) * math.log(_sig(2.0) + EPS))
    want_rows = (row0 + row1) / 2
    assert puzzle.shannon_entropy_loss(rows).item() == pytest.approx(want_rows, rel=1e-5)


@pytest.mark.parametrize("level", ["feature", "cam"])
@pytest.mark.parametrize("kind", ["l1", "l2"])
@pytest.mark.parametrize("reduction", puzzle.RE_REDUCTIONS)
def test_gradients_reach_both_inputs(level, kind, reduction):
    b, c, n = 2, 3, 2
    cam = torch.randn(b, c, 4, 6, requires_grad=True)
    tiles = torch.randn(n * n * b, c, 2, 3, requires_grad=True)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    losses = puzzle.puzzle_losses(cam, tiles, labels, PuzzleSpec(n=n, level=level, kind=kind, reduction=reduction))
    gc, gt = torch.autograd.grad(losses.re, (cam, tiles))
    assert gc.abs().sum() > 0 and gt.abs().sum() > 0
    assert torch.isfinite(gc).all() and torch.isfinite(gt).all()
    if reduction != "none":  # unlabelled classes get no reconstruction gradient
        assert gc[0, 1].abs().sum() == 0
    _, gt_p = torch.autograd.grad(losses.pcls, (cam, tiles), allow_unused=True, materialize_grads=True)
    assert gt_p.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# float64: the reference computes in float64 for float64 maps, so its gradients can be checked
# against finite differences. Random inputs keep every |d|, relu and max away from its kink.


def _float64_inputs(seed, b=2, c=3, n=2, th=2, tw=3):
    gen = torch.Generator().manual_seed(seed)
    cam = torch.randn(b, c, n * th, n * tw, generator=gen, dtype=torch.float64, requires_grad=True)
    tiles = torch.randn(n * n * b, c, th, tw, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)[:b, :c]
    return cam, tiles, labels


@pytest.mark.parametrize("level", ["feature", "cam"])
@pytest.mark.parametrize("kind", ["l1", "l2"])
@pytest.mark.parametrize("reduction", puzzle.RE_REDUCTIONS)
def test_reconstruction_loss_gradcheck(level, kind, reduction):
    cam, tiles, labels = _float64_inputs(seed=zlib.crc32(f"{level}{kind}{reduction}".encode()))

    def fn(a, t):
        return puzzle.reconstruction_loss(a, t, labels, PuzzleSpec(n=2, level=level, kind=kind, reduction=reduction))

    assert torch.autograd.gradcheck(fn, (cam, tiles))


def test_puzzle_losses_and_entropy_gradcheck():
    cam, tiles, labels = _float64_inputs(seed=3)

    def fn(a, t):
        return tuple(puzzle.puzzle_losses(a, t, labels, PuzzleSpec(level="cam", reduction="selection", with_conf=True)))

    assert torch.autograd.gradcheck(fn, (cam, tiles))
    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(puzzle.shannon_entropy_loss, (logits,))
    targets = torch.tensor([[1.0, 0.0, 1.0, 0.0]] * 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: puzzle.classification_loss(z, targets), (logits,))


def test_make_cam_gradcheck():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    assert torch.autograd.gradcheck(puzzle.make_cam, (x,))


def test_float64_maps_give_float64_losses_and_others_fp32():
    cam, tiles, labels = _float64_inputs(seed=1)
    losses = puzzle.puzzle_losses(cam, tiles, labels, PuzzleSpec(with_conf=True))
    assert all(t.dtype == torch.float64 for t in losses)
    # The float64 loss is not a rounded fp32 value: it differs from the fp32 computation.
    fp32 = puzzle.puzzle_losses(cam.float(), tiles.float(), labels.float(), PuzzleSpec(with_conf=True))
    assert all(t.dtype == torch.float32 for t in fp32)
    assert losses.re.item() == pytest.approx(fp32.re.item(), rel=1e-5)
    for dtype in (torch.bfloat16, torch.float16):
        half = puzzle.puzzle_losses(cam.to(dtype), tiles.to(dtype), labels.to(dtype), PuzzleSpec(with_conf=True))
        assert all(t.dtype == torch.float32 for t in half)


def test_loss_is_fp32_for_half_inputs():
    cam = torch.randn(2, 3, 4, 4).half()
    tiles = puzzle.tile(cam, 2).clone()
    re, logits = puzzle.reconstruction_loss(cam, tiles, torch.ones(2, 3))
    assert re.dtype == torch.float32 and logits.dtype == torch.float32
    assert re.item() == 0.0


def test_make_cam_values():
    x = torch.tensor([[[[-1.0, 0.0], [1.0, 3.0]], [[-2.0, -1.0], [-3.0, -0.5]]]])
    out = puzzle.make_cam(x)
    want0 = torch.tensor([[0.0, 0.0], [(1 - EPS) / (3 + EPS), (3 - EPS) / (3 + EPS)]])
    assert torch.allclose(out[0, 0], want0, atol=1e-7)
    assert torch.equal(out[0, 1], torch.zeros(2, 2))  # all-negative map -> zeros, no NaN
    assert out.max().item() <= 1.0


def test_alpha_schedule():
    assert puzzle.alpha_at(0, 100) == 0.0
    assert puzzle.alpha_at(25, 100) == pytest.approx(2.0)
    assert puzzle.alpha_at(50, 100) == pytest.approx(4.0)
    assert puzzle.alpha_at(90, 100) == pytest.approx(4.0)
    assert puzzle.alpha_at(10, 100, alpha_max=2.0, schedule=0.1) == pytest.approx(2.0)
    assert puzzle.alpha_at(5, 100, alpha_max=2.0, schedule=0.1) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="total_steps"):
        puzzle.alpha_at(1, 0)


def test_loss_argument_errors_name_shapes():
    cam = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"cam_tiles batch 6 .*multiple of n\*n=4"):
        puzzle.reconstruction_loss(cam, torch.zeros(6, 3, 2, 2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"merged tiles have shape \(2, 3, 6, 6\).*cam has shape \(2, 3, 4, 4\)"):
        puzzle.reconstruction_loss(cam, torch.zeros(8, 3, 3, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"labels must have shape \(B, C\)=\(2, 3\).*got \(2, 4\)"):
        puzzle.reconstruction_loss(cam, torch.zeros(8, 3, 2, 2), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="level must be one of"):
        puzzle.reconstruction_loss(cam, torch.zeros(8, 3, 2, 2), torch.zeros(2, 3), PuzzleSpec(level="pixel"))
    with pytest.raises(ValueError, match="kind must be one of"):
        puzzle.reconstruction_loss(cam, torch.zeros(8, 3, 2, 2), torch.zeros(2, 3), PuzzleSpec(kind="l3"))
    with pytest.raises(ValueError, match="reduction must be one of"):
        puzzle.reconstruction_loss(cam, torch.zeros(8, 3, 2, 2), torch.zeros(2, 3), PuzzleSpec(reduction=True))


def test_multiscale_cam_flip_and_keys():
    # One hot pixel at column 1 of a 4-wide map; the flipped pass sees it at column 2.
    m = torch.zeros(3, 4, 4)
    m[2, 1, 1] = 5.0
    m[0, 3, 3] = 2.0
    f = m.flip(-1)
    keys = torch.tensor([2, 0])
    cam, hr = puzzle.multiscale_cam([m], [f], keys, (60, 64))
    cam_nf, hr_nf = puzzle.multiscale_cam([m], None, keys, (60, 64))
    assert cam.shape == (2, 15, 16) and hr.shape == (2, 60, 64)
    # Un-flipping puts both passes on the same pixels, so normalization gives the same maps.
    assert torch.allclose(cam, cam_nf, atol=1e-5) and torch.allclose(hr, hr_nf, atol=1e-5)
    assert cam.amax(dim=(1, 2)).sub(1).abs().max() < 1e-4
    # keys select (and order) the class channels.
    cam_c2, _ = puzzle.multiscale_cam([m], None, torch.tensor([2]), (60, 64))
    assert torch.equal(cam_c2[0], cam_nf[0])


def test_multiscale_cam_sums_scales_and_ignores_negatives():
    big = torch.randn(2, 8, 10)
    small = torch.randn(2, 4, 5)
    cam, hr = puzzle.multiscale_cam([big, small], None, torch.tensor([0, 1]), (30, 37))
    assert cam.shape == (2, 8, 10) and hr.shape == (2, 30, 37)
    assert cam.min() >= 0 and hr.min() >= 0
    neg = -big.abs() - 1
    cam0, _ = puzzle.multiscale_cam([neg], None, torch.tensor([0]), (30, 37))
    assert torch.equal(cam0, torch.zeros_like(cam0))

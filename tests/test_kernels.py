"""Triton kernels against the pure-torch reference: outputs and every gradient, per dtype.

CPU runs go through the Triton interpreter (TRITON_INTERPRET=1, set by conftest when no GPU is
visible); on a GPU the same tests run compiled. The default grid is a seeded sample that covers
every level x kind x masking x dtype combination with random odd / non-power-of-two shapes;
PUZZLECAM_FULL_GRID=1 runs the full product (meant for the GPU).
"""

from __future__ import annotations

import itertools
import os
import random
import zlib

import pytest
import torch

from puzzlecam import ops
from puzzlecam.puzzle import PuzzleSpec

FULL_GRID = os.environ.get("PUZZLECAM_FULL_GRID", "0") == "1"
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETER, reason="Triton on CPU needs TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]
CHANNELS = (1, 20, 21, 80)
DTYPE_NAMES = ("fp32", "fp16", "bf16")  # index d of a case: dtypes_for(device)[d]
# Relative tolerance per dtype, against the largest magnitude of the reference tensor: kernels and
# reference both compute in fp32 from the same low-precision inputs, so they differ by summation
# order and by the final rounding to the storage dtype.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def dtypes_for(device: str):
    return (torch.float32, torch.float16, torch.bfloat16) if device == "cuda" else (torch.float32, torch.float16)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every buffer the launchers allocate starts as NaN: an unwritten element fails the comparison."""
    import puzzlecam.kernels._common as common

    monkeypatch.setattr(common, "POISON", True)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.detach().float().cpu(), expected.detach().float().cpu()
    assert torch.isfinite(a).all(), f"{what}: non-finite values (an element was not written?)"
    tol = TOLERANCE[dtype]
    scale = e.abs().max().item() if e.numel() else 0.0
    torch.testing.assert_close(a, e, rtol=tol, atol=tol * scale + 1e-12, msg=lambda m: f"{what}: {m}")


def random_maps(shape, dtype, device, gen, ties: bool = False) -> torch.Tensor:
    x = torch.randn(shape, generator=gen)
    if ties:  # coarse values: many elements tie at the max, many at exactly 0 or below eps
        x = (x * 2).round() / 2
    return x.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# reconstruction loss


def loss_cases():
    """(n, B, C, th, tw, level, kind, masking, dtype_index, ties) tuples."""
    combos = list(itertools.product(("feature", "cam"), ("l1", "l2"), (True, False)))
    if FULL_GRID:  # every combination and dtype on six shapes (kept small: each variant compiles)
        shapes = [
            (2, 8, 20, 16, 16),
            (2, 3, 21, 3, 5),
            (2, 1, 80, 32, 32),
            (3, 2, 1, 1, 1),
            (3, 5, 80, 4, 4),
            (3, 8, 21, 7, 3),
        ]
        return [
            (n, b, c, th, tw, level, kind, masking, d, k % 2 == 1)
            for k, (n, b, c, th, tw) in enumerate(shapes)
            for (level, kind, masking) in combos
            for d in (0, 1, 2)
        ]
    rng = random.Random(1234)
    cases = []
    for k, (level, kind, masking) in enumerate(combos):
        for d in (0, 1):
            n = rng.choice((2, 3))
            c = CHANNELS[(2 * k + d) % len(CHANNELS)]
            b = rng.randint(1, 8 if c <= 21 else 2)
            th, tw = rng.choice(((1, 1), (2, 3), (3, 5), (4, 4), (5, 2)))
            cases.append((n, b, c, th, tw, level, kind, masking, d, (k + d) % 3 == 0))
    return cases


def run_loss(backend, cam, tiles, labels, n, level, kind, masking, g_loss, g_logits):
    cam = cam.detach().requires_grad_(True)  # detach keeps the strides of views
    tiles = tiles.detach().requires_grad_(True)
    reduction = "masking" if masking else "none"
    loss, logits = ops.reconstruction_loss(
        cam, tiles, labels, PuzzleSpec(n=n, level=level, kind=kind, reduction=reduction), backend=backend
    )
    objective = loss * g_loss + (logits * g_logits).sum()
    objective.backward()
    return loss, logits, cam.grad, tiles.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "case",
    loss_cases(),
    ids=lambda c: "n{}-B{}-C{}-t{}x{}-{}-{}-{}-{}{}".format(
        c[0],
        c[1],
        c[2],
        c[3],
        c[4],
        c[5],
        c[6],
        "mask" if c[7] else "nomask",
        DTYPE_NAMES[c[8]],
        "-ties" if c[9] else "",
    ),
)
def test_reconstruction_loss_matches_reference(device, case):
    n, b, c, th, tw, level, kind, masking, d, ties = case
    dtypes = dtypes_for(device)
    if d >= len(dtypes):
        pytest.skip("bf16 is tested on the GPU")
    dtype = dtypes[d]
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    cam = random_maps((b, c, n * th, n * tw), dtype, device, gen, ties)
    tiles = random_maps((n * n * b, c, th, tw), dtype, device, gen, ties)
    labels = (torch.rand(b, c, generator=gen) < 0.4).float().to(device)
    g_loss = torch.rand((), generator=gen).to(device) + 0.5
    g_logits = torch.randn(b, c, generator=gen).to(device)
    got = run_loss("triton", cam, tiles, labels, n, level, kind, masking, g_loss, g_logits)
    want = run_loss("reference", cam, tiles, labels, n, level, kind, masking, g_loss, g_logits)
    for name, a, e in zip(("re_loss", "merged_logits", "grad cam", "grad cam_tiles"), got, want, strict=True):
        assert_close(a, e, dtype, f"{name} ({case})")


def spread(x: torch.Tensor) -> torch.Tensor:
    """The same values as ``x`` in a non-dense view (every other column of a wider buffer)."""
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    return wide[..., ::2]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("level", ("feature", "cam"))
def test_reconstruction_loss_large_maps_and_layouts(device, level):
    """Maps larger than one block (several chunks per program), channels_last and strided inputs."""
    gen = torch.Generator().manual_seed(7)
    n, b, c, th, tw = 2, 1, 2, 35, 60  # 70 x 120 = 8400 elements per map: 3 chunks of 4096
    cam = random_maps((b, c, n * th, n * tw), torch.float32, device, gen, ties=True)
    tiles = random_maps((n * n * b, c, th, tw), torch.float32, device, gen, ties=True)
    labels = torch.ones(b, c, device=device)
    g_logits = torch.randn(b, c, generator=gen).to(device)
    want = run_loss("reference", cam, tiles, labels, n, level, "l1", True, 1.0, g_logits)
    layouts = {
        "contiguous": (cam, tiles),
        "channels_last": (
            cam.contiguous(memory_format=torch.channels_last),
            tiles.contiguous(memory_format=torch.channels_last),
        ),
        "strided": (spread(cam), tiles.transpose(2, 3).contiguous().transpose(2, 3)),
    }
    for name, (cam_l, tiles_l) in layouts.items():
        cam_in = cam_l.detach().requires_grad_(True)
        tiles_in = tiles_l.detach().requires_grad_(True)
        loss, logits = ops.reconstruction_loss(
            cam_in, tiles_in, labels, PuzzleSpec(n=n, level=level, kind="l1", reduction="masking"), backend="triton"
        )
        (loss + (logits * g_logits).sum()).backward()
        for what, a, e in zip(
            ("re_loss", "merged_logits", "grad cam", "grad cam_tiles"),
            (loss, logits, cam_in.grad, tiles_in.grad),
            want,
            strict=True,
        ):
            assert_close(a, e, torch.float32, f"{what} {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_reconstruction_loss_sliced_inputs(device):
    """Views of larger tensors: one class of a batch of one (odd strides on size-1 dims) and a
    class slice of the tiles (not contiguous)."""
    gen = torch.Generator().manual_seed(5)
    cams = random_maps((3, 5, 4, 6), torch.float32, device, gen)
    tiles = random_maps((4, 5, 2, 3), torch.float32, device, gen)
    cam_view, tiles_view = cams[:1, 2:3], tiles[:, 1:2]
    assert cam_view.stride() == (120, 24, 6, 1) and not tiles_view.is_contiguous()
    labels = torch.ones(1, 1, device=device)
    for level in ("feature", "cam"):
        got = run_loss("triton", cam_view, tiles_view, labels, 2, level, "l1", True, 1.0, 0.5)
        want = run_loss("reference", cam_view, tiles_view, labels, 2, level, "l1", True, 1.0, 0.5)
        for name, a, e in zip(("re_loss", "merged_logits", "grad cam", "grad cam_tiles"), got, want, strict=True):
            assert_close(a, e, torch.float32, f"{name} ({level}, sliced)")


@pytest.mark.parametrize("device", DEVICES)
def test_reconstruction_loss_gradient_paths(device):
    """Only the loss, only the logits, zero labels, inputs without grad, and bitwise determinism."""
    gen = torch.Generator().manual_seed(3)
    n, b, c = 3, 2, 5
    cam = random_maps((b, c, 9, 6), torch.float32, device, gen)
    tiles = random_maps((n * n * b, c, 3, 2), torch.float32, device, gen)
    labels = torch.zeros(b, c, device=device)
    for level in ("feature", "cam"):
        # Loss only (logits unused: their upstream gradient is None).
        grads = []
        for backend in ("triton", "reference"):
            cam_in, tiles_in = cam.clone().requires_grad_(True), tiles.clone().requires_grad_(True)
            loss, _ = ops.reconstruction_loss(
                cam_in, tiles_in, labels, PuzzleSpec(n=n, level=level, kind="l2", reduction="none"), backend=backend
            )
            loss.backward()
            grads.append((cam_in.grad, tiles_in.grad))
        for a, e, what in zip(grads[0], grads[1], ("cam", "cam_tiles"), strict=True):
            assert_close(a, e, torch.float32, f"{level} loss-only grad {what}")
        # Logits only, all-zero labels with masking: the loss is 0 and its gradient too.
        grads = []
        for backend in ("triton", "reference"):
            tiles_in = tiles.clone().requires_grad_(True)
            loss, logits = ops.reconstruction_loss(
                cam, tiles_in, labels, PuzzleSpec(n=n, level=level, kind="l1", reduction="masking"), backend=backend
            )
            assert loss.item() == 0.0
            logits.sum().backward()
            grads.append(tiles_in.grad)
        assert_close(grads[0], grads[1], torch.float32, f"{level} logits-only grad cam_tiles")
    # Deterministic: the same inputs give bitwise the same loss and gradients.
    runs = [
        run_loss("triton", cam, tiles, torch.ones(b, c, device=device), n, "cam", "l1", True, 1.0, 1.0)
        for _ in range(2)
    ]
    for a, e in zip(*runs, strict=True):
        assert torch.equal(a, e)


@pytest.mark.parametrize("device", DEVICES)
def test_reconstruction_loss_bad_arguments(device):
    cam = torch.randn(2, 3, 4, 4, device=device)
    tiles = torch.randn(8, 3, 2, 2, device=device)
    labels = torch.ones(2, 3, device=device)
    with pytest.raises(TypeError, match="cam must have one of the dtypes float32, float16, bfloat16; got torch.int64"):
        ops.reconstruction_loss(cam.long(), tiles, labels, backend="triton")
    with pytest.raises(TypeError, match="one dtype"):
        ops.reconstruction_loss(cam, tiles.half(), labels, backend="triton")
    with pytest.raises(ValueError, match="merged tiles have shape"):
        ops.reconstruction_loss(cam, tiles[:, :, :1], labels, backend="triton")
    with pytest.raises(ValueError, match="not a multiple of n\\*n"):
        ops.reconstruction_loss(cam, tiles[:7], labels, backend="triton")
    with pytest.raises(ValueError, match="labels must have shape"):
        ops.reconstruction_loss(cam, tiles, labels[:, :2], backend="triton")
    with pytest.raises(ValueError, match="level must be one of"):
        ops.reconstruction_loss(cam, tiles, labels, PuzzleSpec(level="pixel"), backend="triton")
    with pytest.raises(ValueError, match="kind must be one of"):
        ops.reconstruction_loss(cam, tiles, labels, PuzzleSpec(kind="huber"), backend="triton")
    with pytest.raises(ValueError, match="positive int"):
        ops.reconstruction_loss(cam, tiles, labels, PuzzleSpec(n=0), backend="triton")
    if device == "cuda":
        with pytest.raises(ValueError, match="one device"):
            ops.reconstruction_loss(cam, tiles, labels.cpu(), backend="triton")


# ---------------------------------------------------------------------------------------------
# tile / merge


def tile_cases():
    if FULL_GRID:  # six shapes x every dtype x both memory formats
        shapes = [
            (2, 1, 1, (1, 1)),
            (2, 8, 20, (16, 16)),
            (2, 4, 80, (32, 32)),
            (3, 3, 21, (3, 5)),
            (3, 8, 20, (5, 7)),
            (3, 1, 80, (1, 1)),
        ]
        return [(n, b, c, t, d, cl) for (n, b, c, t) in shapes for d in (0, 1, 2) for cl in (False, True)]
    rng = random.Random(99)
    cases = []
    for k in range(6):
        cases.append(
            (2 + k % 2, rng.randint(1, 8), CHANNELS[k % 4], rng.choice(((1, 1), (3, 5), (4, 7))), k % 2, k in (2, 3))
        )
    return cases


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "case",
    tile_cases(),
    ids=lambda c: "n{}-B{}-C{}-t{}x{}-{}{}".format(
        c[0], c[1], c[2], c[3][0], c[3][1], DTYPE_NAMES[c[4]], "-cl" if c[5] else ""
    ),
)
def test_tile_merge_match_reference(device, case):
    n, b, c, (th, tw), d, channels_last = case
    dtypes = dtypes_for(device)
    if d >= len(dtypes):
        pytest.skip("bf16 is tested on the GPU")
    dtype = dtypes[d]
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    x = random_maps((b, c, n * th, n * tw), dtype, device, gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = random_maps((n * n * b, c, th, tw), dtype, device, gen)
    results = {}
    for backend in ("triton", "reference"):
        x_in = x.clone().requires_grad_(True)
        t = ops.tile(x_in, n, backend=backend)
        t.backward(g)
        m = ops.merge(t.detach(), n, backend=backend)
        results[backend] = (t, x_in.grad, m)
    for name, a, e in zip(
        ("tile", "grad through tile (merge)", "merge"), results["triton"], results["reference"], strict=True
    ):
        assert torch.equal(a, e), f"{name} differs from the reference ({case})"
    assert results["triton"][2].equal(x)
    if channels_last:
        assert results["triton"][0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device", DEVICES)
def test_tile_merge_bad_arguments(device):
    x = torch.randn(2, 3, 5, 4, device=device)
    with pytest.raises(ValueError, match="divisible by n=2"):
        ops.tile(x, 2, backend="triton")
    with pytest.raises(ValueError, match="not a multiple of n\\*n=4"):
        ops.merge(x, 2, backend="triton")
    with pytest.raises(TypeError, match="x must have one of the dtypes .*; got torch.float64"):
        ops.tile(x[:, :, :4].double(), 2, backend="triton")
    # Integer maps (e.g. label masks) are moved as they are.
    masks = torch.randint(0, 255, (2, 1, 6, 4), dtype=torch.uint8, device=device)
    assert torch.equal(ops.tile(masks, 2, backend="triton"), ops.tile(masks, 2, backend="reference"))
    assert torch.equal(ops.merge(ops.tile(masks, 2, backend="triton"), 2, backend="triton"), masks)
    with pytest.raises(ValueError, match="must be 4-D"):
        ops.tile(x[0], 2, backend="triton")


# ---------------------------------------------------------------------------------------------
# prepare_inputs


def prepare_cases():
    if FULL_GRID:  # six shapes x every dtype x both memory formats
        shapes = [
            (2, 1, (6, 6)),
            (2, 8, (512, 512)),
            (2, 3, (96, 66)),
            (3, 2, (12, 30)),
            (3, 8, (96, 66)),
            (3, 1, (3, 3)),
        ]
        return [(n, b, hw, d, cl) for (n, b, hw) in shapes for d in (0, 1, 2) for cl in (False, True)]
    return [(2, 3, (12, 30), 0, False), (3, 2, (15, 21), 1, True), (2, 5, (6, 10), 0, True), (3, 1, (9, 6), 1, False)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "case",
    prepare_cases(),
    ids=lambda c: "n{}-B{}-{}x{}-{}{}".format(c[0], c[1], c[2][0], c[2][1], DTYPE_NAMES[c[3]], "-cl" if c[4] else ""),
)
def test_prepare_inputs_matches_reference(device, case):
    n, b, (h, w), d, channels_last = case
    dtypes = dtypes_for(device)
    if d >= len(dtypes):
        pytest.skip("bf16 is tested on the GPU")
    dtype = dtypes[d]
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    images = torch.randint(0, 256, (b, h, w, 3), dtype=torch.uint8, generator=gen).to(device)
    valid = torch.stack([torch.randint(0, h + 1, (b,), generator=gen), torch.randint(0, w + 1, (b,), generator=gen)], 1)
    valid[0] = torch.tensor([h, w])  # one image fills its canvas
    got = ops.prepare_inputs(images, valid, n, dtype, channels_last, backend="triton")
    want = ops.prepare_inputs(images, valid, n, dtype, channels_last, backend="reference")
    for name, a, e in zip(("x", "tiles"), got, want, strict=True):
        assert_close(a, e, dtype, f"{name} ({case})")
        # Same memory layout; the stride of a size-1 dim is arbitrary (torch itself varies it).
        layout = lambda t: [st for st, sz in zip(t.stride(), t.shape, strict=True) if sz > 1]
        assert layout(a) == layout(e), f"{name}: strides {a.stride()} != {e.stride()} for shape {tuple(a.shape)}"
    # Strided (non-contiguous) images: a crop of a larger canvas.
    canvas = torch.randint(0, 256, (b, h + 3, w + 5, 3), dtype=torch.uint8, generator=gen).to(device)
    crop = canvas[:, 1 : h + 1, 2 : w + 2]
    got = ops.prepare_inputs(crop, valid, n, dtype, channels_last, backend="triton")
    want = ops.prepare_inputs(crop, valid, n, dtype, channels_last, backend="reference")
    for name, a, e in zip(("x (strided images)", "tiles (strided images)"), got, want, strict=True):
        assert_close(a, e, dtype, f"{name} ({case})")


@pytest.mark.parametrize("device", DEVICES)
def test_prepare_inputs_bad_arguments(device):
    images = torch.zeros(2, 8, 8, 3, dtype=torch.uint8, device=device)
    valid = torch.full((2, 2), 8)
    with pytest.raises(TypeError, match="uint8"):
        ops.prepare_inputs(images.float(), valid, backend="triton")
    with pytest.raises(ValueError, match="\\(B, H, W, 3\\)"):
        ops.prepare_inputs(images[..., :2], valid, backend="triton")
    with pytest.raises(ValueError, match="valid must be an integer tensor"):
        ops.prepare_inputs(images, valid[:1], backend="triton")
    with pytest.raises(ValueError, match="divisible by n=3"):
        ops.prepare_inputs(images, valid, 3, backend="triton")
    with pytest.raises(TypeError, match="dtype must be one of float32, float16, bfloat16; got torch.float64"):
        ops.prepare_inputs(images, valid, 2, torch.float64, backend="triton")

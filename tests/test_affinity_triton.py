"""The fused affinity loss kernel (kernels/fused_affinity_loss.py) against the pure-torch reference.

Sums, counts and the edge gradient on fresh random inputs, per dtype. Edge values are distinct
(a random sample of the dtype's representable values in (0, 1)), so no path has a tie at its
maximum and the gradient of the max is unambiguous. CPU runs go through the Triton interpreter
(small shapes); on a GPU the same tests run compiled, plus larger batches marked ``gpu``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import pytest
import torch
from test_kernels_compile import _astsource_supports_constexprs

from puzzlecam import ops
from puzzlecam.affinity import AffinityInputError, affinity_sums_reference

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
FULL_GRID = os.environ.get("PUZZLECAM_FULL_GRID", "0") == "1"

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETER, reason="Triton on CPU needs TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]
# Both sides compute in fp32 from the same input values: sums and counts differ only by summation
# order; the gradient is rounded to the edge's dtype at the end.
SUMS_RTOL = 1e-5
GRAD_TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Edge maps repeat a tile of this size whose values are all different (see distinct_edge).
PERIOD = 24


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every buffer the launcher allocates starts as NaN: an unwritten partial fails the comparison."""
    import puzzlecam.kernels._common as common

    monkeypatch.setattr(common, "POISON", True)


def affinity_sums(edge, seg, radius):
    import puzzlecam.kernels  # noqa: F401 (registers the Triton ops)

    return torch.ops.puzzlecam.triton_affinity_sums(edge, seg, radius)


def distinct_edge(b: int, h: int, w: int, dtype: torch.dtype, device, gen: torch.Generator) -> torch.Tensor:
    """(b, 1, h, w) probabilities without ties on any path: per image, a random sample of the dtype's values
    in (0.001, 0.999), all different, on a 24 x 24 tile repeated over the map (a path of radius <= 10 spans at
    most 10 x 19 pixels, so it never meets two equal values)."""
    values = torch.linspace(0.001, 0.999, 200_000, dtype=torch.float64).to(dtype).unique()
    th, tw = min(h, PERIOD), min(w, PERIOD)
    tiles = torch.stack([values[torch.randperm(values.numel(), generator=gen)[: th * tw]] for _ in range(b)])
    edge = tiles.view(b, 1, th, tw).repeat(1, 1, -(-h // th), -(-w // tw))[..., :h, :w]
    return edge.contiguous().to(device)


def random_labels(b: int, h: int, w: int, dtype: torch.dtype, device, gen: torch.Generator) -> torch.Tensor:
    """Label maps with regions (so that positive pairs exist) of background 0 and classes 1..3, 20,
    then scattered ignored pixels (255) and pixels of other classes 21..254 (valid: COCO's go to 80)."""
    coarse = torch.tensor([0, 1, 2, 3, 20])[torch.randint(0, 5, (b, 1, (h + 3) // 4, (w + 3) // 4), generator=gen)]
    seg = torch.nn.functional.interpolate(coarse.float(), scale_factor=4, mode="nearest")[:, 0, :h, :w].long()
    draw = torch.rand(b, h, w, generator=gen)
    seg[draw < 0.08] = 255
    seg[(draw >= 0.08) & (draw < 0.12)] = torch.tensor([21, 37, 100, 254])[torch.randint(0, 4, (1,), generator=gen)]
    return seg.to(device=device, dtype=dtype)


def run(fn, edge, seg, radius, upstream):
    edge = edge.detach().requires_grad_(True)
    sums, counts = fn(edge, seg, radius)
    (sums * upstream).sum().backward()
    return sums, counts, edge.grad


def reference(edge, seg, radius, upstream):
    """The reference on the same values in fp32 (the kernel computes in fp32 from any input dtype)."""
    return run(affinity_sums_reference, edge.float(), seg, radius, upstream)


def assert_matches(got, want, dtype, what):
    sums, counts, grad = got
    ref_sums, ref_counts, ref_grad = want
    assert sums.dtype == counts.dtype == torch.float32 and sums.shape == counts.shape == (3,), what
    assert torch.isfinite(sums).all() and torch.isfinite(counts).all(), f"{what}: non-finite sums or counts"
    assert torch.equal(counts.cpu(), ref_counts.float().cpu()), f"{what}: counts {counts} != {ref_counts}"
    torch.testing.assert_close(
        sums.cpu(), ref_sums.float().cpu(), rtol=SUMS_RTOL, atol=1e-6, msg=lambda m: f"{what}: {m}"
    )
    assert grad.dtype == dtype and grad.shape == ref_grad.shape, f"{what}: gradient {grad.dtype} {tuple(grad.shape)}"
    g, e = grad.float().cpu(), ref_grad.float().cpu()
    assert torch.isfinite(g).all(), f"{what}: non-finite gradient"
    tol = GRAD_TOLERANCE[dtype]
    torch.testing.assert_close(g, e, rtol=tol, atol=tol * e.abs().max().item(), msg=lambda m: f"{what} grad: {m}")


def upstream_for(counts_hint: float, device, gen) -> torch.Tensor:
    # The loss divides each sum by its count: upstream gradients of that size keep fp16 gradients finite.
    return ((torch.rand(3, generator=gen) + 0.5) / counts_hint).to(device)


CASES = [
    # (B, H, W, radius, edge dtype, seg dtype)
    (2, 24, 28, 10, torch.float32, torch.int64),
    (2, 24, 28, 5, torch.float32, torch.uint8),
    (1, 21, 30, 10, torch.float16, torch.int32),
    (2, 17, 19, 5, torch.float16, torch.int64),
    (2, 17, 19, 5, torch.bfloat16, torch.uint8),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-{c[1]}x{c[2]}-r{c[3]}-{str(c[4])[6:]}-{str(c[5])[6:]}")
def test_affinity_sums_match_reference(device, case):
    b, h, w, radius, dtype, seg_dtype = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    edge = distinct_edge(b, h, w, dtype, device, gen)
    seg = random_labels(b, h, w, seg_dtype, device, gen)
    upstream = upstream_for(100.0, device, gen)
    want = reference(edge, seg, radius, upstream)
    assert (want[1] > 0).all(), "the labels should give pairs of every kind"
    got = run(affinity_sums, edge, seg, radius, upstream)
    assert_matches(got, want, dtype, f"{case}")


@pytest.mark.parametrize("device", DEVICES)
def test_affinity_sums_several_blocks_and_strided_edge(device):
    """A map with several source blocks per image, and edge / seg views that are not contiguous."""
    gen = torch.Generator().manual_seed(11)
    b, h, w, radius = 1, 40, 40, 5  # 36 x 32 = 1152 sources: more than one block on every device
    edge = distinct_edge(b, h, w, torch.float32, device, gen)
    seg = random_labels(b, h, w, torch.int64, device, gen)
    upstream = upstream_for(1.0, device, gen)
    want = reference(edge, seg, radius, upstream)
    wide = torch.zeros(b, 1, h, 2 * w, device=device)
    wide[..., ::2] = edge
    seg_t = seg.transpose(1, 2).contiguous().transpose(1, 2)
    assert not wide[..., ::2].is_contiguous() and not seg_t.is_contiguous()
    for name, e, s in (("contiguous", edge, seg), ("strided", wide[..., ::2], seg_t)):
        assert_matches(run(affinity_sums, e, s, radius, upstream), want, torch.float32, name)


@pytest.mark.parametrize("device", DEVICES)
def test_affinity_sums_upstream_and_determinism(device):
    """One term's gradient at a time, counts without gradient, and bitwise-repeatable sums."""
    gen = torch.Generator().manual_seed(5)
    edge = distinct_edge(2, 16, 18, torch.float32, device, gen)
    seg = random_labels(2, 16, 18, torch.int64, device, gen)
    for term in range(3):
        upstream = torch.zeros(3, device=device)
        upstream[term] = 1.0
        got = run(affinity_sums, edge, seg, 5, upstream)
        assert_matches(got, reference(edge, seg, 5, upstream), torch.float32, f"term {term} only")
    sums, counts = affinity_sums(edge.clone().requires_grad_(True), seg, 5)
    assert sums.requires_grad and not counts.requires_grad
    again = affinity_sums(edge, seg, 5)
    assert torch.equal(sums.detach(), again[0]) and torch.equal(counts, again[1])


@pytest.mark.parametrize("device", DEVICES)
def test_affinity_sums_with_ties(device):
    """Coarse edge values, many exact ties at path maxima: the values are unchanged, and each pair's gradient
    goes to one of its tied elements, so the gradient summed over the pixels of each edge value matches."""
    gen = torch.Generator().manual_seed(17)
    edge = ((torch.rand(2, 1, 16, 19, generator=gen) * 8).floor() / 10 + 0.05).to(device)  # 8 values
    seg = random_labels(2, 16, 19, torch.int64, device, gen)
    upstream = upstream_for(1.0, device, gen)
    sums, counts, grad = run(affinity_sums, edge, seg, 5, upstream)
    ref_sums, ref_counts, ref_grad = reference(edge, seg, 5, upstream)
    assert torch.equal(counts, ref_counts)
    torch.testing.assert_close(sums, ref_sums, rtol=SUMS_RTOL, atol=1e-6)
    values, which = edge.flatten().unique(return_inverse=True)
    per_value = torch.zeros(len(values), dtype=torch.float64, device=device)
    ref_per_value = torch.zeros_like(per_value)
    per_value.index_add_(0, which, grad.flatten().double())
    ref_per_value.index_add_(0, which, ref_grad.flatten().double())
    torch.testing.assert_close(per_value, ref_per_value, rtol=1e-5, atol=1e-5 * ref_per_value.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
def test_affinity_sums_nan_edge_propagates(device):
    """A NaN in the edge map (a diverged network) gives NaN sums and a NaN gradient at that pixel, as the
    reference does: never a finite loss that hides it."""
    gen = torch.Generator().manual_seed(23)
    edge = distinct_edge(1, 12, 14, torch.float32, device, gen)
    edge[0, 0, 5, 6] = float("nan")
    seg = random_labels(1, 12, 14, torch.int64, device, gen)
    sums, counts, grad = run(affinity_sums, edge, seg, 5, torch.ones(3, device=device))
    ref_sums, ref_counts, ref_grad = reference(edge, seg, 5, torch.ones(3, device=device))
    assert ref_sums.isnan().all() and sums.isnan().all(), sums
    assert torch.equal(counts, ref_counts)
    assert torch.equal(grad.isnan(), ref_grad.isnan()) and grad[0, 0, 5, 6].isnan()


@pytest.mark.parametrize("device", DEVICES)
def test_affinity_sums_without_valid_pairs(device):
    """Every label ignored: zero sums and counts, zero gradient (every partial written)."""
    gen = torch.Generator().manual_seed(3)
    edge = distinct_edge(2, 12, 12, torch.float32, device, gen)
    ignored = torch.full((2, 12, 12), 255, dtype=torch.uint8, device=device)
    ignored[1, ::2] = 255
    sums, counts, grad = run(affinity_sums, edge, ignored, 5, torch.ones(3, device=device))
    assert torch.equal(sums, torch.zeros(3, device=device)), sums
    assert torch.equal(counts, torch.zeros(3, device=device)), counts
    assert torch.equal(grad, torch.zeros_like(edge))


@pytest.mark.parametrize("device", DEVICES)
def test_affinity_sums_bad_arguments(device):
    edge = torch.rand(2, 1, 12, 14, device=device)
    seg = torch.zeros(2, 12, 14, dtype=torch.int64, device=device)
    with pytest.raises(
        TypeError, match="edge must have one of the dtypes float32, float16, bfloat16; got torch.float64"
    ):
        affinity_sums(edge.double(), seg, 5)
    with pytest.raises(TypeError, match="seg must be an integer label map .*; got torch.uint16"):
        affinity_sums(edge, seg.to(torch.uint16), 5)
    with pytest.raises(AffinityInputError, match=r"seg must be an integer \(B, H, W\) label map, got .* torch.float32"):
        affinity_sums(edge, seg.float(), 5)
    with pytest.raises(
        AffinityInputError, match=r"edge must be a floating \(B, 1, H, W\) tensor, got \(2, 2, 12, 14\)"
    ):
        affinity_sums(edge.expand(2, 2, 12, 14), seg, 5)
    with pytest.raises(AffinityInputError, match=r"got \(2, 12, 14\)"):
        affinity_sums(edge[:, 0], seg, 5)
    with pytest.raises(AffinityInputError, match=r"seg \(2, 12, 13\) must be \(B, H, W\) = \(2, 12, 14\)"):
        affinity_sums(edge, seg[..., :13], 5)
    with pytest.raises(AffinityInputError, match=r"seg \(1, 12, 14\) must be"):
        affinity_sums(edge, seg[:1], 5)
    with pytest.raises(AffinityInputError, match=r"too small for radius 10: pairs need H >= 10 and W >= 19"):
        affinity_sums(edge, seg, 10)
    with pytest.raises(AffinityInputError, match="radius must be an int >= 2, got 1"):
        affinity_sums(edge, seg, 1)
    # Not an int at all: puzzlecam.ops names it before the op's schema (int radius) refuses it.
    for radius in (2.5, True):
        with pytest.raises(AffinityInputError, match=f"radius must be an int >= 2, got {radius!r}"):
            ops.affinity_sums(edge, seg, radius, backend="triton")
    if device == "cuda":
        with pytest.raises(AffinityInputError, match="expected one device"):
            affinity_sums(edge, seg.cpu(), 5)


def gpu_cases():
    shapes = [(8, 64, 64, 10), (3, 37, 53, 10), (4, 48, 40, 5)]
    if FULL_GRID:
        shapes += [(32, 128, 128, 10), (1, 11, 200, 10), (5, 96, 70, 5)]
    return [(b, h, w, r, dtype) for (b, h, w, r) in shapes for dtype in (torch.float32, torch.float16, torch.bfloat16)]


@pytest.mark.gpu
@pytest.mark.parametrize("case", gpu_cases(), ids=lambda c: f"B{c[0]}-{c[1]}x{c[2]}-r{c[3]}-{str(c[4])[6:]}")
def test_affinity_sums_gpu_batches(case):
    """Compiled kernels at training-like sizes (several blocks per image; batch 32 at 128 px in the full grid)."""
    b, h, w, radius, dtype = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    edge = distinct_edge(b, h, w, dtype, "cuda", gen)
    seg = random_labels(b, h, w, torch.int64, "cuda", gen)
    upstream = upstream_for(float(h * w), "cuda", gen)
    want = reference(edge, seg, radius, upstream)
    assert_matches(run(affinity_sums, edge, seg, radius, upstream), want, dtype, f"{case}")


# Run in a subprocess without TRITON_INTERPRET, so that the kernel is defined as a compiled function.
COMPILE_SCRIPT = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from test_kernels_compile import _signature
from puzzlecam.kernels import fused_affinity_loss

kernel = fused_affinity_loss._affinity_kernel
failures = 0
# The JIT turns integer arguments equal to 1 into compile-time constants: contiguous maps' unit strides.
unit_strides = {"e_sx": 1, "s_sx": 1}
for edge_type, seg_type, radius_floor, path_block, backward, ones in (
    ("*fp32", "*i64", 9, 32, False, unit_strides),
    ("*fp32", "*i64", 9, 32, True, unit_strides),
    ("*bf16", "*u8", 9, 32, True, {}),
    ("*fp16", "*i32", 4, 16, False, {}),
    ("*fp16", "*i8", 4, 16, True, unit_strides),
):
    consts = {"RADIUS_FLOOR": radius_floor, "PATH_BLOCK": path_block, "BLOCK": fused_affinity_loss.BLOCK_SOURCES,
              "BACKWARD": backward, "EPS": fused_affinity_loss.LOG_EPS,
              "IGNORE_LABEL": fused_affinity_loss.IGNORE_LABEL, **ones}
    pointers = {"default": "*fp32", "edge_ptr": edge_type, "seg_ptr": seg_type,
                "dest_ptr": "*i32", "path_ptr": "*i32", "length_ptr": "*i32"}
    what = f"affinity {edge_type} {seg_type} radius_floor={radius_floor} backward={backward}"
    try:
        src = ASTSource(fn=kernel, signature=_signature(kernel, pointers, consts), constexprs=consts)
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        print("compiled", what)
    except Exception as exc:
        failures += 1
        print(f"FAILED {what}: {type(exc).__name__}: {exc}")
sys.exit(1 if failures else 0)
"""


@pytest.mark.skipif(not _astsource_supports_constexprs(), reason="this triton's ASTSource API predates constexprs=")
def test_affinity_kernel_compiles_for_sm90():
    """Errors only triton's compiler sees (not the interpreter) fail here rather than on the first GPU run."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT], env=env, cwd=tests_dir, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, (
        f"compiling the affinity kernel for sm_90 failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    )
    assert proc.stdout.count("compiled ") == 5, proc.stdout


@pytest.mark.gpu
def test_affinity_sums_gpu_memory_stays_at_map_size():
    """Forward + backward allocate a few map-sized buffers, never anything of the (B, D, N) pairs' size."""
    b, h, w, radius = 8, 128, 128, 10
    gen = torch.Generator().manual_seed(29)
    edge = distinct_edge(b, h, w, torch.float32, "cuda", gen).requires_grad_(True)
    seg = random_labels(b, h, w, torch.int64, "cuda", gen)
    affinity_sums(edge, seg, radius)[0].sum().backward()  # kernels compiled, path tables cached
    edge.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    affinity_sums(edge, seg, radius)[0].sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    pairs = b * 152 * (h - radius + 1) * (w - 2 * radius + 2)
    assert extra <= 3 * edge.numel() * 4 + 2**20, f"{extra} bytes beyond the inputs (one pair tensor: {pairs * 4})"

"""The affinity ops of the C++/CUDA extension (random_walk, affinity_sums) and their puzzlecam.ops dispatch.

Every backend is compared with the pure-torch oracle of puzzlecam.affinity on fresh random inputs (outputs
and the edge gradient), the walk also with the original's dense hw x hw definition; outputs are NaN-poisoned
by the extension first (PUZZLECAM_POISON_OUTPUTS=1), so an element a kernel never writes fails. Plus
torch.library.opcheck and the dispatch's choices and errors. The CUDA cases run on a GPU machine.
"""

from __future__ import annotations

import functools

import pytest
import torch

from puzzlecam import affinity, library, ops

needs_ext = pytest.mark.skipif(
    not library.has_op("random_walk"),
    reason=f"puzzlecam._C lacks the affinity ops ({library.load_error() or 'built from older sources'})",
)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
            pytest.mark.skipif(
                torch.cuda.is_available() and not library.cuda_available(),
                reason="puzzlecam._C was built without CUDA kernels (rebuild with FORCE_CUDA=1)",
            ),
        ],
    ),
]


def ext_backend(device: str) -> str:
    return "cpp" if device == "cpu" else "cuda"


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setenv("PUZZLECAM_POISON_OUTPUTS", "1")


def walk_inputs(k, h, w, seed, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    cams = torch.rand(k, h, w, generator=gen, dtype=torch.float64)
    # Mostly low edges with a few strong ones: a walk that spreads, but not uniformly.
    edge = torch.rand(h, w, generator=gen, dtype=torch.float64) ** 4
    return cams.to(device, dtype), edge.to(device, dtype)


def walk_tolerance(exp_times: int) -> float:
    # Relative to the largest value: each of the 2^exp_times fp32 steps adds rounding of order 1e-7 (measured
    # ~2e-7 per step against the float64 dense definition).
    return 1e-6 * (1 + 2**exp_times)


# ------------------------------------------------------------------------------------------------
# Random walk


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "k,h,w,exp_times",
    [(2, 7, 9, 8), (3, 12, 10, 3), (1, 5, 5, 0), (3, 1, 1, 2), (2, 3, 17, 8), (1, 20, 33, 4), (4, 9, 1, 1)],
)
def test_random_walk_matches_reference_and_dense(device, k, h, w, exp_times):
    cams, edge = walk_inputs(k, h, w, seed=k * 1000 + h * 37 + w + exp_times, device=device)
    got = ops.random_walk(cams, edge, beta=10, exp_times=exp_times, radius=5, backend=ext_backend(device))
    assert got.dtype == torch.float32 and got.shape == (k, h, w)
    dense = affinity.random_walk_dense(cams.double(), edge.double(), beta=10, exp_times=exp_times, radius=5)
    reference = affinity.random_walk_reference(cams, edge, beta=10, exp_times=exp_times, radius=5)
    tol = walk_tolerance(exp_times) * dense.abs().max().item()
    torch.testing.assert_close(got.double().cpu(), dense.cpu(), rtol=0, atol=tol)
    torch.testing.assert_close(got.cpu(), reference.cpu(), rtol=0, atol=tol)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("radius,beta", [(2, 1.0), (3, 2.5), (6, 10.0)])
def test_random_walk_other_radii_and_betas(device, radius, beta):
    cams, edge = walk_inputs(2, 11, 13, seed=radius, device=device)
    got = ops.random_walk(cams, edge, beta=beta, exp_times=3, radius=radius, backend=ext_backend(device))
    dense = affinity.random_walk_dense(cams.double(), edge.double(), beta=beta, exp_times=3, radius=radius)
    torch.testing.assert_close(got.double().cpu(), dense.cpu(), rtol=0, atol=walk_tolerance(3) * dense.abs().max())


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_random_walk_float64_and_half_inputs(device):
    cams, edge = walk_inputs(2, 8, 11, seed=5, dtype=torch.float64, device=device)
    got = ops.random_walk(cams, edge, exp_times=8, backend=ext_backend(device))
    dense = affinity.random_walk_dense(cams, edge, exp_times=8)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, dense, rtol=1e-10, atol=1e-12)
    # Half inputs walk in fp32 (the inputs' rounding is the only difference to fp32 inputs).
    half = ops.random_walk(cams.half(), edge.half(), exp_times=2, backend=ext_backend(device))
    want = affinity.random_walk_reference(cams.half().float(), edge.half().float(), exp_times=2)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, want, rtol=0, atol=walk_tolerance(2) * want.abs().max())


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_random_walk_edge_extremes(device):
    # Edges of exactly 0 and 1 (affinity 1 and 0) and all-zero CAMs.
    cams, _ = walk_inputs(2, 9, 10, seed=11, device=device)
    edge = (torch.arange(90, device=device).view(9, 10) % 3 == 0).float()
    cams[1] = 0
    got = ops.random_walk(cams, edge, exp_times=5, backend=ext_backend(device))
    dense = affinity.random_walk_dense(cams.double(), edge.double(), exp_times=5)
    torch.testing.assert_close(got.double(), dense, rtol=0, atol=walk_tolerance(5) * dense.abs().max())
    assert torch.equal(got[1], torch.zeros_like(got[1]))


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_random_walk_opcheck(device):
    cams, edge = walk_inputs(2, 6, 7, seed=3, device=device)
    torch.library.opcheck(torch.ops.puzzlecam.random_walk.default, (cams, edge, 10.0, 2, 5))


@needs_ext
def test_random_walk_bad_inputs_name_the_shapes():
    cams, edge = walk_inputs(2, 6, 7, seed=3)
    with pytest.raises(ValueError, match=r"edge \(6, 8\) must be the \(h, w\) of cams \(2, 6, 7\)"):
        ops.random_walk(cams, torch.rand(6, 8), backend="cpp")
    with pytest.raises(ValueError, match="must lie in"):
        ops.random_walk(cams, edge + 1, backend="cpp")
    # The op itself checks too (called directly, without puzzlecam.ops' checks).
    with pytest.raises(ValueError, match=r"edge must be \(h, w\) = \(6, 7\)"):
        torch.ops.puzzlecam.random_walk(cams, torch.rand(7, 6), 10.0, 2, 5)
    with pytest.raises(TypeError, match="cams and edge must be float"):
        torch.ops.puzzlecam.random_walk(cams.long(), edge, 10.0, 2, 5)
    with pytest.raises(ValueError, match=r"exp_times must be an int in \[0, 30\]"):
        torch.ops.puzzlecam.random_walk(cams, edge, 10.0, 31, 5)


# ------------------------------------------------------------------------------------------------
# Affinity sums

# Relative tolerance per edge dtype (the sums are fp32 or fp64; the gradient is rounded to the edge dtype).
SUMS_TOL = {torch.float32: 2e-5, torch.float64: 1e-12, torch.float16: 2e-3}


def affinity_inputs(b, h, w, seed, dtype=torch.float32, seg_dtype=torch.int64, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    edge = torch.rand(b, 1, h, w, generator=gen, dtype=torch.float64)
    seg = torch.randint(0, 4, (b, h, w), generator=gen)
    seg[torch.rand(b, h, w, generator=gen) < 0.15] = 255
    seg[torch.rand(b, h, w, generator=gen) < 0.05] = 21  # classes of a larger dataset (COCO's 1..80) are valid
    seg[torch.rand(b, h, w, generator=gen) < 0.05] = 40
    grad_sums = torch.randn(3, generator=gen, dtype=torch.float64)
    return edge.to(device, dtype), seg.to(device, seg_dtype), grad_sums.to(device)


def sums_and_grad(fn, edge, seg, radius, grad_sums):
    edge = edge.detach().clone().requires_grad_(True)
    sums, counts = fn(edge, seg, radius)
    (grad,) = torch.autograd.grad((sums * grad_sums.to(sums.dtype)).sum(), [edge])
    return sums, counts, grad


def assert_close_rel(actual, expected, tol, what):
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * max(scale, 1e-12), msg=lambda m: f"{what}: {m}")


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize(
    "b,h,w,radius", [(2, 12, 21, 10), (1, 9, 13, 5), (3, 16, 16, 3), (1, 10, 19, 10), (2, 5, 3, 2)]
)
def test_affinity_sums_match_reference(device, dtype, b, h, w, radius):
    edge, seg, grad_sums = affinity_inputs(b, h, w, seed=b * 100 + h * 10 + w + radius, dtype=dtype, device=device)
    op = functools.partial(ops.affinity_sums, backend=ext_backend(device))
    sums, counts, grad = sums_and_grad(op, edge, seg, radius, grad_sums)
    want_sums, want_counts, want_grad = sums_and_grad(affinity.affinity_sums_reference, edge, seg, radius, grad_sums)
    assert sums.dtype == want_sums.dtype and counts.dtype == torch.float32 and grad.dtype == dtype
    assert not counts.requires_grad
    assert torch.equal(counts, want_counts)
    assert counts.sum() > 0
    assert_close_rel(sums, want_sums, SUMS_TOL[dtype], "sums")
    assert_close_rel(grad, want_grad, SUMS_TOL[dtype], "edge gradient")


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seg_dtype", [torch.uint8, torch.int32], ids=str)
def test_affinity_sums_label_dtypes_and_layouts(device, seg_dtype):
    edge, seg, grad_sums = affinity_inputs(2, 14, 22, seed=7, device=device)
    want = sums_and_grad(affinity.affinity_sums_reference, edge, seg, 10, grad_sums)
    # Another integer dtype for the labels, a non-contiguous edge map.
    strided = edge.transpose(2, 3).contiguous().transpose(2, 3)
    op = functools.partial(ops.affinity_sums, backend=ext_backend(device))
    got = sums_and_grad(op, strided, seg.to(seg_dtype), 10, grad_sums)
    for actual, expected, what in zip(got, want, ("sums", "counts", "edge gradient"), strict=True):
        assert_close_rel(actual, expected, SUMS_TOL[torch.float32], what)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_affinity_sums_tied_maxima(device):
    # A coarse edge map: most path maxima tie. Which tied element gets a pair's gradient may differ between
    # implementations, so compare the sums and the gradient's total, which does not depend on that choice.
    edge, seg, grad_sums = affinity_inputs(2, 12, 20, seed=3, device=device)
    edge = (edge * 4).floor() / 4 + 0.1
    op = functools.partial(ops.affinity_sums, backend=ext_backend(device))
    sums, counts, grad = sums_and_grad(op, edge, seg, 10, grad_sums)
    want_sums, want_counts, want_grad = sums_and_grad(affinity.affinity_sums_reference, edge, seg, 10, grad_sums)
    assert torch.equal(counts, want_counts)
    assert_close_rel(sums, want_sums, 2e-5, "sums")
    assert_close_rel(grad.double().sum(), want_grad.double().sum(), 1e-5, "gradient total")


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_affinity_sums_without_valid_pairs(device):
    edge, seg, grad_sums = affinity_inputs(1, 10, 19, seed=1, device=device)
    op = functools.partial(ops.affinity_sums, backend=ext_backend(device))
    sums, counts, grad = sums_and_grad(op, edge, torch.full_like(seg, 255), 10, grad_sums)
    assert torch.equal(sums, torch.zeros_like(sums)) and torch.equal(counts, torch.zeros_like(counts))
    assert torch.equal(grad, torch.zeros_like(grad))


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_affinity_sums_nan_edges_propagate_as_in_the_reference(device):
    # A diverged edge head must show as a NaN loss: a NaN in any pair's path (ignored pairs too) makes all
    # three sums NaN, and the NaN element's gradient NaN; every other element keeps its gradient.
    edge, seg, grad_sums = affinity_inputs(2, 10, 13, seed=4, device=device)
    seg[0] = 255
    edge[0, 0, 5, 6] = float("nan")  # only ignored pairs cross it
    edge[1, 0, 2, 3] = float("nan")
    op = functools.partial(ops.affinity_sums, backend=ext_backend(device))
    sums, counts, grad = sums_and_grad(op, edge, seg, 4, grad_sums)
    want_sums, want_counts, want_grad = sums_and_grad(affinity.affinity_sums_reference, edge, seg, 4, grad_sums)
    assert want_sums.isnan().all() and sums.isnan().all()
    assert torch.equal(counts, want_counts)
    assert torch.equal(grad.isnan(), want_grad.isnan()) and grad.isnan().sum() == 2
    assert_close_rel(grad.nan_to_num(), want_grad.nan_to_num(), SUMS_TOL[torch.float32], "finite gradient")


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_affinity_sums_opcheck(device):
    edge, seg, grad_sums = affinity_inputs(2, 8, 11, seed=2, device=device)
    torch.library.opcheck(torch.ops.puzzlecam.affinity_sums.default, (edge.requires_grad_(True), seg, 4))
    torch.library.opcheck(
        torch.ops.puzzlecam.affinity_sums_backward.default, (grad_sums.float(), edge.detach(), seg, 4)
    )


@needs_ext
def test_affinity_sums_bad_inputs_name_the_shapes():
    edge, seg, _ = affinity_inputs(2, 8, 11, seed=2)
    with pytest.raises(ValueError, match=r"seg \(2, 8, 10\) must be \(B, H, W\) = \(2, 8, 11\)"):
        ops.affinity_sums(edge, seg[..., :10], 4, backend="cpp")
    with pytest.raises(ValueError, match="too small for radius 10"):
        ops.affinity_sums(edge, seg, 10, backend="cpp")
    # The op itself checks too (called directly, without puzzlecam.ops' checks).
    with pytest.raises(ValueError, match=r"seg \[2, 8, 10\] must be \(B, H, W\) of edge \[2, 1, 8, 11\]"):
        torch.ops.puzzlecam.affinity_sums(edge, seg[..., :10], 4)
    with pytest.raises(TypeError, match="seg must be an integer label map, got Float"):
        torch.ops.puzzlecam.affinity_sums(edge, seg.float(), 4)
    with pytest.raises(ValueError, match=r"edge must be \(B, 1, H, W\)"):
        torch.ops.puzzlecam.affinity_sums(edge[:, 0], seg, 4)
    with pytest.raises(ValueError, match="grad_sums must hold 3 values"):
        torch.ops.puzzlecam.affinity_sums_backward(torch.ones(2), edge, seg, 4)


# ------------------------------------------------------------------------------------------------
# Dispatch


def test_auto_picks_the_extension_on_cpu_or_the_reference():
    cpu = torch.device("cpu")
    for op in ("random_walk", "affinity_sums"):
        want = "cpp" if library.has_op(op) else "reference"
        assert ops.resolve_backend(op, "auto", cpu) == want
    assert "triton" not in ops.available_backends("random_walk", cpu)
    with pytest.raises(RuntimeError, match="random_walk has no Triton kernel"):
        ops.resolve_backend("random_walk", "triton", cpu)
    with pytest.raises(RuntimeError, match="the cuda backend runs on CUDA tensors"):
        ops.resolve_backend("random_walk", "cuda", cpu)


def test_reference_backend_is_the_oracle():
    cams, edge = walk_inputs(2, 6, 7, seed=9)
    got = ops.random_walk(cams, edge, exp_times=3, backend="reference")
    assert torch.equal(got, affinity.random_walk_reference(cams, edge, exp_times=3))
    edge, seg, _ = affinity_inputs(1, 6, 9, seed=9)
    for got, want in zip(ops.affinity_sums(edge, seg, 3, backend="reference"),
                         affinity.affinity_sums_reference(edge, seg, 3), strict=True):  # fmt: skip
        assert torch.equal(got, want)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=DEVICES[1].marks)])
def test_every_available_backend_agrees_through_ops(device):
    # The dispatch wiring of each backend that runs here (Triton on CPU only under the interpreter).
    edge, seg, grad_sums = affinity_inputs(2, 9, 14, seed=12, device=device)
    want = sums_and_grad(affinity.affinity_sums_reference, edge, seg, 4, grad_sums)
    for backend in ops.available_backends("affinity_sums", device):
        got = sums_and_grad(functools.partial(ops.affinity_sums, backend=backend), edge, seg, 4, grad_sums)
        for actual, expected, what in zip(got, want, ("sums", "counts", "edge gradient"), strict=True):
            assert_close_rel(actual, expected, SUMS_TOL[torch.float32], f"{backend} {what}")
    cams, edge = walk_inputs(2, 6, 7, seed=12, device=device)
    want_walk = affinity.random_walk_reference(cams, edge, exp_times=3)
    for backend in ops.available_backends("random_walk", device):
        got_walk = ops.random_walk(cams, edge, exp_times=3, backend=backend)
        torch.testing.assert_close(got_walk, want_walk, rtol=0, atol=walk_tolerance(3) * want_walk.abs().max())


def test_triton_float64_edges_fall_back_to_the_reference_with_one_warning(monkeypatch):
    if "triton" not in ops.available_backends("affinity_sums", "cpu"):
        pytest.skip("the Triton affinity kernel cannot run here (CPU tensors need TRITON_INTERPRET=1)")
    monkeypatch.setattr(ops, "_warned", set())
    edge, seg, _ = affinity_inputs(1, 6, 9, seed=6, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="triton backend has no float64 edge maps") as caught:
        for _ in range(2):
            got = ops.affinity_sums(edge, seg, 3, backend="triton")
    assert len([w for w in caught if "float64" in str(w.message)]) == 1
    for actual, expected in zip(got, affinity.affinity_sums_reference(edge, seg, 3), strict=True):
        assert torch.equal(actual, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_on_cuda_picks_triton_for_the_loss_and_cuda_for_the_walk():
    cuda = torch.device("cuda")
    if library.cuda_available() and library.has_op("random_walk"):
        assert ops.resolve_backend("random_walk", "auto", cuda) == "cuda"
    if "triton" in ops.available_backends("affinity_sums", cuda):
        assert ops.resolve_backend("affinity_sums", "auto", cuda) == "triton"


# ------------------------------------------------------------------------------------------------
# The CUDA glue compiles (syntax and types) against torch's headers on a machine without a CUDA torch

# The CPU torch wheel lacks c10/cuda; these declare just what the glue uses, so g++ checks everything else
# (ATen calls, the launchers' signatures in the kernel headers) against the real headers.
C10_CUDA_STUBS = {
    "CUDAException.h": "#pragma once\n#include <cuda_runtime_api.h>\n#define C10_CUDA_CHECK(x) (void)(x)\n",
    "CUDAGuard.h": (
        "#pragma once\n#include <c10/core/Device.h>\n"
        "namespace c10::cuda { struct CUDAGuard { explicit CUDAGuard(c10::Device) {} }; }\n"
    ),
    "CUDAStream.h": (
        "#pragma once\n#include <cuda_runtime_api.h>\n"
        "namespace c10::cuda { struct CUDAStream { operator cudaStream_t() const { return nullptr; } };\n"
        "inline CUDAStream getCurrentCUDAStream() { return {}; } }\n"
    ),
}


@pytest.mark.slow
def test_cuda_glue_compiles_against_torch_headers(tmp_path):
    import glob
    import os
    import shutil
    import subprocess

    from torch.utils import cpp_extension

    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        pytest.skip("needs a C++ compiler")
    nvcc = shutil.which("nvcc")
    # The toolkit's headers: $CUDA_HOME, the usual install path, or beside nvcc (which may be a wrapper script).
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda", nvcc and os.path.dirname(os.path.dirname(nvcc))]
    found = [
        os.path.join(h, "include")
        for h in homes
        if h and os.path.exists(os.path.join(h, "include", "cuda_runtime_api.h"))
    ]
    if not found:
        pytest.skip(f"no CUDA toolkit headers (cuda_runtime_api.h) under {homes}")
    cuda_include = found[0]
    stubs = tmp_path / "c10" / "cuda"
    stubs.mkdir(parents=True)
    for name, text in C10_CUDA_STUBS.items():
        (stubs / name).write_text(text)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    includes = [str(tmp_path), os.path.join(root, "csrc"), *cpp_extension.include_paths(), cuda_include]
    sources = sorted(glob.glob(os.path.join(root, "csrc", "cuda", "*.cpp")))
    assert sources, "no CUDA glue files in csrc/cuda"
    for source in sources:
        cmd = [compiler, "-std=c++20", "-fsyntax-only", "-Wall", *(f"-I{d}" for d in includes), source]
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, f"{os.path.basename(source)} does not compile:\n{result.stderr[-4000:]}"

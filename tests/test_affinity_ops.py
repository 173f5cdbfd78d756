"""The affinity ops of the C++/CUDA extension (random_walk, affinity_sums) and their puzzlecam.ops dispatch.

Every backend is compared with the pure-torch oracle of puzzlecam.affinity on fresh random inputs (outputs
and the edge gradient), the walk also with the original's dense hw x hw definition; outputs are NaN-poisoned
by the extension first (PUZZLECAM_POISON_OUTPUTS=1), so an element a kernel never writes fails. Plus
torch.library.opcheck and the dispatch's choices and errors. The CUDA cases run on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

from puzzlecam import _ext, affinity, ops

needs_ext = pytest.mark.skipif(
    not _ext.has_op("random_walk"),
    reason=f"puzzlecam._C lacks the affinity ops ({_ext.load_error() or 'built from older sources'})",
)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
            pytest.mark.skipif(
                torch.cuda.is_available() and not _ext.cuda_available(),
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
# Dispatch


def test_auto_picks_the_extension_on_cpu_or_the_reference():
    cpu = torch.device("cpu")
    want = "cpp" if _ext.has_op("random_walk") else "reference"
    assert ops.resolve_backend("random_walk", "auto", cpu) == want
    assert "triton" not in ops.available_backends("random_walk", cpu)
    with pytest.raises(RuntimeError, match="random_walk has no Triton kernel"):
        ops.resolve_backend("random_walk", "triton", cpu)
    with pytest.raises(RuntimeError, match="the cuda backend runs on CUDA tensors"):
        ops.resolve_backend("random_walk", "cuda", cpu)


def test_reference_backend_is_the_oracle():
    cams, edge = walk_inputs(2, 6, 7, seed=9)
    got = ops.random_walk(cams, edge, exp_times=3, backend="reference")
    assert torch.equal(got, affinity.random_walk_reference(cams, edge, exp_times=3))

"""puzzlecam.ops dispatch: backend choice, clear errors, one warning, and agreement with the reference."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from puzzlecam import ops, puzzle
from puzzlecam.puzzle import PuzzleSpec

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"


def ext_available(kind: str) -> bool:
    return ops._ext_available(kind)


def loss_inputs(device="cpu", dtype=torch.float32, b=2, c=5, n=2, th=3, tw=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cam = torch.randn(b, c, n * th, n * tw, generator=gen).to(device, dtype)
    tiles = torch.randn(n * n * b, c, th, tw, generator=gen).to(device, dtype)
    labels = (torch.rand(b, c, generator=gen) < 0.5).float().to(device)
    return cam, tiles, labels


def test_unknown_backend_is_a_value_error():
    cam, tiles, labels = loss_inputs()
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.reconstruction_loss(cam, tiles, labels, backend="fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.tile(cam, 2, backend="Triton")


def test_auto_on_cpu_picks_cpp_or_warns_once(monkeypatch):
    monkeypatch.setattr(ops, "_warned", set())
    cam, tiles, labels = loss_inputs()
    if ext_available("cpp"):
        assert ops.resolve_backend("reconstruction_loss", "auto", cam.device) == "cpp"
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            loss, logits = ops.reconstruction_loss(cam, tiles, labels)
            ops.multiscale_cam([cam[0]], None, torch.tensor([0]), (12, 16))
    reference_warnings = [w for w in caught if "reference backend" in str(w.message)]
    assert len(reference_warnings) == 1, [str(w.message) for w in caught]
    assert "cpp" in str(reference_warnings[0].message)
    want = puzzle.reconstruction_loss(cam, tiles, labels)
    assert torch.equal(loss, want[0]) and torch.equal(logits, want[1])


def test_auto_never_picks_triton_for_cpu_tensors():
    for op in ("tile", "merge", "prepare_inputs", "reconstruction_loss", "puzzle_losses"):
        assert ops.resolve_backend(op, "auto", torch.device("cpu")) in ("cpp", "reference")


def test_ops_without_ext_implementation_reject_cpp_and_cuda():
    x = torch.randn(1, 2, 4, 4)
    for backend in ("cpp", "cuda"):
        with pytest.raises(RuntimeError, match="tile: backend .* unavailable: tile has no C\\+\\+/CUDA"):
            ops.tile(x, 2, backend=backend)
        with pytest.raises(RuntimeError, match="prepare_inputs has no C\\+\\+/CUDA"):
            ops.prepare_inputs(torch.zeros(1, 4, 4, 3, dtype=torch.uint8), torch.tensor([[4, 4]]), backend=backend)
    with pytest.raises(RuntimeError, match="multiscale_cam has no Triton kernel"):
        ops.multiscale_cam([x[0]], None, torch.tensor([0]), (16, 16), backend="triton")


def test_named_backends_that_cannot_run_raise_clear_errors(monkeypatch):
    cam, tiles, labels = loss_inputs()
    if not ext_available("cpp"):
        with pytest.raises(RuntimeError, match="'cpp' is unavailable: the C\\+\\+ extension puzzlecam._C is not built"):
            ops.reconstruction_loss(cam, tiles, labels, backend="cpp")
    with pytest.raises(RuntimeError, match="the cuda backend runs on CUDA tensors, got cpu"):
        ops.reconstruction_loss(cam, tiles, labels, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="only under the interpreter"):
        ops.reconstruction_loss(cam, tiles, labels, backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_on_cuda_picks_triton():
    assert ops.resolve_backend("reconstruction_loss", "auto", torch.device("cuda")) == "triton"
    assert ops.resolve_backend("prepare_inputs", "auto", torch.device("cuda")) == "triton"
    with pytest.raises(RuntimeError, match="the cpp backend runs on CPU tensors"):
        ops.reconstruction_loss(*loss_inputs("cuda"), backend="cpp")


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]


@pytest.mark.parametrize("device", DEVICES)
def test_puzzle_losses_agree_on_every_available_backend(device):
    cam, tiles, labels = loss_inputs(device, c=4, seed=5)
    want = puzzle.puzzle_losses(cam, tiles, labels, PuzzleSpec(n=2, level="cam", kind="l1", reduction="masking"))
    backends = ops.available_backends("puzzle_losses", device)
    assert "reference" in backends and ((device == "cpu" and not INTERPRETER) or "triton" in backends)
    for backend in backends:
        got = ops.puzzle_losses(
            cam, tiles, labels, PuzzleSpec(n=2, level="cam", kind="l1", reduction="masking"), backend=backend
        )
        for name in ("cls", "pcls", "re"):
            torch.testing.assert_close(
                getattr(got, name),
                getattr(want, name),
                rtol=1e-5,
                atol=1e-7,
                msg=lambda m, b=backend, n=name: f"{b} {n}: {m}",
            )


@pytest.mark.parametrize("device", DEVICES)
def test_multiscale_cam_agrees_on_every_available_backend(device):
    gen = torch.Generator().manual_seed(11)
    size = (37, 50)
    maps = [torch.randn(6, h, w, generator=gen).to(device) for h, w in ((3, 4), (2, 2), (5, 6))]
    flipped = [torch.randn(m.shape, generator=gen).to(device) for m in maps]
    keys = torch.tensor([1, 4])
    want = puzzle.multiscale_cam(maps, flipped, keys, size)
    for backend in ops.available_backends("multiscale_cam", device):
        got = ops.multiscale_cam(maps, flipped, keys, size, backend=backend)
        for name, a, e in zip(("cam", "hr_cam"), got, want, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg=lambda m, b=backend, n=name: f"{b} {n}: {m}")


@pytest.mark.parametrize(
    "option,reduction,dtype",
    [("re_reduction 'selection'", "selection", torch.float32), ("float64 maps", "masking", torch.float64)],
)
def test_reference_only_options_fall_back_with_one_warning(monkeypatch, option, reduction, dtype):
    """A backend without an option (selection, float64) serves it from the reference, saying so once."""
    monkeypatch.setattr(ops, "_warned", set())
    cam, tiles, labels = loss_inputs(dtype=dtype)
    want = puzzle.puzzle_losses(cam, tiles, labels, PuzzleSpec(level="cam", reduction=reduction, with_conf=True))
    backends = [b for b in ops.available_backends("reconstruction_loss", "cpu") if b != "reference"]
    for backend in ["auto", *backends]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                got = ops.puzzle_losses(
                    cam, tiles, labels, PuzzleSpec(level="cam", reduction=reduction, with_conf=True), backend=backend
                )
        for name, a, e in zip(got._fields, got, want, strict=True):
            assert a.dtype == e.dtype and torch.equal(a, e), f"{backend} {name}"
        resolved = ops.resolve_backend("reconstruction_loss", backend, cam.device)
        fallback = [str(w.message) for w in caught if option in str(w.message)]
        if resolved == "reference":
            assert fallback == []
        elif backend == "auto" or resolved == backend:
            # One warning per backend and option over both calls (auto warns under the backend it resolved to).
            assert len(fallback) <= 1 and all(resolved in m for m in fallback)
    warned = {key.split(":", 1)[0] for key in ops._warned if option in key}
    assert warned == set(backends), (warned, backends)


def test_kernel_reductions_agree_with_the_reference_on_every_backend():
    cam, tiles, labels = loss_inputs(seed=5)
    for reduction in ("masking", "none"):
        want = puzzle.reconstruction_loss(
            cam, tiles, labels, PuzzleSpec(level="feature", kind="l2", reduction=reduction)
        )
        for backend in ops.available_backends("reconstruction_loss", "cpu"):
            got = ops.reconstruction_loss(
                cam, tiles, labels, PuzzleSpec(level="feature", kind="l2", reduction=reduction), backend=backend
            )
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=lambda m, b=backend: f"{b}: {m}")

"""Python face of the C++/CUDA extension ``puzzlecam._C`` (ops in the ``torch.ops.puzzlecam`` namespace).

Importing this module never fails: when ``puzzlecam._C`` is not built (or was built against another
torch), :func:`available` is False and :func:`load_error` says why. When it is built, importing it
registers its ops with the dispatcher (CPU kernels, and CUDA kernels when compiled with CUDA):

* ``puzzlecam::reconstruction_loss(cam, cam_tiles, labels, n, level, kind, masking) -> (re, merged_logits)``
* ``puzzlecam::reconstruction_loss_backward(grad_re, grad_logits, cam, cam_tiles, labels, n, level, kind, masking)``
* ``puzzlecam::multiscale_cam(maps, flipped_maps, keys, image_size) -> (cam, hr_cam)``
* ``puzzlecam::random_walk(cams, edge, beta, exp_times, radius) -> walk``
* ``puzzlecam::affinity_sums(edge, seg, radius) -> (sums, counts)``
* ``puzzlecam::affinity_sums_backward(grad_sums, edge, seg, radius) -> grad_edge``

and this module adds their fake (meta) kernels and the autograd formulas of the two losses, so the ops work
under ``torch.compile`` and pass ``torch.library.opcheck``. Semantics: ``puzzlecam.puzzle`` and
``puzzlecam.affinity``; docs/extension.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

try:
    from puzzlecam import _C  # the import registers the ops
except Exception as exc:  # not built, or an ABI mismatch (built against another torch)
    _C = None
    _LOAD_ERROR: Exception | None = exc
else:
    _LOAD_ERROR = None


def available() -> bool:
    """True when the extension is built and its ops are registered."""
    return _C is not None


def cuda_available() -> bool:
    """True when the extension has CUDA kernels and a CUDA device is usable."""
    return available() and bool(getattr(_C, "with_cuda", 0)) and torch.cuda.is_available()


def has_op(name: str) -> bool:
    """True when the built extension registers ``torch.ops.puzzlecam.<name>`` (an older build may not)."""
    return available() and hasattr(torch.ops.puzzlecam, name)


def load_error() -> str | None:
    """Why the extension is unavailable (None when it is available)."""
    return None if _LOAD_ERROR is None else f"{type(_LOAD_ERROR).__name__}: {_LOAD_ERROR}"


def _require() -> None:
    if not available():
        raise RuntimeError(
            "puzzlecam C++ extension (puzzlecam._C) is not built: "
            f"{load_error()}. Build it with `python setup.py build_ext --inplace` "
            "(or `pip install --no-build-isolation -e .`)."
        )


def reconstruction_loss(
    cam: torch.Tensor,
    cam_tiles: torch.Tensor,
    labels: torch.Tensor,
    n: int = 2,
    level: str = "feature",
    kind: str = "l1",
    masking: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(re_loss fp32 scalar, merged_logits fp32 (B, C)), differentiable w.r.t. cam and cam_tiles."""
    _require()
    return torch.ops.puzzlecam.reconstruction_loss(cam, cam_tiles, labels, int(n), level, kind, bool(masking))


def multiscale_cam(
    maps: Sequence[torch.Tensor],
    flipped_maps: Sequence[torch.Tensor] | None,
    keys: torch.Tensor,
    image_size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cam (K, (H-1)//4+1, (W-1)//4+1), hr_cam (K, H, W)), fp32; inference only (no gradient)."""
    _require()
    if len(maps) == 0:
        raise ValueError("multiscale_cam: no scale maps given")
    keys = torch.as_tensor(keys).to(device=maps[0].device, dtype=torch.long)
    height, width = (int(v) for v in image_size)
    return torch.ops.puzzlecam.multiscale_cam(list(maps), list(flipped_maps or []), keys, [height, width])


def random_walk(
    cams: torch.Tensor, edge: torch.Tensor, beta: float = 10, exp_times: int = 8, radius: int = 5
) -> torch.Tensor:
    """``x T^(2^exp_times)`` (K, h, w), fp32 (fp64 for fp64 cams); inference only (no gradient)."""
    _require()
    return torch.ops.puzzlecam.random_walk(cams, edge, float(beta), int(exp_times), int(radius))


def affinity_sums(edge: torch.Tensor, seg: torch.Tensor, radius: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums, counts) (3,) each [bg, fg, neg]: sums fp32 (fp64 for fp64 edge), counts fp32; differentiable
    w.r.t. ``edge`` (the counts are not)."""
    _require()
    return torch.ops.puzzlecam.affinity_sums(edge, seg, int(radius))


# ------------------------------------------------------------------------------------------------
# Fake kernels and autograd (registered once, when the extension loaded)


def _register() -> None:
    lib = torch.library

    @lib.register_fake("puzzlecam::reconstruction_loss")
    def _loss_fake(cam, cam_tiles, labels, n, level, kind, masking):
        b, c = cam.shape[0], cam.shape[1]
        return cam.new_empty((), dtype=torch.float32), cam.new_empty((b, c), dtype=torch.float32)

    @lib.register_fake("puzzlecam::reconstruction_loss_backward")
    def _loss_backward_fake(grad_re, grad_logits, cam, cam_tiles, labels, n, level, kind, masking):
        return torch.empty_like(cam, memory_format=torch.contiguous_format), torch.empty_like(
            cam_tiles, memory_format=torch.contiguous_format
        )

    @lib.register_fake("puzzlecam::multiscale_cam")
    def _multiscale_fake(maps, flipped_maps, keys, image_size):
        height, width = image_size
        k = keys.shape[0]
        cam = maps[0].new_empty((k, (height - 1) // 4 + 1, (width - 1) // 4 + 1), dtype=torch.float32)
        return cam, maps[0].new_empty((k, height, width), dtype=torch.float32)

    @lib.register_fake("puzzlecam::random_walk")
    def _random_walk_fake(cams, edge, beta, exp_times, radius):
        dtype = torch.float64 if cams.dtype == torch.float64 else torch.float32
        return cams.new_empty(cams.shape, dtype=dtype)

    @lib.register_fake("puzzlecam::affinity_sums")
    def _affinity_sums_fake(edge, seg, radius):
        dtype = torch.float64 if edge.dtype == torch.float64 else torch.float32
        return edge.new_empty((3,), dtype=dtype), edge.new_empty((3,), dtype=torch.float32)

    @lib.register_fake("puzzlecam::affinity_sums_backward")
    def _affinity_sums_backward_fake(grad_sums, edge, seg, radius):
        return torch.empty_like(edge, memory_format=torch.contiguous_format)

    def _affinity_setup_context(ctx, inputs, output):
        edge, seg, radius = inputs
        ctx.save_for_backward(edge, seg)
        ctx.radius = radius
        ctx.mark_non_differentiable(output[1])

    def _affinity_backward(ctx, grad_sums, grad_counts):
        edge, seg = ctx.saved_tensors
        if grad_sums is None:
            return None, None, None
        return torch.ops.puzzlecam.affinity_sums_backward(grad_sums, edge, seg, ctx.radius), None, None

    lib.register_autograd("puzzlecam::affinity_sums", _affinity_backward, setup_context=_affinity_setup_context)

    def _setup_context(ctx, inputs, output):
        cam, cam_tiles, labels, n, level, kind, masking = inputs
        ctx.save_for_backward(cam, cam_tiles, labels)
        ctx.args = (n, level, kind, masking)

    def _backward(ctx, grad_re, grad_logits):
        cam, cam_tiles, labels = ctx.saved_tensors
        b, c = cam.shape[0], cam.shape[1]
        if grad_re is None:
            grad_re = cam.new_zeros((), dtype=torch.float32)
        if grad_logits is None:
            grad_logits = cam.new_zeros((b, c), dtype=torch.float32)
        grad_cam, grad_tiles = torch.ops.puzzlecam.reconstruction_loss_backward(
            grad_re, grad_logits, cam, cam_tiles, labels, *ctx.args
        )
        return grad_cam, grad_tiles, None, None, None, None, None

    lib.register_autograd("puzzlecam::reconstruction_loss", _backward, setup_context=_setup_context)


if available():
    _register()

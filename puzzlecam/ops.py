"""Backend dispatch of the puzzle and affinity ops (docs/kernels.md): the only entry point the trainer calls.

Every function takes its :mod:`puzzlecam.puzzle` (or :mod:`puzzlecam.affinity`) reference's arguments (the
loss settings as one :class:`puzzlecam.puzzle.PuzzleSpec`; the other defaults are here, the references and
kernels take every argument) plus ``backend``, and calls one op of
``torch.ops.puzzlecam`` (puzzlecam.library: one signature per op, fake kernels and autograd, so every backend
runs inside ``torch.compile(fullgraph=True)``):

* ``"reference"`` -- the pure-torch oracle (any device);
* ``"triton"`` -- the ops ``puzzlecam::triton_<op>`` of :mod:`puzzlecam.kernels` (CUDA tensors; CPU tensors
  only under the Triton interpreter, ``TRITON_INTERPRET=1``, which is for tests; torch >= 2.6);
* ``"cpp"`` / ``"cuda"`` -- the ops ``puzzlecam::<op>`` of the C++ / CUDA extension ``puzzlecam._C``
  (reconstruction_loss, puzzle_losses, multiscale_cam, affinity_sums and random_walk);
* ``"auto"`` -- Triton for CUDA tensors (the CUDA extension for multiscale_cam and random_walk, which
  have no Triton kernel), the C++ extension for CPU tensors, and the reference where neither is
  available, with one warning. ``auto`` never picks Triton for CPU tensors.

A backend asked for by name that cannot serve the call raises a RuntimeError that says why. An
option that only the reference implements (``reduction="selection"``, float64 maps) makes any
backend fall back to the reference, with one warning per backend and option. The choice depends only on
the op, the backend asked for, the device and those options; torch.compile makes it once per graph.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from puzzlecam import affinity, library, puzzle
from puzzlecam.puzzle import DEFAULT_SPEC, PuzzleLosses, PuzzleSpec

BACKENDS = ("auto", "triton", "cpp", "cuda", "reference")

# Which functions of this module each non-reference backend serves.
TRITON_OPS = frozenset({"tile", "merge", "reconstruction_loss", "puzzle_losses", "prepare_inputs", "affinity_sums"})
EXT_OPS = frozenset({"reconstruction_loss", "puzzle_losses", "multiscale_cam", "affinity_sums", "random_walk"})
# The library op behind each function, where the names differ (a _C built before an op existed lacks it).
_LIBRARY_OP_NAMES = {"puzzle_losses": "reconstruction_loss"}

_warned: set[str] = set()


@functools.cache
def _kernels_or_error():
    """(puzzlecam.kernels, None) or (None, why it cannot be imported)."""
    try:
        import puzzlecam.kernels as kernels
    except Exception as exc:  # triton missing or broken
        return None, f"puzzlecam.kernels cannot be imported ({type(exc).__name__}: {exc})"
    return kernels, None


def _ext_available(kind: str) -> bool:
    return library.available() if kind == "cpp" else library.cuda_available()


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _why_not(op: str, backend: str, device: torch.device) -> str | None:
    """None when ``backend`` can run ``op`` on ``device``, else the reason it cannot."""
    if backend == "reference":
        return None
    if backend == "triton":
        if op not in TRITON_OPS:
            return f"{op} has no Triton kernel (backends: reference, cpp, cuda)"
        if device.type not in ("cpu", "cuda"):
            return f"Triton kernels need CUDA tensors, got {device.type}"
        if device.type == "cpu" and not _interpreter_on():
            return (
                "Triton runs on CPU tensors only under the interpreter "
                "(set TRITON_INTERPRET=1 before triton is imported)"
            )
        kernels, err = _kernels_or_error()
        if err:
            return err
        if device.type == "cpu" and not kernels.INTERPRETED:
            return (
                "puzzlecam.kernels was imported before TRITON_INTERPRET=1 was set, "
                "so its kernels are compiled, not interpreted"
            )
        if device.type == "cuda" and kernels.INTERPRETED:
            return (
                "puzzlecam.kernels was imported with TRITON_INTERPRET=1 (interpreter only); "
                "unset it to run compiled kernels on CUDA"
            )
        return kernels.UNREGISTERED
    if op not in EXT_OPS:
        return f"{op} has no C++/CUDA extension implementation (backends: reference, triton)"
    if backend == "cpp":
        if device.type != "cpu":
            return f"the cpp backend runs on CPU tensors, got {device.type} tensors (use backend='cuda')"
        if not _ext_available("cpp"):
            return (
                "the C++ extension puzzlecam._C is not built "
                "(reinstall with a C++ compiler: pip install --no-build-isolation -e .)"
            )
        return _ext_lacks(op)
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got {device.type} tensors (use backend='cpp')"
        if not _ext_available("cuda"):
            return (
                "the CUDA extension is not built "
                "(reinstall with nvcc and a CUDA torch: pip install --no-build-isolation -e .)"
            )
        return _ext_lacks(op)
    raise AssertionError(backend)


def _ext_lacks(op: str) -> str | None:
    """Why the built extension cannot run ``op`` (it was built before the op existed), or None."""
    name = _LIBRARY_OP_NAMES.get(op, op)
    if library.has_op(name):
        return None
    return (
        f"the built puzzlecam._C has no {name} op (built from older sources: "
        "rebuild with python setup.py build_ext --inplace)"
    )


def resolve_backend(op: str, backend: str, device: torch.device) -> str:
    """The concrete backend that runs ``op`` on ``device`` for the requested ``backend``."""
    return _resolve(op, backend, torch.device(device).type, torch.device(device).index)


@torch.compiler.assume_constant_result
def _resolve(op: str, backend: str, device_type: str, device_index: int | None) -> str:
    # Made once per compiled graph (a constant to torch.compile: no graph break for the checks and warnings).
    device = torch.device(device_type, device_index)
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        why = _why_not(op, backend, device)
        if why:
            raise RuntimeError(f"{op}: backend {backend!r} is unavailable: {why}")
        return backend
    if device.type == "cuda":
        candidates = ("triton", "cuda")
    else:
        candidates = ("cpp",)  # auto never picks Triton for CPU tensors
    served = [c for c in candidates if (op in TRITON_OPS if c == "triton" else op in EXT_OPS)]
    for cand in served:
        if _why_not(op, cand, device) is None:
            return cand
    if served:  # a fast backend exists for this op but cannot run here: say so, once
        reasons = "; ".join(f"{c}: {_why_not(op, c, device)}" for c in served)
        _warn_once(
            f"{device.type}:{','.join(served)}",
            f"puzzlecam.ops: using the pure-torch reference backend on {device.type} ({reasons})",
        )
    return "reference"


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def available_backends(op: str, device: torch.device | str) -> list[str]:
    """The named backends (not 'auto') that can run ``op`` on ``device`` here."""
    device = torch.device(device)
    return [b for b in BACKENDS[1:] if _why_not(op, b, device) is None]


def _torch_op(backend: str, name: str):
    """The library op that ``backend`` runs ``name`` with (importing puzzlecam.kernels registers the Triton ones)."""
    if backend == "triton":
        _kernels_or_error()
        return library.op(library.TRITON_PREFIX + name)
    return library.op(name)


def tile(x: torch.Tensor, n: int = 2, backend: str = "auto") -> torch.Tensor:
    """Split each image into n*n tiles, piece-major; see :func:`puzzlecam.puzzle.tile`."""
    if resolve_backend("tile", backend, x.device) == "triton":
        return _torch_op("triton", "tile")(x, n)
    return puzzle.tile(x, n)


def merge(t: torch.Tensor, n: int = 2, backend: str = "auto") -> torch.Tensor:
    """Inverse of :func:`tile`; see :func:`puzzlecam.puzzle.merge`."""
    if resolve_backend("merge", backend, t.device) == "triton":
        return _torch_op("triton", "merge")(t, n)
    return puzzle.merge(t, n)


@torch.compiler.assume_constant_result
def _loss_backend(backend: str, device_type: str, device_index: int | None, lacking: str | None) -> str:
    chosen = _resolve("reconstruction_loss", backend, device_type, device_index)
    if chosen != "reference" and lacking is not None:
        _warn_once(
            f"{chosen}:{lacking}",
            f"puzzlecam.ops: the {chosen} backend has no {lacking}; reconstruction_loss uses the pure-torch reference",
        )
        return "reference"
    return chosen


def _reference_only_option(reduction: str, *maps: torch.Tensor) -> str | None:
    """The option of a loss call that only the reference implements, or None."""
    if reduction == "selection":
        return "re_reduction 'selection'"
    if any(t.dtype == torch.float64 for t in maps):
        return "float64 maps"
    return None


def reconstruction_loss(
    cam: torch.Tensor,
    cam_tiles: torch.Tensor,
    labels: torch.Tensor,
    spec: PuzzleSpec = DEFAULT_SPEC,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(re_loss scalar, merged_logits (B, C)), fp32 (float64 for float64 maps); see
    :func:`puzzlecam.puzzle.reconstruction_loss`. The kernels implement reductions masking and none."""
    puzzle.check_loss_args(cam, cam_tiles, labels, spec)
    lacking = _reference_only_option(spec.reduction, cam, cam_tiles)
    chosen = _loss_backend(backend, cam.device.type, cam.device.index, lacking)
    if chosen == "reference":
        return puzzle.reconstruction_loss(cam, cam_tiles, labels, spec)
    return _torch_op(chosen, "reconstruction_loss")(cam, cam_tiles, labels, spec.n, spec.level, spec.kind, spec.masking)


def puzzle_losses(
    cam: torch.Tensor,
    cam_tiles: torch.Tensor,
    labels: torch.Tensor,
    spec: PuzzleSpec = DEFAULT_SPEC,
    backend: str = "auto",
) -> PuzzleLosses:
    """The Puzzle-CAM terms (cls, pcls, re, conf); see :func:`puzzlecam.puzzle.puzzle_losses`."""
    re, merged_logits = reconstruction_loss(cam, cam_tiles, labels, spec, backend=backend)
    return puzzle.combine_losses(cam, cam_tiles, labels, re, merged_logits, spec)


def prepare_inputs(
    images: torch.Tensor,
    valid: torch.Tensor,
    n: int = 2,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (B,H,W,3) -> (x (B,3,H,W), tiles); see :func:`puzzlecam.puzzle.prepare_inputs`."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"prepare_inputs: images must be a torch.Tensor, got {type(images).__name__}")
    if resolve_backend("prepare_inputs", backend, images.device) == "triton":
        return _torch_op("triton", "prepare_inputs")(images, valid, n, dtype, channels_last)
    return puzzle.prepare_inputs(images, valid, n, dtype, channels_last)


def multiscale_cam(
    maps: list[torch.Tensor],
    flipped_maps: list[torch.Tensor] | None,
    keys: torch.Tensor,
    image_size: tuple[int, int],
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's fused multi-scale CAMs; see :func:`puzzlecam.puzzle.multiscale_cam`."""
    if len(maps) == 0:
        raise ValueError("multiscale_cam: no scale maps given")
    chosen = resolve_backend("multiscale_cam", backend, maps[0].device)
    if chosen == "reference":
        return puzzle.multiscale_cam(maps, flipped_maps, keys, image_size)
    keys = torch.as_tensor(keys).to(device=maps[0].device, dtype=torch.long)
    height, width = (int(v) for v in image_size)
    return _torch_op(chosen, "multiscale_cam")(list(maps), list(flipped_maps or []), keys, [height, width])


@torch.compiler.assume_constant_result
def _affinity_backend(backend: str, device_type: str, device_index: int | None, float64: bool) -> str:
    chosen = _resolve("affinity_sums", backend, device_type, device_index)
    if chosen == "triton" and float64:
        _warn_once(
            "triton:affinity_sums:float64",
            "puzzlecam.ops: the triton backend has no float64 edge maps; affinity_sums uses the pure-torch reference",
        )
        return "reference"
    return chosen


def affinity_sums(
    edge: torch.Tensor, seg: torch.Tensor, radius: int = affinity.LOSS_RADIUS, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums, counts), each (3,) [bg, fg, neg], of the AffinityNet loss over every pair of ``radius``:
    sums fp32 (fp64 for fp64 edges), counts fp32; differentiable in ``edge``. See
    :func:`puzzlecam.affinity.affinity_sums_reference` and docs/kernels.md. Float64 edge maps are served by
    the C++/CUDA ops or by the reference (Triton has none: one warning)."""
    affinity.check_affinity_args(edge, seg, radius)  # every backend fails the same way
    chosen = _affinity_backend(backend, edge.device.type, edge.device.index, edge.dtype == torch.float64)
    if chosen == "reference":
        return affinity.affinity_sums_reference(edge, seg, radius)
    return _torch_op(chosen, "affinity_sums")(edge, seg, int(radius))


def random_walk(
    cams: torch.Tensor,
    edge: torch.Tensor,
    beta: float = affinity.WALK_BETA,
    exp_times: int = affinity.WALK_EXP_TIMES,
    radius: int = affinity.WALK_RADIUS,
    backend: str = "auto",
) -> torch.Tensor:
    """``x T^(2^exp_times)`` (K, h, w) of the stride-4 ``cams`` (K, h, w) and ``edge`` (h, w) by sparse
    stencil steps; see :func:`puzzlecam.affinity.random_walk_reference` and docs/kernels.md."""
    affinity.check_random_walk_args(cams, edge, beta, exp_times, radius)  # every backend fails the same way
    chosen = resolve_backend("random_walk", backend, cams.device)
    if chosen == "reference":
        return affinity.random_walk_reference(cams, edge, beta, exp_times, radius)
    return _torch_op(chosen, "random_walk")(cams, edge, float(beta), int(exp_times), int(radius))

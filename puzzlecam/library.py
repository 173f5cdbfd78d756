"""The ``torch.ops.puzzlecam`` operator library: every op's one signature, its fake kernel and its autograd.

:data:`SCHEMAS` holds each op's signature, once. Two families of ops share them:

* ``puzzlecam::<op>``: the C++ extension ``puzzlecam._C`` (csrc/; CPU kernels, and CUDA kernels when built
  against a CUDA torch). The extension only implements (``TORCH_LIBRARY_IMPL``); the ops are defined here
  from :data:`SCHEMAS` when this module loads it. :func:`available` / :func:`load_error` say whether it did.
* ``puzzlecam::triton_<op>``: the Triton kernels of :mod:`puzzlecam.kernels` as ``torch.library.triton_op``
  (torch >= 2.6), registered by :func:`register_triton_ops` when that package is imported. ``triton_op`` makes
  the kernels visible to ``torch.compile`` (Inductor calls them from its own generated code, inside CUDA
  graphs too) instead of hiding them behind an opaque Python call.

Both families get their fake (shape) kernels and their autograd formulas here, so every op works under
``torch.compile(fullgraph=True)`` and passes ``torch.library.opcheck``. Python callers go through
:mod:`puzzlecam.ops`, which picks the backend; semantics in :mod:`puzzlecam.puzzle` and
:mod:`puzzlecam.affinity`, kernels in docs/kernels.md and docs/extension.md.
"""

from __future__ import annotations

import functools
import inspect

import torch

NAMESPACE = "puzzlecam"

# op -> its one signature. Ops with a backward have "<op>_backward" beside them.
SCHEMAS = {
    # (re fp32 scalar, merged_logits fp32 (B, C)); puzzlecam.puzzle.reconstruction_loss with reduction
    # "masking" (masking true) or "none".
    "reconstruction_loss": (
        "(Tensor cam, Tensor cam_tiles, Tensor labels, int n, str level, str kind, bool masking) -> (Tensor, Tensor)"
    ),
    # (grad_cam, grad_cam_tiles) in the input dtypes and strides, from the upstream grads of both outputs.
    "reconstruction_loss_backward": (
        "(Tensor grad_re, Tensor grad_logits, Tensor cam, Tensor cam_tiles, Tensor labels, int n, str level, "
        "str kind, bool masking) -> (Tensor, Tensor)"
    ),
    # puzzlecam.puzzle.tile / merge (each the other's backward).
    "tile": "(Tensor x, int n) -> Tensor",
    "merge": "(Tensor tiles, int n) -> Tensor",
    # uint8 (B, H, W, 3) -> (x, tiles); puzzlecam.puzzle.prepare_inputs (no gradient).
    "prepare_inputs": "(Tensor images, Tensor valid, int n, ScalarType dtype, bool channels_last) -> (Tensor, Tensor)",
    # (cam (K, sh, sw), hr_cam (K, H, W)) fp32; puzzlecam.puzzle.multiscale_cam; an empty flipped_maps
    # list means "no flipped pass". Inference only.
    "multiscale_cam": "(Tensor[] maps, Tensor[] flipped_maps, Tensor keys, int[] image_size) -> (Tensor, Tensor)",
    # x T^(2^exp_times) (K, h, w), fp32 (fp64 for fp64 cams); puzzlecam.affinity.random_walk_reference.
    "random_walk": "(Tensor cams, Tensor edge, float beta, int exp_times, int radius) -> Tensor",
    # (sums (3,), counts (3,)) [bg, fg, neg]; puzzlecam.affinity.affinity_sums_reference. sums fp32 (fp64 for
    # fp64 edge), counts fp32 (not differentiable).
    "affinity_sums": "(Tensor edge, Tensor seg, int radius) -> (Tensor, Tensor)",
    # d (grad_sums . sums) / d edge, in edge's dtype and shape.
    "affinity_sums_backward": "(Tensor grad_sums, Tensor edge, Tensor seg, int radius) -> Tensor",
}

# The ops each family implements.
EXT_OPS = (
    "reconstruction_loss",
    "reconstruction_loss_backward",
    "multiscale_cam",
    "random_walk",
    "affinity_sums",
    "affinity_sums_backward",
)
TRITON_OPS = (
    "reconstruction_loss",
    "reconstruction_loss_backward",
    "tile",
    "merge",
    "prepare_inputs",
    "affinity_sums",
    "affinity_sums_backward",
)
TRITON_PREFIX = "triton_"


def qualified(name: str) -> str:
    return f"{NAMESPACE}::{name}"


def op(name: str):
    """``torch.ops.puzzlecam.<name>`` (an OpOverloadPacket)."""
    return getattr(torch.ops.puzzlecam, name)


# ------------------------------------------------------------------------------------------------
# The C++ / CUDA extension

for _name in EXT_OPS:
    torch.library.define(qualified(_name), SCHEMAS[_name])

try:
    from puzzlecam import _C  # the import registers the CPU (and CUDA) kernels
except Exception as exc:  # not built, or an ABI mismatch (built against another torch)
    _C = None
    _LOAD_ERROR: Exception | None = exc
else:
    _LOAD_ERROR = None


def available() -> bool:
    """True when the extension is built and loaded."""
    return _C is not None


def cuda_available() -> bool:
    """True when the extension has CUDA kernels and a CUDA device is usable."""
    return available() and bool(getattr(_C, "with_cuda", 0)) and torch.cuda.is_available()


def has_op(name: str) -> bool:
    """True when the loaded extension implements ``puzzlecam::<name>`` on the CPU (an older build may not)."""
    return available() and torch._C._dispatch_has_kernel_for_dispatch_key(qualified(name), "CPU")


def load_error() -> str | None:
    """Why the extension is unavailable (None when it is available)."""
    return None if _LOAD_ERROR is None else f"{type(_LOAD_ERROR).__name__}: {_LOAD_ERROR}"


# ------------------------------------------------------------------------------------------------
# Fake kernels of the C++ ops (the Triton ops' fakes are their own bodies, run on fake tensors)


@torch.library.register_fake(qualified("reconstruction_loss"))
def _loss_fake(cam, cam_tiles, labels, n, level, kind, masking):
    b, c = cam.shape[0], cam.shape[1]
    return cam.new_empty((), dtype=torch.float32), cam.new_empty((b, c), dtype=torch.float32)


@torch.library.register_fake(qualified("reconstruction_loss_backward"))
def _loss_backward_fake(grad_re, grad_logits, cam, cam_tiles, labels, n, level, kind, masking):
    return torch.empty_like(cam, memory_format=torch.contiguous_format), torch.empty_like(
        cam_tiles, memory_format=torch.contiguous_format
    )


@torch.library.register_fake(qualified("multiscale_cam"))
def _multiscale_fake(maps, flipped_maps, keys, image_size):
    height, width = image_size
    k = keys.shape[0]
    cam = maps[0].new_empty((k, (height - 1) // 4 + 1, (width - 1) // 4 + 1), dtype=torch.float32)
    return cam, maps[0].new_empty((k, height, width), dtype=torch.float32)


@torch.library.register_fake(qualified("random_walk"))
def _random_walk_fake(cams, edge, beta, exp_times, radius):
    dtype = torch.float64 if cams.dtype == torch.float64 else torch.float32
    return cams.new_empty(cams.shape, dtype=dtype)


@torch.library.register_fake(qualified("affinity_sums"))
def _affinity_sums_fake(edge, seg, radius):
    dtype = torch.float64 if edge.dtype == torch.float64 else torch.float32
    return edge.new_empty((3,), dtype=dtype), edge.new_empty((3,), dtype=torch.float32)


@torch.library.register_fake(qualified("affinity_sums_backward"))
def _affinity_sums_backward_fake(grad_sums, edge, seg, radius):
    return torch.empty_like(edge, memory_format=torch.contiguous_format)


# ------------------------------------------------------------------------------------------------
# Autograd: one formula per op, registered for both families


def _register_loss_autograd(prefix: str) -> None:
    backward_op = op(f"{prefix}reconstruction_loss_backward")

    def setup_context(ctx, inputs, output):
        cam, cam_tiles, labels, n, level, kind, masking = inputs
        ctx.save_for_backward(cam, cam_tiles, labels)
        ctx.args = (n, level, kind, masking)

    def backward(ctx, grad_re, grad_logits):
        cam, cam_tiles, labels = ctx.saved_tensors
        if grad_re is None:
            grad_re = cam.new_zeros((), dtype=torch.float32)
        if grad_logits is None:
            grad_logits = cam.new_zeros((cam.shape[0], cam.shape[1]), dtype=torch.float32)
        grad_cam, grad_tiles = backward_op(grad_re, grad_logits, cam, cam_tiles, labels, *ctx.args)
        return grad_cam, grad_tiles, None, None, None, None, None

    torch.library.register_autograd(qualified(f"{prefix}reconstruction_loss"), backward, setup_context=setup_context)


def _register_affinity_autograd(prefix: str) -> None:
    backward_op = op(f"{prefix}affinity_sums_backward")

    def setup_context(ctx, inputs, output):
        edge, seg, radius = inputs
        ctx.save_for_backward(edge, seg)
        ctx.radius = radius
        ctx.mark_non_differentiable(output[1])

    def backward(ctx, grad_sums, grad_counts):
        edge, seg = ctx.saved_tensors
        if grad_sums is None:
            return None, None, None
        return backward_op(grad_sums, edge, seg, ctx.radius), None, None

    torch.library.register_autograd(qualified(f"{prefix}affinity_sums"), backward, setup_context=setup_context)


_register_loss_autograd("")
_register_affinity_autograd("")


# ------------------------------------------------------------------------------------------------
# The Triton ops

# The Python annotation infer_schema maps to each schema type (as parse_schema names them).
_ANNOTATIONS = {
    "Tensor": torch.Tensor,
    "List[Tensor]": list[torch.Tensor],
    "int": int,
    "List[int]": list[int],
    "float": float,
    "str": str,
    "bool": bool,
    "ScalarType": torch.dtype,
}


def signature(name: str) -> inspect.Signature:
    """The Python signature of :data:`SCHEMAS` [name] (what ``torch.library`` infers the same schema from)."""
    schema = torch._C.parse_schema(f"{qualified(name)}{SCHEMAS[name]}")
    params = [
        inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=_ANNOTATIONS[str(a.real_type)])
        for a in schema.arguments
    ]
    returns = [_ANNOTATIONS[str(r.real_type)] for r in schema.returns]
    result = returns[0] if len(returns) == 1 else tuple.__class_getitem__(tuple(returns))
    return inspect.Signature(params, return_annotation=result)


def _normalized(schema: str) -> str:
    return schema.replace("SymInt", "int").replace("ScalarType", "int")


def triton_ops_supported() -> str | None:
    """None when this torch can register Triton kernels as ops (torch.library.triton_op), else why not."""
    if not hasattr(torch.library, "triton_op") or not hasattr(torch.library, "wrap_triton"):
        return f"torch {torch.__version__} has no torch.library.triton_op (torch >= 2.6 does)"
    return None


@functools.cache
def register_triton_ops(implementations: tuple[tuple[str, object], ...]) -> None:
    """Register ``puzzlecam::triton_<op>`` for each (op, implementation) -- a function taking the op's
    arguments in :data:`SCHEMAS` order -- and their autograd. Called once by ``puzzlecam.kernels``."""
    why = triton_ops_supported()
    if why:
        raise RuntimeError(why)
    impls = dict(implementations)
    if set(impls) != set(TRITON_OPS):
        raise AssertionError(f"Triton implementations for {sorted(impls)}, expected {sorted(TRITON_OPS)}")
    for name, impl in impls.items():
        impl.__signature__ = signature(name)  # the one signature: torch.library infers the schema from it
        torch.library.triton_op(qualified(TRITON_PREFIX + name), impl, mutates_args=())
        # torch.library infers SymInt for int (symbolic sizes under torch.compile): the same Python type.
        # Compared as the dispatcher stores them: ints may be SymInt, a ScalarType is an int.
        registered = _normalized(str(op(TRITON_PREFIX + name).default._schema))
        if registered != _normalized(f"{qualified(TRITON_PREFIX + name)}{SCHEMAS[name]}"):
            raise AssertionError(f"{name}: registered as {registered}, SCHEMAS says {SCHEMAS[name]}")
    _register_loss_autograd(TRITON_PREFIX)
    _register_affinity_autograd(TRITON_PREFIX)

    tile_op, merge_op = op(TRITON_PREFIX + "tile"), op(TRITON_PREFIX + "merge")

    def setup_pieces(ctx, inputs, output):
        ctx.n = inputs[1]

    torch.library.register_autograd(
        qualified(TRITON_PREFIX + "tile"), lambda ctx, grad: (merge_op(grad, ctx.n), None), setup_context=setup_pieces
    )
    torch.library.register_autograd(
        qualified(TRITON_PREFIX + "merge"), lambda ctx, grad: (tile_op(grad, ctx.n), None), setup_context=setup_pieces
    )

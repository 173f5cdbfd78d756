"""Reference math of stage 2 in pure torch (docs/affinity.md): the oracle every affinity kernel is tested against.

* ``path_directions(radius)`` / ``direction_paths(radius)``: the neighbour directions of the original's
  ``PathIndex`` (grouped by path length, its order) and the integer points each path crosses.
* ``affinity_sums_reference(edge, seg, radius)``: AffinityNet's loss terms before normalization, built
  exactly as the original does (path indices over the cropped source region, the max of the edge map
  over each path, three pair masks from the label map): (sums, counts), fp32.
* ``affinity_loss(edge, seg, radius)``: the normalized terms; under data parallelism the counts are
  summed over the process group so the ranks together give the one-process loss and gradient.
* ``random_walk_reference(cams, edge, ...)``: the random walk as ``2**exp_times`` sparse steps of a
  69-entry stencil (radius 5); ``random_walk_dense`` is the original's hw x hw definition, for tests
  and benchmarks at small sizes.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.distributed as dist

from puzzlecam.errors import AffinityInputError

# Label values >= 255 (the ignore value) make a pair invalid: 0 background and 1..C classes (VOC 20, COCO 80) are
# valid. The original tests `< 21` for VOC: the same pairs on every label map the pipeline makes (0..C and 255).
IGNORE_LABEL = 255
LOG_EPS = 1e-5
# The original's settings, the defaults of every function here and in puzzlecam.ops: the loss's pair radius,
# the walk's beta, exp_times and radius.
LOSS_RADIUS = 10
WALK_BETA = 10
WALK_EXP_TIMES = 8
WALK_RADIUS = 5
COUNT_EPS = 1e-5


# ---------------------------------------------------------------------------------------------
# Directions and paths


def _check_radius(radius: int) -> None:
    if not isinstance(radius, int) or isinstance(radius, bool) or radius < 2:
        raise AffinityInputError(f"radius must be an int >= 2, got {radius!r}")


@functools.cache
def _directions_and_paths(radius: int) -> tuple[tuple[tuple[int, int], tuple[tuple[int, int], ...]], ...]:
    """((direction, path), ...) in the original's order: stable-grouped by path length, shortest first."""
    _check_radius(radius)
    search = [(0, x) for x in range(1, radius)]
    search += [(y, x) for y in range(1, radius) for x in range(-radius + 1, radius) if x * x + y * y < radius**2]
    by_length: dict[int, list] = {}
    for dy, dx in search:
        length_sq = dy * dy + dx * dx
        points = [
            (y, x)
            for y in range(min(0, dy), max(0, dy) + 1)
            for x in range(min(0, dx), max(0, dx) + 1)
            # squared distance to the line through 0 and (dy, dx) < 1, in integers
            if (dy * x - dx * y) ** 2 < length_sq
        ]
        # Farthest first (the destination leads), stable: the original's order, which decides max's ties.
        points.sort(key=lambda p: -abs(p[0]) - abs(p[1]))
        by_length.setdefault(len(points), []).append(((dy, dx), tuple(points)))
    return tuple(entry for length in sorted(by_length) for entry in by_length[length])


def path_directions(radius: int) -> list[tuple[int, int]]:
    """The (dy, dx) neighbour directions of radius ``radius`` in the original's order (r=10: 152, r=5: 34)."""
    return [d for d, _ in _directions_and_paths(radius)]


def direction_paths(radius: int) -> list[list[tuple[int, int]]]:
    """Per direction, the integer points of its bounding box within distance 1 of its line (destination first)."""
    return [list(p) for _, p in _directions_and_paths(radius)]


def _path_groups(radius: int) -> list[tuple[list[tuple[int, int]], int]]:
    """(directions' paths, path length) per length group, in order."""
    groups: dict[int, list] = {}
    for _, path in _directions_and_paths(radius):
        groups.setdefault(len(path), []).append(path)
    return [(paths, length) for length, paths in groups.items()]


# ---------------------------------------------------------------------------------------------
# The loss


def check_affinity_args(edge: torch.Tensor, seg: torch.Tensor, radius: int) -> None:
    """Shapes and dtypes of :func:`affinity_sums_reference`'s inputs (every backend checks the same)."""
    _check_radius(radius)
    if not isinstance(edge, torch.Tensor) or edge.dim() != 4 or edge.shape[1] != 1 or not edge.is_floating_point():
        shape = tuple(edge.shape) if isinstance(edge, torch.Tensor) else type(edge).__name__
        raise AffinityInputError(f"edge must be a floating (B, 1, H, W) tensor, got {shape}")
    if not isinstance(seg, torch.Tensor) or seg.dim() != 3 or seg.is_floating_point() or seg.dtype == torch.bool:
        shape = tuple(seg.shape) if isinstance(seg, torch.Tensor) else type(seg).__name__
        dtype = f" {seg.dtype}" if isinstance(seg, torch.Tensor) else ""
        raise AffinityInputError(f"seg must be an integer (B, H, W) label map, got {shape}{dtype}")
    b, _, h, w = edge.shape
    if tuple(seg.shape) != (b, h, w):
        raise AffinityInputError(
            f"seg {tuple(seg.shape)} must be (B, H, W) = {(b, h, w)} of edge {tuple(edge.shape)} "
            "(the label map at the edge map's size)"
        )
    floor = radius - 1
    if h < floor + 1 or w < 2 * floor + 1:
        raise AffinityInputError(
            f"edge {tuple(edge.shape)} is too small for radius {radius}: pairs need H >= {floor + 1} and "
            f"W >= {2 * floor + 1}"
        )
    if seg.device != edge.device:
        raise AffinityInputError(f"seg is on {seg.device}, edge on {edge.device}: expected one device")


def pair_masks(seg: torch.Tensor, radius: int = LOSS_RADIUS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bg, fg, neg) bool masks (B, D, N) of the original's pairs: source n of the cropped region, direction d."""
    b, h, w = seg.shape
    src, dst = _pair_indices(h, w, radius, seg.device)
    flat = seg.reshape(b, h * w).long()
    label_from = flat[:, src].unsqueeze(1)  # (B, 1, N)
    label_to = flat[:, dst.reshape(-1)].view(b, *dst.shape)  # (B, D, N)
    valid = (label_from < IGNORE_LABEL) & (label_to < IGNORE_LABEL)
    equal = label_from == label_to
    positive = equal & valid
    return positive & (label_from == 0), positive & (label_from > 0), ~equal & valid


def _sources(h: int, w: int, radius: int, device) -> torch.Tensor:
    """Flat indices (N,) of the original's cropped source region: rows 0..h-r, columns r-1..w-r."""
    floor = radius - 1
    return torch.arange(h * w, device=device).view(h, w)[: h - floor, floor : w - floor].reshape(-1)


def _pair_indices(h: int, w: int, radius: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(source flat indices (N,), destination flat indices (D, N)): source + dy * w + dx (no row wraps)."""
    src = _sources(h, w, radius, device)
    offsets = torch.tensor([dy * w + dx for dy, dx in path_directions(radius)], device=device)
    return src, src + offsets[:, None]


def path_affinities(edge: torch.Tensor, radius: int = LOSS_RADIUS) -> torch.Tensor:
    """(B, D, N) affinities 1 - max of edge over each pair's path, the original's gather + max per length group."""
    b, _, h, w = edge.shape
    src = _sources(h, w, radius, edge.device)
    flat = edge.reshape(b, h * w)
    parts = []
    for paths, length in _path_groups(radius):
        offsets = torch.tensor([[py * w + px for py, px in path] for path in paths], device=edge.device)
        index = src + offsets[:, :, None]  # (D_g, L, N), as the original's path indices
        values = flat[:, index.reshape(-1)].view(b, len(paths), length, src.numel())
        parts.append(1 - values.max(dim=2).values)
    return torch.cat(parts, dim=1)


def affinity_sums_reference(
    edge: torch.Tensor, seg: torch.Tensor, radius: int = LOSS_RADIUS
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums, counts), fp32 (3,) each: [bg, fg, neg] sums of -log(a + 1e-5) / -log(1 + 1e-5 - a) and pair counts.

    ``edge`` (B, 1, H, W): the sigmoid of the edge logits; ``seg`` (B, H, W): labels 0 (background),
    1..C (VOC 20, COCO 80), 255 and above ignored. Differentiable in ``edge``; float64 edges are summed in float64.
    """
    check_affinity_args(edge, seg, radius)
    dtype = torch.float64 if edge.dtype == torch.float64 else torch.float32
    aff = path_affinities(edge.to(dtype), radius)
    bg, fg, neg = (m.to(dtype) for m in pair_masks(seg, radius))
    pos_loss = -torch.log(aff + LOG_EPS)
    neg_loss = -torch.log(1 + LOG_EPS - aff)
    sums = torch.stack([(pos_loss * bg).sum(), (pos_loss * fg).sum(), (neg_loss * neg).sum()])
    counts = torch.stack([bg.sum(), fg.sum(), neg.sum()]).float()
    return sums, counts


class AffinityLosses(NamedTuple):
    total: torch.Tensor
    bg: torch.Tensor
    fg: torch.Tensor
    neg: torch.Tensor


def affinity_loss(
    edge: torch.Tensor,
    seg: torch.Tensor,
    radius: int = LOSS_RADIUS,
    backend: str = "auto",
    group: dist.ProcessGroup | None = None,
) -> AffinityLosses:
    """AffinityNet's loss ((bg + fg) / 2 + neg) / 2, each term normalized by the global batch's pair count:
    :func:`normalized_losses` of ``puzzlecam.ops.affinity_sums``."""
    sums, counts = _ops().affinity_sums(edge, seg, radius, backend)
    return normalized_losses(sums, counts, group)


def normalized_losses(
    sums: torch.Tensor, counts: torch.Tensor, group: dist.ProcessGroup | None = None
) -> AffinityLosses:
    """The losses from this rank's (sums, counts) (3,) each [bg, fg, neg].

    With a process group of world size W > 1, the counts are summed over its ranks (no gradient) and
    each term is ``W * local_sum / (global_count + 1e-5)``: DeepSpeed's gradient averaging then gives
    exactly the one-process gradient, and the mean over ranks of each value is the one-process loss.
    """
    world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
    if world > 1:
        counts = counts.detach().clone()
        dist.all_reduce(counts, group=group)
    bg, fg, neg = (world * sums / (counts.to(sums.dtype) + COUNT_EPS)).unbind()
    return AffinityLosses(((bg + fg) / 2 + neg) / 2, bg, fg, neg)


def _ops():
    from puzzlecam import ops  # ops imports this module for its reference backend

    return ops


# ---------------------------------------------------------------------------------------------
# The random walk


def check_random_walk_args(cams: torch.Tensor, edge: torch.Tensor, beta: float, exp_times: int, radius: int) -> None:
    """Shapes, range and settings of the random walk's inputs (every backend checks the same)."""
    _check_radius(radius)
    if not isinstance(cams, torch.Tensor) or cams.dim() != 3 or not cams.is_floating_point():
        shape = tuple(cams.shape) if isinstance(cams, torch.Tensor) else type(cams).__name__
        raise AffinityInputError(f"cams must be a floating (K, h, w) tensor, got {shape}")
    if not isinstance(edge, torch.Tensor) or edge.dim() != 2 or not edge.is_floating_point():
        shape = tuple(edge.shape) if isinstance(edge, torch.Tensor) else type(edge).__name__
        raise AffinityInputError(f"edge must be a floating (h, w) tensor, got {shape}")
    if tuple(edge.shape) != tuple(cams.shape[1:]):
        raise AffinityInputError(
            f"edge {tuple(edge.shape)} must be the (h, w) of cams {tuple(cams.shape)} (both at stride 4)"
        )
    if edge.device != cams.device:
        raise AffinityInputError(f"edge is on {edge.device}, cams on {cams.device}: expected one device")
    if not isinstance(exp_times, int) or isinstance(exp_times, bool) or not 0 <= exp_times <= 16:
        raise AffinityInputError(f"exp_times must be an int in 0..16 (2**exp_times steps), got {exp_times!r}")
    if not beta > 0:
        raise AffinityInputError(f"beta must be > 0, got {beta!r}")
    if edge.numel():
        low, high = edge.min().item(), edge.max().item()
        if not (0 <= low and high <= 1):  # also catches NaN
            raise AffinityInputError(f"edge {tuple(edge.shape)} must lie in [0, 1], got values in [{low}, {high}]")


def _walk_dtype(cams: torch.Tensor) -> torch.dtype:
    return torch.float64 if cams.dtype == torch.float64 else torch.float32


def stencil_affinities(edge: torch.Tensor, beta: float = WALK_BETA, radius: int = WALK_RADIUS) -> torch.Tensor:
    """(D, h, w): per direction d and pixel p, (1 - max of edge over the path p -> p + d) ** beta; 0 where
    p + d lies outside the image (such neighbours have no affinity)."""
    h, w = edge.shape
    out = edge.new_zeros((len(path_directions(radius)), h, w))
    for k, ((dy, dx), path) in enumerate(_directions_and_paths(radius)):
        rows, cols = h - dy, w - abs(dx)
        if rows <= 0 or cols <= 0:
            continue
        x0 = max(0, -dx)  # first source column whose destination is inside
        peak = torch.stack([edge[py : py + rows, x0 + px : x0 + px + cols] for py, px in path]).amax(dim=0)
        out[k, :rows, x0 : x0 + cols] = (1 - peak) ** beta
    return out


def random_walk_reference(
    cams: torch.Tensor,
    edge: torch.Tensor,
    beta: float = WALK_BETA,
    exp_times: int = WALK_EXP_TIMES,
    radius: int = WALK_RADIUS,
) -> torch.Tensor:
    """(K, h, w): x T^(2**exp_times) with x = cams * (1 - edge), by 2**exp_times sparse stencil steps.

    A (hw x hw, never built) holds 1 on the diagonal and, for each pixel p and direction d with p + d
    inside, A[p, p+d] = A[p+d, p] = affinity ** beta; T = A with each column divided by its sum. One
    step y <- y T reads, for pixel j, itself and its 2 * D neighbours j + d and j - d (69 for radius 5).
    Computed in fp32 (float64 for float64 cams).
    """
    check_random_walk_args(cams, edge, beta, exp_times, radius)
    dtype = _walk_dtype(cams)
    cams, edge = cams.to(dtype), edge.to(dtype)
    h, w = edge.shape
    aff = stencil_affinities(edge, beta, radius)  # (D, h, w), A[p, p+d]
    pad = radius - 1
    padded = torch.nn.functional.pad(aff, (pad, pad, pad, pad))
    # A[j-d, j] for each d: the affinity stored at the source j - d.
    backward = torch.stack(
        [
            padded[k, pad - dy : pad - dy + h, pad - dx : pad - dx + w]
            for k, (dy, dx) in enumerate(path_directions(radius))
        ]
    )
    col_sum = 1 + aff.sum(0) + backward.sum(0)
    offsets = [(0, 0)] + path_directions(radius) + [(-dy, -dx) for dy, dx in path_directions(radius)]
    weights = torch.cat([torch.ones(1, h, w, dtype=dtype, device=edge.device), aff, backward]) / col_sum
    y = cams * (1 - edge)
    padded_y = y.new_zeros(y.shape[0], h + 2 * pad, w + 2 * pad)
    for _ in range(2**exp_times):
        padded_y[:, pad : pad + h, pad : pad + w] = y
        y = torch.zeros_like(y)
        for (oy, ox), weight in zip(offsets, weights, strict=True):
            y.addcmul_(padded_y[:, pad + oy : pad + oy + h, pad + ox : pad + ox + w], weight)
    return y


def random_walk_dense(
    cams: torch.Tensor,
    edge: torch.Tensor,
    beta: float = WALK_BETA,
    exp_times: int = WALK_EXP_TIMES,
    radius: int = WALK_RADIUS,
) -> torch.Tensor:
    """(K, h, w): the original's definition: the hw x hw affinity matrix over an edge map padded with 1,
    cropped to the image, A ** beta, columns normalized, squared ``exp_times`` times, x T.

    O((hw)^2) memory and O((hw)^3) time: for tests and the benchmark's comparison only.
    """
    check_random_walk_args(cams, edge, beta, exp_times, radius)
    dtype = _walk_dtype(cams)
    cams, edge = cams.to(dtype), edge.to(dtype)
    h, w = edge.shape
    # The original pads right/left by radius and the bottom by radius with edge 1, so every pair of the
    # cropped source region has its destination inside the padded frame; pairs leaving the image are cropped.
    padded = torch.nn.functional.pad(edge, (radius, radius, 0, radius), value=1.0)
    ph, pw = padded.shape
    src, dst = _pair_indices(ph, pw, radius, edge.device)
    aff = path_affinities(padded.view(1, 1, ph, pw), radius)[0]  # (D, N)
    n = ph * pw
    dense = torch.zeros(n, n, dtype=dtype, device=edge.device)
    from_index = src.expand_as(dst).reshape(-1)
    dense.index_put_((from_index, dst.reshape(-1)), aff.reshape(-1), accumulate=True)
    dense.index_put_((dst.reshape(-1), from_index), aff.reshape(-1), accumulate=True)
    dense += torch.eye(n, dtype=dtype, device=edge.device)
    dense = dense.view(ph, pw, ph, pw)[:h, radius : radius + w, :h, radius : radius + w].reshape(h * w, h * w)
    scaled = dense**beta
    trans = scaled / scaled.sum(dim=0, keepdim=True)
    for _ in range(exp_times):
        trans = trans @ trans
    x = (cams * (1 - edge)).reshape(cams.shape[0], h * w)
    return (x @ trans).view(cams.shape[0], h, w)

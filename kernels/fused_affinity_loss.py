"""Fused AffinityNet loss sums: pair labels, path maxima, the three loss sums and counts, and the edge gradient.

For every source pixel of the cropped region and every direction of the radius, the pair's label
comes from the label map at the source and at the destination, and its affinity
``a = 1 - max(edge over the path)`` from the edge map: the (B, D, N) affinity and label tensors of
the eager loss are never built. Semantics, kernel layout and the determinism of each pass are in
docs/kernels.md ("Fused affinity loss").

* Forward: one program per (image, block of sources) loops over the directions; per direction it
  gathers the path's edge values as a (sources x path points) tile and takes the row maxima. Each
  program writes its own partial sums and counts; torch adds them in a fixed order (no float
  atomics, so the forward is deterministic).
* Backward: the same loop recomputes each pair's maximum and the element holding it (the gradient
  of a max goes to one element, as max_pool2d's does) and adds the pair's ``d loss / d a``, scaled
  by the upstream gradients, to that element with an fp32 atomic add. Paths of different sources
  share elements, so the scatter needs atomics; on a GPU the order of the adds, hence the last bits
  of the gradient, may vary from run to run.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import check_float, check_size, empty, skip_launch, wrap_triton

OP = "affinity_sums"
# The loss's epsilon inside both logarithms (docs/kernels.md).
LOG_EPS = 1e-5
# Labels below this value are valid (0 background, 1..C classes: VOC 20, COCO 80); 255 and above are ignored.
IGNORE_LABEL = 255
INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
# Sources per program: a (block x padded path length) tile of edge values per direction. The
# interpreter's cost is per program and operation, not per element: larger blocks there.
BLOCK_SOURCES = 64
BLOCK_SOURCES_INTERPRETED = 256


@triton.jit
def _affinity_kernel(
    edge_ptr,
    seg_ptr,
    dest_ptr,
    path_ptr,
    length_ptr,
    partial_ptr,
    gsums_ptr,
    grad_ptr,
    H,
    W,
    num_directions,
    e_sb,
    e_sy,
    e_sx,
    s_sb,
    s_sy,
    s_sx,
    RADIUS_FLOOR: tl.constexpr,
    PATH_BLOCK: tl.constexpr,
    BLOCK: tl.constexpr,
    BACKWARD: tl.constexpr,
    EPS: tl.constexpr,
    IGNORE_LABEL: tl.constexpr,
):
    pid_s = tl.program_id(0)
    b = tl.program_id(1)
    num_blocks = tl.num_programs(0)
    # Sources: rows 0..H-1-RADIUS_FLOOR, columns RADIUS_FLOOR..W-1-RADIUS_FLOOR, so every
    # destination and path point lies inside the image (no bounds checks in the loop).
    crop_w = W - 2 * RADIUS_FLOOR
    num_sources = (H - RADIUS_FLOOR) * crop_w
    s = pid_s * BLOCK + tl.arange(0, BLOCK)
    smask = s < num_sources
    y = s // crop_w
    x = s - y * crop_w + RADIUS_FLOOR
    e_src = b * e_sb + y * e_sy + x * e_sx
    s_src = b * s_sb + y * s_sy + x * s_sx
    # int32 labels: the ignore value 255 does not fit an int8 map's type (there it reads as -1).
    label_src = tl.load(seg_ptr + s_src, mask=smask, other=0).to(tl.int32)
    k = tl.arange(0, PATH_BLOCK)

    if BACKWARD:
        g_bg = tl.load(gsums_ptr).to(tl.float32)
        g_fg = tl.load(gsums_ptr + 1).to(tl.float32)
        g_neg = tl.load(gsums_ptr + 2).to(tl.float32)
        g_src = b * H * W + y * W + x  # the fp32 gradient buffer is contiguous (B, H, W)
    else:
        sum_bg = tl.zeros((BLOCK,), tl.float32)
        sum_fg = tl.zeros((BLOCK,), tl.float32)
        sum_neg = tl.zeros((BLOCK,), tl.float32)
        cnt_bg = tl.zeros((BLOCK,), tl.float32)
        cnt_fg = tl.zeros((BLOCK,), tl.float32)
        cnt_neg = tl.zeros((BLOCK,), tl.float32)

    for d in range(num_directions):
        dy = tl.load(dest_ptr + 2 * d)
        dx = tl.load(dest_ptr + 2 * d + 1)
        label_dst = tl.load(seg_ptr + s_src + dy * s_sy + dx * s_sx, mask=smask, other=0).to(tl.int32)
        valid = smask & (label_src < IGNORE_LABEL) & (label_dst < IGNORE_LABEL)
        same = label_src == label_dst
        is_bg = valid & same & (label_src == 0)
        is_fg = valid & same & (label_src > 0)
        is_neg = valid & (label_src != label_dst)

        # The path's points (padded to PATH_BLOCK; padding masked out of the maximum).
        length = tl.load(length_ptr + d)
        py = tl.load(path_ptr + (2 * d) * PATH_BLOCK + k)
        px = tl.load(path_ptr + (2 * d + 1) * PATH_BLOCK + k)
        kmask = k < length
        values = tl.load(
            edge_ptr + e_src[:, None] + py[None, :] * e_sy + px[None, :] * e_sx,
            mask=smask[:, None] & kmask[None, :],
            other=-float("inf"),
        ).to(tl.float32)
        peak = tl.max(values, axis=1)
        aff = tl.where(smask, 1.0 - peak, 0.5)  # rows past the last source: -inf, kept out of the logs
        # A NaN on the path makes all three sums NaN, as the reference's masked products do: a diverged
        # edge map must not give a finite loss. (Compiled, tl.max ignores NaN; a custom NaN-propagating
        # reduction would run element by element in the interpreter.)
        broken = tl.max((values != values).to(tl.int32), axis=1) > 0
        aff = tl.where(broken, float("nan"), aff)
        if BACKWARD:
            # d(-log(a + eps))/da = -1/(a + eps), d(-log(1 + eps - a))/da = 1/(1 + eps - a), da/d peak = -1.
            coef = tl.where(
                is_bg,
                g_bg / (aff + EPS),
                tl.where(is_fg, g_fg / (aff + EPS), -g_neg / (1.0 + EPS - aff)),
            )
            # One element holding the maximum (the lowest offset among exact ties).
            g_off = g_src[:, None] + py[None, :] * W + px[None, :]
            # (The NaN itself on a broken path, whatever tl.max made of it: the reference's max picks the NaN.)
            held = tl.where(broken[:, None], values != values, values == peak[:, None])
            at_peak = tl.min(tl.where(held, g_off, 2147483647), axis=1)
            tl.atomic_add(grad_ptr + at_peak, coef, mask=is_bg | is_fg | is_neg | broken)
        else:
            pos_loss = -tl.log(aff + EPS)
            sum_bg += tl.where(is_bg | broken, pos_loss, 0.0)
            sum_fg += tl.where(is_fg | broken, pos_loss, 0.0)
            sum_neg += tl.where(is_neg | broken, -tl.log(1.0 + EPS - aff), 0.0)
            cnt_bg += is_bg.to(tl.float32)
            cnt_fg += is_fg.to(tl.float32)
            cnt_neg += is_neg.to(tl.float32)

    if not BACKWARD:
        out = partial_ptr + (b * num_blocks + pid_s) * 6
        tl.store(out + 0, tl.sum(sum_bg, axis=0))
        tl.store(out + 1, tl.sum(sum_fg, axis=0))
        tl.store(out + 2, tl.sum(sum_neg, axis=0))
        tl.store(out + 3, tl.sum(cnt_bg, axis=0))
        tl.store(out + 4, tl.sum(cnt_fg, axis=0))
        tl.store(out + 5, tl.sum(cnt_neg, axis=0))


def _path_tables(radius: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(destinations (D, 2), path points (D, 2, PATH_BLOCK) as dy then dx rows, lengths (D,), PATH_BLOCK) on
    ``like``'s device: cached for real tensors, made afresh (graph constants) while tracing fake ones."""
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(like):
        dest, points, lengths, path_block = _path_tables_cpu(radius)
        return dest.to(like.device), points.to(like.device), lengths.to(like.device), path_block
    return _path_tables_on(radius, like.device)


@functools.lru_cache(maxsize=16)
def _path_tables_on(radius: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    dest, points, lengths, path_block = _path_tables_cpu(radius)
    return dest.to(device), points.to(device), lengths.to(device), path_block


def _path_tables_cpu(radius: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    from puzzlecam.affinity import direction_paths, path_directions

    directions = path_directions(radius)
    paths = direction_paths(radius)
    path_block = triton.next_power_of_2(max((len(p) for p in paths), default=1))
    points = torch.zeros(len(paths), 2, path_block, dtype=torch.int32)
    for d, path in enumerate(paths):
        points[d, :, : len(path)] = torch.tensor(path, dtype=torch.int32).reshape(-1, 2).T
    dest = torch.tensor(directions, dtype=torch.int32).reshape(-1, 2)
    lengths = torch.tensor([len(p) for p in paths], dtype=torch.int32)
    return dest, points, lengths, path_block


def _launch(edge, seg, radius, *, backward, gsums=None):
    b, _, h, w = edge.shape
    dest, points, lengths, path_block = _path_tables(radius, edge)
    radius_floor = radius - 1
    num_sources = (h - radius_floor) * (w - 2 * radius_floor)  # > 0: check_args refuses smaller maps
    block = BLOCK_SOURCES_INTERPRETED if edge.device.type == "cpu" else BLOCK_SOURCES
    num_blocks = triton.cdiv(num_sources, block)
    if backward:
        # Atomic adds accumulate into zeros (fp32 whatever the edge dtype).
        grad = torch.zeros((b, h, w), dtype=torch.float32, device=edge.device)
        partial = grad  # unused placeholder
    else:
        partial = empty((b * num_blocks, 6), torch.float32, edge.device)
        gsums = grad = partial  # unused placeholders
    if b * num_blocks > 0 and not skip_launch(edge):
        wrap_triton(_affinity_kernel)[(num_blocks, b)](
            edge,
            seg,
            dest,
            points,
            lengths,
            partial,
            gsums,
            grad,
            h,
            w,
            len(dest),
            edge.stride(0),
            edge.stride(2),
            edge.stride(3),
            *seg.stride(),
            RADIUS_FLOOR=radius_floor,
            PATH_BLOCK=path_block,
            BLOCK=block,
            BACKWARD=backward,
            EPS=LOG_EPS,
            IGNORE_LABEL=IGNORE_LABEL,
        )
    return grad if backward else partial


def check_args(edge, seg, radius) -> None:
    """The reference's checks (shapes, radius, image large enough, one device), then the kernel's dtypes and sizes."""
    from puzzlecam.affinity import check_affinity_args

    check_affinity_args(edge, seg, radius)
    check_float(OP, "edge", edge)
    if seg.dtype not in INTEGER_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in INTEGER_DTYPES)
        raise TypeError(f"{OP}: seg must be an integer label map ({names}); got {seg.dtype}")
    check_size(OP, "edge", edge)
    check_size(OP, "seg", seg)


def forward(edge, seg, radius):
    """``puzzlecam::triton_affinity_sums`` (registered by puzzlecam.library with its autograd): (sums, counts),
    each float32 (3,) [bg, fg, neg]; semantics of :func:`puzzlecam.affinity.affinity_sums_reference`."""
    check_args(edge, seg, radius)
    partial = _launch(edge, seg, radius, backward=False)
    # float64 over the partials: exact counts beyond 2^24 pairs, and a fixed summation order.
    totals = partial.to(torch.float64).sum(0).to(torch.float32)
    return totals[:3].clone(), totals[3:].clone()


def backward(grad_sums, edge, seg, radius):
    """``puzzlecam::triton_affinity_sums_backward``: d (grad_sums . sums) / d edge, in edge's dtype and shape."""
    grad = _launch(edge, seg, radius, backward=True, gsums=grad_sums.to(torch.float32).contiguous())
    return grad.view(edge.shape).to(edge.dtype)

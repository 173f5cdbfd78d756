"""Fused Puzzle-CAM reconstruction loss: L_re and the merged map's GAP logits, forward and backward.

One program per (b, c) map. It reads the full map ``cam[b, c]`` and the n*n tile regions of
``cam_tiles`` that make up the merged map, directly at their tile addresses: the merged map is
never materialized. Level "cam" needs the per-map maxima of relu(cam) and relu(merged) (and, for
the exact gradient of the max, how many elements tie at it) before the normalized difference can be
formed, so that level makes one more pass over the same map; with maps of at most a few thousand
elements the second pass is served from L1/L2, not from memory.

Registered by puzzlecam.library as ``puzzlecam::triton_reconstruction_loss`` and its ``_backward``.

The forward writes per-program loss partials (summed afterwards in a fixed order by torch: no float
atomics, so the result is deterministic) and the merged logits. The backward recomputes the
differences from cam and cam_tiles and writes both gradients once, already scaled by the upstream
gradients of the loss and of the logits. Recomputing moves fewer bytes than saving the gradients
in the forward: the saved gradients would have to be written in the forward and read back in the
backward (and in fp32, since unscaled fp16 gradients of a mean over millions of elements would
underflow), while recomputation reads cam and cam_tiles once more.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from puzzlecam import puzzle

from ._common import check_float, check_same_device, check_size, empty, empty_like, skip_launch, wrap_triton

MAX_BLOCK = 4096


@triton.jit
def _chunk_offsets(
    k,
    b,
    c,
    B,
    H,
    W,
    TH,
    TW,
    c_sb,
    c_sc,
    c_sy,
    c_sx,
    t_sb,
    t_sc,
    t_sy,
    t_sx,
    N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    # A 2-D block of rows x columns: the tile row / column of each element comes from one integer
    # division per row and one per column, not per element.
    y = k * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    x = tl.arange(0, BLOCK_W)[None, :]
    mask = (y < H) & (x < W)
    i = y // TH
    ty = y - i * TH
    j = x // TW
    tx = x - j * TW
    a_off = b * c_sb + c * c_sc + y * c_sy + x * c_sx
    m_off = ((i * N + j) * B + b) * t_sb + c * t_sc + ty * t_sy + tx * t_sx
    return mask, a_off, m_off


@triton.jit
def _load_chunk(
    cam_ptr,
    tiles_ptr,
    k,
    b,
    c,
    B,
    H,
    W,
    TH,
    TW,
    c_sb,
    c_sc,
    c_sy,
    c_sx,
    t_sb,
    t_sc,
    t_sy,
    t_sx,
    N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """Chunk k of the full map and of the merged map (read at its tile addresses), in fp32."""
    mask, a_off, m_off = _chunk_offsets(
        k, b, c, B, H, W, TH, TW, c_sb, c_sc, c_sy, c_sx, t_sb, t_sc, t_sy, t_sx, N, BLOCK_H, BLOCK_W
    )
    a = tl.load(cam_ptr + a_off, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(tiles_ptr + m_off, mask=mask, other=0.0).to(tl.float32)
    return mask, a_off, m_off, a, m


@triton.jit
def _make_cam(x, denom, eps):
    # Correctly rounded division (div_rn), as torch's. A plain `/` compiles to a multiply by an approximate
    # reciprocal that the compiler may contract with the later subtraction into an FMA: then two equal
    # normalized values differ by a rounding residual and sign(d) of the L1 gradient flips from 0.
    return tl.math.div_rn(tl.maximum(x - eps, 0.0), denom)


@triton.jit
def _diff(a, m, denom_a, denom_m, eps, LEVEL_CAM: tl.constexpr):
    if LEVEL_CAM:
        return _make_cam(a, denom_a, eps) - _make_cam(m, denom_m, eps)
    else:
        return a - m


@triton.jit
def _grad_diff(d, gscale, L2: tl.constexpr):
    """d loss / d diff: sign(d) (zero at 0, as torch.abs's backward) or 2 d, times the scale."""
    if L2:
        return 2.0 * d * gscale
    else:
        return tl.where(d > 0, gscale, tl.where(d < 0, -gscale, 0.0))


@triton.jit
def _sum2d(x):
    return tl.sum(tl.sum(x, axis=1), axis=0)


@triton.jit
def _max2d(x):
    return tl.max(tl.max(x, axis=1), axis=0)


@triton.jit
def _re_loss_kernel(
    cam_ptr,
    tiles_ptr,
    labels_ptr,
    partial_ptr,
    logits_ptr,
    gcam_ptr,
    gtiles_ptr,
    gloss_ptr,
    glogits_ptr,
    B,
    C,
    W,
    TH,
    TW,
    g_sb,
    g_sc,
    c_sb,
    c_sc,
    c_sy,
    c_sx,
    t_sb,
    t_sc,
    t_sy,
    t_sx,
    N: tl.constexpr,
    EPS: tl.constexpr,
    LEVEL_CAM: tl.constexpr,
    L2: tl.constexpr,
    MASKING: tl.constexpr,
    BACKWARD: tl.constexpr,
    HAS_GLOGITS: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    UNIT_X: tl.constexpr,
):
    if UNIT_X:  # a compile-time unit stride along x lets the compiler vectorize the row accesses
        c_sx = 1
        t_sx = 1
    # Gradients share the strides of their inputs (the launcher makes sure), so few arguments:
    # the host-side launch cost matters at the paper's small shape.
    pid = tl.program_id(0)
    b = pid // C
    c = pid - b * C
    H = TH * N
    inv_hw = 1.0 / (H * W * 1.0)  # "* 1.0": sizes equal to 1 are compile-time constants
    inv_numel = inv_hw / (B * C * 1.0)
    eps = EPS
    if MASKING:
        weight = tl.load(labels_ptr + pid)
    else:
        weight = 1.0

    # Pass 1 (level "cam"): per-lane running max of relu(.) and how many elements tie at it; the
    # forward also sums the merged map for its GAP logit here.
    peak_a = 0.0
    peak_m = 0.0
    count_a = 1.0
    count_m = 1.0
    merged_sum = 0.0
    if LEVEL_CAM:
        lane_max_a = tl.full((BLOCK_H, BLOCK_W), -1.0, tl.float32)
        lane_max_m = tl.full((BLOCK_H, BLOCK_W), -1.0, tl.float32)
        lane_cnt_a = tl.zeros((BLOCK_H, BLOCK_W), tl.float32)
        lane_cnt_m = tl.zeros((BLOCK_H, BLOCK_W), tl.float32)
        lane_sum = tl.zeros((BLOCK_H, BLOCK_W), tl.float32)
        for k in tl.static_range(NUM_CHUNKS):
            mask, a_off, m_off, a, m = _load_chunk(
                cam_ptr,
                tiles_ptr,
                k,
                b,
                c,
                B,
                H,
                W,
                TH,
                TW,
                c_sb,
                c_sc,
                c_sy,
                c_sx,
                t_sb,
                t_sc,
                t_sy,
                t_sx,
                N,
                BLOCK_H,
                BLOCK_W,
            )
            ra = tl.where(mask, tl.maximum(a, 0.0), -1.0)
            rm = tl.where(mask, tl.maximum(m, 0.0), -1.0)
            lane_cnt_a = tl.where(ra > lane_max_a, 1.0, tl.where(ra == lane_max_a, lane_cnt_a + 1.0, lane_cnt_a))
            lane_cnt_m = tl.where(rm > lane_max_m, 1.0, tl.where(rm == lane_max_m, lane_cnt_m + 1.0, lane_cnt_m))
            lane_max_a = tl.maximum(lane_max_a, ra)
            lane_max_m = tl.maximum(lane_max_m, rm)
            lane_sum += m
        peak_a = _max2d(lane_max_a)
        peak_m = _max2d(lane_max_m)
        count_a = _sum2d(tl.where(lane_max_a == peak_a, lane_cnt_a, 0.0))
        count_m = _sum2d(tl.where(lane_max_m == peak_m, lane_cnt_m, 0.0))
        merged_sum = _sum2d(lane_sum)
    denom_a = peak_a + eps
    denom_m = peak_m + eps

    if BACKWARD:
        # d L / d diff, without the sign or the factor 2 of the kind.
        gscale = tl.load(gloss_ptr).to(tl.float32) * weight * inv_numel
        if HAS_GLOGITS:
            glogit = tl.load(glogits_ptr + b * g_sb + c * g_sc).to(tl.float32) * inv_hw
        else:
            glogit = 0.0
        # Pass 2 (level "cam"): the max's gradient needs sum_k g_k * relu(x_k - eps) / denom^2.
        max_grad_a = 0.0
        max_grad_m = 0.0
        if LEVEL_CAM:
            lane_sa = tl.zeros((BLOCK_H, BLOCK_W), tl.float32)
            lane_sm = tl.zeros((BLOCK_H, BLOCK_W), tl.float32)
            for k in tl.static_range(NUM_CHUNKS):
                mask, a_off, m_off, a, m = _load_chunk(
                    cam_ptr,
                    tiles_ptr,
                    k,
                    b,
                    c,
                    B,
                    H,
                    W,
                    TH,
                    TW,
                    c_sb,
                    c_sc,
                    c_sy,
                    c_sx,
                    t_sb,
                    t_sc,
                    t_sy,
                    t_sx,
                    N,
                    BLOCK_H,
                    BLOCK_W,
                )
                na = _make_cam(a, denom_a, eps)
                nm = _make_cam(m, denom_m, eps)
                g = tl.where(mask, _grad_diff(na - nm, gscale, L2), 0.0)
                lane_sa += g * na / denom_a
                lane_sm += g * nm / denom_m
            # Spread evenly over the elements that tie at the max (as torch.amax's backward does).
            max_grad_a = -_sum2d(lane_sa) / count_a
            max_grad_m = _sum2d(lane_sm) / count_m
        # Pass 3: write both gradients once.
        for k in tl.static_range(NUM_CHUNKS):
            mask, a_off, m_off, a, m = _load_chunk(
                cam_ptr,
                tiles_ptr,
                k,
                b,
                c,
                B,
                H,
                W,
                TH,
                TW,
                c_sb,
                c_sc,
                c_sy,
                c_sx,
                t_sb,
                t_sc,
                t_sy,
                t_sx,
                N,
                BLOCK_H,
                BLOCK_W,
            )
            g = _grad_diff(_diff(a, m, denom_a, denom_m, eps, LEVEL_CAM), gscale, L2)
            if LEVEL_CAM:
                ga = tl.where(a - eps > 0, g / denom_a, 0.0)
                ga += tl.where((a > 0) & (a == peak_a), max_grad_a, 0.0)
                gm = tl.where(m - eps > 0, -g / denom_m, 0.0)
                gm += tl.where((m > 0) & (m == peak_m), max_grad_m, 0.0)
            else:
                ga = g
                gm = -g
            gm += glogit
            tl.store(gcam_ptr + a_off, ga.to(gcam_ptr.dtype.element_ty), mask=mask)
            tl.store(gtiles_ptr + m_off, gm.to(gtiles_ptr.dtype.element_ty), mask=mask)
    else:
        # Forward: the loss partial of this map (and, for level "feature", the logit sum).
        lane_err = tl.zeros((BLOCK_H, BLOCK_W), tl.float32)
        lane_sum = tl.zeros((BLOCK_H, BLOCK_W), tl.float32)
        for k in tl.static_range(NUM_CHUNKS):
            mask, a_off, m_off, a, m = _load_chunk(
                cam_ptr,
                tiles_ptr,
                k,
                b,
                c,
                B,
                H,
                W,
                TH,
                TW,
                c_sb,
                c_sc,
                c_sy,
                c_sx,
                t_sb,
                t_sc,
                t_sy,
                t_sx,
                N,
                BLOCK_H,
                BLOCK_W,
            )
            d = _diff(a, m, denom_a, denom_m, eps, LEVEL_CAM)
            if not LEVEL_CAM:
                lane_sum += m
            if L2:
                lane_err += d * d
            else:
                lane_err += tl.abs(d)
        if not LEVEL_CAM:
            merged_sum = _sum2d(lane_sum)
        tl.store(partial_ptr + pid, _sum2d(lane_err) * weight * inv_numel)
        tl.store(logits_ptr + pid, merged_sum * inv_hw)


@functools.lru_cache(maxsize=256)
def block_shape(h: int, w: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_W, NUM_CHUNKS): whole rows, at most MAX_BLOCK elements per chunk."""
    block_w = triton.next_power_of_2(w)
    block_h = min(triton.next_power_of_2(h), max(1, MAX_BLOCK // block_w))
    return block_h, block_w, triton.cdiv(h, block_h)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when torch.empty_like keeps its strides (NCHW or channels_last), else a copy."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


def _launch(cam, cam_tiles, labels, n, level, kind, masking, *, backward, gloss=None, glogits=None):
    b, c, h, w = cam.shape
    block_h, block_w, num_chunks = block_shape(h, w)
    block = block_h * block_w
    if backward:
        grad_cam, grad_tiles = empty_like(cam), empty_like(cam_tiles)
        # The kernel writes the gradients at their inputs' offsets (strides of size-1 dims are moot).
        for g, t in ((grad_cam, cam), (grad_tiles, cam_tiles)):
            if any(gs != ts for gs, ts, size in zip(g.stride(), t.stride(), t.shape, strict=True) if size > 1):
                raise RuntimeError(
                    f"reconstruction_loss: gradient strides {g.stride()} differ from the input's {t.stride()}"
                )
        partial = logits = labels  # unused placeholders
        outs = (grad_cam, grad_tiles)
    else:
        partial = empty((b * c,), torch.float32, cam.device)
        logits = empty((b, c), torch.float32, cam.device)
        grad_cam = grad_tiles = gloss = cam  # unused placeholders
        outs = (partial, logits)
    if b * c == 0 or skip_launch(cam):
        return outs
    has_glogits = glogits is not None
    if not has_glogits:
        glogits = labels
    wrap_triton(_re_loss_kernel)[(b * c,)](
        cam,
        cam_tiles,
        labels,
        partial,
        logits,
        grad_cam,
        grad_tiles,
        gloss,
        glogits,
        b,
        c,
        w,
        h // n,
        w // n,
        *glogits.stride(),
        *cam.stride(),
        *cam_tiles.stride(),
        N=n,
        EPS=puzzle.CAM_EPS,
        LEVEL_CAM=level == "cam",
        L2=kind == "l2",
        MASKING=bool(masking),
        BACKWARD=backward,
        HAS_GLOGITS=has_glogits,
        NUM_CHUNKS=num_chunks,
        BLOCK_H=block_h,
        BLOCK_W=block_w,
        UNIT_X=cam.stride(3) == 1 and cam_tiles.stride(3) == 1,
        # Enough warps that a 64x64 map (4096 elements) holds its values in registers without spills.
        num_warps=16 if block >= 4096 else 8 if block >= 2048 else 4,
    )
    return outs


def check_args(cam, cam_tiles, labels, n, level, kind) -> None:
    op = "reconstruction_loss"
    check_float(op, "cam", cam)
    check_float(op, "cam_tiles", cam_tiles)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{op}: labels must be a torch.Tensor, got {type(labels).__name__}")
    puzzle.check_loss_args(cam, cam_tiles, labels, puzzle.PuzzleSpec(n, level, kind))
    if cam_tiles.dtype != cam.dtype:
        raise TypeError(f"{op}: cam ({cam.dtype}) and cam_tiles ({cam_tiles.dtype}) must have one dtype")
    check_same_device(op, cam=cam, cam_tiles=cam_tiles, labels=labels)
    check_size(op, "cam", cam)
    check_size(op, "cam_tiles", cam_tiles)


def forward(cam, cam_tiles, labels, n, level, kind, masking):
    """``puzzlecam::triton_reconstruction_loss``: (re fp32 scalar, merged_logits fp32 (B, C)); the arguments of
    puzzlecam.library.SCHEMAS, semantics of the reference. puzzlecam.library registers it with its autograd."""
    check_args(cam, cam_tiles, labels, n, level, kind)
    cam, cam_tiles = _dense(cam), _dense(cam_tiles)
    weights = labels.detach().to(torch.float32).contiguous()
    partial, logits = _launch(cam, cam_tiles, weights, n, level, kind, masking, backward=False)
    return partial.sum(), logits


def backward(grad_re, grad_logits, cam, cam_tiles, labels, n, level, kind, masking):
    """``puzzlecam::triton_reconstruction_loss_backward``: (grad_cam, grad_cam_tiles) in the inputs' dtypes, from
    the upstream gradients of both outputs (any strides: often expanded scalars)."""
    dense_cam, dense_tiles = _dense(cam), _dense(cam_tiles)
    weights = labels.detach().to(torch.float32).contiguous()
    return _launch(
        dense_cam,
        dense_tiles,
        weights,
        n,
        level,
        kind,
        masking,
        backward=True,
        gloss=grad_re.to(torch.float32),
        glogits=grad_logits.to(torch.float32),
    )

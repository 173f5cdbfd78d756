"""Input preparation in one pass: uint8 NHWC images -> normalized (B,3,H,W) batch and its tiles.

Each program handles one tile-row segment of one image row: it reads the three interleaved uint8
channels once, normalizes in fp32 ((v/255 - mean)/std), zeroes pixels outside the image's valid
region and writes the value both to the batch and to its tile (piece p = i*n + j of image b at
batch index p*B + b), in the compute dtype and in either memory format.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from puzzlecam import puzzle

from ._common import FLOAT_DTYPES, check_size, empty, skip_launch, wrap_triton

MAX_BLOCK = 1024


@triton.jit
def _normalize_store(
    img_ptr, x_ptr, tiles_ptr, img_off, x_off, t_off, mask, keep, mean, std, CH: tl.constexpr, i_sc, x_sc, t_sc
):
    v = tl.load(img_ptr + img_off + CH * i_sc, mask=mask, other=0).to(tl.float32)
    val = (v / 255.0 - mean) / std
    val = tl.where(keep, val, 0.0).to(x_ptr.dtype.element_ty)
    tl.store(x_ptr + x_off + CH * x_sc, val, mask=mask)
    tl.store(tiles_ptr + t_off + CH * t_sc, val, mask=mask)


@triton.jit
def _prepare_inputs_kernel(
    img_ptr,
    valid_ptr,
    x_ptr,
    tiles_ptr,
    B,
    H,
    TH,
    TW,
    i_sb,
    i_sy,
    i_sx,
    i_sc,
    x_sb,
    x_sc,
    x_sy,
    x_sx,
    t_sb,
    t_sc,
    t_sy,
    t_sx,
    mean0,
    mean1,
    mean2,
    std0,
    std1,
    std2,
    N: tl.constexpr,
    BLOCK: tl.constexpr,
    PACKED_IMAGES: tl.constexpr,
    UNIT_X: tl.constexpr,
):
    # Compile-time strides for the usual layouts let the compiler vectorize.
    if PACKED_IMAGES:  # (.., W, 3) with the pixels of a row packed
        i_sx = 3
        i_sc = 1
    if UNIT_X:  # NCHW outputs
        x_sx = 1
        t_sx = 1
    row = tl.program_id(0)  # b * H + y
    j = tl.program_id(1)  # tile column
    b = row // H
    y = row - b * H
    i = y // TH
    ty = y - i * TH
    tx = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    mask = tx < TW
    x = j * TW + tx
    valid_h = tl.load(valid_ptr + 2 * b)
    valid_w = tl.load(valid_ptr + 2 * b + 1)
    keep = (x < valid_w) & (y < valid_h)
    img_off = b * i_sb + y * i_sy + x * i_sx
    x_off = b * x_sb + y * x_sy + x * x_sx
    t_off = ((i * N + j) * B + b) * t_sb + ty * t_sy + tx * t_sx
    _normalize_store(img_ptr, x_ptr, tiles_ptr, img_off, x_off, t_off, mask, keep, mean0, std0, 0, i_sc, x_sc, t_sc)
    _normalize_store(img_ptr, x_ptr, tiles_ptr, img_off, x_off, t_off, mask, keep, mean1, std1, 1, i_sc, x_sc, t_sc)
    _normalize_store(img_ptr, x_ptr, tiles_ptr, img_off, x_off, t_off, mask, keep, mean2, std2, 2, i_sc, x_sc, t_sc)


def prepare_inputs(images, valid, n, dtype, channels_last):
    """``puzzlecam::triton_prepare_inputs`` (registered by puzzlecam.library; no autograd): the arguments of
    puzzlecam.library.SCHEMAS, semantics of :func:`puzzlecam.puzzle.prepare_inputs`."""
    puzzle.check_prepare_args(images, valid, n)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"prepare_inputs: dtype must be one of float32, float16, bfloat16; got {dtype}")
    check_size("prepare_inputs", "images", images)
    b, h, w, _ = images.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = empty((b, 3, h, w), dtype, images.device, fmt)
    tiles = empty((n * n * b, 3, h // n, w // n), dtype, images.device, fmt)
    if images.numel() == 0 or skip_launch(images):
        return x, tiles
    valid = valid.to(device=images.device, dtype=torch.int32).contiguous()
    th, tw = h // n, w // n
    block = min(triton.next_power_of_2(tw), MAX_BLOCK)
    s_b, s_y, s_x, s_c = images.stride()
    grid = (b * h, n, triton.cdiv(tw, block))
    wrap_triton(_prepare_inputs_kernel)[grid](
        images,
        valid,
        x,
        tiles,
        b,
        h,
        th,
        tw,
        s_b,
        s_y,
        s_x,
        s_c,
        *x.stride(),
        *tiles.stride(),
        *puzzle.IMAGENET_MEAN,
        *puzzle.IMAGENET_STD,
        N=n,
        BLOCK=block,
        PACKED_IMAGES=(s_x, s_c) == (3, 1),
        UNIT_X=x.stride(3) == 1 and tiles.stride(3) == 1,
        num_warps=max(1, min(8, block // 128)),
    )
    return x, tiles

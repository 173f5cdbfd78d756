"""Puzzle tile / merge of feature maps as one Triton permutation-copy kernel.

``tile(x, n)``: (B, C, H, W) -> (n*n*B, C, H/n, W/n), piece p = i*n + j of image b at batch index
p*B + b; ``merge`` is its exact inverse. Each is the other's backward. Any strides are accepted
(channels_last included); the output keeps the input's memory format. Float and integer element
types are moved as they are. Registered as the ops ``puzzlecam::triton_tile`` / ``triton_merge`` (with
their autograd) by puzzlecam.library.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from puzzlecam import puzzle

from ._common import COPY_DTYPES, check_float, check_size, empty, memory_format_of, skip_launch, wrap_triton

MAX_BLOCK = 4096


@triton.jit
def _tile_copy_kernel(
    full_ptr,
    tiles_ptr,
    ROWS,
    INNER,
    B,
    C,
    H,
    W,
    TH,
    TW,
    f_sb,
    f_sc,
    f_sy,
    f_sx,
    t_sb,
    t_sc,
    t_sy,
    t_sx,
    N: tl.constexpr,
    TO_TILES: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_I: tl.constexpr,
    UNIT_INNER: tl.constexpr,
):
    if UNIT_INNER:  # a compile-time unit stride along the columns lets the compiler vectorize
        if CHANNELS_LAST:
            f_sc = 1
            t_sc = 1
        else:
            f_sx = 1
            t_sx = 1
    # A 2-D block: columns run along the innermost dimension of the memory order (x for NCHW, c
    # for channels_last), rows over the other three; index math is per row and per column.
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    k = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)[None, :]
    mask = (r < ROWS) & (k < INNER)
    if CHANNELS_LAST:  # rows (b, y, x), columns c
        c = k
        x = r % W
        q = r // W
        y = q % H
        b = q // H
    else:  # rows (b, c, y), columns x
        x = k
        y = r % H
        q = r // H
        c = q % C
        b = q // C
    i = y // TH
    ty = y - i * TH
    j = x // TW
    tx = x - j * TW
    f_off = b * f_sb + c * f_sc + y * f_sy + x * f_sx
    t_off = ((i * N + j) * B + b) * t_sb + c * t_sc + ty * t_sy + tx * t_sx
    if TO_TILES:
        v = tl.load(full_ptr + f_off, mask=mask)
        tl.store(tiles_ptr + t_off, v, mask=mask)
    else:
        v = tl.load(tiles_ptr + t_off, mask=mask)
        tl.store(full_ptr + f_off, v, mask=mask)


def _launch(full: torch.Tensor, tiles: torch.Tensor, n: int, to_tiles: bool) -> None:
    b, c, h, w = full.shape
    if full.numel() == 0 or skip_launch(full):
        return
    # Walk in the destination's memory order so that stores coalesce.
    channels_last = memory_format_of(tiles if to_tiles else full) == torch.channels_last
    rows, inner = (b * h * w, c) if channels_last else (b * c * h, w)
    inner_dim = 1 if channels_last else 3
    unit_inner = full.stride(inner_dim) == 1 and tiles.stride(inner_dim) == 1
    block_i = min(triton.next_power_of_2(inner), MAX_BLOCK)
    block_r = max(1, MAX_BLOCK // block_i)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(inner, block_i))
    wrap_triton(_tile_copy_kernel)[grid](
        full,
        tiles,
        rows,
        inner,
        b,
        c,
        h,
        w,
        h // n,
        w // n,
        *full.stride(),
        *tiles.stride(),
        N=n,
        TO_TILES=to_tiles,
        CHANNELS_LAST=channels_last,
        BLOCK_R=block_r,
        BLOCK_I=block_i,
        UNIT_INNER=unit_inner,
        num_warps=8,
    )


def tile_forward(x: torch.Tensor, n: int) -> torch.Tensor:
    """``puzzlecam::triton_tile`` (puzzlecam.library registers it with merge_forward as its backward)."""
    puzzle._check_pieces(n)
    puzzle._check_4d("x", x)
    check_float("tile", "x", x, COPY_DTYPES)
    check_size("tile", "x", x)
    b, c, h, w = x.shape
    if h % n or w % n:
        raise ValueError(f"tile: H and W must be divisible by n={n}, got x of shape {tuple(x.shape)} (H={h}, W={w})")
    out = empty((n * n * b, c, h // n, w // n), x.dtype, x.device, memory_format_of(x))
    _launch(x, out, n, to_tiles=True)
    return out


def merge_forward(tiles: torch.Tensor, n: int) -> torch.Tensor:
    """``puzzlecam::triton_merge`` (its backward is tile_forward)."""
    puzzle._check_pieces(n)
    puzzle._check_4d("tiles", tiles)
    check_float("merge", "tiles", tiles, COPY_DTYPES)
    check_size("merge", "tiles", tiles)
    nb, c, th, tw = tiles.shape
    if nb % (n * n):
        raise ValueError(
            f"merge: the tile batch {nb} (tiles of shape {tuple(tiles.shape)}) is not a multiple of n*n={n * n}"
        )
    out = empty((nb // (n * n), c, th * n, tw * n), tiles.dtype, tiles.device, memory_format_of(tiles))
    _launch(out, tiles, n, to_tiles=False)
    return out

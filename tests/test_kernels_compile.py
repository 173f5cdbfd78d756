"""Compile every Triton kernel for a Hopper GPU (sm_90) on a machine without one.

The interpreter runs the kernels' semantics on CPU, but not Triton's compiler: type errors that
only the compiler sees (constexpr arithmetic, dtype promotion, layouts) would otherwise surface
only on a GPU. This test compiles representative variants of each kernel down to a cubin with
triton's own toolchain, in a subprocess without TRITON_INTERPRET (the kernels must be defined as
compiled functions), and fails on any compile error.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest


def _astsource_supports_constexprs() -> bool:
    try:
        from triton.compiler import ASTSource
    except ImportError:
        return False
    return "constexprs" in inspect.signature(ASTSource.__init__).parameters


@pytest.mark.skipif(not _astsource_supports_constexprs(), reason="this triton's ASTSource API predates constexprs=")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"compiling the kernels for sm_90 failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert proc.stdout.count("compiled ") >= 17, proc.stdout


def _signature(kernel, pointer_types: dict, consts: dict) -> dict:
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointer_types.get(name, pointer_types["default"])
        elif name.startswith(("mean", "std")):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def main() -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import puzzlecam.kernels as kernels
    from puzzlecam.kernels import fused_prepare_inputs, fused_reconstruction_loss, tile_merge

    assert not kernels.INTERPRETED
    target = GPUTarget("cuda", 90, 32)
    failures = 0

    def build(kernel, pointers, consts, num_warps, what):
        nonlocal failures
        src = ASTSource(fn=kernel, signature=_signature(kernel, pointers, consts), constexprs=consts)
        try:
            compiled = triton.compile(src, target=target, options={"num_warps": num_warps})
        except Exception as exc:  # report every failing variant, then fail
            failures += 1
            print(f"FAILED {what}: {type(exc).__name__}: {exc}")
            return
        print(f"compiled {what}: {len(compiled.asm.get('cubin', b''))} bytes of cubin")

    loss = fused_reconstruction_loss._re_loss_kernel
    for dtype, level_cam, backward, block, chunks in (
        ("fp32", False, False, 1024, 1),
        ("fp32", False, True, 1024, 1),
        ("fp32", True, False, 1024, 1),
        ("fp32", True, True, 1024, 1),
        ("bf16", True, True, 4096, 1),
        ("bf16", False, True, 4096, 1),
        ("fp16", True, False, 4096, 2),
        ("fp16", True, True, 256, 1),
    ):
        block_h = block // 64
        consts = {
            "N": 2,
            "EPS": 1e-5,
            "LEVEL_CAM": level_cam,
            "L2": backward,
            "MASKING": True,
            "BACKWARD": backward,
            "HAS_GLOGITS": backward,
            "NUM_CHUNKS": chunks,
            "BLOCK_H": block_h,
            "BLOCK_W": 64,
            "UNIT_X": chunks == 1,
        }
        pointers = {
            "default": "*fp32",
            **dict.fromkeys(("cam_ptr", "tiles_ptr", "gcam_ptr", "gtiles_ptr"), "*" + dtype),
        }
        warps = 16 if block >= 4096 else 8 if block >= 2048 else 4
        build(
            loss,
            pointers,
            consts,
            warps,
            f"reconstruction loss {dtype} cam={level_cam} backward={backward} block={block}x{chunks}",
        )
    # The JIT turns integer arguments equal to 1 into compile-time constants: size-1 maps, batches,
    # channels and unit strides take a different path through the compiler.
    ones = {"B": 1, "C": 1, "TH": 1, "TW": 1, "c_sx": 1, "t_sx": 1, "g_sc": 1}
    for level_cam, backward in ((True, False), (True, True), (False, True)):
        consts = {
            "N": 3,
            "EPS": 1e-5,
            "LEVEL_CAM": level_cam,
            "L2": False,
            "MASKING": False,
            "BACKWARD": backward,
            "HAS_GLOGITS": backward,
            "NUM_CHUNKS": 1,
            "BLOCK_H": 4,
            "BLOCK_W": 4,
            "UNIT_X": False,
            **ones,
        }
        build(
            loss,
            {"default": "*fp32"},
            consts,
            4,
            f"reconstruction loss 3x3 maps, B=C=1 cam={level_cam} backward={backward}",
        )
    build(
        tile_merge._tile_copy_kernel,
        {"default": "*fp32"},
        {
            "N": 2,
            "TO_TILES": True,
            "CHANNELS_LAST": False,
            "BLOCK_R": 64,
            "BLOCK_I": 2,
            "UNIT_INNER": False,
            "B": 1,
            "C": 1,
            "TH": 1,
            "TW": 1,
            "f_sx": 1,
            "t_sx": 1,
        },
        4,
        "tile copy 2x2 maps, B=C=1",
    )
    build(
        fused_prepare_inputs._prepare_inputs_kernel,
        {"default": "*fp16", "img_ptr": "*u8", "valid_ptr": "*i32"},
        {"N": 1, "BLOCK": 1, "PACKED_IMAGES": False, "UNIT_X": False, "B": 1, "TH": 1, "TW": 1, "x_sx": 1, "t_sx": 1},
        1,
        "prepare_inputs 1x1 image",
    )
    for channels_last, to_tiles in ((False, True), (True, False)):
        build(
            tile_merge._tile_copy_kernel,
            {"default": "*bf16"},
            {
                "N": 3,
                "TO_TILES": to_tiles,
                "CHANNELS_LAST": channels_last,
                "BLOCK_R": 128,
                "BLOCK_I": 32,
                "UNIT_INNER": True,
            },
            8,
            f"tile copy channels_last={channels_last} to_tiles={to_tiles}",
        )
    for dtype in ("fp32", "bf16"):
        build(
            fused_prepare_inputs._prepare_inputs_kernel,
            {"default": "*" + dtype, "img_ptr": "*u8", "valid_ptr": "*i32"},
            {"N": 2, "BLOCK": 256, "PACKED_IMAGES": True, "UNIT_X": dtype == "fp32"},
            2,
            f"prepare_inputs {dtype}",
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""The C++/CUDA extension (puzzlecam._C) against the pure-torch reference (puzzlecam.puzzle).

Every op runs on fresh random inputs and is compared with the reference: outputs and every gradient,
several shapes and dtypes, on CPU and (when available) CUDA. Plus torch.library.opcheck, the C++
argument checks, and an nvcc compile of every CUDA kernel file (toolkit headers only).
"""

import glob
import os
import shutil
import subprocess
import sys
import zlib

import pytest
import torch

from puzzlecam import library, puzzle
from puzzlecam.puzzle import PuzzleSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_ext = pytest.mark.skipif(not library.available(), reason=f"puzzlecam._C is not built ({library.load_error()})")

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(
                torch.cuda.is_available() and not library.cuda_available(),
                reason="puzzlecam._C was built without CUDA kernels (rebuild with FORCE_CUDA=1)",
            ),
        ],
    ),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative tolerance per input dtype: outputs are fp32 in both, gradients are rounded to the input dtype.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close(actual, expected, dtype, what):
    tol = TOL[dtype]
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * max(scale, 1e-12), msg=lambda m: f"{what}: {m}")


def test_extension_is_built_where_a_compiler_exists():
    # `make install` builds it; a silently failed build would otherwise skip every test below.
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler on this machine: the reference backend serves")
    assert library.available(), f"puzzlecam._C failed to load: {library.load_error()}"


def test_import_without_the_extension():
    # `import puzzlecam.library` must work when puzzlecam._C is missing (a None entry blocks the import), and
    # puzzlecam.ops then says why the cpp backend cannot serve.
    code = (
        "import sys; sys.modules['puzzlecam._C'] = None\n"
        "import torch\n"
        "import puzzlecam.library as e, puzzlecam.ops as ops\n"
        "assert not e.available() and not e.cuda_available(), 'available without _C'\n"
        "assert 'puzzlecam._C' in e.load_error(), e.load_error()\n"
        "try:\n"
        "    ops.multiscale_cam([torch.zeros(2, 1, 1)], None, torch.tensor([0]), (1, 1), backend='cpp')\n"
        "except RuntimeError as exc:\n"
        "    assert 'not built' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('no error without the extension')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ------------------------------------------------------------------------------------------------
# Reconstruction loss


def loss_inputs(b, c, h, w, n, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    cam = torch.randn(b, c, h, w, generator=gen).to(device=device, dtype=dtype)
    tiles = torch.randn(n * n * b, c, h // n, w // n, generator=gen).to(device=device, dtype=dtype)
    labels = (torch.rand(b, c, generator=gen) > 0.5).float().to(device)
    grad_re = torch.randn((), generator=gen).to(device) * (b * c * h * w)  # O(1) gradients
    grad_logits = torch.randn(b, c, generator=gen).to(device)
    return cam, tiles, labels, grad_re, grad_logits


def ext_loss(cam, tiles, labels, n=2, level="feature", kind="l1", masking=True):
    return torch.ops.puzzlecam.reconstruction_loss(cam, tiles, labels, n, level, kind, masking)


def reference_loss(cam, tiles, labels, **spec):
    return puzzle.reconstruction_loss(cam, tiles, labels, PuzzleSpec(**spec))


def ext_multiscale_cam(maps, flipped, keys, image_size):
    keys = keys.to(maps[0].device)
    return torch.ops.puzzlecam.multiscale_cam(list(maps), list(flipped or []), keys, list(image_size))


def run_loss(fn, cam, tiles, labels, grad_re, grad_logits, **kw):
    cam = cam.detach().requires_grad_(True)
    tiles = tiles.detach().requires_grad_(True)
    re, logits = fn(cam, tiles, labels, **kw)
    grad_cam, grad_tiles = torch.autograd.grad((re * grad_re).sum() + (logits * grad_logits).sum(), [cam, tiles])
    return re, logits, grad_cam, grad_tiles


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 8, 8, 2), (3, 4, 12, 18, 3), (2, 20, 32, 32, 2), (1, 2, 5, 7, 1)])
@pytest.mark.parametrize("level,kind", [("feature", "l1"), ("feature", "l2"), ("cam", "l1"), ("cam", "l2")])
@pytest.mark.parametrize("masking", [True, False])
def test_reconstruction_loss_matches_reference(device, dtype, shape, level, kind, masking):
    b, c, h, w, n = shape
    inputs = loss_inputs(b, c, h, w, n, dtype, device, seed=zlib.crc32(repr((shape, level, kind, masking)).encode()))
    kw = dict(n=n, level=level, kind=kind)
    got = run_loss(ext_loss, *inputs, masking=masking, **kw)
    want = run_loss(reference_loss, *inputs, reduction="masking" if masking else "none", **kw)
    assert got[0].dtype == got[1].dtype == torch.float32
    assert got[2].dtype == got[3].dtype == dtype
    for name, g, r in zip(["re", "merged_logits", "grad cam", "grad cam_tiles"], got, want, strict=True):
        assert g.shape == r.shape, name
        assert_close(g, r, dtype if name.startswith("grad") else torch.float32, name)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("level", ["feature", "cam"])
def test_reconstruction_loss_of_matching_maps(device, level):
    # cam_tiles = tile(cam): zero loss, and only the logits carry gradient (|0|' = 0 as in torch).
    cam, _, labels, grad_re, grad_logits = loss_inputs(2, 3, 8, 12, 2, torch.float32, device, seed=1)
    cam[0, 0] = -1.0  # a plane with no positive value (make_cam peak 0)
    cam[1, 1, 2:4, 3] = 5.0  # tied maxima
    tiles = puzzle.tile(cam, 2)
    got = run_loss(ext_loss, cam, tiles, labels, grad_re, grad_logits, level=level)
    want = run_loss(reference_loss, cam, tiles, labels, grad_re, grad_logits, level=level)
    assert got[0].item() == 0.0
    assert got[2].abs().max().item() == 0.0
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-7)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_reconstruction_loss_tied_peaks_and_layouts(device):
    # Tied maxima get equal shares of the peak's gradient; channels-last and int labels are accepted.
    cam, tiles, labels, grad_re, grad_logits = loss_inputs(2, 3, 8, 8, 2, torch.float32, device, seed=2)
    cam[:, :, 1, 1] = cam[:, :, 6, 5] = 9.0
    tiles[:, :, 0, 0] = tiles[:, :, 3, 2] = 7.0
    cam = cam.to(memory_format=torch.channels_last)
    labels = labels.to(torch.int64)
    for level in ("feature", "cam"):
        got = run_loss(ext_loss, cam, tiles, labels, grad_re, grad_logits, level=level)
        want = run_loss(reference_loss, cam, tiles, labels, grad_re, grad_logits, level=level)
        for g, r in zip(got, want, strict=True):
            torch.testing.assert_close(g, r, rtol=2e-5, atol=2e-6)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_reconstruction_loss_one_output_used(device):
    cam, tiles, labels, _, _ = loss_inputs(2, 3, 8, 8, 2, torch.float32, device, seed=3)
    for pick in (0, 1):
        grads = []
        for fn, reduction in ((ext_loss, True), (reference_loss, "masking")):
            c, t = cam.clone().requires_grad_(True), tiles.clone().requires_grad_(True)
            fn(c, t, labels, n=2, level="cam", kind="l1", **{"masking" if fn is ext_loss else "reduction": reduction})[
                pick
            ].sum().backward()
            # the reference leaves cam.grad None when only merged_logits is used: that is a zero gradient
            grads.append(tuple(torch.zeros_like(x) if x.grad is None else x.grad for x in (c, t)))
        for g, r in zip(*grads, strict=True):
            torch.testing.assert_close(g, r, rtol=2e-5, atol=1e-7)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("level,kind,dtype", [("feature", "l1", torch.float32), ("cam", "l2", torch.float16)])
def test_reconstruction_loss_opcheck(device, level, kind, dtype):
    cam, tiles, labels, grad_re, grad_logits = loss_inputs(2, 3, 4, 6, 2, dtype, device, seed=4)
    args = (cam.requires_grad_(True), tiles.requires_grad_(True), labels, 2, level, kind, True)
    torch.library.opcheck(torch.ops.puzzlecam.reconstruction_loss.default, args)
    backward_args = (grad_re, grad_logits, cam.detach(), tiles.detach(), labels, 2, level, kind, False)
    torch.library.opcheck(torch.ops.puzzlecam.reconstruction_loss_backward.default, backward_args)


# ------------------------------------------------------------------------------------------------
# Multi-scale CAM fusion


def fusion_inputs(height, width, c, scales, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    maps, flipped = [], []
    for s in scales:
        size = (c, max(1, round(height * s / 16)), max(1, round(width * s / 16)))
        maps.append(torch.randn(size, generator=gen).to(device=device, dtype=dtype))
        flipped.append(torch.randn(size, generator=gen).to(device=device, dtype=dtype))
    return maps, flipped


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("image_size", [(375, 500), (33, 17), (1, 1), (64, 48)])
@pytest.mark.parametrize("with_flip", [True, False])
def test_multiscale_cam_matches_reference(device, dtype, image_size, with_flip):
    maps, flipped = fusion_inputs(*image_size, 20, (1.0, 0.5, 1.5, 2.0), dtype, device, seed=sum(image_size))
    flipped = flipped if with_flip else None
    keys = torch.tensor([14, 2, 14])  # unsorted, repeated
    got = ext_multiscale_cam(maps, flipped, keys, image_size)
    want = puzzle.multiscale_cam(maps, flipped, keys, image_size)
    for name, g, r in zip(["cam", "hr_cam"], got, want, strict=True):
        assert g.dtype == torch.float32 and g.shape == r.shape, name
        torch.testing.assert_close(g, r, rtol=1e-5, atol=2e-6, msg=lambda m, name=name: f"{name}: {m}")


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_multiscale_cam_many_scales_and_no_keys(device):
    # More scales than one CUDA launch takes (8), non-contiguous maps, and an image with no labelled class.
    maps, flipped = fusion_inputs(40, 56, 5, [0.5 + 0.25 * i for i in range(10)], torch.float32, device, seed=7)
    maps = [m.transpose(1, 2).contiguous().transpose(1, 2) for m in maps]
    keys = torch.tensor([4, 0, 1])
    for got, want in zip(
        ext_multiscale_cam(maps, flipped, keys, (40, 56)),
        puzzle.multiscale_cam(maps, flipped, keys, (40, 56)),
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    cam, hr = ext_multiscale_cam(maps, flipped, torch.tensor([], dtype=torch.long), (40, 56))
    assert cam.shape == (0, 10, 14) and hr.shape == (0, 40, 56)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_multiscale_cam_opcheck(device):
    maps, flipped = fusion_inputs(48, 40, 4, (1.0, 0.5), torch.float32, device, seed=8)
    keys = torch.tensor([3, 1], device=device)
    torch.library.opcheck(torch.ops.puzzlecam.multiscale_cam.default, (maps, flipped, keys, [48, 40]))


# ------------------------------------------------------------------------------------------------
# Bad inputs: clear errors from C++ that name the shapes


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_reconstruction_loss_bad_inputs(device):
    op = torch.ops.puzzlecam.reconstruction_loss
    cam, tiles, labels, _, _ = loss_inputs(2, 3, 8, 8, 2, torch.float32, device, seed=5)
    cases = [
        (ValueError, "got shape [3, 8, 8]", (cam[0], tiles, labels, 2, "feature", "l1", True)),
        (
            ValueError,
            "cam_tiles [8, 3, 3, 4], n=2) but cam has shape [2, 3, 8, 8]",
            (cam, tiles[:, :, :3], labels, 2, "feature", "l1", True),
        ),
        (ValueError, "not a multiple of n*n=4", (cam, tiles[:7], labels, 2, "feature", "l1", True)),
        (ValueError, "labels must have shape", (cam, tiles, labels[:, :2], 2, "feature", "l1", True)),
        (ValueError, "level must be", (cam, tiles, labels, 2, "pixel", "l1", True)),
        (ValueError, "kind must be", (cam, tiles, labels, 2, "feature", "huber", True)),
        (ValueError, "positive", (cam, tiles, labels, 0, "feature", "l1", True)),
        (TypeError, "Double", (cam.double(), tiles.double(), labels, 2, "feature", "l1", True)),
        (TypeError, "differs from cam dtype", (cam, tiles.half(), labels, 2, "feature", "l1", True)),
    ]
    if device == "cuda":
        cases.append((ValueError, "cpu", (cam, tiles, labels.cpu(), 2, "feature", "l1", True)))
    for error, text, args in cases:
        with pytest.raises(error) as info:
            op(*args)
        assert text in str(info.value), (text, str(info.value))


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_multiscale_cam_bad_inputs(device):
    op = torch.ops.puzzlecam.multiscale_cam
    maps, flipped = fusion_inputs(32, 48, 4, (1.0, 0.5), torch.float32, device, seed=6)
    keys = torch.tensor([1], device=device)
    cases = [
        (ValueError, "out of range", (maps, flipped, torch.tensor([4], device=device), [32, 48])),
        (
            ValueError,
            "flipped map shape [4, 1, 1] differs from [4, 1, 2]",
            (maps, flipped[:1] + [flipped[1][..., :1]], keys, [32, 48]),
        ),
        (ValueError, "(C, h, w)", ([maps[0][None]], [], keys, [32, 48])),
        (ValueError, "2 scale maps but 1 flipped", (maps, flipped[:1], keys, [32, 48])),
        (ValueError, "classes but scale 0 has", ([maps[0], maps[1][:3]], [], keys, [32, 48])),
        (ValueError, "image_size", (maps, flipped, keys, [32])),
        (ValueError, "no scale maps", ([], [], keys, [32, 48])),
        (TypeError, "integer", (maps, flipped, keys.float(), [32, 48])),
        (TypeError, "Double", ([m.double() for m in maps], [], keys, [32, 48])),
    ]
    for error, text, args in cases:
        with pytest.raises(error) as info:
            op(*args)
        assert text in str(info.value), (text, str(info.value))


# ------------------------------------------------------------------------------------------------
# CUDA kernels compile with nvcc alone (the CPU torch wheel has no CUDA headers; the kernels need none)


def test_cuda_kernels_compile_with_nvcc(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found on PATH: cannot compile the CUDA kernels here")
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    assert sources, "no CUDA kernel files in csrc/cuda"
    for source in sources:
        # The flags torch's CUDAExtension passes that matter for kernel code, for A100 and H100.
        cmd = [
            nvcc, "-c", source, "-o", str(tmp_path / (os.path.basename(source) + ".o")),
            "-std=c++17", "-O3", "-Xcompiler", "-fPIC",
            "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
            "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
            "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
        ]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, f"nvcc failed on {source}:\n{result.stdout}\n{result.stderr}"

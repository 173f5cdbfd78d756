"""puzzlecam.library: one signature per op, both families registered with it, and opcheck of the Triton ops.

The C++/CUDA ops' opcheck tests are beside their numerical tests (test_ext.py, test_affinity_ops.py). The Triton
ops run here on fresh random inputs through ``torch.library.opcheck``: on a GPU every test (schema, autograd
registration, fake tensors, AOT dispatch); on the CPU, under the Triton interpreter, the first three (the
interpreter cannot run inside a traced graph, so the AOT dispatch test needs a GPU).
"""

from __future__ import annotations

import pytest
import torch
from torch._library.infer_schema import infer_schema

from puzzlecam import library

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
INTERPRETER_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor")


def triton_ops():
    """puzzlecam.kernels imported (it registers the Triton ops), or the test skipped saying why not."""
    try:
        import puzzlecam.kernels as kernels
    except Exception as exc:  # triton missing or broken
        pytest.skip(f"puzzlecam.kernels cannot be imported: {exc}")
    if kernels.UNREGISTERED:
        pytest.skip(kernels.UNREGISTERED)
    return kernels


def test_every_schema_parses_and_its_python_signature_infers_it_back():
    for name, schema in library.SCHEMAS.items():
        parsed = torch._C.parse_schema(f"puzzlecam::{name}{schema}")

        def prototype(*args):
            pass

        prototype.__signature__ = library.signature(name)
        inferred = infer_schema(prototype, mutates_args=())
        assert library._normalized(f"puzzlecam::{name}{inferred}") == library._normalized(str(parsed)), name


def test_the_extension_ops_have_the_library_schemas():
    if not library.available():
        pytest.skip(f"puzzlecam._C is not built ({library.load_error()})")
    for name in library.EXT_OPS:
        registered = str(library.op(name).default._schema)
        assert registered == str(torch._C.parse_schema(f"puzzlecam::{name}{library.SCHEMAS[name]}")), name
        assert library.has_op(name), name


def test_the_triton_ops_have_the_library_schemas():
    triton_ops()
    for name in library.TRITON_OPS:
        registered = str(library.op(library.TRITON_PREFIX + name).default._schema)
        declared = f"puzzlecam::{library.TRITON_PREFIX}{name}{library.SCHEMAS[name]}"
        assert library._normalized(registered) == library._normalized(declared), name


def check(op_name: str, args: tuple, device: str) -> None:
    op = getattr(torch.ops.puzzlecam, op_name).default
    kwargs = {"test_utils": INTERPRETER_TESTS} if device == "cpu" else {}
    result = torch.library.opcheck(op, args, **kwargs)
    assert all(v == "SUCCESS" for v in result.values()), result


def needs(device: str):
    kernels = triton_ops()
    if device == "cpu" and not kernels.INTERPRETED:
        pytest.skip("Triton kernels on CPU tensors need the interpreter (TRITON_INTERPRET=1)")
    if device == "cuda" and kernels.INTERPRETED:
        pytest.skip("compiled Triton kernels need TRITON_INTERPRET unset")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("level,kind,masking", [("feature", "l1", True), ("cam", "l2", False)])
def test_triton_reconstruction_loss_opcheck(device, dtype, level, kind, masking):
    needs(device)
    g = torch.Generator().manual_seed(hash((str(dtype), level)) % 2**31)
    cam = torch.randn(2, 3, 8, 12, generator=g).to(device, dtype).requires_grad_(True)
    tiles = torch.randn(8, 3, 4, 6, generator=g).to(device, dtype).requires_grad_(True)
    labels = (torch.rand(2, 3, generator=g) > 0.5).float().to(device)
    check("triton_reconstruction_loss", (cam, tiles, labels, 2, level, kind, masking), device)
    grads = (torch.randn((), generator=g).to(device), torch.randn(2, 3, generator=g).to(device))
    args = (*grads, cam.detach(), tiles.detach(), labels, 2, level, kind, masking)
    check("triton_reconstruction_loss_backward", args, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_tile_merge_opcheck(device, channels_last):
    needs(device)
    g = torch.Generator().manual_seed(7)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 3, 8, 6, generator=g).to(device).contiguous(memory_format=fmt).requires_grad_(True)
    check("triton_tile", (x, 2), device)
    tiles = torch.randn(8, 3, 4, 3, generator=g).to(device).contiguous(memory_format=fmt).requires_grad_(True)
    check("triton_merge", (tiles, 2), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, False), (torch.bfloat16, True)], ids=str)
def test_triton_prepare_inputs_opcheck(device, dtype, channels_last):
    needs(device)
    g = torch.Generator().manual_seed(8)
    images = torch.randint(0, 256, (2, 8, 12, 3), dtype=torch.uint8, generator=g).to(device)
    valid = torch.tensor([[8, 7], [5, 12]], device=device)
    check("triton_prepare_inputs", (images, valid, 2, dtype, channels_last), device)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_affinity_sums_opcheck(device):
    needs(device)
    g = torch.Generator().manual_seed(9)
    edge = torch.rand(2, 1, 16, 20, generator=g).to(device).requires_grad_(True)
    seg = torch.randint(0, 4, (2, 16, 20), generator=g).to(device)
    seg[0, :3] = 255
    check("triton_affinity_sums", (edge, seg, 4), device)
    check("triton_affinity_sums_backward", (torch.rand(3, generator=g).to(device), edge.detach(), seg, 4), device)

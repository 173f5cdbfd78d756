"""Helpers shared by the Triton launchers: argument checks and output allocation."""

from __future__ import annotations

import os

import torch

try:
    from torch.library import wrap_triton
except ImportError:  # torch < 2.6: no Triton ops (puzzlecam.library says so); launch the kernels directly

    def wrap_triton(kernel):
        return kernel


from . import INTERPRETED

# Tests switch this on: every buffer a launcher allocates starts as NaN, so an element that a
# kernel forgot to write shows up in the comparison with the reference.
POISON = os.environ.get("PUZZLECAM_KERNEL_POISON", "0") == "1"

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Pure copies (tile / merge) move any of these element types.
COPY_DTYPES = FLOAT_DTYPES + (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
# Kernels index with int32; every tensor they touch must stay below this many elements.
MAX_ELEMENTS = 2**31 - 1


def empty(shape, dtype: torch.dtype, device, memory_format=torch.contiguous_format) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    if POISON and dtype.is_floating_point:
        out.fill_(float("nan"))
    return out


def empty_like(t: torch.Tensor) -> torch.Tensor:
    """A new tensor like ``t`` with the same dense strides (contiguous when ``t`` is not dense)."""
    out = torch.empty_like(t)
    if POISON and t.dtype.is_floating_point:
        out.fill_(float("nan"))
    return out


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def check_float(op: str, name: str, t: torch.Tensor, allowed=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{op}: {name} must have one of the dtypes {names}; got {t.dtype}")


def check_size(op: str, name: str, t: torch.Tensor) -> None:
    if t.numel() > MAX_ELEMENTS:
        raise ValueError(
            f"{op}: {name} has {t.numel()} elements; the Triton kernels index with int32 (at most {MAX_ELEMENTS})"
        )
    if t.dim() and t.numel() and max(s * (d - 1) for s, d in zip(t.stride(), t.shape, strict=True)) > MAX_ELEMENTS:
        raise ValueError(f"{op}: {name} spans more than {MAX_ELEMENTS} elements of memory (strides {t.stride()})")


def check_same_device(op: str, **tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        raise ValueError(
            f"{op}: all tensors must be on one device, got " + ", ".join(f"{k} on {v}" for k, v in devices.items())
        )
    return first


def skip_launch(t: torch.Tensor) -> bool:
    """True when a launcher meets fake tensors under the Triton interpreter (shape propagation: opcheck's
    fake-tensor test, tracing): the interpreter would run the kernel on them, while wrap_triton, which traces
    compiled kernels into the graph instead, returns interpreted kernels as they are."""
    from torch._subclasses.fake_tensor import is_fake

    return INTERPRETED and is_fake(t)

"""Test setup shared by every test file.

Triton runs kernels on a CPU only through its interpreter, which must be switched on before triton
is first imported: do it here when no GPU is visible (``make test`` also sets it).
"""

import os
import shutil
import subprocess


def _gpu_visible() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


if not _gpu_visible():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    # Tests marked `gpu` need CUDA; they are skipped (and say so) where none is available.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

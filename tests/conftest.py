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


class SmallDisk:
    """A tmpfs of a few MiB mounted for one test: a disk that really fills up, or turns read-only."""

    def __init__(self, path, size_kib: int):
        self.path = path
        self.size_kib = size_kib

    def fill(self, leave_bytes: int = 0) -> None:
        """Occupy the disk until only ``leave_bytes`` are free."""
        import os

        free = os.statvfs(self.path).f_bavail * os.statvfs(self.path).f_frsize
        with open(self.path / ".filler", "wb") as f:
            f.write(b"\0" * max(0, free - leave_bytes))

    def make_read_only(self) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(self.path)], check=True, capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs at tmp_path/disk (needs permission to mount: skipped where there is none)."""
    path = tmp_path / "disk"
    path.mkdir()
    size_kib = 2048
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield SmallDisk(path, size_kib)
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)

"""The extension build of puzzlecam; the package metadata lives in pyproject.toml.

``puzzlecam._C`` is the C++ (and, with a CUDA torch and nvcc, CUDA) extension from ``csrc/``.
A failed extension build is reported clearly and does not fail the install: the package then
serves the pure-torch reference backend with one warning.

Install with ``pip install --no-build-isolation -e .`` so that the build uses the torch that is
already installed (an isolated build would pull a CUDA torch from the index).
"""

import glob
import os
import shutil
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # metadata-only operations (e.g. `setup.py --name`) work without torch
    torch = None
    cpp_extension = None

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_wanted():
    if torch is None:
        return False
    if torch.version.cuda is None:  # a CPU torch has no CUDA headers to build the glue against
        if os.environ.get("FORCE_CUDA", "0") == "1":
            print(
                "puzzlecam: FORCE_CUDA=1 ignored: the installed torch has no CUDA; building the CPU ops only",
                file=sys.stderr,
            )
        return False
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return shutil.which("nvcc") is not None


def _extensions():
    if cpp_extension is None:
        return [], {}
    # csrc/*.cpp: op schemas + module; csrc/cpu/*.cpp: CPU kernels; csrc/cuda/*.cu: CUDA kernels (toolkit
    # headers only); csrc/cuda/*.cpp: their ATen glue (needs a CUDA torch).
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if not cpu_sources:
        return [], {}
    # No -std flag: torch's BuildExtension adds the standard its headers need (C++17 for torch 2.4, C++20 later).
    # -fno-trapping-math lets gcc turn float compares/selects into vector blends (values are unchanged).
    cxx_flags = ["-O3", "-fno-trapping-math", "-fopenmp"]
    include_dirs = [os.path.join(HERE, "csrc")]
    if _cuda_wanted():
        # Without a visible GPU, torch would compile for every architecture it knows: pick A100 + H100.
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        cuda_sources = sorted(
            glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp"))
        )
        ext = cpp_extension.CUDAExtension(
            "puzzlecam._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("PUZZLECAM_WITH_CUDA", None)],
            # No --use_fast_math: the kernels must match the reference's IEEE division and relu thresholds.
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "puzzlecam._C",
            cpu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": _TolerantBuildExt}


if cpp_extension is not None:

    class _TolerantBuildExt(cpp_extension.BuildExtension):
        """Build the extension; on failure say why and go on (the reference backend serves)."""

        def run(self):
            self._failed = set()
            try:
                super().run()
            except Exception as exc:  # an error outside one extension's build (e.g. the in-place copy)
                self._report(exc)

        def build_extension(self, ext):
            compiler = os.environ.get("CXX", "c++").split()[0]
            if shutil.which(compiler) is None:
                self._failed.add(ext.name)
                self._report(
                    RuntimeError(f"no C++ compiler found: {compiler!r} is not on PATH (set CXX or install g++)")
                )
                return
            try:
                super().build_extension(ext)
            except Exception as exc:
                self._failed.add(ext.name)
                self._report(exc)

        def copy_extensions_to_source(self):
            # --inplace / editable installs copy the built libraries; skip the ones that failed (reported once).
            built = [ext for ext in self.extensions if ext.name not in getattr(self, "_failed", ())]
            self.extensions, everything = built, self.extensions
            try:
                super().copy_extensions_to_source()
            finally:
                self.extensions = everything

        def get_outputs(self):
            failed = {os.path.basename(self.get_ext_filename(name)) for name in getattr(self, "_failed", ())}
            return [out for out in super().get_outputs() if os.path.basename(out) not in failed]

        @staticmethod
        def _report(exc):
            if os.environ.get("PUZZLECAM_REQUIRE_EXT", "0") == "1":
                raise exc
            bar = "=" * 78
            print(
                f"\n{bar}\npuzzlecam: the C++/CUDA extension puzzlecam._C was NOT built:\n  {exc}\n"
                "The package still installs and imports; puzzlecam.ops then uses the pure-torch\n"
                "reference backend (with one warning). Install a C++ compiler (g++) and reinstall,\n"
                "or set PUZZLECAM_REQUIRE_EXT=1 to make this an error.\n"
                f"{bar}\n",
                file=sys.stderr,
            )
else:
    _TolerantBuildExt = None


ext_modules, cmdclass = _extensions()

setup(ext_modules=ext_modules, cmdclass=cmdclass)

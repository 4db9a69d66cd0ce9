"""Builds the C++/CUDA extension ``gslora._C`` (the ``torch.ops.gslora`` ops).

CPU sources (``csrc/*.cpp``) are always built, with OpenMP and -O3. CUDA sources
(``csrc/cuda/*.cu``) are built when ``GSLORA_BUILD_CUDA`` is 1, or when it is ``auto`` (the
default) and both nvcc and a CUDA build of torch are present. If the extension cannot be built at
all, the pure-Python package still installs (the ``torch`` backend runs everywhere) and
``python -m gslora`` says why ``_C`` is missing — unless ``GSLORA_REQUIRE_EXT=1`` (CI), which
turns a failed build into an error.

Build from the project's virtual environment without build isolation, so the extension is
compiled against the torch that will load it: ``pip install --no-build-isolation -e .``
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_home() -> str | None:
    # torch's auto-detection can pick a toolkit other than the nvcc on the PATH; the nvcc that
    # compiles must be the toolkit whose headers and libraries we use.
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    # nvcc on the PATH may be a wrapper script (e.g. /usr/local/bin/nvcc -> exec
    # /usr/local/cuda/bin/nvcc): then its folder holds no toolkit; take the standard location.
    if not os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
        if os.path.exists("/usr/local/cuda/include/cuda_runtime.h"):
            return "/usr/local/cuda"
    return home


def _want_cuda() -> tuple[bool, str]:
    choice = os.environ.get("GSLORA_BUILD_CUDA", "auto").lower()
    if choice in ("0", "false", "no", "off"):
        return False, "GSLORA_BUILD_CUDA=0"
    import torch

    cuda_home = _cuda_home()
    reason = None
    if torch.version.cuda is None:
        reason = "torch is a CPU-only build"
    elif cuda_home is None:
        reason = "nvcc not found (set CUDA_HOME or put nvcc on the PATH)"
    if reason is None:
        os.environ["CUDA_HOME"] = cuda_home
        return True, f"CUDA_HOME={cuda_home}"
    if choice in ("1", "true", "yes", "on"):
        sys.exit(f"GSLORA_BUILD_CUDA=1 but CUDA sources cannot be built: {reason}")
    return False, reason


def _extensions():
    # Decide on CUDA (and export CUDA_HOME) BEFORE importing cpp_extension: it fixes its own
    # CUDA_HOME at import time, and with an nvcc wrapper in /usr/local/bin it would pick /usr/local
    # and fail to link -lcudart.
    build_cuda, why = _want_cuda()
    import torch.utils.cpp_extension as cpp_extension
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    if build_cuda:
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    # -fno-math-errno: sqrt in the optimizer kernel vectorises (nothing here reads errno).
    cxx = ["-O3", "-g0", "-fopenmp", "-fno-math-errno", "-std=c++20"]
    print(f"gslora: building CUDA kernels: {build_cuda} ({why})")
    if build_cuda and cuda_sources:
        arch = os.environ.get("GSLORA_CUDA_ARCH", "80;90")
        nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        for a in arch.split(";"):
            nvcc += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        ext = CUDAExtension(
            "gslora._C", cpu_sources + cuda_sources, include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx + ["-DGSLORA_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "gslora._C", cpu_sources, include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


class _OptionalBuild:
    """Wrap build_ext so that a failed optional build leaves the pure-Python install intact."""

    @staticmethod
    def wrap(build_ext_cls):
        class OptionalBuildExt(build_ext_cls):
            def run(self):
                try:
                    super().run()
                except Exception as exc:  # noqa: BLE001 - any compiler failure
                    if os.environ.get("GSLORA_REQUIRE_EXT") == "1":
                        raise
                    print(f"gslora: WARNING: gslora._C was not built ({exc}); the pure-PyTorch "
                          "backend still works. Rebuild: pip install --no-build-isolation -e .")

        return OptionalBuildExt


try:
    ext_modules, cmdclass = _extensions()
    cmdclass = {"build_ext": _OptionalBuild.wrap(cmdclass["build_ext"])}
except ImportError as exc:  # torch missing in the build environment
    print(f"gslora: WARNING: torch is not importable at build time ({exc}); skipping gslora._C")
    ext_modules, cmdclass = [], {}

setup(ext_modules=ext_modules, cmdclass=cmdclass)

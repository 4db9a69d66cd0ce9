"""The CUDA part of gslora._C: built for sm_80 and sm_90, and no register spills.

Inspects the compiled extension with cuobjdump (no GPU needed). Skips only when the extension
was built without CUDA on a machine that cannot build it (no nvcc or a CPU-only torch); where
nvcc and a CUDA torch exist, missing CUDA kernels are a failed build and fail this test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import torch

from gslora._ext import load_error

OPS = ("lora_linear_fwd", "lora_linear_bwd", "group_sq_norms", "group_scale", "group_prox_")


def _cuobjdump() -> str | None:
    candidates = [shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"]
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "cuobjdump"))
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                       "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.path.exists(c)), None)


@pytest.fixture(scope="module")
def so_path() -> str:
    assert load_error() is None, load_error()
    built = [torch._C._dispatch_has_kernel_for_dispatch_key(f"gslora::{op}", "CUDA") for op in OPS]
    if not any(built):
        can_build = shutil.which("nvcc") is not None and torch.version.cuda is not None
        assert not can_build, (
            "gslora._C has no CUDA kernels although nvcc and a CUDA build of torch are present: "
            "the CUDA sources failed to build or were disabled; rebuild with "
            "GSLORA_BUILD_CUDA=1 pip install --no-build-isolation -e ."
        )
        pytest.skip("gslora._C was built without CUDA (no nvcc or CPU-only torch here)")
    assert all(built), f"CUDA kernels missing for: {[o for o, b in zip(OPS, built, strict=True) if not b]}"
    from gslora import _C

    return _C.__file__


@pytest.fixture(scope="module")
def cuobjdump() -> str:
    tool = _cuobjdump()
    assert tool is not None, "cuobjdump not found (CUDA toolkit bin/ or triton/backends/nvidia/bin/)"
    return tool


def test_elf_for_sm80_and_sm90(so_path, cuobjdump):
    out = subprocess.run([cuobjdump, "-lelf", so_path], capture_output=True, text=True, check=True)
    archs = set(re.findall(r"sm_(\d+)", out.stdout))
    assert {"80", "90"} <= archs, f"expected cubins for sm_80 and sm_90, found {sorted(archs)}"


def test_no_spills_in_gslora_kernels(so_path, cuobjdump):
    out = subprocess.run([cuobjdump, "-res-usage", so_path], capture_output=True, text=True,
                         check=True).stdout
    # " Function <mangled>:\n  REG:n STACK:n SHARED:n LOCAL:n ..." per kernel and architecture;
    # spills live in local memory, so LOCAL and STACK must be 0 for every gslora kernel.
    found = re.findall(r"Function (\S*gslora\S*):\s*\n\s*(REG:.*)", out)
    assert found, "no gslora kernels in cuobjdump -res-usage output"
    bad = []
    for name, usage in found:
        fields = dict(re.findall(r"(\w+):(\d+)", usage))
        if int(fields.get("LOCAL", 0)) or int(fields.get("STACK", 0)):
            bad.append(f"{name}: {usage.strip()}")
    assert not bad, "kernels using local memory (spills):\n" + "\n".join(bad)

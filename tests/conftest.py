"""Test-wide settings.

TRITON_INTERPRET=1 must be set before any ``@triton.jit`` function is defined, so it is set here,
before gslora is imported: Triton kernels then run on CPU tensors in the interpreter. On a machine
with a GPU, GSLORA_TEST_CUDA=1 leaves Triton compiling for the GPU instead.
"""

import os

if os.environ.get("GSLORA_TEST_CUDA") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

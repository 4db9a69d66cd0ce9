"""Backend selection: by device, by argument, by GSLORA_BACKEND, and clear refusals."""

import subprocess
import sys

import pytest
import torch

from gslora import BackendError, lora_linear, select_backend
from gslora.backends import describe_backends


def test_torch_backend_always_available():
    assert select_backend("cpu", "torch").name == "torch"
    assert "torch: available" in describe_backends("cpu")


def test_auto_prefers_compiled_cpu_when_built():
    from gslora import _ext

    expected = "cpu" if _ext.load_error() is None else "torch"
    assert select_backend("cpu").name == expected


def test_env_variable_overrides(monkeypatch):
    monkeypatch.setenv("GSLORA_BACKEND", "torch")
    assert select_backend("cpu").name == "torch"
    monkeypatch.setenv("GSLORA_BACKEND", "cuda")
    with pytest.raises(BackendError, match="GSLORA_BACKEND='cuda' cannot run on cpu"):
        select_backend("cpu")
    # The variable is read on every call (from os.environ's own dict): unsetting it is seen too.
    monkeypatch.delenv("GSLORA_BACKEND")
    assert select_backend("cpu").name == select_backend("cpu", "auto").name


def test_unknown_and_unservable_requests_list_reasons():
    with pytest.raises(BackendError, match="unknown backend 'nope'"):
        select_backend("cpu", "nope")
    x = torch.randn(2, 4)
    w, a, b = torch.randn(3, 4), torch.randn(1, 4), torch.randn(3, 1)
    with pytest.raises(BackendError, match="backend='cuda'.*Available here"):
        lora_linear(x, w, None, a, b, 1.0, backend="cuda")


def test_python_m_gslora_reports_backends():
    out = subprocess.run([sys.executable, "-m", "gslora"], capture_output=True, text=True, check=True).stdout
    assert "torch" in out and "backends for cpu tensors" in out and "triton" in out

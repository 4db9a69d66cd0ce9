"""What this installation can run: versions and the backends available (and why not)."""

from __future__ import annotations

import platform

import torch

from . import __version__
from .backends import describe_backends


def info_text() -> str:
    """A short report for bug reports and for `python -m gslora`."""
    lines = [
        f"gslora {__version__}",
        f"python {platform.python_version()} on {platform.machine()} ({platform.system()})",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}; "
        f"CUDA device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'})",
    ]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton: not installed")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        lines.append(f"backends for {device} tensors:")
        lines.extend("  " + line for line in describe_backends(device).splitlines())
    return "\n".join(lines)

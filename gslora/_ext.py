"""Loading of the compiled extension ``gslora._C`` (the ``torch.ops.gslora`` ops and direct
entry points to the group ops and the LoRA linear).

The pure-Python parts of gslora work without it (the ``torch`` backend); the fused CPU and CUDA
backends need it. ``load_error()`` says why it is missing and how to rebuild it.

The load is tried once, when this module is imported (with ``import gslora``): the answer is then
a plain module constant, which ``torch.compile`` reads without tracing an import.
"""

from __future__ import annotations

import torch  # noqa: F401  (the extension needs libtorch loaded first)

REBUILD = "pip install --no-build-isolation -e .   (or: make build)"


def _try_load() -> str | None:
    try:
        from . import _C  # noqa: F401
    except ImportError as exc:
        return f"the compiled extension gslora._C is not available ({exc}); rebuild it with: {REBUILD}"
    # The fake kernels for torch.compile, and what it traces for the direct entry points.
    from . import _fake, _polyfills  # noqa: F401

    return None


_LOAD_ERROR = _try_load()


def load_error() -> str | None:
    """None when ``gslora._C`` is loaded; otherwise why not, with the rebuild command."""
    return _LOAD_ERROR

"""Loading of the compiled extension ``gslora._C`` (the ``torch.ops.gslora`` ops).

The pure-Python parts of gslora work without it (the ``torch`` backend); the fused CPU and CUDA
backends need it. ``load_error()`` says why it is missing and how to rebuild it.
"""

from __future__ import annotations

import functools

REBUILD = "pip install --no-build-isolation -e .   (or: make build)"


@functools.cache
def load_error() -> str | None:
    """None when ``gslora._C`` is loaded; otherwise why not, with the rebuild command."""
    try:
        import torch  # noqa: F401  (the extension needs libtorch loaded first)

        from . import _C  # noqa: F401
    except ImportError as exc:
        return f"the compiled extension gslora._C is not available ({exc}); rebuild it with: {REBUILD}"
    from . import _fake  # noqa: F401  (fake kernels for torch.compile)

    return None


def require() -> None:
    """Raise ImportError with the rebuild command if ``gslora._C`` cannot be loaded."""
    error = load_error()
    if error is not None:
        raise ImportError(error)

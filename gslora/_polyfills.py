"""What ``torch.compile`` traces in place of ``gslora._C``'s direct entry points to its ops.

Eager code calls the group ops and the LoRA linear through ``gslora._C.<op>``, a C function that skips the
conversion of every argument that a ``torch.ops`` call makes (csrc/python_module.cpp). Dynamo
cannot trace a C function, so each one is registered with a polyfill that calls the same op
through ``torch.ops.gslora``, which dynamo records with its fake kernel (gslora/_fake.py).
Imported by :mod:`gslora._ext` right after ``gslora._C``.
"""

from __future__ import annotations

import inspect

import torch

from . import _C

__all__: list[str] = []

# The entry points of csrc/python_module.cpp (the module's functions, named like their ops); each
# takes the arguments of its op's schema.
ENTRY_POINTS = tuple(name for name, obj in vars(_C).items()
                     if not name.startswith("_") and inspect.isbuiltin(obj))


def _register(name: str) -> None:
    op = getattr(torch.ops.gslora, name).default

    def traced(*args, **kwargs):
        return op(*args, **kwargs)

    traced.__name__ = traced.__qualname__ = f"{name}_traced"
    # The C function has no Python signature to check against.
    torch.compiler.substitute_in_graph(getattr(_C, name), skip_signature_check=True)(traced)


for _name in ENTRY_POINTS:
    _register(_name)

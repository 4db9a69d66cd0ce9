"""Backend registry: which implementation of the gslora ops runs for given inputs.

A backend is an object with a ``name``, an ``unavailable_reason()`` (None when it can run on
this machine at all) and a ``reject_reason(device)`` (None when it serves tensors on that
device), plus the six ops of :mod:`gslora.reference` with the same signatures:
``lora_linear_fwd``, ``lora_linear_bwd``, ``group_sq_norms``, ``group_scale``, ``group_prox_``
and ``adamw_prox_`` (the AdamW step fused with the prox; a backend without a kernel for it
serves it with the reference, which is the same math op by op, and says so with
``has_fused_adamw_prox()``).
A backend may also offer differentiable versions with their own backward,
``lora_linear(x, weight, bias, lora_A, lora_B, scaling, mask, keep_scale)`` and
``group_lasso_penalty(tensors, group_ids, num_groups, weights)`` (weights None: all 1); without
them, :mod:`gslora.functional` builds both from the five ops in Python autograd functions.
Likewise ``add_group_lasso_grad_(tensors, group_ids, num_groups, weights, alpha)``, a fused op
that adds the penalty's gradient to ``.grad``; without it, ``group_sq_norms`` and ``group_scale``
do it.

Selection: an explicit ``backend=`` argument, else the ``GSLORA_BACKEND`` environment variable,
else the first backend of the device's preference list that accepts the inputs. An explicit
request that cannot be served raises :class:`BackendError` listing every reason.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import torch

from . import _ext, reference

__all__ = [
    "Backend",
    "BackendError",
    "register_backend",
    "get_backend",
    "backend_names",
    "select_backend",
    "describe_backends",
    "cpu_kernels",
    "set_cpu_kernels",
    "cpu_kernels_supported",
]

# Fastest first. The reference ``torch`` backend always works and closes every list.
PREFERENCE: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu", "torch"),
    "cuda": ("triton", "cuda", "torch"),
}


class BackendError(RuntimeError):
    """A requested backend cannot serve the inputs; the message lists why."""


class Backend(Protocol):
    name: str

    def unavailable_reason(self) -> str | None: ...

    def reject_reason(self, device: torch.device) -> str | None: ...

    # True when the ops validate every tensor themselves (the compiled ones do, in C++); else
    # gslora.functional checks dtypes and devices in Python before calling them.
    validates_inputs: bool

    # True when adamw_prox_ is one fused kernel; False when it is the reference's math op by op,
    # which is slower than the inner optimizer's own step followed by the fused prox.
    def has_fused_adamw_prox(self) -> bool: ...


_REGISTRY: dict[str, Any] = {}
# Successful selections by (device as passed, requested name). Availability does not change while
# a process runs, and the uncached checks (extension state, dispatcher queries) cost ~15 µs — as
# much as a small fused kernel — on every op call.
_SELECTED: dict[tuple[Any, str], Any] = {}


def register_backend(backend: Any) -> None:
    """Add (or replace) a backend under ``backend.name``."""
    _REGISTRY[backend.name] = backend
    _SELECTED.clear()


def backend_names() -> list[str]:
    return list(_REGISTRY)


def get_backend(name: str) -> Any:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BackendError(
            f"unknown backend {name!r}; known backends: {', '.join(_REGISTRY)}"
        ) from None


def _why_not(backend: Any, device: torch.device) -> str | None:
    return backend.unavailable_reason() or backend.reject_reason(device)


# os.environ.get is four Python-level calls that raise and catch a KeyError when the variable is
# unset: ~35 µs on every op once a model's forward has evicted the interpreter's caches (measured
# here, more than some fused kernels take). os.environ keeps its entries in a plain dict
# (``_data``, kept in sync by ``os.environ[...] = ...`` and ``del``), so one C-level lookup there
# sees the same value.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_BACKEND_ENV_KEY = os.environ.encodekey("GSLORA_BACKEND") if _ENVIRON_DATA is not None else None


def select_backend(device: torch.device | str, requested: str | None = None) -> Any:
    """The backend that will run ops on tensors of ``device``.

    ``requested`` (or ``$GSLORA_BACKEND`` when it is None) names one backend; ``"auto"`` or
    empty means the device's preference list. ``TRITON_INTERPRET`` is read at the first
    selection for a device (like triton itself, it must be set before the process starts work).
    """
    # Called on every op: the hit path is two dict lookups and no further Python call (each
    # Python call costs several µs once a model's forward has evicted the interpreter's caches),
    # so the environment lookup is written out here.
    if requested is not None:
        name = requested
    elif _ENVIRON_DATA is not None:
        value = _ENVIRON_DATA.get(_BACKEND_ENV_KEY)
        name = "" if value is None else os.environ.decodevalue(value)
    else:
        name = os.environ.get("GSLORA_BACKEND", "")
    backend = _SELECTED.get((device, name))
    if backend is None:
        dev = device if isinstance(device, torch.device) else torch.device(device)
        backend = _select(dev, requested, name)
        if not torch.compiler.is_compiling():  # no cache mutation inside a traced graph
            _SELECTED[(device, name)] = backend
    return backend


def _select(device: torch.device, requested: str | None, name: str) -> Any:
    if name and name != "auto":
        backend = get_backend(name)
        reason = _why_not(backend, device)
        if reason is not None:
            source = "backend=" if requested is not None else "GSLORA_BACKEND="
            raise BackendError(
                f"{source}{name!r} cannot run on {device}: {reason}. "
                f"Available here: {describe_backends(device, only_available=True)}"
            )
        return backend
    for candidate in PREFERENCE.get(device.type, ("torch",)):
        backend = _REGISTRY.get(candidate)
        if backend is not None and _why_not(backend, device) is None:
            return backend
    return _REGISTRY["torch"]


def describe_backends(device: torch.device | str | None = None, only_available: bool = False) -> str:
    """One line per backend: 'name: available' or 'name: unavailable (reason)'."""
    lines = []
    for name, backend in _REGISTRY.items():
        reason = backend.unavailable_reason()
        if reason is None and device is not None:
            reason = backend.reject_reason(torch.device(device))
        if only_available:
            if reason is None:
                lines.append(name)
            continue
        if reason is None:
            details = getattr(backend, "details", lambda: None)()
            lines.append(f"{name}: available" + (f" ({details})" if details else ""))
        else:
            lines.append(f"{name}: unavailable ({reason})")
    return ", ".join(lines) if only_available else "\n".join(lines)


def _settings() -> Any:
    error = _ext.load_error()
    if error is not None:
        raise BackendError(error)
    from . import _C

    return _C.settings


def cpu_kernels() -> str:
    """The LoRA linear's CPU kernels in use: ``'avx512'``, ``'avx2'`` or ``'blas'``.

    The SIMD kernels compute the rank-r products around the frozen GEMM for fp32, bf16 and fp16
    inputs, with or without a dropout mask; ``'blas'`` (the path of CPUs without AVX2) leaves
    them to ATen's BLAS for unmasked fp32, and to the generic row kernels for 16-bit or masked
    inputs. fp64 always takes BLAS or the generic kernels. Default: the best the CPU supports,
    capped by the ``GSLORA_CPU_KERNELS`` environment variable when set. ``avx512`` and ``avx2``
    give the same bits.
    """
    return _settings().cpu_kernels()


def set_cpu_kernels(name: str) -> str:
    """Selects the LoRA linear's CPU kernels (one of :func:`cpu_kernels_supported`) for the whole
    process; returns the previous choice."""
    return _settings().set_cpu_kernels(name)


def cpu_kernels_supported() -> list[str]:
    """The fp32 CPU kernels this build and CPU can run, best first (always ending with 'blas')."""
    return list(_settings().cpu_kernels_supported())


class TorchBackend:
    """The specification itself (:mod:`gslora.reference`): any device, any dtype, slow."""

    name = "torch"
    validates_inputs = False
    lora_linear_fwd = staticmethod(reference.lora_linear_fwd)
    lora_linear_bwd = staticmethod(reference.lora_linear_bwd)
    group_sq_norms = staticmethod(reference.group_sq_norms)
    group_scale = staticmethod(reference.group_scale)
    group_prox_ = staticmethod(reference.group_prox_)
    adamw_prox_ = staticmethod(reference.adamw_prox_)

    def unavailable_reason(self) -> str | None:
        return None

    def reject_reason(self, device: torch.device) -> str | None:
        return None

    def has_fused_adamw_prox(self) -> bool:
        return False


@torch.compiler.assume_constant_result
def _has_kernel(op: str, dispatch_key: str) -> bool:
    # A constant for torch.compile: dynamo cannot trace this query (it returns a bool, not a
    # Tensor), and backend selection inside a compiled GSLoRALinear must not break the graph.
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key)


class ExtensionBackend:
    """The compiled ops ``torch.ops.gslora.*`` of ``gslora._C`` for one device type."""

    validates_inputs = True  # the C++ ops check shapes, dtypes and devices themselves

    def __init__(self, name: str, device_type: str, dispatch_key: str) -> None:
        self.name = name
        self.device_type = device_type
        self.dispatch_key = dispatch_key
        self._adamw_kernel: bool | None = None
        if _ext.load_error() is None:
            from . import _C

            # The group ops and the LoRA linear are gslora._C's direct entry points, as instance
            # attributes: they skip torch.ops' argument conversion (~8 µs a call, as much as a
            # ViT's whole prox) and a wrapper method's Python call; torch.compile traces
            # torch.ops.gslora in their place (_polyfills.py). lora_linear and
            # group_lasso_penalty have C++ autograd kernels.
            for op in ("group_sq_norms", "group_scale", "group_prox_", "group_lasso_penalty",
                       "lora_linear"):
                setattr(self, op, getattr(_C, op))
            self._fused_adamw_prox_ = _C.adamw_prox_  # behind adamw_prox_'s kernel check
            # It writes .grad, which exists above autograd only, so its kernel is registered for
            # the device's Autograd key (AutogradCPU; the CUDA build has none): present only then.
            if _has_kernel("gslora::add_group_lasso_grad_", "Autograd" + dispatch_key):
                self.add_group_lasso_grad_ = _C.add_group_lasso_grad_

    def unavailable_reason(self) -> str | None:
        error = _ext.load_error()
        if error is not None:
            return error
        if not _has_kernel("gslora::lora_linear_fwd", self.dispatch_key):
            return f"gslora._C was built without {self.dispatch_key} kernels"
        if self.device_type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device"
        return None

    def reject_reason(self, device: torch.device) -> str | None:
        if device.type != self.device_type:
            return f"serves {self.device_type} tensors only, got {device.type}"
        return None

    def details(self) -> str | None:
        if self.device_type != "cpu":
            return None
        return (f"LoRA kernels: {cpu_kernels()}; "
                f"supported: {', '.join(cpu_kernels_supported())}")

    def lora_linear_fwd(self, x, weight, bias, lora_A, lora_B, scaling, mask=None, keep_scale=1.0):
        return torch.ops.gslora.lora_linear_fwd(
            x, weight, bias, lora_A, lora_B, float(scaling), mask, float(keep_scale)
        )

    def lora_linear_bwd(
        self, grad_out, x, weight, lora_A, lora_B, xa, scaling, mask=None, keep_scale=1.0,
        compute_dx=True,
    ):
        dx, dA, dB = torch.ops.gslora.lora_linear_bwd(
            grad_out, x, weight, lora_A, lora_B, xa, float(scaling), mask, float(keep_scale),
            bool(compute_dx),
        )
        return (dx if compute_dx else None), dA, dB

    def has_fused_adamw_prox(self) -> bool:
        if self._adamw_kernel is None:  # cached: the query costs as much as a small step
            self._adamw_kernel = _has_kernel("gslora::adamw_prox_", self.dispatch_key)
        return self._adamw_kernel

    def adamw_prox_(self, params, grads, exp_avgs, exp_avg_sqs, state_steps, group_ids,
                    num_groups, thresholds, lr, beta1, beta2, eps, weight_decay, adam_metric):
        if not self.has_fused_adamw_prox():
            # No fused optimizer kernel in this build for this device (the CUDA extension has
            # none; the triton backend has one): the same math, op by op.
            return reference.adamw_prox_(params, grads, exp_avgs, exp_avg_sqs, state_steps,
                                         group_ids, num_groups, thresholds, lr, beta1, beta2, eps,
                                         weight_decay, adam_metric)
        return self._fused_adamw_prox_(
            params, grads, exp_avgs, exp_avg_sqs, state_steps, group_ids, num_groups, thresholds,
            float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
            bool(adam_metric))


class TritonBackend:
    """Triton kernels of :mod:`gslora.kernels`; on the CPU only under ``TRITON_INTERPRET=1``."""

    name = "triton"
    validates_inputs = False

    def _kernels(self):
        from . import kernels

        return kernels

    def unavailable_reason(self) -> str | None:
        try:
            import triton  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the install
            return f"triton is not installed ({exc})"
        try:
            return self._kernels().unavailable_reason()
        except Exception as exc:  # noqa: BLE001 - a broken kernel module must not break dispatch
            return f"gslora.kernels failed to load ({type(exc).__name__}: {exc})"

    def reject_reason(self, device: torch.device) -> str | None:
        interpreting = os.environ.get("TRITON_INTERPRET") == "1"
        if interpreting and device.type != "cpu":
            return "TRITON_INTERPRET=1 runs on CPU tensors only"
        if not interpreting and device.type != "cuda":
            return f"needs CUDA tensors (or TRITON_INTERPRET=1 for CPU), got {device.type}"
        return None

    def has_fused_adamw_prox(self) -> bool:
        return True

    def __getattr__(self, op: str):
        if op in ("lora_linear_fwd", "lora_linear_bwd", "group_sq_norms", "group_scale",
                  "group_prox_", "adamw_prox_"):
            return getattr(self._kernels(), op)
        raise AttributeError(op)


register_backend(TorchBackend())
register_backend(ExtensionBackend("cpu", "cpu", "CPU"))
register_backend(ExtensionBackend("cuda", "cuda", "CUDA"))
register_backend(TritonBackend())

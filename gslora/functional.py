"""Autograd functions and the functional API over the backend ops.

The autograd functions only validate, reshape, save tensors and call the chosen backend; the
math lives in :mod:`gslora.reference` (and the kernels that reproduce it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import _ext, reference
from .backends import select_backend

# One C call for "is autocast on for any device" (torch.compile traces it as a guard).
_any_autocast = torch._C._is_any_autocast_enabled

__all__ = [
    "LoRALinearFunction",
    "GroupLassoPenaltyFunction",
    "lora_linear",
    "dropout_keep_mask",
    "group_sq_norms",
    "group_norms",
    "group_lasso_penalty",
    "add_group_lasso_grad_",
    "group_prox_",
    "check_lora_args",
]


def check_lora_args(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor
) -> None:
    """Raise ValueError naming the argument if shapes, dtypes or devices do not fit."""
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must have shape [..., {k}] (in_features), got {tuple(x.shape)}")
    if lora_A.dim() != 2 or lora_A.shape[1] != k:
        raise ValueError(f"lora_A must have shape [r, {k}], got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"LoRA rank r must be >= 1, got lora_A of shape {tuple(lora_A.shape)}")
    if lora_B.shape != (n, r):
        raise ValueError(f"lora_B must have shape [{n}, {r}], got {tuple(lora_B.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape [{n}], got {tuple(bias.shape)}")
    tensors = {"weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        tensors["bias"] = bias
    for name, t in tensors.items():
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if t.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}")


class LoRALinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b + s·(d(x) Aᵀ) Bᵀ on 2-D x [M, K].

    Gradients (g = ∂L/∂y, u = g B, d = dropout with the forward's mask):
        ∂L/∂B = s · gᵀ (d(x) Aᵀ)        (d(x) Aᵀ = xa is saved by the forward, [M, r])
        ∂L/∂A = s · uᵀ d(x)
        ∂L/∂x = g W + s · d(u A)
        ∂L/∂W = gᵀ x,  ∂L/∂b = Σ_rows g   (only if the frozen base was unfrozen by the user)
    Saved: x, the [M, r] product xa and the dropout mask (bool, 1 byte per element) instead of
    a second, dropped-out copy of x.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, mask, keep_scale, backend):
        y, xa = backend.lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, mask, keep_scale)
        ctx.save_for_backward(x, weight, lora_A, lora_B, xa, mask)
        ctx.scaling, ctx.keep_scale, ctx.backend = scaling, keep_scale, backend
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_A, lora_B, xa, mask = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        grad_out = grad_out.contiguous()
        dx, dA, dB = ctx.backend.lora_linear_bwd(
            grad_out, x, weight, lora_A, lora_B, xa, ctx.scaling, mask, ctx.keep_scale, need_x
        )
        dW = grad_out.t().mm(x).to(weight.dtype) if need_w else None
        db = grad_out.sum(0) if (need_b and ctx.has_bias) else None
        return (dx, dW, db, dA if need_a else None, dB if need_bb else None,
                None, None, None, None)


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout: float = 0.0,
    training: bool = False,
    backend: str | None = None,
) -> Tensor:
    """y = x Wᵀ + b + scaling·(dropout(x) Aᵀ) Bᵀ for x [..., K] → [..., N].

    W [N, K], b [N] or None, A [r, K], B [N, r]. Under autocast the inputs are cast to the
    autocast dtype (as ``nn.Linear`` would be). ``backend`` overrides the automatic choice.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
    impl = select_backend(x.device, backend)
    fused = getattr(impl, "lora_linear", None)
    if fused is not None and not (training and dropout > 0.0) and not _any_autocast():
        # The common case in one call: the backend's autograd op checks every argument in C++
        # (ValueError naming x for a wrong x) and takes any strides and leading dimensions. Once
        # a GEMM has evicted the interpreter's caches every Python step costs microseconds, and
        # the general path below takes a dozen of them per layer call.
        return fused(x, weight, bias, lora_A, lora_B, float(scaling), None, 1.0)
    autocast = torch.is_autocast_enabled(x.device.type)
    if autocast and x.is_floating_point():
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, lora_A, lora_B = (t.to(dtype) for t in (x, weight, lora_A, lora_B))
        bias = None if bias is None else bias.to(dtype)
    if not impl.validates_inputs:
        check_lora_args(x, weight, bias, lora_A, lora_B)
    # The fused op takes x [..., K] as it is; the Python autograd function takes [M, K] rows.
    rows = x if fused is not None or x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if fused is None and not rows.is_contiguous():
        rows = rows.contiguous()
    mask, keep_scale = None, 1.0
    if training and dropout > 0.0:
        mask = dropout_keep_mask(rows, dropout)
        keep_scale = 1.0 / (1.0 - dropout)
    args = (rows, weight.contiguous(), bias, lora_A.contiguous(), lora_B.contiguous(),
            float(scaling), mask, keep_scale)
    if not autocast:
        y = fused(*args) if fused is not None else LoRALinearFunction.apply(*args, impl)
    else:  # the inputs are cast above; the kernels must not be autocast again
        with torch.autocast(x.device.type, enabled=False):
            y = fused(*args) if fused is not None else LoRALinearFunction.apply(*args, impl)
    return y if y.dim() == x.dim() else y.reshape(*x.shape[:-1], weight.shape[0])


def dropout_keep_mask(x: Tensor, p: float) -> Tensor:
    """The keep mask of one LoRA dropout call on x [..., K]: bool [M, K], M the product of x's
    leading sizes.

    On the CPU the mask is ``reference.dropout_keep_mask`` (Philox4x32-10 words against p; the
    compiled op where gslora._C is built, the same bits) keyed by a seed drawn from torch's
    default generator, so ``torch.manual_seed`` reproduces it, whatever the backend. On other
    devices it is ``torch.rand(M, K) >= p`` there. (torch.rand's CPU generator draws one float
    at a time on one thread; the Philox words are filled in SIMD lanes on every thread.)
    """
    rows, cols = x.shape[:-1].numel(), x.shape[-1]
    if x.device.type != "cpu":
        return torch.rand(rows, cols, device=x.device) >= p
    seed = torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)
    if _ext.load_error() is None:
        return torch.ops.gslora.dropout_mask(x, p, seed)
    return reference.dropout_keep_mask(x, p, seed)


def _group_backend(
    tensors: Sequence[Tensor], group_ids: Sequence[int], num_groups: int, backend: str | None
):
    """Validate the arguments of a group op and pick the backend that runs it."""
    if len(tensors) == 0:
        raise ValueError("tensors must not be empty")
    impl = select_backend(tensors[0].device, backend)
    if not impl.validates_inputs:
        # Only here: the compiled ops check the ids and every tensor in C++, and between a model's
        # forward and backward (cold interpreter caches) these Python loops would cost more than
        # the fused pass itself.
        _check_group_args(tensors, group_ids, num_groups)
    return impl


def _check_group_args(tensors: Sequence[Tensor], group_ids: Sequence[int], num_groups: int) -> None:
    """ValueError unless there is one id in [0, num_groups) per tensor and one float dtype and
    device for all tensors."""
    if len(group_ids) != len(tensors):
        raise ValueError(f"group_ids has {len(group_ids)} entries for {len(tensors)} tensors")
    if num_groups < 1 or min(group_ids) < 0 or max(group_ids) >= num_groups:
        raise ValueError(f"every group id must lie in [0, {num_groups})")
    device, dtype = tensors[0].device, tensors[0].dtype
    for i, t in enumerate(tensors):
        if not t.is_floating_point():
            raise ValueError(f"tensors[{i}] must be floating point, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"tensors[{i}] is on {t.device}, tensors[0] on {device}")
        if t.dtype != dtype:
            raise ValueError(
                f"tensors[{i}] has dtype {t.dtype}, tensors[0] {dtype}: one dtype per call"
            )


def group_sq_norms(
    tensors: Sequence[Tensor], group_ids: Sequence[int], num_groups: int, backend: str | None = None
) -> Tensor:
    """Σ‖θ_i‖² per group in one fused pass, [num_groups] in the accumulate dtype (no autograd)."""
    impl = _group_backend(tensors, group_ids, num_groups, backend)
    if impl.validates_inputs:  # the compiled op runs below autograd by itself
        return impl.group_sq_norms(tensors, group_ids, num_groups)
    with torch.no_grad():
        return impl.group_sq_norms(tensors, group_ids, num_groups)


def group_norms(
    tensors: Sequence[Tensor], group_ids: Sequence[int], num_groups: int, backend: str | None = None
) -> Tensor:
    """‖θ_g‖₂ per group, [num_groups] (no autograd)."""
    return group_sq_norms(tensors, group_ids, num_groups, backend).sqrt()


class GroupLassoPenaltyFunction(torch.autograd.Function):
    """P = Σ_g w_g ‖θ_g‖₂ over all groups, forward and backward each one fused pass.

    ∂P/∂θ_i = w_g θ_i / ‖θ_g‖₂ for θ_i in group g, and 0 where ‖θ_g‖₂ = 0 (the minimal-norm
    sub-gradient, never NaN). Backward computes c_g = grad · w_g / ‖θ_g‖ on the [G] vector and
    then every θ_i · c_g in one ``group_scale`` call.
    """

    @staticmethod
    def forward(ctx, group_ids, num_groups, weights, backend, *tensors):
        norms = backend.group_sq_norms(list(tensors), group_ids, num_groups).sqrt()
        ctx.save_for_backward(norms, weights, *tensors)
        ctx.group_ids, ctx.backend = group_ids, backend
        return (norms * weights.to(norms.dtype)).sum()

    @staticmethod
    def backward(ctx, grad):
        norms, weights, *tensors = ctx.saved_tensors
        coeffs = penalty_coeffs(grad.to(norms.dtype) * weights.to(norms.dtype), norms)
        grads = ctx.backend.group_scale(tensors, ctx.group_ids, coeffs)
        return (None, None, None, None, *grads)


def group_lasso_penalty(
    tensors: Sequence[Tensor],
    group_ids: Sequence[int],
    num_groups: int,
    weights: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """Differentiable Σ_g w_g ‖θ_g‖₂ (scalar, accumulate dtype); w_g = 1 by default."""
    # _group_backend and apply_group_lasso_penalty inlined: the penalty runs between a model's
    # forward and backward, when the interpreter's caches are cold and every Python frame is slow.
    if len(tensors) == 0:
        raise ValueError("tensors must not be empty")
    impl = select_backend(tensors[0].device, backend)
    if not impl.validates_inputs:
        _check_group_args(tensors, group_ids, num_groups)
    if weights is not None:
        weights = _penalty_weights(tensors, num_groups, weights)
    fused = getattr(impl, "group_lasso_penalty", None)
    if fused is not None:
        return fused(tensors, group_ids, num_groups, weights)
    return _unfused_penalty(impl, tensors, group_ids, num_groups, weights)


def _penalty_weights(tensors: Sequence[Tensor], num_groups: int, weights: Tensor) -> Tensor:
    """w_g checked for shape and moved to the tensors' device and accumulate dtype."""
    if weights.shape != (num_groups,):
        raise ValueError(f"weights must have shape [{num_groups}], got {tuple(weights.shape)}")
    return weights.to(tensors[0].device, reference.accumulate_dtype(tensors[0].dtype))


# Writes .grad, a side effect a traced graph cannot hold: torch.compile runs it eagerly, between
# graphs, like an optimizer step.
@torch.compiler.disable
def add_group_lasso_grad_(
    tensors: Sequence[Tensor],
    group_ids: Sequence[int],
    num_groups: int,
    alpha: float = 1.0,
    weights: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """Add α·∂P/∂θ to every tensor's ``.grad`` and return P = Σ_g w_g ‖θ_g‖₂, without autograd.

    The gradient is that of ``(alpha * group_lasso_penalty(...)).backward()``, α·w_g·θ_i/‖θ_g‖₂
    (0 for a zero group), added in place to an existing ``.grad`` or stored as a new one where
    ``.grad`` is None: a gradient transform for the step between ``loss.backward()`` and
    ``optimizer.step()``, like ``clip_grad_norm_``. On the ``cpu`` backend it is one fused pass
    per group (the norm, then the gradient while the group is in cache) with no autograd graph
    and no gradient tensors to accumulate; elsewhere ``group_sq_norms`` then ``group_scale``.
    Gradient hooks do not see this contribution, and it is not loss-scaled (with a GradScaler,
    call it after ``scaler.unscale_``). List each tensor once. P is detached, a scalar in the
    accumulate dtype.
    """
    impl = _group_backend(tensors, group_ids, num_groups, backend)
    alpha = float(alpha)
    if not (alpha >= 0 and alpha != float("inf")):  # also rejects NaN
        raise ValueError(f"alpha must be finite and >= 0, got {alpha}")
    if weights is not None:
        weights = _penalty_weights(tensors, num_groups, weights)
    fused = getattr(impl, "add_group_lasso_grad_", None)
    if fused is not None:
        return fused(tensors, group_ids, num_groups, weights, alpha)
    with torch.no_grad():
        detached = [t.detach() for t in tensors]
        norms = impl.group_sq_norms(detached, group_ids, num_groups).sqrt()
        w = torch.ones_like(norms) if weights is None else weights
        coeffs = penalty_coeffs(alpha * w, norms)
        add_to_grads_(tensors, impl.group_scale(detached, group_ids, coeffs))
        return (w * norms).sum()


def penalty_coeffs(numerators: Tensor, norms: Tensor) -> Tensor:
    """c_g = numerators_g / ‖θ_g‖ (the penalty's backward: grad · w_g / ‖θ_g‖), and 0 for zero
    groups, the minimal-norm sub-gradient (no 0/0)."""
    return torch.where(norms > 0, numerators / torch.where(norms > 0, norms, 1), 0)


def add_to_grads_(tensors: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    """t.grad += g for every pair (t.grad = g where it is None); no autograd."""
    for t, g in zip(tensors, grads, strict=True):
        if t.grad is None:
            t.grad = g
        else:
            t.grad.add_(g)


def apply_group_lasso_penalty(
    impl, tensors: Sequence[Tensor], group_ids: Sequence[int], num_groups: int,
    weights: Tensor | None,
) -> Tensor:
    """The penalty on backend ``impl`` with validated arguments and ``weights`` [num_groups] in
    the accumulate dtype (None: all 1): the backend's own autograd-aware op where it has one."""
    fused = getattr(impl, "group_lasso_penalty", None)
    if fused is not None:
        # The op takes None for w_g = 1: no [G] tensor of ones to build per call, a factory call
        # that is slow once the interpreter's caches are cold (as they are after a forward).
        return fused(tensors, group_ids, num_groups, weights)
    return _unfused_penalty(impl, tensors, group_ids, num_groups, weights)


def _unfused_penalty(impl, tensors, group_ids, num_groups, weights):
    """GroupLassoPenaltyFunction over the backend's group ops, for backends without a penalty op."""
    if weights is None:
        weights = torch.ones(num_groups, dtype=reference.accumulate_dtype(tensors[0].dtype),
                             device=tensors[0].device)
    return GroupLassoPenaltyFunction.apply(tuple(group_ids), num_groups, weights, impl, *tensors)


def group_prox_(
    tensors: Sequence[Tensor],
    group_ids: Sequence[int],
    num_groups: int,
    thresholds: Tensor | float,
    backend: str | None = None,
) -> Tensor:
    """In place θ_g ← θ_g·max(0, 1 − λ_g/‖θ_g‖₂) in one fused pass; returns norms before.

    ``thresholds`` is λ_g = lr·α·w_g, a float (all groups) or a [num_groups] tensor. Like an
    optimizer step it runs outside autograd (and bumps the tensors' version counters).
    """
    # _group_backend inlined, and the compiled op reached first: like the penalty, the prox runs
    # after a backward pass has evicted the interpreter's caches, when every frame is slow.
    if len(tensors) == 0:
        raise ValueError("tensors must not be empty")
    impl = select_backend(tensors[0].device, backend)
    is_tensor = isinstance(thresholds, Tensor)
    if impl.validates_inputs and is_tensor:  # thresholds checked in C++
        return impl.group_prox_(tensors, group_ids, num_groups, thresholds)
    if not impl.validates_inputs:
        _check_group_args(tensors, group_ids, num_groups)
    if not is_tensor:
        if thresholds < 0:
            raise ValueError(f"thresholds must be >= 0, got {thresholds}")
        acc = reference.accumulate_dtype(tensors[0].dtype)
        thresholds = torch.full((num_groups,), float(thresholds), dtype=acc,
                                device=tensors[0].device)
    if impl.validates_inputs:
        return impl.group_prox_(tensors, group_ids, num_groups, thresholds)
    if thresholds.shape != (num_groups,):
        raise ValueError(f"thresholds must have shape [{num_groups}], got {tuple(thresholds.shape)}")
    thresholds = thresholds.to(tensors[0].device, reference.accumulate_dtype(tensors[0].dtype))
    with torch.no_grad():
        return impl.group_prox_(tensors, group_ids, num_groups, thresholds)

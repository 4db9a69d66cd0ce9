"""Group sparsity for GS-LoRA: group norms, the group-lasso penalty, the proximal step, the
sparsity schedules of the paper and a proximal optimizer wrapper.

A *group* is a named list of tensors (by default the four LoRA tensors of one Transformer
block, ``{fc1.A, fc1.B, fc2.A, fc2.B}``); ‖θ_g‖₂ is the L2 norm of the concatenation of its
tensors. :class:`GroupSparsity` precomputes, once, the flat tensor list and the group id of
every tensor, so that every operation over *all* groups of a model is one call of the fused
backend op (:mod:`gslora.backends`) per parameter dtype, with no Python loop of kernel launches
over tensors or groups. Parameters are used in place, never copied or re-wrapped: optimizers,
state dicts and hooks that hold them keep working.

Mixed dtypes. The fused ops take one dtype per call. Tensors are therefore bucketed by dtype
(in order of first appearance); each bucket contributes partial squared norms Σ‖θ_i‖² per group
(accumulated in float32, or float64 for float64 tensors) and the partial sums are added. Norms,
thresholds and coefficients live in the widest accumulate dtype (float64 if any tensor is
float64, else float32). With a single dtype and no process group, the prox is the single fused
``group_prox_`` pass; otherwise it is ``sq_norms → (all-reduce) → one group_scale per bucket →
torch._foreach_copy_`` with the formula of ``reference.group_prox_`` (identical bits on the
``torch`` backend; on kernel backends the two paths may differ by summation-order rounding).

Distributed training. With ``process_group`` the tensors are taken to be *shards* (e.g. FSDP):
per-group squared norms are partial sums that are all-reduced (SUM) over the process group
before the square root, for :meth:`~GroupSparsity.norms`, :meth:`~GroupSparsity.penalty` and
:meth:`~GroupSparsity.prox_`. Every rank then sees the same norms, the same penalty value and
shrinks its shard by the same factor; the penalty gradient w.r.t. a local shard is exact and
needs no communication. For replicated parameters (plain DDP) pass no process group: every rank
already holds the whole group.

DTensor parameters (FSDP2's ``fully_shard``, or any other sharding) need no process group: the
kernels run on their local shards, and the partial sums are all-reduced over the device-mesh
dimensions on which the tensors are sharded (``Shard`` placements; ``Replicate`` dimensions
already hold the whole tensor). All tensors must then be DTensors on one mesh, sharded on the
same mesh dimensions. The penalty's gradient reaches the DTensors as DTensor gradients, and
``add_penalty_grad_`` adds to their local shards. Build the :class:`GroupSparsity` (like the
optimizer) after ``fully_shard``, which replaces the module parameters.

Proximal step. For the objective f(θ) + α Σ_g w_g ‖θ_g‖₂, a gradient step of size η on f is
followed by block soft-thresholding with λ_g = η·α·w_g::

    θ_g ← θ_g · max(0, 1 − λ_g / ‖θ_g‖₂)

which sets groups with ‖θ_g‖₂ ≤ λ_g to exact zeros (real group selection, unlike the paper's
sub-gradient on the penalty, which only shrinks). For SGD this is exact proximal gradient; after
an adaptive optimizer (AdamW) it is the usual heuristic with the current learning rate as η.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import _get_scalar_dtype

from ._dtensor import dtensor_type, is_dtensor
from .backends import select_backend
from .functional import (
    add_group_lasso_grad_,
    add_to_grads_,
    apply_group_lasso_penalty,
    penalty_coeffs,
)
from .reference import accumulate_dtype

__all__ = [
    "GroupSparsity",
    "ProxResult",
    "SparsitySchedule",
    "SparsityWarmup",
    "AdaptiveSparsity",
    "ProxOptimizer",
]

GroupsArg = Mapping[str, Sequence[Tensor]] | Sequence[tuple[str, Sequence[Tensor]]]


@dataclass(frozen=True)
class ProxResult:
    """What one proximal step did. All fields are [num_groups] tensors on the parameters'
    device (no host synchronisation is needed to produce them).

    Attributes:
        norms_before: ‖θ_g‖₂ before the step (accumulate dtype).
        norms_after: max(‖θ_g‖₂ − λ_g, 0), the exact-arithmetic norm after the step (the
            stored low-precision values may differ by rounding; zero groups are exactly 0).
        thresholds: λ_g = lr_g · α · w_g used by the step.
        zero: bool, True for the groups that are exactly zero after the step
            (‖θ_g‖₂ ≤ λ_g, which includes groups that were already zero).
    """

    norms_before: Tensor
    norms_after: Tensor
    thresholds: Tensor
    zero: Tensor

    @property
    def num_zero(self) -> int:
        """Number of exactly-zero groups after the step (one host synchronisation)."""
        return int(self.zero.sum().item())


class _Bucket:
    """The tensors of one dtype: their positions in the flat list and their group ids."""

    __slots__ = ("dtype", "positions", "group_ids")

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.positions: list[int] = []
        self.group_ids: list[int] = []


def _mesh_shard_groups(params: Sequence[Tensor], flags: Sequence[bool],
                       process_group: Any) -> list[Any]:
    """The process groups of the device-mesh dimensions on which the DTensors ``params`` are
    sharded (every tensor a DTensor, one mesh, the same sharded dimensions)."""
    if not all(flags):
        raise ValueError(
            f"tensor {flags.index(False)} is not a DTensor, but tensor {flags.index(True)} is: "
            f"either every tensor is a DTensor (sharded, e.g. by FSDP2's fully_shard) or none"
        )
    if process_group is not None:
        raise ValueError("process_group must be None for DTensors: the process groups of their "
                         "device mesh are used")
    mesh = params[0].device_mesh
    sharded = tuple(p.is_shard() for p in params[0].placements)
    for i, t in enumerate(params):
        if any(p.is_partial() for p in t.placements):
            raise ValueError(
                f"tensor {i} has a Partial placement {t.placements}: its local tensors are "
                f"summands, and the norm of a sum is not the sum of the norms; redistribute it"
            )
        if t.device_mesh != mesh or tuple(p.is_shard() for p in t.placements) != sharded:
            raise ValueError(
                f"tensor {i} lives on {t.device_mesh} with placements {t.placements}, tensor 0 "
                f"on {mesh} with {params[0].placements}: the tensors must be sharded on the "
                f"same dimensions of one device mesh"
            )
    return [mesh.get_group(d) for d, is_shard in enumerate(sharded) if is_shard]


class _MultiBucketPenaltyFunction(torch.autograd.Function):
    """P = Σ_g w_g ‖θ_g‖₂ where ‖θ_g‖² is summed over dtype buckets (and over ranks).

    Forward: one fused ``group_sq_norms`` per bucket, sum, optional all-reduce, sqrt.
    Backward: ∂P/∂θ_i = grad · w_g · θ_i / ‖θ_g‖ (0 where ‖θ_g‖ = 0, never NaN), computed as
    c_g = grad·w_g/‖θ_g‖ on the [G] vector and one ``group_scale`` per bucket. The gradient for a
    local shard uses the global norm and is exact without communication.
    """

    @staticmethod
    def forward(ctx, sparsity: GroupSparsity, weights: Tensor, *tensors: Tensor) -> Tensor:
        norms = sparsity._sq_norms_of(tensors).sqrt()
        ctx.save_for_backward(norms, weights, *tensors)
        ctx.sparsity = sparsity
        return (norms * weights).sum()

    @staticmethod
    def backward(ctx, grad: Tensor):
        norms, weights, *tensors = ctx.saved_tensors
        coeffs = penalty_coeffs(grad.to(norms.dtype) * weights, norms)
        grads = ctx.sparsity._scaled(tensors, coeffs)
        return (None, None, *grads)


class GroupSparsity:
    """Group-lasso machinery over named groups of (LoRA) tensors, all groups in one pass.

    Args:
        groups: ordered mapping ``name -> list of tensors`` (what
            :func:`gslora.surgery.lora_groups` returns) or a sequence of ``(name, tensors)``
            pairs. Every group must be non-empty; a tensor may belong to one group only; all
            tensors must be floating point (fp64, fp32, bf16, fp16; mixing is allowed) and on one
            device.
        weights: per-group weights w_g: None (all 1, the paper), ``"sqrt_size"`` (√ of the
            group's number of elements, the classical group-lasso weighting; with a process
            group, the global size), or a [num_groups] tensor / sequence of finite floats >= 0.
        backend: force a kernel backend (see :mod:`gslora.backends`); None chooses by device
            (and ``$GSLORA_BACKEND``).
        process_group: a ``torch.distributed`` process group over which the tensors are
            sharded; per-group squared norms are all-reduced (SUM) over it before the sqrt.
            None: tensors are whole (single process or replicated DDP), or DTensors, whose
            device mesh gives the process groups.

    Shapes: ``norms()``, ``weights`` and every :class:`ProxResult` field are [num_groups],
    in the accumulate dtype, on the tensors' device; ``penalty()`` is a scalar.

    If the parameters are later moved to another device or cast to another dtype *all
    together* (``model.to(...)``), this is detected on the next call; after changing the dtype
    of only some of them, call :meth:`refresh`.
    """

    def __init__(
        self,
        groups: GroupsArg,
        weights: None | str | Tensor | Sequence[float] = None,
        backend: str | None = None,
        process_group: Any = None,
    ) -> None:
        items = list(groups.items()) if isinstance(groups, Mapping) else list(groups)
        if not items:
            raise ValueError("groups must contain at least one group, got none")
        names: list[str] = []
        params: list[Tensor] = []
        group_ids: list[int] = []
        seen: dict[int, str] = {}
        for g, item in enumerate(items):
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise TypeError(
                    f"groups must be a mapping name -> tensors or a sequence of (name, tensors) "
                    f"pairs, got element {g} of type {type(item).__name__}"
                )
            name, tensors = item
            if not isinstance(name, str):
                raise TypeError(f"group names must be str, got {name!r} for group {g}")
            if name in names:
                raise ValueError(f"group name {name!r} appears twice in groups")
            if isinstance(tensors, Tensor):
                raise TypeError(
                    f"group {name!r} must be a list of tensors, got a single tensor; wrap it: [t]"
                )
            tensors = list(tensors)
            if not tensors:
                raise ValueError(f"group {name!r} is empty: every group needs at least one tensor")
            for j, t in enumerate(tensors):
                if not isinstance(t, Tensor):
                    raise TypeError(f"group {name!r} entry {j} is a {type(t).__name__}, not a Tensor")
                if not t.is_floating_point():
                    raise ValueError(
                        f"group {name!r} entry {j} has dtype {t.dtype}; group sparsity needs "
                        f"floating-point tensors"
                    )
                if id(t) in seen:
                    raise ValueError(
                        f"group {name!r} entry {j} is already in group {seen[id(t)]!r}: a tensor "
                        f"may belong to one group only (it would be shrunk twice)"
                    )
                seen[id(t)] = name
                params.append(t)
                group_ids.append(g)
            names.append(name)
        self.names: list[str] = names
        self.params: tuple[Tensor, ...] = tuple(params)
        self.group_ids: list[int] = group_ids
        self.num_groups: int = len(names)
        self.process_group = process_group
        flags = [is_dtensor(t) for t in params]
        self._dtensors = any(flags)
        # The process groups over which the per-group partial sums are all-reduced, in turn.
        self._reduce_groups: list[Any] = (
            _mesh_shard_groups(params, flags, process_group) if self._dtensors
            else [] if process_group is None else [process_group]
        )
        self._backend_request = backend
        self._layout: tuple[torch.device, torch.dtype] | None = None
        self.refresh()

        local_sizes = torch.zeros(self.num_groups, dtype=torch.int64)
        with torch.no_grad():
            for t, g in zip(self._local(self.params), self.group_ids, strict=True):
                local_sizes[g] += t.numel()
        sizes = self._all_reduce(local_sizes.to(self.device)).cpu()
        for name, size in zip(self.names, sizes.tolist(), strict=True):
            if size == 0:
                raise ValueError(f"group {name!r} is empty: its tensors have no elements")
        self.sizes: list[int] = [int(s) for s in sizes.tolist()]
        self._weights_master = self._make_weights(weights)
        self._weights: Tensor | None = None

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        group_by: str | Callable[..., Any] | None = None,
        weights: None | str | Tensor | Sequence[float] = None,
        backend: str | None = None,
        process_group: Any = None,
    ) -> GroupSparsity:
        """Groups of the LoRA tensors of ``model`` as given by
        :func:`gslora.surgery.lora_groups` (``group_by``: "block" — one group per Transformer
        block, the paper —, "module" — one per LoRA module {A, B} —, "tensor", a callable, or
        None for the grouping chosen when the adapters were added)."""
        from .surgery import lora_groups  # lazy: model surgery is not needed for the math

        return cls(lora_groups(model, group_by=group_by), weights=weights, backend=backend,
                   process_group=process_group)

    def _make_weights(self, weights: None | str | Tensor | Sequence[float]) -> Tensor:
        """Per-group weights as a float64 CPU master copy, validated."""
        G = self.num_groups
        if weights is None:
            return torch.ones(G, dtype=torch.float64)
        if isinstance(weights, str):
            if weights != "sqrt_size":
                raise ValueError(f"weights must be None, 'sqrt_size' or a tensor, got {weights!r}")
            return torch.tensor(self.sizes, dtype=torch.float64).sqrt()
        w = torch.as_tensor(weights).detach().to("cpu", torch.float64)
        if w.shape != (G,):
            raise ValueError(f"weights must have shape [{G}] (one per group), got {tuple(w.shape)}")
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError(f"weights must be finite and >= 0, got {w.tolist()}")
        return w

    def refresh(self) -> None:
        """Rebuild the device check, dtype buckets and backend choice from the parameters' current
        devices and dtypes (needed only after casting *some* of them to another dtype)."""
        device = self.params[0].device
        buckets: dict[torch.dtype, _Bucket] = {}
        for i, (t, g) in enumerate(zip(self.params, self.group_ids, strict=True)):
            if t.device != device:
                raise ValueError(
                    f"all tensors must be on one device: group {self.names[g]!r} has a tensor on "
                    f"{t.device}, the first tensor is on {device}"
                )
            bucket = buckets.setdefault(t.dtype, _Bucket(t.dtype))
            bucket.positions.append(i)
            bucket.group_ids.append(g)
        self.device: torch.device = device
        self._buckets: list[_Bucket] = list(buckets.values())
        self.acc_dtype: torch.dtype = (
            torch.float64 if torch.float64 in buckets else torch.float32
        )
        self._impl = select_backend(device, self._backend_request)
        # One dtype and whole plain tensors: norms + shrink in the single fused group_prox_ pass.
        self._fused = len(self._buckets) == 1 and not self._reduce_groups and not self._dtensors
        self._layout = (device, self.params[0].dtype)
        self._ids_tuple = tuple(self.group_ids)  # hashable, as the autograd Function keeps it
        self._weights = None

    def _check_layout(self) -> None:
        first = self.params[0]
        if (first.device, first.dtype) != self._layout:
            self.refresh()

    # ------------------------------------------------------------------ properties
    @property
    def backend(self) -> str:
        """Name of the backend serving this object's ops."""
        self._check_layout()
        return self._impl.name

    @property
    def weights(self) -> Tensor:
        """w_g, [num_groups] in the accumulate dtype on the tensors' device."""
        self._check_layout()
        if self._weights is None:
            self._weights = self._weights_master.to(self.device, self.acc_dtype)
        return self._weights

    def __len__(self) -> int:
        return self.num_groups

    def __repr__(self) -> str:
        dtypes = ", ".join(str(b.dtype).removeprefix("torch.") for b in self._buckets)
        dist = ", distributed" if self._reduce_groups else ""
        return (f"GroupSparsity({self.num_groups} groups, {len(self.params)} tensors, "
                f"{sum(self.sizes)} elements, {dtypes}, backend={self._impl.name!r}{dist})")

    # ------------------------------------------------------------------ core ops
    def _all_reduce(self, t: Tensor) -> Tensor:
        if self._reduce_groups:
            import torch.distributed as dist

            for group in self._reduce_groups:
                dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t

    def _local(self, tensors: Sequence[Tensor]) -> Sequence[Tensor]:
        """The tensors as the kernels take them: a DTensor's local shard (under no_grad the
        shard itself, written in place by the prox; under autograd a view whose gradient
        flows back as the DTensor's)."""
        if not self._dtensors:
            return tensors
        return [t.to_local() if is_dtensor(t) else t for t in tensors]

    def _add_to_grads(self, grads: Sequence[Tensor]) -> None:
        """t.grad += g for every parameter t (local shards g for DTensors); no autograd."""
        if not self._dtensors:
            return add_to_grads_(self.params, grads)
        dtensor = dtensor_type()
        for t, g in zip(self.params, grads, strict=True):
            if t.grad is None:
                t.grad = dtensor.from_local(g, t.device_mesh, t.placements, run_check=False,
                                            shape=t.shape, stride=t.stride())
            else:
                t.grad.to_local().add_(g)

    def _bucket_tensors(self, tensors: Sequence[Tensor], bucket: _Bucket) -> list[Tensor]:
        return [tensors[i] for i in bucket.positions]

    def _sq_norms_of(self, tensors: Sequence[Tensor]) -> Tensor:
        """Σ‖θ_i‖² per group over all buckets (and ranks), [G] in the accumulate dtype."""
        tensors = self._local(tensors)
        total: Tensor | None = None
        for bucket in self._buckets:
            part = self._impl.group_sq_norms(
                [tensors[i].detach() for i in bucket.positions], bucket.group_ids, self.num_groups
            ).to(self.acc_dtype)
            total = part if total is None else total + part
        assert total is not None  # at least one bucket: groups are non-empty
        return self._all_reduce(total)

    def _scaled(self, tensors: Sequence[Tensor], coeffs: Tensor) -> list[Tensor]:
        """θ_i · c_{g(i)} for every tensor (out of place, each in its own dtype), one
        ``group_scale`` call per bucket, in the flat order (local shards for DTensors)."""
        tensors = self._local(tensors)
        out: list[Tensor | None] = [None] * len(tensors)
        for bucket in self._buckets:
            scaled = self._impl.group_scale(
                [tensors[i].detach() for i in bucket.positions], bucket.group_ids,
                coeffs.to(accumulate_dtype(bucket.dtype)),
            )
            for i, s in zip(bucket.positions, scaled, strict=True):
                out[i] = s
        return out  # type: ignore[return-value]

    def sq_norms(self) -> Tensor:
        """Σ_{i∈g} ‖θ_i‖² per group, [num_groups] in the accumulate dtype (no autograd)."""
        self._check_layout()
        return self._sq_norms_of(self.params)

    def norms(self) -> Tensor:
        """‖θ_g‖₂ per group, [num_groups] in the accumulate dtype (no autograd)."""
        return self.sq_norms().sqrt()

    def zero_mask(self) -> Tensor:
        """[num_groups] bool: True for groups that are exactly zero."""
        return self.sq_norms() == 0

    def penalty(self) -> Tensor:
        """Σ_g w_g ‖θ_g‖₂ as a differentiable scalar (accumulate dtype).

        Its backward adds w_g·θ_i/‖θ_g‖ (times the incoming gradient) to every tensor's grad in
        one fused pass per dtype; for a group with ‖θ_g‖ = 0 the sub-gradient is 0, never NaN.
        """
        self._check_layout()
        if self._fused:
            return apply_group_lasso_penalty(
                self._impl, self.params, self._ids_tuple, self.num_groups, self.weights
            )
        return _MultiBucketPenaltyFunction.apply(self, self.weights, *self._local(self.params))

    @torch.compiler.disable  # writes .grad: run eagerly between compiled graphs
    def add_penalty_grad_(self, alpha: float = 1.0) -> Tensor:
        """Add α·∂/∂θ Σ_g w_g ‖θ_g‖₂ to every tensor's ``.grad`` (created where None) and return
        the penalty, detached.

        The gradient of ``(alpha * self.penalty()).backward()`` without autograd: call it between
        ``loss.backward()`` and ``optimizer.step()`` instead of adding ``alpha * penalty()`` to
        the loss. With one dtype on the ``cpu`` backend it is one fused pass per group, writing
        ``.grad`` in place; otherwise one norm pass (and the all-reduce) and one scale per dtype.
        Under DDP the contribution is added after the gradients' all-reduce, which is right: it
        is the same on every rank. With a ``GradScaler``, call it after
        ``scaler.unscale_(optimizer)``: the added gradient is not scaled. Gradient hooks do not
        see it.
        """
        self._check_layout()
        alpha = _check_nonneg_float(alpha, "alpha")
        if self._fused:
            return add_group_lasso_grad_(self.params, self._ids_tuple, self.num_groups, alpha,
                                         self.weights, backend=self._backend_request)
        with torch.no_grad():
            norms = self._sq_norms_of(self.params).sqrt()
            coeffs = penalty_coeffs(alpha * self.weights, norms)
            self._add_to_grads(self._scaled(self.params, coeffs))
            return (norms * self.weights).sum()

    def thresholds(self, lr: float | Tensor, alpha: float) -> Tensor:
        """λ_g = lr_g · α · w_g, [num_groups]; ``lr`` is a float or a [num_groups] tensor."""
        self._check_layout()
        alpha = _check_nonneg_float(alpha, "alpha")
        if isinstance(lr, Tensor) and lr.numel() != 1:
            if lr.shape != (self.num_groups,):
                raise ValueError(
                    f"lr must be a float or a [{self.num_groups}] tensor (one per group), "
                    f"got shape {tuple(lr.shape)}"
                )
            lr_t = lr.detach().to(self.device, self.acc_dtype)
            if not bool(torch.isfinite(lr_t).all()) or bool((lr_t < 0).any()):
                raise ValueError(f"lr must be finite and >= 0, got {lr_t.tolist()}")
            return lr_t * alpha * self.weights
        lr_f = _check_nonneg_float(float(lr), "lr")
        return self.weights * (lr_f * alpha)

    @torch.no_grad()
    def prox_(self, lr: float | Tensor, alpha: float) -> ProxResult:
        """In-place block soft-thresholding θ_g ← θ_g·max(0, 1 − λ_g/‖θ_g‖₂), λ_g = lr·α·w_g.

        Groups with ‖θ_g‖₂ ≤ λ_g become exact zeros. ``lr`` is the step size of the gradient step
        that preceded (a float, or a [num_groups] tensor of per-group step sizes).
        """
        lam = self.thresholds(lr, alpha)
        if self._fused:
            bucket = self._buckets[0]
            norms = self._impl.group_prox_(
                list(self.params), bucket.group_ids, self.num_groups, lam
            ).to(self.acc_dtype)
        else:
            norms = self._sq_norms_of(self.params).sqrt()
            # The formula of reference.group_prox_ (identical bits on the torch backend).
            factor = torch.where(norms > lam, 1 - lam / torch.where(norms > 0, norms, 1), 0)
            for bucket in self._buckets:
                tensors = self._local(self._bucket_tensors(self.params, bucket))
                scaled = self._impl.group_scale(
                    tensors, bucket.group_ids, factor.to(accumulate_dtype(bucket.dtype))
                )
                torch._foreach_copy_(tensors, scaled)
        keep = norms > lam
        return ProxResult(
            norms_before=norms,
            norms_after=torch.where(keep, norms - lam, 0),
            thresholds=lam,
            zero=~keep,
        )

    # ------------------------------------------------------------------ logging
    def stats(self, result: ProxResult | None = None) -> dict[str, Any]:
        """Cheap statistics for progress bars and reports (one norm pass, one host copy).

        With ``result`` (the last :meth:`prox_`), its after-step norms are reported instead and
        no pass over the tensors is made. Returns a dict with ``num_groups``, ``zero_groups``
        (count of exactly-zero groups), ``zero_group_names``, ``norms`` (name -> ‖θ_g‖₂) and
        ``penalty`` (Σ_g w_g ‖θ_g‖₂).
        """
        if result is None:
            norms = self.norms()
            zero = norms == 0
        else:
            norms, zero = result.norms_after, result.zero
        norms_list = norms.tolist()
        zero_list = zero.tolist()
        return {
            "num_groups": self.num_groups,
            "zero_groups": int(sum(zero_list)),
            "zero_group_names": [n for n, z in zip(self.names, zero_list, strict=True) if z],
            "norms": dict(zip(self.names, norms_list, strict=True)),
            "penalty": float(sum(w * n for w, n in zip(self._weights_master.tolist(), norms_list, strict=True))),
        }


def _check_nonneg_float(value: Any, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return v


# ---------------------------------------------------------------------- schedules
class SparsitySchedule(ABC):
    """The sparsity strength α per optimizer step. Protocol used by :class:`ProxOptimizer`:
    read :attr:`alpha` (the value for the coming step), run the step, then call
    :meth:`step` with the step's :class:`ProxResult` (None when no prox ran).
    ``state_dict()`` holds plain numbers only (safe with ``torch.load(weights_only=True)``).
    """

    @property
    @abstractmethod
    def alpha(self) -> float:
        """α for the coming step (>= 0)."""

    @abstractmethod
    def step(self, result: ProxResult | None = None) -> None:
        """Advance by one optimizer step, observing what its prox did (None: no prox ran)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Progress state (plain numbers) to resume the schedule."""

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class SparsityWarmup(SparsitySchedule):
    """The paper's hard step: α = 0 for the first ``warmup_steps`` steps, then ``alpha``.

    The paper counts epochs; pass ``warmup_epochs * steps_per_epoch``. ``warmup_steps = 0``
    is a constant α.
    """

    def __init__(self, alpha: float, warmup_steps: int = 0) -> None:
        self.target_alpha = _check_nonneg_float(alpha, "alpha")
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps
        self.num_steps = 0

    @property
    def alpha(self) -> float:
        return 0.0 if self.num_steps < self.warmup_steps else self.target_alpha

    def step(self, result: ProxResult | None = None) -> None:
        self.num_steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.num_steps = int(state["num_steps"])

    def __repr__(self) -> str:
        return f"SparsityWarmup(alpha={self.target_alpha}, warmup_steps={self.warmup_steps})"


class AdaptiveSparsity(SparsitySchedule):
    """α steered towards a target number of exactly-zero groups.

    Rule: α = 0 for the first ``warmup_steps`` steps; then α starts at ``alpha`` and, every
    ``interval`` steps, looks at the number z of exactly-zero groups after the last prox:
    z < target → α ← min(α·growth, max_alpha); z > target → α ← max(α/growth, min_alpha);
    z = target → α unchanged. (A multiplicative bang-bang controller: α grows geometrically
    until enough groups are zero, and backs off if too many are, which lets the proximal step
    revive groups whose loss gradient exceeds α.) Reading z costs one host synchronisation per
    interval.

    Args:
        alpha: initial α after warm-up (> 0).
        target_zero_groups: the number of zero groups to reach (>= 0).
        warmup_steps: steps with α = 0 first.
        growth: multiplicative factor (> 1).
        interval: steps between adjustments (>= 1).
        min_alpha, max_alpha: bounds for α (default alpha·1e-3 and alpha·1e3).
    """

    def __init__(
        self,
        alpha: float,
        target_zero_groups: int,
        warmup_steps: int = 0,
        growth: float = 1.5,
        interval: int = 1,
        min_alpha: float | None = None,
        max_alpha: float | None = None,
    ) -> None:
        alpha = _check_nonneg_float(alpha, "alpha")
        if alpha == 0:
            raise ValueError("alpha must be > 0 for AdaptiveSparsity (it is scaled multiplicatively)")
        if not isinstance(target_zero_groups, int) or target_zero_groups < 0:
            raise ValueError(f"target_zero_groups must be an integer >= 0, got {target_zero_groups!r}")
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if not (math.isfinite(growth) and growth > 1):
            raise ValueError(f"growth must be a finite number > 1, got {growth!r}")
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an integer >= 1, got {interval!r}")
        self.min_alpha = _check_nonneg_float(alpha * 1e-3 if min_alpha is None else min_alpha,
                                             "min_alpha")
        self.max_alpha = _check_nonneg_float(alpha * 1e3 if max_alpha is None else max_alpha,
                                             "max_alpha")
        if not self.min_alpha <= alpha <= self.max_alpha:
            raise ValueError(
                f"need min_alpha <= alpha <= max_alpha, got {self.min_alpha}, {alpha}, {self.max_alpha}"
            )
        if self.min_alpha == 0:
            raise ValueError("min_alpha must be > 0 (α is scaled multiplicatively)")
        self.target_zero_groups = target_zero_groups
        self.warmup_steps = warmup_steps
        self.growth = float(growth)
        self.interval = interval
        self.current_alpha = alpha
        self.num_steps = 0

    @property
    def alpha(self) -> float:
        return 0.0 if self.num_steps < self.warmup_steps else self.current_alpha

    def step(self, result: ProxResult | None = None) -> None:
        self.num_steps += 1
        active = self.num_steps - self.warmup_steps
        if active <= 0 or active % self.interval != 0 or result is None:
            return
        z = result.num_zero
        if z < self.target_zero_groups:
            self.current_alpha = min(self.current_alpha * self.growth, self.max_alpha)
        elif z > self.target_zero_groups:
            self.current_alpha = max(self.current_alpha / self.growth, self.min_alpha)

    def state_dict(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps, "current_alpha": self.current_alpha}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.num_steps = int(state["num_steps"])
        self.current_alpha = float(state["current_alpha"])

    def __repr__(self) -> str:
        return (f"AdaptiveSparsity(alpha={self.current_alpha}, target_zero_groups="
                f"{self.target_zero_groups}, warmup_steps={self.warmup_steps}, "
                f"growth={self.growth}, interval={self.interval})")


# ---------------------------------------------------------------------- optimizer
class ProxOptimizer(torch.optim.Optimizer):
    """Wraps any torch optimizer: ``step()`` runs the inner step, then the proximal step
    ``sparsity.prox_(lr, α)`` (threshold λ_g = lr·α·w_g), then advances the schedule.

    ``lr`` is the current learning rate of the optimizer param group that holds the group's
    tensors (so LR schedulers, which mutate ``param_groups[i]["lr"]``, are followed). A group
    whose tensors sit in several param groups must see equal learning rates there at each step.
    With α = 0 (e.g. during warm-up) the prox pass is skipped.

    It is an ``Optimizer`` (``isinstance`` holds, LR schedulers and GradScaler accept it) that
    shares ``param_groups``, ``state`` and ``defaults`` with the inner optimizer. Its
    ``state_dict()`` is the inner optimizer's plus a ``"prox"`` entry (schedule state, plain
    numbers); ``load_state_dict`` also accepts a plain inner state dict (schedule unchanged).

    Metric (``metric``). ``"euclidean"``: λ_g = lr·α·w_g, the prox in the plain Euclidean
    metric — exact proximal gradient after SGD. ``"adam"``: the prox in the metric of Adam's
    preconditioner. Adam's step is θ ← θ − lr·m̂/D with D = √v̂ + ε, i.e. the minimiser of a
    linear model plus (1/2lr)‖θ − θ₀‖²_D. Adding the group-lasso term in that same metric, the
    proximal step solves, per group, ``argmin_θ (d_g/2lr)‖θ − z_g‖² + α·w_g‖θ‖`` when D is
    replaced by a group constant d_g; its exact solution is block soft-thresholding of the
    Adam-updated z_g with threshold::

        λ_g = lr · α · w_g / d_g,   d_g = √(mean_{i∈g} v̂_i) + ε   (RMS of √v̂ over the group)

    with v̂ = exp_avg_sq / (1 − β₂^t) read from the inner optimizer's state. Why: Adam moves
    every coordinate by ~lr per step whatever its gradient scale, so with the Euclidean λ all
    groups grow at the same rate and the prox acts as a cliff in α (no group dies, or all do).
    In Adam's metric the threshold scales with 1/(gradient RMS), and a group survives only if
    its gradient pressure beats α — the SGD selection rule (zero iff ‖∇_g f‖ ≤ α·w_g) in
    Adam's units. Σv̂ per group is one fused ``group_sq_norms`` over √exp_avg_sq (per dtype
    bucket, all-reduced over the process group for sharded tensors, like the norms). Needs an
    Adam-family inner optimizer (Adam, AdamW, NAdam, RAdam: ``exp_avg_sq`` state, ``betas``,
    ``eps``); groups with a tensor that has no state yet (never received a gradient) use the
    Euclidean threshold for that step.

    Fused step (``fused``). When the inner optimizer is a plain ``torch.optim.AdamW`` over exactly
    the sparsity's tensors (one param group, no amsgrad / maximize) and the tensors share one
    dtype and are whole (no process group, no DTensors), ``step()`` runs AdamW and the prox as one
    ``adamw_prox_`` call (:mod:`gslora.reference` gives its math): per group, one pass updates θ, m
    and v and sums ‖θ_g‖² (and v for the Adam metric), then the group is shrunk while it is in
    cache — instead of AdamW's per-tensor ops followed by the prox's norm pass and scale pass.
    The optimizer state stays AdamW's own (``step``, ``exp_avg``, ``exp_avg_sq`` per tensor), so
    state dicts and LR schedulers work unchanged, and results equal the unfused path up to
    rounding. ``fused=None`` (default) fuses whenever possible on a backend with a fused kernel
    (``cpu`` and ``triton``; elsewhere ``adamw_prox_`` is the reference's math op by op, slower
    than AdamW's own step, foreach on CUDA, followed by the fused prox); ``True`` requires it
    (ValueError at construction, or RuntimeError at a step where a tensor has no gradient) and
    runs the reference's math where there is no kernel; ``False`` never fuses.

    Attributes:
        last_alpha: α used by the last step. last_result: its :class:`ProxResult` (None if the
        prox was skipped). last_step_fused: whether the last step took the fused path.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        sparsity: GroupSparsity,
        alpha: float | SparsitySchedule = 0.0,
        metric: str = "euclidean",
        fused: bool | None = None,
    ) -> None:
        if fused not in (None, True, False):
            raise TypeError(f"fused must be None, True or False, got {fused!r}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, ProxOptimizer):
            raise TypeError("optimizer is already a ProxOptimizer (the prox would run twice)")
        if not isinstance(sparsity, GroupSparsity):
            raise TypeError(f"sparsity must be a GroupSparsity, got {type(sparsity).__name__}")
        if isinstance(alpha, SparsitySchedule):
            schedule = alpha
        elif isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
            schedule = SparsityWarmup(float(alpha), 0)
        else:
            raise TypeError(f"alpha must be a float or a SparsitySchedule, got {type(alpha).__name__}")
        if metric not in ("euclidean", "adam"):
            raise ValueError(f"metric must be 'euclidean' or 'adam', got {metric!r}")
        if metric == "adam":
            missing = [k for k in ("betas", "eps") if k not in optimizer.defaults]
            if missing:
                raise ValueError(
                    f"metric='adam' needs an Adam-family optimizer (exp_avg_sq state, betas, eps); "
                    f"{type(optimizer).__name__} has no {' / '.join(missing)} setting"
                )
        self.optimizer = optimizer
        self.sparsity = sparsity
        self.schedule = schedule
        self.metric = metric
        self.fused = fused
        self.last_alpha = 0.0
        self.last_result: ProxResult | None = None
        self.last_step_fused = False
        # What Optimizer.__init__ would set, minus the param groups (shared with the inner one).
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self._map_param_groups()
        if fused and self._unfusable_reason is not None:
            raise ValueError(f"fused=True, but the step cannot be fused: {self._unfusable_reason}")

    def _map_param_groups(self) -> None:
        """For every sparsity group, the indices of the param groups holding its tensors."""
        where: dict[int, int] = {}
        for k, pg in enumerate(self.optimizer.param_groups):
            for p in pg["params"]:
                where[id(p)] = k
        pgs: list[set[int]] = [set() for _ in range(self.sparsity.num_groups)]
        for t, g in zip(self.sparsity.params, self.sparsity.group_ids, strict=True):
            k = where.get(id(t))
            if k is None:
                raise ValueError(
                    f"a tensor of group {self.sparsity.names[g]!r} is not in the optimizer's "
                    f"param groups: the prox would shrink a tensor the optimizer never updates"
                )
            pgs[g].add(k)
        self._pg_of_group = [sorted(s) for s in pgs]
        self._used_pgs = sorted(set().union(*pgs))
        self._split_groups = [g for g, s in enumerate(pgs) if len(s) > 1]
        # Index of one param group per sparsity group, for a per-group lr vector.
        self._pg_index = torch.tensor([s[0] for s in self._pg_of_group], dtype=torch.long)
        self._unfusable_reason = self._why_not_fused()
        self._state_lists: tuple[list[Tensor], list[Tensor], list[Tensor]] | None = None

    def _why_not_fused(self) -> str | None:
        """Why the fused AdamW + prox kernel cannot serve this optimizer (None: it can), from
        what stays fixed between steps."""
        opt, sp = self.optimizer, self.sparsity
        if type(opt) is not torch.optim.AdamW:
            return f"the inner optimizer is {type(opt).__name__}, not torch.optim.AdamW"
        if len(opt.param_groups) != 1:
            return "the inner optimizer has several param groups"
        pg = opt.param_groups[0]
        if pg.get("amsgrad") or pg.get("maximize") or pg.get("differentiable") or pg.get("capturable"):
            return "amsgrad, maximize, differentiable and capturable AdamW are not fused"
        if not pg.get("decoupled_weight_decay", True):  # AdamW is Adam with this flag set
            return "AdamW without decoupled weight decay is not fused"
        pg_ids = [id(p) for p in pg["params"]]
        if len(pg_ids) != len(sp.params) or set(pg_ids) != {id(t) for t in sp.params}:
            return "the inner optimizer's params are not exactly the sparsity's tensors"
        if len(sp._buckets) != 1 or sp._reduce_groups or sp._dtensors:
            return ("the tensors have several dtypes, are DTensors or are sharded over a process "
                    "group (the group norms need every partial sum before any tensor is shrunk)")
        return None

    # Shared with the inner optimizer (properties: its load_state_dict replaces the lists).
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def _lr(self) -> float | Tensor:
        """The step size per sparsity group: a float when all involved param groups agree."""
        pgs = self.optimizer.param_groups
        lrs = [float(pg["lr"]) for pg in pgs]
        for g in self._split_groups:
            vals = {lrs[k] for k in self._pg_of_group[g]}
            if len(vals) > 1:
                raise ValueError(
                    f"group {self.sparsity.names[g]!r} spans param groups "
                    f"{self._pg_of_group[g]} with different learning rates {sorted(vals)}: the "
                    f"proximal step needs one step size per group"
                )
        used = {lrs[k] for k in self._used_pgs}
        if len(used) == 1:
            return used.pop()
        return torch.tensor(lrs, dtype=torch.float64)[self._pg_index]

    @torch.no_grad()
    def adam_scale(self) -> Tensor:
        """d_g = √(mean_{i∈g} v̂_i) + ε per group, [num_groups] in the accumulate dtype, from the
        inner optimizer's current state (v̂ = exp_avg_sq / (1 − β₂^t)); NaN for a group with a
        tensor that has no ``exp_avg_sq`` yet. One fused ``group_sq_norms`` per dtype bucket over
        √exp_avg_sq gives Σv per group; β₂, ε and t come from each group's first tensor (a
        group's tensors share a param group, and are stepped together)."""
        sp = self.sparsity
        state = self.optimizer.state
        sqrt_v: list[Tensor] = []
        have = [True] * sp.num_groups
        for t, g in zip(sp.params, sp.group_ids, strict=True):
            st = state.get(t)
            v = None if st is None else st.get("exp_avg_sq")
            if st and v is None:
                raise ValueError(
                    f"metric='adam' needs exp_avg_sq in the optimizer state, but "
                    f"{type(self.optimizer).__name__} keeps {sorted(st)} for a tensor of group "
                    f"{sp.names[g]!r}"
                )
            if v is None:
                have[g] = False
                v = torch.zeros_like(t)
            sqrt_v.append(v)
        sqrt_v = list(torch._foreach_sqrt(sqrt_v))
        sum_v = sp._sq_norms_of(sqrt_v)
        pgs = self.optimizer.param_groups
        bias = torch.ones(sp.num_groups, dtype=torch.float64)
        eps = torch.zeros(sp.num_groups, dtype=torch.float64)
        first = {}
        for t, g in zip(sp.params, sp.group_ids, strict=True):
            first.setdefault(g, t)
        for g, t in first.items():
            if not have[g]:
                continue
            pg = pgs[self._pg_of_group[g][0]]
            step = state[t].get("step", 0)
            steps = float(step.item() if isinstance(step, Tensor) else step)
            beta2 = float(pg["betas"][1])
            bias[g] = 1.0 - beta2 ** steps if steps > 0 else 1.0
            eps[g] = float(pg["eps"])
        sizes = torch.tensor(sp.sizes, dtype=torch.float64)
        dev = dict(device=sp.device, dtype=sp.acc_dtype)
        d = (sum_v / (sizes * bias).to(**dev)).sqrt() + eps.to(**dev)
        return torch.where(torch.tensor(have, device=sp.device), d, float("nan"))

    def _step_size(self) -> float | Tensor:
        """lr (euclidean) or the per-group lr/d_g (adam) whose product with α·w_g is λ_g."""
        lr = self._lr()
        if self.metric == "euclidean":
            return lr
        d = self.adam_scale()
        lr_t = torch.as_tensor(lr, dtype=d.dtype).to(d.device).expand(d.shape)
        # No state yet (or d_g = 0: an all-zero group with ε = 0): the Euclidean step.
        ok = torch.isfinite(d) & (d > 0)
        return torch.where(ok, lr_t / torch.where(ok, d, 1), lr_t)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Inner ``step(closure)``, then the proximal step with the schedule's α (one fused pass
        when possible, see ``fused``)."""
        self.sparsity._check_layout()
        sp = self.sparsity
        if (self.fused is False or self._unfusable_reason is not None or not sp._fused
                or (self.fused is None and not sp._impl.has_fused_adamw_prox())):
            return self._unfused_step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [t.grad for t in self.sparsity.params]
        if any(g is None or g.is_sparse for g in grads):
            if self.fused:
                raise RuntimeError("fused=True, but a tensor has no dense gradient (AdamW skips a "
                                   "tensor without one; the fused step updates all together)")
            self._unfused_step(None)
            return loss
        self._fused_step(grads)
        return loss

    def _unfused_step(self, closure: Callable[[], Any] | None) -> Any:
        loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        alpha = self.schedule.alpha
        result = self.sparsity.prox_(self._step_size(), alpha) if alpha > 0 else None
        self.schedule.step(result)
        self.last_alpha, self.last_result = alpha, result
        self.last_step_fused = False
        self._state_lists = None  # AdamW skips tensors without gradients: counts may diverge
        return loss

    def _fused_state(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]] | None:
        """AdamW's (exp_avgs, exp_avg_sqs, steps) in the sparsity's tensor order, created as
        AdamW creates them; None if the step counts differ (AdamW skipped some tensor). Cached
        while the state dict holds the same tensors."""
        state = self.optimizer.state
        cached = self._state_lists
        first = state.get(self.sparsity.params[0])
        if cached is not None and first and first.get("exp_avg") is cached[0][0]:
            return cached
        lists: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])
        for t in self.sparsity.params:
            st = state[t]
            if not st:
                st["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
                st["exp_avg"] = torch.zeros_like(t, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(t, memory_format=torch.preserve_format)
            for out, key in zip(lists, ("exp_avg", "exp_avg_sq", "step"), strict=True):
                out.append(st[key])
        if len({float(s) for s in lists[2]}) != 1:
            return None
        self._state_lists = lists
        return lists

    @torch.no_grad()
    def _fused_step(self, grads: list[Tensor]) -> None:
        """AdamW + prox in one ``adamw_prox_`` call over all groups."""
        sp = self.sparsity
        lists = self._fused_state()
        if lists is None:
            if self.fused:
                raise RuntimeError("fused=True, but the tensors' AdamW step counts differ")
            self._unfused_step(None)
            return
        pg = self.optimizer.param_groups[0]
        alpha = self.schedule.alpha
        lr = float(pg["lr"])
        beta1, beta2 = (float(b) for b in pg["betas"])
        lam = sp.thresholds(lr, alpha)
        norms, lam = sp._impl.adamw_prox_(
            sp.params, grads, *lists, sp._buckets[0].group_ids,
            sp.num_groups, lam, lr, beta1, beta2, float(pg["eps"]), float(pg["weight_decay"]),
            self.metric == "adam",
        )
        result = None
        if alpha > 0:
            keep = norms > lam
            result = ProxResult(norms_before=norms, norms_after=torch.where(keep, norms - lam, 0),
                                thresholds=lam, zero=~keep)
        self.schedule.step(result)
        self.last_alpha, self.last_result = alpha, result
        self.last_step_fused = True

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        sd = self.optimizer.state_dict()
        sd["prox"] = {
            "schedule_type": type(self.schedule).__name__,
            "schedule": self.schedule.state_dict(),
            "last_alpha": self.last_alpha,
        }
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        sd = dict(state_dict)
        prox = sd.pop("prox", None)
        if prox is not None and prox.get("schedule_type") != type(self.schedule).__name__:
            raise ValueError(
                f"state_dict holds a {prox.get('schedule_type')} schedule but this ProxOptimizer "
                f"uses {type(self.schedule).__name__}"
            )
        self.optimizer.load_state_dict(sd)
        if prox is not None:
            self.schedule.load_state_dict(prox["schedule"])
            self.last_alpha = float(prox["last_alpha"])
        self._map_param_groups()

    def stats(self) -> dict[str, Any]:
        """:meth:`GroupSparsity.stats` from the last prox (no extra pass) plus ``alpha``."""
        out = self.sparsity.stats(self.last_result)
        out["alpha"] = self.last_alpha
        return out

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (f"ProxOptimizer({self.optimizer!r},\n  {self.sparsity!r},\n  "
                f"schedule={self.schedule!r}, metric={self.metric!r}, fused={self.fused!r})")


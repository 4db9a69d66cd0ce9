"""gslora.sparsity: GroupSparsity against the reference, schedules, ProxOptimizer, distributed.

Key tests run on the reference ``torch`` backend and on the compiled ``cpu`` backend (the latter
is skipped only when gslora._C is not built). The proximal optimizer is checked against a small
NumPy proximal-gradient (FISTA) group-lasso solver whose solution is verified by its optimality
(KKT) conditions.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gslora import reference as R
from gslora.sparsity import (
    AdaptiveSparsity,
    GroupSparsity,
    ProxOptimizer,
    ProxResult,
    SparsityWarmup,
)

# Odd sizes; group 0 has three tensors, group 2 one, group 3 two of different ranks.
SHAPES = [(3, 7), (5,), (1, 13), (2, 3, 5), (11,), (4, 4), (9,)]
IDS = [0, 0, 0, 1, 2, 3, 3]
NAMES = ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]


def _ext_error() -> str | None:
    from gslora import _ext

    return _ext.load_error()


def _backend_param(request) -> str:
    if request.param == "cpu" and _ext_error() is not None:
        pytest.skip(f"backend 'cpu' needs the compiled extension, gslora._C is not built: {_ext_error()}")
    return request.param


@pytest.fixture(params=["torch", "cpu"])
def backend(request) -> str:
    return _backend_param(request)


@pytest.fixture(params=["torch", "cpu", "triton"])
def any_backend(request) -> str:
    """Also the Triton kernels (interpreted on CPU here: slow, so only for the key tests)."""
    return _backend_param(request)


def _params(dtype=torch.float64, shapes=SHAPES, scale=1.0) -> list[nn.Parameter]:
    return [nn.Parameter((torch.randn(s, dtype=torch.float64) * scale).to(dtype)) for s in shapes]


def _groups(params, ids=IDS, names=NAMES) -> dict[str, list[nn.Parameter]]:
    out: dict[str, list[nn.Parameter]] = {n: [] for n in names}
    for p, g in zip(params, ids, strict=True):
        out[names[g]].append(p)
    return out


def _true_norms(params, ids=IDS, num_groups=4) -> np.ndarray:
    """‖θ_g‖₂ in float64 NumPy from the tensors' exact values."""
    sq = np.zeros(num_groups)
    for p, g in zip(params, ids, strict=True):
        sq[g] += float((p.detach().double().numpy() ** 2).sum())
    return np.sqrt(sq)


def _closed_form_prox(params, lam, ids=IDS) -> list[np.ndarray]:
    """θ_g · max(0, 1 − λ_g/‖θ_g‖) in float64 NumPy."""
    norms = _true_norms(params, ids, len(lam))
    factor = np.where(norms > lam, 1 - lam / np.where(norms > 0, norms, 1), 0.0)
    return [p.detach().double().numpy() * factor[g] for p, g in zip(params, ids, strict=True)]


def _force_general_path(gs: GroupSparsity) -> GroupSparsity:
    """White-box: run the multi-bucket path (sq_norms → group_scale) on single-dtype groups."""
    gs._fused = False
    return gs


# ----------------------------------------------------------------------------- norms
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_norms_match_reference(backend, dtype):
    params = _params(dtype)
    gs = GroupSparsity(_groups(params), backend=backend)
    assert gs.backend == backend and len(gs) == 4
    norms = gs.norms()
    assert norms.dtype == dtype and norms.shape == (4,)
    truth = torch.from_numpy(_true_norms(params))
    if dtype == torch.float64:
        torch.testing.assert_close(norms, truth, rtol=1e-13, atol=0)
        torch.testing.assert_close(norms, R.group_norms(params, IDS, 4), rtol=1e-14, atol=0)
    else:
        eager_err = (R.group_norms(params, IDS, 4).double() - truth).abs().max().item()
        err = (norms.double() - truth).abs().max().item()
        assert err <= 2 * eager_err + 1e-6 * truth.max().item()
    torch.testing.assert_close(gs.sq_norms(), norms**2, rtol=1e-5 if dtype == torch.float32 else 1e-13, atol=0)
    assert gs.sizes == [21 + 5 + 13, 30, 11, 16 + 9]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_norms_accumulate_in_fp32(backend, dtype):
    # 4096 elements of value ~1: a bf16/fp16 accumulator would be off by far more than 1e-5.
    params = _params(dtype, shapes=[(64, 33), (31, 65)], scale=1.0)
    gs = GroupSparsity({"a": params[:1], "b": params[1:]}, backend=backend)
    norms = gs.norms()
    assert norms.dtype == torch.float32
    truth = torch.from_numpy(_true_norms(params, [0, 1], 2))
    torch.testing.assert_close(norms.double(), truth, rtol=2e-6, atol=0)


# ----------------------------------------------------------------------------- penalty
@pytest.mark.parametrize("weights", [None, "sqrt_size", "tensor"])
@pytest.mark.parametrize("general", [False, True], ids=["fused", "general"])
def test_penalty_value_and_grad_match_autograd_of_reference(any_backend, weights, general):
    params = _params()
    w = torch.tensor([0.5, 2.0, 0.0, 1.5], dtype=torch.float64) if weights == "tensor" else weights
    gs = GroupSparsity(_groups(params), weights=w, backend=any_backend)
    if general:
        _force_general_path(gs)
    ref_w = {None: torch.ones(4, dtype=torch.float64),
             "sqrt_size": torch.tensor(gs.sizes, dtype=torch.float64).sqrt(),
             "tensor": w}[weights]
    torch.testing.assert_close(gs.weights, ref_w.to(gs.weights.dtype))
    pen = gs.penalty()
    pen.backward()
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    ref = R.group_lasso_penalty(params, IDS, 4, ref_w)
    ref.backward()
    torch.testing.assert_close(pen, ref, rtol=1e-14, atol=0)
    for g, p in zip(grads, params, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("general", [False, True], ids=["fused", "general"])
def test_penalty_gradcheck(backend, general):
    params = _params(shapes=[(2, 3), (5,), (1, 3), (3,)])

    def fn(*tensors):
        gs = GroupSparsity([("a", tensors[:2]), ("b", tensors[2:3]), ("c", tensors[3:])],
                           weights="sqrt_size", backend=backend)
        if general:
            _force_general_path(gs)
        return gs.penalty()

    inputs = tuple(p.detach().clone().requires_grad_(True) for p in params)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("weights", [None, "sqrt_size"])
@pytest.mark.parametrize("general", [False, True], ids=["fused", "general"])
def test_add_penalty_grad_equals_the_penalty_backward(backend, weights, general):
    # In a training step: the loss's gradient is already in .grad for some tensors (not all).
    params = _params(torch.float32)
    gs = GroupSparsity(_groups(params), weights=weights, backend=backend)
    if general:
        _force_general_path(gs)
    data_loss = lambda: sum((p**2).sum() for p in params[:4])
    (data_loss() + 0.05 * gs.penalty()).backward()
    expected = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    data_loss().backward()
    value = gs.add_penalty_grad_(0.05)
    torch.testing.assert_close(value, gs.penalty().detach(), rtol=0, atol=0)
    assert not value.requires_grad
    for i, (p, e) in enumerate(zip(params, expected, strict=True)):
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-9, msg=f"params[{i}]")
    with pytest.raises(ValueError, match="alpha"):
        gs.add_penalty_grad_(-1.0)


def test_add_penalty_grad_mixed_dtypes_and_zero_group(backend):
    params = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(5, dtype=torch.float64)),
              nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))]
    gs = GroupSparsity([("a", params[:2]), ("b", params[2:])], backend=backend)
    (2.0 * gs.penalty()).backward()
    expected = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    gs.add_penalty_grad_(2.0)
    for p, e in zip(params, expected, strict=True):
        assert torch.equal(p.grad, e)
    assert (params[2].grad == 0).all() and not torch.isnan(params[2].grad).any()


def test_penalty_under_no_grad_and_in_a_loss(backend):
    params = _params(torch.float32)
    gs = GroupSparsity(_groups(params), backend=backend)
    with torch.no_grad():
        value = gs.penalty()
    assert not value.requires_grad
    loss = sum((p**2).sum() for p in params) + 1e-2 * gs.penalty()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in params)


# ----------------------------------------------------------------------------- prox
@pytest.mark.parametrize("general", [False, True], ids=["fused", "general"])
def test_prox_matches_closed_form_with_exact_zeros(any_backend, general):
    params = _params()
    gs = GroupSparsity(_groups(params), weights="sqrt_size", backend=any_backend)
    if general:
        _force_general_path(gs)
    norms = _true_norms(params)
    w = np.sqrt(np.array(gs.sizes, dtype=np.float64))
    # α·lr chosen so that exactly groups 1 and 3 fall under their thresholds.
    ratio = norms / w
    order = np.argsort(ratio)
    assert list(order[:2]) != list(range(2))  # the zero groups are not simply the first ones
    lr, alpha = 0.5, float(ratio[order[1]] + ratio[order[2]])  # lr·α·w between the 2nd and 3rd
    lam = lr * alpha * w
    expected = _closed_form_prox(params, lam)
    res = gs.prox_(lr, alpha)
    assert isinstance(res, ProxResult)
    zero_expected = norms <= lam
    assert zero_expected.sum() == 2
    assert res.zero.tolist() == zero_expected.tolist() and res.num_zero == 2
    torch.testing.assert_close(res.norms_before, torch.from_numpy(norms), rtol=1e-13, atol=0)
    torch.testing.assert_close(res.thresholds, torch.from_numpy(lam), rtol=1e-15, atol=0)
    torch.testing.assert_close(res.norms_after, torch.from_numpy(np.maximum(norms - lam, 0)),
                               rtol=1e-13, atol=1e-15)
    for p, e, g in zip(params, expected, IDS, strict=True):
        torch.testing.assert_close(p.detach(), torch.from_numpy(e), rtol=1e-13, atol=1e-15)
        if zero_expected[g]:
            assert (p == 0).all()
    # The stored norms after the step are the analytic ones.
    torch.testing.assert_close(gs.norms(), res.norms_after, rtol=1e-12, atol=0)
    assert gs.zero_mask().tolist() == zero_expected.tolist()


def test_prox_fused_and_general_paths_agree(backend):
    base = _params(torch.float32)
    a = [nn.Parameter(p.detach().clone()) for p in base]
    b = [nn.Parameter(p.detach().clone()) for p in base]
    eager = [p.detach().clone() for p in base]
    ga = GroupSparsity(_groups(a), backend=backend)
    gb = _force_general_path(GroupSparsity(_groups(b), backend=backend))
    ra, rb = ga.prox_(0.3, 14.0), gb.prox_(0.3, 14.0)
    assert ra.zero.tolist() == rb.zero.tolist() and ra.zero.any() and not ra.zero.all()
    truth = _closed_form_prox(base, np.full(4, 0.3 * 14.0))
    R.group_prox_(eager, IDS, 4, torch.full((4,), 0.3 * 14.0))
    for x, y, e, t in zip(a, b, eager, truth, strict=True):
        if backend == "torch":  # the same formula on the same backend: identical bits
            torch.testing.assert_close(x, y, rtol=0, atol=0)
        # Other backends may sum in another order: both paths within fp32 rounding of the truth.
        eager_err = np.abs(e.double().numpy() - t).max()
        for z in (x, y):
            assert np.abs(z.detach().double().numpy() - t).max() <= 2 * eager_err + 1e-7 * np.abs(t).max()


def test_prox_per_group_lr_tensor(backend):
    params = _params()
    gs = GroupSparsity(_groups(params), backend=backend)
    lr = torch.tensor([0.1, 0.0, 1e6, 0.2], dtype=torch.float64)
    expected = _closed_form_prox(params, lr.numpy() * 0.5)
    res = gs.prox_(lr, 0.5)
    assert res.zero.tolist() == [False, False, True, False]
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach(), torch.from_numpy(e), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_prox_error_bounded_by_eager(backend, dtype):
    params = _params(dtype)
    eager = [p.detach().clone() for p in params]
    gs = GroupSparsity(_groups(params), backend=backend)
    norms = np.sort(_true_norms(params))
    lr, alpha = 0.1, float(norms[0] + norms[1]) / 2 / 0.1  # removes the smallest group only
    lam = np.full(4, lr * alpha)
    truth = _closed_form_prox(eager, lam)  # exact math on the low-precision inputs
    zero_expected = (_true_norms(params) <= lam).tolist()
    assert sum(zero_expected) == 1
    R.group_prox_(eager, IDS, 4, torch.full((4,), lr * alpha))
    res = gs.prox_(lr, alpha)
    assert res.norms_before.dtype == torch.float32
    assert res.zero.tolist() == zero_expected
    for p, e, t in zip(params, eager, truth, strict=True):
        assert p.dtype == dtype
        err = np.abs(p.detach().double().numpy() - t).max()
        eager_err = np.abs(e.double().numpy() - t).max()
        assert err <= 2 * eager_err + 1e-7 * np.abs(t).max()


def test_zero_group_stays_zero_without_nan(any_backend):
    params = _params(torch.float32)
    with torch.no_grad():
        params[3].zero_()  # group 1 is all zeros
    gs = GroupSparsity(_groups(params), backend=any_backend)
    norms = gs.norms()
    assert norms[1].item() == 0 and bool(torch.isfinite(norms).all())
    pen = gs.penalty()
    pen.backward()
    assert torch.isfinite(pen)
    for p in params:
        assert bool(torch.isfinite(p.grad).all())
    assert (params[3].grad == 0).all()
    for alpha in (0.0, 1.0):
        res = gs.prox_(0.1, alpha)
        assert bool(res.zero[1]) and res.norms_before[1].item() == 0
        assert bool(torch.isfinite(res.norms_after).all())
        assert (params[3] == 0).all() and all(bool(torch.isfinite(p).all()) for p in params)
    stats = gs.stats()
    assert stats["zero_groups"] == 1 and stats["zero_group_names"] == ["blocks.1"]
    # General path and mixed dtypes: still no NaN.
    gm = GroupSparsity({"z": [torch.zeros(3, dtype=torch.bfloat16, requires_grad=True),
                              torch.zeros(2, requires_grad=True)]}, backend=any_backend)
    pen = gm.penalty()
    pen.backward()
    assert pen.item() == 0 and all((t.grad == 0).all() for t in gm.params)
    assert gm.prox_(1.0, 1.0).zero.tolist() == [True]


# ----------------------------------------------------------------------------- mixed dtypes
def test_mixed_dtypes_are_bucketed_and_summed(any_backend):
    a = nn.Parameter(torch.randn(3, 5))                       # fp32
    b = nn.Parameter(torch.randn(4, 2).to(torch.bfloat16))    # bf16, same group as a
    c = nn.Parameter(torch.randn(7).to(torch.bfloat16))       # bf16 alone
    d = nn.Parameter(torch.randn(6))                          # fp32 alone
    gs = GroupSparsity({"ab": [a, b], "c": [c], "d": [d]}, backend=any_backend)
    assert gs.acc_dtype == torch.float32 and "bfloat16" in repr(gs) and "float32" in repr(gs)
    truth = _true_norms([a, b, c, d], [0, 0, 1, 2], 3)
    torch.testing.assert_close(gs.norms().double(), torch.from_numpy(truth), rtol=2e-7, atol=0)
    pen = gs.penalty()
    pen.backward()
    assert a.grad.dtype == torch.float32 and b.grad.dtype == torch.bfloat16
    # ∂/∂θ = θ/‖θ_g‖, each stored in its tensor's dtype.
    torch.testing.assert_close(a.grad, a.detach() / float(truth[0]), rtol=1e-6, atol=0)
    torch.testing.assert_close(b.grad, (b.detach().float() / float(truth[0])).bfloat16(), rtol=0, atol=0)
    # Prox against the closed form on the exact input values.
    lam = np.array([0.5, 100.0, 0.25])
    expected = _closed_form_prox([a, b, c, d], lam, [0, 0, 1, 2])
    res = gs.prox_(torch.tensor(lam), 1.0)
    assert res.zero.tolist() == [False, True, False]
    assert (c == 0).all()
    torch.testing.assert_close(a.detach().double(), torch.from_numpy(expected[0]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b.detach(), torch.from_numpy(expected[1]).bfloat16(), rtol=0, atol=0)
    # A float64 tensor widens the accumulate dtype for everything.
    e = nn.Parameter(torch.randn(5, dtype=torch.float64))
    g64 = GroupSparsity({"ae": [a, e]}, backend=any_backend)
    assert g64.norms().dtype == torch.float64


# ----------------------------------------------------------------------------- bad input
def test_bad_input_is_rejected_with_clear_errors():
    p = [nn.Parameter(torch.randn(3)) for _ in range(3)]
    with pytest.raises(ValueError, match="group 'b' is empty"):
        GroupSparsity({"a": [p[0]], "b": []})
    with pytest.raises(ValueError, match="group 'b' is empty: its tensors have no elements"):
        GroupSparsity({"a": [p[0]], "b": [torch.empty(0, 4)]})
    with pytest.raises(ValueError, match="at least one group"):
        GroupSparsity({})
    with pytest.raises(ValueError, match="already in group 'a'"):
        GroupSparsity({"a": [p[0], p[1]], "b": [p[1]]})
    with pytest.raises(ValueError, match="dtype torch.int64"):
        GroupSparsity({"a": [torch.ones(3, dtype=torch.int64)]})
    with pytest.raises(TypeError, match="single tensor"):
        GroupSparsity({"a": p[0]})
    with pytest.raises(ValueError, match="appears twice"):
        GroupSparsity([("a", [p[0]]), ("a", [p[1]])])
    with pytest.raises(ValueError, match="one device"):
        GroupSparsity({"a": [p[0]], "b": [torch.empty(3, device="meta")]})
    with pytest.raises(ValueError, match=r"weights must have shape \[2\]"):
        GroupSparsity({"a": [p[0]], "b": [p[1]]}, weights=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="finite and >= 0"):
        GroupSparsity({"a": [p[0]], "b": [p[1]]}, weights=[1.0, -2.0])
    with pytest.raises(ValueError, match="'sqrt_size'"):
        GroupSparsity({"a": [p[0]]}, weights="size")
    gs = GroupSparsity({"a": [p[0]], "b": [p[1]]})
    with pytest.raises(ValueError, match="lr must be finite and >= 0"):
        gs.prox_(-1.0, 1.0)
    with pytest.raises(ValueError, match="alpha must be finite and >= 0"):
        gs.prox_(1.0, float("nan"))
    with pytest.raises(ValueError, match=r"lr must be a float or a \[2\] tensor"):
        gs.prox_(torch.ones(3), 1.0)
    from gslora import BackendError

    with pytest.raises(BackendError, match="backend='cuda'"):
        GroupSparsity({"a": [p[0]]}, backend="cuda")
    with pytest.raises(ValueError, match="not in the optimizer"):
        ProxOptimizer(torch.optim.SGD([p[0]], lr=0.1), gs, 1.0)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        ProxOptimizer(object(), gs, 1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="alpha must be a float or a SparsitySchedule"):
        ProxOptimizer(torch.optim.SGD(p, lr=0.1), gs, "1e-4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="warmup_steps"):
        SparsityWarmup(1.0, -1)
    with pytest.raises(ValueError, match="growth"):
        AdaptiveSparsity(1.0, 2, growth=1.0)


# ----------------------------------------------------------------------------- identity, model
class _TinyBlocks(nn.Module):
    """Two 'Transformer blocks' whose FFN linears carry LoRA tensors, plus a head."""

    def __init__(self) -> None:
        super().__init__()
        from gslora import GSLoRALinear

        self.blocks = nn.ModuleList(
            nn.ModuleDict({"fc1": GSLoRALinear(6, 10, r=2), "fc2": GSLoRALinear(10, 6, r=2)})
            for _ in range(2)
        )
        self.head = nn.Linear(6, 3)

    def lora_groups(self) -> dict[str, list[nn.Parameter]]:
        return {f"blocks.{i}": [b["fc1"].lora_A, b["fc1"].lora_B, b["fc2"].lora_A, b["fc2"].lora_B]
                for i, b in enumerate(self.blocks)}

    def forward(self, x):
        for b in self.blocks:
            x = x + b["fc2"](torch.relu(b["fc1"](x)))
        return self.head(x)


def test_parameters_keep_identity_and_optimizer_hooks_state_dict_work(backend):
    model = _TinyBlocks()
    ids_before = [id(p) for p in model.parameters()]
    keys_before = list(model.state_dict())
    gs = GroupSparsity(model.lora_groups(), backend=backend)
    lora = [p for ps in model.lora_groups().values() for p in ps]
    assert all(a is b for a, b in zip(gs.params, lora, strict=True))
    hooked: list[int] = []
    model.blocks[0]["fc1"].lora_A.register_hook(lambda g: hooked.append(g.numel()))
    inner = torch.optim.AdamW(lora + list(model.head.parameters()), lr=1e-2, weight_decay=0.05)
    opt = ProxOptimizer(inner, gs, alpha=SparsityWarmup(0.5, warmup_steps=2))
    assert isinstance(opt, torch.optim.Optimizer) and opt.param_groups is inner.param_groups
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    before = [p.detach().clone() for p in lora]
    for _ in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert hooked and hooked[0] == 12
    assert [id(p) for p in model.parameters()] == ids_before
    assert list(model.state_dict()) == keys_before
    assert all(p in inner.state for p in lora)  # AdamW state keyed by the same objects
    assert all(not torch.equal(a, b) for a, b in zip(before, lora, strict=True))
    assert opt.last_alpha == 0.5 and opt.last_result is not None
    # The recorded result describes the current parameters.
    torch.testing.assert_close(gs.norms(), opt.last_result.norms_after, rtol=1e-5, atol=1e-7)
    stats = opt.stats()
    assert stats["alpha"] == 0.5 and list(stats["norms"]) == ["blocks.0", "blocks.1"]


def test_from_model_uses_surgery_groups():
    from gslora.models.vit import ViT, ViTConfig
    from gslora.surgery import add_gslora, lora_groups

    model = ViT(ViTConfig(img_size=8, patch_size=4, embed_dim=8, depth=2, num_heads=2, mlp_dim=16))
    add_gslora(model, r=2)
    gs = GroupSparsity.from_model(model)
    groups = lora_groups(model)
    assert gs.names == list(groups) and len(gs) == 2
    assert all(a is b for a, b in zip(gs.params, [p for ps in groups.values() for p in ps], strict=True))
    assert len(GroupSparsity.from_model(model, group_by="tensor")) == 8
    assert len(GroupSparsity.from_model(model, group_by="module")) == 4


def test_refresh_after_model_cast():
    model = _TinyBlocks()
    gs = GroupSparsity(model.lora_groups())
    assert gs.norms().dtype == torch.float32
    model.double()
    norms = gs.norms()
    assert norms.dtype == torch.float64
    torch.testing.assert_close(norms, torch.from_numpy(_true_norms(gs.params, gs.group_ids, 2)))


# ----------------------------------------------------------------------------- NumPy solver
def _numpy_group_lasso(A, b, sizes, alpha, iters=4000):
    """min_x ½‖Ax − b‖² + α Σ_g ‖x_g‖₂ by FISTA with step 1/L (L = ‖A‖₂²)."""
    L = np.linalg.norm(A, 2) ** 2
    bounds = np.cumsum([0, *sizes])

    def prox(v, t):
        out = v.copy()
        for s, e in zip(bounds[:-1], bounds[1:], strict=True):
            n = np.linalg.norm(v[s:e])
            out[s:e] = 0.0 if n <= t else v[s:e] * (1 - t / n)
        return out

    x = np.zeros(A.shape[1])
    z, t = x.copy(), 1.0
    for _ in range(iters):
        x_new = prox(z - A.T @ (A @ z - b) / L, alpha / L)
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        z = x_new + (t - 1) / t_new * (x_new - x)
        x, t = x_new, t_new
    return x, bounds


def test_prox_sgd_reaches_numpy_group_lasso_solution(backend):
    rng = np.random.default_rng(0)
    sizes = [3, 5, 2, 4, 6, 3]
    d, n = sum(sizes), 60
    A = rng.standard_normal((n, d)) / math.sqrt(n)
    x_true = rng.standard_normal(d)
    bounds = np.cumsum([0, *sizes])
    for g in (1, 3):  # groups 1 and 3 are truly absent
        x_true[bounds[g]:bounds[g + 1]] = 0
    b = A @ x_true + 0.05 * rng.standard_normal(n)
    alpha = 0.3
    x_np, _ = _numpy_group_lasso(A, b, sizes, alpha)
    # The reference solution is optimal (KKT): grad_g + α x_g/‖x_g‖ = 0 where x_g ≠ 0,
    # ‖grad_g‖ ≤ α (with margin, so the zero pattern is robust) where x_g = 0.
    grad = A.T @ (A @ x_np - b)
    zero_np = []
    for g, (s, e) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        xn = np.linalg.norm(x_np[s:e])
        zero_np.append(xn == 0)
        if xn == 0:
            assert np.linalg.norm(grad[s:e]) < 0.9 * alpha, g
        else:
            assert xn > 0.1, g
            np.testing.assert_allclose(grad[s:e] + alpha * x_np[s:e] / xn, 0, atol=1e-10)
    assert zero_np == [False, True, False, True, False, False]

    # Torch: group 1 split into two tensors of different ranks, group 4 into three.
    shapes = [[(3,)], [(2, 2), (1,)], [(1, 2)], [(4,)], [(2,), (1, 3), (1,)], [(3, 1)]]
    groups, flat = {}, []
    for g, shp in enumerate(shapes):
        groups[f"g{g}"] = [nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in shp]
        flat += groups[f"g{g}"]
    At, bt = torch.from_numpy(A), torch.from_numpy(b)
    L = float(np.linalg.norm(A, 2) ** 2)
    gs = GroupSparsity(groups, backend=backend)
    opt = ProxOptimizer(torch.optim.SGD(flat, lr=1 / L), gs, alpha=alpha)
    for _ in range(250):  # ISTA converges linearly here: ~1e-15 after 150 steps
        opt.zero_grad()
        x = torch.cat([p.reshape(-1) for p in flat])
        (0.5 * ((At @ x - bt) ** 2).sum()).backward()
        opt.step()
    x_t = torch.cat([p.detach().reshape(-1) for p in flat]).numpy()
    np.testing.assert_allclose(x_t, x_np, rtol=0, atol=1e-12)
    assert opt.last_result.zero.tolist() == zero_np
    for g in (1, 3):
        assert all((p == 0).all() for p in groups[f"g{g}"])  # exactly zero, not small
    assert opt.stats()["zero_group_names"] == ["g1", "g3"]


# ----------------------------------------------------------------------------- schedules
def test_sparsity_warmup_is_the_papers_hard_step():
    s = SparsityWarmup(1e-4, warmup_steps=3)
    values = []
    for _ in range(6):
        values.append(s.alpha)
        s.step()
    assert values == [0.0, 0.0, 0.0, 1e-4, 1e-4, 1e-4]
    t = SparsityWarmup(1e-4, warmup_steps=3)
    t.load_state_dict(s.state_dict())
    assert t.alpha == 1e-4 and t.num_steps == 6
    assert SparsityWarmup(0.2).alpha == 0.2


def _fake_result(num_zero: int, num_groups: int = 6) -> ProxResult:
    zero = torch.arange(num_groups) < num_zero
    z = torch.zeros(num_groups)
    return ProxResult(norms_before=z, norms_after=z, thresholds=z, zero=zero)


def test_adaptive_schedule_rule_and_resume():
    s = AdaptiveSparsity(1.0, target_zero_groups=2, warmup_steps=1, growth=2.0, interval=2,
                         min_alpha=0.25, max_alpha=4.0)
    assert s.alpha == 0.0
    s.step(None)                       # warm-up ends
    trace = []
    for z in [0, 0, 0, 0, 0, 0, 5, 5, 5, 5, 5, 5, 5, 5, 2, 2]:
        trace.append(s.alpha)
        s.step(_fake_result(z))
    # Every 2nd step: too few zeros → ×2 up to 4; too many → ÷2 down to 0.25; on target → kept.
    assert trace == [1, 1, 2, 2, 4, 4, 4, 4, 2, 2, 1, 1, 0.5, 0.5, 0.25, 0.25]
    assert s.alpha == 0.25
    r = AdaptiveSparsity(1.0, target_zero_groups=2, warmup_steps=1, growth=2.0, interval=2,
                         min_alpha=0.25, max_alpha=4.0)
    r.load_state_dict(s.state_dict())
    assert r.alpha == 0.25 and r.num_steps == s.num_steps


def test_adaptive_schedule_reaches_target_on_least_squares():
    rng = np.random.default_rng(1)
    sizes = [4] * 6
    A = rng.standard_normal((80, 24)) / math.sqrt(80)
    x_true = np.concatenate([np.full(4, 0.3 * (g + 1)) for g in range(6)])
    b = A @ x_true
    At, bt = torch.from_numpy(A), torch.from_numpy(b)
    params = [nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in sizes]
    gs = GroupSparsity([(f"g{i}", [p]) for i, p in enumerate(params)])
    sched = AdaptiveSparsity(0.1, target_zero_groups=3, growth=1.2, interval=20)
    opt = ProxOptimizer(torch.optim.SGD(params, lr=0.5), gs, alpha=sched)  # lr < 1/L ≈ 0.42⁻¹
    alphas = []
    for _ in range(500):
        opt.zero_grad()
        (0.5 * ((At @ torch.cat(params) - bt) ** 2).sum()).backward()
        opt.step()
        alphas.append(sched.alpha)
    assert opt.last_result.num_zero == 3
    assert len(set(alphas[-150:])) == 1 and alphas[-1] > 0.1  # settled after growing
    # The groups removed are those the exact group lasso removes at the settled α.
    x_np, bounds = _numpy_group_lasso(A, b, sizes, sched.alpha, iters=2000)
    zero_np = [bool(np.linalg.norm(x_np[s:e]) == 0) for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
    assert opt.last_result.zero.tolist() == zero_np


# ----------------------------------------------------------------------------- optimizer
def _ls_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(30, 12, generator=g, dtype=torch.float64)
    b = torch.randn(30, generator=g, dtype=torch.float64)
    return A, b


def _run(opt, params, A, b, steps, sched=None):
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * ((A @ torch.cat([p.reshape(-1) for p in params]) - b) ** 2).mean()).backward()
        opt.step()
        if sched is not None:
            sched.step()


def test_prox_optimizer_follows_lr_scheduler_and_resumes_from_state_dict(tmp_path):
    A, b = _ls_problem()

    def make(init):
        params = [nn.Parameter(t.clone()) for t in init]
        gs = GroupSparsity({"a": params[:2], "b": params[2:3], "c": params[3:]})
        inner = torch.optim.AdamW(params, lr=0.05)
        opt = ProxOptimizer(inner, gs, SparsityWarmup(0.4, warmup_steps=3))
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return params, opt, sched

    init = [torch.randn(3, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64),
            torch.randn(1, 2, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    params, opt, sched = make(init)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        _run(opt, params, A, b, 1, sched)
        if opt.last_result is not None:  # λ follows the scheduled lr
            torch.testing.assert_close(opt.last_result.thresholds,
                                       torch.full((3,), lrs[-1] * 0.4, dtype=torch.float64))
        else:
            assert opt.last_alpha == 0.0
    assert lrs == [0.05, 0.05, 0.025, 0.025, 0.0125, 0.0125]
    path = tmp_path / "opt.pt"
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(),
                "params": [p.detach() for p in params]}, path)
    _run(opt, params, A, b, 5, sched)  # uninterrupted run

    ck = torch.load(path, weights_only=True)
    params2, opt2, sched2 = make(ck["params"])
    opt2.load_state_dict(ck["opt"])
    sched2.load_state_dict(ck["sched"])
    assert opt2.schedule.num_steps == 6 and opt2.last_alpha == 0.4
    _run(opt2, params2, A, b, 5, sched2)
    for p, q in zip(params, params2, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert opt.state_dict()["prox"] == opt2.state_dict()["prox"]
    # A plain inner-optimizer state dict also loads (schedule left as is).
    opt2.load_state_dict(opt.optimizer.state_dict())
    with pytest.raises(ValueError, match="AdaptiveSparsity schedule"):
        bad = opt.state_dict()
        bad["prox"]["schedule_type"] = "AdaptiveSparsity"
        opt2.load_state_dict(bad)


def test_prox_optimizer_per_param_group_lrs_and_closure():
    A, b = _ls_problem(1)
    params = [nn.Parameter(torch.randn(4, dtype=torch.float64)) for _ in range(3)]
    gs = GroupSparsity([(f"g{i}", [p]) for i, p in enumerate(params)])
    inner = torch.optim.SGD([{"params": params[:2], "lr": 0.1}, {"params": params[2:], "lr": 0.01}])
    opt = ProxOptimizer(inner, gs, alpha=2.0)

    def closure():
        opt.zero_grad()
        loss = 0.5 * ((A @ torch.cat(params) - b) ** 2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss)
    torch.testing.assert_close(opt.last_result.thresholds,
                               torch.tensor([0.2, 0.2, 0.02], dtype=torch.float64))
    # A group spanning two param groups with different lrs is refused at step time.
    p, q = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
    split = ProxOptimizer(torch.optim.SGD([{"params": [p], "lr": 0.1}, {"params": [q], "lr": 0.2}]),
                          GroupSparsity({"pq": [p, q]}), alpha=1.0)
    (p.sum() + q.sum()).backward()
    with pytest.raises(ValueError, match="group 'pq' spans param groups"):
        split.step()


# ----------------------------------------------------------------------------- distributed
def _check_sharded(rank: int, world_size: int, process_group) -> None:
    """Every rank holds an uneven slice of every flattened tensor (like FSDP flat shards); the
    results must equal the whole-tensor reference, sliced."""
    gen = torch.Generator().manual_seed(0)  # same full tensors on every rank (thread-safe RNG)
    shapes, ids = [(7,), (3, 5), (11,), (4,), (5,)], [0, 0, 1, 2, 3]
    full = [torch.randn(s, dtype=torch.float64, generator=gen) for s in shapes]
    full[4].zero_()  # group 3 is all zeros

    def my_slice(t):
        return t.reshape(-1).tensor_split(world_size)[rank]

    shards = [nn.Parameter(my_slice(t).clone()) for t in full]
    groups = [(f"g{g}", [s for s, i in zip(shards, ids, strict=True) if i == g]) for g in range(4)]
    gs = GroupSparsity(groups, weights="sqrt_size", process_group=process_group)
    assert gs.sizes == [22, 11, 4, 5], gs.sizes  # global sizes, for the √size weights
    w = torch.tensor(gs.sizes, dtype=torch.float64).sqrt()
    full_norms = R.group_norms(full, ids, 4)
    torch.testing.assert_close(gs.norms(), full_norms, rtol=1e-14, atol=0)
    # Penalty: the full value on every rank; shard grads are slices of the full gradient.
    ref_full = [t.clone().requires_grad_(True) for t in full]
    ref = R.group_lasso_penalty(ref_full, ids, 4, w)
    ref.backward()
    pen = gs.penalty()
    pen.backward()
    torch.testing.assert_close(pen, ref, rtol=1e-14, atol=0)
    for s, t in zip(shards, ref_full, strict=True):
        torch.testing.assert_close(s.grad, my_slice(t.grad), rtol=1e-13, atol=1e-16)
    # The same gradient added to .grad without autograd (global norms, local shards).
    for s in shards:
        s.grad = None
    torch.testing.assert_close(gs.add_penalty_grad_(2.0), ref.detach(), rtol=1e-14, atol=0)
    for s, t in zip(shards, ref_full, strict=True):
        torch.testing.assert_close(s.grad, 2.0 * my_slice(t.grad), rtol=1e-13, atol=1e-16)
    # Prox through the optimizer (no grads: a pure prox step); α between the two smallest
    # non-zero norm/weight ratios, so one live group is removed besides the all-zero one.
    ratios = sorted((full_norms / w)[:3].tolist())
    lr, alpha = 0.3, (ratios[0] + ratios[1]) / 2 / 0.3
    lam = lr * alpha * w
    expected_zero = (full_norms <= lam).tolist()
    assert sum(expected_zero) == 2 and expected_zero[3]
    for s in shards:
        s.grad = None
    opt = ProxOptimizer(torch.optim.SGD(shards, lr=lr), gs, alpha=alpha)
    opt.step()
    R.group_prox_(full, ids, 4, lam)
    for s, t in zip(shards, full, strict=True):
        torch.testing.assert_close(s.detach(), my_slice(t), rtol=1e-13, atol=1e-16)
    assert opt.last_result.zero.tolist() == expected_zero


def test_distributed_world_size_1_default_group(tmp_path):
    import torch.distributed as dist

    assert dist.is_available() and dist.is_gloo_available()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    try:
        _check_sharded(0, 1, dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def test_distributed_two_ranks_sum_partial_norms():
    # Two gloo ranks in two threads of this process (no process start-up cost): the partial
    # squared norms really are summed across ranks, which world size 1 cannot show.
    import threading

    import torch.distributed as dist

    store = dist.HashStore()
    errors: dict[int, BaseException] = {}

    def rank_main(rank: int) -> None:
        try:
            _check_sharded(rank, 2, dist.ProcessGroupGloo(store, rank, 2))
        except BaseException as exc:  # re-raised in the main thread
            errors[rank] = exc

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a rank hung in a collective"
    for rank, exc in sorted(errors.items()):
        raise AssertionError(f"rank {rank} failed: {exc!r}") from exc


def test_ddp_and_fsdp2_training_match_one_process(tmp_path):
    # DDP and FSDP2 need each rank's default process group, so the two ranks are processes
    # (spawned by the script, ~6 s): a GS-LoRA ViT under DDP and under fully_shard, penalty in
    # the loss and added to .grad, AdamW + prox in Adam's metric, against one process.
    script = Path(__file__).with_name("distributed_ranks.py")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                          text=True, timeout=300, cwd=script.parent.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "distributed ranks: ok" in proc.stdout


def test_dtensors_use_local_shards_and_mesh_groups(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        plain = _params()
        ref = GroupSparsity(_groups(plain))
        for placement in (Shard(0), Replicate()):
            shards = [nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [placement]))
                      for p in plain]
            gs = GroupSparsity(_groups(shards))
            assert gs.backend == ref.backend and gs.sizes == ref.sizes
            assert ("distributed" in repr(gs)) == (placement == Shard(0))
            torch.testing.assert_close(gs.norms(), ref.norms(), rtol=1e-14, atol=0)
            # Penalty gradients arrive as DTensors; add_penalty_grad_ creates DTensor grads.
            for p in plain:
                p.grad = None
            ref.penalty().backward()
            gs.penalty().backward()
            for s, p in zip(shards, plain, strict=True):
                assert isinstance(s.grad, DTensor) and s.grad.placements == (placement,)
                torch.testing.assert_close(s.grad.full_tensor(), p.grad, rtol=1e-13, atol=1e-16)
                s.grad = None
            gs.add_penalty_grad_(0.5)
            for s, p in zip(shards, plain, strict=True):
                assert isinstance(s.grad, DTensor)
                torch.testing.assert_close(s.grad.full_tensor(), 0.5 * p.grad, rtol=1e-13,
                                           atol=1e-16)
            gs.add_penalty_grad_(0.5)  # into the existing grads
            for s, p in zip(shards, plain, strict=True):
                torch.testing.assert_close(s.grad.full_tensor(), p.grad, rtol=1e-13, atol=1e-16)
            # Prox in place on the local shards (its own copy of the reference).
            expected = [p.detach().clone() for p in plain]
            norms = sorted(ref.norms().tolist())
            lam = (norms[0] + norms[1]) / 2  # the smallest group is zeroed, the others shrink
            R.group_prox_(expected, IDS, 4, torch.full((4,), lam, dtype=torch.float64))
            result = gs.prox_(lam, 1.0)
            assert sum(result.zero.tolist()) == 1
            for s, e in zip(shards, expected, strict=True):
                torch.testing.assert_close(s.detach().full_tensor(), e, rtol=1e-13, atol=1e-16)
        # Tensors that are not all DTensors on one mesh, sharded alike, are refused by name.
        shards = [nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)]))
                  for p in plain]
        with pytest.raises(ValueError, match="either every tensor is a DTensor"):
            GroupSparsity(_groups(shards[:-1] + [plain[-1]]))
        with pytest.raises(ValueError, match="process_group must be None for DTensors"):
            GroupSparsity(_groups(shards), process_group=dist.group.WORLD)
        mixed = shards[:-1] + [nn.Parameter(distribute_tensor(plain[-1].detach(), mesh,
                                                              [Replicate()]))]
        with pytest.raises(ValueError, match="sharded on the same dimensions"):
            GroupSparsity(_groups(mixed))
        partial = shards[:-1] + [nn.Parameter(DTensor.from_local(plain[-1].detach(), mesh,
                                                                 [Partial()]))]
        with pytest.raises(ValueError, match="Partial placement"):
            GroupSparsity(_groups(partial))
    finally:
        dist.destroy_process_group()


def test_prox_optimizer_under_grad_scaler_skips_prox_with_the_step():
    p = nn.Parameter(torch.randn(6))
    gs = GroupSparsity({"p": [p]})
    opt = ProxOptimizer(torch.optim.SGD([p], lr=0.1), gs, alpha=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    scaler.scale((p**2).sum()).backward()
    expected = p.detach() - 0.1 * 2 * p.detach()
    scaler.step(opt)
    scaler.update()
    n = expected.norm()
    torch.testing.assert_close(p.detach(), expected * (1 - 0.1 / n))  # unscaled step, then prox
    assert opt.schedule.num_steps == 1
    before = p.detach().clone()
    opt.zero_grad()
    scaler.scale(p.sum() * float("inf")).backward()  # overflow: the whole step is skipped
    scaler.step(opt)
    assert torch.equal(p.detach(), before) and opt.schedule.num_steps == 1


# ----------------------------------------------------------------------------- Adam-metric prox
def _adam_thresholds_by_hand(opt, gs, lr, alpha) -> np.ndarray:
    """λ_g = lr·α·w_g / (√(mean_g v̂) + ε), from the optimizer state, in float64 NumPy."""
    out = np.zeros(gs.num_groups)
    pg = opt.param_groups[0]
    beta2, eps = pg["betas"][1], pg["eps"]
    w = gs.weights.double().numpy()
    for g in range(gs.num_groups):
        tensors = [p for p, gid in zip(gs.params, gs.group_ids, strict=True) if gid == g]
        v = np.concatenate([opt.state[p]["exp_avg_sq"].double().numpy().ravel() for p in tensors])
        t = float(opt.state[tensors[0]]["step"])
        d = math.sqrt(v.mean() / (1 - beta2 ** t)) + eps
        out[g] = lr * alpha * w[g] / d
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_adam_metric_thresholds_match_optimizer_state(dtype):
    torch.manual_seed(0)
    params = _params(dtype)
    gs = GroupSparsity(_groups(params), weights="sqrt_size")
    inner = torch.optim.AdamW(params, lr=0.03, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.01)
    opt = ProxOptimizer(inner, gs, alpha=0.7, metric="adam")
    for step in range(3):
        opt.zero_grad()
        # Very different gradient scales per group, so the d_g differ by orders of magnitude.
        loss = sum((10.0 ** (g - 2)) * (p.double() ** 2).sum() + p.double().sum() * 0.1 * step
                   for p, g in zip(params, IDS, strict=True))
        loss.backward()
        opt.step()
        lam = _adam_thresholds_by_hand(inner, gs, 0.03, 0.7)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        np.testing.assert_allclose(opt.last_result.thresholds.double().numpy(), lam, rtol=tol)
        np.testing.assert_allclose(gs.thresholds(opt._step_size(), 0.7).double().numpy(), lam, rtol=tol)
        d = opt.adam_scale().double().numpy()
        np.testing.assert_allclose(0.03 * 0.7 * gs.weights.double().numpy() / d, lam, rtol=tol)


def test_adam_metric_selects_groups_by_gradient_pressure():
    """Toy problem: group "useful" is pulled to a target of norm 2√2 > α; group "noise" only
    sees tiny zero-mean gradients. Adam moves both by ~lr per coordinate, so the Euclidean prox
    (λ = lr·α) cannot tell them apart and both survive; in Adam's metric the noise group is
    exactly zero while the useful one settles near the group-lasso solution ‖u‖ = 2√2 − α."""
    alpha, lr = 0.5, 0.05
    target = torch.ones(8, dtype=torch.float64)

    def run(metric: str) -> tuple[torch.Tensor, torch.Tensor]:
        u = nn.Parameter(torch.zeros(8, dtype=torch.float64))
        w = nn.Parameter(torch.zeros(8, dtype=torch.float64))
        gs = GroupSparsity({"useful": [u], "noise": [w]})
        opt = ProxOptimizer(torch.optim.Adam([u, w], lr=lr), gs, alpha=alpha, metric=metric)
        gen = torch.Generator().manual_seed(0)
        for _ in range(400):
            opt.zero_grad()
            noise = torch.randn(8, generator=gen, dtype=torch.float64) * 1e-3
            (0.5 * ((u - target) ** 2).sum() + (noise * w).sum()).backward()
            opt.step()
        return u.detach(), w.detach()

    u, w = run("adam")
    assert torch.count_nonzero(w) == 0
    assert abs(float(u.norm()) - (math.sqrt(8) - alpha)) < 0.1
    u_e, w_e = run("euclidean")
    assert float(w_e.norm()) > 0.01  # the cliff: the Euclidean threshold keeps the noise group


def test_adam_metric_group_without_state_uses_euclidean_threshold():
    a = nn.Parameter(torch.ones(3, dtype=torch.float64))
    b = nn.Parameter(torch.ones(2, dtype=torch.float64))
    gs = GroupSparsity({"a": [a], "b": [b]})
    inner = torch.optim.Adam([a, b], lr=0.1)
    opt = ProxOptimizer(inner, gs, alpha=0.5, metric="adam")
    (a * 2.0).sum().backward()  # b gets no gradient: Adam keeps no state for it
    opt.step()
    lam = opt.last_result.thresholds.tolist()
    assert lam[1] == pytest.approx(0.1 * 0.5)
    assert lam[0] == pytest.approx(0.1 * 0.5 / (2.0 + 1e-8))
    assert "adam" in repr(opt)


def test_adam_metric_rejects_optimizers_without_second_moments():
    p = nn.Parameter(torch.ones(3))
    gs = GroupSparsity({"a": [p]})
    with pytest.raises(ValueError, match="metric must be"):
        ProxOptimizer(torch.optim.Adam([p]), gs, alpha=1.0, metric="adagrad")
    with pytest.raises(ValueError, match="Adam-family.*SGD"):
        ProxOptimizer(torch.optim.SGD([p], lr=0.1), gs, alpha=1.0, metric="adam")
    opt = ProxOptimizer(torch.optim.Adamax([p], lr=0.1), gs, alpha=1.0, metric="adam")
    p.sum().backward()
    with pytest.raises(ValueError, match="exp_avg_sq.*Adamax"):
        opt.step()


def test_prox_optimizer_drives_a_hugging_face_trainer(tmp_path):
    """ProxOptimizer dropped into transformers' Trainer (``optimizers=(opt, None)``; Accelerate
    wraps it) trains a GS-LoRA ViT as the plain loop does: the same parameters, the same zero
    groups."""
    import transformers  # installed with peft (requirements-dev)
    from torch.utils.data import Dataset

    import gslora

    class Images(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"pixel_values": torch.randn(3, 16, 16, generator=g), "labels": i % 4}

    def setup(alpha):
        torch.manual_seed(0)
        cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                     intermediate_size=64, image_size=16, patch_size=4,
                                     num_channels=3, num_labels=4)
        model = transformers.ViTForImageClassification(cfg)
        sparsity = gslora.GroupSparsity(gslora.add_gslora(model, r=4, group_by="block"))
        for p, g in zip(sparsity.params, sparsity.group_ids, strict=True):  # B ≠ 0; block 1 big
            torch.nn.init.normal_(p, std=(0.002, 0.5, 0.002)[g])
        opt = gslora.ProxOptimizer(torch.optim.AdamW(sparsity.params, lr=1e-2), sparsity,
                                   alpha=alpha)
        return model, sparsity, opt

    steps, alpha = 8, 40.0
    model, sparsity, opt = setup(alpha)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8, use_cpu=True,
        report_to=[], save_strategy="no", lr_scheduler_type="constant", max_grad_norm=0.0,
        disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=Images(),
                         optimizers=(opt, None)).train()

    ref_model, ref_sparsity, ref_opt = setup(alpha)
    batch = [Images()[i] for i in range(8)]
    x = torch.stack([b["pixel_values"] for b in batch])
    y = torch.tensor([b["labels"] for b in batch])
    ref_model.train()
    for _ in range(steps):
        ref_model(pixel_values=x, labels=y).loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
    norms, ref_norms = sparsity.norms(), ref_sparsity.norms()
    assert (norms == 0).tolist() == (ref_norms == 0).tolist()
    assert 0 < int((norms == 0).sum()) < len(norms), norms  # some blocks dropped, some kept
    torch.testing.assert_close(norms, ref_norms, rtol=1e-4, atol=1e-6)
    for p, q in zip(sparsity.params, ref_sparsity.params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)

"""The fused AdamW + proximal step: the adamw_prox_ kernel against gslora.reference, the reference
against torch.optim.AdamW followed by the prox, and ProxOptimizer's fused path against its
unfused one."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from gslora import reference
from gslora._ext import load_error
from gslora.backends import get_backend
from gslora.sparsity import GroupSparsity, ProxOptimizer, SparsityWarmup

# Triton runs CPU tensors in the interpreter (conftest sets TRITON_INTERPRET=1), CUDA tensors
# under GSLORA_TEST_CUDA=1 on a GPU machine.
TRITON_DEVICE = ("cpu" if os.environ.get("TRITON_INTERPRET") == "1"
                 else "cuda" if torch.cuda.is_available() else None)
BACKENDS = [("cpu", "cpu"), ("torch", "cpu")]
if torch.cuda.is_available():
    BACKENDS += [("cuda", "cuda"), ("torch", "cuda")]
if TRITON_DEVICE is not None:
    BACKENDS.append(("triton", TRITON_DEVICE))
# The ProxOptimizer tests build CPU parameters.
CPU_BACKENDS = ["cpu", "torch"] + (["triton"] if TRITON_DEVICE == "cpu" else [])
HYPER = dict(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.05)


@pytest.fixture(autouse=True)
def _require_extension():
    assert load_error() is None, load_error()


def _state(dtype, device, seed=0):
    """Params of 5 unequal groups (group 1 empty, group 3 tiny so that it dies, one large tensor
    spanning several chunks, one non-contiguous), their grads and AdamW state after a few steps."""
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale)
    params = [mk(7, 3), mk(13), mk(5, 2, scale=1e-3), mk(1), mk(11, 9).t(), mk(3, 17001),
              mk(3, scale=1e-3), mk(2, 2)]
    ids = [0, 2, 3, 4, 0, 2, 3, 4]
    grads = [mk(*p.shape) for p in params]
    exp_avgs = [mk(*p.shape, scale=0.1) for p in params]
    exp_avg_sqs = [mk(*p.shape).abs() * 0.01 for p in params]
    conv = lambda ts: [t.to(device, dtype) for t in ts]
    out = conv(params), conv(grads), conv(exp_avgs), conv(exp_avg_sqs)
    assert not out[0][4].is_contiguous()
    return (*out, ids, 5)


def _clone(ts):
    return [t.clone() for t in ts]


def _steps(n, value):
    """AdamW's per-tensor step counts: float32 CPU scalars."""
    return [torch.tensor(value) for _ in range(n)]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("adam_metric", [False, True])
def test_kernel_matches_reference(backend, device, dtype, adam_metric):
    params, grads, ms, vs, ids, G = _state(dtype, device)
    # Thresholds relative to the updated norms (and to d_g in Adam's metric), from a dry run:
    # group 0 shrinks, group 3 dies, group 4 is left alone (λ = 0).
    dry = [_clone([t.double() for t in ts]) for ts in (params, grads, ms, vs)]
    n0, inv_d = reference.adamw_prox_(*dry, _steps(len(params), 3.0), ids, G,
                                      torch.ones(G, dtype=torch.float64, device=device), **HYPER,
                                      adam_metric=adam_metric)
    target = n0 * torch.tensor([0.5, 0.3, 0.3, 1.5, 0.0], dtype=torch.float64, device=device)
    lam = (target / inv_d).to(reference.accumulate_dtype(dtype))
    # The reference in float64 (for bf16: the kernel computes in float32 and rounds once).
    exp = [_clone([t.double() for t in ts]) for ts in (params, grads, ms, vs)]
    norms_exp, lam_exp = reference.adamw_prox_(*exp, _steps(len(params), 3.0), ids, G,
                                               lam.double(), **HYPER, adam_metric=adam_metric)
    steps = _steps(len(params), 3.0)
    norms, lam_used = get_backend(backend).adamw_prox_(
        params, grads, ms, vs, steps, ids, G, lam, **HYPER, adam_metric=adam_metric)
    assert all(s.item() == 4.0 for s in steps)
    tol = {torch.float64: dict(rtol=1e-12, atol=1e-14), torch.float32: dict(rtol=1e-5, atol=1e-6),
           torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}[dtype]
    assert norms.dtype == lam_used.dtype == reference.accumulate_dtype(dtype)
    torch.testing.assert_close(norms.double(), norms_exp, **tol)
    torch.testing.assert_close(lam_used.double(), lam_exp, **tol)
    for got, want in zip((params, ms, vs), exp[:1] + exp[2:], strict=True):
        for a, b in zip(got, want, strict=True):
            assert a.dtype == dtype
            torch.testing.assert_close(a.double(), b, **tol)
    # Group 3 (tiny) is exactly zero after the step; group 1 (no tensors) has norm 0, no NaN.
    zero = lam_exp >= norms_exp
    assert bool(zero[3]) and not bool(zero[0])
    assert params[2].abs().max().item() == 0 and params[6].abs().max().item() == 0
    assert torch.isfinite(norms).all() and torch.isfinite(lam_used).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("adam_metric", [False, True])
def test_kernel_matches_reference_model_layout(backend, device, dtype, adam_metric):
    """Equal groups large enough for the CPU kernel's thread team, which then gives every thread
    whole groups; one group dies, the others shrink."""
    g = torch.Generator().manual_seed(2)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    params, ids = [], []
    for b in range(6):
        params += [mk(4, 256), mk(1024, 4), mk(4, 1024), mk(4, 256).t()]
        ids += [b] * 4
    state = [params, [mk(*p.shape) for p in params], [mk(*p.shape) * 0.1 for p in params],
             [mk(*p.shape).abs() * 0.01 for p in params]]
    exp = [_clone(ts) for ts in state]
    n0, _ = reference.adamw_prox_(*[_clone(ts) for ts in state], _steps(len(params), 3.0), ids, 6,
                                  torch.zeros(6, dtype=torch.float64), **HYPER, adam_metric=False)
    lam = n0 * torch.tensor([0.1, 0.2, 0.3, 0.4, 1.5, 0.0], dtype=torch.float64)
    if adam_metric:
        lam = lam * 1e-3
    norms_exp, lam_exp = reference.adamw_prox_(*exp, _steps(len(params), 3.0), ids, 6, lam, **HYPER,
                                               adam_metric=adam_metric)
    got = [[t.to(device, dtype) for t in ts] for ts in state]
    norms, lam_used = get_backend(backend).adamw_prox_(
        *got, _steps(len(params), 3.0), ids, 6, lam.to(device, dtype), **HYPER,
        adam_metric=adam_metric)
    tol = {torch.float64: dict(rtol=1e-12, atol=1e-14), torch.float32: dict(rtol=1e-5, atol=1e-6)}[dtype]
    torch.testing.assert_close(norms.double().cpu(), norms_exp, **tol)
    torch.testing.assert_close(lam_used.double().cpu(), lam_exp, **tol)
    for got_ts, want_ts in zip(got[:1] + got[2:], exp[:1] + exp[2:], strict=True):
        for a, b in zip(got_ts, want_ts, strict=True):
            torch.testing.assert_close(a.double().cpu(), b, **tol)
    if not adam_metric:
        assert all((p == 0).all() for p, i in zip(got[0], ids, strict=True) if i == 4)


@pytest.mark.parametrize("adam_metric", [False, True])
def test_reference_is_adamw_then_prox(adam_metric):
    """The specification equals torch.optim.AdamW's step followed by the group prox with
    thresholds λ_g (divided by d_g = √mean v̂ + ε in Adam's metric)."""
    params, grads, ms, vs, ids, G = _state(torch.float64, "cpu")
    params = [p.contiguous() for p in params]
    lam = torch.tensor([0.5, 0.1, 0.2, 0.05, 0.0], dtype=torch.float64)
    ref = [_clone(ts) for ts in (params, grads, ms, vs)]
    norms, lam_used = reference.adamw_prox_(*ref, _steps(len(params), 2.0), ids, G, lam, **HYPER,
                                            adam_metric=adam_metric)

    leaves = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.AdamW(leaves, lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]),
                            eps=HYPER["eps"], weight_decay=HYPER["weight_decay"])
    for p, g, m, v in zip(leaves, grads, ms, vs, strict=True):
        p.grad = g.clone()
        opt.state[p] = {"step": torch.tensor(2.0), "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    opt.step()
    expected_lam = lam.clone()
    if adam_metric:
        for g in range(G):
            members = [opt.state[p]["exp_avg_sq"] for p, i in zip(leaves, ids, strict=True) if i == g]
            if members:
                v_hat = torch.cat([v.flatten() for v in members]) / (1 - HYPER["beta2"] ** 3)
                expected_lam[g] = lam[g] / (v_hat.mean().sqrt() + HYPER["eps"])
    with torch.no_grad():
        expected_norms = reference.group_prox_(leaves, ids, G, expected_lam)
    torch.testing.assert_close(lam_used, expected_lam, rtol=1e-12, atol=0)
    torch.testing.assert_close(norms, expected_norms, rtol=1e-12, atol=0)
    for a, b in zip(ref[0], leaves, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-15)
    for a, p in zip(ref[3], leaves, strict=True):
        torch.testing.assert_close(a, opt.state[p]["exp_avg_sq"], rtol=1e-12, atol=0)


def test_opcheck():
    params, grads, ms, vs, ids, G = _state(torch.float32, "cpu")
    params = [p.contiguous() for p in params]
    lam = torch.full((G,), 0.01)
    torch.library.opcheck(torch.ops.gslora.adamw_prox_.default,
                          (params, grads, ms, vs, _steps(len(params), 0.0), ids, G, lam, 1e-2, 0.9,
                           0.999, 1e-8, 0.01, True))


def _bad_call_setup(device):
    """State for the bad-argument tests, fresh step counts (which a rejected call must not
    change) and valid hyper-parameters."""
    params, grads, ms, vs, ids, G = _state(torch.float32, device)
    steps = _steps(len(params), 0.0)
    args = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, adam_metric=False)
    return params, grads, ms, vs, ids, G, steps, args


def test_bad_arguments():
    params, grads, ms, vs, ids, G, steps, args = _bad_call_setup("cpu")
    lam = torch.zeros(G)
    op = get_backend("cpu").adamw_prox_
    with pytest.raises(RuntimeError, match=r"grads\[1\] has shape"):
        op(params, [grads[0], grads[0]] + grads[2:], ms, vs, steps, ids, G, lam, **args)
    with pytest.raises(RuntimeError, match="exp_avg_sqs has 7 tensors"):
        op(params, grads, ms, vs[:-1], steps, ids, G, lam, **args)
    with pytest.raises(RuntimeError, match=r"exp_avgs\[0\] has dtype"):
        op(params, grads, [ms[0].double()] + ms[1:], vs, steps, ids, G, lam, **args)
    with pytest.raises(RuntimeError, match="beta2 must lie in"):
        op(params, grads, ms, vs, steps, ids, G, lam, **{**args, "beta2": 1.0})
    with pytest.raises(RuntimeError, match="thresholds must be >= 0"):
        op(params, grads, ms, vs, steps, ids, G, -torch.ones(G), **args)
    with pytest.raises(RuntimeError, match=r"state_steps\[2\] = 1 but state_steps\[0\] = 0"):
        op(params, grads, ms, vs, steps[:2] + _steps(6, 1.0), ids, G, lam, **args)
    with pytest.raises(RuntimeError, match="state_steps must be >= 0"):
        op(params, grads, ms, vs, _steps(len(params), -1.0), ids, G, lam, **args)
    # A rejected call changes nothing.
    assert all(s.item() == 0.0 for s in steps)


@pytest.mark.skipif(TRITON_DEVICE is None, reason="triton runs neither interpreted nor on a GPU")
def test_triton_op_checks_and_bad_arguments():
    """The Triton op: torch.library's checks and its Python validation."""
    params, grads, ms, vs, ids, G, steps, args = _bad_call_setup(TRITON_DEVICE)
    params = [p.contiguous() for p in params]
    lam = torch.full((G,), 0.01, device=TRITON_DEVICE)
    torch.library.opcheck(torch.ops.gslora_triton.adamw_prox_.default,
                          (params, grads, ms, vs, _steps(len(params), 0.0), ids, G, lam, 1e-2, 0.9,
                           0.999, 1e-8, 0.01, True))
    op = get_backend("triton").adamw_prox_
    with pytest.raises(ValueError, match=r"grads\[1\] is \[7, 3\]"):
        op(params, [grads[0], grads[0]] + grads[2:], ms, vs, steps, ids, G, lam, **args)
    with pytest.raises(ValueError, match="exp_avg_sqs has 7 tensors"):
        op(params, grads, ms, vs[:-1], steps, ids, G, lam, **args)
    with pytest.raises(ValueError, match="beta2 = 1.0 is out of range"):
        op(params, grads, ms, vs, steps, ids, G, lam, **{**args, "beta2": 1.0})
    with pytest.raises(ValueError, match="state_steps must all be equal"):
        op(params, grads, ms, vs, steps[:2] + _steps(6, 1.0), ids, G, lam, **args)
    with pytest.raises(ValueError, match="thresholds must be a tensor of shape"):
        op(params, grads, ms, vs, steps, ids, G, lam[:-1], **args)
    assert all(s.item() == 0.0 for s in steps)


# ---------------------------------------------------------------------------- ProxOptimizer
def _model_groups(seed=0):
    """4 LoRA-like groups; groups 1 and 3 start small so that the prox zeroes them."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 37), (53, 8), (8, 53), (37, 8)]
    return {f"block{b}": [torch.nn.Parameter(torch.randn(*s, generator=g) * (0.01 if b % 2 else 1.0))
                          for s in shapes] for b in range(4)}


def _train(fused, metric, backend=None, steps=8, alpha=0.5, state_dict=None):
    sp = GroupSparsity(_model_groups(), backend=backend)
    inner = torch.optim.AdamW(list(sp.params), lr=0.05, weight_decay=0.05)
    opt = ProxOptimizer(inner, sp, SparsityWarmup(alpha, warmup_steps=2), metric=metric, fused=fused)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    if state_dict is not None:
        opt.load_state_dict(state_dict)
    gen = torch.Generator().manual_seed(1)
    results = []
    for _ in range(steps):
        for t in sp.params:
            t.grad = torch.randn(t.shape, generator=gen) * 0.1
        opt.step()
        sched.step()
        assert opt.last_step_fused == bool(fused)
        results.append(opt.last_result)
    return sp, opt, results


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("metric", ["euclidean", "adam"])
def test_prox_optimizer_fused_equals_unfused(backend, metric):
    # λ ≈ 3 either way (d_g ≈ 0.1, the gradients' RMS, in Adam's metric): between the small
    # groups' norms (~1–2 after the warm-up) and the large ones' (~40).
    alpha = 60.0 if metric == "euclidean" else 6.0
    sp_f, opt_f, res_f = _train(True, metric, backend, alpha=alpha)
    sp_u, opt_u, res_u = _train(False, metric, backend, alpha=alpha)
    for a, b in zip(sp_f.params, sp_u.params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt_f.state[a][key], opt_u.state[b][key], rtol=1e-5, atol=1e-7)
    assert res_f[0] is None and res_u[0] is None  # warm-up: α = 0, no prox
    for rf, ru in zip(res_f[2:], res_u[2:], strict=True):
        for field in ("norms_before", "norms_after", "thresholds"):
            torch.testing.assert_close(getattr(rf, field), getattr(ru, field), rtol=1e-5, atol=1e-7)
        assert torch.equal(rf.zero, ru.zero)
    zero = res_f[-1].zero.tolist()
    assert zero == [False, True, False, True], zero  # the small groups died, exactly
    assert all(t.abs().max().item() == 0 for t in sp_f.params[4:8] + sp_f.params[12:16])
    assert opt_f.stats()["zero_groups"] == 2


def test_fused_state_dict_resumes_unfused():
    """The fused path keeps AdamW's own state: its state dict resumes an unfused optimizer."""
    def make(fused, params=None):
        groups = _model_groups()
        if params is not None:
            with torch.no_grad():
                for t, v in zip([t for ts in groups.values() for t in ts], params, strict=True):
                    t.copy_(v)
        sp = GroupSparsity(groups)
        return sp, ProxOptimizer(torch.optim.AdamW(list(sp.params), lr=0.05), sp, 6.0,
                                 metric="adam", fused=fused)

    def run(sp, opt, steps, seed):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            for t in sp.params:
                t.grad = torch.randn(t.shape, generator=gen) * 0.1
            opt.step()

    sp_a, opt_a = make(True)
    run(sp_a, opt_a, 3, seed=1)
    sd = opt_a.state_dict()
    assert sd["state"][0]["step"].item() == 3.0
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}  # torch.optim.AdamW's keys
    sp_b, opt_b = make(False, [t.detach() for t in sp_a.params])
    opt_b.load_state_dict(copy.deepcopy(sd))  # state_dict() shares the live state tensors
    run(sp_a, opt_a, 3, seed=2)
    run(sp_b, opt_b, 3, seed=2)
    assert opt_a.last_step_fused and not opt_b.last_step_fused
    for a, b in zip(sp_a.params, sp_b.params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_only_when_possible():
    groups = _model_groups()
    sp = GroupSparsity(groups)
    sgd = ProxOptimizer(torch.optim.SGD(list(sp.params), lr=0.1), sp, 0.1)
    extra = torch.nn.Parameter(torch.zeros(3))
    more = ProxOptimizer(torch.optim.AdamW(list(sp.params) + [extra], lr=0.1), sp, 0.1)
    ams = ProxOptimizer(torch.optim.AdamW(list(sp.params), lr=0.1, amsgrad=True), sp, 0.1)
    for t in sp.params:
        t.grad = torch.ones_like(t)
    extra.grad = torch.ones(3)
    for opt, why in ((sgd, "not torch.optim.AdamW"), (more, "not exactly the sparsity's tensors"),
                     (ams, "amsgrad")):
        opt.step()
        assert not opt.last_step_fused
        with pytest.raises(ValueError, match=why):
            ProxOptimizer(opt.optimizer, sp, 0.1, fused=True)
    auto = ProxOptimizer(torch.optim.AdamW(list(sp.params), lr=0.1), sp, 0.1)
    auto.step()
    assert auto.last_step_fused
    # A tensor without a gradient: AdamW skips it, so the step falls back to the unfused path
    # (or refuses, with fused=True).
    sp.params[0].grad = None
    auto.step()
    assert not auto.last_step_fused
    assert auto.state[sp.params[0]]["step"].item() == 1.0 and auto.state[sp.params[1]]["step"].item() == 2.0
    strict = ProxOptimizer(torch.optim.AdamW(list(sp.params), lr=0.1), sp, 0.1, fused=True)
    with pytest.raises(RuntimeError, match="has no dense gradient"):
        strict.step()
    # Step counts that differ (from the skipped tensor above) are not fused either.
    sp.params[0].grad = torch.ones_like(sp.params[0])
    auto.step()
    assert not auto.last_step_fused


def test_fused_by_default_only_with_a_fused_kernel():
    # The torch backend's adamw_prox_ is the reference's math op by op: by default AdamW's own
    # step and the fused prox run instead; fused=True still gets the (same) fused math.
    for backend in CPU_BACKENDS:
        kernel = backend != "torch"
        sp = GroupSparsity(_model_groups(), backend=backend)
        assert sp._impl.has_fused_adamw_prox() is kernel
        for t in sp.params:
            t.grad = torch.ones_like(t)
        auto = ProxOptimizer(torch.optim.AdamW(list(sp.params), lr=0.1), sp, 0.1)
        strict = ProxOptimizer(torch.optim.AdamW(list(sp.params), lr=0.1), sp, 0.1, fused=True)
        auto.step()
        strict.step()
        assert auto.last_step_fused is kernel and strict.last_step_fused

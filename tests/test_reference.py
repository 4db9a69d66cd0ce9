"""The specification itself: the explicit backward of reference.py against autograd (float64)."""

import pytest
import torch

from gslora import reference


def _inputs(m, k, n, r, bias=True, dtype=torch.float64):
    x = torch.randn(m, k, dtype=dtype)
    w = torch.randn(n, k, dtype=dtype)
    b = torch.randn(n, dtype=dtype) if bias else None
    a = torch.randn(r, k, dtype=dtype)
    bb = torch.randn(n, r, dtype=dtype)
    return x, w, b, a, bb


@pytest.mark.parametrize("m,k,n,r", [(5, 7, 3, 1), (17, 33, 9, 4), (3, 64, 130, 16)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [False, True])
def test_explicit_backward_matches_autograd(m, k, n, r, bias, dropout):
    x, w, b, a, bb = _inputs(m, k, n, r, bias)
    s = 0.37
    mask = torch.rand(m, k) >= 0.3 if dropout else None
    keep = 1 / 0.7 if dropout else 1.0
    y, xa = reference.lora_linear_fwd(x, w, b, a, bb, s, mask, keep)

    xr, ar, br = (t.clone().requires_grad_() for t in (x, a, bb))
    dx_in = xr * mask * keep if dropout else xr
    y_auto = torch.nn.functional.linear(xr, w, b) + s * (dx_in @ ar.t()) @ br.t()
    torch.testing.assert_close(y, y_auto, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xa, dx_in.detach() @ a.t(), rtol=1e-12, atol=1e-12)

    g = torch.randn(m, n, dtype=torch.float64)
    y_auto.backward(g)
    dx, da, db = reference.lora_linear_bwd(g, x, w, a, bb, xa, s, mask, keep)
    torch.testing.assert_close(dx, xr.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(da, ar.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(db, br.grad, rtol=1e-12, atol=1e-12)
    no_dx, _, _ = reference.lora_linear_bwd(g, x, w, a, bb, xa, s, mask, keep, compute_dx=False)
    assert no_dx is None


def test_scaling_rules():
    assert reference.lora_scaling(8, 1.0) == 1 / 8
    assert reference.lora_scaling(16, 8.0, use_rslora=True) == 2.0


def test_group_functions_match_concatenated_norms():
    tensors = [torch.randn(3, 5, dtype=torch.float64), torch.randn(7, dtype=torch.float64),
               torch.randn(2, 2, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)]
    ids = [1, 0, 1, 2]
    norms = reference.group_norms(tensors, ids, 3)
    expect = torch.stack([
        tensors[1].norm(), torch.cat([tensors[0].flatten(), tensors[2].flatten()]).norm(),
        torch.tensor(0.0, dtype=torch.float64)])
    torch.testing.assert_close(norms, expect)

    params = [t.clone().requires_grad_() for t in tensors]
    weights = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    reference.group_lasso_penalty(params, ids, 3, weights).backward()
    coeffs = torch.where(norms > 0, weights / torch.where(norms > 0, norms, 1), 0)
    for p, t, g in zip(params, tensors, ids, strict=True):
        torch.testing.assert_close(p.grad, t * coeffs[g])
    assert torch.isfinite(params[3].grad).all() and (params[3].grad == 0).all()
    scaled = reference.group_scale(tensors, ids, coeffs)
    for s_, p in zip(scaled, params, strict=True):
        torch.testing.assert_close(s_, p.grad)


def test_prox_closed_form_and_exact_zeros():
    tensors = [torch.randn(4, 6, dtype=torch.float64), torch.randn(9, dtype=torch.float64) * 1e-3]
    before = [t.clone() for t in tensors]
    lam = torch.tensor([0.5, 1.0], dtype=torch.float64)
    norms = reference.group_prox_(tensors, [0, 1], 2, lam)
    torch.testing.assert_close(norms[0], before[0].norm())
    torch.testing.assert_close(tensors[0], before[0] * (1 - 0.5 / before[0].norm()))
    assert (tensors[1] == 0).all()  # norm 3e-3 < 1.0: exact zero


def test_group_ids_are_validated():
    with pytest.raises(ValueError, match="group_ids"):
        reference.group_sq_norms([torch.ones(2)], [0, 1], 2)
    with pytest.raises(ValueError, match="group_ids"):
        reference.group_sq_norms([torch.ones(2)], [3], 2)


def test_penalty_of_group_without_tensors_is_zero():
    t = torch.randn(5, dtype=torch.float64, requires_grad=True)
    p = reference.group_lasso_penalty([t], [1], 3)
    torch.testing.assert_close(p, t.detach().norm())

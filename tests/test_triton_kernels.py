"""The Triton kernels (gslora.kernels) against the specification, gslora/reference.py.

Here they run in Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1),
with small odd shapes and few programs (each interpreted program costs ~1 ms). On a GPU machine
``GSLORA_TEST_CUDA=1`` runs the same tests on CUDA tensors with larger shapes.

Accuracy rule (DESIGN.md): compare with the float64 reference; for every dtype the kernel's error
must stay within 2x the error the reference itself makes in that dtype (fp32 accumulation, one
rounding at the end) plus a small floor of a few units in the last place.
"""

import importlib
import os

import pytest
import torch

from gslora import functional, reference

triton = pytest.importorskip("triton")
kernels = importlib.import_module("gslora.kernels")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRET:
    DEVICE = "cpu"
elif os.environ.get("GSLORA_TEST_CUDA") == "1" and torch.cuda.is_available():
    DEVICE = "cuda"
    # One config per kernel: autotuning every config for every test shape costs minutes.
    os.environ.setdefault("GSLORA_TRITON_AUTOTUNE", "0")
else:  # pragma: no cover - depends on the machine
    pytest.skip("needs TRITON_INTERPRET=1 or GSLORA_TEST_CUDA=1 with a GPU", allow_module_level=True)

# (M, K, N): odd sizes that are not multiples of any block; the second spans several programs.
SHAPES = [(37, 45, 53), (130, 70, 150)] if INTERPRET else [(37, 1000, 1531), (4099, 768, 3072)]
SHAPE = SHAPES[0]
LOW = (torch.float16, torch.bfloat16)


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def assert_close_to_spec(name, got, ref_lowp, ref64, dtype):
    """err(kernel) <= 2 * err(reference in dtype) + a floor of a few ulps of the output scale."""
    assert got is not None, name
    assert got.dtype == ref_lowp.dtype, f"{name}: dtype {got.dtype} != {ref_lowp.dtype}"
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got.double() - ref64).abs().max().item()
    err_ref = (ref_lowp.double() - ref64).abs().max().item()
    floor = 4 * _eps(dtype) * max(ref64.abs().max().item(), 1e-30)
    assert err <= 2 * err_ref + floor, (
        f"{name} ({dtype}): max error {err:.3e} > 2 x reference error {err_ref:.3e} + {floor:.3e}"
    )


def _make(m, k, n, r, dtype, bias=True, device=DEVICE):
    g = torch.Generator().manual_seed(1234 + m + k + n + r)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    x = rnd(m, k)
    w = rnd(n, k, scale=k ** -0.5)
    b = rnd(n) if bias else None
    a = rnd(r, k, scale=k ** -0.5)
    bb = rnd(n, r, scale=0.5)
    grad = rnd(m, n)
    return x, w, b, a, bb, grad


def _check_fwd_bwd(x, w, b, a, bb, grad, scaling, mask=None, keep=1.0, compute_dx=True):
    dtype = x.dtype
    y, xa = kernels.lora_linear_fwd(x, w, b, a, bb, scaling, mask, keep)
    y_l, xa_l = reference.lora_linear_fwd(x, w, b, a, bb, scaling, mask, keep)
    d = [t.double() if t is not None else None for t in (x, w, b, a, bb)]
    y_64, xa_64 = reference.lora_linear_fwd(*d, scaling, mask, keep)
    assert_close_to_spec("y", y, y_l, y_64, dtype)
    assert_close_to_spec("xa", xa, xa_l, xa_64, dtype)

    dx, da, db = kernels.lora_linear_bwd(grad, x, w, a, bb, xa, scaling, mask, keep, compute_dx)
    ref_l = reference.lora_linear_bwd(grad, x, w, a, bb, xa, scaling, mask, keep, compute_dx)
    ref_64 = reference.lora_linear_bwd(
        grad.double(), d[0], d[1], d[3], d[4], xa.double(), scaling, mask, keep, compute_dx
    )
    assert_close_to_spec("dA", da, ref_l[1], ref_64[1], dtype)
    assert_close_to_spec("dB", db, ref_l[2], ref_64[2], dtype)
    if compute_dx:
        assert_close_to_spec("dx", dx, ref_l[0], ref_64[0], dtype)
    else:
        assert dx is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("r", [1, 8, 64])
@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_matches_reference(dtype, r, bias):
    m, k, n = SHAPE
    x, w, b, a, bb, grad = _make(m, k, n, r, dtype, bias)
    _check_fwd_bwd(x, w, b, a, bb, grad, scaling=2.0 / r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_linear_several_programs(dtype):
    m, k, n = SHAPES[1]
    x, w, b, a, bb, grad = _make(m, k, n, 16, dtype)
    _check_fwd_bwd(x, w, b, a, bb, grad, scaling=0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lora_linear_dropout_mask(dtype):
    m, k, n = SHAPE
    x, w, b, a, bb, grad = _make(m, k, n, 8, dtype)
    mask = torch.rand(m, k, device=DEVICE) >= 0.3
    _check_fwd_bwd(x, w, b, a, bb, grad, scaling=0.25, mask=mask, keep=1 / 0.7)


def test_lora_linear_dropout_masks_x_for_lora_only():
    # With an all-false mask the LoRA path sees zeros: y = x·Wᵀ + b, xa = 0, dA = 0, dx = g·W.
    m, k, n = SHAPE
    x, w, b, a, bb, grad = _make(m, k, n, 8, torch.float32)
    mask = torch.zeros(m, k, dtype=torch.bool, device=DEVICE)
    y, xa = kernels.lora_linear_fwd(x, w, b, a, bb, 1.0, mask, 2.0)
    assert torch.equal(xa, torch.zeros_like(xa))
    torch.testing.assert_close(y, x @ w.t() + b, rtol=1e-5, atol=1e-5)
    dx, da, _ = kernels.lora_linear_bwd(grad, x, w, a, bb, xa, 1.0, mask, 2.0)
    assert torch.equal(da, torch.zeros_like(da))
    torch.testing.assert_close(dx, grad @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lora_linear_compute_dx_false(dtype):
    m, k, n = SHAPE
    x, w, b, a, bb, grad = _make(m, k, n, 8, dtype)
    _check_fwd_bwd(x, w, b, a, bb, grad, scaling=0.5, compute_dx=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_linear_non_contiguous_inputs(dtype):
    m, k, n = SHAPE
    x, w, b, a, bb, grad = _make(m, k, n, 8, dtype)
    # Same values, transposed storage: every operand is a non-contiguous view.
    xt = x.t().contiguous().t()
    wt = w.t().contiguous().t()
    at = a.t().contiguous().t()
    bt = bb.t().contiguous().t()
    gt = grad.t().contiguous().t()
    sliced_b = torch.stack([b, b], 1)[:, 0]
    assert not any(t.is_contiguous() for t in (xt, wt, at, bt, gt, sliced_b))
    _check_fwd_bwd(xt, wt, sliced_b, at, bt, gt, scaling=0.5)


def test_lora_linear_empty_batch():
    x, w, b, a, bb, _ = _make(0, 45, 53, 8, torch.float32)
    y, xa = kernels.lora_linear_fwd(x, w, b, a, bb, 1.0)
    assert y.shape == (0, 53) and xa.shape == (0, 8)
    dx, da, db = kernels.lora_linear_bwd(y, x, w, a, bb, xa, 1.0)
    assert dx.shape == (0, 45)
    assert torch.equal(da, torch.zeros_like(da)) and torch.equal(db, torch.zeros_like(db))


def test_functional_lora_linear_autograd_triton():
    # Through the public API (3-D input, autograd) against plain autograd on the reference.
    m, k, n = SHAPE
    x, w, b, a, bb, _ = _make(2 * m, k, n, 8, torch.float32)
    x = x.reshape(2, m, k)
    leaves = [t.clone().requires_grad_() for t in (x, a, bb)]
    y = functional.lora_linear(leaves[0], w, b, leaves[1], leaves[2], 0.5, backend="triton")
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    refs = [t.clone().requires_grad_() for t in (x, a, bb)]
    y_ref = reference.lora_linear(refs[0], w, b, refs[1], refs[2], 0.5)
    (y_ref * gy).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(leaves, refs, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-5)


def test_functional_dropout_triton_matches_torch_backend():
    m, k, n = SHAPE
    x, w, b, a, bb, _ = _make(m, k, n, 8, torch.float32)
    outs = []
    # The same dropout mask for every run (the mask depends on the seed and x's shape only); the
    # torch backend in float64 is the exact result both float32 runs are held to.
    for backend, dtype in (("triton", torch.float32), ("torch", torch.float32),
                           ("torch", torch.float64)):
        torch.manual_seed(7)
        leaves = [t.to(dtype).clone().requires_grad_() for t in (x, a, bb)]
        y = functional.lora_linear(leaves[0], w.to(dtype), b.to(dtype), leaves[1], leaves[2], 0.5,
                                   dropout=0.25, training=True, backend=backend)
        y.square().sum().backward()
        outs.append([y.detach()] + [t.grad for t in leaves])
    for name, got, want, exact in zip(("y", "dx", "dA", "dB"), *outs, strict=True):
        assert_close_to_spec(name, got, want, exact, torch.float32)


def test_lora_linear_bad_input_names_the_argument():
    x, w, b, a, bb, grad = _make(5, 16, 24, 4, torch.float32)
    with pytest.raises(ValueError, match="float64"):
        kernels.lora_linear_fwd(x.double(), w.double(), None, a.double(), bb.double(), 1.0)
    with pytest.raises(ValueError, match="lora_B"):
        kernels.lora_linear_fwd(x, w, b, a, bb.t(), 1.0)
    with pytest.raises(ValueError, match="mask"):
        kernels.lora_linear_fwd(x, w, b, a, bb, 1.0, torch.ones(5, 15, dtype=torch.bool), 1.0)
    with pytest.raises(ValueError, match="mask"):
        kernels.lora_linear_fwd(x, w, b, a, bb, 1.0, torch.ones(5, 16), 1.0)
    with pytest.raises(ValueError, match="grad_out"):
        kernels.lora_linear_bwd(grad[:, :3], x, w, a, bb, x[:, :4], 1.0)
    with pytest.raises(ValueError, match="bias"):
        kernels.lora_linear_fwd(x, w, b[:3], a, bb, 1.0)


# ------------------------------------ group ops ----------------------------------------------

def _group_tensors(dtype, device=DEVICE, scale=1.0):
    g = torch.Generator().manual_seed(99)
    big = 700 if INTERPRET else 300_000

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    tensors = [
        rnd(5, 7),
        rnd(11, 3).t(),            # non-contiguous
        torch.zeros(4, device=device, dtype=dtype),  # group 2 is all zeros
        rnd(13),
        rnd(2, 3),
        rnd(big),                   # a large tensor: several blocks in one program
        rnd(3, 0),                  # empty tensor
        rnd(9, 4)[::2],             # strided rows
    ]
    # Group 4 has no tensors at all; groups have unequal sizes and member counts.
    ids = [0, 0, 2, 1, 0, 3, 1, 5]
    return tensors, ids, 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_group_sq_norms_matches_reference(dtype):
    tensors, ids, num_groups = _group_tensors(dtype)
    got = kernels.group_sq_norms(tensors, ids, num_groups)
    want = reference.group_sq_norms(tensors, ids, num_groups)
    assert got.dtype == want.dtype and got.shape == (num_groups,)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want, rtol=rtol, atol=0)
    assert got[2].item() == 0.0 and got[4].item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_group_scale_matches_reference(dtype):
    tensors, ids, num_groups = _group_tensors(dtype)
    acc = reference.accumulate_dtype(dtype)
    coeffs = torch.tensor([0.5, -2.0, 3.0, 0.0, 7.0, 1.5], dtype=acc, device=DEVICE)
    got = kernels.group_scale(tensors, ids, coeffs)
    want = reference.group_scale(tensors, ids, coeffs)
    for i, (g_, w_) in enumerate(zip(got, want, strict=True)):
        assert g_.shape == w_.shape and g_.dtype == w_.dtype, i
        # Elementwise product and one rounding: bitwise equal to the reference.
        assert torch.equal(g_, w_), f"tensor {i}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_group_prox_matches_reference(dtype):
    tensors, ids, num_groups = _group_tensors(dtype)
    norms = reference.group_norms(tensors, ids, num_groups)
    # Group 0 shrinks, group 1 is zeroed (threshold above its norm), group 3 keeps lam = 0,
    # group 5 is zeroed exactly at lam == norm; groups 2 and 4 are empty/zero (no NaN).
    thr = torch.stack([norms[0] * 0.3, norms[1] * 1.5, norms[2], norms[3] * 0,
                       norms[4] + 1, norms[5]]).to(norms.dtype)
    mine = [t.clone() for t in tensors]
    # Keep the non-contiguous layouts: the kernel must write back into the original views.
    mine[1] = tensors[1].t().clone().t()
    mine[7] = torch.cat([tensors[7][:, None], tensors[7][:, None]], 1)[:, 0]
    assert not mine[1].is_contiguous() and not mine[7].is_contiguous()
    theirs = [t.clone() for t in tensors]
    got = kernels.group_prox_(mine, ids, num_groups, thr)
    want = reference.group_prox_(theirs, ids, num_groups, thr)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want, rtol=rtol, atol=0)
    for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
        assert torch.isfinite(a).all(), i
        torch.testing.assert_close(a, b, rtol=2 * _eps(dtype), atol=0, msg=f"tensor {i}")
    for i, g in enumerate(ids):
        if g in (1, 2, 5):
            assert torch.equal(mine[i], torch.zeros_like(mine[i])), f"group {g} not exactly zero"


def test_group_lasso_penalty_autograd_triton():
    tensors, ids, num_groups = _group_tensors(torch.float32)
    # reference.group_lasso_penalty cannot take a group without tensors: give group 4 the empty one.
    ids = [0, 0, 2, 1, 0, 3, 4, 5]
    weights = torch.arange(1, num_groups + 1, dtype=torch.float32, device=DEVICE)
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    p = functional.group_lasso_penalty(leaves, ids, num_groups, weights, backend="triton")
    p.backward()
    refs = [t.detach().clone().requires_grad_() for t in tensors]
    p_ref = reference.group_lasso_penalty(refs, ids, num_groups, weights)
    p_ref.backward()
    torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=0)
    for i, (a, b) in enumerate(zip(leaves, refs, strict=True)):
        assert torch.isfinite(a.grad).all(), i
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=f"tensor {i}")


def test_functional_group_prox_triton():
    tensors, ids, num_groups = _group_tensors(torch.float32)
    mine = [t.clone() for t in tensors]
    theirs = [t.clone() for t in tensors]
    got = functional.group_prox_(mine, ids, num_groups, 0.5, backend="triton")
    want = functional.group_prox_(theirs, ids, num_groups, 0.5, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_group_ops_bad_input_names_the_argument():
    tensors, ids, num_groups = _group_tensors(torch.float32)
    with pytest.raises(ValueError, match="group_ids"):
        kernels.group_sq_norms(tensors, ids[:-1], num_groups)
    with pytest.raises(ValueError, match="group id"):
        kernels.group_sq_norms(tensors, ids, 3)
    with pytest.raises(ValueError, match="thresholds"):
        kernels.group_prox_(tensors, ids, num_groups, torch.zeros(num_groups + 1))
    with pytest.raises(ValueError, match=r"tensors\[1\]"):
        kernels.group_sq_norms([tensors[0], tensors[1].half()], [0, 0], 1)
    with pytest.raises(ValueError, match="coeffs"):
        kernels.group_scale(tensors, ids, torch.zeros(num_groups, 2))


# --------------------------------- custom ops / compile --------------------------------------

def test_custom_ops_registered_and_reimport_is_harmless():
    ops = importlib.import_module("gslora.kernels.ops")
    importlib.reload(ops)  # a second registration must reuse the existing ops, not fail
    for name in ("lora_linear_fwd", "lora_linear_bwd", "group_sq_norms", "group_scale",
                 "group_prox_"):
        assert hasattr(torch.ops.gslora_triton, name)
    assert kernels.unavailable_reason() is None


def test_custom_ops_opcheck():
    x, w, b, a, bb, grad = _make(9, 16, 24, 4, torch.float32)
    mask = torch.rand(9, 16, device=DEVICE) > 0.5
    y, xa = torch.ops.gslora_triton.lora_linear_fwd(x, w, b, a, bb, 0.5, mask, 2.0)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.gslora_triton.lora_linear_fwd.default,
                          (x, w, b, a, bb, 0.5, mask, 2.0), test_utils=checks)
    torch.library.opcheck(torch.ops.gslora_triton.lora_linear_bwd.default,
                          (grad, x, w, a, bb, xa, 0.5, mask, 2.0, False), test_utils=checks)
    tensors, ids, g = _group_tensors(torch.float32)
    tensors = [t.contiguous() for t in tensors]
    torch.library.opcheck(torch.ops.gslora_triton.group_sq_norms.default, (tensors, ids, g),
                          test_utils=checks)
    torch.library.opcheck(torch.ops.gslora_triton.group_scale.default,
                          (tensors, ids, torch.ones(g, device=DEVICE)), test_utils=checks)
    torch.library.opcheck(torch.ops.gslora_triton.group_prox_.default,
                          (tensors, ids, g, torch.full((g,), 0.1, device=DEVICE)),
                          test_utils=checks)


def test_torch_compile_traces_the_ops():
    x, w, b, a, bb, _ = _make(9, 16, 24, 4, torch.float32)

    def f(x):
        y, xa = torch.ops.gslora_triton.lora_linear_fwd(x, w, b, a, bb, 0.5, None, 1.0)
        return y.relu() + xa.sum()

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x))


def test_group_tables_cached_by_address_stay_correct():
    # The launch tables are cached by tensor address and size: the same tensors regrouped, and
    # new values in the same storage, must still give the reference answers.
    tensors, ids, num_groups = _group_tensors(torch.float32)
    for regroup in (ids, [5, 4, 3, 2, 1, 0, 0, 1], ids):
        got = kernels.group_sq_norms(tensors, regroup, num_groups)
        torch.testing.assert_close(got, reference.group_sq_norms(tensors, regroup, num_groups),
                                   rtol=1e-5, atol=0)
    for t in tensors:
        t.mul_(-3.0)
    got = kernels.group_sq_norms(tensors, ids, num_groups)
    torch.testing.assert_close(got, reference.group_sq_norms(tensors, ids, num_groups),
                               rtol=1e-5, atol=0)
    coeffs = torch.linspace(-1, 1, num_groups, device=DEVICE)
    for _ in range(2):
        for a, b in zip(kernels.group_scale(tensors, ids, coeffs),
                        reference.group_scale(tensors, ids, coeffs), strict=True):
            assert torch.equal(a, b)

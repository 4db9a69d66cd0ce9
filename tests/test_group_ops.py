"""Group-sparsity kernels (backends "cpu", "torch" and, on a GPU, "cuda") against gslora.reference."""

from __future__ import annotations

import pytest
import torch

from gslora import functional, reference
from gslora._ext import load_error
from gslora.backends import get_backend

BACKENDS = [("cpu", "cpu"), ("torch", "cpu")]
if torch.cuda.is_available():
    BACKENDS += [("cuda", "cuda"), ("torch", "cuda")]
COMPILED = [b for b in BACKENDS if b[0] != "torch"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _require_extension():
    assert load_error() is None, load_error()


def _groups(dtype, device, seed=0):
    """Odd-sized tensors of 5 unequal groups, scattered in the list: group 3 is all zeros, group
    1 has no tensors at all, one tensor is non-contiguous and one is large (several chunks)."""
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device, dtype)
    tensors = [mk(7, 3), mk(13), torch.zeros(5, 2, dtype=dtype, device=device), mk(1),
               mk(11, 9).t(), mk(3, 17001), torch.zeros(3, dtype=dtype, device=device), mk(2, 2)]
    ids = [0, 2, 3, 4, 0, 2, 3, 4]
    assert not tensors[4].is_contiguous()
    return tensors, ids, 5


def _tol(dtype):
    return {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5}[dtype]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_sq_norms(backend, device, dtype):
    tensors, ids, G = _groups(dtype, device)
    out = get_backend(backend).group_sq_norms(tensors, ids, G)
    exp = reference.group_sq_norms([t.double() for t in tensors], ids, G)
    assert out.shape == (G,) and out.dtype == reference.accumulate_dtype(dtype)
    assert out.device.type == device
    torch.testing.assert_close(out.double(), exp, rtol=_tol(dtype), atol=0)
    assert out[1].item() == 0 and out[3].item() == 0


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_scale(backend, device, dtype):
    tensors, ids, G = _groups(dtype, device)
    acc = reference.accumulate_dtype(dtype)
    coeffs = torch.tensor([0.5, 3.0, -2.0, 7.0, 0.0], dtype=acc, device=device)
    before = [t.clone() for t in tensors]
    outs = get_backend(backend).group_scale(tensors, ids, coeffs)
    exp = reference.group_scale(tensors, ids, coeffs)
    for i, (o, e, t, b) in enumerate(zip(outs, exp, tensors, before, strict=True)):
        assert o.shape == t.shape and o.dtype == dtype, i
        torch.testing.assert_close(o, e, rtol=0, atol=0, msg=f"tensors[{i}]")
        assert torch.equal(t, b), "group_scale must not modify its inputs"
    assert all((o == 0).all() for o, g in zip(outs, ids, strict=True) if g == 4)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_prox_in_place(backend, device, dtype):
    tensors, ids, G = _groups(dtype, device)
    norms64 = reference.group_norms([t.double() for t in tensors], ids, G)
    acc = reference.accumulate_dtype(dtype)
    # group 0 shrinks, group 2 falls under its threshold (exact zeros), zero groups stay zero,
    # group 4 has threshold 0 (unchanged).
    lam = torch.tensor([0.3 * norms64[0].item(), 1.0, 1.05 * norms64[2].item(), 0.5, 0.0],
                       dtype=acc, device=device)
    expected = [t.clone() for t in tensors]
    exp_norms = reference.group_prox_(expected, ids, G, lam)
    storage = [t.data_ptr() for t in tensors]
    norms = get_backend(backend).group_prox_(tensors, ids, G, lam)
    assert [t.data_ptr() for t in tensors] == storage, "prox must update the given tensors"
    torch.testing.assert_close(norms.double(), exp_norms.double(), rtol=_tol(dtype), atol=0)
    for i, (t, e) in enumerate(zip(tensors, expected, strict=True)):
        assert not torch.isnan(t).any(), i
        # One rounding of the same product: equal up to one ulp of the dtype.
        eps = torch.finfo(dtype).eps if dtype != torch.float64 else 1e-13
        torch.testing.assert_close(t, e, rtol=2 * eps, atol=0, msg=f"tensors[{i}]")
        if ids[i] in (2, 3):
            assert (t == 0).all(), f"tensors[{i}] must be exact zeros"
    assert not tensors[4].is_contiguous()


def _blocks(dtype, device, blocks=6, seed=1):
    """A model's layout: equal groups of fc1.A, fc1.B, fc2.A, fc2.B (r = 4, 256/1024), large enough
    for the CPU kernels' thread team (which then gives every thread whole groups); block 2 is all
    zeros, one tensor is non-contiguous."""
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device, dtype)
    tensors, ids = [], []
    for b in range(blocks):
        block = [mk(4, 256), mk(1024, 4), mk(4, 1024), mk(4, 256).t()]
        if b == 2:
            block = [torch.zeros_like(t) for t in block]
        tensors += block
        ids += [b] * 4
    return tensors, ids, blocks


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("blocks", [6, 7, 1])
def test_group_prox_model_layout(backend, device, dtype, blocks):
    """Equal groups (whole groups per thread: 6 split evenly, 7 not quite, 1 fewer than threads)."""
    tensors, ids, G = _blocks(dtype, device, blocks)
    norms64 = reference.group_norms([t.double() for t in tensors], ids, G)
    # Shrink factors 1 - λ/‖θ‖ from 0.9 to 0.4 (well away from 0, where the norms' rounding would
    # dominate), and the last group dies.
    rel = torch.linspace(0.1, 0.6, G, dtype=torch.float64, device=norms64.device)
    rel[-1] = 1.5
    lam = (norms64 * rel).to(device, reference.accumulate_dtype(dtype))
    expected = [t.clone() for t in tensors]
    exp_norms = reference.group_prox_(expected, ids, G, lam)
    norms = get_backend(backend).group_prox_(tensors, ids, G, lam)
    torch.testing.assert_close(norms.double(), exp_norms.double(), rtol=_tol(dtype), atol=0)
    eps = torch.finfo(dtype).eps if dtype != torch.float64 else 1e-13
    for i, (t, e) in enumerate(zip(tensors, expected, strict=True)):
        torch.testing.assert_close(t, e, rtol=4 * eps, atol=0, msg=f"tensors[{i}]")
    dead = [g for g in range(G) if lam[g] >= norms64[g]]
    assert all((t == 0).all() for t, g in zip(tensors, ids, strict=True) if g in dead or g == 2)


@pytest.mark.parametrize("backend,device", COMPILED)
def test_prox_keeps_zero_groups_and_never_nans(backend, device):
    ts = [torch.zeros(4, device=device), torch.zeros(2, 3, device=device)]
    norms = functional.group_prox_(ts, [0, 1], 2, 0.0, backend=backend)
    assert torch.equal(norms, torch.zeros(2, device=device))
    assert all((t == 0).all() for t in ts)
    norms = functional.group_prox_(ts, [0, 1], 2, 1.0, backend=backend)
    assert not torch.isnan(norms).any() and all((t == 0).all() for t in ts)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("weighted", [True, False])
def test_penalty_gradcheck(backend, device, weighted):
    opts = {"dtype": torch.float64, "device": device, "requires_grad": True}
    ts = [torch.randn(3, 4, **opts), torch.randn(5, **opts), torch.randn(2, 2, **opts)]
    w = torch.tensor([1.0, 2.5], dtype=torch.float64, device=device) if weighted else None
    fn = lambda *t: functional.group_lasso_penalty(list(t), [1, 0, 1], 2, w, backend=backend)
    assert torch.autograd.gradcheck(fn, tuple(ts))
    torch.testing.assert_close(fn(*ts), reference.group_lasso_penalty(ts, [1, 0, 1], 2, w))


@pytest.mark.parametrize("backend,device", COMPILED)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck(backend, device, dtype):
    tensors, ids, G = _groups(dtype, device)
    tensors = [t.contiguous() for t in tensors[:5]]
    ids, G = ids[:5], 5
    acc = reference.accumulate_dtype(dtype)
    torch.library.opcheck(torch.ops.gslora.group_sq_norms.default, (tensors, ids, G))
    coeffs = torch.linspace(-1, 1, G, dtype=acc, device=device)
    torch.library.opcheck(torch.ops.gslora.group_scale.default, (tensors, ids, coeffs))
    lam = torch.full((G,), 0.5, dtype=acc, device=device)
    torch.library.opcheck(torch.ops.gslora.group_prox_.default, (tensors, ids, G, lam))
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    weights = torch.linspace(0.5, 2, G, dtype=acc, device=device)
    torch.library.opcheck(torch.ops.gslora.group_lasso_penalty.default, (leaves, ids, G, weights))
    torch.library.opcheck(torch.ops.gslora.group_lasso_penalty.default, (leaves, ids, G, None))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [True, False])
def test_penalty_value_and_grads_match_the_reference(backend, device, dtype, weighted):
    # Unequal groups, an all-zero group (sub-gradient 0, no NaN), an empty group, a
    # non-contiguous tensor and weights (or none: w_g = 1); the compiled backends run the C++
    # autograd op.
    tensors, ids, G = _groups(dtype, device)
    acc = reference.accumulate_dtype(dtype)
    w = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5], dtype=acc, device=device).repeat_interleave(2)[::2]
    assert not w.is_contiguous()
    w = w if weighted else None
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    pen = functional.group_lasso_penalty(leaves, ids, G, w, backend=backend)
    (3.0 * pen).backward()
    ref_leaves = [t.detach().double().requires_grad_() for t in tensors]
    ref = reference.group_lasso_penalty(ref_leaves, ids, G, w.double() if weighted else None)
    (3.0 * ref).backward()
    assert pen.dtype == acc and pen.dim() == 0
    torch.testing.assert_close(pen.double(), ref.detach(), rtol=_tol(dtype), atol=0)
    for leaf, r in zip(leaves, ref_leaves, strict=True):
        assert leaf.grad.dtype == dtype and not torch.isnan(leaf.grad).any()
        torch.testing.assert_close(leaf.grad.double(), r.grad, rtol=1e-2 if dtype == torch.bfloat16
                                   else _tol(dtype), atol=1e-12)
    assert all((leaves[i].grad == 0).all() for i in (2, 6))  # the zero group


def _leaves_with_grads(tensors, existing, seed=5):
    """Leaf copies of ``tensors``; with ``existing`` every other one already has a .grad (one of
    them non-contiguous), the rest have None."""
    g = torch.Generator().manual_seed(seed)
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    if existing:
        for i, leaf in enumerate(leaves[::2]):
            grad = torch.randn(leaf.shape, generator=g, dtype=torch.float64).to(leaf)
            leaf.grad = grad.t().contiguous().t() if i == 0 and grad.dim() == 2 else grad
    return leaves


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("layout", ["odd", "blocks"])
@pytest.mark.parametrize("existing", [False, True], ids=["no-grad", "grad"])
# A non-contiguous .grad on purpose (the op's slow path); autograd warns about its layout.
@pytest.mark.filterwarnings("ignore:grad and param do not obey the gradient layout contract")
def test_add_group_lasso_grad_is_the_penalty_backward(backend, device, dtype, weighted, layout,
                                                      existing):
    # What (alpha * penalty).backward() gives with the same backend: the fused op rounds like
    # group_scale followed by autograd's accumulation. "odd": unequal groups, a zero group, an
    # empty group, a non-contiguous tensor; the threads split every group as group_sq_norms does,
    # so the norms and the gradients have the same bits. "blocks": a model's layout, whole groups
    # per thread: the norms' sums are associated differently, equal to a few ulps.
    tensors, ids, G = _groups(dtype, device) if layout == "odd" else _blocks(dtype, device)
    acc = reference.accumulate_dtype(dtype)
    w = torch.linspace(0.5, 2.0, G, dtype=acc, device=device) if weighted else None
    auto = _leaves_with_grads(tensors, existing)
    fused = _leaves_with_grads(tensors, existing)
    before = [None if t.grad is None else (t.grad.data_ptr(), t.grad.clone()) for t in fused]
    (0.3 * functional.group_lasso_penalty(auto, ids, G, w, backend=backend)).backward()
    value = functional.add_group_lasso_grad_(fused, ids, G, 0.3, w, backend=backend)
    expected = functional.group_lasso_penalty(tensors, ids, G, w, backend=backend)
    assert value.dtype == acc and value.dim() == 0 and not value.requires_grad
    torch.testing.assert_close(value, expected, rtol=_tol(dtype), atol=0)
    for i, (a, f, b) in enumerate(zip(auto, fused, before, strict=True)):
        assert f.grad.dtype == dtype and f.grad.shape == f.shape, i
        if layout == "odd":
            assert torch.equal(f.grad, a.grad), f"tensors[{i}].grad"
        else:
            eps = torch.finfo(dtype).eps
            torch.testing.assert_close(f.grad, a.grad, rtol=4 * eps, atol=4 * eps,
                                       msg=f"tensors[{i}].grad")
        if b is not None:  # updated in place, by the penalty's gradient
            assert f.grad.data_ptr() == b[0], f"tensors[{i}].grad was replaced"
            assert not torch.equal(f.grad, b[1]) or ids[i] in (1, 3) or (layout == "blocks"
                                                                      and ids[i] == 2), i
    assert all(torch.equal(t, f.detach()) for t, f in zip(tensors, fused, strict=True))
    if dtype == torch.float64:  # and against the specification's autograd
        ref = _leaves_with_grads(tensors, existing)
        (0.3 * reference.group_lasso_penalty(ref, ids, G, w)).backward()
        for i, (r, f) in enumerate(zip(ref, fused, strict=True)):
            torch.testing.assert_close(f.grad, r.grad, rtol=1e-12, atol=1e-15, msg=f"tensors[{i}]")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_add_group_lasso_grad_bad_inputs(backend, device):
    a = torch.randn(3, device=device, requires_grad=True)
    b = torch.randn(4, device=device, requires_grad=True)
    for alpha in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="alpha"):
            functional.add_group_lasso_grad_([a, b], [0, 1], 2, alpha, backend=backend)
    with pytest.raises(ValueError, match="weights"):
        functional.add_group_lasso_grad_([a, b], [0, 1], 2, 1.0, torch.ones(3), backend=backend)
    # Checked in C++ by the compiled backends (RuntimeError), in Python by the reference.
    with pytest.raises((ValueError, RuntimeError), match="group.id"):
        functional.add_group_lasso_grad_([a, b], [0, 2], 2, backend=backend)
    assert a.grad is None and b.grad is None


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_add_group_lasso_grad_under_torch_compile(backend, device):
    # A compiled training step that calls it: the call runs eagerly between graphs (it writes
    # .grad), with the eager result.
    tensors, ids, G = _groups(torch.float32, device)
    eager, compiled = _leaves_with_grads(tensors, True), _leaves_with_grads(tensors, True)

    def step(ts):
        return 2.0 * functional.add_group_lasso_grad_(ts, ids, G, 0.5, backend=backend)

    expected = step(eager)
    got = torch.compile(step, backend="eager")(compiled)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for e, c in zip(eager, compiled, strict=True):
        assert torch.equal(c.grad, e.grad)


@pytest.mark.parametrize("backend,device", COMPILED)
def test_add_group_lasso_grad_op_checks(backend, device):
    op = torch.ops.gslora.add_group_lasso_grad_
    if device != "cpu":  # the op exists for the CPU only; the functional API falls back
        assert not hasattr(get_backend(backend), "add_group_lasso_grad_")
        return
    a = torch.randn(3, device=device, requires_grad=True)
    b = torch.randn(4, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="alpha"):
        op([a, b], [0, 1], 2, None, -1.0)
    with pytest.raises(RuntimeError, match="twice"):
        op([a, b, a], [0, 1, 0], 2, None, 1.0)
    with pytest.raises(RuntimeError, match="weights"):
        op([a, b], [0, 1], 2, torch.ones(2, dtype=torch.float64), 1.0)
    a.grad_dtype = None  # allow a .grad of another dtype, which the op cannot write into
    a.grad = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"tensors\[0\]\.grad"):
        op([a, b], [0, 1], 2, None, 1.0)
    assert b.grad is None  # checks come before any write


@pytest.mark.parametrize("backend,device", COMPILED)
def test_penalty_traces_under_torch_compile(backend, device):
    tensors, ids, G = _groups(torch.float32, device)
    leaves = [t.detach().clone().requires_grad_() for t in tensors]

    def loss(ts):
        return functional.group_lasso_penalty(ts, ids, G, backend=backend) * 2.0

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    compiled(leaves).backward()
    got = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    loss(leaves).backward()
    for g, t in zip(got, leaves, strict=True):
        torch.testing.assert_close(g, t.grad)


@pytest.mark.parametrize("backend,device", COMPILED)
def test_group_ops_trace_under_torch_compile(backend, device):
    # Eagerly the compiled backend calls gslora._C's direct entry points, C functions dynamo
    # cannot trace; a fullgraph compile must still trace the ops (through their polyfills).
    tensors, ids, G = _groups(torch.float32, device)
    lam = torch.full((G,), 0.05, device=device)
    coeffs = torch.linspace(0.5, 2.0, G, device=device)

    def step(ts):
        sq = functional.group_sq_norms(ts, ids, G, backend=backend)
        scaled = get_backend(backend).group_scale(ts, ids, coeffs)
        return sq, scaled, functional.group_prox_(ts, ids, G, lam, backend=backend)

    eager = [t.clone() for t in tensors]
    compiled = [t.clone() for t in tensors]
    want = step(eager)
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(compiled)
    torch.testing.assert_close(got[0], want[0])
    for g, w in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(g, w)
    torch.testing.assert_close(got[2], want[2])
    for g, w in zip(compiled, eager, strict=True):  # the prox ran in place in the compiled step
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("backend,device", COMPILED)
def test_bad_inputs_name_the_argument(backend, device):
    a, b = torch.randn(3, device=device), torch.randn(4, device=device)
    lam = torch.zeros(2, device=device)
    cases = [
        (lambda: torch.ops.gslora.group_sq_norms([a, b], [0], 2), "group_ids"),
        (lambda: torch.ops.gslora.group_sq_norms([a, b], [0, 2], 2), r"group_ids\[1\]"),
        (lambda: torch.ops.gslora.group_sq_norms([a, b.double()], [0, 1], 2), r"tensors\[1\]"),
        (lambda: torch.ops.gslora.group_sq_norms([a, b.int()], [0, 1], 2), r"tensors\[1\]"),
        (lambda: torch.ops.gslora.group_prox_([a, b], [0, 1], 2, torch.zeros(3, device=device)),
         "thresholds"),
        (lambda: torch.ops.gslora.group_prox_([a, b], [0, 1], 2, -torch.ones(2, device=device)),
         "thresholds"),
        (lambda: torch.ops.gslora.group_scale([a, b], [0, 1], torch.zeros(2, 2, device=device)),
         "coeffs"),
        (lambda: torch.ops.gslora.group_prox_([a, b], [0, 1], 0, lam), "num_groups"),
    ]
    for fn, match in cases:
        with pytest.raises(RuntimeError, match=match):
            fn()
    with pytest.raises(ValueError, match="tensors must not be empty"):
        functional.group_sq_norms([], [], 1, backend=backend)

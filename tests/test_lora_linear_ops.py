"""LoRA linear kernels (backends "cpu", "torch" and, on a GPU, "cuda") against gslora.reference.

float64 must match the reference to rounding; float32 / bfloat16 / float16 must be at least as
accurate as eager PyTorch in that precision: err(kernel vs fp64 ref) <= 2 * err(eager vs fp64 ref)
+ a floor of a few ulps of the output's magnitude.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import gslora
from gslora import functional, reference
from gslora._ext import load_error
from gslora.backends import cpu_kernels_supported, get_backend, set_cpu_kernels

BACKENDS = [("cpu", "cpu"), ("torch", "cpu")]
if torch.cuda.is_available():
    BACKENDS += [("cuda", "cuda"), ("torch", "cuda")]
COMPILED = [b for b in BACKENDS if b[0] != "torch"]


@pytest.fixture(autouse=True)
def _require_extension():
    # The compiled extension is part of the product: a missing build is a failure, not a skip.
    assert load_error() is None, load_error()


def _inputs(M, K, N, r, dtype, device, bias=True, dropout=0.0):
    g = torch.Generator().manual_seed(M * 7919 + K * 31 + N * 7 + r)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device, dtype)
    x, W, A, B = mk(M, K), mk(N, K) / K**0.5, mk(r, K) / K**0.5, mk(N, r)
    b = mk(N) if bias else None
    mask = None
    keep = 1.0
    if dropout > 0:
        mask = (torch.rand(M, K, generator=g) >= dropout).to(device)
        keep = 1.0 / (1.0 - dropout)
    return x, W, b, A, B, mask, keep


def _run(backend, x, W, b, A, B, s, mask, keep, compute_dx=True, g=None):
    impl = get_backend(backend)
    y, xa = impl.lora_linear_fwd(x, W, b, A, B, s, mask, keep)
    if g is None:
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        g = g.to(x.device, x.dtype)
    dx, dA, dB = impl.lora_linear_bwd(g, x, W, A, B, xa, s, mask, keep, compute_dx)
    return (y, xa, dx, dA, dB), g


def _eager(x, W, b, A, B, s, mask, keep, g):
    """Plain PyTorch in the inputs' own precision (no upcasting): the baseline error."""
    d = x if mask is None else x * mask.to(x.dtype) * keep
    xa = d @ A.t()
    y = x @ W.t() + s * (xa @ B.t())
    if b is not None:
        y = y + b
    u = g @ B
    dB = s * (g.t() @ xa)
    dA = s * (u.t() @ d)
    du = s * (u @ A)
    dx = g @ W + (du if mask is None else du * mask.to(x.dtype) * keep)
    return y, xa, dx, dA, dB


def _ref64(x, W, b, A, B, s, mask, keep, g, compute_dx=True):
    f = lambda t: None if t is None else t.double()
    y, xa = reference.lora_linear_fwd(f(x), f(W), f(b), f(A), f(B), s, mask, keep)
    # The backward's reference uses the kernel's own xa output (as the autograd function does).
    dx, dA, dB = reference.lora_linear_bwd(f(g), f(x), f(W), f(A), f(B), xa, s, mask, keep, compute_dx)
    return y, xa, dx, dA, dB


def _err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


NAMES = ("y", "xa", "dx", "dA", "dB")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize(
    "M,K,N,r,bias,dropout",
    [(37, 1000, 1531, 8, True, 0.0), (5, 7, 9, 1, False, 0.0), (33, 64, 48, 64, True, 0.25),
     (19, 40, 23, 3, False, 0.5), (0, 16, 12, 4, True, 0.0), (0, 16, 12, 4, False, 0.3),
     # M·r > 64·K: the CPU kernel folds s·B·A into the weight in the forward
     (1000, 96, 300, 8, True, 0.0)],
)
def test_float64_matches_reference(backend, device, M, K, N, r, bias, dropout):
    x, W, b, A, B, mask, keep = _inputs(M, K, N, r, torch.float64, device, bias, dropout)
    out, g = _run(backend, x, W, b, A, B, 0.37, mask, keep)
    ref = _ref64(x, W, b, A, B, 0.37, mask, keep, g)
    for name, o, e in zip(NAMES, out, ref, strict=True):
        assert o.dtype == torch.float64 and o.device.type == device and o.shape == e.shape, name
        tol = 1e-12 * max(1.0, e.abs().max().item() if e.numel() else 1.0)
        assert _err(o, e) <= tol, f"{name}: err {_err(o, e):.3e}"


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,K,N,r,dropout",
                         [(64, 96, 160, 8, 0.0), (21, 53, 77, 16, 0.2), (1000, 96, 300, 8, 0.0),
                          # row, column and rank tails of the fp32 AVX2 adapter kernels
                          (37, 100, 77, 5, 0.0)])
def test_low_precision_as_accurate_as_eager(backend, device, dtype, M, K, N, r, dropout):
    x, W, b, A, B, mask, keep = _inputs(M, K, N, r, dtype, device, True, dropout)
    s = 0.5
    out, g = _run(backend, x, W, b, A, B, s, mask, keep)
    # Errors against the exact (fp64) math of the low-precision inputs; xa for the backward's
    # reference is the exact one too, so the kernel's own xa rounding counts against it.
    f = lambda t: None if t is None else t.double()
    y64, xa64 = reference.lora_linear_fwd(f(x), f(W), f(b), f(A), f(B), s, mask, keep)
    ref = (y64, xa64) + reference.lora_linear_bwd(f(g), f(x), f(W), f(A), f(B), xa64, s, mask, keep)
    eager = _eager(x, W, b, A, B, s, mask, keep, g)
    eps = torch.finfo(dtype).eps
    for name, o, e, ea in zip(NAMES, out, ref, eager, strict=True):
        assert o.dtype == dtype and o.shape == e.shape, name
        floor = 4 * eps * e.abs().max().item()
        assert _err(o, e) <= 2 * _err(ea, e) + floor, (
            f"{name}: kernel err {_err(o, e):.3e}, eager err {_err(ea, e):.3e}, floor {floor:.1e}"
        )


@pytest.fixture(params=["avx512", "avx2", "blas"])
def cpu_kernels(request):
    """Runs the test with each of the fp32 CPU kernels this CPU has; a level the CPU lacks is
    skipped (it cannot run here), with the reason."""
    if request.param not in cpu_kernels_supported():
        pytest.skip(f"this CPU cannot run the {request.param} kernels")
    before = set_cpu_kernels(request.param)
    yield request.param
    set_cpu_kernels(before)


# The SIMD paths split rows, A^T / s B^T columns and the partial sums' reduction over the threads
# of one region: rows crossing 256-row sum blocks and 64-row dA blocks, ranks with 32-, 16- and
# 8-column passes and padding (13, 24, 40), K and N tails of the 16- and 8-lane vectors, merged
# forwards (fp32, M r > 64 K and, where the CPU has AVX-512, r > 32: r = 33 and 36 merge on every
# CPU, r = 13, 16, 32 and 9 only on one without; W_eff's rows in blocks of 6 and one by one, its
# columns in 32-, 16- and 8-wide vectors and the scalar tail: K = 37 and 25), the same shapes
# unmerged where the CPU has AVX-512, M below two 32-row blocks (one thread),
# a team with an odd row split, and the forward's GEMM in the team (fp32, 64 <= M <= 384 at two
# threads, M N K >= 2^24) on 32-column blocks, with a partial last block (N = 1537) and a thread
# without one (N = 17).
SIMD_PATH_SHAPES = [(600, 37, 45, 13), (1100, 64, 48, 16), (70, 31, 17, 24), (63, 24, 40, 5),
                    (33, 40, 24, 8), (257, 385, 1537, 9), (90, 57, 83, 40), (300, 48, 40, 32),
                    (384, 2600, 17, 8), (200, 25, 70, 9), (600, 37, 45, 33), (200, 25, 70, 36)]


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("M,K,N,r", SIMD_PATH_SHAPES)
def test_fused_path_per_kernels_and_thread_count(cpu_kernels, dtype, threads, M, K, N, r, dropout):
    # 16-bit and masked inputs take the same SIMD kernels: rows of x and g widened (and masked) to
    # float, y and dx rounded (and masked) on their store; the "blas" level takes BLAS (fp32
    # without a mask) or the generic row kernels.
    x, W, b, A, B, mask, keep = _inputs(M, K, N, r, dtype, "cpu", dropout=dropout)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, g = _run("cpu", x, W, b, A, B, 0.37, mask, keep)
        _, _, _, dA0, dB0 = _run("cpu", x, W, b, A, B, 0.37, mask, keep, compute_dx=False, g=g)[0]
    finally:
        torch.set_num_threads(before)
    ref = _ref64(x, W, b, A, B, 0.37, mask, keep, g)
    eager = _eager(x, W, b, A, B, 0.37, mask, keep, g)
    floor = 4 * torch.finfo(dtype).eps
    for name, o, e, ea in zip(NAMES, out, ref, eager, strict=True):
        assert o.dtype == dtype, name
        assert _err(o, e) <= 2 * _err(ea, e) + floor * e.abs().max().item(), name
    # Without dx the same dA and dB, bit for bit.
    assert torch.equal(dA0, out[3]) and torch.equal(dB0, out[4])


@pytest.mark.parametrize("kernels", ["avx512", "avx2"])
@pytest.mark.parametrize("dtype,exact", [(torch.bfloat16, 256), (torch.float16, 2048)])
def test_16bit_stores_round_to_nearest_even(kernels, dtype, exact):
    # With W = 0 the output is the adapter term (plus the bias) as the kernel rounds it to 16 bits.
    # Integers keep every float sum exact, so y must equal torch's own rounding of the exact values
    # (odd values near `exact`, where the format's spacing is 2: ties to even), overflow gives inf
    # and NaN stays NaN.
    if kernels not in cpu_kernels_supported():
        pytest.skip(f"this CPU cannot run the {kernels} kernels")
    M, K, N, r = 19, 3, 37, 2  # N = 37: the 16- and 8-lane stores and the scalar column tail
    gen = torch.Generator().manual_seed(5)
    x = torch.randint(-3, 4, (M, K), generator=gen).double()
    A = torch.randint(-3, 4, (r, K), generator=gen).double()
    B = torch.randint(-3, 4, (N, r), generator=gen).double()
    b = exact + torch.arange(N, dtype=torch.float64) % 4 * 2 - 3  # sums around `exact`
    x[0, 0] = float("nan")
    # Column 5 of row 1 overflows: bias at the format's max plus a positive term >= max / 2.
    x[1] = 1.0
    A.abs_().add_(1)
    b[5] = torch.finfo(dtype).max
    B[5] = 2.0 ** (int(torch.finfo(dtype).max).bit_length() - 4)  # A x >= 4 rows: >= max / 2
    x, A, B, b = (t.to(dtype) for t in (x, A, B, b))
    f = lambda t: t.double()
    exact_y = f(b) + (f(x) @ f(A).t()) @ f(B).t()
    W = torch.zeros(N, K, dtype=dtype)
    before = set_cpu_kernels(kernels)
    try:
        y, _ = get_backend("cpu").lora_linear_fwd(x, W, b, A, B, 1.0, None, 1.0)
    finally:
        set_cpu_kernels(before)
    assert torch.isinf(y[1, 5]) and y[1, 5] > 0
    assert torch.isnan(y[0]).all()
    # Elsewhere (column 5 aside) the sums are small integers, exact in float; torch rounds them.
    expected = exact_y.float().to(dtype)
    cols = [n for n in range(N) if n != 5]
    assert torch.equal(y[1:, cols], expected[1:, cols])


@pytest.mark.parametrize("M,K,N,r", SIMD_PATH_SHAPES)
def test_avx512_and_avx2_kernels_agree_bit_for_bit(M, K, N, r):
    # The two copies of lora_simd_kernels.inc do every output element's float operations in the
    # same order; only the vector width differs.
    if "avx512" not in cpu_kernels_supported():
        pytest.skip("this CPU cannot run the avx512 kernels")
    x, W, b, A, B, mask, keep = _inputs(M, K, N, r, torch.float32, "cpu")
    # With a dropout mask: masked rows widened for x A^T and dA, masked stores of dx.
    mask = torch.rand(M, K, generator=torch.Generator().manual_seed(3)) >= 0.2
    # 16-bit inputs: the same float kernels on widened rows, the same rounding on the store.
    low = [t.to(torch.bfloat16) for t in (x, W, b, A, B)], [t.half() for t in (x, W, b, A, B)]
    outs = {}
    before = set_cpu_kernels("avx2")
    try:
        for name in ("avx2", "avx512"):
            set_cpu_kernels(name)
            plain, g = _run("cpu", x, W, b, A, B, 0.37, None, 1.0)
            masked, _ = _run("cpu", x, W, b, A, B, 0.37, mask, 1.25, g=g)
            outs[name] = plain + masked
            for args in low:
                g16 = g.to(args[0].dtype)
                outs[name] += _run("cpu", *args, 0.37, None, 1.0, g=g16)[0]
                outs[name] += _run("cpu", *args, 0.37, mask, 1.25, g=g16)[0]
    finally:
        set_cpu_kernels(before)
    kinds = ("plain", "masked", "bf16", "bf16 masked", "fp16", "fp16 masked")
    for i, (a, e) in enumerate(zip(outs["avx512"], outs["avx2"], strict=True)):
        assert torch.equal(a, e), f"{NAMES[i % 5]} ({kinds[i // 5]})"


def test_cpu_kernels_setting():
    supported = cpu_kernels_supported()
    assert supported[-1] == "blas" and set(supported) <= {"avx512", "avx2", "blas"}
    if not os.environ.get("GSLORA_CPU_KERNELS"):
        assert gslora.backends.cpu_kernels() == supported[0]  # the best by default
    before = set_cpu_kernels("blas")
    try:
        assert gslora.backends.cpu_kernels() == "blas"
        with pytest.raises(RuntimeError, match="unknown CPU kernels 'sse'"):
            set_cpu_kernels("sse")
        assert "LoRA kernels: blas" in gslora.describe_backends("cpu")
    finally:
        assert set_cpu_kernels(before) == "blas"
    if "avx512" not in supported:
        with pytest.raises(RuntimeError, match="cannot run the 'avx512' kernels"):
            set_cpu_kernels("avx512")


def test_cpu_kernels_environment_variable_caps_the_choice():
    code = "import gslora.backends as b; print(b.cpu_kernels())"
    env = {**os.environ, "GSLORA_CPU_KERNELS": "blas"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "blas"


@pytest.mark.parametrize("backend,device", COMPILED)
@pytest.mark.parametrize("dtype,dropout", [(torch.float64, 0.3), (torch.float32, 0.0)])
def test_compute_dx_false_returns_empty_dx(backend, device, dtype, dropout):
    x, W, b, A, B, mask, keep = _inputs(45, 20, 24, 4, dtype, device, True, dropout)
    g = torch.randn(45, 24, dtype=torch.float64).to(device, dtype)
    xa = torch.randn(45, 4, dtype=torch.float64).to(device, dtype)
    dx, dA, dB = torch.ops.gslora.lora_linear_bwd(g, x, W, A, B, xa, 0.5, mask, keep, False)
    assert dx.numel() == 0 and dx.dtype == x.dtype and dx.device == x.device
    f = lambda t: None if t is None else t.double()
    _, dA_ref, dB_ref = reference.lora_linear_bwd(f(g), f(x), f(W), f(A), f(B), f(xa), 0.5, mask,
                                                  keep, False)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(dA.double(), dA_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(dB.double(), dB_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_functional_3d_noncontiguous_and_gradients(backend, device):
    K, N, r = 24, 40, 6
    base = torch.randn(2, K, 7, 3, dtype=torch.float64, device=device)
    x = base[..., 1].transpose(1, 2)  # [2, 7, K], non-contiguous
    assert not x.is_contiguous()
    W = torch.randn(N, K, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(N, dtype=torch.float64, device=device, requires_grad=True)
    A = torch.randn(r, K, dtype=torch.float64, device=device, requires_grad=True)
    B = torch.randn(N, r, dtype=torch.float64, device=device, requires_grad=True)
    xg = x.detach().clone().requires_grad_(True)
    y = functional.lora_linear(xg, W, b, A, B, 0.25, backend=backend)
    assert y.shape == (2, 7, N)
    leaves = (xg, W, b, A, B)
    grads = torch.autograd.grad((y * y).sum(), leaves)
    xr = x.detach().clone().requires_grad_(True)
    yr = reference.lora_linear(xr, W, b, A, B, 0.25)
    grads_r = torch.autograd.grad((yr * yr).sum(), (xr, W, b, A, B))
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    for name, a, e in zip(("x", "W", "b", "A", "B"), grads, grads_r, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-11, msg=name)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_functional_noncontiguous_weights(backend, device):
    # W, A and B as transposed views: the fused op gets them as they are (no Python copies).
    K, N, r = 12, 20, 4
    opts = {"dtype": torch.float64, "device": device}
    Wt, At, Bt = (torch.randn(*shape, **opts).requires_grad_() for shape in ((K, N), (K, r), (r, N)))
    W, A, B = Wt.t(), At.t(), Bt.t()
    assert not (W.is_contiguous() or A.is_contiguous() or B.is_contiguous())
    x = torch.randn(9, K, **opts)
    y = functional.lora_linear(x, W, None, A, B, 0.5, backend=backend)
    grads = torch.autograd.grad(y.pow(2).sum(), (Wt, At, Bt))
    yr = reference.lora_linear(x, W, None, A, B, 0.5)
    grads_r = torch.autograd.grad(yr.pow(2).sum(), (Wt, At, Bt))
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    for a, e in zip(grads, grads_r, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradcheck(backend, device):
    opts = {"dtype": torch.float64, "device": device, "requires_grad": True}
    x, W, b = torch.randn(4, 3, 6, **opts), torch.randn(5, 6, **opts), torch.randn(5, **opts)
    A, B = torch.randn(3, 6, **opts), torch.randn(5, 3, **opts)
    fn = lambda *t: functional.lora_linear(*t, 0.7, backend=backend)
    assert torch.autograd.gradcheck(fn, (x, W, b, A, B))


@pytest.mark.parametrize("backend,device", COMPILED)
def test_functional_dropout_matches_torch_backend(backend, device):
    x = torch.randn(3, 9, 16, dtype=torch.float64, device=device)
    layer = gslora.GSLoRALinear(16, 20, r=4, lora_alpha=2.0, lora_dropout=0.4,
                                dtype=torch.float64, device=device)
    nn.init.normal_(layer.lora_B)
    outs = []
    for be in (backend, "torch"):
        layer.backend = be
        layer.zero_grad()
        xg = x.clone().requires_grad_(True)
        torch.manual_seed(123)  # same dropout mask for both backends
        y = layer.train()(xg)
        y.pow(2).sum().backward()
        outs.append((y.detach(), xg.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()))
    for a, e in zip(*outs, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend,device", COMPILED)
def test_matches_peft_lora_layer(backend, device):
    peft = pytest.importorskip("peft")
    base = nn.Sequential(nn.Linear(24, 36)).to(device)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0"], lora_dropout=0.0)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    plin = pm.base_model.model[0]
    nn.init.normal_(plin.lora_B["default"].weight)
    ours = gslora.GSLoRALinear.from_linear(copy.deepcopy(base[0]), r=8, lora_alpha=16, backend=backend)
    with torch.no_grad():
        ours.lora_A.copy_(plin.lora_A["default"].weight)
        ours.lora_B.copy_(plin.lora_B["default"].weight)
    x = torch.randn(2, 5, 24, device=device)
    y_p, y_o = plin(x), ours(x)
    torch.testing.assert_close(y_o, y_p, rtol=1e-5, atol=1e-5)
    y_p.square().sum().backward()
    y_o.square().sum().backward()
    torch.testing.assert_close(ours.lora_A.grad, plin.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.lora_B.grad, plin.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend,device", COMPILED)
def test_opcheck(backend, device):
    opts = {"dtype": torch.float64, "device": device}
    x, W, b = torch.randn(6, 8, **opts), torch.randn(10, 8, **opts), torch.randn(10, **opts)
    A, B = torch.randn(3, 8, **opts), torch.randn(10, 3, **opts)
    mask = torch.rand(6, 8, device=device) > 0.3
    for args in ((x, W, b, A, B, 0.5, None, 1.0), (x, W, None, A, B, 0.5, mask, 1.5)):
        torch.library.opcheck(torch.ops.gslora.lora_linear_fwd.default, args)
    xa = torch.randn(6, 3, **opts)
    g = torch.randn(6, 10, **opts)
    for m, cdx in ((None, True), (mask, True), (mask, False)):
        torch.library.opcheck(torch.ops.gslora.lora_linear_bwd.default,
                              (g, x, W, A, B, xa, 0.5, m, 1.5, cdx))
    # The differentiable op (C++ autograd): opcheck also tests its autograd registration.
    xg, Ag, Bg = (t.clone().requires_grad_() for t in (x, A, B))
    Wg, bg = W.clone().requires_grad_(), b.clone().requires_grad_()
    x3 = x.reshape(2, 3, 8).clone().requires_grad_()  # [..., K]: reshaped inside, no view nodes
    for args in ((xg, W, b, Ag, Bg, 0.5, None, 1.0), (x, Wg, bg, Ag, B, 0.5, mask, 1.5),
                 (x3, W, b, Ag, Bg, 0.5, mask, 1.5)):
        torch.library.opcheck(torch.ops.gslora.lora_linear.default, args)


@pytest.mark.parametrize("backend,device", COMPILED)
def test_torch_compile_fullgraph_matches_eager(backend, device):
    torch._dynamo.reset()
    model = nn.Sequential(
        gslora.GSLoRALinear(16, 32, r=4, lora_alpha=4.0, backend=backend),
        nn.GELU(),
        gslora.GSLoRALinear(32, 8, r=2, lora_alpha=2.0, backend=backend),
    ).to(device)
    for m in model:
        if isinstance(m, gslora.GSLoRALinear):
            nn.init.normal_(m.lora_B)
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 5, 16, device=device)
    y_e, y_c = model(x), compiled(x)
    torch.testing.assert_close(y_c, y_e, rtol=1e-6, atol=1e-6)
    y_e.square().sum().backward()
    y_c.square().sum().backward()
    for (name, p_e), p_c in zip(model.named_parameters(), compiled.parameters(), strict=True):
        if p_e.requires_grad:
            torch.testing.assert_close(p_c.grad, p_e.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend,device", COMPILED)
def test_bad_inputs_name_the_argument(backend, device):
    opts = {"dtype": torch.float32, "device": device}
    x, W, b = torch.randn(4, 8, **opts), torch.randn(10, 8, **opts), torch.randn(10, **opts)
    A, B = torch.randn(3, 8, **opts), torch.randn(10, 3, **opts)
    fwd = torch.ops.gslora.lora_linear_fwd
    cases = [
        ((x, W, b, A, torch.randn(10, 4, **opts), 1.0, None, 1.0), "lora_B"),
        ((x, W, b, torch.randn(3, 7, **opts), B, 1.0, None, 1.0), "lora_A"),
        ((x, torch.randn(10, 9, **opts), b, A, B, 1.0, None, 1.0), "weight"),
        ((x, W, torch.randn(11, **opts), A, B, 1.0, None, 1.0), "bias"),
        ((x.double(), W, b, A, B, 1.0, None, 1.0), "dtype"),
        ((x.reshape(2, 2, 8), W, b, A, B, 1.0, None, 1.0), "x must be 2-D"),
        ((x, W, b, A, B, 1.0, torch.ones(4, 8, **opts), 1.0), "mask"),
        ((x, W, b, A, B, 1.0, torch.ones(4, 7, dtype=torch.bool, device=device), 1.0), "mask"),
        ((x.int(), W, b, A, B, 1.0, None, 1.0), "x must be float"),
    ]
    for args, match in cases:
        with pytest.raises(RuntimeError, match=match):
            fwd(*args)
    g, xa = torch.randn(4, 10, **opts), torch.randn(4, 3, **opts)
    with pytest.raises(RuntimeError, match="grad_out"):
        torch.ops.gslora.lora_linear_bwd(g[:, :9], x, W, A, B, xa, 1.0, None, 1.0, True)
    with pytest.raises(RuntimeError, match="xa"):
        torch.ops.gslora.lora_linear_bwd(g, x, W, A, B, xa[:, :2], 1.0, None, 1.0, True)


def test_layer_argument_validation():
    with pytest.raises(ValueError, match="r"):
        gslora.GSLoRALinear(4, 4, r=0)
    with pytest.raises(ValueError, match="lora_alpha"):
        gslora.GSLoRALinear(4, 4, r=2, lora_alpha=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        gslora.GSLoRALinear(4, 4, r=2, lora_dropout=1.0)
    with pytest.raises(ValueError, match="lora_dropout"):
        gslora.GSLoRALinear(4, 4, r=2, lora_dropout=-0.1)

"""The LoRA dropout's keep mask on the CPU: Philox4x32-10 words against p (reference.py), the
compiled op at every kernel level, and how gslora draws it (functional.dropout_keep_mask)."""

from __future__ import annotations

import math

import pytest
import torch

import gslora
from gslora import functional, reference
from gslora.backends import cpu_kernels_supported, set_cpu_kernels

HAS_EXT = gslora.backends.get_backend("cpu").unavailable_reason() is None
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="gslora._C is not built")


def test_philox_known_answer():
    # Random123's known-answer vector of philox4x32-10: counter 0, key 0.
    words = reference.philox4x32_10(torch.zeros(1, dtype=torch.int64), 0)
    assert [int(w) for w in words[:, 0]] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_philox_multiply_is_exact():
    # The 16-bit split must give the exact 64-bit product of 32-bit words (Python ints are exact).
    gen = torch.Generator().manual_seed(3)
    a = torch.randint(0, 2**32, (4096,), generator=gen, dtype=torch.int64)
    a[:3] = torch.tensor([0, 2**32 - 1, 2**31])
    for m in (0xD2511F53, 0xCD9E8D57, 2**32 - 1):
        hi, lo = reference._mulhilo(a, m)
        for v, h, lo_ in zip(a.tolist(), hi.tolist(), lo.tolist(), strict=True):
            assert (h << 32) | lo_ == v * m


def test_reference_mask_layout_and_threshold():
    # Element e is word (e mod 64) div 16 of counter 16 (e div 64) + e mod 16, kept iff >= p 2^32.
    x = torch.empty(3, 50)  # 150 elements: two full blocks of 64 and a partial one
    seed, p = 987654321987, 0.3
    words = reference.philox4x32_10(torch.arange(48), seed)
    thr = math.ceil(p * 2**32)
    want = [int(words[(e % 64) // 16, 16 * (e // 64) + e % 16]) >= thr for e in range(150)]
    assert reference.dropout_keep_mask(x, p, seed).flatten().tolist() == want


@needs_ext
@pytest.mark.parametrize("kernels", ["avx512", "avx2", "blas"])
@pytest.mark.parametrize(
    "shape", [(1,), (7,), (64,), (3, 5, 37), (129, 1), (256, 384), (0, 8), (4, 0)]
)
def test_compiled_mask_matches_reference(kernels, shape):
    # Every kernel level (SIMD lanes, tails of partial blocks, several threads) gives the
    # reference's bits.
    if kernels not in cpu_kernels_supported():
        pytest.skip(f"this CPU cannot run the {kernels} kernels")
    x = torch.empty(shape)
    before = set_cpu_kernels(kernels)
    try:
        for p in (0.0, 0.1, 0.5, 0.97):
            for seed in (0, 1, -1, 2**40 + 7, -(2**63)):
                got = torch.ops.gslora.dropout_mask(x, p, torch.tensor(seed))
                want = reference.dropout_keep_mask(x, p, seed)
                rows = math.prod(shape[:-1])  # one row per leading index, even when K = 0
                assert got.dtype == torch.bool and got.shape == want.shape == (rows, shape[-1])
                assert torch.equal(got, want), (p, seed)
    finally:
        set_cpu_kernels(before)


@needs_ext
def test_compiled_mask_rejects_bad_arguments():
    x = torch.empty(4, 8)
    with pytest.raises(ValueError, match="p must lie in"):
        torch.ops.gslora.dropout_mask(x, 1.0, torch.tensor(0))
    with pytest.raises(ValueError, match="seed must be one int64"):
        torch.ops.gslora.dropout_mask(x, 0.5, torch.tensor(0.0))
    with pytest.raises(ValueError, match="p must lie in"):
        reference.dropout_keep_mask(x, -0.1, 0)


@needs_ext
def test_opcheck():
    x = torch.randn(6, 40)
    torch.library.opcheck(torch.ops.gslora.dropout_mask.default, (x, 0.25, torch.tensor(11)))


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_keep_rate_and_independence(p):
    # Keep rate 1 - p within 5 standard deviations, also per word position of a block and per
    # column; neighbouring elements are uncorrelated.
    x = torch.empty(512, 384)
    torch.manual_seed(17)
    keep = functional.dropout_keep_mask(x, p).double()
    n = keep.numel()
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(keep.mean().item() - (1 - p)) < 5 * sd
    by_word = keep.flatten().view(-1, 4, 16).mean(dim=(0, 2))  # the 4 words of every counter
    assert (by_word - (1 - p)).abs().max().item() < 5 * sd * 2
    by_col = keep.mean(dim=0)
    assert (by_col - (1 - p)).abs().max().item() < 5 * math.sqrt(p * (1 - p) / 512) * 1.5
    flat = keep.flatten() - keep.mean()
    corr = (flat[1:] * flat[:-1]).mean().item() / flat.var().item()
    assert abs(corr) < 5 / math.sqrt(n)


def test_seeded_by_torch_default_generator():
    # torch.manual_seed reproduces the masks; successive calls draw different ones.
    x = torch.empty(33, 70)
    torch.manual_seed(5)
    first, second = functional.dropout_keep_mask(x, 0.3), functional.dropout_keep_mask(x, 0.3)
    torch.manual_seed(5)
    assert torch.equal(functional.dropout_keep_mask(x, 0.3), first)
    assert not torch.equal(first, second)
    # The mask is the reference's with the seed drawn from the same generator state.
    torch.manual_seed(5)
    seed = torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)
    assert torch.equal(first, reference.dropout_keep_mask(x, 0.3, seed))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_layer_dropout_uses_the_mask(backend):
    # A training-mode layer drops exactly the elements the mask drops: with the same seed its
    # output equals the reference computed with functional.dropout_keep_mask's mask.
    if backend == "cpu" and not HAS_EXT:
        pytest.skip("gslora._C is not built")
    layer = gslora.GSLoRALinear(24, 10, r=4, lora_dropout=0.4, dtype=torch.float64, backend=backend)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    torch.manual_seed(9)
    y = layer.train()(x)
    torch.manual_seed(9)
    mask = functional.dropout_keep_mask(x, 0.4)
    want, _ = reference.lora_linear_fwd(x.reshape(-1, 24), layer.weight, layer.bias, layer.lora_A,
                                        layer.lora_B, layer.scaling, mask, 1 / 0.6)
    torch.testing.assert_close(y.detach().reshape(-1, 10), want.detach(), rtol=1e-12, atol=1e-12)


@needs_ext
def test_same_mask_without_the_extension(monkeypatch):
    # Where gslora._C is missing the reference computes the mask: the same bits.
    x = torch.empty(9, 100)
    torch.manual_seed(2)
    compiled = functional.dropout_keep_mask(x, 0.2)
    monkeypatch.setattr(gslora._ext, "_LOAD_ERROR", "not built (test)")
    torch.manual_seed(2)
    assert torch.equal(functional.dropout_keep_mask(x, 0.2), compiled)


@needs_ext
def test_compiled_training_step_with_dropout():
    # torch.compile(fullgraph=True) traces the seed draw and the mask op without graph breaks.
    layer = gslora.GSLoRALinear(32, 16, r=4, lora_dropout=0.25).train()
    torch.nn.init.normal_(layer.lora_B)
    step = torch.compile(lambda t: layer(t).square().sum(), fullgraph=True)
    x = torch.randn(5, 32)
    loss = step(x)
    loss.backward()
    assert torch.isfinite(loss) and layer.lora_A.grad is not None
    assert not torch.equal(step(x), loss)  # a fresh mask per call

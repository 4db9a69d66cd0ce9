"""GSLoRALinear as a drop-in nn.Linear: init, merge/unmerge, state dicts, N-D, autocast."""

import pytest
import torch
from torch import nn

from gslora import GSLoRALinear


def _trained(layer: GSLoRALinear) -> GSLoRALinear:
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def test_init_equals_wrapped_linear_and_shares_weight():
    base = nn.Linear(20, 12)
    layer = GSLoRALinear.from_linear(base, r=4)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.shape == (4, 20) and layer.lora_B.shape == (12, 4)
    assert (layer.lora_B == 0).all() and layer.lora_A.abs().sum() > 0
    x = torch.randn(3, 5, 20)
    torch.testing.assert_close(layer(x), base(x))
    assert layer.scaling == 1 / 4


def test_from_linear_rejects_non_linear():
    with pytest.raises(TypeError, match="nn.Linear"):
        GSLoRALinear.from_linear(nn.Conv1d(2, 2, 1))


@pytest.mark.parametrize("kwargs,match", [
    ({"r": 0}, "r"), ({"r": 2.5}, "r"), ({"lora_alpha": 0}, "lora_alpha"),
    ({"lora_alpha": float("nan")}, "lora_alpha"), ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"lora_dropout": -0.1}, "lora_dropout"),
])
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GSLoRALinear(8, 8, **kwargs)


def test_forward_matches_formula_nd_and_no_grad_input():
    layer = _trained(GSLoRALinear(16, 10, r=3, lora_alpha=6.0))
    x = torch.randn(2, 3, 4, 16)
    y = layer(x)
    expect = x @ layer.weight.t() + layer.bias + 2.0 * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-5)
    y.sum().backward()  # x does not require grad: only A, B get gradients
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    assert layer.weight.grad is None


def test_merge_unmerge_round_trip():
    layer = _trained(GSLoRALinear(24, 16, r=8, dtype=torch.float64))
    w0 = layer.weight.clone()
    x = torch.randn(7, 24, dtype=torch.float64)
    y = layer(x)
    layer.merge()
    assert layer.merged and "merged=True" in repr(layer)
    torch.testing.assert_close(layer(x), y)
    layer.merge()  # idempotent
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer(x), y)


def test_to_linear_equals_module():
    layer = _trained(GSLoRALinear(9, 5, r=2, bias=False))
    x = torch.randn(4, 9)
    plain = layer.to_linear()
    assert type(plain) is nn.Linear and plain.bias is None
    torch.testing.assert_close(plain(x), layer(x), rtol=1e-5, atol=1e-6)


def test_plain_linear_state_dict_loads_strictly():
    base = nn.Linear(6, 4)
    layer = GSLoRALinear(6, 4, r=2)
    layer.load_state_dict(base.state_dict())  # strict: adapter keeps its init
    torch.testing.assert_close(layer.weight, base.weight)
    partial = dict(base.state_dict(), lora_A=torch.zeros(2, 6))
    with pytest.raises(RuntimeError, match="lora_B"):
        layer.load_state_dict(partial)
    full = _trained(GSLoRALinear(6, 4, r=2)).state_dict()
    layer.load_state_dict(full)
    torch.testing.assert_close(layer.lora_B, full["lora_B"])


def test_autocast_bf16():
    layer = _trained(GSLoRALinear(32, 16, r=4))
    x = torch.randn(5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = layer.to_linear()(x)
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2)
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32


def test_dropout_only_in_training():
    layer = _trained(GSLoRALinear(64, 8, r=4, lora_dropout=0.5))
    x = torch.randn(16, 64)
    layer.eval()
    torch.testing.assert_close(layer(x), layer.to_linear()(x), rtol=1e-5, atol=1e-5)
    layer.train()
    assert not torch.allclose(layer(x), layer.to_linear()(x))


def test_unfrozen_base_gets_correct_gradients():
    layer = _trained(GSLoRALinear(10, 6, r=2, dtype=torch.float64))
    layer.weight.requires_grad_(True)
    layer.bias.requires_grad_(True)
    x = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    layer(x).pow(2).sum().backward()
    grads = [t.grad.clone() for t in (x, layer.weight, layer.bias, layer.lora_A, layer.lora_B)]
    ref = torch.nn.functional.linear(x, layer.weight, layer.bias) + layer.scaling * (
        x @ layer.lora_A.t()) @ layer.lora_B.t()
    autograd = torch.autograd.grad(ref.pow(2).sum(), (x, layer.weight, layer.bias, layer.lora_A, layer.lora_B))
    for got, want in zip(grads, autograd, strict=True):
        torch.testing.assert_close(got, want)


def test_bad_input_shape_names_argument():
    layer = GSLoRALinear(8, 4, r=2)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 8\]"):
        layer(torch.randn(3, 7))
    with pytest.raises(ValueError, match="floating-point"):
        layer(torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 8\]"):
        layer(torch.tensor(1.0))


def test_zero_size_input():
    layer = _trained(GSLoRALinear(8, 4, r=2))
    x = torch.randn(0, 8, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 4)
    y.sum().backward()
    assert (layer.lora_A.grad == 0).all()


def test_activation_checkpointing_and_saved_tensor_hooks():
    # The compiled backend's layer call releases the GIL in C++ (gslora._C.lora_linear); Python
    # pack / unpack hooks (which non-reentrant checkpointing installs) must still run, and the
    # gradients must be the plain call's.
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    layer = _trained(GSLoRALinear(16, 24, r=4, lora_alpha=8))
    x = torch.randn(2, 5, 16, requires_grad=True)
    leaves = (x, layer.lora_A, layer.lora_B)

    def grads(run):
        for t in leaves:
            t.grad = None
        run().backward()
        return [t.grad.clone() for t in leaves]

    want = grads(lambda: layer(x).square().sum())
    calls = {"pack": 0, "unpack": 0}

    def pack(t):
        calls["pack"] += 1
        return t

    def unpack(t):
        calls["unpack"] += 1
        return t

    def hooked():
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return layer(x).square().sum()

    for got in (grads(hooked),
                grads(lambda: checkpoint(lambda t: layer(t).square().sum(), x, use_reentrant=False))):
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w)
    assert calls["pack"] > 0 and calls["unpack"] > 0

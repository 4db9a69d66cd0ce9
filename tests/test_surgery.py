"""Model surgery on real architectures (random init, no downloads): find, wrap, group, count,
train, merge, unload, compile."""

import copy
import pickle

import pytest
import timm
import torch
import torchvision
from torch import nn

from gslora import GSLoRALinear
from gslora.models import ViT
from gslora.surgery import (
    CONFIG_ATTR,
    SurgeryError,
    add_gslora,
    count_trainable,
    find_blocks,
    find_ffn_linears,
    gslora_modules,
    gslora_summary,
    lora_groups,
    match_name,
    merge_gslora,
    unload_gslora,
)

# --------------------------------------------------------------------------------------------
# Tiny models of the supported families
# --------------------------------------------------------------------------------------------


def timm_vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             embed_dim=32, num_heads=2, mlp_ratio=2.0, num_classes=5)


def timm_deit():
    return timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             depth=2, embed_dim=32, num_heads=2, num_classes=5)


def tv_vit():
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=64, num_classes=5)


def hf_vit():
    import transformers  # installed with peft (requirements-dev)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, image_size=32, patch_size=8, num_labels=5)
    return transformers.ViTForImageClassification(cfg).eval()


def our_vit():
    return ViT(img_size=32, patch_size=8, in_chans=3, num_classes=5, embed_dim=32, depth=2, num_heads=2,
               mlp_dim=64)


class _BertLayer(nn.Module):
    """The pre-v5 Transformers layout: attention.output.dense / intermediate.dense / output.dense."""

    def __init__(self, d=16, h=32):
        super().__init__()
        self.attention = nn.Module()
        self.attention.self = nn.Module()
        self.attention.self.query = nn.Linear(d, d)
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(d, d)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(d, h)
        self.output = nn.Module()
        self.output.dense = nn.Linear(h, d)

    def forward(self, x):
        x = x + self.attention.output.dense(self.attention.self.query(x))
        return x + self.output.dense(torch.relu(self.intermediate.dense(x)))


class _BertLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(_BertLayer() for _ in range(2))
        self.classifier = nn.Linear(16, 3)

    def forward(self, x):
        for layer in self.encoder.layer:
            x = layer(x)
        return self.classifier(x.mean(1))


class _FeedForward(nn.Module):
    def __init__(self, d=16, h=32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Dropout(0.0), nn.Linear(h, d), nn.Dropout(0.0))

    def forward(self, x):
        return self.net(x)


class _Attention(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.to_qkv = nn.Linear(d, 3 * d, bias=False)
        self.to_out = nn.Sequential(nn.Linear(d, d), nn.Dropout(0.0))

    def forward(self, x):
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        return self.to_out(torch.softmax(q @ k.transpose(-1, -2), -1) @ v)


class _PreNorm(nn.Module):
    def __init__(self, fn, d=16):
        super().__init__()
        self.norm, self.fn = nn.LayerNorm(d), fn

    def forward(self, x):
        return self.fn(self.norm(x))


class _FaceViT(nn.Module):
    """vit-pytorch layout of the authors' face model: transformer.layers[i] = [PreNorm(attn), PreNorm(ff)]."""

    def __init__(self):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.layers = nn.ModuleList(
            nn.ModuleList([_PreNorm(_Attention()), _PreNorm(_FeedForward())]) for _ in range(3))

    def forward(self, x):
        for attn, ff in self.transformer.layers:
            x = x + attn(x)
            x = x + ff(x)
        return x


class _DetrLayer(nn.Module):
    """DETR's own (non-torch) encoder layer class: self_attn, linear1 → act → linear2."""

    def __init__(self, d=16):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.linear1, self.linear2 = nn.Linear(d, 32), nn.Linear(32, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        x = x + self.self_attn(x, x, x)[0]
        return self.norm(x + self.linear2(torch.relu(self.linear1(x))))


class _Detr(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(_DetrLayer() for _ in range(2))
        self.class_embed = nn.Linear(16, 4)

    def forward(self, x):
        for layer in self.encoder.layers:
            x = layer(x)
        return self.class_embed(x)


# name -> (builder, input builder, block name format, FFN linears inside a block, depth, head)
FAMILIES = {
    "timm": (timm_vit, lambda: torch.randn(2, 3, 32, 32), "blocks.{}", ("mlp.fc1", "mlp.fc2"), 2, "head"),
    "timm_deit": (timm_deit, lambda: torch.randn(2, 3, 32, 32), "blocks.{}", ("mlp.fc1", "mlp.fc2"), 2, "head"),
    "torchvision": (tv_vit, lambda: torch.randn(2, 3, 32, 32), "encoder.layers.encoder_layer_{}",
                    ("mlp.0", "mlp.3"), 2, "heads"),
    "ours": (our_vit, lambda: torch.randn(2, 3, 32, 32), "blocks.{}", ("mlp.fc1", "mlp.fc2"), 2, "head"),
    "bert_layout": (_BertLike, lambda: torch.randn(2, 5, 16), "encoder.layer.{}",
                    ("intermediate.dense", "output.dense"), 2, "classifier"),
    "vit_pytorch": (_FaceViT, lambda: torch.randn(2, 5, 16), "transformer.layers.{}",
                    ("1.fn.net.0", "1.fn.net.3"), 3, None),
    "detr": (_Detr, lambda: torch.randn(2, 5, 16), "encoder.layers.{}", ("linear1", "linear2"), 2,
             "class_embed"),
    "torch_encoder": (
        lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2,
                                      enable_nested_tensor=False),
        lambda: torch.randn(2, 5, 16), "layers.{}", ("linear1", "linear2"), 2, None),
}


def _expected(family):
    _, _, block, subs, depth, _ = FAMILIES[family]
    blocks = [block.format(i) for i in range(depth)]
    return blocks, [f"{b}.{s}" for b in blocks for s in subs]


def _hf_expected(model):
    # Transformers 5 renamed ViT's FFN to layers.{i}.mlp.fc1/fc2; older versions used
    # encoder.layer.{i}.intermediate.dense / output.dense. Both must be found.
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return [n for n in names if n.endswith(("mlp.fc1", "mlp.fc2", "intermediate.dense"))
            or (n.endswith("output.dense") and "attention" not in n)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_ffn_linears_and_blocks_are_found(family):
    model = FAMILIES[family][0]()
    blocks, expected = _expected(family)
    assert find_ffn_linears(model) == expected
    assert set(blocks) <= set(find_blocks(model))
    groups = add_gslora(model, r=2)
    assert list(groups) == blocks
    params = dict(model.named_parameters())
    for block, ps in groups.items():
        names = [n for n in expected if n.startswith(block + ".")]
        assert [id(p) for p in ps] == [id(params[f"{n}.lora_{ab}"]) for n in names for ab in "AB"]


def test_transformers_vit_is_found():
    model = hf_vit()
    expected = _hf_expected(model)
    assert len(expected) == 4
    assert find_ffn_linears(model) == expected
    groups = add_gslora(model, r=2)
    assert len(groups) == 2
    assert all(len(ps) == 4 for ps in groups.values())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_wrapped_model_equals_original_at_init(family):
    build, make_x, _, _, _, head = FAMILIES[family]
    blocks, expected = _expected(family)
    original = build().eval()
    model = copy.deepcopy(original)
    x = make_x()
    groups = add_gslora(model, r=4, lora_alpha=2.0, trainable=(head,) if head else ())
    assert [n for n, _ in gslora_modules(model)] == expected
    assert list(groups) == blocks
    # Weights are shared with the replaced linears (no copy): same storage as the original's copy.
    for name, layer in gslora_modules(model):
        torch.testing.assert_close(layer.weight, original.get_submodule(name).weight, rtol=0, atol=0)
        assert not layer.weight.requires_grad
        assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
        assert not layer.lora_B.any()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), original(x))


def test_hf_vit_wrapped_equals_original_at_init():
    original = hf_vit()
    model = copy.deepcopy(original)
    add_gslora(model, r=4, trainable=("classifier",))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits, original(pixel_values=x).logits)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable


def test_groups_block_module_tensor_callable():
    model = timm_vit()
    groups = add_gslora(model, r=2)
    params = dict(model.named_parameters())
    assert list(groups) == ["blocks.0", "blocks.1"]
    b0 = "blocks.0.mlp."
    assert [id(p) for p in groups["blocks.0"]] == [id(params[b0 + s]) for s in
                                                   ("fc1.lora_A", "fc1.lora_B", "fc2.lora_A", "fc2.lora_B")]
    module_groups = lora_groups(model, "module")
    assert list(module_groups) == [f"blocks.{i}.mlp.fc{j}" for i in range(2) for j in (1, 2)]
    assert all(len(ps) == 2 for ps in module_groups.values())
    tensor_groups = lora_groups(model, "tensor")
    assert len(tensor_groups) == 8 and all(len(ps) == 1 for ps in tensor_groups.values())
    assert list(tensor_groups)[0] == "blocks.0.mlp.fc1.lora_A"
    by_kind = lora_groups(model, lambda name, m: name.rsplit(".", 1)[-1])
    assert list(by_kind) == ["fc1", "fc2"] and all(len(ps) == 4 for ps in by_kind.values())
    # Without an argument: the grouping chosen at add_gslora time.
    assert [[id(p) for p in ps] for ps in lora_groups(model).values()] == \
        [[id(p) for p in ps] for ps in groups.values()]


def test_stored_callable_grouping_is_reused():
    model = timm_vit()
    groups = add_gslora(model, r=2, group_by=lambda name, m: "fc1s" if name.endswith("fc1") else "fc2s")
    assert list(groups) == ["fc1s", "fc2s"]
    assert getattr(model, CONFIG_ATTR)["group_by"] == "callable"
    again = lora_groups(model)
    assert {g: [id(p) for p in ps] for g, ps in again.items()} == \
        {g: [id(p) for p in ps] for g, ps in groups.items()}


def test_explicit_targets_patterns_glob_regex_predicate():
    model = timm_vit()
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert "blocks.0.attn.qkv" in linears
    assert match_name("fc1", "blocks.0.mlp.fc1") and not match_name("c1", "blocks.0.mlp.fc1")
    assert match_name("blocks.*.attn.q?v", "blocks.1.attn.qkv")
    assert match_name(r"re:blocks\.\d+\.attn\.(qkv|proj)", "blocks.1.attn.proj")
    assert not match_name(r"re:attn\.proj", "blocks.1.attn.proj")  # regex must match the whole name

    m1 = copy.deepcopy(model)
    add_gslora(m1, r=2, target=["qkv", "attn.proj"], group_by="block")
    assert [n for n, _ in gslora_modules(m1)] == [f"blocks.{i}.attn.{s}" for i in range(2) for s in ("qkv", "proj")]
    m2 = copy.deepcopy(model)
    add_gslora(m2, r=2, target="blocks.*.attn.qkv", group_by="module")
    assert [n for n, _ in gslora_modules(m2)] == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    m3 = copy.deepcopy(model)
    add_gslora(m3, r=2, target=lambda name, mod: mod.out_features == 32 and "mlp" in name)
    assert [n for n, _ in gslora_modules(m3)] == ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2"]
    m4 = copy.deepcopy(model)
    groups = add_gslora(m4, r=2, target=r"re:blocks\.0\.mlp\.fc\d")
    assert list(groups) == ["blocks.0"]


def test_bad_selection_errors_leave_model_untouched():
    model = timm_vit()
    with pytest.raises(SurgeryError, match=r"\['nope'\] match no nn.Linear.*blocks.0.attn.qkv"):
        add_gslora(model, target=["nope"])
    with pytest.raises(SurgeryError, match="group_by='block'.*head.*group_by='module'"):
        add_gslora(model, target=["head"])
    with pytest.raises(SurgeryError, match="trainable pattern 'heads' matches no module"):
        add_gslora(model, trainable=("heads",))
    with pytest.raises(ValueError, match="group_by must be"):
        add_gslora(model, group_by="blocks")
    with pytest.raises(ValueError, match="r \\(LoRA rank\\)"):
        add_gslora(model, r=0)
    with pytest.raises(ValueError, match="lora_alpha"):
        add_gslora(model, lora_alpha=-1.0)
    with pytest.raises(ValueError, match="lora_dropout"):
        add_gslora(model, lora_dropout=1.0)
    with pytest.raises(TypeError, match="target must be"):
        add_gslora(model, target=3)
    assert not gslora_modules(model)
    assert all(p.requires_grad for p in model.parameters())
    assert not hasattr(model, CONFIG_ATTR)
    add_gslora(model)
    with pytest.raises(SurgeryError, match="already holds GSLoRALinear"):
        add_gslora(model)


def test_model_without_blocks_needs_explicit_selection():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(SurgeryError, match="target='ffn' found no FFN.*0, 2"):
        add_gslora(model)
    groups = add_gslora(model, r=2, target=["0", "2"], group_by="module")
    assert list(groups) == ["0", "2"]
    assert isinstance(model[0], GSLoRALinear) and isinstance(model[2], GSLoRALinear)


def test_multihead_attention_out_proj_is_refused():
    # nn.MultiheadAttention reads out_proj.weight directly: a wrapper there would never run.
    model = FAMILIES["torch_encoder"][0]()
    with pytest.raises(SurgeryError, match="MultiheadAttention"):
        add_gslora(model, target=["self_attn.out_proj"], group_by="module")
    assert "layers.0.self_attn.out_proj" not in find_ffn_linears(model)


def test_trainable_patterns_keep_modules_and_params():
    model = timm_vit()
    add_gslora(model, r=2, trainable=("head", "cls_token"))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    lora = sorted(f"blocks.{i}.mlp.fc{j}.lora_{ab}" for i in range(2) for j in (1, 2) for ab in "AB")
    assert trainable == sorted(lora + ["cls_token", "head.weight", "head.bias"])
    assert getattr(model, CONFIG_ATTR)["extra_trainable"] == ["cls_token", "head.weight", "head.bias"]


def _train(model, x, steps=3, lr=1e-2):
    # Every parameter goes to the optimizer: frozen ones must stay put by having no gradient.
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    model.train()
    for _ in range(steps):
        out = model(x)
        # A target away from 0: torchvision zero-inits its head, and out² would have no gradient.
        loss = (out.float() - 1.0).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("family", ["timm", "torchvision"])
def test_training_changes_only_lora_and_kept_modules(family):
    build, make_x, _, _, _, head = FAMILIES[family]
    model = build()
    add_gslora(model, r=4, trainable=(head,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, make_x())
    after = model.state_dict()
    for k, v in before.items():
        changed = not torch.equal(v, after[k])
        is_lora = k.endswith(("lora_A", "lora_B"))
        is_head = k.startswith(head + ".")
        assert changed == (is_lora or is_head), k


def test_merge_matches_unmerged_outputs_and_reinits():
    model = timm_vit().double()
    groups = add_gslora(model, r=4)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    _train(model, x)
    with torch.no_grad():
        ref = model(x)
    ids = [[id(p) for p in ps] for ps in groups.values()]
    old_A = {n: m.lora_A.clone() for n, m in gslora_modules(model)}
    report = merge_gslora(model)
    assert sorted(report["merged"]) == sorted(n for n, _ in gslora_modules(model))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-12, atol=1e-12)
    for name, m in gslora_modules(model):
        assert not m.merged and not m.lora_B.any()
        assert not torch.equal(m.lora_A, old_A[name])  # fresh kaiming draw for the next task
    # Same Parameter objects: groups (and sparsity helpers built on them) stay valid.
    assert [[id(p) for p in ps] for ps in lora_groups(model).values()] == ids


def test_merge_without_reinit_and_zero_groups_are_skipped():
    model = timm_vit().double()
    add_gslora(model, r=4)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    _train(model, x)
    with torch.no_grad():
        for p in lora_groups(model)["blocks.1"]:
            p.zero_()  # as the proximal step leaves a dropped group
        ref = model(x)
    w_before = model.blocks[1].mlp.fc1.weight.clone()
    report = merge_gslora(model, reinit=False)
    assert report["skipped_zero"] == ["blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    assert report["merged"] == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    assert torch.equal(model.blocks[1].mlp.fc1.weight, w_before)
    assert all(m.merged for _, m in gslora_modules(model))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-12, atol=1e-12)
    assert merge_gslora(model)["already_merged"] == [n for n, _ in gslora_modules(model)]
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", ["timm", "torchvision", "ours"])
def test_unload_gives_a_plain_model(family):
    build, make_x, _, _, _, head = FAMILIES[family]
    original = build().eval()
    model = copy.deepcopy(original)
    add_gslora(model, r=4, trainable=(head,))
    x = make_x()
    _train(model, x)
    with torch.no_grad():
        ref = model(x)
    unload_gslora(model)
    assert not gslora_modules(model)
    assert not hasattr(model, CONFIG_ATTR)
    assert all(p.requires_grad for p in model.parameters())
    for (n1, m1), (n2, m2) in zip(model.named_modules(), original.named_modules(), strict=True):
        assert n1 == n2 and type(m1) is type(m2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)
    # No trace of gslora is left: the pickled model names no gslora class or attribute.
    if family != "ours":
        assert b"gslora" not in pickle.dumps(model)
    fresh = build()
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), ref)


def test_unload_without_merge_restores_the_original_exactly():
    original = timm_vit().eval()
    model = copy.deepcopy(original)
    add_gslora(model, r=4)
    x = torch.randn(2, 3, 32, 32)
    _train(model, x)
    merge_gslora(model, reinit=False)  # even a merged adapter is taken out again
    unload_gslora(model, merge=False)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=2e-6, atol=1e-6)


def test_errors_on_models_without_gslora():
    model = timm_vit()
    for fn in (merge_gslora, unload_gslora, lora_groups):
        with pytest.raises(SurgeryError, match="no GSLoRALinear"):
            fn(model)
    assert "no GSLoRALinear" in gslora_summary(model)
    assert count_trainable(model)["groups"] == {}


def test_count_trainable_and_summary():
    model = timm_vit()
    base_total = sum(p.numel() for p in model.parameters())
    add_gslora(model, r=4, trainable=("head",))
    counts = count_trainable(model)
    per_block = 2 * (4 * 32 + 64 * 4)  # fc1: A [4, 32] + B [64, 4]; fc2: A [4, 64] + B [32, 4]
    assert counts["groups"] == {"blocks.0": per_block, "blocks.1": per_block}
    assert counts["lora"] == 2 * per_block
    assert counts["base"] == base_total
    assert counts["total"] == base_total + 2 * per_block
    assert counts["trainable"] == 2 * per_block + 5 * 32 + 5
    assert counts["ratio"] == pytest.approx(counts["trainable"] / counts["total"])
    text = gslora_summary(model)
    assert "4 linear layers wrapped in 2 groups" in text
    assert "blocks.1: blocks.1.mlp.fc1 [32→64], blocks.1.mlp.fc2 [64→32]" in text
    assert "head.weight" in text


def test_paper_ratio_for_vit_b16():
    # The authors' ImageNet100 model: torchvision ViT-B/16, r = 8 on fc1 and fc2 of 12 blocks.
    # Built on the meta device: shapes only, no memory, no weights.
    with torch.device("meta"):
        model = torchvision.models.vit_b_16(num_classes=100)
    add_gslora(model, r=8)
    counts = count_trainable(model)
    assert len(counts["groups"]) == 12
    assert set(counts["groups"].values()) == {2 * (8 * 768 + 3072 * 8)}
    assert counts["trainable"] == counts["lora"] == 737_280
    assert round(100 * counts["ratio_base"], 2) == 0.86


def test_torch_compile_of_wrapped_timm_vit():
    # One block keeps the compile time small on 2 cores; the wrapped layers are the same.
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                              embed_dim=32, num_heads=2, mlp_ratio=2.0, num_classes=5)
    add_gslora(model, r=4)
    with torch.no_grad():
        for _, m in gslora_modules(model):
            m.lora_B.normal_()  # a non-zero adapter, so the LoRA branch matters
    x = torch.randn(2, 3, 32, 32)
    model.train()  # dropout rates are 0: train mode is deterministic
    eager = model(x)
    eager.square().mean().backward()
    ref = [m.lora_A.grad.clone() for _, m in gslora_modules(model)] + \
        [m.lora_B.grad.clone() for _, m in gslora_modules(model)]
    model.zero_grad()
    # One compilation (default inductor backend), forward and backward.
    out = torch.compile(model)(x)
    torch.testing.assert_close(out, eager)
    out.square().mean().backward()
    got = [m.lora_A.grad for _, m in gslora_modules(model)] + [m.lora_B.grad for _, m in gslora_modules(model)]
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r)


def test_blocks_in_a_module_dict_and_a_single_block_model():
    from gslora.models.vit import Block

    stages = nn.ModuleDict({"early": Block(16, 2, 32), "late": Block(16, 2, 32)})
    assert find_blocks(stages) == ["early", "late"]
    assert list(add_gslora(stages, r=2)) == ["early", "late"]
    # fc1 / fc2 directly on the layer (BART-style layers of Transformers < 5).
    layer = nn.Module()
    layer.self_attn = nn.MultiheadAttention(16, 2)
    layer.fc1, layer.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
    bart = nn.Module()
    bart.layers = nn.ModuleList([layer, copy.deepcopy(layer)])
    assert find_ffn_linears(bart) == ["layers.0.fc1", "layers.0.fc2", "layers.1.fc1", "layers.1.fc2"]
    single = nn.Module()
    single.blocks = nn.ModuleList([Block(16, 2, 32)])  # depth 1: still a block
    assert list(add_gslora(single, r=2)) == ["blocks.0"]

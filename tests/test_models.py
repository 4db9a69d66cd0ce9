"""The small ViT: timm-style names, shapes, heads, checkpoints (safetensors + JSON)."""

import json

import pytest
import torch

from gslora.models import CheckpointError, CosFaceHead, ViT, ViTConfig, load_vit, save_vit

TINY = dict(img_size=8, patch_size=4, in_chans=1, num_classes=5, embed_dim=16, depth=2,
            num_heads=2, mlp_dim=24)


def test_timm_module_names_and_shapes():
    model = ViT(**TINY)
    names = dict(model.named_modules())
    for i in range(2):
        for sub in ("norm1", "attn", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.act", "mlp.fc2"):
            assert f"blocks.{i}.{sub}" in names
    assert isinstance(names["blocks.0.mlp.fc1"], torch.nn.Linear)
    assert names["blocks.0.mlp.fc1"].out_features == 24
    params = dict(model.named_parameters())
    assert params["cls_token"].shape == (1, 1, 16)
    assert params["pos_embed"].shape == (1, 1 + 4, 16)
    x = torch.randn(3, 1, 8, 8)
    tokens = model.forward_features(x)
    assert tokens.shape == (3, 5, 16)
    assert model.forward_head(tokens, pre_logits=True).shape == (3, 16)
    assert model(x).shape == (3, 5)
    torch.testing.assert_close(model.embed(x), tokens[:, 0])
    torch.testing.assert_close(model(x), model.head(model.embed(x)))
    assert model.logit_scale is None


def test_default_size_matches_data_md():
    # DATA.md measured a ~139 k parameter model with these settings.
    n = sum(p.numel() for p in ViT().parameters())
    assert 130_000 < n < 150_000


def test_cosface_head_bounded_and_margin():
    model = ViT(**TINY, head="cosface", head_scale=10.0, head_margin=0.3)
    assert isinstance(model.head, CosFaceHead) and model.logit_scale == 10.0
    x = torch.randn(4, 1, 8, 8) * 50
    logits = model(x)
    assert logits.abs().max() <= 10.0 + 1e-5
    labels = torch.tensor([0, 1, 2, 3])
    with_margin = model(x, labels)
    diff = logits - with_margin
    expected = torch.zeros_like(diff)
    expected[torch.arange(4), labels] = 3.0  # s·m on the target only
    torch.testing.assert_close(diff, expected)


def test_trains_on_a_separable_problem():
    # The model learns: two classes differing in mean brightness of the left half.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=g)
    y = torch.arange(64) % 2
    x[y == 1, :, :, :4] += 2.0
    model = ViT(**{**TINY, "num_classes": 2})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert (model(x).argmax(1) == y).float().mean() > 0.95


@pytest.mark.parametrize("bad, match", [
    (dict(img_size=10), "multiple of patch_size"),
    (dict(embed_dim=15), "multiple of num_heads"),
    (dict(head="arcface"), "head must be"),
    (dict(depth=0), "depth"),
    (dict(head_scale=-1.0), "head_scale"),
])
def test_config_errors_name_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        ViTConfig(**{**TINY, **bad})


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown ViTConfig key.*embed_dims"):
        ViTConfig.from_dict({"embed_dims": 3})


def test_wrong_input_shape():
    with pytest.raises(ValueError, match=r"x must have shape \[B, C, 8, 8\]"):
        ViT(**TINY)(torch.randn(2, 1, 9, 9))


def test_checkpoint_round_trip(tmp_path):
    model = ViT(**TINY, head="cosface").eval()
    save_vit(model, tmp_path / "ckpt", extra={"test_acc": 0.5})
    loaded, meta = load_vit(tmp_path / "ckpt")
    assert meta == {"test_acc": 0.5}
    assert loaded.config == model.config
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert not list((tmp_path / "ckpt").glob("*.tmp")), "temporary files must be renamed away"


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no ViT checkpoint"):
        load_vit(tmp_path / "missing")
    model = ViT(**TINY)
    d = save_vit(model, tmp_path / "a")
    with pytest.raises(CheckpointError, match="does not match the requested model"):
        load_vit(d, expect=ViTConfig(**{**TINY, "depth": 3}))
    # Corrupt weights.
    (d / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt weights"):
        load_vit(d)
    # Weights that do not fit the config.
    d2 = save_vit(ViT(**{**TINY, "mlp_dim": 32}), tmp_path / "b")
    payload = json.loads((d2 / "config.json").read_text())
    payload["config"]["mlp_dim"] = 24
    (d2 / "config.json").write_text(json.dumps(payload))
    with pytest.raises(CheckpointError, match="do not match the config"):
        load_vit(d2)
    # Corrupt config.
    (d2 / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt checkpoint config"):
        load_vit(d2)

"""Adapter files: gslora safetensors round trips, fit checks, and PEFT export/import verified by PEFT."""

import copy
import json

import peft  # requirements-dev; the library itself never imports it
import pytest
import timm
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import save_file

from gslora.adapters import (
    ADAPTER_FILE,
    AdapterError,
    adapter_state_dict,
    export_peft,
    import_peft,
    load_adapter,
    read_adapter,
    save_adapter,
)
from gslora.surgery import CONFIG_ATTR, add_gslora, gslora_modules, lora_groups


def timm_vit(depth=2):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=depth,
                             embed_dim=32, num_heads=2, mlp_ratio=2.0, num_classes=5).eval()


def tv_vit():
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=64, num_classes=5).eval()


def _randomize(model, head=None):
    # Stand-in for training: every adapter (and the kept head) gets non-trivial values.
    with torch.no_grad():
        for _, m in gslora_modules(model):
            m.lora_A.normal_()
            m.lora_B.normal_()
        if head is not None:
            for p in model.get_submodule(head).parameters():
                p.add_(torch.randn_like(p))


def _lora_tensors(model):
    return {f"{n}.{k}": getattr(m, k).detach().clone() for n, m in gslora_modules(model) for k in ("lora_A", "lora_B")}


@pytest.fixture
def x():
    return torch.randn(2, 3, 32, 32)


def test_save_load_round_trip_is_bit_exact(tmp_path, x):
    base = timm_vit()
    model = copy.deepcopy(base)
    add_gslora(model, r=4, lora_alpha=2.0, trainable=("head",))
    _randomize(model, head="head")
    path = save_adapter(model, tmp_path / "a.safetensors")
    with torch.no_grad():
        ref = model(x)
    # Into a plain copy of the base model: add_gslora is applied from the file's config.
    fresh = copy.deepcopy(base)
    report = load_adapter(fresh, path)
    assert report["missing"] == [] and report["unexpected"] == []
    got, want = _lora_tensors(fresh), _lora_tensors(model)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(fresh.head.weight, model.head.weight)
    assert getattr(fresh, CONFIG_ATTR)["extra_trainable"] == ["head.weight", "head.bias"]
    assert fresh.head.weight.requires_grad and not fresh.blocks[0].mlp.fc1.weight.requires_grad
    with torch.no_grad():
        assert torch.equal(fresh(x), ref)
    # Into a model that already holds GS-LoRA layers (freshly initialized).
    other = copy.deepcopy(base)
    add_gslora(other, r=4, lora_alpha=2.0, trainable=("head",))
    load_adapter(other, path)
    with torch.no_grad():
        assert torch.equal(other(x), ref)
    assert list(lora_groups(other)) == list(lora_groups(model))


def test_file_holds_only_adapter_tensors_and_the_config(tmp_path):
    model = timm_vit()
    add_gslora(model, r=4, group_by="module")
    path = save_adapter(model, tmp_path)  # a directory: the default file name is used
    assert path == tmp_path / ADAPTER_FILE
    with safe_open(str(path), framework="pt") as f:
        keys = sorted(f.keys())
        config = json.loads(f.metadata()["gslora"])
    assert keys == sorted(f"blocks.{i}.mlp.fc{j}.lora_{ab}" for i in range(2) for j in (1, 2) for ab in "AB")
    assert config["format"] == "gslora-adapter" and config["version"] == 1
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 1.0, False)
    assert config["group_by"] == "module"
    assert config["target_modules"] == [f"blocks.{i}.mlp.fc{j}" for i in range(2) for j in (1, 2)]
    assert config["groups"]["blocks.0.mlp.fc1"] == ["blocks.0.mlp.fc1.lora_A", "blocks.0.mlp.fc1.lora_B"]
    assert config["modules"]["blocks.0.mlp.fc2"] == {"r": 4, "in_features": 64, "out_features": 32}
    assert adapter_state_dict(model).keys() == set(keys)
    # Wrappers (DataParallel, torch.compile) do not leak their name prefixes into the file.
    for wrapped in (torch.nn.DataParallel(model), torch.compile(model)):
        with safe_open(str(save_adapter(wrapped, tmp_path / "w.safetensors")), framework="pt") as f:
            assert sorted(f.keys()) == keys


def test_round_trip_in_bfloat16_and_custom_grouping(tmp_path, x):
    base = timm_vit().to(torch.bfloat16)
    model = copy.deepcopy(base)
    add_gslora(model, r=2, group_by=lambda name, m: name.rsplit(".", 1)[-1])
    _randomize(model)
    path = save_adapter(model, tmp_path / "bf16.safetensors")
    fresh = copy.deepcopy(base)
    load_adapter(fresh, path)
    assert all(m.lora_A.dtype == torch.bfloat16 for _, m in gslora_modules(fresh))
    got, want = _lora_tensors(fresh), _lora_tensors(model)
    assert all(torch.equal(got[k], want[k]) for k in want)
    # The custom grouping is rebuilt from the stored group lists.
    assert {g: len(ps) for g, ps in lora_groups(fresh).items()} == {"fc1": 4, "fc2": 4}
    with torch.no_grad():
        assert torch.equal(fresh(x.to(torch.bfloat16)), model(x.to(torch.bfloat16)))


def test_mismatched_adapters_are_refused_and_leave_the_model_unchanged(tmp_path):
    src = timm_vit()
    add_gslora(src, r=4)
    _randomize(src)
    path = save_adapter(src, tmp_path / "r4.safetensors")

    wrong_rank = timm_vit()
    add_gslora(wrong_rank, r=8)
    before = _lora_tensors(wrong_rank)
    with pytest.raises(AdapterError, match=r"blocks.0.mlp.fc1: rank r=4 in the adapter, r=8 in the model"):
        load_adapter(wrong_rank, path)
    assert all(torch.equal(before[k], v) for k, v in _lora_tensors(wrong_rank).items())

    deeper = timm_vit(depth=3)
    add_gslora(deeper, r=4)
    with pytest.raises(AdapterError, match=r"missing from the adapter: blocks.2.mlp.fc1, blocks.2.mlp.fc2"):
        load_adapter(deeper, path)
    report = load_adapter(deeper, path, strict=False)
    assert report["missing"] == ["blocks.2.mlp.fc1", "blocks.2.mlp.fc2"]
    assert torch.equal(deeper.blocks[1].mlp.fc2.lora_B, src.blocks[1].mlp.fc2.lora_B)

    shallower = timm_vit(depth=1)
    add_gslora(shallower, r=4)
    with pytest.raises(AdapterError, match=r"no GS-LoRA layer / parameter in the model: blocks.1.mlp.fc1"):
        load_adapter(shallower, path)

    wider = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              embed_dim=48, num_heads=2, mlp_ratio=2.0, num_classes=5)
    add_gslora(wider, r=4)
    with pytest.raises(AdapterError, match=r"adapter is for a \[32→64\] layer, the model's is \[48→96\]"):
        load_adapter(wider, path)

    other_alpha = timm_vit()
    add_gslora(other_alpha, r=4, lora_alpha=8.0)
    with pytest.raises(AdapterError, match=r"lora_alpha=1.*lora_alpha=8.*different scaling"):
        load_adapter(other_alpha, path)

    attention = timm_vit()
    add_gslora(attention, r=4, target=["qkv"])
    with pytest.raises(AdapterError, match=r"blocks.0.mlp.fc1: is a Linear in the model, not a GSLoRALinear"):
        load_adapter(attention, path)


def test_unreadable_or_foreign_files(tmp_path):
    model = timm_vit()
    with pytest.raises(FileNotFoundError, match="adapter file not found"):
        load_adapter(model, tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        read_adapter(bad)
    peft_like = tmp_path / "peft.safetensors"
    save_file({"base_model.model.blocks.0.mlp.fc1.lora_A.weight": torch.zeros(2, 32)}, str(peft_like))
    with pytest.raises(AdapterError, match="not a gslora adapter.*import_peft"):
        load_adapter(model, peft_like)
    assert not gslora_modules(model)


# --------------------------------------------------------------------------------------------
# PEFT
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("build,head", [(timm_vit, "head"), (tv_vit, "heads.head")])
def test_peft_loads_our_export_and_gives_our_outputs(tmp_path, x, build, head):
    base = build()
    model = copy.deepcopy(base)
    add_gslora(model, r=4, lora_alpha=2.0, trainable=(head,))
    _randomize(model, head=head)
    export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 2
    assert config["modules_to_save"] == [head]
    with torch.no_grad():
        ours = model(x)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        theirs = peft_model(x)
    # Same math in a different order of operations: float32 rounding only.
    torch.testing.assert_close(theirs, ours)
    # The adapter actually matters (not a vacuous comparison).
    with torch.no_grad():
        assert not torch.allclose(base(x), ours, atol=1e-3)


def test_import_of_a_peft_native_adapter_gives_peft_outputs(tmp_path, x):
    base = timm_vit()
    targets = [f"blocks.{i}.mlp.fc{j}" for i in range(2) for j in (1, 2)]
    cfg = peft.LoraConfig(r=2, lora_alpha=3, target_modules=targets, modules_to_save=["head"])
    peft_model = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.normal_()
    peft_model.save_pretrained(str(tmp_path))
    peft_model.eval()
    with torch.no_grad():
        theirs = peft_model(x)
    ours_model = copy.deepcopy(base)
    report = import_peft(ours_model, tmp_path)
    assert sorted(report["loaded"]) == sorted(targets + ["head.weight", "head.bias"])
    assert list(lora_groups(ours_model)) == ["blocks.0", "blocks.1"]
    assert all(m.r == 2 and m.scaling == 1.5 for _, m in gslora_modules(ours_model))
    with torch.no_grad():
        torch.testing.assert_close(ours_model(x), theirs)


def test_export_import_round_trip_is_bit_exact(tmp_path, x):
    base = timm_vit()
    model = copy.deepcopy(base)
    add_gslora(model, r=4, trainable=("head",))
    _randomize(model, head="head")
    export_peft(model, tmp_path)
    back = copy.deepcopy(base)
    import_peft(back, tmp_path)
    got, want = _lora_tensors(back), _lora_tensors(model)
    assert all(torch.equal(got[k], want[k]) for k in want)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_export_uses_an_exact_regex_when_suffix_matching_is_ambiguous(tmp_path):
    # Target "blocks.0.mlp.fc1" at the top level and a deeper module whose name ends with it:
    # PEFT's list matching would also catch the deeper one, so a full-match regex is written.
    outer = torch.nn.Module()
    outer.blocks = timm_vit().blocks
    outer.extra = torch.nn.Module()
    outer.extra.blocks = timm_vit().blocks
    add_gslora(outer, r=2, target=lambda n, m: n == "blocks.0.mlp.fc1", group_by="module")
    export_peft(outer, tmp_path)
    target = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert target == r"(blocks\.0\.mlp\.fc1)"


def test_peft_import_refuses_what_it_cannot_represent(tmp_path):
    base = timm_vit()
    cfg = peft.LoraConfig(r=2, target_modules=["fc1"], use_dora=True)
    peft.get_peft_model(copy.deepcopy(base), cfg).save_pretrained(str(tmp_path / "dora"))
    with pytest.raises(AdapterError, match="use_dora=True is not supported"):
        import_peft(copy.deepcopy(base), tmp_path / "dora")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2,
                                                                           "lora_alpha": 1}))
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(AdapterError, match="adapter_model.bin \\(a pickle\\)"):
        import_peft(copy.deepcopy(base), tmp_path / "pickled")
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(AdapterError, match="peft_type 'IA3' is not supported"):
        import_peft(copy.deepcopy(base), tmp_path / "ia3")


def test_export_refuses_merged_layers(tmp_path):
    from gslora.surgery import merge_gslora

    model = timm_vit()
    add_gslora(model, r=2)
    _randomize(model)
    merge_gslora(model, reinit=False)
    with pytest.raises(AdapterError, match="is merged"):
        export_peft(model, tmp_path)
    with pytest.raises(AdapterError, match="is merged"):
        load_adapter(model, save_adapter(model, tmp_path / "m.safetensors"))

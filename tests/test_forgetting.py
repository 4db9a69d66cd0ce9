"""The forgetting engine on tiny real data (sklearn digits) and a synthetic set: losses, task
validation, metrics, the continual loop with resume, and the three methods."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from gslora.forgetting import (
    ContinualForgetting,
    ForgetConfig,
    ForgetError,
    PretrainConfig,
    PrototypeLoss,
    bounded_forget_loss,
    compute_prototypes,
    default_bnd,
    embedding_fn,
    h_mean,
    load_dataset,
    make_tasks,
    pretrain,
    replay_indices,
    validate_tasks,
)
from gslora.forgetting.data import FASHION_MNIST_DIR
from gslora.forgetting.report import format_table, write_report
from gslora.models import ViT, ViTConfig

SMALL = ViTConfig(img_size=8, patch_size=4, num_classes=6, embed_dim=16, depth=2, num_heads=2,
                  mlp_dim=32)


@pytest.fixture(scope="module")
def synth():
    return load_dataset("synthetic", "train"), load_dataset("synthetic", "test")


@pytest.fixture(scope="module")
def pretrained(synth):
    torch.manual_seed(0)
    model = ViT(SMALL)
    pretrain(model, synth[0], PretrainConfig(epochs=12, batch_size=32, lr=3e-3), progress=False)
    return model.eval()


# ---------------------------------------------------------------- losses
def test_bounded_forget_loss_value_and_gradient():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]], requires_grad=True)
    y = torch.tensor([0, 2])
    ce = F.cross_entropy(logits, y)
    loss = bounded_forget_loss(logits, y, bnd=5.0)
    torch.testing.assert_close(loss, 5.0 - ce)
    loss.backward()
    g = logits.grad.clone()
    logits.grad = None
    ce2 = F.cross_entropy(logits, y)
    (-ce2).backward()
    torch.testing.assert_close(g, logits.grad)  # ascent on CE below the bound
    # Above the bound: zero loss and exactly zero gradient.
    logits.grad = None
    above = bounded_forget_loss(logits, y, bnd=0.1)
    above.backward()
    assert above.item() == 0.0 and torch.count_nonzero(logits.grad) == 0
    with pytest.raises(ValueError, match="bnd"):
        bounded_forget_loss(logits, y, bnd=-1.0)


def test_default_bnd_matches_authors_cosface_setting():
    # Authors: CosFace s = 64 with BND 105–110.
    assert 105 <= default_bnd(64.0) <= 110
    assert default_bnd(10.0, ratio=0.5) == 10.0
    with pytest.raises(ValueError, match="logit_scale"):
        default_bnd(0.0)


def test_prototype_loss():
    protos = torch.randn(3, 8)
    loss = PrototypeLoss(protos, pro_f=1.0, pro_r=0.5, bnd_pro=2.0)
    # An embedding equal to its prototype: KL = 0, so the forget term is pro_f·bnd_pro.
    y = torch.tensor([0, 1])
    torch.testing.assert_close(loss(protos[y], y), torch.tensor(2.0))
    torch.testing.assert_close(loss(None, None, protos[y], y), torch.tensor(0.0))
    # The retain side equals pro_r·KL(p_proto ‖ p_emb).
    emb = torch.randn(2, 8)
    p = F.softmax(protos[y], 1)
    kl = (p * (p.log() - F.log_softmax(emb, 1))).sum(1).mean()
    torch.testing.assert_close(loss(None, None, emb, y), 0.5 * kl)
    with pytest.raises(ValueError, match="pro_f"):
        PrototypeLoss(protos, pro_f=-1.0)


def test_prototypes_are_class_means(synth):
    model = ViT(SMALL).eval()
    embed = embedding_fn(model)
    x, y = synth[0].images[:30], synth[0].targets[:30]
    protos = compute_prototypes(embed, [(x[:13], y[:13]), (x[13:], y[13:])], 6)
    e = model.embed(x)
    for c in range(6):
        if (y == c).any():
            torch.testing.assert_close(protos[c], e[y == c].mean(0), rtol=1e-5, atol=1e-6)
        else:
            assert torch.all(protos[c] == 0)


# ---------------------------------------------------------------- tasks, data, metrics
def test_make_tasks_seeded_and_disjoint():
    tasks = make_tasks(range(10), 2, 4, seed=3)
    assert tasks == make_tasks(range(10), 2, 4, seed=3)
    flat = [c for t in tasks for c in t]
    assert len(flat) == len(set(flat)) == 8
    with pytest.raises(ForgetError, match="at least one class must remain"):
        make_tasks(range(10), 5, 2)


@pytest.mark.parametrize("tasks, match", [
    ([[0, 11]], "unknown class id 11"),
    ([[0], []], "task 2 has an empty forget set"),
    ([[0, 1], [1]], "class 1 is forgotten twice"),
    ([list(range(6))], "cover all 6 classes"),
    ([], "tasks is empty"),
])
def test_validate_tasks_errors(tasks, match):
    with pytest.raises(ForgetError, match=match):
        validate_tasks(tasks, 6)


def test_replay_ratio_and_shots():
    targets = torch.arange(5).repeat_interleave(20)
    idx = replay_indices(targets, [1, 3], ratio=0.1, seed=0)
    assert torch.bincount(targets[idx], minlength=5).tolist() == [0, 2, 0, 2, 0]
    idx = replay_indices(targets, [0, 4], shots=3, seed=0)
    assert torch.bincount(targets[idx], minlength=5).tolist() == [3, 0, 0, 0, 3]
    with pytest.raises(ValueError, match="exactly one"):
        replay_indices(targets, [0], ratio=0.1, shots=2)


def test_h_mean():
    assert h_mean(80.0, 80.0) == pytest.approx(80.0)
    assert h_mean(100.0, 50.0) == pytest.approx(2 * 100 * 50 / 150)
    assert h_mean(0.0, 90.0) == 0.0


def test_config_errors():
    with pytest.raises(ForgetError, match="unknown forgetting option.*alpah"):
        ForgetConfig.from_dict({"alpah": 1.0})
    with pytest.raises(ForgetError, match="method"):
        ForgetConfig(method="ewc")
    with pytest.raises(ForgetError, match="sparsity"):
        ForgetConfig(sparsity="l1")
    with pytest.raises(ForgetError, match="warmup"):
        ForgetConfig(warmup=1.5)
    with pytest.raises(ForgetError, match="replay_ratio"):
        ForgetConfig(replay_ratio=0.0)
    with pytest.raises(ForgetError, match="prox_metric"):
        ForgetConfig(prox_metric="fisher")
    with pytest.raises(ForgetError, match="prox_metric 'adam' needs optimizer 'adamw'.*sgd"):
        ForgetConfig(prox_metric="adam", optimizer="sgd")


# ---------------------------------------------------------------- the loop
def _cfg(**kw):
    base = dict(steps=60, batch_size=16, lr=1e-2, alpha=0.02, warmup=0.2, beta=0.3, bnd=4.0,
                replay_ratio=0.5, ckpt_every=10)
    return ForgetConfig(**{**base, **kw})


def test_gslora_forgets_and_keeps(synth, pretrained, tmp_path):
    model = ViT(SMALL)
    model.load_state_dict(pretrained.state_dict())
    tasks = [[1], [4]]
    run = ContinualForgetting(model, synth[0], synth[1], tasks, _cfg(), run_dir=tmp_path,
                              progress=False, log=lambda s: None)
    results = run.run()
    assert len(results) == 2
    for r in results:
        assert r["acc_f"] <= 10.0, r
        assert r["acc_r"] >= r["acc_r_pretrained"] - 12.0, r
        assert r["drop"] == pytest.approx(r["acc_f_before"] - r["acc_f"])
        assert r["num_groups"] == 2 and len(r["group_norms"]) == 2
        assert sum(1 for n in r["group_norms"] if n == 0.0) == r["zero_groups"]
        assert 0 < r["trainable_ratio"] < 0.5
    assert results[1]["acc_o"] <= 20.0
    # Adapters are merged and removed: a plain ViT again, with the state in the run dir.
    assert type(run.model.blocks[0].mlp.fc1) is torch.nn.Linear
    assert not any(p.requires_grad for p in run.model.parameters())
    state = json.loads((tmp_path / "state.json").read_text())
    assert len(state["results"]) == 2 and (tmp_path / state["model_file"]).is_file()
    assert (tmp_path / "adapter_task2.safetensors").is_file()
    assert not list(tmp_path.glob("*.step.pt")) and not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("optimizer,prox_metric,expected", [
    ("adamw", "auto", "adam"), ("sgd", "auto", "euclidean"), ("adamw", "euclidean", "euclidean")])
def test_prox_metric_follows_optimizer(synth, pretrained, monkeypatch, optimizer, prox_metric, expected):
    # Under AdamW the prox runs in Adam's metric by default (the Euclidean threshold is a cliff).
    import gslora.sparsity as sp
    from gslora.forgetting import train_task
    from gslora.surgery import add_gslora

    seen: list[str] = []

    class Spy(sp.ProxOptimizer):
        def step(self, closure=None):
            seen.append(self.metric)
            return super().step(closure)

    monkeypatch.setattr(sp, "ProxOptimizer", Spy)
    model = ViT(SMALL)
    model.load_state_dict(pretrained.state_dict())
    gs = sp.GroupSparsity(add_gslora(model, r=2, target="ffn", group_by="block"))
    targets = synth[0].targets
    cfg = _cfg(steps=2, warmup=0.0, optimizer=optimizer, prox_metric=prox_metric)
    train_task(model, synth[0], (targets == 0).nonzero().flatten(),
               (targets == 1).nonzero().flatten(), cfg, bnd=4.0, sparsity=gs, progress=False)
    assert seen == [expected, expected]


@pytest.mark.parametrize("sparsity", ["prox", "penalty"])
def test_prox_gives_exact_zeros_penalty_does_not(synth, pretrained, sparsity):
    # A strong α: the prox zeroes every group exactly (the merge then leaves the model as it
    # was); the paper's penalty at the same α only shrinks the groups.
    model = ViT(SMALL)
    model.load_state_dict(pretrained.state_dict())
    cfg = _cfg(alpha=100.0, steps=30, sparsity=sparsity)
    r = ContinualForgetting(model, synth[0], synth[1], [[2]], cfg, progress=False,
                            log=lambda s: None).run()[0]
    if sparsity == "prox":
        assert r["zero_groups"] == r["num_groups"] == 2
        torch.testing.assert_close(model.state_dict(), pretrained.state_dict(), rtol=0, atol=0)
    else:
        assert r["zero_groups"] == 0 and all(n > 0 for n in r["group_norms"])


def test_resume_after_task_and_mid_task(synth, pretrained, tmp_path):
    tasks = [[0], [3]]
    cfg = _cfg(steps=20, ckpt_every=5)

    def fresh():
        m = ViT(SMALL)
        m.load_state_dict(pretrained.state_dict())
        return m

    ref = ContinualForgetting(fresh(), synth[0], synth[1], tasks, cfg, progress=False,
                              log=lambda s: None)
    ref_results = ref.run()

    # Interrupt task 2 at step 12 (after the step-10 checkpoint).
    import gslora.forgetting.engine as engine

    calls = {"n": 0}
    orig = engine.bounded_forget_loss

    def boom(*a, **k):
        calls["n"] += 1
        if calls["n"] == 20 + 12:
            raise KeyboardInterrupt
        return orig(*a, **k)

    engine.bounded_forget_loss = boom
    try:
        with pytest.raises(KeyboardInterrupt):
            ContinualForgetting(fresh(), synth[0], synth[1], tasks, cfg, run_dir=tmp_path,
                                progress=False, log=lambda s: None).run()
    finally:
        engine.bounded_forget_loss = orig
    assert (tmp_path / "task2.step.pt").is_file()
    assert len(json.loads((tmp_path / "state.json").read_text())["results"]) == 1
    logs = []
    resumed = ContinualForgetting(fresh(), synth[0], synth[1], tasks, cfg, run_dir=tmp_path,
                                  progress=False, log=logs.append)
    results = resumed.run()
    assert any("resuming after task 1/2" in s for s in logs)
    assert results[1]["train"]["steps_run"] == 10  # only the steps after the checkpoint
    # AdamW + prox ran as the fused kernel, before and after resuming from the state dict.
    assert all(r["train"]["fused_step"] for r in results + ref_results)
    for a, b in zip(results, ref_results, strict=True):
        assert a["per_class_acc"] == b["per_class_acc"]
        for x, y in zip(a["group_norms"], b["group_norms"], strict=True):
            assert math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-7)
    torch.testing.assert_close(resumed.model.state_dict(), ref.model.state_dict(), rtol=1e-4,
                               atol=1e-6)
    # A finished run resumes to the same results without training.
    again = ContinualForgetting(fresh(), synth[0], synth[1], tasks, cfg, run_dir=tmp_path,
                                progress=False, log=lambda s: None).run()
    assert [r["acc_r"] for r in again] == [r["acc_r"] for r in results]
    # A different run in the same directory is refused.
    with pytest.raises(ForgetError, match="holds a different run"):
        ContinualForgetting(fresh(), synth[0], synth[1], tasks, _cfg(steps=21), run_dir=tmp_path,
                            progress=False, log=lambda s: None).run()


def test_corrupt_checkpoint_is_a_clear_error(synth, pretrained, tmp_path):
    cfg = _cfg(steps=10)
    model = ViT(SMALL)
    model.load_state_dict(pretrained.state_dict())
    ContinualForgetting(model, synth[0], synth[1], [[0], [1]], cfg, run_dir=tmp_path,
                        progress=False, log=lambda s: None).run()
    state = json.loads((tmp_path / "state.json").read_text())
    state["results"] = state["results"][:1]
    (tmp_path / "state.json").write_text(json.dumps(state))
    (tmp_path / state["model_file"]).write_bytes(b"not safetensors")
    with pytest.raises(ForgetError, match="corrupt checkpoint"):
        ContinualForgetting(ViT(SMALL), synth[0], synth[1], [[0], [1]], cfg, run_dir=tmp_path,
                            progress=False, log=lambda s: None).run()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_baselines(synth, pretrained, method):
    model = ViT(SMALL)
    model.load_state_dict(pretrained.state_dict())
    cfg = _cfg(method=method, full_lr=1e-3)
    r = ContinualForgetting(model, synth[0], synth[1], [[2]], cfg, progress=False,
                            log=lambda s: None).run()[0]
    assert r["acc_f"] <= 10.0, r
    if method == "full":
        assert r["zero_groups"] is None and r["trainable_ratio"] > 0.5
    else:
        # No group sparsity: norms are recorded, none is zero.
        assert r["zero_groups"] == 0 and all(n > 0 for n in r["group_norms"])


def test_retrain_baseline(synth, pretrained):
    def retrain_fn(classes):
        torch.manual_seed(0)
        m = ViT(SMALL)
        pretrain(m, synth[0], PretrainConfig(epochs=8, batch_size=32, lr=3e-3), classes=classes,
                 progress=False)
        return m.eval()

    model = ViT(SMALL)
    model.load_state_dict(pretrained.state_dict())
    r = ContinualForgetting(model, synth[0], synth[1], [[5]], _cfg(method="retrain"),
                            retrain_fn=retrain_fn, progress=False, log=lambda s: None).run()[0]
    assert r["acc_f"] == 0.0  # never trained on class 5
    assert r["acc_r"] > 60.0
    with pytest.raises(ForgetError, match="retrain_fn"):
        ContinualForgetting(model, synth[0], synth[1], [[5]], _cfg(method="retrain"))


def test_prototype_terms_run(synth, pretrained):
    model = ViT(SMALL)
    model.load_state_dict(pretrained.state_dict())
    # α = 0: in 20 steps the Adam-metric prox would remove the groups before they forget; the
    # prototype terms are what this test is about.
    r = ContinualForgetting(model, synth[0], synth[1], [[3]],
                            _cfg(pro_f=0.5, pro_r=0.1, steps=20, alpha=0.0),
                            progress=False, log=lambda s: None).run()[0]
    model2 = ViT(SMALL)
    model2.load_state_dict(pretrained.state_dict())
    r0 = ContinualForgetting(model2, synth[0], synth[1], [[3]], _cfg(steps=20, alpha=0.0), progress=False,
                             log=lambda s: None).run()[0]
    assert r["acc_f"] < r["acc_f_before"]
    # The prototype terms change the training (same seed, same batches otherwise).
    assert r["group_norms"] != r0["group_norms"]


def test_report_table_and_plots(synth, pretrained, tmp_path):
    model = ViT(SMALL)
    model.load_state_dict(pretrained.state_dict())
    res = ContinualForgetting(model, synth[0], synth[1], [[1], [2]], _cfg(steps=10),
                              progress=False, log=lambda s: None).run()
    table = format_table({"gslora": res}, 90.0)
    assert "Acc_r" in table and "H-Mean" in table and "2: -2" in table
    paths = write_report(tmp_path, {"gslora": res}, {"pretrained_test_acc": 90.0})
    assert paths["group_norms"].stat().st_size > 1000
    assert paths["accuracies"].stat().st_size > 1000
    assert json.loads(paths["metrics"].read_text())["results"]["gslora"][0]["task"] == 1


def test_digits_is_real_data():
    tr, te = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert len(tr) + len(te) == 1797 and tr.images.shape[1:] == (1, 8, 8)
    assert set(tr.targets.tolist()) == set(range(10))


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="Fashion-MNIST needs the Debian package dataset-fashion-mnist")
def test_fashion_mnist_loads():
    te = load_dataset("fashion-mnist", "test")
    assert te.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(te.targets).tolist() == [1000] * 10

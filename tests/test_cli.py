"""The `gslora` command: a tiny end-to-end run on sklearn digits, config handling, resume and
one-line errors for bad input."""

import json

import pytest
import yaml

from gslora import cli

TINY = {
    "dataset": "digits",
    "methods": ["gslora", "lora"],
    "model": {"img_size": 8, "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2,
              "mlp_dim": 32},
    "pretrain": {"epochs": 3, "batch_size": 64, "lr": 3e-3},
    "tasks": {"forget_per_task": 2, "num_tasks": 2},
    "forget": {"steps": 8, "batch_size": 16, "replay_ratio": 0.2, "ckpt_every": 4},
}


@pytest.fixture()
def tiny_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_default_yaml_matches_builtin_defaults():
    from pathlib import Path

    data = yaml.safe_load((Path(__file__).parent.parent / "configs" / "default.yaml").read_text())
    assert data == cli.DEFAULTS


def test_forget_end_to_end_and_resume(tmp_path, tiny_config, capsys):
    out = tmp_path / "report"
    code, stdout, err = _run(capsys, "forget", "--config", tiny_config, "--out", out,
                             "--cache-dir", tmp_path / "cache", "--no-progress", "--alpha", "3")
    assert code == 0, err
    assert "H-Mean" in stdout and "mean over tasks" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["results"]) == {"gslora", "lora"}
    assert len(metrics["results"]["gslora"]) == 2
    assert metrics["meta"]["config"]["forget"]["alpha"] == 3.0  # the flag won over the file
    for name in ("table.txt", "accuracies.png", "group_norms.png",
                 "gslora/adapter_task2.safetensors", "gslora/final_model/model.safetensors"):
        assert (out / name).is_file(), name
    # The pre-trained model is cached: a second run loads it and resumes every finished task.
    code, stdout2, err = _run(capsys, "forget", "--config", tiny_config, "--out", out,
                              "--cache-dir", tmp_path / "cache", "--no-progress", "--alpha", "3",
                              "--no-plots")
    assert code == 0, err
    assert "loaded pre-trained ViT" in stdout2 and "resuming after task 2/2" in stdout2
    again = json.loads((out / "metrics.json").read_text())
    assert again["results"] == metrics["results"]


def test_pretrain_command_caches(tmp_path, tiny_config, capsys):
    code, out, err = _run(capsys, "pretrain", "--config", tiny_config, "--cache-dir", tmp_path,
                          "--no-progress")
    assert code == 0, err
    info = json.loads(out.strip().splitlines()[-1])
    assert info["cached"] is False and 0 <= info["test_acc"] <= 100
    code, out, err = _run(capsys, "pretrain", "--config", tiny_config, "--cache-dir", tmp_path,
                          "--no-progress")
    assert json.loads(out.strip().splitlines()[-1])["cached"] is True


@pytest.mark.parametrize("extra, message", [
    (["--tasks", "0,1;12"], "unknown class id 12"),
    (["--tasks", "0,1;;2"], "task 2 has an empty forget set"),
    (["--tasks", "0,1,2,3,4,5,6,7,8,9"], "cover all 10 classes"),
    (["--methods", "gslora,ewc"], "methods must be"),
    (["--sparsity", "l1"], "sparsity must be"),
    (["--tasks", "a,b"], "--tasks must look like"),
    (["--dataset", "cifar"], "unknown dataset"),
])
def test_bad_input_is_one_line(tmp_path, tiny_config, capsys, extra, message):
    out = tmp_path / "r"
    code, _, err = _run(capsys, "forget", "--config", tiny_config, "--out", out,
                        "--cache-dir", tmp_path / "c", "--no-progress", *extra)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gslora: error:") and message in lines[0], err
    assert not out.exists(), "nothing is written for bad input"


def test_config_typo_and_parse_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("forget:\n  alpah: 1.0\n")
    code, _, err = _run(capsys, "forget", "--config", bad)
    assert code == 2 and "unknown key forget.'alpah'" in err
    bad.write_text("dataset: [unclosed\n")
    code, _, err = _run(capsys, "forget", "--config", bad)
    assert code == 2 and "cannot parse" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, "forget", "--config", tmp_path / "missing.yaml")
    assert code == 2 and "config file not found" in err
    toml = tmp_path / "c.toml"
    toml.write_text('dataset = "digits"\n[forget]\nbeta = 0.5\n')
    assert cli.load_config(toml)["forget"]["beta"] == 0.5


def test_a_replay_ratio_replaces_the_few_shot_default(tmp_path):
    assert cli.DEFAULTS["forget"]["replay_shots"] is not None  # few-shot replay by default
    flags = cli.build_parser().parse_args(["forget", "--replay-ratio", "0.2"])
    cfg = cli._apply_flags(cli.load_config(None), flags)
    assert cfg["forget"]["replay_ratio"] == 0.2 and cfg["forget"]["replay_shots"] is None
    both = cli.build_parser().parse_args(["forget", "--replay-ratio", "0.2", "--replay-shots", "5"])
    assert cli._apply_flags(cli.load_config(None), both)["forget"]["replay_shots"] == 5
    path = tmp_path / "ratio.yaml"
    path.write_text("forget:\n  replay_ratio: 0.3\n")
    cfg = cli.load_config(path)
    assert cfg["forget"]["replay_ratio"] == 0.3 and cfg["forget"]["replay_shots"] is None


def test_corrupt_cached_model_is_one_line(tmp_path, tiny_config, capsys):
    code, out, err = _run(capsys, "pretrain", "--config", tiny_config, "--cache-dir", tmp_path,
                          "--no-progress")
    path = json.loads(out.strip().splitlines()[-1])["path"]
    from pathlib import Path

    (Path(path) / "model.safetensors").write_bytes(b"\x00" * 64)
    code, _, err = _run(capsys, "forget", "--config", tiny_config, "--cache-dir", tmp_path,
                        "--out", tmp_path / "r", "--no-progress")
    assert code == 2 and "corrupt weights" in err and len(err.strip().splitlines()) == 1


def test_info(capsys):
    code, out, _ = _run(capsys, "info")
    assert code == 0 and "torch:" in out.replace("torch ", "torch:") and "backends for cpu" in out


# --- Your own images and a timm architecture -------------------------------------------------

TIMM_TINY = {
    "methods": ["gslora"],
    "model": {"arch": "timm:vit_tiny_patch16_224", "img_size": 16, "in_chans": 3,
              "timm_kwargs": {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}},
    "pretrain": {"epochs": 20, "batch_size": 32, "lr": 3e-3},
    "tasks": {"forget_per_task": 1, "num_tasks": 2},
    "forget": {"steps": 100, "batch_size": 16, "replay_shots": 5, "ckpt_every": 0, "beta": 1.0,
               "alpha": 0.01},
}


def _digits_folder(root, classes=(0, 1, 2, 3), per_class=(100, 30), test_dir="test"):
    """sklearn's digits as an ImageFolder tree of RGB PNGs (16 x 16): ROOT/train, ROOT/test."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    for split, n in (("train", per_class[0]), (test_dir, per_class[1])):
        for c in classes:
            d = root / split / f"digit{c}"
            d.mkdir(parents=True)
            picks = np.flatnonzero(bunch.target == c)
            picks = picks[:n] if split == "train" else picks[-n:]
            for i in picks:
                gray = (bunch.images[i] * 255 / 16).astype(np.uint8)
                Image.fromarray(np.stack([gray] * 3, -1)).resize((16, 16)).save(d / f"{i}.png")
    return root


def test_image_folder_loads_resized_scaled_and_labelled_by_train_folders(tmp_path):
    from gslora.forgetting import DatasetUnavailable, load_dataset

    root = _digits_folder(tmp_path / "imgs", per_class=(30, 8), test_dir="val")
    (root / "val" / "digit1").rename(tmp_path / "moved")  # a class without test images
    train = load_dataset(f"imagefolder:{root}", "train", img_size=12, in_chans=3)
    test = load_dataset(f"imagefolder:{root}", "test", img_size=12, in_chans=1)
    assert train.images.shape == (120, 3, 12, 12) and test.images.shape == (24, 1, 12, 12)
    assert train.classes == test.classes == ("digit0", "digit1", "digit2", "digit3")
    assert train.targets.bincount().tolist() == [30, 30, 30, 30]
    assert test.targets.bincount().tolist() == [8, 0, 8, 8]  # labels follow train's folders
    assert -1.0 <= float(train.images.min()) < 0 < float(train.images.max()) <= 1.0
    (root / "val" / "digit7").mkdir()
    with pytest.raises(DatasetUnavailable, match="lacks: .'digit7'"):
        load_dataset(f"imagefolder:{root}", "test", img_size=12, in_chans=1)
    (root / "train" / "digit2" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DatasetUnavailable, match="cannot read image .*broken.png"):
        load_dataset(f"imagefolder:{root}", "train", img_size=12, in_chans=1)
    with pytest.raises(DatasetUnavailable, match="no train/ subfolder"):
        load_dataset(f"imagefolder:{tmp_path / 'nowhere'}", "train", img_size=12, in_chans=1)


def test_forget_on_an_image_folder_with_a_timm_model(tmp_path, capsys):
    import torch

    root = _digits_folder(tmp_path / "imgs")
    cfg = tmp_path / "timm.yaml"
    cfg.write_text(yaml.safe_dump(TIMM_TINY))
    common = ["--config", cfg, "--dataset", f"imagefolder:{root}", "--cache-dir", tmp_path / "c",
              "--no-progress", "--no-plots"]
    out = tmp_path / "r"
    code, stdout, err = _run(capsys, "forget", *common, "--out", out, "--methods",
                             "gslora,lora,full,retrain")
    assert code == 0, err
    assert "pre-training a" in stdout and "timm:vit_tiny_patch16_224" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["meta"]["class_names"] == ["digit0", "digit1", "digit2", "digit3"]
    assert metrics["meta"]["pretrained_test_acc"] > 70  # the timm ViT learned the digits
    tasks = metrics["results"]["gslora"]
    assert len(tasks) == 2 and all(t["acc_f"] <= 10 and t["acc_r"] >= 40 for t in tasks), tasks
    assert set(metrics["results"]) == {"gslora", "lora", "full", "retrain"}
    final = json.loads((out / "gslora" / "final_model" / "config.json").read_text())
    assert final["format"] == "gslora-model" and final["model"]["num_classes"] == 4

    # The pre-trained timm model is cached, and its weights start another run as a checkpoint.
    code, stdout, err = _run(capsys, "forget", *common, "--out", tmp_path / "r2")
    assert code == 0 and "loaded pre-trained timm:vit_tiny_patch16_224" in stdout, err
    cached = json.loads((tmp_path / "r2" / "metrics.json").read_text())["meta"]["pretrained_path"]
    from safetensors.torch import load_file

    weights = tmp_path / "weights.pt"
    torch.save({"state_dict": load_file(f"{cached}/model.safetensors")}, weights)
    code, stdout, err = _run(capsys, "forget", *common, "--checkpoint", weights, "--out", tmp_path / "r3")
    assert code == 0 and f"loaded weights from {weights}" in stdout, err
    runs = [json.loads((tmp_path / d / "metrics.json").read_text())["results"]["gslora"]
            for d in ("r2", "r3")]
    assert [t["acc_r_pretrained"] for t in runs[0]] == [t["acc_r_pretrained"] for t in runs[1]]

    # Weights of another model are a one-line error, and nothing is written.
    code, _, err = _run(capsys, "forget", *common, "--checkpoint", weights, "--in-chans", "1",
                        "--out", tmp_path / "r4")
    assert code == 2 and "does not fit the model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r4").exists()


@pytest.mark.parametrize("extra, message", [
    (["--model", "timm:no_such_model"], "timm cannot build 'no_such_model'"),
    (["--model", "resnet"], "model.arch must be 'vit' or 'timm:NAME'"),
    (["--head", "cosface"], "needs arch 'vit'"),
    (["--checkpoint", "missing.safetensors"], "checkpoint not found"),
    (["--in-chans", "2"], "1 (grayscale) or 3 (RGB) channels"),
])
def test_bad_model_or_image_folder_is_one_line(tmp_path, capsys, extra, message):
    root = _digits_folder(tmp_path / "imgs", per_class=(2, 1))
    cfg = tmp_path / "timm.yaml"
    cfg.write_text(yaml.safe_dump(TIMM_TINY))
    code, _, err = _run(capsys, "forget", "--config", cfg, "--dataset", f"imagefolder:{root}",
                        "--out", tmp_path / "r", "--cache-dir", tmp_path / "c", "--no-progress",
                        *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_forget_starts_from_a_saved_vit_directory(tmp_path, tiny_config, capsys):
    code, out, err = _run(capsys, "pretrain", "--config", tiny_config, "--cache-dir", tmp_path,
                          "--no-progress")
    saved = json.loads(out.strip().splitlines()[-1])
    code, stdout, err = _run(capsys, "forget", "--config", tiny_config, "--checkpoint", saved["path"],
                             "--out", tmp_path / "r", "--cache-dir", tmp_path / "empty",
                             "--no-progress", "--no-plots", "--methods", "gslora")
    assert code == 0 and f"loaded weights from {saved['path']}" in stdout, err
    meta = json.loads((tmp_path / "r" / "metrics.json").read_text())["meta"]
    assert meta["pretrained_test_acc"] == pytest.approx(saved["test_acc"])
    assert not (tmp_path / "empty").exists()  # nothing pre-trained

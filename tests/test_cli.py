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

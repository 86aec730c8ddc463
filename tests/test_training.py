"""Config resolution, CLI user errors, and end-to-end training through the real CLI entry."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from training.cli import main
from training.config import ConfigError, TrainConfig, resolve_config
from tests.fixtures_training import TINY_DEFAULTS


# ---------------------------------------------------------------------------- config


def test_config_precedence(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("task: ner\ndata: d\noutput: o\nepochs: 7\nlr: 0.01\nbatch-size: 4\nmodalities: text,audio\n")
    config = resolve_config(file, {"epochs": 3, "lr": None, "modalities": None})
    assert config.epochs == 3  # flag over file
    assert config.lr == 0.01 and config.batch_size == 4  # file over default
    assert config.modalities == ["text", "audio"] and config.patience == TrainConfig.model_fields["patience"].default


def test_config_unknown_key_is_a_clear_error(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("task: classify\ndata: d\noutput: o\nepoch: 3\n")
    with pytest.raises(ConfigError, match=r"run.yaml: invalid config: unknown key 'epoch'"):
        resolve_config(file)


def test_config_modalities_canonical_order():
    config = resolve_config(None, {"task": "classify", "data": "d", "output": "o", "modalities": "audio,text"})
    assert config.modalities == ["text", "audio"]
    with pytest.raises(ConfigError, match="modalities"):
        resolve_config(None, {"task": "classify", "data": "d", "output": "o", "modalities": "text,smell"})


def test_cli_unknown_config_key_exits_2(tmp_path, capsys):
    file = tmp_path / "run.yaml"
    file.write_text("task: classify\nbogus: 1\n")
    assert main(["train", "--config", str(file), "--data", "d", "--output", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmserve: error: ") and "unknown key 'bogus'" in err and "Traceback" not in err


def test_cli_bad_data_exits_2_with_file_line(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"id": "1", "text": "hi", "label": "a"}\n{"id": "2", "text": "", "label": "b"}\n')
    (data / "dev.jsonl").write_text('{"id": "3", "text": "yo", "label": "a"}\n')
    code = main(["train", "--task", "classify", "--data", str(data), "--output", str(tmp_path / "r"),
                 "--modalities", "text"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == f"mmserve: error: {data / 'train.jsonl'}:2: empty text"


def test_cli_missing_dispatch_module_is_clear(capsys, monkeypatch):
    import training.cli as cli

    monkeypatch.setitem(cli.DISPATCH, "export", ("training._no_such_module", "x"))
    assert main(["export", "--help"]) == 2
    assert "not available" in capsys.readouterr().err


def test_cli_does_not_import_torch_for_serve_dispatch():
    code = ("import sys, training.cli as c; c.DISPATCH['serve'] = ('json', 'x'); "
            "import json; json.main = lambda argv: 0; "
            "rc = c.main(['serve']); print(rc, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split()
    assert out == ["0", "False"]


# ---------------------------------------------------------------------------- end to end

FAST = ["--max-eval-samples", "60", "--batch-size", "16", "--hidden-size", "32", "--image-size", "32",
        "--audio-seconds", "1", "--max-length", "32", "--no-progress", "--threads", "1"]


def cli_train(tmp_path, name, task, data, *extra):
    out = tmp_path / name
    assert main(["train", "--task", task, "--data", str(data / task), "--output", str(out), *FAST, *extra]) == 0
    return out


def dev_metric(run: Path, name: str = "accuracy") -> float:
    return json.loads((run / "eval_dev.json").read_text())["metrics"][name]


def test_tiny_run_layout(tiny_run):
    run = tiny_run("classify")
    for name in ("config.yaml", "model_config.json", "preprocess.json", "tokenizer.json", "model.safetensors",
                 "checkpoint/model.safetensors", "checkpoint/state.pt", "metrics.jsonl", "eval_dev.json",
                 "eval_test.json"):
        assert (run / name).is_file(), name
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]
    assert {"train_loss", "dev", "seconds"} <= set(lines[0])
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["epochs"] == TINY_DEFAULTS["epochs"] and saved["task"] == "classify"


def test_load_run_and_evaluate_writes_json(tiny_run, demo_data_dir, tmp_path, capsys):
    from training.checkpoint import load_run

    run = tiny_run("classify")
    loaded = load_run(run)
    assert loaded.model_config.labels == ["match", "mismatch"] and not loaded.model.training
    assert loaded.train_config.task == "classify"
    out = tmp_path / "ev.json"
    assert main(["evaluate", str(run), "--data", str(demo_data_dir / "classify"), "--split", "dev",
                 "--output", str(out)]) == 0
    assert "accuracy" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["split"] == "dev" and report["primary_metric"] == "accuracy"
    assert report["metrics"]["count"] == 100.0  # evaluate uses the whole split
    assert 0.0 <= report["metrics"]["accuracy"] <= 1.0


@pytest.mark.slow
def test_determinism_and_resume(demo_data_dir, tmp_path):
    from training.train import train

    base = dict(TINY_DEFAULTS, task="classify", data=str(demo_data_dir / "classify"), epochs=3, threads=1)
    a = train(TrainConfig(output=str(tmp_path / "a"), **base))
    b = train(TrainConfig(output=str(tmp_path / "b"), **base))
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    assert a.dev == b.dev
    # an interrupted run resumed from its checkpoint ends exactly where the uninterrupted one did
    config = TrainConfig(output=str(tmp_path / "c"), **base)
    first = train(config, stop_after=1)
    assert first.epochs_run == 1
    assert main(["train", "--resume", str(tmp_path / "c"), "--no-progress"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2, 3]
    assert [x["train_loss"] for x in lines] == [h["train_loss"] for h in a.history]
    assert json.loads((tmp_path / "c" / "eval_dev.json").read_text())["metrics"] == a.dev


@pytest.mark.slow
def test_fusion_beats_unimodal_baselines(demo_data_dir, tmp_path):
    """The classify demo label is image-class XOR audio-class: only the fused model can learn it."""
    epochs = ["--epochs", "8", "--patience", "0", "--lr", "3e-3"]
    fused = dev_metric(cli_train(tmp_path, "fused", "classify", demo_data_dir, *epochs))
    singles = {m: dev_metric(cli_train(tmp_path, m, "classify", demo_data_dir, "--modalities", m, *epochs))
               for m in ("text", "image", "audio")}
    assert fused >= 0.85, (fused, singles)
    for modality, value in singles.items():
        assert value <= 0.7, (modality, value, fused)
        assert fused - value >= 0.2


@pytest.mark.slow
@pytest.mark.parametrize("task, metric, floor", [("ner", "f1", 0.8), ("vqa", "accuracy", 0.3)])
def test_ner_and_vqa_learn(demo_data_dir, tmp_path, task, metric, floor):
    # measured (seed 0, 8 epochs, 32 px): NER dev/test F1 1.00/0.997; VQA dev/test accuracy 0.51/0.60
    run = cli_train(tmp_path, task, task, demo_data_dir, "--epochs", "8", "--lr", "3e-3", "--patience", "0")
    assert dev_metric(run, metric) >= floor
    assert json.loads((run / "eval_test.json").read_text())["metrics"][metric] >= floor


@pytest.mark.slow
def test_lora_trains_fewer_parameters(demo_data_dir, tmp_path, capsys):
    run = cli_train(tmp_path, "lora", "classify", demo_data_dir, "--epochs", "2", "--peft", "lora",
                    "--lora-rank", "4", "--max-train-samples", "96")
    printed = capsys.readouterr().out
    from training.checkpoint import load_run

    loaded = load_run(run)  # rebuild + apply_lora + strict load
    trainable = sum(p.numel() for p in loaded.model.parameters() if p.requires_grad)
    assert loaded.model_config.peft is not None and loaded.model_config.peft.rank == 4
    assert "trainable of" in printed
    assert any("lora_" in name for name, _ in loaded.model.named_parameters())
    assert trainable < sum(p.numel() for p in loaded.model.parameters())

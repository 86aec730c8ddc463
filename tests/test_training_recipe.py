"""Training defaults (recipe), the frozen-encoder feature cache, the learning curve and DDP through torchrun."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training.cli import main
from training.config import ConfigError, TrainConfig, resolve_config
from training.recipe import FAMILY_LR, SMALL_DATA, choose_recipe
from tests.test_training import FAST, cli_train, dev_metric

ROOT = Path(__file__).resolve().parents[1]


def config(**kw) -> TrainConfig:
    return TrainConfig(task="classify", data="d", output="o", **kw)


def test_recipe_defaults_per_encoder_family():
    pretrained = config(text_encoder="minilm", image_encoder="efficientnet-lite0", audio_encoder="whisper-tiny")
    small = choose_recipe(pretrained, 400).encoders
    assert small["text"].trains and small["text"].lr == FAMILY_LR["text"] < pretrained.lr
    assert small["image"].trains and small["image"].lr == FAMILY_LR["image"]
    assert not small["audio"].trains  # small data: frozen speech features, cached
    large = choose_recipe(pretrained, SMALL_DATA).encoders
    assert large["image"].trains and large["image"].lr == FAMILY_LR["image"]
    assert large["audio"].trains and large["audio"].lr == FAMILY_LR["audio"]
    tiny = choose_recipe(config(), 400).encoders
    assert all(plan.trains and plan.lr == 1e-3 for plan in tiny.values())  # random init must learn
    lora = choose_recipe(config(text_encoder="minilm", image_encoder="efficientnet-lite0", peft="lora"), 400)
    assert lora.encoders["text"].adapters and not lora.encoders["text"].trains and lora.frozen() == ["image"]
    assert choose_recipe(config(freeze_encoders=True), 400).frozen() == ["text", "image", "audio"]
    forced = choose_recipe(config(audio_encoder="whisper-tiny", media_encoders="train", encoder_lr=5e-5), 10)
    assert forced.encoders["audio"].trains and forced.encoders["audio"].lr == 5e-5
    assert choose_recipe(config(image_encoder="efficientnet-lite0", media_encoders="freeze"), 10).frozen() == ["image"]


def test_default_schedule_follows_the_data_size():
    small, large = choose_recipe(config(), 400), choose_recipe(config(), 100_000)
    assert (small.epochs, small.patience) == (24, 6)  # 13 steps per epoch -> about 300 steps
    assert (large.epochs, large.patience) == (10, 3)
    assert choose_recipe(config(), 50).epochs == 40  # capped
    given = choose_recipe(config(epochs=3, patience=0), 400)
    assert (given.epochs, given.patience) == (3, 0)


def test_config_checks_task_against_modalities_before_reading_data():
    with pytest.raises(ConfigError, match="NER needs the text modality"):
        resolve_config(None, {"task": "ner", "data": "nowhere", "output": "o", "modalities": "image"})
    with pytest.raises(ConfigError, match="VQA needs the image modality"):
        resolve_config(None, {"task": "vqa", "data": "nowhere", "output": "o", "modalities": "text"})


def test_cli_flags_are_generated_from_the_config(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    for name, info in TrainConfig.model_fields.items():
        assert "--" + name.replace("_", "-") in help_text, name
    assert "{auto,train,freeze}" in help_text and "--no-feature-cache" in help_text


def test_audio_tokens_past_the_clip_are_masked():
    import torch

    from models.encoders.audio import TinyAudioEncoder

    encoder = TinyAudioEncoder(n_mels=8).eval()
    features = torch.randn(2, 8, 80)
    out = encoder(features, torch.tensor([16, 80]))
    assert out.mask[0].tolist() == [True, True] + [False] * 8 and out.mask[1].all()
    # the pooled vector of a short clip depends only on the frames of the clip
    changed = features.clone()
    changed[0, :, 40:] = 5.0
    assert torch.allclose(encoder(changed, torch.tensor([16, 80])).pooled[0], out.pooled[0])


@pytest.mark.slow
def test_feature_cache_gives_the_same_run_and_is_invalidated(demo_data_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = ["--freeze-encoders", "--epochs", "2", "--max-train-samples", "96", "--cache-dir", str(cache)]
    uncached = cli_train(tmp_path, "uncached", "classify", demo_data_dir, *args, "--no-feature-cache")
    first = cli_train(tmp_path, "first", "classify", demo_data_dir, *args)
    assert "computed" in capsys.readouterr().out
    second = cli_train(tmp_path, "second", "classify", demo_data_dir, *args)
    out = capsys.readouterr().out
    assert "read from cache" in out and "computed" not in out
    losses = [[json.loads(x)["train_loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (uncached, first, second)]
    assert np.allclose(losses[0], losses[1], atol=1e-5) and losses[1] == losses[2]
    assert dev_metric(first) == dev_metric(second)
    # another preprocessing spec (image size) is another key: computed again, never a stale hit
    cli_train(tmp_path, "other", "classify", demo_data_dir, *args, "--image-size", "48")
    assert "image encoder on train (96 records) computed" in capsys.readouterr().out
    assert (first / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_ddp_two_processes_match_one(demo_data_dir, tmp_path):
    """2 gloo processes under torchrun: one run directory, same dev metric as one process within 0.1."""
    common = ["--task", "classify", "--data", str(demo_data_dir / "classify"), *FAST,
              "--epochs", "8", "--patience", "0", "--lr", "3e-3"]
    single = cli_train(tmp_path, "single", "classify", demo_data_dir, "--epochs", "8", "--patience", "0", "--lr", "3e-3")
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "training.cli", "train",
                           *common, "--output", str(tmp_path / "ddp")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = tmp_path / "ddp"
    lines = (ddp / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 8  # rank 0 alone wrote it: one line per epoch
    assert done.stdout.count("best epoch") == 2  # dev and test, printed once
    assert dev_metric(single) >= 0.85 and abs(dev_metric(ddp) - dev_metric(single)) <= 0.1



DDP_WORKER = """
import torch
from training import distributed
world = distributed.join("cpu")
net = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2), find_unused_parameters=True)
for _ in range(3):
    net(torch.randn(3, 4)).sum().backward()
print(world.gather(world.rank))
distributed.leave(world)
distributed.exit_worker(0)
"""


@pytest.mark.slow
def test_ddp_workers_exit_cleanly(tmp_path):
    """8 runs of a DDP worker that leaves as training.cli does all exit 0.

    A gloo group that DDP kept alive, torn down at interpreter exit, aborted a rank (SIGABRT,
    'terminate called without an active exception') in 11 of 40 runs here without leave()'s
    barrier and in 1 to 5 of 40 with it: this test catches the first with p > 0.9 and the
    second only about half the time (the CI run that found it was one such abort)."""
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for attempt in range(8):
        done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(script)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (attempt, done.stderr[-2000:])
        assert done.stdout.count("[0, 1]") == 2

def test_cuda_requested_without_a_gpu_is_a_clear_error(demo_data_dir, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the cuda path is exercised by `make gpu-check`")
    code = main(["train", "--task", "classify", "--data", str(demo_data_dir / "classify"), "--output",
                 str(tmp_path / "r"), "--device", "cuda", *FAST])
    assert code == 2 and "no CUDA device is available" in capsys.readouterr().err


def test_gpu_train_check_says_so_without_a_gpu():
    import shutil

    import torch

    if torch.cuda.is_available() or shutil.which("nvidia-smi"):
        pytest.skip("a GPU is present: run `make gpu-check`")
    done = subprocess.run([sys.executable, "scripts/gpu_train_check.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "gpu-train-check: no NVIDIA GPU here; nothing to do"

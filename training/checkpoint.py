"""Run directory I/O: best weights, the resumable checkpoint, and `load_run` for export/evaluate.

RUN_DIR/model.safetensors   best weights: the fused model's state dict (LoRA adapters unmerged)
RUN_DIR/checkpoint/         model.safetensors + state.pt (optimizer, scheduler, epoch, best
                            metric, patience counter, history, RNG states) of the last epoch
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.spec import ModelConfig, PreprocessSpec
from training.config import ConfigError, TrainConfig, load_config

WEIGHTS = "model.safetensors"
CHECKPOINT_DIR = "checkpoint"
STATE = "state.pt"


@dataclass
class LoadedRun:
    model: Any  # FusedModel (or its LoRA-wrapped form), in eval mode, on CPU
    model_config: ModelConfig
    preprocess: PreprocessSpec
    train_config: TrainConfig | None
    directory: Path


def save_weights(model, path: Path) -> None:
    """safetensors of the model's state dict (shared tensors handled by save_model)."""
    from safetensors.torch import save_model

    path = Path(path)
    tmp = path.with_suffix(".tmp")
    save_model(model, str(tmp))
    tmp.replace(path)


def load_weights(model, path: Path, strict: bool = True) -> None:
    from safetensors.torch import load_model

    missing, unexpected = load_model(model, str(path), strict=False)
    if strict and (missing or unexpected):
        raise ConfigError(
            f"{path}: weights do not match the model (missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )


def save_checkpoint(run_dir: Path, model, state: dict) -> None:
    """Last epoch's weights + training state, written to a temp dir then swapped in."""
    import shutil

    import torch

    final = Path(run_dir) / CHECKPOINT_DIR
    tmp = Path(run_dir) / (CHECKPOINT_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(model, tmp / WEIGHTS)
    torch.save(state, tmp / STATE)
    old = Path(run_dir) / (CHECKPOINT_DIR + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def save_training_state(run_dir: Path, model, progress: dict, optimizer, scheduler, generator) -> None:
    """The resumable state after an epoch: weights, optimiser, schedule, progress and every RNG."""
    import random

    import numpy as np
    import torch

    save_checkpoint(run_dir, model, {
        "progress": progress, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "loader": generator.get_state()},
    })


def restore_training_state(run_dir: Path, model, optimizer, scheduler, generator) -> dict:
    """Inverse of save_training_state: loads everything in place and returns the progress dict."""
    import random

    import numpy as np
    import torch

    state = load_checkpoint(run_dir, model)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    generator.set_state(state["rng"]["loader"])
    return state["progress"]


def load_checkpoint(run_dir: Path, model) -> dict:
    import torch

    directory = Path(run_dir) / CHECKPOINT_DIR
    if not (directory / STATE).is_file():
        raise ConfigError(f"{run_dir}: no checkpoint to resume from ({directory / STATE} missing)")
    load_weights(model, directory / WEIGHTS)
    return torch.load(directory / STATE, weights_only=False)


def read_model_config(run_dir: Path) -> ModelConfig:
    return ModelConfig.model_validate(json.loads((Path(run_dir) / "model_config.json").read_text()))


def read_preprocess(run_dir: Path) -> PreprocessSpec:
    return PreprocessSpec.model_validate(json.loads((Path(run_dir) / "preprocess.json").read_text()))


def build_for_run(model_config: ModelConfig, *, pretrained: bool):
    """The model exactly as training trains it: build, then LoRA when the config asks for it."""
    from models.build import build_model

    model = build_model(model_config, pretrained=pretrained)
    if model_config.peft is not None:
        from models.lora import apply_lora

        model = apply_lora(model, model_config.peft)
    return model


def load_run(run_dir: Path, *, weights: str = WEIGHTS) -> LoadedRun:
    """Rebuild a trained run's model (no pretrained download) and load its best weights (strict)."""
    run_dir = Path(run_dir)
    for name in ("model_config.json", "preprocess.json", weights):
        if not (run_dir / name).is_file():
            raise ConfigError(f"{run_dir}: not a finished training run ({name} missing)")
    model_config = read_model_config(run_dir)
    preprocess = read_preprocess(run_dir)
    train_config = load_config(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
    model = build_for_run(model_config, pretrained=False)
    load_weights(model, run_dir / weights)
    model.eval()
    return LoadedRun(model=model, model_config=model_config, preprocess=preprocess,
                     train_config=train_config, directory=run_dir)

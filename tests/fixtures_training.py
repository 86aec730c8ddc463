"""Session-scoped training fixtures other areas reuse (export, serving).

demo_data_dir: the demo data set (all three tasks), generated once per test session.
tiny_run(task, **overrides) -> Path: a run directory of a tiny model trained on the demo data
    (all three modalities, a few epochs, small images and clips), cached per argument set for
    the session. overrides are TrainConfig fields (e.g. peft="lora", fusion="gated",
    modalities=["text", "image"], epochs=1).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

# small, fast settings: a few seconds per run on 2 cores
TINY_DEFAULTS = dict(
    epochs=2,
    max_train_samples=96,
    max_eval_samples=40,
    batch_size=16,
    hidden_size=32,
    image_size=32,
    audio_seconds=1.0,
    max_length=32,
    lr=3e-3,
    patience=0,
    seed=0,
    progress=False,
)


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory) -> Path:
    from training.demo_data import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("demo") / "data")


@pytest.fixture(scope="session")
def tiny_run(demo_data_dir, tmp_path_factory):
    from training.config import TrainConfig
    from training.train import train

    cache: dict[str, Path] = {}

    def make(task: str = "classify", **overrides) -> Path:
        key = json.dumps([task, overrides], sort_keys=True, default=str)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"run-{task}")
            settings = {**TINY_DEFAULTS, **overrides}
            config = TrainConfig(task=task, data=str(demo_data_dir / task), output=str(out), **settings)
            train(config)
            cache[key] = out
        return cache[key]

    return make

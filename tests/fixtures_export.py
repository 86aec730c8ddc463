"""Session-scoped export fixtures other areas reuse (serving, benchmarks).

model_repository: Path of a model repository holding tiny exported models for all three tasks:
    tiny-classify/1, tiny-ner/1, tiny-vqa/1, each with model.onnx + model.pt + manifest.json +
    tokenizer.json, exported (parity proven) from the `tiny_run` runs of tests/fixtures_training.py.
    Treat it as read-only: copy it (shutil.copytree) before changing anything in it.
"""
from __future__ import annotations

from pathlib import Path

import pytest

TINY_MODELS = {"tiny-classify": "classify", "tiny-ner": "ner", "tiny-vqa": "vqa"}


@pytest.fixture(scope="session")
def model_repository(tiny_run, tmp_path_factory) -> Path:
    from training.export import export

    repository = tmp_path_factory.mktemp("export") / "model_repository"
    for name, task in TINY_MODELS.items():
        export(tiny_run(task), repository, name, version=1, formats=("onnx", "torchscript"), max_batch_size=16)
    return repository

"""What export reads from a training run: the model (LoRA merged, eval mode), its configs, and real dev records."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models import contract
from models.spec import ModelConfig, PreprocessSpec
from training.export_error import ExportError

MAX_DEV_RECORDS = 64


@dataclass
class ExportRun:
    model: Any
    config: ModelConfig
    preprocess: PreprocessSpec
    train: dict[str, Any]
    directory: Path


def load_for_export(run_dir: Path) -> ExportRun:
    """The run's best weights with LoRA adapters merged into the base weights, in eval mode."""
    from training.checkpoint import load_run

    if not (run_dir / "model_config.json").is_file():
        raise ExportError(f"{run_dir}: not a training run directory (no model_config.json)")
    loaded = load_run(run_dir)
    model = loaded.model
    config = loaded.model_config
    if config.peft is not None or _has_lora(model):
        from models.lora import merge_lora

        merged = merge_lora(model)
        model = merged if merged is not None else model
        if _has_lora(model):
            raise ExportError(f"{run_dir}: LoRA adapters are still present after merge_lora")
    model.eval()
    train = loaded.train_config
    if hasattr(train, "model_dump"):
        train = train.model_dump(mode="json")
    return ExportRun(model, config, loaded.preprocess, dict(train or {}), Path(loaded.directory))


def _has_lora(model) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def model_input_names(model, config: ModelConfig) -> list[str]:
    """The model's inputs, checked against the tensor contract for its modalities."""
    expected = contract.input_names(config.modalities)
    names = list(getattr(model, "input_names", None) or expected)
    if names != expected:
        raise ExportError(f"model inputs {names} do not follow the tensor contract {expected}")
    return names


def dev_features(run: ExportRun, data_dir: Path | None = None, limit: int = MAX_DEV_RECORDS):
    """(Preprocessor, `Features` of up to `limit` real dev records of the run's data set; bad ones skipped)."""
    from models.preprocessing import Preprocessor
    from training.data import encode_split, read_split

    data = Path(data_dir or run.train.get("data") or "")
    if not data.is_absolute() and not data.exists():
        data = run.directory / data
    split = next((data / f for f in ("dev.jsonl", "test.jsonl") if (data / f).is_file()), None)
    if split is None:
        raise ExportError(f"{data}: no dev.jsonl to prove parity on (pass --data DIR)")
    task, modalities = run.config.task, run.config.modalities
    pre = Preprocessor(run.preprocess, run.directory)
    records = read_split(split, task, modalities, skip_bad=True)[:limit]
    examples = encode_split(records, task, modalities, pre, list(run.config.labels), run.config.multi_label,
                            skip_bad=True)
    features = [e.features for e in examples]
    if not features:
        raise ExportError(f"{split}: no usable dev records to prove parity on")
    return pre, features

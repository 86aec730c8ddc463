"""The manifest of an exported version: tensor signature, formats, parity figures, the run's metrics, file hashes."""
from __future__ import annotations

import importlib.metadata
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from models import contract
from models.manifest import FormatInfo, Manifest, ParityResult, TensorSpec, hash_directory
from models.spec import ModelConfig
from training.export_source import ExportRun
from training.parity import modality_infos


def build_manifest(
    run: ExportRun, name: str, version: int, names: Sequence[str], example: tuple, *, max_batch_size: int,
    formats: dict[str, FormatInfo], parity: list[ParityResult], directory: Path,
) -> Manifest:
    """The manifest of the files written in `directory` (hashed here: write the manifest last)."""
    inputs, outputs = tensor_specs(names, example, run.config)
    return Manifest(
        name=name, version=version, task=run.config.task, multi_label=run.config.multi_label,
        labels=list(run.config.labels), modalities=modality_infos(run.config), inputs=inputs, outputs=outputs,
        preprocessing=run.preprocess, model_config=run.config, max_batch_size=max_batch_size,
        formats=formats, training=run.train, metrics=run_metrics(run.directory), parity=parity,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        source_run=str(run.directory.resolve()), package_version=package_version(),
        files=hash_directory(directory),
    )


def tensor_specs(names: Sequence[str], example: tuple, config: ModelConfig) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs (contract dtypes; named dynamic axes, the example's sizes for the fixed ones) and `logits`."""
    inputs = []
    for name, tensor in zip(names, example):
        axes = contract.dynamic_axes(name)
        shape: list[int | str] = [axes.get(i, int(d)) for i, d in enumerate(tensor.shape)]
        inputs.append(TensorSpec(name=name, dtype=contract.BY_NAME[name].dtype, shape=shape))
    out_shape: list[int | str] = [*contract.output_axes(config.task).values(), len(config.labels)]
    return inputs, [TensorSpec(name=contract.LOGITS, dtype="float32", shape=out_shape)]


def run_metrics(run_dir: Path) -> dict[str, dict[str, float] | None]:
    """{"dev": {...}, "test": {... } | None}: the flattened numbers of the run's eval_*.json."""
    out: dict[str, dict[str, float] | None] = {}
    for split in ("dev", "test"):
        path = run_dir / f"eval_{split}.json"
        if not path.is_file():
            out[split] = None
            continue
        raw = json.loads(path.read_text())
        # `mmserve evaluate` writes {"split", "task", "primary_metric", "metrics": {...}}
        if isinstance(raw, dict) and isinstance(raw.get("metrics"), dict):
            raw = raw["metrics"]
        out[split] = _flatten_numbers(raw)
    return out


def _flatten_numbers(value: Any, prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            flat.update(_flatten_numbers(item, f"{prefix}{key}." if isinstance(item, dict) else f"{prefix}{key}"))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        flat[prefix.rstrip(".")] = float(value)
    return flat


def package_version() -> str:
    try:
        return importlib.metadata.version("mmserve")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"

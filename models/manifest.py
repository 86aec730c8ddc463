"""The manifest of one exported model version: `model_repository/NAME/VERSION/manifest.json`.

It is the only thing the serving app reads to know a model: metadata, preprocessing,
tensor signature, warm-up shapes and file integrity. Schema is versioned and validated
on read; bump `SCHEMA_VERSION` on any incompatible change.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from models.spec import Modality, ModelConfig, PreprocessSpec, Task

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"

DType = Literal["int64", "float32", "bool"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class TensorSpec(_Strict):
    name: str
    dtype: DType
    shape: list[int | str]  # a str is a named dynamic axis: "batch", "sequence"


class ModalityInfo(_Strict):
    name: Modality
    required: bool


class FormatInfo(_Strict):
    file: str  # relative to the version directory
    opset: int | None = None  # ONNX only
    size_bytes: int
    export_seconds: float


class ParityResult(_Strict):
    format: Literal["onnx", "torchscript"]
    batch_size: int
    sequence_length: int | None = None
    present: list[Modality]  # modalities present in this probe (others masked out)
    max_abs_diff: float
    predictions_match: bool


class Manifest(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str
    version: int
    task: Task
    multi_label: bool = False
    labels: list[str]
    modalities: list[ModalityInfo]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    preprocessing: PreprocessSpec
    model_config_: ModelConfig = Field(alias="model_config")
    max_batch_size: int = 32  # recommended; the server may cap lower
    formats: dict[Literal["onnx", "torchscript"], FormatInfo]
    training: dict[str, Any]  # the resolved training config of the source run
    metrics: dict[str, dict[str, float] | None]  # {"dev": {...}, "test": {...} | None}
    parity: list[ParityResult]
    created_at: str  # ISO 8601, UTC
    source_run: str
    package_version: str
    files: dict[str, str]  # relative path -> sha256 hex, every file but manifest.json

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), populate_by_name=True)

    @property
    def required_modalities(self) -> list[str]:
        return [m.name for m in self.modalities if m.required]

    @property
    def modality_names(self) -> list[str]:
        return [m.name for m in self.modalities]

    def dump(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_FILE
        path.write_text(self.model_dump_json(indent=2, by_alias=True) + "\n")
        return path


def read_manifest(directory: Path) -> Manifest:
    """Parse and validate `directory/manifest.json` (raises pydantic.ValidationError / OSError)."""
    text = (Path(directory) / MANIFEST_FILE).read_text()
    return Manifest.model_validate(json.loads(text))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_directory(directory: Path) -> dict[str, str]:
    """sha256 of every regular file below `directory` except the manifest itself."""
    directory = Path(directory)
    return {
        p.relative_to(directory).as_posix(): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST_FILE
    }


def verify_files(directory: Path, manifest: Manifest) -> list[str]:
    """Problems with the files listed in the manifest, one message per file (empty = all good)."""
    directory = Path(directory)
    problems = []
    for rel, expected in manifest.files.items():
        path = directory / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif sha256_file(path) != expected:
            problems.append(f"{path}: sha256 mismatch (file altered or truncated)")
    return problems

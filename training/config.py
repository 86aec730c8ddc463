"""`TrainConfig`: every setting of a training run, resolved as defaults < --config YAML < CLI flags.

Saved as RUN_DIR/config.yaml. Unknown keys are an error (a typo must not silently train with
a default), reported as one line by `ConfigError`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from models.spec import MODALITIES, FusionKind, LoraSpec, ModelConfig, Task


class ConfigError(ValueError):
    """A user error in the run configuration (file or flags): printed as one line, exit code 2."""


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # what and where
    task: Task
    data: str
    output: str
    modalities: list[Literal["text", "image", "audio"]] = Field(default_factory=lambda: list(MODALITIES))
    multi_label: bool | None = None  # None: inferred from the data (a list-valued "label")

    # model
    fusion: FusionKind = "concat"
    text_encoder: str = "tiny"
    image_encoder: str = "tiny"
    audio_encoder: str = "tiny"
    hidden_size: int = 128
    dropout: float = 0.1
    vocab_size: int = 2048  # tiny tokenizer only (pretrained text encoders bring their own)
    # preprocessing overrides (None: models.build.default_preprocess_spec decides)
    max_length: int | None = None
    image_size: int | None = None
    audio_seconds: float | None = None
    vqa_top_answers: int | None = None  # answer vocabulary: the N most frequent training answers

    # fine-tuning strategy
    peft: Literal["none", "lora"] = "none"
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: str = r".*text_encoder.*\.(query|value)$"
    freeze_encoders: bool = False  # linear probing: every encoder frozen, fusion + head train

    # optimisation
    epochs: int = 10
    lr: float = 1e-3
    encoder_lr: float | None = None  # lower LR for *pretrained* encoders (None: same as lr)
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    batch_size: int = 32
    grad_clip: float = 1.0
    patience: int = 3  # epochs without dev improvement before stopping; 0 disables early stopping
    seed: int = 0
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    skip_bad: bool = False
    num_workers: int = 0
    threads: int | None = None  # torch.set_num_threads; None leaves torch's default
    progress: bool | None = None  # tqdm bar on stderr; None: only when stderr is a TTY

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one modality is needed")
        if len(set(value)) != len(value):
            raise ValueError(f"modalities repeat: {value}")
        return [m for m in MODALITIES if m in value]  # canonical order

    @field_validator("epochs", "batch_size", "lora_rank", "hidden_size")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value

    def lora_spec(self) -> LoraSpec | None:
        if self.peft != "lora":
            return None
        return LoraSpec(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                        target_modules=self.lora_targets)

    def model_config_for(self, labels: list[str], multi_label: bool, vocab_size: int | None) -> ModelConfig:
        return ModelConfig(
            task=self.task, modalities=list(self.modalities), labels=labels, multi_label=multi_label,
            text_encoder=self.text_encoder, image_encoder=self.image_encoder, audio_encoder=self.audio_encoder,
            text_vocab_size=vocab_size, fusion=self.fusion, hidden_size=self.hidden_size, dropout=self.dropout,
            peft=self.lora_spec(), freeze_encoders=self.freeze_encoders,
        )

    def save(self, path: Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "config"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key {loc!r}")
        elif err["type"] == "missing":
            parts.append(f"{loc} is required")
        else:
            parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def read_config_file(path: Path) -> dict[str, Any]:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}".replace("\n", " ")) from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    # YAML keys may use dashes like the CLI flags
    return {str(k).replace("-", "_"): v for k, v in raw.items()}


def resolve_config(file: Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """defaults < YAML `file` < `overrides` (None values in overrides mean "not given")."""
    values: dict[str, Any] = read_config_file(file) if file else {}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if isinstance(values.get("modalities"), str):
        values["modalities"] = [m.strip() for m in values["modalities"].split(",") if m.strip()]
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as exc:
        where = f"{file}: " if file else ""
        raise ConfigError(f"{where}invalid config: {_describe(exc)}") from None


def load_config(path: Path) -> TrainConfig:
    """Read a saved RUN_DIR/config.yaml."""
    return resolve_config(path)

"""`TrainConfig`: every setting of a training run, resolved as defaults < --config YAML < CLI flags.

Saved as RUN_DIR/config.yaml. Unknown keys are an error (a typo must not silently train with
a default), reported as one line by `ConfigError`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.spec import MODALITIES, FusionKind, LoraSpec, ModelConfig, Task


class ConfigError(ValueError):
    """A user error in the run configuration (file or flags): printed as one line, exit code 2."""


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # Every field is a `mmserve train` flag (training/cli.py generates them from this class):
    # --field-name, its type, choices and this description as the help text.

    # what and where
    task: Task = Field(description="what the model predicts")
    data: str = Field(description="directory with train.jsonl, dev.jsonl and optionally test.jsonl")
    output: str = Field(description="run directory to write")
    modalities: list[Literal["text", "image", "audio"]] = Field(
        default_factory=lambda: list(MODALITIES), description="comma-separated subset of text,image,audio")
    multi_label: bool | None = Field(None, description="several labels per record (default: inferred from "
                                                       "list-valued labels in the data)")

    # model
    fusion: FusionKind = Field("concat", description="how the modalities are combined")
    fusion_revision: int = Field(3, ge=1, le=3, description="fusion architecture: 3 adds fixed 2-D grid positions to "
                                                            "image tokens and a question-guided look at the media "
                                                            "tokens in concat; 2 learned media positions and "
                                                            "pairwise products; 1 the first release")
    text_encoder: str = Field("tiny", description="tiny | minilm | HF name | local path")
    image_encoder: str = Field("tiny", description="tiny | efficientnet-lite0 | HF name | local path")
    audio_encoder: str = Field("tiny", description="tiny | whisper-tiny | HF name | local path")
    hidden_size: int = Field(128, description="width every modality is projected to")
    dropout: float = Field(0.1, description="dropout in projections, fusion and head")
    vocab_size: int = Field(2048, description="tiny tokenizer only (pretrained text encoders bring their own)")
    # preprocessing overrides (None: models.build.default_preprocess_spec decides)
    max_length: int | None = Field(None, description="text tokens per record")
    image_size: int | None = Field(None, description="square image side in pixels")
    audio_seconds: float | None = Field(None, description="audio window the model sees (tiny audio encoder)")
    vqa_top_answers: int | None = Field(None, description="answer vocabulary: the N most frequent training answers")

    # fine-tuning strategy (training/recipe.py)
    peft: Literal["none", "lora"] = Field("none", description="LoRA adapters instead of full fine-tuning")
    lora_rank: int = Field(8, description="LoRA rank")
    lora_alpha: int = Field(16, description="LoRA alpha")
    lora_dropout: float = Field(0.05, description="LoRA dropout")
    lora_targets: str = Field(r".*text_encoder.*\.(query|value)$", description="regex over module names")
    freeze_encoders: bool = Field(False, description="linear probing: every encoder frozen, fusion + head train")
    media_encoders: Literal["auto", "train", "freeze"] = Field(
        "auto", description="pretrained image/audio encoders under full fine-tuning; auto: images train, audio "
                            "stays frozen (features cached) under 5,000 training records")

    # optimisation
    epochs: int | None = Field(None, description="maximum epochs (default: enough for about 300 optimiser steps, "
                                                 "10 to 40 epochs)")
    lr: float = Field(1e-3, description="learning rate of fusion, head, LoRA adapters and tiny encoders")
    encoder_lr: float | None = Field(None, description="learning rate of trained pretrained encoders (default: "
                                                       "per family: text/audio 3e-5, image 1e-4)")
    weight_decay: float = Field(0.01, description="AdamW weight decay (not on biases and norms)")
    warmup_ratio: float = Field(0.1, description="share of steps with linear warm-up")
    batch_size: int = Field(32, description="global batch (split across torchrun processes)")
    grad_clip: float = Field(1.0, description="gradient norm clip (0: off)")
    patience: int | None = Field(None, description="early stopping: epochs without dev improvement (0: off; "
                                                   "default: a quarter of the epochs, at least 3)")
    seed: int = Field(0, description="random seed (same seed, data and machine: same metrics)")
    max_train_samples: int | None = Field(None, description="use only the first N training records")
    max_eval_samples: int | None = Field(None, description="use only the first N dev/test records")
    skip_bad: bool = Field(False, description="skip bad records, with counts, instead of stopping")
    num_workers: int = Field(0, description="DataLoader worker processes")
    threads: int | None = Field(None, description="torch CPU threads (default: torch's)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present "
                                                                      "(torchrun: cuda:LOCAL_RANK)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="autocast on CUDA (auto: bf16 where supported, else fp16); CPU is fp32")
    feature_cache: bool = Field(True, description="frozen encoders run once; their outputs cached on disk")
    cache_dir: str | None = Field(None, description="feature cache directory (default $MMSERVE_CACHE_DIR or "
                                                    "~/.cache/mmserve)")
    progress: bool | None = Field(None, description="progress bar on stderr (default: when stderr is a TTY)")

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
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("must be at least 1")
        return value

    @model_validator(mode="after")
    def _task_needs(self) -> "TrainConfig":
        # checked here so the CLI fails before any data is read
        if self.task == "ner" and "text" not in self.modalities:
            raise ValueError("NER needs the text modality (tags are per word)")
        if self.task == "vqa" and "image" not in self.modalities:
            raise ValueError("VQA needs the image modality")
        return self

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
            peft=self.lora_spec(), freeze_encoders=self.freeze_encoders, fusion_revision=self.fusion_revision,
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

"""Typed specs shared by training, export and serving (no torch here).

`PreprocessSpec` says how raw text, image bytes and audio bytes become model inputs.
`ModelConfig` says how to rebuild the fused network. Both are saved with a training
run (`preprocess.json`, `model_config.json`) and copied into every exported manifest.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Task = Literal["classify", "ner", "vqa"]
Modality = Literal["text", "image", "audio"]
MODALITIES: tuple[str, ...] = ("text", "image", "audio")
FusionKind = Literal["concat", "gated", "cross_attention", "late"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class TextSpec(_Strict):
    tokenizer_file: str = "tokenizer.json"  # relative to the run / version directory
    max_length: int = 128


class ImageSpec(_Strict):
    size: int = 224  # square output side, pixels
    mean: list[float] = Field(default_factory=lambda: [0.5, 0.5, 0.5])  # on 0..1 pixels
    std: list[float] = Field(default_factory=lambda: [0.5, 0.5, 0.5])
    resample: Literal["bilinear", "bicubic"] = "bilinear"
    max_pixels: int = 40_000_000  # decompression-bomb guard on the *decoded* image


class AudioSpec(_Strict):
    sample_rate: int = 16_000
    max_seconds: float = 10.0  # clips are padded or cropped to exactly this length
    n_mels: int = 80
    n_fft: int = 400
    hop_length: int = 160
    log_style: Literal["whisper", "db"] = "whisper"

    @property
    def num_samples(self) -> int:
        return int(round(self.sample_rate * self.max_seconds))

    @property
    def num_frames(self) -> int:
        return self.num_samples // self.hop_length


class PreprocessSpec(_Strict):
    """Only the modalities the model uses are set."""

    text: TextSpec | None = None
    image: ImageSpec | None = None
    audio: AudioSpec | None = None


class LoraSpec(_Strict):
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    # regex over module names inside the fused model; the default targets BERT-style attention
    target_modules: str = r".*text_encoder.*\.(query|value)$"


class ModelConfig(_Strict):
    """Everything needed to rebuild the fused network (weights come from safetensors)."""

    task: Task
    modalities: list[Modality]
    labels: list[str]  # classes, BIO tag set (NER) or answer vocabulary (VQA)
    multi_label: bool = False
    text_encoder: str = "tiny"  # tiny | minilm | HF name | local path
    image_encoder: str = "tiny"  # tiny | efficientnet-lite0 | HF name | local path
    audio_encoder: str = "tiny"  # tiny | whisper-tiny | HF name | local path
    text_vocab_size: int | None = None  # set from the tokenizer; the tiny text encoder needs it
    fusion: FusionKind = "concat"
    hidden_size: int = 128  # common width every modality is projected to
    dropout: float = 0.1
    peft: LoraSpec | None = None
    freeze_encoders: bool = False
    # 1: as first released; 2: learned positions on image/audio tokens, pairwise products in concat fusion
    fusion_revision: int = 1

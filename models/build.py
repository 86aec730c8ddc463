"""Build the fused model, its default preprocessing and its tokenizer from a `ModelConfig`."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from torch import nn

from models.encoders import build_audio_encoder, build_image_encoder, build_text_encoder, local_files_only
from models.encoders.audio import WHISPER_TINY
from models.encoders.image import EFFICIENTNET
from models.encoders.text import resolve_text_name
from models.fused import FusedModel
from models.fusion import ConcatFusion, CrossAttentionFusion, GatedFusion, LateFusion
from models.heads import SequenceClassificationHead, TokenClassificationHead, VQAHead
from models.spec import MODALITIES, AudioSpec, ImageSpec, ModelConfig, PreprocessSpec, TextSpec

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
FUSIONS = {"concat": ConcatFusion, "gated": GatedFusion, "cross_attention": CrossAttentionFusion, "late": LateFusion}
HEADS = {"classify": SequenceClassificationHead, "ner": TokenClassificationHead, "vqa": VQAHead}


def _modalities(config: ModelConfig) -> list[str]:
    return [m for m in MODALITIES if m in config.modalities]


def build_model(config: ModelConfig, *, pretrained: bool = True) -> FusedModel:
    """The fused network for `config`. pretrained=False: same architecture, random weights, no weight files
    read (use it when a saved state dict is loaded next). Applies `freeze_encoders`, not `peft` (see models.lora)."""
    modalities = _modalities(config)
    audio = default_preprocess_spec(config).audio
    encoders: dict[str, nn.Module] = {}
    if "text" in modalities:
        encoders["text"] = build_text_encoder(config.text_encoder, vocab_size=config.text_vocab_size, pretrained=pretrained)
    if "image" in modalities:
        encoders["image"] = build_image_encoder(config.image_encoder, pretrained=pretrained)
    if "audio" in modalities:
        encoders["audio"] = build_audio_encoder(
            config.audio_encoder, n_mels=audio.n_mels, num_frames=audio.num_frames, pretrained=pretrained
        )
    dims = {m: e.output_dim for m, e in encoders.items()}
    fusion = FUSIONS[config.fusion](dims, config.hidden_size, config.dropout, revision=config.fusion_revision)
    branches = len(modalities) if config.fusion == "late" else 1
    head = HEADS[config.task](config.hidden_size, len(config.labels), branches=branches, dropout=config.dropout)
    model = FusedModel(encoders.get("text"), encoders.get("image"), encoders.get("audio"), fusion, head, config.task)
    if config.freeze_encoders:
        freeze_encoders(model)
    return model


def freeze_encoders(model: FusedModel) -> None:
    """requires_grad=False on every encoder parameter (fusion and head stay trainable).

    The training loop should also keep frozen encoders in eval() so dropout/BatchNorm stay fixed.
    """
    for encoder in (model.text_encoder, model.image_encoder, model.audio_encoder):
        if encoder is not None:
            encoder.requires_grad_(False)


def _hf_image_spec(name: str) -> ImageSpec:
    """Size / mean / std from an HF image processor config available offline, else 224 px ImageNet."""
    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(name, local_files_only=local_files_only())
    except (OSError, ValueError):
        return ImageSpec(size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    size = getattr(processor, "size", None) or {}
    side = size.get("height") or size.get("shortest_edge") or 224
    mean = list(getattr(processor, "image_mean", None) or IMAGENET_MEAN)
    std = list(getattr(processor, "image_std", None) or IMAGENET_STD)
    return ImageSpec(size=int(side), mean=mean, std=std, resample="bicubic" if getattr(processor, "resample", 2) == 3 else "bilinear")


def _hf_audio_spec(name: str) -> AudioSpec:
    """Whisper-style log-mel for an HF audio encoder; the clip length is what its position table allows."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name, local_files_only=local_files_only())
    frames = 2 * getattr(config, "max_source_positions", 1500)
    return AudioSpec(n_mels=getattr(config, "num_mel_bins", 80), max_seconds=frames * 160 / 16_000, log_style="whisper")


def default_preprocess_spec(config: ModelConfig) -> PreprocessSpec:
    modalities = _modalities(config)
    text = image = audio = None
    if "text" in modalities:
        text = TextSpec(max_length=64 if config.text_encoder == "tiny" else 128)
    if "image" in modalities:
        if config.image_encoder == "tiny":
            image = ImageSpec(size=64, mean=[0.5] * 3, std=[0.5] * 3)
        elif config.image_encoder == EFFICIENTNET:
            # TF-Lite scaling (p - 127) / 128 on 0..255 pixels, written for 0..1 pixels
            image = ImageSpec(size=224, mean=[127 / 255] * 3, std=[128 / 255] * 3)
        else:
            image = _hf_image_spec(config.image_encoder)
    if "audio" in modalities:
        if config.audio_encoder == "tiny":
            audio = AudioSpec(sample_rate=16_000, max_seconds=2.0, n_mels=40, n_fft=400, hop_length=160, log_style="db")
        elif config.audio_encoder == WHISPER_TINY:
            # 10 s, not Whisper's 30 s: the encoder's position table is cut to match (3x cheaper)
            audio = AudioSpec(sample_rate=16_000, max_seconds=10.0, n_mels=80, n_fft=400, hop_length=160, log_style="whisper")
        else:
            audio = _hf_audio_spec(config.audio_encoder)
    return PreprocessSpec(text=text, image=image, audio=audio)


def write_tokenizer(config: ModelConfig, directory: Path, corpus: Iterable[str]) -> tuple[Path, int]:
    """Write `directory/tokenizer.json` and return (path, vocab size).

    tiny: a WordPiece tokenizer trained on `corpus`; otherwise the pretrained model's own tokenizer.
    """
    path = Path(directory) / TextSpec().tokenizer_file
    if config.text_encoder == "tiny":
        from models.tokenizer import train_tiny_tokenizer

        tokenizer = train_tiny_tokenizer(corpus)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            resolve_text_name(config.text_encoder), local_files_only=local_files_only()
        ).backend_tokenizer
    tokenizer.save(str(path))
    return path, tokenizer.get_vocab_size()

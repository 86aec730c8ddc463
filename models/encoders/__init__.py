"""Modality encoders. Each is an nn.Module returning `EncoderOutput` and exposing `.output_dim`.

Builders (`build_text_encoder`, `build_image_encoder`, `build_audio_encoder`) take a name
("tiny", a packaged pretrained model, or any Hugging Face name / local directory) and
`pretrained`: False builds the same architecture randomly initialised, for rebuilding a saved run.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch


class EncoderOutput(NamedTuple):
    """sequence [B, T, D]; mask [B, T] bool, True = real token; pooled [B, D]."""

    sequence: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor


def masked_mean(sequence: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of sequence [B, T, D] over the True positions of mask [B, T] -> [B, D] (0 for an all-False row)."""
    weights = mask.to(sequence.dtype).unsqueeze(-1)
    return (sequence * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def all_real(sequence: torch.Tensor) -> torch.Tensor:
    """An all-True mask [B, T] for sequence [B, T, D]; built from the tensor so traced shapes stay dynamic."""
    return torch.ones_like(sequence[..., 0], dtype=torch.bool)


def local_files_only() -> bool:
    """Hub downloads are opt-in: unless HF_HUB_OFFLINE is set to 0, names must resolve to local files."""
    return os.environ.get("HF_HUB_OFFLINE", "1").strip().lower() not in ("0", "false", "no", "off")


from models.encoders.audio import build_audio_encoder  # noqa: E402  (they import the helpers above)
from models.encoders.image import build_image_encoder  # noqa: E402
from models.encoders.text import build_text_encoder  # noqa: E402

__all__ = [
    "EncoderOutput", "masked_mean", "all_real", "local_files_only",
    "build_text_encoder", "build_image_encoder", "build_audio_encoder",
]

"""The fused multimodal model: encoders -> fusion -> head, with the exported tensor contract as its forward."""
from __future__ import annotations

import torch
from torch import nn

from models import contract
from models.encoders import EncoderOutput
from models.spec import Task


class FusedModel(nn.Module):
    """Encoders for the modalities the model uses (None for the others), a fusion and a head.

    Module names (for freezing, LoRA regexes, optimizer groups): `text_encoder`, `image_encoder`,
    `audio_encoder`, `fusion`, `head`.
    """

    def __init__(
        self,
        text_encoder: nn.Module | None,
        image_encoder: nn.Module | None,
        audio_encoder: nn.Module | None,
        fusion: nn.Module,
        head: nn.Module,
        task: Task,
    ):
        super().__init__()
        if text_encoder is None and image_encoder is None and audio_encoder is None:
            raise ValueError("a fused model needs at least one encoder")
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.audio_encoder = audio_encoder
        self.fusion = fusion
        self.head = head
        self.task = task

    @property
    def modalities(self) -> list[str]:
        encoders = {"text": self.text_encoder, "image": self.image_encoder, "audio": self.audio_encoder}
        return [m for m, e in encoders.items() if e is not None]

    @property
    def input_names(self) -> list[str]:
        """The graph inputs in contract order (models/contract.py), for this model's modalities."""
        return contract.input_names(self.modalities)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_present: torch.Tensor | None = None,
        audio_features: torch.Tensor | None = None,
        audio_present: torch.Tensor | None = None,
        audio_frames: torch.Tensor | None = None,
        encoded: dict[str, EncoderOutput] | None = None,
    ) -> torch.Tensor:
        """Contract inputs (int64 [B, T] ids/mask; float32 [B, 3, H, W] pixels; float32 [B, n_mels, F] log-mel;
        int64 [B] valid audio frames; float32 [B] presence) -> logits [B, C] (classify, VQA) or [B, T, C] (NER).

        `encoded`: outputs of frozen encoders computed beforehand (training's feature cache); those
        encoders are skipped and their raw inputs may be None. Never used by the exported graph."""
        outputs = dict(encoded or {})
        if self.text_encoder is not None and "text" not in outputs:
            outputs["text"] = self.text_encoder(input_ids, attention_mask)
        if self.image_encoder is not None and "image" not in outputs:
            outputs["image"] = self.image_encoder(pixel_values)
        if self.audio_encoder is not None and "audio" not in outputs:
            outputs["audio"] = self.audio_encoder(audio_features, audio_frames)
        present = {}
        if self.text_encoder is not None:
            present["text"] = torch.ones_like(outputs["text"].pooled[:, 0])
        if self.image_encoder is not None:
            present["image"] = image_present
        if self.audio_encoder is not None:
            present["audio"] = audio_present
        outputs = {m: outputs[m] for m in self.modalities}  # MODALITIES order, as fusion expects
        return self.head(self.fusion(outputs, present))

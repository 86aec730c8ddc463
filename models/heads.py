"""Task heads over a `FusionOutput`, and their losses.

A head holds one classifier per fusion branch (M = 1 for mixing fusions, one per modality for
late fusion) and returns the branch logits averaged with `FusionOutput.weights`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.fusion import FusionOutput


def _average(branch_logits: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """branch_logits: M tensors [B, ...]; weights [B, M] -> weighted sum [B, ...]."""
    stacked = torch.stack(branch_logits, dim=1)  # [B, M, ...]
    w = weights.reshape(weights.shape + (1,) * (stacked.dim() - 2))
    return (w * stacked).sum(1)


class SequenceClassificationHead(nn.Module):
    """pooled [B, M, H] -> logits [B, C]. Single- vs multi-label is decided by the loss / postprocessing."""

    def __init__(self, hidden_size: int, num_labels: int, branches: int = 1, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifiers = nn.ModuleList(nn.Linear(hidden_size, num_labels) for _ in range(branches))

    def forward(self, fused: FusionOutput) -> torch.Tensor:
        pooled = self.dropout(fused.pooled)
        return _average([c(pooled[:, i]) for i, c in enumerate(self.classifiers)], fused.weights)


class TokenClassificationHead(nn.Module):
    """tokens [B, M, T, H] -> logits [B, T, C] (NER tags per text token)."""

    def __init__(self, hidden_size: int, num_labels: int, branches: int = 1, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifiers = nn.ModuleList(nn.Linear(hidden_size, num_labels) for _ in range(branches))

    def forward(self, fused: FusionOutput) -> torch.Tensor:
        tokens = self.dropout(fused.tokens)
        return _average([c(tokens[:, i]) for i, c in enumerate(self.classifiers)], fused.weights)


class VQAHead(nn.Module):
    """pooled [B, M, H] -> answer logits [B, A], through the usual VQA classifier MLP (Linear, GELU, LayerNorm, Linear)."""

    def __init__(self, hidden_size: int, num_answers: int, branches: int = 1, dropout: float = 0.1):
        super().__init__()
        self.classifiers = nn.ModuleList(
            nn.Sequential(
                nn.Linear(hidden_size, 2 * hidden_size), nn.GELU(), nn.LayerNorm(2 * hidden_size),
                nn.Dropout(dropout), nn.Linear(2 * hidden_size, num_answers),
            )
            for _ in range(branches)
        )

    def forward(self, fused: FusionOutput) -> torch.Tensor:
        return _average([c(fused.pooled[:, i]) for i, c in enumerate(self.classifiers)], fused.weights)


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """logits [B, C]; targets: class ids int64 [B] (single-label) or 0/1 float [B, C] (multi-label)."""
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))
    return F.cross_entropy(logits, targets)


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [B, T, C]; labels int64 [B, T] with -100 on positions to ignore (padding, specials, sub-words)."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def vqa_loss(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """logits [B, A]; soft_targets [B, A] VQA scores in 0..1 (min(#annotators giving it / 3, 1)).

    BCE with logits, averaged over the batch and summed over answers (mean x A), as in the
    bottom-up-attention / LXMERT VQA recipe, so the loss does not shrink as the vocabulary grows.
    """
    return F.binary_cross_entropy_with_logits(logits, soft_targets.to(logits.dtype)) * logits.shape[1]

"""Fusion of per-modality encoder outputs into what a head consumes.

Every fusion first projects each modality's sequence and pooled vector to a common width H
(Linear + LayerNorm, shared between the two). Missing modalities are handled by masks only,
never by Python branches on data, so one exported graph serves every presence pattern.

Interface: `fusion(outputs, present) -> FusionOutput`
  outputs: {modality: EncoderOutput} for the modalities the model uses, in MODALITIES order
  present: {modality: float [B]} (1.0 = record has it; text is always 1.0)
FusionOutput has a branch axis M so that late fusion (one head per modality, logits averaged
over present ones) and the mixing fusions (M = 1) share one head interface:
  pooled [B, M, H], tokens [B, M, T, H] aligned with the text tokens (T = 1 without text),
  weights [B, M], the per-branch weight of the logits (sums to 1 over present branches).
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from models.encoders import EncoderOutput, masked_mean


class FusionOutput(NamedTuple):
    pooled: torch.Tensor  # [B, M, H]
    tokens: torch.Tensor  # [B, M, T, H]
    weights: torch.Tensor  # [B, M]


MAX_POSITIONS = 1024  # media tokens with a learned position (EfficientNet 224 px: 49; Whisper 10 s: 500)


class Projection(nn.Module):
    """[..., D] -> [..., H]: Linear, LayerNorm, dropout. Puts every encoder on the same width and scale."""

    def __init__(self, in_dim: int, hidden_size: int, dropout: float):
        super().__init__()
        self.linear = nn.Linear(in_dim, hidden_size)
        self.norm = nn.LayerNorm(hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.norm(self.linear(x)))


class _ProjectedFusion(nn.Module):
    """Holds one Projection per modality; `project` maps encoder outputs to width H."""

    def __init__(self, input_dims: dict[str, int], hidden_size: int, dropout: float, revision: int = 1):
        super().__init__()
        self.revision = revision
        self.modalities = list(input_dims)
        self.hidden_size = hidden_size
        self.projections = nn.ModuleDict({m: Projection(d, hidden_size, dropout) for m, d in input_dims.items()})
        # A CNN's grid cells and an audio encoder's frames arrive as a bag of tokens: without a position
        # a cross-attending text token cannot tell "the shape on the left" from the one on the right.
        # A learned table per media modality (zeros at start: the fusion begins as without it), cut to
        # the sequence length, so any grid up to MAX_POSITIONS tokens works and traced shapes stay dynamic.
        media = [m for m in input_dims if m != "text"] if revision >= 2 else []
        self.positions = nn.ParameterDict({m: nn.Parameter(torch.zeros(1, MAX_POSITIONS, hidden_size)) for m in media})

    def project(self, outputs: dict[str, EncoderOutput]) -> dict[str, EncoderOutput]:
        projected = {}
        for m, o in outputs.items():
            sequence = self.projections[m](o.sequence)
            if m in self.positions:
                sequence = sequence + self.positions[m][:, : sequence.shape[1]]
            if self.revision >= 3 and m == "image":
                sequence = sequence + grid_positions(int(sequence.shape[1]), int(sequence.shape[2])).to(sequence)
            projected[m] = EncoderOutput(sequence, o.mask, self.projections[m](o.pooled))
        return projected


def grid_positions(tokens: int, hidden_size: int) -> torch.Tensor:
    """Fixed 2-D sine/cosine positions [1, T, H] for a square grid of T = S*S tokens in raster order
    (zeros when T is not a square, e.g. a ViT's class token: only the learned table applies then).

    Why fixed: "is the star on the left?" needs each grid cell to know where it is, and a learned
    table starting at zero did not learn that from ~100 such questions (side questions stayed at
    chance); a fixed encoding gives every cell its column and row from the first step, as in ViT-MAE.
    T is static for an image model (fixed input size), so traced exports hold the table as a constant.
    """
    with warnings.catch_warnings():  # under tracing it is a constant, which is what we want: no warning
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.from_numpy(_grid_table(tokens, hidden_size).copy())  # a fresh tensor: the cache stays intact


@functools.lru_cache(maxsize=8)
def _grid_table(tokens: int, hidden_size: int) -> np.ndarray:
    # cached as numpy, not as a tensor: a tensor made while tracing belongs to that trace
    side = math.isqrt(tokens)
    if side * side != tokens or hidden_size % 4:
        return np.zeros((1, tokens, hidden_size), dtype=np.float32)
    rows, cols = np.meshgrid(np.arange(side, dtype=np.float64), np.arange(side, dtype=np.float64), indexing="ij")
    quarter = hidden_size // 4
    frequencies = 1.0 / (100.0 ** (np.arange(quarter) / quarter))
    parts = []
    for coordinate in (cols.ravel(), rows.ravel()):
        angles = coordinate[:, None] * frequencies[None, :]
        parts += [np.sin(angles), np.cos(angles)]
    return np.concatenate(parts, axis=1)[None].astype(np.float32)


class _ContextTokens(nn.Module):
    """Token sequence for the mixing fusions: each text token plus the fused context vector.

    text [B, T, H] | None, context [B, H] -> [B, T, H] (T = 1, the context itself, without text).
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.context = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, text: torch.Tensor | None, context: torch.Tensor) -> torch.Tensor:
        if text is None:  # static: the model has no text encoder
            return context.unsqueeze(1)
        return self.norm(text + self.context(context).unsqueeze(1))


def _single_branch(pooled: torch.Tensor, tokens: torch.Tensor) -> FusionOutput:
    return FusionOutput(pooled.unsqueeze(1), tokens.unsqueeze(1), torch.ones_like(pooled[:, :1]))


class ConcatFusion(_ProjectedFusion):
    """Concatenate present pooled vectors (absent ones zeroed) and the presence flags -> Linear -> [B, H]."""

    def __init__(self, input_dims: dict[str, int], hidden_size: int, dropout: float = 0.1, revision: int = 1):
        super().__init__(input_dims, hidden_size, dropout, revision)
        n = len(input_dims)
        # revision 2 adds the element-wise product of every pair of modalities: "does the caption fit the
        # picture" is a comparison, which products make (close to) linear, where a concatenation leaves
        # the MLP to discover it from few examples (as [u, v, u*v] in sentence-pair models)
        self.pairs = [(a, b) for i, a in enumerate(self.modalities) for b in self.modalities[i + 1:]] if revision >= 2 else []
        width = (n + len(self.pairs)) * hidden_size + n
        # revision 3 adds a question-guided look at the media tokens (with their grid positions): the pooled
        # text asks, the image/audio tokens answer. Mean pooling keeps what is in a picture but not where
        # or how many ("which side is the star on?" stayed at chance, "how many crosses?" at 0.5), as in
        # the top-down attention of VQA models. Its output and its product with the text join the concat.
        media = [m for m in self.modalities if m != "text"]
        self.readout = _Readout(hidden_size, media, "text" in input_dims, dropout) if revision >= 3 and media else None
        if self.readout is not None:
            width += (2 if "text" in input_dims else 1) * hidden_size
        self.mix = nn.Sequential(nn.Linear(width, hidden_size), nn.GELU(), nn.LayerNorm(hidden_size))
        self.tokens = _ContextTokens(hidden_size)

    def forward(self, outputs: dict[str, EncoderOutput], present: dict[str, torch.Tensor]) -> FusionOutput:
        projected = self.project(outputs)
        flags = torch.stack([present[m] for m in self.modalities], dim=1)  # [B, M]
        parts = {m: projected[m].pooled * present[m].unsqueeze(1) for m in self.modalities}
        products = [parts[a] * parts[b] for a, b in self.pairs]
        if self.readout is not None:
            looked = self.readout(projected, present)  # [B, H]
            products += [looked] + ([looked * parts["text"]] if "text" in parts else [])
        pooled = self.mix(torch.cat(list(parts.values()) + products + [flags], dim=1))
        text = projected["text"].sequence if "text" in projected else None
        return _single_branch(pooled, self.tokens(text, pooled))


class _Readout(nn.Module):
    """One attention query over the media tokens of every present media modality plus a null key.

    projected {m: EncoderOutput [B, T_m, H]}, present {m: [B]} -> [B, H]. The query is the pooled
    text ([B, 1, H]) or, without text, a learned vector; the null key keeps a row with no media
    (or no useful token) well defined.
    """

    def __init__(self, hidden_size: int, media: list[str], has_text: bool, dropout: float, num_heads: int = 4):
        super().__init__()
        self.media = media
        self.null_key = nn.Parameter(torch.randn(1, 1, hidden_size) * 0.02)
        self.query = None if has_text else nn.Parameter(torch.randn(1, 1, hidden_size) * 0.02)
        self.attention = CrossAttention(hidden_size, num_heads, dropout)
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, projected: dict[str, EncoderOutput], present: dict[str, torch.Tensor]) -> torch.Tensor:
        ones = torch.ones_like(projected[self.media[0]].pooled[:, :1])  # [B, 1]
        keys = torch.cat([projected[m].sequence for m in self.media] + [self.null_key * ones.unsqueeze(-1)], dim=1)
        mask = torch.cat([projected[m].mask & (present[m] > 0).unsqueeze(1) for m in self.media] + [ones.bool()], dim=1)
        query = projected["text"].pooled.unsqueeze(1) if self.query is None else self.query * ones.unsqueeze(-1)
        return self.norm(self.attention(query, keys, mask).squeeze(1))


def masked_softmax(scores: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Softmax of scores [B, M] over present [B, M] > 0; all-absent rows give zeros, never NaN."""
    # the dtype's minimum rather than -inf: an all-masked row softmaxes to uniform (finite grads) and is then zeroed
    masked = scores.masked_fill(present <= 0, torch.finfo(scores.dtype).min)
    return torch.softmax(masked, dim=-1) * (present > 0).to(scores.dtype)


class GatedFusion(_ProjectedFusion):
    """Learned per-modality gate scores from each pooled vector, softmax over present modalities -> weighted sum."""

    def __init__(self, input_dims: dict[str, int], hidden_size: int, dropout: float = 0.1, revision: int = 1):
        super().__init__(input_dims, hidden_size, dropout, revision)
        self.gates = nn.ModuleDict({m: nn.Linear(hidden_size, 1) for m in input_dims})
        self.tokens = _ContextTokens(hidden_size)

    def forward(self, outputs: dict[str, EncoderOutput], present: dict[str, torch.Tensor]) -> FusionOutput:
        projected = self.project(outputs)
        pooled = torch.stack([projected[m].pooled for m in self.modalities], dim=1)  # [B, M, H]
        scores = torch.cat([self.gates[m](projected[m].pooled) for m in self.modalities], dim=1)  # [B, M]
        weights = masked_softmax(scores, torch.stack([present[m] for m in self.modalities], dim=1))
        fused = (weights.unsqueeze(-1) * pooled).sum(1)
        text = projected["text"].sequence if "text" in projected else None
        return _single_branch(fused, self.tokens(text, fused))


class CrossAttention(nn.Module):
    """Multi-head attention of queries [B, Tq, H] over keys [B, Tk, H] with key_mask [B, Tk] (True = attend).

    Written out (not nn.MultiheadAttention) so eager, TorchScript and ONNX take the same ops.
    Callers must keep at least one key unmasked per row: onnxruntime gives NaN for an all-masked row.
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (hidden_size // num_heads) ** -0.5
        self.q, self.k, self.v, self.out = (nn.Linear(hidden_size, hidden_size) for _ in range(4))
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, H] -> [B, heads, T, H/heads]
        # reshape from the traced shape, not unflatten: with a single query token (T = 1, static) the ONNX
        # exporter's unflatten baked the example's batch size into the graph
        return x.reshape(x.shape[0], x.shape[1], self.num_heads, -1).transpose(1, 2)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.q(queries)), self._heads(self.k(keys)), self._heads(self.v(keys))
        scores = (q @ k.transpose(-1, -2)) * self.scale  # [B, heads, Tq, Tk]
        scores = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min)
        attended = self.dropout(torch.softmax(scores, dim=-1)) @ v
        return self.out(attended.transpose(1, 2).flatten(2))


class CrossAttentionFusion(_ProjectedFusion):
    """Text tokens attend to image + audio tokens (plus a learned always-visible null key).

    Without text, one learned query token is the query. One post-norm block: residual attention,
    then residual feed-forward, each followed by LayerNorm. pooled = mean over real text tokens.
    """

    def __init__(self, input_dims: dict[str, int], hidden_size: int, dropout: float = 0.1, revision: int = 1,
                 num_heads: int = 4):
        super().__init__(input_dims, hidden_size, dropout, revision)
        self.null_key = nn.Parameter(torch.randn(1, 1, hidden_size) * 0.02)
        if "text" not in input_dims:
            self.query = nn.Parameter(torch.randn(1, 1, hidden_size) * 0.02)
        self.attention = CrossAttention(hidden_size, num_heads, dropout)
        self.norm1 = nn.LayerNorm(hidden_size)
        self.feed_forward = nn.Sequential(
            nn.Linear(hidden_size, 4 * hidden_size), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * hidden_size, hidden_size)
        )
        self.norm2 = nn.LayerNorm(hidden_size)

    def forward(self, outputs: dict[str, EncoderOutput], present: dict[str, torch.Tensor]) -> FusionOutput:
        projected = self.project(outputs)
        media = [m for m in self.modalities if m != "text"]
        any_output = projected[self.modalities[0]]
        batch_ones = torch.ones_like(any_output.pooled[:, :1])  # [B, 1]
        null = self.null_key * batch_ones.unsqueeze(-1)  # [B, 1, H]
        keys = torch.cat([projected[m].sequence for m in media] + [null], dim=1)
        key_mask = torch.cat(
            [projected[m].mask & (present[m] > 0).unsqueeze(1) for m in media] + [batch_ones.bool()], dim=1
        )
        if "text" in projected:  # static
            queries, query_mask = projected["text"].sequence, projected["text"].mask
        else:
            queries, query_mask = self.query * batch_ones.unsqueeze(-1), batch_ones.bool()
        tokens = self.norm1(queries + self.attention(queries, keys, key_mask))
        tokens = self.norm2(tokens + self.feed_forward(tokens))
        return _single_branch(masked_mean(tokens, query_mask), tokens)


class LateFusion(_ProjectedFusion):
    """No mixing: one branch per modality; the head applies one head per branch and averages the
    logits over present modalities. Non-text branches broadcast their pooled vector over the text tokens."""

    def forward(self, outputs: dict[str, EncoderOutput], present: dict[str, torch.Tensor]) -> FusionOutput:
        projected = self.project(outputs)
        pooled = torch.stack([projected[m].pooled for m in self.modalities], dim=1)  # [B, M, H]
        if "text" in projected:  # static
            text = projected["text"].sequence  # [B, T, H]
            tokens = torch.stack(
                [text if m == "text" else projected[m].pooled.unsqueeze(1).expand_as(text) for m in self.modalities], dim=1
            )
        else:
            tokens = pooled.unsqueeze(2)
        flags = torch.stack([present[m] for m in self.modalities], dim=1)
        weights = flags / flags.sum(1, keepdim=True).clamp(min=1.0)
        return FusionOutput(pooled, tokens, weights)


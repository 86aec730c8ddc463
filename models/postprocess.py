"""Scores from logits, computed outside the exported graph (numpy only)."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _floats(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    return x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float32)


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Probabilities along `axis`, same shape and float dtype as `logits` (ints become float32)."""
    logits = _floats(logits)
    shifted = logits - logits.max(axis=axis, keepdims=True)  # no overflow for large logits
    exp = np.exp(shifted)
    return exp / exp.sum(axis=axis, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Element-wise logistic function, stable for large |logits|."""
    logits = _floats(logits)
    exp = np.exp(-np.abs(logits))  # never exp of a large positive number
    return np.where(logits >= 0, 1.0 / (1.0 + exp), exp / (1.0 + exp))


def scores_for(logits: np.ndarray, multi_label: bool) -> np.ndarray:
    """Class probabilities [..., C]: independent sigmoids for multi-label, else a softmax."""
    return sigmoid(logits) if multi_label else softmax(logits, axis=-1)


def top_k(probs: np.ndarray, labels: Sequence[str], k: int) -> list[dict]:
    """The k best classes of one record's probs [C], as [{"label", "score"}] by score descending.

    k is clipped to C; equal scores keep label order.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    probs = np.asarray(probs)
    if probs.shape != (len(labels),):
        raise ValueError(f"expected probs of shape ({len(labels)},), got {probs.shape}")
    order = np.argsort(-probs, kind="stable")[:k].tolist()
    scores = probs.tolist()  # Python floats at once: indexing numpy per class cost more than the sort (a served
    return [{"label": labels[i], "score": scores[i]} for i in order]  # request's profile)

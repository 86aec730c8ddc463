"""Scores and top-k as the API returns them."""
from __future__ import annotations

import numpy as np
import pytest

from models.postprocess import scores_for, sigmoid, softmax, top_k


def test_softmax_is_stable_and_sums_to_one():
    probs = softmax(np.array([[1000.0, 1000.0, -1000.0], [0.0, np.log(3.0), 0.0]], dtype=np.float32))
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs, [[0.5, 0.5, 0.0], [0.2, 0.6, 0.2]], atol=1e-6)
    np.testing.assert_allclose(softmax(np.array([[1, 2], [3, 4]]), axis=0).sum(axis=0), [1.0, 1.0])


def test_sigmoid_is_stable():
    out = sigmoid(np.array([-1000.0, 0.0, np.log(3.0), 1000.0], dtype=np.float32))
    assert out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_allclose(out, [0.0, 0.5, 0.75, 1.0], atol=1e-6)


def test_scores_for_multi_label_and_single_label():
    logits = np.array([2.0, 2.0, -1.0], dtype=np.float32)
    np.testing.assert_allclose(scores_for(logits, multi_label=True), sigmoid(logits))
    assert scores_for(logits, multi_label=False).sum() == pytest.approx(1.0)


def test_top_k_sorted_and_clipped():
    labels = ["cat", "dog", "bird"]
    probs = np.array([0.2, 0.7, 0.1], dtype=np.float32)
    assert top_k(probs, labels, 2) == [
        {"label": "dog", "score": pytest.approx(0.7)},
        {"label": "cat", "score": pytest.approx(0.2)},
    ]
    assert [r["label"] for r in top_k(probs, labels, 10)] == ["dog", "cat", "bird"]
    assert isinstance(top_k(probs, labels, 1)[0]["score"], float)
    assert [r["label"] for r in top_k(np.array([0.5, 0.5, 0.0]), labels, 3)] == ["cat", "dog", "bird"]
    with pytest.raises(ValueError):
        top_k(probs, labels, 0)
    with pytest.raises(ValueError):
        top_k(probs[:2], labels, 1)

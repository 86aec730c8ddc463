"""Metrics against hand-computed examples."""
import numpy as np
import pytest

from training import metrics as M
from training.data import normalize_answer


def test_accuracy_and_macro_f1():
    gold = [0, 0, 1, 1, 2, 2]
    pred = [0, 1, 1, 1, 2, 0]
    out = M.classification_metrics(gold, pred)
    assert out["accuracy"] == pytest.approx(4 / 6)
    # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp2 fp1 fn0 -> 0.8; class 2: tp1 fp0 fn1 -> 2/3
    assert out["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_multilabel():
    gold = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0]])
    pred = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 1]])
    out = M.multilabel_metrics(gold, pred)
    # tp = 4, fp = 1, fn = 1 -> micro f1 = 8 / 10
    assert out["micro_f1"] == pytest.approx(0.8)
    assert out["exact_match"] == pytest.approx(1 / 3)
    # per class: c0 tp2 -> 1.0; c1 tp2 -> 1.0; c2 tp0 fp1 fn1 -> 0
    assert out["macro_f1"] == pytest.approx(2 / 3)


def test_ner_conlleval_semantics():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["I-ORG", "O"]]
    out = M.ner_metrics(gold, pred)
    # gold entities: PER(0,2), LOC(3,4), ORG(0,1); predicted: PER(0,2), ORG(3,4), ORG(0,1) (I- starts one)
    assert out["precision"] == pytest.approx(2 / 3)
    assert out["recall"] == pytest.approx(2 / 3)
    assert out["f1"] == pytest.approx(2 / 3)
    assert out["f1_PER"] == pytest.approx(1.0)
    assert out["f1_LOC"] == pytest.approx(0.0)


def test_ner_partial_span_is_wrong():
    out = M.ner_metrics([["B-PER", "I-PER"]], [["B-PER", "O"]])
    assert out["f1"] == 0.0


def test_vqa_accuracy():
    answers = [["cat", "cat", "kitten"], ["2", "2", "2", "3"], ["red"]]
    preds = ["kitten", "2", "blue"]
    out = M.vqa_metrics(preds, answers)
    assert out["accuracy"] == pytest.approx((1 / 3 + 1.0 + 0.0) / 3)
    assert M.vqa_score("cat", ["cat", "cat"]) == pytest.approx(2 / 3)


def test_normalize_answer():
    assert normalize_answer("The Cat!") == "cat"
    assert normalize_answer("  a  coffee-cup ") == "coffee cup"
    assert normalize_answer("Two") == "2"
    assert normalize_answer("don't") == "don't"


def test_primary_metric():
    assert M.primary_metric("classify") == "accuracy"
    assert M.primary_metric("classify", True) == "micro_f1"
    assert M.primary_metric("ner") == "f1"
    assert M.primary_metric("vqa") == "accuracy"

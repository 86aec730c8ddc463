"""Task metrics (numpy + seqeval, no torch). Every function returns a flat dict of floats.

classify (single-label): accuracy, macro_f1 (unweighted mean of per-class F1 over the classes
    in gold or predictions; a class never predicted and never gold does not count).
classify (multi-label): micro_f1 (over all (record, label) decisions), macro_f1, exact_match
    (subset accuracy), each prediction = sigmoid >= 0.5.
ner: entity-level precision / recall / f1 (micro over entities) with conlleval semantics
    (seqeval default mode: an I-X after O or another type starts a new entity), per-type f1.
vqa: accuracy = mean over records of min(1, #annotators who gave the predicted answer / 3),
    the simple form of the VQA-v2 formula (the official one averages it over the 10 subsets of
    9 of 10 annotators; with 3-5 annotators the simple form is what is used in practice).
    Answers are compared after `training.data.normalize_answer`.

`primary_metric(task, multi_label)` names the dev metric early stopping watches.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np


def primary_metric(task: str, multi_label: bool = False) -> str:
    if task == "classify":
        return "micro_f1" if multi_label else "accuracy"
    if task == "ner":
        return "f1"
    return "accuracy"


def _f1(tp: float, fp: float, fn: float) -> float:
    denom = 2 * tp + fp + fn
    return 0.0 if denom == 0 else 2 * tp / denom


def classification_metrics(gold: Sequence[int], pred: Sequence[int]) -> dict[str, float]:
    gold, pred = np.asarray(gold), np.asarray(pred)
    if len(gold) == 0:
        return {"accuracy": 0.0, "macro_f1": 0.0, "count": 0.0}
    classes = sorted(set(gold.tolist()) | set(pred.tolist()))
    f1s = [_f1(float(np.sum((pred == c) & (gold == c))), float(np.sum((pred == c) & (gold != c))),
               float(np.sum((pred != c) & (gold == c)))) for c in classes]
    return {"accuracy": float(np.mean(gold == pred)), "macro_f1": float(np.mean(f1s)), "count": float(len(gold))}


def multilabel_metrics(gold: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """gold, pred: 0/1 arrays [N, C]."""
    gold, pred = np.asarray(gold).astype(bool), np.asarray(pred).astype(bool)
    if gold.size == 0:
        return {"micro_f1": 0.0, "macro_f1": 0.0, "exact_match": 0.0, "count": 0.0}
    tp, fp, fn = (gold & pred).sum(0), (~gold & pred).sum(0), (gold & ~pred).sum(0)
    used = (gold | pred).any(0)
    macro = [_f1(float(tp[c]), float(fp[c]), float(fn[c])) for c in np.flatnonzero(used)]
    return {
        "micro_f1": _f1(float(tp.sum()), float(fp.sum()), float(fn.sum())),
        "macro_f1": float(np.mean(macro)) if macro else 0.0,
        "exact_match": float(np.mean((gold == pred).all(1))),
        "count": float(len(gold)),
    }


def ner_metrics(gold: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    """Entity-level P/R/F1 (seqeval default = conlleval), plus f1_<TYPE> per entity type."""
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    if not gold:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0, "count": 0.0}
    out = {
        "precision": float(precision_score(gold, pred, zero_division=0)),
        "recall": float(recall_score(gold, pred, zero_division=0)),
        "f1": float(f1_score(gold, pred, zero_division=0)),
        "count": float(len(gold)),
    }
    report = classification_report(gold, pred, output_dict=True, zero_division=0)
    for kind, row in sorted(report.items()):
        if kind not in ("micro avg", "macro avg", "weighted avg"):
            out[f"f1_{kind}"] = float(row["f1-score"])
    return out


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """min(1, #annotators whose (normalised) answer equals the prediction / 3)."""
    return min(1.0, Counter(answers)[prediction] / 3.0)


def vqa_metrics(pred: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    if not pred:
        return {"accuracy": 0.0, "count": 0.0}
    scores = [vqa_score(p, a) for p, a in zip(pred, answers)]
    exact = [float(p == Counter(a).most_common(1)[0][0]) for p, a in zip(pred, answers)]
    return {"accuracy": float(np.mean(scores)), "top_answer_match": float(np.mean(exact)),
            "count": float(len(pred))}

"""Predictions and metrics of a model over preprocessed examples; `mmserve evaluate`.

eval_{split}.json: {"split", "task", "data", "primary_metric", "metrics": {name: float}}.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from models.ner import first_token_predictions
from models.postprocess import scores_for, softmax
from training import metrics as M
from training.data import Example, encode_split, make_collate_fn, read_dataset


def predict_logits(model, examples: list[Example], collate_fn, batch_size: int = 64) -> list[np.ndarray]:
    """Per-example logits (numpy), model in eval mode, no grad."""
    import torch

    was_training = model.training
    model.eval()
    out: list[np.ndarray] = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate_fn(examples[start:start + batch_size])
            batch.pop("labels", None)
            logits = model(**batch)
            logits = getattr(logits, "logits", logits).float().numpy()
            out.extend(logits)
    model.train(was_training)
    return out


def score(task: str, examples: list[Example], logits: list[np.ndarray], labels: Sequence[str],
          multi_label: bool) -> dict[str, float]:
    if task == "classify":
        index = {name: i for i, name in enumerate(labels)}
        if multi_label:
            gold = np.zeros((len(examples), len(labels)), dtype=bool)
            for i, e in enumerate(examples):
                for name in [e.record.target] if isinstance(e.record.target, str) else e.record.target:
                    gold[i, index[name]] = True
            pred = np.stack([scores_for(x, True) >= 0.5 for x in logits]) if logits else gold[:0]
            return M.multilabel_metrics(gold, pred)
        gold_ids = [index[e.record.target] for e in examples]
        return M.classification_metrics(gold_ids, [int(np.argmax(x)) for x in logits])
    if task == "ner":
        gold_tags, pred_tags = [], []
        for e, x in zip(examples, logits):
            words = e.record.tokens
            word_ids = e.features.word_ids or []
            probs = softmax(x[: len(word_ids)], axis=-1)
            ids, _ = first_token_predictions(word_ids, probs, num_words=len(words))
            pred_tags.append([labels[i] if i >= 0 else "O" for i in ids])
            gold_tags.append(list(e.record.target))
        return M.ner_metrics(gold_tags, pred_tags)
    preds = [labels[int(np.argmax(x))] for x in logits]
    return M.vqa_metrics(preds, [e.record.target for e in examples])


def evaluate_examples(model, examples, *, task, labels, multi_label, modalities, spec, pad_id,
                      batch_size: int = 64) -> dict[str, float]:
    collate_fn = make_collate_fn(task, modalities, spec, pad_id, multi_label)
    return score(task, examples, predict_logits(model, examples, collate_fn, batch_size), labels, multi_label)


def write_eval(path: Path, split: str, task: str, data: str, primary: str, values: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"split": split, "task": task, "data": str(data), "primary_metric": primary,
                                "metrics": values}, indent=2) + "\n")
    return path


def evaluate(run_dir: Path, data_dir: Path, split: str = "test", *, output: Path | None = None,
             skip_bad: bool = False, batch_size: int = 64) -> dict[str, float]:
    """Metrics of the run's best model on DATA_DIR/{split}.jsonl; written to RUN_DIR/eval_{split}.json."""
    from models.preprocessing import Preprocessor
    from training.checkpoint import load_run
    from training.data import DataError, read_split

    run = load_run(run_dir)
    mc = run.model_config
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: not found")
    known = set(mc.labels) if mc.task in ("classify", "ner") else None
    records = read_split(path, mc.task, mc.modalities, known=known, skip_bad=skip_bad)
    pre = Preprocessor(run.preprocess, run.directory)
    examples = encode_split(records, mc.task, mc.modalities, pre, mc.labels, mc.multi_label, skip_bad=skip_bad)
    values = evaluate_examples(run.model, examples, task=mc.task, labels=mc.labels, multi_label=mc.multi_label,
                               modalities=mc.modalities, spec=run.preprocess, pad_id=pre.pad_id,
                               batch_size=batch_size)
    primary = M.primary_metric(mc.task, mc.multi_label)
    target = Path(output) if output else Path(run_dir) / f"eval_{split}.json"
    write_eval(target, split, mc.task, str(data_dir), primary, values)
    return values


def format_metrics(values: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" if k != "count" else f"count {int(v)}" for k, v in values.items())


__all__ = ["evaluate", "evaluate_examples", "predict_logits", "score", "write_eval", "format_metrics",
           "read_dataset"]

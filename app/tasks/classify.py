"""Sequence classification (single- or multi-label): top-k `{label, score}`."""
from __future__ import annotations

from pydantic import BaseModel

from app.tasks.base import ScoresTask


class LabelScore(BaseModel):
    label: str
    score: float


class ClassifyResponse(BaseModel):
    model: str
    version: int
    predictions: list[LabelScore]


class Classify(ScoresTask):
    name = "classify"
    response_model = ClassifyResponse
    description = ("Classify one record. Returns the top-k `{label, score}` (softmax, or independent sigmoids "
                   "for multi-label models).")
    example_text = "a short happy song about the sea"
    result_field, label_key = "predictions", "label"


TASK = Classify()

"""Named entity recognition: `{text, type, start, end, score}` with character offsets into the text."""
from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from app.tasks.base import Task, json_rows


class Entity(BaseModel):
    text: str
    type: str
    start: int = Field(description="character offset of the first character in the submitted text")
    end: int = Field(description="character offset one past the last character")
    score: float


class NerResponse(BaseModel):
    model: str
    version: int
    entities: list[Entity]


class Ner(Task):
    name = "ner"
    response_model = NerResponse
    description = ("Named entities of `text`: `{text, type, start, end, score}` with character offsets into the "
                   "submitted text (end exclusive). Words beyond the model's max sequence length are not tagged.")
    example_text = "Alice flew from Paris to Berlin"
    v2_outputs = ("ENTITIES",)

    def encode_text(self, pre: Any, text: str) -> tuple[Any, dict[str, Any]]:
        from models.ner import split_words

        words = split_words(text)
        return pre.encode_words([w.text for w in words]), {"words": words}

    def output_row(self, logits: np.ndarray, index: int, length: int | None) -> np.ndarray:
        return logits[index, :length]  # one row per real token

    def postprocess(self, manifest: Any, meta: dict[str, Any], features: Any, logits: Any, text: str | None,
                    top_k: int) -> dict[str, Any]:
        from models import ner
        from models import postprocess as pp

        words = meta["words"]
        probs = pp.softmax(logits, axis=-1)
        tag_ids, scores = ner.first_token_predictions(features.word_ids, probs, len(words))
        covered = int(np.argmax(tag_ids < 0)) if (tag_ids < 0).any() else len(tag_ids)  # truncation cuts the tail
        tags = [manifest.labels[int(t)] for t in tag_ids[:covered]]
        ents = ner.entities(words, tags, scores[:covered], text)
        return {"entities": [{"text": e["text"], "type": e["type"], "start": int(e["start"]), "end": int(e["end"]),
                              "score": float(e["score"])} for e in ents]}

    def v2_output_metadata(self, manifest: Any) -> list[dict[str, Any]]:
        return [{"name": "ENTITIES", "datatype": "BYTES", "shape": [-1, 1],
                 "parameters": {"content": "JSON string: list of {text, type, start, end, score} per row"}}]

    def v2_output(self, name: str, k: int | None, manifest: Any, logits: list[Any],
                  bodies: list[dict[str, Any]]) -> dict[str, Any]:
        return json_rows(name, [body["entities"] for body in bodies])


TASK = Ner()

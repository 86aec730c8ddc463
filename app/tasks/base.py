"""What every task shares: the request and response models by text field, and the `Task` object whose
subclasses (one module per task in this package) hold everything that differs between tasks.

A task says: its text field (`text` or `question`), its request and response models, how its text is
encoded, which output row an item keeps, its postprocessing, extra input checks, and its Open
Inference Protocol (v2) outputs. Protocol front-ends and the core only call these hooks; none of
them branches on the task name.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from app.core.items import Item


# ------------------------------------------------------------------------------ request models
def _json_integer(value: Any) -> Any:
    """An integer as JSON Schema says it (3 or 3.0), not `true` or "3" (which lax pydantic would take)."""
    if isinstance(value, (bool, str)):
        raise ValueError("must be an integer")
    return value


TopK = Annotated[int, Field(ge=1, le=1000), BeforeValidator(_json_integer)]
TimeoutMs = Annotated[int, Field(gt=0), BeforeValidator(_json_integer)]


class _Item(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str | None = Field(None, description="base64 (or data: URL) of a PNG/JPEG/GIF/WEBP/BMP/TIFF file")
    audio: str | None = Field(None, description="base64 (or data: URL) of a WAV/FLAC/OGG file")
    top_k: TopK | None = Field(None, description="how many labels / answers to return")


class TextItem(_Item):
    text: str | None = Field(None, description="input text (required when the model uses text)")


class QuestionItem(_Item):
    question: str | None = Field(None, description="the question about the image")


class _Options(BaseModel):
    model: str | None = Field(None, description="model name; optional when one model serves the task")
    timeout_ms: TimeoutMs | None = Field(None, description="deadline for this request, at most REQUEST_TIMEOUT_S")


class TextRequest(TextItem, _Options):
    pass


class QuestionRequest(QuestionItem, _Options):
    pass


class TextBatchRequest(_Options):
    model_config = ConfigDict(extra="forbid")
    top_k: TopK | None = Field(None, description="default top_k for every item")
    inputs: list[TextItem] = Field(..., min_length=1)


class QuestionBatchRequest(_Options):
    model_config = ConfigDict(extra="forbid")
    top_k: TopK | None = Field(None, description="default top_k for every item")
    inputs: list[QuestionItem] = Field(..., min_length=1)


# ------------------------------------------------------------------------------ response models
class BatchItemResult(BaseModel):
    model_config = ConfigDict(extra="allow")
    index: int
    status: int = Field(description="HTTP-like status of this item: 200, or the error's status")
    error: dict[str, str] | None = None


class BatchResponse(BaseModel):
    model: str
    version: int
    results: list[BatchItemResult]


# ------------------------------------------------------------------------------ the task object
class Task:
    """One task. Subclasses set the class attributes and override the hooks that differ."""

    name: ClassVar[str]
    text_field: ClassVar[str] = "text"
    text_description: ClassVar[str] = "input text"  # the multipart form field, in OpenAPI
    v2_text_content: ClassVar[str] = "UTF-8 text"  # the v2 TEXT input, in model metadata
    request_model: ClassVar[type[BaseModel]] = TextRequest
    batch_request_model: ClassVar[type[BaseModel]] = TextBatchRequest
    response_model: ClassVar[type[BaseModel]]
    description: ClassVar[str]  # OpenAPI description of the /v1 endpoint
    example_text: ClassVar[str]
    required_media: ClassVar[tuple[str, ...]] = ()  # media the task itself needs, whatever the model says
    v2_outputs: ClassVar[tuple[str, ...]] = ("SCORES",)

    # -- requests ------------------------------------------------------------------------------
    def field_name(self, modality: str) -> str:
        """What the user calls a modality in this task's requests."""
        return self.text_field if modality == "text" else modality

    def check(self, modalities: list[str], item: Item) -> None:
        """Task-specific input checks, after the model's own (raise InvalidInput)."""

    def examples(self, png: str, wav: str) -> dict[str, Any]:
        """OpenAPI request examples (media as base64)."""
        tf, text = self.text_field, self.example_text
        return {"text": {"summary": "text only", "value": {tf: text, "top_k": 3}},
                "text_image_audio": {"summary": "text + image + audio (base64)",
                                     "value": {tf: text, "image": png, "audio": wav, "top_k": 3}}}

    # -- model input and output ----------------------------------------------------------------
    def encode_text(self, pre: Any, text: str) -> tuple[Any, dict[str, Any]]:
        """(Features with input_ids / attention_mask, meta kept for postprocessing)."""
        return pre.encode_text(text), {}

    def output_row(self, logits: np.ndarray, index: int, length: int | None) -> np.ndarray:
        """The part of a batch's logits that belongs to item `index` (`length`: its real token count)."""
        return logits[index]

    def postprocess(self, manifest: Any, meta: dict[str, Any], features: Any, logits: Any, text: str | None,
                    top_k: int) -> dict[str, Any]:
        """The /v1 response body of one item, without model and version."""
        raise NotImplementedError

    # -- Open Inference Protocol (v2) ----------------------------------------------------------
    def v2_output_metadata(self, manifest: Any) -> list[dict[str, Any]]:
        raise NotImplementedError

    def v2_output(self, name: str, k: int | None, manifest: Any, logits: list[Any],
                  bodies: list[dict[str, Any]]) -> dict[str, Any]:
        """One requested output tensor over the rows (`logits` and /v1 `bodies` per row)."""
        raise NotImplementedError


class ScoresTask(Task):
    """A task that answers with scores over the manifest's labels (classification, VQA)."""

    result_field: ClassVar[str]  # "predictions" | "answers"
    label_key: ClassVar[str]  # "label" | "answer"

    def postprocess(self, manifest: Any, meta: dict[str, Any], features: Any, logits: Any, text: str | None,
                    top_k: int) -> dict[str, Any]:
        from models import postprocess as pp

        scores = pp.scores_for(logits, multi_label=manifest.multi_label)
        best = pp.top_k(scores, manifest.labels, min(top_k, len(manifest.labels)))
        return {self.result_field: [{self.label_key: b["label"], "score": b["score"]} for b in best]}

    def v2_output_metadata(self, manifest: Any) -> list[dict[str, Any]]:
        return [{"name": "SCORES", "datatype": "FP32", "shape": [-1, len(manifest.labels)],
                 "parameters": {"content": "sigmoid scores" if manifest.multi_label else "softmax scores",
                                "labels": list(manifest.labels), "classification": True}}]

    def v2_output(self, name: str, k: int | None, manifest: Any, logits: list[Any],
                  bodies: list[dict[str, Any]]) -> dict[str, Any]:
        from models import postprocess as pp

        labels = manifest.labels
        scores = np.stack([pp.scores_for(np.asarray(row), multi_label=manifest.multi_label) for row in logits])
        scores = scores.astype(np.float32)
        if k is None:
            return {"name": name, "datatype": "FP32", "shape": [len(logits), len(labels)],
                    "data": [float(x) for x in scores.reshape(-1)]}
        k = min(k, len(labels))
        data = []
        for row in scores:
            order = np.argsort(-row, kind="stable")[:k]  # equal scores keep label order, as /v1
            data.extend(f"{float(row[j]):f}:{int(j)}:{labels[int(j)]}" for j in order)
        return {"name": name, "datatype": "BYTES", "shape": [len(logits), k], "data": data}


def json_rows(name: str, values: list[Any]) -> dict[str, Any]:
    """A v2 BYTES [-1, 1] output whose rows are JSON strings."""
    return {"name": name, "datatype": "BYTES", "shape": [len(values), 1],
            "data": [json.dumps(v, ensure_ascii=False) for v in values]}

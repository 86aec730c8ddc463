"""Task layer: request bodies -> validated inputs -> Features (thread pool) -> per-task results.

Multipart (`text` / `question`, `image`, `audio` files, `model`, `top_k`, `timeout_ms`) and JSON
(same fields, media as base64 strings, data: URLs accepted) parse into the same `TaskInput`.
"""
from __future__ import annotations

import base64
import binascii
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from app.errors import ApiError, invalid
from app.metrics import Metrics
from app.registry import ModelEntry, Prepared

TASKS = ("classify", "ner", "vqa")
TEXT_FIELD = {"classify": "text", "ner": "text", "vqa": "question"}
DEFAULT_TOP_K = 5


# ------------------------------------------------------------------------------ request models
class _Item(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str | None = Field(None, description="base64 (or data: URL) of a PNG/JPEG/GIF/WEBP/BMP/TIFF file")
    audio: str | None = Field(None, description="base64 (or data: URL) of a WAV/FLAC/OGG file")
    top_k: int | None = Field(None, ge=1, le=1000, description="how many labels / answers to return")


class TextItem(_Item):
    text: str | None = Field(None, description="input text (required when the model uses text)")


class QuestionItem(_Item):
    question: str | None = Field(None, description="the question about the image")


class _Options(BaseModel):
    model: str | None = Field(None, description="model name; optional when one model serves the task")
    timeout_ms: int | None = Field(None, gt=0, description="deadline for this request, at most REQUEST_TIMEOUT_S")


class TextRequest(TextItem, _Options):
    pass


class QuestionRequest(QuestionItem, _Options):
    pass


class TextBatchRequest(_Options):
    model_config = ConfigDict(extra="forbid")
    top_k: int | None = Field(None, ge=1, le=1000, description="default top_k for every item")
    inputs: list[TextItem] = Field(..., min_length=1)


class QuestionBatchRequest(_Options):
    model_config = ConfigDict(extra="forbid")
    top_k: int | None = Field(None, ge=1, le=1000, description="default top_k for every item")
    inputs: list[QuestionItem] = Field(..., min_length=1)


SINGLE_MODEL = {"classify": TextRequest, "ner": TextRequest, "vqa": QuestionRequest}
BATCH_MODEL = {"classify": TextBatchRequest, "ner": TextBatchRequest, "vqa": QuestionBatchRequest}


# ------------------------------------------------------------------------------ response models
class LabelScore(BaseModel):
    label: str
    score: float


class AnswerScore(BaseModel):
    answer: str
    score: float


class Entity(BaseModel):
    text: str
    type: str
    start: int = Field(description="character offset of the first character in the submitted text")
    end: int = Field(description="character offset one past the last character")
    score: float


class ClassifyResponse(BaseModel):
    model: str
    version: int
    predictions: list[LabelScore]


class NerResponse(BaseModel):
    model: str
    version: int
    entities: list[Entity]


class VqaResponse(BaseModel):
    model: str
    version: int
    answers: list[AnswerScore]


class BatchItemResult(BaseModel):
    model_config = ConfigDict(extra="allow")
    index: int
    status: int = Field(description="HTTP-like status of this item: 200, or the error's status")
    error: dict[str, str] | None = None


class BatchResponse(BaseModel):
    model: str
    version: int
    results: list[BatchItemResult]


RESPONSE_MODEL = {"classify": ClassifyResponse, "ner": NerResponse, "vqa": VqaResponse}


# ------------------------------------------------------------------------------ parsing
@dataclass
class TaskInput:
    text: str | None = None
    image: bytes | None = None
    audio: bytes | None = None
    top_k: int | None = None


@dataclass
class Parsed:
    items: list[TaskInput]
    model: str | None = None
    timeout_ms: int | None = None
    top_k: int | None = None
    errors: dict[int, ApiError] = field(default_factory=dict)  # per-item parse errors (batch form)


def _b64(value: str | None, name: str) -> bytes | None:
    if value is None:
        return None
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"'{name}' is not valid base64") from None
    if not data:
        raise invalid(f"'{name}' is empty")
    return data


def _validation_details(exc: ValidationError) -> list[dict[str, Any]]:
    return [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]


async def parse(request: Request, task: str, *, batch: bool, max_upload: int, max_items: int) -> Parsed:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    text_field = TEXT_FIELD[task]
    if ctype == "application/json" or ctype.endswith("+json"):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, "invalid_json", f"body is not valid JSON: {exc}") from None
        model_cls = BATCH_MODEL[task] if batch else SINGLE_MODEL[task]
        try:
            req = model_cls.model_validate(body)
        except ValidationError as exc:
            raise invalid("invalid request body", details=_validation_details(exc)) from None
        if batch:
            if len(req.inputs) > max_items:
                raise invalid(f"at most {max_items} inputs per batch request (MAX_BATCH_ITEMS), got {len(req.inputs)}")
            parsed = Parsed([], req.model, req.timeout_ms, req.top_k)
            for i, item in enumerate(req.inputs):
                try:
                    parsed.items.append(TaskInput(getattr(item, text_field), _b64(item.image, "image"),
                                                  _b64(item.audio, "audio"), item.top_k))
                except ApiError as err:
                    parsed.items.append(TaskInput())
                    parsed.errors[i] = err
            return parsed
        return Parsed([TaskInput(getattr(req, text_field), _b64(req.image, "image"), _b64(req.audio, "audio"),
                                 req.top_k)], req.model, req.timeout_ms, req.top_k)
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded") and not batch:
        return await _parse_form(request, task, max_upload)
    allowed = "application/json" if batch else "multipart/form-data or application/json"
    raise ApiError(415, "unsupported_content_type", f"Content-Type must be {allowed}, got '{ctype or 'none'}'")


async def _parse_form(request: Request, task: str, max_upload: int) -> Parsed:
    text_field = TEXT_FIELD[task]
    allowed = {text_field, "image", "audio", "model", "top_k", "timeout_ms"}
    from starlette.exceptions import HTTPException

    try:
        form = await request.form(max_files=4, max_fields=16, max_part_size=max_upload)
    except HTTPException as exc:  # malformed multipart
        raise ApiError(400, "invalid_multipart", str(exc.detail)) from None
    try:
        unknown = sorted(set(form.keys()) - allowed)
        if unknown:
            raise invalid(f"unknown form field(s) {unknown}; allowed: {sorted(allowed)}")
        values: dict[str, Any] = {}
        for key in allowed:
            got = form.getlist(key)
            if len(got) > 1:
                raise invalid(f"form field '{key}' given {len(got)} times")
            if got:
                values[key] = got[0]
        for key in ("image", "audio"):
            v = values.get(key)
            if isinstance(v, UploadFile):
                data = await v.read()
                values[key] = data or None
            elif isinstance(v, str):  # a text field: accept base64, as in JSON
                values[key] = _b64(v, key) if v else None
        for key in (text_field, "model"):
            v = values.get(key)
            if v is not None and not isinstance(v, str):
                raise invalid(f"form field '{key}' must be text, not a file")
        ints: dict[str, int | None] = {}
        for key, lo in (("top_k", 1), ("timeout_ms", 1)):
            v = values.get(key)
            if v in (None, ""):
                ints[key] = None
                continue
            try:
                ints[key] = int(v)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise invalid(f"form field '{key}' must be an integer") from None
            if ints[key] < lo:  # type: ignore[operator]
                raise invalid(f"form field '{key}' must be >= {lo}")
        top_k = ints["top_k"]
        if top_k is not None and top_k > 1000:
            raise invalid("form field 'top_k' must be <= 1000")
        return Parsed([TaskInput(values.get(text_field), values.get("image"), values.get("audio"), top_k)],
                      values.get("model") or None, ints["timeout_ms"], top_k)
    finally:
        await form.close()


# ------------------------------------------------------------------------------ preprocessing
def check_input(entry: ModelEntry, task: str, inp: TaskInput) -> None:
    assert entry.manifest is not None
    mods = entry.manifest.modality_names
    text_field = TEXT_FIELD[task]
    given = {"text": inp.text is not None, "image": inp.image is not None, "audio": inp.audio is not None}
    extra = [m for m, g in given.items() if g and m not in mods]
    if extra:
        names = [text_field if m == "text" else m for m in extra]
        raise invalid(f"model '{entry.name}' does not take {', '.join(names)} (it takes {mods})")
    if "text" in mods:
        if inp.text is None:
            raise invalid(f"'{text_field}' is required by model '{entry.name}'")
        if not inp.text.strip():
            raise invalid(f"'{text_field}' must not be empty")
    for m in entry.manifest.required_modalities:
        if not given[m]:
            raise invalid(f"'{text_field if m == 'text' else m}' is required by model '{entry.name}'")
    if task == "vqa" and "image" in mods and inp.image is None:
        raise invalid("'image' is required for visual question answering")
    if not any(given[m] for m in mods):
        raise invalid(f"model '{entry.name}' needs at least one of {mods}")


def preprocess(entry: ModelEntry, task: str, inp: TaskInput, metrics: Metrics) -> Prepared:
    """Runs in the preprocessing thread pool. Raises ApiError (MediaError mapped to its status)."""
    from models.media import MediaError
    from models.preprocessing import Features

    pre = entry.preprocessor
    meta: dict[str, Any] = {}
    try:
        f = Features()
        if inp.text is not None:
            t0 = time.perf_counter()
            if task == "ner":
                from models.ner import split_words

                words = split_words(inp.text)
                meta["words"] = words
                f = pre.encode_words([w.text for w in words])
            else:
                f = pre.encode_text(inp.text)
            metrics.preprocess.labels(entry.name, "text").observe(time.perf_counter() - t0)
        if inp.image is not None:
            t0 = time.perf_counter()
            f.pixel_values = pre.image_from_bytes(inp.image)
            metrics.preprocess.labels(entry.name, "image").observe(time.perf_counter() - t0)
        if inp.audio is not None:
            t0 = time.perf_counter()
            f.audio_features = pre.audio_from_bytes(inp.audio)
            metrics.preprocess.labels(entry.name, "audio").observe(time.perf_counter() - t0)
    except MediaError as exc:
        raise ApiError(exc.status, exc.code, exc.message) from None
    length = len(f.input_ids) if f.input_ids is not None else None
    return Prepared(f, length, meta)


# ------------------------------------------------------------------------------ postprocessing
def postprocess(entry: ModelEntry, task: str, prepared: Prepared, logits: Any, text: str | None,
                top_k: int) -> dict[str, Any]:
    from models import postprocess as pp

    m = entry.manifest
    assert m is not None
    base = {"model": entry.name, "version": entry.version}
    if task == "ner":
        from models import ner

        words = prepared.meta["words"]
        probs = pp.softmax(logits, axis=-1)
        tag_ids, scores = ner.first_token_predictions(prepared.features.word_ids, probs, len(words))
        covered = int(np.argmax(tag_ids < 0)) if (tag_ids < 0).any() else len(tag_ids)  # truncation cuts the tail
        tags = [m.labels[int(t)] for t in tag_ids[:covered]]
        ents = ner.entities(words, tags, scores[:covered], text)
        return {**base, "entities": [_entity(e) for e in ents]}
    scores = pp.scores_for(logits, multi_label=m.multi_label)
    best = pp.top_k(scores, m.labels, top_k)
    if task == "classify":
        return {**base, "predictions": [{"label": b["label"], "score": b["score"]} for b in best]}
    return {**base, "answers": [{"answer": b["label"], "score": b["score"]} for b in best]}


def _entity(e: dict[str, Any]) -> dict[str, Any]:
    return {"text": e["text"], "type": e["type"], "start": int(e["start"]), "end": int(e["end"]),
            "score": float(e["score"])}


def effective_top_k(entry: ModelEntry, requested: int | None) -> int:
    assert entry.manifest is not None
    n = len(entry.manifest.labels)
    return max(1, min(requested or DEFAULT_TOP_K, n))

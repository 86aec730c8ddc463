"""HTTP routes: /v1 task endpoints (multipart or JSON, plus a JSON batch form), model listing, probes, metrics."""
from __future__ import annotations

import base64
import io
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.errors import ApiError, openapi_errors
from app.registry import ModelEntry
from app.service import ItemOutcome, Service
from app.tasks import BATCH_MODEL, RESPONSE_MODEL, SINGLE_MODEL, TEXT_FIELD, BatchResponse, parse

router = APIRouter()


def _example_media() -> tuple[str, str]:
    """A real 16x16 PNG and a 0.25 s WAV, base64, so the /docs examples work as they are."""
    from PIL import Image
    import soundfile as sf

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format="PNG")
    png = base64.b64encode(buf.getvalue()).decode()
    buf = io.BytesIO()
    t = np.arange(4000) / 16000
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000, format="WAV", subtype="PCM_16")
    return png, base64.b64encode(buf.getvalue()).decode()


_PNG, _WAV = _example_media()


def _examples(task: str) -> dict[str, Any]:
    tf = TEXT_FIELD[task]
    text = {"classify": "a short happy song about the sea", "ner": "Alice flew from Paris to Berlin",
            "vqa": "what colour is the square?"}[task]
    ex: dict[str, Any] = {}
    if task != "vqa":
        ex["text"] = {"summary": "text only", "value": {tf: text, "top_k": 3}}
    ex["text_image_audio"] = {"summary": "text + image + audio (base64)",
                              "value": {tf: text, "image": _PNG, "audio": _WAV, "top_k": 3}}
    if task == "vqa":
        ex["text_image"] = {"summary": "question + image (base64)", "value": {tf: text, "image": _PNG}}
    return ex


def _request_body(task: str) -> dict[str, Any]:
    tf = TEXT_FIELD[task]
    schema = SINGLE_MODEL[task].model_json_schema()
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {
            "type": "object",
            "properties": {
                tf: {"type": "string", "description": "input text" if tf == "text" else "the question"},
                "image": {"type": "string", "format": "binary", "description": "image file (PNG, JPEG, ...)"},
                "audio": {"type": "string", "format": "binary", "description": "audio file (WAV, FLAC, OGG)"},
                "model": {"type": "string", "description": "model name (optional when one model serves the task)"},
                "top_k": {"type": "integer", "minimum": 1},
                "timeout_ms": {"type": "integer", "minimum": 1},
            }}},
        "application/json": {"schema": schema, "examples": _examples(task)},
    }}}


async def _handle(request: Request, task: str, *, batch: bool) -> Response:
    """Both forms of a task endpoint: parse, pick the model, run every item, answer, account."""
    svc: Service = request.app.state.service
    endpoint = f"/v1/{task}/batch" if batch else f"/v1/{task}"
    started, t_mono = time.perf_counter(), time.monotonic()
    svc.enter(endpoint)
    model_label, status = "", 500
    try:
        parsed = await parse(request, task, batch=batch, max_upload=svc.settings.max_upload_bytes,
                             max_items=svc.settings.max_batch_items)
        entry = svc.registry.choose(task, parsed.model)
        model_label = entry.name
        deadline = svc.deadline(t_mono, parsed.timeout_ms)
        outs = await svc.run_items(request, task, entry, parsed.items, parsed.top_k, deadline, parsed.errors)
        response = _batch_response(entry, outs) if batch else _single_response(entry, outs[0])
        status = 200
        return response
    except ApiError as err:
        status = err.status
        return err.response()
    finally:
        svc.leave(endpoint, model_label, status, started)


def _single_response(entry: ModelEntry, out: ItemOutcome) -> Response:
    if out.error is not None:
        raise out.error
    assert out.result is not None
    r = out.result
    return JSONResponse(out.body, headers={
        "x-model": f"{entry.name}:{entry.version}", "x-batch-size": str(r.batch_size),
        "x-preprocess-time": f"{out.preprocess_s * 1000:.3f}", "x-queue-time": f"{r.queue_seconds * 1000:.3f}",
        "x-inference-time": f"{r.inference_seconds * 1000:.3f}"})


def _batch_response(entry: ModelEntry, outs: list[ItemOutcome]) -> Response:
    results = []
    for i, oc in enumerate(outs):
        if oc.error is not None:
            results.append({"index": i, "status": oc.error.status, **oc.error.body()})
        else:
            body = dict(oc.body or {})
            body.pop("model", None)
            body.pop("version", None)
            results.append({"index": i, "status": 200, **body})
    return JSONResponse({"model": entry.name, "version": entry.version, "results": results})


_DESCRIPTIONS = {
    "classify": "Classify one record. Returns the top-k `{label, score}` (softmax, or independent sigmoids "
                "for multi-label models).",
    "ner": "Named entities of `text`: `{text, type, start, end, score}` with character offsets into the "
           "submitted text (end exclusive). Words beyond the model's max sequence length are not tagged.",
    "vqa": "Answer `question` about `image` (audio optional when the model takes it): top-k `{answer, score}`.",
}


def _add_task_routes(task: str) -> None:
    async def single(request: Request) -> Response:
        return await _handle(request, task, batch=False)

    async def batch(request: Request, body: Any = Body(..., openapi_examples={
            "two_items": {"summary": "two items, each answered independently",
                          "value": {"inputs": [v["value"] for v in _examples(task).values()][:2]}}})) -> Response:
        return await _handle(request, task, batch=True)

    batch.__annotations__ = {"request": Request, "body": BATCH_MODEL[task], "return": Response}
    single.__annotations__ = {"request": Request, "return": Response}

    errs = openapi_errors(400, 401, 404, 413, 415, 422, 503, 504, 500)
    router.add_api_route(f"/v1/{task}", single, methods=["POST"], tags=["inference"], summary=f"{task} (one record)",
                         description=_DESCRIPTIONS[task] + " Send `multipart/form-data` (files as uploads) or JSON "
                         "(files as base64).", response_model=RESPONSE_MODEL[task], responses=errs,
                         openapi_extra=_request_body(task), name=f"{task}")
    router.add_api_route(f"/v1/{task}/batch", batch, methods=["POST"], tags=["inference"],
                         summary=f"{task} (JSON batch)", description="Several records in one request. Each item "
                         "succeeds or fails on its own: the response is 200 with one result per input, in order, "
                         "each with its own `status` (and `error` when it failed).",
                         response_model=BatchResponse, responses=errs, name=f"{task}_batch")


for _task in ("classify", "ner", "vqa"):
    _add_task_routes(_task)


@router.get("/v1/models", tags=["models"], summary="Served models and their state")
async def list_models(request: Request) -> dict[str, Any]:
    reg = request.app.state.service.registry
    return {"models": [e.describe() for e in reg.entries.values()]}


@router.get("/v1/models/{name}", tags=["models"], summary="One model: manifest metadata, labels, tensors, "
            "device, provider, backend, state", responses=openapi_errors(404))
async def get_model(name: str, request: Request) -> Response:
    reg = request.app.state.service.registry
    entry = reg.entries.get(name)
    if entry is None:
        return ApiError(404, "model_not_found", f"no model named '{name}'; available: {sorted(reg.entries)}").response()
    return JSONResponse(entry.describe(detail=True))


@router.get("/healthz", tags=["probes"], summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["probes"], summary="Readiness: models loaded and warm",
            description="200 once every model has been tried and at least one is ready (failed models are "
            "listed under `failed`; with STRICT_READINESS any failed model keeps it 503). 503 while loading, "
            "when nothing could load, and while shutting down.")
async def readyz(request: Request) -> Response:
    ok, body = request.app.state.service.registry.readiness()
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics", tags=["probes"], summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


__all__ = ["router"]

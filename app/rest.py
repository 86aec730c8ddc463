"""REST front-end (/v1): task endpoints (multipart or JSON, plus a JSON batch form), the model listing,
probes and metrics. Maps the core's errors to HTTP statuses and the `{"error": {...}}` shape."""
from __future__ import annotations

import base64
import io
import json
from typing import Any, Callable, Coroutine

import numpy as np
from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.core.errors import InvalidJson, QueueFull, ServingError
from app.core.jsonbody import parse_json
from app.core.loading import ModelEntry
from app.core.service import ItemOutcome, Service
from app.errors import ApiError, api_error, openapi_errors
from app.rest_parsing import parse
from app.tasks import TASKS, Task
from app.tasks.base import BatchResponse


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


class Health(BaseModel):
    status: str = Field(description="always `ok`: the process answers")


class Readiness(BaseModel):
    ready: bool
    models: dict[str, str] = Field(description="state of each model (pending, loading, ready, failed...)")
    failed: dict[str, str | None] = Field(description="the reason of each failed model")
    draining: bool | None = Field(None, description="present (true) once shutdown has begun")
    unhealthy: dict[str, str] | None = Field(None, description="present while a model is hung (timeouts in a row, "
                                             "UNHEALTHY_AFTER_TIMEOUTS): the reason of each; readiness is 503")


def _request_body(task: Task) -> dict[str, Any]:
    tf = task.text_field
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {
            "type": "object",
            "properties": {
                tf: {"type": "string", "description": task.text_description},
                "image": {"type": "string", "format": "binary", "description": "image file (PNG, JPEG, ...)"},
                "audio": {"type": "string", "format": "binary", "description": "audio file (WAV, FLAC, OGG)"},
                "model": {"type": "string", "description": "model name (optional when one model serves the task)"},
                "top_k": {"type": "integer", "minimum": 1},
                "timeout_ms": {"type": "integer", "minimum": 1},
            }}},
        "application/json": {"schema": task.request_model.model_json_schema(),
                             "examples": task.examples(_PNG, _WAV)},
    }}}


class _BadJsonBody(StarletteHTTPException):
    """Raised from `_JsonRequest.json`: an HTTPException, so FastAPI's body reading lets it through untouched."""

    def __init__(self, message: str):
        super().__init__(400, message)
        self.message = message


class _JsonRequest(Request):
    """FastAPI reads a declared JSON body (the /batch routes) with `request.json()`: this parses it as every route
    does (`parse_json`), so JSON the parser cannot take is the same 400 `invalid_json` everywhere."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = parse_json(await self.body())
            except InvalidJson as exc:
                raise _BadJsonBody(exc.message) from None
        return self._json


class JsonRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route_handler(request: Request) -> Response:
            try:
                return await handler(_JsonRequest(request.scope, request.receive))
            except _BadJsonBody as exc:
                return ApiError(400, "invalid_json", exc.message).response()

        return route_handler


async def wait_disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _RawJsonResponse(Response):
    """A 200 JSON answer with its header list built directly (JSONResponse's bytes and headers, in the same order,
    without a headers mapping per response)."""

    media_type = "application/json"

    def __init__(self, content: Any, headers: list[tuple[bytes, bytes]]):
        self.status_code = 200
        self.background = None
        self.body = json.dumps(content, ensure_ascii=False, allow_nan=False, indent=None,
                               separators=(",", ":")).encode("utf-8")
        self.raw_headers = [*headers, (b"content-length", str(len(self.body)).encode()),
                            (b"content-type", b"application/json")]


def _single_response(entry: ModelEntry, out: ItemOutcome) -> Response:
    if out.error is not None:
        raise out.error
    assert out.result is not None
    r = out.result
    return _RawJsonResponse(out.body, [
        (b"x-model", f"{entry.name}:{entry.version}".encode("latin-1")), (b"x-batch-size", b"%d" % r.batch_size),
        (b"x-preprocess-time", b"%.3f" % (out.preprocess_s * 1000)),
        (b"x-queue-time", b"%.3f" % (r.queue_seconds * 1000)),
        (b"x-inference-time", b"%.3f" % (r.inference_seconds * 1000))])


def _batch_response(entry: ModelEntry, outs: list[ItemOutcome]) -> Response:
    results = []
    for i, oc in enumerate(outs):
        if oc.error is not None:
            err = api_error(oc.error)
            results.append({"index": i, "status": err.status, **err.body()})
        else:
            body = dict(oc.body or {})
            body.pop("model", None)
            body.pop("version", None)
            results.append({"index": i, "status": 200, **body})
    return JSONResponse({"model": entry.name, "version": entry.version, "results": results})


def describe(entry: ModelEntry, detail: bool = False) -> dict[str, Any]:
    """A model as /v1/models lists it (`detail`: as /v1/models/{name} shows it)."""
    rt = entry.runtime
    out: dict[str, Any] = {
        "name": entry.name,
        "version": entry.version,
        "task": entry.task,
        "state": entry.state,
        "reason": entry.reason,
        "backend": rt.backend if rt else None,
        "device": rt.device if rt else None,
        "provider": rt.provider if rt else None,
        "max_batch_size": entry.max_batch_size,
        "batch_size_source": entry.batch_size_source,
    }
    m = entry.manifest
    if m is not None:
        out.update(
            modalities=[mi.model_dump() for mi in m.modalities],
            multi_label=m.multi_label,
            num_labels=len(m.labels),
        )
    if detail and m is not None:
        out.update(
            labels=m.labels,
            inputs=[t.model_dump() for t in m.inputs],
            outputs=[t.model_dump() for t in m.outputs],
            preprocessing=m.preprocessing.model_dump(),
            formats={k: v.model_dump() for k, v in m.formats.items()},
            metrics=m.metrics,
            parity=[p.model_dump() for p in m.parity],
            created_at=m.created_at,
            source_run=m.source_run,
            package_version=m.package_version,
            load_seconds=entry.load_seconds,
            warmup_seconds=entry.warmup_seconds,
            batch_calibration=({str(k): round(v, 2) for k, v in entry.batch_calibration.items()}
                               if entry.batch_calibration else None),
            queue_depth=entry.batcher.depth if entry.batcher else 0,
        )
    return out


async def _handle(service: Service, request: Request, task: Task, *, batch: bool, max_upload: int,
                  max_items: int) -> Response:
    """Both forms of a task endpoint: parse, pick the model, run every item, answer."""
    with service.call(f"/v1/{task.name}/batch" if batch else f"/v1/{task.name}") as call:
        try:
            parsed = await parse(request, task, batch=batch, max_upload=max_upload, max_items=max_items)
            entry = service.registry.choose(task.name, parsed.model)
            call.model = entry.name
            good = [i for i in range(len(parsed.items)) if i not in parsed.errors]  # parse errors fail alone
            ran = await service.run_items(request.scope.get("state", {}).get("request_id", "-"),
                                          lambda: wait_disconnect(request), task, entry,
                                          [parsed.items[i] for i in good], service.deadline(call, parsed.timeout_ms))
            outs = [ItemOutcome(error=parsed.errors.get(i)) for i in range(len(parsed.items))]
            for i, out in zip(good, ran):
                outs[i] = out
            response = _batch_response(entry, outs) if batch else _single_response(entry, outs[0])
            call.status = 200
            return response
        except (ServingError, ApiError) as exc:
            err = api_error(exc) if isinstance(exc, ServingError) else exc
            call.status = err.status
            return err.response()


async def _refuse_early(service: Service, request: Request, task: Task, refusal: QueueFull) -> Response:
    """503 + Retry-After for a request that arrived with every model of its task full (`Service.refuse_early`):
    its body is read and dropped unparsed (left unread, the connection could not carry the next request)."""
    with service.call(f"/v1/{task.name}") as call:
        call.model = refusal.model
        err = api_error(refusal)
        call.status = err.status
        await discard_body(request)
        return err.response()


async def discard_body(request: Request) -> None:
    """Read the request's body and drop it (a client that hangs up meanwhile ends it)."""
    try:
        async for _ in request.stream():
            pass
    except ClientDisconnect:
        pass


class TaskFastPath:
    """`POST /v1/{task}` (the single-record form) answered in front of FastAPI (`ServingApp` in app/main.py).

    The app's own middlewares (request id, access log and last-resort 500; API keys; body limit) wrap this exactly as
    they wrap every route, and it answers with the same handler the route has. What it skips is FastAPI's part of
    the way, for these routes only: its error, telemetry and body-limit middlewares, the v2 error shape (never
    applies to /v1), the exception middleware, the router's walk over every route, and the route's request/response
    and endpoint wrappers. Profiles of a served request put FastAPI's part at about a sixth of the event loop's CPU,
    and of a refused one (an overloaded server, `Service.refuse_early`) at about a fifth. The handler catches the
    core's and the API's errors itself (as on the route); anything else escapes to the request-context middleware's
    generic 500 (as on the route, where no handler is registered for it)."""

    def __init__(self, routes: dict[str, Callable[[Request], Coroutine[Any, Any, Response]]]):
        self.routes = routes
        self.paths = frozenset(routes)

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        response = await self.routes[scope["path"]](Request(scope, receive, send))
        await response(scope, receive, send)


def fast_routes(service: Service, *, max_upload_bytes: int, max_batch_items: int
                ) -> dict[str, Callable[[Request], Coroutine[Any, Any, Response]]]:
    """The single-record task routes' handlers by path, for `TaskFastPath` (the same as `build_router`'s)."""
    def handler(task: Task) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        async def single(request: Request) -> Response:
            refusal = service.refuse_early(task=task.name)
            if refusal is not None:
                return await _refuse_early(service, request, task, refusal)
            return await _handle(service, request, task, batch=False, max_upload=max_upload_bytes,
                                 max_items=max_batch_items)
        return single

    return {f"/v1/{task.name}": handler(task) for task in TASKS.values()}


def build_router(service: Service, *, max_upload_bytes: int, max_batch_items: int) -> APIRouter:
    """The /v1 routes, the probes and /metrics, over `service`."""
    router = APIRouter(route_class=JsonRoute)
    registry = service.registry

    def add_task_routes(task: Task) -> None:
        async def single(request: Request) -> Response:
            return await _handle(service, request, task, batch=False, max_upload=max_upload_bytes,
                                 max_items=max_batch_items)

        async def batch(request: Request, body: Any = Body(..., openapi_examples={
                "two_items": {"summary": "two items, each answered independently",
                              "value": {"inputs": [v["value"] for v in task.examples(_PNG, _WAV).values()][:2]}}})
                        ) -> Response:
            return await _handle(service, request, task, batch=True, max_upload=max_upload_bytes,
                                 max_items=max_batch_items)

        batch.__annotations__ = {"request": Request, "body": task.batch_request_model, "return": Response}
        single.__annotations__ = {"request": Request, "return": Response}

        errs = openapi_errors(400, 401, 404, 413, 415, 422, 503, 504, 500)
        router.add_api_route(f"/v1/{task.name}", single, methods=["POST"], tags=["inference"],
                             summary=f"{task.name} (one record)", description=task.description +
                             " Send `multipart/form-data` (files as uploads) or JSON (files as base64).",
                             response_model=task.response_model, responses=errs,
                             openapi_extra=_request_body(task), name=task.name)
        router.add_api_route(f"/v1/{task.name}/batch", batch, methods=["POST"], tags=["inference"],
                             summary=f"{task.name} (JSON batch)", description="Several records in one request. "
                             "Each item succeeds or fails on its own: the response is 200 with one result per "
                             "input, in order, each with its own `status` (and `error` when it failed).",
                             response_model=BatchResponse, responses=errs, name=f"{task.name}_batch")

    for task in TASKS.values():
        add_task_routes(task)

    @router.get("/v1/models", tags=["models"], summary="Served models and their state",
                responses=openapi_errors(401))
    async def list_models() -> dict[str, Any]:
        return {"models": [describe(e) for e in registry.entries.values()]}

    @router.get("/v1/models/{name}", tags=["models"], summary="One model: manifest metadata, labels, tensors, "
                "device, provider, backend, state", responses=openapi_errors(401, 404, 422))
    async def get_model(name: str) -> Response:
        entry = registry.entries.get(name)
        if entry is None:
            return ApiError(404, "model_not_found",
                            f"no model named '{name}'; available: {sorted(registry.entries)}").response()
        return JSONResponse(describe(entry, detail=True))

    @router.get("/healthz", tags=["probes"], summary="Liveness: the process answers", response_model=Health)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz", tags=["probes"], summary="Readiness: models loaded and warm",
                description="200 once every model has been tried and at least one is ready (failed models are "
                "listed under `failed`; with STRICT_READINESS any failed model keeps it 503). 503 while loading, "
                "when nothing could load, and while shutting down (`draining`).", response_model=Readiness,
                responses={503: {"description": "Not ready (the same body)",
                                 "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Readiness"}}}}})
    async def readyz() -> Response:
        ok, body = registry.readiness()
        return JSONResponse(body, status_code=200 if ok else 503)

    @router.get("/metrics", tags=["probes"], summary="Prometheus metrics", response_class=Response,
                responses={200: {"description": "Prometheus text exposition format",
                                 "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router


__all__ = ["TaskFastPath", "build_router", "describe", "fast_routes"]

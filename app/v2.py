"""Open Inference Protocol (KServe v2 / Triton HTTP), JSON form.

Endpoints (`/versions/{v}` optional wherever a model is named; only the loaded version is served):
  GET  /v2                                  server metadata {name, version, extensions}
  GET  /v2/health/live, /v2/health/ready    200, or 400 when not live / not ready (as Triton)
  GET  /v2/models/{m}                       model metadata {name, versions, platform, inputs, outputs}
  GET  /v2/models/{m}/ready                 200, or 400 when the model is not ready
  POST /v2/models/{m}/infer                 inference (JSON tensors)

Tensor mapping (every model, whatever its task):
  inputs   TEXT   BYTES [-1, 1]  UTF-8 text (for VQA: the question); only when the model uses text
           IMAGE  BYTES [-1, 1]  the encoded image file (PNG/JPEG/...) as a base64 string; only when the
                                 model takes images
           AUDIO  BYTES [-1, 1]  the encoded audio file (WAV/FLAC/OGG) as a base64 string; only when the
                                 model takes audio
           An optional input may be left out, or carry "" for the rows that have no such media.
  outputs  SCORES   FP32 [-1, num_labels]  classify / vqa: class probabilities in label order (softmax, or
                                           sigmoids for multi-label); classification extension:
                                           {"name": "SCORES", "parameters": {"classification": K}} gives
                                           BYTES [-1, K] "score:index:label", best first
           ENTITIES BYTES [-1, 1]          ner: per row a JSON string of the entity list, as /v1/ner returns

Each row goes through the same path as /v1 (`Service.run_items`): same batching, deadlines, metrics and
error checks. The request fails as a whole when any row fails (the first row's error is returned).
Errors are `{"error": "message"}` (400 for bad requests, 404 unknown model, 503/504 overload and
deadline). The binary tensor extension is not supported: a request with `Inference-Header-Content-Length`
gets 400; binary outputs requested by parameters are answered as JSON (whole body JSON, no header), which
tritonclient reads as well.
"""
from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.core.errors import ServingError
from app.core.items import Item, decode_b64
from app.core.jsonbody import parse_json
from app.core.loading import ModelEntry
from app.core.registry import Registry
from app.core.service import Service
from app.rest import wait_disconnect
from app.tasks import get_task

INPUT_NAMES = {"text": "TEXT", "image": "IMAGE", "audio": "AUDIO"}
PLATFORMS = {"onnx": "onnxruntime_onnx", "torchscript": "pytorch_libtorch"}
EXTENSIONS = ["classification"]
INFER_ENDPOINT = "/v2/models/{model}/infer"  # metrics label (bounded cardinality)
# v2 status of the core's errors: request faults are 400 except these; 5xx keep theirs (and Retry-After)
STATUS = {"model_not_found": 404, "no_model_for_task": 404, "media_too_large": 413, "unsupported_media_type": 415,
          "model_failed": 503, "not_ready": 503, "overloaded": 503, "timeout": 504, "inference_failed": 500,
          "internal_error": 500}


class V2Error(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.message}, status_code=self.status, headers=self.headers)


def _from_core(err: ServingError) -> V2Error:
    headers = {"Retry-After": str(err.retry_after)} if err.retry_after is not None else None
    return V2Error(STATUS.get(err.code, 400), err.message, headers)


# ------------------------------------------------------------------------------------ metadata
def model_metadata(entry: ModelEntry, platform: str) -> dict[str, Any]:
    m = entry.manifest
    if m is None:
        raise V2Error(400, f"model '{entry.name}' has no readable manifest: {entry.reason}")
    task = get_task(m.task)
    inputs = []
    for mod in m.modalities:
        if mod.name == "text":
            what = task.v2_text_content
        elif mod.name == "image":
            what = "encoded image file (PNG/JPEG/GIF/WEBP/BMP/TIFF) as a base64 string in JSON"
        else:
            what = "encoded audio file (WAV/FLAC/OGG) as a base64 string in JSON"
        optional = not (mod.required or mod.name == "text" or mod.name in task.required_media)
        inputs.append({"name": INPUT_NAMES[mod.name], "datatype": "BYTES", "shape": [-1, 1],
                       "parameters": {"content": what, "optional": optional}})
    return {"name": entry.name, "versions": [str(entry.version)], "platform": platform,
            "inputs": inputs, "outputs": task.v2_output_metadata(m),
            "parameters": {"task": m.task, "max_batch_size": entry.max_batch_size, "state": entry.state}}


# ------------------------------------------------------------------------------------ inference request
def _flatten(data: Any) -> list[Any]:
    if isinstance(data, list):
        out: list[Any] = []
        for x in data:
            out.extend(_flatten(x))
        return out
    return [data]


def _parse_inputs(entry: ModelEntry, body: dict[str, Any], max_items: int) -> list[Item]:
    assert entry.manifest is not None
    mods = entry.manifest.modality_names
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise V2Error(400, "'inputs' must be a non-empty list of tensors")
    columns: dict[str, list[Any]] = {}
    batch: int | None = None
    for t in inputs:
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise V2Error(400, "each input must be an object with a 'name'")
        name = t["name"]
        expected = [INPUT_NAMES[m] for m in mods]
        if name not in expected:
            raise V2Error(400, f"unexpected input '{name}' for model '{entry.name}'; its inputs are {expected}")
        if name in columns:
            raise V2Error(400, f"input '{name}' given twice")
        if (t.get("parameters") or {}).get("binary_data_size") is not None:
            raise V2Error(400, "binary tensor extension not supported: send the input's data as JSON")
        if t.get("datatype") != "BYTES":
            raise V2Error(400, f"input '{name}' must have datatype BYTES, got {t.get('datatype')!r}")
        shape = t.get("shape")
        if (not isinstance(shape, list) or not shape or len(shape) > 2
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
                or (len(shape) == 2 and shape[1] != 1)):
            raise V2Error(400, f"input '{name}' must have shape [batch, 1] (or [batch]), got {shape!r}")
        if "data" not in t:
            raise V2Error(400, f"input '{name}' has no 'data'")
        data = _flatten(t["data"])
        if len(data) != shape[0]:
            raise V2Error(400, f"input '{name}' has {len(data)} elements, shape {shape} needs {shape[0]}")
        if not all(isinstance(x, str) for x in data):
            raise V2Error(400, f"input '{name}' data must be strings (BYTES in JSON)")
        if batch is None:
            batch = shape[0]
        elif shape[0] != batch:
            raise V2Error(400, f"inputs disagree on the batch size: '{name}' has {shape[0]}, expected {batch}")
        columns[name] = data
    assert batch is not None
    if batch < 1:
        raise V2Error(400, "batch size must be at least 1")
    if batch > max_items:
        raise V2Error(400, f"at most {max_items} rows per request (MAX_BATCH_ITEMS), got {batch}")
    items = []
    n_labels = len(entry.manifest.labels)  # /v1 bodies are not returned: keep every label
    for i in range(batch):
        text = columns["TEXT"][i] if "TEXT" in columns else None
        media: dict[str, bytes | None] = {}
        for key in ("IMAGE", "AUDIO"):
            value = columns[key][i] if key in columns else None
            try:
                media[key] = decode_b64(value, key) if value else None
            except ServingError as err:
                raise V2Error(400, f"row {i}: {err.message}") from None
        items.append(Item(text, media["IMAGE"], media["AUDIO"], n_labels))
    return items


def _requested_outputs(names: tuple[str, ...], entry: ModelEntry, body: dict[str, Any]) -> list[tuple[str, int | None]]:
    """[(name, classification K or None)]; all outputs when the request names none."""
    req = body.get("outputs")
    if req is None:
        return [(n, None) for n in names]
    if not isinstance(req, list):
        raise V2Error(400, "'outputs' must be a list")
    out = []
    for o in req:
        if not isinstance(o, dict) or o.get("name") not in names:
            got = o.get("name") if isinstance(o, dict) else o
            raise V2Error(400, f"unknown output {got!r} for model '{entry.name}'; its outputs are {list(names)}")
        k = (o.get("parameters") or {}).get("classification")
        if k is not None:
            if o["name"] != "SCORES":
                raise V2Error(400, f"the classification extension applies to SCORES, not '{o['name']}'")
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise V2Error(400, f"'classification' must be a positive integer, got {k!r}")
        out.append((o["name"], k))
    return out


def _timeout_ms(params: dict[str, Any]) -> int | None:
    t = params.get("timeout")  # microseconds (tritonclient's client_timeout / timeout)
    if t is None:
        return None
    if not isinstance(t, (int, float)) or isinstance(t, bool) or t <= 0:
        raise V2Error(400, f"parameter 'timeout' must be a positive number of microseconds, got {t!r}")
    return max(1, int(t // 1000))


async def _json_body(request: Request) -> dict[str, Any]:
    if request.headers.get("inference-header-content-length") is not None:
        raise V2Error(400, "binary tensor extension not supported: send a JSON-only body without "
                           "Inference-Header-Content-Length")
    if request.headers.get("content-encoding", "identity").lower() not in ("identity", ""):
        raise V2Error(400, f"Content-Encoding '{request.headers['content-encoding']}' not supported")
    try:
        body = parse_json(await request.body())
    except ServingError as exc:  # InvalidJson: anything the parser cannot take, nesting too deep included
        raise V2Error(400, exc.message) from None
    if not isinstance(body, dict):
        raise V2Error(400, "body must be a JSON object")
    return body


# ------------------------------------------------------------------------------------ handlers
def _lookup(registry: Registry, model: str, version: str | None) -> ModelEntry:
    entry = registry.entries.get(model)
    if entry is None:
        raise V2Error(404, f"unknown model '{model}'; available: {sorted(registry.entries)}")
    if version is not None and version != str(entry.version):
        raise V2Error(400, f"model '{model}' version '{version}' is not served; the loaded version is "
                           f"'{entry.version}'")
    return entry


async def _infer(service: Service, request: Request, model: str, version: str | None, max_batch_items: int
                 ) -> Response:
    rid = None
    with service.call(INFER_ENDPOINT) as call:
        try:
            body = await _json_body(request)
            rid = body.get("id")
            entry = _lookup(service.registry, model, version)
            call.model = entry.name
            try:
                service.registry.choose(entry.task or "", entry.name)  # ready? (same checks and metrics as /v1)
            except ServingError as err:
                raise _from_core(err) from None
            task = get_task(entry.task)
            params = body.get("parameters") or {}
            if not isinstance(params, dict):
                raise V2Error(400, "'parameters' must be an object")
            outputs = _requested_outputs(task.v2_outputs, entry, body)
            items = _parse_inputs(entry, body, max_batch_items)
            outs = await service.run_items(request.scope.get("state", {}).get("request_id", "-"),
                                           lambda: wait_disconnect(request), task, entry, items,
                                           service.deadline(call, _timeout_ms(params)))
            for i, oc in enumerate(outs):
                if oc.error is not None:
                    err = _from_core(oc.error)
                    err.message = f"row {i}: {err.message}" if len(outs) > 1 else err.message
                    raise err
            response: dict[str, Any] = {"model_name": entry.name, "model_version": str(entry.version)}
            if rid is not None:
                response["id"] = rid
            logits, bodies = [oc.result.output for oc in outs], [oc.body for oc in outs]
            response["outputs"] = [task.v2_output(name, k, entry.manifest, logits, bodies) for name, k in outputs]
            call.status = 200
            return JSONResponse(response)
        except V2Error as err:
            call.status = err.status
            if rid is not None:
                return JSONResponse({"error": err.message, "id": rid}, status_code=err.status, headers=err.headers)
            return err.response()


# ------------------------------------------------------------------------------------ routes
def build_router(service: Service, *, backend: str, max_batch_items: int) -> APIRouter:
    """The /v2 routes over `service`; `backend` names the platform of a model that has no runtime."""
    router = APIRouter(tags=["open inference protocol (v2)"])
    registry = service.registry

    @router.get("/v2", summary="Server metadata")
    async def server_metadata() -> dict[str, Any]:
        from app import __version__

        return {"name": "mmserve", "version": __version__, "extensions": EXTENSIONS}

    @router.get("/v2/health/live", summary="Server liveness (200, empty body)")
    async def server_live() -> Response:
        return Response(status_code=200)

    @router.get("/v2/health/ready", summary="Server readiness: 200 ready, 400 not ready (same rule as /readyz)")
    async def server_ready() -> Response:
        ok, _ = registry.readiness()
        return Response(status_code=200 if ok else 400)

    # Each call is served with and without `/versions/{version}`: one function, two paths.
    @router.get("/v2/models/{model}", summary="Model metadata")
    @router.get("/v2/models/{model}/versions/{version}", summary="Model metadata (one version)")
    async def get_model(model: str, version: str | None = None) -> Response:
        try:
            entry = _lookup(registry, model, version)
            platform = entry.runtime.backend if entry.runtime is not None else backend
            return JSONResponse(model_metadata(entry, PLATFORMS.get(platform, platform)))
        except V2Error as err:
            return err.response()

    @router.get("/v2/models/{model}/ready", summary="Model readiness: 200 ready, 400 not")
    @router.get("/v2/models/{model}/versions/{version}/ready", summary="Model readiness (one version)")
    async def model_ready(model: str, version: str | None = None) -> Response:
        try:
            entry = _lookup(registry, model, version)
        except V2Error as err:
            return err.response()
        return Response(status_code=200 if registry.is_ready(entry) else 400)

    @router.post("/v2/models/{model}/infer", summary="Inference (JSON tensors)")
    @router.post("/v2/models/{model}/versions/{version}/infer", summary="Inference (one version)")
    async def infer(model: str, request: Request, version: str | None = None) -> Response:
        return await _infer(service, request, model, version, max_batch_items)

    return router


__all__ = ["build_router", "model_metadata"]

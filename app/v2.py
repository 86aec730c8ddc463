"""Open Inference Protocol (KServe v2 / Triton HTTP): JSON and the binary tensor data extension.

Endpoints (`/versions/{v}` optional wherever a model is named; only the loaded version is served):
  GET  /v2                                  server metadata {name, version, extensions}
  GET  /v2/health/live, /v2/health/ready    200, or 400 when not live / not ready (as Triton)
  GET  /v2/models/{m}                       model metadata {name, versions, platform, inputs, outputs}
  GET  /v2/models/{m}/ready                 200, or 400 when the model is not ready
  GET  /v2/models/{m}/config                Triton's model configuration (model_configuration extension)
  GET  /v2/models[/{m}]/stats               Triton's statistics (statistics extension)
  POST /v2/models/{m}/infer                 inference: JSON, or JSON header + binary tensors

The tensor mapping, metadata, configuration, statistics and the inference call itself live in `app/oip.py`
(shared with gRPC); the raw tensor layout in `app/oip_tensors.py`. This module is the HTTP framing:

* Binary tensor data extension: `Inference-Header-Content-Length: N` says the body is N bytes of JSON
  followed by the binary tensors, in the order of the inputs that carry `parameters.binary_data_size`.
  Lengths are checked against the bytes really received (400 when they lie, overflow or run past the
  body; bytes left over are refused too). Outputs are binary when asked (`binary_data: true` on the output,
  or `binary_data_output: true` on the request; tritonclient asks by default); the answer then has the same
  layout and header. `Content-Encoding: gzip` / `deflate` bodies are accepted, bounded by MAX_UPLOAD_BYTES
  after decompression. The body limit itself is enforced while the body streams in (BodyLimitMiddleware).
* Every /v2 answer that is not a success, whatever produced it (these routes, unknown routes and methods,
  the API key and body limit middlewares, the last-resort 500), is `{"error": "message"}`
  (`V2ErrorShape`), which tritonclient raises as a printable InferenceServerException.
"""
from __future__ import annotations

import asyncio
import json
import re
import zlib
from typing import Any, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from app import oip
from app.core.errors import ServingError
from app.core.jsonbody import parse_json
from app.core.service import Service
from app.oip_tensors import decode_raw, flatten
from app.rest import discard_body, wait_disconnect

INFER_ENDPOINT = "/v2/models/{model}/infer"  # metrics label (bounded cardinality)
HEADER_LENGTH = "inference-header-content-length"
_DIGITS = re.compile(r"^[0-9]{1,15}$")
_WBITS = {"gzip": 31, "x-gzip": 31, "deflate": 15}


def _error(err: oip.OipError, rid: Any = None) -> JSONResponse:
    body: dict[str, Any] = {"error": err.message}
    if rid is not None:
        body["id"] = rid
    return JSONResponse(body, status_code=err.status, headers=err.headers)


# ------------------------------------------------------------------------------------ request body
async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The whole body (decompressed when Content-Encoding says so, at most `max_bytes`)."""
    try:
        raw = await asyncio.wait_for(request.body(), timeout_s)
    except ClientDisconnect:
        raise oip.OipError(400, "request body incomplete: the client closed the connection") from None
    except (asyncio.TimeoutError, TimeoutError):
        raise oip.OipError(400, f"request body not received within {timeout_s:g} s") from None
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("identity", ""):
        return raw
    if encoding not in _WBITS:
        raise oip.OipError(400, f"Content-Encoding '{encoding}' not supported (gzip, deflate or identity)")
    d = zlib.decompressobj(_WBITS[encoding])
    try:
        out = d.decompress(raw, max_bytes + 1)
    except zlib.error as exc:
        raise oip.OipError(400, f"body is not valid {encoding} data: {exc}") from None
    if len(out) > max_bytes:
        raise oip.OipError(413, f"decompressed body exceeds {max_bytes} bytes (MAX_UPLOAD_BYTES)")
    if not d.eof or d.unused_data:
        raise oip.OipError(400, f"{encoding} body is truncated or has trailing data")
    return out


def parse_infer_body(raw: bytes, header_length: str | None, max_items: int
                     ) -> tuple[dict[str, Any], list[oip.InputTensor]]:
    """(the JSON request, its input tensors) from a JSON body, or a JSON header followed by binary tensors."""
    binary = memoryview(b"")
    if header_length is not None:
        if not _DIGITS.match(header_length.strip()):
            raise oip.OipError(400, f"Inference-Header-Content-Length must be a byte count, got {header_length!r}")
        n = int(header_length)
        if n > len(raw):
            raise oip.OipError(400, f"Inference-Header-Content-Length {n} is past the end of the {len(raw)}-byte "
                                    "body")
        raw, binary = raw[:n], memoryview(raw)[n:]
    try:
        body = parse_json(raw)
    except ServingError as exc:  # InvalidJson: anything the parser cannot take, nesting too deep included
        raise oip.OipError(400, exc.message) from None
    if not isinstance(body, dict):
        raise oip.OipError(400, "body must be a JSON object")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise oip.OipError(400, "'inputs' must be a non-empty list of tensors")
    tensors, offset = [], 0
    for t in inputs:
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise oip.OipError(400, "each input must be an object with a 'name'")
        name, params = t["name"], t.get("parameters") or {}
        if not isinstance(params, dict):
            raise oip.OipError(400, f"input '{name}' parameters must be an object")
        size = params.get("binary_data_size")
        if size is None:
            if "data" not in t:
                raise oip.OipError(400, f"input '{name}' has no 'data' (nor parameters.binary_data_size)")
            tensors.append(oip.InputTensor(name, t.get("datatype"), t.get("shape"), flatten(t["data"]), raw=False))
            continue
        if header_length is None:
            raise oip.OipError(400, f"input '{name}' has binary_data_size but the request has no "
                                    "Inference-Header-Content-Length header")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise oip.OipError(400, f"input '{name}' binary_data_size must be a non-negative integer, got {size!r}")
        if "data" in t:
            raise oip.OipError(400, f"input '{name}' has both 'data' and binary_data_size")
        if size > len(binary) - offset:
            raise oip.OipError(400, f"input '{name}' binary_data_size {size} runs past the body: "
                                    f"{len(binary) - offset} byte(s) left")
        values = decode_raw(t.get("datatype"), t.get("shape"), binary[offset:offset + size], name, max_items)
        offset += size
        tensors.append(oip.InputTensor(name, t.get("datatype"), t.get("shape"), values, raw=True))
    if offset != len(binary):
        raise oip.OipError(400, f"{len(binary) - offset} byte(s) of binary data after the last binary input")
    return body, tensors


def _requested(body: dict[str, Any]) -> list[oip.RequestedOutput] | None:
    req = body.get("outputs")
    if req is None:
        return None
    if not isinstance(req, list):
        raise oip.OipError(400, "'outputs' must be a list")
    out = []
    for o in req:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise oip.OipError(400, f"each output must be an object with a 'name', got {o!r}")
        params = o.get("parameters") or {}
        if not isinstance(params, dict):
            raise oip.OipError(400, f"output '{o['name']}' parameters must be an object")
        out.append(oip.RequestedOutput(o["name"], params))
    return out


def _infer_response(result: oip.InferResult, rid: Any) -> Response:
    head: dict[str, Any] = {"model_name": result.entry.name, "model_version": str(result.entry.version)}
    if rid is not None:
        head["id"] = rid
    if not any(t.binary for t in result.outputs):
        head["outputs"] = [t.json() for t in result.outputs]
        return JSONResponse(head)
    outputs, chunks = [], []
    for t in result.outputs:
        if t.binary:
            data = t.raw()
            chunks.append(data)
            outputs.append({"name": t.name, "datatype": t.datatype, "shape": t.shape,
                            "parameters": {"binary_data_size": len(data)}})
        else:
            outputs.append(t.json())
    head["outputs"] = outputs
    header = json.dumps(head).encode()
    return Response(header + b"".join(chunks), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))})


# ------------------------------------------------------------------------------------ handlers
async def _infer(service: Service, request: Request, max_batch_items: int, max_upload_bytes: int) -> Response:
    model, version = request.path_params["model"], request.path_params.get("version")
    rid = None
    with service.call(INFER_ENDPOINT) as call:
        try:
            try:
                refusal = service.refuse_early(model=model)  # overloaded: refused before the body is parsed
                if refusal is not None:
                    call.model = model
                    await discard_body(request)
                    raise refusal
                raw = await read_body(request, max_upload_bytes, service.request_timeout_s)
                body, inputs = parse_infer_body(raw, request.headers.get(HEADER_LENGTH), max_batch_items)
                rid = body.get("id")
                params = body.get("parameters") or {}
                if not isinstance(params, dict):
                    raise oip.OipError(400, "'parameters' must be an object")
                binary_default = params.get("binary_data_output", False)
                if not isinstance(binary_default, bool):
                    raise oip.OipError(400, "parameter 'binary_data_output' must be a boolean")
                result = await oip.infer(
                    service, call, model=model, version=version, inputs=inputs, outputs=_requested(body),
                    binary_default=binary_default, deadline_ms=oip.timeout_ms(params),
                    request_id=request.scope.get("state", {}).get("request_id", "-"),
                    disconnected=lambda: wait_disconnect(request), max_items=max_batch_items)
            except ServingError as err:  # the tensor codec's InvalidInput
                raise oip.from_core(err) from None
            call.status = 200
            return _infer_response(result, rid)
        except oip.OipError as err:
            call.status = err.status
            return _error(err, rid)


# ------------------------------------------------------------------------------------ errors of every /v2 answer
def is_v2(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


class V2ErrorShape:
    """Outermost ASGI middleware: any non-success answer on a /v2 path in the /v1 error shape (unknown routes
    and methods, API keys, body limit, last-resort 500) is rewritten to the v2 shape `{"error": "message"}`."""

    def __init__(self, app: Callable):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not is_v2(scope.get("path", "")):
            return await self.app(scope, receive, send)
        start: dict[str, Any] | None = None
        chunks: list[bytes] = []

        async def _send(message: dict[str, Any]) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message
                return
            if start is None or message["type"] != "http.response.body":
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = self._v2_body(scope, start["status"], b"".join(chunks))
            headers = [(k, v) for k, v in start.get("headers", [])
                       if k.lower() not in (b"content-length", b"content-type")]
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, _send)

    @staticmethod
    def _v2_body(scope: dict[str, Any], status: int, raw: bytes) -> bytes:
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            return raw  # already v2
        err = body.get("error") if isinstance(body, dict) else None
        message = err.get("message") if isinstance(err, dict) else None
        if status == 404 and message in (None, "Not Found"):
            message = f"no such endpoint: {scope.get('method')} {scope.get('path')}"
        elif status == 405 and message in (None, "Method Not Allowed"):
            message = f"method {scope.get('method')} not allowed on {scope.get('path')}"
        elif message is None:
            message = f"request failed with status {status}"
        if isinstance(err, dict) and err.get("request_id"):
            message += f" (request id {err['request_id']})"
        return json.dumps({"error": message}).encode()


# ------------------------------------------------------------------------------------ OpenAPI
_ERROR = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
_TEXT = {400: "Invalid request (bad JSON, tensors, binary lengths, media) or version not served",
         401: "Missing or wrong API key (when keys are configured)", 404: "Unknown model",
         413: "Body, image or audio too large", 415: "Unsupported media type (sniffed from the bytes)",
         500: "Internal error", 503: "Overloaded (Retry-After) or model not ready",
         504: "Deadline exceeded before inference"}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"description": _TEXT[s], "content": {"application/json": {"schema": _ERROR}}} for s in statuses}


def _json(description: str, example: Any = None) -> dict[str, Any]:
    content: dict[str, Any] = {"schema": {"type": "object"}}
    if example is not None:
        content["example"] = example
    return {"description": description, "content": {"application/json": content}}


_MODEL_PARAM = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"},
                "description": "model name (unknown: 404)"}
_VERSION_PARAM = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"},
                  "description": "model version; only the loaded one is served (another: 400)"}
_EMPTY = {"description": "Yes (empty body)", "content": {}}
_NO = {"description": "No (empty body)", "content": {}}
_BINARY_BODY = ("The JSON inference header (its byte length in the `Inference-Header-Content-Length` header) "
                "followed by the binary tensors, in input order; each BYTES element is a 4-byte little-endian "
                "length followed by its bytes (raw image / audio files for IMAGE / AUDIO).")
_INFER_REQUEST = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"}, "parameters": {"type": "object"},
        "inputs": {"type": "array", "items": {"type": "object", "required": ["name", "datatype", "shape"]}},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name"]}}}},
        "example": {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1, 1], "data": ["some text"]}],
                    "outputs": [{"name": "SCORES", "parameters": {"classification": 2}}]}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary", "description": _BINARY_BODY}},
}}, "parameters": [{"name": "Inference-Header-Content-Length", "in": "header", "required": False,
                    "schema": {"type": "integer", "minimum": 0},
                    "description": "Binary tensor data extension: length of the JSON header at the start of the "
                                   "body."}]}
_INFER_OK = {200: {"description": "Inference response: JSON, or (when binary outputs were asked for, as "
                                  "tritonclient does by default) the JSON header followed by the binary outputs, "
                                  "its length in `Inference-Header-Content-Length`",
                   "content": {"application/json": {"schema": {"type": "object"}},
                               "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


# ------------------------------------------------------------------------------------ routes
def build_router(service: Service, *, backend: str, max_batch_items: int,
                 max_upload_bytes: int = 20 * 1024 * 1024) -> APIRouter:
    """The /v2 routes over `service`; `backend` names the platform of a model that has no runtime."""
    router = APIRouter(tags=["open inference protocol (v2)"])
    registry = service.registry

    def model_routes(suffix: str, method: str, summary: str, handler: Callable, **kw: Any) -> None:
        """`handler(request)` under /v2/models/{model}{suffix} and its /versions/{version} form (the handlers read
        the path parameters from the request: they are declared here for the OpenAPI document)."""
        extra = kw.pop("openapi_extra", {})
        for path, what, params in ((f"/v2/models/{{model}}{suffix}", summary, [_MODEL_PARAM]),
                                   (f"/v2/models/{{model}}/versions/{{version}}{suffix}", f"{summary} (one version)",
                                    [_MODEL_PARAM, _VERSION_PARAM])):
            router.add_api_route(path, handler, methods=[method], summary=what, **kw, openapi_extra={
                **extra, "parameters": [*params, *extra.get("parameters", [])]})

    def entry_of(request: Request) -> Any:
        return oip.lookup(registry, request.path_params["model"], request.path_params.get("version"))

    @router.get("/v2", summary="Server metadata", responses={200: _json(
        "Name, version and the protocol extensions served", {"name": "mmserve", "version": "0.1.0",
                                                            "extensions": oip.EXTENSIONS})})
    async def server_metadata(request: Request) -> Response:
        from app import __version__

        extensions = list(oip.EXTENSIONS)
        if any(p.startswith("/v2/repository/") for p in request.app.openapi()["paths"]):  # served by this app
            extensions.append("model_repository")
        return JSONResponse({"name": "mmserve", "version": __version__, "extensions": sorted(extensions)})

    @router.get("/v2/health/live", summary="Server liveness (200, empty body)", response_class=Response,
                responses={200: _EMPTY})
    async def server_live() -> Response:
        return Response(status_code=200)

    @router.get("/v2/health/ready", summary="Server readiness: 200 ready, 400 not ready (same rule as /readyz)",
                response_class=Response, responses={200: _EMPTY, 400: _NO})
    async def server_ready() -> Response:
        ok, _ = registry.readiness()
        return Response(status_code=200 if ok else 400)

    async def stats(request: Request) -> Response:
        try:
            resp = await oip.statistics(service, request.path_params.get("model"),
                                        request.path_params.get("version"))
        except oip.OipError as err:
            return _error(err)
        return JSONResponse(oip.proto_json(resp))

    stats_doc = dict(response_class=JSONResponse, responses={
        200: _json("Triton's statistics: per model, inference and execution counts, success / fail / queue / "
                   "compute_input / compute_infer / compute_output (count + ns), batch statistics per size"),
        **_errors(400, 401, 404)})
    # before /v2/models/{model}, which would take "stats" for a model name
    router.add_api_route("/v2/models/stats", stats, methods=["GET"], summary="Statistics of every model", **stats_doc)
    model_routes("/stats", "GET", "Statistics of one model", stats, **stats_doc)

    async def get_model(request: Request) -> Response:
        try:
            entry = entry_of(request)
            return JSONResponse(oip.model_metadata(entry, oip.platform_of(entry, backend)))
        except oip.OipError as err:
            return _error(err)

    model_routes("", "GET", "Model metadata", get_model, response_class=JSONResponse,
                 responses={200: _json("Name, versions, platform, input and output tensors"), **_errors(400, 401, 404)})

    async def model_ready(request: Request) -> Response:
        try:
            entry = entry_of(request)
        except oip.OipError as err:
            return _error(err)
        return Response(status_code=200 if registry.is_ready(entry) else 400)

    model_routes("/ready", "GET", "Model readiness: 200 ready, 400 not", model_ready, response_class=Response,
                 responses={200: _EMPTY, 400: {"description": "Not ready (empty body), or the version is not "
                                                              "served (JSON error)",
                                               "content": {"application/json": {"schema": _ERROR}}},
                            **_errors(401, 404)})

    async def get_config(request: Request) -> Response:
        try:
            return JSONResponse(oip.proto_json(oip.model_config(service, entry_of(request), backend)))
        except oip.OipError as err:
            return _error(err)

    model_routes("/config", "GET", "Model configuration (Triton's model config JSON)", get_config,
                 response_class=JSONResponse, responses={200: _json(
                     "name, platform, backend, max_batch_size, input / output (data_type, dims), dynamic_batching "
                     "(preferred_batch_size, max_queue_delay_microseconds, queue policy), instance_group"),
                     **_errors(400, 401, 404)})

    async def infer(request: Request) -> Response:
        return await _infer(service, request, max_batch_items, max_upload_bytes)

    model_routes("/infer", "POST", "Inference (JSON, or binary tensor data extension)", infer,
                 response_class=Response, openapi_extra=_INFER_REQUEST,
                 responses={**_INFER_OK, **_errors(400, 401, 404, 413, 415, 500, 503, 504)})
    return router


__all__ = ["V2ErrorShape", "build_router", "parse_infer_body", "read_body"]

"""Open Inference Protocol model repository extension over HTTP (Triton's shapes; tritonclient's
`get_model_repository_index`, `load_model` and `unload_model` work unmodified). The logic lives in the core
(`app/core/model_control.py`); this module parses, maps errors and answers.

  POST /v2/repository/index                  [{"name", "version", "state", "reason"}, ...]; body optional,
                                             {"ready": true} lists READY versions only. Open in every mode.
  POST /v2/repository/models/{m}/load        200, empty body, once the model serves (a hot reload when another
                                             version serves). MODEL_CONTROL=none: 403.
  POST /v2/repository/models/{m}/unload      200, empty body, once the model has drained. MODEL_CONTROL=none: 403.

Errors are `{"error": "message"}`: 400 invalid name, failed load, or a request that asks for what mmserve does
not do (a model config or files in the load request: models come from the repository only); 403 control off,
or a non-loopback bind without ALLOW_REMOTE_MODEL_CONTROL; 404 not in the repository; 503 shutting down.
With API_KEYS set, every /v2 route (these included) needs a key.
"""
from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.core.errors import ServingError
from app.core.model_control import ModelControl
from app.core.service import Service

EXTENSION = "model_repository"  # for the server metadata's extension list
STATUS = {"model_control_disabled": 403, "forbidden": 403, "invalid_model_name": 400, "model_not_found": 404,
          "model_load_failed": 400, "not_ready": 503, "internal_error": 500}

_ERROR = {"content": {"application/json": {"schema": {
    "type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}}}}
_INDEX_ROW = {"type": "object", "properties": {k: {"type": "string"} for k in ("name", "version", "state", "reason")}}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _from_core(err: ServingError) -> JSONResponse:
    headers = {"Retry-After": str(err.retry_after)} if err.retry_after is not None else None
    return _error(STATUS.get(err.code, 400), err.message, headers)


async def _body(request: Request) -> dict[str, Any]:
    """The optional JSON object of a repository request ({} when the body is empty); ValueError otherwise."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    return body


def _local_host(request: Request) -> str | None:
    server = request.scope.get("server")
    return server[0] if server else None


async def _index(control: ModelControl, request: Request) -> Response:
    try:
        body = await _body(request)
    except ValueError as exc:
        return _error(400, str(exc))
    ready = body.get("ready", False)
    if not isinstance(ready, bool):
        return _error(400, f"'ready' must be a boolean, got {ready!r}")
    return JSONResponse(await control.repository_index(ready_only=ready))


async def _params(request: Request) -> dict[str, Any]:
    """The `parameters` object of a load / unload request ({} when absent); ValueError when malformed."""
    params = (await _body(request)).get("parameters") or {}
    if not isinstance(params, dict):
        raise ValueError("'parameters' must be an object")
    return params


async def _load(control: ModelControl, request: Request, model: str) -> Response:
    try:
        control.check_allowed(_local_host(request))
        try:
            params = await _params(request)
        except ValueError as exc:
            return _error(400, str(exc))
        if params:  # tritonclient's load_model(config=..., files=...): an override model directory
            return _error(400, f"load parameters {sorted(params)[:5]} are not supported: mmserve loads models "
                               "from its model repository only (no config override, no uploaded files)")
        await control.load(model)
    except ServingError as err:
        return _from_core(err)
    return Response(status_code=200)


async def _unload(control: ModelControl, request: Request, model: str) -> Response:
    try:
        control.check_allowed(_local_host(request))
        try:
            await _params(request)  # `unload_dependents` has no meaning here: no model depends on another
        except ValueError as exc:
            return _error(400, str(exc))
        await control.unload(model)
    except ServingError as err:
        return _from_core(err)
    return Response(status_code=200)


def build_router(service: Service) -> APIRouter:
    """The repository routes over `service.control`."""
    control = service.control
    assert control is not None, "the service has no model control"
    router = APIRouter(tags=["open inference protocol (v2): model repository"])
    errors = {400: {"description": "Invalid model name, failed load or unsupported parameters", **_ERROR},
              403: {"description": "Model control off (MODEL_CONTROL=none) or refused on a non-loopback bind",
                    **_ERROR},
              404: {"description": "No such model in the repository", **_ERROR},
              503: {"description": "Shutting down", **_ERROR}}

    @router.post("/v2/repository/index", summary="Repository index: every model version and its state",
                 responses={200: {"description": "One row per model version", "content": {"application/json": {
                     "schema": {"type": "array", "items": _INDEX_ROW}}}}, 400: errors[400]})
    async def repository_index(request: Request) -> Response:
        return await _index(control, request)

    # `{model:path}` so a name with slashes reaches the name check (400) instead of missing the route
    @router.post("/v2/repository/models/{model:path}/load", summary="Load or hot-reload a model",
                 description="Loads the model's pinned or latest version from the repository. When another "
                 "version serves, the new one warms while the old one serves, then traffic switches and the old "
                 "one drains; a version that fails never replaces the serving one.",
                 responses={200: {"description": "Loaded (empty body)"}, **errors})
    async def load_model(model: str, request: Request) -> Response:
        return await _load(control, request, model)

    @router.post("/v2/repository/models/{model:path}/unload", summary="Unload a model",
                 description="New requests get 404 at once; requests already running are answered, then the "
                 "model drains and its runtime is released.",
                 responses={200: {"description": "Unloaded (empty body)"}, **errors})
    async def unload_model(model: str, request: Request) -> Response:
        return await _unload(control, request, model)

    return router


__all__ = ["EXTENSION", "build_router"]

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
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.errors import ApiError
from app.registry import READY, ModelEntry
from app.service import Service
from app.tasks import TaskInput, _b64

router = APIRouter(tags=["open inference protocol (v2)"])

INPUT_NAMES = {"text": "TEXT", "image": "IMAGE", "audio": "AUDIO"}
MODALITY_OF = {v: k for k, v in INPUT_NAMES.items()}
PLATFORMS = {"onnx": "onnxruntime_onnx", "torchscript": "pytorch_libtorch"}
EXTENSIONS = ["classification"]
INFER_ENDPOINT = "/v2/models/{model}/infer"  # metrics label (bounded cardinality)


class V2Error(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.message}, status_code=self.status, headers=self.headers)


def _from_api(err: ApiError) -> V2Error:
    """/v1 errors in the v2 shape: request faults (422 and other 4xx) become 400, except 404 (unknown model),
    413 and 415; 5xx (overloaded, not ready, deadline, internal) keep their status and Retry-After."""
    status = err.status
    if 400 <= status < 500 and status not in (404, 413, 415):
        status = 400
    headers = {k: v for k, v in err.headers.items() if k.lower() == "retry-after"}
    return V2Error(status, err.message, headers)


# ------------------------------------------------------------------------------------ lookup
def _service(request: Request) -> Service:
    return request.app.state.service


def _entry(request: Request, model: str, version: str | None) -> ModelEntry:
    reg = _service(request).registry
    entry = reg.entries.get(model)
    if entry is None:
        raise V2Error(404, f"unknown model '{model}'; available: {sorted(reg.entries)}")
    if version is not None and version != str(entry.version):
        raise V2Error(400, f"model '{model}' version '{version}' is not served; the loaded version is "
                           f"'{entry.version}'")
    return entry


def _platform(request: Request, entry: ModelEntry) -> str:
    backend = entry.runtime.backend if entry.runtime is not None else _service(request).settings.backend
    return PLATFORMS.get(backend, backend)


def _output_names(entry: ModelEntry) -> list[str]:
    return ["ENTITIES"] if entry.task == "ner" else ["SCORES"]


def model_metadata(request: Request, entry: ModelEntry) -> dict[str, Any]:
    m = entry.manifest
    if m is None:
        raise V2Error(400, f"model '{entry.name}' has no readable manifest: {entry.reason}")
    inputs = []
    for mod in m.modalities:
        if mod.name == "text":
            what = "the question (UTF-8 text)" if m.task == "vqa" else "UTF-8 text"
        elif mod.name == "image":
            what = "encoded image file (PNG/JPEG/GIF/WEBP/BMP/TIFF) as a base64 string in JSON"
        else:
            what = "encoded audio file (WAV/FLAC/OGG) as a base64 string in JSON"
        optional = not (mod.required or (mod.name == "text") or (m.task == "vqa" and mod.name == "image"))
        inputs.append({"name": INPUT_NAMES[mod.name], "datatype": "BYTES", "shape": [-1, 1],
                       "parameters": {"content": what, "optional": optional}})
    if m.task == "ner":
        outputs = [{"name": "ENTITIES", "datatype": "BYTES", "shape": [-1, 1],
                    "parameters": {"content": "JSON string: list of {text, type, start, end, score} per row"}}]
    else:
        outputs = [{"name": "SCORES", "datatype": "FP32", "shape": [-1, len(m.labels)],
                    "parameters": {"content": "sigmoid scores" if m.multi_label else "softmax scores",
                                   "labels": list(m.labels), "classification": True}}]
    return {"name": entry.name, "versions": [str(entry.version)], "platform": _platform(request, entry),
            "inputs": inputs, "outputs": outputs,
            "parameters": {"task": m.task, "max_batch_size": entry.max_batch_size, "state": entry.state}}


# ------------------------------------------------------------------------------------ server
@router.get("/v2", summary="Server metadata")
async def server_metadata() -> dict[str, Any]:
    from app import __version__

    return {"name": "mmserve", "version": __version__, "extensions": EXTENSIONS}


@router.get("/v2/health/live", summary="Server liveness (200, empty body)")
async def server_live() -> Response:
    return Response(status_code=200)


@router.get("/v2/health/ready", summary="Server readiness: 200 ready, 400 not ready (same rule as /readyz)")
async def server_ready(request: Request) -> Response:
    ok, _ = _service(request).registry.readiness()
    return Response(status_code=200 if ok else 400)


# ------------------------------------------------------------------------------------ models
async def _metadata(request: Request, model: str, version: str | None) -> Response:
    try:
        return JSONResponse(model_metadata(request, _entry(request, model, version)))
    except V2Error as err:
        return err.response()


async def _ready(request: Request, model: str, version: str | None) -> Response:
    try:
        entry = _entry(request, model, version)
    except V2Error as err:
        return err.response()
    ok = entry.state == READY and entry.batcher is not None and not _service(request).registry.draining
    return Response(status_code=200 if ok else 400)


# Each call is served with and without `/versions/{version}`: one function, two paths.
@router.get("/v2/models/{model}", summary="Model metadata")
@router.get("/v2/models/{model}/versions/{version}", summary="Model metadata (one version)")
async def get_model(model: str, request: Request, version: str | None = None) -> Response:
    return await _metadata(request, model, version)


@router.get("/v2/models/{model}/ready", summary="Model readiness: 200 ready, 400 not")
@router.get("/v2/models/{model}/versions/{version}/ready", summary="Model readiness (one version)")
async def model_ready(model: str, request: Request, version: str | None = None) -> Response:
    return await _ready(request, model, version)


@router.post("/v2/models/{model}/infer", summary="Inference (JSON tensors)")
@router.post("/v2/models/{model}/versions/{version}/infer", summary="Inference (one version)")
async def infer(model: str, request: Request, version: str | None = None) -> Response:
    return await _infer(request, model, version)


# ------------------------------------------------------------------------------------ inference
def _flatten(data: Any) -> list[Any]:
    if isinstance(data, list):
        out: list[Any] = []
        for x in data:
            out.extend(_flatten(x))
        return out
    return [data]


def _parse_inputs(entry: ModelEntry, body: dict[str, Any], max_items: int) -> list[TaskInput]:
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
    for i in range(batch):
        text = columns["TEXT"][i] if "TEXT" in columns else None
        media: dict[str, bytes | None] = {}
        for key in ("IMAGE", "AUDIO"):
            value = columns[key][i] if key in columns else None
            try:
                media[key] = _b64(value, key) if value else None
            except ApiError as err:
                raise V2Error(400, f"row {i}: {err.message}") from None
        items.append(TaskInput(text, media["IMAGE"], media["AUDIO"]))
    return items


def _requested_outputs(entry: ModelEntry, body: dict[str, Any]) -> list[tuple[str, int | None]]:
    """[(name, classification K or None)]; all outputs when the request names none."""
    names = _output_names(entry)
    req = body.get("outputs")
    if req is None:
        return [(n, None) for n in names]
    if not isinstance(req, list):
        raise V2Error(400, "'outputs' must be a list")
    out = []
    for o in req:
        if not isinstance(o, dict) or o.get("name") not in names:
            got = o.get("name") if isinstance(o, dict) else o
            raise V2Error(400, f"unknown output {got!r} for model '{entry.name}'; its outputs are {names}")
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


async def _infer(request: Request, model: str, version: str | None) -> Response:
    svc = _service(request)
    started, t_mono = time.perf_counter(), time.monotonic()
    svc.enter(INFER_ENDPOINT)
    model_label, status, rid = "", 500, None
    try:
        if request.headers.get("inference-header-content-length") is not None:
            raise V2Error(400, "binary tensor extension not supported: send a JSON-only body without "
                               "Inference-Header-Content-Length")
        if request.headers.get("content-encoding", "identity").lower() not in ("identity", ""):
            raise V2Error(400, f"Content-Encoding '{request.headers['content-encoding']}' not supported")
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise V2Error(400, f"body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise V2Error(400, "body must be a JSON object")
        rid = body.get("id")
        entry = _entry(request, model, version)
        model_label = entry.name
        try:
            svc.registry.choose(entry.task or "", entry.name)  # ready? (same checks and metrics as /v1)
        except ApiError as err:
            raise _from_api(err) from None
        params = body.get("parameters") or {}
        if not isinstance(params, dict):
            raise V2Error(400, "'parameters' must be an object")
        outputs = _requested_outputs(entry, body)
        items = _parse_inputs(entry, body, svc.settings.max_batch_items)
        deadline = svc.deadline(t_mono, _timeout_ms(params))
        n_labels = len(entry.manifest.labels)
        task = entry.task
        outs = await svc.run_items(request, task, entry, items, n_labels, deadline)
        for i, oc in enumerate(outs):
            if oc.error is not None:
                err = _from_api(oc.error)
                err.message = f"row {i}: {err.message}" if len(outs) > 1 else err.message
                raise err
        response: dict[str, Any] = {"model_name": entry.name, "model_version": str(entry.version)}
        if rid is not None:
            response["id"] = rid
        response["outputs"] = [_output(entry, name, k, outs) for name, k in outputs]
        status = 200
        return JSONResponse(response)
    except V2Error as err:
        status = err.status
        body_err = err.response()
        if rid is not None:
            body_err = JSONResponse({"error": err.message, "id": rid}, status_code=err.status, headers=err.headers)
        return body_err
    finally:
        svc.leave(INFER_ENDPOINT, model_label, status, started)


def _output(entry: ModelEntry, name: str, k: int | None, outs: list) -> dict[str, Any]:
    from models import postprocess as pp

    m = entry.manifest
    assert m is not None
    b = len(outs)
    if name == "ENTITIES":
        return {"name": name, "datatype": "BYTES", "shape": [b, 1],
                "data": [json.dumps(oc.body["entities"], ensure_ascii=False) for oc in outs]}
    scores = np.stack([pp.scores_for(np.asarray(oc.result.output), multi_label=m.multi_label) for oc in outs])
    scores = scores.astype(np.float32)
    if k is None:
        return {"name": name, "datatype": "FP32", "shape": [b, len(m.labels)],
                "data": [float(x) for x in scores.reshape(-1)]}
    k = min(k, len(m.labels))
    data = []
    for row in scores:
        order = np.argsort(-row, kind="stable")[:k]  # equal scores keep label order, as /v1
        data.extend(f"{float(row[j]):f}:{int(j)}:{m.labels[int(j)]}" for j in order)
    return {"name": name, "datatype": "BYTES", "shape": [b, k], "data": data}


__all__ = ["router", "model_metadata"]

"""The Open Inference Protocol over the serving core, for every front-end that speaks it (HTTP in
`app/v2.py`, gRPC in `app/grpc_server.py`): model lookup, metadata, Triton's model configuration and
statistics (as the `ModelConfig` / `ModelStatistics` protobufs that tritonclient ships), the tensor
mapping of our models and one inference call. Knows no transport: failures are `OipError`s with the
v2 HTTP status; the gRPC front-end maps that status to a gRPC code.

Tensor mapping (every model, whatever its task):
  inputs   TEXT   BYTES [-1, 1]  UTF-8 text (for VQA: the question); only when the model uses text
           IMAGE  BYTES [-1, 1]  the encoded image file (PNG/JPEG/...): raw bytes in binary / gRPC tensors,
                                 a base64 string in JSON; only when the model takes images
           AUDIO  BYTES [-1, 1]  the encoded audio file (WAV/FLAC/OGG), same forms as IMAGE
           An optional input may be left out, or carry an empty element for the rows without such media.
  outputs  SCORES   FP32 [-1, num_labels]  classify / vqa: class probabilities in label order (softmax, or
                                           sigmoids for multi-label); classification extension
                                           (`classification: K`): BYTES [-1, K] "score:index:label", best first
           ENTITIES BYTES [-1, 1]          ner: per row a JSON string of the entity list, as /v1/ner returns
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from app.core.errors import ServingError
from app.core.items import Item, decode_b64
from app.core.loading import ModelEntry
from app.core.registry import Registry
from app.core.service import Call, Service
from app.core.stats import Statistics
from app.oip_tensors import encode_raw
from app.tasks import get_task

INPUT_NAMES = {"text": "TEXT", "image": "IMAGE", "audio": "AUDIO"}
PLATFORMS = {"onnx": "onnxruntime_onnx", "torchscript": "pytorch_libtorch"}
BACKENDS = {"onnx": "onnxruntime", "torchscript": "pytorch"}
CONFIG_TYPES = {"FP32": mc.TYPE_FP32, "BYTES": mc.TYPE_STRING}
# extensions every front-end serves; `model_repository` is added where the repository calls are served
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "statistics"]
# v2 status of the core's errors: request faults are 400 except these; 5xx keep theirs (and Retry-After)
STATUS = {"model_not_found": 404, "no_model_for_task": 404, "media_too_large": 413, "unsupported_media_type": 415,
          "model_failed": 503, "not_ready": 503, "overloaded": 503, "timeout": 504, "inference_failed": 500,
          "internal_error": 500, "client_disconnected": 499, "model_control_disabled": 403, "forbidden": 403}


class OipError(Exception):
    """A protocol answer that is not a success: v2 HTTP `status`, a message, optional headers (Retry-After)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def from_core(err: ServingError) -> OipError:
    headers = {"Retry-After": str(err.retry_after)} if err.retry_after is not None else None
    return OipError(STATUS.get(err.code, 400), err.message, headers)


def platform_of(entry: ModelEntry, backend: str) -> str:
    """Triton's platform name of the runtime serving `entry` (`backend`: the configured one, before loading)."""
    b = entry.runtime.backend if entry.runtime is not None else backend
    return PLATFORMS.get(b, b)


def lookup(registry: Registry, model: str, version: str | None) -> ModelEntry:
    entry = registry.entries.get(model)
    if entry is None:
        raise OipError(404, f"unknown model '{model}'; available: {sorted(registry.entries)}")
    if version not in (None, "") and version != str(entry.version):
        raise OipError(400, f"model '{model}' version '{version}' is not served; the loaded version is "
                            f"'{entry.version}'")
    return entry


def _manifest(entry: ModelEntry) -> Any:
    if entry.manifest is None:
        raise OipError(400, f"model '{entry.name}' has no readable manifest: {entry.reason}")
    return entry.manifest


# ------------------------------------------------------------------------------------ metadata
def _inputs(entry: ModelEntry) -> list[tuple[str, bool, str]]:
    """(input name, optional, content) of the model's inputs."""
    m = _manifest(entry)
    task = get_task(m.task)
    out = []
    for mod in m.modalities:
        if mod.name == "text":
            what = task.v2_text_content
        elif mod.name == "image":
            what = ("encoded image file (PNG/JPEG/GIF/WEBP/BMP/TIFF): raw bytes in binary or gRPC tensors, "
                    "a base64 string in JSON")
        else:
            what = "encoded audio file (WAV/FLAC/OGG): raw bytes in binary or gRPC tensors, a base64 string in JSON"
        optional = not (mod.required or mod.name == "text" or mod.name in task.required_media)
        out.append((INPUT_NAMES[mod.name], optional, what))
    return out


def model_metadata(entry: ModelEntry, platform: str) -> dict[str, Any]:
    m = _manifest(entry)
    inputs = [{"name": name, "datatype": "BYTES", "shape": [-1, 1], "parameters": {"content": what, "optional": opt}}
              for name, opt, what in _inputs(entry)]
    return {"name": entry.name, "versions": [str(entry.version)], "platform": platform,
            "inputs": inputs, "outputs": get_task(m.task).v2_output_metadata(m),
            "parameters": {"task": m.task, "max_batch_size": entry.max_batch_size, "state": entry.state}}


# ------------------------------------------------------------------------------------ model configuration
def model_config(service: Service, entry: ModelEntry, backend: str) -> mc.ModelConfig:
    """Triton's model configuration of `entry`, from its manifest and the live serving options: the batch
    size in use (settings, manifest or calibration), MAX_DELAY_MS, QUEUE_SIZE, REQUEST_TIMEOUT_S and the
    device the runtime really uses."""
    m = _manifest(entry)
    task = get_task(m.task)
    registry = service.registry
    b = entry.runtime.backend if entry.runtime is not None else backend
    cfg = mc.ModelConfig(name=entry.name, platform=PLATFORMS.get(b, b), backend=BACKENDS.get(b, b),
                         max_batch_size=entry.max_batch_size)
    cfg.version_policy.specific.versions.append(int(entry.version or 0))
    fmt = m.formats.get(b)
    if fmt is not None:
        cfg.default_model_filename = fmt.file
    for name, optional, _ in _inputs(entry):
        cfg.input.add(name=name, data_type=mc.TYPE_STRING, dims=[1], optional=optional)
    for out in task.v2_output_metadata(m):
        cfg.output.add(name=out["name"], data_type=CONFIG_TYPES[out["datatype"]], dims=out["shape"][1:])
    db = cfg.dynamic_batching
    db.preferred_batch_size.append(entry.max_batch_size)  # a batch is sealed when it reaches this size
    db.max_queue_delay_microseconds = int(round(registry.max_delay_s * 1e6))
    db.default_queue_policy.max_queue_size = registry.queue_size
    db.default_queue_policy.default_timeout_microseconds = int(round(service.request_timeout_s * 1e6))
    db.default_queue_policy.allow_timeout_override = True  # a request may ask for a shorter deadline
    device = entry.runtime.device if entry.runtime is not None else "cpu"
    group = cfg.instance_group.add(name=f"{entry.name}_0", count=1)
    if device.startswith("cuda"):
        group.kind = mc.ModelInstanceGroup.KIND_GPU
        group.gpus.append(int(device.partition(":")[2] or 0))
    else:
        group.kind = mc.ModelInstanceGroup.KIND_CPU
    params = {"task": m.task, "labels": json.dumps(list(m.labels)), "multi_label": json.dumps(m.multi_label),
              "state": entry.state, "batch_size_source": entry.batch_size_source or "",
              "provider": entry.runtime.provider if entry.runtime is not None else ""}
    for key, value in params.items():
        cfg.parameters[key].string_value = str(value)
    return cfg


# ------------------------------------------------------------------------------------ statistics
def _duration(target: Any, d: Any) -> None:
    target.count, target.ns = d.count, d.ns


def model_statistics(stats: Statistics, entries: list[ModelEntry]) -> pb.ModelStatisticsResponse:
    """Triton's statistics of `entries`, from the counters the core keeps beside its Prometheus metrics."""
    resp = pb.ModelStatisticsResponse()
    for entry in entries:
        s = stats.model(entry.name)
        ms = resp.model_stats.add(name=entry.name, version=str(entry.version), last_inference=s.last_inference_ms,
                                  inference_count=s.inference_count, execution_count=s.execution_count)
        for part in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
            _duration(getattr(ms.inference_stats, part), getattr(s, part))
        for size in sorted(s.batches):
            bs = ms.batch_stats.add(batch_size=size)
            _duration(bs.compute_infer, s.batches[size])
    return resp


async def statistics(service: Service, model: str | None, version: str | None) -> pb.ModelStatisticsResponse:
    """All served models (no `model`), or one (with MMSERVE_WORKERS > 1, totals over every process)."""
    registry = service.registry
    entries = [lookup(registry, model, version)] if model else [e for e in registry.entries.values()
                                                                if e.version is not None]
    try:
        stats = await service.statistics()
    except ServingError as err:
        raise from_core(err) from None
    return model_statistics(stats, entries)


def proto_json(message: Any) -> dict[str, Any]:
    """A protobuf as Triton writes it in JSON: proto field names, every field, 64-bit integers as numbers."""
    data = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)
    return _ints(message.DESCRIPTOR, data)


_INT64 = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
          FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}


def _ints(descriptor: Any, data: Any) -> Any:
    """JSON mapping writes 64-bit integers as strings; Triton writes numbers."""
    if not isinstance(data, dict):
        return data
    for f in descriptor.fields:
        if f.name not in data:
            continue
        value = data[f.name]
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            vf = f.message_type.fields_by_name["value"]
            if vf.message_type is not None:
                data[f.name] = {k: _ints(vf.message_type, v) for k, v in value.items()}
        elif f.message_type is not None:
            data[f.name] = ([_ints(f.message_type, v) for v in value] if isinstance(value, list)
                            else _ints(f.message_type, value))
        elif f.type in _INT64:
            data[f.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
    return data


# ------------------------------------------------------------------------------------ inference
@dataclass
class InputTensor:
    """One input as received: `values` flat; bytes when it came raw (binary / gRPC), JSON values otherwise."""

    name: str
    datatype: Any
    shape: list[int]
    values: list[Any]
    raw: bool


@dataclass
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    data: list[Any]  # flat, JSON form (floats, or strings for BYTES)
    binary: bool = False

    def raw(self) -> bytes:
        return encode_raw(self.datatype, self.data)

    def json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": self.shape, "data": self.data}


@dataclass
class InferResult:
    entry: ModelEntry
    outputs: list[OutputTensor]


def check_input_header(entry: ModelEntry, name: Any, datatype: Any, shape: Any) -> int:
    """Checks one input's name, datatype and shape ([batch, 1] or [batch]) against the model; its batch size."""
    expected = [INPUT_NAMES[m] for m in _manifest(entry).modality_names]
    if not isinstance(name, str) or name not in expected:
        raise OipError(400, f"unexpected input {name!r} for model '{entry.name}'; its inputs are {expected}")
    if datatype != "BYTES":
        raise OipError(400, f"input '{name}' must have datatype BYTES, got {datatype!r}")
    if (not isinstance(shape, list) or not shape or len(shape) > 2
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            or (len(shape) == 2 and shape[1] != 1)):
        raise OipError(400, f"input '{name}' must have shape [batch, 1] (or [batch]), got {shape!r}")
    return shape[0]


def items_from_inputs(entry: ModelEntry, inputs: list[InputTensor], max_items: int) -> list[Item]:
    if not inputs:
        raise OipError(400, "'inputs' must be a non-empty list of tensors")
    columns: dict[str, list[Any]] = {}
    batch: int | None = None
    for t in inputs:
        rows = check_input_header(entry, t.name, t.datatype, t.shape)
        if t.name in columns:
            raise OipError(400, f"input '{t.name}' given twice")
        if len(t.values) != rows:
            raise OipError(400, f"input '{t.name}' has {len(t.values)} elements, shape {t.shape} needs {rows}")
        if not all(isinstance(x, bytes if t.raw else str) for x in t.values):
            raise OipError(400, f"input '{t.name}' data must be strings (BYTES in JSON)")
        if batch is None:
            batch = rows
        elif rows != batch:
            raise OipError(400, f"inputs disagree on the batch size: '{t.name}' has {rows}, expected {batch}")
        columns[t.name] = [_element(t, i, x) for i, x in enumerate(t.values)]
    assert batch is not None
    if batch < 1:
        raise OipError(400, "batch size must be at least 1")
    if batch > max_items:
        raise OipError(400, f"at most {max_items} rows per request (MAX_BATCH_ITEMS), got {batch}")
    n_labels = len(_manifest(entry).labels)  # /v1 bodies are not returned: keep every label
    empty = [None] * batch
    return [Item(columns.get("TEXT", empty)[i], columns.get("IMAGE", empty)[i], columns.get("AUDIO", empty)[i],
                 n_labels) for i in range(batch)]


def _element(t: InputTensor, row: int, value: Any) -> Any:
    """One element -> the Item's value: TEXT a str, media bytes; None for an empty media element."""
    if t.name == "TEXT":
        if not t.raw:
            return value
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise OipError(400, f"row {row}: input 'TEXT' is not valid UTF-8") from None
    if not value:
        return None
    if t.raw:
        return value
    try:
        return decode_b64(value, t.name)
    except ServingError as err:
        raise OipError(400, f"row {row}: {err.message}") from None


@dataclass
class RequestedOutput:
    name: str
    parameters: dict[str, Any]


def requested_outputs(entry: ModelEntry, requested: list[RequestedOutput] | None, binary_default: bool
                      ) -> list[tuple[str, int | None, bool]]:
    """[(name, classification K or None, binary)]; every output when the request names none."""
    names = get_task(_manifest(entry).task).v2_outputs
    if requested is None:
        return [(n, None, binary_default) for n in names]
    out = []
    for o in requested:
        if o.name not in names:
            raise OipError(400, f"unknown output {o.name!r} for model '{entry.name}'; its outputs are {list(names)}")
        k = o.parameters.get("classification")
        if k is not None:
            if o.name != "SCORES":
                raise OipError(400, f"the classification extension applies to SCORES, not '{o.name}'")
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise OipError(400, f"'classification' must be a positive integer, got {k!r}")
        binary = o.parameters.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise OipError(400, f"output '{o.name}' parameter 'binary_data' must be a boolean, got {binary!r}")
        out.append((o.name, k, binary))
    return out


def timeout_ms(params: dict[str, Any]) -> int | None:
    t = params.get("timeout")  # microseconds (tritonclient's `timeout`)
    if t is None:
        return None
    if not isinstance(t, (int, float)) or isinstance(t, bool) or t <= 0:
        raise OipError(400, f"parameter 'timeout' must be a positive number of microseconds, got {t!r}")
    return max(1, int(t // 1000))


async def infer(service: Service, call: Call, *, model: str, version: str | None, inputs: list[InputTensor],
                outputs: list[RequestedOutput] | None, binary_default: bool, deadline_ms: int | None,
                request_id: str, disconnected: Callable[[], Awaitable[Any]], max_items: int) -> InferResult:
    """One inference request through the core (`Service.run_items`: same batching, deadlines, metrics and
    checks as /v1). Fails as a whole when any row fails (that row's error, prefixed with the row when there
    are several)."""
    entry = lookup(service.registry, model, version)
    call.model = entry.name
    try:
        service.registry.choose(entry.task or "", entry.name)  # ready? (same checks and metrics as /v1)
    except ServingError as err:
        raise from_core(err) from None
    task = get_task(entry.task)
    wanted = requested_outputs(entry, outputs, binary_default)
    items = items_from_inputs(entry, inputs, max_items)
    outs = await service.run_items(request_id, disconnected, task, entry, items,
                                   service.deadline(call, deadline_ms))
    for i, oc in enumerate(outs):
        if oc.error is not None:
            err = from_core(oc.error)
            err.message = f"row {i}: {err.message}" if len(outs) > 1 else err.message
            raise err
    logits, bodies = [oc.result.output for oc in outs], [oc.body for oc in outs]
    tensors = []
    for name, k, binary in wanted:
        t = task.v2_output(name, k, entry.manifest, logits, bodies)
        tensors.append(OutputTensor(t["name"], t["datatype"], t["shape"], t["data"], binary))
    return InferResult(entry, tensors)


__all__ = ["EXTENSIONS", "InferResult", "InputTensor", "OipError", "OutputTensor", "RequestedOutput", "from_core",
           "infer", "lookup", "model_config", "model_metadata", "platform_of", "proto_json", "statistics",
           "timeout_ms"]

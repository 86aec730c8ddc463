"""gRPC front-end: the Open Inference Protocol's `inference.GRPCInferenceService` (Triton's gRPC API), on
GRPC_PORT (0: off), in the same process and event loop as the HTTP server (grpcio aio, started and stopped
by the app's lifespan), over the same core as /v1 and /v2: same batcher, deadlines, metrics, statistics and
errors. The servicer base class, the messages and `add_GRPCInferenceServiceServicer_to_server` are the
generated ones tritonclient ships.

RPCs: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelConfig, ModelStatistics,
ModelInfer, RepositoryIndex / RepositoryModelLoad / RepositoryModelUnload (model control, as
/v2/repository); the others (streaming, shared memory, trace, log settings) answer UNIMPLEMENTED.
Tensors are read from `raw_input_contents` (tritonclient's default) or typed `contents`; outputs are sent
in `raw_output_contents`. Errors carry the v2 message with the gRPC code of the v2 status (400
INVALID_ARGUMENT, 404 NOT_FOUND, 503 UNAVAILABLE, 504 DEADLINE_EXCEEDED, ...). Messages are limited to
MAX_UPLOAD_BYTES both ways. With API_KEYS set every RPC needs `authorization: Bearer KEY` or
`x-api-key: KEY` metadata (UNAUTHENTICATED otherwise), as /v2 over HTTP.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import suppress
from typing import Any, Callable

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from app import oip
from app.core import security
from app.core.errors import ServingError
from app.core.service import Service
from app.oip_tensors import decode_raw

log = logging.getLogger("mmserve.grpc")

SERVICE = "inference.GRPCInferenceService"
CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
         403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
         413: grpc.StatusCode.RESOURCE_EXHAUSTED, 415: grpc.StatusCode.INVALID_ARGUMENT,
         499: grpc.StatusCode.CANCELLED, 500: grpc.StatusCode.INTERNAL, 503: grpc.StatusCode.UNAVAILABLE,
         504: grpc.StatusCode.DEADLINE_EXCEEDED}
# typed `contents` field of each datatype (when a client sends no raw_input_contents)
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
            "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def _param(p: pb.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


async def _abort(context: grpc.aio.ServicerContext, err: oip.OipError) -> None:
    await context.abort(CODES.get(err.status, grpc.StatusCode.UNKNOWN), err.message)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: Service, *, backend: str, max_batch_items: int):
        self.service = service
        self.registry = service.registry
        self.backend = backend
        self.max_batch_items = max_batch_items

    # -- health and metadata -------------------------------------------------------------------
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.registry.readiness()[0])

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        from app import __version__

        extensions = oip.EXTENSIONS + (["model_repository"] if self.service.control is not None else [])
        return pb.ServerMetadataResponse(name="mmserve", version=__version__, extensions=sorted(extensions))

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        try:
            entry = oip.lookup(self.registry, request.name, request.version)
        except oip.OipError as err:
            await _abort(context, err)
        return pb.ModelReadyResponse(ready=self.registry.is_ready(entry))

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        try:
            entry = oip.lookup(self.registry, request.name, request.version)
            meta = oip.model_metadata(entry, oip.platform_of(entry, self.backend))
        except oip.OipError as err:
            await _abort(context, err)
        resp = pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"])
        for kind in ("inputs", "outputs"):
            for t in meta[kind]:
                getattr(resp, kind).add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        return resp

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        try:
            entry = oip.lookup(self.registry, request.name, request.version)
            return pb.ModelConfigResponse(config=oip.model_config(self.service, entry, self.backend))
        except oip.OipError as err:
            await _abort(context, err)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        try:
            return await oip.statistics(self.service, request.name or None, request.version or None)
        except oip.OipError as err:
            await _abort(context, err)

    # -- inference -----------------------------------------------------------------------------
    def _inputs(self, request: pb.ModelInferRequest) -> list[oip.InputTensor]:
        raw = request.raw_input_contents
        if raw and len(raw) != len(request.inputs):
            raise oip.OipError(400, f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: every input "
                                    "must have raw contents, or none")
        tensors = []
        for i, t in enumerate(request.inputs):
            shape = list(t.shape)
            if raw:
                values = decode_raw(t.datatype, shape, raw[i], t.name, self.max_batch_items)
            else:
                field = CONTENTS.get(t.datatype)
                if field is None:
                    raise oip.OipError(400, f"input '{t.name}' has unsupported datatype {t.datatype!r}")
                values = list(getattr(t.contents, field))
            tensors.append(oip.InputTensor(t.name, t.datatype, shape, values, raw=True))
        return tensors

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        with self.service.call(f"/{SERVICE}/ModelInfer") as call:
            gone = asyncio.Event()  # set when the client cancels: queued rows are dropped, as for HTTP
            params = {k: _param(v) for k, v in request.parameters.items()}
            try:
                try:
                    deadline_ms = oip.timeout_ms(params)
                    remaining = context.time_remaining()
                    if remaining is not None:
                        deadline_ms = min(deadline_ms or 1 << 62, max(1, int(remaining * 1000)))
                    outputs = [oip.RequestedOutput(o.name, {k: _param(v) for k, v in o.parameters.items()})
                               for o in request.outputs] or None
                    work = asyncio.ensure_future(oip.infer(
                        self.service, call, model=request.model_name, version=request.model_version,
                        inputs=self._inputs(request), outputs=outputs, binary_default=True,
                        deadline_ms=deadline_ms, request_id=security.request_id(request.id), disconnected=gone.wait,
                        max_items=self.max_batch_items))
                    try:
                        result = await asyncio.shield(work)
                    except asyncio.CancelledError:
                        gone.set()
                        call.status = 499
                        with suppress(Exception):
                            await work
                        raise
                except ServingError as err:  # the tensor codec's InvalidInput
                    raise oip.from_core(err) from None
            except oip.OipError as err:
                call.status = err.status
                await _abort(context, err)
            call.status = 200
        resp = pb.ModelInferResponse(model_name=result.entry.name, model_version=str(result.entry.version),
                                     id=request.id)
        for t in result.outputs:
            resp.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
            resp.raw_output_contents.append(t.raw())
        return resp

    # -- model repository (model control) ------------------------------------------------------
    def _control(self) -> Any:
        if self.service.control is None:
            raise oip.OipError(403, "model control is not available on this server")
        return self.service.control

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        try:
            rows = await self._control().repository_index(ready_only=request.ready)
        except oip.OipError as err:
            await _abort(context, err)
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**row) for row in rows])

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest, context: Any
                                  ) -> pb.RepositoryModelLoadResponse:
        await self._change(context, "load", request.model_name, request.parameters)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest, context: Any
                                    ) -> pb.RepositoryModelUnloadResponse:
        await self._change(context, "unload", request.model_name, {})
        return pb.RepositoryModelUnloadResponse()

    async def _change(self, context: Any, action: str, name: str, parameters: Any) -> None:
        try:
            control = self._control()
            try:
                control.check_allowed()
                if parameters:  # tritonclient's load_model(config=..., files=...)
                    raise oip.OipError(400, f"load parameters {sorted(parameters)[:5]} are not supported: mmserve "
                                            "loads models from its repository")
                await getattr(control, action)(name)
            except ServingError as err:
                raise oip.from_core(err) from None
        except oip.OipError as err:
            await _abort(context, err)


def _unimplemented(name: str) -> Callable:
    async def method(self: Any, request: Any, context: Any) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name} is not supported by mmserve")

    method.__name__ = name
    return method


for _name in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name:
    if _name not in InferenceServicer.__dict__:  # the base class's are synchronous: answer from the loop
        setattr(InferenceServicer, _name, _unimplemented(_name))


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Every RPC needs one of `keys` in `authorization: Bearer KEY` or `x-api-key: KEY` metadata."""

    def __init__(self, keys: list[str]):
        self.keys = security.key_digests(keys)

    def _ok(self, metadata: Any) -> bool:
        md = {k.lower(): v for k, v in (metadata or ()) if isinstance(v, str)}
        given = md.get("x-api-key")
        auth = md.get("authorization", "")
        if given is None and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        return security.key_matches(given, self.keys)

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or self._ok(details.invocation_metadata):
            return handler

        async def deny(request: Any, context: Any) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key")

        kind = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
        make = kind[(handler.request_streaming, handler.response_streaming)]
        return make(deny, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)


class GrpcServer:
    """The gRPC server of one app: `await start()` in the lifespan, `await stop(grace)` at shutdown."""

    def __init__(self, service: Service, *, host: str, port: int, backend: str, max_batch_items: int,
                 max_message_bytes: int, api_keys: list[str], shared_port: bool = False):
        """`shared_port`: one of the front-ends of MMSERVE_WORKERS > 1, which all listen on the port with
        SO_REUSEPORT (the kernel spreads connections over them); the engine has checked that no other program
        holds it (`app/workers.py`). Otherwise SO_REUSEPORT is off (grpcio turns it on by default): a port another
        program holds is an error, not a silently shared one."""
        self.service = service
        self.address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
        self.options = [("grpc.max_receive_message_length", max_message_bytes),
                        ("grpc.max_send_message_length", max_message_bytes),
                        ("grpc.so_reuseport", 1 if shared_port else 0)]
        self.servicer = InferenceServicer(service, backend=backend, max_batch_items=max_batch_items)
        self.interceptors = [ApiKeyInterceptor(api_keys)] if api_keys else []
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None

    async def start(self) -> None:
        server = grpc.aio.server(options=self.options, interceptors=self.interceptors)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, server)
        try:
            self.port = server.add_insecure_port(self.address)
        except RuntimeError as exc:
            raise RuntimeError(f"gRPC cannot bind {self.address} (GRPC_PORT; 0 turns gRPC off): {exc}") from None
        if not self.port:
            raise RuntimeError(f"gRPC cannot bind {self.address} (GRPC_PORT; 0 turns gRPC off)")
        await server.start()
        self.server = server
        log.info("gRPC (%s) listening on %s", SERVICE, self.address)

    async def stop(self, grace: float) -> None:
        """Refuse new RPCs, let the running ones finish for up to `grace` seconds."""
        if self.server is not None:
            await self.server.stop(grace)
            self.server = None


__all__ = ["GrpcServer", "InferenceServicer"]

"""The ASGI app: `create_app(settings)` (factory) and `app` (built lazily from the environment).

Start-up returns at once: models load and warm in the background (/healthz answers immediately,
/readyz is 503 until they are warm). Shutdown drains: stop admitting, answer every accepted request,
finish queued and running batches, then release the runtimes.
"""
from __future__ import annotations

import asyncio
import logging
import os
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.core.errors import ServingError
from app.core.loading import LoadOptions
from app.core.memory import trim_when_idle
from app.core.model_control import ModelControl
from app.core.registry import Registry
from app.core.service import Service
from app.errors import ApiError, api_error, error_response
from app.metrics import Metrics
from app.middleware import ApiKeyMiddleware, BodyLimitMiddleware, RequestContextMiddleware
from app.settings import Settings

log = logging.getLogger("mmserve.app")

DESCRIPTION = """Multimodal (text + image + audio) inference with dynamic batching.

* Task endpoints take `multipart/form-data` (uploaded files) or JSON (base64 media); `/batch` variants take a
  JSON list of records that succeed or fail independently.
* Errors are always `{"error": {"code", "message"}}`. Every response carries `X-Request-ID`.
* When API keys are configured, `/v1` needs `Authorization: Bearer KEY` or `X-API-Key: KEY`.
"""


def load_options(s: Settings) -> LoadOptions:
    return LoadOptions(backend=s.backend, device=s.device, intra_op_threads=s.intra_op_threads,
                       inter_op_threads=s.inter_op_threads, allow_spinning=s.allow_spinning,
                       max_image_pixels=s.max_image_pixels, max_audio_seconds=s.max_audio_seconds,
                       max_batch_size=s.max_batch_size, warmup=s.warmup,
                       cuda_mem_limit_bytes=s.cuda_mem_limit_bytes,
                       cuda_arena_extend_strategy=s.cuda_arena_extend_strategy,
                       cudnn_conv_algo_search=s.cudnn_conv_algo_search)


def build_registry(s: Settings, metrics: Metrics) -> Registry:
    return Registry(s.repository, metrics, pinned=s.model_versions, load=load_options(s),
                    max_delay_s=s.max_delay_ms / 1000.0, queue_size=s.queue_size, strict_readiness=s.strict_readiness)


AUTO_PREPROCESS_THREADS = 4  # PREPROCESS_WORKERS=0: one process's threads; the most a front-end gets


def preprocess_threads(setting: int, workers: int, cores: int | None = None) -> int:
    """The preprocessing threads of one process serving HTTP: PREPROCESS_WORKERS as set, or for 0 (auto) 4 in one
    process, and with WORKERS > 1 the cores (`cores`, default this process's affinity) shared out among the
    front-ends, 1 to 4 each. With WORKERS=2 on 2 cores (shared with the load generator), 4 threads in each front-end
    spent 4.3 ms of server CPU per tiny request against 3.4 with 1 (390 -> 500 req/s at concurrency 32, A/B): threads
    past the cores only trade places, each switch costing the caches the grouped preprocessing relies on."""
    if setting:
        return setting
    if workers <= 1:
        return AUTO_PREPROCESS_THREADS
    cores = cores or len(os.sched_getaffinity(0))
    return max(1, min(AUTO_PREPROCESS_THREADS, cores // workers))


def build_service(s: Settings, metrics: Metrics, engine_path: str | None = None) -> Service:
    """The serving core, each part with the options it needs (nothing below here reads Settings). `engine_path`:
    a front-end process of MMSERVE_WORKERS > 1, whose models live in the engine behind that socket."""
    registry: Registry
    control_class = ModelControl
    if engine_path:
        from app.core.remote import FrontRegistry
        from app.core.remote_control import RemoteControl

        registry = FrontRegistry(s.repository, metrics, engine_path=engine_path, load=load_options(s),
                                 max_delay_s=s.max_delay_ms / 1000.0, queue_size=s.queue_size,
                                 strict_readiness=s.strict_readiness)
        control_class = RemoteControl  # the engine's ModelControl does the work
    else:
        registry = build_registry(s, metrics)
    control = control_class(registry, mode=s.model_control, poll_interval_s=s.poll_interval_s, bind_host=s.host,
                            allow_remote=s.allow_remote_model_control,
                            drain_timeout_s=s.request_timeout_s + s.shutdown_timeout_s)
    service = Service(registry, metrics, preprocess_workers=preprocess_threads(s.preprocess_workers, s.workers),
                      request_timeout_s=s.request_timeout_s, control=control,
                      unhealthy_after_timeouts=s.unhealthy_after_timeouts)
    if engine_path:
        service.statistics_source = registry.client.statistics  # type: ignore[attr-defined]
    return service


def create_app(settings: Settings | None = None, engine_path: str | None = None) -> ServingApp:
    """`engine_path`: the app of one front-end process of MMSERVE_WORKERS > 1 (`app/frontend.py`)."""
    settings = settings or Settings()
    metrics = Metrics()
    service = build_service(settings, metrics, engine_path)
    registry = service.registry

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info("starting mmserve", extra={"settings": settings.public()})
        service.start()
        registry.scan()
        grpc_server = None
        if settings.grpc_port:  # gRPC front-end (app/grpc_server.py) on this event loop, over the same service
            from app.grpc_server import GrpcServer

            grpc_server = GrpcServer(service, host=settings.host, port=settings.grpc_port, backend=settings.backend,
                                     max_batch_items=settings.max_batch_items,
                                     max_message_bytes=settings.max_upload_bytes, api_keys=settings.api_keys,
                                     shared_port=settings.workers > 1)
            await grpc_server.start()
        app.state.grpc = grpc_server
        loader = asyncio.create_task(registry.load_all(), name="model-loader")
        trimmer = asyncio.create_task(trim_when_idle(lambda: (service.inflight, service.answered)), name="memory-trim")
        try:
            yield
        finally:
            log.info("shutting down: draining in-flight requests and batches")
            trimmer.cancel()
            registry.draining = True
            if grpc_server is not None:  # no new RPCs; running ones are answered
                await grpc_server.stop(settings.shutdown_timeout_s)
            if not loader.done():
                loader.cancel()
                await asyncio.gather(loader, return_exceptions=True)
            await service.stop(settings.shutdown_timeout_s)
            log.info("shutdown complete")

    from app import __version__
    app = ServingApp(title="mmserve", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.service = service

    from app import rest, v2
    app.include_router(rest.build_router(service, max_upload_bytes=settings.max_upload_bytes,
                                         max_batch_items=settings.max_batch_items))
    from app import rest_openapi  # /v1 request bodies in OpenAPI written from the served models' manifests
    rest_openapi.install(app, service, max_batch_items=settings.max_batch_items)
    # Open Inference Protocol (KServe v2): JSON and binary tensors
    app.include_router(v2.build_router(service, backend=settings.backend, max_batch_items=settings.max_batch_items,
                                       max_upload_bytes=settings.max_upload_bytes))
    from app import v2_repository  # model repository extension: index, load, unload (MODEL_CONTROL)
    app.include_router(v2_repository.build_router(service))

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Any:
        return exc.response()

    @app.exception_handler(ServingError)
    async def _serving_error(request: Request, exc: ServingError) -> Any:
        return api_error(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Any:
        details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                   for e in exc.errors()]
        return error_response(422, "invalid_request", "invalid request", details=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Any:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))

    # outermost first: request id / catch-all -> API keys -> body limit -> routes
    def ours(inner: Any) -> Any:
        return RequestContextMiddleware(ApiKeyMiddleware(BodyLimitMiddleware(
            inner, limit=settings.max_upload_bytes, linger_bytes=settings.linger_bytes, linger_s=settings.linger_s),
            keys=settings.api_keys))

    app.add_middleware(BodyLimitMiddleware, limit=settings.max_upload_bytes, linger_bytes=settings.linger_bytes,
                       linger_s=settings.linger_s)
    app.add_middleware(ApiKeyMiddleware, keys=settings.api_keys)
    app.add_middleware(RequestContextMiddleware)
    app.add_middleware(v2.V2ErrorShape)  # outermost: every /v2 error answer in the v2 shape
    # POST /v1/{task} in front of FastAPI, behind the same middlewares of ours (rest.TaskFastPath)
    fast = rest.TaskFastPath(rest.fast_routes(service, max_upload_bytes=settings.max_upload_bytes,
                                              max_batch_items=settings.max_batch_items))
    app.fast_paths, app.fast_app = fast.paths, ours(fast)
    return app


class ServingApp(FastAPI):
    """FastAPI, with the /v1 task fast path (`rest.TaskFastPath`, `fast_paths`) answered before its middleware
    stack: by `fast_app`, the fast path behind the same middlewares of ours as every route."""

    fast_paths: frozenset[str] = frozenset()
    fast_app: Any = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (scope["type"] == "http" and scope["path"] in self.fast_paths and scope["method"] == "POST"
                and not scope.get("root_path") and not self.root_path):
            scope["app"] = self
            await self.fast_app(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def __getattr__(name: str) -> Any:  # `uvicorn app.main:app` builds the app from the environment on first use
    if name == "app":
        global app
        app = create_app()
        return app
    raise AttributeError(name)

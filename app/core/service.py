"""Request execution shared by the task endpoints: pick model, preprocess off-loop, queue, wait with
deadline and disconnect detection, postprocess, metrics."""
from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from app.batcher import ItemResult
from app.errors import ApiError, DeadlineExceeded
from app.metrics import Metrics
from app.registry import ModelEntry, Prepared, Registry
from app.settings import Settings
from app.tasks import TaskInput, check_input, effective_top_k, postprocess, preprocess

log = logging.getLogger("mmserve.service")


class ClientGone(ApiError):
    def __init__(self) -> None:
        super().__init__(499, "client_disconnected", "client closed the connection before the answer")


@dataclass
class ItemOutcome:
    body: dict[str, Any] | None = None
    prepared: Prepared | None = None
    error: ApiError | None = None
    result: ItemResult | None = None
    preprocess_s: float = 0.0


class Service:
    def __init__(self, settings: Settings, metrics: Metrics, registry: Registry):
        self.settings = settings
        self.metrics = metrics
        self.registry = registry
        self.pool: ThreadPoolExecutor | None = None
        self.inflight = 0
        self._idle = asyncio.Event()

    def start(self) -> None:
        self.pool = ThreadPoolExecutor(self.settings.preprocess_workers, thread_name_prefix="preprocess")
        self._idle = asyncio.Event()
        self._idle.set()

    async def stop(self, timeout: float) -> None:
        """Stop admitting, wait for accepted requests, drain batchers (graceful shutdown)."""
        self.registry.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except (asyncio.TimeoutError, TimeoutError):
            log.error("shutdown: %d request(s) still in flight after %.0fs", self.inflight, timeout)
        await self.registry.drain(timeout)
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def deadline(self, started: float, timeout_ms: int | None) -> float:
        seconds = self.settings.request_timeout_s
        if timeout_ms is not None:
            seconds = min(seconds, timeout_ms / 1000.0)
        return started + seconds

    async def _preprocess(self, entry: ModelEntry, task: str, inp: TaskInput) -> tuple[Prepared, float]:
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()  # request id in preprocessing log lines
        t0 = time.perf_counter()
        prepared = await loop.run_in_executor(self.pool, ctx.run, preprocess, entry, task, inp, self.metrics)
        return prepared, time.perf_counter() - t0

    async def run_items(self, request: Request, task: str, entry: ModelEntry, items: list[TaskInput],
                        default_top_k: int | None, deadline: float,
                        pre_errors: dict[int, ApiError] | None = None) -> list[ItemOutcome]:
        """Run items independently (each may fail alone); waits for all, or the client going away."""
        pre_errors = pre_errors or {}
        outcomes = [ItemOutcome() for _ in items]
        rid = request.scope.get("state", {}).get("request_id", "-")

        async def prepare(i: int, inp: TaskInput) -> None:
            if i in pre_errors:
                outcomes[i].error = pre_errors[i]
                return
            try:
                check_input(entry, task, inp)
                outcomes[i].prepared, outcomes[i].preprocess_s = await self._preprocess(entry, task, inp)
            except ApiError as err:
                outcomes[i].error = err
            except Exception:  # noqa: BLE001 - one item's bug must not fail the other items of a batch request
                log.exception("preprocessing failed")
                outcomes[i].error = ApiError(500, "internal_error", "internal error while preprocessing",
                                             request_id=rid)

        await asyncio.gather(*(prepare(i, inp) for i, inp in enumerate(items)))
        futures: dict[int, asyncio.Future] = {}
        if time.monotonic() >= deadline:  # spent in preprocessing
            for i, oc in enumerate(outcomes):
                if oc.error is None:
                    oc.error = DeadlineExceeded("request deadline exceeded during preprocessing")
                    self.metrics.rejections.labels(entry.name, "timeout").inc()
            return outcomes
        assert entry.batcher is not None
        for i, oc in enumerate(outcomes):
            if oc.error is not None:
                continue
            try:
                futures[i] = entry.batcher.submit(oc.prepared, deadline, rid)
            except ApiError as err:
                oc.error = err
        if futures:
            await self._wait(request, entry, futures, outcomes, deadline)
        for i, oc in enumerate(outcomes):
            if oc.error is not None or oc.result is None:
                continue
            inp = items[i]
            try:
                oc.body = postprocess(entry, task, oc.prepared, oc.result.output, inp.text,
                                      effective_top_k(entry, inp.top_k or default_top_k))
            except Exception:  # noqa: BLE001
                log.exception("postprocessing failed")
                oc.error = ApiError(500, "internal_error", "postprocessing failed", request_id=rid)
        return outcomes

    async def _wait(self, request: Request, entry: ModelEntry, futures: dict[int, asyncio.Future],
                    outcomes: list[ItemOutcome], deadline: float) -> None:
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            pending = set(futures.values())
            while pending:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
                done, pending = await asyncio.wait(pending | {watcher}, timeout=timeout,
                                                   return_when=asyncio.FIRST_COMPLETED)
                if watcher in done:
                    pending.discard(watcher)
                    gone = [f for f in futures.values() if not f.done()]
                    for f in gone:
                        f.cancel()
                    if gone:
                        self.metrics.rejections.labels(entry.name, "disconnected").inc(len(gone))
                        log.info("client disconnected; dropped %d queued item(s)", len(gone))
                    break
                pending.discard(watcher)
        finally:
            watcher.cancel()
        for i, f in futures.items():
            oc = outcomes[i]
            if f.cancelled():
                oc.error = ClientGone()
            elif not f.done():  # deadline while queued (or running): answer 504 now, drop it if not started
                f.cancel()
                self.metrics.rejections.labels(entry.name, "timeout").inc()
                oc.error = DeadlineExceeded()
            elif f.exception() is not None:
                exc = f.exception()
                oc.error = exc if isinstance(exc, ApiError) else ApiError(500, "internal_error", "inference failed")
            else:
                oc.result = f.result()

    # -- accounting --------------------------------------------------------------------------
    def enter(self, endpoint: str) -> None:
        self.inflight += 1
        self._idle.clear()
        self.metrics.inflight.labels(endpoint).inc()

    def leave(self, endpoint: str, model: str, status: int, started: float) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()
        self.metrics.inflight.labels(endpoint).dec()
        self.metrics.requests.labels(endpoint, model, str(status)).inc()
        self.metrics.request_duration.labels(endpoint, model).observe(time.perf_counter() - started)


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return

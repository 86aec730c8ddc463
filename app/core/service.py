"""Request execution shared by every protocol front-end: preprocess off-loop, queue, wait with deadline
and disconnect detection, postprocess, metrics. Knows no HTTP: it takes plain values and raises or
returns the core's errors (`app/core/errors.py`)."""
from __future__ import annotations

import asyncio
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterator

from app.core import preprocess
from app.core.batcher import ItemResult, Prepared
from app.core.errors import ClientGone, DeadlineExceeded, InternalError, QueueFull, ServingError
from app.core.items import Item
from app.core.loading import ModelEntry
from app.core.registry import Registry
from app.core.stats import Statistics
from app.core.workers import GroupedWorkers
from app.metrics import Metrics
from app.tasks import Task

if TYPE_CHECKING:
    from app.core.model_control import ModelControl

log = logging.getLogger("mmserve.service")
PREPROCESS_GROUP = 8  # most items one preprocessing thread takes at once (8: 0.80 ms an item, 16: 0.77, 1: 0.99)
STALL_MIN_S = 1.0  # shortest wait that can count towards marking a model hung (Service._health)


@dataclass
class ItemOutcome:
    body: dict[str, Any] | None = None  # the /v1 response body of this item (model, version, task fields)
    prepared: Prepared | None = None
    error: ServingError | None = None
    result: ItemResult | None = None
    preprocess_s: float = 0.0


@dataclass
class Call:
    """One request being answered (`Service.call`): the handler fills in the model and the status."""

    endpoint: str
    started: float = field(default_factory=time.perf_counter)
    started_mono: float = field(default_factory=time.monotonic)
    model: str = ""
    status: int = 500


class Service:
    def __init__(self, registry: Registry, metrics: Metrics, *, preprocess_workers: int = 4,
                 request_timeout_s: float = 30.0, control: ModelControl | None = None,
                 unhealthy_after_timeouts: int = 3):
        self.registry = registry
        self.control = control  # model repository extension (index, load, unload, poll); front-ends share it
        self.metrics = metrics
        self.preprocess_workers = preprocess_workers
        self.request_timeout_s = request_timeout_s
        self.unhealthy_after_timeouts = unhealthy_after_timeouts
        self.pool: GroupedWorkers | None = None
        self.inflight = 0
        self.answered = 0  # requests answered since start (whatever their status)
        self._idle = asyncio.Event()
        self._preparing: dict[int, int] = {}  # id(entry) -> items admitted and being preprocessed, not yet queued
        # MMSERVE_WORKERS > 1: the statistics extension's totals over every process (None: this process's own)
        self.statistics_source: Callable[[], Awaitable[Statistics]] | None = None

    def start(self) -> None:
        # items queued while a thread was busy are preprocessed together, stage by stage (`preprocess.prepare_many`)
        self.pool = GroupedWorkers(self.preprocess_workers, "preprocess", preprocess.prepare_many,
                                   max_group=PREPROCESS_GROUP)
        self._idle = asyncio.Event()
        self._idle.set()
        if self.control is not None:
            self.control.start()  # the repository poller, in MODEL_CONTROL=poll

    async def stop(self, timeout: float) -> None:
        """Stop admitting, wait for accepted requests, drain batchers (graceful shutdown)."""
        self.registry.draining = True
        if self.control is not None:
            await self.control.stop()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except (asyncio.TimeoutError, TimeoutError):
            log.error("shutdown: %d request(s) still in flight after %.0fs", self.inflight, timeout)
        await self.registry.drain(timeout)
        if self.pool is not None:
            self.pool.shutdown()

    async def statistics(self) -> Statistics:
        """The statistics extension's counters (`app/core/stats.py`)."""
        if self.statistics_source is None:
            return self.metrics.stats
        return await self.statistics_source()

    def deadline(self, call: Call, timeout_ms: int | None) -> float:
        seconds = self.request_timeout_s
        if timeout_ms is not None:
            seconds = min(seconds, timeout_ms / 1000.0)
        return call.started_mono + seconds

    # -- accounting ----------------------------------------------------------------------------
    @contextmanager
    def call(self, endpoint: str) -> Iterator[Call]:
        """In-flight gauge, idle tracking for shutdown, and the request counter and latency on the way out."""
        call = Call(endpoint)
        m = self.metrics
        self.inflight += 1
        self._idle.clear()
        inflight = m.child(m.inflight, endpoint)
        inflight.inc()
        try:
            yield call
        finally:
            self.inflight -= 1
            self.answered += 1
            if self.inflight == 0:
                self._idle.set()
            inflight.dec()
            elapsed = time.perf_counter() - call.started
            m.child(m.requests, endpoint, call.model, str(call.status)).inc()
            m.child(m.request_duration, endpoint, call.model).observe(elapsed)
            if call.model:
                m.stats.model(call.model).request(call.status == 200, elapsed)

    # -- execution -----------------------------------------------------------------------------
    async def _prepare(self, entry: ModelEntry, task: Task, item: Item) -> tuple[Prepared, float]:
        assert self.pool is not None
        t0 = time.perf_counter()  # (the worker runs it in a copy of this context: request id in its log lines)
        prepared = await self.pool.submit(asyncio.get_running_loop(), entry, task, item, self.metrics)
        seconds = time.perf_counter() - t0
        self.metrics.stats.model(entry.name).compute_input.add(seconds)
        return prepared, seconds

    async def run_items(self, request_id: str, disconnected: Callable[[], Awaitable[Any]], task: Task,
                        entry: ModelEntry, items: list[Item], deadline: float) -> list[ItemOutcome]:
        """Run items independently (each may fail alone); waits for all, or for `disconnected()` to return
        (the client has gone).

        Call it right after `registry.choose` (no await in between): the request then counts on the entry it
        chose until it is answered, so a hot reload or unload drains that entry only after it. Should the
        entry have been replaced meanwhile, the request runs on its successor."""
        try:
            entry = self.registry.current(entry)
        except ServingError as err:
            return [ItemOutcome(error=err) for _ in items]
        entry.active += 1
        try:
            return await self._run_items(request_id, disconnected, task, entry, items, deadline)
        finally:
            entry.active -= 1

    async def _run_items(self, request_id: str, disconnected: Callable[[], Awaitable[Any]], task: Task,
                         entry: ModelEntry, items: list[Item], deadline: float) -> list[ItemOutcome]:
        outcomes = [ItemOutcome() for _ in items]
        admitted = self._admit(entry, outcomes)

        async def prepare(i: int, item: Item) -> None:
            if outcomes[i].error is not None:  # refused at admission
                return
            try:
                preprocess.check_input(entry, task, item)
                outcomes[i].prepared, outcomes[i].preprocess_s = await self._prepare(entry, task, item)
            except ServingError as err:
                outcomes[i].error = err
            except asyncio.CancelledError:
                raise
            # one item's bug must not fail the other items of a batch request; nor may a worker that died
            # (SystemExit / KeyboardInterrupt raised in it) take the request, or the server, down with it
            except BaseException:  # noqa: BLE001
                log.exception("preprocessing failed")
                outcomes[i].error = InternalError("internal error while preprocessing", request_id=request_id)

        try:
            if len(items) == 1:  # the common case: no task and no gather for one item
                await prepare(0, items[0])
            else:
                await asyncio.gather(*(prepare(i, item) for i, item in enumerate(items)))
        finally:
            self._release(entry, admitted)
        futures: dict[int, asyncio.Future] = {}
        if time.monotonic() >= deadline:  # spent in preprocessing
            for oc in outcomes:
                if oc.error is None:
                    oc.error = DeadlineExceeded("request deadline exceeded during preprocessing")
                    self.metrics.rejections.labels(entry.name, "timeout").inc()
            return outcomes
        assert entry.batcher is not None
        submitted = time.monotonic()
        for i, oc in enumerate(outcomes):
            if oc.error is not None:
                continue
            try:  # all of them before the batcher may start: an idle model takes them as one batch
                futures[i] = entry.batcher.submit(oc.prepared, deadline, request_id, dispatch=False)
            except ServingError as err:
                oc.error = err
        if futures:
            entry.batcher.dispatch()
            await self._wait(disconnected, entry, futures, outcomes, deadline)
            self._health(entry, outcomes, futures, submitted)
        manifest = entry.manifest
        for i, oc in enumerate(outcomes):
            if oc.error is not None or oc.result is None:
                continue
            try:
                t0 = time.perf_counter()
                body = task.postprocess(manifest, oc.prepared.meta, oc.prepared.features, oc.result.output,
                                        items[i].text, items[i].top_k)
                oc.body = {"model": entry.name, "version": entry.version, **body}
                self.metrics.stats.model(entry.name).compute_output.add(time.perf_counter() - t0)
            except Exception:  # noqa: BLE001
                log.exception("postprocessing failed")
                oc.error = InternalError("postprocessing failed", request_id=request_id)
        return outcomes

    def _admit(self, entry: ModelEntry, outcomes: list[ItemOutcome]) -> int:
        """Admission before preprocessing: the items the model's queue could still take (counting those being
        preprocessed now) go on; the others are refused at once (503 + Retry-After) without decoding their media.
        Under overload, refusing after preprocessing spent the CPU the admitted requests needed on requests that
        were refused anyway, and the preprocessing pool's queue (unbounded) grew past every deadline."""
        batcher = entry.batcher
        if batcher is None:
            return 0
        free = batcher.queue_size - batcher.depth - self._preparing.get(id(entry), 0)
        admitted = 0
        for oc in outcomes:
            if admitted < free:
                admitted += 1
            else:
                oc.error = QueueFull(entry.name, retry_after=max(1, math.ceil(batcher.max_delay_s * 2)))
                self.metrics.rejections.labels(entry.name, "queue_full").inc()
        if admitted:
            self._preparing[id(entry)] = self._preparing.get(id(entry), 0) + admitted
        return admitted

    def refuse_early(self, *, task: str | None = None, model: str | None = None) -> QueueFull | None:
        """Admission at the request head, before the body is parsed: a QueueFull when every ready model serving
        `task` (or the model named `model`) has no free queue slot (a request naming any of them would be refused
        after parsing anyway), else None (the request is parsed and admitted item by item, `_admit`). Under
        overload most requests are refused; parsing each refused body first (multipart, JSON, tensors) made a
        refusal cost nearly what serving does, so the server could not even answer at the offered rate
        (bench/overload.py)."""
        full: ModelEntry | None = None
        for entry in self.registry.entries.values():
            batcher = entry.batcher
            if ((task is not None and entry.task != task) or (model is not None and entry.name != model)
                    or batcher is None or not self.registry.is_ready(entry)):
                continue
            if batcher.queue_size - batcher.depth - self._preparing.get(id(entry), 0) > 0:
                return None
            full = entry
        if full is None:  # no ready model serves it: the usual path gives the reason
            return None
        self.metrics.rejections.labels(full.name, "queue_full").inc()
        return QueueFull(full.name, retry_after=max(1, math.ceil(full.batcher.max_delay_s * 2)))  # type: ignore[union-attr]

    def _release(self, entry: ModelEntry, admitted: int) -> None:
        if admitted:
            left = self._preparing.get(id(entry), 0) - admitted
            if left > 0:
                self._preparing[id(entry)] = left
            else:
                self._preparing.pop(id(entry), None)

    def _health(self, entry: ModelEntry, outcomes: list[ItemOutcome], futures: dict[int, asyncio.Future],
                submitted: float) -> None:
        """A hung model: UNHEALTHY_AFTER_TIMEOUTS requests in a row timed out while it finished no batch during
        their whole wait (at least STALL_MIN_S: a client's own tiny timeout_ms cannot mark a model hung). Any
        answer from the model clears it."""
        batcher = entry.batcher
        if any(outcomes[i].result is not None for i in futures):
            if entry.unhealthy is not None:
                log.warning("model %s:%s answers again: healthy", entry.name, entry.version)
            entry.stalled_timeouts, entry.unhealthy = 0, None
            return
        now = time.monotonic()
        stalled = (batcher is not None and batcher.busy and batcher.last_progress <= submitted
                   and now - submitted >= STALL_MIN_S
                   and any(isinstance(outcomes[i].error, DeadlineExceeded) for i in futures))
        if not stalled or not self.unhealthy_after_timeouts:
            return
        entry.stalled_timeouts += 1
        if entry.stalled_timeouts >= self.unhealthy_after_timeouts and entry.unhealthy is None:
            entry.unhealthy = (f"{entry.stalled_timeouts} requests in a row timed out while the model finished no "
                               f"batch (inference hung for {now - batcher.last_progress:.1f}s)")
            log.error("model %s:%s unhealthy: %s", entry.name, entry.version, entry.unhealthy)

    async def _wait(self, disconnected: Callable[[], Awaitable[Any]], entry: ModelEntry,
                    futures: dict[int, asyncio.Future], outcomes: list[ItemOutcome], deadline: float) -> None:
        watcher = asyncio.ensure_future(disconnected())
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
                oc.error = exc if isinstance(exc, ServingError) else InternalError("inference failed")
            else:
                oc.result = f.result()

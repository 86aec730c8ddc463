"""Dynamic batcher, one per model (asyncio front, one dedicated inference thread behind).

Policy (explicit, in the spirit of TEI's continuous batching with Triton's max-queue-delay knob):

* Idle model + waiting requests -> the batch goes at once (up to `max_batch_size`). There is no
  artificial delay at low load: latency at concurrency 1 is preprocessing + one inference. A request that
  finds the model idle and nothing queued is handed to the inference thread by `submit` itself (no wake-up of
  the scheduling task in between); a caller with several items submits them with `dispatch=False` and then
  calls `dispatch()`, so they still go as one batch.
* Busy model -> the next batch forms while the current one runs. It is sealed when it is full, when
  `max_delay` has passed since its *first* request was queued, or when the model goes idle, whichever
  comes first. A sealed batch is handed to the model's single inference thread and runs as soon as the
  current one ends; at most one sealed batch waits behind the running one (pipeline depth 2), so later
  arrivals keep filling the *next* batch instead of piling into tiny sealed ones.
* Before a batch is sealed and again right before it runs, items whose caller has gone (future
  cancelled: deadline hit or client disconnected) are dropped, and items past their deadline fail with
  504 without being run.
* If a batch inference raises, its items are retried one by one so only the culprit fails.
* If it ran out of memory (`app.runtime.is_out_of_memory`: a GPU's allocator, torch's OutOfMemoryError), it is
  split in halves and each half retried, recursively down to single items (one by one after 64 items would be
  slow, and the halves usually fit); an item that runs out of memory alone fails alone. The model's max batch
  size is then lowered to the largest size that ran in that split, once, with a warning, and `on_lowered(size,
  source)` tells the owner (what `/v1/models` shows); later batches are never bigger.
* The queue is bounded (`queue_size`): `submit` raises `QueueFull` (with a retry-after hint) beyond it.
* Every result goes back to its own caller through its own future.

`infer(payloads) -> outputs` is any synchronous function returning one output per payload, in order
(collation, padding to the longest sequence and the runtime call live there). The served models'
payload is `Prepared` (one preprocessed item).
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from app.core.errors import DeadlineExceeded, InferenceFailed, NotReady, QueueFull
from app.core.workers import LoopWorkers
from app.logging import request_id_var
from app.runtime import is_out_of_memory

log = logging.getLogger("mmserve.batcher")


@dataclass
class Prepared:
    """One preprocessed item: the batcher's payload for a served model."""

    features: Any  # models.preprocessing.Features
    length: int | None  # real token count (per-token outputs keep this many rows)
    meta: dict[str, Any] = field(default_factory=dict)  # what the task's postprocessing needs (NER: the words)


@dataclass(eq=False)
class WorkItem:
    payload: Any
    future: asyncio.Future
    deadline: float  # time.monotonic()
    enqueued: float
    request_id: str = "-"


@dataclass
class ItemResult:
    output: Any
    batch_size: int
    queue_seconds: float
    inference_seconds: float


@dataclass
class _Outcome:
    item: WorkItem
    kind: str  # ok | error | expired | gone
    value: Any = None


@dataclass
class _BatchRun:
    outcomes: list[_Outcome] = field(default_factory=list)
    started: float = 0.0
    seconds: float = 0.0
    size: int = 0


class Batcher:
    def __init__(self, name: str, infer: Callable[[list[Any]], Sequence[Any]], *, max_batch_size: int,
                 max_delay_s: float, queue_size: int, metrics: Any = None,
                 on_lowered: Callable[[int, str], None] | None = None):
        self.name = name
        self.infer = infer
        self.max_batch_size = max_batch_size  # lowered (from the inference thread) after an out-of-memory
        self.on_lowered = on_lowered
        self.max_delay_s = max_delay_s
        self.queue_size = queue_size
        self.metrics = metrics
        self._pending: deque[WorkItem] = deque()
        self._wake: asyncio.Event | None = None
        self._executor = LoopWorkers(1, f"infer-{name}")  # the model's one inference thread
        self._outstanding = 0  # batches handed to the executor and not finished
        self._accepting = False
        self._task: asyncio.Task | None = None
        self.batches_run = 0
        self.items_run = 0
        self.last_progress = time.monotonic()  # when a batch last finished (or the batcher was made)
        self._m: dict[str, Any] = {}  # this model's labelled metric children (labels() once, not per request)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        m = self.metrics
        if m is not None:
            self._m = {"batch_size": m.batch_size.labels(self.name), "inference": m.inference.labels(self.name),
                       "queue_wait": m.queue_wait.labels(self.name), "queue_depth": m.queue_depth.labels(self.name),
                       "stats": m.stats.model(self.name)}
        self._wake = asyncio.Event()
        self._accepting = True
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")

    @property
    def depth(self) -> int:
        return len(self._pending)

    @property
    def mean_batch_size(self) -> float:
        return self.items_run / self.batches_run if self.batches_run else 0.0

    async def drain(self, timeout: float) -> None:
        """Stop admitting; finish queued and running batches (every accepted item gets an answer)."""
        self._accepting = False
        if self._task is None:
            return
        assert self._wake is not None
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except (asyncio.TimeoutError, TimeoutError):
            log.error("batcher %s: drain timed out with %d queued", self.name, len(self._pending))
            self._task.cancel()
            while self._pending:
                item = self._pending.popleft()
                if not item.future.done():
                    item.future.set_exception(NotReady("server shutting down"))
        self._executor.shutdown()

    # -- admission ---------------------------------------------------------------------------
    def submit(self, payload: Any, deadline: float, request_id: str = "-", dispatch: bool = True) -> asyncio.Future:
        """Queue one item; its future gets the ItemResult (or the error). `dispatch=False`: more items of the same
        caller follow (call `dispatch()` after the last), so an idle model takes them as one batch."""
        if not self._accepting:
            raise NotReady(f"model '{self.name}' is not accepting requests (shutting down)")
        if len(self._pending) >= self.queue_size:
            self._reject("queue_full")
            # rough time to work off the queue, at least 1 s
            raise QueueFull(self.name, retry_after=max(1, math.ceil(self.max_delay_s * 2)))
        loop = asyncio.get_running_loop()
        item = WorkItem(payload, loop.create_future(), deadline, time.monotonic(), request_id)
        self._pending.append(item)
        if dispatch:
            self._dispatch(loop)
        return item.future

    def dispatch(self) -> None:
        """Items submitted with `dispatch=False` may go now."""
        if self._pending:
            self._dispatch(asyncio.get_running_loop())

    def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._outstanding == 0 and self._accepting:  # idle model: the batch goes now, from here
            self._seal(loop)
            return
        self._gauge()
        # Busy model: the scheduling task sleeps until a batch ends (two outstanding) or until the forming batch's
        # max_delay (counted from its first item). Only a first item (it starts that clock) or a full batch
        # changes what it waits for; waking it for every other arrival was CPU spent under load for nothing.
        n = len(self._pending)
        if n == 1 or n >= self.max_batch_size or not self._accepting:
            assert self._wake is not None
            self._wake.set()

    # -- scheduling --------------------------------------------------------------------------
    async def _loop(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            if not self._pending:
                if not self._accepting and self._outstanding == 0:
                    return
                await self._wake.wait()
                continue
            if self._outstanding >= 2:  # one running + one sealed waiting: keep filling
                await self._wake.wait()
                continue
            if self._outstanding == 1 and self._accepting and len(self._pending) < self.max_batch_size:
                remaining = self._pending[0].enqueued + self.max_delay_s - time.monotonic()
                if remaining > 0:
                    timer = loop.call_later(remaining, self._wake.set)
                    try:
                        await self._wake.wait()
                    finally:
                        timer.cancel()
                    continue
            self._seal(loop)

    def _seal(self, loop: asyncio.AbstractEventLoop) -> None:
        batch: list[WorkItem] = []
        now = time.monotonic()
        while self._pending and len(batch) < self.max_batch_size:
            item = self._pending.popleft()
            if item.future.done():  # caller gone (deadline / disconnect): counted by the caller
                continue
            if item.deadline <= now:
                item.future.set_exception(DeadlineExceeded())
                self._reject("timeout")
                continue
            batch.append(item)
        self._gauge()
        if not batch:
            return
        self._outstanding += 1
        fut = self._executor.submit(loop, self._run, batch)
        fut.add_done_callback(lambda f, b=batch: self._done(b, f))

    def _run(self, batch: list[WorkItem]) -> _BatchRun:
        """Runs in the model's inference thread."""
        run = _BatchRun(started=time.monotonic())
        live: list[WorkItem] = []
        for item in batch:
            if item.future.done():
                run.outcomes.append(_Outcome(item, "gone"))
            elif item.deadline <= run.started:
                run.outcomes.append(_Outcome(item, "expired"))
            else:
                live.append(item)
        run.size = len(live)
        if live:
            fitted: list[int] = []  # sizes that ran after an out-of-memory in this batch
            run.outcomes += self._infer(live, fitted, after_oom=False)
            if fitted:
                self._lower(max(fitted), len(live))
        run.seconds = time.monotonic() - run.started
        return run

    def _infer(self, items: list[WorkItem], fitted: list[int], after_oom: bool) -> list[_Outcome]:
        """Run `items` as one batch. On out-of-memory: the two halves, each the same way (`fitted` collects the
        sizes that ran after an out-of-memory); on any other error: each item alone."""
        try:
            outputs = list(self.infer([it.payload for it in items]))
            if len(outputs) != len(items):
                raise RuntimeError(f"infer returned {len(outputs)} outputs for {len(items)} inputs")
        except Exception as exc:  # noqa: BLE001
            if is_out_of_memory(exc):
                if len(items) == 1:
                    return [_Outcome(items[0], "error", _alone_out_of_memory(exc))]
                log.info("batcher %s: batch of %d ran out of memory (%s); retrying it in halves", self.name,
                         len(items), _short(exc))
                half = (len(items) + 1) // 2
                return self._infer(items[:half], fitted, True) + self._infer(items[half:], fitted, True)
            if len(items) == 1:
                return [_Outcome(items[0], "error", exc)]
            log.warning("batcher %s: batch of %d failed (%s: %s); retrying items one by one",
                        self.name, len(items), type(exc).__name__, exc)
            out = []
            for it in items:
                try:
                    out.append(_Outcome(it, "ok", list(self.infer([it.payload]))[0]))
                except Exception as item_exc:  # noqa: BLE001
                    out.append(_Outcome(it, "error", _alone_out_of_memory(item_exc)
                                        if is_out_of_memory(item_exc) else item_exc))
            return out
        if after_oom:
            fitted.append(len(items))
        return [_Outcome(it, "ok", out) for it, out in zip(items, outputs)]

    def _lower(self, size: int, oom_at: int) -> None:
        """After a batch of `oom_at` ran out of memory and batches of `size` ran: no batch bigger than `size` from
        now on (the sealed batch already waiting, if any, is split the same way if it does not fit)."""
        if size >= self.max_batch_size:
            return
        before, self.max_batch_size = self.max_batch_size, size
        source = f"lowered after out-of-memory at {oom_at}"
        log.warning("batcher %s: a batch of %d ran out of memory; max batch size lowered from %d to %d (the largest "
                    "that then ran)", self.name, oom_at, before, size)
        if self.on_lowered is not None:
            self.on_lowered(size, source)

    @property
    def busy(self) -> bool:
        """A batch is running or sealed and waiting to run."""
        return self._outstanding > 0

    def _done(self, batch: list[WorkItem], fut: asyncio.Future) -> None:
        self._outstanding -= 1
        self.last_progress = time.monotonic()
        assert self._wake is not None
        self._wake.set()
        if fut.cancelled() or fut.exception() is not None:
            exc = None if fut.cancelled() else fut.exception()
            log.error("batcher %s: batch crashed: %r", self.name, exc)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(InferenceFailed())
            return
        run: _BatchRun = fut.result()
        m = self._m
        if run.size:
            self.batches_run += 1
            self.items_run += run.size
            if m:
                m["batch_size"].observe(run.size)
                m["inference"].observe(run.seconds)
                m["stats"].execution(run.size, run.seconds)
        for oc in run.outcomes:
            item = oc.item
            if oc.kind == "gone" or item.future.done():
                continue
            if oc.kind == "expired":
                self._reject("timeout")
                item.future.set_exception(DeadlineExceeded())
                continue
            queue_s = run.started - item.enqueued
            if m:
                m["queue_wait"].observe(queue_s)
                stats = m["stats"]
                stats.queue.add(queue_s)
                if oc.kind == "ok":
                    stats.compute_infer.add(run.seconds)
            if oc.kind == "ok":
                item.future.set_result(ItemResult(oc.value, run.size, queue_s, run.seconds))
            else:
                exc = oc.value
                token = request_id_var.set(item.request_id)
                try:
                    log.error("inference failed on model %s: %s: %s", self.name, type(exc).__name__,
                              _short(exc.__cause__) if isinstance(exc, InferenceFailed) and exc.__cause__ else exc)
                finally:
                    request_id_var.reset(token)
                # an InferenceFailed made here carries its own message (out of memory alone); any other error's
                # text stays in the log (it may show internals)
                item.future.set_exception(exc if isinstance(exc, InferenceFailed) else InferenceFailed())

    def _reject(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.rejections.labels(self.name, reason).inc()

    def _gauge(self) -> None:
        if self._m:
            self._m["queue_depth"].set(len(self._pending))


def _alone_out_of_memory(exc: BaseException) -> InferenceFailed:
    """The answer for an item that runs out of memory in a batch of its own (smaller batches cannot help)."""
    err = InferenceFailed("the model ran out of memory on this input alone (it needs more device memory than is free)")
    err.__cause__ = exc
    return err


def _short(exc: BaseException, limit: int = 300) -> str:
    """An error on one line, cut (onnxruntime's allocation errors carry long stack-like texts)."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."

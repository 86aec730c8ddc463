"""Worker threads that hand each result back to the event loop with a single `call_soon_threadsafe`.

`loop.run_in_executor` goes through `concurrent.futures`: a Future with a Condition, a work item, the executor's
queue and lock, then `wrap_future`'s callbacks copying the state into an asyncio future. A profile of a served
request showed that machinery as a visible share of the event loop's CPU, twice per request (preprocessing and
inference). Here a job is a tuple on a `queue.SimpleQueue` (C, lock-free for the caller) and the result is set on
the asyncio future from the loop's thread. Whatever the function raises (BaseException included: a worker that
"exits" keeps working) becomes the future's exception.

`GroupedWorkers` runs one function over groups of jobs: what waits in the queue when a thread gets to it, up to
`max_group` (under load, the requests that arrived meanwhile; when idle, one), answered with one wake-up of the loop.
"""
from __future__ import annotations

import asyncio
import contextvars
import queue
import threading
from typing import Any, Callable


def _deliver(fut: asyncio.Future, ok: bool, value: Any) -> None:
    if fut.cancelled():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass


def _deliver_many(results: list[tuple[asyncio.Future, bool, Any]]) -> None:
    for fut, ok, value in results:
        _deliver(fut, ok, value)


class LoopWorkers:
    """`n` daemon threads named `{name}-{i}`, started on first use; `submit(loop, fn, *args)` -> asyncio.Future.

    Each job runs in a copy of the submitter's context (the request id reaches log lines written in the thread).
    `shutdown()` stops the threads after the jobs already taken; jobs still queued are cancelled."""

    def __init__(self, n: int, name: str):
        self.n = max(1, n)
        self.name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._closed = False

    def _start(self) -> None:
        for i in range(self.n):
            t = threading.Thread(target=self._work, name=f"{self.name}-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def submit(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        if self._closed:
            raise RuntimeError(f"{self.name}: shut down")
        if not self._threads:
            self._start()
        fut = loop.create_future()
        self._jobs.put((loop, fut, contextvars.copy_context(), fn, args))
        return fut

    def _work(self) -> None:
        jobs = self._jobs
        while True:
            job = jobs.get()
            if job is None:
                return
            self._run(job)  # its references (arguments, result) are gone once it returns, before the next wait
            del job

    def _run(self, job: tuple) -> None:
        loop, fut, ctx, fn, args = job
        if fut.cancelled():  # its caller has gone (a plain attribute read: safe from this thread)
            return
        try:
            value, ok = ctx.run(fn, *args), True
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, whatever it is
            value, ok = exc, False
        _post(loop, _deliver, fut, ok, value)

    def shutdown(self) -> None:
        """No more jobs; queued ones are cancelled; the threads end after the job each one is running."""
        self._closed = True
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                loop, fut = job[0], job[1]
                try:
                    loop.call_soon_threadsafe(fut.cancel)
                except RuntimeError:
                    pass
        for _ in self._threads:
            self._jobs.put(None)


class GroupedWorkers(LoopWorkers):
    """`n` threads running `run_many` over groups of jobs: `submit(loop, *args)` -> asyncio.Future of that job's result.

    A thread takes the next job and up to `max_group - 1` more already queued (it never waits for more), calls
    `run_many([(context, args), ...])` -> [(ok, value), ...] once for the group, and hands the results to each loop
    with one `call_soon_threadsafe`. `run_many` isolates the jobs (one job's exception is its own result); should
    it raise itself, every job of the group gets that exception. Cancelled jobs are left out of their group."""

    def __init__(self, n: int, name: str, run_many: Callable[[list[tuple[contextvars.Context, tuple]]],
                                                             list[tuple[bool, Any]]], max_group: int = 8):
        super().__init__(n, name)
        self.run_many = run_many
        self.max_group = max(1, max_group)

    def submit(self, loop: asyncio.AbstractEventLoop, *args: Any) -> asyncio.Future:  # type: ignore[override]
        return super().submit(loop, self.run_many, *args)

    def _take(self, first: tuple) -> list[tuple]:
        """`first` and the jobs queued behind it (at most max_group in all; a shutdown marker is put back)."""
        group = [first]
        while len(group) < self.max_group:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._jobs.put(None)  # this thread stops after its group; the marker may be another thread's
                break
            group.append(job)
        return [job for job in group if not job[1].cancelled()]  # their callers have gone

    def _run(self, job: tuple) -> None:
        group = self._take(job)
        if not group:
            return
        try:
            results = self.run_many([(ctx, args) for _, _, ctx, _, args in group])
        except BaseException as exc:  # noqa: BLE001 - handed to every caller of the group
            results = [(False, exc)] * len(group)
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for (loop, fut, *_), (ok, value) in zip(group, results):
            by_loop.setdefault(loop, []).append((fut, ok, value))
        for loop, delivered in by_loop.items():
            _post(loop, _deliver_many, delivered)

"""The device process of MMSERVE_WORKERS > 1: the registry with the runtimes and one batcher per model, fed by
every front-end process over a private Unix socket (`app/core/ipc.py` frames), so batches form across all of them.

In the spirit of vLLM's API servers feeding one EngineCore over IPC, and of text-embeddings-inference's router
appending tokenised entries to one queue with a reply channel each: a front-end parses, decodes and tokenises,
and sends the engine only what inference needs (a `Prepared` with its arrays); the engine submits it into the
model's real `Batcher` and answers on the same connection. Messages (tuples, the first element names them):

  front-end -> engine
    ("submit", model, version, [(rid, Prepared, deadline, request_id), ...])   then the batcher may go
    ("cancel", [rid, ...])                        client gone or deadline hit: the batcher drops those items
    ("stats", qid)                                the statistics extension's totals, please
    ("stats_part", qid, {model: ModelStats})      this front-end's request-side counters (answering stats_pull)
  engine -> front-end
    ("state", snapshot)                           the served models and their states, on every change
    ("load", {model: (depth, busy, last_progress)})   the batchers' queue depths, on every change
    ("result", rid, ItemResult, load) / ("error", rid, error, load)   one item's answer, with its model's load
    ("stats_pull", qid) / ("stats", qid, {model: ModelStats})

A deadline travels as a number: time.monotonic() is one clock for every process on Linux. Changes of state are
found by comparing snapshots every TICK_S (model loading is seconds; a probe sees a change within TICK_S).
"""
from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import os
from typing import Any

from app.core import ipc
from app.core.errors import NotReady, ServingError
from app.core.registry import Registry
from app.core.stats import ModelStats, Statistics

log = logging.getLogger("mmserve.engine")

TICK_S = 0.05
STATS_WAIT_S = 1.0  # the longest a statistics query waits for the front-ends' parts
REQUEST_SIDE = ("success", "fail", "compute_input", "compute_output")  # counted in front-ends, not here


class _Conn:
    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer
        self.futures: dict[int, asyncio.Future] = {}  # rid -> the engine batcher's future of that item


class Engine:
    def __init__(self, registry: Registry, path: str):
        self.registry = registry
        self.path = path
        self.conns: set[_Conn] = set()
        self._server: asyncio.AbstractServer | None = None
        self._tasks: list[asyncio.Task] = []
        self._state: dict[str, Any] | None = None
        self._load: dict[str, tuple] | None = None
        self._queries: dict[int, tuple[list[dict], set[_Conn], asyncio.Event]] = {}
        self._qids = itertools.count(1)

    async def start(self) -> None:
        """Scan the repository, start loading in the background, serve the socket (0600)."""
        self.registry.scan()
        self._server = await asyncio.start_unix_server(self._serve, path=self.path, limit=1 << 20)
        os.chmod(self.path, 0o600)
        self._tasks = [asyncio.create_task(self.registry.load_all(), name="model-loader"),
                       asyncio.create_task(self._tick(), name="engine-tick")]

    async def stop(self, timeout: float) -> None:
        """After the front-ends have gone: drain the batchers, release the models, close the socket."""
        self.registry.draining = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.registry.drain(timeout)
        if self._server is not None:
            self._server.close()
        for conn in list(self.conns):
            conn.writer.close()

    # -- state pushed to front-ends ------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        r = self.registry
        models = []
        for e in r.entries.values():
            rt = e.runtime
            models.append({
                "name": e.name, "version": e.version, "directory": str(e.directory) if e.directory else None,
                "state": e.state, "reason": e.reason, "backend": rt.backend if rt else None,
                "device": rt.device if rt else None, "provider": rt.provider if rt else None,
                "max_batch_size": e.max_batch_size, "batch_size_source": e.batch_size_source,
                "batch_calibration": e.batch_calibration, "load_seconds": e.load_seconds,
                "warmup_seconds": e.warmup_seconds})
        return {"models": models, "loading_done": r.loading_done, "leaving": r.leaving or r.draining,
                "max_delay_s": r.max_delay_s, "queue_size": r.queue_size}

    def load(self) -> dict[str, tuple]:
        return {e.name: self._load_of(e) for e in self.registry.entries.values() if e.batcher is not None}

    @staticmethod
    def _load_of(entry: Any) -> tuple:
        b = entry.batcher
        return (b.depth, b.busy, b.last_progress) if b is not None else (0, False, 0.0)

    async def _tick(self) -> None:
        while True:
            state, load = self.snapshot(), self.load()
            if state != self._state:
                self._state = state
                self._broadcast(("state", state))
            if load != self._load:
                self._load = load
                self._broadcast(("load", load))
            await asyncio.sleep(TICK_S)

    def _broadcast(self, message: Any) -> None:
        for conn in list(self.conns):
            ipc.send(conn.writer, message)

    # -- one front-end's connection ------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(writer)
        self.conns.add(conn)
        ipc.send(writer, ("state", self.snapshot()))
        ipc.send(writer, ("load", self.load()))
        try:
            while True:
                message = await ipc.receive(reader)
                kind = message[0]
                if kind == "submit":
                    self._submit(conn, *message[1:])
                elif kind == "cancel":
                    for rid in message[1]:
                        fut = conn.futures.pop(rid, None)
                        if fut is not None:
                            fut.cancel()
                elif kind == "stats":
                    asyncio.create_task(self._statistics(conn, message[1]))
                elif kind == "stats_part":
                    self._stats_part(conn, message[1], message[2])
                else:
                    log.error("engine: unknown message %r from a front-end", kind)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception:  # noqa: BLE001 - a broken front-end must not take the engine down
            log.exception("engine: dropping a front-end connection")
        finally:
            self.conns.discard(conn)
            for fut in conn.futures.values():  # its clients are gone with it
                fut.cancel()
            conn.futures.clear()
            for _, waiting, done in self._queries.values():
                waiting.discard(conn)
                if not waiting:
                    done.set()
            writer.close()

    def _submit(self, conn: _Conn, name: str, version: int | None, items: list[tuple]) -> None:
        entry = self.registry.entries.get(name)
        if entry is None or entry.version != version or not self.registry.is_ready(entry):
            err = NotReady(f"model '{name}' is not ready" if entry is None or entry.version == version
                           else f"model '{name}' version {version} is no longer served")
            for rid, *_ in items:
                ipc.send(conn.writer, ("error", rid, ipc.error_out(err), (name, 0, False, 0.0)))
            return
        batcher = entry.batcher
        assert batcher is not None
        for rid, prepared, deadline, request_id in items:
            try:
                fut = batcher.submit(prepared, deadline, request_id, dispatch=False)
            except ServingError as err:
                ipc.send(conn.writer, ("error", rid, ipc.error_out(err), (name, *self._load_of(entry))))
                continue
            conn.futures[rid] = fut
            fut.add_done_callback(lambda f, rid=rid: self._answer(conn, rid, entry, f))
        batcher.dispatch()

    def _answer(self, conn: _Conn, rid: int, entry: Any, fut: asyncio.Future) -> None:
        conn.futures.pop(rid, None)
        if fut.cancelled():  # the front-end cancelled it, or went away
            return
        load = (entry.name, *self._load_of(entry))
        exc = fut.exception()
        if exc is not None:
            ipc.send(conn.writer, ("error", rid, ipc.error_out(exc), load))
        else:
            ipc.send(conn.writer, ("result", rid, fut.result(), load))

    # -- statistics extension: the engine's execution counters + every front-end's request counters ---------
    async def _statistics(self, asker: _Conn, asker_qid: int) -> None:
        qid = next(self._qids)
        parts: list[dict] = []
        waiting, done = set(self.conns), asyncio.Event()
        self._queries[qid] = (parts, waiting, done)
        self._broadcast(("stats_pull", qid))
        try:
            await asyncio.wait_for(done.wait(), STATS_WAIT_S)
        except (asyncio.TimeoutError, TimeoutError):
            log.warning("statistics: %d front-end(s) did not answer in %.1fs", len(waiting), STATS_WAIT_S)
        finally:
            self._queries.pop(qid, None)
        ipc.send(asker.writer, ("stats", asker_qid, merge_statistics(self.registry.metrics.stats, parts)))

    def _stats_part(self, conn: _Conn, qid: int, part: dict) -> None:
        query = self._queries.get(qid)
        if query is None:
            return
        parts, waiting, done = query
        parts.append(part)
        waiting.discard(conn)
        if not waiting:
            done.set()


def merge_statistics(engine: Statistics, parts: list[dict[str, ModelStats]]) -> dict[str, ModelStats]:
    """The engine's batch counters (queue, compute_infer, counts per batch size) plus the request-side counters
    (success, fail, compute_input, compute_output) of every front-end."""
    out = {name: copy.deepcopy(s) for name, s in engine.models.items()}
    for part in parts:
        for name, s in part.items():
            total = out.setdefault(name, ModelStats())
            for field in REQUEST_SIDE:
                mine, theirs = getattr(total, field), getattr(s, field)
                mine.count += theirs.count
                mine.ns += theirs.ns
    return out


__all__ = ["Engine", "merge_statistics"]

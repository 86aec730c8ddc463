"""The device process of MMSERVE_WORKERS > 1: the registry with the runtimes and one batcher per model, fed by
every front-end process over a private Unix socket (`app/core/ipc.py` frames), so batches form across all of them.

In the spirit of vLLM's API servers feeding one EngineCore over IPC, and of text-embeddings-inference's router
appending tokenised entries to one queue with a reply channel each: a front-end parses, decodes and tokenises,
and sends the engine only what inference needs (a `Prepared` with its arrays); the engine submits it into the
model's real `Batcher` and answers on the same connection. Messages (tuples, the first element names them):

  front-end -> engine
    ("submit", (model, version, serial), [(rid, Prepared, deadline, request_id), ...])   then the batcher may go
    ("cancel", [rid, ...])                        client gone or deadline hit: the batcher drops those items
    ("stats", qid)                                the statistics extension's totals, please
    ("stats_part", qid, {model: ModelStats})      this front-end's request-side counters (answering stats_pull)
    ("control", qid, action, arg)                 model control: ("index", ready_only), ("load" | "unload", name)
    ("state_ack", seq)                            state `seq` is applied: this front-end serves what it says
    ("release", serial)                           no request of this front-end runs on that entry any more
  engine -> front-end
    ("state", seq, snapshot)                      the served models and their states, on every change
    ("load", {model: (depth, busy, last_progress)})   the batchers' queue depths, on every change
    ("result", rid, ItemResult, load) / ("error", rid, error, load)   one item's answer, with its model's load
    ("stats_pull", qid) / ("stats", qid, {model: ModelStats})
    ("control", qid, result, error)               index rows (or None) / the core error, or None

Model control (MODEL_CONTROL explicit / poll) runs here, on the engine's registry: the poller, and the load /
unload / index requests any front-end forwards (`app/core/remote_control.py`). Two rules keep every front-end's
view as one process's would be:
  * a load or unload is answered only once every front-end has acknowledged a state taken after it
    (`_settle`): when a client hears "loaded", every front-end routes to the new version; after "unloaded",
    every front-end answers 404;
  * each entry a front-end was sent counts as a request running on it (`entry.active`, which `Registry.retire`
    waits for) until that front-end releases it, once its own requests on it are answered: a replaced or
    unloaded version drains, as in one process, only after the requests every front-end started on it.
Entries are named by a serial number, so a version unloaded and loaded again is a new entry everywhere.

A deadline travels as a number: time.monotonic() is one clock for every process on Linux. Changes of state are
found by comparing snapshots every TICK_S (model loading is seconds; a probe sees a change within TICK_S).
"""
from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import os
import weakref
from typing import Any

from app.core import ipc
from app.core.errors import InternalError, NotReady, ServingError
from app.core.loading import ModelEntry
from app.core.model_control import ModelControl
from app.core.registry import Registry
from app.core.stats import ModelStats, Statistics

log = logging.getLogger("mmserve.engine")

TICK_S = 0.05
STATS_WAIT_S = 1.0  # the longest a statistics query waits for the front-ends' parts
SETTLE_S = 30.0  # the longest a load / unload waits for every front-end to take the new state
REQUEST_SIDE = ("success", "fail", "compute_input", "compute_output")  # counted in front-ends, not here


class _Conn:
    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer
        self.futures: dict[int, asyncio.Future] = {}  # rid -> the engine batcher's future of that item
        self.holds: dict[int, ModelEntry] = {}  # serial -> an entry this front-end was sent and has not released
        self.acked = 0  # the last state sequence number it has applied


class Engine:
    def __init__(self, registry: Registry, path: str, control: ModelControl):
        self.registry = registry
        self.path = path
        self.control = control
        self.conns: set[_Conn] = set()
        self._server: asyncio.AbstractServer | None = None
        self._tasks: list[asyncio.Task] = []
        self._state: dict[str, Any] | None = None
        self._state_entries: list[ModelEntry] = []  # the entries `_state` describes
        self._seq = 0
        self._load: dict[str, tuple] | None = None
        self._queries: dict[int, tuple[list[dict], set[_Conn], asyncio.Event]] = {}
        self._qids = itertools.count(1)
        self._serials = itertools.count(1)
        self._serial_of: weakref.WeakKeyDictionary[ModelEntry, int] = weakref.WeakKeyDictionary()
        self._entry_of: weakref.WeakValueDictionary[int, ModelEntry] = weakref.WeakValueDictionary()

    async def start(self) -> None:
        """Scan the repository, start loading in the background and the repository poller (MODEL_CONTROL=poll),
        serve the socket (0600)."""
        self.registry.scan()
        self._server = await asyncio.start_unix_server(self._serve, path=self.path, limit=1 << 20)
        os.chmod(self.path, 0o600)
        self._tasks = [asyncio.create_task(self.registry.load_all(), name="model-loader"),
                       asyncio.create_task(self._tick(), name="engine-tick")]
        self.control.start()

    async def stop(self, timeout: float) -> None:
        """After the front-ends have gone: stop polling, drain the batchers, release the models, close the
        socket."""
        self.registry.draining = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.control.stop()
        await self.registry.drain(timeout)
        if self._server is not None:
            self._server.close()
        for conn in list(self.conns):
            conn.writer.close()

    # -- state pushed to front-ends ------------------------------------------------------------
    def serial(self, entry: ModelEntry) -> int:
        """The entry's number, the same for as long as it lives (a version loaded again is a new entry)."""
        serial = self._serial_of.get(entry)
        if serial is None:
            serial = self._serial_of[entry] = next(self._serials)
            self._entry_of[serial] = entry
        return serial

    def snapshot(self) -> dict[str, Any]:
        r = self.registry
        models = []
        for e in r.entries.values():
            rt = e.runtime
            models.append({
                "name": e.name, "version": e.version, "serial": self.serial(e),
                "directory": str(e.directory) if e.directory else None,
                "state": e.state, "reason": e.reason, "backend": rt.backend if rt else None,
                "device": rt.device if rt else None, "provider": rt.provider if rt else None,
                "max_batch_size": e.max_batch_size, "batch_size_source": e.batch_size_source,
                "batch_calibration": e.batch_calibration, "load_seconds": e.load_seconds,
                "warmup_seconds": e.warmup_seconds})
        return {"models": models, "loading_done": r.loading_done, "leaving": r.leaving or r.draining,
                "max_delay_s": r.max_delay_s, "queue_size": r.queue_size,
                "drain_timeout_s": self.control.drain_timeout_s}

    def load(self) -> dict[str, tuple]:
        return {e.name: self._load_of(e) for e in self.registry.entries.values() if e.batcher is not None}

    @staticmethod
    def _load_of(entry: Any) -> tuple:
        b = entry.batcher
        return (b.depth, b.busy, b.last_progress) if b is not None else (0, False, 0.0)

    async def _tick(self) -> None:
        while True:
            self._push_state()
            load = self.load()
            if load != self._load:
                self._load = load
                self._broadcast(("load", load))
            await asyncio.sleep(TICK_S)

    def _push_state(self) -> int:
        """Send the state to every front-end if it changed since the last one sent; its sequence number."""
        state = self.snapshot()
        if state != self._state:
            self._state, self._state_entries = state, list(self.registry.entries.values())
            self._seq += 1
            for conn in list(self.conns):
                self._send_state(conn)
        return self._seq

    def _send_state(self, conn: _Conn) -> None:
        for entry in self._state_entries:  # held from now until that front-end releases it
            serial = self.serial(entry)
            if serial not in conn.holds:
                conn.holds[serial] = entry
                entry.active += 1
        ipc.send(conn.writer, ("state", self._seq, self._state))

    async def _settle(self) -> None:
        """Push the current state and wait until every front-end has applied it (or a later one)."""
        seq = self._push_state()
        loop = asyncio.get_running_loop()
        end = loop.time() + SETTLE_S
        while any(conn.acked < seq for conn in self.conns):
            if loop.time() > end:
                late = sum(conn.acked < seq for conn in self.conns)
                log.error("engine: %d front-end(s) did not take state %d within %.0fs", late, seq, SETTLE_S)
                raise InternalError(f"{late} front-end process(es) did not take the new model state within "
                                    f"{SETTLE_S:.0f}s")
            await asyncio.sleep(0.005)

    def _broadcast(self, message: Any) -> None:
        for conn in list(self.conns):
            ipc.send(conn.writer, message)

    # -- one front-end's connection ------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(writer)
        self._push_state()  # up to date (for the others too) before this one gets it
        self.conns.add(conn)
        self._send_state(conn)
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
                elif kind == "state_ack":
                    conn.acked = max(conn.acked, message[1])
                elif kind == "release":
                    self._release(conn, message[1])
                elif kind == "control":
                    asyncio.create_task(self._control(conn, *message[1:]))
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
            for serial in list(conn.holds):
                self._release(conn, serial)
            for _, waiting, done in self._queries.values():
                waiting.discard(conn)
                if not waiting:
                    done.set()
            writer.close()

    def _release(self, conn: _Conn, serial: int) -> None:
        entry = conn.holds.pop(serial, None)
        if entry is not None:
            entry.active -= 1

    def _submit(self, conn: _Conn, key: tuple[str, int | None, int], items: list[tuple]) -> None:
        name, version, serial = key
        entry = self._entry_of.get(serial)
        if entry is None or not self.registry.is_ready(entry):  # a replaced version serves until it has drained
            err = NotReady(f"model '{name}' version {version} is no longer served" if entry is None or entry.retired
                           else f"model '{name}' is not ready")
            for rid, *_ in items:
                ipc.send(conn.writer, ("error", rid, ipc.error_out(err), (name, 0, False, 0.0)))
            return
        batcher = entry.batcher
        assert batcher is not None
        for rid, prepared, deadline, request_id in items:
            try:
                fut = batcher.submit(prepared, deadline, request_id, dispatch=False)
            except ServingError as err:
                ipc.send(conn.writer, ("error", rid, ipc.error_out(err), self._load_report(entry)))
                continue
            conn.futures[rid] = fut
            fut.add_done_callback(lambda f, rid=rid: self._answer(conn, rid, entry, f))
        batcher.dispatch()

    def _load_report(self, entry: ModelEntry) -> tuple:
        """The load of the model's serving entry (a front-end keeps one per name), with the name."""
        return (entry.name, *self._load_of(self.registry.entries.get(entry.name, entry)))

    def _answer(self, conn: _Conn, rid: int, entry: ModelEntry, fut: asyncio.Future) -> None:
        conn.futures.pop(rid, None)
        if fut.cancelled():  # the front-end cancelled it, or went away
            return
        load = self._load_report(entry)
        exc = fut.exception()
        if exc is not None:
            ipc.send(conn.writer, ("error", rid, ipc.error_out(exc), load))
        else:
            ipc.send(conn.writer, ("result", rid, fut.result(), load))

    # -- model control, asked by a front-end -------------------------------------------------------
    async def _control(self, conn: _Conn, qid: int, action: str, arg: Any) -> None:
        """Run one repository request on the engine's ModelControl; a load or unload is answered once every
        front-end has taken the state it left (`_settle`), whether it succeeded or not."""
        result, error = None, None
        try:
            if action == "index":
                result = await self.control.repository_index(ready_only=arg)
            elif action == "load":
                await self.control.load(arg)
            elif action == "unload":
                await self.control.unload(arg)
            else:
                raise ValueError(f"unknown model control action {action!r}")
        except ServingError as err:
            error = ipc.error_out(err)
        except Exception as exc:  # noqa: BLE001 - answered as an internal error, as in one process
            log.exception("engine: model control %s %r failed", action, arg)
            error = ipc.error_out(exc)
        if action in ("load", "unload"):
            try:
                await self._settle()
            except ServingError as err:
                error = error or ipc.error_out(err)
        ipc.send(conn.writer, ("control", qid, result, error))

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

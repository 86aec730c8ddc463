"""A front-end process's side of MMSERVE_WORKERS > 1: the engine (`app/core/engine.py`) seen as a registry.

`FrontRegistry` is the `Registry` the front-end's Service, REST, v2 and gRPC use; its entries mirror the engine's
(state, reason, batch size and its source, runtime device / provider, from the snapshots the engine pushes on
every change), each with the model's manifest and preprocessing loaded here (no runtime), and `RemoteBatcher` as
`entry.batcher`: the same interface as `Batcher` for the Service (submit / dispatch / depth / queue_size /
max_delay_s / busy / last_progress / drain), backed by the engine's batcher of that model.

The served set changes as the engine's does (model control, `app/core/engine.py`): a new entry (a new version,
or a model loaded) is mirrored, its preprocessing loaded, then published here; the entry it replaces, or one the
engine no longer serves, is retired here as `Registry` retires one (requests that chose it run on its successor;
those already running on it are answered), and once its last request is answered the engine is told it may
drain it ("release"). Each state is acknowledged once applied, so a load or unload is answered only when every
front-end serves its outcome.

When the engine connection is lost the front-end answers 503 (`not_ready`) to every model request, readiness
turns false, and `on_lost` runs (the front-end process starts its own graceful shutdown).
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from app.core import ipc
from app.core.batcher import Prepared
from app.core.errors import NotReady
from app.core.loading import FAILED, PENDING, READY, LoadOptions, ModelEntry, load_preprocessing
from app.core.registry import Registry
from app.core.stats import Statistics
from models.manifest import read_manifest

log = logging.getLogger("mmserve.frontend")

CONNECT_S = 30.0  # how long a front-end keeps trying to reach the engine at start-up


@dataclasses.dataclass
class RemoteRuntime:
    """What a front-end knows of the engine's runtime of a model (for /v1/models, v2 metadata, model_info)."""

    backend: str
    device: str
    provider: str

    def close(self) -> None:
        pass


@dataclasses.dataclass(eq=False)
class MirrorEntry(ModelEntry):
    """A front-end's copy of one of the engine's entries, which the engine numbers (`serial`)."""

    serial: int = 0


class RemoteBatcher:
    """`entry.batcher` in a front-end: the engine's batcher of the same model version."""

    def __init__(self, client: EngineClient, name: str, version: int | None, serial: int, *, max_batch_size: int,
                 max_delay_s: float, queue_size: int):
        self.client = client
        self.name = name
        self.version = version
        self.serial = serial  # the engine's number of this entry
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.queue_size = queue_size
        self.depth = 0  # the engine's queue depth, as last reported (replies and pushes)
        self.engine_busy = False
        self.last_progress = time.monotonic()
        self._held: list[tuple] = []  # submitted with dispatch=False, sent together by dispatch()
        self._outstanding = 0  # items sent and not answered

    @property
    def busy(self) -> bool:
        """A batch is running at the engine, or items of this front-end wait there."""
        return self.engine_busy or self._outstanding > 0

    def submit(self, payload: Prepared, deadline: float, request_id: str = "-", dispatch: bool = True
               ) -> asyncio.Future:
        if not self.client.connected:
            raise NotReady(f"model '{self.name}' is not ready (the engine process is gone)")
        fut = asyncio.get_running_loop().create_future()
        rid = self.client.track(fut, self)
        f = payload.features  # only what inference needs travels (word ids and meta stay for postprocessing)
        slim = Prepared(dataclasses.replace(f, word_ids=None) if f.word_ids is not None else f, payload.length)
        self._held.append((rid, slim, deadline, request_id))
        self._outstanding += 1
        if dispatch:
            self.dispatch()
        return fut

    def dispatch(self) -> None:
        if self._held:
            held, self._held = self._held, []
            self.client.send(("submit", (self.name, self.version, self.serial), held))

    def answered(self) -> None:
        self._outstanding -= 1

    def report(self, depth: int, busy: bool, last_progress: float) -> None:
        self.depth, self.engine_busy, self.last_progress = depth, busy, last_progress

    async def drain(self, timeout: float) -> None:
        """The engine drains the real batcher (after every front-end has gone)."""


class EngineClient:
    """The connection to the engine: requests out, answers and pushed state in."""

    def __init__(self, path: str, registry: FrontRegistry):
        self.path = path
        self.registry = registry
        self.connected = False
        self.closing = False
        self.on_lost: Callable[[], None] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._pending: dict[int, tuple[asyncio.Future, RemoteBatcher]] = {}
        self._queries: dict[int, asyncio.Future] = {}
        self._rids = itertools.count(1)
        self.first_state = asyncio.Event()

    async def connect(self) -> None:
        end = time.monotonic() + CONNECT_S
        parent = os.getppid()  # the engine started this process: once it has gone, there is nothing to wait for
        while True:
            try:
                reader, self._writer = await asyncio.open_unix_connection(self.path, limit=1 << 20)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > end or os.getppid() != parent:
                    raise
                await asyncio.sleep(0.05)
        self.connected = True
        self._reader_task = asyncio.create_task(self._read(reader), name="engine-reader")

    async def close(self) -> None:
        self.closing = True
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)

    def send(self, message: Any) -> None:
        assert self._writer is not None
        ipc.send(self._writer, message)

    def track(self, fut: asyncio.Future, batcher: RemoteBatcher) -> int:
        rid = next(self._rids)
        self._pending[rid] = (fut, batcher)
        fut.add_done_callback(lambda f: self._cancelled(rid) if f.cancelled() else None)
        return rid

    def _cancelled(self, rid: int) -> None:
        """Client gone or deadline hit (Service cancels the future): the engine's batcher drops the item."""
        entry = self._pending.pop(rid, None)
        if entry is not None:
            entry[1].answered()
            if self.connected:
                self.send(("cancel", [rid]))

    async def statistics(self) -> Statistics:
        """The statistics extension's totals over the engine and every front-end."""
        stats = Statistics()
        stats.models.update(await self._ask("stats", timeout=5.0))
        return stats

    async def control(self, action: str, arg: Any) -> Any:
        """One model control request run by the engine's ModelControl (`Engine._control`): "index" (arg:
        ready_only) -> the rows; "load" / "unload" (arg: the model name) -> None, once every front-end serves the
        outcome. Raises the core error the engine raised."""
        return await self._ask("control", action, arg)

    async def _ask(self, kind: str, *args: Any, timeout: float | None = None) -> Any:
        if not self.connected:
            raise NotReady("the engine process is gone")
        qid = next(self._rids)
        fut = self._queries[qid] = asyncio.get_running_loop().create_future()
        self.send((kind, qid, *args))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._queries.pop(qid, None)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                message = await ipc.receive(reader)
                kind = message[0]
                if kind in ("result", "error"):
                    self._answer(*message[1:])
                elif kind == "load":
                    self.registry.apply_load(message[1])
                elif kind == "state":
                    await self.registry.apply_state(message[2], self)
                    self.send(("state_ack", message[1]))
                    self.first_state.set()
                elif kind == "stats_pull":
                    part = {name: s for name, s in self.registry.metrics.stats.models.items()}
                    self.send(("stats_part", message[1], part))
                elif kind == "stats":
                    self._reply(message[1], message[2], None)
                elif kind == "control":
                    self._reply(*message[1:])
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001
            log.exception("front-end: engine connection broken")
        finally:
            self._lost()

    def _reply(self, qid: int, result: Any, error: tuple | None) -> None:
        fut = self._queries.get(qid)
        if fut is not None and not fut.done():
            if error is not None:
                fut.set_exception(ipc.error_in(error))
            else:
                fut.set_result(result)

    def _answer(self, rid: int, value: Any, load: tuple) -> None:
        self.registry.apply_load({load[0]: load[1:]})
        entry = self._pending.pop(rid, None)
        if entry is None:  # cancelled meanwhile
            return
        fut, batcher = entry
        batcher.answered()
        if fut.done():
            return
        if isinstance(value, tuple):
            fut.set_exception(ipc.error_in(value))
        else:
            fut.set_result(value)

    def _lost(self) -> None:
        was = self.connected
        self.connected = False
        pending, self._pending = self._pending, {}
        for fut, _ in pending.values():
            if not fut.done():
                fut.set_exception(NotReady("the engine process is gone"))
        for fut in self._queries.values():
            if not fut.done():
                fut.set_exception(NotReady("the engine process is gone"))
        if was and not self.closing:
            log.error("front-end %d: lost the engine connection; answering 503 and shutting down", os.getpid())
            self.registry.draining = True
            self.first_state.set()
            if self.on_lost is not None:
                self.on_lost()


class FrontRegistry(Registry):
    """The engine's registry as a front-end sees it (module docstring). `load_all` connects to the engine."""

    def __init__(self, repository: Path, metrics: Any, *, engine_path: str, load: LoadOptions = LoadOptions(),
                 max_delay_s: float = 0.005, queue_size: int = 256, strict_readiness: bool = False):
        super().__init__(repository, metrics, load=load, max_delay_s=max_delay_s, queue_size=queue_size,
                         strict_readiness=strict_readiness)
        self.client = EngineClient(engine_path, self)
        self.drain_timeout_s = 30.0  # how long a retired entry's requests may run here (the engine's setting)
        self._releases: set[asyncio.Task] = set()

    def scan(self) -> list[ModelEntry]:
        return []  # the engine scans; its entries arrive with its first snapshot

    def choose(self, task: str, name: str | None) -> ModelEntry:
        """As `Registry.choose`, once the engine's models are known; before (start-up) or after losing the engine,
        NotReady (503), never "no such model"."""
        if not self.client.first_state.is_set():
            raise NotReady("the models are loading")
        if not self.client.connected:
            raise NotReady("the engine process is gone")
        return super().choose(task, name)

    async def load_all(self) -> None:
        """Connect to the engine and take its first snapshot (models' preprocessing loaded)."""
        try:
            await self.client.connect()
            await self.client.first_state.wait()
        except Exception:  # noqa: BLE001
            log.exception("front-end %d: cannot reach the engine at %s", os.getpid(), self.client.path)
            self.draining = True
            if self.client.on_lost is not None:
                self.client.on_lost()

    async def drain(self, timeout: float) -> None:
        await super().drain(timeout)
        for task in self._releases:  # closing the connection releases every entry at the engine
            task.cancel()
        await asyncio.gather(*self._releases, return_exceptions=True)
        await self.client.close()

    def apply_load(self, load: dict[str, tuple]) -> None:
        for name, (depth, busy, last_progress) in load.items():
            entry = self.entries.get(name)
            if entry is not None and isinstance(entry.batcher, RemoteBatcher):
                entry.batcher.report(depth, busy, last_progress)

    async def apply_state(self, snapshot: dict[str, Any], client: EngineClient) -> None:
        """Mirror the engine's entries: a new entry (model, version, or the same version loaded again) gets its
        manifest and preprocessing loaded here (off the event loop) before it is published in this front-end;
        an entry it replaces, or one the engine no longer serves, is retired (`_release`)."""
        self.max_delay_s, self.queue_size = snapshot["max_delay_s"], snapshot["queue_size"]
        self.drain_timeout_s = snapshot["drain_timeout_s"]
        for m in snapshot["models"]:
            current = self.entries.get(m["name"])
            entry = current if isinstance(current, MirrorEntry) and current.serial == m["serial"] else MirrorEntry(
                m["name"], m["version"], Path(m["directory"]) if m["directory"] else None, serial=m["serial"])
            await self._mirror(entry, m, client)
            if entry is not current:
                self._release_later(self.publish(entry), client)
        served = {m["name"] for m in snapshot["models"]}
        for name in [n for n in self.entries if n not in served]:
            self._release_later(self.withdraw(name), client)
        self.loading_done = snapshot["loading_done"]
        if snapshot["leaving"]:
            self.leaving = True

    def _release_later(self, old: ModelEntry | None, client: EngineClient) -> None:
        if old is not None:
            task = asyncio.get_running_loop().create_task(self._release(old, client),
                                                          name=f"release-{old.name}-{old.version}")
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)

    async def _release(self, old: ModelEntry, client: EngineClient) -> None:
        """Once the requests this front-end runs on a retired entry are answered, the engine may drain it."""
        await self.retire(old, self.drain_timeout_s)
        if client.connected and isinstance(old, MirrorEntry):
            client.send(("release", old.serial))

    async def _mirror(self, entry: MirrorEntry, m: dict[str, Any], client: EngineClient) -> None:
        before = (entry.state, entry.reason, entry.runtime)
        for key in ("reason", "max_batch_size", "batch_size_source", "batch_calibration", "load_seconds",
                    "warmup_seconds"):
            setattr(entry, key, m[key])
        if m["backend"] is not None:
            entry.runtime = RemoteRuntime(m["backend"], m["device"], m["provider"])
        state = m["state"]
        if entry.manifest is None and entry.directory is not None:
            try:  # as the engine's scan: the task is known while the model loads (503, not 404), or once it failed
                entry.manifest = read_manifest(entry.directory)
            except Exception:  # noqa: BLE001 - the engine has failed it with the reason
                pass
        if entry.directory is not None and entry.preprocessor is None and state not in (FAILED, PENDING):
            try:
                o = self.load_options
                await asyncio.to_thread(load_preprocessing, entry, max_image_pixels=o.max_image_pixels,
                                        max_audio_seconds=o.max_audio_seconds)
            except Exception as exc:  # noqa: BLE001
                log.exception("front-end: preprocessing of %s:%s failed to load", entry.name, entry.version)
                entry.preprocessor = None
                state, entry.reason = FAILED, f"preprocessing failed in a front-end: {type(exc).__name__}: {exc}"
        entry.state = state
        if state == READY and entry.batcher is None:
            entry.batcher = RemoteBatcher(client, entry.name, entry.version, entry.serial,
                                          max_batch_size=entry.max_batch_size, max_delay_s=self.max_delay_s,
                                          queue_size=self.queue_size)
        if (entry.state, entry.reason, entry.runtime) != before:
            self._info(entry)


__all__ = ["EngineClient", "FrontRegistry", "MirrorEntry", "RemoteBatcher", "RemoteRuntime"]

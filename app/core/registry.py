"""The served models: discovery and loading at start-up (`app/core/loading.py`), routing a request to
its model (`choose`), readiness, and draining at shutdown. One entry (and one batcher) per model.

A failed model is logged, listed in /v1/models and /readyz with its reason, and never stops the others.

Model control (`app/core/model_control.py`) changes the served set while serving: `start_entry` loads and
warms an entry that is not published yet, `publish` makes it the one serving its name (new requests go to it
at once), `withdraw` stops serving a name, and `retire` drains a replaced or withdrawn entry: the requests
already running on it are answered, then its batcher drains and its runtime closes.
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from app.core.batcher import Batcher
from app.core.errors import AmbiguousModel, ModelFailed, ModelNotFound, NoModelForTask, NotReady, WrongTask
from app.core.loading import FAILED, PENDING, READY, UNLOADED, LoadOptions, ModelEntry, ModelLoader, discover
from app.metrics import Metrics

log = logging.getLogger("mmserve.registry")


class Registry:
    def __init__(self, repository: Path, metrics: Metrics, *, pinned: dict[str, int] | None = None,
                 load: LoadOptions = LoadOptions(), max_delay_s: float = 0.005, queue_size: int = 256,
                 strict_readiness: bool = False):
        self.repository = Path(repository)
        self.pinned = dict(pinned or {})
        self.load_options = load
        self.max_delay_s = max_delay_s
        self.queue_size = queue_size
        self.strict_readiness = strict_readiness
        self.metrics = metrics
        self.loader = ModelLoader(load, metrics, on_state=self._info)
        self.entries: dict[str, ModelEntry] = {}
        self.retiring: set[ModelEntry] = set()  # replaced or withdrawn entries still draining
        self.loading_done = False
        self.draining = False
        self.leaving = False  # SIGTERM seen: readiness false while requests are still served (the drain period)

    # -- discovery and loading -----------------------------------------------------------------
    def scan(self) -> list[ModelEntry]:
        self.entries = discover(self.repository, self.pinned)
        for e in self.entries.values():
            if e.state == FAILED:
                self._failed(e)
            else:
                self._info(e)
        log.info("repository %s: %d model(s): %s", self.repository, len(self.entries),
                 ", ".join(f"{e.name}:{e.version}" for e in self.entries.values()) or "none")
        return list(self.entries.values())

    async def load_all(self) -> None:
        """Load and warm every pending model, one after another, off the event loop."""
        try:
            for entry in list(self.entries.values()):
                if entry.state != PENDING or self.draining:
                    continue
                await self.start_entry(entry)
                if self.draining:
                    break
        finally:
            self.loading_done = True
            ready = sum(e.state == READY for e in self.entries.values())
            log.info("model loading finished: %d ready, %d failed", ready,
                     sum(e.state == FAILED for e in self.entries.values()))

    async def start_entry(self, entry: ModelEntry, loader: ModelLoader | None = None) -> bool:
        """Verify, load and warm `entry` off the event loop, then start its batcher (state READY). False when it
        failed (state FAILED with the reason, runtime closed) or shutdown began meanwhile. `loader`: one whose
        `on_state` stays quiet, for an entry that is not published yet (a hot reload's new version)."""
        loader = loader or self.loader
        ok = await asyncio.to_thread(self._load, entry, loader)
        if ok and self.draining:  # shutdown began while it loaded: drain() has not seen this runtime
            entry.runtime.close()
            return False
        if ok:
            entry.batcher = Batcher(entry.name, entry.infer, max_batch_size=entry.max_batch_size,
                                    max_delay_s=self.max_delay_s, queue_size=self.queue_size,
                                    metrics=self.metrics, on_lowered=entry.batch_size_lowered)
            entry.batcher.start()
            entry.state = READY
            loader.on_state(entry)
            log.info("model %s:%s ready (backend=%s device=%s provider=%s load=%.2fs warmup=%.2fs)",
                     entry.name, entry.version, entry.runtime.backend, entry.runtime.device,
                     entry.runtime.provider, entry.load_seconds, entry.warmup_seconds or 0.0)
        return ok

    def _load(self, entry: ModelEntry, loader: ModelLoader) -> bool:
        try:
            loader.load(entry)
            return True
        except Exception as exc:  # noqa: BLE001 - any failure marks this model failed, others go on
            log.exception("model %s:%s failed to load", entry.name, entry.version)
            entry.state, entry.reason = FAILED, f"{type(exc).__name__}: {exc}"
            log.error("model %s:%s failed: %s", entry.name, entry.version, entry.reason)
            loader.on_state(entry)
            if entry.runtime is not None:
                entry.runtime.close()
                entry.runtime = None
            return False

    # -- changing the served set while serving (model control) ----------------------------------
    def publish(self, entry: ModelEntry) -> ModelEntry | None:
        """Make `entry` the one serving its name: requests choosing the name get it from now on. Returns the
        entry it replaces, now retired (drain it with `retire`), or None."""
        old = self.entries.get(entry.name)
        self.entries[entry.name] = entry
        self._info(entry)
        if old is None or old is entry:
            return None
        old.retired = True
        self.retiring.add(old)
        return old

    def withdraw(self, name: str) -> ModelEntry | None:
        """Stop serving `name` (unload): requests naming it get ModelNotFound from now on. Returns the
        withdrawn entry, now retired (drain it with `retire`), or None when nothing was served."""
        old = self.entries.pop(name, None)
        if old is None:
            return None
        old.retired = True
        self.retiring.add(old)
        rt = old.runtime
        self.metrics.set_model_info(name, str(old.version), rt.backend if rt else self.load_options.backend,
                                    rt.device if rt else "", rt.provider if rt else "", UNLOADED)
        return old

    async def retire(self, entry: ModelEntry, timeout: float) -> None:
        """Drain a retired entry: wait for the requests running on it (each is answered), finish its queued and
        running batches, close its runtime. Past `timeout` the batcher's drain gives up as at shutdown."""
        end = time.monotonic() + timeout
        try:
            while entry.active > 0 and time.monotonic() < end:
                await asyncio.sleep(0.005)
            if entry.active > 0:
                log.error("model %s:%s: %d request(s) still running after %.0fs; closing it anyway",
                          entry.name, entry.version, entry.active, timeout)
            if entry.batcher is not None:
                await entry.batcher.drain(max(0.1, end - time.monotonic()))
        finally:
            if entry.runtime is not None:
                entry.runtime.close()
            if entry.state == READY:
                entry.state = UNLOADED
            log.info("model %s:%s drained and closed", entry.name, entry.version)
            self.retiring.discard(entry)  # after the log line: whoever sees it leave the index finds the line

    def current(self, entry: ModelEntry) -> ModelEntry:
        """The entry that serves `entry.name` now: `entry` itself unless it was retired after the request chose
        it (then its successor; NotReady / ModelNotFound when there is none)."""
        if not entry.retired:
            return entry
        successor = self.entries.get(entry.name)
        if successor is None:
            raise ModelNotFound(f"model '{entry.name}' was unloaded")
        if successor.task != entry.task or not self.is_ready(successor):
            raise NotReady(f"model '{entry.name}' is being replaced")
        return successor

    # -- routing -------------------------------------------------------------------------------
    def choose(self, task: str, name: str | None) -> ModelEntry:
        """The ready model that serves `task` (named, or the only one); raises the core's routing errors."""
        if name:
            entry = self.entries.get(name)
            if entry is None:
                raise ModelNotFound(f"no model named '{name}'; available: {sorted(self.entries)}")
            if entry.task is not None and entry.task != task:
                raise WrongTask(f"model '{name}' serves task '{entry.task}', not '{task}'")
        else:
            candidates = [e for e in self.entries.values() if e.task == task]
            if not candidates:
                raise NoModelForTask(f"no model serves task '{task}'; available: {sorted(self.entries)}")
            if len(candidates) > 1:
                choices = sorted(e.name for e in candidates)
                raise AmbiguousModel(f"several models serve task '{task}'; choose one with 'model': {choices}",
                                     details={"choices": choices})
            entry = candidates[0]
        if entry.state == FAILED:
            raise ModelFailed(f"model '{entry.name}' failed to load: {entry.reason}")
        if not self.is_ready(entry):
            self.metrics.rejections.labels(entry.name, "not_ready").inc()
            raise NotReady(f"model '{entry.name}' is {('shutting down' if self.draining else entry.state)}")
        return entry

    def is_ready(self, entry: ModelEntry) -> bool:
        return entry.state == READY and entry.batcher is not None and not self.draining

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        states = {e.name: e.state for e in self.entries.values()}
        failed = {e.name: e.reason for e in self.entries.values() if e.state == FAILED}
        ready_n = sum(s == READY for s in states.values())
        ok = self.loading_done and ready_n > 0 and not self.draining and not self.leaving
        ok = ok and all(s in (READY, FAILED) for s in states.values())
        if self.strict_readiness and failed:
            ok = False
        unhealthy = {e.name: e.unhealthy for e in self.entries.values() if e.state == READY and e.unhealthy}
        ok = ok and not unhealthy  # a hung model: every request to it would time out
        body = {"ready": ok, "models": states, "failed": failed}
        if unhealthy:
            body["unhealthy"] = unhealthy
        if self.draining or self.leaving:
            body["draining"] = True
        return ok, body

    # -- shutdown ------------------------------------------------------------------------------
    async def drain(self, timeout: float) -> None:
        self.draining = True
        entries = [*self.entries.values(), *self.retiring]
        batchers = [e.batcher for e in entries if e.batcher is not None]
        await asyncio.gather(*(b.drain(timeout) for b in batchers), return_exceptions=True)
        for e in entries:
            if e.runtime is not None:
                e.runtime.close()

    # -- helpers -------------------------------------------------------------------------------
    def _failed(self, entry: ModelEntry) -> None:
        log.error("model %s:%s failed: %s", entry.name, entry.version, entry.reason)
        self._info(entry)

    def _info(self, entry: ModelEntry) -> None:
        rt = entry.runtime
        self.metrics.set_model_info(entry.name, str(entry.version),
                                    rt.backend if rt else self.load_options.backend,
                                    rt.device if rt else "", rt.provider if rt else "", entry.state)

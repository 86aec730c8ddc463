"""The served models: discovery and loading at start-up (`app/core/loading.py`), routing a request to
its model (`choose`), readiness, and draining at shutdown. One entry (and one batcher) per model.

A failed model is logged, listed in /v1/models and /readyz with its reason, and never stops the others.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from app.core.batcher import Batcher
from app.core.errors import AmbiguousModel, ModelFailed, ModelNotFound, NoModelForTask, NotReady, WrongTask
from app.core.loading import FAILED, PENDING, READY, LoadOptions, ModelEntry, ModelLoader, discover
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
        self.loading_done = False
        self.draining = False

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
                ok = await asyncio.to_thread(self._load, entry)
                if ok and self.draining:  # shutdown began while it loaded: drain() has not seen this runtime
                    entry.runtime.close()
                    break
                if ok:
                    entry.batcher = Batcher(entry.name, entry.infer, max_batch_size=entry.max_batch_size,
                                            max_delay_s=self.max_delay_s, queue_size=self.queue_size,
                                            metrics=self.metrics)
                    entry.batcher.start()
                    entry.state = READY
                    self._info(entry)
                    log.info("model %s:%s ready (backend=%s device=%s provider=%s load=%.2fs warmup=%.2fs)",
                             entry.name, entry.version, entry.runtime.backend, entry.runtime.device,
                             entry.runtime.provider, entry.load_seconds, entry.warmup_seconds or 0.0)
        finally:
            self.loading_done = True
            ready = sum(e.state == READY for e in self.entries.values())
            log.info("model loading finished: %d ready, %d failed", ready,
                     sum(e.state == FAILED for e in self.entries.values()))

    def _load(self, entry: ModelEntry) -> bool:
        try:
            self.loader.load(entry)
            return True
        except Exception as exc:  # noqa: BLE001 - any failure marks this model failed, others go on
            log.exception("model %s:%s failed to load", entry.name, entry.version)
            entry.state, entry.reason = FAILED, f"{type(exc).__name__}: {exc}"
            self._failed(entry)
            if entry.runtime is not None:
                entry.runtime.close()
                entry.runtime = None
            return False

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
        ok = self.loading_done and ready_n > 0 and not self.draining
        ok = ok and all(s in (READY, FAILED) for s in states.values())
        if self.strict_readiness and failed:
            ok = False
        body = {"ready": ok, "models": states, "failed": failed}
        if self.draining:
            body["draining"] = True
        return ok, body

    # -- shutdown ------------------------------------------------------------------------------
    async def drain(self, timeout: float) -> None:
        self.draining = True
        batchers = [e.batcher for e in self.entries.values() if e.batcher is not None]
        await asyncio.gather(*(b.drain(timeout) for b in batchers), return_exceptions=True)
        for e in self.entries.values():
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

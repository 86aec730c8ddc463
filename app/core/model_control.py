"""Model control: the model repository extension (index, load, unload) and repository polling, with hot
reload. Knows no HTTP; the front-ends (`app/v2_repository.py` for HTTP, the gRPC repository RPCs) call:

    await control.repository_index(ready_only=False) -> list of {"name", "version", "state", "reason"}
    control.check_allowed(local_host=None)     raises ControlDisabled / ControlForbidden
    await control.load(name)                   load or hot-reload a model; returns once it serves
    await control.unload(name)                 stop serving a model; returns once it has drained

With MMSERVE_WORKERS > 1 this class runs in the engine process, which owns the models; each front-end has a
`RemoteControl` (`app/core/remote_control.py`) with the same interface that asks the engine, so the index and
its answers are the engine's (hence `repository_index` is awaited).

Modes (MODEL_CONTROL): `none` (every model is loaded at start-up; load / unload are refused), `explicit`
(load / unload through the API), `poll` (the repository is watched every POLL_INTERVAL_S: a new version
directory is validated, loaded, warmed and swapped in; a removed model is unloaded; load / unload work too,
and a model unloaded through the API stays unloaded until it is loaded again).

Hot reload: the new version loads and warms (manifest, sha256 of every file, runtime, worst-case batch)
while the old one serves; then `registry.publish` switches new requests to it at once, and the old one
drains in the background (every request already running on it is answered) before its runtime closes.
A version that fails never replaces the serving one; its failure is listed by `repository_index` with the
reason. Loads and unloads of one model are serialised; different models proceed independently.

Model names come from requests: they are checked against the repository's listing (`list_models`) and only
the listed directory is used, never a path joined from the name.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from pathlib import Path
from typing import Any, Literal

from app.core.errors import (ControlDisabled, ControlForbidden, InvalidModelName, ModelLoadFailed, ModelNotFound,
                             NotReady)
from app.core.loading import (FAILED, LOADING, PENDING, READY, UNLOADED, WARMING, ModelEntry, ModelLoader,
                              list_models, list_versions, version_entry)
from app.core.registry import Registry

log = logging.getLogger("mmserve.model_control")

ControlMode = Literal["none", "explicit", "poll"]
# Triton's model states, as its repository index reports them
TRITON_STATES = {READY: "READY", PENDING: "LOADING", LOADING: "LOADING", WARMING: "LOADING", FAILED: "UNAVAILABLE",
                 UNLOADED: "UNAVAILABLE"}
# one path component: no separators, no leading '.' (so no '..'), no control characters
_NAME_OK = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,254}")


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 (and IPv4-mapped loopback) and 'localhost'."""
    if not host:
        return False
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool((mapped or ip).is_loopback)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def fingerprint(directory: Path) -> tuple[tuple[str, int, int], ...]:
    """What the poller compares to see that a version directory changed: (path, size, mtime) of its files."""
    try:
        return tuple(sorted((p.relative_to(directory).as_posix(), st.st_size, st.st_mtime_ns)
                            for p in directory.rglob("*") if p.is_file() for st in (p.stat(),)))
    except OSError:
        return ()


class ModelControl:
    def __init__(self, registry: Registry, *, mode: ControlMode = "none", poll_interval_s: float = 5.0,
                 bind_host: str = "127.0.0.1", allow_remote: bool = False, drain_timeout_s: float = 30.0):
        """`bind_host`: the address the server binds (HOST); on a non-loopback one load / unload are refused
        unless `allow_remote` (ALLOW_REMOTE_MODEL_CONTROL). `drain_timeout_s`: how long a replaced or unloaded
        version may take to answer the requests running on it."""
        self.registry = registry
        self.mode = mode
        self.poll_interval_s = poll_interval_s
        self.bind_host = bind_host
        self.allow_remote = allow_remote
        self.drain_timeout_s = drain_timeout_s
        # loads for entries not published yet stay out of the model-info metric until `publish`
        self.loader = ModelLoader(registry.load_options, registry.metrics, on_state=lambda entry: None)
        self.loading: dict[str, int | None] = {}  # name -> version being loaded
        self.failures: dict[str, ModelEntry] = {}  # name -> the last version that failed to replace the serving one
        self.unloaded: set[str] = set()  # unloaded through the API (the poller leaves them alone)
        self._locks: dict[str, asyncio.Lock] = {}
        self._retirements: set[asyncio.Task] = set()
        self._seen: dict[str, tuple[int | None, tuple]] = {}  # poller: name -> (version, fingerprint) last acted on
        self._poller: asyncio.Task | None = None

    # -- access --------------------------------------------------------------------------------
    def check_allowed(self, local_host: str | None = None) -> None:
        """Raises unless load / unload may run: ControlDisabled in MODEL_CONTROL=none; ControlForbidden on a
        non-loopback bind, or for a request that reached a non-loopback local address (`local_host`: the
        server-side address of the connection, when the front-end knows it), unless the operator opted in."""
        if self.mode == "none":
            raise ControlDisabled("model control is disabled (MMSERVE_MODEL_CONTROL=none): every model is loaded "
                                  "at start-up; set MMSERVE_MODEL_CONTROL=explicit or poll to load and unload "
                                  "models through the API")
        if self.allow_remote:
            return
        remote = not is_loopback(self.bind_host) or (local_host is not None and _is_ip(local_host)
                                                      and not is_loopback(local_host))
        if remote:
            raise ControlForbidden(f"model control is refused on a non-loopback bind (MMSERVE_HOST="
                                   f"{self.bind_host}): bind 127.0.0.1, or set "
                                   "MMSERVE_ALLOW_REMOTE_MODEL_CONTROL=true (with MMSERVE_API_KEYS) to allow it")

    def model_directory(self, name: Any) -> Path:
        """The repository's directory of model `name`, taken from the repository's listing. Raises
        InvalidModelName (not a plain directory name) or ModelNotFound (not in the repository)."""
        if not isinstance(name, str) or not _NAME_OK.fullmatch(name):
            shown = repr(name)[:120]
            raise InvalidModelName(f"invalid model name {shown}: a model name is one directory name of letters, "
                                   "digits, '.', '_' and '-', not starting with '.'")
        models = list_models(self.registry.repository)
        if name not in models:
            raise ModelNotFound(f"no model named '{name}' in the model repository; it has: {sorted(models)}")
        return models[name]

    # -- repository index ----------------------------------------------------------------------
    async def repository_index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Triton's repository index: one row per model version the server knows of, as
        {"name", "version", "state", "reason"}; state READY, LOADING, UNLOADING or UNAVAILABLE (failed, with
        the reason, or not loaded: reason "unloaded"). A version that failed to replace the serving one is
        listed next to it. Every model directory of the repository is listed. `ready_only`: READY rows only."""
        entries = self.registry.entries
        in_repo = list_models(self.registry.repository)
        rows: list[dict[str, str]] = []

        def add(name: str, version: int | None, state: str, reason: str | None = "") -> None:
            rows.append({"name": name, "version": "" if version is None else str(version), "state": state,
                         "reason": reason or ""})

        for name in sorted(set(in_repo) | set(entries) | set(self.loading)):
            listed = len(rows)
            entry = entries.get(name)
            if entry is not None:
                add(name, entry.version, TRITON_STATES.get(entry.state, "UNAVAILABLE"), entry.reason)
            for old in sorted(self.registry.retiring, key=lambda e: e.version or 0):
                if old.name == name:
                    add(name, old.version, "UNLOADING")
            if name in self.loading and (entry is None or entry.version != self.loading[name]
                                         or entry.state != READY):
                add(name, self.loading[name], "LOADING")
            failed = self.failures.get(name)
            if failed is not None and (entry is None or failed.version != entry.version):
                add(name, failed.version, "UNAVAILABLE", failed.reason)
            if len(rows) == listed:  # in the repository, not loaded
                versions = list_versions(in_repo[name]) if name in in_repo else []
                add(name, self.registry.pinned.get(name, versions[-1] if versions else None), "UNAVAILABLE",
                    "unloaded")
        return [r for r in rows if r["state"] == "READY"] if ready_only else rows

    # -- load / unload -------------------------------------------------------------------------
    async def load(self, name: str) -> None:
        """Load model `name` from the repository (its version pinned in MODEL_VERSIONS, else its latest), or
        hot-reload it when another version serves: the new one warms while the old one serves, then traffic
        switches and the old one drains. A no-op when that version already serves. Returns once it serves.

        Raises ControlDisabled / ControlForbidden (see `check_allowed`), InvalidModelName, ModelNotFound (not
        in the repository), ModelLoadFailed (validation, loading or warm-up failed; a version that was serving
        keeps serving), NotReady (shutting down)."""
        self.check_allowed()
        model_dir = self.model_directory(name)
        await self._initial_loading_done()
        async with self._lock(name):
            self.unloaded.discard(name)
            await self._load(name, model_dir)

    async def unload(self, name: str) -> None:
        """Stop serving model `name`: from now on requests naming it get ModelNotFound; those already running
        on it are answered, then its batcher drains and its runtime closes, and only then does this return.
        A model of the repository that is not loaded: nothing to do. Raises ControlDisabled / ControlForbidden,
        InvalidModelName, ModelNotFound."""
        self.check_allowed()
        if not (isinstance(name, str) and name in self.registry.entries):  # served, even if its directory went
            self.model_directory(name)
        await self._initial_loading_done()
        async with self._lock(name):
            self.unloaded.add(name)
            self.failures.pop(name, None)
            old = self.registry.withdraw(name)
            if old is not None:
                log.info("unloading model %s:%s", name, old.version)
                await self.registry.retire(old, self.drain_timeout_s)

    async def _load(self, name: str, model_dir: Path) -> None:
        if self.registry.draining:
            raise NotReady("server shutting down")
        target = version_entry(name, model_dir, self.registry.pinned.get(name))
        current = self.registry.entries.get(name)
        serving = current if current is not None and self.registry.is_ready(current) else None
        if serving is not None and serving.version == target.version:
            self.failures.pop(name, None)
            return
        if target.state != FAILED:
            log.info("loading model %s:%s%s", name, target.version,
                     f" (hot reload: version {serving.version} serves meanwhile)" if serving else "")
            self.loading[name] = target.version
            try:
                ok = await self.registry.start_entry(target, self.loader)
            finally:
                self.loading.pop(name, None)
            if self.registry.draining:
                raise NotReady("server shutting down")
            if ok:
                self.failures.pop(name, None)
                old = self.registry.publish(target)
                if old is not None:
                    log.info("model %s: version %s now serves; version %s drains", name, target.version,
                             old.version)
                    self._retire_later(old)
                return
        # failed: what serves keeps serving; the failure is listed by the index (and, when nothing serves,
        # the failed entry is published so requests and /v1/models say why)
        self.failures[name] = target
        if serving is None:
            old = self.registry.publish(target)
            if old is not None:
                self._retire_later(old)
        else:
            log.error("model %s: version %s failed (%s); version %s keeps serving", name, target.version,
                      target.reason, serving.version)
        keeps = f"; version {serving.version} keeps serving" if serving is not None else ""
        raise ModelLoadFailed(f"failed to load '{name}' version {target.version}: {target.reason}{keeps}")

    def _retire_later(self, old: ModelEntry) -> None:
        task = asyncio.get_running_loop().create_task(self.registry.retire(old, self.drain_timeout_s),
                                                      name=f"retire-{old.name}-{old.version}")
        self._retirements.add(task)
        task.add_done_callback(self._retirements.discard)

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def _initial_loading_done(self) -> None:
        while not self.registry.loading_done:  # start-up loading owns the entries until it is done
            if self.registry.draining:
                raise NotReady("server shutting down")
            await asyncio.sleep(0.05)

    # -- polling -------------------------------------------------------------------------------
    async def poll_once(self) -> None:
        """One look at the repository (MODEL_CONTROL=poll): load models whose served version is not the one
        to serve (new version directory, new model, removed version), retry a failed version only once its
        files changed, unload models whose directory is gone. Models unloaded through the API are left alone."""
        models = list_models(self.registry.repository)
        for name, model_dir in models.items():
            if name in self.unloaded or name in self.loading or self.registry.draining:
                continue
            pinned = self.registry.pinned.get(name)
            versions = list_versions(model_dir)
            version = pinned if pinned is not None else (versions[-1] if versions else None)
            seen = (version, fingerprint(model_dir / str(version)) if version is not None else ())
            first_look = name not in self._seen
            if self._seen.get(name) == seen:
                continue
            self._seen[name] = seen
            current = self.registry.entries.get(name)
            if current is not None and current.version == version and (current.state == READY or first_look):
                continue  # serving it already, or start-up just tried these very files
            try:
                async with self._lock(name):
                    if name not in self.unloaded:
                        await self._load(name, model_dir)
            except ModelLoadFailed as err:
                log.error("poll: %s", err.message)
        for name in [n for n, e in self.registry.entries.items() if n not in models and e.directory is not None]:
            async with self._lock(name):
                old = self.registry.withdraw(name)
                if old is not None:
                    log.info("poll: model %s left the repository; unloading version %s", name, old.version)
                    self._retire_later(old)
            self._seen.pop(name, None)

    async def _poll_loop(self) -> None:
        await self._initial_loading_done()
        log.info("polling repository %s every %.1fs", self.registry.repository, self.poll_interval_s)
        while not self.registry.draining:
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a bad look at the repository must not stop the poller
                log.exception("repository poll failed")
            await asyncio.sleep(self.poll_interval_s)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Starts the poller (MODEL_CONTROL=poll); call from the running event loop."""
        if self.mode == "poll" and self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll_loop(), name="repository-poller")

    async def stop(self) -> None:
        """Stops the poller and waits for replaced versions still draining (shutdown)."""
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None
        if self._retirements:
            await asyncio.gather(*list(self._retirements), return_exceptions=True)

"""MMSERVE_WORKERS > 1: `mmserve serve` becomes the engine and starts N front-end processes on one port.

    mmserve serve (engine: registry, runtimes, one batcher per model, IPC socket; no HTTP)
      +- python -m app.frontend --index 0   uvicorn + the app: parse, decode, tokenise -> engine -> answer
      +- ...                                 (N of them, each on a listening socket bound here and passed to it)

Start: a private 0700 directory holds the engine's Unix socket and PROMETHEUS_MULTIPROC_DIR (set before
prometheus_client is imported anywhere, so every process writes its metrics there and any front-end's /metrics
shows the totals). The port is checked (no other program may hold it) and held here for the server's life by a
socket that never listens (`hold_port`; GRPC_PORT too); then N listening sockets are bound to it with
SO_REUSEPORT and socket i is passed to front-end i (spawned: fork + exec of a fresh interpreter, nothing inherited
from this process's threads or runtimes). The kernel hashes each new connection to one of them
(`listening_sockets`), so connections opened together spread over the front-ends.

Stop (SIGTERM / SIGINT): readiness turns false everywhere, each front-end gets SIGTERM and drains as one process
does (`app/server.py`: drain period, backlog answered 503, in-flight requests answered), and once they have all
exited the engine drains its batchers and exits 0. A front-end that exits on its own is logged and the whole
server shuts down the same way (exit 1): the orchestrator restarts the pod, nothing is left half-served (the
connections queued on the dead front-end's socket are reset with it; later ones go to the others). The
private directory goes with the engine; if the engine is killed outright, with its last front-end
(`app/private_dir.py`).

Model control (MODEL_CONTROL explicit / poll) runs in the engine, which owns the models: the repository poller,
and every load / unload a front-end forwards; front-ends follow the engine's state (`app/core/engine.py`).
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import sys
from typing import Any

from app.private_dir import PrivateDir
from app.settings import Settings

log = logging.getLogger("mmserve.workers")

KILL_AFTER_S = 15.0  # past DRAIN_PERIOD_S + SHUTDOWN_TIMEOUT_S, a front-end still running is killed
BACKLOG = 2048  # each front-end's listen backlog


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _bound(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A TCP socket bound to host:port, not listening (SO_REUSEADDR as uvicorn and grpcio: TIME_WAIT is fine)."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(reuse_port))
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def hold_port(host: str, port: int, setting: str, use: str, advice: str = "choose another port") -> socket.socket:
    """A socket that holds host:port for the server's life without ever listening; start-up stops, with the
    reason, when another program holds the port.

    Every front-end listens on the port with SO_REUSEPORT (HTTP: a socket each, from `listening_sockets`; gRPC:
    grpcio binds it in each front-end) and the kernel hashes each new connection to one of them. SO_REUSEPORT
    would also let them silently join another program's listener on the port, when that one uses it too (grpcio
    does by default, so another gRPC server of this user would). So the port is first bound the way one process
    binds it, shared with nobody (no SO_REUSEPORT): any socket on it, whatever its options, makes that fail. That
    probe is closed and the port bound again at once, with SO_REUSEPORT, by the socket returned here.

    A socket that never listens is in no SO_REUSEPORT group (the kernel forms them of listening sockets) and gets
    no connections: on Linux 6.18, with it and two listeners on the port, 400 connections all reached the
    listeners; alone, it has them refused. While it is bound, a program binding without SO_REUSEADDR fails; one
    with SO_REUSEADDR alone is kept out by the front-ends' listeners once they listen (HTTP: a moment from now;
    gRPC: a front-end's bind fails instead, and the server stops with the reason). Only a program of this user
    binding with SO_REUSEPORT between the probe and this bind could still be joined. SO_REUSEADDR here too:
    without it, connections in TIME_WAIT left on the port by a server without SO_REUSEPORT (WORKERS=1 a minute
    ago) make the bind fail."""
    try:
        _bound(host, port, reuse_port=False).close()
        return _bound(host, port, reuse_port=True)
    except OSError as exc:
        held = ": another program holds it" if exc.errno == errno.EADDRINUSE else ""
        raise SystemExit(f"MMSERVE_{setting}={port}: cannot bind {host}:{port} for {use} ({exc.strerror}){held}; "
                         f"{advice}") from None


def listening_sockets(host: str, port: int, n: int) -> list[socket.socket]:
    """One listening socket per front-end on host:port (held by `hold_port`), each with SO_REUSEPORT: the kernel
    hashes each new connection to one of them, so connections opened together (a client pool, a load balancer)
    spread over the front-ends. One socket shared by all did not: the front-end that woke first accepted every
    connection waiting (`DrainingServer` accepts in bursts), 16 of 16 in bench/frontend.py. Options and backlog
    are those of one process's listener (`socket.create_server`: SO_REUSEADDR, IPv6 only on an IPv6 host)."""
    return [socket.create_server((host, port), family=_family(host), backlog=BACKLOG, reuse_port=True)
            for _ in range(n)]


def run_workers(settings: Settings, overrides: dict[str, Any]) -> int:
    """Serve until SIGTERM; the exit code (0: a clean shutdown)."""
    if settings.intra_op_threads == 0:  # one runtime thread per core would fight the front-ends for every core
        cores = len(os.sched_getaffinity(0))
        settings = settings.model_copy(update={"intra_op_threads": max(1, cores - settings.workers)})
        log.info("INTRA_OP_THREADS=0 with WORKERS=%d on %d core(s): the engine's runtimes use %d thread(s)",
                 settings.workers, cores, settings.intra_op_threads)
    private = PrivateDir.create()
    try:
        metrics_dir = private.path / "metrics"
        metrics_dir.mkdir()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        if "prometheus_client" in sys.modules:  # imported already (not by mmserve): values must go to the files
            from prometheus_client import values

            values.ValueClass = values.get_value_class()
        with contextlib.ExitStack() as held:
            http = held.enter_context(hold_port(settings.host, settings.port, "PORT", "HTTP"))
            if settings.grpc_port:
                held.enter_context(hold_port(settings.host, settings.grpc_port, "GRPC_PORT", "gRPC",
                                             "choose another port, or 0 to turn gRPC off"))
            listeners = listening_sockets(settings.host, http.getsockname()[1], settings.workers)
            env = dict(os.environ, **{f"MMSERVE_{k.upper()}": str(v) for k, v in overrides.items()})
            return _run(_supervise(settings, listeners, str(private.path / "engine.sock"), env))
    finally:
        private.remove()


def _run(main: Any) -> int:
    """`main` on uvloop, the loop uvicorn gives the front-ends (uvicorn[standard] installs it), else asyncio's own.
    The engine's loop handles every request twice (its features in, its output out): on uvloop it spent 0.4 ms less
    CPU per request with WORKERS=2 at concurrency 1 (tiny model, two rounds each, same machine)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def _supervise(settings: Settings, listeners: list[socket.socket], engine_path: str,
                     env: dict[str, str]) -> int:
    from prometheus_client import multiprocess

    from app.core.engine import Engine
    from app.core.model_control import ModelControl
    from app.main import build_registry
    from app.metrics import Metrics

    loop = asyncio.get_running_loop()
    registry = build_registry(settings, Metrics())
    control = ModelControl(registry, mode=settings.model_control, poll_interval_s=settings.poll_interval_s,
                           bind_host=settings.host, allow_remote=settings.allow_remote_model_control,
                           drain_timeout_s=settings.request_timeout_s + settings.shutdown_timeout_s)
    engine = Engine(registry, engine_path, control)
    await engine.start()
    port = listeners[0].getsockname()[1]
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app.frontend", "--fd", str(sock.fileno()), "--engine", engine_path, "--index", str(i),
        pass_fds=(sock.fileno(),), env=env) for i, sock in enumerate(listeners)]
    for sock in listeners:  # each front-end holds its own: the socket closes when that front-end closes it (drained,
        sock.close()  # or dead), leaving the SO_REUSEPORT group: new connections go to the others (the last: refused)
    log.info("engine pid %d serving %s:%d through %d front-end process(es): %s", os.getpid(), settings.host,
             port, len(procs), ", ".join(str(p.pid) for p in procs))
    stopping = False
    deadline = float("inf")

    def stop(sig: int = signal.SIGTERM) -> None:
        nonlocal stopping, deadline
        if not stopping:
            log.info("engine: %s: front-ends drain, then the engine", signal.Signals(sig).name)
            deadline = loop.time() + settings.drain_period_s + settings.shutdown_timeout_s + KILL_AFTER_S
        stopping = True
        registry.leaving = True
        for p in procs:
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)  # a second signal cuts a front-end's drain period short

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig)
    code = 0
    waits = {asyncio.create_task(p.wait()): p for p in procs}
    while waits:
        timeout = None if deadline == float("inf") else max(0.0, deadline - loop.time())
        done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not done:
            for p in waits.values():
                log.error("front-end pid %d still running after the shutdown timeout: killed", p.pid)
                p.kill()
            deadline = float("inf")
            continue
        for task in done:
            p = waits.pop(task)
            multiprocess.mark_process_dead(p.pid)
            if not stopping:
                log.error("front-end pid %d exited unexpectedly (exit %s): shutting the server down", p.pid,
                          p.returncode)
                code = 1
                stop()
            elif p.returncode != 0:
                log.error("front-end pid %d exited with %s", p.pid, p.returncode)
                code = 1
    log.info("front-ends gone; draining the engine's batchers")
    await engine.stop(settings.shutdown_timeout_s)
    log.info("engine: shutdown complete")
    return code

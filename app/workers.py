"""MMSERVE_WORKERS > 1: `mmserve serve` becomes the engine and starts N front-end processes on one port.

    mmserve serve (engine: registry, runtimes, one batcher per model, IPC socket; no HTTP)
      +- python -m app.frontend --index 0   uvicorn + the app: parse, decode, tokenise -> engine -> answer
      +- ...                                 (N of them, on the listening socket bound here and inherited)

Start: a private 0700 directory holds the engine's Unix socket and PROMETHEUS_MULTIPROC_DIR (set before
prometheus_client is imported anywhere, so every process writes its metrics there and any front-end's /metrics
shows the totals); the listening socket is bound once here and passed to each front-end (spawned: fork + exec of
a fresh interpreter, nothing inherited from this process's threads or runtimes).

Stop (SIGTERM / SIGINT): readiness turns false everywhere, each front-end gets SIGTERM and drains as one process
does (`app/server.py`: drain period, backlog answered 503, in-flight requests answered), and once they have all
exited the engine drains its batchers and exits 0. A front-end that exits on its own is logged and the whole
server shuts down the same way (exit 1): the orchestrator restarts the pod, nothing is left half-served. The
private directory goes with the engine; if the engine is killed outright, with its last front-end
(`app/private_dir.py`).

Model control (MODEL_CONTROL explicit / poll) runs in the engine, which owns the models: the repository poller,
and every load / unload a front-end forwards; front-ends follow the engine's state (`app/core/engine.py`).
"""
from __future__ import annotations

import asyncio
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


def check_grpc_port(host: str, port: int) -> None:
    """Refuse to start when another program holds the gRPC port (GRPC_PORT).

    Every front-end serves gRPC on that port, each binding it with SO_REUSEPORT (grpcio cannot be handed a socket,
    so the port cannot be bound once here and inherited as the HTTP one is). SO_REUSEPORT would also let the
    front-ends silently join another program's listener on the port, when that program uses it too (grpcio does
    by default, so another gRPC server of this user would). So the port is first bound here the way one process
    binds it, shared with nobody (SO_REUSEADDR as grpcio, no SO_REUSEPORT): any listener on it makes that fail
    with a clear error before a front-end starts. The probe is closed before the front-ends bind: a program that
    takes the port in that second or so without SO_REUSEPORT makes a front-end's bind fail (the server exits 1
    with the reason); only one that binds with SO_REUSEPORT in just that second could still be joined."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpcio: connections in TIME_WAIT are fine
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise SystemExit(f"MMSERVE_GRPC_PORT={port}: cannot bind {host}:{port} for gRPC ({exc.strerror}): "
                             "another program holds it; choose another port, or 0 to turn gRPC off") from None


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
        if settings.grpc_port:
            check_grpc_port(settings.host, settings.grpc_port)
        family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        listener = socket.create_server((settings.host, settings.port), family=family, backlog=2048)
        listener.set_inheritable(True)
        env = dict(os.environ, **{f"MMSERVE_{k.upper()}": str(v) for k, v in overrides.items()})
        return _run(_supervise(settings, listener, str(private.path / "engine.sock"), env))
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


async def _supervise(settings: Settings, listener: socket.socket, engine_path: str, env: dict[str, str]) -> int:
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
    fd, port = listener.fileno(), listener.getsockname()[1]
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app.frontend", "--fd", str(fd), "--engine", engine_path, "--index", str(i),
        pass_fds=(fd,), env=env) for i in range(settings.workers)]
    listener.close()  # the front-ends hold it now: once they have all closed theirs, connections are refused
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

"""`python -m app` / `mmserve serve`: uvicorn with the settings' host and port and a graceful shutdown.

On SIGTERM/SIGINT readiness turns false, requests are still served for DRAIN_PERIOD_S, then the listener closes
with every connection already in its backlog answered (503 + Retry-After), in-flight requests finish (up to
SHUTDOWN_TIMEOUT_S), and the app's lifespan drains the batchers and releases the models (`app/server.py`).
With MMSERVE_WORKERS > 1 this process becomes the engine and starts the front-end processes (`app/workers.py`).
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Sequence

# numpy's BLAS (OpenBLAS) runs each matrix product (the audio front end's mel filters) on a pool of busy-waiting
# threads as large as the machine. A server's parallelism is its own preprocessing threads (and, with WORKERS > 1,
# its processes): those pools only fight them for the cores. With WORKERS=2 on 2 cores they halved the tiny model's
# throughput and put p99 at 0.6-0.8 s, most of the front-ends' CPU spent in `filters @ power` (py-spy). OpenBLAS
# reads this once, when numpy loads: set before anything here imports it. A user's own setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="mmserve serve", description="Serve exported models over HTTP.")
    parser.add_argument("--repository", help="model repository (MMSERVE_REPOSITORY)")
    parser.add_argument("--host", help="bind address (MMSERVE_HOST)")
    parser.add_argument("--port", type=int, help="port (MMSERVE_PORT)")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N (MMSERVE_DEVICE)")
    parser.add_argument("--backend", choices=["onnx", "torchscript"], help="runtime (MMSERVE_BACKEND)")
    return parser


def serve(args: argparse.Namespace | None = None) -> None:
    from app.logging import configure_logging
    from app.settings import Settings

    overrides = {k: v for k, v in vars(args or argparse.Namespace()).items()
                 if k in ("repository", "host", "port", "device", "backend") and v is not None}
    settings = Settings(**overrides)
    configure_logging(settings.log_level, settings.log_format)
    if settings.workers > 1:  # this process becomes the engine, N front-end processes serve HTTP (app/workers.py)
        from app.workers import run_workers

        raise SystemExit(run_workers(settings, overrides))
    from app.main import create_app

    build_server(create_app(settings), settings).run_owned()


def build_server(app: Any, settings: Any) -> Any:
    """The DrainingServer of `app` with the settings' host, port, timeouts and drain (one process, or a front-end)."""
    import uvicorn

    from app.http_timeouts import protocol_class
    from app.server import DrainingServer

    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            lifespan="on", timeout_graceful_shutdown=settings.shutdown_timeout_s,
                            server_header=False, proxy_headers=False,
                            http=protocol_class("auto", settings.header_timeout_s, settings.body_timeout_s),
                            log_level=settings.log_level.lower())
    registry = app.state.service.registry

    def unready() -> None:
        registry.leaving = True

    return DrainingServer(config, drain_period_s=settings.drain_period_s, on_drain=unready,
                          linger_bytes=settings.linger_bytes, linger_s=settings.linger_s)


def main(argv: Sequence[str] | None = None) -> None:
    serve(build_parser().parse_args(argv))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

"""One front-end process of MMSERVE_WORKERS > 1, started by the engine process (`app/workers.py`), never by hand:

    python -m app.frontend --fd N --engine SOCKET --index I

The same FastAPI app and DrainingServer as one process, on its own listening socket (fd N), which the engine
bound and passed to this front-end alone: every front-end has one on the same port, with SO_REUSEPORT, and the
kernel hashes each new connection to one of them (one socket shared by all let the front-end that woke first
accept every waiting connection). A `FrontRegistry` mirrors the models, which live in the engine behind SOCKET
(`app/core/remote.py`). Settings come from the same MMSERVE_* environment. SIGTERM drains exactly as one process
does: the connections queued on this front-end's socket are answered 503 before it closes (a socket of a
SO_REUSEPORT group that closes resets what is queued on it; once closed, new connections go to the others).
Losing the engine starts that same drain (every model request is answered 503 meanwhile), and the last front-end
to exit after the engine was killed removes the server's private directory, where SOCKET lives
(`app/private_dir.py`).

gRPC, when GRPC_PORT is set, is served by every front-end on that port: each binds it with SO_REUSEPORT and the
kernel spreads connections over them, as it does HTTP connections over the front-ends' listening sockets (the
engine has checked at start-up that no other program holds the port, and holds it: `app/workers.py`).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
from pathlib import Path
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app.frontend")
    parser.add_argument("--fd", type=int, required=True, help="this front-end's listening socket, from the engine")
    parser.add_argument("--engine", required=True, help="the engine's Unix socket, in the private directory")
    parser.add_argument("--index", type=int, default=0, help="which front-end this is (for ps and its operator)")
    args = parser.parse_args(argv)

    from app.__main__ import build_server
    from app.logging import configure_logging
    from app.main import create_app
    from app.private_dir import PrivateDir
    from app.settings import Settings

    private = PrivateDir(Path(args.engine).parent)
    try:
        settings = Settings()
        configure_logging(settings.log_level, settings.log_format)
        app = create_app(settings, engine_path=args.engine)
        server = build_server(app, settings)
        app.state.service.registry.client.on_lost = lambda: os.kill(os.getpid(), signal.SIGTERM)
        server.listener = socket.socket(fileno=args.fd)
        server.run(sockets=[server.listener.dup()])
    finally:
        private.leave()


if __name__ == "__main__":
    main()

"""uvicorn with a shutdown that loses no request: `DrainingServer`.

uvicorn alone, on SIGTERM, closes its listening socket at once. Connections the kernel had already accepted
(completed handshakes in the listen backlog, often with their request already sent) are then reset: the
client cannot tell such a request from one lost mid-inference. Here, on SIGTERM / SIGINT:

1. readiness turns false (`/readyz` 503, `/v2/health/ready` 400) and every response from now on carries
   `Connection: close`, so keep-alive clients reconnect (elsewhere, once the load balancer has noticed);
2. for DRAIN_PERIOD_S requests are still served as usual: the time load balancers and Kubernetes' endpoint
   removal need to stop sending new connections here;
3. the event loop stops accepting, and the connections the kernel accepted meanwhile are taken off the backlog
   and each answered `503` + `Retry-After` + `Connection: close` (after its request head has been read, and with
   its body read and discarded while the answer goes out); only then does the listening socket close, so later
   connections are refused cleanly (the client has sent nothing);
4. connections the event loop accepted just before step 3 get up to HEAD_TIMEOUT_S to send their request
   (uvicorn would close a connection with no request in progress, resetting a request on its way);
5. uvicorn's own shutdown: requests in flight are answered (SHUTDOWN_TIMEOUT_S), then the app's lifespan
   drains the batchers and releases the models.

A second signal skips what is left of the drain period. The process owns its listening socket and hands
uvicorn a duplicate of it: uvicorn closing its copy leaves the socket (and its backlog) open until step 3 has
answered the backlog.

Accepting under load: libuv (under uvloop, uvicorn's default loop) accepts one connection per event-loop
iteration (libuv 1.45, "don't accept() connections in a loop"). When the loop is saturated an iteration takes tens
of milliseconds, so new connections wait in the kernel's accept queue for seconds, their requests already sent
(bench/overload.py at 5x load: 600-850 connections queued, drained at ~15/s; hundreds of requests unanswered after
15 s while requests on accepted connections were served). The server therefore also watches its own copy of the
listening socket and, each time it is readable, accepts up to ACCEPT_BURST connections and hands them to uvicorn's
protocol, as asyncio's own loop does.
"""
from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
from typing import Any, Callable

import uvicorn

log = logging.getLogger("mmserve.server")

HEAD_TIMEOUT_S = 5.0  # a backlog connection that sends no request head in this long is closed unanswered
MAX_HEAD_BYTES = 64 * 1024
MAX_BACKLOG_SWEEP = 65536  # accept() calls at most when taking the backlog (a bound, not a limit in practice)
ACCEPT_BURST = 128  # connections accepted per readiness of the listening socket (module docstring)


def refusal(path: str, retry_after: int) -> bytes:
    """The raw 503 for a connection that arrived while the listener was closing (v2 error shape on /v2)."""
    message = "the server is shutting down; retry the request"
    error: object = message if path.startswith("/v2") else {"code": "shutting_down", "message": message}
    body = json.dumps({"error": error}).encode()
    return (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: {retry_after}\r\n"
            f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body


async def _recv(loop: asyncio.AbstractEventLoop, conn: socket.socket, timeout: float) -> bytes:
    return await asyncio.wait_for(loop.sock_recv(conn, 65536), timeout)


async def answer_unavailable(conn: socket.socket, *, retry_after: int = 1, linger_bytes: int = 256 * 1024 * 1024,
                             linger_s: float = 10.0) -> bool:
    """Read the request head on `conn`, answer it 503, discard what else comes (bounded), close. True when the
    answer was sent."""
    loop = asyncio.get_running_loop()
    conn.setblocking(False)
    sent = False
    try:
        head = b""
        while b"\r\n\r\n" not in head and len(head) < MAX_HEAD_BYTES:
            chunk = await _recv(loop, conn, HEAD_TIMEOUT_S)
            if not chunk:  # the client left without asking anything
                return False
            head += chunk
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        path = parts[1].decode("latin-1") if len(parts) > 1 else "/"
        await asyncio.wait_for(loop.sock_sendall(conn, refusal(path, retry_after)), linger_s)
        sent = True
        conn.shutdown(socket.SHUT_WR)
        end = loop.time() + linger_s  # lingering close: read (and drop) its body until it closes, bounded
        left = linger_bytes
        while left > 0 and (wait := end - loop.time()) > 0:
            chunk = await _recv(loop, conn, min(wait, HEAD_TIMEOUT_S))
            if not chunk:
                break
            left -= len(chunk)
    except (asyncio.TimeoutError, OSError):
        pass
    finally:
        conn.close()
    return sent


def take_backlog(listener: socket.socket) -> list[socket.socket]:
    """Every connection waiting in `listener`'s backlog, without blocking (then the caller closes `listener`)."""
    listener.setblocking(False)
    conns = []
    for _ in range(MAX_BACKLOG_SWEEP):
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            break
        except OSError:  # the listener is gone
            break
        conns.append(conn)
    return conns


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose shutdown drains (module docstring). `run_owned()` binds the socket it owns."""

    def __init__(self, config: uvicorn.Config, *, drain_period_s: float, on_drain: Callable[[], None] | None = None,
                 retry_after_s: int = 1, linger_bytes: int = 256 * 1024 * 1024, linger_s: float = 10.0):
        super().__init__(config)
        self.drain_period_s = drain_period_s
        self.on_drain = on_drain
        self.retry_after_s = retry_after_s
        self.linger_bytes = linger_bytes
        self.linger_s = linger_s
        self.listener: socket.socket | None = None
        self.backlog_answered = 0
        self._accepting = False

    def handle_exit(self, sig: int, frame: Any) -> None:
        """As uvicorn's, except that a SIGTERM shutdown, once drained, exits 0: uvicorn re-raises the signal after
        its shutdown, so the process died of it (exit -15) however cleanly every request had been answered."""
        super().handle_exit(sig, frame)
        self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

    def run_owned(self) -> None:
        """Bind the listening socket (as uvicorn would), keep it, and serve on a duplicate of it."""
        self.listener = self.config.bind_socket()
        self.run(sockets=[self.listener.dup()])

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.listener is not None and not self.should_exit and getattr(self, "started", True):
            self.listener.setblocking(False)
            asyncio.get_running_loop().add_reader(self.listener.fileno(), self._accept_burst)
            self._accepting = True

    def _stop_accepting(self) -> None:
        if self._accepting and self.listener is not None:
            asyncio.get_running_loop().remove_reader(self.listener.fileno())
            self._accepting = False

    def _accept_burst(self) -> None:
        """Accept up to ACCEPT_BURST waiting connections and serve each with uvicorn's protocol."""
        assert self.listener is not None
        loop = asyncio.get_running_loop()
        config = self.config
        for _ in range(ACCEPT_BURST):
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:  # EMFILE and the like: leave the rest to the loop's own accept
                log.warning("accept failed: %s", exc)
                return
            conn.setblocking(False)
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def protocol() -> asyncio.Protocol:
                return config.http_protocol_class(config=config, server_state=self.server_state,  # type: ignore[call-arg]
                                                  app_state=self.lifespan.state, _loop=loop)

            loop.create_task(self._serve_accepted(loop, protocol, conn))

    @staticmethod
    async def _serve_accepted(loop: asyncio.AbstractEventLoop, protocol: Callable[[], asyncio.Protocol],
                              conn: socket.socket) -> None:
        try:
            await loop.connect_accepted_socket(protocol, sock=conn)
        except OSError:  # the client left before it could be served
            conn.close()

    async def _let_fresh_connections_ask(self) -> None:
        """uvicorn's shutdown closes every connection that has no request in progress, and one the loop accepted
        a moment ago may have its request on the way: closing it would reset a request already sent. Give such
        connections (no request seen yet) up to HEAD_TIMEOUT_S to send their request head; once it is in, uvicorn
        answers it and then closes."""
        loop = asyncio.get_running_loop()
        end = loop.time() + HEAD_TIMEOUT_S

        def fresh(conn: object) -> bool:
            transport = getattr(conn, "transport", None)
            return getattr(conn, "cycle", False) is None and transport is not None and not transport.is_closing()

        await asyncio.sleep(0.05)  # connections accepted just before the close register with uvicorn first
        while not self.force_exit and loop.time() < end and any(fresh(c) for c in self.server_state.connections):
            await asyncio.sleep(0.02)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        if self.on_drain is not None:
            self.on_drain()
        close = (b"connection", b"close")  # uvicorn closes each connection after a response carrying it
        self.config.encoded_headers = [*self.config.encoded_headers, close]
        self.server_state.default_headers = [*self.server_state.default_headers, close]
        log.info("draining: readiness is false; serving for DRAIN_PERIOD_S=%.1fs before the listener closes",
                 self.drain_period_s)
        end = loop.time() + self.drain_period_s
        while not self.force_exit and (left := end - loop.time()) > 0:
            await asyncio.sleep(min(0.1, left))
        self._stop_accepting()
        for server in self.servers:
            server.close()  # the event loop stops accepting (it closes its copy of the listening socket)
        answering: list[asyncio.Task[bool]] = []
        if self.listener is not None:
            backlog = take_backlog(self.listener)
            # closed right after the sweep (nothing runs between): no connection is left on it to be reset. From
            # here on, connections are refused (WORKERS > 1: they go to the front-ends still listening)
            self.listener.close()
            answering = [asyncio.create_task(answer_unavailable(c, retry_after=self.retry_after_s,
                                                                linger_bytes=self.linger_bytes,
                                                                linger_s=self.linger_s)) for c in backlog]
            log.info("listener closed; %d connection(s) from its backlog answered 503", len(backlog))
        await self._let_fresh_connections_ask()
        await super().shutdown(sockets)
        if answering:
            self.backlog_answered = sum(await asyncio.gather(*answering))

"""Slow-client (slowloris) timeouts for uvicorn's HTTP/1.1 protocols: `protocol_class(http, ...)`.

uvicorn times out only an idle keep-alive connection after a response. A client that connects and never sends,
or sends its request head or body a byte at a time, holds its connection (and, once the head is in, its request
and its share of the server) for as long as it likes. These protocols add two timers:

* head: from the moment a connection opens (or the first byte of a next request on a kept-alive connection)
  the whole request head must arrive within HEADER_TIMEOUT_S; else the client gets a JSON 408 and the
  connection closes. No request was started, so nothing runs for it. (A client whose bytes already wait in
  the socket is not slow: the event loop is behind, under overload, and the deadline moves on.) A head over MAX_HEAD_BYTES or with more
  than MAX_HEADERS fields gets a JSON 431, one the parser refuses a JSON 400 (uvicorn's is text/plain); after
  each, what the client still sends is read and dropped for up to LINGER_S before the close (a close with
  unread data resets the connection and the client may never read the answer).
* body: once the head is in and a body is expected, the body must keep coming: the deadline is BODY_TIMEOUT_S
  after the head, moved on by one second for every MIN_BODY_RATE bytes received (Apache mod_reqtimeout's
  `body=N,MinRate=R`), so a large upload at a sane rate is never cut while one byte a second is. Past it the
  connection closes and the application sees the client gone (`http.disconnect`). While the application is
  not reading (uvicorn paused reading), the deadline waits.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from typing import Any

log = logging.getLogger("mmserve.http")

MIN_BODY_RATE = 16 * 1024  # bytes per second a request body must average once BODY_TIMEOUT_S is spent
_SLACK_S = 0.01
_BEHIND_S = 1.0  # head deadline moved on while the loop has not yet read bytes the client sent


MAX_HEAD_BYTES = 64 * 1024  # request line + headers (nginx: 4 x 8 KiB buffers; h11: 16 KiB)
LINGER_S = 5.0  # after refusing a request head: how long what the client still sends is read and dropped
MAX_HEADERS = 100  # header lines per request (Apache's LimitRequestFields)


def _error_response(status: int, reason: str, code: str, message: str) -> bytes:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


def _timeout_response() -> bytes:
    return _error_response(408, "Request Timeout", "request_timeout",
                           "request head not received within HEADER_TIMEOUT_S (slow client); connection closed")


class _SlowClientTimeouts:
    """Mixin over uvicorn's HttpToolsProtocol / H11Protocol (both keep `cycle`, `transport`, `flow`, `loop`)."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        self._head_deadline: float | None = self.loop.time() + self.header_timeout_s
        self._body_deadline: float | None = None
        self._body_cycle: Any = None
        self._head = bytearray()  # the request head received so far (while no request is in progress)
        self._discard_until: float | None = None  # refused: dropping the rest until then, then closing
        self._watch: asyncio.TimerHandle | None = None  # one timer per connection, at its nearest deadline
        self._arm()

    def _busy(self) -> bool:
        cycle = self.cycle
        return cycle is not None and not cycle.response_complete

    def _head_too_big(self, data: bytes) -> str | None:
        """Account `data` to the request head being received; what is wrong with it once it is too big."""
        if self._busy():
            self._head.clear()
            return None
        if not self._head:  # the usual case: the whole head in this read, checked in place (no copy of the body)
            end = data.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)
            if end >= 0:
                if end > MAX_HEAD_BYTES:
                    return f"request head larger than {MAX_HEAD_BYTES} bytes"
                if data.count(b"\n", 0, end) > MAX_HEADERS:
                    return f"more than {MAX_HEADERS} header fields"
                return None
        seen = len(self._head)
        self._head += data[: MAX_HEAD_BYTES + 4 - seen] if seen < MAX_HEAD_BYTES + 4 else b""
        end = self._head.find(b"\r\n\r\n")
        head = self._head if end < 0 else self._head[:end]
        problem = None
        if end < 0 and len(self._head) > MAX_HEAD_BYTES or end > MAX_HEAD_BYTES:
            problem = f"request head larger than {MAX_HEAD_BYTES} bytes"
        elif head.count(b"\n") > MAX_HEADERS:
            problem = f"more than {MAX_HEADERS} header fields"
        if end >= 0:
            self._head.clear()  # the head is complete: what follows is its body (pipelined heads go unchecked)
        return problem

    def send_400_response(self, msg: str) -> None:  # uvicorn's is text/plain; every answer here is JSON
        if not self.transport.is_closing():
            self._refuse(_error_response(400, "Bad Request", "invalid_http", f"invalid HTTP request: {msg}"))

    def data_received(self, data: bytes) -> None:  # type: ignore[override]
        problem = self._head_too_big(data)
        if problem is not None:
            log.warning("refusing a request: %s", problem)
            self._refuse(_error_response(431, "Request Header Fields Too Large", "headers_too_large",
                                         f"{problem}; connection closed"))
            return
        if self._discard_until is not None:  # refused: what the client still sends is read and dropped
            return
        super().data_received(data)  # type: ignore[misc]
        if self.transport.is_closing():
            return
        now = self.loop.time()
        cycle = self.cycle
        if self._busy():
            self._head_deadline = None
            if cycle is not self._body_cycle:  # a new request: its head is complete
                self._body_cycle = cycle
                self._body_deadline = now + self.body_timeout_s
            elif self._body_deadline is not None:
                self._body_deadline += len(data) / MIN_BODY_RATE
            if not cycle.more_body:
                self._body_deadline = None
        elif self._head_deadline is None:  # first bytes of a next request head on a kept-alive connection
            self._head_deadline = now + self.header_timeout_s
        self._arm()

    def _unread(self) -> bool:
        """Bytes from the client wait in the socket, not yet read by the event loop."""
        sock = self.transport.get_extra_info("socket")  # uvloop's stand-in cannot recv: peek through a dup
        try:
            with socket.socket(fileno=os.dup(sock.fileno())) as peek:
                return bool(peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except Exception:  # noqa: BLE001 - nothing waiting (EAGAIN), or no socket to look at
            return False

    def _arm(self) -> None:
        """Have `_check` run at the nearest deadline (a deadline that moved later is re-armed when it fires)."""
        if self.transport.is_closing():
            return
        if self._discard_until is not None:
            due = self._discard_until
        elif self._busy():
            due = self._body_deadline if self.cycle.more_body else None
        else:
            due = self._head_deadline
        if due is None or (self._watch is not None and self._watch.when() <= due + _SLACK_S):
            return
        if self._watch is not None:
            self._watch.cancel()
        self._watch = self.loop.call_at(due + _SLACK_S, self._check)

    def _refuse(self, answer: bytes) -> None:
        """Answer, half-close, then read and drop what the client still sends for up to LINGER_S (closing with
        unread data would reset the connection, and the client might never read the answer)."""
        self.transport.write(answer)
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self._discard_until = self.loop.time() + LINGER_S
            self._arm()
        else:
            self.transport.close()

    def _check(self) -> None:
        self._watch = None
        if self.transport.is_closing():
            return
        now = self.loop.time()
        cycle = self.cycle
        if self._discard_until is not None:
            if now > self._discard_until:
                self.transport.close()
                return
        elif self._busy():
            if not cycle.more_body:
                self._body_deadline = None
            elif self._body_deadline is not None and now > self._body_deadline:
                if getattr(self.flow, "read_paused", False):  # the app is not reading: not the client's fault
                    self._body_deadline = now + self.body_timeout_s
                else:
                    log.warning("closing a connection whose request body stalled (BODY_TIMEOUT_S=%g)",
                                self.body_timeout_s)
                    self.transport.close()
                    return
        elif self._head_deadline is not None and now > self._head_deadline and self._unread():
            # the client's bytes wait in the socket: this event loop is behind (overload), the client is not slow
            self._head_deadline = now + _BEHIND_S
        elif self._head_deadline is not None and now > self._head_deadline:
            log.warning("closing a connection that sent no complete request head in HEADER_TIMEOUT_S=%g",
                        self.header_timeout_s)
            self._refuse(_timeout_response())
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:  # type: ignore[override]
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        super().connection_lost(exc)  # type: ignore[misc]


def protocol_class(http: str, header_timeout_s: float, body_timeout_s: float) -> type:
    """uvicorn's protocol for `http` ("auto": httptools when installed, else h11) with the slow-client timeouts."""
    base: type
    if http in ("auto", "httptools"):
        try:
            from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
        except ImportError:
            if http == "httptools":
                raise
            from uvicorn.protocols.http.h11_impl import H11Protocol as base
    else:
        from uvicorn.protocols.http.h11_impl import H11Protocol as base
    return type(f"SlowClientTimeouts{base.__name__}", (_SlowClientTimeouts, base),
                {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s})

"""Pure ASGI middlewares: request context (id, access log, last-resort 500), API keys, body size limit."""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import Any, Awaitable, Callable

from app.core.security import key_digests, key_matches, request_id
from app.logging import request_id_var

log = logging.getLogger("mmserve.http")

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


async def send_json(send: Callable, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


class RequestContextMiddleware:
    """X-Request-ID kept (if sane) or generated; set in a contextvar for logs, echoed in the response.
    Logs one access line per request. Any exception that escapes the app becomes a generic 500 that
    carries the request id, never a stack trace."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = request_id(_header(scope, b"x-request-id"))
        token = request_id_var.set(rid)
        scope.setdefault("state", {})["request_id"] = rid
        started = False
        status = 500
        t0 = time.perf_counter()

        async def _send(message: dict[str, Any]) -> None:
            nonlocal started, status
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        except Exception:  # noqa: BLE001
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                status = 500
                await send_json(send, 500, {"error": {"code": "internal_error",
                                                      "message": "internal server error", "request_id": rid}},
                                [(b"x-request-id", rid.encode())])
        finally:
            path = scope.get("path", "")
            if path not in ("/healthz", "/readyz", "/metrics"):
                log.info("%s %s %d %.1fms", scope.get("method"), path, status, (time.perf_counter() - t0) * 1000,
                         extra={"method": scope.get("method"), "path": path, "status": status,
                                "duration_ms": round((time.perf_counter() - t0) * 1000, 2)})
            request_id_var.reset(token)


class ApiKeyMiddleware:
    """When keys are configured, /v1 and /v2 need `Authorization: Bearer KEY` or `X-API-Key: KEY`.
    Health, readiness, metrics and the docs stay open (probes and scrapers carry no secrets)."""

    PROTECTED = ("/v1", "/v2")

    def __init__(self, app: ASGIApp, keys: list[str]):
        self.app = app
        self.keys = key_digests(keys)

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not self.keys or not scope.get("path", "").startswith(self.PROTECTED):
            return await self.app(scope, receive, send)
        given = _header(scope, b"x-api-key")
        auth = _header(scope, b"authorization")
        if given is None and auth and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        if not key_matches(given, self.keys):
            return await send_json(send, 401, {"error": {"code": "unauthorized",
                                                         "message": "missing or invalid API key"}},
                                   [(b"www-authenticate", b"Bearer")])
        await self.app(scope, receive, send)


class BodyTooLarge(Exception):
    pass


LINGER_IDLE_S = 5.0  # while discarding a refused body: give up after this long without a byte (nginx: 5 s)


class BodyLimitMiddleware:
    """Refuses bodies over `limit` bytes with a JSON 413 that the client can read.

    At once from Content-Length, before any of the body is read (so `Expect: 100-continue` gets the 413 instead
    of `100 Continue`: uvicorn sends that only when the app first reads the body); else as soon as the streamed
    body crosses the limit, whatever the app then made of the aborted read. The 413 goes out first, then the rest
    of the body is read and thrown away (nginx's lingering close: at most `linger_bytes`, `linger_s` seconds, and
    LINGER_IDLE_S without data) before the response ends and the connection closes. Closing with the body unread
    resets the connection, and a client that sends its whole body before reading (urllib, requests) then sees
    "connection reset" instead of the answer."""

    def __init__(self, app: ASGIApp, limit: int, linger_bytes: int = 256 * 1024 * 1024, linger_s: float = 10.0):
        self.app = app
        self.limit = limit
        self.linger_bytes = linger_bytes
        self.linger_s = linger_s

    async def _too_large(self, receive: Callable, send: Callable) -> None:
        data = json.dumps({"error": {"code": "payload_too_large",
                                     "message": f"request body exceeds {self.limit} bytes (MAX_UPLOAD_BYTES)"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": data, "more_body": True})  # the whole answer: readable now
        await self._discard(receive)
        await send({"type": "http.response.body", "body": b"", "more_body": False})  # the server closes after this

    async def _discard(self, receive: Callable) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + self.linger_s
        left = self.linger_bytes
        while left > 0:
            wait = min(end - loop.time(), LINGER_IDLE_S)
            if wait <= 0:
                return
            try:
                message = await asyncio.wait_for(receive(), wait)
            except asyncio.TimeoutError:
                return
            if message["type"] != "http.request":  # the client hung up
                return
            left -= len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = chunked = None
        for k, v in scope.get("headers", []):
            k = k.lower()
            if k == b"content-length":
                length = v
            elif k == b"transfer-encoding":
                chunked = v
        if length is not None:
            try:
                declared: int | None = int(length)
            except ValueError:
                declared = None
            if declared is not None and declared > self.limit:
                return await self._too_large(receive, send)
            if declared is not None and declared >= 0 and chunked is None:
                # the HTTP parser delivers exactly Content-Length bytes of body (what follows is the next request):
                # a body within the limit cannot grow past it, so there is nothing to watch
                return await self.app(scope, receive, send)
        received = 0
        exceeded = False  # the body crossed the limit: the app's read was aborted
        body_done = False  # the last body message has been read
        started = False

        async def _receive() -> dict[str, Any]:
            nonlocal received, exceeded, body_done
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.limit:
                    exceeded = True
                    raise BodyTooLarge()
            return message

        async def _send(message: dict[str, Any]) -> None:
            nonlocal started
            if exceeded and not started:
                return  # the app answered a body it could not read (a framework may turn the abort into a 400)
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, _receive, _send)
        except Exception:  # BodyTooLarge, or whatever the app made of it
            if started or not exceeded:
                raise
        if exceeded and not started:
            await self._too_large(_drained if body_done else receive, send)


async def _drained() -> dict[str, Any]:
    """`receive` of a request whose body has all been read: nothing left to discard."""
    return {"type": "http.request", "body": b"", "more_body": False}

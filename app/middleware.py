"""Pure ASGI middlewares: request context (id, access log, last-resort 500), API keys, body size limit."""
from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from typing import Any, Awaitable, Callable

from app.logging import request_id_var

log = logging.getLogger("mmserve.http")

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]
_RID_OK = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


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
        incoming = _header(scope, b"x-request-id")
        rid = incoming if incoming and _RID_OK.match(incoming) else uuid.uuid4().hex
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
        self.keys = [k.encode() for k in keys]

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not self.keys or not scope.get("path", "").startswith(self.PROTECTED):
            return await self.app(scope, receive, send)
        given = _header(scope, b"x-api-key")
        auth = _header(scope, b"authorization")
        if given is None and auth and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        ok = False
        if given:
            g = given.encode()
            for k in self.keys:  # constant time per key, no early exit
                ok |= hmac.compare_digest(g, k)
        if not ok:
            return await send_json(send, 401, {"error": {"code": "unauthorized",
                                                         "message": "missing or invalid API key"}},
                                   [(b"www-authenticate", b"Bearer")])
        await self.app(scope, receive, send)


class BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Refuses bodies over `limit` bytes: at once from Content-Length, else while the body streams in
    (a receive wrapper counts bytes and aborts as soon as the limit is crossed)."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def _too_large(self, send: Callable) -> None:
        await send_json(send, 413, {"error": {"code": "payload_too_large",
                                              "message": f"request body exceeds {self.limit} bytes (MAX_UPLOAD_BYTES)"}},
                        [(b"connection", b"close")])

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.limit
            except ValueError:
                too_big = False
            if too_big:
                return await self._too_large(send)
        received = 0
        started = False

        async def _receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge()
            return message

        async def _send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, _receive, _send)
        except BodyTooLarge:
            if started:
                raise
            await self._too_large(send)

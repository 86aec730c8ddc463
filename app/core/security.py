"""Request ids and API keys, for every front-end (HTTP middleware, gRPC interceptor and servicer)."""
from __future__ import annotations

import hashlib
import hmac
import os
import re

REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")  # what a request id may be to be echoed or logged


def request_id(incoming: str | None) -> str:
    """The client's request id when it is 1-128 characters of [A-Za-z0-9._:-] (no spaces, quotes, markup or
    line breaks: it goes into log lines and response headers), else a fresh one."""
    if incoming and REQUEST_ID.fullmatch(incoming):
        return incoming
    return os.urandom(16).hex()  # 32 hex digits, as uuid4().hex, without building a UUID object per request


def key_digests(keys: list[str]) -> list[bytes]:
    return [hashlib.sha256(k.encode()).digest() for k in keys]


def key_matches(given: str | None, digests: list[bytes]) -> bool:
    """Whether `given` is one of the keys, in constant time: SHA-256 digests (equal length, so not even the key's
    length leaks) compared with hmac.compare_digest against every key, with no early exit."""
    if not given:
        return False
    g = hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest()
    ok = False
    for d in digests:
        ok |= hmac.compare_digest(g, d)
    return ok

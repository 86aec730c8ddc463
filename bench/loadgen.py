"""Closed-loop load generator: one asyncio process, aiohttp, a pool of `concurrency` keep-alive connections.

`concurrency` workers each send the next pre-encoded body as soon as their previous answer arrived,
until `requests` have been sent. Latency is per request (send to full body read). Throughput is
successful requests over the wall time from the first send to the last answer. The client does no
per-request encoding (bodies are bytes built once), so it stays light next to the server.
"""
from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field

import numpy as np

_BATCH_IN_BODY = re.compile(rb'"batch_size":\s*(\d+)')


@dataclass
class PointResult:
    concurrency: int
    requests: int
    ok: int = 0
    errors: int = 0
    error_kinds: dict = field(default_factory=dict)
    seconds: float = 0.0
    latencies_ms: list = field(default_factory=list)
    batch_sizes: list = field(default_factory=list)  # from x-batch-size (mmserve) or the body (peer)

    def summary(self) -> dict:
        lat = np.asarray(self.latencies_ms) if self.latencies_ms else np.asarray([np.nan])
        return {
            "concurrency": self.concurrency, "requests": self.requests, "ok": self.ok, "errors": self.errors,
            "error_kinds": self.error_kinds, "seconds": round(self.seconds, 4),
            "throughput": round(self.ok / self.seconds, 2) if self.seconds > 0 else 0.0,
            "p50_ms": round(float(np.percentile(lat, 50)), 2), "p90_ms": round(float(np.percentile(lat, 90)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2), "mean_ms": round(float(np.mean(lat)), 2),
            "max_ms": round(float(np.max(lat)), 2),
            "mean_batch_size_header": round(float(np.mean(self.batch_sizes)), 2) if self.batch_sizes else None,
        }


async def run_point(url: str, bodies: list[bytes], content_type: str, concurrency: int, requests: int,
                    warmup: int = 0, timeout_s: float = 120.0, extra_headers: dict | None = None,
                    body_headers: list[dict] | None = None) -> PointResult:
    """`body_headers[i]`: headers of `bodies[i]` alone (e.g. the binary tensor extension's
    Inference-Header-Content-Length), on top of the content type and `extra_headers`."""
    import aiohttp

    res = PointResult(concurrency, requests)
    conn = aiohttp.TCPConnector(limit=concurrency, force_close=False, ttl_dns_cache=None)
    headers = {"content-type": content_type, **(extra_headers or {})}
    tmo = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=conn, timeout=tmo, skip_auto_headers=("User-Agent",)) as session:
        async def one(i: int, record: bool) -> None:
            body = bodies[i % len(bodies)]
            h = {**headers, **body_headers[i % len(bodies)]} if body_headers else headers
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=h) as r:
                    payload = await r.read()
                    status = r.status
                    bs = r.headers.get("x-batch-size")
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                if record:
                    res.errors += 1
                    kind = type(exc).__name__
                    res.error_kinds[kind] = res.error_kinds.get(kind, 0) + 1
                return
            dt = (time.perf_counter() - t0) * 1000
            if not record:
                return
            if status != 200:
                res.errors += 1
                res.error_kinds[str(status)] = res.error_kinds.get(str(status), 0) + 1
                return
            res.ok += 1
            res.latencies_ms.append(dt)
            if bs is None:
                m = _BATCH_IN_BODY.search(payload)
                bs = m.group(1) if m else None
            if bs is not None:
                res.batch_sizes.append(int(bs))

        res.seconds = await closed_loop(one, concurrency, requests, warmup)
    return res


async def closed_loop(one, concurrency: int, requests: int, warmup: int = 0) -> float:
    """`concurrency` callers, each awaiting `one(i, record)` for the next request index as soon as its last
    one answered: `warmup` unrecorded requests (they open the connections and warm the server's code
    paths), then `requests` recorded ones. Returns the seconds the recorded ones took."""
    async def worker(counter: list[int], total: int, record: bool) -> None:
        while counter[0] < total:
            i = counter[0]
            counter[0] += 1
            await one(i, record)

    if warmup:
        wc = [0]
        await asyncio.gather(*(worker(wc, warmup, False) for _ in range(concurrency)))
    counter = [0]
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(counter, requests, True) for _ in range(concurrency)))
    return time.perf_counter() - t0

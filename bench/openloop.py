"""Multi-process HTTP/1.1 load generator: open loop (a fixed arrival rate) or closed loop, keep-alive pools.

One Python process opening a fresh connection per request tops out near 1,000 requests a second on a 2-core
machine and then measures itself (connect failures, its own late writes). Here:

* `procs` worker processes (pinned to the client cores), each with its own event loop (uvloop when installed)
  and a pool of up to `connections` keep-alive connections speaking raw HTTP/1.1 (no client library);
* open loop: request k of the whole run is due at start + k / rate (spread over the workers), whatever the
  server does; a due request takes an idle connection, or opens one while the pool has room, or waits in the
  worker's queue. Latency counts from the due time (no coordinated omission), so the client's own queueing is
  in it and is also reported apart (`client_wait`);
* closed loop (`rate=None`): every connection sends its next request as soon as its answer is in;
* `fresh=True`: a new connection per request (`Connection: close`), as a load balancer without keep-alive.

Outcomes, per request: `answered` (a complete HTTP response: status, Retry-After, latency), `refused` (the
connect failed: ECONNREFUSED, nothing was sent), `lost` (the request was written on an established
connection and the connection ended, or was reset, before a complete answer: what a graceful server must
never do), `hung` (written, no answer within `timeout_s`), `unsent` (still queued in the client when the run
ended: the client or its pool, not the server, was short). A connection the server closed (or announced
`Connection: close` on) is replaced by a fresh one; idle connections are retired after `idle_s` (below
uvicorn's keep-alive timeout, as careful clients do, so an idle-timeout close never races a request).

Each worker process also reports the CPU seconds it used (`cpu_s_per_proc`): one near the run's seconds was
saturated, and the client rather than the server may have set the pace.

`run(...)` returns one merged dict; `python -m bench.openloop URL --rate R --seconds S` runs it from a shell.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np


@dataclass
class Request:
    """A pre-encoded request: method, path, headers and body (the Host and framing headers are added)."""
    path: str
    body: bytes
    content_type: str = "application/json"
    method: str = "POST"

    def encode(self, close: bool) -> bytes:
        head = (f"{self.method} {self.path} HTTP/1.1\r\nHost: bench\r\nContent-Type: {self.content_type}\r\n"
                f"Content-Length: {len(self.body)}\r\n" + ("Connection: close\r\n" if close else "") + "\r\n")
        return head.encode() + self.body


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request at a time (no pipelining)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future | None = None
        self.closed = False
        self.will_close = False
        self.idle_since = 0.0
        self.need: int | None = None  # total bytes of the response being read (head + body), once known
        self.head: dict | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def send(self, data: bytes) -> asyncio.Future:
        self.buf.clear()
        self.need = None
        self.head = None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.waiter

    def data_received(self, data: bytes) -> None:  # type: ignore[override]
        self.buf += data
        if self.need is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            try:
                status = int(lines[0].split(" ")[1])
            except (IndexError, ValueError):
                status = 0
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
            self.head = {"status": status, "retry_after": "retry-after" in headers,
                         "close": headers.get("connection", "").lower() == "close"}
            self.need = end + 4 + int(headers.get("content-length", "0") or 0)
        if len(self.buf) >= self.need and self.waiter is not None and not self.waiter.done():
            self.will_close = self.head["close"]
            self.waiter.set_result(self.head)

    def eof_received(self) -> bool:  # type: ignore[override]
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc) -> None:  # type: ignore[override]
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionResetError(
                "connection closed before a complete answer" + (f" ({len(self.buf)} bytes)" if self.buf else "")))


@dataclass
class _Tally:
    outcomes: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    retry_after: int = 0  # 429/503 answers carrying Retry-After
    lat_ok: list = field(default_factory=list)  # ms from due time, 200s
    lat_all: list = field(default_factory=list)  # ms from due time, every answer
    lat_ok_sent: list = field(default_factory=list)  # ms from the write, 200s (the server's side alone)
    client_wait: list = field(default_factory=list)  # ms from due time to the write
    sent: int = 0
    connects: int = 0
    per_second: Counter = field(default_factory=Counter)  # answered 200 per second of the run

    def as_dict(self) -> dict:
        return {"outcomes": dict(self.outcomes), "statuses": {str(k): v for k, v in self.statuses.items()},
                "errors": dict(self.errors), "retry_after": self.retry_after, "sent": self.sent,
                "connects": self.connects, "per_second": dict(self.per_second),
                "lat_ok": np.asarray(self.lat_ok, np.float32),
                "lat_ok_sent": np.asarray(self.lat_ok_sent, np.float32), "lat_all": np.asarray(self.lat_all, np.float32),
                "client_wait": np.asarray(self.client_wait, np.float32)}


async def _worker(host: str, port: int, requests: list[Request], *, rate: float | None, seconds: float,
                  start_at: float, offset: int, stride: int, connections: int, timeout_s: float, fresh: bool,
                  idle_s: float) -> dict:
    loop = asyncio.get_running_loop()
    clock = time.perf_counter  # uvloop's loop.time() has millisecond resolution
    tally = _Tally()
    idle: deque[_Conn] = deque()
    open_count = 0
    encoded_ka = [r.encode(close=False) for r in requests]
    encoded_close = [r.encode(close=True) for r in requests]
    # time.time() is shared by every worker; perf_counter is our own: convert once
    t0 = clock() + max(0.0, start_at - time.time())
    end = t0 + seconds

    async def connection() -> _Conn | None:
        nonlocal open_count
        while idle:
            c = idle.pop()  # most recently used first: the others may age out
            if c.closed or c.will_close or clock() - c.idle_since > idle_s:
                c.transport.close() if not c.closed else None
                open_count -= 1
                continue
            return c
        open_count += 1
        tally.connects += 1
        try:
            _, c = await asyncio.wait_for(loop.create_connection(_Conn, host, port), timeout_s)
            return c
        except (OSError, asyncio.TimeoutError) as exc:
            open_count -= 1
            tally.outcomes["refused"] += 1
            tally.errors[f"connect: {type(exc).__name__}"] += 1
            return None

    async def one(i: int, due: float) -> None:
        nonlocal open_count
        connects = tally.connects
        c = await connection()
        if c is None:
            return
        first = tally.connects != connects  # the first request on a connection opened for it
        wrote = clock()
        tally.client_wait.append((wrote - due) * 1000)
        tally.sent += 1
        data = (encoded_close if fresh else encoded_ka)[i % len(requests)]
        try:
            head = await asyncio.wait_for(c.send(data), max(0.001, wrote + timeout_s - clock()))
        except asyncio.TimeoutError:
            tally.outcomes["hung"] += 1
            tally.errors["hung: first request on its connection" if first else "hung: on a reused connection"] += 1
            c.transport.close()
            open_count -= 1
            return
        except ConnectionResetError as exc:
            tally.outcomes["lost"] += 1
            tally.errors[f"lost: {exc}"[:80]] += 1
            open_count -= 1
            return
        now = clock()
        ms = (now - due) * 1000
        status = head["status"]
        tally.outcomes["answered"] += 1
        tally.statuses[status] += 1
        tally.lat_all.append(ms)
        if status == 200:
            tally.lat_ok.append(ms)
            tally.lat_ok_sent.append((now - wrote) * 1000)
            tally.per_second[int(now - t0)] += 1
        elif status in (429, 503) and head["retry_after"]:
            tally.retry_after += 1
        if fresh or c.will_close or c.closed:
            if not c.closed:
                c.transport.close()
            open_count -= 1
        else:
            c.idle_since = now
            idle.append(c)

    waiting: deque[tuple[int, float]] = deque()  # due requests with no connection yet (open loop)
    inflight: set[asyncio.Task] = set()
    wake = asyncio.Event()

    def done(task: asyncio.Task) -> None:
        inflight.discard(task)
        wake.set()

    def launch(i: int, due: float) -> None:
        task = loop.create_task(one(i, due))
        inflight.add(task)
        task.add_done_callback(done)

    await asyncio.sleep(max(0.0, t0 - clock()))
    if rate is None:  # closed loop: `connections` clients back to back
        counter = [offset]

        async def client() -> None:
            while clock() < end:
                i = counter[0]
                counter[0] += stride
                await one(i, clock())

        await asyncio.gather(*(client() for _ in range(connections)))
    else:
        k = 0
        while True:
            i = offset + k * stride
            due = t0 + i / rate
            if due >= end:
                break
            while True:  # until request i is due, hand freed connections to the waiting ones
                while waiting and len(inflight) < connections:
                    launch(*waiting.popleft())
                now = clock()
                if now >= due:
                    break
                if waiting:
                    wake.clear()
                    try:
                        await asyncio.wait_for(wake.wait(), due - now)
                    except asyncio.TimeoutError:
                        pass
                else:
                    await asyncio.sleep(due - now)
            if not waiting and len(inflight) < connections:
                launch(i, due)
            else:
                waiting.append((i, due))
            k += 1
        # the schedule is over: what still waits is sent while the pool frees up, until the deadline
        limit = end + timeout_s
        while waiting and clock() < limit:
            while waiting and len(inflight) < connections:
                launch(*waiting.popleft())
            wake.clear()
            try:
                await asyncio.wait_for(wake.wait(), max(0.001, limit - clock()))
            except asyncio.TimeoutError:
                break
        tally.outcomes["unsent"] += len(waiting)
        if inflight:
            await asyncio.wait(set(inflight))
    for c in idle:
        if not c.closed:
            c.transport.close()
    return tally.as_dict()


def _proc_main(conn, cpus, args: dict) -> None:
    if cpus:
        try:
            os.sched_setaffinity(0, cpus)
        except OSError:
            pass
    try:
        import uvloop  # noqa: F401

        uvloop.install()
    except ImportError:
        pass
    try:
        cpu0 = time.process_time()
        part = asyncio.run(_worker(**args))
        part["cpu_s"] = time.process_time() - cpu0  # whether the load generator itself ran out of CPU
        conn.send(part)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        conn.close()


def _pct(a: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(a, q)), 1) if len(a) else None


def merge(parts: list[dict], seconds: float) -> dict:
    outcomes, statuses, errors, per_second = Counter(), Counter(), Counter(), Counter()
    for p in parts:
        outcomes.update(p["outcomes"])
        statuses.update(p["statuses"])
        errors.update(p["errors"])
        per_second.update(p["per_second"])
    lat_ok = np.concatenate([p["lat_ok"] for p in parts]) if parts else np.zeros(0)
    lat_all = np.concatenate([p["lat_all"] for p in parts]) if parts else np.zeros(0)
    lat_sent = np.concatenate([p["lat_ok_sent"] for p in parts]) if parts else np.zeros(0)
    wait = np.concatenate([p["client_wait"] for p in parts]) if parts else np.zeros(0)
    due = sum(outcomes.values())
    refusals = statuses.get("429", 0) + statuses.get("503", 0)
    return {
        "due": due, "sent": sum(p["sent"] for p in parts), "connects": sum(p["connects"] for p in parts),
        "outcomes": dict(outcomes), "statuses": dict(sorted(statuses.items())), "errors": dict(errors),
        "refusals": refusals, "refusals_with_retry_after": sum(p["retry_after"] for p in parts),
        "ok_per_s": round(statuses.get("200", 0) / seconds, 1) if seconds else None,
        "ok_per_second_timeline": [per_second.get(s, 0) for s in range(max([int(seconds), *per_second]) + 1)],
        "p50_ms_200": _pct(lat_ok, 50), "p99_ms_200": _pct(lat_ok, 99), "max_ms_200": _pct(lat_ok, 100),
        "p50_ms_200_from_write": _pct(lat_sent, 50), "p99_ms_200_from_write": _pct(lat_sent, 99),
        "p50_ms_all": _pct(lat_all, 50), "p99_ms_all": _pct(lat_all, 99),
        "client_wait_p50_ms": _pct(wait, 50), "client_wait_p99_ms": _pct(wait, 99),
        "cpu_s_per_proc": [round(p["cpu_s"], 3) for p in parts if "cpu_s" in p],
    }


def run(url: str, requests: list[Request], *, rate: float | None, seconds: float, procs: int = 4,
        connections: int = 64, timeout_s: float = 15.0, fresh: bool = False, idle_s: float = 4.0,
        cpus: set[int] | None = None, at=None) -> dict:
    """Run the load; `at=(t, fn)` calls fn() t seconds after the start (e.g. to send SIGTERM). Merged results."""
    u = urlsplit(url)
    ctx = mp.get_context("fork")
    start_at = time.time() + 0.5 + 0.1 * procs
    pipes, workers = [], []
    for w in range(procs):
        parent, child = ctx.Pipe(duplex=False)
        args = dict(host=u.hostname, port=u.port, requests=requests, rate=rate, seconds=seconds, start_at=start_at,
                    offset=w, stride=procs, connections=connections, timeout_s=timeout_s, fresh=fresh, idle_s=idle_s)
        p = ctx.Process(target=_proc_main, args=(child, cpus, args), daemon=True)
        p.start()
        child.close()
        pipes.append(parent)
        workers.append(p)
    if at is not None:
        t, fn = at
        time.sleep(max(0.0, start_at + t - time.time()))
        fn()
    parts = []
    for parent, p in zip(pipes, workers):
        part = parent.recv()
        p.join()
        if "error" in part:
            raise RuntimeError(f"load worker failed: {part['error']}")
        parts.append(part)
    out = merge(parts, seconds)
    out.update({"mode": "closed" if rate is None else "open", "rate": rate, "seconds": seconds, "procs": procs,
                "connections_per_proc": connections, "fresh_connections": fresh,
                "offered_per_s": round(out["due"] / seconds, 1) if rate is not None else None})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url", help="e.g. http://127.0.0.1:8000/v1/classify")
    p.add_argument("--body", default='{"text": "alice flew from paris to berlin"}', help="JSON body")
    p.add_argument("--rate", type=float, default=None, help="requests per second (open loop); none: closed loop")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--procs", type=int, default=4)
    p.add_argument("--connections", type=int, default=64, help="per process")
    p.add_argument("--fresh", action="store_true", help="a new connection per request")
    p.add_argument("--cpus", default=None, help="client cores, e.g. 0")
    a = p.parse_args(argv)
    u = urlsplit(a.url)
    cpus = {int(c) for c in a.cpus.split(",")} if a.cpus else None
    out = run(f"{u.scheme}://{u.netloc}", [Request(u.path, a.body.encode())], rate=a.rate, seconds=a.seconds,
              procs=a.procs, connections=a.connections, fresh=a.fresh, cpus=cpus)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Overload, client-disconnect storm and SIGTERM under load (issue 14 item 4): a scenario with a report, not a test.

    .venv/bin/python -m bench.overload [--repository DIR] [--seconds 60] [--factor 5] [--out bench/results/overload]

1. sustainable rate: closed loop (8 clients) for a few seconds on the served classify model -> R answers/s;
2. overload: open loop at FACTOR x R for SECONDS, every request on its own connection: each must get an answer
   (200, or 503/429 with Retry-After; 504 past its deadline), none may hang past its deadline (client timeout =
   REQUEST_TIMEOUT_S + 10 s); p50/p99 of the admitted (200) ones; the server's RSS before and after;
3. disconnect storm: 200 requests at once, half of the clients hang up 20 ms after sending; then the queue-depth
   and in-flight gauges of /metrics must return to 0 (no leaked slots);
4. SIGTERM under load: a fresh server, the same open loop, SIGTERM half-way: every request whose connection was
   accepted is answered (200 or 503), connections after the close are refused, no reset after sending, exit 0.

Without --repository the tiny test models (tests/fixtures_app.py, real ONNX graphs) are built in a temporary
directory, so the scenario runs anywhere in a couple of minutes. Writes OUT.json and OUT.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from bench.servers import mmserve

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 5.0  # the server's REQUEST_TIMEOUT_S in this scenario
BODY = json.dumps({"text": "alice flew from paris to berlin and back again"}).encode()


def request_bytes(path: str = "/v1/classify") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nConnection: close\r\n"
            f"Content-Length: {len(BODY)}\r\n\r\n").encode() + BODY


async def one_request(port: int, *, hang_up_after: float | None = None, limit: float = TIMEOUT_S + 10) -> dict:
    """One request on a fresh connection: {'outcome': answered|refused|reset_after_send|hung|hung_up, ...}."""
    t0 = time.perf_counter()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), limit)
    except (ConnectionRefusedError, OSError, asyncio.TimeoutError) as exc:
        return {"outcome": "refused", "error": type(exc).__name__}
    try:
        writer.write(request_bytes())
        await writer.drain()
        if hang_up_after is not None:
            await asyncio.sleep(hang_up_after)
            writer.transport.abort()
            return {"outcome": "hung_up"}
        raw = await asyncio.wait_for(reader.read(), limit)  # Connection: close: the server ends the exchange
        if not raw:
            return {"outcome": "reset_after_send", "error": "closed without an answer"}
        head = raw.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
        status = int(head[0].split(" ")[1])
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
        return {"outcome": "answered", "status": status, "retry_after": "retry-after" in headers,
                "ms": (time.perf_counter() - t0) * 1000}
    except asyncio.TimeoutError:
        return {"outcome": "hung"}
    except (ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError) as exc:
        return {"outcome": "reset_after_send", "error": type(exc).__name__}
    finally:
        writer.close()


async def closed_loop(port: int, seconds: float, clients: int = 8) -> float:
    done = 0
    end = time.monotonic() + seconds

    async def client() -> None:
        nonlocal done
        while time.monotonic() < end:
            r = await one_request(port)
            done += r.get("status") == 200

    t0 = time.monotonic()
    await asyncio.gather(*(client() for _ in range(clients)))
    return done / (time.monotonic() - t0)


async def open_loop(port: int, rate: float, seconds: float, at_half=None) -> tuple[list[dict], float]:
    tasks = []
    t0 = time.monotonic()
    n = int(rate * seconds)
    fired = False
    for i in range(n):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if at_half is not None and not fired and i >= n // 2:
            at_half()
            fired = True
        tasks.append(asyncio.ensure_future(one_request(port)))
    offered = n / max(1e-9, time.monotonic() - t0)
    return list(await asyncio.gather(*tasks)), offered


def summarise(results: list[dict]) -> dict:
    outcomes = Counter(r["outcome"] for r in results)
    statuses = Counter(r["status"] for r in results if r["outcome"] == "answered")
    ok_ms = [r["ms"] for r in results if r.get("status") == 200]
    refusals = [r for r in results if r.get("status") in (429, 503)]
    errors = Counter(f"{r['outcome']}: {r['error']}" for r in results if r.get("error"))
    return {"sent": len(results), "outcomes": dict(outcomes), "errors": dict(errors), "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "refusals_with_retry_after": sum(r["retry_after"] for r in refusals), "refusals": len(refusals),
            "p50_ms_200": round(float(np.percentile(ok_ms, 50)), 1) if ok_ms else None,
            "p99_ms_200": round(float(np.percentile(ok_ms, 99)), 1) if ok_ms else None}


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def gauges(url: str) -> dict[str, float]:
    import urllib.request

    out: dict[str, float] = {}
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            for name in ("mmserve_queue_depth", "mmserve_inflight_requests"):
                if line.startswith(name + "{"):
                    out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def start_server(repo: Path, log_dir: Path, name: str):
    s = mmserve(repo, name=name, max_batch_size="auto", threads=1, cpus=None, device="cpu", log_dir=log_dir,
                extra_env={"MMSERVE_QUEUE_SIZE": "64", "MMSERVE_REQUEST_TIMEOUT_S": str(TIMEOUT_S),
                           "MMSERVE_DRAIN_PERIOD_S": "1", "MMSERVE_LOG_LEVEL": "WARNING"})
    s.start()
    return s


async def scenario(repo: Path, seconds: float, factor: float, log_dir: Path) -> dict:
    report: dict = {"seconds": seconds, "factor": factor, "request_timeout_s": TIMEOUT_S, "queue_size": 64}
    server = start_server(repo, log_dir, "overload")
    try:
        await closed_loop(server.port, 2)  # warm: allocations, batch-size calibration done, caches
        rate = await closed_loop(server.port, 5)
        report["sustainable_per_s"] = round(rate, 1)
        rss_before = rss_mb(server.proc.pid)
        results, offered = await open_loop(server.port, factor * rate, seconds)
        await asyncio.sleep(1)
        report["overload"] = {**summarise(results), "offered_per_s": round(offered, 1),
                              "rss_before_mb": round(rss_before, 1), "rss_after_mb": round(rss_mb(server.proc.pid), 1)}
        storm = [one_request(server.port, hang_up_after=0.02 if i % 2 else None) for i in range(200)]
        storm_results = await asyncio.gather(*storm)
        end = time.monotonic() + 30
        g = gauges(server.url)
        while time.monotonic() < end and any(g.values()):
            await asyncio.sleep(0.2)
            g = gauges(server.url)
        report["disconnect_storm"] = {**summarise([r for r in storm_results if r["outcome"] != "hung_up"]),
                                      "hung_up": sum(r["outcome"] == "hung_up" for r in storm_results),
                                      "gauges_after": g}
    finally:
        server.stop(timeout=30)
    server = start_server(repo, log_dir, "sigterm")
    try:
        await closed_loop(server.port, 2)
        proc = server.proc
        results, offered = await open_loop(server.port, factor * rate, min(seconds, 20),
                                           at_half=lambda: proc.send_signal(signal.SIGTERM))
        code = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 60)
        s = summarise(results)
        accepted = sum(r["outcome"] != "refused" for r in results)
        report["sigterm"] = {**s, "offered_per_s": round(offered, 1), "accepted": accepted,
                             "answered": s["outcomes"].get("answered", 0),
                             "lost": s["outcomes"].get("reset_after_send", 0) + s["outcomes"].get("hung", 0),
                             "refused_after_close": s["outcomes"].get("refused", 0), "exit_code": code}
    finally:
        server.stop(timeout=30)
    return report


def markdown(r: dict) -> str:
    o, st, sg = r["overload"], r["disconnect_storm"], r["sigterm"]
    hung = o["outcomes"].get("hung", 0)
    return "\n".join([
        "# Overload, disconnect storm, SIGTERM under load", "",
        f"Sustainable rate (closed loop, 8 clients): **{r['sustainable_per_s']}/s**; open loop at {r['factor']}x for "
        f"{r['seconds']} s, each request on a fresh connection (offered {o['offered_per_s']}/s, the one-process "
        f"client's ceiling may be lower than asked); REQUEST_TIMEOUT_S={r['request_timeout_s']}, "
        f"QUEUE_SIZE={r['queue_size']}.", "",
        "| phase | sent | answered | 200 | 503/429 (with Retry-After) | 504 | hung | reset after send | refused | p50 / p99 of 200 (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(f"| {name} | {x['sent']} | {x['outcomes'].get('answered', 0)} | {x['statuses'].get('200', 0)} | "
          f"{x['refusals']} ({x['refusals_with_retry_after']}) | {x['statuses'].get('504', 0)} | "
          f"{x['outcomes'].get('hung', 0)} | {x['outcomes'].get('reset_after_send', 0)} | {x['outcomes'].get('refused', 0)} | "
          f"{x['p50_ms_200']} / {x['p99_ms_200']} |" for name, x in (("overload", o), ("disconnect storm (stayed)", st),
                                                                    ("SIGTERM half-way", sg))),
        "",
        f"- Overload: {hung} request(s) hung past the deadline; server RSS {o['rss_before_mb']} MB before, "
        f"{o['rss_after_mb']} MB after ({(o['rss_after_mb'] / o['rss_before_mb'] - 1) * 100:+.1f}%).",
        f"- Disconnect storm: {st['hung_up']} of 200 clients hung up 20 ms after sending; gauges afterwards: "
        f"{st['gauges_after']}.",
        f"- SIGTERM: {sg['accepted']} connections accepted, {sg['answered']} answered, {sg['lost']} lost, "
        f"{sg['refused_after_close']} refused after the listener closed; exit code {sg['exit_code']}.",
        f"- Statuses and client-side errors: overload {o['statuses']} {o['errors']}; SIGTERM {sg['statuses']} "
        f"{sg['errors']}.", "",
        "Reading it: the load generator is one Python process opening a fresh connection per request. Past about "
        "1,000 new connections a second on a 2-core machine it is the bottleneck: `refused: OSError` are its own "
        "connect failures (ephemeral ports in TIME_WAIT, not the server refusing), a 408 is a connection the "
        "client opened and then did not write its request on for HEADER_TIMEOUT_S (the server answers it and "
        "closes), and the latency of a 200 includes the client's own queueing. `reset after send` in the "
        "SIGTERM phase are connections the client saw as open that got no answer: connections past a full "
        "accept queue (the kernel completes the client's handshake but keeps the connection out of the "
        "backlog the server drains) cannot be told apart from the client side.", ""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repository", type=Path, help="model repository (default: tiny test models, built now)")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--factor", type=float, default=5.0)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "overload")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        repo = a.repository
        if repo is None:
            sys.path.insert(0, str(ROOT))
            from tests.fixtures_app import MODELS, build_model

            repo = Path(tmp) / "repo"
            for i, name in enumerate(MODELS):
                build_model(repo, name, seed=i)
        report = asyncio.run(scenario(repo, a.seconds, a.factor, Path(tmp) / "logs"))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    a.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

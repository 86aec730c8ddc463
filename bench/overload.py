"""Overload, client-disconnect storm and SIGTERM under load (issue 14 item 4): a scenario with a report, not a test.

    .venv/bin/python -m bench.overload [--workloads tiny,demo] [--seconds 60] [--factor 5] [--out bench/results/overload]

Per workload (tiny: the test suite's tiny models, built now, a text-only JSON request; demo: demo-classify from
model_repository, the bench's multipart requests with a JPEG photo and a WAV clip), with the server pinned to the
server core(s) and the load generator (bench/openloop.py: several processes, keep-alive connection pools) to the
client core(s):

1. sustainable rate: closed loop (QUEUE_SIZE keep-alive clients: enough to fill the batches, none refused) for a
   few seconds -> R answers 200/s;
2. overload: open loop at FACTOR x R for SECONDS: each request must get an answer (200, or 503/429 with
   Retry-After; 504 past its deadline), none may hang past its deadline (client limit = REQUEST_TIMEOUT_S + 10 s);
   p50/p99 of the admitted (200) ones, counted from the moment each request was due; the server's RSS before,
   at its peak and after;
3. disconnect storm: 200 requests at once on fresh connections, half of the clients hang up 20 ms after sending;
   then the queue-depth and in-flight gauges of /metrics must return to 0 (no leaked slots);
4. SIGTERM under load: a fresh server, the same open loop, SIGTERM half-way: every request written on an
   established connection is answered (200 or 503), connections after the listener closed are refused, none
   is lost (reset or closed without an answer), exit code 0.

`--fresh` opens a connection per request instead of keep-alive pools (what a client without pooling does).
Writes OUT.json and OUT.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from bench import openloop
from bench.report import git_state
from bench.servers import mmserve

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 5.0  # the server's REQUEST_TIMEOUT_S in this scenario
QUEUE_SIZE = 64
DRAIN_PERIOD_S = 1.0
BODY = json.dumps({"text": "alice flew from paris to berlin and back again"}).encode()


def request_bytes(path: str = "/v1/classify") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nConnection: close\r\n"
            f"Content-Length: {len(BODY)}\r\n\r\n").encode() + BODY


async def one_request(port: int, *, hang_up_after: float | None = None, limit: float = TIMEOUT_S + 10) -> dict:
    """One request on a fresh connection (the disconnect storm): {'outcome': answered|refused|lost|hung|hung_up}."""
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
            return {"outcome": "lost", "error": "closed without an answer"}
        head = raw.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
        status = int(head[0].split(" ")[1])
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
        return {"outcome": "answered", "status": status, "retry_after": "retry-after" in headers,
                "ms": (time.perf_counter() - t0) * 1000}
    except asyncio.TimeoutError:
        return {"outcome": "hung"}
    except (ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError) as exc:
        return {"outcome": "lost", "error": type(exc).__name__}
    finally:
        writer.close()


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


class RssSampler:
    """Peak RSS of a process, sampled every 0.2 s on a thread while a phase runs."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, rss_mb(pid), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.peak = max(self.peak, rss_mb(self.pid))
            except Exception:  # noqa: BLE001 - the process is gone (SIGTERM phase)
                return

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def start_server(repo: Path, log_dir: Path, name: str, cpus: set[int] | None):
    s = mmserve(repo, name=name, max_batch_size="auto", threads=1, cpus=cpus, device="cpu", log_dir=log_dir,
                extra_env={"MMSERVE_QUEUE_SIZE": str(QUEUE_SIZE), "MMSERVE_REQUEST_TIMEOUT_S": str(TIMEOUT_S),
                           "MMSERVE_DRAIN_PERIOD_S": str(DRAIN_PERIOD_S), "MMSERVE_LOG_LEVEL": "INFO"})
    s.start()
    return s


def workload_requests(name: str, tmp: Path, demo_repo: Path | None) -> tuple[Path, list[openloop.Request], str]:
    """(repository to serve, request bodies, description) of a workload."""
    if name == "tiny":
        sys.path.insert(0, str(ROOT))
        from tests.fixtures_app import MODELS, build_model

        repo = tmp / "tiny-repo"
        if not repo.exists():
            for i, model in enumerate(MODELS):
                build_model(repo, model, seed=i)
        return repo, [openloop.Request("/v1/classify", BODY)], (
            "tiny-classify (the test suite's tiny ONNX graphs, tests/fixtures_app.py), a 60-byte text-only JSON "
            "request on /v1/classify")
    if name == "demo":
        from bench.workload import Workload, build_requests, demo_model

        found, why = demo_model(demo_repo)
        if found is None:
            raise SystemExit(f"bench.overload: {why}")
        wl = Workload("demo", "demo-classify", found)
        build_requests(wl, 64, log=lambda m: print(m, file=sys.stderr))
        sizes = [len(b) for b in wl.bodies]
        reqs = [openloop.Request("/v1/classify", b, wl.content_type) for b in wl.bodies]
        return wl.repository_view(), reqs, (
            f"demo-classify ({found}), the bench's 64 multipart requests (text, a JPEG photo, a WAV clip; "
            f"{min(sizes) // 1024}-{max(sizes) // 1024} KiB) on /v1/classify")
    raise SystemExit(f"bench.overload: unknown workload {name!r} (tiny, demo)")


def scenario(name: str, repo: Path, reqs: list[openloop.Request], a: argparse.Namespace, log_dir: Path,
             server_cpus: set[int] | None, client_cpus: set[int] | None) -> dict:
    log = lambda m: print(f"overload [{name}]: {m}", file=sys.stderr, flush=True)  # noqa: E731
    load = dict(procs=a.procs, connections=a.connections, timeout_s=TIMEOUT_S + 10, fresh=a.fresh, cpus=client_cpus)
    closed_per_proc = max(1, QUEUE_SIZE // a.procs)
    report: dict = {"seconds": a.seconds, "factor": a.factor, "request_timeout_s": TIMEOUT_S,
                    "rss_repeat_seconds": a.rss_repeat_seconds,
                    "queue_size": QUEUE_SIZE, "drain_period_s": DRAIN_PERIOD_S}
    server = start_server(repo, log_dir, f"overload-{name}", server_cpus)
    try:
        report["server_settings"] = server.notes
        openloop.run(server.url, reqs, rate=None, seconds=3, **{**load, "connections": closed_per_proc})
        closed = openloop.run(server.url, reqs, rate=None, seconds=a.sustain_seconds,
                              **{**load, "connections": closed_per_proc})
        rate = closed["statuses"].get("200", 0) / a.sustain_seconds
        report["sustainable"] = {"per_s": round(rate, 1), "p50_ms": closed["p50_ms_200"], "p99_ms": closed["p99_ms_200"],
                                 "connections": closed_per_proc * a.procs, "statuses": closed["statuses"]}
        log(f"sustainable {rate:.1f}/s (closed loop, {closed_per_proc * a.procs} connections)")
        time.sleep(1)
        rss_before = rss_mb(server.proc.pid)
        with RssSampler(server.proc.pid) as rss:
            over = openloop.run(server.url, reqs, rate=a.factor * rate, seconds=a.seconds, **load)
        time.sleep(2)
        report["overload"] = {**over, "rss_before_mb": round(rss_before, 1), "rss_peak_mb": round(rss.peak, 1),
                              "rss_after_mb": round(rss_mb(server.proc.pid), 1)}
        log(f"overload: {json.dumps({k: over[k] for k in ('outcomes', 'statuses', 'p50_ms_200', 'p99_ms_200')})}")
        time.sleep(5)
        report["overload"]["rss_after_7s_mb"] = round(rss_mb(server.proc.pid), 1)
        repeats = []  # more overload bursts on the same server: a leak keeps growing, a high-water mark does not
        for _ in range(a.rss_repeats):
            burst = openloop.run(server.url, reqs, rate=a.factor * rate, seconds=a.rss_repeat_seconds, **load)
            time.sleep(2)
            repeats.append({"rss_after_mb": round(rss_mb(server.proc.pid), 1), "answered": burst["outcomes"].get("answered", 0),
                            "hung": burst["outcomes"].get("hung", 0), "lost": burst["outcomes"].get("lost", 0)})
        report["overload"]["rss_repeats"] = repeats
        log(f"RSS {rss_before:.1f} MB before, {report['overload']['rss_after_mb']} after, then after each further burst: "
            f"{[r['rss_after_mb'] for r in repeats]}")

        async def storm() -> list[dict]:
            return await asyncio.gather(*(one_request(server.port, hang_up_after=0.02 if i % 2 else None)
                                          for i in range(200)))

        storm_results = asyncio.run(storm())
        end = time.monotonic() + 30
        g = gauges(server.url)
        while time.monotonic() < end and any(g.values()):
            time.sleep(0.2)
            g = gauges(server.url)
        report["disconnect_storm"] = {**summarise([r for r in storm_results if r["outcome"] != "hung_up"]),
                                      "hung_up": sum(r["outcome"] == "hung_up" for r in storm_results),
                                      "gauges_after": g}
    finally:
        server.stop(timeout=30)
    for phase, fresh in (("sigterm", a.fresh), ("sigterm_fresh", True)):
        if phase == "sigterm_fresh" and a.fresh:
            continue
        report[phase] = sigterm_phase(name, repo, reqs, a, log_dir, server_cpus, {**load, "fresh": fresh}, rate,
                                      closed_per_proc, log)
    return report


def sigterm_phase(name, repo, reqs, a, log_dir, server_cpus, load, rate, closed_per_proc, log) -> dict:
    server = start_server(repo, log_dir, f"sigterm-{name}" + ("-fresh" if load["fresh"] else ""), server_cpus)
    try:
        openloop.run(server.url, reqs, rate=None, seconds=3, **{**load, "connections": closed_per_proc, "fresh": False})
        proc = server.proc
        seconds = min(a.seconds, a.sigterm_seconds)
        def term() -> None:
            proc.send_signal(signal.SIGTERM)

        res = openloop.run(server.url, reqs, rate=a.factor * rate, seconds=seconds, at=(seconds / 2, term), **load)
        try:
            code = proc.wait(60)
        except Exception:  # noqa: BLE001
            code = None
        o = res["outcomes"]
        backlog = [line for line in server.tail(100000).splitlines() if "listener closed" in line]
        out = {**res, "admitted": res["sent"], "answered": o.get("answered", 0),
               "lost": o.get("lost", 0) + o.get("hung", 0), "refused": o.get("refused", 0),
               "exit_code": code, "server_log_listener_closed": backlog[-1:]}
        log(f"sigterm (fresh connections: {load['fresh']}): "
            f"{json.dumps({k: out[k] for k in ('admitted', 'answered', 'lost', 'refused', 'statuses', 'exit_code')})}")
        return out
    finally:
        server.stop(timeout=30)


def _row(name: str, x: dict) -> str:
    o, st = x["outcomes"], x["statuses"]
    return (f"| {name} | {x.get('due', x.get('sent'))} | {o.get('answered', 0)} | {st.get('200', 0)} | "
            f"{x['refusals']} ({x['refusals_with_retry_after']}) | {st.get('504', 0)} | {st.get('408', 0)} | "
            f"{sum(v for k, v in st.items() if k not in ('200', '429', '503', '504', '408'))} | "
            f"{o.get('hung', 0)} | {o.get('lost', 0)} | {o.get('refused', 0)} | {o.get('unsent', 0)} | "
            f"{x['p50_ms_200']} / {x['p99_ms_200']} |")


def markdown(report: dict) -> str:
    m = report["meta"]
    out = ["# Overload, disconnect storm, SIGTERM under load", "",
           f"{m['started']} · {m['machine']} · server pinned to cores {m['server_cpus']} (onnxruntime 1 intra-op "
           f"thread), load generator on cores {m['client_cpus']} · commit {m.get('git', '?')} · {m['note']}", "",
           f"Load generator: `bench/openloop.py`, {m['procs']} processes x {m['connections']} "
           + ("fresh connections (one per request)" if m["fresh"] else "keep-alive connections") +
           f" (raw HTTP/1.1, uvloop); open loop: request k is due at k / rate whatever the server does, and its "
           f"latency counts from then (queueing in the client included). Server: REQUEST_TIMEOUT_S={TIMEOUT_S}, "
           f"QUEUE_SIZE={QUEUE_SIZE}, DRAIN_PERIOD_S={DRAIN_PERIOD_S}, MAX_BATCH_SIZE=auto. "
           f"A request is `hung` with no answer {TIMEOUT_S + 10:.0f} s after it was written. Command: "
           f"`{m['command']}`.", "",
           "Columns: `due` requests the open loop scheduled; `answered` got a complete HTTP response (statuses "
           "follow); `hung`: written, no answer within the limit; `lost`: written on an established connection "
           "that then closed or was reset without a complete answer; `refused`: the connect itself failed "
           "(ECONNREFUSED after the listener closed: nothing was sent); `unsent`: still waiting for a free "
           "connection of the client's pool when the run ended (the server answered more slowly than requests "
           "arrived, so they queued in the client; the latency of every request counts from its due time). "
           "SIGTERM phases: `admitted` = written on an established connection.", ""]
    for name, r in report["workloads"].items():
        o, st, sg, su = r["overload"], r["disconnect_storm"], r["sigterm"], r["sustainable"]
        sf = r.get("sigterm_fresh")
        out += [f"## {name}: {r['description']}", "",
                f"Sustainable rate (closed loop, {su['connections']} keep-alive clients): **{su['per_s']}/s** "
                f"(p50 {su['p50_ms']} ms, p99 {su['p99_ms']} ms). Open loop at {r['factor']}x: "
                f"**{o['offered_per_s']}/s offered** for {r['seconds']:.0f} s.", "",
                "| phase | due | answered | 200 | 503/429 (with Retry-After) | 504 | 408 | other | hung | lost | "
                "refused | unsent | p50 / p99 of 200 (ms) |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
                _row(f"overload {r['factor']:g}x, {r['seconds']:.0f} s", o),
                _row("disconnect storm (the clients that stayed)", st),
                _row(f"SIGTERM at {sg['seconds'] / 2:.0f} s of {sg['seconds']:.0f} s"
                     + (", fresh connections" if sg["fresh_connections"] else ", keep-alive"), sg),
                *([_row(f"SIGTERM at {sf['seconds'] / 2:.0f} s of {sf['seconds']:.0f} s, fresh connections", sf)]
                  if sf else []), "",
                f"- Overload: {o['ok_per_s']} answers 200/s; {o['outcomes'].get('hung', 0)} hung, "
                f"{o['outcomes'].get('lost', 0)} lost; p50 / p99 of 200 counted from the write (the server's side): "
                f"{o['p50_ms_200_from_write']} / {o['p99_ms_200_from_write']} ms; "
                f"client-side wait for a connection p50 {o['client_wait_p50_ms']} ms, "
                f"p99 {o['client_wait_p99_ms']} ms; p99 of every answer {o['p99_ms_all']} ms. Server RSS "
                f"{o['rss_before_mb']} MB before, {o['rss_peak_mb']} MB at the peak, {o['rss_after_mb']} MB 2 s after "
                f"({(o['rss_after_mb'] / o['rss_before_mb'] - 1) * 100:+.1f}%), {o['rss_after_7s_mb']} MB 7 s after "
                f"({(o['rss_after_7s_mb'] / o['rss_before_mb'] - 1) * 100:+.1f}%: the server hands freed heap back to "
                f"the OS within 5 s of going idle, app/core/memory.py)"
                + (f"; after {len(o['rss_repeats'])} more {r['rss_repeat_seconds']:.0f} s bursts at the same rate: "
                   f"{', '.join(str(x['rss_after_mb']) for x in o['rss_repeats'])} MB (a leak would keep growing; "
                   f"hung {sum(x['hung'] for x in o['rss_repeats'])}, lost {sum(x['lost'] for x in o['rss_repeats'])})"
                   if o.get("rss_repeats") else "") + ".",
                f"- Disconnect storm: {st['hung_up']} of 200 clients hung up 20 ms after sending; gauges afterwards: "
                f"{st['gauges_after']}.",
                f"- SIGTERM: **{sg['admitted']} requests admitted** (written on an established connection), "
                f"**{sg['answered']} answered** ({sg['statuses']}), **{sg['lost']} lost**, {sg['refused']} connections "
                f"refused after the listener closed, {sg['outcomes'].get('unsent', 0)} unsent; exit code "
                f"{sg['exit_code']}. Server: {' '.join(sg['server_log_listener_closed']) or '-'}",
                *([f"- SIGTERM, fresh connections: **{sf['admitted']} admitted**, **{sf['answered']} answered** "
                   f"({sf['statuses']}), **{sf['lost']} lost**, {sf['refused']} refused, "
                   f"{sf['outcomes'].get('unsent', 0)} unsent; exit code {sf['exit_code']}. Server: "
                   f"{' '.join(sf['server_log_listener_closed']) or '-'}"] if sf else []),
                f"- Client-side errors: overload {o['errors'] or '{}'}; SIGTERM {sg['errors'] or '{}'}"
                + (f"; SIGTERM, fresh connections {sf['errors'] or '{}'}" if sf else "") + ".", ""]
    out += ["## Reading it", "",
            "- A refused request costs the server its HTTP handling only: with every model of its task full it is "
            "answered 503 at its head, its body read and dropped unparsed (`Service.refuse_early`). A workload bound by "
            "the model (demo) is then refused cheaply next to inference: the server answers at the offered rate and "
            "the admitted requests' p99 is bounded by QUEUE_SIZE and REQUEST_TIMEOUT_S.",
            "- A workload bound by the HTTP layer (tiny: a 60-byte request the model answers in microseconds) costs "
            "nearly as much to refuse as to serve. When requests arrive faster than one core can even answer 503, the "
            "excess waits in the client's pool (`unsent`), the latency counted from the due time grows with the run, "
            "and the server's side (counted from the write) is what QUEUE_SIZE and REQUEST_TIMEOUT_S bound. The 200s "
            "a second fall far below the sustainable rate: every event-loop iteration then reads and refuses a "
            "request from each of the ~1,000 busy connections, and an admitted request needs several iterations "
            "(preprocessing, batch, answer), so QUEUE_SIZE admitted requests take about a second to go through. "
            "More cores for the HTTP layer (MMSERVE_WORKERS) or a proxy in front that sheds load are the ways out.",
            "- Fixes these runs led to: admission before preprocessing, then at the request head (app/core/service.py: "
            "refused requests used to be decoded first, and the preprocessing pool's queue grew past every deadline: "
            "hundreds hung at 5x on the demo model); accepting in bursts (app/server.py: uvloop accepts one "
            "connection per loop iteration, so under overload new connections waited in the kernel's accept queue "
            "with their requests sent: hundreds hung at 5x on the tiny model, all first requests on new "
            "connections); freed heap handed back to the OS once idle (app/core/memory.py: the RSS after a burst had "
            "stayed at its high-water mark).", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="tiny", help="comma-separated: tiny,demo")
    p.add_argument("--demo-repo", type=Path, default=None, help="repository holding demo-classify (default model_repository)")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--sigterm-seconds", type=float, default=20.0, help="length of the SIGTERM phase (SIGTERM half-way)")
    p.add_argument("--sustain-seconds", type=float, default=5.0)
    p.add_argument("--factor", type=float, default=5.0)
    p.add_argument("--rss-repeats", type=int, default=2, help="further overload bursts to tell a leak from a high-water mark")
    p.add_argument("--rss-repeat-seconds", type=float, default=15.0)
    p.add_argument("--procs", type=int, default=4, help="load generator processes")
    p.add_argument("--connections", type=int, default=256, help="keep-alive connections per load process")
    p.add_argument("--fresh", action="store_true", help="a fresh connection per request (no keep-alive)")
    p.add_argument("--server-cpus", default=None, help="default: all cores but the first (2 cores: 1)")
    p.add_argument("--client-cpus", default=None, help="default: the first core (0)")
    p.add_argument("--note", default="", help="a line for the report (e.g. what else ran on the machine)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "overload")
    a = p.parse_args(argv)
    from bench.cores import default_split, parse_cpus

    d_server, d_client = default_split()
    server_cpus, client_cpus = parse_cpus(a.server_cpus, d_server), parse_cpus(a.client_cpus, d_client)
    os.sched_setaffinity(0, client_cpus)
    report: dict = {"meta": {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             "machine": f"{os.uname().nodename} {os.cpu_count()} cpus",
                             "server_cpus": sorted(server_cpus), "client_cpus": sorted(client_cpus),
                             "procs": a.procs, "connections": a.connections, "fresh": a.fresh,
                             "loadavg_at_start": [round(x, 2) for x in os.getloadavg()], "note": a.note,
                             "command": "python -m bench.overload " + " ".join(sys.argv[1:] if argv is None else argv),
                             "git": git_state()},
                    "workloads": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.workloads.split(","):
            repo, reqs, description = workload_requests(name, Path(tmp), a.demo_repo)
            report["workloads"][name] = {"description": description,
                                         **scenario(name, repo, reqs, a, Path(tmp) / "logs", server_cpus, client_cpus)}
    report["meta"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=_np) + "\n")
    a.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


def _np(o):
    return o.tolist() if isinstance(o, np.ndarray) else str(o)


if __name__ == "__main__":
    raise SystemExit(main())

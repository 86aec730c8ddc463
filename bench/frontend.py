"""`python -m bench.frontend` (`make bench-frontend`): the front-end ceiling, MMSERVE_WORKERS 1 to 8, on a no-op model.

The model is the bench's tiny model with a graph that computes nothing (bench/noop.py): the server parses the
multipart body, decodes and resizes the JPEG, computes the WAV's log-mel and tokenises the text exactly as for the
tiny model, and the model itself costs next to nothing, so what the server answers per second is the ceiling of
its front-end work.

For each worker count (`--workers`; one above the number of server cores is skipped, with the reason): mmserve
with MMSERVE_WORKERS=w pinned to the server cores, every front-end answering /readyz itself, then the bench's
tiny-workload requests (text, a real JPEG photo, a real WAV clip) sent closed loop over keep-alive connections,
`--concurrency` per worker, by `--clients` load-generator processes pinned to the client cores (bench/openloop.py:
raw HTTP/1.1, one event loop per process, lighter than the server's work per request): a warm-up, then `--seconds`
measured. Per worker count: req/s, per worker, scaling against one worker (efficiency = req/s / (w x req/s at
1)), p50 / p99 latency, errors, the server's CPU per request (every process), the engine's and the front-ends'
CPU, the busiest client process's CPU (near 100% of a core: the client, not the server, set the pace) and the
connections each front-end held (the kernel hands each new connection to one of them).

Writes bench/results/NAME.{json,md,png} (NAME: --name, default frontend; frontend-quick with --quick).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from bench import openloop, servers
from bench import report as rep
from bench.cores import default_split, parse_cpus
from bench.noop import noop_model
from bench.workload import BENCH_DIR, ROOT, Workload, build_requests, tiny_model

SATURATED_PCT = 90.0  # a process at this share of one core (or a server at this share of its cores) is saturated
POINT_OVERHEAD_S = 15.0  # a worker count's start-up, readiness, warm-up and stop, besides its measured seconds
QUICK = {"workers": "1,2", "concurrency": 8, "seconds": 2.0, "warmup_seconds": 0.5}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.frontend", description=__doc__.splitlines()[0])
    p.add_argument("--name", default=None, help="result name: bench/results/NAME.{json,md,png} (default frontend)")
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke run: workers {QUICK['workers']}, {QUICK['concurrency']} connections per worker, "
                        f"{QUICK['warmup_seconds']} s warm-up and {QUICK['seconds']} s per worker count")
    p.add_argument("--workers", default=None, help="MMSERVE_WORKERS values, comma-separated (default 1,2,4,8)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="keep-alive connections per worker, all sending back to back (default 16)")
    p.add_argument("--clients", type=int, default=None,
                   help="load-generator processes sharing the connections (default: one per client core)")
    p.add_argument("--seconds", type=float, default=None, help="measured seconds per worker count (default 10)")
    p.add_argument("--warmup-seconds", type=float, default=None, help="unmeasured load first (default 1)")
    p.add_argument("--server-cpus", default=None, help="server cores, e.g. 1 or 4-15 (default: all but the first)")
    p.add_argument("--client-cpus", default=None, help="load generator cores, e.g. 0 or 0-3 (default: the first)")
    p.add_argument("--distinct", type=int, default=64, help="distinct request bodies (cycled)")
    p.add_argument("--tiny-format", default="onnx", choices=("onnx", "torchscript"),
                   help="the export the tiny model is built with when it is missing (its graph is replaced either way; "
                        "torchscript needs no ONNX exporter, as on the offline device image)")
    p.add_argument("--mmserve-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra MMSERVE_* settings for every server (repeatable)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="the whole run's time: a worker count starts only while its seconds and start-up fit in what "
                        "is left (make gpu-check's time box)")
    p.add_argument("--out-dir", type=Path, default=BENCH_DIR / "results")
    p.add_argument("--note", default="", help="a line for the report (what else ran on the machine)")
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else {"workers": "1,2,4,8", "concurrency": 16, "seconds": 10.0,
                                         "warmup_seconds": 1.0}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.name = args.name or ("frontend-quick" if args.quick else "frontend")
    return args


def fitting(workers: list[int], server_cpus: set[int]) -> tuple[list[int], list[str]]:
    """The worker counts the server's cores hold (a core per front-end; the engine shares them), and a reason for each
    count left out: more front-ends than cores would measure the cores, not the front-ends."""
    keep = [w for w in workers if w <= len(server_cpus)]
    skipped = [f"{w} workers: only {len(server_cpus)} server core(s) ({sorted(server_cpus)}); give the server more "
               "with --server-cpus" for w in workers if w > len(server_cpus)]
    return keep, skipped


# ------------------------------------------------------------------------------------------------ the server side
def frontends(server: servers.Server) -> list:
    """The processes that accept the connections: with WORKERS > 1 the engine's front-end children, else the server's
    one process."""
    import psutil

    root = psutil.Process(server.proc.pid)
    children = [p for p in root.children() if "app.frontend" in p.cmdline()]
    return children or [root]


def _holder(procs: list, client_port: int) -> int | None:
    """The pid of the process holding the server side of the client's connection from `client_port`."""
    for p in procs:
        if any(c.raddr and c.raddr.port == client_port for c in p.net_connections(kind="tcp")):
            return p.pid
    return None


def wait_frontends(server: servers.Server, count: int, timeout_s: float = 60.0) -> None:
    """Until each of the `count` front-ends has answered /readyz 200 on a connection it accepted. The server's start-up
    saw one of them ready; one still starting would get none of the load's keep-alive connections, and the point
    would measure fewer front-ends than it names."""
    import http.client

    procs = frontends(server)
    if len(procs) != count:
        raise RuntimeError(f"{len(procs)} front-end processes, expected {count}")
    ready: set[int] = set()
    held = []  # kept open until the end, so each probe is a new connection for the kernel to hand out
    end = time.monotonic() + timeout_s
    try:
        while len(ready) < count:
            if time.monotonic() > end:
                raise RuntimeError(f"{len(ready)} of {count} front-ends answered /readyz within {timeout_s:.0f} s")
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            held.append(conn)
            conn.request("GET", "/readyz")
            r = conn.getresponse()
            r.read()
            pid = _holder(procs, conn.sock.getsockname()[1])
            if r.status == 200 and pid is not None:
                ready.add(pid)
            else:
                time.sleep(0.05)
    finally:
        for conn in held:
            conn.close()


def connections_per_frontend(server: servers.Server) -> list[int]:
    """Established client connections each front-end holds, fewest first: an uneven spread caps the scaling."""
    import psutil

    return sorted(sum(1 for c in p.net_connections(kind="tcp")
                      if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == server.port)
                  for p in frontends(server))


# ------------------------------------------------------------------------------------------------ one worker count
def _pct(seconds: float, window: float) -> float:
    return round(100 * seconds / window, 1)


def cpu_figures(before: dict[int, float], after: dict[int, float], root: int, workers: int, seconds: float,
                ok: int) -> dict:
    """The server's CPU over the measurement from two `Server.cpu_by_process()` snapshots: in all, per answered
    request, the engine's (the root process, with WORKERS > 1) and the front-ends' (mean and busiest)."""
    used = {pid: after[pid] - before[pid] for pid in after if pid in before}
    fronts = [s for pid, s in used.items() if workers == 1 or pid != root]
    total = sum(used.values())
    return {"server_cpu_pct": _pct(total, seconds),
            "server_cpu_ms_per_req": round(1000 * total / ok, 3) if ok else None,
            "engine_cpu_pct": _pct(used.get(root, 0.0), seconds) if workers > 1 else None,
            "frontend_cpu_pct_mean": _pct(sum(fronts) / len(fronts), seconds) if fronts else None,
            "frontend_cpu_pct_max": _pct(max(fronts), seconds) if fronts else None}


def load_figures(res: dict) -> dict:
    """What the load generator saw (openloop.run's merged dict): answers, errors by kind, latency, its own CPU."""
    ok = res["statuses"].get("200", 0)
    due = sum(res["outcomes"].values())
    kinds = {f"HTTP {k}": v for k, v in res["statuses"].items() if k != "200"}
    kinds.update(res["errors"])
    cpu = res.get("cpu_s_per_proc") or [0.0]
    return {"requests": due, "ok": ok, "errors": due - ok, "error_kinds": kinds, "throughput": res["ok_per_s"],
            "p50_ms": res["p50_ms_200"], "p99_ms": res["p99_ms_200"],
            "client_cpu_pct": _pct(sum(cpu), res["seconds"]), "client_cpu_pct_busiest": _pct(max(cpu), res["seconds"])}


def measure(server: servers.Server, requests: list[openloop.Request], workers: int, args,
            client_cpus: set[int]) -> dict:
    """A warm-up, then `args.seconds` of closed-loop load on `args.concurrency` connections per worker spread over the
    client processes; the connections' spread over the front-ends is sampled half-way."""
    wanted = args.concurrency * workers
    procs = max(1, min(args.clients, wanted))
    load = {"procs": procs, "connections": wanted // procs, "cpus": client_cpus}
    openloop.run(server.url, requests, rate=None, seconds=args.warmup_seconds, **load)
    spread: list[int] = []
    before = server.cpu_by_process()
    res = openloop.run(server.url, requests, rate=None, seconds=args.seconds,
                       at=(args.seconds / 2, lambda: spread.extend(connections_per_frontend(server))), **load)
    after = server.cpu_by_process()
    point = {"workers": workers, "connections": load["connections"] * procs, "clients": procs,
             "seconds": args.seconds, **load_figures(res)}
    point.update(cpu_figures(before, after, server.proc.pid, workers, args.seconds, point["ok"]))
    point["connections_per_frontend"] = spread
    return point


def measure_workers(workers: int, requests, repository: Path, args, server_cpus: set[int], client_cpus: set[int],
                    log_dir: Path) -> dict:
    """One worker count: a fresh server, its front-ends ready, the measurement; the server stopped whatever happens."""
    extra = {**dict(kv.split("=", 1) for kv in args.mmserve_env), "MMSERVE_WORKERS": str(workers)}
    srv = servers.mmserve(repository, name=f"{args.name}-w{workers}", max_batch_size="auto", threads=1,
                          cpus=server_cpus, device="cpu", log_dir=log_dir, extra_env=extra)
    try:
        srv.start()
        if workers > 1:
            wait_frontends(srv, workers)
        point = measure(srv, requests, workers, args, client_cpus)
        point["startup_s"] = round(srv.started_s, 2)
        return point
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------------------ reading the points
def add_scaling(points: list[dict]) -> None:
    """Per point: req/s per worker, and against one worker's req/s: scaling (x) and efficiency (scaling / workers)."""
    one = next((p["throughput"] for p in points if p["workers"] == 1 and "error" not in p), None)
    for p in points:
        if "error" in p:
            continue
        p["per_worker"] = round(p["throughput"] / p["workers"], 1)
        p["scaling"] = round(p["throughput"] / one, 2) if one else None
        p["efficiency"] = round(p["throughput"] / (p["workers"] * one), 2) if one else None


def what_limits(p: dict, server_cores: int) -> str:
    """Which side of the measurement ran out first, from the CPU figures: the client, the server's cores, the engine,
    the front-ends, or none (then the connections were too few to fill the front-ends, or they wait on something)."""
    fe_mean, fe_max = p["frontend_cpu_pct_mean"] or 0.0, p["frontend_cpu_pct_max"] or 0.0
    ms = rep._fmt(p["server_cpu_ms_per_req"], ".2f")
    spread = ", ".join(map(str, p["connections_per_frontend"]))
    if p["client_cpu_pct_busiest"] >= SATURATED_PCT:
        return (f"the load generator: its busiest process used {p['client_cpu_pct_busiest']:.0f}% of a core, so the "
                "server may have had more to give (more --clients or --client-cpus)")
    if p["server_cpu_pct"] >= SATURATED_PCT * server_cores:
        return (f"the server's {server_cores} core(s): {p['server_cpu_pct']:.0f}% of {100 * server_cores}% in use, "
                f"{ms} ms of CPU per request")
    if p["engine_cpu_pct"] is not None and p["engine_cpu_pct"] >= SATURATED_PCT:
        return (f"the engine process: {p['engine_cpu_pct']:.0f}% of a core, one process taking every front-end's "
                "items")
    if fe_mean >= SATURATED_PCT:
        return f"the front-ends' CPU: {fe_mean:.0f}% of a core each on average, {ms} ms of server CPU per request"
    if fe_max >= SATURATED_PCT:
        return (f"the busiest front-end ({fe_max:.0f}% of a core, the mean {fe_mean:.0f}%): the kernel's spread of the "
                f"keep-alive connections over the front-ends ({spread}), not the cores, capped it")
    return (f"no process saturated (server {p['server_cpu_pct']:.0f}%, busiest front-end {fe_max:.0f}%, busiest "
            f"client {p['client_cpu_pct_busiest']:.0f}%; connections per front-end {spread}): {p['connections']} "
            "connections did not keep the front-ends busy, or they waited on each other")


def summary(points: list[dict], server_cores: int) -> str:
    """One sentence: how req/s went from the fewest to the most workers measured, and what limited the last."""
    ok = [p for p in points if "error" not in p]
    if not ok:
        return "No worker count was measured."
    first, last = ok[0], ok[-1]
    head = f"{first['workers']} worker(s): {first['throughput']:.0f} req/s"
    if last is not first:
        head = (f"From {first['workers']} to {last['workers']} workers req/s went from {first['throughput']:.0f} to "
                f"{last['throughput']:.0f}" + (f" ({last['scaling']:.2f}x, efficiency {last['efficiency']:.0%})"
                                                 if last.get("scaling") is not None else ""))
    return f"{head}; at {last['workers']} worker(s) the limit was {what_limits(last, server_cores)}."


# ------------------------------------------------------------------------------------------------ report
def markdown(report: dict) -> str:
    m = report["meta"]
    cores = len(m["server_cpus"])
    out = [f"# mmserve front-end ceiling: {report['name']}", "",
           f"{m['started']} · {m['machine']} · server cores {m['server_cpus']} ({cores}), client cores "
           f"{m['client_cpus']} · commit {m['git']}" + (f" · {m['note']}" if m.get("note") else ""), "",
           f"Model `{m['model']}`: {m['model_note']}. Requests: the bench's multipart bodies (text, a JPEG photo, a "
           f"WAV clip; {m['body_bytes']['min']:,}-{m['body_bytes']['max']:,} bytes, {m['distinct']} distinct), closed "
           f"loop over keep-alive connections ({m['concurrency_per_worker']} per worker) from up to {m['clients']} "
           f"load-generator process(es); {m['warmup_seconds']} s warm-up, then {m['seconds']} s measured per worker "
           f"count. Server CPU counts every process (engine and front-ends); a CPU % is of one core. Command: "
           f"`{m['command']}`.", "",
           "| workers | connections | req/s | req/s per worker | scaling vs 1 | efficiency | p50 ms | p99 ms | "
           "errors | server CPU % | server CPU ms/req | engine CPU % | front-end CPU % mean / max | "
           "client CPU % all / busiest | connections per front-end |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for p in report["points"]:
        if "error" in p:
            out.append(f"| {p['workers']} | | failed: {p['error'][:100]} | | | | | | | | | | | | |")
            continue
        out.append(f"| {p['workers']} | {p['connections']} | {p['throughput']:.1f} | {p['per_worker']:.1f} | "
                   f"{rep._fmt(p['scaling'], '.2f')} | {rep._fmt(p['efficiency'], '.0%')} | {rep._fmt(p['p50_ms'])} | "
                   f"{rep._fmt(p['p99_ms'])} | "
                   f"{p['errors']} | {p['server_cpu_pct']:.0f} | {rep._fmt(p['server_cpu_ms_per_req'], '.2f')} | "
                   f"{rep._fmt(p['engine_cpu_pct'], '.0f')} | {rep._fmt(p['frontend_cpu_pct_mean'], '.0f')} / "
                   f"{rep._fmt(p['frontend_cpu_pct_max'], '.0f')} | {p['client_cpu_pct']:.0f} / "
                   f"{p['client_cpu_pct_busiest']:.0f} | {', '.join(map(str, p['connections_per_frontend']))} |")
    out += ["", "What limited each worker count:", ""]
    out += [f"* {p['workers']}: {p['limit']}" for p in report["points"] if "limit" in p]
    out += ["", report["summary"], ""]
    out += [f"Skipped: {why}" for why in report["skipped"]]
    out += ["", f"Chart: {report.get('chart') or '-'}", ""]
    return "\n".join(out)


def chart(report: dict, path: Path) -> Path | None:
    """req/s against workers, beside the ideal (one worker's req/s times the workers); p50 / p99 latency."""
    plt = rep.pyplot()
    points = [p for p in report["points"] if "error" not in p]
    if plt is None or not points:
        return None
    ws = [p["workers"] for p in points]
    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(11, 4))
    ax_t.plot(ws, [p["throughput"] for p in points], "o-", label="measured")
    one = next((p["throughput"] for p in points if p["workers"] == 1), None)
    if one:
        ax_t.plot(ws, [one * w for w in ws], "k:", label="linear from 1 worker")
    ax_l.plot(ws, [p["p50_ms"] for p in points], "o-", label="p50")
    ax_l.plot(ws, [p["p99_ms"] for p in points], "s--", label="p99")
    for ax, ylabel in ((ax_t, "requests / s"), (ax_l, "latency ms")):
        ax.set_xticks(ws)
        ax.set_xlabel("MMSERVE_WORKERS")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_t.set_title(f"{report['meta']['model']}: front-end ceiling")
    ax_l.set_title("latency")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write(report: dict, out_dir: Path) -> list[Path]:
    """NAME.md, NAME.json and NAME.png (when matplotlib is there) in `out_dir`: the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png = (out_dir / f"{report['name']}.png").resolve()
    report["chart"] = None
    if chart(report, png):
        report["chart"] = str(png.relative_to(ROOT)) if png.is_relative_to(ROOT) else str(png)
    js, md = out_dir / f"{report['name']}.json", out_dir / f"{report['name']}.md"
    js.write_text(json.dumps(report, indent=1) + "\n")
    md.write_text(markdown(report))
    return [md, js] + ([png] if report["chart"] else [])


# ------------------------------------------------------------------------------------------------ main
def noop_workload(args, log) -> Workload:
    """The no-op model over the bench's tiny model (built when missing), and the tiny workload's request bodies."""
    version_dir = noop_model(tiny_model(log=log, formats=(args.tiny_format,)), log)
    wl = Workload("noop", version_dir.parent.name, version_dir,
                  note="the tiny model's manifest, tokenizer and preprocessing with a graph that answers zeros from "
                       "the batch size (bench/noop.py): parsing, JPEG decode and resize, log-mel and tokenising are "
                       "the work")
    build_requests(wl, args.distinct, log=log)
    return wl


def new_report(args, argv, wl: Workload, server_cpus: set[int], client_cpus: set[int], skipped: list[str]) -> dict:
    """The report before its points: the machine, which cores the server and the client got, the settings."""
    sizes = [len(b) for b in wl.bodies]
    return {"name": args.name, "skipped": skipped, "points": [], "meta": {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {os.cpu_count()} cpus", "server_cpus": sorted(server_cpus),
        "client_cpus": sorted(client_cpus), "clients": args.clients, "concurrency_per_worker": args.concurrency,
        "seconds": args.seconds, "warmup_seconds": args.warmup_seconds, "model": wl.model, "model_note": wl.note,
        "version_dir": str(wl.version_dir), "distinct": len(sizes),
        "body_bytes": {"min": min(sizes), "max": max(sizes), "mean": round(sum(sizes) / len(sizes))},
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()], "versions": rep.versions(), "git": rep.git_state(),
        "command": "python -m bench.frontend " + " ".join(sys.argv[1:] if argv is None else argv), "note": args.note}}


def run_points(report: dict, workers: list[int], wl: Workload, args, server_cpus: set[int], client_cpus: set[int],
               deadline: float, log) -> None:
    """Each worker count in turn into report["points"] (a failure as its error), while the time budget lasts; the
    report is rewritten after each, so a run stopped from outside (make gpu-check's time box) keeps what it had."""
    requests = [openloop.Request("/v1/classify", body, wl.content_type) for body in wl.bodies]
    log_dir = BENCH_DIR / ".cache" / "logs" / args.name
    for w in workers:
        if deadline - time.monotonic() < args.seconds + args.warmup_seconds + POINT_OVERHEAD_S:
            report["skipped"].append(f"{w} workers: the time budget (--budget-s {args.budget_s:.0f}) was spent")
            log(f"bench: skipping {report['skipped'][-1]}")
            continue
        try:
            point = measure_workers(w, requests, wl.version_dir.parents[1], args, server_cpus, client_cpus, log_dir)
            point["limit"] = what_limits(point, len(server_cpus))
            log(f"bench: workers {w}: {point['throughput']:.1f} req/s, p50 {rep._fmt(point['p50_ms'])} ms, p99 "
                f"{rep._fmt(point['p99_ms'])} ms, errors {point['errors']}, server CPU {point['server_cpu_pct']:.0f}%, "
                f"busiest client {point['client_cpu_pct_busiest']:.0f}%")
        except Exception as exc:  # noqa: BLE001 - one failing worker count must not lose the others' numbers
            point = {"workers": w, "error": f"{type(exc).__name__}: {exc}"}
            log(f"bench: workers {w} failed: {point['error']}")
        report["points"].append(point)
        finish(report, len(server_cpus))
        write(report, args.out_dir)


def finish(report: dict, server_cores: int) -> None:
    """The figures that read the points together: scaling, the summary sentence, the load at the end."""
    add_scaling(report["points"])
    report["summary"] = summary(report["points"], server_cores)
    report["meta"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]


def main(argv=None) -> int:
    args = parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    deadline = time.monotonic() + (args.budget_s or float("inf"))
    servers.install_signal_handlers()  # SIGTERM / Ctrl-C / SIGHUP: no server outlives the bench
    try:
        __import__("psutil")
    except ImportError:
        raise SystemExit("bench: needs psutil for the server's CPU: pip install -e '.[bench]'") from None
    d_server, d_client = default_split()
    server_cpus, client_cpus = parse_cpus(args.server_cpus, d_server), parse_cpus(args.client_cpus, d_client)
    args.clients = args.clients or len(client_cpus)
    workers, skipped = fitting([int(w) for w in args.workers.split(",")], server_cpus)
    for why in skipped:
        log(f"bench: skipping {why}")
    wl = noop_workload(args, log)
    os.sched_setaffinity(0, client_cpus)  # this process (and the load generator it forks) off the server cores
    report = new_report(args, argv, wl, server_cpus, client_cpus, skipped)
    run_points(report, workers, wl, args, server_cpus, client_cpus, deadline, log)
    finish(report, len(server_cpus))
    written = write(report, args.out_dir)
    log("bench: wrote " + ", ".join(map(str, written)) + ("" if report["chart"] else " (no chart: matplotlib missing)"))
    print(written[0].read_text())
    return 1 if not report["points"] or any("error" in p for p in report["points"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m bench` (`mmserve bench`, `make bench`): mmserve against the model's limit and LitServe.

For each workload (tiny, demo): the in-process limit, then mmserve with dynamic batching, mmserve with
batching off (MAX_BATCH_SIZE=1) and LitServe, each started here on 127.0.0.1, loaded at every
concurrency with a fixed number of requests, then stopped. Writes bench/results/NAME.json, NAME.md
and NAME.png.

Cores: the servers (and the limit) are pinned to the server cores, the load generator to the client
core(s) (default on 2 cores: server core 1, client core 0), so the client never steals the server's CPU.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from bench import report as rep
from bench.cores import default_split, own_cpu_seconds, parse_cpus
from bench.workload import BENCH_DIR, ROOT, build_requests, resolve

SYSTEMS = ("mmserve", "nobatch", "litserve")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mmserve bench", description=__doc__.splitlines()[0])
    p.add_argument("--name", default=None, help="result name (default: quick | cpu | cuda, with a timestamp)")
    p.add_argument("--quick", action="store_true", help="tiny model only, concurrency 1 and 8, 48 requests: a smoke run")
    p.add_argument("--workloads", default=None, help="comma-separated: tiny,demo (default both; quick: tiny)")
    p.add_argument("--systems", default=",".join(SYSTEMS) + ",limit",
                   help="comma-separated subset of mmserve,nobatch,litserve,limit")
    p.add_argument("--concurrency", default=None, help="default 1,4,16,32,64 (quick: 1,8)")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per point (default: about 10 s of the limit's throughput, 64..600; quick 48)")
    p.add_argument("--distinct", type=int, default=64, help="distinct request bodies (cycled)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (servers and limit)")
    p.add_argument("--backend", default="onnx", choices=("onnx", "torchscript"),
                   help="the runtime of every system: onnx (model.onnx) or torchscript (model.pt, through mmserve's "
                        "TorchScript runtime; mmserve gets MMSERVE_BACKEND=torchscript): where onnxruntime-gpu "
                        "cannot run, --device cuda --backend torchscript benchmarks on the GPU")
    p.add_argument("--server-cpus", default=None, help="cores for servers and the limit, e.g. 1 or 2-15")
    p.add_argument("--client-cpus", default=None, help="cores for the load generator, e.g. 0")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: server cores, <= 8)")
    p.add_argument("--max-batch-size", type=int, default=32,
                   help="largest batch for the limit sweep and the peer (mmserve uses MMSERVE_MAX_BATCH_SIZE=auto, "
                        "its default, unless --mmserve-env sets it)")
    p.add_argument("--peer-batch-timeout", type=float, default=0.005, help="LitServe batch_timeout (s)")
    p.add_argument("--mmserve-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra MMSERVE_* settings for both mmserve runs (repeatable)")
    p.add_argument("--demo-repo", type=Path, default=None, help="repository holding demo-classify (default model_repository)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached tiny model")
    p.add_argument("--out-dir", type=Path, default=BENCH_DIR / "results")
    p.add_argument("--max-minutes", type=float, default=15.0, help="stop starting new points after this")
    p.add_argument("--compare-to", type=Path, default=None, metavar="BEFORE.json",
                   help="a report of an earlier run on this machine (e.g. of an older commit, run from a git worktree): "
                        "adds a before / after table")
    p.add_argument("--compare-label", default=None, help="what the earlier run was (default: its name)")
    p.add_argument("--before-root", type=Path, default=None, metavar="CHECKOUT",
                   help="also serve mmserve (batching on and off) from this checkout (a git worktree of an older "
                        "commit), each right before this checkout's own, in the same run: a before / after table "
                        "from one run on the same machine (names the runs with --compare-label)")
    p.add_argument("--protocols", action="store_true",
                   help="instead: /v1 multipart vs /v2 binary vs /v2 JSON-base64 vs gRPC on one server (default: demo "
                        "workload, concurrency 32), then the model's hot reload under load (bench/protocols.py)")
    p.add_argument("--rounds", type=int, default=3, help="--protocols: interleaved rounds per protocol")
    p.add_argument("--reload", type=int, default=3, help="--protocols: hot reloads under load (0: none)")
    p.add_argument("--reload-concurrency", type=int, default=8, help="--protocols: clients during the reloads")
    p.add_argument("--note", default="", help="a line for the report (what else ran on the machine)")
    return p.parse_args(argv)


def _metrics_batch(url: str, model: str) -> tuple[float, float] | None:
    import urllib.request

    try:
        text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    except OSError:
        return None
    s = c = None
    tag = f'model="{model}"'
    for line in text.splitlines():
        if line.startswith("mmserve_batch_size_sum{") and tag in line:
            s = float(line.rsplit(" ", 1)[1])
        elif line.startswith("mmserve_batch_size_count{") and tag in line:
            c = float(line.rsplit(" ", 1)[1])
    return (s or 0.0, c or 0.0)


async def _measure_point(server, wl, c: int, n: int, is_mmserve: bool) -> dict:
    from bench.loadgen import run_point

    peak = [server.rss_bytes()]
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], server.rss_bytes())
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except asyncio.TimeoutError:
                pass

    # warm-up (not counted): opens the connections, touches every code path; CPU accounting starts after it
    await run_point(server.url + server.predict_path, wl.bodies, wl.content_type, c, max(1, min(2 * c, n // 8)))
    before = _metrics_batch(server.url, wl.model) if is_mmserve else None
    cpu0, own0, t0 = server.cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    sampler = asyncio.create_task(sample())
    res = await run_point(server.url + server.predict_path, wl.bodies, wl.content_type, c, n)
    wall = time.perf_counter() - t0
    cpu1, own1 = server.cpu_seconds(), own_cpu_seconds()
    stop.set()
    await sampler
    out = res.summary()
    out["rss_mb_peak"] = round(peak[0] / 2**20, 1)
    out["server_cpu_pct"] = round(100 * (cpu1 - cpu0) / wall, 1)
    out["server_cpu_ms_per_req"] = round(1000 * (cpu1 - cpu0) / out["ok"], 3) if out["ok"] else None
    out["client_cpu_pct"] = round(100 * (own1 - own0) / wall, 1)
    out["mean_batch_size"] = None
    if is_mmserve:
        after = _metrics_batch(server.url, wl.model)
        if before and after and after[1] > before[1]:
            out["mean_batch_size"] = round((after[0] - before[0]) / (after[1] - before[1]), 2)
    elif out.get("mean_batch_size_header") is not None:
        out["mean_batch_size"] = out["mean_batch_size_header"]
    return out


def run_limit(wl, args, server_cpus: set[int], threads: int, log_dir: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        items = Path(tmp) / "items.pkl"
        out = Path(tmp) / "limit.json"
        items.write_bytes(pickle.dumps(wl.items))
        sizes = [b for b in (1, 2, 4, 8, 16, 32, 64) if b <= max(args.max_batch_size, 1)]
        argv = [sys.executable, "-m", "bench.limit", str(wl.version_dir), str(items), str(out),
                "--threads", str(threads), "--device", args.device, "--batch-sizes", ",".join(map(str, sizes)),
                "--min-seconds", "0.5" if args.quick else "3.0", "--backend", args.backend]

        from bench import servers

        with open(log_dir / f"limit-{wl.name}.log", "wb") as log:  # its own group: stopped with the bench
            proc = servers.spawn(argv, cpus=server_cpus, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                     filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})  # keep e.g. /tmp/site
            try:
                code = proc.wait(900)
            finally:
                servers.kill_group(proc, timeout=5)
        if code != 0:
            raise subprocess.CalledProcessError(code, argv)
        return json.loads(out.read_text())


def requests_per_point(args, limit: dict | None) -> int:
    """Fixed per workload: --requests, else about 10 s of work at the limit's rate (64..600)."""
    if args.requests:
        return args.requests
    if args.quick:
        return 48
    if limit:
        return int(min(600, max(64, round(10 * limit["throughput"] / 8) * 8)))
    return 200


def run_workload(wl, args, systems, concurrency, server_cpus, threads, log_dir, deadline, log) -> dict:
    from bench import servers

    result = {"workload": wl.name, "model": wl.model, "version_dir": str(wl.version_dir), "note": wl.note,
              "concurrency": concurrency, "systems": {}, "limit": None}
    if "limit" in systems:
        log(f"bench: [{wl.name}] limit (in-process, batch sizes up to {args.max_batch_size})")
        result["limit"] = run_limit(wl, args, server_cpus, threads, log_dir)
        log(f"bench: [{wl.name}] limit {result['limit']['throughput']:.1f} req/s at batch "
            f"{result['limit']['best_batch_size']}")
    n = result["requests_per_point"] = requests_per_point(args, result["limit"])
    log(f"bench: [{wl.name}] {n} requests per point")
    extra = dict(kv.split("=", 1) for kv in args.mmserve_env)
    if args.backend != "onnx":
        extra = {"MMSERVE_BACKEND": args.backend, **extra}
    order = [s for s in SYSTEMS if s in systems]
    if args.before_root:  # each before-system right before its after-system: the same conditions, as far as can be
        order = [x for s in order for x in ((s + "-before", s) if s != "litserve" else (s,))]
    for sysname in order:
        if sysname == "litserve":
            srv = servers.litserve(wl.version_dir, max_batch_size=args.max_batch_size,
                                   batch_timeout=args.peer_batch_timeout, threads=threads, cpus=server_cpus,
                                   device=args.device, log_dir=log_dir, name=f"litserve-{wl.name}",
                                   backend=args.backend)
        else:
            base = sysname.removesuffix("-before")
            srv = servers.mmserve(wl.repository_view(), name=f"{sysname}-{wl.name}",
                                  max_batch_size="auto" if base == "mmserve" else 1,
                                  threads=threads, cpus=server_cpus, device=args.device, log_dir=log_dir,
                                  extra_env=extra, root=args.before_root if base != sysname else None)
        entry: dict = {"settings": srv.notes, "points": []}
        result["systems"][sysname] = entry
        try:
            srv.start()
            entry["startup_s"] = round(srv.started_s, 2)
            entry["rss_mb_idle"] = round(srv.rss_bytes() / 2**20, 1)
            for c in concurrency:
                if time.monotonic() > deadline:
                    entry.setdefault("truncated", f"--max-minutes reached before concurrency {c}")
                    log(f"bench: time budget spent; skipping {sysname} c={c}")
                    continue
                point = asyncio.run(asyncio.wait_for(
                    _measure_point(srv, wl, c, n, sysname != "litserve"), timeout=600))
                entry["points"].append(point)
                log(f"bench: [{wl.name}] {sysname:8s} c={c:<3d} {point['throughput']:8.1f} req/s  "
                    f"p50 {point['p50_ms']:7.1f} ms  p99 {point['p99_ms']:7.1f} ms  "
                    f"batch {rep._fmt(point['mean_batch_size'], '.2f'):>5s}  errors {point['errors']}  "
                    f"server cpu {point['server_cpu_pct']:.0f}%  client cpu {point['client_cpu_pct']:.0f}%")
        except Exception as exc:  # noqa: BLE001 - one failing system must not lose the others' numbers
            entry["error"] = f"{type(exc).__name__}: {exc}"
            log(f"bench: [{wl.name}] {sysname} failed: {entry['error']}")
        finally:
            srv.stop()
    rep.add_ratios(result)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    from bench import servers

    servers.install_signal_handlers()  # SIGTERM / Ctrl-C / SIGHUP: no server outlives the bench
    started = time.monotonic()
    deadline = started + 60 * args.max_minutes
    names = (args.workloads or ("tiny" if args.quick else "demo" if args.protocols else "tiny,demo")).split(",")
    concurrency = [int(c) for c in (args.concurrency or ("1,8" if args.quick else "32" if args.protocols
                                                          else "1,4,16,32,64")).split(",")]
    systems = set(s.strip() for s in args.systems.split(",") if s.strip())
    unknown = systems - set(SYSTEMS) - {"limit"}
    if unknown:
        raise SystemExit(f"bench: unknown systems {sorted(unknown)}")
    for mod, why in (("aiohttp", "the load generator"), ("psutil", "server RSS and CPU")):
        try:
            __import__(mod)
        except ImportError:
            raise SystemExit(f"bench: needs {mod} for {why}: pip install -e '.[bench]'") from None
    skipped_systems = []
    if "litserve" in systems:
        try:
            __import__("litserve")
        except ImportError:
            systems.discard("litserve")
            skipped_systems.append("LitServe peer: litserve is not installed (pip install -e '.[bench]')")
            log(f"bench: {skipped_systems[-1]}; skipping it")
    d_server, d_client = default_split()
    server_cpus = parse_cpus(args.server_cpus, d_server)
    client_cpus = parse_cpus(args.client_cpus, d_client)
    threads = args.threads or min(len(server_cpus), 8)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    name = args.name or f"{'quick' if args.quick else args.device.split(':')[0]}-{stamp}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    log_dir = BENCH_DIR / ".cache" / "logs" / name
    log_dir.mkdir(parents=True, exist_ok=True)

    workloads, skipped = resolve(names, demo_repo=args.demo_repo, rebuild=args.rebuild, log=log,
                                 backend=args.backend)
    skipped += skipped_systems
    os.sched_setaffinity(0, client_cpus)  # the load generator (this process) stays off the server cores
    if args.protocols:
        from bench import protocols

        return protocols.main(args, workloads, concurrency, server_cpus, client_cpus, threads, log_dir, log)
    load = os.getloadavg()
    report = {
        "name": name, "concurrency": concurrency, "skipped": skipped, "workloads": [],
        "meta": {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "machine": f"{platform.node()} {os.cpu_count()} cpus", "device": args.device,
                 "server_cpus": sorted(server_cpus), "client_cpus": sorted(client_cpus), "threads": threads,
                 "loadavg_at_start": [round(x, 2) for x in load], "quick": args.quick,
                 "backend": args.backend, "versions": rep.versions(args.backend),
                 "max_batch_size": args.max_batch_size, "peer_batch_timeout_s": args.peer_batch_timeout,
                 "distinct_requests": args.distinct, "argv": sys.argv[1:] if argv is None else list(argv),
                 "note": args.note},
    }
    for wl in workloads:
        build_requests(wl, args.distinct, log=log)
        sizes = [len(b) for b in wl.bodies]
        log(f"bench: [{wl.name}] {wl.model} from {wl.version_dir}; {len(sizes)} distinct bodies, "
            f"{min(sizes)}-{max(sizes)} bytes")
        res = run_workload(wl, args, systems, concurrency, server_cpus, threads, log_dir, deadline, log)
        res["body_bytes"] = {"min": min(sizes), "max": max(sizes), "mean": round(sum(sizes) / len(sizes))}
        report["workloads"].append(res)
    report["meta"]["requests_note"] = ", ".join(f"{w['workload']}: {w['requests_per_point']} requests per point"
                                                for w in report["workloads"]) or "no workloads"
    report["meta"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["meta"]["seconds"] = round(time.monotonic() - started, 1)
    if args.before_root:
        report["before"] = rep.before_from_same_run(report, args.compare_label or str(args.before_root))
    elif args.compare_to:
        report["before"] = json.loads(args.compare_to.read_text())
        report["before"].pop("before", None)
        if args.compare_label:
            report["before"]["label"] = args.compare_label
    png = args.out_dir / f"{name}.png"
    report["chart"] = None
    if rep.chart(report, png):
        png = png.resolve()
        report["chart"] = str(png.relative_to(ROOT)) if png.is_relative_to(ROOT) else str(png)
    js, md = args.out_dir / f"{name}.json", args.out_dir / f"{name}.md"
    js.write_text(json.dumps(report, indent=1))
    md.write_text(rep.markdown(report))
    log(f"bench: wrote {js}, {md}" + (f", {png}" if report["chart"] else " (no chart: matplotlib missing)"))
    print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m bench --protocols`: the same model and requests over every front-end, in one run, on one server.

1. Protocols: one mmserve server (pinned to the server cores, gRPC on), the workload's requests (the bench's
   multipart requests: text, a JPEG photo, a WAV clip) encoded four ways, each sent closed loop at each
   concurrency with keep-alive connections (gRPC: one channel, HTTP/2 streams), in interleaved rounds (the
   order rotates every round, so drift on a shared machine spreads over all four):
   * `/v1` multipart: POST /v1/classify (multipart/form-data), as `curl -F`;
   * `/v2` binary tensors: POST /v2/models/M/infer with the binary tensor data extension, the body made by
     tritonclient's own `generate_request_body` (its default: raw file bytes in BYTES tensors, SCORES back in
     binary);
   * `/v2` JSON: the same inputs in a JSON body, image and audio files as base64 strings, SCORES back in JSON;
   * gRPC: `inference.GRPCInferenceService/ModelInfer` with the inputs in `raw_input_contents` (what
     tritonclient.grpc sends), through grpcio's aio stub.
2. Hot reload (`--reload N`): a server with MODEL_CONTROL=explicit serving a copy of the model (hard links);
   while closed-loop clients send /v1 requests without pause, N new versions are added one after the other and
   each loaded through POST /v2/repository/models/M/load: the time of each load call (the new version verified,
   loaded and warmed while the old serves, then switched), every answer of the stream counted by status and
   version; then, without traffic, the time of an unload and of a load from nothing.

Writes bench/results/NAME.{json,md} (default NAME: protocols).
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import struct
import time
from pathlib import Path

import numpy as np

from bench.loadgen import PointResult, closed_loop, run_point
from bench.report import git_state

PROTOCOLS = ("v1_multipart", "v2_binary", "v2_json_base64", "grpc")
LABELS = {"v1_multipart": "/v1 multipart", "v2_binary": "/v2 binary tensors", "v2_json_base64": "/v2 JSON (base64)",
          "grpc": "gRPC"}


def _inputs(item: dict) -> list[tuple[str, bytes]]:
    out = []
    for name, key in (("TEXT", "text"), ("IMAGE", "image"), ("AUDIO", "audio")):
        value = item.get(key)
        if value is not None:
            out.append((name, value.encode() if isinstance(value, str) else value))
    return out


def encode(wl) -> dict[str, dict]:
    """The workload's requests in each protocol: {protocol: {"bodies", "content_type", "headers" | "messages"}}."""
    import tritonclient.http as httpclient
    from tritonclient.grpc import service_pb2 as pb

    out: dict[str, dict] = {"v1_multipart": {"bodies": wl.bodies, "content_type": wl.content_type, "headers": None}}
    binary, headers, js, msgs = [], [], [], []
    for item in wl.items:
        ins = _inputs(item)
        t_inputs = []
        for name, value in ins:
            t = httpclient.InferInput(name, [1, 1], "BYTES")
            t.set_data_from_numpy(np.array([[value]], dtype=object), binary_data=True)
            t_inputs.append(t)
        body, json_size = httpclient.InferenceServerClient.generate_request_body(
            t_inputs, outputs=[httpclient.InferRequestedOutput("SCORES", binary_data=True)])
        binary.append(body)
        headers.append({"Inference-Header-Content-Length": str(json_size)} if json_size is not None else {})
        js.append(json.dumps({
            "inputs": [{"name": name, "shape": [1, 1], "datatype": "BYTES",
                        "data": [value.decode() if name == "TEXT" else base64.b64encode(value).decode()]}
                       for name, value in ins],
            "outputs": [{"name": "SCORES", "parameters": {"binary_data": False}}]}).encode())
        msgs.append(pb.ModelInferRequest(
            model_name=wl.model,
            inputs=[pb.ModelInferRequest.InferInputTensor(name=name, datatype="BYTES", shape=[1, 1]) for name, _ in ins],
            outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="SCORES")],
            raw_input_contents=[struct.pack("<I", len(value)) + value for _, value in ins]))
    out["v2_binary"] = {"bodies": binary, "content_type": "application/octet-stream", "headers": headers}
    out["v2_json_base64"] = {"bodies": js, "content_type": "application/json", "headers": None}
    out["grpc"] = {"messages": msgs}
    return out


async def grpc_point(target: str, messages: list, concurrency: int, requests: int, warmup: int = 0,
                     timeout_s: float = 120.0) -> PointResult:
    """Closed loop over one gRPC channel: `concurrency` callers, each sending its next ModelInfer when answered."""
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    res = PointResult(concurrency, requests)
    opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(target, options=opts) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        async def one(i: int, record: bool) -> None:
            t0 = time.perf_counter()
            try:
                await stub.ModelInfer(messages[i % len(messages)], timeout=timeout_s)
            except grpc.aio.AioRpcError as exc:
                if record:
                    res.errors += 1
                    kind = exc.code().name
                    res.error_kinds[kind] = res.error_kinds.get(kind, 0) + 1
                return
            if record:
                res.ok += 1
                res.latencies_ms.append((time.perf_counter() - t0) * 1000)

        res.seconds = await closed_loop(one, concurrency, requests, warmup)
    return res


async def _point(server, grpc_target: str, model: str, enc: dict, proto: str, c: int, n: int) -> PointResult:
    warm = max(1, min(2 * c, n // 8))
    if proto == "grpc":
        return await grpc_point(grpc_target, enc["messages"], c, n, warmup=warm)
    url = server.url + ("/v1/classify" if proto == "v1_multipart" else f"/v2/models/{model}/infer")
    e = enc
    return await run_point(url, e["bodies"], e["content_type"], c, n, warmup=warm, body_headers=e["headers"])


def _summary(results: list[PointResult], cpu: dict) -> dict:
    ok = sum(r.ok for r in results)
    seconds = sum(r.seconds for r in results)
    lat = np.concatenate([np.asarray(r.latencies_ms, float) for r in results if r.latencies_ms] or [np.zeros(0)])
    errors: dict = {}
    for r in results:
        for k, v in r.error_kinds.items():
            errors[k] = errors.get(k, 0) + v
    pct = (lambda q: round(float(np.percentile(lat, q)), 1)) if len(lat) else (lambda q: None)
    return {"requests": sum(r.requests for r in results), "ok": ok, "errors": sum(r.errors for r in results),
            "error_kinds": errors, "seconds": round(seconds, 2), "throughput": round(ok / seconds, 1) if seconds else 0,
            "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99),
            "per_round_throughput": [round(r.ok / r.seconds, 1) if r.seconds else 0 for r in results],
            "median_round_throughput": round(float(np.median([r.ok / r.seconds for r in results if r.seconds])), 1)
            if results else 0, **cpu}


def measure_protocols(wl, args, server_cpus, threads, log_dir, log) -> dict:
    from bench import servers
    from bench.cores import own_cpu_seconds

    grpc_port = servers.free_port()
    srv = servers.mmserve(wl.repository_view(), name=f"protocols-{wl.name}", max_batch_size="auto", threads=threads,
                          cpus=server_cpus, device=args.device, log_dir=log_dir,
                          extra_env={**dict(kv.split("=", 1) for kv in args.mmserve_env),
                                     "MMSERVE_GRPC_PORT": str(grpc_port)})
    enc = encode(wl)
    sizes = {p: (round(float(np.mean([len(b) for b in enc[p]["bodies"]])))
                 if p != "grpc" else round(float(np.mean([m.ByteSize() for m in enc[p]["messages"]]))))
             for p in PROTOCOLS}
    n = args.requests or (48 if args.quick else 300)
    rounds = args.rounds
    out: dict = {"workload": wl.name, "model": wl.model, "version_dir": str(wl.version_dir), "requests_per_point": n,
                 "rounds": rounds, "mean_request_bytes": sizes, "settings": srv.notes, "points": {}}
    try:
        srv.start()
        out["startup_s"] = round(srv.started_s, 2)
        target = f"127.0.0.1:{grpc_port}"
        for c in args.concurrency_list:
            runs: dict[str, list[PointResult]] = {p: [] for p in PROTOCOLS}
            cpu = {p: [0.0, 0.0, 0.0] for p in PROTOCOLS}  # server cpu s, client cpu s, wall s
            for r in range(rounds):
                order = PROTOCOLS[r % len(PROTOCOLS):] + PROTOCOLS[: r % len(PROTOCOLS)]
                for proto in order:
                    s0, o0, t0 = srv.cpu_seconds(), own_cpu_seconds(), time.perf_counter()
                    res = asyncio.run(asyncio.wait_for(_point(srv, target, wl.model, enc[proto], proto, c, n), 600))
                    wall = time.perf_counter() - t0
                    cpu[proto][0] += srv.cpu_seconds() - s0
                    cpu[proto][1] += own_cpu_seconds() - o0
                    cpu[proto][2] += wall
                    runs[proto].append(res)
                    log(f"bench: [{wl.name}] {LABELS[proto]:20s} c={c:<3d} round {r + 1}: {res.ok / res.seconds:7.1f} req/s"
                        f"  errors {res.errors} {res.error_kinds or ''}")
            out["points"][str(c)] = {
                p: _summary(runs[p], {"server_cpu_pct": round(100 * cpu[p][0] / cpu[p][2], 1),
                                      "client_cpu_pct": round(100 * cpu[p][1] / cpu[p][2], 1)}) for p in PROTOCOLS}
    except Exception as exc:  # noqa: BLE001 - the report says what failed
        out["error"] = f"{type(exc).__name__}: {exc}"
        log(f"bench: [{wl.name}] protocols failed: {out['error']}")
    finally:
        srv.stop()
    return out


# ------------------------------------------------------------------------------------------------ hot reload
def _link_version(src: Path, dst: Path, version: int) -> None:
    """`dst` = version `version` of the model in `src`: its files hard-linked (copied across devices), the
    manifest rewritten with the new version number."""
    staging = dst.parent / f".staging-{version}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for f in src.iterdir():
        if f.name == "manifest.json" or not f.is_file():
            continue
        try:
            os.link(f, staging / f.name)
        except OSError:
            shutil.copy2(f, staging / f.name)
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["version"] = version
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    staging.rename(dst)


def measure_reload(wl, args, server_cpus, threads, log_dir, log) -> dict:
    from bench import servers
    from bench.workload import CACHE

    repo = CACHE / "reload-repo"
    if repo.exists():
        shutil.rmtree(repo)
    model_dir = repo / wl.model
    _link_version(wl.version_dir, model_dir / "1", 1)
    srv = servers.mmserve(repo, name=f"reload-{wl.name}", max_batch_size="auto", threads=threads, cpus=server_cpus,
                          device=args.device, log_dir=log_dir,
                          extra_env={"MMSERVE_MODEL_CONTROL": "explicit", "MMSERVE_GRPC_PORT": "0"})
    out: dict = {"workload": wl.name, "model": wl.model, "stream_concurrency": args.reload_concurrency, "reloads": []}
    try:
        srv.start()
        out.update(asyncio.run(_reload_under_load(srv, wl, args.reload, args.reload_concurrency, model_dir, log)))
    except Exception as exc:  # noqa: BLE001
        out["error"] = f"{type(exc).__name__}: {exc}"
        log(f"bench: [{wl.name}] reload failed: {out['error']}")
    finally:
        srv.stop()
        shutil.rmtree(repo, ignore_errors=True)
    return out


async def _reload_under_load(srv, wl, reloads: int, concurrency: int, model_dir: Path, log) -> dict:
    import aiohttp

    answers: list[tuple[float, float, int, int | None]] = []  # (sent, answered, status or 0, version)
    stop = asyncio.Event()
    load_url = f"{srv.url}/v2/repository/models/{wl.model}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def client(k: int) -> None:
            i = k
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    async with session.post(srv.url + "/v1/classify", data=wl.bodies[i % len(wl.bodies)],
                                            headers={"content-type": wl.content_type}) as r:
                        body = await r.read()
                        version = json.loads(body).get("version") if r.status == 200 else None
                        answers.append((t0, time.monotonic(), r.status, version))
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    answers.append((t0, time.monotonic(), 0, None))
                i += concurrency

        async def control(action: str) -> tuple[int, float]:
            t0 = time.perf_counter()
            async with session.post(f"{load_url}/{action}") as r:
                await r.read()
                return r.status, time.perf_counter() - t0

        clients = [asyncio.create_task(client(k)) for k in range(concurrency)]
        await asyncio.sleep(3)  # the stream is steady
        rows = []
        for version in range(2, 2 + reloads):
            await asyncio.get_running_loop().run_in_executor(
                None, _link_version, wl.version_dir, model_dir / str(version), version)
            started = time.monotonic()
            status, seconds = await control("load")
            rows.append({"version": version, "status": status, "seconds": round(seconds, 3), "started": started})
            log(f"bench: [{wl.name}] hot reload to version {version}: {status} in {seconds * 1000:.0f} ms")
            await asyncio.sleep(3)
        stop.set()
        await asyncio.gather(*clients)
        statuses: dict[str, int] = {}
        for _, _, st, _ in answers:
            statuses[str(st)] = statuses.get(str(st), 0) + 1
        for row in rows:  # answers to requests sent during the load call, and the version after the switch
            during = [a for a in answers if row["started"] <= a[0] <= row["started"] + row["seconds"]]
            row["requests_during"] = len(during)
            row["failed_during"] = sum(a[2] != 200 for a in during)
            after = [a[3] for a in answers if a[0] > row["started"] + row["seconds"] + 0.5]
            row["served_version_after"] = sorted(set(v for v in after[:50] if v is not None))
            del row["started"]
        # without traffic: unload, then load from nothing (the latest version)
        st_u, sec_u = await control("unload")
        st_l, sec_l = await control("load")
        log(f"bench: [{wl.name}] unload {st_u} in {sec_u * 1000:.0f} ms, load {st_l} in {sec_l * 1000:.0f} ms")
    ok_ms = [(b - a) * 1000 for a, b, st, _ in answers if st == 200]
    return {"reloads": rows, "stream": {"requests": len(answers), "statuses": statuses,
                                        "failed": sum(st != 200 for _, _, st, _ in answers),
                                        "p50_ms": round(float(np.percentile(ok_ms, 50)), 1) if ok_ms else None,
                                        "p99_ms": round(float(np.percentile(ok_ms, 99)), 1) if ok_ms else None},
            "unload": {"status": st_u, "seconds": round(sec_u, 3)}, "load_cold": {"status": st_l, "seconds": round(sec_l, 3)}}


# ------------------------------------------------------------------------------------------------ report
def markdown(report: dict) -> str:
    m = report["meta"]
    out = ["# mmserve bench: protocols", "",
           f"{m['started']} · {m['machine']} · device {m['device']} · server cores {m['server_cpus']} (onnxruntime "
           f"intra-op threads {m['threads']}), client cores {m['client_cpus']} · commit {m.get('git', '?')} · "
           f"{m.get('note') or ''}", "",
           "The same requests over each front-end of one server, closed loop, keep-alive (gRPC: one channel), in "
           "interleaved rounds (the order rotates each round); latency per request from send to full answer; the "
           "ratio to /v1 compares medians of rounds (a round disturbed by another process on the shared machine "
           "moves a median less than a total). Command: "
           f"`{m['command']}`.", ""]
    for w in report["workloads"]:
        p = w.get("protocols")
        if p:
            out += [f"## {w['workload']}: {p['model']} ({p['version_dir']})", ""]
            if "error" in p:
                out += [f"Failed: {p['error']}", ""]
            sizes = p["mean_request_bytes"]
            for c, point in p.get("points", {}).items():
                base = point["v1_multipart"]["median_round_throughput"] or None
                out += [f"Concurrency {c}, {p['requests_per_point']} requests x {p['rounds']} rounds per protocol:", "",
                        "| protocol | mean request bytes | req/s (median of rounds) | vs /v1 | req/s (all rounds) | "
                        "p50 ms | p99 ms | errors | server CPU % | client CPU % | req/s per round |",
                        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
                for proto in PROTOCOLS:
                    x = point[proto]
                    ratio = f"{x['median_round_throughput'] / base:.2f}" if base else "-"
                    out.append(f"| {LABELS[proto]} | {sizes[proto]:,} | {x['median_round_throughput']} | {ratio} | "
                               f"{x['throughput']} | {x['p50_ms']} | "
                               f"{x['p99_ms']} | {x['errors']} | {x['server_cpu_pct']} | {x['client_cpu_pct']} | "
                               f"{', '.join(map(str, x['per_round_throughput']))} |")
                out.append("")
        rl = w.get("reload")
        if rl:
            out += [f"### Hot reload of {rl['model']} under load", ""]
            if "error" in rl:
                out += [f"Failed: {rl['error']}", ""]
            else:
                s = rl["stream"]
                out += [f"{rl['stream_concurrency']} clients sent /v1 requests without pause while each new version was "
                        "loaded through `POST /v2/repository/models/{m}/load` (MODEL_CONTROL=explicit):", "",
                        "| load call | status | seconds | requests sent during it | failed | version served after |",
                        "|---|---:|---:|---:|---:|---|"]
                for row in rl["reloads"]:
                    out.append(f"| to version {row['version']} | {row['status']} | {row['seconds']} | "
                               f"{row['requests_during']} | {row['failed_during']} | {row['served_version_after']} |")
                out += ["", f"The whole stream: {s['requests']} requests, statuses {s['statuses']}, **{s['failed']} "
                        f"failed**; p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms. Without traffic: unload "
                        f"{rl['unload']['status']} in {rl['unload']['seconds']} s, load from nothing "
                        f"{rl['load_cold']['status']} in {rl['load_cold']['seconds']} s.", ""]
    return "\n".join(out)


def main(args, workloads, concurrency, server_cpus, client_cpus, threads, log_dir, log) -> int:
    """`python -m bench --protocols`, called by bench/__main__.py once workloads and cores are settled."""
    import platform
    import sys
    from datetime import datetime, timezone

    from bench.workload import build_requests

    args.concurrency_list = concurrency
    name = args.name or ("protocols-quick" if args.quick else "protocols")
    report = {"name": name, "workloads": [], "meta": {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {os.cpu_count()} cpus", "device": args.device,
        "server_cpus": sorted(server_cpus), "client_cpus": sorted(client_cpus), "threads": threads,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()], "note": args.note,
        "command": "python -m bench " + " ".join(sys.argv[1:]),
        "git": git_state()}}
    for wl in workloads:
        build_requests(wl, args.distinct, log=log)
        entry = {"workload": wl.name, "protocols": measure_protocols(wl, args, server_cpus, threads, log_dir, log)}
        if args.reload:
            entry["reload"] = measure_reload(wl, args, server_cpus, threads, log_dir, log)
        report["workloads"].append(entry)
    report["meta"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    js, md = args.out_dir / f"{name}.json", args.out_dir / f"{name}.md"
    js.write_text(json.dumps(report, indent=1) + "\n")
    md.write_text(markdown(report))
    log(f"bench: wrote {js}, {md}")
    print(md.read_text())
    failed = [w["workload"] for w in report["workloads"] if "error" in w["protocols"] or "error" in w.get("reload", {})]
    return 1 if failed else 0



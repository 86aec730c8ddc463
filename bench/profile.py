"""`python -m bench.profile`: where a served request's CPU goes, sampled with py-spy under load.

Starts mmserve on the tiny model (or `--workload demo`) pinned to the server core(s), drives it with the
benchmark's closed-loop load generator at `--concurrency` from the client core(s), and while the load runs
records the server with py-spy twice: once as a flame graph (SVG), once as collapsed stacks, from which it
writes the top costs. Waiting threads (a pool worker blocked in its queue, the event loop in its selector) are
left out of the shares (IDLE_LEAVES; the flame graph still shows them), so the shares are of the server's CPU.

Writes bench/results/profile-NAME.svg, profile-NAME.txt.gz (collapsed stacks) and profile-NAME.md (the top costs:
by thread, by cost bucket, and the hottest functions). `--root` serves the app from another checkout (a git
worktree of an older commit, for a before/after comparison with the same load and the same buckets).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from bench.workload import BENCH_DIR, build_requests, resolve

# Cost buckets, tried from the innermost frame outwards: the first frame that matches names the sample's bucket.
# (pattern on "function (file)", bucket)
BUCKETS: list[tuple[str, str]] = [
    (r"onnxruntime|InferenceSession|session\.run|OnnxRuntime\.run|TorchScriptRuntime\.run", "inference (onnxruntime)"),
    (r"collate \(", "collate (batch tensors)"),
    (r"image_from_bytes|PIL/|Image\.", "preprocess: image decode + resize"),
    (r"audio_clip|audio_from_bytes|soundfile|log_mel|resample", "preprocess: audio decode + features"),
    (r"encode_text|tokenizers|tokenize", "preprocess: tokenise"),
    (r"postprocess|top_k|scores_for|softmax", "postprocess (scores, top-k)"),
    (r"multipart|formparsers|_parse_form|rest_parsing", "request parsing (multipart / JSON)"),
    (r"prometheus_client|metrics\.py|stats\.py", "metrics (Prometheus, statistics)"),
    (r"logging/|app/logging\.py", "logging"),
    (r"json/|orjson|JSONResponse|render \(|_single_response|_batch_response", "response encoding (JSON)"),
    (r"pydantic", "validation (pydantic)"),
    (r"http_timeouts\.py", "slow-client timers (app/http_timeouts.py)"),
    (r"httptools_impl|h11_impl|h11/", "HTTP protocol (uvicorn)"),
    (r"middleware\.py|middleware/", "middlewares"),
    (r"fastapi/|starlette/routing|starlette/applications|routing\.py", "routing (FastAPI / Starlette)"),
    (r"concurrent/futures|threading\.py|run_in_executor|call_soon_threadsafe|queue\.py", "thread hand-offs"),
    (r"asyncio/|uvloop", "event loop (asyncio / uvloop)"),
    (r"batcher\.py", "batcher"),
    (r"service\.py", "service (request accounting, waiting)"),
]
# Innermost frames of a thread that waits (py-spy does not always see the wait: a worker blocked in its queue's C
# `get`, the event loop in uvloop's C selector): not CPU, left out of the shares.
IDLE_LEAVES = re.compile(r"^(_worker \(concurrent/futures/thread\.py\)|Runner\.run \(asyncio/runners\.py\)|"
                         r"LoopWorkers\._work \(app/core/workers\.py\)|CoalescingHandler\._flush_later \(app/logging\.py\)|"
                         r"(\w+\.)?wait \(threading\.py\)|select \(selectors\.py\)|_run_once \(asyncio/base_events\.py\))$")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _frames(stack: str) -> list[str]:
    return [f for f in stack.split(";") if f]


def _short(frame: str) -> str:
    """`func (file:line)` -> `func (pkg/file.py)`: the site-packages / repository prefix dropped, no line."""
    m = _FRAME.match(frame)
    if not m:
        return frame
    file = m.group("file")
    for marker in ("site-packages/", "lib/python3.", "/work/"):
        i = file.find(marker)
        if i >= 0:
            file = file[i + len(marker):]
            if marker == "lib/python3.":
                file = file.split("/", 1)[-1]
            break
    return f"{m.group('func')} ({file})"


def thread_kind(frames: list[str]) -> str:
    text = ";".join(frames)
    if "_run (app/core/batcher.py" in text or "Batcher._run" in text or "batcher.py" in text and "_worker" in text:
        return "inference thread"
    in_pool = "concurrent/futures/thread.py" in text or "app/core/workers.py" in text
    if re.search(r"prepare(_many)? \(", text) and in_pool:  # one item (prepare) or a group (prepare_many)
        return "preprocess threads"
    if "concurrent/futures/thread.py" in text or "threading.py" in text:
        return "other threads"
    return "event loop thread"


def analyse(raw: str, top: int = 15) -> dict:
    samples: list[tuple[list[str], int]] = []
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = [_short(f) for f in _frames(stack)]
        samples.append((frames, int(n)))
    idle = sum(n for frames, n in samples if frames and IDLE_LEAVES.match(frames[-1]))
    samples = [(frames, n) for frames, n in samples if not (frames and IDLE_LEAVES.match(frames[-1]))]
    total = sum(n for _, n in samples) or 1
    threads: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, n in samples:
        threads[thread_kind(frames)] += n
        bucket = "other"
        for frame in reversed(frames):
            hit = next((name for pat, name in BUCKETS if re.search(pat, frame)), None)
            if hit:
                bucket = hit
                break
        buckets[bucket] += n
        if frames:
            leaf[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n

    def pct(c: Counter[str], k: int | None = None) -> list[tuple[str, float]]:
        return [(name, round(100 * v / total, 1)) for name, v in c.most_common(k)]

    return {"samples": total, "idle_samples": idle, "threads": pct(threads), "buckets": pct(buckets), "self": pct(leaf, top),
            "inclusive": pct(Counter({k: v for k, v in inclusive.items() if v < total}), top)}


def markdown(name: str, a: dict, meta: dict) -> str:
    out = [f"# Profile of a served request: {name}", "",
           " · ".join(f"{k} {v}" for k, v in meta.items()), "",
           f"py-spy, {a['samples']} busy samples of the server process's threads ({a['idle_samples']} more were "
           "threads waiting in C: a pool worker in its queue, the event loop in its selector; left out). "
           f"Flame graph: `{meta.get('svg', '-')}`.", "", "## By thread", "", "| thread | % of samples |",
           "|---|---:|"]
    out += [f"| {k} | {v:.1f} |" for k, v in a["threads"]]
    out += ["", "## Top costs (each sample to the innermost frame that names a cost)", "",
            "| cost | % of samples |", "|---|---:|"]
    out += [f"| {k} | {v:.1f} |" for k, v in a["buckets"]]
    out += ["", "## Hottest functions (self)", "", "| function | % self |", "|---|---:|"]
    out += [f"| `{k}` | {v:.1f} |" for k, v in a["self"]]
    out += ["", "## Hottest functions (inclusive, below the thread roots)", "", "| function | % incl. |", "|---|---:|"]
    out += [f"| `{k}` | {v:.1f} |" for k, v in a["inclusive"]]
    return "\n".join(out) + "\n"


async def _profile(server, wl, concurrency: int, seconds: float, rate: int, svg: Path, raw: Path,
                   py_spy: str, flags: list[str]) -> dict:
    from bench.loadgen import run_point

    url = server.url + server.predict_path
    await run_point(url, wl.bodies, wl.content_type, concurrency, max(64, 4 * concurrency))  # warm-up
    load = asyncio.create_task(run_point(url, wl.bodies, wl.content_type, concurrency, 10_000_000))
    pid = str(server.proc.pid)
    try:
        for fmt, path in (("flamegraph", svg), ("raw", raw)):
            proc = await asyncio.create_subprocess_exec(
                py_spy, "record", "-p", pid, "-d", str(int(seconds)), "-r", str(rate), "--format", fmt,
                "-o", str(path), *flags, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
            _, err = await proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"py-spy failed ({proc.returncode}): {err.decode(errors='replace')[-500:]}")
    finally:
        load.cancel()
        try:
            await load
        except (asyncio.CancelledError, Exception):  # noqa: BLE001
            pass
    # throughput of the profiled server, for the record (py-spy's sampling slows it a little)
    res = await run_point(url, wl.bodies, wl.content_type, concurrency, max(200, 8 * concurrency))
    return res.summary()


def main(argv=None) -> int:
    from bench import servers
    from bench.cores import default_split, parse_cpus

    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    p.add_argument("--name", default="tiny", help="result name: bench/results/profile-NAME.{svg,txt.gz,md}")
    p.add_argument("--workload", default="tiny", choices=["tiny", "demo"])
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seconds", type=float, default=15.0, help="per py-spy recording (two recordings)")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--gil", action="store_true",
                   help="sample only the thread holding the GIL (py-spy --gil): Python CPU time without the threads "
                        "that wait for the GIL or a core, which a plain sample counts where they wait")
    p.add_argument("--max-batch-size", default="auto", help="MMSERVE_MAX_BATCH_SIZE (1: batching off)")
    p.add_argument("--root", type=Path, default=None, help="serve the app from this checkout (default: this one)")
    p.add_argument("--server-cpus", default=None)
    p.add_argument("--client-cpus", default=None)
    p.add_argument("--mmserve-env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out-dir", type=Path, default=BENCH_DIR / "results")
    p.add_argument("--reanalyse", action="store_true",
                   help="only rewrite profile-NAME.md from its profile-NAME.txt.gz (the buckets or idle frames changed)")
    a = p.parse_args(argv)
    if a.reanalyse:
        import gzip

        md = a.out_dir / f"profile-{a.name}.md"
        meta_line = md.read_text().splitlines()[2]
        text = gzip.decompress((a.out_dir / f"profile-{a.name}.txt.gz").read_bytes()).decode()
        out = markdown(a.name, analyse(text), {}).splitlines()
        out[2] = meta_line
        md.write_text("\n".join(out) + "\n")
        print(md.read_text())
        return 0
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    py_spy = str(Path(sys.executable).with_name("py-spy"))
    if not os.path.exists(py_spy):
        raise SystemExit("bench.profile: needs py-spy: pip install -e '.[bench]'")
    d_server, d_client = default_split()
    server_cpus, client_cpus = parse_cpus(a.server_cpus, d_server), parse_cpus(a.client_cpus, d_client)
    (wl,), skipped = resolve([a.workload], demo_repo=None, rebuild=False, log=log)
    build_requests(wl, 64, log=log)
    os.sched_setaffinity(0, client_cpus)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    svg, raw, md = (a.out_dir / f"profile-{a.name}.{ext}" for ext in ("svg", "txt", "md"))
    raw_gz = raw.with_suffix(".txt.gz")
    log_dir = BENCH_DIR / ".cache" / "logs" / f"profile-{a.name}"
    extra = dict(kv.split("=", 1) for kv in a.mmserve_env)
    srv = servers.mmserve(wl.repository_view(), name=f"profile-{a.name}", max_batch_size=a.max_batch_size,
                          threads=min(len(server_cpus), 8), cpus=server_cpus, device="cpu", log_dir=log_dir,
                          extra_env=extra, root=a.root)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=a.root or BENCH_DIR.parent,
                            capture_output=True, text=True).stdout.strip()
    with srv:
        t0 = time.monotonic()
        point = asyncio.run(_profile(srv, wl, a.concurrency, a.seconds, a.rate, svg, raw, py_spy,
                                  ["--gil"] if a.gil else []))
        log(f"bench.profile: profiled for {time.monotonic() - t0:.0f}s; after: {point['throughput']:.1f} req/s")
    import gzip

    text = raw.read_text()
    raw_gz.write_bytes(gzip.compress(text.encode(), mtime=0))
    raw.unlink()
    analysis = analyse(text)
    meta = {"commit": commit or "-", "workload": f"{wl.name} ({wl.model})", "concurrency": a.concurrency,
            "server cores": sorted(server_cpus), "client cores": sorted(client_cpus),
            "MAX_BATCH_SIZE": a.max_batch_size, "sampling": "GIL holder only (--gil)" if a.gil else "all threads",
            "req/s unprofiled right after": point["throughput"],
            "p50 ms": point["p50_ms"], "p99 ms": point["p99_ms"], "svg": str(svg.relative_to(BENCH_DIR.parent))
            if svg.resolve().is_relative_to(BENCH_DIR.parent) else str(svg)}
    md.write_text(markdown(a.name, analysis, meta))
    log(f"bench.profile: wrote {svg}, {raw_gz}, {md}")
    print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m bench --quick` end to end on the tiny model: servers start and stop, JSON / Markdown / PNG written.

Never asserts a timing threshold (2 shared cores): only that every system answered and the fields exist.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("aiohttp")
pytest.importorskip("litserve")
pytest.importorskip("matplotlib")
pytest.importorskip("psutil")
pytest.importorskip("torch")  # building the tiny model trains and exports it


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_quick_end_to_end(tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "bench", "--quick", "--name", "t", "--out-dir", str(out),
           "--concurrency", "1,4", "--requests", "24"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=280,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]

    report = json.loads((out / "t.json").read_text())
    assert report["concurrency"] == [1, 4]
    meta = report["meta"]
    for key in ("server_cpus", "client_cpus", "threads", "device", "versions", "loadavg_at_start"):
        assert key in meta
    (wl,) = report["workloads"]
    assert wl["workload"] == "tiny" and wl["model"] == "tiny-classify"

    lim = wl["limit"]
    assert lim["throughput"] > 0 and lim["best_batch_size"] in {int(b) for b in lim["per_batch_size"]}

    assert set(wl["systems"]) == {"mmserve", "nobatch", "litserve"}
    for name, system in wl["systems"].items():
        assert "error" not in system, (name, system.get("error"))
        assert [p["concurrency"] for p in system["points"]] == [1, 4]
        for p in system["points"]:
            assert p["requests"] == 24 and p["ok"] == 24 and p["errors"] == 0, (name, p)
            for key in ("throughput", "p50_ms", "p99_ms", "rss_mb_peak", "server_cpu_pct", "client_cpu_pct"):
                assert p[key] > 0, (name, key, p)
            assert p["p99_ms"] >= p["p50_ms"]
            assert p["mean_batch_size"] >= 1
    # batching off really is off; the header and /metrics agree on it
    for p in wl["systems"]["nobatch"]["points"]:
        assert p["mean_batch_size"] == 1.0 and p["mean_batch_size_header"] == 1.0

    ratios = {r["concurrency"]: r for r in wl["ratios"]}
    for key in ("mmserve_over_limit", "mmserve_over_nobatch", "mmserve_over_peer", "p99_mmserve_over_peer"):
        assert ratios[4][key] > 0

    md = (out / "t.md").read_text()
    assert "| mmserve (dynamic batching) | 4 |" in md and "LitServe (peer)" in md and "mmserve/limit" in md
    png = (out / "t.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # every server the bench started is gone
    leftover = subprocess.run(["pgrep", "-f", "peer_litserve.py .*tiny-repo"], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""

"""`python -m bench --protocols --quick` end to end on the tiny model: the same requests over /v1 multipart, /v2
binary tensors, /v2 JSON (base64) and gRPC all answered, a hot reload under load, JSON and Markdown written.
Never asserts a timing (2 shared cores)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("aiohttp")
pytest.importorskip("psutil")
pytest.importorskip("grpc")
pytest.importorskip("tritonclient.http")
pytest.importorskip("torch")  # building the bench's tiny model trains and exports it


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_protocols_quick(tmp_path):
    cmd = [sys.executable, "-m", "bench", "--protocols", "--quick", "--workloads", "tiny", "--concurrency", "4",
           "--requests", "16", "--rounds", "2", "--reload", "1", "--reload-concurrency", "2", "--name", "p",
           "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=280,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "p.json").read_text())
    (w,) = report["workloads"]
    point = w["protocols"]["points"]["4"]
    assert set(point) == {"v1_multipart", "v2_binary", "v2_json_base64", "grpc"}
    for proto, x in point.items():
        assert x["ok"] == 32 and x["errors"] == 0, (proto, x)
        assert x["throughput"] > 0 and x["p99_ms"] >= x["p50_ms"] > 0
        assert len(x["per_round_throughput"]) == 2
    assert w["protocols"]["mean_request_bytes"]["v2_json_base64"] > w["protocols"]["mean_request_bytes"]["v2_binary"]
    reload = w["reload"]
    assert [r["status"] for r in reload["reloads"]] == [200] and reload["reloads"][0]["served_version_after"] == [2]
    assert reload["stream"]["requests"] > 0 and reload["unload"]["status"] == 200 and reload["load_cold"]["status"] == 200
    md = (tmp_path / "p.md").read_text()
    assert "| gRPC |" in md and "Hot reload of tiny-classify" in md

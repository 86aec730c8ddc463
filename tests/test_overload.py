"""Overload (issue 14 item 4): a request the model's queue cannot take is refused (503 + Retry-After) before its
media are preprocessed, counting the requests being preprocessed; and `python -m bench.overload` runs end to end
on tiny settings (a smoke run of the scenario: fields and counts, never a timing)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from app import runtime
from tests.fixtures_app import app_repository  # noqa: F401 (fixture)
from tests.test_app_api import make_client, metric, post_in_threads, wait_ready

ROOT = Path(__file__).resolve().parent.parent


def test_a_full_queue_refuses_before_preprocessing(app_repository):  # noqa: F811
    gate = threading.Event()
    preprocessed = []

    def hook(stage, model, feeds):
        if stage == "preprocess" and model == "tiny-classify":
            preprocessed.append(1)
            gate.wait(20)  # hold every admitted item in preprocessing: the queue's slots are all taken

    with make_client(app_repository, queue_size=2, max_batch_size=1, preprocess_workers=4) as c:
        wait_ready(c)
        remove = runtime.add_fault_hook(hook)
        try:
            threads, out = post_in_threads(c, 6)
            end = time.monotonic() + 10
            while time.monotonic() < end and len(out) < 4:
                time.sleep(0.01)
            refused = list(out)
            gate.set()
            for t in threads:
                t.join(30)
        finally:
            remove()
            gate.set()
        # two admitted (the queue's size), held in preprocessing; the other four refused without being preprocessed
        assert len(refused) == 4 and {r.status_code for r in refused} == {503}, [r.status_code for r in refused]
        assert all(int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "overloaded" for r in refused)
        assert len(preprocessed) == 2
        assert sorted(r.status_code for r in out) == [200, 200, 503, 503, 503, 503]
        assert metric(c, 'mmserve_rejections_total{model="tiny-classify",reason="queue_full"}') == 4
        # the slots were given back: the next request is admitted
        assert c.post("/v1/classify", json={"text": "after"}).status_code == 200


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_overload_scenario_runs(tmp_path):
    pytest.importorskip("psutil")
    out = tmp_path / "overload"
    cmd = [sys.executable, "-m", "bench.overload", "--workloads", "tiny", "--seconds", "2", "--sigterm-seconds", "2",
           "--sustain-seconds", "1", "--factor", "2", "--rss-repeats", "1", "--rss-repeat-seconds", "1",
           "--procs", "2", "--connections", "8", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=280,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    r = report["workloads"]["tiny"]
    assert r["sustainable"]["per_s"] > 0
    for phase in ("overload", "sigterm", "sigterm_fresh"):
        x = r[phase]
        assert x["due"] == sum(x["outcomes"].values()) > 0, (phase, x)
        assert x["outcomes"].get("answered", 0) == sum(x["statuses"].values())
    assert r["sigterm"]["exit_code"] == 0 and r["sigterm_fresh"]["exit_code"] == 0
    assert r["overload"]["rss_before_mb"] > 0 and r["overload"]["rss_after_mb"] > 0
    assert r["disconnect_storm"]["hung_up"] == 100 and "gauges_after" in r["disconnect_storm"]
    md = out.with_suffix(".md").read_text()
    assert "| overload 2x" in md and "SIGTERM" in md

"""A bounded schemathesis pass (issue 14 item 2) inside the suite: `--checks all` over every operation of the
OpenAPI document (/v1, /v2 with the repository extension, the probes, /metrics), all phases including the
stateful one, against a live server on the tiny models, with the rules of `make fuzz` (scripts/schemathesis.toml,
scripts/schemathesis_hooks.py).
A few hundred cases; zero failures and zero errors. (`make fuzz` is the long run.)"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures_app import app_repository  # noqa: F401 (fixture)
from tests.test_app_live import Server

pytest.importorskip("schemathesis")
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
RUN = "import sys; from schemathesis.cli import schemathesis; sys.argv[0] = 'st'; sys.exit(schemathesis())"


@pytest.fixture(scope="module")
def server(app_repository):  # noqa: F811
    s = Server(app_repository, max_delay_ms=2, grpc_port=0, log_level="WARNING", request_timeout_s=60)
    yield s
    s.stop()


def test_schemathesis_finds_no_failure_on_any_operation(server, tmp_path):
    cmd = [sys.executable, "-c", RUN, "--config-file", str(ROOT / "scripts" / "schemathesis.toml"), "run",
           server.url + "/openapi.json", "--checks", "all", "--max-examples", "6", "--seed", "14",
           "--include-path-regex", "^/(v1/|v2|healthz$|readyz$|metrics$)", "--request-timeout", "60",
           "--generation-database", ":memory:", "--no-color", "--workers", "1"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "scripts.schemathesis_hooks", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", out)
    assert counts, out[-3000:]
    generated, passed = map(int, counts.groups())
    assert generated == passed and generated >= 200, out[-3000:]
    for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):  # every phase ran, none failed or errored
        assert re.search(rf"✅ {phase}\b", out), (phase, out[-3000:])
    tested = re.search(r"Tested: (\d+)", out)
    assert tested and int(tested.group(1)) >= 25, out[-3000:]  # every /v1, /v2 and probe operation
    assert server.proc.poll() is None

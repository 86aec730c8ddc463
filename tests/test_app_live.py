"""A real uvicorn server in a subprocess on 127.0.0.1: dynamic batching under concurrency, client
disconnects and graceful shutdown on SIGTERM."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.fixtures_app import app_repository  # noqa: F401 (fixture)
from tests.media import image_bytes

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, repo: Path, delay_ms: float = 0, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        e = dict(os.environ, MMSERVE_REPOSITORY=str(repo), MMSERVE_HOST="127.0.0.1", MMSERVE_PORT=str(self.port),
                 MMSERVE_LOG_FORMAT="json", MMSERVE_INTRA_OP_THREADS="1", TEST_INFERENCE_DELAY_MS=str(delay_ms),
                 MMSERVE_DRAIN_PERIOD_S="0.3",
                 PYTHONPATH=str(ROOT))
        e.update({f"MMSERVE_{k.upper()}": str(v) for k, v in env.items()})
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"mmserve-{self.port}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests._app_server"], cwd=ROOT, env=e,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        end = time.monotonic() + 60
        while time.monotonic() < end:
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None, self.logs()
            time.sleep(0.1)
        raise AssertionError("server not ready:\n" + self.logs())

    def logs(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def metric(self, line_start: str) -> float:
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


@pytest.fixture()
def server(request, app_repository):
    opts = getattr(request, "param", {})
    s = Server(app_repository, **opts)
    yield s
    s.stop()


TEXTS = [f"alice flew from paris to berlin {'again ' * (i % 5)}number {i}" for i in range(24)]


@pytest.mark.parametrize("server", [{"delay_ms": 20, "max_delay_ms": 20}], indirect=True)
def test_concurrent_requests_batch_and_each_gets_its_own_answer(server):
    png = image_bytes(color=(10, 200, 30))
    with httpx.Client(base_url=server.url, timeout=30) as c:  # one at a time: the model's answer alone
        alone = [c.post("/v1/classify", data={"text": t, "top_k": "3"},
                        files={"image": ("x.png", png, "image/png")} if i % 2 else None).json()
                 for i, t in enumerate(TEXTS)]
    count_before = server.metric('mmserve_batch_size_count{model="tiny-classify"}')
    sum_before = server.metric('mmserve_batch_size_sum{model="tiny-classify"}')

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=30,
                                     limits=httpx.Limits(max_connections=32)) as ac:
            return await asyncio.gather(*[
                ac.post("/v1/classify", data={"text": t, "top_k": "3"},
                        files={"image": ("x.png", png, "image/png")} if i % 2 else None)
                for i, t in enumerate(TEXTS)])

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    # its own answer: same labels in the same order, scores equal up to float rounding (a batch of
    # another shape may sum in another order: ~1e-7)
    for r, ref in zip(responses, alone):
        got = r.json()
        assert [p["label"] for p in got["predictions"]] == [p["label"] for p in ref["predictions"]]
        assert all(
            abs(a["score"] - b["score"]) < 1e-5 for a, b in zip(got["predictions"], ref["predictions"]))
    assert max(int(r.headers["x-batch-size"]) for r in responses) > 1
    batches = server.metric('mmserve_batch_size_count{model="tiny-classify"}') - count_before
    items = server.metric('mmserve_batch_size_sum{model="tiny-classify"}') - sum_before
    assert items == len(TEXTS) and batches < len(TEXTS)  # mean batch size > 1


def hang_up_while_queued(url: str) -> httpx.Response:
    """One request keeps the model busy; a second one's client hangs up while that request waits in the queue.
    Returns the first one's response."""
    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(base_url=url, timeout=30) as ac:
            first = asyncio.create_task(ac.post("/v1/classify", json={"text": "keeps the model busy"}))
            await asyncio.sleep(0.1)
            gone = asyncio.create_task(ac.post("/v1/classify", json={"text": "will hang up"}))
            await asyncio.sleep(0.1)
            gone.cancel()  # closes that connection while its request waits in the queue
            await asyncio.gather(gone, return_exceptions=True)
            return await first

    return asyncio.run(scenario())


@pytest.mark.parametrize("server", [{"delay_ms": 400, "max_batch_size": 1}], indirect=True)
def test_disconnected_client_is_dropped_before_inference(server):
    r = hang_up_while_queued(server.url)
    assert r.status_code == 200
    time.sleep(0.6)
    assert server.metric('mmserve_rejections_total{model="tiny-classify",reason="disconnected"}') == 1
    # the dropped request never ran: 1 warm-up-free batch for `first` only
    assert server.metric('mmserve_batch_size_count{model="tiny-classify"}') == 1


@pytest.mark.parametrize("server", [{"delay_ms": 150, "max_batch_size": 4, "max_delay_ms": 5}], indirect=True)
def test_sigterm_answers_every_accepted_request(server):
    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as ac:
            tasks = [asyncio.create_task(ac.post("/v1/classify", json={"text": t})) for t in TEXTS[:12]]
            await asyncio.sleep(0.3)  # all accepted, some running, most queued
            server.proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(scenario())
    assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in results), results
    assert server.proc.wait(20) in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM after its shutdown
    logs = server.logs()
    assert "shutdown complete" in logs
    with pytest.raises(httpx.HTTPError):  # no longer accepting
        httpx.get(server.url + "/healthz", timeout=1)

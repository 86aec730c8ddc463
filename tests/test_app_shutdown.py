"""Shutdown under load loses no request: readiness turns false first, requests are served through the drain
period, connections still in the listen backlog when the listener closes are answered 503 + Retry-After, and
no client that connected and sent its request sees a reset."""
from __future__ import annotations

import asyncio
import http.client
import json
import signal
import socket
import threading
import time
from collections import Counter

import pytest

from app.server import answer_unavailable, take_backlog
from tests.fixtures_app import app_repository  # noqa: F401 (fixture)
from tests.test_app_live import Server


def read_response(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def test_connections_in_the_backlog_are_answered_503_not_reset():
    """Connections the kernel accepted but nobody accept()ed (the listen backlog) each get a 503, whatever they
    sent: a JSON request, a body larger than the socket buffers, `Expect: 100-continue`, a /v2 path."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    big = b"x" * (4 * 1024 * 1024)
    requests = [
        b'POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n'
        b'{"text": "x"}',
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(big) + big,
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\nExpect: 100-continue\r\n\r\n",
        b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    ]
    clients = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in requests]
    answers: list[bytes] = [b""] * len(clients)

    def client(i: int) -> None:  # sends its whole request first (as urllib does), then reads
        clients[i].sendall(requests[i])
        answers[i] = read_response(clients[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()

    async def sweep() -> list[bool]:
        backlog = take_backlog(listener)
        listener.close()
        return list(await asyncio.gather(*(answer_unavailable(c, retry_after=3) for c in backlog)))

    sent = asyncio.run(sweep())
    for t in threads:
        t.join(60)
    assert sent == [True] * len(requests)
    for i, answer in enumerate(answers):
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.decode().lower().split("\r\n")
        assert lines[0] == "http/1.1 503 service unavailable", answer[:200]
        assert "retry-after: 3" in lines and "connection: close" in lines
        error = json.loads(body)["error"]
        assert error == "the server is shutting down; retry the request" if i == 3 else error["code"] == "shutting_down"
    for c in clients:
        c.close()
    with pytest.raises(ConnectionRefusedError):  # the listener is closed: later connections are refused
        socket.create_connection(("127.0.0.1", port), timeout=10)


def one_request(port: int, body: bytes) -> tuple[str, int | None, dict]:
    """('refused', ...) when it could not connect; ('answered', status, headers) for any HTTP answer; ('lost',
    None, {error}) when it connected and sent but got no answer (reset, closed, timed out)."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.connect()
    except ConnectionRefusedError:
        return "refused", None, {}
    try:
        conn.request("POST", "/v1/classify", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        return "answered", r.status, {k.lower(): v for k, v in r.getheaders()}
    except (OSError, http.client.HTTPException) as exc:
        return "lost", None, {"error": repr(exc)}
    finally:
        conn.close()


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_under_load_answers_every_connected_request(app_repository, workers):  # noqa: F811
    """With WORKERS=2 each front-end has a listening socket of its own (SO_REUSEPORT), which it sweeps and closes
    when it has drained: connections queued on it are answered, later ones go to the other or are refused."""
    server = Server(app_repository, delay_ms=20, drain_period_s=1.5, max_delay_ms=5, workers=workers)
    outcomes: list[tuple[float, str, int | None, dict]] = []
    lock = threading.Lock()
    sigterm_at: list[float] = []
    stop = threading.Event()

    def client(i: int) -> None:  # a fresh connection per request, until connections are refused
        body = json.dumps({"text": f"client {i} says hello"}).encode()
        for _ in range(10_000):
            kind, status, headers = one_request(server.port, body)
            with lock:
                outcomes.append((time.monotonic(), kind, status, headers))
            if kind == "refused" or stop.is_set():
                return

    readiness: list[tuple[float, int]] = []

    def prober() -> None:
        while not stop.is_set():
            try:
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
                conn.request("GET", "/readyz")
                r = conn.getresponse()
                r.read()
                readiness.append((time.monotonic(), r.status))
                conn.close()
            except OSError:
                return
            time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)] + [threading.Thread(target=prober)]
    try:
        for t in threads:
            t.start()
        end = time.monotonic() + 120
        while time.monotonic() < end and sum(o[2] == 200 for o in outcomes) < 100:
            time.sleep(0.05)
        sigterm_at.append(time.monotonic())
        server.proc.send_signal(signal.SIGTERM)
        exit_code = server.proc.wait(120)
    finally:
        for t in threads:
            t.join(150)
        stop.set()
        logs = server.logs()
        server.stop()
    counts = Counter(kind if status is None else status for _, kind, status, _ in outcomes)
    print(f"SIGTERM under load: {dict(counts)}")  # shown with -s; the counts asked for
    lost = [o for o in outcomes if o[1] == "lost"]
    assert not lost, (counts, lost[:5], logs[-3000:])
    assert set(counts) <= {200, 503, "refused"}, counts
    assert counts[200] >= 100 and counts["refused"] >= 1
    assert all(h.get("retry-after") and h.get("connection") == "close" for _, _, s, h in outcomes if s == 503)
    # readiness turned false after the signal while requests were still being served 200 (the drain period)
    t_unready = min(t for t, s in readiness if s == 503 and t > sigterm_at[0])
    assert any(s == 200 and t > t_unready for t, _, s, _ in outcomes)
    assert exit_code == 0  # drained: a clean exit, not death by the signal
    assert "draining: readiness is false" in logs and "shutdown complete" in logs

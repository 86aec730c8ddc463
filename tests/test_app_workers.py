"""MMSERVE_WORKERS=2 on the real server (`python -m app` in a subprocess): an engine process with the models and
their batchers, two front-end processes on one port. What a user sees: the same answers as one process, batches
that mix requests of both front-ends, one coherent /metrics and statistics, deadlines, queue-full 503s, and a
SIGTERM under load that answers every request and leaves no process behind.

Which front-end holds a connection is read from the operating system (psutil: the server side of the client's
TCP connection), never from the server itself."""
from __future__ import annotations

import asyncio
import base64
import http.client
import json
import select
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.fixtures_app import add_version, app_repository, broken_repository, repo  # noqa: F401 (fixtures)
from tests.media import audio_bytes, image_bytes
from tests.test_app_api import make_client, wait_ready
from tests.test_app_live import Server, free_port, hang_up_while_queued
from tests.test_model_control import index
from tests.test_oip_binary import binary_request, bytes_tensor, lp, split_response

pytestmark = pytest.mark.slow
DELAY_MS = 300  # every inference batch (in the engine) takes this much longer: batches form while one runs


@pytest.fixture(scope="module")
def workers(app_repository):  # noqa: F811
    port = free_port()
    s = Server(app_repository, delay_ms=DELAY_MS, workers=2, max_batch_size=32, max_delay_ms=DELAY_MS,
               request_timeout_s=20, grpc_port=port)
    s.grpc_port = port
    yield all_ready(s)
    s.stop()


@pytest.fixture(scope="module")
def single(app_repository):  # noqa: F811
    with make_client(app_repository, max_batch_size=32) as c:
        wait_ready(c)
        yield c


def frontends(server: Server) -> list[psutil.Process]:
    return psutil.Process(server.proc.pid).children()


def owner(procs: list[psutil.Process], client_port: int) -> int | None:
    """The pid of the front-end that holds the server side of the client's connection from `client_port`."""
    for p in procs:
        for c in p.net_connections(kind="tcp"):
            if c.raddr and c.raddr.port == client_port:
                return p.pid
    return None


def connections_per_frontend(server: Server, n: int) -> dict[int, list[http.client.HTTPConnection]]:
    """`n` open keep-alive connections on each front-end (extra ones are closed)."""
    procs = frontends(server)
    assert len(procs) == 2
    held: dict[int, list[http.client.HTTPConnection]] = {p.pid: [] for p in procs}
    end = time.monotonic() + 20
    while any(len(v) < n for v in held.values()):
        assert time.monotonic() < end, {pid: len(v) for pid, v in held.items()}
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.connect()
        port = conn.sock.getsockname()[1]
        pid = None
        for _ in range(200):  # the front-end accepts it asynchronously
            pid = owner(procs, port)
            if pid is not None:
                break
            time.sleep(0.01)
        assert pid is not None
        if len(held[pid]) < n:
            held[pid].append(conn)
        else:
            conn.close()
    return held


def private_dir(procs: list[psutil.Process]) -> Path:
    """The server's private directory (engine socket, metrics files), from a front-end's command line."""
    cmdline = procs[0].cmdline()
    return Path(cmdline[cmdline.index("--engine") + 1]).parent


def all_ready(server: Server) -> Server:
    """Wait until each front-end (asked on a connection it holds) answers /readyz 200: the server's own start-up
    check reached one of them. A server that never gets there is stopped (no process left behind)."""
    try:
        end = time.monotonic() + 60
        for pid, conns in connections_per_frontend(server, 1).items():
            conn = conns[0]
            while True:
                try:
                    conn.request("GET", "/readyz")
                    r = conn.getresponse()
                    r.read()
                except TimeoutError:
                    raise AssertionError(f"front-end {pid} did not answer /readyz:\n{server.logs()}") from None
                if r.status == 200:
                    break
                assert time.monotonic() < end, server.logs()
                time.sleep(0.05)
            conn.close()
    except BaseException:
        server.stop()
        raise
    return server


def post_json(conn: http.client.HTTPConnection, path: str, body: dict, out: list, i: int) -> None:
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    out[i] = (r.status, dict(r.getheaders()), json.loads(r.read()))


def post_on(held: dict, prefix: str) -> tuple[list, list[threading.Thread], list]:
    """POST /v1/classify on every held connection at once, each from its own thread ("PREFIX i"). Returns
    (connections, started threads, results): each result fills in as (status, headers, body)."""
    conns = [c for cs in held.values() for c in cs]
    out: list = [None] * len(conns)
    threads = [threading.Thread(target=post_json, args=(c, "/v1/classify", {"text": f"{prefix} {i}"}, out, i))
               for i, c in enumerate(conns)]
    for t in threads:
        t.start()
    return conns, threads, out


def requests_total(server: Server) -> float:
    text = httpx.get(server.url + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("mmserve_requests_total{"))


def test_same_answers_as_one_process(workers, single):
    png, wav = image_bytes(), audio_bytes()
    files = {"image": ("x.png", png, "image/png"), "audio": ("x.wav", wav, "audio/wav")}
    data = {"text": "alice flew from paris to berlin", "top_k": "3"}
    for path, kw in (("/v1/classify", {"data": data, "files": files}),
                     ("/v1/ner", {"data": {"text": "alice flew from paris to berlin"}})):
        got = httpx.post(workers.url + path, timeout=30, **kw)
        want = single.post(path, **kw)
        assert got.status_code == want.status_code == 200, got.text
        a, b = got.json(), want.json()
        if path == "/v1/classify":
            assert [p["label"] for p in a["predictions"]] == [p["label"] for p in b["predictions"]]
            for p, q in zip(a["predictions"], b["predictions"]):
                assert p["score"] == pytest.approx(q["score"], rel=1e-5, abs=1e-6)
        else:
            strip = [{k: v for k, v in e.items() if k != "score"} for e in a["entities"]]
            assert strip == [{k: v for k, v in e.items() if k != "score"} for e in b["entities"]]
            for e, f in zip(a["entities"], b["entities"]):
                assert e["score"] == pytest.approx(f["score"], rel=1e-5, abs=1e-6)
    models = httpx.get(workers.url + "/v1/models").json()["models"]
    assert {m["name"]: (m["state"], m["max_batch_size"], m["batch_size_source"], m["device"]) for m in models} == {
        m: ("ready", 32, "settings", "cpu") for m in ("tiny-classify", "tiny-ner", "tiny-vqa")}
    assert httpx.get(workers.url + "/readyz").json()["ready"] is True
    assert httpx.get(workers.url + "/v2/health/ready").status_code == 200


def test_batches_mix_both_frontends_and_metrics_count_them_all(workers):
    before = requests_total(workers)
    held = connections_per_frontend(workers, 8)
    conns, threads, out = post_on(held, "request")
    for t in threads:
        t.join(60)
    for c in conns:
        c.close()
    assert [o[0] for o in out] == [200] * 16, out
    sizes = [int(o[1]["x-batch-size"]) for o in out]
    # 8 requests per front-end: a batch of more than 8 held requests of both
    assert max(sizes) > 8, sizes
    # every front-end's /metrics shows the totals of all processes
    for _ in range(4):
        assert requests_total(workers) - before == 16
    text = httpx.get(workers.url + "/metrics").text
    assert 'mmserve_inflight_requests{endpoint="/v1/classify"} 0.0' in text
    stats = httpx.get(workers.url + "/v2/models/tiny-classify/stats").json()["model_stats"][0]
    s = stats["inference_stats"]
    assert s["success"]["count"] == s["compute_input"]["count"] == s["queue"]["count"] == stats["inference_count"]
    assert s["success"]["count"] >= 16 and max(b["batch_size"] for b in stats["batch_stats"]) > 8


def test_v2_json_and_binary(workers, single):
    body = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [2, 1], "data": ["bob lives in london",
                                                                                       "a red square"]}]}
    got = httpx.post(workers.url + "/v2/models/tiny-classify/infer", json=body, timeout=30)
    want = single.post("/v2/models/tiny-classify/infer", json=body)
    assert got.status_code == 200, got.text
    assert got.json()["outputs"][0]["data"] == pytest.approx(want.json()["outputs"][0]["data"], rel=1e-5)
    raw, headers = binary_request([(bytes_tensor("TEXT", 1), lp(b"bob lives in london"))],
                                  outputs=[{"name": "SCORES", "parameters": {"binary_data": True}}])
    r = httpx.post(workers.url + "/v2/models/tiny-classify/infer", content=raw, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    head, chunks = split_response(r)
    assert head["outputs"][0]["name"] == "SCORES" and len(chunks["SCORES"]) == 3 * 4


def test_grpc_answers_as_rest(workers):
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{workers.grpc_port}")
    try:
        assert c.is_server_ready() and c.is_model_ready("tiny-classify")
        t = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
        t.set_data_from_numpy(np.array([b"bob lives in london"], dtype=object).reshape(-1, 1))
        scores = c.infer("tiny-classify", [t]).as_numpy("SCORES")[0]
    finally:
        c.close()
    rest = httpx.post(workers.url + "/v1/classify", json={"text": "bob lives in london", "top_k": 3}, timeout=30)
    labels = ["negative", "neutral", "positive"]
    for pred in rest.json()["predictions"]:
        assert scores[labels.index(pred["label"])] == pytest.approx(pred["score"], rel=1e-5, abs=1e-6)


def open_at_once(port: int, n: int) -> list[http.client.HTTPConnection]:
    """`n` keep-alive connections opened together, as a client pool or a load balancer opens them (every connect
    in one loop, none waiting for the one before), then one request answered on each (a front-end accepted it)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
    conns = []
    for s in socks:
        select.select([], [s], [], 30)
        s.setblocking(True)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.sock = s
        conns.append(conn)
    for c in conns:
        c.request("GET", "/healthz")
        r = c.getresponse()
        r.read()
        assert r.status == 200
    return conns


def test_connections_opened_at_once_are_spread_over_both_frontends(workers):
    """Each front-end listens on a socket of its own (SO_REUSEPORT) and the kernel hashes each new connection to
    one of them, so connections opened together are not all taken by the front-end that wakes first (with one
    shared socket, 31 or all 32 of these went to one front-end in most bursts). Every connection is answered: none
    reached the socket the engine holds the port with (bound, not listening). A uniform hash leaves a front-end
    fewer than 2 of 32 with probability 2 * 33 / 2**32 = 1.5e-8."""
    procs = frontends(workers)
    conns = open_at_once(workers.port, 32)
    try:
        holders = [owner(procs, c.sock.getsockname()[1]) for c in conns]
    finally:
        for c in conns:
            c.close()
    spread = {p.pid: holders.count(p.pid) for p in procs}
    assert sum(spread.values()) == 32 and min(spread.values()) >= 2, spread


def test_disconnected_client_is_dropped_by_the_engine(workers):
    dropped = 'mmserve_rejections_total{model="tiny-classify",reason="disconnected"}'
    batches = 'mmserve_batch_size_count{model="tiny-classify"}'
    before = workers.metric(dropped), workers.metric(batches)

    assert hang_up_while_queued(workers.url).status_code == 200  # its queue: the engine's
    time.sleep(DELAY_MS / 1000 * 2)
    assert workers.metric(dropped) - before[0] == 1
    assert workers.metric(batches) - before[1] == 1  # the dropped request never ran


def test_deadline_gives_504(workers):
    r = httpx.post(workers.url + "/v1/classify", json={"text": "too slow", "timeout_ms": 50}, timeout=30)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text


def test_queue_full_then_sigterm_under_load(app_repository):  # noqa: F811
    s = all_ready(Server(app_repository, delay_ms=DELAY_MS, workers=2, max_batch_size=2, queue_size=2,
                         max_delay_ms=1, drain_period_s=1.0))
    try:
        procs = frontends(s)
        assert len(procs) == 2
        # queue full: 503 + Retry-After in the same JSON error as one process
        with httpx.Client(timeout=30) as client:
            results: list = [None] * 24

            def post(i: int) -> None:
                results[i] = client.post(s.url + "/v1/classify", json={"text": f"request {i}"})

            threads = [threading.Thread(target=post, args=(i,)) for i in range(24)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        codes = [r.status_code for r in results]
        assert 200 in codes and 503 in codes, codes
        full = next(r for r in results if r.status_code == 503)
        assert full.json()["error"]["code"] == "overloaded" and int(full.headers["retry-after"]) >= 1

        # SIGTERM with requests in flight on both front-ends: each is answered, everything exits 0
        held = connections_per_frontend(s, 1)
        private = private_dir(procs)
        conns, threads, out = post_on(held, "last")
        time.sleep(0.1)  # both requests are at the engine (one batch runs DELAY_MS)
        s.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        assert [o[0] for o in out] == [200, 200], out
        assert s.proc.wait(30) == 0, s.logs()
        for p in procs:
            assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE, p
        assert "front-ends gone" in s.logs()
        assert not private.exists()
    finally:
        s.stop()


def gone(procs: list[psutil.Process], timeout: float = 15) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in procs):
            return True
        time.sleep(0.05)
    return False


def test_a_failed_model_is_shown_by_every_frontend(broken_repository):  # noqa: F811
    s = all_ready(Server(broken_repository, workers=2, max_batch_size=4))
    try:
        for pid, conns in connections_per_frontend(s, 1).items():  # each front-end, asked on its own connection
            conn = conns[0]
            conn.request("GET", "/readyz")
            r = conn.getresponse()
            body = json.loads(r.read())
            assert r.status == 200 and body["models"] == {"tiny-classify": "ready", "tiny-ner": "failed"}, pid
            assert "sha256 mismatch" in body["failed"]["tiny-ner"]
            out: list = [None]
            post_json(conn, "/v1/ner", {"text": "Alice"}, out, 0)
            assert out[0][0] == 503 and out[0][2]["error"]["code"] == "model_failed"
            conn.request("GET", "/v1/models")
            models = {m["name"]: m for m in json.loads(conn.getresponse().read())["models"]}
            assert models["tiny-ner"]["state"] == "failed" and "sha256" in models["tiny-ner"]["reason"]
            assert models["tiny-ner"]["task"] == "ner"
            conn.close()
        assert 'state="failed"' in httpx.get(s.url + "/metrics").text
    finally:
        s.stop()


def test_engine_dying_answers_503_and_frontends_exit(app_repository):  # noqa: F811
    s = all_ready(Server(app_repository, workers=2, max_batch_size=4, drain_period_s=2.0, intra_op_threads=0))
    try:
        cores = len(psutil.Process(s.proc.pid).cpu_affinity())
        assert (f"INTRA_OP_THREADS=0 with WORKERS=2 on {cores} core(s): the engine's runtimes use "
                f"{max(1, cores - 2)} thread(s)") in s.logs()
        procs = frontends(s)
        private = private_dir(procs)
        assert (private / "engine.sock").exists()
        s.proc.kill()  # the engine process, with its models (it cannot remove its private directory)
        s.proc.wait(10)
        time.sleep(0.3)
        r = httpx.post(s.url + "/v1/classify", json={"text": "anyone there"}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready", r.text
        assert httpx.get(s.url + "/readyz", timeout=10).status_code == 503
        assert gone(procs), [p.pid for p in procs]
        assert not private.exists()  # removed by the last front-end out
    finally:
        s.stop()


def test_frontend_dying_shuts_the_server_down(app_repository):  # noqa: F811
    s = all_ready(Server(app_repository, workers=2, max_batch_size=4))
    try:
        procs = frontends(s)
        procs[0].kill()
        assert s.proc.wait(30) == 1
        assert gone(procs)
        assert "exited unexpectedly" in s.logs()
    finally:
        s.stop()


def ask(conn: http.client.HTTPConnection, method: str, path: str, body: dict | None = None) -> tuple[int, object]:
    """One request on a held keep-alive connection (so on the front-end that holds it): (status, JSON or None)."""
    conn.request(method, path, body=json.dumps(body) if body is not None else None,
                 headers={"Content-Type": "application/json"} if body is not None else {})
    r = conn.getresponse()
    raw = r.read()
    return r.status, (json.loads(raw) if raw else None)


def served_version(conn: http.client.HTTPConnection, model: str, image: bytes | None = None
                   ) -> tuple[int, int | None]:
    """(status, version) of a /v1/classify request naming `model` on that connection (with `image`, base64)."""
    body = {"text": "bob lives in london", "model": model}
    if image is not None:
        body["image"] = base64.b64encode(image).decode()
    status, answer = ask(conn, "POST", "/v1/classify", body)
    return status, answer.get("version") if status == 200 else None


def test_model_control_load_and_unload_reach_every_frontend(repo):  # noqa: F811
    """A load or unload asked of one front-end is served by every front-end as soon as it is answered (no wait)."""
    s = all_ready(Server(repo, workers=2, model_control="explicit", max_batch_size=4))
    try:
        held = connections_per_frontend(s, 1)
        (a,), (b,) = held.values()
        ner = {"text": "bob lives in london", "model": "tiny-ner"}
        assert ask(a, "POST", "/v2/repository/models/tiny-ner/unload") == (200, None)
        for conn in (a, b):
            status, body = ask(conn, "POST", "/v1/ner", ner)
            assert status == 404 and body["error"]["code"] == "model_not_found", body
            assert ask(conn, "GET", "/v2/models/tiny-ner/ready")[0] == 404
            _, rows = ask(conn, "POST", "/v2/repository/index")
            assert {"name": "tiny-ner", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"} in rows
            assert [m["name"] for m in ask(conn, "GET", "/v1/models")[1]["models"]] == ["tiny-classify"]

        assert ask(b, "POST", "/v2/repository/models/tiny-ner/load") == (200, None)
        add_version(repo, "tiny-classify", 2, seed=7)
        assert ask(b, "POST", "/v2/repository/models/tiny-classify/load") == (200, None)  # a hot reload
        for conn in (a, b):
            assert ask(conn, "POST", "/v1/ner", ner)[0] == 200
            assert ask(conn, "GET", "/v2/models/tiny-ner/ready")[0] == 200
            assert served_version(conn, "tiny-classify") == (200, 2)
            assert ask(conn, "GET", "/v2/models/tiny-classify/versions/2/ready")[0] == 200
            assert ask(conn, "GET", "/v1/models/tiny-classify")[1]["version"] == 2
        for conn in (a, b):
            conn.close()

        status, body = ask(http.client.HTTPConnection("127.0.0.1", s.port, timeout=30), "POST",
                           "/v2/repository/models/no-such-model/load")
        assert status == 404 and "no-such-model" in body["error"]  # the engine's error, as in one process
        deadline = time.monotonic() + 10  # version 1 drains in the engine, then leaves the index
        while ((("tiny-classify", "1") in index(s) or "tiny-classify:1 drained and closed" not in s.logs())
               and time.monotonic() < deadline):  # the engine's log line crosses a pipe: it may come later
            time.sleep(0.05)
        assert set(index(s)) == {("tiny-classify", "2"), ("tiny-ner", "1")}
        assert "tiny-classify:1 drained and closed" in s.logs()
    finally:
        s.stop()


def test_hot_reload_under_load_on_both_frontends_loses_no_request(repo):  # noqa: F811
    """Requests on both front-ends while the model is replaced twice: every one is answered (those running on the
    old version too: it drains only after them), and after each load every front-end runs the new version.
    Each request decodes a large image (~50 ms in its front-end): requests that chose the old version just
    before a switch reach the engine well after its last batch on that version has run."""
    s = all_ready(Server(repo, workers=2, model_control="explicit", delay_ms=20, max_batch_size=4))
    stop = threading.Event()
    answers: list[tuple[int, int, int | None, float]] = []  # (front-end pid, status, version, time sent)
    png = image_bytes(color=(10, 200, 30), size=(2400, 1800), pattern=3)

    def stream(pid: int, conn: http.client.HTTPConnection) -> None:
        while not stop.is_set():
            sent = time.monotonic()
            answers.append((pid, *served_version(conn, "tiny-classify", png), sent))

    try:
        held = connections_per_frontend(s, 2)
        threads = [threading.Thread(target=stream, args=(pid, c)) for pid, cs in held.items() for c in cs]
        for t in threads:
            t.start()
        control = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        try:
            for version in (2, 3):
                time.sleep(0.5)
                add_version(repo, "tiny-classify", version, seed=6 + version)
                assert ask(control, "POST", "/v2/repository/models/tiny-classify/load") == (200, None)
                loaded = time.monotonic()
                time.sleep(0.5)
                for pid in held:  # sent after the load was answered: the new version, on each front-end (a request
                    # sent before may be answered after one sent later: its front-end decodes its image meanwhile)
                    after = [(p, st, v) for p, st, v, sent in list(answers) if sent > loaded and p == pid]
                    assert after and {v for _, _, v in after} == {version}, after
        finally:
            stop.set()
            for t in threads:
                t.join(30)
            control.close()
        statuses = [a[1] for a in answers]
        assert statuses.count(200) == len(statuses), {code: statuses.count(code) for code in set(statuses)}
        assert {a[2] for a in answers} == {1, 2, 3}
        assert "tiny-classify:1 drained and closed" in s.logs()
    finally:
        s.stop()


def test_poll_mode_engine_reloads_and_every_frontend_follows(repo):  # noqa: F811
    s = all_ready(Server(repo, workers=2, model_control="poll", poll_interval_s=0.2, max_batch_size=4))
    try:
        held = connections_per_frontend(s, 1)

        def every_frontend(check, what: str) -> None:
            for pid, (conn,) in held.items():
                end = time.monotonic() + 30
                while not check(conn):
                    assert time.monotonic() < end, f"front-end {pid}: {what} not seen\n{s.logs()[-3000:]}"
                    time.sleep(0.1)

        add_version(repo, "tiny-classify", 2, seed=7)
        every_frontend(lambda c: served_version(c, "tiny-classify") == (200, 2), "version 2 served")
        assert index(s)[("tiny-classify", "2")]["state"] == "READY"
        shutil.rmtree(repo / "tiny-ner")  # a model leaves the repository: unloaded everywhere
        every_frontend(lambda c: ask(c, "GET", "/v2/models/tiny-ner/ready")[0] == 404, "tiny-ner gone")
        for conn, in held.values():
            assert ask(conn, "POST", "/v1/ner", {"text": "bob", "model": "tiny-ner"})[0] == 404
            conn.close()
    finally:
        s.stop()


def grpc_on_each_frontend(server: Server, port: int, call) -> dict[int, object]:
    """`call(client)` on fresh gRPC connections until each front-end has answered one (which one did is read from
    the operating system, as `owner`): {front-end pid: what `call` returned there}."""
    procs = frontends(server)
    answers: dict[int, object] = {}
    for _ in range(50):
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}",  # a connection of its own, not a shared one
                                                  channel_args=[("grpc.use_local_subchannel_pool", 1)])
        try:
            result = call(client)
            mine = [c.laddr.port for c in psutil.Process().net_connections(kind="tcp")
                    if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED]
            assert len(mine) == 1, mine
            pid = owner(procs, mine[0])
            assert pid is not None
            answers[pid] = result
        finally:
            client.close()
        if len(answers) == len(procs):
            return answers
    raise AssertionError(f"gRPC answered by {sorted(answers)} only, of {[p.pid for p in procs]}")


def test_grpc_is_served_by_every_frontend(repo):  # noqa: F811
    port = free_port()
    s = all_ready(Server(repo, workers=2, grpc_port=port, model_control="explicit", max_batch_size=4))
    try:
        def infer(client) -> list[float]:
            t = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
            t.set_data_from_numpy(np.array([[b"bob lives in london"]], dtype=object))
            return client.infer("tiny-classify", [t]).as_numpy("SCORES")[0].tolist()

        scores = list(grpc_on_each_frontend(s, port, infer).values())
        assert scores[0] == pytest.approx(scores[1], rel=1e-6)
        # model control over gRPC, asked of one front-end: every front-end serves the outcome at once
        def ner_ready(client) -> bool | str:
            try:
                return client.is_model_ready("tiny-ner")
            except InferenceServerException as exc:
                return exc.status()

        grpc_on_each_frontend(s, port, lambda c: c.unload_model("tiny-ner"))
        assert list(grpc_on_each_frontend(s, port, ner_ready).values()) == ["StatusCode.NOT_FOUND"] * 2
        grpc_on_each_frontend(s, port, lambda c: c.load_model("tiny-ner"))
        assert list(grpc_on_each_frontend(s, port, ner_ready).values()) == [True, True]
    finally:
        s.stop()


@pytest.mark.parametrize("setting", ["PORT", "GRPC_PORT"])
@pytest.mark.parametrize("reuse_port", [False, True], ids=["plain", "so_reuseport"])
def test_a_port_held_by_another_program_stops_start_up(app_repository, setting, reuse_port):  # noqa: F811
    """Another program listening on PORT or GRPC_PORT, even one that would share it (SO_REUSEPORT, as grpcio's
    default or a server run with --reuse-port): the server refuses to start and says why, instead of sharing the
    port with it (the front-ends listen with SO_REUSEPORT)."""
    import os
    import subprocess
    import sys

    from tests.test_app_live import ROOT

    port = free_port()
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(reuse_port))
        other.bind(("127.0.0.1", port))
        other.listen()
        ports = {"PORT": free_port(), "GRPC_PORT": free_port(), setting: port}
        env = dict(os.environ, MMSERVE_REPOSITORY=str(app_repository), MMSERVE_WORKERS="2", MMSERVE_HOST="127.0.0.1",
                   PYTHONPATH=str(ROOT), **{f"MMSERVE_{k}": str(v) for k, v in ports.items()})
        r = subprocess.run([sys.executable, "-m", "app"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=60)
    assert r.returncode != 0
    assert f"MMSERVE_{setting}={port}: cannot bind 127.0.0.1:{port}" in r.stderr, r.stderr
    assert "another program holds it" in r.stderr, r.stderr


def test_ipc_frames_carry_arrays_and_errors_across_a_socket():
    """The engine's frames over a real socket pair: arrays arrive equal (raw bytes, not in the pickle), and every
    core error comes back as its own class with its code, message and retry-after."""
    from app.core import errors, ipc
    from app.core.batcher import Prepared
    from models.preprocessing import Features

    features = Features(input_ids=np.arange(7, dtype=np.int64), attention_mask=np.ones(7, np.int64),
                        pixel_values=np.random.default_rng(0).normal(size=(3, 32, 32)).astype(np.float32))
    sent = [errors.QueueFull("m", retry_after=3), errors.DeadlineExceeded(), errors.InferenceFailed(),
            errors.NotReady("gone"), errors.MediaRejected("undecodable_media", "bad png"), ValueError("a bug")]

    async def scenario():
        a, b = socket.socketpair()
        reader, a_writer = await asyncio.open_connection(sock=a)  # (each writer kept: its end stays open)
        b_reader, writer = await asyncio.open_connection(sock=b)
        ipc.send(writer, ("submit", "m", 1, [(1, Prepared(features, 7), 123.5, "rid")]))
        for err in sent:
            ipc.send(writer, ("error", 2, ipc.error_out(err), ("m", 0, False, 0.0)))
        await writer.drain()
        got = [await ipc.receive(reader) for _ in range(1 + len(sent))]
        writer.close()
        with pytest.raises(asyncio.IncompleteReadError):  # the other end has gone
            await ipc.receive(reader)
        a_writer.close()
        return got

    got = asyncio.run(scenario())
    [(rid, prepared, deadline, request_id)] = got[0][3]
    assert (rid, prepared.length, deadline, request_id) == (1, 7, 123.5, "rid")
    for name in ("input_ids", "attention_mask", "pixel_values"):
        want, have = getattr(features, name), getattr(prepared.features, name)
        assert have.dtype == want.dtype and np.array_equal(have, want)
    assert len(ipc.encode(("x", features.pixel_values))[1]) < 200  # the array travels out of band
    for err, message in zip(sent, got[1:]):
        back = ipc.error_in(message[2])
        if isinstance(err, errors.ServingError):
            assert type(back) is type(err) and (back.code, back.message, back.retry_after) == \
                (err.code, err.message, err.retry_after)
        else:  # anything else is an internal error, as in one process
            assert type(back) is errors.InternalError and back.code == "internal_error"

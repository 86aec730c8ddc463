"""Model repository extension and model control (MODEL_CONTROL, hot reload), against live servers with the
real `tritonclient.http` and plain HTTP: index, 403 when control is off, explicit load / unload, a hot
reload under a steady stream of requests (every answer counted), broken versions that never replace the
serving one, polling, hostile model names, API keys and the non-loopback bind rule."""
from __future__ import annotations

import http.client
import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from app.core.model_control import is_loopback
from tests.fixtures_app import add_version, build_model, repo  # noqa: F401 (repo: a fixture)
from tests.media import image_bytes
from tests.test_app_live import Server

tritonclient_http = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.slow
PNG = image_bytes(color=(10, 200, 30), size=(640, 480), pattern=3)  # a few ms of decoding: requests overlap


# ------------------------------------------------------------------------------------ helpers
def corrupt_onnx(directory: Path) -> None:
    path = directory / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def wrong_labels(directory: Path) -> None:
    """Valid files and hashes, but the manifest names more labels than the graph outputs: warm-up fails."""
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["labels"] = manifest["labels"] + ["extra"]
    manifest["model_config"]["labels"] = manifest["labels"]
    path.write_text(json.dumps(manifest))


def triton(server: Server, **kw) -> "tritonclient_http.InferenceServerClient":
    return tritonclient_http.InferenceServerClient(server.url.removeprefix("http://"), **kw)


def index(server: Server, **kw) -> dict[tuple[str, str], dict[str, str]]:
    return {(r["name"], r["version"]): r for r in triton(server).get_model_repository_index(**kw)}


def raw_post(server: Server, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """POST with the path sent exactly as written (no client-side normalisation of '..' or escapes)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("POST", path, body=b"{}", headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        body = r.read()
        return r.status, (json.loads(body) if body else {})
    finally:
        conn.close()


def classify(c: httpx.Client, text: str = "alice flew from paris", image: bytes | None = None) -> httpx.Response:
    return c.post("/v1/classify", data={"text": text, "model": "tiny-classify"},
                  files={"image": ("x.png", image, "image/png")} if image else None)


@pytest.fixture()
def servers():
    started: list[Server] = []

    def start(repo: Path, **opts) -> Server:  # noqa: F811
        s = Server(repo, **opts)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


# ------------------------------------------------------------------------------------ tests
def test_index_open_and_load_unload_refused_when_control_is_off(repo, servers):  # noqa: F811
    server = servers(repo)  # MODEL_CONTROL defaults to none
    rows = index(server)
    assert rows[("tiny-classify", "1")] == {"name": "tiny-classify", "version": "1", "state": "READY", "reason": ""}
    assert rows[("tiny-ner", "1")]["state"] == "READY"
    for call in (triton(server).load_model, triton(server).unload_model):
        with pytest.raises(InferenceServerException) as exc:
            call("tiny-ner")
        assert exc.value.status() == "403" and "MMSERVE_MODEL_CONTROL" in str(exc.value)
    r = httpx.post(server.url + "/v2/repository/models/tiny-ner/unload")
    assert r.status_code == 403 and set(r.json()) == {"error"}
    with httpx.Client(base_url=server.url) as c:  # nothing changed
        assert c.post("/v1/ner", json={"text": "bob lives in london"}).status_code == 200


def test_explicit_unload_then_load(repo, servers):  # noqa: F811
    server = servers(repo, model_control="explicit")
    client = triton(server)
    v2_ner = {"inputs": [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES", "data": ["bob lives in london"]}]}
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.post("/v2/models/tiny-ner/infer", json=v2_ner).status_code == 200
        client.unload_model("tiny-ner")
        assert index(server)[("tiny-ner", "1")] == {"name": "tiny-ner", "version": "1", "state": "UNAVAILABLE",
                                                    "reason": "unloaded"}
        assert [r["name"] for r in client.get_model_repository_index()
                if r["state"] == "READY"] == ["tiny-classify"]
        r = c.post("/v2/models/tiny-ner/infer", json=v2_ner)
        assert r.status_code == 404 and "tiny-ner" in r.json()["error"]
        assert c.post("/v1/ner", json={"text": "bob", "model": "tiny-ner"}).status_code == 404
        assert not client.is_model_ready("tiny-ner")
        client.unload_model("tiny-ner")  # not loaded: nothing to do
        assert classify(c).status_code == 200  # the other model is untouched

        client.load_model("tiny-ner")
        assert client.is_model_ready("tiny-ner")
        assert index(server)[("tiny-ner", "1")]["state"] == "READY"
        assert c.post("/v2/models/tiny-ner/infer", json=v2_ner).status_code == 200
        client.load_model("tiny-ner")  # already serving that version: a no-op

        with pytest.raises(InferenceServerException) as exc:
            client.load_model("no-such-model")
        assert exc.value.status() == "404" and "no-such-model" in str(exc.value)
        with pytest.raises(InferenceServerException) as exc:  # an override model directory: refused
            client.load_model("tiny-ner", config=json.dumps({"backend": "python"}),
                              files={"file:1/model.py": b"import os"})
        assert exc.value.status() == "400" and "not supported" in str(exc.value)
        r = c.post("/v2/repository/index", json={"ready": True})
        assert {row["name"] for row in r.json()} == {"tiny-classify", "tiny-ner"}
        assert all(row["state"] == "READY" for row in r.json())
        assert c.post("/v2/repository/index", content=b"[1").status_code == 400


def test_hot_reload_under_a_steady_stream_loses_no_request(repo, servers):  # noqa: F811
    server = servers(repo, model_control="explicit", delay_ms=3)
    stop = threading.Event()
    answers: list[tuple[float, float, int, int | None]] = []  # (sent, answered, status, version)
    lock = threading.Lock()

    def stream(worker: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            i = 0
            while not stop.is_set():
                t0 = time.monotonic()
                if i % 3 == 2:  # v2 too: both front-ends go through the same entry switch
                    r = c.post("/v2/models/tiny-classify/infer", json={"inputs": [
                        {"name": "TEXT", "shape": [1, 1], "datatype": "BYTES", "data": [f"worker {worker} n {i}"]}]})
                    version = int(r.json()["model_version"]) if r.status_code == 200 else None
                else:
                    r = classify(c, f"worker {worker} request {i}", PNG if i % 3 == 1 else None)
                    version = r.json().get("version") if r.status_code == 200 else None
                with lock:
                    answers.append((t0, time.monotonic(), r.status_code, version))
                i += 1

    workers = [threading.Thread(target=stream, args=(w,)) for w in range(6)]
    for w in workers:
        w.start()
    reloads: list[float] = []
    try:
        time.sleep(1.0)
        for version in (2, 3, 4):  # three hot reloads in a row, each under the same stream
            add_version(repo, "tiny-classify", version, seed=6 + version)
            t0 = time.monotonic()
            triton(server).load_model("tiny-classify")
            reloads.append(time.monotonic() - t0)
            if version == 2:
                first_switch = t0
            time.sleep(0.5)
        switched = time.monotonic() - 0.5
        time.sleep(0.5)
    finally:
        stop.set()
        for w in workers:
            w.join(30)
    statuses = [a[2] for a in answers]
    assert statuses.count(200) == len(statuses), {s: statuses.count(s) for s in set(statuses)}
    assert len(answers) > 50
    before = [a[3] for a in answers if a[1] < first_switch]
    after = [a[3] for a in answers if a[0] > switched]
    assert before and set(before) == {1}
    assert after and set(after) == {4}  # every request sent after the last switch runs on the newest version
    assert {2, 3} <= {a[3] for a in answers}
    deadline = time.monotonic() + 10
    while len(index(server)) > 2 and time.monotonic() < deadline:  # old versions are UNLOADING while they drain
        time.sleep(0.05)
    rows = index(server)
    assert rows[("tiny-classify", "4")]["state"] == "READY" and set(rows) == {("tiny-classify", "4"), ("tiny-ner", "1")}
    assert all(f"tiny-classify:{v} drained and closed" in server.logs() for v in (1, 2, 3))
    print(f"\nhot reloads of tiny-classify (load + warm-up + switch): {', '.join(f'{s * 1000:.0f} ms' for s in reloads)}; "
          f"{len(answers)} requests during the test, all 200")


@pytest.mark.parametrize("tamper,reason", [(corrupt_onnx, "sha256 mismatch"),
                                           (wrong_labels, "manifest has 4 labels")])
def test_a_broken_new_version_never_replaces_the_serving_one(repo, servers, tamper, reason):  # noqa: F811
    server = servers(repo, model_control="explicit")
    add_version(repo, "tiny-classify", 2, seed=7, tamper=tamper)
    with pytest.raises(InferenceServerException) as exc:
        triton(server).load_model("tiny-classify")
    assert exc.value.status() == "400"
    assert reason in str(exc.value) and "version 1 keeps serving" in str(exc.value)
    rows = index(server)
    assert rows[("tiny-classify", "1")]["state"] == "READY"
    assert rows[("tiny-classify", "2")]["state"] == "UNAVAILABLE" and reason in rows[("tiny-classify", "2")]["reason"]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = classify(c)
        assert r.status_code == 200 and r.json()["version"] == 1
        assert c.get("/v1/models/tiny-classify").json()["state"] == "ready"
    # fixed (a new, good version 3): it loads and the failure is gone from the index
    add_version(repo, "tiny-classify", 3, seed=8)
    triton(server).load_model("tiny-classify")
    rows = index(server)
    assert rows[("tiny-classify", "3")]["state"] == "READY" and ("tiny-classify", "2") not in rows


def test_poll_mode_swaps_in_new_versions_and_models(repo, servers):  # noqa: F811
    server = servers(repo, model_control="poll", poll_interval_s=0.2)

    def wait_for(predicate, what: str, timeout: float = 30):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            rows = index(server)
            if predicate(rows):
                return rows
            time.sleep(0.1)
        raise AssertionError(f"{what} not seen; index: {index(server)}\n{server.logs()[-3000:]}")

    add_version(repo, "tiny-classify", 2, seed=7)
    wait_for(lambda r: r.get(("tiny-classify", "2"), {}).get("state") == "READY", "version 2 ready")
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert classify(c).json()["version"] == 2
        add_version(repo, "tiny-classify", 3, seed=8, tamper=corrupt_onnx)  # broken: 2 keeps serving
        rows = wait_for(lambda r: r.get(("tiny-classify", "3"), {}).get("state") == "UNAVAILABLE",
                        "version 3 failure")  # LOADING first, while it is verified
        assert "sha256" in rows[("tiny-classify", "3")]["reason"]
        assert rows[("tiny-classify", "2")]["state"] == "READY"
        assert classify(c).json()["version"] == 2
        build_model(repo.parent / "staging-vqa", "tiny-vqa", seed=2)  # a new model appears
        (repo.parent / "staging-vqa" / "tiny-vqa").rename(repo / "tiny-vqa")
        wait_for(lambda r: r.get(("tiny-vqa", "1"), {}).get("state") == "READY", "new model ready")
        shutil.rmtree(repo / "tiny-ner")  # a model leaves the repository: unloaded
        wait_for(lambda r: not any(name == "tiny-ner" for name, _ in r), "tiny-ner unloaded")
        assert c.post("/v1/ner", json={"text": "bob", "model": "tiny-ner"}).status_code == 404


def test_model_names_are_checked_against_the_repository(repo, servers):  # noqa: F811
    # a real model directory just outside the repository: joining '../outside' would find it
    build_model(repo.parent, "outside", seed=3, task_spec=("ner", ["text"], ["text"], ["O", "B-PER"], False))
    server = servers(repo, model_control="explicit")
    hostile = ["../outside", "%2e%2e/outside", "%2e%2e%2foutside", "..%2Foutside", "%2Fetc%2Fpasswd",
               "/etc/passwd", str(repo.parent / "outside"), "tiny-ner/../../outside", "tiny-ner%2F1", "a/b",
               "..", "%2e%2e", ".", "tiny-ner%00", "tiny%20ner", "%5C..%5Coutside"]
    for name in hostile:
        for action in ("load", "unload"):
            status, body = raw_post(server, f"/v2/repository/models/{name}/{action}")
            assert status in (400, 404), (name, action, status, body)
            assert set(body) == {"error"} and isinstance(body["error"], str), (name, body)
    assert raw_post(server, "/v2/repository/models/../outside/load")[1]["error"].startswith("invalid model name")
    assert all(row["name"] in ("tiny-classify", "tiny-ner") for row in triton(server).get_model_repository_index())
    assert "loading model" not in server.logs()  # nothing was ever loaded
    with pytest.raises(InferenceServerException):
        triton(server).load_model("../outside")


def test_control_needs_a_key_when_keys_are_set(repo, servers):  # noqa: F811
    server = servers(repo, model_control="explicit", api_keys="s3cret")
    assert httpx.post(server.url + "/v2/repository/models/tiny-ner/unload").status_code == 401
    assert httpx.post(server.url + "/v2/repository/index").status_code == 401
    r = httpx.post(server.url + "/v2/repository/models/tiny-ner/unload", headers={"X-API-Key": "wrong"})
    assert r.status_code == 401
    client = triton(server)
    with pytest.raises(InferenceServerException) as exc:
        client.unload_model("tiny-ner")
    assert exc.value.status() == "401" and "API key" in str(exc.value)
    assert index(server, headers={"X-API-Key": "s3cret"})[("tiny-ner", "1")]["state"] == "READY"
    client.unload_model("tiny-ner", headers={"Authorization": "Bearer s3cret"})
    assert index(server, headers={"X-API-Key": "s3cret"})[("tiny-ner", "1")]["reason"] == "unloaded"
    client.load_model("tiny-ner", headers={"X-API-Key": "s3cret"})
    assert index(server, headers={"X-API-Key": "s3cret"})[("tiny-ner", "1")]["state"] == "READY"


def test_control_refused_on_a_non_loopback_bind_unless_the_operator_opts_in(repo, servers):  # noqa: F811
    exposed = servers(repo, model_control="explicit", host="0.0.0.0")
    with pytest.raises(InferenceServerException) as exc:
        triton(exposed).unload_model("tiny-ner")
    assert exc.value.status() == "403" and "MMSERVE_ALLOW_REMOTE_MODEL_CONTROL" in str(exc.value)
    assert index(exposed)[("tiny-ner", "1")]["state"] == "READY"  # the read-only index stays
    exposed.stop()
    opted_in = servers(repo, model_control="explicit", host="0.0.0.0", allow_remote_model_control="true")
    triton(opted_in).unload_model("tiny-ner")
    assert index(opted_in)[("tiny-ner", "1")]["reason"] == "unloaded"


def test_loopback_addresses():
    for host in ("127.0.0.1", "127.3.4.5", "::1", "[::1]", "localhost", "::ffff:127.0.0.1"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.1", "192.168.1.2", "example.com", "", None, "127.0.0.1.nip.io"):
        assert not is_loopback(host), host


def test_a_request_that_chose_a_replaced_version_runs_on_its_successor(repo):  # noqa: F811
    """The core's guarantee behind every front-end: a request holding an entry that a hot reload replaced
    before the request reached `run_items` runs on the new version, and the old one drains after it."""
    import asyncio

    from fastapi.testclient import TestClient

    from app.core.items import Item
    from app.main import create_app
    from app.settings import Settings
    from app.tasks import get_task

    settings = Settings(repository=repo, model_control="explicit", host="127.0.0.1", grpc_port=0)
    with TestClient(create_app(settings)) as client:
        end = time.monotonic() + 30
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < end
            time.sleep(0.05)
        service = client.app.state.service
        old = service.registry.choose("classify", "tiny-classify")
        add_version(repo, "tiny-classify", 2, seed=7)

        async def scenario():
            await service.control.load("tiny-classify")
            assert old.retired and service.registry.entries["tiny-classify"].version == 2
            outs = await service.run_items("test", asyncio.Event().wait, get_task("classify"), old,
                                           [Item("alice flew from paris")], time.monotonic() + 10)
            for _ in range(200):  # the old version drains in the background
                if old.state == "unloaded":
                    break
                await asyncio.sleep(0.01)
            return outs

        outs = client.portal.call(scenario)
        assert outs[0].error is None and outs[0].body["version"] == 2
        assert old.state == "unloaded" and old.active == 0 and old not in service.registry.retiring
        assert client.post("/v1/classify", json={"text": "hi"}).json()["version"] == 2

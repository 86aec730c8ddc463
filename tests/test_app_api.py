"""The real app in-process (TestClient) on tiny ONNX models: every endpoint, content type and error status."""
from __future__ import annotations

import base64
import json
import logging
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.fixtures_app import app_repository, broken_repository, build_model  # noqa: F401 (fixtures)
from tests.media import audio_bytes, image_bytes

TEXT = "Alice flew from Paris to Berlin"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def wait_ready(client: TestClient, timeout: float = 30) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = client.get("/readyz")
        if r.status_code == 200:
            return r.json()
        time.sleep(0.05)
    raise AssertionError(f"not ready: {client.get('/readyz').json()}")


def make_client(repo, **kw) -> TestClient:
    return TestClient(create_app(Settings(repository=repo, **kw)), raise_server_exceptions=False)


@pytest.fixture()
def client(app_repository):
    with make_client(app_repository, max_delay_ms=2) as c:
        wait_ready(c)
        yield c


def post_in_threads(client: TestClient, n: int, stagger: float = 0.0) -> tuple[list[threading.Thread], list]:
    """Start n threads, each posting one text request to /v1/classify ("request i"), `stagger` s apart.
    Returns (threads, responses): responses fill in as they come back (callers join the threads)."""
    out, lock = [], threading.Lock()

    def go(i: int) -> None:
        r = client.post("/v1/classify", json={"text": f"request {i}"})
        with lock:
            out.append(r)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
        time.sleep(stagger)
    return threads, out


def metric(client: TestClient, line_start: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def slow_down(client: TestClient, model: str, seconds: float) -> None:
    entry = client.app.state.service.registry.entries[model]
    run = entry.runtime.run

    def slow(feeds):
        time.sleep(seconds)
        return run(feeds)

    entry.runtime.run = slow


# ------------------------------------------------------------------------------------ tasks
def test_classify_multipart_json_and_batch_agree(client):
    png, wav = image_bytes(), audio_bytes()
    files = {"image": ("x.png", png, "image/png"), "audio": ("x.wav", wav, "audio/wav")}
    r1 = client.post("/v1/classify", data={"text": TEXT, "top_k": "2"}, files=files)
    assert r1.status_code == 200, r1.text
    body = r1.json()
    assert body["model"] == "tiny-classify" and body["version"] == 1
    assert len(body["predictions"]) == 2 and {"label", "score"} <= set(body["predictions"][0])
    assert body["predictions"][0]["score"] >= body["predictions"][1]["score"]
    assert r1.headers["x-request-id"] and r1.headers["x-batch-size"] == "1"
    r2 = client.post("/v1/classify", json={"text": TEXT, "image": b64(png), "audio": b64(wav), "top_k": 2})
    assert r2.json() == body
    r3 = client.post("/v1/classify/batch", json={"top_k": 2, "inputs": [
        {"text": TEXT, "image": b64(png), "audio": b64(wav)}, {"text": "bob lives in london"}]})
    assert r3.status_code == 200
    res = r3.json()["results"]
    assert res[0]["status"] == 200 and res[0]["predictions"] == body["predictions"]
    alone = client.post("/v1/classify", json={"text": "bob lives in london", "top_k": 2}).json()
    assert res[1]["predictions"] == alone["predictions"]
    # media change the answer: the image and audio really reach the model
    text_only = client.post("/v1/classify", json={"text": TEXT, "top_k": 3}).json()["predictions"]
    with_media = client.post("/v1/classify", json={"text": TEXT, "image": b64(png), "audio": b64(wav),
                                                   "top_k": 3}).json()["predictions"]
    assert text_only != with_media


def test_ner_offsets_point_into_the_submitted_text(client):
    text = "  Alice   flew from Paris, to Berlin!"
    r = client.post("/v1/ner", data={"text": text})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny-ner"
    for e in body["entities"]:
        assert text[e["start"]:e["end"]] == e["text"]
        assert e["type"] in {"PER", "LOC"} and 0 <= e["score"] <= 1
    assert client.post("/v1/ner", json={"text": text}).json() == body
    batch = client.post("/v1/ner/batch", json={"inputs": [{"text": text}, {"text": ""}]}).json()["results"]
    assert batch[0]["entities"] == body["entities"] and batch[1]["status"] == 422


def test_vqa_multipart_json_batch(client):
    jpg = image_bytes(fmt="JPEG", color=(20, 200, 20))
    r = client.post("/v1/vqa", data={"question": "what colour is it?", "top_k": "3"},
                    files={"image": ("q.jpg", jpg, "image/jpeg")})
    assert r.status_code == 200, r.text
    answers = r.json()["answers"]
    assert len(answers) == 3 and {"answer", "score"} <= set(answers[0])
    assert client.post("/v1/vqa", json={"question": "what colour is it?", "image": b64(jpg), "top_k": 3}).json() == r.json()
    res = client.post("/v1/vqa/batch", json={"inputs": [
        {"question": "what colour is it?", "image": b64(jpg), "top_k": 3},
        {"question": "no image here"},
        {"question": "bad bytes", "image": b64(b"not an image at all")},
        {"question": "truncated", "image": b64(jpg[:60])},
    ]}).json()["results"]
    assert res[0]["answers"] == answers
    assert [x["status"] for x in res] == [200, 422, 415, 400]
    assert res[2]["error"]["code"] == "unsupported_media_type"


def test_model_selection(client, app_repository, tmp_path):
    assert client.post("/v1/classify", json={"text": "x", "model": "tiny-classify"}).status_code == 200
    r = client.post("/v1/classify", json={"text": "x", "model": "nope"})
    assert r.status_code == 404 and "tiny-classify" in r.json()["error"]["message"]
    r = client.post("/v1/classify", json={"text": "x", "model": "tiny-ner"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "wrong_task"
    # two classify models: the task alone is ambiguous -> 422 naming both
    build_model(tmp_path, "tiny-classify", seed=0)
    build_model(tmp_path, "other-classify", seed=5, task_spec=("classify", ["text"], ["text"], ["a", "b"], True))
    with make_client(tmp_path) as c2:
        wait_ready(c2)
        r = c2.post("/v1/classify", json={"text": "x"})
        assert r.status_code == 422
        assert r.json()["error"]["details"]["choices"] == ["other-classify", "tiny-classify"]
        r = c2.post("/v1/classify", json={"text": "x", "model": "other-classify"})
        scores = [p["score"] for p in r.json()["predictions"]]
        assert r.status_code == 200 and len(scores) == 2  # multi-label: independent sigmoids
        from app.core.items import Item
        from app.core.preprocess import prepare
        from app.tasks import get_task

        entry = c2.app.state.service.registry.entries["other-classify"]
        logits = entry.infer([prepare(entry, get_task("classify"), Item("x"))])[0]
        sigmoids = sorted((1.0 / (1.0 + np.exp(-logits))).tolist(), reverse=True)
        assert scores == pytest.approx(sigmoids, rel=1e-5)  # one sigmoid per label, not a softmax over them


def test_models_listing(client):
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert set(models) == {"tiny-classify", "tiny-ner", "tiny-vqa"}  # '.tmp-export-123' ignored
    for m in models.values():
        assert m["state"] == "ready" and m["backend"] == "onnx"
        assert m["provider"] == "CPUExecutionProvider" and m["device"] == "cpu"
        # MAX_BATCH_SIZE=auto (default) on CPU: calibrated at start-up, and what the batcher uses
        assert m["batch_size_source"] == "auto-calibrated" and 1 <= m["max_batch_size"] <= 32
        assert client.app.state.service.registry.entries[m["name"]].batcher.max_batch_size == m["max_batch_size"]
    d = client.get("/v1/models/tiny-ner").json()
    assert d["labels"][0] == "O" and d["task"] == "ner"
    assert str(d["max_batch_size"]) in d["batch_calibration"] and "1" in d["batch_calibration"]
    assert [t["name"] for t in d["inputs"]] == ["input_ids", "attention_mask"]
    assert d["outputs"][0]["name"] == "logits" and d["warmup_seconds"] is not None
    r = client.get("/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_auto_batch_size_is_calibrated_and_reported(tmp_path, monkeypatch):
    """A model whose batch costs 16 ms up to 4 items, then 6 ms per item more: items/s peaks at 4 (250/s; 8 items:
    200/s). With 4 ms per item more (a flat top at 4 and 8) the choice rested on the 5% tolerance, and a CI machine's
    scheduling delays on the 16 ms runs once made 8 look more than 5% better."""
    from app import runtime

    build_model(tmp_path, "tiny-classify")
    run = runtime.OnnxRuntime.run

    def costly(self, feeds):
        n = len(feeds["input_ids"])
        time.sleep(0.004 * max(n, 4) + 0.002 * max(0, n - 4))
        return run(self, feeds)

    monkeypatch.setattr(runtime.OnnxRuntime, "run", costly)
    with make_client(tmp_path) as c:
        wait_ready(c)
        (m,) = c.get("/v1/models").json()["models"]
        assert m["max_batch_size"] == 4 and m["batch_size_source"] == "auto-calibrated"
        d = c.get("/v1/models/tiny-classify").json()
        assert {"1", "2", "4", "8"} <= set(d["batch_calibration"])
        assert c.app.state.service.registry.entries["tiny-classify"].batcher.max_batch_size == 4
    for setting, size, source in ((8, 8, "settings"), (64, 32, "manifest")):  # an integer: as given, capped
        with make_client(tmp_path, max_batch_size=setting) as c:
            wait_ready(c)
            (m,) = c.get("/v1/models").json()["models"]
            assert (m["max_batch_size"], m["batch_size_source"]) == (size, source)
            assert c.get("/v1/models/tiny-classify").json()["batch_calibration"] is None


# ------------------------------------------------------------------------------------ errors
def test_error_statuses(client):
    def err(r, status, code=None):
        assert r.status_code == status, r.text
        e = r.json()["error"]
        assert set(e) >= {"code", "message"}
        if code:
            assert e["code"] == code
        return e

    files_txt = {"image": ("x.png", b"hello, this is text", "image/png")}
    err(client.post("/v1/classify", data={"text": "x"}, files=files_txt), 415, "unsupported_media_type")
    err(client.post("/v1/classify", data={"text": "x"}, files={"audio": ("x.wav", image_bytes(), "audio/wav")}), 415)
    err(client.post("/v1/classify", data={"text": "x"}, files={"image": ("x.png", image_bytes()[:50], "image/png")}), 400,
        "undecodable_media")
    err(client.post("/v1/classify", data={"text": "x"}, files={"audio": ("x.wav", audio_bytes()[:30], "audio/wav")}), 400)
    err(client.post("/v1/classify", json={"image": b64(image_bytes())}), 422)  # text missing
    err(client.post("/v1/classify", data={"top_k": "3"}), 422)
    err(client.post("/v1/classify", json={"text": "x", "top_k": 0}), 422)
    err(client.post("/v1/classify", json={"text": "x", "top_k": "many"}), 422)
    err(client.post("/v1/classify", data={"text": "x", "top_k": "many"}), 422)
    err(client.post("/v1/classify", json={"text": "x", "colour": "red"}), 422)
    err(client.post("/v1/classify", json={"text": "x", "image": "***"}), 422)
    err(client.post("/v1/ner", json={"text": "x", "image": b64(image_bytes())}), 422)  # model takes no image
    err(client.post("/v1/vqa", json={"question": "what?"}), 422)
    err(client.post("/v1/classify", content=b"{not json", headers={"content-type": "application/json"}), 400,
        "invalid_json")
    err(client.post("/v1/classify", content=b"text", headers={"content-type": "text/plain"}), 415,
        "unsupported_content_type")
    err(client.post("/v1/classify/batch", json={"inputs": []}), 422, "invalid_request")
    err(client.get("/v1/nothing"), 404)
    err(client.get("/v1/classify"), 405)


def test_decompression_bomb_and_long_audio_are_413(app_repository):
    with make_client(app_repository, max_image_pixels=10_000, max_audio_seconds=1.0) as c:
        wait_ready(c)
        big = image_bytes(size=(200, 200))
        r = c.post("/v1/classify", data={"text": "x"}, files={"image": ("x.png", big, "image/png")})
        assert r.status_code == 413 and r.json()["error"]["code"] == "media_too_large"
        r = c.post("/v1/classify", json={"text": "x", "audio": b64(audio_bytes(seconds=2.0))})
        assert r.status_code == 413


def test_upload_limit_holds_while_streaming(app_repository):
    with make_client(app_repository, max_upload_bytes=20_000) as c:
        wait_ready(c)
        big = image_bytes(size=(200, 200), fmt="BMP")
        assert len(big) > 20_000
        r = c.post("/v1/classify", data={"text": "x"}, files={"image": ("x.png", big, "image/png")})
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

        def chunks():  # no Content-Length: refused while it streams in
            for _ in range(100):
                yield b"x" * 1000

        r = c.post("/v1/classify", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert c.post("/v1/classify", json={"text": "x"}).status_code == 200


def test_api_keys(app_repository):
    with make_client(app_repository, api_keys="k1,k2") as c:
        wait_ready(c)  # probes stay open
        assert c.get("/metrics").status_code == 200 and c.get("/healthz").status_code == 200
        r = c.post("/v1/classify", json={"text": "x"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert c.post("/v1/classify", json={"text": "x"}, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.get("/v1/models", headers={"X-API-Key": "k2"}).status_code == 200
        assert c.post("/v1/classify", json={"text": "x"}, headers={"Authorization": "Bearer k1"}).status_code == 200


def test_internal_errors_leak_nothing(client, monkeypatch):
    import app.core.preprocess as preprocess

    def boom(*a, **k):
        raise RuntimeError("secret internals /etc/passwd")

    monkeypatch.setattr(preprocess, "check_input", boom)
    r = client.post("/v1/classify", json={"text": "x"}, headers={"X-Request-ID": "abc-123"})
    assert r.status_code == 500
    assert "secret" not in r.text and "Traceback" not in r.text
    assert r.json()["error"]["request_id"] == "abc-123" and r.headers["x-request-id"] == "abc-123"


def test_an_internal_error_in_one_batch_item_fails_only_that_item(client, monkeypatch):
    import app.core.preprocess as preprocess

    real = preprocess.check_input

    def boom_on_one(entry, task, inp):
        if inp.text == "boom":
            raise RuntimeError("secret internals")
        return real(entry, task, inp)

    monkeypatch.setattr(preprocess, "check_input", boom_on_one)
    r = client.post("/v1/classify/batch", json={"inputs": [{"text": "fine"}, {"text": "boom"}]},
                    headers={"X-Request-ID": "rid-b"})
    assert r.status_code == 200
    good, bad = r.json()["results"]
    assert good["status"] == 200 and good["predictions"]
    assert bad["status"] == 500 and bad["error"]["request_id"] == "rid-b" and "secret" not in r.text


def test_request_id_kept_or_generated_and_logged_as_json(client, caplog):
    from app.logging import JsonFormatter, RequestIdFilter

    r = client.post("/v1/classify", json={"text": "x"}, headers={"X-Request-ID": "my-id-42"})
    assert r.headers["x-request-id"] == "my-id-42"
    assert len(client.get("/healthz").headers["x-request-id"]) == 32
    assert client.get("/healthz", headers={"X-Request-ID": "bad id\nforged"}).headers["x-request-id"] != "bad id\nforged"
    with caplog.at_level(logging.INFO):
        client.post("/v1/classify", json={"text": "x", "image": "@@"}, headers={"X-Request-ID": "rid-7"})
    lines = [r for r in caplog.records if getattr(r, "request_id", None) == "rid-7" or "rid-7" in r.getMessage()]
    assert lines
    f = RequestIdFilter()
    for rec in lines:
        f.filter(rec)
        out = json.loads(JsonFormatter().format(rec))
        assert out["request_id"] == "rid-7" and out["level"]


# ------------------------------------------------------------------------------------ scheduling
def test_deadline_gives_504_and_the_item_is_not_run(client):
    slow_down(client, "tiny-classify", 0.5)
    before = metric(client, 'mmserve_rejections_total{model="tiny-classify",reason="timeout"}')
    results = {}

    def first():
        results["a"] = client.post("/v1/classify", json={"text": "first"})

    t = threading.Thread(target=first)
    t.start()
    time.sleep(0.1)
    r = client.post("/v1/classify", json={"text": "second", "timeout_ms": 100})
    t.join()
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    assert results["a"].status_code == 200
    after = metric(client, 'mmserve_rejections_total{model="tiny-classify",reason="timeout"}')
    assert after == before + 1
    assert metric(client, 'mmserve_batch_size_count{model="tiny-classify"}') >= 1


def test_queue_full_gives_503_with_retry_after(app_repository):
    with make_client(app_repository, queue_size=1, max_batch_size=1) as c:
        wait_ready(c)
        slow_down(c, "tiny-classify", 0.4)
        threads, out = post_in_threads(c, 6, stagger=0.02)
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in out)
        assert 200 in codes and 503 in codes, codes
        rejected = [r for r in out if r.status_code == 503]
        assert all(int(r.headers["retry-after"]) >= 1 for r in rejected)
        assert rejected[0].json()["error"]["code"] == "overloaded"
        assert metric(c, 'mmserve_rejections_total{model="tiny-classify",reason="queue_full"}') == len(rejected)


def test_full_queue_refuses_at_the_head_without_parsing_the_body(app_repository):
    """Under overload a request is refused before its body is parsed (the body is read and dropped): a malformed
    body gets the 503 + Retry-After a good one would, on /v1 and on v2, and the requests already admitted are
    answered; once the queue has room the same malformed bodies get their 400."""
    with make_client(app_repository, queue_size=1, max_batch_size=1) as c:
        wait_ready(c)
        slow_down(c, "tiny-classify", 0.8)
        # one running, one waiting sealed behind it (the batcher's pipeline), one queued: the queue (1) is full
        threads, out = post_in_threads(c, 3, stagger=0.05)
        time.sleep(0.3)
        v1 = c.post("/v1/classify", content=b"{not json", headers={"content-type": "application/json"})
        v2 = c.post("/v2/models/tiny-classify/infer", content=b"{not json",
                    headers={"content-type": "application/json"})
        for t in threads:
            t.join()
        assert sorted(r.status_code for r in out) == [200, 200, 200]
        assert v1.status_code == 503 and v1.json()["error"]["code"] == "overloaded", v1.text
        assert int(v1.headers["retry-after"]) >= 1
        assert v2.status_code == 503 and "queue is full" in v2.json()["error"], v2.text
        assert int(v2.headers["retry-after"]) >= 1
        assert metric(c, 'mmserve_rejections_total{model="tiny-classify",reason="queue_full"}') == 2
        assert metric(c, 'mmserve_requests_total{endpoint="/v1/classify",model="tiny-classify",status="503"}') == 1
        again = c.post("/v1/classify", content=b"{not json", headers={"content-type": "application/json"})
        assert again.status_code == 400, again.text
        again = c.post("/v2/models/tiny-classify/infer", content=b"{not json",
                       headers={"content-type": "application/json"})
        assert again.status_code == 400, again.text


def test_readiness_before_and_after_warmup(app_repository, monkeypatch):
    from app.core.loading import ModelLoader

    gate = threading.Event()
    original = ModelLoader.warm_up

    def gated(self, entry):
        gate.wait(20)
        return original(self, entry)

    monkeypatch.setattr(ModelLoader, "warm_up", gated)
    with make_client(app_repository) as c:
        assert c.get("/healthz").status_code == 200  # alive at once
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["ready"] is False
        r = c.post("/v1/classify", json={"text": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready" and "retry-after" in r.headers
        assert metric(c, 'mmserve_rejections_total{model="tiny-classify",reason="not_ready"}') == 1
        gate.set()
        body = wait_ready(c)
        assert set(body["models"].values()) == {"ready"}
        assert metric(c, 'mmserve_model_warmup_seconds{model="tiny-classify",version="1"}') > 0


def test_broken_model_next_to_a_good_one(broken_repository):
    with make_client(broken_repository) as c:
        body = wait_ready(c)
        assert body["models"] == {"tiny-classify": "ready", "tiny-ner": "failed"}
        assert "sha256 mismatch" in body["failed"]["tiny-ner"]
        models = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
        assert models["tiny-ner"]["state"] == "failed" and "sha256" in models["tiny-ner"]["reason"]
        assert c.post("/v1/classify", json={"text": "x"}).status_code == 200
        r = c.post("/v1/ner", json={"text": "Alice"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_failed"
        assert 'state="failed"' in c.get("/metrics").text
    with make_client(broken_repository, strict_readiness=True) as c:
        time.sleep(0.5)
        assert c.get("/readyz").status_code == 503


def test_metrics_present_and_moving(client):
    names = ["mmserve_requests_total", "mmserve_request_duration_seconds", "mmserve_queue_wait_seconds",
             "mmserve_preprocess_seconds", "mmserve_inference_seconds", "mmserve_batch_size",
             "mmserve_queue_depth", "mmserve_inflight_requests", "mmserve_rejections_total",
             "mmserve_model_load_seconds", "mmserve_model_warmup_seconds", "mmserve_model_info"]
    key = 'mmserve_requests_total{endpoint="/v1/classify",model="tiny-classify",status="200"}'
    before = metric(client, key)
    client.post("/v1/classify", data={"text": "x"}, files={"image": ("x.png", image_bytes(), "image/png")})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert not r.history  # answered at /metrics itself, no redirect
    for n in names:
        assert f"# TYPE {n} " in r.text, n
    assert metric(client, key) == before + 1
    assert metric(client, 'mmserve_preprocess_seconds_count{modality="image",model="tiny-classify"}') >= 1
    assert 'provider="CPUExecutionProvider"' in r.text


def test_openapi_docs_and_examples(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/vqa"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    for ex in body["application/json"]["examples"].values():  # the documented examples work as they are
        r = client.post("/v1/vqa", json=ex["value"])
        assert r.status_code in (200, 422), r.text
    ex = body["application/json"]["examples"]["text_image"]["value"]
    assert client.post("/v1/vqa", json=ex).status_code == 200


def test_torchscript_backend(tmp_path):
    torch = pytest.importorskip("torch")
    from models.manifest import FormatInfo, hash_directory, read_manifest

    directory = build_model(tmp_path, "tiny-vqa", seed=3)

    class Tiny(torch.nn.Module):
        def forward(self, input_ids, attention_mask, pixel_values, image_present):
            t = (input_ids.float() * attention_mask.float()).sum(1, keepdim=True) / 100.0
            img = pixel_values.mean(dim=(2, 3)) * image_present[:, None]
            return torch.cat([t, img, t * 2, img[:, :1]], dim=1)  # [B, 6]

    ex = (torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long), torch.zeros(2, 3, 32, 32),
          torch.ones(2))
    torch.jit.trace(Tiny(), ex).save(str(directory / "model.pt"))
    m = read_manifest(directory)
    m.formats["torchscript"] = FormatInfo(file="model.pt", size_bytes=(directory / "model.pt").stat().st_size,
                                          export_seconds=0.0)
    m.files = hash_directory(directory)
    m.dump(directory)
    with make_client(tmp_path, backend="torchscript", device="cpu") as c:
        wait_ready(c)
        info = c.get("/v1/models/tiny-vqa").json()
        assert info["backend"] == "torchscript" and info["device"] == "cpu" and info["provider"] == "torch-cpu"
        r = c.post("/v1/vqa", json={"question": "what colour?", "image": b64(image_bytes())})
        assert r.status_code == 200 and len(r.json()["answers"]) == 5


def test_app_never_imports_torch_or_training():
    import subprocess
    import sys

    code = ("import sys; from app.main import create_app; from app.settings import Settings; "
            "create_app(Settings()); import app.rest, app.v2, app.core.registry, app.runtime, app.core.batcher, app.tasks; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('training')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))


def test_serving_core_and_tasks_never_import_fastapi_or_starlette():
    """The core (registry, loading, batcher, service, ...) and the tasks know no HTTP: every protocol
    front-end (REST v1, OIP v2, gRPC to come) maps their plain values and errors itself."""
    import pkgutil
    import subprocess
    import sys

    import app.core
    import app.tasks

    modules = [f"app.core.{m.name}" for m in pkgutil.iter_modules(app.core.__path__)]
    modules += [f"app.tasks.{m.name}" for m in pkgutil.iter_modules(app.tasks.__path__)]
    assert {"app.core.registry", "app.core.service", "app.core.batcher", "app.tasks.classify"} <= set(modules)
    code = (f"import sys, importlib; [importlib.import_module(m) for m in {modules!r}]; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('fastapi', 'starlette')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))

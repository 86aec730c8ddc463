"""The stock tritonclient (HTTP and HTTP aio) against a live server, with its default calls (binary tensors
both ways), JSON mode, raw image and audio bytes, batches, the classification extension, NER, config,
statistics and every error path: scores equal /v1's for the same inputs."""
from __future__ import annotations

import asyncio
import base64
import json

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
from tritonclient.utils import InferenceServerException

from tests.fixtures_app import app_repository  # noqa: F401 (fixture)
from tests.media import audio_bytes, image_bytes
from tests.test_app_live import Server

pytestmark = pytest.mark.slow
LABELS = ["negative", "neutral", "positive"]
TEXTS = ["Alice flew from Paris to Berlin", "bob lives in london", "a quiet day in rome"]


@pytest.fixture(scope="module")
def server(app_repository):  # noqa: F811
    s = Server(app_repository, max_delay_ms=3, max_batch_size=8, queue_size=100)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    c = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    yield c
    c.close()


def bytes_input(name: str, rows: list[bytes], binary: bool = True) -> httpclient.InferInput:
    t = httpclient.InferInput(name, [len(rows), 1], "BYTES")
    t.set_data_from_numpy(np.array(rows, dtype=object).reshape(-1, 1), binary_data=binary)
    return t


def v1_scores(server: Server, text: str, image: bytes | None = None, audio: bytes | None = None,
              task: str = "classify", field: str = "text") -> list[dict]:
    files = {}
    if image is not None:
        files["image"] = ("x", image, "application/octet-stream")
    if audio is not None:
        files["audio"] = ("x", audio, "application/octet-stream")
    r = httpx.post(f"{server.url}/v1/{task}", data={field: text, "top_k": "10"}, files=files or None, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["predictions" if task == "classify" else "answers"]


def assert_same(scores: np.ndarray, preds: list[dict]) -> None:
    for p in preds:
        assert float(scores[LABELS.index(p["label"])]) == pytest.approx(p["score"], rel=1e-5, abs=1e-6)


def test_server_and_model_calls(client):
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "mmserve"
    assert {"binary_tensor_data", "classification", "model_configuration", "statistics"} <= set(meta["extensions"])
    assert client.is_model_ready("tiny-classify") and client.is_model_ready("tiny-classify", "1")
    m = client.get_model_metadata("tiny-classify")
    assert [t["name"] for t in m["inputs"]] == ["TEXT", "IMAGE", "AUDIO"] and m["outputs"][0]["name"] == "SCORES"


def test_default_binary_infer_with_raw_media_matches_v1(server, client):
    png, jpg, wav, flac = image_bytes(pattern=2), image_bytes(fmt="JPEG", color=(10, 90, 200)), \
        audio_bytes(500.0), audio_bytes(220.0, fmt="FLAC")
    images, audios = [png, b"", jpg], [wav, flac, b""]
    inputs = [bytes_input("TEXT", [t.encode() for t in TEXTS]), bytes_input("IMAGE", images),
              bytes_input("AUDIO", audios)]
    result = client.infer("tiny-classify", inputs, request_id="r-1")
    assert result.get_response()["id"] == "r-1"
    assert result.get_output("SCORES")["parameters"]["binary_data_size"] == 3 * 3 * 4  # came back binary
    scores = result.as_numpy("SCORES")
    assert scores.shape == (3, 3) and scores.dtype == np.float32
    for row, text, image, audio in zip(scores, TEXTS, images, audios):
        assert_same(row, v1_scores(server, text, image or None, audio or None))
    # JSON both ways (media as base64 strings, as JSON needs) gives the same scores
    b64 = [base64.b64encode(x).decode().encode() for x in images]
    inputs = [bytes_input("TEXT", [t.encode() for t in TEXTS], binary=False), bytes_input("IMAGE", b64, binary=False),
              bytes_input("AUDIO", [base64.b64encode(x) for x in audios], binary=False)]
    result = client.infer("tiny-classify", inputs, outputs=[httpclient.InferRequestedOutput("SCORES", binary_data=False)])
    assert "data" in result.get_output("SCORES")
    np.testing.assert_allclose(result.as_numpy("SCORES"), scores, rtol=1e-5, atol=1e-6)


def test_classification_extension_vqa_and_ner(server, client):
    out = [httpclient.InferRequestedOutput("SCORES", class_count=2)]
    result = client.infer("tiny-classify", [bytes_input("TEXT", [TEXTS[0].encode()])], outputs=out)
    top = result.as_numpy("SCORES")
    assert top.shape == (1, 2)
    ref = v1_scores(server, TEXTS[0])[:2]
    for got, p in zip(top[0], ref):
        score, index, label = got.decode().split(":")
        assert label == p["label"] and LABELS[int(index)] == label and float(score) == pytest.approx(p["score"], abs=1e-6)
    jpg = image_bytes(fmt="JPEG", color=(20, 200, 20))
    result = client.infer("tiny-vqa", [bytes_input("TEXT", [b"what colour is it?"]), bytes_input("IMAGE", [jpg])],
                          outputs=[httpclient.InferRequestedOutput("SCORES", class_count=3)])
    answers = v1_scores(server, "what colour is it?", jpg, task="vqa", field="question")[:3]
    assert [s.decode().split(":")[2] for s in result.as_numpy("SCORES")[0]] == [a["answer"] for a in answers]
    result = client.infer("tiny-ner", [bytes_input("TEXT", [t.encode() for t in TEXTS[:2]])])
    ents = result.as_numpy("ENTITIES")
    assert ents.shape == (2, 1)
    for text, row in zip(TEXTS, ents):
        ref = httpx.post(f"{server.url}/v1/ner", json={"text": text}).json()["entities"]
        assert json.loads(row[0]) == ref


def test_config_reflects_live_settings(client):
    for version in ("", "1"):
        cfg = client.get_model_config("tiny-classify", version)
        assert cfg["name"] == "tiny-classify" and cfg["platform"] == "onnxruntime_onnx"
        assert cfg["backend"] == "onnxruntime" and cfg["max_batch_size"] == 8  # MAX_BATCH_SIZE=8 (manifest: 32)
        assert [(i["name"], i["data_type"], i["dims"], i["optional"]) for i in cfg["input"]] == [
            ("TEXT", "TYPE_STRING", [1], False), ("IMAGE", "TYPE_STRING", [1], True),
            ("AUDIO", "TYPE_STRING", [1], True)]
        assert [(o["name"], o["data_type"], o["dims"]) for o in cfg["output"]] == [("SCORES", "TYPE_FP32", [3])]
        db = cfg["dynamic_batching"]
        assert db["max_queue_delay_microseconds"] == 3000 and db["preferred_batch_size"] == [8]
        assert db["default_queue_policy"]["max_queue_size"] == 100
        assert cfg["instance_group"][0]["kind"] == "KIND_CPU" and cfg["instance_group"][0]["count"] == 1
        assert json.loads(cfg["parameters"]["labels"]["string_value"]) == LABELS
    ner = client.get_model_config("tiny-ner")
    assert [(o["name"], o["data_type"], o["dims"]) for o in ner["output"]] == [("ENTITIES", "TYPE_STRING", [1])]


def test_statistics_move_with_requests(client, server):
    def stats(model=""):
        return {s["name"]: s for s in client.get_inference_statistics(model)["model_stats"]}

    before = stats()["tiny-ner"]
    client.infer("tiny-ner", [bytes_input("TEXT", [b"alice in paris", b"bob in rome"])])
    with pytest.raises(InferenceServerException):
        client.infer("tiny-ner", [bytes_input("TEXT", [b"   "])])  # empty text: a failed request
    after = stats("tiny-ner")["tiny-ner"]
    assert after["version"] == "1"
    assert after["inference_count"] == before["inference_count"] + 2
    assert after["execution_count"] >= before["execution_count"] + 1
    s0, s1 = before["inference_stats"], after["inference_stats"]
    assert s1["success"]["count"] == s0["success"]["count"] + 1 and s1["success"]["ns"] > s0["success"]["ns"]
    assert s1["fail"]["count"] == s0["fail"]["count"] + 1
    for part in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert s1[part]["count"] == s0[part]["count"] + 2 and s1[part]["ns"] > s0[part]["ns"], part
    assert sum(b["compute_infer"]["count"] for b in after["batch_stats"]) == after["execution_count"]
    assert after["last_inference"] > 0
    # Prometheus says the same
    assert server.metric('mmserve_batch_size_sum{model="tiny-ner"}') == after["inference_count"]
    assert server.metric('mmserve_batch_size_count{model="tiny-ner"}') == after["execution_count"]
    assert set(stats()) == {"tiny-classify", "tiny-ner", "tiny-vqa"}


def test_every_error_is_a_printable_exception(client):
    text = [bytes_input("TEXT", [b"hello"])]
    calls = {
        "unknown model": (lambda: client.infer("tiny-zzz", text), "404", "tiny-zzz"),
        "unknown model metadata": (lambda: client.get_model_metadata("tiny-zzz"), "404", "tiny-zzz"),
        "unknown model config": (lambda: client.get_model_config("tiny-zzz"), "404", "tiny-zzz"),
        "unknown model stats": (lambda: client.get_inference_statistics("tiny-zzz"), "404", "tiny-zzz"),
        "version not served": (lambda: client.infer("tiny-ner", text, model_version="7"), "400", "'7'"),
        "vqa without image": (lambda: client.infer("tiny-vqa", text), "400", "image"),
        "not an image": (lambda: client.infer("tiny-classify", text[:1] + [bytes_input("IMAGE", [b"GIF? no"])]),
                         "415", "image"),
        "unknown input": (lambda: client.infer("tiny-ner", [bytes_input("AUDIO", [audio_bytes()])]), "400", "AUDIO"),
        "unknown output": (lambda: client.infer("tiny-ner", text, outputs=[httpclient.InferRequestedOutput("X")]),
                           "400", "'X'"),
        "wrong datatype": (lambda: client.infer("tiny-ner", [_fp32()]), "400", "BYTES"),
        "repository index": (lambda: client.get_model_repository_index(), None, None),
        "load refused": (lambda: client.load_model("tiny-ner"), "403", "MODEL_CONTROL"),
        "unsupported call": (lambda: client.get_trace_settings(), "404", "trace"),
    }
    for what, (call, status, words) in calls.items():
        if status is None:
            call()  # served
            continue
        with pytest.raises(InferenceServerException) as info:
            call()
        e = info.value
        assert e.status() == status, (what, str(e))
        assert str(e).startswith(f"[{status}] ") and words in str(e), (what, str(e))


def _fp32() -> httpclient.InferInput:
    t = httpclient.InferInput("TEXT", [1, 1], "FP32")
    t.set_data_from_numpy(np.ones((1, 1), np.float32))
    return t


def test_aio_client_concurrent_rows(server):
    async def main():
        c = aioclient.InferenceServerClient(server.url.removeprefix("http://"))
        try:
            assert await c.is_server_ready()
            cfg = await c.get_model_config("tiny-classify")
            assert cfg["max_batch_size"] == 8

            async def one(text: str):
                t = aioclient.InferInput("TEXT", [1, 1], "BYTES")
                t.set_data_from_numpy(np.array([[text.encode()]], dtype=object))
                return (await c.infer("tiny-classify", [t])).as_numpy("SCORES")[0]

            return await asyncio.gather(*(one(t) for t in TEXTS * 4))
        finally:
            await c.close()

    rows = asyncio.run(main())
    for i, text in enumerate(TEXTS):
        ref = v1_scores(server, text)
        for row in rows[i::len(TEXTS)]:
            assert_same(row, ref)

"""Open Inference Protocol (KServe v2) JSON endpoints on the tiny ONNX models, through the real app."""
from __future__ import annotations

import base64
import json

import pytest

from tests.fixtures_app import app_repository  # noqa: F401 (fixture)
from tests.media import audio_bytes, image_bytes
from tests.test_app_api import make_client, wait_ready

TEXTS = ["Alice flew from Paris to Berlin", "bob lives in london"]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def client(app_repository):  # noqa: F811
    with make_client(app_repository, max_delay_ms=2) as c:
        wait_ready(c)
        yield c


def tensor(name: str, values: list[str]) -> dict:
    return {"name": name, "datatype": "BYTES", "shape": [len(values), 1], "data": values}


def test_server_metadata_and_health(client):
    meta = client.get("/v2").json()
    assert meta["name"] == "mmserve" and meta["version"] and "classification" in meta["extensions"]
    live = client.get("/v2/health/live")
    assert live.status_code == 200 and live.content == b""
    assert client.get("/v2/health/ready").status_code == 200
    client.app.state.service.registry.draining = True
    try:
        assert client.get("/v2/health/ready").status_code == 400
        assert client.get("/v2/models/tiny-ner/ready").status_code == 400
    finally:
        client.app.state.service.registry.draining = False


def test_model_metadata_and_readiness(client):
    for path in ("/v2/models/tiny-classify", "/v2/models/tiny-classify/versions/1"):
        m = client.get(path).json()
        assert m["name"] == "tiny-classify" and m["versions"] == ["1"] and m["platform"] == "onnxruntime_onnx"
        ins = {t["name"]: t for t in m["inputs"]}
        assert list(ins) == ["TEXT", "IMAGE", "AUDIO"]
        assert all(t["datatype"] == "BYTES" and t["shape"] == [-1, 1] for t in ins.values())
        assert ins["TEXT"]["parameters"]["optional"] is False and ins["IMAGE"]["parameters"]["optional"] is True
        assert "base64" in ins["IMAGE"]["parameters"]["content"]
        assert m["outputs"] == [{"name": "SCORES", "datatype": "FP32", "shape": [-1, 3], "parameters": {
            "content": "softmax scores", "labels": ["negative", "neutral", "positive"], "classification": True}}]
    ner = client.get("/v2/models/tiny-ner").json()
    assert [t["name"] for t in ner["inputs"]] == ["TEXT"] and ner["outputs"][0]["name"] == "ENTITIES"
    vqa = client.get("/v2/models/tiny-vqa").json()
    assert [(t["name"], t["parameters"]["optional"]) for t in vqa["inputs"]] == [("TEXT", False), ("IMAGE", False)]
    assert client.get("/v2/models/tiny-vqa/ready").status_code == 200
    assert client.get("/v2/models/tiny-vqa/versions/1/ready").status_code == 200


def test_classify_batch_of_two_matches_v1(client):
    png, wav = image_bytes(), audio_bytes()
    body = {"id": "req-7", "inputs": [tensor("TEXT", TEXTS), tensor("IMAGE", [b64(png), ""]),
                                      tensor("AUDIO", [b64(wav), ""])]}
    r = client.post("/v2/models/tiny-classify/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model_name"] == "tiny-classify" and out["model_version"] == "1" and out["id"] == "req-7"
    [scores] = out["outputs"]
    assert scores["name"] == "SCORES" and scores["datatype"] == "FP32" and scores["shape"] == [2, 3]
    labels = ["negative", "neutral", "positive"]
    v1 = [client.post("/v1/classify", json={"text": TEXTS[0], "image": b64(png), "audio": b64(wav), "top_k": 3}),
          client.post("/v1/classify", json={"text": TEXTS[1], "top_k": 3})]
    for row in range(2):
        got = scores["data"][row * 3:(row + 1) * 3]
        preds = v1[row].json()["predictions"]
        assert [labels[i] for i in sorted(range(3), key=lambda i: -got[i])] == [p["label"] for p in preds]
        for p in preds:
            assert got[labels.index(p["label"])] == pytest.approx(p["score"], rel=1e-5, abs=1e-6)
    # nested data, flat shape [2] and the versioned path give the same answer
    nested = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [2], "data": TEXTS}]}
    a = client.post("/v2/models/tiny-classify/versions/1/infer", json=nested).json()["outputs"][0]["data"]
    b = client.post("/v2/models/tiny-classify/infer", json={"inputs": [
        {"name": "TEXT", "datatype": "BYTES", "shape": [2, 1], "data": [[t] for t in TEXTS]}]}).json()
    assert a == b["outputs"][0]["data"] and "id" not in b


def test_classification_extension(client):
    body = {"inputs": [tensor("TEXT", TEXTS)], "outputs": [{"name": "SCORES", "parameters": {"classification": 2}}]}
    r = client.post("/v2/models/tiny-classify/infer", json=body)
    assert r.status_code == 200, r.text
    [out] = r.json()["outputs"]
    assert out["datatype"] == "BYTES" and out["shape"] == [2, 2]
    v1 = client.post("/v1/classify", json={"text": TEXTS[0], "top_k": 2}).json()["predictions"]
    labels = ["negative", "neutral", "positive"]
    for s, p in zip(out["data"][:2], v1):
        score, index, label = s.split(":")
        assert label == p["label"] and labels[int(index)] == label
        assert float(score) == pytest.approx(p["score"], abs=1e-6)
    # VQA too, with the image
    jpg = b64(image_bytes(fmt="JPEG", color=(20, 200, 20)))
    r = client.post("/v2/models/tiny-vqa/infer", json={
        "inputs": [tensor("TEXT", ["what colour is it?"]), tensor("IMAGE", [jpg])],
        "outputs": [{"name": "SCORES", "parameters": {"classification": 3}}]})
    assert r.status_code == 200, r.text
    ans = client.post("/v1/vqa", json={"question": "what colour is it?", "image": jpg, "top_k": 3}).json()["answers"]
    assert [s.split(":")[2] for s in r.json()["outputs"][0]["data"]] == [a["answer"] for a in ans]


def test_ner_entities(client):
    r = client.post("/v2/models/tiny-ner/infer", json={"inputs": [tensor("TEXT", TEXTS)]})
    assert r.status_code == 200, r.text
    [out] = r.json()["outputs"]
    assert out["name"] == "ENTITIES" and out["datatype"] == "BYTES" and out["shape"] == [2, 1]
    for text, s in zip(TEXTS, out["data"]):
        assert json.loads(s) == client.post("/v1/ner", json={"text": text}).json()["entities"]


def test_errors(client):
    def err(path, body, status=400, **kw):
        r = client.post(path, json=body, **kw)
        assert r.status_code == status, r.text
        assert isinstance(r.json()["error"], str)
        return r.json()

    # missing required input: VQA without its image
    e = err("/v2/models/tiny-vqa/infer", {"id": "x1", "inputs": [tensor("TEXT", ["what colour?"])]})
    assert "image" in e["error"] and e["id"] == "x1"
    # missing text for classify (only audio given)
    assert "text" in err("/v2/models/tiny-classify/infer", {"inputs": [tensor("AUDIO", [b64(audio_bytes())])]})["error"]
    # unknown model / wrong version
    assert "tiny-zzz" in err("/v2/models/tiny-zzz/infer", {"inputs": [tensor("TEXT", ["x"])]}, 404)["error"]
    assert client.get("/v2/models/tiny-zzz").status_code == 404
    assert client.get("/v2/models/tiny-zzz/ready").status_code == 404
    e = err("/v2/models/tiny-ner/versions/7/infer", {"inputs": [tensor("TEXT", ["x"])]})
    assert "'1'" in e["error"] and "7" in e["error"]
    assert client.get("/v2/models/tiny-ner/versions/7").status_code == 400
    assert client.get("/v2/models/tiny-ner/versions/7/ready").status_code == 400
    # malformed tensors, unknown input/output, bad base64, undecodable image
    err("/v2/models/tiny-ner/infer", {"inputs": [tensor("IMAGE", ["x"])]})
    err("/v2/models/tiny-ner/infer", {"inputs": [{"name": "TEXT", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]})
    err("/v2/models/tiny-ner/infer", {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [2, 1], "data": ["a"]}]})
    err("/v2/models/tiny-ner/infer", {"inputs": [tensor("TEXT", ["a"])], "outputs": [{"name": "SCORES"}]})
    err("/v2/models/tiny-classify/infer", {"inputs": [tensor("TEXT", ["a"]), tensor("IMAGE", ["%%%"])]})
    assert "row 1" in err("/v2/models/tiny-classify/infer", {"inputs": [
        tensor("TEXT", ["a", "b"]), tensor("IMAGE", ["", b64(b"not an image at all")])]}, 415)["error"]
    # binary tensor extension framing, with no inputs (tests/test_oip_binary.py has the rest)
    r = client.post("/v2/models/tiny-ner/infer", content=b'{"inputs": []}',
                    headers={"Inference-Header-Content-Length": "14", "Content-Type": "application/octet-stream"})
    assert r.status_code == 400 and "non-empty list" in r.json()["error"]
    r = client.post("/v2/models/tiny-ner/infer", content=b"{not json")
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    # accounted like /v1
    metrics = client.get("/metrics").text
    assert 'mmserve_requests_total{endpoint="/v2/models/{model}/infer",model="tiny-ner",status="400"}' in metrics

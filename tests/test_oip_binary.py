"""Binary tensor data extension of /v2 by hand (raw bodies, no client library): the exact layout both ways,
and hostile bodies (lying lengths, overflowing sizes, truncated bodies, header length past the body,
compression bombs), each a clean 400/413/415 in the v2 error shape; every /v2 error in the v2 shape;
the /v2 OpenAPI."""
from __future__ import annotations

import gzip
import json
import struct
import zlib

import numpy as np
import pytest

from app.oip_tensors import decode_raw, deserialize_bytes, element_count, flatten, serialize_bytes
from app.core.errors import InvalidInput
from tests.fixtures_app import app_repository  # noqa: F401 (fixture)
from tests.media import audio_bytes, image_bytes
from tests.test_app_api import make_client, wait_ready

TEXTS = ["Alice flew from Paris to Berlin", "bob lives in london"]
LABELS = ["negative", "neutral", "positive"]
URL = "/v2/models/tiny-classify/infer"


@pytest.fixture(scope="module")
def client(app_repository):  # noqa: F811
    with make_client(app_repository, max_delay_ms=2) as c:
        wait_ready(c)
        yield c


@pytest.fixture(scope="module")
def small(app_repository):  # noqa: F811
    """Bodies limited to 64 KiB and an API key."""
    with make_client(app_repository, max_upload_bytes=65536, api_keys=["k1"]) as c:
        wait_ready(c)
        yield c


def lp(*values: bytes) -> bytes:
    """BYTES elements in the raw layout, written independently of the server's codec."""
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def binary_request(inputs: list[tuple[dict, bytes | None]], **extra) -> tuple[bytes, dict[str, str]]:
    """JSON header + the binary chunks of the inputs that have one (binary_data_size set to its length)."""
    tensors, chunks = [], []
    for t, chunk in inputs:
        t = dict(t)
        if chunk is not None:
            t.setdefault("parameters", {})["binary_data_size"] = len(chunk)
            chunks.append(chunk)
        tensors.append(t)
    header = json.dumps({"inputs": tensors, **extra}).encode()
    return header + b"".join(chunks), {"Inference-Header-Content-Length": str(len(header)),
                                       "Content-Type": "application/octet-stream"}


def split_response(r) -> tuple[dict, dict[str, bytes]]:
    """(JSON header, output name -> its raw bytes) of a binary response."""
    n = int(r.headers["inference-header-content-length"])
    head, rest = json.loads(r.content[:n]), r.content[n:]
    raw, pos = {}, 0
    for o in head["outputs"]:
        size = o.get("parameters", {}).get("binary_data_size")
        if size is not None:
            raw[o["name"]] = rest[pos:pos + size]
            pos += size
    assert pos == len(rest)
    return head, raw


def bytes_tensor(name: str, n: int) -> dict:
    return {"name": name, "datatype": "BYTES", "shape": [n, 1]}


def test_codec_round_trip_and_limits():
    values = [b"", b"a", bytes(range(256)) * 3]
    assert deserialize_bytes(serialize_bytes(values), 3, "X") == values
    assert decode_raw("FP32", [2, 2], np.arange(4, dtype="<f4").tobytes(), "X", 10) == [0.0, 1.0, 2.0, 3.0]
    assert decode_raw("INT64", [3], np.array([-1, 0, 2**40], "<i8").tobytes(), "X", 10) == [-1, 0, 2**40]
    assert decode_raw("BOOL", [2], b"\x01\x00", "X", 10) == [True, False]
    assert flatten([[["a"], ["b"]], [["c"]]]) == ["a", "b", "c"]
    deep = "x"
    for _ in range(100_000):  # nesting far past the recursion limit
        deep = [deep]
    assert flatten(deep) == ["x"]
    for shape in ([2**62, 2**62], [-1, 1], [1.5], "2", [True], [1] * 9):
        with pytest.raises(InvalidInput):
            element_count(shape, "X", 64)
    for raw, count in ((lp(b"abc")[:-1], 1), (lp(b"abc") + b"\0", 1), (b"\xff\xff\xff\xff", 1), (b"\1\0", 1),
                       (lp(b"a"), 2), (lp(b"a", b"b"), 1)):
        with pytest.raises(InvalidInput):
            deserialize_bytes(raw, count, "X")
    with pytest.raises(InvalidInput):
        decode_raw("FP32", [2], b"\0" * 7, "X", 10)
    with pytest.raises(InvalidInput):
        decode_raw("BF16", [1], b"\0\0", "X", 10)


def test_binary_inputs_and_outputs_match_v1(client):
    png, wav = image_bytes(pattern=3), audio_bytes(330.0)
    body, headers = binary_request([(bytes_tensor("TEXT", 2), lp(*(t.encode() for t in TEXTS))),
                                    (bytes_tensor("IMAGE", 2), lp(png, b"")),
                                    (bytes_tensor("AUDIO", 2), lp(wav, b""))],
                                   id="b-1", parameters={"binary_data_output": True})
    r = client.post(URL, content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    head, raw = split_response(r)
    assert head["id"] == "b-1" and head["model_name"] == "tiny-classify" and head["model_version"] == "1"
    assert head["outputs"] == [{"name": "SCORES", "datatype": "FP32", "shape": [2, 3],
                                "parameters": {"binary_data_size": 24}}]
    scores = np.frombuffer(raw["SCORES"], "<f4").reshape(2, 3)
    v1 = [client.post("/v1/classify", data={"text": TEXTS[0], "top_k": "3"},
                      files={"image": ("a.png", png, "image/png"), "audio": ("a.wav", wav, "audio/wav")}).json(),
          client.post("/v1/classify", data={"text": TEXTS[1], "top_k": "3"}).json()]
    for row, ref in zip(scores, v1):
        for p in ref["predictions"]:
            assert row[LABELS.index(p["label"])] == pytest.approx(p["score"], rel=1e-5, abs=1e-6)
    # the same request with the media as base64 JSON and JSON outputs gives the same scores
    import base64

    b64 = lambda d: base64.b64encode(d).decode()  # noqa: E731
    r = client.post(URL, json={"inputs": [
        {**bytes_tensor("TEXT", 2), "data": TEXTS}, {**bytes_tensor("IMAGE", 2), "data": [b64(png), ""]},
        {**bytes_tensor("AUDIO", 2), "data": [b64(wav), ""]}]})
    assert r.headers["content-type"] == "application/json"
    assert r.json()["outputs"][0]["data"] == pytest.approx(scores.reshape(-1).tolist(), rel=1e-6)


def test_mixed_json_and_binary_inputs_and_per_output_choice(client):
    jpg = image_bytes(fmt="JPEG", color=(20, 200, 20))
    body, headers = binary_request([({**bytes_tensor("TEXT", 1), "data": ["what colour is it?"]}, None),
                                    (bytes_tensor("IMAGE", 1), lp(jpg))],
                                   outputs=[{"name": "SCORES", "parameters": {"classification": 2, "binary_data": True}}])
    r = client.post("/v2/models/tiny-vqa/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    head, raw = split_response(r)
    assert head["outputs"][0]["datatype"] == "BYTES" and head["outputs"][0]["shape"] == [1, 2]
    got = deserialize_bytes(raw["SCORES"], 2, "SCORES")
    ref = client.post("/v1/vqa", data={"question": "what colour is it?", "top_k": "2"},
                      files={"image": ("a.jpg", jpg, "image/jpeg")}).json()["answers"]
    assert [g.decode().split(":")[2] for g in got] == [a["answer"] for a in ref]
    # binary input, JSON output (binary_data false): the whole answer is JSON
    body, headers = binary_request([(bytes_tensor("TEXT", 2), lp(*(t.encode() for t in TEXTS)))],
                                   outputs=[{"name": "ENTITIES", "parameters": {"binary_data": False}}])
    r = client.post("/v2/models/tiny-ner/infer", content=body, headers=headers)
    assert r.status_code == 200 and "inference-header-content-length" not in r.headers
    ents = [json.loads(s) for s in r.json()["outputs"][0]["data"]]
    assert ents == [client.post("/v1/ner", json={"text": t}).json()["entities"] for t in TEXTS]


def test_compressed_bodies(client, small):
    body, headers = binary_request([(bytes_tensor("TEXT", 2), lp(*(t.encode() for t in TEXTS)))])
    plain = client.post("/v2/models/tiny-ner/infer", content=body, headers=headers).json()
    for enc, data in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
        r = client.post("/v2/models/tiny-ner/infer", content=data, headers={**headers, "Content-Encoding": enc})
        assert r.status_code == 200 and r.json() == plain
    bad = client.post("/v2/models/tiny-ner/infer", content=gzip.compress(body)[:-12],
                      headers={**headers, "Content-Encoding": "gzip"})
    assert bad.status_code == 400 and "gzip" in bad.json()["error"]
    assert client.post("/v2/models/tiny-ner/infer", content=body,
                       headers={**headers, "Content-Encoding": "br"}).status_code == 400
    # a bomb: 40 KB on the wire, 40 MB inflated, against a 64 KiB limit
    bomb = gzip.compress(b"{" + b" " * 40_000_000)
    assert len(bomb) < 65536
    r = small.post("/v2/models/tiny-ner/infer", content=bomb, headers={"Content-Encoding": "gzip", "X-API-Key": "k1"})
    assert r.status_code == 413 and "MAX_UPLOAD_BYTES" in r.json()["error"]


HOSTILE = {
    "header length not a number": lambda b, h: (b, {**h, "Inference-Header-Content-Length": "12abc"}),
    "header length negative": lambda b, h: (b, {**h, "Inference-Header-Content-Length": "-5"}),
    "header length past the body": lambda b, h: (b, {**h, "Inference-Header-Content-Length": str(len(b) + 1)}),
    "header length huge": lambda b, h: (b, {**h, "Inference-Header-Content-Length": "9" * 40}),
    "header length cuts the JSON": lambda b, h: (b, {**h, "Inference-Header-Content-Length": "10"}),
    "body truncated": lambda b, h: (b[:-3], h),
    "trailing bytes": lambda b, h: (b + b"\0\0", h),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_framing_is_400(client, case):
    body, headers = binary_request([(bytes_tensor("TEXT", 2), lp(b"hello there", b"general"))])
    body, headers = HOSTILE[case](body, headers)
    r = client.post("/v2/models/tiny-ner/infer", content=body, headers=headers)
    assert r.status_code == 400, (case, r.status_code, r.text)
    assert isinstance(r.json()["error"], str) and r.json()["error"]


@pytest.mark.parametrize("tensor,chunk,expect", [
    ({"shape": [1, 1]}, lp(b"a")[:3], "length"),  # ends inside an element's length
    ({"shape": [1, 1]}, struct.pack("<I", 1000) + b"short", "claims 1000 bytes"),  # element length lies
    ({"shape": [1, 1]}, struct.pack("<I", 0xFFFFFFFF) + b"x", "claims"),  # element length overflows
    ({"shape": [2, 1]}, lp(b"only one"), "length"),  # fewer elements than the shape
    ({"shape": [1, 1]}, lp(b"a", b"b"), "left after"),  # more elements than the shape
    ({"shape": [2**62, 2**62]}, lp(b"a"), "more than"),  # element count overflows
    ({"shape": [-1, 1]}, lp(b"a"), "invalid shape"),
    ({"shape": [1, 1], "datatype": "FP32"}, b"\0\0\0", "needs 4"),  # fixed-size type, wrong byte count
    ({"shape": [1, 1], "datatype": "BF17"}, lp(b"a"), "unknown datatype"),
    ({"shape": [1, 1], "parameters": {"binary_data_size": -1}}, b"", "non-negative"),
    ({"shape": [1, 1], "parameters": {"binary_data_size": True}}, b"", "non-negative"),
    ({"shape": [1, 1], "parameters": {"binary_data_size": "5"}}, b"", "non-negative"),
    ({"shape": [1, 1], "parameters": {"binary_data_size": 2**64}}, b"", "runs past the body"),
    ({"shape": [1, 1], "parameters": {"binary_data_size": 50}}, lp(b"abc"), "runs past the body"),
    ({"shape": [1, 1], "data": ["x"]}, lp(b"x"), "both"),
    ({"shape": [1, 1]}, lp(b"\xff\xfe not utf-8"), "UTF-8"),
])
def test_hostile_tensors_are_400(client, tensor, chunk, expect):
    t = {"name": "TEXT", "datatype": "BYTES", **tensor}
    params = t.pop("parameters", None)
    tensors = [{**t, "parameters": params}] if params else [t]
    header = json.dumps({"inputs": tensors if params else
                         [{**tensors[0], "parameters": {"binary_data_size": len(chunk)}}]}).encode()
    r = client.post("/v2/models/tiny-ner/infer", content=header + chunk,
                    headers={"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 400, r.text
    assert expect in r.json()["error"], r.json()


def test_binary_without_header_and_media_rules(client):
    # binary_data_size in a JSON-only request
    r = client.post("/v2/models/tiny-ner/infer", json={"inputs": [
        {**bytes_tensor("TEXT", 1), "parameters": {"binary_data_size": 3}}]})
    assert r.status_code == 400 and "Inference-Header-Content-Length" in r.json()["error"]
    # raw bytes that are no image: sniffed like /v1 (415), one row of two named
    body, headers = binary_request([(bytes_tensor("TEXT", 2), lp(b"a b", b"c d")),
                                    (bytes_tensor("IMAGE", 2), lp(b"", b"definitely not an image"))])
    r = client.post(URL, content=body, headers=headers)
    assert r.status_code == 415 and "row 1" in r.json()["error"]
    # a decompression-bomb PNG header in a binary tensor: 413 as in /v1
    from tests.media import png_header_bytes

    body, headers = binary_request([(bytes_tensor("TEXT", 1), lp(b"a b")),
                                    (bytes_tensor("IMAGE", 1), lp(png_header_bytes(30000, 30000)))])
    r = client.post(URL, content=body, headers=headers)
    assert r.status_code == 413 and isinstance(r.json()["error"], str)
    # more rows than MAX_BATCH_ITEMS: refused before decoding
    body, headers = binary_request([(bytes_tensor("TEXT", 65), lp(*[b"x"] * 65))])
    r = client.post("/v2/models/tiny-ner/infer", content=body, headers=headers)
    assert r.status_code == 400 and "64" in r.json()["error"]


def test_every_v2_error_has_the_v2_shape(client, small):
    cases = [(client.get, "/v2/nope", 404), (client.post, "/v2/health/live", 405),
             (client.get, "/v2/models/tiny-ner/infer", 405), (client.delete, "/v2/models/tiny-ner", 405),
             (client.get, "/v2/models/nope/config", 404), (client.get, "/v2/models/nope/stats", 404),
             (client.get, "/v2/models/tiny-ner/versions/9/config", 400),
             (small.get, "/v2/models/tiny-ner", 401)]
    for call, path, status in cases:
        r = call(path)
        assert r.status_code == status, (path, r.text)
        body = r.json()
        assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"], (path, body)
    assert "/v2/nope" in client.get("/v2/nope").json()["error"]
    # the body limit, while streaming (no Content-Length) and from Content-Length
    big = b"x" * 70000
    r = small.post(URL, content=iter([big[:40000], big[40000:]]), headers={"X-API-Key": "k1"})
    assert r.status_code == 413 and isinstance(r.json()["error"], str)
    r = small.post(URL, content=big, headers={"X-API-Key": "k1"})
    assert r.status_code == 413 and isinstance(r.json()["error"], str)
    # /v1 keeps its own shape
    assert isinstance(client.get("/v1/nope").json()["error"], dict)
    assert isinstance(small.get("/v1/models").json()["error"], dict)


def test_openapi_documents_every_v2_route(client):
    spec = client.get("/openapi.json").json()
    paths = {p: ops for p, ops in spec["paths"].items() if p.startswith("/v2") and not p.startswith("/v2/repository")}
    expected = {"/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/stats"}
    for suffix in ("", "/ready", "/config", "/stats", "/infer"):
        expected |= {f"/v2/models/{{model}}{suffix}", f"/v2/models/{{model}}/versions/{{version}}{suffix}"}
    assert set(paths) == expected
    for path, ops in paths.items():
        for op in ops.values():
            assert "422" not in op["responses"], path  # no validation errors exist on these routes
            for status, resp in op["responses"].items():
                if status not in ("200", "400") or "error" in json.dumps(resp):
                    assert resp["content"]["application/json"]["schema"]["properties"]["error"]["type"] == "string"
    infer = paths["/v2/models/{model}/infer"]["post"]
    assert set(infer["requestBody"]["content"]) == {"application/json", "application/octet-stream"}
    assert set(infer["responses"]["200"]["content"]) == {"application/json", "application/octet-stream"}
    assert {"400", "404", "413", "415", "503", "504"} <= set(infer["responses"])
    assert paths["/v2/health/ready"]["get"]["responses"]["400"]

"""The stock tritonclient.grpc (sync and aio) against the gRPC front-end of a live server: health,
metadata, config, statistics, repository calls, inference with raw media bytes (same scores as /v1),
errors as gRPC status codes, deadlines, API keys, message size limits and hostile raw tensors."""
from __future__ import annotations

import asyncio
import json
import socket
import struct

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from tests.fixtures_app import app_repository  # noqa: F401 (fixture)
from tests.media import audio_bytes, image_bytes
from tests.test_app_live import Server, free_port

pytestmark = pytest.mark.slow
LABELS = ["negative", "neutral", "positive"]
TEXTS = ["Alice flew from Paris to Berlin", "bob lives in london"]


@pytest.fixture(scope="module")
def server(app_repository):  # noqa: F811
    s = grpc_server(app_repository, max_delay_ms=2)
    yield s
    s.stop()


def grpc_server(repo, **opts) -> Server:
    port = free_port()
    s = Server(repo, grpc_port=port, **opts)
    s.grpc_port = port
    return s


def grpc_url(server: Server) -> str:
    return f"127.0.0.1:{server.grpc_port}"


@pytest.fixture(scope="module")
def guarded(app_repository):  # noqa: F811
    """API key, 64 KiB message limit, every inference 300 ms slow."""
    s = grpc_server(app_repository, delay_ms=300, api_keys="k1", max_upload_bytes=65536)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    c = grpcclient.InferenceServerClient(grpc_url(server))
    yield c
    c.close()


def bytes_input(name: str, rows: list[bytes]) -> grpcclient.InferInput:
    t = grpcclient.InferInput(name, [len(rows), 1], "BYTES")
    t.set_data_from_numpy(np.array(rows, dtype=object).reshape(-1, 1))
    return t


def test_health_metadata_config_statistics(client, server):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny-ner") and client.is_model_ready("tiny-ner", "1")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "mmserve" and "binary_tensor_data" in meta["extensions"]
    m = client.get_model_metadata("tiny-classify", as_json=True)
    assert m["platform"] == "onnxruntime_onnx" and [t["name"] for t in m["inputs"]] == ["TEXT", "IMAGE", "AUDIO"]
    assert m["outputs"] == [{"name": "SCORES", "datatype": "FP32", "shape": ["-1", "3"]}]
    cfg = client.get_model_config("tiny-classify").config  # the ModelConfig protobuf itself
    assert cfg.name == "tiny-classify" and cfg.max_batch_size >= 1 and list(cfg.output[0].dims) == [3]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 2000
    # the same configuration as over HTTP
    http_cfg = httpx.get(f"{server.url}/v2/models/tiny-classify/config").json()
    assert http_cfg["max_batch_size"] == cfg.max_batch_size and http_cfg["name"] == cfg.name
    before = client.get_inference_statistics("tiny-ner").model_stats[0]
    client.infer("tiny-ner", [bytes_input("TEXT", [b"alice in paris"])])
    after = client.get_inference_statistics("tiny-ner").model_stats[0]
    assert after.inference_count == before.inference_count + 1
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    assert {s.name for s in client.get_inference_statistics().model_stats} == {"tiny-classify", "tiny-ner", "tiny-vqa"}
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {(r["name"], r["state"]) for r in index} == {("tiny-classify", "READY"), ("tiny-ner", "READY"),
                                                         ("tiny-vqa", "READY")}


def test_infer_raw_media_matches_v1(client, server):
    png, wav = image_bytes(pattern=4), audio_bytes(660.0)
    result = client.infer("tiny-classify", [bytes_input("TEXT", [t.encode() for t in TEXTS]),
                                            bytes_input("IMAGE", [png, b""]), bytes_input("AUDIO", [wav, b""])],
                          request_id="g-1")
    assert result.get_response().id == "g-1"
    scores = result.as_numpy("SCORES")
    assert scores.shape == (2, 3) and scores.dtype == np.float32
    refs = [httpx.post(f"{server.url}/v1/classify", data={"text": TEXTS[0], "top_k": "3"},
                       files={"image": ("a.png", png), "audio": ("a.wav", wav)}).json(),
            httpx.post(f"{server.url}/v1/classify", data={"text": TEXTS[1], "top_k": "3"}).json()]
    for row, ref in zip(scores, refs):
        for p in ref["predictions"]:
            assert float(row[LABELS.index(p["label"])]) == pytest.approx(p["score"], rel=1e-5, abs=1e-6)
    top = client.infer("tiny-classify", [bytes_input("TEXT", [TEXTS[1].encode()])],
                       outputs=[grpcclient.InferRequestedOutput("SCORES", class_count=1)]).as_numpy("SCORES")
    assert top[0][0].decode().split(":")[2] == refs[1]["predictions"][0]["label"]
    ents = client.infer("tiny-ner", [bytes_input("TEXT", [TEXTS[0].encode()])]).as_numpy("ENTITIES")
    assert json.loads(ents[0][0]) == httpx.post(f"{server.url}/v1/ner", json={"text": TEXTS[0]}).json()["entities"]
    # typed contents (no raw_input_contents) are accepted too
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(grpc_url(server)))
    req = pb.ModelInferRequest(model_name="tiny-classify")
    req.inputs.add(name="TEXT", datatype="BYTES", shape=[1, 1]).contents.bytes_contents.append(TEXTS[1].encode())
    resp = stub.ModelInfer(req)
    assert np.frombuffer(resp.raw_output_contents[0], "<f4") == pytest.approx(scores[1], rel=1e-6)


def test_errors_are_grpc_codes(client):
    text = [bytes_input("TEXT", [b"hello"])]
    cases = {
        "unknown model": (lambda: client.infer("tiny-zzz", text), "NOT_FOUND"),
        "metadata of unknown model": (lambda: client.get_model_metadata("tiny-zzz"), "NOT_FOUND"),
        "version not served": (lambda: client.get_model_config("tiny-ner", "9"), "INVALID_ARGUMENT"),
        "vqa without image": (lambda: client.infer("tiny-vqa", text), "INVALID_ARGUMENT"),
        "not an image": (lambda: client.infer("tiny-classify", text + [bytes_input("IMAGE", [b"nope"])]),
                         "INVALID_ARGUMENT"),
        "load refused": (lambda: client.load_model("tiny-ner"), "PERMISSION_DENIED"),
        "shared memory": (lambda: client.get_system_shared_memory_status(), "UNIMPLEMENTED"),
    }
    for what, (call, code) in cases.items():
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.status() == f"StatusCode.{code}", (what, str(info.value))
        assert str(info.value).startswith(f"[StatusCode.{code}] ") and len(info.value.message()) > 5


def _raw_request(raw: bytes, shape=(1, 1)) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="tiny-ner")
    req.inputs.add(name="TEXT", datatype="BYTES", shape=list(shape))
    req.raw_input_contents.append(raw)
    return req


@pytest.mark.parametrize("raw,shape,words", [
    (struct.pack("<I", 1000) + b"short", (1, 1), "claims 1000"),
    (struct.pack("<I", 0xFFFFFFFF), (1, 1), "claims"),
    (b"\x01\x00", (1, 1), "length"),
    (struct.pack("<I", 1) + b"ab", (1, 1), "left after"),
    (struct.pack("<I", 1) + b"a", (2**62, 2**62), "more than"),
])
def test_hostile_raw_tensors(server, raw, shape, words):
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(grpc_url(server)))
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(_raw_request(raw, shape), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in info.value.details()
    req = _raw_request(struct.pack("<I", 1) + b"a")
    req.raw_input_contents.append(b"extra")  # more raw contents than inputs
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(req, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_api_key_message_limit_and_deadline(guarded):
    url = grpc_url(guarded)
    anonymous = grpcclient.InferenceServerClient(url)
    with pytest.raises(InferenceServerException) as info:
        anonymous.is_server_live()
    assert info.value.status() == "StatusCode.UNAUTHENTICATED"
    with pytest.raises(InferenceServerException):
        anonymous.get_server_metadata(headers={"authorization": "Bearer wrong"})
    c = grpcclient.InferenceServerClient(url)
    key = {"authorization": "Bearer k1"}
    assert c.is_server_live(headers=key) and c.is_server_live(headers={"x-api-key": "k1"})
    # a message over MAX_UPLOAD_BYTES (64 KiB)
    with pytest.raises(InferenceServerException) as info:
        c.infer("tiny-ner", [bytes_input("TEXT", [b"x" * 70000])], headers=key)
    assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    # the client's deadline is the request's deadline (inference takes 300 ms here)
    with pytest.raises(InferenceServerException) as info:
        c.infer("tiny-ner", [bytes_input("TEXT", [b"alice"])], headers=key, client_timeout=0.1)
    assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert c.infer("tiny-ner", [bytes_input("TEXT", [b"alice"])], headers=key).as_numpy("ENTITIES").shape == (1, 1)


def test_aio_client_concurrent(server):
    async def main():
        c = grpcaio.InferenceServerClient(grpc_url(server))
        try:
            assert await c.is_server_ready()

            async def one(text: str):
                t = grpcaio.InferInput("TEXT", [1, 1], "BYTES")
                t.set_data_from_numpy(np.array([[text.encode()]], dtype=object))
                return (await c.infer("tiny-classify", [t])).as_numpy("SCORES")[0]

            return await asyncio.gather(*(one(t) for t in TEXTS * 8))
        finally:
            await c.close()

    rows = asyncio.run(main())
    for i in range(len(TEXTS)):
        for row in rows[i::len(TEXTS)]:
            np.testing.assert_allclose(row, rows[i], rtol=1e-5, atol=1e-6)


def test_busy_port_fails_start_up(app_repository):  # noqa: F811
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        app = create_app(Settings(repository=app_repository, host="127.0.0.1", grpc_port=port))
        with pytest.raises(RuntimeError, match="gRPC cannot bind"):
            with TestClient(app):
                pass

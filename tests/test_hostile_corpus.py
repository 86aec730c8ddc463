"""The hostile-input corpus (issue 14 item 3) against one live server over real sockets: every kind of bad or odd
input on every input path (multipart, JSON, batch, v2 JSON, v2 binary, gRPC, raw HTTP) gets a JSON answer (gRPC: a
status) below 500 whose message names the problem, or a correct 200 where the input is odd but valid; a good request
sent at the same moment gets the very answer it gets alone; the server stays up; slow clients are cut off."""
from __future__ import annotations

import base64
import gzip
import json
import select
import socket
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import grpc
import httpx
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from tests import hostile_media as hm
from tests.fixtures_app import app_repository  # noqa: F401 (fixture)
from tests.media import audio_bytes, image_bytes
from tests.test_app_live import Server, free_port

pytestmark = pytest.mark.slow
LIMIT = 4 * 1024 * 1024
GOOD = {"text": "alice flew from paris to berlin", "top_k": 3}


@pytest.fixture(scope="module")
def server(app_repository):  # noqa: F811
    port = free_port()
    s = Server(app_repository, grpc_port=port, max_delay_ms=2, max_upload_bytes=LIMIT, max_image_pixels=40_000_000,
               header_timeout_s=2, body_timeout_s=2, request_timeout_s=60, linger_s=30)
    s.grpc_port = port
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def alone(http):
    r = http.post("/v1/classify", json=GOOD)
    assert r.status_code == 200
    return r.json()


# ------------------------------------------------------------------------------------------------ senders
def multipart(field: str, data: bytes, **extra: str) -> Callable[[httpx.Client], httpx.Response]:
    return lambda c: c.post("/v1/classify", data={"text": "a picture", **extra},
                            files={field: (f"x.{field}", data, "application/octet-stream")})


def vqa(data: bytes) -> Callable[[httpx.Client], httpx.Response]:
    return lambda c: c.post("/v1/vqa", data={"question": "what colour?"}, files={"image": ("x", data)})


def as_json(path: str, body: Any, headers: dict | None = None) -> Callable[[httpx.Client], httpx.Response]:
    return lambda c: c.post(path, json=body, headers=headers)


def raw(path: str, content: Any, headers: dict) -> Callable[[httpx.Client], httpx.Response]:
    return lambda c: c.post(path, content=content, headers=headers)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def v2(inputs: list[dict], model: str = "tiny-classify", **extra) -> Callable[[httpx.Client], httpx.Response]:
    return lambda c: c.post(f"/v2/models/{model}/infer", json={"inputs": inputs, **extra})


def text_t(*values: str, shape=None) -> dict:
    return {"name": "TEXT", "datatype": "BYTES", "shape": shape or [len(values), 1], "data": list(values)}


def binary(header: dict, chunk: bytes, header_len: int | None = None) -> Callable[[httpx.Client], httpx.Response]:
    head = json.dumps(header).encode()
    return raw("/v2/models/tiny-classify/infer", head + chunk,
               {"Inference-Header-Content-Length": str(len(head) if header_len is None else header_len),
                "Content-Type": "application/octet-stream"})


def lp(*values: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def bin_text(chunk: bytes, shape=(1, 1)) -> Callable[[httpx.Client], httpx.Response]:
    return binary({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": list(shape),
                               "parameters": {"binary_data_size": len(chunk)}}]}, chunk)


def chunked(body: bytes) -> Callable[[httpx.Client], httpx.Response]:
    def gen():
        for i in range(0, len(body), 7):
            yield body[i:i + 7]
    return raw("/v1/classify", gen(), {"content-type": "application/json"})


def ok_200(check: Callable[[dict], bool] | None = None):
    return ("ok", check)


def bad(*words: str, status: tuple[int, ...] = (400, 413, 415, 422)):
    return ("bad", words, status)


PNG = image_bytes()
MB = 1024 * 1024

# name -> (sender, expectation); every kind is distinct input a client can send
HTTP_CASES: dict[str, tuple[Callable, Any]] = {
    # --- multipart images
    "image truncated png": (multipart("image", hm.truncated(PNG)), bad("truncated or corrupt")),
    "image truncated jpeg": (multipart("image", hm.truncated(image_bytes(fmt="JPEG"), 0.3)), bad("truncated or corrupt")),
    "image empty": (multipart("image", b""), bad("'image' is empty")),
    "image wrong magic (html)": (multipart("image", hm.html_as_image()), bad("expected an image")),
    "image is audio": (multipart("image", audio_bytes()), bad("expected an image")),
    "image polyglot gif/js": (multipart("image", hm.polyglot_gif_js()), bad("gif")),
    "image polyglot png+zip": (multipart("image", hm.polyglot_png_zip()), ok_200()),
    "image png bad crc": (multipart("image", hm.png_bad_crc()), bad("truncated or corrupt")),
    "image bomb png": (multipart("image", hm.png_header_bytes(100_000, 100_000)), bad("pixels", status=(413,))),
    "image bomb jpeg": (multipart("image", hm.jpeg_bomb()), bad("pixels", status=(413,))),
    "image bomb gif": (multipart("image", hm.gif_bomb()), bad("pixels", status=(413,))),
    "image bomb webp": (multipart("image", hm.webp_bomb()), bad("pixels", status=(413,))),
    "image bomb tiff": (multipart("image", hm.tiff_bomb()), bad("pixels", status=(413,))),
    "image huge real png": (multipart("image", hm.png_huge_real()), bad("pixels", status=(413,))),
    "image cmyk jpeg": (multipart("image", hm.cmyk_jpeg()), ok_200()),
    "image 16-bit png": (multipart("image", hm.png_16bit()), ok_200()),
    "image palette+transparency": (multipart("image", hm.palette_png_with_transparency()), ok_200()),
    "image animated gif": (multipart("image", hm.animated("GIF")), ok_200()),
    "image animated webp": (multipart("image", hm.animated("WEBP")), ok_200()),
    "image rgba png": (multipart("image", hm.rgba_png()), ok_200()),
    "image 1-bit bmp": (multipart("image", hm.one_bit_bmp()), ok_200()),
    "image exif orientation 6": (multipart("image", hm.exif_rotated_jpeg()), ok_200()),
    "image exif orientation 99": (multipart("image", hm.exif_garbage_orientation_jpeg()), ok_200()),
    "vqa image truncated": (vqa(hm.truncated(PNG)), bad("truncated or corrupt")),
    # --- multipart audio
    "audio wav lying length": (multipart("audio", hm.wav_lying_length()), ok_200()),
    "audio wav rate 0": (multipart("audio", hm.wav_rate(0)), bad("sample rate", "truncated or corrupt")),
    "audio wav rate 4 GHz": (multipart("audio", hm.wav_rate(4_000_000_000)), bad("sample rate", "SF_INFO")),
    "audio wav rate 1 Hz": (multipart("audio", hm.wav_rate(1)), bad("sample rate")),
    "audio wav 0 samples": (multipart("audio", hm.wav_zero_samples()), bad("no samples")),
    "audio wav header claims hours": (multipart("audio", hm.wav_multi_hour()), ok_200()),  # reads what is there
    "audio flac one hour": (multipart("audio", hm.flac_hours()), bad("long", status=(413,))),
    "audio wav NaN": (multipart("audio", hm.wav_nan()), bad("NaN or infinite")),
    "audio wav inf": (multipart("audio", hm.wav_inf()), bad("NaN or infinite")),
    "audio wav 8 channels": (multipart("audio", hm.wav_8_channels()), ok_200()),
    "audio flac truncated": (multipart("audio", hm.flac_truncated()), bad("truncated or corrupt")),
    "audio flac rate 0": (multipart("audio", hm.flac_lying_rate()), bad("sample rate", "truncated or corrupt")),
    "audio ogg truncated": (multipart("audio", hm.ogg_truncated()), bad("truncated or corrupt")),
    "audio ogg garbage": (multipart("audio", hm.ogg_garbage_after_magic()), bad("truncated or corrupt")),
    "audio is an image": (multipart("audio", PNG), bad("expected audio")),
    "audio empty": (multipart("audio", b""), bad("'audio' is empty")),
    # --- multipart form
    "form text invalid utf-8": (raw("/v1/classify", b'--b\r\nContent-Disposition: form-data; name="text"\r\n\r\n'
                                                    b"\xff\xfe bad\r\n--b--\r\n",
                                    {"content-type": "multipart/form-data; boundary=b"}), bad("utf-8", "text")),
    "form duplicate text fields": (raw("/v1/classify", b'--b\r\nContent-Disposition: form-data; name="text"\r\n\r\n'
                                                       b'one\r\n--b\r\nContent-Disposition: form-data; name="text"'
                                                       b"\r\n\r\ntwo\r\n--b--\r\n",
                                       {"content-type": "multipart/form-data; boundary=b"}), bad("text")),
    "form unknown field": (lambda c: c.post("/v1/classify", data={"text": "x", "colour": "red"}), bad("colour")),
    "form no boundary": (raw("/v1/classify", b"text=x", {"content-type": "multipart/form-data"}), bad("boundary",
                                                                                                      "multipart")),
    "form broken multipart": (raw("/v1/classify", b"--b\r\nnonsense", {"content-type": "multipart/form-data; boundary=b"}),
                              bad("multipart", "form")),
    "form image as text field": (lambda c: c.post("/v1/classify", data={"text": "x", "image": "not a file"}), bad("image")),
    # --- JSON
    "json text with NUL": (as_json("/v1/classify", {"text": "nul\x00inside"}), ok_200()),
    "json text 10 MB": (as_json("/v1/classify", {"text": "word " * (2 * MB)}), bad("MAX_UPLOAD_BYTES", "too long",
                                                                               "characters", status=(413, 422))),
    "json unknown field": (as_json("/v1/classify", {"text": "x", "colour": "red"}), bad("colour")),
    "json top_k string": (as_json("/v1/classify", {"text": "x", "top_k": "3"}), bad("top_k")),
    "json top_k negative": (as_json("/v1/classify", {"text": "x", "top_k": -1}), bad("top_k")),
    "json body is a list": (as_json("/v1/classify", [{"text": "x"}]), bad("invalid request", "object")),
    "json image not base64": (as_json("/v1/classify", {"text": "x", "image": "%%%"}), bad("base64")),
    "json audio data url of html": (as_json("/v1/classify", {"text": "x", "audio": "data:audio/wav;base64,"
                                                             + b64(hm.html_as_image())}), bad("expected audio")),
    "json text not a string": (as_json("/v1/classify", {"text": {"$ne": 1}}), bad("text")),
    "json wrong content type": (raw("/v1/classify", json.dumps(GOOD).encode(), {"content-type": "text/plain"}),
                                bad("content type", "content-type", status=(415, 422))),
    "json no content type": (raw("/v1/classify", json.dumps(GOOD).encode(), {}), bad("content", status=(415, 422))),
    "json gzip content-encoding": (raw("/v1/classify", gzip.compress(json.dumps(GOOD).encode()),
                                       {"content-type": "application/json", "content-encoding": "gzip"}),
                                   bad("encoding", "gzip", status=(400, 415))),
    "json chunked body": (chunked(json.dumps(GOOD).encode()), ok_200()),
    "ner emoji offsets": (as_json("/v1/ner", {"text": "Alice 👩‍🚀 flew to Paris 🇫🇷 today"}), ok_200("offsets")),
    "ner right-to-left offsets": (as_json("/v1/ner", {"text": "שלום Alice مرحبا Paris"}), ok_200("offsets")),
    "ner combining and zero-width": (as_json("/v1/ner", {"text": "Ali\u0301ce\u200b flew\u200f to Pa\u0308ris"}),
                                     ok_200("offsets")),
    "text only whitespace": (as_json("/v1/ner", {"text": " \t\n\u3000"}), bad("must not be empty")),
    # --- batch
    "batch too many items": (as_json("/v1/classify/batch", {"inputs": [{"text": "x"}] * 65}), bad("64")),
    "batch empty": (as_json("/v1/classify/batch", {"inputs": []}), bad("inputs")),
    "batch bad items stay alone": (as_json("/v1/classify/batch", {"inputs": [
        {"text": "x", "image": b64(hm.jpeg_bomb())}, {"text": ""}, {"text": "ok"}, {"text": "x", "audio": "!!"}]}),
        ok_200("batch")),
    "batch item not an object": (as_json("/v1/classify/batch", {"inputs": ["x", 3]}), bad("inputs")),
    # --- v2 JSON
    "v2 shape does not match data": (v2([text_t("a", "b", shape=[3, 1])]), bad("shape")),
    "v2 wrong datatype": (v2([{"name": "TEXT", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]), bad("BYTES")),
    "v2 unknown input": (v2([text_t("a"), {"name": "EVIL", "datatype": "BYTES", "shape": [1, 1], "data": ["x"]}]),
                         bad("EVIL")),
    "v2 no data": (v2([{"name": "TEXT", "datatype": "BYTES", "shape": [1, 1]}]), bad("data")),
    "v2 absurd shape": (v2([text_t("a", shape=[10 ** 18, 10 ** 18])]), bad("shape")),
    "v2 negative shape": (v2([text_t("a", shape=[-1, 1])]), bad("shape")),
    "v2 image not an image": (v2([text_t("a"), {"name": "IMAGE", "datatype": "BYTES", "shape": [1, 1],
                                                "data": [b64(b"MZ\x90\x00 windows exe")]}]), bad("IMAGE", "image")),
    "v2 unknown model": (v2([text_t("a")], model="..%2F..%2Fetc%2Fpasswd"), bad("model", status=(400, 404))),
    "v2 deflate body": (raw("/v2/models/tiny-classify/infer", zlib.compress(json.dumps({"inputs": [text_t("hi")]}).encode()),
                            {"content-type": "application/json", "content-encoding": "deflate"}), ok_200()),
    "v2 gzip bomb": (raw("/v2/models/tiny-classify/infer", gzip.compress(b" " * (64 * MB)),
                         {"content-type": "application/json", "content-encoding": "gzip"}),
                     bad("MAX_UPLOAD_BYTES", "too large", "exceeds", status=(413,))),
    "v2 corrupt gzip": (raw("/v2/models/tiny-classify/infer", b"\x1f\x8b\x08\x00garbage",
                            {"content-type": "application/json", "content-encoding": "gzip"}), bad("gzip", "compress")),
    # --- v2 binary
    "v2 binary length past body": (binary({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1, 1],
                                                       "parameters": {"binary_data_size": 1000}}]}, lp(b"hi")),
                                   bad("binary")),
    "v2 binary header length huge": (binary({"inputs": [text_t("x")]}, b"", header_len=10 ** 30), bad("header")),
    "v2 binary element length lies": (bin_text(struct.pack("<I", 10 ** 6) + b"short"), bad("claims")),
    "v2 binary invalid utf-8 text": (bin_text(lp(b"\xff\xfe\xfd")), bad("utf-8", "UTF-8")),
}


def check_http(name: str, r: httpx.Response, expect: Any) -> None:
    assert r.status_code < 500, (name, r.status_code, r.text[:300])
    assert r.headers.get("content-type", "").startswith("application/json"), (name, r.headers, r.text[:200])
    body = r.json()
    if expect[0] == "ok":
        assert r.status_code == 200, (name, r.text[:300])
        if expect[1] == "offsets":
            text = json.loads(r.request.content)["text"]
            for e in body["entities"]:
                assert 0 <= e["start"] < e["end"] <= len(text) and text[e["start"]:e["end"]] == e["text"], (name, e)
        elif expect[1] == "batch":
            got = [x["status"] for x in body["results"]]
            assert got == [413, 422, 200, 422], (name, body)
        return
    _, words, statuses = expect
    assert r.status_code in statuses, (name, r.status_code, r.text[:300])
    error = body["error"]
    message = json.dumps(error) if isinstance(error, dict) else error
    assert any(w.lower() in message.lower() for w in words), (name, message[:300])


def assert_good(http: httpx.Client, alone: dict) -> None:
    r = http.post("/v1/classify", json=GOOD)
    assert r.status_code == 200, r.text
    got = r.json()
    assert [p["label"] for p in got["predictions"]] == [p["label"] for p in alone["predictions"]]
    for p, q in zip(got["predictions"], alone["predictions"]):
        assert p["score"] == pytest.approx(q["score"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", list(HTTP_CASES))
def test_http_corpus(server, http, alone, name):
    send, expect = HTTP_CASES[name]
    with httpx.Client(base_url=server.url, timeout=120) as own, ThreadPoolExecutor(2) as pool:
        hostile = pool.submit(send, own)
        good = pool.submit(assert_good, http, alone)
        check_http(name, hostile.result(), expect)
        good.result()
    assert server.proc.poll() is None


# ------------------------------------------------------------------------------------------------ raw sockets
def raw_exchange(server: Server, data: bytes, timeout: float = 60) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as s:
        s.sendall(data)  # every request says Connection: close; the server ends the exchange
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def status_and_json(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body) if body else {}


def request_head(extra: bytes, body: bytes = b"{}") -> bytes:
    return (b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + extra
            + b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)


RAW_CASES = {
    "header flood (2000 headers)": request_head(b"".join(b"X-F%d: y\r\n" % i for i in range(2000))),
    "one 200 KB header": request_head(b"X-Big: " + b"a" * 200_000 + b"\r\n"),
    "bad request line": b"GARBAGE / HTTP/9.9\r\n\r\n",
    "content-length lies (short body)": request_head(b"", body=b'{"te').replace(b"Content-Length: 4",
                                                                                b"Content-Length: 4000"),
    "negative content-length": request_head(b"").replace(b"Content-Length: 2", b"Content-Length: -2"),
    "control chars in header": request_head(b"X-Request-ID: a\x01b\r\n", json.dumps(GOOD).encode()),
    "script in request id": request_head(b"X-Request-ID: <script>alert(1)</script>" + b"x" * 500 + b"\r\n",
                                         json.dumps(GOOD).encode()),
}


@pytest.mark.parametrize("name", list(RAW_CASES))
def test_raw_http_corpus(server, http, alone, name):
    with ThreadPoolExecutor(2) as pool:
        answer = pool.submit(raw_exchange, server, RAW_CASES[name])
        good = pool.submit(assert_good, http, alone)
        out = answer.result()
        good.result()
    assert server.proc.poll() is None
    if name == "content-length lies (short body)":  # the body never completes: closed after BODY_TIMEOUT_S
        assert out == b"", out[:200]
        return
    status, body = status_and_json(out)
    if name == "script in request id":  # answered, with a request id of our own making
        assert status == 200 and b"<script>" not in out.partition(b"\r\n\r\n")[0], out[:400]
        return
    assert 400 <= status < 500, out[:300]
    assert "error" in body or out.startswith(b"HTTP/1.1 4"), out[:300]


# ------------------------------------------------------------------------------------------------ slow clients
def slow_client(server: Server, parts: list[bytes], gap: float = 0.5) -> tuple[bytes, int]:
    """Send `parts` one per `gap` seconds until the server answers or closes; (what it answered, parts sent)."""
    sent = 0
    out = b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        for p in parts:
            if select.select([s], [], [], gap)[0]:  # the server spoke (or closed): stop trickling
                break
            try:
                s.sendall(p)
            except OSError:  # closed while we were sending
                break
            sent += 1
        try:
            while chunk := s.recv(65536):
                out += chunk
        except OSError:
            pass
    return out, sent


@pytest.mark.parametrize("kind", ["head one byte a second", "body one byte a second", "connect and say nothing"])
def test_slow_clients_are_cut_off_without_holding_the_server(server, http, alone, kind):
    head = request_head(b"", body=json.dumps(GOOD).encode())
    if kind == "head one byte a second":
        parts = [bytes([b]) for b in head]
    elif kind == "body one byte a second":
        h, _, body = head.partition(b"\r\n\r\n")
        parts = [h + b"\r\n\r\n"] + [bytes([b]) for b in body]
    else:
        parts = [b""] * 200
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(slow_client, server, parts)
        for _ in range(3):  # the server keeps answering others while the slow client trickles
            assert_good(http, alone)
        out, sent = slow.result()
    assert sent < len(parts), f"{kind}: the server never closed the connection"
    if kind != "body one byte a second":
        status, body = status_and_json(out)
        assert status == 408 and "HEADER_TIMEOUT_S" in body["error"]["message"]
    assert server.proc.poll() is None


# ------------------------------------------------------------------------------------------------ gRPC
def grpc_req(model: str = "tiny-classify", text: bytes | None = b"hello", **media: bytes) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    if text is not None:
        req.inputs.add(name="TEXT", datatype="BYTES", shape=[1, 1])
        req.raw_input_contents.append(lp(text))
    for name, data in media.items():
        req.inputs.add(name=name, datatype="BYTES", shape=[1, 1])
        req.raw_input_contents.append(lp(data))
    return req


def grpc_shape_lie() -> pb.ModelInferRequest:
    req = grpc_req()
    req.inputs[0].shape[:] = [5, 1]
    return req


def grpc_raw_lie() -> pb.ModelInferRequest:
    req = grpc_req()
    req.raw_input_contents[0] = struct.pack("<I", 999) + b"x"
    return req


def grpc_typed_fp32_text() -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="tiny-classify")
    req.inputs.add(name="TEXT", datatype="FP32", shape=[1, 1]).contents.fp32_contents.append(1.0)
    return req


GRPC_CASES: dict[str, tuple[Callable[[], pb.ModelInferRequest], str, str]] = {
    "grpc unknown model": (lambda: grpc_req("nope/../../x"), "NOT_FOUND", "nope"),
    "grpc no inputs": (lambda: pb.ModelInferRequest(model_name="tiny-classify"), "INVALID_ARGUMENT", "inputs"),
    "grpc invalid utf-8 text": (lambda: grpc_req(text=b"\xff\xfe"), "INVALID_ARGUMENT", "UTF-8"),
    "grpc image bomb": (lambda: grpc_req(IMAGE=hm.gif_bomb()), "RESOURCE_EXHAUSTED", "pixels"),
    "grpc truncated image": (lambda: grpc_req(IMAGE=hm.truncated(PNG)), "INVALID_ARGUMENT", "truncated"),
    "grpc NaN audio": (lambda: grpc_req(AUDIO=hm.wav_nan()), "INVALID_ARGUMENT", "NaN"),
    "grpc shape does not match": (grpc_shape_lie, "INVALID_ARGUMENT", "5 element(s) expected"),
    "grpc raw length lies": (grpc_raw_lie, "INVALID_ARGUMENT", "claims"),
    "grpc wrong datatype": (grpc_typed_fp32_text, "INVALID_ARGUMENT", "BYTES"),
    "grpc message over the limit": (lambda: grpc_req(IMAGE=b"\x89PNG" + bytes(LIMIT + 10)), "RESOURCE_EXHAUSTED", ""),
}


@pytest.mark.parametrize("name", list(GRPC_CASES))
def test_grpc_corpus(server, stub, http, alone, name):
    make, code, words = GRPC_CASES[name]
    with ThreadPoolExecutor(2) as pool:
        good = pool.submit(assert_good, http, alone)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(make(), timeout=120)
        good.result()
    assert info.value.code().name == code, (name, info.value.code(), info.value.details())
    assert words.lower() in (info.value.details() or "").lower(), (name, info.value.details())
    assert server.proc.poll() is None


def test_corpus_covers_at_least_sixty_kinds_and_the_server_is_still_up(server, http, alone):
    kinds = len(HTTP_CASES) + len(RAW_CASES) + len(GRPC_CASES) + 3
    assert kinds >= 60, kinds
    assert_good(http, alone)
    assert httpx.get(server.url + "/readyz").status_code == 200

"""Oversize bodies against a real uvicorn server over real sockets: every client reads a JSON 413, none sees a
connection reset (the server answers, then reads and discards the rest of the body before closing)."""
from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
import uuid

import pytest

from tests.fixtures_app import app_repository  # noqa: F401 (fixture)
from tests.test_app_live import Server

pytestmark = pytest.mark.slow
MB = 1024 * 1024
LIMIT = 20 * MB  # the default MAX_UPLOAD_BYTES


@pytest.fixture(scope="module")
def server(app_repository):  # noqa: F811
    # generous linger bounds: a loaded machine may take a while to receive 60 MB; nothing here measures time
    s = Server(app_repository, max_upload_bytes=LIMIT, linger_s=300, request_timeout_s=120)
    yield s
    s.stop()


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    for k, (filename, data) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{filename}"\r\n'
                     f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def big_image(size: int) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + bytes(size - 8)


def urllib_post(url: str, data, content_type: str) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:  # a status >= 400 with its body: what we want to see
        return exc.code, json.loads(exc.read())


def chunks(data: bytes, size: int = 256 * 1024):
    for i in range(0, len(data), size):
        yield data[i:i + size]


def assert_413(status: int, body: dict) -> None:
    assert status == 413, body
    assert body["error"]["code"] == "payload_too_large" and "MAX_UPLOAD_BYTES" in body["error"]["message"]


def assert_still_serving(server: Server) -> None:
    status, body = urllib_post(server.url + "/v1/classify", json.dumps({"text": "still here"}).encode(),
                               "application/json")
    assert status == 200 and body["model"] == "tiny-classify"


def test_60mb_multipart_image_with_content_length_gets_413_urllib(server):
    body, ctype = multipart({"text": "a big picture"}, {"image": ("big.png", big_image(60 * MB))})
    assert_413(*urllib_post(server.url + "/v1/classify", body, ctype))  # urllib sends it all before reading
    assert_still_serving(server)


def test_60mb_multipart_image_chunked_gets_413_urllib(server):
    body, ctype = multipart({"text": "a big picture"}, {"image": ("big.png", big_image(60 * MB))})
    assert_413(*urllib_post(server.url + "/v1/classify", chunks(body), ctype))  # no Content-Length: streamed
    assert_still_serving(server)


@pytest.mark.parametrize("path", ["/v1/classify", "/v1/classify/batch"])
@pytest.mark.parametrize("stream", [False, True], ids=["content-length", "chunked"])
def test_25mb_json_body_gets_413_urllib(server, path, stream):
    record = {"text": "x" * (25 * MB)}
    body = json.dumps({"inputs": [record]} if path.endswith("batch") else record).encode()
    assert_413(*urllib_post(server.url + path, chunks(body) if stream else body, "application/json"))
    assert_still_serving(server)


def test_60mb_upload_gets_413_http_client(server):
    body, ctype = multipart({"text": "a big picture"}, {"image": ("big.png", big_image(60 * MB))})
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
    try:
        conn.request("POST", "/v1/classify", body=body, headers={"Content-Type": ctype})
        r = conn.getresponse()
        assert_413(r.status, json.loads(r.read()))
        assert r.getheader("Connection") == "close"
    finally:
        conn.close()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_60mb_upload_gets_413_curl(server, tmp_path):
    image = tmp_path / "big.png"
    image.write_bytes(big_image(60 * MB))
    out = subprocess.run(["curl", "-sS", "--max-time", "300", "-o", "-", "-w", "\n%{http_code}",
                          server.url + "/v1/classify", "-F", "text=a big picture", "-F", f"image=@{image}"],
                         capture_output=True, text=True, timeout=320)
    assert out.returncode == 0, out.stderr  # curl reports a reset or a broken pipe as an error
    text, status = out.stdout.rsplit("\n", 1)
    assert_413(int(status), json.loads(text))


def test_expect_100_continue_over_the_limit_gets_413_before_any_body(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        s.sendall(f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {LIMIT + 1}\r\nExpect: 100-continue\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413"), head  # not 100 Continue: the client need not send the body
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        while len(rest) < length:
            chunk = s.recv(65536)
            assert chunk
            rest += chunk
        assert json.loads(rest)["error"]["code"] == "payload_too_large"


def test_expect_100_continue_within_the_limit_is_honoured(server):
    body = json.dumps({"text": "small"}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        s.sendall(f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n".encode())
        interim = s.recv(65536)
        assert interim.startswith(b"HTTP/1.1 100"), interim
        s.sendall(body)
        data = interim.partition(b"\r\n\r\n")[2]
        while chunk := s.recv(65536):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200"), data[:200]

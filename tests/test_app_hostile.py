"""Hostile input through the real app (TestClient): JSON the parser cannot take is a 400 on every route that
parses JSON, and an uploaded part of zero bytes is refused by name, in every input form."""
from __future__ import annotations

import base64
import json

import pytest

from app.core.errors import InvalidInput, InvalidJson
from app.core.items import Item
from app.core.jsonbody import MAX_JSON_DEPTH, parse_json
from app.core.preprocess import check_input
from app.tasks import get_task
from tests.fixtures_app import app_repository  # noqa: F401 (fixture)
from tests.media import audio_bytes, image_bytes
from tests.test_app_api import make_client, wait_ready


@pytest.fixture(scope="module")
def client(app_repository):  # noqa: F811
    with make_client(app_repository, max_delay_ms=2) as c:
        wait_ready(c)
        yield c


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


JSON = {"content-type": "application/json"}
V2_INFER = "/v2/models/tiny-classify/infer"


# -------------------------------------------------------------------------------- JSON the parser cannot take
def test_parse_json_limits_depth_and_names_the_problem():
    assert parse_json(nested(MAX_JSON_DEPTH)) == json.loads(nested(MAX_JSON_DEPTH))
    wide = json.dumps({"a": [[1]] * 1000, "b": {"c": [{"d": "[[[[[["}]}}).encode()  # many brackets, shallow
    assert parse_json(wide) == json.loads(wide)
    for raw in (nested(MAX_JSON_DEPTH + 1), nested(5000), b'{"a": ' * 300 + b"1" + b"}" * 300):
        with pytest.raises(InvalidJson, match="nested deeper than"):
            parse_json(raw)
    for raw, what in ((b"{not json", "Expecting"), (b'{"text": "\xff\xfe"}', "utf-8"),
                      (b'{"top_k": ' + b"9" * 5000 + b"}", "digits"), (b"", "Expecting value")):
        with pytest.raises(InvalidJson, match=what):
            parse_json(raw)


@pytest.mark.parametrize("path", ["/v1/classify", "/v1/classify/batch", "/v1/ner", "/v1/ner/batch", "/v1/vqa",
                                  "/v1/vqa/batch", V2_INFER])
@pytest.mark.parametrize("body", [nested(5000), b'{"text": ' * 5000 + b'"x"' + b"}" * 5000, nested(500)])
def test_deeply_nested_json_is_400_on_every_json_route(client, path, body):
    r = client.post(path, content=body, headers=JSON)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    message = error if isinstance(error, str) else error["message"]
    assert "nested deeper than 64 levels" in message
    if path.startswith("/v1"):
        assert error["code"] == "invalid_json"


@pytest.mark.parametrize("path", ["/v1/classify", "/v1/classify/batch", V2_INFER])
@pytest.mark.parametrize("body", [b"{not json", b'{"text": "\xff"}', b'{"top_k": ' + b"1" * 5000 + b"}"])
def test_any_json_the_parser_cannot_take_is_400(client, path, body):
    r = client.post(path, content=body, headers=JSON)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    message = error if isinstance(error, str) else error["message"]
    assert message.startswith("body is not valid JSON")


def test_valid_json_still_answers_after_hostile_bodies(client):
    client.post("/v1/classify/batch", content=nested(5000), headers=JSON)
    assert client.post("/v1/classify", json={"text": "fine"}).status_code == 200
    r = client.post("/v1/classify/batch", json={"inputs": [{"text": "one"}, {"text": ""}]})
    assert r.status_code == 200 and [x["status"] for x in r.json()["results"]] == [200, 422]
    r = client.post("/v1/classify/batch", json={"inputs": "nope"})  # valid JSON, wrong shape: still 422
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"


# -------------------------------------------------------------------------------- zero-byte uploads
@pytest.mark.parametrize("field", ["image", "audio"])
def test_zero_byte_multipart_upload_is_refused_by_name(client, field):
    r = client.post("/v1/classify", data={"text": "x"}, files={field: (f"empty.{field}", b"", "application/octet-stream")})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["message"].startswith(f"'{field}' is empty (0 bytes)")


def test_html_form_without_a_chosen_file_is_no_file(client):
    # what a browser sends for an <input type=file> left empty: a part with filename="" and no bytes
    body = (b'--b\r\nContent-Disposition: form-data; name="text"\r\n\r\nx\r\n'
            b'--b\r\nContent-Disposition: form-data; name="image"; filename=""\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n\r\n--b--\r\n")
    r = client.post("/v1/classify", content=body, headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("field", ["image", "audio", "top_k", "timeout_ms", "model"])
def test_empty_form_fields_are_refused_by_name(client, field):
    r = client.post("/v1/classify", data={"text": "x", field: ""})
    assert r.status_code == 422 and f"'{field}'" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("field", ["image", "audio"])
@pytest.mark.parametrize("value", ["", "data:application/octet-stream;base64,"])
def test_zero_byte_base64_media_is_refused_by_name(client, field, value):
    r = client.post("/v1/classify", json={"text": "x", field: value})
    assert r.status_code == 422 and f"'{field}' is empty" in r.json()["error"]["message"]
    r = client.post("/v1/classify/batch", json={"inputs": [{"text": "x", field: value}, {"text": "y"}]})
    results = r.json()["results"]
    assert [x["status"] for x in results] == [422, 200] and f"'{field}'" in results[0]["error"]["message"]


def test_zero_byte_media_in_v2_is_refused_by_name(client):
    tensors = [{"name": "TEXT", "datatype": "BYTES", "shape": [1, 1], "data": ["x"]},
               {"name": "IMAGE", "datatype": "BYTES", "shape": [1, 1], "data": ["data:image/png;base64,"]}]
    r = client.post(V2_INFER, json={"inputs": tensors})
    assert r.status_code == 400 and "'IMAGE' is empty" in r.json()["error"]


def test_core_refuses_zero_byte_media_whatever_the_front_end(client):
    registry = client.app.state.service.registry
    for model, task_name, field in (("tiny-classify", "classify", "image"), ("tiny-classify", "classify", "audio"),
                                    ("tiny-vqa", "vqa", "image")):
        entry, task = registry.entries[model], get_task(task_name)
        item = Item(text="what is it?", **{field: b""})
        with pytest.raises(InvalidInput, match=f"'{field}' is empty"):
            check_input(entry, task, item)
        check_input(entry, task, Item(text="what is it?", image=image_bytes()))  # the same with bytes passes
    audio = Item(text="x", audio=audio_bytes())
    check_input(registry.entries["tiny-classify"], get_task("classify"), audio)

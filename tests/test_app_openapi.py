"""The OpenAPI document describes the service: /v1 request bodies written from the served models (what each one
needs and takes), the statuses the routes really answer with the error schema, probes with their JSON bodies.
(`make fuzz` runs schemathesis over it against a live server.)"""
from __future__ import annotations

import pytest

from tests.fixtures_app import app_repository  # noqa: F401 (fixture)
from tests.test_app_api import make_client, wait_ready


@pytest.fixture(scope="module")
def served(app_repository):  # noqa: F811
    with make_client(app_repository, max_delay_ms=2) as c:
        wait_ready(c)
        yield c, c.get("/openapi.json").json()


def body_schema(doc: dict, path: str, ctype: str = "application/json") -> dict:
    return doc["paths"][path]["post"]["requestBody"]["content"][ctype]["schema"]


def test_request_bodies_say_what_each_served_model_needs_and_takes(served):
    _, doc = served
    for path, needs, takes in (("/v1/classify", ["text"], {"text", "image", "audio"}),
                               ("/v1/ner", ["text"], {"text"}),
                               ("/v1/vqa", ["question", "image"], {"question", "image"})):
        for ctype in ("application/json", "multipart/form-data"):
            schema = body_schema(doc, path, ctype)
            assert schema["required"] == needs, (path, ctype)
            assert set(schema["properties"]) == takes | {"model", "top_k", "timeout_ms"}
            assert schema["additionalProperties"] is False
        model = body_schema(doc, path)["properties"]["model"]["anyOf"][0]
        assert model["enum"] == [f"tiny-{path.rsplit('/', 1)[1]}", ""]  # only the model of this task
        batch = body_schema(doc, path + "/batch")
        assert batch["properties"]["inputs"]["maxItems"] == 64 and "needs" in batch["description"]
    text = body_schema(doc, "/v1/ner")["properties"]["text"]
    assert text["minLength"] == 1 and "pattern" in text["not"]  # blank text is refused
    image = body_schema(doc, "/v1/vqa", "multipart/form-data")["properties"]["image"]
    assert image["format"] == "binary" and image["minLength"] == 1  # an empty file is refused
    assert doc["paths"]["/v1/models/{name}"]["get"]["parameters"][0]["schema"]["enum"] == [
        "tiny-classify", "tiny-ner", "tiny-vqa"]


def test_every_documented_example_is_answered_200(served):
    client, doc = served
    for path in ("/v1/classify", "/v1/ner", "/v1/vqa"):
        for route in (path, path + "/batch"):
            examples = doc["paths"][route]["post"]["requestBody"]["content"]["application/json"]["examples"]
            assert examples
            for name, example in examples.items():
                r = client.post(route, json=example["value"])
                assert r.status_code == 200, (route, name, r.text)
                if route.endswith("batch"):
                    assert {x["status"] for x in r.json()["results"]} == {200}, (route, name, r.text)


def test_statuses_the_routes_answer_are_listed_with_the_error_schema(served):
    _, doc = served
    for path in ("/v1/classify", "/v1/ner/batch"):
        responses = doc["paths"][path]["post"]["responses"]
        assert {"200", "400", "401", "404", "413", "415", "422", "503", "504"} <= set(responses)
        error = responses["422"]["content"]["application/json"]["schema"]
        assert error["required"] == ["error"] and error["properties"]["error"]["required"] == ["code", "message"]
    ready = doc["paths"]["/readyz"]["get"]["responses"]
    assert set(ready) >= {"200", "503"}
    assert ready["503"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Readiness"}
    assert "text/plain" in next(iter(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]))
    assert "401" in doc["paths"]["/v1/models"]["get"]["responses"]


def test_probes_answer_json_matching_their_schema(served):
    client, doc = served
    r = client.get("/healthz")
    assert r.headers["content-type"] == "application/json" and r.json() == {"status": "ok"}
    r = client.get("/readyz")
    readiness = doc["components"]["schemas"]["Readiness"]
    assert r.headers["content-type"] == "application/json" and set(readiness["required"]) <= set(r.json())
    client.app.state.service.registry.leaving = True  # SIGTERM seen: not ready, same body shape
    try:
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["draining"] is True and r.json()["ready"] is False
    finally:
        client.app.state.service.registry.leaving = False


def test_the_document_follows_the_served_set(app_repository, tmp_path):  # noqa: F811
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(app_repository / "tiny-ner", repo / "tiny-ner")
    with make_client(repo) as c:
        wait_ready(c)
        doc = c.get("/openapi.json").json()
        assert body_schema(doc, "/v1/ner")["title"] == "tiny-ner request"
        assert "required" not in body_schema(doc, "/v1/classify")  # nobody serves it: the generic body (404)

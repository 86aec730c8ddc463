"""Security basics (issue 14 item 6): API keys compared in constant time and never logged, request ids sanitised
before they are echoed or logged (HTTP and gRPC), model names and versions from requests never become paths, and
a runtime file (TorchScript is code) is loaded only from a sha256-checked version's own listed files."""
from __future__ import annotations

import json
import logging
import shutil

import pytest

from app import runtime
from app.core.security import key_digests, key_matches, request_id
from models.manifest import FormatInfo, hash_directory, read_manifest
from tests.fixtures_app import app_repository  # noqa: F401 (fixture)
from tests.test_app_api import make_client, wait_ready

KEY, OTHER = "s3cret-key-0123456789", "another-key"


def test_key_matches_every_key_and_nothing_else():
    digests = key_digests([KEY, OTHER, "ключ"])
    assert all(len(d) == 32 for d in digests)  # fixed length: the compare leaks no key length
    for good in (KEY, OTHER, "ключ"):
        assert key_matches(good, digests)
    for bad in (None, "", KEY[:-1], KEY + "x", KEY.upper(), " " + KEY, "ключ ", "\udcff"):
        assert not key_matches(bad, digests)
    assert not key_matches(KEY, [])


def test_key_compare_is_constant_time_per_key_with_no_early_exit(monkeypatch):
    import app.core.security as sec

    calls = []
    real = sec.hmac.compare_digest
    monkeypatch.setattr(sec.hmac, "compare_digest", lambda a, b: calls.append((len(a), len(b))) or real(a, b))
    digests = key_digests([KEY, OTHER, "third"])
    assert key_matches(KEY, digests)  # the first key matches, and all three are still compared
    assert calls == [(32, 32)] * 3


def test_api_keys_never_reach_the_logs(app_repository, caplog):  # noqa: F811
    caplog.set_level(logging.DEBUG)
    with make_client(app_repository, api_keys=f"{KEY},{OTHER}", max_delay_ms=2) as c:
        wait_ready(c)
        assert c.post("/v1/classify", json={"text": "x"}).status_code == 401
        assert c.post("/v1/classify", json={"text": "x"}, headers={"X-API-Key": "wrong-" + KEY}).status_code == 401
        r = c.post("/v1/classify", json={"text": "x"}, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200
        assert c.post("/v2/models/tiny-ner/infer", json={"inputs": []}, headers={"X-API-Key": OTHER}).status_code == 400
    text = caplog.text + json.dumps([r.__dict__ for r in caplog.records], default=str)
    assert "starting mmserve" in caplog.text  # the settings were logged ...
    assert KEY not in text and OTHER not in text  # ... masked, and no request logged a key


@pytest.fixture(scope="module")
def client(app_repository):  # noqa: F811
    with make_client(app_repository, max_delay_ms=2) as c:
        wait_ready(c)
        yield c


@pytest.mark.parametrize("given", ["<script>alert(1)</script>", "a b", "x" * 129, "id\u2028forged", "ä", "a\tb",
                                   '"quoted"', "../../etc"])
def test_a_request_id_that_is_not_sane_is_replaced_not_echoed_or_logged(client, caplog, given):
    caplog.set_level(logging.INFO)
    r = client.post("/v1/classify", json={"text": "x"}, headers={"X-Request-ID": given.encode("utf-8")})
    assert r.status_code == 200
    echoed = r.headers["x-request-id"]
    assert echoed != given and len(echoed) == 32 and int(echoed, 16) >= 0
    assert all(getattr(rec, "request_id", "-") != given for rec in caplog.records)


def test_a_sane_request_id_is_kept(client):
    for given in ("abc-123", "trace:01HXYZ.span_7", "x" * 128):
        assert client.post("/v1/classify", json={"text": "x"}, headers={"X-Request-ID": given}).headers[
            "x-request-id"] == given
    assert request_id("ok.id") == "ok.id"
    for bad in (None, "", "new\nline", "a\r\nX-Injected: 1", "x" * 129):
        assert request_id(bad) != bad and len(request_id(bad)) == 32


@pytest.mark.parametrize("name", ["../tiny-ner", "tiny-ner/../tiny-ner", "/etc/passwd", ".tmp-export-123",
                                  "tiny-ner\x00", "TINY-NER", "..", "%2e%2e"])
def test_model_names_from_requests_never_become_paths(client, name):
    r = client.post("/v1/ner", json={"text": "alice", "model": name})
    assert r.status_code in (404, 422) and r.json()["error"]["code"] in ("model_not_found", "invalid_request"), r.text


@pytest.mark.parametrize("path", ["/v2/models/..%2Ftiny-ner/infer", "/v2/models/.tmp-export-123",
                                  "/v2/models/tiny-ner/versions/..%2F1", "/v2/models/tiny-ner/versions/1.0/ready",
                                  "/v2/models/tiny-ner/versions/-1", "/v2/models/tiny-ner/versions/99999999999999999999"])
def test_model_names_and_versions_in_v2_paths_are_checked(client, path):
    r = client.get(path) if not path.endswith("infer") else client.post(path, json={"inputs": []})
    assert 400 <= r.status_code < 500, (path, r.status_code, r.text)
    if r.content:
        assert "error" in r.json()


def test_torchscript_is_loaded_only_from_a_sha256_checked_version(app_repository, tmp_path, monkeypatch):  # noqa: F811
    """A version whose model.pt was altered after export is refused before anything loads it."""
    repo = tmp_path / "repo"
    version = repo / "tiny-ner" / "1"
    shutil.copytree(app_repository / "tiny-ner" / "1", version)
    (version / "model.pt").write_bytes(b"PK\x03\x04 not the exported module")
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["formats"]["torchscript"] = {"file": "model.pt", "opset": None, "size_bytes": 30, "export_seconds": 0.0}
    manifest["files"] = {k: v for k, v in hash_directory(version).items() if k != "manifest.json"}
    (version / "manifest.json").write_text(json.dumps(manifest))
    (version / "model.pt").write_bytes(b"PK\x03\x04 altered after the hashes were written")
    loaded = []
    monkeypatch.setattr(runtime, "TorchScriptRuntime", lambda *a, **k: loaded.append(a) or pytest.fail("loaded"))
    with make_client(repo, backend="torchscript") as c:
        body = c.get("/readyz").json()
        for _ in range(200):
            if body["models"].get("tiny-ner") == "failed":
                break
            body = c.get("/readyz").json()
        assert body["models"]["tiny-ner"] == "failed"
        assert "sha256 mismatch" in body["failed"]["tiny-ner"]
    assert loaded == []


@pytest.mark.parametrize("file,why", [("../model.pt", "not a file name"), ("/etc/passwd", "not a file name"),
                                      ("unlisted.pt", "has no sha256")])
def test_a_runtime_file_outside_the_checked_files_is_refused(app_repository, file, why, monkeypatch):  # noqa: F811
    directory = app_repository / "tiny-ner" / "1"
    manifest = read_manifest(directory)
    manifest.formats["torchscript"] = FormatInfo(file=file, opset=None, size_bytes=1, export_seconds=0.0)
    monkeypatch.setattr(runtime, "TorchScriptRuntime", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(RuntimeError, match=why):
        runtime.create_runtime("torchscript", directory, manifest, "cpu", 1, 1, False)

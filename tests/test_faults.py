"""Faults (issue 14 item 5), injected through the runtime layer's fault hook (`app.runtime.add_fault_hook`: called
before every inference batch and every item's preprocessing, in the thread doing the work), on disk, and in an
export's writer: a batch that raises fails only its culprit, a hung inference answers 504 and marks the model
unhealthy on /readyz, a model file corrupted before a reload is refused while the serving version keeps serving,
a preprocessing worker that dies fails only its request, a disk that fills during an export leaves no version."""
from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from app import runtime
from tests.fixtures_app import app_repository, build_model  # noqa: F401 (fixture)
from tests.test_app_api import make_client, wait_ready

POISON = "berlin"  # a word of the tiny tokenizer's vocabulary: requests holding it trip the hooks below


def token_id(client, model: str, word: str) -> int:
    ids = client.app.state.service.registry.entries[model].preprocessor.encode_text(word).input_ids
    return int([i for i in ids if i > 4][0])  # past the special tokens


@pytest.fixture()
def hooks():
    removers = []
    yield lambda hook: removers.append(runtime.add_fault_hook(hook))
    for remove in removers:
        remove()


@pytest.fixture(scope="module")
def client(app_repository):  # noqa: F811
    # a fixed batch size: the culprit test expects its 4 items in one batch, and MAX_BATCH_SIZE=auto chose 2 for
    # the tiny model once on a loaded CI machine
    with make_client(app_repository, max_delay_ms=2, request_timeout_s=60, unhealthy_after_timeouts=2,
                     preprocess_workers=2, max_batch_size=8) as c:
        wait_ready(c)
        yield c


def test_a_batch_that_raises_fails_only_its_culprit(client, hooks):
    poison = token_id(client, "tiny-classify", POISON)
    texts = ["alice flew from paris", f"bob lives in {POISON}", "a red square", "the quick brown fox"]
    alone = [client.post("/v1/classify", json={"text": t, "top_k": 3}).json() for t in texts if POISON not in t]
    batches: list[int] = []

    def raise_on_poison(stage, model, feeds):
        if stage == "infer" and model == "tiny-classify":
            batches.append(len(feeds["input_ids"]))
            if (feeds["input_ids"] == poison).any():
                raise RuntimeError("injected: the runtime cannot run this batch")

    hooks(raise_on_poison)
    r = client.post("/v1/classify/batch", json={"inputs": [{"text": t} for t in texts], "top_k": 3})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["status"] for x in results] == [200, 500, 200, 200]
    assert results[1]["error"]["code"] == "inference_failed"
    assert batches[0] == 4 and batches[1:] == [1, 1, 1, 1]  # the whole batch, then each item alone
    good = [x for x in results if x["status"] == 200]
    for got, ref in zip(good, alone):
        assert [p["label"] for p in got["predictions"]] == [p["label"] for p in ref["predictions"]]
        for p, q in zip(got["predictions"], ref["predictions"]):
            assert p["score"] == pytest.approx(q["score"], rel=1e-5, abs=1e-6)


def test_a_hung_inference_answers_504_and_marks_the_model_unhealthy(app_repository, hooks):  # noqa: F811
    release = threading.Event()
    hung: list[int] = []

    def hang(stage, model, feeds):
        if stage == "infer" and model == "tiny-ner" and not release.is_set():
            hung.append(1)
            release.wait(120)  # bounded: the test releases it below

    with make_client(app_repository, max_delay_ms=2, request_timeout_s=3, unhealthy_after_timeouts=2) as c:
        wait_ready(c)
        hooks(hang)
        try:
            for i in range(2):
                r = c.post("/v1/ner", json={"text": f"alice flew to paris {i}"})
                assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text
                if i == 0:  # one timeout is not yet a hung model
                    assert c.get("/readyz").status_code == 200
            ready = c.get("/readyz")
            assert ready.status_code == 503, ready.text
            assert "tiny-ner" in ready.json()["unhealthy"] and "in a row" in ready.json()["unhealthy"]["tiny-ner"]
            assert set(ready.json()["unhealthy"]) == {"tiny-ner"}
            # the other models keep answering while one is hung
            assert c.post("/v1/classify", json={"text": "still fine"}).status_code == 200
            # a client's own short timeout on a healthy model never counts towards "hung"
        finally:
            release.set()
        assert hung
        end = time.monotonic() + 60
        while time.monotonic() < end:  # the released batch finishes; the next answer clears the mark
            r = c.post("/v1/ner", json={"text": "bob lives in london"})
            if r.status_code == 200 and c.get("/readyz").status_code == 200:
                break
            time.sleep(0.1)
        assert c.get("/readyz").status_code == 200 and "unhealthy" not in c.get("/readyz").json()


def test_short_client_timeouts_never_mark_a_healthy_model_unhealthy(client):
    for i in range(6):
        r = client.post("/v1/ner", json={"text": f"alice {i}", "timeout_ms": 1})
        assert r.status_code in (200, 504)
    assert client.get("/readyz").status_code == 200


def test_a_preprocessing_worker_that_dies_fails_only_its_request(client, hooks):
    def die(stage, model, feeds):
        if stage == "preprocess" and threading.current_thread().name.startswith("preprocess") and die.armed:
            die.armed = False
            raise SystemExit("injected: preprocessing worker exits")

    die.armed = True
    hooks(die)
    r = client.post("/v1/classify/batch", json={"inputs": [{"text": "one"}, {"text": "two"}, {"text": "three"}]})
    assert r.status_code == 200, r.text
    statuses = sorted(x["status"] for x in r.json()["results"])
    assert statuses == [200, 200, 500]
    failed = [x for x in r.json()["results"] if x["status"] == 500][0]
    assert failed["error"]["code"] == "internal_error" and failed["error"]["request_id"]
    for _ in range(4):  # the pool keeps working (every worker thread)
        assert client.post("/v1/classify", json={"text": "after"}).status_code == 200
    assert client.get("/readyz").status_code == 200


def test_a_model_file_corrupted_before_a_reload_is_refused_and_the_serving_version_keeps_serving(
        app_repository, tmp_path):  # noqa: F811
    repo = tmp_path / "repo"
    shutil.copytree(app_repository / "tiny-classify", repo / "tiny-classify")
    with make_client(repo, model_control="explicit", host="127.0.0.1", max_delay_ms=2) as c:
        wait_ready(c)
        before = c.post("/v1/classify", json={"text": "alice", "top_k": 3}).json()
        # the serving version's file rots on disk, and a new version is written whose file is then corrupted
        for directory in (repo / "tiny-classify" / "1", build_model(repo, "tiny-classify", version=2, seed=5)):
            path = directory / "model.onnx"
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0xFF
            path.write_bytes(bytes(data))
        r = c.post("/v2/repository/models/tiny-classify/load", json={})
        assert r.status_code == 400 and "sha256" in r.json()["error"], r.text
        after = c.post("/v1/classify", json={"text": "alice", "top_k": 3}).json()
        assert after == before and after["version"] == 1
        index = {(x["name"], x.get("version")): x for x in c.post("/v2/repository/index", json={}).json()}
        assert index[("tiny-classify", "1")]["state"] == "READY"
        assert index[("tiny-classify", "2")]["state"] == "UNAVAILABLE"


def test_a_disk_that_fills_while_an_export_writes_leaves_no_version(app_repository, tmp_path, monkeypatch):  # noqa: F811
    """The export's staging (training/model_repository.py): files go to NAME/.tmp-<uuid>, the version appears by
    one rename. A real tiny file system is not available here (no root, no tmpfs mount), so the disk fills in
    the writer: within the export's write only, every os.write past half the version's bytes raises ENOSPC."""
    from training import model_repository as mr

    model_dir = tmp_path / "repo" / "tiny-classify"
    source = app_repository / "tiny-classify" / "1"
    written = [0]
    room = sum(f.stat().st_size for f in source.iterdir()) // 2  # the disk fills half-way through the version
    real_write = os.write

    def write_files(staged: Path) -> None:  # the export's writer, reduced to what matters: bytes to files
        for f in sorted(source.iterdir()):
            data = f.read_bytes()
            fd = os.open(staged / f.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                for i in range(0, len(data), 4096):
                    os.write(fd, data[i:i + 4096])
            finally:
                os.close(fd)

    def full_disk_write(fd, chunk):
        written[0] += len(chunk)
        if written[0] > room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, chunk)

    with pytest.raises(OSError) as info:
        with mr.staging_directory(model_dir) as staged:
            with monkeypatch.context() as m:
                m.setattr(os, "write", full_disk_write)
                write_files(staged)
            mr.publish(staged, model_dir / str(mr.next_version(model_dir)))
    assert info.value.errno == errno.ENOSPC
    assert sorted(p.name for p in model_dir.iterdir()) == []  # no version, no staging left behind
    with make_client(tmp_path / "repo") as c:  # a server finds no version to serve, and says so
        models = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
        assert models["tiny-classify"]["state"] == "failed" and models["tiny-classify"]["reason"] == "no version directory"
    # and the same writer on a disk with room publishes version 1, which serves
    with mr.staging_directory(model_dir) as staged:
        write_files(staged)
        mr.publish(staged, model_dir / "1")
    assert sorted(p.name for p in model_dir.iterdir()) == ["1"]
    with make_client(tmp_path / "repo") as c:
        wait_ready(c)
        assert c.post("/v1/classify", json={"text": "alice"}).status_code == 200

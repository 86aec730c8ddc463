"""Out-of-memory on a batch (issue 15 item 3), on CPU through the runtime's fault hook (`app.runtime.add_fault_hook`)
raising the error a GPU runtime raises when a batch is bigger than it can hold: the batcher splits the batch into
halves and retries them (down to single items) instead of failing the requests, lowers the model's max batch size to
the largest size that ran, reports it in /v1/models, and never runs a bigger batch afterwards. The real app, real
requests (tests/test_faults.py's way); tests/test_gpu.py does it again with a real allocation limit on a GPU."""
from __future__ import annotations

import re
import threading

import pytest

from app import runtime
from tests.fixtures_app import app_repository  # noqa: F401 (fixture)
from tests.test_app_api import make_client, wait_ready
from tests.test_faults import POISON, hooks, token_id  # noqa: F401 (hooks: fixture)

# onnxruntime's CUDA arena says this when a batch does not fit (the batcher matches it by message)
ORT_OOM = ("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running MatMul node. "
           "BFCArena::AllocateRawInternal Failed to allocate memory for requested buffer of size {}")
TEXTS = [f"{w} flew from paris to berlin on day {i}" for i, w in enumerate(
    ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "oscar"])]


class OutOfMemoryError(RuntimeError):
    """What torch raises (torch.cuda.OutOfMemoryError): recognised by its class name, not its message."""


def oom_above(limit: int, seen: list[int], lock: threading.Lock, model: str = "tiny-classify", torch_style=False):
    """A hook that records every batch size the model is asked to run and fails those bigger than `limit`."""
    def hook(stage, name, feeds):
        if stage == "infer" and name == model:
            n = len(feeds["input_ids"])
            with lock:
                seen.append(n)
            if n > limit:
                if torch_style:
                    raise OutOfMemoryError(f"CUDA out of memory. Tried to allocate {n} MiB")
                raise RuntimeError(ORT_OOM.format(n << 20))
    return hook


def predictions(body: dict) -> list[tuple[str, float]]:
    return [(p["label"], p["score"]) for p in body["predictions"]]


def assert_same(got: dict, ref: dict) -> None:
    assert [label for label, _ in predictions(got)] == [label for label, _ in predictions(ref)]
    for (_, a), (_, b) in zip(predictions(got), predictions(ref)):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


def model_view(client, name: str = "tiny-classify") -> dict:
    return {m["name"]: m for m in client.get("/v1/models").json()["models"]}[name]


def test_a_batch_that_runs_out_of_memory_is_split_in_halves_and_the_max_batch_size_lowered(app_repository, hooks):  # noqa: F811
    seen: list[int] = []
    with make_client(app_repository, max_batch_size=32, max_delay_ms=2) as c:
        wait_ready(c)
        ref = [c.post("/v1/classify", json={"text": t, "top_k": 3}).json() for t in TEXTS]
        hooks(oom_above(3, seen, threading.Lock()))
        # one request of 12 items on an idle model: one batch of 12, then its halves, recursively
        r = c.post("/v1/classify/batch", json={"inputs": [{"text": t} for t in TEXTS], "top_k": 3})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [x["status"] for x in results] == [200] * 12
        for got, want in zip(results, ref):
            assert_same(got, want)
        assert seen == [12, 6, 3, 3, 6, 3, 3]  # halves, never item by item
        m = model_view(c)
        assert (m["max_batch_size"], m["batch_size_source"]) == (3, "lowered after out-of-memory at 12")
        assert c.app.state.service.registry.entries["tiny-classify"].batcher.max_batch_size == 3
        # the next request of 12 runs as batches of 3 at once: no out-of-memory left to hit
        seen.clear()
        r = c.post("/v1/classify/batch", json={"inputs": [{"text": t} for t in TEXTS], "top_k": 3})
        assert [x["status"] for x in r.json()["results"]] == [200] * 12
        assert seen == [3, 3, 3, 3]


def test_every_request_of_a_concurrent_burst_is_answered_after_out_of_memory(app_repository, hooks):  # noqa: F811
    limit, seen, lock = 5, [], threading.Lock()
    with make_client(app_repository, max_batch_size=32, max_delay_ms=20, preprocess_workers=2) as c:
        wait_ready(c)
        ref = {t: c.post("/v1/classify", json={"text": t, "top_k": 3}).json() for t in TEXTS}
        assert model_view(c)["batch_size_source"] == "settings"
        hooks(oom_above(limit, seen, lock, torch_style=True))
        answers: list[tuple[str, object]] = []

        def single(text: str) -> None:
            r = c.post("/v1/classify", json={"text": text, "top_k": 3})
            with lock:
                answers.append((text, r))

        def batch() -> None:  # its items are queued together: a batch bigger than `limit` while none is lowered
            r = c.post("/v1/classify/batch", json={"inputs": [{"text": t} for t in TEXTS], "top_k": 3})
            with lock:
                answers.append(("batch", r))

        threads = [threading.Thread(target=single, args=(TEXTS[i % 12],)) for i in range(24)]
        threads += [threading.Thread(target=batch) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(answers) == 28
        for text, r in answers:
            assert r.status_code == 200, r.text
            if text == "batch":
                results = r.json()["results"]
                assert [x["status"] for x in results] == [200] * 12
                for got, t in zip(results, TEXTS):
                    assert_same(got, ref[t])
            else:
                assert_same(r.json(), ref[text])
        assert max(seen) > limit  # the burst did run out of memory (4 x 12 items queued together)
        m = model_view(c)
        lowered = m["max_batch_size"]
        assert 1 <= lowered <= limit and re.fullmatch(r"lowered after out-of-memory at \d+", m["batch_size_source"])
        assert c.app.state.service.registry.entries["tiny-classify"].batcher.max_batch_size == lowered
        # a second burst: every batch within the lowered size, no out-of-memory
        seen.clear()
        answers.clear()
        threads = [threading.Thread(target=batch) for _ in range(3)]
        threads += [threading.Thread(target=single, args=(TEXTS[i % 12],)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [r.status_code for _, r in answers] == [200] * 15
        assert seen and max(seen) <= lowered
        assert model_view(c)["max_batch_size"] == lowered


def test_an_item_that_runs_out_of_memory_alone_fails_alone_with_a_clear_error(app_repository, hooks):  # noqa: F811
    with make_client(app_repository, max_batch_size=32, max_delay_ms=2) as c:
        wait_ready(c)
        poison = token_id(c, "tiny-classify", POISON)
        seen: list[int] = []

        def too_big(stage, model, feeds):  # any batch holding the poison token needs more memory than there is
            if stage == "infer" and model == "tiny-classify":
                seen.append(len(feeds["input_ids"]))
                if (feeds["input_ids"] == poison).any():
                    raise RuntimeError(ORT_OOM.format(1 << 34))

        hooks(too_big)
        texts = ["alice flew from paris", "a red square", f"bob lives in {POISON}", "the quick brown fox"]
        r = c.post("/v1/classify/batch", json={"inputs": [{"text": t} for t in texts]})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [x["status"] for x in results] == [200, 200, 500, 200]
        assert results[2]["error"]["code"] == "inference_failed"
        assert "out of memory on this input alone" in results[2]["error"]["message"]
        assert seen == [4, 2, 2, 1, 1]  # halves: [alice, square] ran, [bob, fox] split, bob alone failed
        r = c.post("/v1/classify", json={"text": f"{POISON} again"})
        assert r.status_code == 500 and "out of memory" in r.json()["error"]["message"]
        assert c.post("/v1/classify", json={"text": "alice"}).status_code == 200

"""`python -m bench --backend torchscript` (how the offline device image benchmarks on the GPU, where onnxruntime-gpu
cannot travel: docs/gpu-check.md), checked on CPU without training anything: the limit's and the LitServe peer's
Engine run the version's model.pt through mmserve's own TorchScript runtime and answer what mmserve serving that
model answers; the limit reports the TorchScript provider; the peer is started with the backend (and without the
flag on ONNX, as before); a demo model with no TorchScript export is skipped with the reason."""
from __future__ import annotations

import shutil

import pytest

from tests.fixtures_app import MODELS, app_repository, build_model  # noqa: F401 (fixture)
from tests.test_app_api import make_client, wait_ready
from tests.test_gpu_oom import TEXTS

pytest.importorskip("torch")


@pytest.fixture()
def ts_version(app_repository, tmp_path):  # noqa: F811
    from tests.test_gpu import add_torchscript

    repo = tmp_path / "repo"
    shutil.copytree(app_repository / "tiny-classify", repo / "tiny-classify")
    add_torchscript(repo / "tiny-classify" / "1")
    return repo / "tiny-classify" / "1"


def test_the_engine_on_torchscript_answers_what_mmserve_serving_it_answers(ts_version):
    from bench.engine import Engine

    eng = Engine(ts_version, threads=1, device="cpu", backend="torchscript")
    assert eng.provider == "torch-cpu" and eng.runtime is not None
    texts = TEXTS[:5]
    got = eng.run_requests([{"text": t, "image": None, "audio": None} for t in texts])
    with make_client(ts_version.parent.parent, backend="torchscript", device="cpu", max_delay_ms=2) as c:
        wait_ready(c)
        for text, preds in zip(texts, got):
            body = c.post("/v1/classify", json={"text": text, "top_k": 3}).json()
            assert [p["label"] for p in body["predictions"]] == [p["label"] for p in preds]
            for a, b in zip(body["predictions"], preds):
                assert a["score"] == pytest.approx(b["score"], rel=1e-5, abs=1e-6)
    onnx = Engine(ts_version, threads=1, device="cpu")  # the default is unchanged
    assert onnx.provider == "CPUExecutionProvider" and onnx.runtime is None


def test_the_limit_measures_the_torchscript_runtime(ts_version):
    from bench.limit import measure

    items = [{"text": t, "image": None, "audio": None} for t in TEXTS]
    res = measure(ts_version, items, threads=1, batch_sizes=[1, 4], min_seconds=0.01, device="cpu",
                  backend="torchscript")
    assert res["provider"] == "torch-cpu" and set(res["per_batch_size"]) == {1, 4} and res["throughput"] > 0


def test_the_peer_gets_the_backend_and_a_demo_model_without_torchscript_is_skipped(tmp_path):
    from bench import servers
    from bench.workload import resolve

    kw = dict(max_batch_size=4, batch_timeout=0.005, threads=1, cpus=None, device="cuda", log_dir=tmp_path)
    argv = servers.litserve(tmp_path, backend="torchscript", **kw).argv
    assert argv[argv.index("--backend") + 1] == "torchscript" and argv[argv.index("--device") + 1] == "cuda"
    assert "--backend" not in servers.litserve(tmp_path, **kw).argv

    build_model(tmp_path / "demo_repo", "demo-classify", task_spec=MODELS["tiny-classify"])  # model.onnx only
    workloads, skipped = resolve(["demo"], demo_repo=tmp_path / "demo_repo", rebuild=False, log=lambda m: None,
                                 backend="torchscript")
    assert workloads == [] and "has no torchscript export" in skipped[0]
    workloads, skipped = resolve(["demo"], demo_repo=tmp_path / "demo_repo", rebuild=False, log=lambda m: None)
    assert [w.name for w in workloads] == ["demo"] and skipped == []

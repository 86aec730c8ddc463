"""The GPU paths' logic, checked on CPU (issue 15 item 3; tests/test_gpu.py runs them on a real GPU):
onnxruntime's I/O binding run (bound on the CPU device here) answers what `session.run` answers, the pinned staging
buffers of TorchScript grow and are reused, out-of-memory errors are recognised, the CUDA provider options come
from the settings, and warm-up sizes batches around out-of-memory (a fixed size halved, `auto` ending its sweep)."""
from __future__ import annotations

import time

import numpy as np
import pytest

from app import runtime
from app.core.calibration import measure_batch_sizes, size_batches
from app.runtime import CudaOptions, is_out_of_memory
from app.settings import Settings
from tests.fixtures_app import app_repository, build_model  # noqa: F401 (fixture)
from tests.test_app_api import make_client, wait_ready
from tests.test_gpu_oom import ORT_OOM, OutOfMemoryError, hooks, model_view  # noqa: F401 (fixture)


# ------------------------------------------------------------------------------------ onnxruntime I/O binding
def test_the_io_binding_run_answers_what_session_run_answers(app_repository, hooks):  # noqa: F811
    feeds: list[dict[str, np.ndarray]] = []
    hooks(lambda stage, model, f: feeds.append(f) if stage == "infer" and model == "tiny-classify" else None)
    with make_client(app_repository, max_delay_ms=2) as c:
        wait_ready(c)
        texts = ["alice flew from paris", "a red square and a much longer sentence about berlin"]
        before = c.post("/v1/classify/batch", json={"inputs": [{"text": t} for t in texts], "top_k": 3}).json()
        rt = c.app.state.service.registry.entries["tiny-classify"].runtime.inner
        assert rt.provider == "CPUExecutionProvider" and rt.io_binding is False  # CPU keeps session.run
        assert rt.bound_runs == 0
        plain = rt.run(feeds[-1])
        rt._bind_device = ("cpu", 0)  # the CUDA path, with the output bound on the CPU device
        bound = rt.run_bound(feeds[-1])
        assert rt.bound_runs == 1 and bound.shape == plain.shape == (2, 3)
        np.testing.assert_allclose(bound, plain, rtol=1e-6, atol=1e-6)
        # served through the binding: the same answers, and every batch went through it
        rt.io_binding = True
        after = c.post("/v1/classify/batch", json={"inputs": [{"text": t} for t in texts], "top_k": 3}).json()
        assert rt.bound_runs == 2
        for a, b in zip(after["results"], before["results"]):
            assert [p["label"] for p in a["predictions"]] == [p["label"] for p in b["predictions"]]
            assert [p["score"] for p in a["predictions"]] == pytest.approx([p["score"] for p in b["predictions"]],
                                                                          rel=1e-5)


def test_cuda_provider_options_come_from_the_settings():
    s = Settings(cuda_mem_limit_bytes=64 << 20, cuda_arena_extend_strategy="kSameAsRequested",
                 cudnn_conv_algo_search="EXHAUSTIVE")
    opts = CudaOptions(s.cuda_mem_limit_bytes, s.cuda_arena_extend_strategy, s.cudnn_conv_algo_search)
    assert opts.provider_options(1) == {"device_id": "1", "gpu_mem_limit": str(64 << 20),
                                        "arena_extend_strategy": "kSameAsRequested", "cudnn_conv_algo_search": "EXHAUSTIVE"}
    assert "gpu_mem_limit" not in CudaOptions().provider_options(0)  # 0: the provider's own default
    with pytest.raises(ValueError):
        Settings(cuda_arena_extend_strategy="kDouble")
    with pytest.raises(ValueError):
        Settings(cuda_mem_limit_bytes=-1)


# ------------------------------------------------------------------------------------ TorchScript pinned staging
def test_pinned_staging_reuses_its_buffers_and_grows_them_when_a_batch_needs_more():
    torch = pytest.importorskip("torch")
    staging = runtime.PinnedStaging(torch, "cpu", pin=False)  # pinning needs a CUDA device (tests/test_gpu.py)
    for shape in ((8, 16), (2, 16), (8, 16), (8, 20), (3, 5)):
        a = np.arange(np.prod(shape), dtype=np.int64).reshape(shape)
        out = staging.to_device("input_ids", a)
        assert out.shape == shape and np.array_equal(out.numpy(), a)
    assert staging.allocations == 2  # 128 elements, then 160 (rounded up to 256); smaller batches reuse them
    f = staging.to_device("pixel_values", np.ones((2, 3), np.float32))
    assert f.dtype == torch.float32 and staging.allocations == 3  # one buffer per input


# ------------------------------------------------------------------------------------ out-of-memory errors
@pytest.mark.parametrize("exc, oom", [
    (RuntimeError(ORT_OOM.format(1 << 30)), True),
    (OutOfMemoryError("anything"), True),  # torch.cuda.OutOfMemoryError, by class name
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("CUDNN failure 4: CUDNN_STATUS_ALLOC_FAILED"), True),
    (RuntimeError("CUDA failure 2: out of memory ; GPU=0"), True),
    (MemoryError(), True),
    (RuntimeError("injected: the runtime cannot run this batch"), False),
    (ValueError("missing model inputs: ['input_ids']"), False),
])
def test_out_of_memory_errors_are_recognised_and_no_others(exc, oom):
    assert is_out_of_memory(exc) is oom


# ------------------------------------------------------------------------------------ batch sizing at warm-up
class FakeDevice:
    """A device whose batch costs `fixed + per_item * size` seconds on a fake clock and runs out of memory above
    `fits` items."""

    def __init__(self, fixed: float, per_item: float, fits: int):
        self.now, self.fixed, self.per_item, self.fits, self.sizes = 0.0, fixed, per_item, fits, []

    def run(self, size: int) -> None:
        self.sizes.append(size)
        if size > self.fits:
            raise RuntimeError(ORT_OOM.format(size << 20))
        self.now += self.fixed + self.per_item * size

    def timer(self) -> float:
        return self.now


def test_auto_on_a_gpu_keeps_rising_throughput_and_stops_at_the_size_that_runs_out_of_memory():
    gpu = FakeDevice(fixed=0.004, per_item=0.0001, fits=64)  # items/s still rising at 64
    sizing = size_batches(gpu.run, 256, auto=True, on_gpu=True, timer=gpu.timer)
    assert sorted(sizing.items_per_s) == [1, 2, 4, 8, 16, 32, 64] and 128 in gpu.sizes and 256 not in gpu.sizes
    assert sizing.size == 64 and sizing.source == "auto-calibrated (a batch of 128 ran out of memory)"
    flat = FakeDevice(fixed=0.0005, per_item=0.001, fits=1024)  # saturated from the start: per-item cost dominates
    sizing = size_batches(flat.run, 64, auto=True, on_gpu=True, timer=flat.timer)
    assert sizing.size < 64 and sizing.source == "auto-calibrated"  # past the knee a bigger batch only adds latency


def test_a_fixed_size_that_runs_out_of_memory_at_warm_up_is_halved_until_it_fits():
    dev = FakeDevice(0.001, 0.0, fits=5)
    sizing = size_batches(dev.run, 32, auto=False, on_gpu=True, timer=dev.timer)
    assert (sizing.size, sizing.source) == (4, "lowered after out-of-memory at 32 (warm-up)")
    assert dev.sizes == [32, 16, 8, 4]
    dev = FakeDevice(0.001, 0.0, fits=0)
    with pytest.raises(RuntimeError, match="Failed to allocate"):  # not even one item fits: the model fails to load
        size_batches(dev.run, 8, auto=False, on_gpu=True, timer=dev.timer)
    with pytest.raises(RuntimeError, match="Failed to allocate"):
        measure_batch_sizes(lambda size: dev.run(size) or 0.01, 8)


def test_warm_up_lowers_a_batch_size_that_runs_out_of_memory_and_serves(tmp_path, hooks):  # noqa: F811
    build_model(tmp_path, "tiny-classify")
    seen: list[int] = []

    def oom_above_8(stage, model, feeds):
        if stage == "infer":
            seen.append(len(feeds["input_ids"]))
            if len(feeds["input_ids"]) > 8:
                raise RuntimeError(ORT_OOM.format(1 << 30))
            time.sleep(0.01)  # a fixed cost per batch, as a GPU's launch overhead: items/s rises with the size

    hooks(oom_above_8)
    with make_client(tmp_path, max_batch_size=32) as c:
        wait_ready(c)
        m = model_view(c)
        assert m["state"] == "ready"
        assert (m["max_batch_size"], m["batch_size_source"]) == (8, "lowered after out-of-memory at 32 (warm-up)")
        assert c.app.state.service.registry.entries["tiny-classify"].batcher.max_batch_size == 8
        assert c.post("/v1/classify", json={"text": "alice"}).status_code == 200
    seen.clear()
    with make_client(tmp_path) as c:  # auto: the sweep ends at 16, the first size that runs out of memory
        wait_ready(c)
        m = model_view(c)
        assert m["max_batch_size"] == 8 and m["batch_size_source"] == "auto-calibrated (a batch of 16 ran out of memory)"
        assert 16 in seen and 32 not in seen
        assert sorted(int(k) for k in c.get("/v1/models/tiny-classify").json()["batch_calibration"]) == [1, 2, 4, 8]

"""The GPU paths on a real GPU (issue 15 item 3), marker `cuda`: `pytest -m cuda` (`make gpu-check` runs them).
Skipped, with the reason, where no NVIDIA GPU is usable (`app.runtime.cuda_device_count() == 0`); on a machine with
one, a CUDA provider that cannot run is a failure, never a skip. The one other skip: the ONNX CUDA tests where the
installed onnxruntime is a package built without the CUDA provider (the offline device image's CPU `onnxruntime`:
onnxruntime-gpu cannot be carried there), and the TorchScript ones where torch has no CUDA.

* onnxruntime's CUDA provider is really used (the session's own provider list), with I/O binding and the arena
  options from the settings, and answers what the CPU provider answers;
* DEVICE=cuda fails the model loudly when CUDA cannot run (no silent CPU fallback), on both runtimes;
* TorchScript traced on a CPU (its device constants saying "cpu") serves on CUDA through pinned host buffers and
  answers what it answers on CPU;
* a batch that runs out of memory is split and the max batch size lowered: with a real arena limit
  (CUDA_MEM_LIMIT_BYTES) and through the fault hook (on ONNX and on TorchScript).
"""
from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from app.runtime import cuda_device_count
from tests.fixtures_app import app_repository, build_model  # noqa: F401 (fixture)
from tests.media import image_bytes
from tests.test_app_api import make_client, wait_ready
from tests.test_gpu_oom import TEXTS, assert_same, hooks, model_view, oom_above  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(cuda_device_count() == 0,
                       reason="no usable NVIDIA GPU (app.runtime.cuda_device_count() == 0); run on a GPU machine: "
                              "make gpu-check"),
]



def _ort_cuda_skip() -> str | None:
    """Why the ONNX CUDA tests cannot run with this onnxruntime (None: its package has the CUDA provider, so they
    run, and fail if CUDA does not start)."""
    from importlib.metadata import PackageNotFoundError, version

    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return None
    try:
        package = f"onnxruntime-gpu {version('onnxruntime-gpu')}"
    except PackageNotFoundError:
        package = f"onnxruntime {ort.__version__} (the CPU package; onnxruntime-gpu is not installed)"
    return (f"{package} has no CUDAExecutionProvider: the ONNX CUDA paths need onnxruntime-gpu (on the offline device "
            "image it cannot be carried: its wheel is over the 64 MiB a call carries)")


ORT_CUDA_SKIP = _ort_cuda_skip()
needs_ort_cuda = pytest.mark.skipif(ORT_CUDA_SKIP is not None, reason=ORT_CUDA_SKIP or "")


def torch_cuda_or_skip():
    torch = pytest.importorskip("torch", reason="TorchScript needs torch (the train extra)")
    if not torch.cuda.is_available():
        pytest.skip(f"torch {torch.__version__} has no CUDA (the CPU build): make gpu-check installs the CUDA build")
    return torch


ITEMS = {  # one request per tiny model, text and media
    "tiny-classify": ("/v1/classify", {"text": "alice flew from paris to berlin", "top_k": 3}),
    "tiny-ner": ("/v1/ner", {"text": "bob lives in london"}),
    "tiny-vqa": ("/v1/vqa", {"question": "what colour is the square",
                             "image": base64.b64encode(image_bytes()).decode()}),
}


def close(a, b) -> None:
    """Two answers of one model on two devices: the same labels and scores within float tolerance."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            if k not in ("version", "model", "request_id"):
                close(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            close(x, y)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-3, abs=1e-4)
    else:
        assert a == b


def answers(client) -> dict[str, dict]:
    out = {}
    for model, (path, body) in ITEMS.items():
        r = client.post(path, json={**body, "model": model})
        assert r.status_code == 200, r.text
        out[model] = r.json()
    return out


@needs_ort_cuda
def test_onnxruntime_runs_on_the_cuda_provider_with_io_binding_and_answers_what_cpu_answers(app_repository):  # noqa: F811
    with make_client(app_repository, device="cpu") as c:
        wait_ready(c)
        on_cpu = answers(c)
    with make_client(app_repository, device="cuda", cuda_mem_limit_bytes=2 << 30,
                     cuda_arena_extend_strategy="kSameAsRequested") as c:
        body = wait_ready(c, timeout=120)
        assert set(body["models"].values()) == {"ready"}, body
        for m in c.get("/v1/models").json()["models"]:
            assert (m["provider"], m["device"], m["backend"]) == ("CUDAExecutionProvider", "cuda:0", "onnx"), m
            assert m["batch_size_source"].startswith("auto-calibrated")  # timed on the GPU
        on_gpu = answers(c)
        for name, entry in c.app.state.service.registry.entries.items():
            rt = entry.runtime.inner
            assert rt.session.get_providers()[0] == "CUDAExecutionProvider"
            assert rt.io_binding and rt.bound_runs > 0, name  # every batch went through I/O binding
            options = rt.session.get_provider_options()["CUDAExecutionProvider"]
            assert options["gpu_mem_limit"] == str(2 << 30), options
        batch = c.post("/v1/classify/batch", json={"inputs": [{"text": t} for t in TEXTS], "top_k": 3}).json()
        assert [x["status"] for x in batch["results"]] == [200] * len(TEXTS)
    for name in ITEMS:
        close(on_gpu[name], on_cpu[name])


@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_device_cuda_fails_loudly_when_cuda_cannot_run(app_repository, tmp_path, backend):  # noqa: F811
    """No device visible to this process: DEVICE=cuda must fail the model, not serve it on the CPU (with a CPU-only
    onnxruntime it is refused for want of the provider: a refusal too)."""
    if backend == "onnx":
        path = app_repository / "tiny-ner" / "1" / "model.onnx"
        make = "OnnxRuntime(Path(sys.argv[1]), 'cuda')"
    else:
        torch_cuda_or_skip()
        version_dir = tmp_path / "tiny-classify" / "1"
        shutil.copytree(app_repository / "tiny-classify" / "1", version_dir)
        add_torchscript(version_dir)
        path = version_dir / "model.pt"
        make = "TorchScriptRuntime(Path(sys.argv[1]), 'cuda', ['input_ids'])"
    code = ("import sys; from pathlib import Path; from app.runtime import OnnxRuntime, TorchScriptRuntime\n"
            f"try:\n    {make}\nexcept Exception as e:\n"
            "    print('REFUSED', e); sys.exit(3)\nprint('SERVED ON CPU'); sys.exit(0)\n")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, "-c", code, str(path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "SERVED ON CPU" not in p.stdout, p.stdout + p.stderr


def add_torchscript(directory: Path) -> None:
    """A traced TorchScript file for a tiny classify or VQA model (a version directory of tests/fixtures_app.py),
    listed and hashed in its manifest: each of the manifest's inputs, in order, reduced to one number per item (the
    token ids by their masked mean, so padding to a batch's longest text changes nothing) and mixed by fixed weights
    into the labels' logits [batch, labels]: different inputs, different answers, no training. Traced on the CPU with
    the device written into it as exported models have it (`.to(device=x.device)`, `arange(device=...)`, as in
    transformers' mask code): served on CUDA, app.jit_devices must point those at the GPU."""
    import torch

    from models.manifest import FormatInfo, hash_directory, read_manifest

    m = read_manifest(directory)
    names = [t.name for t in m.inputs]

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(3)
            self.register_buffer("mix", torch.randn(len(names), len(m.labels), generator=g))

        def forward(self, *xs):
            feeds = dict(zip(names, xs))
            cols = []
            for name, x in feeds.items():  # unrolled by the trace
                if name == "input_ids":
                    mask = feeds["attention_mask"].to(device=x.device, dtype=torch.float32)  # a traced device
                    steps = torch.arange(x.shape[1], device=x.device)  # another
                    cols.append((x.float() * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1) / 100
                                + 0 * steps.float().mean())
                elif name == "attention_mask":
                    cols.append(x.float().sum(1, keepdim=True) / 32)
                elif x.dim() > 1:  # media: fixed sizes
                    cols.append(x.float().flatten(1).mean(1, keepdim=True))
                else:  # presence flags
                    cols.append(x.float()[:, None])
            return torch.cat(cols, dim=1) @ self.mix

    ex = []
    for spec in m.inputs:  # batch 2, every symbolic dimension 3 (image sides: the model's own)
        shape = [2] + [d if isinstance(d, int) else 3 for d in spec.shape[1:]]
        dtype = torch.long if spec.dtype == "int64" else torch.float32
        ex.append(torch.ones(shape, dtype=dtype))
    torch.jit.trace(Tiny(), tuple(ex)).save(str(directory / "model.pt"))
    m.formats["torchscript"] = FormatInfo(file="model.pt", size_bytes=(directory / "model.pt").stat().st_size,
                                          export_seconds=0.0)
    m.files = hash_directory(directory)
    m.dump(directory)


def test_torchscript_serves_on_cuda_through_pinned_buffers(tmp_path):
    torch_cuda_or_skip()
    add_torchscript(build_model(tmp_path, "tiny-vqa", seed=3))
    path, body = ITEMS["tiny-vqa"]
    with make_client(tmp_path, backend="torchscript", device="cpu") as c:
        wait_ready(c)
        on_cpu = c.post(path, json=body).json()
    with make_client(tmp_path, backend="torchscript", device="cuda") as c:
        wait_ready(c, timeout=120)
        m = model_view(c, "tiny-vqa")
        assert (m["state"], m["device"], m["provider"]) == ("ready", "cuda:0", "torch-cuda"), m
        r = c.post(path, json=body)
        assert r.status_code == 200, r.text
        close(r.json(), on_cpu)
        runtime = c.app.state.service.registry.entries["tiny-vqa"].runtime.inner
        assert runtime.retargeted >= 1  # the traced "cpu" constant now says cuda:0 (app.jit_devices)
        staging = runtime.staging
        assert staging is not None and staging.allocations >= 4  # one pinned buffer per input
        assert all(b.is_pinned() for b in staging.buffers.values())


def settled(client, name: str = "tiny-classify", timeout: float = 120) -> dict:
    """The model's /v1/models view once it is ready or failed (readiness needs one ready model: maybe none is)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        m = model_view(client, name)
        if m["state"] in ("ready", "failed"):
            return m
        time.sleep(0.1)
    raise AssertionError(f"{name} neither ready nor failed: {model_view(client, name)}")


@needs_ort_cuda
def test_a_batch_over_a_real_arena_limit_is_split_and_the_size_lowered(app_repository, tmp_path):  # noqa: F811
    """Arena limits from roomy to tiny (kSameAsRequested, so the limit is what is asked): at each the model either
    fails to load for want of memory, or serves every item of a 12-item request with the unlimited answers, its
    max batch size lowered (warm-up or serving) where the worst-case batch did not fit. The limit must bite at least
    once (else CUDA_MEM_LIMIT_BYTES did not reach the provider)."""
    repo = tmp_path / "repo"  # tiny-classify alone: seven start-ups of one model
    shutil.copytree(app_repository / "tiny-classify", repo / "tiny-classify")
    with make_client(repo, device="cuda", max_batch_size=32) as c:
        wait_ready(c, timeout=120)
        ref = c.post("/v1/classify/batch", json={"inputs": [{"text": t} for t in TEXTS], "top_k": 3}).json()
    bitten = []
    for limit in (64 << 20, 16 << 20, 4 << 20, 2 << 20, 1 << 20, 512 << 10, 256 << 10):
        with make_client(repo, device="cuda", max_batch_size=32, cuda_mem_limit_bytes=limit,
                         cuda_arena_extend_strategy="kSameAsRequested") as c:
            m = settled(c)
            if m["state"] == "failed":
                assert "memory" in m["reason"].lower() or "alloc" in m["reason"].lower(), m
                bitten.append((limit, "load failed"))
                continue
            r = c.post("/v1/classify/batch", json={"inputs": [{"text": t} for t in TEXTS], "top_k": 3})
            assert r.status_code == 200, r.text
            assert [x["status"] for x in r.json()["results"]] == [200] * len(TEXTS)
            for got, want in zip(r.json()["results"], ref["results"]):
                assert_same(got, want)
            m = model_view(c)
            if m["batch_size_source"].startswith("lowered after out-of-memory"):
                assert m["max_batch_size"] < 32
                bitten.append((limit, m["batch_size_source"]))
    print("arena limits that bit:", bitten)
    assert bitten, "no arena limit down to 256 KiB changed anything: gpu_mem_limit did not reach the provider"


@pytest.mark.parametrize("backend", [pytest.param("onnx", marks=needs_ort_cuda), "torchscript"])
def test_out_of_memory_on_the_gpu_through_the_fault_hook(app_repository, hooks, tmp_path, backend):  # noqa: F811
    """The batcher's split on a model served on the GPU, the error raised as that runtime raises it (onnxruntime's
    BFCArena message; torch's OutOfMemoryError class)."""
    repo = app_repository
    if backend == "torchscript":
        torch_cuda_or_skip()
        repo = tmp_path / "repo"  # tiny-classify alone, with a model.pt
        shutil.copytree(app_repository / "tiny-classify", repo / "tiny-classify")
        add_torchscript(repo / "tiny-classify" / "1")
    seen: list[int] = []
    with make_client(repo, device="cuda", backend=backend, max_batch_size=32, max_delay_ms=2) as c:
        wait_ready(c, timeout=120)
        assert (model_view(c)["device"], model_view(c)["backend"]) == ("cuda:0", backend)
        ref = c.post("/v1/classify/batch", json={"inputs": [{"text": t} for t in TEXTS], "top_k": 3}).json()
        hooks(oom_above(3, seen, threading.Lock(), torch_style=backend == "torchscript"))
        r = c.post("/v1/classify/batch", json={"inputs": [{"text": t} for t in TEXTS], "top_k": 3})
        assert [x["status"] for x in r.json()["results"]] == [200] * 12
        for got, want in zip(r.json()["results"], ref["results"]):
            assert_same(got, want)
        assert seen == [12, 6, 3, 3, 6, 3, 3]
        m = model_view(c)
        assert (m["max_batch_size"], m["batch_size_source"]) == (3, "lowered after out-of-memory at 12")

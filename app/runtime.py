"""Inference runtimes: onnxruntime (default) and TorchScript (torch imported only here, only when chosen).

A runtime takes the collated tensor dict (docs/architecture.md tensor contract) and returns `logits`.
`provider` is what the runtime really uses (onnxruntime: `session.get_providers()[0]` after creation,
never what was asked for).
"""
from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from models.manifest import Manifest

log = logging.getLogger("mmserve.runtime")


class Runtime(Protocol):
    backend: str
    device: str
    provider: str
    input_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray: ...

    def close(self) -> None: ...


def cuda_device_count() -> int:
    """GPUs visible to the CUDA driver (0 when there is no driver), without importing torch."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        try:
            if lib.cuInit(0) != 0:
                return 0
            count = ctypes.c_int(0)
            if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
                return 0
            return int(count.value)
        except Exception:  # noqa: BLE001 - odd driver: treat as no GPU
            return 0
    return 0


def parse_device(device: str) -> tuple[str, int]:
    """('auto'|'cpu'|'cuda', index)."""
    if device.startswith("cuda"):
        _, _, idx = device.partition(":")
        return "cuda", int(idx or 0)
    return device, 0


class OnnxRuntime:
    backend = "onnx"

    def __init__(self, path: Path, device: str, intra_op_threads: int = 0, inter_op_threads: int = 1,
                 allow_spinning: bool = False):
        import onnxruntime as ort

        kind, index = parse_device(device)
        so = ort.SessionOptions()
        so.intra_op_num_threads = intra_op_threads
        so.inter_op_num_threads = inter_op_threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        spin = "1" if allow_spinning else "0"
        so.add_session_config_entry("session.intra_op.allow_spinning", spin)
        so.add_session_config_entry("session.inter_op.allow_spinning", spin)
        available = ort.get_available_providers()
        want_cuda = kind == "cuda" or (kind == "auto" and cuda_device_count() > 0)
        providers: list = ["CPUExecutionProvider"]
        if want_cuda and "CUDAExecutionProvider" in available:
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
        elif kind == "cuda":
            raise RuntimeError(f"device {device!r} requested but this onnxruntime has no CUDAExecutionProvider "
                               f"(available: {available})")
        self.session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        self.provider = self.session.get_providers()[0]
        if kind == "cuda" and self.provider != "CUDAExecutionProvider":
            raise RuntimeError(f"device {device!r} requested but onnxruntime fell back to {self.provider} "
                               "(no usable GPU / CUDA libraries)")
        self.device = f"cuda:{index}" if self.provider == "CUDAExecutionProvider" else "cpu"
        self.input_names = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        self._outputs = ["logits"] if "logits" in outputs else outputs[:1]

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ValueError(f"missing model inputs: {missing}")
        return self.session.run(self._outputs, {n: feeds[n] for n in self.input_names})[0]

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]


class TorchScriptRuntime:
    backend = "torchscript"

    def __init__(self, path: Path, device: str, input_names: list[str], intra_op_threads: int = 0):
        import torch  # lazily: only when the TorchScript backend is selected

        self._torch = torch
        kind, index = parse_device(device)
        has_cuda = torch.cuda.is_available()
        if kind == "cuda" and not has_cuda:
            raise RuntimeError(f"device {device!r} requested but torch sees no CUDA device")
        use_cuda = has_cuda and kind in ("cuda", "auto")
        self.device = f"cuda:{index}" if use_cuda else "cpu"
        if intra_op_threads > 0:
            torch.set_num_threads(intra_op_threads)
        self.module = torch.jit.load(str(path), map_location=self.device).eval()
        self.provider = f"torch-{'cuda' if use_cuda else 'cpu'}"
        self.input_names = list(input_names)

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            args = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device) for n in self.input_names]
            out = self.module(*args)
            if isinstance(out, dict):
                out = out["logits"]
            elif isinstance(out, (tuple, list)):
                out = out[0]
            return out.float().cpu().numpy()

    def close(self) -> None:
        self.module = None


# -------------------------------------------------------------------------------------------- fault hooks
FaultHook = Callable[[str, str, "dict[str, np.ndarray] | None"], None]
_fault_hooks: list[FaultHook] = []


def add_fault_hook(hook: FaultHook) -> Callable[[], None]:
    """Register `hook(stage, model, feeds)`, called in this process before every inference batch (stage
    "infer", the collated feeds) and every item's preprocessing (stage "preprocess", feeds None), in the thread
    that does the work. Whatever it does happens there: raise to fail the batch / item, block to hang it.
    For fault-injection tests (issue 14); nothing registers one in production. Returns the function that
    removes it."""
    _fault_hooks.append(hook)
    return lambda: _fault_hooks.remove(hook) if hook in _fault_hooks else None


def inject_faults(stage: str, model: str, feeds: dict[str, np.ndarray] | None = None) -> None:
    for hook in list(_fault_hooks):
        hook(stage, model, feeds)


class HookedRuntime:
    """A runtime whose `run` first calls the fault hooks (a no-op loop when none is registered)."""

    def __init__(self, inner: Runtime, model: str):
        self.inner = inner
        self.model = model

    def __getattr__(self, name: str) -> Any:  # backend, device, provider, input_names, ...
        return getattr(self.inner, name)

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if _fault_hooks:
            inject_faults("infer", self.model, feeds)
        return self.inner.run(feeds)

    def close(self) -> None:
        self.inner.close()


def create_runtime(backend: str, directory: Path, manifest: Manifest, device: str, intra_op_threads: int,
                   inter_op_threads: int, allow_spinning: bool) -> Runtime:
    fmt = manifest.formats.get(backend)  # type: ignore[call-overload]
    if fmt is None:
        raise RuntimeError(f"manifest has no {backend} format (has: {sorted(manifest.formats)})")
    # only a file of the version directory whose sha256 the manifest lists (checked by the loader before this):
    # never a path out of the directory, never an unlisted file (TorchScript is code: torch.jit.load runs it)
    if Path(fmt.file).name != fmt.file or fmt.file in ("", ".", ".."):
        raise RuntimeError(f"manifest's {backend} file {fmt.file!r} is not a file name of the version directory")
    if fmt.file not in manifest.files:
        raise RuntimeError(f"manifest's {backend} file {fmt.file!r} has no sha256 in the manifest: refusing to load it")
    path = Path(directory) / fmt.file
    runtime: Runtime
    if backend == "onnx":
        runtime = OnnxRuntime(path, device, intra_op_threads, inter_op_threads, allow_spinning)
    else:
        runtime = TorchScriptRuntime(path, device, [t.name for t in manifest.inputs], intra_op_threads)
    return HookedRuntime(runtime, manifest.name)  # type: ignore[return-value]

"""Inference runtimes: onnxruntime (default) and TorchScript (torch imported only here, only when chosen).

A runtime takes the collated tensor dict (docs/architecture.md tensor contract) and returns `logits`.
`provider` is what the runtime really uses (onnxruntime: `session.get_providers()[0]` after creation,
never what was asked for).

On a GPU: onnxruntime's CUDA provider runs with I/O binding (each input copied to the device once per batch,
the output left on the device by the graph and copied back once) and its memory arena sized by `CudaOptions`;
TorchScript copies its inputs through reusable page-locked (pinned) host buffers with non-blocking copies.
On CPU both keep the plain call (onnxruntime's `session.run` is the fastest there). A runtime that runs out of
device memory raises; `is_out_of_memory` recognises that error so the batcher can split the batch.
"""
from __future__ import annotations

import contextlib
import ctypes
import io
import logging
from dataclasses import dataclass
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


# What runtimes say when the device (or host) has no memory left for a batch: onnxruntime's CUDA arena
# ("BFCArena::AllocateRawInternal ... Failed to allocate memory"), CUDA / cuBLAS / cuDNN status names, torch's
# "CUDA out of memory". Matched on the message so the onnxruntime path never imports torch.
_OOM_MARKERS = ("out of memory", "out_of_memory", "failed to allocate memory", "bfcarena", "alloc_failed",
                "cudaerrormemoryallocation")


def is_out_of_memory(exc: BaseException) -> bool:
    """True when `exc` says the batch did not fit in memory (a smaller batch may): Python's MemoryError, torch's
    `torch.cuda.OutOfMemoryError` (recognised by its class name, without importing torch), or an onnxruntime /
    CUDA error whose message names an allocation failure."""
    if isinstance(exc, MemoryError) or any(c.__name__ == "OutOfMemoryError" for c in type(exc).__mro__):
        return True
    text = str(exc).lower()
    return any(marker in text for marker in _OOM_MARKERS)


@dataclass(frozen=True)
class CudaOptions:
    """onnxruntime CUDA provider settings (the provider option each sets in brackets; GPU settings in app/settings.py).

    mem_limit_bytes: the device memory arena's limit [gpu_mem_limit]; 0 leaves the provider's default (no limit).
    arena_extend_strategy: how the arena grows [arena_extend_strategy]: `kNextPowerOfTwo` (fewer, bigger
        allocations) or `kSameAsRequested` (only what is asked: tighter under a memory limit).
    cudnn_conv_algo_search: [cudnn_conv_algo_search] `EXHAUSTIVE` (benchmark every algorithm for every new input
        shape), `HEURISTIC` or `DEFAULT`.
    """

    mem_limit_bytes: int = 0
    arena_extend_strategy: str = "kNextPowerOfTwo"
    cudnn_conv_algo_search: str = "HEURISTIC"

    def provider_options(self, device_id: int) -> dict[str, str]:
        """The CUDAExecutionProvider options (onnxruntime's Python API takes them as strings)."""
        opts = {"device_id": str(device_id), "arena_extend_strategy": self.arena_extend_strategy,
                "cudnn_conv_algo_search": self.cudnn_conv_algo_search}
        if self.mem_limit_bytes > 0:
            opts["gpu_mem_limit"] = str(self.mem_limit_bytes)
        return opts


_cuda_libraries_loaded = False


def preload_cuda_libraries() -> None:
    """Load the CUDA / cuDNN libraries of the nvidia-* wheels (onnxruntime-gpu[cuda,cudnn]) once, so the CUDA
    provider finds them without LD_LIBRARY_PATH. What it prints about missing libraries goes to the debug log:
    whether CUDA really runs is read from the session afterwards (`provider`)."""
    global _cuda_libraries_loaded
    if _cuda_libraries_loaded:
        return
    _cuda_libraries_loaded = True
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is None:  # onnxruntime < 1.21
        return
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            preload()
    except Exception as exc:  # noqa: BLE001 - best effort: the provider check below is the truth
        log.debug("onnxruntime.preload_dlls failed: %s", exc)
    if out.getvalue().strip():
        log.debug("onnxruntime.preload_dlls: %s", out.getvalue().strip())


def parse_device(device: str) -> tuple[str, int]:
    """('auto'|'cpu'|'cuda', index)."""
    if device.startswith("cuda"):
        _, _, idx = device.partition(":")
        return "cuda", int(idx or 0)
    return device, 0


class OnnxRuntime:
    """onnxruntime session. On the CUDA provider each batch runs through I/O binding (`io_binding` True,
    `bound_runs` counts them); on CPU through `session.run`."""

    backend = "onnx"

    def __init__(self, path: Path, device: str, intra_op_threads: int = 0, inter_op_threads: int = 1,
                 allow_spinning: bool = False, cuda: CudaOptions | None = None):
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
            preload_cuda_libraries()
            providers.insert(0, ("CUDAExecutionProvider", (cuda or CudaOptions()).provider_options(index)))
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
        # I/O binding only where the graph runs on a device: on CPU it would add work to `session.run`
        self.io_binding = self.provider == "CUDAExecutionProvider"
        self._bind_device = ("cuda", index)  # where the output is bound (tests bind on "cpu" to check the path)
        self.bound_runs = 0

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """feeds: the contract's inputs, batch first -> logits [batch, num_labels] or [batch, sequence, num_labels]."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ValueError(f"missing model inputs: {missing}")
        if self.io_binding:
            return self.run_bound(feeds)
        return self.session.run(self._outputs, {n: feeds[n] for n in self.input_names})[0]

    def run_bound(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """One batch through I/O binding: each input handed over from host memory and copied to the device once by
        the run, the output allocated on the device (`bind_output`) and copied to host memory once afterwards."""
        binding = self.session.io_binding()
        for name in self.input_names:
            # the binding keeps the array alive; it must be C-contiguous (collate's arrays are)
            binding.bind_cpu_input(name, np.ascontiguousarray(feeds[name]))
        device_type, device_id = self._bind_device
        binding.bind_output(self._outputs[0], device_type, device_id)
        self.session.run_with_iobinding(binding)
        self.bound_runs += 1
        return binding.copy_outputs_to_cpu()[0]

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]


class PinnedStaging:
    """Page-locked host buffers for a CUDA TorchScript runtime, one per input name, reused batch after batch and
    grown when a batch needs more: `to_device(name, array)` copies the array into its buffer and starts a
    non-blocking host-to-device copy from there (pinned memory is what makes that copy asynchronous and fast).

    Reuse is safe because the runtime reads its output back with a synchronous `.cpu()` before `run` returns:
    every copy of a batch has finished before the next batch writes into the buffers (one inference thread)."""

    def __init__(self, torch: Any, device: str, pin: bool = True):
        self.torch = torch
        self.device = device
        self.pin = pin  # False only in tests on a machine without CUDA (pinning needs a CUDA device)
        self.buffers: dict[str, Any] = {}
        self.allocations = 0

    def to_device(self, name: str, array: np.ndarray) -> Any:
        torch = self.torch
        host = torch.from_numpy(np.ascontiguousarray(array))
        buf = self.buffers.get(name)
        if buf is None or buf.dtype != host.dtype or buf.numel() < host.numel():
            # grow to the next power of two: batches of slowly growing sizes do not reallocate every time
            size = 1 << max(0, host.numel() - 1).bit_length()
            buf = torch.empty(size, dtype=host.dtype, pin_memory=self.pin)
            self.buffers[name] = buf
            self.allocations += 1
        staged = buf[: host.numel()].view(host.shape)
        staged.copy_(host)
        return staged.to(self.device, non_blocking=True)


class TorchScriptRuntime:
    """A TorchScript module (`model.pt`) under `torch.inference_mode()`; on CUDA its inputs go through pinned
    host buffers (`PinnedStaging`)."""

    backend = "torchscript"
    retargeted = 0  # device constants moved from the tracing device to this one (app.jit_devices)

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
        if use_cuda:  # a model traced on a CPU machine keeps "cpu" in its graphs: served here, it must say cuda
            from app.jit_devices import retarget_devices

            self.retargeted = retarget_devices(self.module, self.device)
        self.provider = f"torch-{'cuda' if use_cuda else 'cpu'}"
        self.input_names = list(input_names)
        self.staging = PinnedStaging(torch, self.device) if use_cuda else None

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """feeds: the contract's inputs, batch first -> logits as float32 numpy (read back synchronously)."""
        torch = self._torch
        try:
            with torch.inference_mode():
                if self.staging is not None:
                    args = [self.staging.to_device(n, feeds[n]) for n in self.input_names]
                else:
                    args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.input_names]
                out = self.module(*args)
                if isinstance(out, dict):
                    out = out["logits"]
                elif isinstance(out, (tuple, list)):
                    out = out[0]
                return out.float().cpu().numpy()
        except Exception as exc:
            if self.staging is not None and is_out_of_memory(exc):
                torch.cuda.empty_cache()  # hand the failed batch's cached blocks back before the halves run
            raise

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
                   inter_op_threads: int, allow_spinning: bool, cuda: CudaOptions | None = None) -> Runtime:
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
        runtime = OnnxRuntime(path, device, intra_op_threads, inter_op_threads, allow_spinning, cuda)
    else:
        runtime = TorchScriptRuntime(path, device, [t.name for t in manifest.inputs], intra_op_threads)
    return HookedRuntime(runtime, manifest.name)  # type: ignore[return-value]

"""Model discovery and loading: scan the repository, verify, load, size the batches, warm up.

One `ModelEntry` per served model. States: pending -> loading -> warming -> ready, or failed (with a
reason). Failures are returned to the caller (`Registry`), which logs them and never stops the others.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np

from app.core.batcher import Batcher, Prepared
from app.core.calibration import size_batches
from app.core.items import Item
from app.core.preprocess import prepare
from app.runtime import CudaOptions, Runtime, create_runtime
from app.tasks import get_task
from models.manifest import Manifest, read_manifest, verify_files

log = logging.getLogger("mmserve.registry")

PENDING, LOADING, WARMING, READY, FAILED = "pending", "loading", "warming", "ready", "failed"
UNLOADED = "unloaded"  # retired by model control (replaced by a new version, or unloaded), drained, closed


@dataclass(frozen=True)
class LoadOptions:
    """What loading a model needs from the settings (MMSERVE_* names in brackets)."""

    backend: str = "onnx"  # BACKEND
    device: str = "auto"  # DEVICE
    intra_op_threads: int = 0  # INTRA_OP_THREADS
    inter_op_threads: int = 1  # INTER_OP_THREADS
    allow_spinning: bool = False  # ALLOW_SPINNING
    max_image_pixels: int | None = None  # MAX_IMAGE_PIXELS
    max_audio_seconds: float | None = None  # MAX_AUDIO_SECONDS
    max_batch_size: int | Literal["auto"] = "auto"  # MAX_BATCH_SIZE
    warmup: bool = True  # WARMUP
    cuda_mem_limit_bytes: int = 0  # CUDA_MEM_LIMIT_BYTES
    cuda_arena_extend_strategy: str = "kNextPowerOfTwo"  # CUDA_ARENA_EXTEND_STRATEGY
    cudnn_conv_algo_search: str = "HEURISTIC"  # CUDNN_CONV_ALGO_SEARCH


@dataclass(eq=False)
class ModelEntry:
    name: str
    version: int | None
    directory: Path | None
    state: str = PENDING
    reason: str | None = None
    manifest: Manifest | None = None
    runtime: Runtime | None = None
    preprocessor: Any = None
    batcher: Batcher | None = None
    max_batch_size: int = 1
    batch_size_source: str | None = None  # settings | manifest | auto-calibrated | lowered after out-of-memory at N
    batch_calibration: dict[int, float] | None = None  # batch size -> items/s measured at start-up (auto)
    load_seconds: float | None = None
    warmup_seconds: float | None = None
    pad_id: int = 0
    active: int = 0  # requests running on this entry (`Service.run_items`); a replaced entry drains to 0
    retired: bool = False  # replaced (hot reload) or unloaded: no new request may start on it
    stalled_timeouts: int = 0  # requests in a row that timed out while the model made no progress (Service)
    unhealthy: str | None = None  # why the model counts as hung (/readyz); cleared by its next answer

    @property
    def task(self) -> str | None:
        return self.manifest.task if self.manifest else None

    def batch_size_lowered(self, size: int, source: str) -> None:
        """The batcher's `on_lowered`: a batch ran out of memory, no batch is bigger than `size` from now on."""
        self.max_batch_size, self.batch_size_source = size, source

    # -- inference (runs in the model's inference thread) ----------------------------------
    def infer(self, payloads: list[Prepared]) -> list[np.ndarray]:
        from models.preprocessing import collate

        assert self.manifest is not None and self.runtime is not None
        feeds = collate([p.features for p in payloads], self.manifest.modality_names, self.manifest.preprocessing,
                        pad_id=self.pad_id)
        logits = np.asarray(self.runtime.run(feeds))
        if logits.shape[0] != len(payloads):
            raise RuntimeError(f"model returned {logits.shape[0]} rows for a batch of {len(payloads)}")
        task = get_task(self.manifest.task)
        return [task.output_row(logits, i, p.length) for i, p in enumerate(payloads)]


# ------------------------------------------------------------------------------------ discovery
def single_model_manifest(repository: Path) -> Path | None:
    """KServe's layout, where the repository is ONE model's directory: the manifest of its latest version
    (`VERSION/manifest.json`, or `manifest.json` at the top); None for a NAME/VERSION repository (whose top
    level never holds a manifest, nor version directories with one)."""
    if (repository / "manifest.json").is_file():
        return repository / "manifest.json"
    for version in reversed(list_versions(repository) if repository.is_dir() else []):
        if (repository / str(version) / "manifest.json").is_file():
            return repository / str(version) / "manifest.json"
    return None


def single_model_name(repository: Path) -> str:
    """The served name of a single-model repository: MMSERVE_MODEL_NAME (checked by Settings at start-up),
    else the manifest's name, else the directory's name."""
    name = os.environ.get("MMSERVE_MODEL_NAME", "").strip()
    if name:
        return name
    manifest = single_model_manifest(repository)
    try:
        name = json.loads(manifest.read_text(encoding="utf-8"))["name"] if manifest else ""
    except (OSError, ValueError, KeyError, TypeError):
        name = ""
    return name if isinstance(name, str) and name else repository.name


def list_models(repository: Path) -> dict[str, Path]:
    """The model directories of the repository by name (export's temporary directories, names starting with
    '.' or '_', are not models). The only source of model paths: names from requests are looked up here,
    never joined into paths. A single-model repository (KServe's `/mnt/models`) is its one model."""
    if not repository.is_dir():
        return {}
    if single_model_manifest(repository) is not None:
        return {single_model_name(repository): repository}
    return {d.name: d for d in sorted(repository.iterdir()) if d.is_dir() and not d.name.startswith((".", "_"))}


def list_versions(model_dir: Path) -> list[int]:
    return sorted(int(v.name) for v in model_dir.iterdir() if v.is_dir() and v.name.isdigit())


def version_entry(name: str, model_dir: Path, version: int | None) -> ModelEntry:
    """An entry for `version` (None: the latest) of the model in `model_dir`, its manifest read; FAILED with
    the reason when it cannot be served."""
    versions = list_versions(model_dir)
    entry = ModelEntry(name, version, None)
    if not versions and (model_dir / "manifest.json").is_file():  # one version, manifest at the top (KServe)
        try:
            entry.manifest = read_manifest(model_dir)
        except Exception as exc:  # noqa: BLE001
            entry.state, entry.reason = FAILED, f"invalid manifest: {type(exc).__name__}: {exc}"
            return entry
        if version is not None and version != entry.manifest.version:
            entry.state, entry.reason = FAILED, f"pinned version {version} not found (have {[entry.manifest.version]})"
            entry.manifest = None
        else:
            entry.version, entry.directory = entry.manifest.version, model_dir
        return entry
    if version is not None and version not in versions:
        entry.state, entry.reason = FAILED, f"pinned version {version} not found (have {versions})"
    elif version is None and not versions:
        entry.state, entry.reason = FAILED, "no version directory"
    else:
        entry.version = version if version is not None else versions[-1]
        entry.directory = model_dir / str(entry.version)
        try:  # read now so the task is known while the model loads
            entry.manifest = read_manifest(entry.directory)
        except Exception as exc:  # noqa: BLE001
            entry.state, entry.reason = FAILED, f"invalid manifest: {type(exc).__name__}: {exc}"
    return entry


def discover(repository: Path, pinned: dict[str, int]) -> dict[str, ModelEntry]:
    """One entry per model directory (its pinned or latest version, manifest read) and per pinned model
    that is absent; entries that cannot be served are already FAILED with their reason."""
    pinned = dict(pinned)
    entries: dict[str, ModelEntry] = {}
    if not repository.is_dir():
        log.error("model repository %s does not exist", repository)
    for name, model_dir in list_models(repository).items():
        entries[name] = version_entry(name, model_dir, pinned.pop(name, None))
    for name, version in pinned.items():  # pinned but absent
        entries[name] = ModelEntry(name, version, None, state=FAILED,
                                   reason=f"pinned in MODEL_VERSIONS but not in repository {repository}")
    return entries


# ------------------------------------------------------------------------------------ loading
def load_preprocessing(entry: ModelEntry, *, max_image_pixels: int | None, max_audio_seconds: float | None) -> None:
    """What preprocessing an entry needs, without a runtime: its manifest (read if not yet) and its `Preprocessor`
    (tokenizer, image and audio settings). A front-end process (MMSERVE_WORKERS > 1) loads only this."""
    from models.preprocessing import Preprocessor  # numpy/PIL/tokenizers only

    assert entry.directory is not None
    if entry.manifest is None:
        entry.manifest = read_manifest(entry.directory)
    entry.preprocessor = Preprocessor(entry.manifest.preprocessing, entry.directory,
                                      max_image_pixels=max_image_pixels, max_audio_seconds=max_audio_seconds)
    entry.pad_id = int(getattr(entry.preprocessor, "pad_id", 0) or 0)


class ModelLoader:
    """Verifies, loads, sizes and warms one model (in a worker thread). `on_state(entry)` after each state change."""

    def __init__(self, options: LoadOptions, metrics: Any, on_state: Callable[[ModelEntry], None]):
        self.options = options
        self.metrics = metrics
        self.on_state = on_state

    def load(self, entry: ModelEntry) -> None:
        """Raises on any failure (the runtime, if created, stays on the entry for the caller to close)."""
        o = self.options
        assert entry.directory is not None
        entry.state = LOADING
        self.on_state(entry)
        t0 = time.perf_counter()
        manifest = entry.manifest or read_manifest(entry.directory)
        renamed = entry.name == os.environ.get("MMSERVE_MODEL_NAME", "").strip()  # single-model layout, MODEL_NAME
        if (manifest.name != entry.name and not renamed) or manifest.version != entry.version:
            raise RuntimeError(f"manifest says {manifest.name}:{manifest.version}, "
                               f"directory is {entry.name}/{entry.version}")
        problems = verify_files(entry.directory, manifest)
        if problems:
            raise RuntimeError("file integrity check failed: " + "; ".join(problems))
        entry.manifest = manifest
        load_preprocessing(entry, max_image_pixels=o.max_image_pixels, max_audio_seconds=o.max_audio_seconds)
        entry.runtime = create_runtime(o.backend, entry.directory, manifest, o.device, o.intra_op_threads,
                                       o.inter_op_threads, o.allow_spinning,
                                       CudaOptions(o.cuda_mem_limit_bytes, o.cuda_arena_extend_strategy,
                                                   o.cudnn_conv_algo_search))
        expected = [t.name for t in manifest.inputs]
        if sorted(entry.runtime.input_names) != sorted(expected):
            raise RuntimeError(f"model inputs {entry.runtime.input_names} differ from manifest {expected}")
        cap = max(1, manifest.max_batch_size)
        if o.max_batch_size == "auto":
            entry.max_batch_size, entry.batch_size_source = cap, "manifest"
        else:
            entry.max_batch_size = min(o.max_batch_size, cap)
            entry.batch_size_source = "settings" if o.max_batch_size <= cap else "manifest"
        entry.load_seconds = time.perf_counter() - t0
        self.metrics.load_seconds.labels(entry.name, str(entry.version)).set(entry.load_seconds)
        entry.state = WARMING
        self.on_state(entry)
        if o.warmup:
            t1 = time.perf_counter()
            self.warm_up(entry)
            entry.warmup_seconds = time.perf_counter() - t1
            self.metrics.warmup_seconds.labels(entry.name, str(entry.version)).set(entry.warmup_seconds)

    def warm_up(self, entry: ModelEntry) -> None:
        """Worst case: max sequence length, every modality present; a batch of 1, the batch sizing, a batch of 1.

        The sizing runs worst-case batches (`calibration.size_batches`): MAX_BATCH_SIZE=auto times sizes on the
        model's device (CPU or GPU) and keeps the one chosen; a fixed size that runs out of memory is halved until it
        fits. Either way the worst-case batch of the size in use has run before the model is ready."""
        assert entry.manifest is not None and entry.runtime is not None
        item = prepare(entry, get_task(entry.manifest.task), warmup_item(entry))
        check_outputs(entry, entry.infer([item]))  # first run: allocations, lazy init
        t0 = time.perf_counter()
        sizing = size_batches(lambda size: check_outputs(entry, entry.infer([item] * size)), entry.max_batch_size,
                              auto=self.options.max_batch_size == "auto", on_gpu=entry.runtime.device != "cpu",
                              timer=time.perf_counter)
        if sizing.items_per_s is not None:
            entry.max_batch_size, entry.batch_size_source = sizing.size, sizing.source
            entry.batch_calibration = sizing.items_per_s
            log.info("model %s:%s batch size %d (%s on %s in %.2fs: %s items/s)", entry.name, entry.version,
                     entry.max_batch_size, sizing.source, entry.runtime.device, time.perf_counter() - t0,
                     ", ".join(f"b{k} {v:.1f}" for k, v in entry.batch_calibration.items()))
        elif sizing.size < entry.max_batch_size:
            log.warning("model %s:%s: a worst-case batch of %d ran out of memory at warm-up; max batch size %d",
                        entry.name, entry.version, entry.max_batch_size, sizing.size)
            entry.max_batch_size, entry.batch_size_source = sizing.size, sizing.source
        check_outputs(entry, entry.infer([item]))


def check_outputs(entry: ModelEntry, outs: list[np.ndarray]) -> None:
    assert entry.manifest is not None
    n_labels = len(entry.manifest.labels)
    if outs[0].shape[-1] != n_labels:
        raise RuntimeError(f"model outputs {outs[0].shape[-1]} scores per item, manifest has {n_labels} labels")
    if not np.all(np.isfinite(outs[0])):
        raise RuntimeError("warm-up produced non-finite logits")


def warmup_item(entry: ModelEntry) -> Item:
    """Worst case: text past the max sequence length, every modality present (a grey image, a silent clip
    as long as the model reads), as encoded files so warm-up takes the requests' preprocessing path."""
    from PIL import Image
    import soundfile as sf

    m, pre = entry.manifest, entry.preprocessor
    assert m is not None
    spec, mods = m.preprocessing, m.modality_names
    item = Item()
    if "text" in mods and spec.text is not None:
        item.text = " ".join(["warmup"] * (4 * spec.text.max_length))
    if "image" in mods and spec.image is not None:
        side = max(1, min(spec.image.size, math.isqrt(pre.max_image_pixels)))  # uniform grey: any size looks alike
        buf = io.BytesIO()
        Image.new("RGB", (side, side), (127, 127, 127)).save(buf, format="PNG")
        item.image = buf.getvalue()
    if "audio" in mods and spec.audio is not None:
        a = spec.audio
        seconds = min(a.max_seconds, pre.max_audio_seconds)
        buf = io.BytesIO()
        sf.write(buf, np.zeros(int(seconds * a.sample_rate), np.float32), a.sample_rate, format="WAV",
                 subtype="FLOAT")
        item.audio = buf.getvalue()
    return item

"""Model repository: scan, verify, load, warm up; one entry (and one batcher) per served model.

States: pending -> loading -> warming -> ready, or failed (with a reason). A failed model is
logged, listed in /v1/models and /readyz with its reason, and never stops the others.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from app.batcher import Batcher
from app.errors import ApiError, NotReady
from app.metrics import Metrics
from app.runtime import Runtime, create_runtime
from app.settings import Settings
from models.manifest import Manifest, read_manifest, verify_files

log = logging.getLogger("mmserve.registry")

PENDING, LOADING, WARMING, READY, FAILED = "pending", "loading", "warming", "ready", "failed"

# MAX_BATCH_SIZE=auto on CPU: time real batches after warm-up, keep the smallest size near the best
CALIBRATION_BUDGET_S = 2.0  # model time per model, about (a bigger next size is skipped when it would overrun)
CALIBRATION_REPS = 2  # runs per size at least; the fastest counts (the first run of a new shape may allocate)
CALIBRATION_MIN_SIZE_S = 0.05  # ... and more runs (up to 50) while a size has had less than this (fast models: noise)
CALIBRATION_STOP = 0.9  # stop trying larger sizes once items/s falls below this share of the best so far
CALIBRATION_TOLERANCE = 0.05  # choose the smallest size within 5% of the best items/s


def calibration_sizes(max_size: int) -> list[int]:
    """1, 2, 4, ... below max_size, then max_size itself."""
    sizes, n = [], 1
    while n < max_size:
        sizes.append(n)
        n *= 2
    return sizes + [max(1, max_size)]


def measure_batch_sizes(run_once: Callable[[int], float], max_size: int, *, budget_s: float = CALIBRATION_BUDGET_S,
                        reps: int = CALIBRATION_REPS, min_size_s: float = CALIBRATION_MIN_SIZE_S,
                        stop_ratio: float = CALIBRATION_STOP) -> dict[int, float]:
    """Seconds per batch (fastest of at least `reps` runs, more while the size has had less than `min_size_s`)
    for batch sizes 1, 2, 4, ... up to max_size.

    `run_once(size)` runs one batch and returns its seconds. Bounded: a size is not started when its estimated
    cost (reps x size x the last size's seconds per item) would take the total past `budget_s` (size 1 always
    runs), and the sweep stops once items/s falls below `stop_ratio` of the best so far."""
    timings: dict[int, float] = {}
    spent = best = 0.0
    for size in calibration_sizes(max_size):
        if timings:
            last = max(timings)
            if spent + reps * size * timings[last] / last > budget_s:
                break
        runs: list[float] = []
        while len(runs) < reps or (sum(runs) < min_size_s and len(runs) < 50):
            runs.append(run_once(size))
            spent += runs[-1]
            if spent > budget_s:
                break
        timings[size] = min(runs)
        rate = size / max(timings[size], 1e-9)
        if rate < stop_ratio * best:
            break
        best = max(best, rate)
    return timings


def choose_batch_size(timings: dict[int, float], tolerance: float = CALIBRATION_TOLERANCE) -> int:
    """The smallest batch size whose items/s is within `tolerance` of the best measured."""
    rates = {size: size / max(seconds, 1e-9) for size, seconds in timings.items()}
    best = max(rates.values())
    return min(size for size, rate in rates.items() if rate >= (1.0 - tolerance) * best)


@dataclass
class Prepared:
    """One preprocessed request: the batcher's payload."""

    features: Any  # models.preprocessing.Features
    length: int | None  # real token count (NER output rows to keep)
    meta: dict[str, Any] = field(default_factory=dict)


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
    batch_size_source: str | None = None  # settings | manifest | auto-calibrated
    batch_calibration: dict[int, float] | None = None  # batch size -> items/s measured at start-up (auto, CPU)
    load_seconds: float | None = None
    warmup_seconds: float | None = None
    pad_id: int = 0

    @property
    def task(self) -> str | None:
        return self.manifest.task if self.manifest else None

    # -- inference (runs in the model's inference thread) ----------------------------------
    def infer(self, payloads: list[Prepared]) -> list[np.ndarray]:
        from models.preprocessing import collate

        assert self.manifest is not None and self.runtime is not None
        feeds = collate([p.features for p in payloads], self.manifest.modality_names, self.manifest.preprocessing,
                        pad_id=self.pad_id)
        logits = np.asarray(self.runtime.run(feeds))
        if logits.shape[0] != len(payloads):
            raise RuntimeError(f"model returned {logits.shape[0]} rows for a batch of {len(payloads)}")
        if self.manifest.task == "ner":
            return [logits[i, : p.length] for i, p in enumerate(payloads)]
        return [logits[i] for i in range(len(payloads))]

    def describe(self, detail: bool = False) -> dict[str, Any]:
        rt = self.runtime
        out: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "task": self.task,
            "state": self.state,
            "reason": self.reason,
            "backend": rt.backend if rt else None,
            "device": rt.device if rt else None,
            "provider": rt.provider if rt else None,
            "max_batch_size": self.max_batch_size,
            "batch_size_source": self.batch_size_source,
        }
        m = self.manifest
        if m is not None:
            out.update(
                modalities=[mi.model_dump() for mi in m.modalities],
                multi_label=m.multi_label,
                num_labels=len(m.labels),
            )
        if detail and m is not None:
            out.update(
                labels=m.labels,
                inputs=[t.model_dump() for t in m.inputs],
                outputs=[t.model_dump() for t in m.outputs],
                preprocessing=m.preprocessing.model_dump(),
                formats={k: v.model_dump() for k, v in m.formats.items()},
                metrics=m.metrics,
                parity=[p.model_dump() for p in m.parity],
                created_at=m.created_at,
                source_run=m.source_run,
                package_version=m.package_version,
                load_seconds=self.load_seconds,
                warmup_seconds=self.warmup_seconds,
                batch_calibration=({str(k): round(v, 2) for k, v in self.batch_calibration.items()}
                                   if self.batch_calibration else None),
                queue_depth=self.batcher.depth if self.batcher else 0,
            )
        return out


class Registry:
    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.entries: dict[str, ModelEntry] = {}
        self.loading_done = False
        self.draining = False

    # -- discovery ---------------------------------------------------------------------------
    def scan(self) -> list[ModelEntry]:
        repo = Path(self.settings.repository)
        pinned = dict(self.settings.model_versions)
        entries: dict[str, ModelEntry] = {}
        if not repo.is_dir():
            log.error("model repository %s does not exist", repo)
        else:
            for model_dir in sorted(repo.iterdir()):
                if not model_dir.is_dir() or model_dir.name.startswith((".", "_")):
                    continue  # export's temporary directories start with '.'
                name = model_dir.name
                versions = sorted(int(v.name) for v in model_dir.iterdir() if v.is_dir() and v.name.isdigit())
                version = pinned.pop(name, None)
                entry = ModelEntry(name, version, None)
                if version is not None and version not in versions:
                    self._fail(entry, f"pinned version {version} not found (have {versions})")
                elif version is None and not versions:
                    self._fail(entry, "no version directory")
                else:
                    entry.version = version if version is not None else versions[-1]
                    entry.directory = model_dir / str(entry.version)
                    try:  # read now so the task is known while the model loads
                        entry.manifest = read_manifest(entry.directory)
                    except Exception as exc:  # noqa: BLE001
                        self._fail(entry, f"invalid manifest: {type(exc).__name__}: {exc}")
                entries[name] = entry
        for name, version in pinned.items():  # pinned but absent
            entry = ModelEntry(name, version, None)
            self._fail(entry, f"pinned in MODEL_VERSIONS but not in repository {repo}")
            entries[name] = entry
        self.entries = entries
        for e in entries.values():
            if e.state != FAILED:
                self._info(e)
        log.info("repository %s: %d model(s): %s", repo, len(entries),
                 ", ".join(f"{e.name}:{e.version}" for e in entries.values()) or "none")
        return list(entries.values())

    # -- loading -----------------------------------------------------------------------------
    async def load_all(self) -> None:
        """Load and warm every pending model, one after another, off the event loop."""
        try:
            for entry in list(self.entries.values()):
                if entry.state != PENDING or self.draining:
                    continue
                ok = await asyncio.to_thread(self._load, entry)
                if ok and self.draining:  # shutdown began while it loaded: drain() has not seen this runtime
                    entry.runtime.close()
                    break
                if ok:
                    s = self.settings
                    entry.batcher = Batcher(entry.name, entry.infer, max_batch_size=entry.max_batch_size,
                                            max_delay_s=s.max_delay_ms / 1000.0, queue_size=s.queue_size,
                                            metrics=self.metrics)
                    entry.batcher.start()
                    entry.state = READY
                    self._info(entry)
                    log.info("model %s:%s ready (backend=%s device=%s provider=%s load=%.2fs warmup=%.2fs)",
                             entry.name, entry.version, entry.runtime.backend, entry.runtime.device,
                             entry.runtime.provider, entry.load_seconds, entry.warmup_seconds or 0.0)
        finally:
            self.loading_done = True
            ready = sum(e.state == READY for e in self.entries.values())
            log.info("model loading finished: %d ready, %d failed", ready,
                     sum(e.state == FAILED for e in self.entries.values()))

    def _load(self, entry: ModelEntry) -> bool:
        s = self.settings
        assert entry.directory is not None
        entry.state = LOADING
        self._info(entry)
        t0 = time.perf_counter()
        try:
            manifest = entry.manifest or read_manifest(entry.directory)
            if manifest.name != entry.name or manifest.version != entry.version:
                raise RuntimeError(f"manifest says {manifest.name}:{manifest.version}, "
                                   f"directory is {entry.name}/{entry.version}")
            problems = verify_files(entry.directory, manifest)
            if problems:
                raise RuntimeError("file integrity check failed: " + "; ".join(problems))
            entry.manifest = manifest
            from models.preprocessing import Preprocessor  # numpy/PIL/tokenizers only

            entry.preprocessor = Preprocessor(manifest.preprocessing, entry.directory,
                                              max_image_pixels=s.max_image_pixels,
                                              max_audio_seconds=s.max_audio_seconds)
            entry.pad_id = int(getattr(entry.preprocessor, "pad_id", 0) or 0)
            entry.runtime = create_runtime(s.backend, entry.directory, manifest, s.device, s.intra_op_threads,
                                           s.inter_op_threads, s.allow_spinning)
            expected = [t.name for t in manifest.inputs]
            if sorted(entry.runtime.input_names) != sorted(expected):
                raise RuntimeError(f"model inputs {entry.runtime.input_names} differ from manifest {expected}")
            cap = max(1, manifest.max_batch_size)
            if s.max_batch_size == "auto":
                entry.max_batch_size, entry.batch_size_source = cap, "manifest"
            else:
                entry.max_batch_size = min(s.max_batch_size, cap)
                entry.batch_size_source = "settings" if s.max_batch_size <= cap else "manifest"
            entry.load_seconds = time.perf_counter() - t0
            self.metrics.load_seconds.labels(entry.name, str(entry.version)).set(entry.load_seconds)
            entry.state = WARMING
            self._info(entry)
            if s.warmup:
                t1 = time.perf_counter()
                self._warm_up(entry)
                entry.warmup_seconds = time.perf_counter() - t1
                self.metrics.warmup_seconds.labels(entry.name, str(entry.version)).set(entry.warmup_seconds)
            return True
        except Exception as exc:  # noqa: BLE001 - any failure marks this model failed, others go on
            log.exception("model %s:%s failed to load", entry.name, entry.version)
            self._fail(entry, f"{type(exc).__name__}: {exc}")
            if entry.runtime is not None:
                entry.runtime.close()
                entry.runtime = None
            return False

    def _warm_up(self, entry: ModelEntry) -> None:
        """Worst case: max batch size, max sequence length, every modality present; then a batch of 1.

        MAX_BATCH_SIZE=auto on CPU: first calibrate the batch size on these worst-case items (see
        `measure_batch_sizes`), so the worst-case batch is the chosen size, not the manifest's."""
        item = self._warmup_item(entry)
        if self.settings.max_batch_size == "auto" and entry.runtime is not None and entry.runtime.device == "cpu":
            self._check_outputs(entry, entry.infer([item]))  # first run: allocations, lazy init

            def run_once(size: int) -> float:
                t0 = time.perf_counter()
                entry.infer([item] * size)
                return time.perf_counter() - t0

            t0 = time.perf_counter()
            timings = measure_batch_sizes(run_once, entry.max_batch_size)
            entry.max_batch_size = choose_batch_size(timings)
            entry.batch_size_source = "auto-calibrated"
            entry.batch_calibration = {size: size / max(sec, 1e-9) for size, sec in timings.items()}
            log.info("model %s:%s batch size %d (auto-calibrated on cpu in %.2fs: %s items/s)", entry.name,
                     entry.version, entry.max_batch_size, time.perf_counter() - t0,
                     ", ".join(f"b{k} {v:.1f}" for k, v in entry.batch_calibration.items()))
        for size in (entry.max_batch_size, 1):
            self._check_outputs(entry, entry.infer([item] * size))

    @staticmethod
    def _check_outputs(entry: ModelEntry, outs: list[np.ndarray]) -> None:
        assert entry.manifest is not None
        n_labels = len(entry.manifest.labels)
        if outs[0].shape[-1] != n_labels:
            raise RuntimeError(f"model outputs {outs[0].shape[-1]} scores per item, manifest has {n_labels} labels")
        if not np.all(np.isfinite(outs[0])):
            raise RuntimeError("warm-up produced non-finite logits")

    @staticmethod
    def _warmup_item(entry: ModelEntry) -> Prepared:
        """Worst case: max sequence length, every modality present."""
        from PIL import Image

        from models.preprocessing import Features

        m, pre = entry.manifest, entry.preprocessor
        assert m is not None
        spec = m.preprocessing
        f = Features()
        mods = m.modality_names
        if "text" in mods and spec.text is not None:
            enc = pre.encode_text(" ".join(["warmup"] * (4 * spec.text.max_length)))
            f.input_ids, f.attention_mask = enc.input_ids, enc.attention_mask
        if "image" in mods and spec.image is not None:
            f.pixel_values = pre.image_from_pil(Image.new("RGB", (spec.image.size, spec.image.size), (127, 127, 127)))
        if "audio" in mods and spec.audio is not None:
            f.audio_features = pre.audio_from_waveform(np.zeros(spec.audio.num_samples, np.float32),
                                                       spec.audio.sample_rate)
        length = len(f.input_ids) if f.input_ids is not None else None
        return Prepared(f, length)

    # -- lookup ------------------------------------------------------------------------------
    def choose(self, task: str, name: str | None) -> ModelEntry:
        if name:
            entry = self.entries.get(name)
            if entry is None:
                raise ApiError(404, "model_not_found",
                               f"no model named '{name}'; available: {sorted(self.entries)}")
            if entry.task is not None and entry.task != task:
                raise ApiError(422, "wrong_task", f"model '{name}' serves task '{entry.task}', not '{task}'")
        else:
            candidates = [e for e in self.entries.values() if e.task == task]
            if not candidates:
                raise ApiError(404, "no_model_for_task", f"no model serves task '{task}'; "
                               f"available: {sorted(self.entries)}")
            if len(candidates) > 1:
                raise ApiError(422, "ambiguous_model", f"several models serve task '{task}'; choose one with "
                               f"'model': {sorted(e.name for e in candidates)}",
                               details={"choices": sorted(e.name for e in candidates)})
            entry = candidates[0]
        if entry.state == FAILED:
            raise ApiError(503, "model_failed", f"model '{entry.name}' failed to load: {entry.reason}")
        if entry.state != READY or entry.batcher is None or self.draining:
            self.metrics.rejections.labels(entry.name, "not_ready").inc()
            raise NotReady(f"model '{entry.name}' is {('shutting down' if self.draining else entry.state)}")
        return entry

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        states = {e.name: e.state for e in self.entries.values()}
        failed = {e.name: e.reason for e in self.entries.values() if e.state == FAILED}
        ready_n = sum(s == READY for s in states.values())
        ok = self.loading_done and ready_n > 0 and not self.draining
        ok = ok and all(s in (READY, FAILED) for s in states.values())
        if self.settings.strict_readiness and failed:
            ok = False
        body = {"ready": ok, "models": states, "failed": failed}
        if self.draining:
            body["draining"] = True
        return ok, body

    # -- shutdown ----------------------------------------------------------------------------
    async def drain(self, timeout: float) -> None:
        self.draining = True
        batchers = [e.batcher for e in self.entries.values() if e.batcher is not None]
        await asyncio.gather(*(b.drain(timeout) for b in batchers), return_exceptions=True)
        for e in self.entries.values():
            if e.runtime is not None:
                e.runtime.close()

    # -- helpers -----------------------------------------------------------------------------
    def _fail(self, entry: ModelEntry, reason: str) -> None:
        entry.state = FAILED
        entry.reason = reason
        log.error("model %s:%s failed: %s", entry.name, entry.version, reason)
        self._info(entry)

    def _info(self, entry: ModelEntry) -> None:
        rt = entry.runtime
        self.metrics.set_model_info(entry.name, str(entry.version), rt.backend if rt else self.settings.backend,
                                    rt.device if rt else "", rt.provider if rt else "", entry.state)

"""Parity: exported files against eager PyTorch (export) and against each other (`mmserve validate`).

One tolerance for both: logits within `TOLERANCE` (max abs diff) and identical predictions.
Export probes every written format on real dev batches (`parity_batches`: batch 1, 3 and up to 8,
several padded lengths) times every allowed subset of modalities (`modality_subsets`, the others
masked out with `mask_modalities`). Runners load each format the way a server does: onnxruntime on
the CPU provider, `torch.jit.load`. Torch is imported only by the functions that run torch.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Sequence

import numpy as np

from models import contract
from models.manifest import ModalityInfo, ParityResult
from models.spec import MODALITIES, ModelConfig, PreprocessSpec
from training.export_error import ExportError
from training.export_formats import FILES

TOLERANCE = 1e-4
PARITY_BATCH_SIZES = (1, 3, 8)


# --------------------------------------------------------------------------- which probes


def modality_infos(config: ModelConfig) -> list[ModalityInfo]:
    """Text is required whenever the model uses it; VQA also requires the image."""
    required = set()
    if "text" in config.modalities:
        required.add("text")
    if config.task == "vqa" and "image" in config.modalities:
        required.add("image")
    return [ModalityInfo(name=m, required=m in required) for m in MODALITIES if m in config.modalities]


def modality_subsets(infos: list[ModalityInfo]) -> list[list[str]]:
    """Every non-empty subset of the model's modalities that contains all required ones (largest first)."""
    names = [i.name for i in infos]
    required = {i.name for i in infos if i.required}
    subsets = []
    for k in range(len(names), 0, -1):
        for combo in itertools.combinations(names, k):
            if required <= set(combo):
                subsets.append(list(combo))
    return subsets


def mask_modalities(batch: dict[str, np.ndarray], present: Sequence[str]) -> dict[str, np.ndarray]:
    """A copy of `batch` with every media modality not in `present` absent (all its inputs zeros, presence 0)."""
    out = dict(batch)
    for modality in contract.PRESENCE:
        if modality in present:
            continue
        for name in contract.inputs_of(modality):
            if name in out:
                out[name] = np.zeros_like(out[name])
    return out


def parity_batches(features: list, modalities, spec: PreprocessSpec, pad_id: int) -> list[dict[str, np.ndarray]]:
    """Batches of 1 (shortest and longest record), 3 and up to 8, mixing sequence lengths."""
    from models.preprocessing import collate

    def length(f) -> int:
        return len(f.input_ids) if f.input_ids is not None else 0

    ordered = sorted(features, key=length)
    n = len(ordered)
    picks: list[list] = [[ordered[0]]]
    if n > 1:
        picks.append([ordered[-1]])
    for size in PARITY_BATCH_SIZES[1:]:
        size = min(size, n)
        if size <= 1 or any(len(p) == size for p in picks):
            continue
        # spread over the length range so rows are padded to different degrees
        idx = np.linspace(0, n - 1, size).round().astype(int)
        if size == PARITY_BATCH_SIZES[1]:
            idx = np.linspace(0, n // 2, size).round().astype(int)  # a shorter padded length than the 8-batch
        picks.append([ordered[i] for i in idx])
    return [collate(p, modalities, spec, pad_id=pad_id) for p in picks]


# --------------------------------------------------------------------------- comparing


def compare_logits(
    reference: np.ndarray, other: np.ndarray, task: str, multi_label: bool, attention_mask: np.ndarray | None
) -> tuple[float, bool]:
    """(max abs diff, predictions identical); NER compares non-padding tokens only."""
    if reference.shape != other.shape:
        return float("inf"), False
    if task == "ner" and attention_mask is not None:
        keep = attention_mask.astype(bool)
        reference, other = reference[keep], other[keep]
    if reference.size == 0:
        return 0.0, True
    if not (np.isfinite(reference).all() and np.isfinite(other).all()):
        return float("inf"), False
    diff = float(np.max(np.abs(reference.astype(np.float64) - other.astype(np.float64))))
    if multi_label:
        same = bool(np.array_equal(reference > 0, other > 0))
    else:
        same = bool(np.array_equal(reference.argmax(-1), other.argmax(-1)))
    return diff, same


def within_tolerance(diff: float, same: bool, tolerance: float = TOLERANCE) -> bool:
    return diff <= tolerance and same


# --------------------------------------------------------------------------- runners


def onnx_session(path: Path):
    """A fresh onnxruntime session on the CPU provider (explicitly: onnxruntime-gpu would try CUDA)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, batch: dict[str, np.ndarray]) -> np.ndarray:
    feeds = {i.name: batch[i.name] for i in session.get_inputs()}
    return session.run([contract.LOGITS], feeds)[0]


def load_torchscript(path: Path):
    import torch

    module = torch.jit.load(str(path), map_location="cpu")
    module.eval()
    return module


def run_torchscript(module, names: Sequence[str], batch: dict[str, np.ndarray]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return module(*[torch.from_numpy(np.ascontiguousarray(batch[n])) for n in names]).numpy()


def run_eager(model, names: Sequence[str], batch: dict[str, np.ndarray]) -> np.ndarray:
    """The reference: the PyTorch model itself, called with keyword inputs."""
    import torch

    with torch.inference_mode():
        out = model(**{n: torch.from_numpy(np.ascontiguousarray(batch[n])) for n in names})
    if isinstance(out, dict):
        out = out[contract.LOGITS]
    elif hasattr(out, contract.LOGITS):
        out = getattr(out, contract.LOGITS)
    return out.detach().float().numpy()


# --------------------------------------------------------------------------- export's check


def check_parity(
    run, names: Sequence[str], batches: list[dict[str, np.ndarray]], directory: Path, formats: Sequence[str],
    tolerance: float = TOLERANCE,
) -> list[ParityResult]:
    """Run each written format, loaded fresh from `directory`, against eager `run.model` (an
    `ExportRun`) on every batch and modality subset. Raises ExportError naming the first failed probe."""
    runners = {}
    if "onnx" in formats:
        session = onnx_session(directory / FILES["onnx"])
        runners["onnx"] = lambda b: run_onnx(session, b)
    if "torchscript" in formats:
        module = load_torchscript(directory / FILES["torchscript"])
        runners["torchscript"] = lambda b: run_torchscript(module, names, b)
    subsets = modality_subsets(modality_infos(run.config))
    results = []
    failures = []
    for batch in batches:
        size, seq = contract.batch_size(batch), contract.sequence_length(batch)
        for present in subsets:
            probe = mask_modalities(batch, present)
            reference = run_eager(run.model, names, probe)
            where = f"batch={size} seq={seq} present={'+'.join(present)}"
            for fmt, runner in runners.items():
                try:
                    got = runner(probe)
                except Exception as exc:  # noqa: BLE001 - reported with the probe that failed
                    failures.append(f"{fmt} {where}: run failed: {exc}")
                    continue
                diff, same = compare_logits(reference, got, run.config.task, run.config.multi_label,
                                            probe.get(contract.ATTENTION_MASK))
                results.append(ParityResult(format=fmt, batch_size=size, sequence_length=seq, present=present,
                                            max_abs_diff=diff, predictions_match=same))
                if not within_tolerance(diff, same, tolerance):
                    failures.append(f"{fmt} {where}: max abs diff {diff:.3g} (limit {tolerance:g}), "
                                    f"predictions {'match' if same else 'differ'}")
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise ExportError(f"parity failed: {failures[0]}{more}")
    return results

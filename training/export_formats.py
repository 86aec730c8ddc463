"""Writing the model files: `model.onnx` and `model.pt` (TorchScript) from one traced wrapper.

Exporter choice (measured on this stack, fused tiny BERT + CNN + log-mel model, 2 shared cores):
the legacy TorchScript-based exporter (`dynamo=False`) takes ~0.4 s, the new dynamo exporter ~12 s
for the same graph, with the same parity (both ~1e-7 vs eager). The legacy one also accepts an
example batch of 1 and writes one self-contained file with no side data. It is deprecated, so
`exporter="dynamo"` (`--onnx-exporter dynamo`) stays available, is exercised by the tests, and is
the automatic fallback when the legacy exporter fails on a graph.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from models import contract
from models.manifest import FormatInfo
from training.export_error import ExportError

FORMATS = ("onnx", "torchscript")
FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}
ONNX_OPSET = {"legacy": 17, "dynamo": 18}


def export_wrapper(model, names: Sequence[str]):
    """A module taking positional tensors in `names` order and calling model(**keywords)."""
    import torch

    namespace: dict[str, Any] = {}
    args = ", ".join(names)
    kwargs = ", ".join(f"{n}={n}" for n in names)
    exec(f"def forward(self, {args}):\n    return self.model({kwargs})\n", namespace)  # noqa: S102

    cls = type("ExportWrapper", (torch.nn.Module,), {"forward": namespace["forward"]})
    wrapper = cls()
    wrapper.model = model
    return wrapper.eval()


def export_example(batches: list[dict[str, np.ndarray]], names: Sequence[str]) -> tuple:
    """The export example: the largest parity batch (>= 2 rows and tokens where the data allows),
    with the last row's media masked so traced graphs see mixed presence."""
    import torch

    batch = dict(max(batches, key=lambda b: (contract.batch_size(b), contract.sequence_length(b) or 0)))
    if contract.batch_size(batch) < 2:  # both exporters want >= 2 on a dynamic axis to keep it symbolic
        batch = {k: np.concatenate([v, v]) for k, v in batch.items()}
    if (contract.sequence_length(batch) or 2) < 2:
        for name in contract.SEQUENCE_INPUTS & batch.keys():
            batch[name] = np.concatenate([batch[name]] * 2, axis=1)
    for modality in contract.PRESENCE:
        for name in contract.inputs_of(modality):
            if name in batch:
                batch[name] = batch[name].copy()
                batch[name][-1] = 0
    return tuple(torch.from_numpy(np.ascontiguousarray(batch[n])) for n in names)


def export_onnx(wrapper, example: tuple, names: Sequence[str], task: str, path: Path, exporter: str = "legacy") -> int:
    """Write one self-contained ONNX file; returns the opset.

    exporter "auto": the legacy exporter, falling back to the dynamo one if it cannot export the graph.
    """
    import torch

    if exporter == "auto":
        try:
            return export_onnx(wrapper, example, names, task, path, "legacy")
        except Exception:  # noqa: BLE001 - e.g. an op the legacy exporter lacks; parity still decides
            path.unlink(missing_ok=True)
            return export_onnx(wrapper, example, names, task, path, "dynamo")
    if exporter not in ONNX_OPSET:
        raise ExportError(f"unknown ONNX exporter {exporter!r} (auto, legacy or dynamo)")
    opset = ONNX_OPSET[exporter]
    common = dict(input_names=list(names), output_names=[contract.LOGITS], opset_version=opset)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            axes = {n: contract.dynamic_axes(n) for n in names}
            axes[contract.LOGITS] = contract.output_axes(task)
            torch.onnx.export(wrapper, example, str(path), dynamic_axes=axes, dynamo=False,
                              do_constant_folding=True, **common)
        else:
            from torch.export import Dim

            dims = {contract.BATCH_AXIS: Dim(contract.BATCH_AXIS, min=1),
                    contract.SEQUENCE_AXIS: Dim(contract.SEQUENCE_AXIS, min=1)}
            shapes = {n: {axis: dims[label] for axis, label in contract.dynamic_axes(n).items()} for n in names}
            torch.onnx.export(wrapper, example, str(path), dynamic_shapes=shapes, dynamo=True,
                              external_data=False, optimize=True, verbose=False, **common)
    side = path.with_name(path.name + ".data")
    if side.exists():
        raise ExportError(f"{path}: exporter wrote external data {side.name}; expected one self-contained file")
    return opset


def export_torchscript(wrapper, example: tuple, path: Path) -> None:
    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, example, check_trace=False)
        torch.jit.save(traced, str(path))


def write_formats(
    wrapper, example: tuple, names: Sequence[str], task: str, directory: Path, formats: Sequence[str],
    exporter: str, say: Callable[[str], None],
) -> dict[str, FormatInfo]:
    """Write each format's file into `directory`; its manifest entry (file, opset, size, seconds)."""
    info: dict[str, FormatInfo] = {}
    for fmt in formats:
        path = directory / FILES[fmt]
        start = time.perf_counter()
        opset = None
        if fmt == "onnx":
            opset = export_onnx(wrapper, example, names, task, path, exporter)
        else:
            export_torchscript(wrapper, example, path)
        seconds = time.perf_counter() - start
        info[fmt] = FormatInfo(file=FILES[fmt], opset=opset, size_bytes=path.stat().st_size,
                               export_seconds=round(seconds, 3))
        say(f"exported {fmt}: {path.stat().st_size} bytes in {seconds:.2f} s")
    return info

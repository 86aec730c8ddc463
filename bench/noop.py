"""The no-op model: a real model's version directory with a graph that computes nothing (bench.frontend).

Manifest, tokenizer and preprocessing spec stay those of the source model, so a server does exactly the work it
does for it: parse the request, decode and resize the image, compute the audio's log-mel, tokenise the text. The
graph declares every input the manifest lists (same names, dtypes and shapes) and answers zeros of the output's
shape, its named axes (batch, sequence) read from the inputs' shapes at run time:
Shape(input, start=i, end=i+1) -> Concat with the fixed axes -> ConstantOfShape. The model's cost is next to
nothing, so what the server answers per second is the ceiling of everything around the model.
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np

from bench.workload import CACHE
from models.manifest import MANIFEST_FILE, FormatInfo, Manifest, TensorSpec, hash_directory, read_manifest, sha256_file

NOOP_REPO = CACHE / "noop-repo"
SOURCE_STAMP = ".source-manifest.sha256"  # beside the models of NOOP_REPO: which source manifest it was built from
OPSET = 17
IR_VERSION = 8  # opset 17's IR: the onnx package writes a newer one by default, which onnxruntime may not read yet
VERSION = 1


def _onnx_type(dtype: str) -> int:
    from onnx import TensorProto

    return {"int64": TensorProto.INT64, "float32": TensorProto.FLOAT, "bool": TensorProto.BOOL}[dtype]


def _axis(inputs: list[TensorSpec], dim: str) -> tuple[str, int]:
    """The first input that has the named axis `dim`, and the axis' index in that input's shape."""
    for t in inputs:
        if dim in t.shape:
            return t.name, t.shape.index(dim)
    raise ValueError(f"output axis {dim!r} is in no input's shape: a no-op graph cannot know its size")


def noop_graph(manifest: Manifest):
    """The ONNX model: the manifest's inputs, its first output as zeros (no weights, no arithmetic)."""
    import onnx
    from onnx import helper, numpy_helper

    out = manifest.outputs[0]
    nodes, inits, dims = [], [], []
    for k, dim in enumerate(out.shape):
        name = f"{out.name}_dim{k}"
        if isinstance(dim, int):
            inits.append(numpy_helper.from_array(np.asarray([dim], np.int64), name))
        else:
            source, axis = _axis(manifest.inputs, dim)
            nodes.append(helper.make_node("Shape", [source], [name], start=axis, end=axis + 1))
        dims.append(name)
    nodes += [helper.make_node("Concat", dims, [f"{out.name}_shape"], axis=0),
              helper.make_node("ConstantOfShape", [f"{out.name}_shape"], [out.name],
                               value=helper.make_tensor("zero", _onnx_type(out.dtype), [1], [0]))]
    graph = helper.make_graph(
        nodes, "noop", [helper.make_tensor_value_info(t.name, _onnx_type(t.dtype), t.shape) for t in manifest.inputs],
        [helper.make_tensor_value_info(out.name, _onnx_type(out.dtype), out.shape)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="bench.noop")
    onnx.checker.check_model(model, full_check=True)
    return model


def write_noop(source: Path, repository: Path) -> Path:
    """REPOSITORY/noop-TASK/1: the source version's files but its runtime files (model.onnx, model.pt), the no-op
    graph as model.onnx, and a manifest saying so: the ONNX format's size, every file's sha256 (what the loader
    verifies), no parity or metrics (there is no computation to compare), the source as `source_run`."""
    import onnx

    src = read_manifest(source)
    target = Path(repository) / f"noop-{src.task}" / str(VERSION)
    target.mkdir(parents=True)
    runtime_files = {f.file for f in src.formats.values()}
    for rel in src.files:
        if rel not in runtime_files:
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(source) / rel, target / rel)
    t0 = time.perf_counter()
    onnx.save(noop_graph(src), str(target / "model.onnx"))
    fmt = FormatInfo(file="model.onnx", opset=OPSET, size_bytes=(target / "model.onnx").stat().st_size,
                     export_seconds=round(time.perf_counter() - t0, 3))
    manifest = Manifest.model_validate({
        **src.model_dump(by_alias=True), "name": target.parent.name, "version": VERSION,
        "formats": {"onnx": fmt.model_dump()}, "training": {}, "metrics": {"dev": None, "test": None}, "parity": [],
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source_run": f"{source} with a no-op graph (bench/noop.py)", "files": hash_directory(target)})
    manifest.dump(target)
    return target


def noop_model(source: Path, log=print) -> Path:
    """The no-op model over `source` in NOOP_REPO (its version directory): built when missing, and again when the
    source's manifest changed (a rebuilt tiny model), in a staging directory renamed into place."""
    stamp = sha256_file(Path(source) / MANIFEST_FILE)
    built = sorted(NOOP_REPO.glob(f"noop-*/{VERSION}/{MANIFEST_FILE}"))
    if built and (NOOP_REPO / SOURCE_STAMP).is_file() and (NOOP_REPO / SOURCE_STAMP).read_text() == stamp:
        return built[0].parent
    log(f"bench: building the no-op model over {source} into {NOOP_REPO}")
    staging = CACHE / f".noop-{uuid.uuid4().hex}"
    try:
        target = write_noop(source, staging)
        (staging / SOURCE_STAMP).write_text(stamp)
        if NOOP_REPO.exists():
            shutil.rmtree(NOOP_REPO)
        os.rename(staging, NOOP_REPO)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return NOOP_REPO / target.relative_to(staging)

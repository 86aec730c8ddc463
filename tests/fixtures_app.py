"""A tiny hand-built model repository for the app tests: real ONNX graphs (onnx.helper, no torch),
real tokenizer.json, real manifests with file hashes. Independent of training/export, fast to build.

Each graph follows the tensor contract of docs/architecture.md with random weights, so different
inputs give different logits (what the batching-correctness tests need).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from models.manifest import FormatInfo, Manifest, ModalityInfo, TensorSpec, hash_directory
from models.spec import AudioSpec, ImageSpec, ModelConfig, PreprocessSpec, TextSpec
from models.tokenizer import train_tiny_tokenizer

CORPUS = ["alice flew from paris to berlin", "bob lives in london", "a red square and a blue circle",
          "what colour is the square", "a short happy song about the sea", "is it green or red",
          "the quick brown fox jumps over the lazy dog"] * 3

MODELS = {
    # name: (task, modalities, required, labels, multi_label)
    "tiny-classify": ("classify", ["text", "image", "audio"], ["text"], ["negative", "neutral", "positive"], False),
    "tiny-ner": ("ner", ["text"], ["text"], ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"], False),
    "tiny-vqa": ("vqa", ["text", "image"], ["text", "image"], ["red", "green", "blue", "yes", "no", "two"], False),
}
HIDDEN = 16
IMAGE = ImageSpec(size=32)
AUDIO = AudioSpec(max_seconds=1.0, n_mels=16)
TEXT = TextSpec(max_length=32)


def _graph(task: str, modalities: list[str], vocab: int, labels: int, seed: int) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits, nodes, inputs = [], [], []

    def w(name: str, *shape: int) -> str:
        inits.append(numpy_helper.from_array(rng.normal(0, 1, size=shape).astype(np.float32), name))
        return name

    def const(name: str, values: list[int]) -> str:
        inits.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    def node(op: str, ins: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op, ins, [out], **attrs))
        return out

    const("ax_last", [-1])
    const("ax_1", [1])
    vecs = []
    tokens = None
    if "text" in modalities:
        inputs += [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
                   helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])]
        emb = node("Gather", [w("E", vocab, HIDDEN), "input_ids"], "emb")
        maskf = node("Cast", ["attention_mask"], "maskf", to=TensorProto.FLOAT)
        mask3 = node("Unsqueeze", [maskf, "ax_last"], "mask3")
        tokens = node("Mul", [emb, mask3], "tokens")
        if task != "ner":
            s = node("ReduceSum", [tokens, "ax_1"], "tsum", keepdims=0)
            cnt = node("ReduceSum", [maskf, "ax_1"], "tcnt", keepdims=1)
            vecs.append(node("Div", [s, cnt], "text_vec"))
    if "image" in modalities:
        inputs += [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, IMAGE.size, IMAGE.size]),
                   helper.make_tensor_value_info("image_present", TensorProto.FLOAT, ["batch"])]
        m = node("ReduceMean", ["pixel_values"], "img_mean", axes=[2, 3], keepdims=0)
        p = node("MatMul", [m, w("Wi", 3, HIDDEN)], "img_proj")
        pres = node("Unsqueeze", ["image_present", "ax_last"], "img_pres")
        vecs.append(node("Mul", [p, pres], "img_vec"))
    if "audio" in modalities:
        inputs += [helper.make_tensor_value_info("audio_features", TensorProto.FLOAT,
                                                 ["batch", AUDIO.n_mels, AUDIO.num_frames]),
                   helper.make_tensor_value_info("audio_present", TensorProto.FLOAT, ["batch"])]
        m = node("ReduceMean", ["audio_features"], "aud_mean", axes=[2], keepdims=0)
        p = node("MatMul", [m, w("Wa", AUDIO.n_mels, HIDDEN)], "aud_proj")
        pres = node("Unsqueeze", ["audio_present", "ax_last"], "aud_pres")
        vecs.append(node("Mul", [p, pres], "aud_vec"))
    if task == "ner":
        h = tokens
        for i, v in enumerate(vecs):
            h = node("Add", [h, node("Unsqueeze", [v, "ax_1"], f"bc{i}")], f"h{i}")
        out_shape = ["batch", "sequence", labels]
    else:
        h = vecs[0]
        for i, v in enumerate(vecs[1:]):
            h = node("Add", [h, v], f"sum{i}")
        out_shape = ["batch", labels]
    t = node("Tanh", [h], "act")
    node("MatMul", [t, w("Wo", HIDDEN, labels)], "logits")
    graph = helper.make_graph(nodes, "tiny", inputs,
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def build_model(root: Path, name: str, version: int = 1, seed: int = 0, task_spec=None) -> Path:
    task, modalities, required, labels, multi = task_spec or MODELS[name]
    directory = Path(root) / name / str(version)
    directory.mkdir(parents=True, exist_ok=True)
    tok = train_tiny_tokenizer(CORPUS, vocab_size=200)
    tok.save(str(directory / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    onnx.save(_graph(task, modalities, vocab, len(labels), seed), str(directory / "model.onnx"))
    pre = PreprocessSpec(text=TEXT if "text" in modalities else None, image=IMAGE if "image" in modalities else None,
                         audio=AUDIO if "audio" in modalities else None)
    inputs = []
    if "text" in modalities:
        inputs += [TensorSpec(name="input_ids", dtype="int64", shape=["batch", "sequence"]),
                   TensorSpec(name="attention_mask", dtype="int64", shape=["batch", "sequence"])]
    if "image" in modalities:
        inputs += [TensorSpec(name="pixel_values", dtype="float32", shape=["batch", 3, IMAGE.size, IMAGE.size]),
                   TensorSpec(name="image_present", dtype="float32", shape=["batch"])]
    if "audio" in modalities:
        inputs += [TensorSpec(name="audio_features", dtype="float32", shape=["batch", AUDIO.n_mels, AUDIO.num_frames]),
                   TensorSpec(name="audio_present", dtype="float32", shape=["batch"])]
    out_shape = ["batch", "sequence", len(labels)] if task == "ner" else ["batch", len(labels)]
    manifest = Manifest(
        name=name, version=version, task=task, multi_label=multi, labels=labels,
        modalities=[ModalityInfo(name=m, required=m in required) for m in modalities],
        inputs=inputs, outputs=[TensorSpec(name="logits", dtype="float32", shape=out_shape)],
        preprocessing=pre,
        model_config=ModelConfig(task=task, modalities=modalities, labels=labels, multi_label=multi,
                                 text_vocab_size=vocab),
        max_batch_size=32,
        formats={"onnx": FormatInfo(file="model.onnx", opset=17, size_bytes=(directory / "model.onnx").stat().st_size,
                                    export_seconds=0.0)},
        training={}, metrics={"dev": None, "test": None}, parity=[],
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), source_run="tests/fixtures_app.py",
        package_version="0.1.0", files=hash_directory(directory),
    )
    manifest.dump(directory)
    return directory


@pytest.fixture(scope="session")
def app_repository(tmp_path_factory) -> Path:
    """tiny-classify (text + optional image/audio), tiny-ner (text), tiny-vqa (question + image)."""
    root = tmp_path_factory.mktemp("app_repo")
    for i, name in enumerate(MODELS):
        build_model(root, name, seed=i)
    (root / ".tmp-export-123").mkdir()  # export's temp dirs must be ignored
    return root


@pytest.fixture()
def broken_repository(app_repository, tmp_path) -> Path:
    """tiny-classify intact next to a copy of tiny-ner whose model.onnx was corrupted after export."""
    root = tmp_path / "repo"
    shutil.copytree(app_repository / "tiny-classify", root / "tiny-classify")
    shutil.copytree(app_repository / "tiny-ner", root / "tiny-ner")
    onnx_path = root / "tiny-ner" / "1" / "model.onnx"
    data = bytearray(onnx_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_path.write_bytes(bytes(data))
    return root


@pytest.fixture()
def repo(tmp_path) -> Path:
    """A fresh repository per test: tiny-classify/1 and tiny-ner/1 (model control tests add versions to it)."""
    root = tmp_path / "repo"
    build_model(root, "tiny-classify", version=1, seed=0)
    build_model(root, "tiny-ner", version=1, seed=1)
    return root


def add_version(root: Path, name: str, version: int, seed: int, tamper=None) -> Path:
    """Writes NAME/VERSION the way `mmserve export` does: built aside, renamed into place in one step."""
    staging = root.parent / f"staging-{name}-{version}"
    build_model(staging, name, version=version, seed=seed)
    if tamper is not None:
        tamper(staging / name / str(version))
    target = root / name / str(version)
    (staging / name / str(version)).rename(target)
    shutil.rmtree(staging)
    return target

"""The model without a server: preprocessing (models.preprocessing) + onnxruntime, as a user would write it.

Used by the in-process limit (bench.limit) and by the LitServe peer (bench/peer_litserve.py), so both
run exactly the code mmserve runs: same Preprocessor, same collate, same session options. With
backend="torchscript" the model is the version's `model.pt` through mmserve's own TorchScript runtime
(app.runtime.TorchScriptRuntime: pinned host buffers on CUDA), as `MMSERVE_BACKEND=torchscript` serves it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def make_session(model_file: Path, threads: int, device: str = "cpu"):
    """onnxruntime session with mmserve's options (intra threads, inter 1, no spinning, all optimisations)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    providers: list[Any] = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        from app.runtime import CudaOptions, preload_cuda_libraries

        preload_cuda_libraries()  # as mmserve's runtime: the CUDA libraries of the nvidia-* wheels
        index = int(device.partition(":")[2] or 0)
        providers.insert(0, ("CUDAExecutionProvider", CudaOptions().provider_options(index)))
    session = ort.InferenceSession(str(model_file), sess_options=so, providers=providers)
    if device.startswith("cuda") and session.get_providers()[0] != "CUDAExecutionProvider":
        # onnxruntime falls back to CPU silently: a GPU benchmark must not compare a CPU limit or peer
        raise RuntimeError(f"device {device!r}: onnxruntime fell back to {session.get_providers()[0]}")
    return session


class Engine:
    def __init__(self, version_dir: Path, threads: int = 1, device: str = "cpu", backend: str = "onnx"):
        from models.manifest import read_manifest
        from models.preprocessing import Preprocessor

        self.manifest = read_manifest(Path(version_dir))
        self.pre = Preprocessor(self.manifest.preprocessing, Path(version_dir))
        self.pad_id = int(self.pre.pad_id)
        self.runtime = None
        if backend == "torchscript":
            from app.runtime import TorchScriptRuntime

            names = [t.name for t in self.manifest.inputs]
            self.runtime = TorchScriptRuntime(Path(version_dir) / self.manifest.formats["torchscript"].file,
                                              device, names, intra_op_threads=threads)
            if device.startswith("cuda") and not self.runtime.device.startswith("cuda"):
                raise RuntimeError(f"device {device!r}: TorchScript runs on {self.runtime.device}")
            self.provider = self.runtime.provider
            self.input_names = names
        else:
            self.session = make_session(Path(version_dir) / self.manifest.formats["onnx"].file, threads, device)
            self.provider = self.session.get_providers()[0]
            self.input_names = [i.name for i in self.session.get_inputs()]
        self.labels = list(self.manifest.labels)

    def features(self, text: str | None, image: bytes | None, audio: bytes | None):
        return self.features_many([{"text": text, "image": image, "audio": audio}])[0]

    def features_many(self, items: list[dict]) -> list:
        """Features of several records stage by stage (every text, then every image, then every clip), as mmserve's
        preprocessing pool runs the items it takes together (app/core/preprocess.py `prepare_many`): the limit
        gets the same saving (item by item costs about a quarter more CPU on the tiny model)."""
        from models.preprocessing import Features

        feats = [self.pre.encode_text(it["text"]) if it["text"] is not None else Features() for it in items]
        for f, it in zip(feats, items):
            if it["image"] is not None:
                f.pixel_values = self.pre.image_from_bytes(it["image"])
        for f, it in zip(feats, items):
            if it["audio"] is not None:
                f.audio_features = self.pre.audio_from_bytes(it["audio"])
        return feats

    def infer(self, feats: list) -> np.ndarray:
        from models.preprocessing import collate

        feeds = collate(feats, self.manifest.modality_names, self.manifest.preprocessing, pad_id=self.pad_id)
        if self.runtime is not None:
            return self.runtime.run(feeds)
        return self.session.run(["logits"], {n: feeds[n] for n in self.input_names})[0]

    def predictions(self, logits: np.ndarray, k: int = 5) -> list[list[dict]]:
        from models import postprocess as pp

        scores = pp.scores_for(logits, multi_label=self.manifest.multi_label)
        k = max(1, min(k, len(self.labels)))
        return [pp.top_k(row, self.labels, k) for row in scores]

    def run_requests(self, items: list[dict]) -> list[list[dict]]:
        """Bytes to answers for one batch: decode + preprocess (stage by stage), collate, one inference, top-k."""
        feats = self.features_many(items)
        return self.predictions(self.infer(feats))

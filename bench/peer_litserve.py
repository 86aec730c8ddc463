"""The peer: LitServe serving the same ONNX model with its own batching and the same preprocessing.

    python bench/peer_litserve.py VERSION_DIR --port P [--max-batch-size 32] [--batch-timeout 0.005] [--threads 1]

POST /predict with the same multipart form mmserve takes (text, image, audio files; `model` ignored);
answers {"predictions": [{label, score}], "batch_size": n}. Written the way the LitServe docs show:
decode_request (per request) -> batch -> predict (one onnxruntime call) -> unbatch -> encode_response.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import litserve as ls  # noqa: E402


class MultimodalAPI(ls.LitAPI):
    def __init__(self, version_dir: str, threads: int, device: str, backend: str = "onnx", **kwargs):
        super().__init__(**kwargs)
        self.version_dir, self.threads, self.device_name, self.backend = version_dir, threads, device, backend

    def setup(self, device):
        from bench.engine import Engine

        self.engine = Engine(Path(self.version_dir), self.threads, self.device_name, self.backend)
        warm = self.engine.features("warm up", None, None)
        self.engine.infer([warm])

    def decode_request(self, request):
        async_form = request  # litserve hands over the parsed form (starlette FormData)

        def data(key):
            v = async_form.get(key)
            if v is None:
                return None
            if hasattr(v, "file"):
                v.file.seek(0)
                return v.file.read() or None
            return v

        text = async_form.get("text")
        return self.engine.features(text, data("image"), data("audio"))

    def batch(self, inputs):
        return list(inputs)

    def predict(self, feats):
        logits = self.engine.infer(feats)
        preds = self.engine.predictions(logits)
        return [(p, len(feats)) for p in preds]

    def unbatch(self, output):
        return list(output)

    def encode_response(self, output):
        preds, n = output
        return {"predictions": preds, "batch_size": n}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("version_dir")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-timeout", type=float, default=0.005)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="onnx", choices=("onnx", "torchscript"))
    a = p.parse_args()
    api = MultimodalAPI(a.version_dir, a.threads, a.device, a.backend, max_batch_size=a.max_batch_size,
                        batch_timeout=a.batch_timeout)
    # the onnxruntime provider follows --device; LitServe's own accelerator detection goes through torch
    # (a CPU-only torch would refuse "cuda"), so it is told "cpu": one inference worker either way
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=60)
    server.run(host=a.host, port=a.port, num_api_servers=1, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

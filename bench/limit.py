"""The limit: the same model, in-process, on the same request bytes, no HTTP.

`python -m bench.limit VERSION_DIR ITEMS.pkl OUT.json --threads N --batch-sizes 1,2,4,...` runs
decode + preprocess + collate + inference + top-k over every request, batch by batch, for each batch
size, and reports items/s per batch size and the best one. The bench runs it as a subprocess pinned
to the server's cores, so it has exactly the CPU the servers get.
"""
from __future__ import annotations

import argparse
import json
import pickle
import time
from pathlib import Path


def measure(version_dir: Path, items: list[dict], threads: int, batch_sizes: list[int], min_seconds: float,
            device: str = "cpu", backend: str = "onnx") -> dict:
    from bench.engine import Engine

    eng = Engine(version_dir, threads, device, backend)
    eng.run_requests(items[: max(batch_sizes)])  # warm-up: allocations, kernels
    eng.run_requests(items[:1])
    per_batch = {}
    for b in batch_sizes:
        done, t0 = 0, time.perf_counter()
        # at least two batches and at least min_seconds
        while done < 2 * b or time.perf_counter() - t0 < min_seconds:
            start = done % len(items)
            chunk = (items + items)[start: start + b]
            eng.run_requests(chunk)
            done += len(chunk)
        seconds = time.perf_counter() - t0
        per_batch[b] = {"items": done, "seconds": round(seconds, 4), "throughput": round(done / seconds, 2),
                        "ms_per_batch": round(1000 * seconds / -(-done // b), 3)}
    best = max(per_batch, key=lambda b: per_batch[b]["throughput"])
    return {"provider": eng.provider, "threads": threads, "per_batch_size": per_batch, "best_batch_size": best,
            "throughput": per_batch[best]["throughput"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.limit")
    p.add_argument("version_dir", type=Path)
    p.add_argument("items", type=Path, help="pickle of [{text, image, audio}] with bytes")
    p.add_argument("out", type=Path)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="onnx", choices=("onnx", "torchscript"))
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    p.add_argument("--min-seconds", type=float, default=1.0)
    a = p.parse_args(argv)
    items = pickle.loads(a.items.read_bytes())
    sizes = [int(s) for s in a.batch_sizes.split(",") if s.strip()]
    result = measure(a.version_dir, items, a.threads, sizes, a.min_seconds, a.device, a.backend)
    a.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

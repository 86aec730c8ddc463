"""Per-model inference statistics with Triton's counters (statistics extension of the Open Inference
Protocol). They are counted where the Prometheus metrics are observed (`Service.call`, `Service.run_items`,
`Batcher._done`), so both always agree; `Metrics.stats` holds them. Everything runs on the event loop.

  success / fail   per request (a /v1 call, a v2 or gRPC inference): count + end-to-end ns
  queue            per item: queueing to the start of its batch
  compute_input    per item: decoding, resampling, tokenising
  compute_infer    per item: the inference of the batch that ran it (collate + run)
  compute_output   per item: postprocessing
  inference_count  items inferred; execution_count: batches run; batch_stats: per batch size, the batches
                   run (compute_infer)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, n: int = 1) -> None:
        self.count += n
        self.ns += int(seconds * 1e9)


@dataclass
class ModelStats:
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0  # ms since the epoch of the last batch end (0: never)
    batches: dict[int, Duration] = field(default_factory=dict)  # batch size -> compute_infer of those batches

    def request(self, ok: bool, seconds: float) -> None:
        (self.success if ok else self.fail).add(seconds)

    def execution(self, size: int, seconds: float) -> None:
        self.execution_count += 1
        self.inference_count += size
        self.batches.setdefault(size, Duration()).add(seconds)
        self.last_inference_ms = int(time.time() * 1000)


class Statistics:
    def __init__(self) -> None:
        self.models: dict[str, ModelStats] = {}

    def model(self, name: str) -> ModelStats:
        stats = self.models.get(name)
        if stats is None:
            stats = self.models[name] = ModelStats()
        return stats


__all__ = ["Duration", "ModelStats", "Statistics"]

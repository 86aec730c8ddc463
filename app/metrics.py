"""Prometheus metrics (names and labels are a user contract: docs/architecture.md).

Each app owns its own CollectorRegistry so several apps (tests) never collide.

With MMSERVE_WORKERS > 1 the server runs as several processes (`app/workers.py`) and sets PROMETHEUS_MULTIPROC_DIR
before any of them imports prometheus_client: every process writes its values to files there and `registry` (what
/metrics renders) is a MultiProcessCollector over them, so any front-end's /metrics shows the totals of all
processes (gauges by their `multiprocess_mode`: in-flight and queue depth summed over the live processes).
`mmserve_model_info` is the exception: each front-end renders it from the engine's model states it mirrors.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from app.core.stats import Statistics

# ms-scale latencies up to long deadlines
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25,
                   0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def multiprocess() -> bool:
    """Values live in PROMETHEUS_MULTIPROC_DIR's files (MMSERVE_WORKERS > 1)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class _InfoCollector:
    """`mmserve_model_info` kept in this process (multiprocess mode cannot remove a series from the files)."""

    def __init__(self, name: str, doc: str, labels: list[str]):
        self.name, self.doc, self.label_names = name, doc, labels
        self.series: dict[tuple[str, ...], float] = {}

    def labels(self, *labels: str) -> Any:
        collector = self

        class _Child:
            def set(self, value: float) -> None:
                collector.series[labels] = value
        return _Child()

    def remove(self, *labels: str) -> None:
        del self.series[labels]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.name, self.doc, labels=self.label_names)
        for labels, value in list(self.series.items()):
            family.add_metric(list(labels), value)
        yield family


class Metrics:
    def __init__(self) -> None:
        shared = multiprocess()
        self.registry = CollectorRegistry(auto_describe=True)
        r: CollectorRegistry | None = self.registry
        if shared:  # the values are in the files: /metrics collects them there, not from these objects
            from prometheus_client import multiprocess as mp

            mp.MultiProcessCollector(self.registry)
            r = None
        self.requests = Counter("mmserve_requests_total", "Requests answered, by endpoint, model and HTTP status.",
                                ["endpoint", "model", "status"], registry=r)
        self.request_duration = Histogram("mmserve_request_duration_seconds",
                                          "End-to-end latency of task requests (body read to response).",
                                          ["endpoint", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("mmserve_queue_wait_seconds",
                                    "Time from queueing to the start of the batch that ran the request.",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.preprocess = Histogram("mmserve_preprocess_seconds",
                                    "Decoding / resampling / tokenising time per modality.",
                                    ["model", "modality"], buckets=LATENCY_BUCKETS, registry=r)
        self.inference = Histogram("mmserve_inference_seconds", "Time of one batch inference (collate + run).",
                                   ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("mmserve_batch_size", "Requests per inference batch.", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("mmserve_queue_depth", "Requests waiting for a batch.", ["model"], registry=r,
                                 multiprocess_mode="livesum")
        self.inflight = Gauge("mmserve_inflight_requests", "Requests being handled.", ["endpoint"], registry=r,
                              multiprocess_mode="livesum")
        self.rejections = Counter("mmserve_rejections_total",
                                  "Requests refused or dropped before inference, by reason "
                                  "(queue_full, timeout, disconnected, not_ready).",
                                  ["model", "reason"], registry=r)
        self.load_seconds = Gauge("mmserve_model_load_seconds", "Time to verify and load a model.",
                                  ["model", "version"], registry=r, multiprocess_mode="mostrecent")
        self.warmup_seconds = Gauge("mmserve_model_warmup_seconds", "Time of the worst-case warm-up batch.",
                                    ["model", "version"], registry=r, multiprocess_mode="mostrecent")
        info = ("mmserve_model_info", "1 per model with its backend, device, real provider and state.",
                ["model", "version", "backend", "device", "provider", "state"])
        if shared:
            self.model_info: Any = _InfoCollector(*info)
            self.registry.register(self.model_info)
        else:
            self.model_info = Gauge(*info, registry=r)
        # Triton-style counters (v2 statistics extension), counted where the metrics above are observed
        self.stats = Statistics()
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once: the per-request paths use this (prometheus_client's `labels`
        validates and joins the values and takes a lock on every call). Only for series that are never removed
        (model_info's are, and are not asked for here). Safe from any thread (a race makes the same child twice)."""
        key = (metric, labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def set_model_info(self, model: str, version: str, backend: str, device: str, provider: str, state: str) -> None:
        # one series per model: drop the previous state's series
        for labels in list(self._info_series.get(model, [])):
            try:
                self.model_info.remove(*labels)
            except KeyError:
                pass
        labels = (model, version, backend, device, provider, state)
        self.model_info.labels(*labels).set(1)
        self._info_series[model] = [labels]

    @property
    def _info_series(self) -> dict[str, list[tuple[str, ...]]]:
        if not hasattr(self, "_series"):
            self._series: dict[str, list[tuple[str, ...]]] = {}
        return self._series

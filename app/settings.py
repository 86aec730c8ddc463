"""Service settings: one typed object, read from `MMSERVE_*` environment variables.

The names are a user contract (docs/architecture.md). Every field carries a description:
the README's settings table is generated from this model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MMSERVE_", extra="ignore", protected_namespaces=())

    # -- models -------------------------------------------------------------------------------
    repository: Path = Field(
        Path("model_repository"),
        description="Model repository written by `mmserve export` (NAME/VERSION/...). Every model in it is served.",
    )
    model_name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,254}$",
        description="Name to serve a single-model REPOSITORY under: KServe's layout, where REPOSITORY (`/mnt/models`) "
        "is one model's directory, `VERSION/manifest.json` inside it or `manifest.json` at its top. Unset: the "
        "manifest's name. Such a layout is recognised by itself; in a NAME/VERSION repository this is ignored.",
    )
    model_versions: dict[str, int] = Field(
        default_factory=dict,
        description='Pinned versions as JSON, e.g. `{"tiny-classify": 1}`. Unpinned models serve their latest version.',
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="`auto` (GPU when one is usable, else CPU), `cpu`, `cuda` or `cuda:N`. An explicit `cuda` "
        "fails the model if the runtime falls back to CPU.",
    )
    backend: Literal["onnx", "torchscript"] = Field(
        "onnx", description="Runtime: onnxruntime (`model.onnx`) or TorchScript (`model.pt`, imports torch)."
    )
    intra_op_threads: int = Field(
        0,
        ge=0,
        description="Threads inside one operator (onnxruntime / torch). 0 = runtime default (one per core); with "
        "WORKERS > 1, 0 means the cores left to the engine after the front-ends (at least 1).",
    )
    inter_op_threads: int = Field(1, ge=0, description="Threads across independent operators. 0 = runtime default.")
    allow_spinning: bool = Field(
        False,
        description="onnxruntime `session.intra_op.allow_spinning`. Spinning lowers latency on idle cores but "
        "collapses throughput when cores are shared; off by default.",
    )
    warmup: bool = Field(True, description="Run a worst-case batch through every model before it counts as ready.")
    strict_readiness: bool = Field(
        False,
        description="When true, /readyz stays 503 while any model has failed. When false (default), /readyz is 200 "
        "once every model has been tried and at least one is ready; failed models are listed in the body.",
    )
    model_control: Literal["none", "explicit", "poll"] = Field(
        "none",
        description="`none`: every model is loaded at start-up and `/v2/repository/models/{m}/load` / `unload` "
        "answer 403. `explicit`: models load and unload through those endpoints. `poll`: the repository is also "
        "watched every POLL_INTERVAL_S: a new version directory is validated, loaded, warmed and swapped in. "
        "A new version always warms while the old one serves (hot reload), and one that fails never replaces it.",
    )
    poll_interval_s: float = Field(5.0, gt=0, description="How often MODEL_CONTROL=poll looks at the repository.")
    allow_remote_model_control: bool = Field(
        False,
        description="Model load / unload are refused when HOST is not a loopback address unless this is true "
        "(then set API_KEYS too: with keys set, every /v2 route needs one).",
    )

    # -- batching -------------------------------------------------------------------------------
    max_batch_size: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = Field(
        "auto",
        description="Largest batch per inference. `auto` (default): measured per model on its device during warm-up "
        "(worst-case batches of 1, 2, 4, ... up to the manifest's max_batch_size, about 2 s on CPU, 4 s on GPU): the "
        "smallest size within 5% of the best items/s (on CPU big models get slower per item in big batches; on GPU "
        "items/s flattens once the device is busy, and a bigger batch then only adds latency); a size that runs out "
        "of device memory ends the sweep. With WARMUP off, the manifest's value. An integer fixes it (capped by each "
        "manifest's max_batch_size; halved at warm-up while it runs out of memory). A batch that runs out of memory "
        "while serving is split and retried in halves, and the model's size is lowered to the largest that ran. "
        "`/v1/models` shows the size in use and its source.",
    )
    max_delay_ms: float = Field(
        5.0,
        ge=0,
        description="How long a forming batch may wait for more requests while the model is busy, counted from its "
        "first request. An idle model runs waiting requests at once.",
    )
    queue_size: int = Field(
        256, ge=1,
        description="Requests waiting per model, counting those being preprocessed; beyond it requests get "
        "503 + Retry-After at once, before their media are decoded.",
    )
    request_timeout_s: float = Field(
        30.0, gt=0, description="Deadline per request (a request may ask for less with `timeout_ms`); past it, 504."
    )
    unhealthy_after_timeouts: int = Field(
        3,
        ge=0,
        description="A model counts as hung, and /readyz answers 503 naming it under `unhealthy`, after this many "
        "requests in a row timed out while it finished no batch during their whole wait (at least 1 s each); its "
        "next answer clears it. 0: never.",
    )
    preprocess_workers: int = Field(
        0, ge=0, description="Threads that decode images/audio and tokenise text, off the event loop, in each process "
        "that serves HTTP. 0 (default): 4 in one process; with WORKERS > 1, the cores this server may use shared out "
        "among the front-ends (at least 1, at most 4 each). Each takes the items queued when it gets to them (up to 8) "
        "and runs them stage by stage: every text, then every image, then every clip."
    )
    max_batch_items: int = Field(64, ge=1, description="Most items accepted in one `/v1/{task}/batch` request.")

    # -- GPU ----------------------------------------------------------------------------------
    cuda_mem_limit_bytes: int = Field(
        0,
        ge=0,
        description="onnxruntime CUDA provider `gpu_mem_limit`: the most bytes its memory arena takes on the GPU, per "
        "model. 0: the provider's default (no limit). A batch that needs more fails with out-of-memory and is split "
        "(MAX_BATCH_SIZE). Only with DEVICE cuda / auto on a GPU and BACKEND onnx.",
    )
    cuda_arena_extend_strategy: Literal["kNextPowerOfTwo", "kSameAsRequested"] = Field(
        "kNextPowerOfTwo",
        description="onnxruntime CUDA provider `arena_extend_strategy`: `kNextPowerOfTwo` grows the arena in doubling "
        "chunks (fewer allocations), `kSameAsRequested` by what is asked (tighter under CUDA_MEM_LIMIT_BYTES).",
    )
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = Field(
        "HEURISTIC",
        description="onnxruntime CUDA provider `cudnn_conv_algo_search`. `EXHAUSTIVE` (the provider's own default) "
        "benchmarks every convolution algorithm for each new input shape, and a batch size first met while serving "
        "pays it inside a request; `HEURISTIC` asks cuDNN's heuristics; `DEFAULT` takes the first algorithm.",
    )

    # -- limits -------------------------------------------------------------------------------
    max_upload_bytes: int = Field(
        20 * 1024 * 1024, ge=1, description="Largest request body, enforced while it streams in (413 beyond)."
    )
    linger_bytes: int = Field(
        256 * 1024 * 1024,
        ge=0,
        description="After a 413 for an oversize body, how much more of it is read and thrown away before the "
        "connection closes, so that clients which send the whole body before reading (urllib, requests) get the "
        "answer rather than a connection reset (nginx's lingering close).",
    )
    linger_s: float = Field(
        10.0, ge=0, description="The most seconds spent discarding an oversize body after its 413 (and 5 s without data)."
    )
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Largest decoded image (width x height); bigger images (decompression bombs) get 413."
    )
    max_audio_seconds: float = Field(60.0, gt=0, description="Longest audio clip accepted; longer clips get 413.")

    # -- security, logging, server --------------------------------------------------------------
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Accepted API keys (comma-separated or JSON list). When set, /v1 and /v2 need "
        "`Authorization: Bearer KEY` or `X-API-Key: KEY`; /healthz, /readyz, /metrics and /docs stay open.",
    )
    log_format: Literal["text", "json"] = Field("text", description="`json`: one JSON object per log line.")
    log_level: str = Field("INFO", description="Python logging level name.")
    host: str = Field("0.0.0.0", description="Address `mmserve serve` binds.")
    port: int = Field(8000, ge=0, le=65535, description="Port `mmserve serve` binds.")
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Front-end processes. 1 (default): one process parses, preprocesses, batches and infers. N > 1: "
        "`mmserve serve` becomes the engine (the models and one batcher per model) and starts N front-end processes "
        "on the same port that parse, decode and tokenise, then hand the prepared inputs to the engine, so batches "
        "form across all of them. Helps when one core of preprocessing cannot keep the device busy (a GPU) or under "
        "concurrent load (2 cores: 2.33x the tiny model's requests/s at concurrency 32); each request pays about 1 ms "
        "for the hop to the engine, so at low load one process is faster.",
    )
    grpc_port: int = Field(
        8001,
        ge=0,
        le=65535,
        description="Port of the gRPC front-end (Open Inference Protocol `inference.GRPCInferenceService`, as "
        "Triton's), bound on HOST in the same process (with WORKERS > 1, by every front-end); 0 turns it off. "
        "Messages are limited to MAX_UPLOAD_BYTES.",
    )
    drain_period_s: float = Field(
        5.0,
        ge=0,
        description="On SIGTERM, readiness turns false at once and requests are still served for this long (time for "
        "load balancers and Kubernetes' endpoint removal to stop sending here; responses carry `Connection: close`); "
        "then the listener closes, connections already in its backlog get 503 + Retry-After, and in-flight "
        "requests finish. A second signal cuts it short. (`mmserve serve` / `python -m app`.)",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A connection must send a complete request head within this many seconds of opening (or of the "
        "first byte of its next request); else 408 and the connection closes (slow clients, slowloris).",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="A request body must arrive within this many seconds of its head, plus one second per 16 KiB "
        "received (a minimum average rate, as Apache's mod_reqtimeout); else the connection closes.",
    )
    shutdown_timeout_s: float = Field(
        30.0, gt=0, description="On SIGTERM, how long to wait for accepted requests to be answered before exiting."
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [k.strip() for k in text.split(",") if k.strip()]
        return value

    @field_validator("max_batch_size", mode="before")
    @classmethod
    def _auto(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.upper()
        if value not in {"CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"}:
            raise ValueError("log_level must be one of CRITICAL, ERROR, WARNING, INFO, DEBUG")
        return value

    def public(self) -> dict[str, Any]:
        """Settings safe to log (API keys masked)."""
        data = self.model_dump(mode="json")
        data["api_keys"] = f"<{len(self.api_keys)} keys>"
        return data

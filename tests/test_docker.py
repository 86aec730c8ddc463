"""The images built and run, and `docker compose up` with Prometheus, on a real Docker engine (marker `docker`).

`make docker-test` runs this module (it starts an engine and prepares the stand-in base images first:
scripts/docker_standins.sh); in `make test` it runs when an engine answers and is skipped with one line when
none does. Host networking only (`--network host`, `network_mode: host`), every listener and target on 127.0.0.1.

- serve-cpu, train and serve-gpu build with the classic builder (DOCKER_BUILDKIT=0); train takes a CPU torch
  through TORCH_FIND_LINKS (a local wheel page) while its default stays PyPI's CUDA build; no torch in the
  serving images;
- the train image writes the demo data, trains a tiny classifier and exports it into a mounted folder;
- serve-cpu runs as uid 10001 with that folder and the tiny test repository mounted read-only, turns healthy
  through its own HEALTHCHECK, classifies an image and a clip over HTTP, answers one gRPC inference, shows the
  counts on /metrics and, stopped with SIGTERM (`docker stop`) while requests are in flight, answers every one
  and exits 0;
- docker-compose.yml with tests/docker/compose.test.yml brings up mmserve and Prometheus, and Prometheus's HTTP
  API returns the request counter it scraped through (a copy of) deploy/prometheus/prometheus.yml;
- KServe's ClusterServingRuntime container runs as declared (read-only root filesystem, uid 10001) on a model
  directory mounted at /mnt/models.

Figures (build times, sizes, health and drain times, the Prometheus answer) go to .cache/docker-test/figures.json.
"""
from __future__ import annotations

import asyncio
import functools
import http.server
import io
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from tests.fixtures_app import app_repository  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / ".cache" / "docker-test"
EXAMPLES = ROOT / "examples"
TAGS = {"serve-cpu": "mmserve:cpu", "serve-gpu": "mmserve:gpu", "train": "mmserve:train"}
OVERRIDE = ROOT / "tests" / "docker" / "compose.test.yml"
DOCKER_ENV = {**os.environ, "DOCKER_BUILDKIT": "0"}


def _engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


if not _engine_answers():
    pytest.skip("no Docker engine answers (`make docker-test` starts one and runs these tests)", allow_module_level=True)

# Building the train image alone takes minutes on 2 cores (fixture setup counts against the first test).
pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(3600)]
FIGURES: dict[str, object] = {}


def _docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["docker", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=DOCKER_ENV)
    if check:
        assert proc.returncode == 0, f"docker {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _record(**figures) -> None:
    FIGURES.update(figures)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "figures.json").write_text(json.dumps(FIGURES, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


def _torch_wheel_dir() -> Path | None:
    """The local folder pip's find-links names that holds the CPU torch wheel (this machine: /opt/wheels)."""
    links = os.environ.get("PIP_FIND_LINKS", "")
    try:
        from pip._internal.configuration import Configuration

        config = Configuration(isolated=False)
        config.load()
        links += " " + " ".join(v for k, v in config.items() if k.endswith("find-links"))
    except Exception:  # noqa: BLE001 (pip's internals moved: the environment variable is enough)
        pass
    for entry in links.split():
        path = Path(entry.removeprefix("file://"))
        if path.is_dir() and any(path.glob("torch-2.13.0*-cp311-*.whl")):
            return path
    return None


class _WheelPage:
    """A folder served as a pip find-links page on 127.0.0.1 while the train image builds (--network host)."""

    def __init__(self, folder: Path):
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        handler.log_message = lambda *a, **k: None
        # A fixed port when it is free: the URL is a build argument, part of the layer cache's key.
        try:
            self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 47321), handler)
        except OSError:
            self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def _build(target: str, *build_args: str) -> float:
    OUT.mkdir(parents=True, exist_ok=True)
    log = OUT / f"build-{target}.log"
    args = [a for arg in build_args for a in ("--build-arg", arg)]
    t0 = time.monotonic()
    with log.open("w") as f:
        proc = subprocess.run(["docker", "build", "--network", "host", "--target", target, *args,
                               "-t", TAGS[target], "."], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env=DOCKER_ENV, timeout=3600)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, f"building {target} failed (log {log}):\n" + log.read_text()[-6000:]
    return seconds


def _size_mb(tag: str) -> int:
    return round(int(_docker("image", "inspect", "-f", "{{.Size}}", tag).stdout) / 1e6)


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    """Stand-in bases (scripts/docker_standins.sh), then serve-cpu, serve-gpu and train, timed.

    The classic builder builds every stage above its target; built in file order, each later target finds the
    earlier stages in the layer cache, so each time is that target's own work."""
    proc = subprocess.run(["bash", "scripts/docker_standins.sh"], cwd=ROOT, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    times = {"serve-cpu": _build("serve-cpu"), "serve-gpu": _build("serve-gpu")}
    wheels = _torch_wheel_dir()
    if wheels is None:
        times["train"] = _build("train")  # PyPI's torch: the CUDA build, several GB
    else:
        with _WheelPage(wheels) as url:
            times["train"] = _build("train", f"TORCH_FIND_LINKS={url}")
    _record(build_seconds={k: round(v, 1) for k, v in times.items()},
            image_mb={target: _size_mb(tag) for target, tag in TAGS.items()},
            train_torch="CPU wheel from " + str(wheels) if wheels else "PyPI")
    return dict(TAGS)


def _python_in(tag: str, code: str) -> subprocess.CompletedProcess:
    return _docker("run", "--rm", "--network", "host", "--entrypoint", "python", tag, "-c", code, check=False)


@pytest.mark.parametrize("target", ["serve-cpu", "serve-gpu"])
def test_serving_images_have_no_training_stack(images, target):
    tag = images[target]
    code = ("import importlib.util, json; print(json.dumps({m: importlib.util.find_spec(m) is not None for m in "
            "['torch', 'transformers', 'peft', 'onnxscript', 'sklearn', 'app', 'onnxruntime', 'tritonclient']}))")
    proc = _python_in(tag, code)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found == {"torch": False, "transformers": False, "peft": False, "onnxscript": False, "sklearn": False,
                     "app": True, "onnxruntime": True, "tritonclient": True}, found
    pip = _docker("run", "--rm", "--network", "host", "--entrypoint", "pip", tag, "list", "--format=freeze").stdout
    assert not re.search(r"^(torch|nvidia-[a-z0-9-]+)==", pip, flags=re.M | re.I), pip
    config = json.loads(_docker("image", "inspect", "-f", "{{json .Config}}", tag).stdout)
    assert config["User"] == "10001:10001"
    assert set(config["ExposedPorts"]) == {"8000/tcp", "8001/tcp"}
    assert config["Healthcheck"]["Test"][0] == "CMD" and "/readyz" in " ".join(config["Healthcheck"]["Test"])
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["MMSERVE_PORT"] == "8000" and env["MMSERVE_GRPC_PORT"] == "8001"
    assert env["MMSERVE_DEVICE"] == ("cpu" if target == "serve-cpu" else "auto")


def test_train_image_has_a_cpu_torch_for_the_test(images):
    proc = _python_in(images["train"], "import torch, onnxruntime, transformers; print(torch.__version__)")
    assert proc.returncode == 0, proc.stderr
    version = proc.stdout.strip().splitlines()[-1]
    assert version.startswith("2.13.0"), version
    if FIGURES.get("train_torch", "").startswith("CPU"):
        assert version.endswith("+cpu"), version


# ---------------------------------------------------------------------------------------------
# Training in the train image, serving in serve-cpu
# ---------------------------------------------------------------------------------------------


def _world_readable(path: Path) -> Path:
    for p in [path, *path.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return path


@pytest.fixture(scope="module")
def trained_repository(images, tmp_path_factory) -> Path:
    """The train image (uid 10001) writes the demo data, trains a tiny classifier and exports it into a mounted
    folder; `mmserve validate` in the same image checks the result."""
    base = tmp_path_factory.mktemp("train-image")
    work, repo = base / "work", base / "repository"
    for d in (work, repo):
        d.mkdir()
        d.chmod(0o777)
    mounts = ["-v", f"{work}:/work", "-v", f"{repo}:/models"]
    t0 = time.monotonic()
    steps = [
        ["demo-data", "/work/data"],
        ["train", "--task", "classify", "--data", "/work/data/classify", "--output", "/work/run", "--epochs", "2",
         "--hidden-size", "32", "--image-size", "32", "--audio-seconds", "1", "--max-length", "32",
         "--max-train-samples", "96", "--max-eval-samples", "40", "--batch-size", "16", "--lr", "3e-3",
         "--patience", "0", "--no-progress"],
        ["export", "/work/run", "--repository", "/models", "--name", "docker-classify"],
        ["validate", "/models"],
    ]
    for step in steps:
        proc = _docker("run", "--rm", "--network", "host", *mounts, images["train"], *step, timeout=900, check=False)
        assert proc.returncode == 0, f"mmserve {step[0]} in the train image:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    _record(train_image_seconds=round(time.monotonic() - t0, 1))
    manifest = json.loads((repo / "docker-classify" / "1" / "manifest.json").read_text())
    assert manifest["name"] == "docker-classify" and set(manifest["labels"]) == {"match", "mismatch"}, manifest
    owners = {p.stat().st_uid for p in repo.rglob("*")}
    assert owners == {10001}, owners  # written by the image's non-root user
    return repo


@pytest.fixture()
def serving_repository(trained_repository, app_repository, tmp_path) -> Path:
    """The trained model beside the tiny test models, readable by uid 10001, mounted read-only."""
    repo = tmp_path / "repository"
    shutil.copytree(app_repository, repo)
    shutil.copytree(trained_repository / "docker-classify", repo / "docker-classify")
    return _world_readable(repo)


def _logs(name: str) -> str:
    proc = _docker("logs", "--tail", "60", name, check=False)
    return proc.stdout[-4000:] + proc.stderr[-4000:]


def _wait_healthy(name: str, timeout: float = 150, url: str | None = None) -> tuple[float, float | None]:
    """Seconds until the image's own HEALTHCHECK reports healthy (docker inspect), and until /readyz first
    answered 200 (when `url` is given): the health check only probes every 15 s."""
    t0, ready = time.monotonic(), None
    while time.monotonic() - t0 < timeout:
        if url and ready is None:
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    ready = time.monotonic() - t0
            except httpx.HTTPError:
                pass
        state = json.loads(_docker("inspect", "-f", "{{json .State}}", name).stdout)
        health = (state.get("Health") or {}).get("Status")
        if health == "healthy":
            return time.monotonic() - t0, ready
        assert state["Running"], f"container exited ({state.get('ExitCode')}):\n{_logs(name)}"
        assert health != "unhealthy", _logs(name)
        time.sleep(0.2)
    raise AssertionError(f"not healthy after {timeout} s:\n{_logs(name)}")


def _jpeg(size: int, seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _inflight(metrics: str) -> float:
    return sum(float(v) for v in re.findall(r"^mmserve_inflight_requests\{[^}]*\} ([0-9.e+-]+)$", metrics, flags=re.M))


def _counter(metrics: str, **labels: str) -> float:
    total = 0.0
    for m in re.finditer(r"^mmserve_requests_total\{([^}]*)\} ([0-9.e+-]+)$", metrics, flags=re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def _grpc_classify(port: int) -> list:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    assert client.is_server_ready() and client.is_model_ready("docker-classify")
    inputs = []
    for name, value in (("TEXT", b"Clip recorded in the garden."), ("IMAGE", (EXAMPLES / "cat.jpg").read_bytes()),
                        ("AUDIO", (EXAMPLES / "chirp.wav").read_bytes())):
        t = grpcclient.InferInput(name, [1, 1], "BYTES")
        t.set_data_from_numpy(np.array([[value]], dtype=object))
        inputs.append(t)
    result = client.infer("docker-classify", inputs, outputs=[grpcclient.InferRequestedOutput("SCORES", class_count=2)])
    return [s.decode() for s in result.as_numpy("SCORES")[0]]


async def _drain_under_load(url: str, name: str, requests: int) -> dict:
    """Requests in flight, then `docker stop` (SIGTERM); every request must be answered."""
    image = _jpeg(1024, 0)
    async with httpx.AsyncClient(base_url=url, timeout=120,
                                 limits=httpx.Limits(max_connections=requests + 8)) as client:
        done_at: list[float] = []

        async def one(i: int) -> httpx.Response:
            r = await client.post("/v1/classify", data={"text": f"item {i}", "model": "tiny-classify"},
                                  files={"image": ("noise.jpg", image, "image/jpeg")})
            done_at.append(time.monotonic())
            return r

        tasks = [asyncio.create_task(one(i)) for i in range(requests)]
        inflight, deadline = 0.0, time.monotonic() + 20
        while time.monotonic() < deadline:
            inflight = _inflight((await client.get("/metrics")).text)  # task requests only, not this scrape
            if inflight >= requests // 2:
                break
            await asyncio.sleep(0.02)
        t0 = time.monotonic()
        stop = asyncio.create_task(asyncio.to_thread(_docker, "stop", "-t", "60", name, timeout=90))
        results = await asyncio.gather(*tasks, return_exceptions=True)
        answered = time.monotonic() - t0
        await stop
        stopped = time.monotonic() - t0
    bad = [r if isinstance(r, Exception) else (r.status_code, r.text[:200]) for r in results
           if not isinstance(r, httpx.Response) or r.status_code != 200]
    return {"requests": requests, "inflight_at_sigterm": inflight, "answered_after_sigterm": sum(t > t0 for t in done_at),
            "last_answer_s": round(answered, 2), "stopped_s": round(stopped, 2), "failed": bad}


def test_serve_cpu_container(images, serving_repository):
    """serve-cpu as uid 10001, repository read-only: healthy through its HEALTHCHECK, HTTP classify with an image
    and a clip, one gRPC inference, /metrics, then SIGTERM with requests in flight: all answered, exit code 0."""
    http_port, grpc_port = _free_port(), _free_port()
    name = f"mmserve-test-{os.getpid()}"
    env = {"MMSERVE_HOST": "127.0.0.1", "MMSERVE_PORT": str(http_port), "MMSERVE_GRPC_PORT": str(grpc_port),
           "MMSERVE_PREPROCESS_WORKERS": "1", "MMSERVE_INTRA_OP_THREADS": "1", "MMSERVE_DRAIN_PERIOD_S": "1"}
    _docker("run", "-d", "--name", name, "--network", "host", "-v", f"{serving_repository}:/models:ro",
            *[a for k, v in env.items() for a in ("-e", f"{k}={v}")], images["serve-cpu"])
    try:
        url = f"http://127.0.0.1:{http_port}"
        healthy, ready = _wait_healthy(name, url=url)
        assert ready is not None and ready <= healthy
        assert _docker("exec", name, "id", "-u").stdout.strip() == "10001"
        write = _docker("exec", name, "touch", "/models/x", check=False)
        assert write.returncode != 0 and "Read-only file system" in write.stderr, write
        readyz = httpx.get(url + "/readyz", timeout=5).json()
        assert readyz["ready"] is True, readyz

        with (EXAMPLES / "cat.jpg").open("rb") as image, (EXAMPLES / "chirp.wav").open("rb") as audio:
            r = httpx.post(url + "/v1/classify", timeout=30,
                           data={"text": "Clip recorded in the garden.", "model": "docker-classify"},
                           files={"image": ("cat.jpg", image, "image/jpeg"), "audio": ("chirp.wav", audio, "audio/wav")})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "docker-classify" and {p["label"] for p in body["predictions"]} == {"match", "mismatch"}
        assert abs(sum(p["score"] for p in body["predictions"]) - 1) < 1e-4, body
        r = httpx.post(url + "/v1/classify", timeout=30, data={"text": "bob", "model": "tiny-classify"},
                       files={"audio": ("hum.wav", (EXAMPLES / "hum.wav").read_bytes(), "audio/wav")})
        assert r.status_code == 200, r.text

        scores = _grpc_classify(grpc_port)
        assert {s.split(":", 2)[2] for s in scores} == {"match", "mismatch"}, scores

        metrics = httpx.get(url + "/metrics", timeout=5).text
        assert _counter(metrics, endpoint="/v1/classify", model="docker-classify", status="200") == 1, metrics[:3000]
        assert _counter(metrics, endpoint="/v1/classify", model="tiny-classify", status="200") == 1
        assert re.search(r'^mmserve_model_info\{[^}]*model="docker-classify"[^}]*state="ready"[^}]*\} 1\.0$',
                         metrics, flags=re.M)

        drain = asyncio.run(_drain_under_load(url, name, requests=64))
        state = json.loads(_docker("inspect", "-f", "{{json .State}}", name).stdout)
        _record(serve_cpu_healthy_s=round(healthy, 1), serve_cpu_ready_s=round(ready, 1), drain=drain)
        assert not drain["failed"], drain
        assert drain["inflight_at_sigterm"] >= 1 and drain["answered_after_sigterm"] >= 1, drain
        assert state["Running"] is False and state["ExitCode"] == 0 and not state["OOMKilled"], (state, _logs(name))
    finally:
        _docker("rm", "-f", name, check=False)


# ---------------------------------------------------------------------------------------------
# docker compose up: mmserve + Prometheus
# ---------------------------------------------------------------------------------------------


def _prometheus_test_config(dest: Path, target: str, prom_port: int) -> Path:
    """deploy/prometheus/prometheus.yml with the mmserve job's compose-DNS discovery replaced by a static
    127.0.0.1 target (host networking has no compose DNS); everything else as shipped."""
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "mmserve")
    assert job.pop("dns_sd_configs")
    job["static_configs"] = [{"targets": [target], "labels": {"service": "mmserve-cpu"}}]
    job["scrape_interval"] = "1s"
    job["scrape_timeout"] = "1s"
    job.pop("relabel_configs", None)  # relabels the DNS name into `service`, set statically above
    prom = next(j for j in config["scrape_configs"] if j["job_name"] == "prometheus")
    prom["static_configs"] = [{"targets": [f"127.0.0.1:{prom_port}"]}]
    dest.write_text(yaml.safe_dump(config, sort_keys=False))
    dest.chmod(0o644)
    return dest


def _prom_query(port: int, query: str) -> list[dict]:
    r = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}, timeout=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_compose_up_with_prometheus(images, app_repository, tmp_path):
    http_port, grpc_port, prom_port = _free_port(), _free_port(), _free_port()
    project = f"mmserve-test-{os.getpid()}"
    repo = _world_readable(shutil.copytree(app_repository, tmp_path / "repository"))
    env = {"MMSERVE_TEST_HTTP_PORT": str(http_port), "MMSERVE_TEST_GRPC_PORT": str(grpc_port),
           "PROMETHEUS_TEST_PORT": str(prom_port), "MMSERVE_TEST_REPOSITORY": str(repo),
           "MMSERVE_TEST_IMAGE": images["serve-cpu"], "COMPOSE_PROFILES": "cpu"}
    config = _prometheus_test_config(tmp_path / "prometheus.yml", f"127.0.0.1:{http_port}", prom_port)
    env["PROMETHEUS_TEST_CONFIG"] = str(config)
    compose_env = {**DOCKER_ENV, **env}
    base = ["docker", "compose", "-p", project, "-f", "docker-compose.yml", "-f", str(OVERRIDE.relative_to(ROOT)),
            "--profile", "cpu"]

    def compose(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        proc = subprocess.run([*base, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=compose_env)
        assert proc.returncode == 0, f"compose {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    # the effective configuration: host networking, nothing published, no network of its own
    effective = json.loads(compose("config", "--format", "json").stdout)
    for service in ("mmserve-cpu", "prometheus"):
        s = effective["services"][service]
        assert s["network_mode"] == "host" and not s.get("ports") and not s.get("networks"), s
    t0 = time.monotonic()
    compose("up", "-d", "--no-build", "mmserve-cpu", "prometheus")
    try:
        ids = compose("ps", "-q").stdout.split()
        assert len(ids) == 2, ids
        deadline = time.monotonic() + 150
        while True:
            health = {c: _docker("inspect", "-f", "{{.State.Health.Status}}", c).stdout.strip() for c in ids}
            if set(health.values()) == {"healthy"}:
                break
            assert time.monotonic() < deadline and "unhealthy" not in health.values(), (health, compose("logs").stdout[-4000:])
            time.sleep(0.5)
        healthy = time.monotonic() - t0

        url = f"http://127.0.0.1:{http_port}"
        texts = ["alice flew from paris", "bob lives in london", "a red square"]
        for i, text in enumerate(texts):
            r = httpx.post(url + "/v1/classify", data={"text": text, "model": "tiny-classify"}, timeout=30,
                           files={"image": ("cat.jpg", (EXAMPLES / "cat.jpg").read_bytes(), "image/jpeg")})
            assert r.status_code == 200, r.text
        r = httpx.post(url + "/v1/classify", data={"text": "", "model": "tiny-classify"}, timeout=30)
        assert r.status_code == 422

        query = 'sum(mmserve_requests_total{job="mmserve",endpoint="/v1/classify",status="200"})'
        deadline, value = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            result = _prom_query(prom_port, query)
            value = float(result[0]["value"][1]) if result else None
            if value == len(texts):
                break
            time.sleep(0.5)
        assert value == len(texts), (query, value)
        rejected = _prom_query(prom_port, 'sum(mmserve_requests_total{job="mmserve",status="422"})')
        assert float(rejected[0]["value"][1]) == 1
        up = _prom_query(prom_port, 'up{job="mmserve"}')
        assert [(s["metric"]["instance"], s["value"][1]) for s in up] == [(f"127.0.0.1:{http_port}", "1")]
        deadline = time.monotonic() + 30  # the rules' first evaluation (evaluation_interval 10 s)
        while True:
            rules = httpx.get(f"http://127.0.0.1:{prom_port}/api/v1/rules", timeout=5).json()["data"]["groups"]
            alerts = {r["name"]: r["health"] for g in rules for r in g["rules"]}
            if (alerts and "unknown" not in alerts.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert set(alerts) == {"MmserveQueueNearFull", "MmserveP99OverDeadline", "MmserveModelUnhealthy",
                               "MmserveErrorRatio"} and set(alerts.values()) == {"ok"}, alerts
        firing = httpx.get(f"http://127.0.0.1:{prom_port}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
        assert firing == [], firing
        _record(compose_healthy_s=round(healthy, 1), compose_prometheus_query=query, compose_prometheus_value=value)
    finally:
        subprocess.run([*base, "down", "-v", "-t", "60"], cwd=ROOT, capture_output=True, timeout=180, env=compose_env)


# ---------------------------------------------------------------------------------------------
# KServe's ClusterServingRuntime container, run as the runtime declares it
# ---------------------------------------------------------------------------------------------


def test_kserve_runtime_container(images, trained_repository):
    """The runtime's image, environment ({{.Name}} = demo-classify) and securityContext (uid 10001, read-only root
    filesystem, no privilege escalation, no capabilities), one exported model directory mounted at /mnt/models as
    KServe's storage initializer leaves it: the model answers under the InferenceService's name, also for an upload
    large enough to be spooled to a temporary file."""
    runtime = yaml.safe_load((ROOT / "deploy" / "kserve" / "clusterservingruntime.yaml").read_text())
    (c,) = runtime["spec"]["containers"]
    assert c["image"] == images["serve-cpu"]
    env = {e["name"]: e["value"].replace("{{.Name}}", "demo-classify") for e in c["env"]}
    http_port, grpc_port = _free_port(), _free_port()
    env.update(MMSERVE_HOST="127.0.0.1", MMSERVE_PORT=str(http_port), MMSERVE_GRPC_PORT=str(grpc_port))
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and sc["runAsUser"] == 10001 and sc["capabilities"]["drop"] == ["ALL"]
    model = _world_readable(trained_repository / "docker-classify")
    name = f"mmserve-kserve-{os.getpid()}"
    mounts = [a for m in runtime["spec"].get("volumes", []) for a in ("--tmpfs", m.get("mountPath", "/tmp"))]
    _docker("run", "-d", "--name", name, "--network", "host", "--user", str(sc["runAsUser"]), "--read-only",
            "--security-opt", "no-new-privileges", "--cap-drop", "ALL", *mounts,
            "-v", f"{model}:/mnt/models:ro", *[a for k, v in env.items() for a in ("-e", f"{k}={v}")], c["image"])
    try:
        url = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + c["readinessProbe"]["httpGet"]["path"], timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, _logs(name)
            time.sleep(0.2)
        assert httpx.get(url + c["livenessProbe"]["httpGet"]["path"], timeout=5).status_code == 200
        assert httpx.get(url + "/v2/models/demo-classify/ready", timeout=5).status_code == 200
        big = _jpeg(1400, 1)
        assert len(big) > 1024 * 1024  # starlette spools multipart files over 1 MiB to a temporary file
        for image in ((EXAMPLES / "cat.jpg").read_bytes(), big):
            r = httpx.post(url + "/v1/classify", timeout=30, data={"text": "Clip recorded in the garden."},
                           files={"image": ("x.jpg", image, "image/jpeg"),
                                  "audio": ("chirp.wav", (EXAMPLES / "chirp.wav").read_bytes(), "audio/wav")})
            assert r.status_code == 200, (len(image), r.status_code, r.text, _logs(name))
            assert r.json()["model"] == "demo-classify"
    finally:
        _docker("rm", "-f", name, check=False)

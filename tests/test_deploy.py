"""Engine-free checks of the deployment files: Dockerfile, docker-compose.yml, Prometheus and Grafana.

The external tools (Compose v2, hadolint, promtool) are installed by scripts/check_deploy.sh into
.cache/deploy-tools; CI is expected to be able to install them, so an install failure fails the tests.

`dashboard_metric_names(path)` and `metric_names_from_exposition(text)` are the reusable part: a test
with a running service compares the dashboard against that service's real /metrics text.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "mmserve.json"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "datasource.yml"
DASHBOARD_PROVIDERS = ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
CHECK_SCRIPT = ROOT / "scripts" / "check_deploy.sh"

# ---------------------------------------------------------------------------------------------
# Metric names: dashboard PromQL, /metrics exposition text, docs/architecture.md
# ---------------------------------------------------------------------------------------------

_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
_PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
    "offset", "atan2", "inf", "nan",
}
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def _strip_histogram_suffix(name: str) -> str:
    for suffix in _HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression (with Grafana variables) selects, histogram suffixes stripped."""
    names: set[str] = set()
    # Grafana's label_values(metric, label) / metrics(...) template queries.
    for m in re.finditer(r"label_values\s*\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*(?:\{[^}]*\})?\s*,", expr):
        names.add(_strip_histogram_suffix(m.group(1)))
    expr = re.sub(r"label_values\s*\([^)]*\)", " ", expr)
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', " ", expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", " ", expr)              # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)             # range / subquery selectors
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\$\{?[A-Za-z0-9_]+(?::[A-Za-z]+)?\}?", " ", expr)  # $var, ${var}, ${var:fmt}
    for m in _IDENT.finditer(expr):
        name = m.group(0)
        start, end = m.span()
        if start > 0 and (expr[start - 1].isdigit() or expr[start - 1] == "."):
            continue  # part of a number such as 1e-9
        if expr[end:].lstrip().startswith("("):
            continue  # a function call
        if name.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(_strip_histogram_suffix(name))
    return names


def _dashboard_queries(node) -> list[str]:
    """Every PromQL string in a dashboard: panel targets (`expr`) and template variable queries."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                found.append(value)
            elif key == "templating" and isinstance(value, dict):
                for var in value.get("list", []):
                    query = var.get("query")
                    if isinstance(query, dict):
                        query = query.get("query")
                    if var.get("type") == "query" and isinstance(query, str):
                        found.append(query)
            else:
                found.extend(_dashboard_queries(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_dashboard_queries(item))
    return found


def dashboard_metric_names(path: str | os.PathLike) -> set[str]:
    """Metric names the dashboard's queries use; `_bucket`, `_sum`, `_count` stripped (histogram names)."""
    dashboard = json.loads(Path(path).read_text(encoding="utf-8"))
    names: set[str] = set()
    for query in _dashboard_queries(dashboard):
        names |= promql_metric_names(query)
    return names


def metric_names_from_exposition(text: str) -> set[str]:
    """Metric names a Prometheus text exposition (a service's /metrics body) offers.

    Histograms appear under their family name (what `dashboard_metric_names` compares with),
    counters with `_total`. `# TYPE` lines count too: prometheus_client writes them for a labelled
    metric that has no sample yet (a fresh instance that served no request).
    """
    names: set[str] = set()
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split()
            if len(parts) >= 4 and parts[1] == "TYPE":
                names.add(parts[2])
            continue
        m = _IDENT.match(line)
        if m:
            names.add(_strip_histogram_suffix(m.group(0)))
    return names


def architecture_metrics(path: str | os.PathLike = ARCHITECTURE) -> dict[str, tuple[str, list[str]]]:
    """The metric table of docs/architecture.md: name -> (type, label names)."""
    table: dict[str, tuple[str, list[str]]] = {}
    row = re.compile(r"^\|\s*`(mmserve_[a-z0-9_]+)`\s*\|\s*([a-z]+)[^|]*\|\s*([^|]*)\|")
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        m = row.match(line)
        if m:
            labels = [label.strip() for label in re.sub(r"\([^)]*\)", "", m.group(3)).split(",") if label.strip()]
            table[m.group(1)] = (m.group(2), labels)
    return table


def architecture_settings(path: str | os.PathLike = ARCHITECTURE) -> set[str]:
    """MMSERVE_* names from docs/architecture.md's "Service settings" section."""
    text = Path(path).read_text(encoding="utf-8")
    section = text.split("## Service settings", 1)[1].split("\n## ", 1)[0]
    body = section.split("\n", 1)[1]  # skip the heading line (it names `app/settings.py`)
    return {f"MMSERVE_{name}" for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", body)}


def exposition_from_architecture() -> str:
    """A /metrics text built with prometheus_client from docs/architecture.md's table (no samples)."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    kinds = {"counter": Counter, "histogram": Histogram, "gauge": Gauge}
    registry = CollectorRegistry()
    for name, (kind, labels) in architecture_metrics().items():
        kinds[kind](name, name, labels, registry=registry)
    return generate_latest(registry).decode()


def test_architecture_table_is_parsed():
    assert {"MMSERVE_REPOSITORY", "MMSERVE_DEVICE", "MMSERVE_PORT", "MMSERVE_API_KEYS"} <= architecture_settings()
    table = architecture_metrics()
    assert len(table) >= 12, table
    assert table["mmserve_request_duration_seconds"] == ("histogram", ["endpoint", "model"])
    assert table["mmserve_rejections_total"] == ("counter", ["model", "reason"])


def test_promql_metric_names_parser():
    expr = (
        'histogram_quantile(0.95, sum by (le, model) (rate(mmserve_batch_size_bucket{model=~"$model"}'
        '[$__rate_interval]))) / clamp_min(sum(rate(mmserve_requests_total{status=~"4..|5.."}[5m])), 1e-9)'
        " + on (model) group_left mmserve_queue_depth offset 5m"
    )
    assert promql_metric_names(expr) == {"mmserve_batch_size", "mmserve_requests_total", "mmserve_queue_depth"}
    assert promql_metric_names("label_values(mmserve_model_info, model)") == {"mmserve_model_info"}


def test_exposition_parser_reads_types_and_samples():
    text = (
        "# HELP mmserve_batch_size x\n# TYPE mmserve_batch_size histogram\n"
        'mmserve_batch_size_bucket{model="m",le="1.0"} 3.0\nmmserve_batch_size_count{model="m"} 3.0\n'
        "# TYPE mmserve_requests_total counter\n"
        'mmserve_requests_total{endpoint="/v1/x",model="m",status="200"} 1.0\n'
        "process_cpu_seconds_total 1.5\n"
    )
    assert metric_names_from_exposition(text) >= {
        "mmserve_batch_size", "mmserve_requests_total", "process_cpu_seconds_total"}


def test_dashboard_covers_the_required_views():
    names = dashboard_metric_names(DASHBOARD)
    assert {
        "mmserve_requests_total", "mmserve_request_duration_seconds", "mmserve_batch_size",
        "mmserve_queue_depth", "mmserve_queue_wait_seconds", "mmserve_inference_seconds",
        "mmserve_rejections_total",
    } <= names
    queries = _dashboard_queries(json.loads(DASHBOARD.read_text()))
    joined = "\n".join(queries)
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le) (rate(mmserve_request_duration_seconds_bucket" in joined
    assert 'status=~"4..|5.."' in joined
    variables = {v["name"] for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    assert "model" in variables


def test_dashboard_metrics_are_exported():
    """Every metric the dashboard names is in the service's exposition.

    The exposition here is generated from docs/architecture.md's table with prometheus_client (the same
    library and naming the service uses); a live-server test passes the real /metrics body to
    `metric_names_from_exposition` and makes the same comparison.
    """
    exported = metric_names_from_exposition(exposition_from_architecture())
    assert set(architecture_metrics()) <= exported
    missing = dashboard_metric_names(DASHBOARD) - exported
    assert not missing, f"dashboard queries metrics the service does not export: {sorted(missing)}"


def test_dashboard_uses_the_provisioned_datasource():
    datasources = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    uids = {d["uid"] for d in datasources if d["type"] == "prometheus"}
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] in uids, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
    providers = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    assert any(p["options"]["path"] == "/etc/grafana/dashboards" for p in providers)


def test_prometheus_scrapes_both_service_names():
    config = yaml.safe_load(PROMETHEUS.read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "mmserve")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    names = {n for sd in job["dns_sd_configs"] for n in sd["names"]}
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text().replace("!override", "").replace("!reset", ""))
    assert {"mmserve", "mmserve-cpu"} <= names <= set(compose["services"])


def _dockerfile_stages(text: str) -> dict[str, str]:
    """Stage name -> its instructions (comments dropped, continuation lines joined)."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    stages: dict[str, str] = {}
    name = None
    for line in joined.splitlines():
        m = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, flags=re.I)
        if m:
            name = m.group(1) or f"stage{len(stages)}"
            stages[name] = ""
        if name is not None:
            stages[name] += line + "\n"
    return stages


def test_dockerfile_contract():
    text = (ROOT / "Dockerfile").read_text()
    stages = _dockerfile_stages(text)
    assert {"builder", "cuda-base", "serve-gpu", "serve-cpu", "train"} <= set(stages)
    assert list(stages)[-1] == "serve" and "FROM serve-gpu AS serve" in stages["serve"], "default target"
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:[\d.]+-cudnn-runtime-ubuntu2[24]\.04$", text, flags=re.M)
    assert stages["cuda-base"].startswith("FROM ${CUDA_IMAGE} AS cuda-base")
    assert stages["serve-cpu"].startswith("FROM ${PYTHON_IMAGE} AS serve-cpu")
    for name in ("serve-gpu", "serve-cpu", "train"):
        body = stages[name]
        assert re.search(r"^USER 10001", body, flags=re.M), name
        assert "/models" in body, name
    for name in ("serve-gpu", "serve-cpu"):
        body = stages[name]
        assert re.search(r"^HEALTHCHECK .*CMD \[.*/readyz", body, flags=re.M), f"JSON-form HEALTHCHECK in {name}"
        assert re.search(r"^EXPOSE 8000 8001$", body, flags=re.M), f"HTTP and gRPC ports in {name}"
        assert "MMSERVE_PORT=8000" in body and "MMSERVE_GRPC_PORT=8001" in body, name
        assert 'VOLUME ["/models"]' in body and "MMSERVE_REPOSITORY=/models" in body, name
        assert "onnxruntime-gpu==" in body and not re.search(r"[\s\"]onnxruntime==", body), name
        for heavy in ("torch", "transformers", "peft", "onnxscript", "[train]", "scikit"):
            assert heavy not in body, f"{heavy} in serving stage {name}"
    assert "torch==${TORCH_VERSION}" in stages["train"] and "mmserve[train]" in stages["train"]
    # both builders: no BuildKit frontend line; the classic builder builds every stage above its target, so the
    # CPU image comes before the CUDA stages
    assert not re.search(r"^#\s*syntax=", text, flags=re.M)
    assert list(stages).index("serve-cpu") < list(stages).index("cuda-base")


# ---------------------------------------------------------------------------------------------
# External tools, installed by scripts/check_deploy.sh
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tools() -> dict[str, str]:
    if shutil.which("bash") is None:
        pytest.skip("bash is not available")
    proc = subprocess.run(
        ["bash", str(CHECK_SCRIPT), "install"], cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"installing the deployment tools failed:\n{proc.stderr[-4000:]}"
    paths = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    return paths


def _run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("profile", [None, "cpu", "gpu"])
def test_compose_config_is_valid(tools, profile):
    cmd = [tools["COMPOSE"]] + (["--profile", profile] if profile else []) + ["config", "-q"]
    proc = _run(cmd)
    assert proc.returncode == 0, proc.stderr


def test_compose_profiles_select_the_right_service(tools):
    def services(*args: str) -> set[str]:
        proc = _run([tools["COMPOSE"], *args, "config", "--services"])
        assert proc.returncode == 0, proc.stderr
        return set(proc.stdout.split())

    assert services() == {"mmserve", "prometheus", "grafana"}  # .env: COMPOSE_PROFILES=gpu
    assert services("--profile", "cpu") == {"mmserve-cpu", "prometheus", "grafana"}

    proc = _run([tools["COMPOSE"], "--profile", "cpu", "--profile", "gpu", "config", "--format", "json"])
    assert proc.returncode == 0, proc.stderr
    config = json.loads(proc.stdout)["services"]
    gpu, cpu = config["mmserve"], config["mmserve-cpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in cpu or not cpu["deploy"].get("resources")
    assert cpu["profiles"] == ["cpu"] and gpu["profiles"] == ["gpu"]
    for service in (gpu, cpu):
        assert service["environment"]["MMSERVE_REPOSITORY"] == "/models"
        mount = next(v for v in service["volumes"] if v["target"] == "/models")
        assert mount["read_only"] is True and mount["source"].endswith("model_repository")
        assert "/readyz" in " ".join(service["healthcheck"]["test"])
    assert cpu["environment"]["MMSERVE_DEVICE"] == "cpu"
    settings = architecture_settings()
    for service in (gpu, cpu):
        unknown = {k for k in service["environment"] if k.startswith("MMSERVE_")} - settings
        assert not unknown, f"not a documented MMSERVE_ setting: {sorted(unknown)}"
    assert cpu["build"]["target"] == "serve-cpu" and gpu["build"]["target"] == "serve-gpu"


def test_compose_plugin_through_docker_cli(tools):
    if shutil.which("docker") is None:
        pytest.skip("no docker CLI on this machine (the standalone compose binary was checked)")
    proc = _run(["docker", "compose", "config", "-q"], env={"DOCKER_CONFIG": tools["DOCKER_CONFIG"]})
    assert proc.returncode == 0, proc.stderr


def test_hadolint(tools):
    proc = _run([tools["HADOLINT"], "--no-color", "--failure-threshold", "info", "Dockerfile"])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_check_config(tools):
    proc = _run([tools["PROMTOOL"], "check", "config", str(PROMETHEUS.relative_to(ROOT))])
    assert proc.returncode == 0, proc.stdout + proc.stderr

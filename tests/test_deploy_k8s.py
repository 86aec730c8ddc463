"""The Helm chart (deploy/helm/mmserve) and the KServe manifests (deploy/kserve), offline.

Every values set in the chart's ci/ folder is rendered without and with the Prometheus Operator's CRDs
(`--api-versions`), linted (`helm lint --strict` through helm-python-sdk), validated with
kubernetes-validate --strict for Kubernetes 1.30 and 1.37 and, for custom resources, against the JSON schemas in
../shared/schemas/crds (skipped with a message when that folder is absent); yamllint passes. A live server started
with the chart's environment answers the probe paths on the ports the chart renders and drains inside the
rendered grace period. The server serves KServe's single-model layout (/mnt/models) under MMSERVE_MODEL_NAME.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from app.core.loading import list_models, version_entry
from app.settings import Settings
from tests.fixtures_app import app_repository  # noqa: F401 (fixture)
from tests.test_deploy import tools  # noqa: F401 (fixture: scripts/check_deploy.sh install)

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "mmserve"
KSERVE = ROOT / "deploy" / "kserve"
CRDS = ROOT.parent / "shared" / "schemas" / "crds"
VALUES_SETS = ["default", "gpu", "cpu", "keda", "hpa"]
OPERATOR = ["monitoring.coreos.com/v1", "monitoring.coreos.com/v1/ServiceMonitor",
            "monitoring.coreos.com/v1/PrometheusRule"]
KUBE_VERSIONS = ["1.30.0", "1.37.0"]
BASE_KINDS = {"Deployment", "Service", "ServiceAccount", "PodDisruptionBudget"}
EXPECTED_KINDS = {
    "default": BASE_KINDS, "gpu": BASE_KINDS, "cpu": BASE_KINDS,
    "keda": BASE_KINDS | {"ScaledObject"}, "hpa": BASE_KINDS | {"HorizontalPodAutoscaler"},
}
SIGNAL_METRICS = {"mmserve_inflight_requests", "mmserve_queue_depth"}


def _batch(tools, jobs: list[dict]) -> list[dict]:
    proc = subprocess.run([tools["TOOLS_PYTHON"], str(ROOT / "scripts" / "helm_chart.py"), "batch"], cwd=ROOT,
                          input=json.dumps(jobs), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def _docs(manifests: dict[str, str]) -> list[dict]:
    return [d for text in manifests.values() for d in yaml.safe_load_all(text) if d]


def _one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind}"
    return found[0]


@pytest.fixture(scope="module")
def rendered(tools) -> dict[tuple[str, bool], dict]:
    """(values set, operator CRDs present) -> {"manifests", "lint"}."""
    keys = [(name, op) for name in VALUES_SETS for op in (False, True)]
    jobs = [{"chart": str(CHART), "values_files": [str(CHART / "ci" / f"{name}-values.yaml")],
             "api_versions": OPERATOR if op else [], "kube_version": "v1.30.0", "lint": not op} for name, op in keys]
    return dict(zip(keys, _batch(tools, jobs)))


def test_values_sets_are_the_ci_folder():
    assert sorted(p.name for p in (CHART / "ci").glob("*-values.yaml")) == sorted(f"{n}-values.yaml" for n in VALUES_SETS)


@pytest.mark.parametrize("name", VALUES_SETS)
def test_chart_lints_clean(rendered, name):
    report = rendered[(name, False)]["lint"]
    assert report["total_charts_linted"] == 1 and not report.get("errors"), report
    findings = [m for m in report["messages"] if m["severity"] >= 2]
    assert not findings, findings


@pytest.mark.parametrize("operator", [False, True], ids=["no-operator", "operator"])
@pytest.mark.parametrize("name", VALUES_SETS)
def test_rendered_objects(rendered, name, operator):
    out = rendered[(name, operator)]
    assert "error" not in out, out.get("error")
    docs = _docs(out["manifests"])
    expected = EXPECTED_KINDS[name] | ({"ServiceMonitor", "PrometheusRule"} if operator else set())
    assert sorted(d["kind"] for d in docs) == sorted(expected)
    dep = _one(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    # security: non-root, read-only root filesystem with a writable /tmp, no escalation, no capabilities
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc.get("privileged")
    assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])
    # every MMSERVE_* variable is a real setting
    fields = {f"MMSERVE_{n.upper()}" for n in Settings.model_fields}
    assert {k for k in env if k.startswith("MMSERVE_")} <= fields
    # GPU / CPU variants
    if name in ("cpu", "keda"):
        assert env["MMSERVE_DEVICE"] == "cpu" and c["image"] == "mmserve:cpu"
        assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    else:
        assert env["MMSERVE_DEVICE"] == "cuda" and c["image"] == "mmserve:gpu"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    # model repository: read-only PVC by default, an init container filling an emptyDir in the cpu set
    models = next(m for m in c["volumeMounts"] if m["name"] == "models")
    assert models["readOnly"] is True and models["mountPath"] == env["MMSERVE_REPOSITORY"]
    volume = next(v for v in pod["volumes"] if v["name"] == "models")
    if name == "cpu":
        assert "emptyDir" in volume and pod["initContainers"][0]["env"][0]["value"] == env["MMSERVE_REPOSITORY"]
    else:
        assert volume["persistentVolumeClaim"]["readOnly"] is True and "initContainers" not in pod
    # Service ports follow the container ports; no gRPC port when the server's is 0
    svc = _one(docs, "Service")
    names = {p["name"] for p in c["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == names
    assert names == ({"http"} if env["MMSERVE_GRPC_PORT"] == "0" else {"http", "grpc"})
    # autoscaling: a serving signal, never CPU; the Deployment leaves replicas to the autoscaler
    if name == "hpa":
        (metric,) = _one(docs, "HorizontalPodAutoscaler")["spec"]["metrics"]
        assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] in SIGNAL_METRICS
        assert "replicas" not in dep["spec"]
    if name == "keda":
        (trigger,) = _one(docs, "ScaledObject")["spec"]["triggers"]
        assert trigger["type"] == "prometheus" and "mmserve_queue_depth{" in trigger["metadata"]["query"]
        assert "replicas" not in dep["spec"]
    if operator:
        rules = _one(docs, "PrometheusRule")["spec"]["groups"][0]["rules"]
        exprs = " ".join(r["expr"] for r in rules)
        for metric in ("mmserve_queue_depth", "mmserve_request_duration_seconds_bucket", "mmserve_model_info",
                       "mmserve_requests_total"):
            assert metric in exprs
        assert _one(docs, "ServiceMonitor")["spec"]["endpoints"][0]["path"] == "/metrics"


def test_metric_names_are_exported():
    """The metrics the chart's autoscalers and rules name are the service's own (app/metrics.py)."""
    from app.metrics import Metrics

    exported = {m.name for m in Metrics().registry.collect()}
    text = "".join(p.read_text() for p in (CHART / "templates").glob("*.yaml")) + (CHART / "values.yaml").read_text()
    text += "".join(p.read_text() for p in KSERVE.glob("*.yaml"))
    import re

    used = set(re.findall(r"\b(mmserve_[a-z_]+)", text))
    used = {re.sub(r"_(bucket|total)$", "", n) for n in used}
    assert used and used <= exported | {"mmserve_models"}, sorted(used - exported)


def test_bad_values_fail_at_install(tools):
    bad = [{"variant": "tpu"}, {"securityContext": {"readOnlyRootFilesystem": False, "allowPrivilegeEscalation": False}},
           {"autoscaling": {"enabled": True, "signal": "cpu"}}, {"server": {"settings": {"PORT": 9}}},
           {"drain": {"preStopSleepSeconds": 3, "drainPeriodSeconds": 5, "shutdownTimeoutSeconds": "30",
                      "marginSeconds": 15}}]
    results = _batch(tools, [{"chart": str(CHART), "values": v} for v in bad])
    for values, out in zip(bad, results):
        assert out.get("error", "").startswith("HelmValuesError") and "- at '" in out["error"], (values, out)


def _validate(tools, sources: list[dict]) -> list[dict]:
    cmd = [tools["TOOLS_PYTHON"], str(ROOT / "scripts" / "validate_manifests.py"), "--json", "--crds", str(CRDS)]
    for v in KUBE_VERSIONS:
        cmd += ["-k", v]
    proc = subprocess.run(cmd, input=json.dumps(sources), capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def crds():
    if not CRDS.is_dir():
        pytest.skip(f"no CRD schemas at {CRDS} (../shared/schemas/crds beside the clone)")
    return CRDS


def test_every_rendering_and_kserve_manifest_validates(tools, rendered, crds):
    sources = [{"source": f"{name}{'+operator' if op else ''}:{path}", "text": text}
               for (name, op), out in rendered.items() for path, text in out["manifests"].items()]
    sources += [{"source": p.name, "text": p.read_text()} for p in sorted(KSERVE.glob("*.yaml"))]
    rows = _validate(tools, sources)
    failed = [r for r in rows if r["error"]]
    assert not failed, failed
    checked = {(r["kind"], r["version"]) for r in rows}
    for kind in ("Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ServiceAccount"):
        assert {(kind, v) for v in KUBE_VERSIONS} <= checked, kind
    for kind in ("ScaledObject", "ServiceMonitor", "PrometheusRule", "ClusterServingRuntime", "InferenceService"):
        assert (kind, "crd") in checked, kind


def test_validation_rejects_unknown_fields(tools, crds):
    """The validator is strict for both built-in kinds and custom resources."""
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"portz": []}}
    so = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "x"},
          "spec": {"scaleTargetRef": {"name": "x"}, "triggers": [], "bogus": 1}}
    rows = _validate(tools, [{"source": "bad", "text": yaml.safe_dump_all([svc, so])}])
    assert len(rows) == 3 and all(r["error"] for r in rows), rows


def test_yamllint(tools, rendered, tmp_path):
    out = tmp_path / "rendered"
    out.mkdir()
    for (name, op), result in rendered.items():
        (out / f"{name}{'-operator' if op else ''}.yaml").write_text(
            "".join(f"---\n{text.strip()}\n" for text in result["manifests"].values()))
    proc = subprocess.run([tools["YAMLLINT"], "-f", "parsable", "-c", str(ROOT / "deploy" / "yamllint.yaml"),
                           str(CHART / "Chart.yaml"), str(CHART / "values.yaml"), str(CHART / "ci"), str(KSERVE),
                           str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------
# Cross-checks against a live server (no container: `python -m app` with the rendered environment)
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(env: dict[str, str], delay_ms: float = 0) -> tuple[subprocess.Popen, str, Path]:
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"mmserve-k8s-{env['MMSERVE_PORT']}.log"
    e = {k: v for k, v in os.environ.items() if not k.startswith("MMSERVE_")}
    e.update(env, PYTHONPATH=str(ROOT), TEST_INFERENCE_DELAY_MS=str(delay_ms), MMSERVE_INTRA_OP_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "tests._app_server"], cwd=ROOT, env=e,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{env['MMSERVE_PORT']}"
    end = time.monotonic() + 60
    while time.monotonic() < end:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url, log
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("server not ready:\n" + log.read_text())


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.slow
def test_chart_probes_ports_and_drain_on_a_live_server(rendered, app_repository):
    """The Deployment's environment (ports remapped to free loopback ports, the repository to a local one, the
    CPU device) starts a server whose probe paths answer on the rendered ports, whose gRPC port listens, and
    whose SIGTERM drain under load ends inside terminationGracePeriodSeconds minus the preStop sleep."""
    docs = _docs(rendered[("default", False)]["manifests"])
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": int(env["MMSERVE_PORT"]), "grpc": int(env["MMSERVE_GRPC_PORT"])}
    http, grpc = _free_port(), _free_port()
    env.update(MMSERVE_REPOSITORY=str(app_repository), MMSERVE_HOST="127.0.0.1", MMSERVE_DEVICE="cpu",
               MMSERVE_PORT=str(http), MMSERVE_GRPC_PORT=str(grpc), MMSERVE_MAX_BATCH_SIZE="1")
    remap = {"http": http, "grpc": grpc}
    proc, url, log = _start(env, delay_ms=200)
    try:
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = c[probe]["httpGet"]
            r = httpx.get(f"http://127.0.0.1:{remap[get['port']]}{get['path']}", timeout=5)
            assert r.status_code == 200, (probe, r.status_code, r.text)
        with socket.create_connection(("127.0.0.1", grpc), timeout=5):
            pass
        assert "mmserve_inflight_requests" in httpx.get(url + "/metrics").text

        grace = pod["terminationGracePeriodSeconds"]
        pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]

        async def scenario() -> tuple[list, float]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as ac:
                tasks = [asyncio.create_task(ac.post("/v1/classify", json={"text": f"item {i}"})) for i in range(16)]
                await asyncio.sleep(0.3)  # accepted, one running, the rest queued (200 ms each)
                t0 = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                results = await asyncio.gather(*tasks, return_exceptions=True)
                while proc.poll() is None and time.monotonic() - t0 < grace:
                    await asyncio.sleep(0.05)
                return results, time.monotonic() - t0

        results, drained = asyncio.run(scenario())
        assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in results), results
        assert proc.poll() in (0, -signal.SIGTERM), log.read_text()[-3000:]
        assert float(env["MMSERVE_DRAIN_PERIOD_S"]) <= drained < grace - pre_stop, (drained, grace, pre_stop)
        print(f"drain under load: {drained:.2f} s; grace period {grace} s (preStop {pre_stop} s)")
    finally:
        _stop(proc)


# ---------------------------------------------------------------------------------------------
# KServe's layout: one model directory at /mnt/models, the served name from MMSERVE_MODEL_NAME
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def kserve_layouts(app_repository, tmp_path) -> dict[str, Path]:
    versioned = tmp_path / "versioned" / "models"  # /mnt/models/1/manifest.json
    shutil.copytree(app_repository / "tiny-classify", versioned)
    flat = tmp_path / "flat" / "models"  # /mnt/models/manifest.json
    shutil.copytree(app_repository / "tiny-classify" / "1", flat)
    return {"versioned": versioned, "flat": flat}


@pytest.mark.parametrize("layout", ["versioned", "flat"])
def test_single_model_layout_is_discovered(kserve_layouts, layout, monkeypatch, app_repository):
    root = kserve_layouts[layout]
    monkeypatch.delenv("MMSERVE_MODEL_NAME", raising=False)
    assert list_models(root) == {"tiny-classify": root}  # the manifest's name
    monkeypatch.setenv("MMSERVE_MODEL_NAME", "demo-classify")
    assert list_models(root) == {"demo-classify": root}
    entry = version_entry("demo-classify", root, None)
    assert entry.state == "pending" and entry.version == 1, entry.reason
    assert entry.directory == (root / "1" if layout == "versioned" else root)
    assert version_entry("demo-classify", root, 2).state == "failed"
    # a NAME/VERSION repository is unchanged (MODEL_NAME does not apply to it)
    assert set(list_models(app_repository)) == {"tiny-classify", "tiny-ner", "tiny-vqa"}


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["versioned", "flat"])
def test_kserve_runtime_serves_the_mounted_model(kserve_layouts, layout):
    """The ClusterServingRuntime's container environment ({{.Name}} = the InferenceService's name, the
    repository /mnt/models replaced by a local copy of that layout, loopback ports) serves the model under that
    name over /v2 and /v1, and the runtime's probe paths answer."""
    runtime = yaml.safe_load((KSERVE / "clusterservingruntime.yaml").read_text())
    (c,) = runtime["spec"]["containers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["MMSERVE_REPOSITORY"] == "/mnt/models" and env["MMSERVE_MODEL_NAME"] == "{{.Name}}"
    assert {"v2", "grpc-v2"} <= set(runtime["spec"]["protocolVersions"])
    assert c["ports"][0]["containerPort"] == int(env["MMSERVE_PORT"])
    env.update(MMSERVE_REPOSITORY=str(kserve_layouts[layout]), MMSERVE_MODEL_NAME="demo-classify",
               MMSERVE_HOST="127.0.0.1", MMSERVE_PORT=str(_free_port()), MMSERVE_GRPC_PORT=str(_free_port()),
               MMSERVE_DEVICE="cpu")
    proc, url, log = _start(env)
    try:
        for probe in ("readinessProbe", "livenessProbe"):
            assert httpx.get(url + c[probe]["httpGet"]["path"], timeout=5).status_code == 200, probe
        assert httpx.get(url + "/v2/models/demo-classify/ready", timeout=5).status_code == 200
        meta = httpx.get(url + "/v2/models/demo-classify", timeout=5).json()
        assert meta["name"] == "demo-classify" and meta["versions"] == ["1"], meta
        assert httpx.get(url + "/v2/models/tiny-classify/ready", timeout=5).status_code != 200
        r = httpx.post(url + "/v1/classify", json={"text": "hello"}, timeout=30)
        assert r.status_code == 200 and r.json()["predictions"], r.text
    finally:
        _stop(proc)

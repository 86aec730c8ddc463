"""Prometheus alerting rules and the Grafana dashboard against what the service really exports.

- deploy/prometheus/alerts.yml passes `promtool check rules`, and `promtool test rules` proves each alert fires
  on series that should page and stays quiet on a healthy server (tests/prometheus/alerts_test.yml);
- it agrees with the Helm chart's PrometheusRule (names, thresholds, `for`, severity, metrics);
- every metric the dashboard, the alerts and the chart's rule name appears in the /metrics of a live app
  (in-process, tiny models: no Docker needed).

promtool comes from scripts/check_deploy.sh (Debian's `prometheus` package; the `tools` fixture).
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.fixtures_app import app_repository  # noqa: F401 (fixture)
from tests.test_deploy import (DASHBOARD, dashboard_metric_names, metric_names_from_exposition, promql_metric_names,
                               tools)  # noqa: F401 (fixture)
from tests.test_deploy_k8s import CHART, OPERATOR, _batch, _docs, _one

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "tests" / "prometheus" / "alerts_test.yml"
REQUIRED = {"MmserveQueueNearFull", "MmserveP99OverDeadline", "MmserveModelUnhealthy", "MmserveErrorRatio"}


def _promtool(tools, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([tools["PROMTOOL"], *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def _rules(groups: list[dict]) -> dict[str, dict]:
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


def test_promtool_check_rules(tools):
    proc = _promtool(tools, "check", "rules", str(ALERTS.relative_to(ROOT)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 rules found" in proc.stdout
    assert set(_rules(yaml.safe_load(ALERTS.read_text())["groups"])) == REQUIRED


def test_promtool_alert_unit_tests(tools):
    """Each alert fires (labels, annotations, after its `for`) on a bad server and not on a healthy one."""
    proc = _promtool(tools, "test", "rules", str(ALERTS_TEST.relative_to(ROOT)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_prometheus_config_loads_the_rules():
    config = yaml.safe_load((ALERTS.parent / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    compose = (ROOT / "docker-compose.yml").read_text()
    assert "./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in compose


def _threshold(expr: str) -> tuple[str, float]:
    m = re.search(r"(>=|>|==)\s*([0-9.e+-]+)\s*$", expr.strip())
    assert m, expr
    return m.group(1), float(m.group(2))


def test_alerts_match_the_helm_prometheusrule(tools):
    """Same alerts as the chart's PrometheusRule rendered with its default values (the Prometheus Operator's
    CRDs present): names, comparison and threshold, `for`, severity and the metrics each one reads."""
    (out,) = _batch(tools, [{"chart": str(CHART), "values_files": [str(CHART / "ci" / "default-values.yaml")],
                             "api_versions": OPERATOR, "kube_version": "v1.30.0", "lint": False}])
    helm = _rules(_one(_docs(out["manifests"]), "PrometheusRule")["spec"]["groups"])
    compose = _rules(yaml.safe_load(ALERTS.read_text())["groups"])
    assert set(helm) == set(compose) == REQUIRED
    for name in REQUIRED:
        h, c = helm[name], compose[name]
        assert _threshold(h["expr"]) == _threshold(c["expr"]), name
        assert h["for"] == c["for"] and h["labels"]["severity"] == c["labels"]["severity"], name
        assert promql_metric_names(h["expr"]) == promql_metric_names(c["expr"]), name
        assert 'job="mmserve"' in c["expr"], name


@pytest.fixture(scope="module")
def live_metrics(app_repository) -> str:
    """The /metrics text of the real app on tiny models after one answered and one rejected request."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings
    from tests.test_app_api import wait_ready

    with TestClient(create_app(Settings(repository=app_repository, grpc_port=0))) as client:
        wait_ready(client)
        assert client.post("/v1/classify", data={"text": "alice flew to paris"}).status_code == 200
        assert client.post("/v1/classify", data={"text": ""}).status_code == 422
        r = client.get("/metrics")
        assert r.status_code == 200
        return r.text


def test_dashboard_queries_name_live_metrics(live_metrics):
    """Every metric a dashboard query names is one the running service shows on /metrics."""
    exported = metric_names_from_exposition(live_metrics)
    used = dashboard_metric_names(DASHBOARD)
    assert len(used) >= 7, used
    missing = used - exported
    assert not missing, f"dashboard queries metrics /metrics does not show: {sorted(missing)}"


def test_alert_and_chart_queries_name_live_metrics(live_metrics):
    exported = metric_names_from_exposition(live_metrics)
    used: set[str] = set()
    for rule in _rules(yaml.safe_load(ALERTS.read_text())["groups"]).values():
        used |= promql_metric_names(rule["expr"])
    assert used == {"mmserve_queue_depth", "mmserve_request_duration_seconds", "mmserve_model_info",
                    "mmserve_requests_total"}
    assert not used - exported, sorted(used - exported)
    # a sample, not only a declaration: the counter the compose test queries back through Prometheus
    assert re.search(r'^mmserve_requests_total\{endpoint="/v1/classify",model="tiny-classify",status="200"\} 1\.0$',
                     live_metrics, flags=re.M), live_metrics[:2000]

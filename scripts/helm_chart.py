"""Offline `helm template` / `helm lint` through helm-python-sdk (Helm v4's engine as a library; no binary,
no cluster). Runs in the deployment tools' venv (scripts/check_deploy.sh install).

    python scripts/helm_chart.py template CHART [-f VALUES]... [--api-versions GROUP/VERSION[/KIND]]...
                                         [--kube-version v1.30.0] [--namespace NS] [--name RELEASE]
    python scripts/helm_chart.py lint CHART [-f VALUES]... [--kube-version v1.30.0]
    python scripts/helm_chart.py batch < JOBS.json    (a list of {"chart", "values_files", "api_versions",
                                                       "kube_version", "namespace", "name", "lint"}; prints a
                                                       list of {"manifests": {template: text}, "lint": report})

`template` prints the rendered documents as `helm template` does (one `# Source:` per template).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml
from helm_python import _native


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_values(files: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for f in files:
        values = _merge(values, yaml.safe_load(Path(f).read_text()) or {})
    return values


def render(chart: str, values: dict[str, Any], *, api_versions: list[str] = (), kube_version: str | None = None,
           namespace: str = "default", name: str = "mmserve") -> dict[str, str]:
    """Template path -> rendered text. Helm's render options (name, namespace, is_install, kube_version,
    api_versions: `helm template --kube-version --api-versions`); the values are checked against
    values.schema.json first, as `helm install` does."""
    loaded = helm.Chart.load(chart)
    loaded.validate_schema(values)
    opts = {"name": name, "namespace": namespace, "is_install": True, "api_versions": list(api_versions)}
    if kube_version:
        opts["kube_version"] = kube_version
    rendered = _native.call_string("helm_render", loaded._raw(), json.dumps(values), json.dumps(opts))
    return {path: text for path, text in sorted(json.loads(rendered).items())
            if text.strip() and not path.endswith("NOTES.txt")}


def lint(chart: str, values: dict[str, Any], kube_version: str | None = None) -> dict[str, Any]:
    return helm.lint(chart, values, strict=True, kube_version=kube_version)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    values = load_values(job.get("values_files", []))
    values = _merge(values, job.get("values", {}))
    out: dict[str, Any] = {}
    try:
        out["manifests"] = render(job["chart"], values, api_versions=job.get("api_versions", []),
                                  kube_version=job.get("kube_version"), namespace=job.get("namespace", "default"),
                                  name=job.get("name", "mmserve"))
    except helm.HelmError as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    if job.get("lint"):
        out["lint"] = lint(job["chart"], values, job.get("kube_version"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["template", "lint", "batch"])
    p.add_argument("chart", nargs="?")
    p.add_argument("-f", "--values", action="append", default=[])
    p.add_argument("--api-versions", action="append", default=[])
    p.add_argument("--kube-version")
    p.add_argument("--namespace", default="default")
    p.add_argument("--name", default="mmserve")
    a = p.parse_args(argv)
    if a.command == "batch":
        print(json.dumps([run_job(job) for job in json.load(sys.stdin)]))
        return 0
    if not a.chart:
        p.error("CHART is required")
    values = load_values(a.values)
    if a.command == "lint":
        report = lint(a.chart, values, a.kube_version)
        for m in report.get("messages", []):
            print(f"[{ {1: 'INFO', 2: 'WARNING', 3: 'ERROR'}.get(m['severity'], '?') }] {m['path']}: {m['error']}")
        bad = report.get("errors") or [m for m in report.get("messages", []) if m["severity"] >= 2]
        print(f"{report.get('total_charts_linted', 0)} chart(s) linted, {len(bad)} failed")
        return 1 if bad else 0
    for path, text in render(a.chart, values, api_versions=a.api_versions, kube_version=a.kube_version,
                             namespace=a.namespace, name=a.name).items():
        print(f"---\n# Source: {path}\n{text.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

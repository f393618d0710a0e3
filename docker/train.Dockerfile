# The trainer: entrypoint `microbert-train`, as a non-root user, in /app (which holds train/main.py, so
# `deepspeed train/main.py --ds-config v4.json` works too: `docker run --entrypoint deepspeed ...`).
#
# GPU (default): a CUDA *devel* base, because DeepSpeed compiles its fused ops with nvcc at first use,
# and PyPI's torch (a CUDA 13 build, matching the base's nvcc).
#   docker build -f docker/train.Dockerfile -t microbert-train .
# CPU, from the same file (see docker/serve.Dockerfile for the arguments):
#   docker build -f docker/train.Dockerfile -t microbert-train:cpu \
#     --build-arg BASE_IMAGE=python:3.11-slim-bookworm --build-arg TORCH_SPEC=torch==2.13.0+cpu \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
# Volumes: /runs (run folders: checkpoints, exports, logs), /cache/huggingface (HF_HOME: Hub downloads),
# /cache/microbert (MICROBERT_CACHE_DIR: tokenized shards).
ARG BASE_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu24.04

# --- base: Python, its venv module and, next to nvcc, what DeepSpeed's op builds need ----------------
FROM ${BASE_IMAGE} AS base
# $packages is a word list on purpose.
# hadolint ignore=DL3008,SC2086
RUN packages=""; \
    python3 -c 'import ensurepip, venv' 2>/dev/null || packages="python3 python3-venv ca-certificates"; \
    if [ -x /usr/local/cuda/bin/nvcc ]; then packages="$packages python3-dev g++"; fi; \
    if [ -n "$packages" ]; then \
      apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $packages \
      && rm -rf /var/lib/apt/lists/*; \
    fi
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# --- deps: every dependency, installed before any source is copied, so code changes reuse the layer ---
FROM base AS deps
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch alone first, by exact version: a CPU image that asked for +cpu fails here if the wheel is missing,
# instead of quietly downloading the multi-GB CUDA build. (Pinned, through TORCH_SPEC.)
# hadolint ignore=DL3013
RUN --mount=type=secret,id=pip_ca \
    --mount=type=bind,source=docker/wheels,target=/wheels \
    --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    if [ -n "$TORCH_INDEX_URL" ]; then export PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL"; fi; \
    pip install --find-links /wheels "$TORCH_SPEC" \
    && python3 -c 'from importlib.metadata import version; print("torch==" + version("torch"))' \
       > /opt/venv/torch-constraint.txt
COPY pyproject.toml docker/requirements.py /src/
# DeepSpeed is an sdist whose setup imports torch: build it against the torch above, not in an isolated
# environment (which would download another torch).
RUN --mount=type=secret,id=pip_ca \
    --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    python3 /src/requirements.py /src/pyproject.toml --build > /src/build-requirements.txt \
    && python3 /src/requirements.py /src/pyproject.toml train > /src/requirements.txt \
    && pip install -r /src/build-requirements.txt \
    && pip install --no-build-isolation --constraint /opt/venv/torch-constraint.txt -r /src/requirements.txt

# --- the image: the base, the venv, the source in /app (installed editable) --------------------------
FROM base
ARG APP_UID=1000
# CUDA's Ubuntu images ship a user with uid 1000: make room for ours, whose uid matches most hosts' first
# user, so files in a mounted run folder belong to them. The volume folders belong to it, so named
# volumes start writable.
RUN if getent passwd "$APP_UID" >/dev/null; then userdel --remove "$(id -nu "$APP_UID")"; fi \
    && useradd --create-home --uid "$APP_UID" --user-group --shell /bin/bash microbert \
    && mkdir -p /runs /cache/huggingface /cache/microbert \
    && chown microbert:microbert /runs /cache/huggingface /cache/microbert
COPY --from=deps /opt/venv /opt/venv
WORKDIR /app
COPY pyproject.toml README.md ./
COPY microbert microbert
COPY train train
# runs/<profile>, the trainer's default run folder, lands in the /runs volume.
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation --no-cache-dir -e . \
    && ln -s /runs /app/runs
ENV PATH=/opt/venv/bin:$PATH \
    HF_HOME=/cache/huggingface \
    MICROBERT_CACHE_DIR=/cache/microbert
VOLUME ["/runs", "/cache/huggingface", "/cache/microbert"]
USER ${APP_UID}
ENTRYPOINT ["microbert-train"]
CMD ["--help"]
